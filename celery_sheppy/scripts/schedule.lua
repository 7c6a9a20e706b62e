-- Keep a message for later delivery in sheppy's scheduled set, atomically.
--
-- KEYS[1]  sheppy:scheduled:<q>               zset    task id -> due time (epoch seconds)
-- KEYS[2]  sheppy:tasks:<q>:<id>              string  sheppy record, status "scheduled"
-- KEYS[3]  sheppy:celery:<q>:delayed:<id>     hash    stream, data: what promote.lua adds
-- ARGV[1]  sheppy task id (the zset member)
-- ARGV[2]  due time, epoch seconds
-- ARGV[3]  sheppy record JSON
-- ARGV[4]  the entry's data (pending record JSON)
-- ARGV[5]  the stream the entry goes to when due
-- ARGV[6]  time to live of the record and the hash, in seconds
--
-- The record is written for sheppy's tools only, and never over a stored result of
-- a finished task (a task re-published under its old id); the hash is what is
-- delivered, so a result written over the record loses nothing. Returns 1.

local current = redis.call('GET', KEYS[2])
local head = current and string.sub(current, 1, 200) or ''
local finished = string.find(head, '"status":%s*"completed"') or
                 string.find(head, '"status":%s*"failed"') or
                 string.find(head, '"status":%s*"cancelled"')
if not finished then
    redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[6])
end
redis.call('HSET', KEYS[3], 'stream', ARGV[5], 'data', ARGV[4])
redis.call('EXPIRE', KEYS[3], ARGV[6])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
return 1
