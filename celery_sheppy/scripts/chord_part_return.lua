-- Count one finished chord header task, at most once however often it reports.
--
-- KEYS[1]  sheppy:workflows:<q>:<chord>:pending   set     header task ids not yet finished
-- KEYS[2]  sheppy:celery:<q>:chord:<chord>:done   zset    generator header: finished part ids
-- KEYS[3]  sheppy:celery:<q>:chord:<chord>:size   string  generator header: its size (-1: unknown yet)
-- KEYS[4]  sheppy:celery:<q>:group:<chord>:added  list    ids Task.add_to_chord added
-- KEYS[5]  sheppy:celery:<q>:chord:<chord>:body   string  "firing:<task id>" until the body is
--                                                          sent, then "sent" (the caller's SET)
-- ARGV[1]  the finished task's Celery id
-- ARGV[2]  its group_index (score in KEYS[2]; "+inf" when unknown)
-- ARGV[3]  time to live of KEYS[2] in seconds (0: none)
-- ARGV[4]  time to live of KEYS[5] in seconds
--
-- Returns 1 when this call completed the chord (the caller fires the chord body), or when
-- the part that completed it reports again while the body is still unsent: its worker
-- died between this script and the body's publish, and the part's message (acked only
-- after the body is sent) was redelivered. 0 when parts remain, -1 when the id was not
-- expected (a redelivered or unknown part).

local function completed()
    redis.call('SET', KEYS[5], 'firing:' .. ARGV[1], 'EX', ARGV[4])
    return 1
end

local function counted_before()
    if redis.call('GET', KEYS[5]) == 'firing:' .. ARGV[1] then
        return 1
    end
    return -1
end

local size = redis.call('GET', KEYS[3])
if size then
    -- A generator header's ids are not known in advance (Celery sends it one task at a
    -- time): count distinct finished ids up to the size Celery gives before the last send.
    redis.call('SREM', KEYS[1], ARGV[1])
    if redis.call('ZADD', KEYS[2], 'NX', ARGV[2], ARGV[1]) == 0 then
        return -1  -- the size is deleted when the chord completes: it has not
    end
    if tonumber(ARGV[3]) > 0 then
        redis.call('EXPIRE', KEYS[2], ARGV[3])
    end
    size = tonumber(size)
    if size >= 0 and redis.call('ZCARD', KEYS[2]) >= size + redis.call('LLEN', KEYS[4]) then
        redis.call('DEL', KEYS[3])  -- the body fires once
        return completed()
    end
    return 0
end

if redis.call('SREM', KEYS[1], ARGV[1]) == 0 then
    return counted_before()
end
if redis.call('SCARD', KEYS[1]) == 0 then
    return completed()
end
return 0
