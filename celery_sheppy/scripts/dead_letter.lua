-- Move a delivered broker entry to its queue's dead-letter stream, atomically.
--
-- KEYS[1]  sheppy:pending:<q> (or sheppy:celery:<q>:priority:<n>)   stream
-- KEYS[2]  sheppy:dead:<q>                                           stream
-- ARGV[1]  consumer group ("workers")
-- ARGV[2]  id of the entry
-- ARGV[3]  reason (text)
-- ARGV[4]  deliveries so far
-- ARGV[5]  the entry's original data ("" if it had none)
-- ARGV[6]  approximate most entries kept in the dead-letter stream
--
-- Returns the dead letter's id, or false when the entry was no longer pending in
-- the group (acked meanwhile, e.g. with its result): nothing is added then.

if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then
    return false
end
redis.call('XDEL', KEYS[1], ARGV[2])
return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*',
                  'reason', ARGV[3], 'deliveries', ARGV[4], 'stream', KEYS[1],
                  'entry', ARGV[2], 'data', ARGV[5])
