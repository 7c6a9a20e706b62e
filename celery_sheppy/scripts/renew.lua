-- Renew the lease of entries a consumer still holds: reset their idle time to 0.
--
-- KEYS[1]    sheppy:pending:<q> (or sheppy:celery:<q>:priority:<n>)   stream
-- ARGV[1]    consumer group ("workers")
-- ARGV[2]    consumer name (the renewing channel)
-- ARGV[3..]  ids of the entries the consumer holds
--
-- Only entries still pending for this consumer are renewed (XCLAIM ... JUSTID, which
-- leaves the delivery counter alone): an entry another consumer reclaimed after this
-- one stopped renewing is not taken back. Returns the ids that were not renewed
-- (acked meanwhile, or reclaimed by another consumer).

-- Lua's unpack() fails past ~8 000 values: XCLAIM takes the ids in slices of this many.
local XCLAIM_SLICE = 1000

local mine = {}
local lost = {}
for i = 3, #ARGV do
    local id = ARGV[i]
    local entry = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)[1]
    if entry and entry[2] == ARGV[2] then
        table.insert(mine, id)
    else
        table.insert(lost, id)
    end
end
for first = 1, #mine, XCLAIM_SLICE do
    local slice = {unpack(mine, first, math.min(first + XCLAIM_SLICE - 1, #mine))}
    table.insert(slice, 'JUSTID')
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, unpack(slice))
end
return lost
