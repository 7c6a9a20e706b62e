-- Take over the entries of a dead consumer whose lease expired, and remove the consumer
-- from the group once it holds nothing.
--
-- KEYS[1]  sheppy:pending:<q> (or sheppy:celery:<q>:priority:<n>)   stream
-- ARGV[1]  consumer group ("workers")
-- ARGV[2]  the dead consumer
-- ARGV[3]  lease in ms: only entries idle at least this long are taken
-- ARGV[4]  the taking consumer (the caller's channel), which puts them back at the end of
--          the stream (requeue.lua) for any worker with room to read
-- ARGV[5]  most entries to take (at most 1 000: Lua's unpack() stops near 8 000)
--
-- XCLAIM's min-idle-time takes only entries still idle: one renewed meanwhile (the dead
-- consumer's process lives on and runs it) stays where it is; one deleted from the
-- stream while pending leaves the PEL (XCLAIM does that). Returns {1 if the dead consumer
-- still holds entries in the stream, else 0 (it was removed from the group), id, data or
-- false, deliveries so far, id, ...}.

if redis.call('EXISTS', KEYS[1]) == 0 then
    return {0}
end
local rows = redis.pcall('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[3], '-', '+', ARGV[5],
                         ARGV[2])
if type(rows) ~= 'table' or rows.err then
    return {0}  -- no group (the stream was deleted and made again): nothing held here
end
local out = {0}
if #rows > 0 then
    local ids, deliveries = {}, {}
    for i, row in ipairs(rows) do
        ids[i] = row[1]
        deliveries[row[1]] = row[4]
    end
    local claimed = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[4], ARGV[3], unpack(ids))
    for _, entry in ipairs(claimed) do
        if type(entry) == 'table' then
            local data = false
            local fields = entry[2]
            if type(fields) == 'table' then
                for i = 1, #fields, 2 do
                    if fields[i] == 'data' then
                        data = fields[i + 1]
                    end
                end
            end
            table.insert(out, entry[1])
            table.insert(out, data)
            table.insert(out, deliveries[entry[1]])
        end
    end
end
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then
    out[1] = 1
else
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
end
return out
