-- Store a Celery result as a sheppy task record and announce it, atomically.
--
-- KEYS[1]  sheppy:tasks:<q>:<id>       string  the task record (JSON)
-- KEYS[2]  sheppy:finished:<q>         stream  gets {task_id} when the record is terminal
-- KEYS[3]  sheppy:celery:<q>:states    stream  gets {task_id} for any other state
-- KEYS[4]  sheppy:completed:<q>        string  counter of terminal records
-- KEYS[5]  sheppy:celery:<q>:failed    string  counter of FAILURE records (a part of KEYS[4])
-- ARGV[1]  record JSON
-- ARGV[2]  time to live in seconds (0: no expiry)
-- ARGV[3]  "1" if the record is terminal (has finished_at), "2" if it is terminal and a
--          FAILURE, else "0"
-- ARGV[4]  sheppy task id (the stream entries' task_id)
-- ARGV[5]  MINID for trimming both streams (entries older than ~60 s go)
-- ARGV[6]  time to live of the states stream in seconds (it is ours, not sheppy's)
-- ARGV[7]  time to live given to the finished stream with this entry, seconds; 0: leave
--          it (the caller gives one now and then: MINID trims only while results come,
--          so an idle stream goes as a whole)
-- KEYS[6]  (optional) sheppy:pending:<q> or sheppy:celery:<q>:priority:<n>: the
--          task's broker stream, when the result acks its message (acks_late)
-- ARGV[8]  (with KEYS[6]) consumer group ("workers")
-- ARGV[9]  (with KEYS[6]) id of the task's entry: XACK + XDEL'ed with a terminal result
--
-- Returns 1, or 0 when the stored record is already "completed" (a SUCCESS is
-- never overwritten: a redelivered task must not replace its first result).
-- A stored record's created_at replaces the new record's: it dates the first report.
-- The record is written before the entry, so a waiter that sees the entry finds it.

local terminal = ARGV[3] ~= '0'
if KEYS[6] and terminal then
    redis.pcall('XACK', KEYS[6], ARGV[8], ARGV[9])  -- a missing group must not stop the store
    redis.pcall('XDEL', KEYS[6], ARGV[9])
end

-- SET ... GET writes and reads back the previous record in one command; the rare
-- previous record that must win (or lend its created_at) is then written again.
local ttl = tonumber(ARGV[2])
local function write(value)
    if ttl > 0 then
        return redis.call('SET', KEYS[1], value, 'EX', ttl, 'GET')
    end
    return redis.call('SET', KEYS[1], value, 'GET')
end

local record = ARGV[1]
local current = write(record)
-- id, status and created_at are the first keys of every record we write (records.HEAD_FIELDS)
local head = current and string.sub(current, 1, 200)
if head and string.find(head, '"status":%s*"completed"') then
    write(current)  -- its expiry restarts: the price of one command less per result
    return 0
end
local created = head and string.match(head, '"created_at":%s*"([^"%%]+)"')
if created and not string.find(record, '"created_at":"' .. created .. '"', 1, true) then
    record = string.gsub(record, '"created_at":"[^"]*"', '"created_at":"' .. created .. '"', 1)
    write(record)
end

if terminal then
    redis.call('XADD', KEYS[2], 'MINID', '~', ARGV[5], '*', 'task_id', ARGV[4])
    if ARGV[7] ~= '0' then
        redis.call('EXPIRE', KEYS[2], ARGV[7])
    end
    redis.call('INCRBY', KEYS[4], 1)
    if ARGV[3] == '2' then
        redis.call('INCRBY', KEYS[5], 1)
    end
else
    redis.call('XADD', KEYS[3], 'MINID', '~', ARGV[5], '*', 'task_id', ARGV[4])
    redis.call('EXPIRE', KEYS[3], ARGV[6])
end
return 1
