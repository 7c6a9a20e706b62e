-- Register a live consumer for one lease, and drop registrations that ended.
--
-- KEYS[1]  sheppy:celery::consumers   zset   consumer name -> end of its registration
--                                             (epoch ms, this server's clock)
-- ARGV[1]  consumer name
-- ARGV[2]  lease in ms: the registration lasts this long unless renewed
--
-- Redis's own clock (TIME), so that workers' clocks need not agree with the one of the
-- tool reading the registry. The key expires with its last registration.
-- Returns the end of this registration (epoch ms).

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local ends = now + tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)
redis.call('ZADD', KEYS[1], ends, ARGV[1])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], last[2])
return ends
