-- Read up to ARGV[3] new broker messages of one queue, highest priority stream first.
--
-- KEYS[1..n]  the queue's streams in priority order (sheppy:pending:<q>,
--             sheppy:celery:<q>:priority:<n>...)                        streams
-- ARGV[1]     consumer group ("workers")
-- ARGV[2]     consumer name
-- ARGV[3]     most entries to read in all
--
-- Returns a flat list: stream key, entry id, data, stream key, entry id, data...
-- A stream without the group (never declared, or expired) is skipped.

local left = tonumber(ARGV[3])
local out = {}
for _, key in ipairs(KEYS) do
    if left <= 0 then
        break
    end
    local reply = redis.pcall('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', left,
                              'STREAMS', key, '>')
    if type(reply) == 'table' and reply[1] then
        for _, entry in ipairs(reply[1][2]) do
            local fields = entry[2]
            local data = false
            for i = 1, #fields, 2 do
                if fields[i] == 'data' then
                    data = fields[i + 1]
                end
            end
            table.insert(out, key)
            table.insert(out, entry[1])
            table.insert(out, data)
            left = left - 1
        end
    end
end
return out
