-- Take over entries whose lease expired (their consumer stopped renewing them).
--
-- KEYS[1]  sheppy:pending:<q> (or sheppy:celery:<q>:priority:<n>)   stream
-- ARGV[1]  consumer group ("workers")
-- ARGV[2]  consumer name (the claiming channel)
-- ARGV[3]  lease in ms: entries idle at least this long are taken
-- ARGV[4]  most entries to take
--
-- XAUTOCLAIM counts a delivery for each entry it takes. Returns a flat list:
-- entry id, data (false if the entry has no data field), deliveries so far (the
-- group's counter, this one included), entry id, data, deliveries...

local reply = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], '0-0',
                         'COUNT', ARGV[4])
local out = {}
for _, entry in ipairs(reply[2]) do
    local id = entry[1]
    local fields = entry[2]
    local data = false
    if type(fields) == 'table' then
        for i = 1, #fields, 2 do
            if fields[i] == 'data' then
                data = fields[i + 1]
            end
        end
    end
    local pending = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)[1]
    table.insert(out, id)
    table.insert(out, data)
    table.insert(out, pending and pending[4] or 1)
end
return out
