-- Publish one message only if its claim is free, atomically: a unique task's key, or a
-- beat occurrence that several beat processes publish.
--
-- KEYS[1]  the claim: sheppy:celery:<q>:unique:<key>   string  holder's task id
--                  or sheppy:celery:<q>:beat:<id>
-- KEYS[2]  the stream the message goes to                stream  (pending or priority)
-- ARGV[1]  the claimant's task id
-- ARGV[2]  the claim's time to live, ms
-- ARGV[3]  the entry's data (pending record JSON); '' claims without publishing (the
--          caller schedules the message itself)
-- ARGV[4]  "1": a claim held by the same task id is taken again and the message sent
--          (a retry of the holder); "0": refused like any other
-- ARGV[5]  consumer group, created with the stream when the stream is new and ARGV[6]
-- ARGV[6]  "1": KEYS[2] is a priority stream (made with the group by its first message)
--
-- Returns {1, entry id or ''} when published (claimed), {0, holder's task id} when
-- the claim is held.

local holder = redis.call('GET', KEYS[1])
if holder and not (ARGV[4] == '1' and holder == ARGV[1]) then
    return {0, holder}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if ARGV[3] == '' then
    return {1, ''}
end
if ARGV[6] == '1' and redis.call('EXISTS', KEYS[2]) == 0 then
    redis.call('XGROUP', 'CREATE', KEYS[2], ARGV[5], '0', 'MKSTREAM')
end
return {1, redis.call('XADD', KEYS[2], '*', 'data', ARGV[3])}
