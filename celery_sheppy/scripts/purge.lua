-- Delete up to ARGV[2] messages of a broker stream that no consumer has been given yet.
--
-- KEYS[1]  sheppy:pending:<q> (or sheppy:celery:<q>:priority:<n>)   stream
-- ARGV[1]  consumer group ("workers")
-- ARGV[2]  most entries to delete in this call
--
-- Entries after the group's last-delivered-id are waiting; the ones up to it are
-- delivered and pending (unacked), and stay. Without the group, every entry waits.
-- Returns the number of entries deleted (call again while it equals ARGV[2]).

-- Lua's unpack() fails past ~8 000 values ("too many results to unpack"): XDEL takes
-- the ids in slices of this many.
local XDEL_SLICE = 1000

if redis.call('EXISTS', KEYS[1]) == 0 then
    return 0
end
local start = '-'
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
for _, group in ipairs(groups) do
    local name, last
    for i = 1, #group, 2 do
        if group[i] == 'name' then
            name = group[i + 1]
        elseif group[i] == 'last-delivered-id' then
            last = group[i + 1]
        end
    end
    if name == ARGV[1] then
        start = '(' .. last
    end
end
local entries = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', tonumber(ARGV[2]))
local ids = {}
for i, entry in ipairs(entries) do
    ids[i] = entry[1]
end
local deleted = 0
for first = 1, #ids, XDEL_SLICE do
    deleted = deleted + redis.call('XDEL', KEYS[1], unpack(ids, first,
                                                           math.min(first + XDEL_SLICE - 1, #ids)))
end
return deleted
