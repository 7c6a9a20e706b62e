-- Admit one delivered message under its task's global rate limit, or move it to
-- sheppy's scheduled set, due at the next free slot, atomically.
--
-- KEYS[1]  sheppy:celery:<q>:ratelimit:<task>   string  next free slot (epoch ms, float)
-- KEYS[2]  the stream the entry was read from    stream  (pending or priority)
-- KEYS[3]  sheppy:scheduled:<q>                  zset    task id -> due time (epoch seconds)
-- KEYS[4]  sheppy:celery:<q>:delayed:<id>        hash    stream, data: what promote.lua adds
-- ARGV[1]  consumer group ("workers")
-- ARGV[2]  the entry's id
-- ARGV[3]  sheppy task id (the zset member)
-- ARGV[4]  slot length, ms (period / allowed count)
-- ARGV[5]  the entry's data with a placeholder where the booked slot goes
-- ARGV[6]  the placeholder (a quoted string literal in ARGV[5])
-- ARGV[7]  the slot this message was booked for by an earlier call (epoch ms), or ''
-- ARGV[8]  ms a booked message may come late and still use its slot
-- ARGV[9]  time to live of the hash, seconds
--
-- Slots are `slot length` apart: a message is admitted when the next free slot has
-- come (and takes it), or when it comes back for the slot it booked. Otherwise it
-- books the next free slot and leaves the stream (XACK + XDEL: no delivery is
-- counted); promote.lua adds it back when the slot is due. Server time only, so
-- workers' clocks do not matter. Returns {1, 0} (admitted) or {0, ms to its slot}.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval = tonumber(ARGV[4])
local booked = tonumber(ARGV[7])
if booked and booked <= now + 50 and now - booked <= tonumber(ARGV[8]) then
    return {1, 0}
end
local free = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if free <= now then
    redis.call('SET', KEYS[1], string.format('%.3f', now + interval),
               'PX', math.ceil(interval) + 1000)
    return {1, 0}
end
local slot = free
redis.call('SET', KEYS[1], string.format('%.3f', slot + interval),
           'PX', math.ceil(slot + interval - now) + 1000)
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
local data = ARGV[5]
local at = string.find(data, ARGV[6], 1, true)
if at then
    data = string.sub(data, 1, at - 1) .. string.format('%.3f', slot) ..
           string.sub(data, at + string.len(ARGV[6]))
end
redis.call('HSET', KEYS[4], 'stream', KEYS[2], 'data', data)
redis.call('EXPIRE', KEYS[4], ARGV[9])
redis.call('ZADD', KEYS[3], string.format('%.6f', slot / 1000), ARGV[3])
return {0, slot - now}
