-- Move one due message from sheppy's scheduled set to its stream, exactly once.
--
-- KEYS[1]     sheppy:scheduled:<q>             zset    task id -> due time (epoch seconds)
-- KEYS[2]     sheppy:celery:<q>:delayed:<id>   hash    stream, data
-- KEYS[3]     sheppy:tasks:<q>:<id>            string  sheppy record ("scheduled" -> "pending")
-- KEYS[4..n]  the queue's streams (sheppy:pending:<q>, sheppy:celery:<q>:priority:<n>...)
-- ARGV[1]     sheppy task id (the zset member)
-- ARGV[2]     consumer group ("workers"): created with the stream if the stream is new
--
-- Due means a score at or before the server's time. The member is removed and the
-- entry added in one step, so of several workers trying only one adds it. Returns the
-- new entry's id, or false (not due, already moved, or nothing to deliver).

local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if not score or tonumber(score) > now then
    return false
end
redis.call('ZREM', KEYS[1], ARGV[1])
local item = redis.call('HMGET', KEYS[2], 'stream', 'data')
redis.call('DEL', KEYS[2])
if not item[2] then
    return false
end
local stream = KEYS[4]
for i = 4, #KEYS do
    if KEYS[i] == item[1] then
        stream = KEYS[i]
    end
end
local record = redis.call('GET', KEYS[3])
if record and string.find(string.sub(record, 1, 200), '"status":%s*"scheduled"') then
    record = string.gsub(record, '"status":%s*"scheduled"', '"status":"pending"', 1)
    redis.call('SET', KEYS[3], record, 'KEEPTTL')
end
if redis.call('EXISTS', stream) == 0 then
    -- a priority stream is made by its first message, always with the group
    redis.call('XGROUP', 'CREATE', stream, ARGV[2], '0', 'MKSTREAM')
end
return redis.call('XADD', stream, '*', 'data', item[2])
