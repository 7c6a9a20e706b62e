-- Put a delivered, unacknowledged broker message back at the end of its stream, atomically.
--
-- KEYS[1]  sheppy:pending:<q> (or sheppy:celery:<q>:priority:<n>)   stream
-- ARGV[1]  consumer group ("workers")
-- ARGV[2]  id of the delivered entry
-- ARGV[3]  the record to add in its place (JSON; its message says redelivered)
--
-- Returns the new entry's id, or false when the entry was no longer pending in the
-- group (already acked, or put back before): nothing is added then, so a message is
-- never duplicated by a double restore.

if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then
    return false
end
redis.call('XDEL', KEYS[1], ARGV[2])
return redis.call('XADD', KEYS[1], '*', 'data', ARGV[3])
