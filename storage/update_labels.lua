-- Late labels joined to one user's stored records, atomically and idempotently.
-- KEYS[1..k]  the user's record keys (same hash tag, so the same shard)
-- ARGV[1]     the label window in ms: a label arriving later than that after its instance's
--             timestamp is refused
-- ARGV[2..]   per label, 4 values: key index (1..k), task index (0-based bit), label (0/1),
--             arrival time in ms since the epoch
-- Reply: per label, 2 values: status, the instance's timestamp in ms (0 when unknown). Status:
--   "stored"         known bit, label bit and arrival time (ms after the timestamp) set
--   "duplicate"      the task already has this label: nothing changes (the first arrival stays)
--   "conflict"       the task already has the other label: refused, the first one wins
--   "unknown"        no such record (never stored, or expired)
--   "window_closed"  arrived more than the window after the instance: refused
--   "early"          arrived before the instance's timestamp: refused
--   "incompatible"   the record has no such task, or a format this script does not know
-- A version 1 record (no arrival times: its labels came with the instance) is rewritten as
-- version 2 with arrival offsets 0 when a label is stored in it. A changed record is SET once
-- with KEEPTTL, after all of its labels are applied. Record layout: storage/records.py.
local window = tonumber(ARGV[1])
local values, changed, reply = {}, {}, {}

local function uint32(value, at) -- little-endian, 1-based offset
  local b1, b2, b3, b4 = string.byte(value, at, at + 3)
  return b1 + b2 * 256 + b3 * 65536 + b4 * 16777216
end
local function le32(n)
  return string.char(n % 256, math.floor(n / 256) % 256, math.floor(n / 65536) % 256, math.floor(n / 16777216) % 256)
end
local function bit_set(byte, weight)
  return math.floor(byte / weight) % 2 == 1
end

for a = 2, #ARGV, 4 do
  local k, task = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  local label, arrival = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  if values[k] == nil then
    values[k] = redis.call('GET', KEYS[k])
  end
  local v = values[k]
  local status, ts = 'unknown', 0
  if v then
    local version, n_tasks = string.byte(v, 1), string.byte(v, 4)
    ts = uint32(v, 17) + uint32(v, 21) * 4294967296 -- timestamps are < 2^53 (validated on write)
    if version == 1 then
      v = string.char(2) .. string.sub(v, 2, 48) .. string.rep('\0', 4 * n_tasks) .. string.sub(v, 49)
    end
    if (version ~= 1 and version ~= 2) or task >= n_tasks then
      status = 'incompatible'
    else
      local at, weight = 41 + math.floor(task / 8), 2 ^ (task % 8) -- known bits at 40..43, labels at 44..47
      local known_byte, label_byte = string.byte(v, at), string.byte(v, at + 4)
      if bit_set(known_byte, weight) then
        status = ((bit_set(label_byte, weight) and 1 or 0) == label) and 'duplicate' or 'conflict'
      elseif arrival < ts then
        status = 'early'
      elseif arrival - ts > window then
        status = 'window_closed'
      else
        if label == 1 then
          label_byte = label_byte + weight
        end
        local slot = 49 + 4 * task -- this task's arrival offset
        v = string.sub(v, 1, at - 1) .. string.char(known_byte + weight) .. string.sub(v, at + 1, at + 3)
            .. string.char(label_byte) .. string.sub(v, at + 5, slot - 1) .. le32(arrival - ts)
            .. string.sub(v, slot + 4)
        values[k], changed[k] = v, true
        status = 'stored'
      end
    end
  end
  reply[#reply + 1] = status
  reply[#reply + 1] = ts
end

for k in pairs(changed) do
  redis.call('SET', KEYS[k], values[k], 'KEEPTTL')
end
return reply
