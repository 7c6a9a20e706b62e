-- Count one finished chord header task, at most once however often it reports.
--
-- KEYS[1]  sheppy:workflows:<q>:<chord>:pending   set   header task ids not yet finished
-- ARGV[1]  the finished task's Celery id
--
-- Returns 1 when this call removed the last id (the caller fires the chord body),
-- 0 when ids remain, -1 when the id was not in the set (a redelivered or unknown part).

if redis.call('SREM', KEYS[1], ARGV[1]) == 0 then
    return -1
end
if redis.call('SCARD', KEYS[1]) == 0 then
    return 1
end
return 0
