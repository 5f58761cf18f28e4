-- The fused history read, in ONE round trip (Redis 6.2: EVALSHA, no Functions).
-- "newest at most L instances of a user strictly before time T, with their records".
-- KEYS[1]  the user's sequence (sorted set: score = timestamp ms, member = 20-digit InsID)
-- ARGV[1]  T in ms; exclusive bound "(T": an instance at exactly T is never returned
-- ARGV[2]  L, the most instances returned
-- ARGV[3]  record key prefix "<prefix>:ins:{<uid>}:" (same hash tag as KEYS[1], so the same shard)
-- Reply: {records found, members whose record is gone (TTL), the found records joined}.
-- Order: score descending; equal scores by member descending (Redis' ZREVRANGEBYSCORE order;
-- members are zero-padded so that this is InsID descending).
local ids = redis.call('ZREVRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '-inf', 'LIMIT', 0, tonumber(ARGV[2]))
local n = #ids
if n == 0 then
  return {0, 0, ''}
end
local prefix = ARGV[3]
local chunk = 512 -- unpack() of very long argument lists overflows Lua's C stack
if n <= chunk then
  local keys = {}
  for i = 1, n do
    keys[i] = prefix .. ids[i]
  end
  local values = redis.call('MGET', unpack(keys))
  -- Fast path: no record is missing, so concat succeeds (it rejects the false of a missing key).
  local ok, joined = pcall(table.concat, values)
  if ok then
    return {n, 0, joined}
  end
end
local found = {}
for first = 1, n, chunk do
  local last = math.min(first + chunk - 1, n)
  local keys = {}
  for i = first, last do
    keys[#keys + 1] = prefix .. ids[i]
  end
  local values = redis.call('MGET', unpack(keys))
  for i = 1, #values do
    if values[i] then
      found[#found + 1] = values[i]
    end
  end
end
return {#found, n - #found, table.concat(found)}
