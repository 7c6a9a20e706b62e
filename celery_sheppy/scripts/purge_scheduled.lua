-- Delete scheduled (delayed) messages of one queue: the zset members given, their
-- payloads, and their sheppy records while those still say "scheduled".
--
-- KEYS[1]              sheppy:scheduled:<q>              zset    task id -> due time
-- KEYS[2k], KEYS[2k+1] sheppy:celery:<q>:delayed:<id>,   hash    the message (k = 1..n)
--                      sheppy:tasks:<q>:<id>             string  its sheppy record
-- ARGV[k]              the task id of pair k (the zset member)
--
-- A member promoted meanwhile (promote.lua removed it) is not counted and its record,
-- now "pending", stays. Returns the number of messages deleted.

local deleted = 0
for k = 1, #ARGV do
    if redis.call('ZREM', KEYS[1], ARGV[k]) == 1 then
        redis.call('DEL', KEYS[2 * k])
        local record = redis.call('GET', KEYS[2 * k + 1])
        if record and string.find(string.sub(record, 1, 200), '"status":%s*"scheduled"') then
            redis.call('DEL', KEYS[2 * k + 1])
        end
        deleted = deleted + 1
    end
end
return deleted
