-- The history read, in ONE round trip (Redis 6.2: EVALSHA, no Functions): "the newest at most L
-- USABLE instances of a user strictly before time T, with their records".
-- Usable = the record is present and was written by an accepted source-model version. Members
-- that are not usable are skipped and the scan reaches further back, up to a bound, so a reader
-- gets L instances whenever L usable ones exist within the bound, not fewer.
-- KEYS[1]  the user's sequence (sorted set: score = timestamp ms, member = 20-digit InsID)
-- ARGV[1]  T in ms; exclusive bound "(T": an instance at exactly T is never returned
-- ARGV[2]  L, the most instances returned
-- ARGV[3]  record key prefix "<prefix>:ins:{<uid>}:" (same hash tag as KEYS[1], so the same shard)
-- ARGV[4]  scan bound: the most sequence members examined (>= L)
-- ARGV[5]  the accepted source versions (storage.instance_store.compatible_source_versions):
--          empty: every version;
--          "X" + version ids joined, 8 bytes each as stored at record offset 32: exactly those;
--          "L" + lineage id (4 bytes) + oldest ordinal (uint32 LE): records whose offset 32..35
--          equal the lineage id and whose ordinal (offset 36..39) is >= the oldest
-- ARGV[6]  "1": also return what was skipped and the usable members (the history endpoint)
-- Reply: {usable found, missing, version mismatches, the usable records joined[, detail]}
--   detail = {per usable member: member, score; then ""; then per skipped member: member, score,
--   reason, header}
--   reason "missing" (record gone: its member is removed from the sequence here, header "")
--   or "version" (header = the record's first 48 bytes).
-- Order: score descending; equal scores by member descending (Redis' ZREVRANGEBYSCORE order;
-- members are zero-padded so that this is InsID descending).
local key, prefix = KEYS[1], ARGV[3]
local limit = tonumber(ARGV[2])
local bound = math.max(tonumber(ARGV[4]), limit)
local explain = ARGV[6] == '1'
local accepted = nil -- the list of accepted ids; nil: any version
local lineage, oldest = nil, 0 -- a lineage policy instead of a list
local function uint32(value, at) -- little-endian, 1-based offset
  local b1, b2, b3, b4 = string.byte(value, at, at + 3)
  return b1 + b2 * 256 + b3 * 65536 + b4 * 16777216
end
if ARGV[5] ~= '' then
  local mode = string.sub(ARGV[5], 1, 1)
  if mode == 'L' then
    lineage, oldest = string.sub(ARGV[5], 2, 5), uint32(ARGV[5], 6)
  else
    accepted = {}
    for i = 2, #ARGV[5], 8 do
      accepted[#accepted + 1] = string.sub(ARGV[5], i, i + 7)
    end
  end
end
local filtered = accepted or lineage
local function usable_version(value)
  -- A plain find anchored at offset 32 (1-based 33) compares in place, without building a
  -- substring per record (measurably slower at L = 200).
  if lineage then
    return string.find(value, lineage, 33, true) == 33 and uint32(value, 37) >= oldest
  end
  for k = 1, #accepted do
    if string.find(value, accepted[k], 33, true) == 33 then
      return true
    end
  end
  return false
end
if limit == 0 then
  return {0, 0, 0, ''}
end

local chunk = 512 -- unpack() of very long argument lists overflows Lua's C stack
local found, dangling, usable_ids, skipped = {}, {}, {}, {}
local mismatch = 0
local offset = 0
while #found < limit and offset < bound do
  -- Pages of L: in the usual case (everything usable) one page is the whole read.
  local page = math.min(limit, bound - offset)
  local reply
  if explain then
    reply = redis.call('ZREVRANGEBYSCORE', key, '(' .. ARGV[1], '-inf', 'WITHSCORES', 'LIMIT', offset, page)
  else
    reply = redis.call('ZREVRANGEBYSCORE', key, '(' .. ARGV[1], '-inf', 'LIMIT', offset, page)
  end
  local step = explain and 2 or 1
  local n = #reply / step
  if n == 0 then
    break
  end
  for first = 1, n, chunk do
    local last = math.min(first + chunk - 1, n)
    local keys = {}
    for i = first, last do
      keys[#keys + 1] = prefix .. reply[(i - 1) * step + 1]
    end
    local values = redis.call('MGET', unpack(keys))
    if offset == 0 and n <= chunk and not explain then
      -- Fast path, the usual case: the first page is all present (concat rejects the false of a
      -- missing key) and of an accepted version, so it is the whole answer.
      local ok, joined = pcall(table.concat, values)
      if ok and filtered then
        for j = 1, n do
          if not usable_version(values[j]) then
            ok = false
            break
          end
        end
      end
      if ok then
        return {n, 0, 0, joined}
      end
    end
    for j = 1, #values do
      if #found >= limit then
        break -- the rest of this page is older than the L-th usable one: not examined
      end
      local i = first + j - 1
      local member = reply[(i - 1) * step + 1]
      local value = values[j]
      if not value then
        dangling[#dangling + 1] = member
        if explain then
          for _, x in ipairs({member, reply[i * 2], 'missing', ''}) do skipped[#skipped + 1] = x end
        end
      elseif filtered and not usable_version(value) then
        mismatch = mismatch + 1
        if explain then
          for _, x in ipairs({member, reply[i * 2], 'version', string.sub(value, 1, 48)}) do skipped[#skipped + 1] = x end
        end
      else
        found[#found + 1] = value
        if explain then
          usable_ids[#usable_ids + 1] = member
          usable_ids[#usable_ids + 1] = reply[i * 2]
        end
      end
    end
  end
  offset = offset + n
  if n < page then
    break -- no older members
  end
end

-- A member whose record is gone (TTL, or never written) can never become usable again: drop it,
-- so that the next read does not examine it.
for first = 1, #dangling, chunk do
  redis.call('ZREM', key, unpack(dangling, first, math.min(first + chunk - 1, #dangling)))
end

local reply = {#found, #dangling, mismatch, table.concat(found)}
if explain then
  usable_ids[#usable_ids + 1] = ''
  for _, x in ipairs(skipped) do usable_ids[#usable_ids + 1] = x end
  reply[5] = usable_ids
end
return reply
