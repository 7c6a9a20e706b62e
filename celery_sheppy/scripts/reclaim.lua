-- Take over entries whose lease expired (their consumer stopped renewing them).
--
-- KEYS     the streams of one queue: sheppy:pending:<q> and its priority streams
-- ARGV[1]  consumer group ("workers")
-- ARGV[2]  consumer name (the claiming channel)
-- ARGV[3]  lease in ms: entries idle at least this long are taken
-- ARGV[4]  most entries to take, from all the streams together
--
-- One call per queue, not per stream: an idle worker runs this every half lease.
-- XAUTOCLAIM counts a delivery for each entry it takes. Returns a flat list: index of
-- the stream in KEYS, entry id, data (false if the entry has no data field),
-- deliveries so far (the group's counter, this one included), index, entry id, ...

local out = {}
local budget = tonumber(ARGV[4])
for index, stream in ipairs(KEYS) do
    if budget <= 0 then
        break
    end
    -- pcall: a stream deleted meanwhile (no group) must not stop the others
    local reply = redis.pcall('XAUTOCLAIM', stream, ARGV[1], ARGV[2], ARGV[3], '0-0',
                              'COUNT', budget)
    local entries = type(reply) == 'table' and not reply.err and reply[2] or {}
    for _, entry in ipairs(entries) do
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
        local pending = redis.call('XPENDING', stream, ARGV[1], id, id, 1)[1]
        table.insert(out, index)
        table.insert(out, id)
        table.insert(out, data)
        table.insert(out, pending and pending[4] or 1)
        budget = budget - 1
    end
end
return out
