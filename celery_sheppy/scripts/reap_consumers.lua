-- Remove consumers of a broker stream's group that hold no messages and are gone.
--
-- KEYS[1]  sheppy:pending:<q> (or sheppy:celery:<q>:priority:<n>)   stream
-- ARGV[1]  consumer group ("workers")
-- ARGV[2]  idle time in ms after which a consumer with an empty pending list is gone
-- ARGV[3]  a consumer to remove now if its pending list is empty ("" for none)
-- ARGV[4..] registered consumers (sheppy:celery::consumer:<name> exists): alive, never
--           removed for being idle (on Redis 7.0 an idle consumer's reads do not reset
--           its idle time)
--
-- A consumer with pending entries is never removed: XGROUP DELCONSUMER would drop
-- them. A live consumer that is removed by mistake is recreated by its next read.
-- Returns the number of consumers removed.

if redis.call('EXISTS', KEYS[1]) == 0 then
    return 0
end
local consumers = redis.pcall('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if type(consumers) ~= 'table' or consumers.err then
    return 0
end
local idle_limit = tonumber(ARGV[2])
local registered = {}
for i = 4, #ARGV do
    registered[ARGV[i]] = true
end
local removed = 0
for _, consumer in ipairs(consumers) do
    local name, pending, idle
    for i = 1, #consumer, 2 do
        if consumer[i] == 'name' then
            name = consumer[i + 1]
        elseif consumer[i] == 'pending' then
            pending = consumer[i + 1]
        elseif consumer[i] == 'idle' then
            idle = consumer[i + 1]
        end
    end
    if pending == 0 and (name == ARGV[3] or (idle > idle_limit and not registered[name])) then
        redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], name)
        removed = removed + 1
    end
end
return removed
