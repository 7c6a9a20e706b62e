-- Add, refresh or remove one binding of an exchange, and record that the table changed.
--
-- KEYS[1]  sheppy:celery::exchange:<x>   zset  member "routing_key SEP pattern SEP queue
--                                              SEP expires_ms", score = deadline in epoch
--                                              ms ('inf': permanent)
-- ARGV[1]  member prefix "routing_key SEP pattern SEP queue SEP" (identifies the binding)
-- ARGV[2]  expires_ms of the queue ("0": the queue does not expire)
-- ARGV[3]  binding lifetime in ms ("0": permanent)
-- ARGV[4]  "add" or "remove"
-- ARGV[5]  name of the version member
--
-- The version member's score is minus the server time in microseconds at the last
-- change: publishers compare it with the one they cached their table with. Expired
-- bindings are dropped; the key expires with its last binding, and goes when empty.

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], 0, now_ms)

-- a binding is one member whatever its expires_ms: drop the old one first
local prefix = ARGV[1]
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    if string.sub(member, 1, #prefix) == prefix then
        redis.call('ZREM', KEYS[1], member)
    end
end
if ARGV[4] == 'add' then
    local lifetime = tonumber(ARGV[3])
    local score = 'inf'
    if lifetime > 0 then
        score = now_ms + lifetime
    end
    redis.call('ZADD', KEYS[1], score, prefix .. ARGV[2])
end

redis.call('ZREM', KEYS[1], ARGV[5])
if redis.call('ZCARD', KEYS[1]) == 0 then
    redis.call('DEL', KEYS[1])
    return 0
end
redis.call('ZADD', KEYS[1], -(tonumber(t[1]) * 1000000 + tonumber(t[2])), ARGV[5])
local top = redis.call('ZREVRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if top[2] == 'inf' then
    redis.call('PERSIST', KEYS[1])
else
    redis.call('PEXPIREAT', KEYS[1], math.floor(tonumber(top[2])))
end
return 1
