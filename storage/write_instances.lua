-- One user's instances stored atomically: records and their sequence membership together, so a
-- reader (the source's history read, Score) never sees one without the other, whatever a
-- consumer of the stream is doing.
-- KEYS[1]     the user's sequence (sorted set: score = timestamp ms, member = 20-digit InsID)
-- KEYS[2..]   record keys, one per record value in ARGV (same hash tag, so the same shard)
-- ARGV[1]     TTL in ms of records and of the sequence; "0": none
-- ARGV[2]     Lmax: the sequence keeps its newest Lmax members
-- ARGV[3]     "1": keep a record that the same source-model version stored already; "0": replace
-- ARGV[4..]   per instance: member, score (timestamp ms), record value ("" = sequence only:
--             the sequencer re-appending what the source stored, or a test)
-- Reply: {records written, records kept because the same source version had stored them}.
--
-- Ingest keeps (ARGV[3] = "1"): an InsEmb is computed once, so a record of the same source-model
-- version (bytes 32..39 of the header) stored already stays as it is (a retried request), because
-- a recomputation could see instances that arrived since and give a different InsEmb. A record
-- of another version is replaced (a backfill under a new source model).
-- The sequence's TTL only ever grows, so it outlives every record it names even when writers
-- with different retentions meet.
local seq = KEYS[1]
local ttl = tonumber(ARGV[1])
local lmax = tonumber(ARGV[2])
local keep_same_version = ARGV[3] == '1'
local seq_ttl = redis.call('PTTL', seq)
local written, kept = 0, 0
local pairs_ = {}
local record = 1
for a = 4, #ARGV, 3 do
  local member, score, value = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  if value ~= '' then
    record = record + 1
    local old = keep_same_version and redis.call('GET', KEYS[record])
    if old and string.sub(old, 33, 40) == string.sub(value, 33, 40) then
      kept = kept + 1
    else
      if ttl > 0 then
        redis.call('SET', KEYS[record], value, 'PX', ttl)
      else
        redis.call('SET', KEYS[record], value)
      end
      written = written + 1
    end
  end
  pairs_[#pairs_ + 1] = score
  pairs_[#pairs_ + 1] = member
end
local chunk = 1000 -- unpack() of very long argument lists overflows Lua's C stack
for first = 1, #pairs_, chunk do
  redis.call('ZADD', seq, unpack(pairs_, first, math.min(first + chunk - 1, #pairs_)))
end
redis.call('ZREMRANGEBYRANK', seq, 0, -(lmax + 1))
if ttl > 0 and (seq_ttl == -2 or (seq_ttl >= 0 and seq_ttl < ttl)) then
  redis.call('PEXPIRE', seq, ttl)
end
return {written, kept}
