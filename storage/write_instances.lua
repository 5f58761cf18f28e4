-- One user's instances stored atomically: records and their sequence membership together, so a
-- reader (the source's history read, Score) never sees one without the other, whatever a
-- consumer of the stream is doing.
-- KEYS[1]     the user's sequence (sorted set: score = timestamp ms, member = 20-digit InsID)
-- KEYS[2..]   record keys, one per record value in ARGV (same hash tag, so the same shard)
-- ARGV[1]     TTL in ms of records and of the sequence; "0": none
-- ARGV[2]     Lmax: the sequence keeps its newest Lmax members
-- ARGV[3]     "1": keep a record that the same source-model version stored already; "0": replace
-- ARGV[4]     record key prefix "<prefix>:ins:{<uid>}:" (same hash tag as KEYS[1]): the records
--             of members that the trim removes are deleted through it
-- ARGV[5..]   per instance: member, score (timestamp ms), record value ("" = sequence only:
--             the sequencer re-appending what the source stored, or a test)
-- Reply: {records written, records kept because the same source version had stored them,
--         records not stored because their member was trimmed in this same call}.
--
-- Memory follows what is servable: a member that leaves the sequence (the oldest beyond Lmax)
-- takes its record with it, in this call, so a user holds at most Lmax records + 1 sequence.
-- An instance that arrives after Lmax newer ones (out of order, or re-delivered after its trim)
-- is added and trimmed again here, and its record is never written: no read could return it.
-- Full history (offline training, backfill) lives in the stream's archive, not here.
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
local prefix = ARGV[4]
local first_triple = 5
local seq_ttl = redis.call('PTTL', seq)
local chunk = 1000 -- unpack() of very long argument lists overflows Lua's C stack

-- Membership first, so that the trim below sees this call's instances among the others.
local pairs_ = {}
for a = first_triple, #ARGV, 3 do
  pairs_[#pairs_ + 1] = ARGV[a + 1]
  pairs_[#pairs_ + 1] = ARGV[a]
end
for first = 1, #pairs_, chunk do
  redis.call('ZADD', seq, unpack(pairs_, first, math.min(first + chunk - 1, #pairs_)))
end

-- The trim: ZPOPMIN removes the lowest (score, member) first, the order ZREMRANGEBYRANK used,
-- and names what left, so their records go too.
local gone = {}
local over = redis.call('ZCARD', seq) - lmax
if over > 0 then
  local popped = redis.call('ZPOPMIN', seq, over)
  local keys = {}
  for i = 1, #popped, 2 do
    gone[popped[i]] = true
    keys[#keys + 1] = prefix .. popped[i]
  end
  for first = 1, #keys, chunk do
    redis.call('DEL', unpack(keys, first, math.min(first + chunk - 1, #keys)))
  end
end

local written, kept, dropped = 0, 0, 0
local record = 1
for a = first_triple, #ARGV, 3 do
  local member, value = ARGV[a], ARGV[a + 2]
  if value ~= '' then
    record = record + 1
    if gone[member] then
      dropped = dropped + 1
    else
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
  end
end
if ttl > 0 and (seq_ttl == -2 or (seq_ttl >= 0 and seq_ttl < ttl)) then
  redis.call('PEXPIRE', seq, ttl)
end
return {written, kept, dropped}
