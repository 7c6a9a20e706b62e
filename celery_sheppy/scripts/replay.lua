-- Put one dead letter back in a broker stream, at most once.
--
-- KEYS[1]  sheppy:dead:<q>                                           stream
-- KEYS[2]  sheppy:pending:<q> (or sheppy:celery:<q>:priority:<n>)   stream
-- ARGV[1]  id of the dead letter
-- ARGV[2]  the data to add (the original, its delivery count cleared)
-- ARGV[3]  consumer group ("workers"): created with the stream if the stream is gone
--
-- Returns the new entry's id, or false when the dead letter was gone already.

if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then
    return false
end
if redis.call('EXISTS', KEYS[2]) == 0 then
    redis.call('XGROUP', 'CREATE', KEYS[2], ARGV[3], '0', 'MKSTREAM')
end
return redis.call('XADD', KEYS[2], '*', 'data', ARGV[2])
