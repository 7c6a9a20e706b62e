-- Release or renew a claim (claim_publish.lua) only while the given task id holds it.
--
-- KEYS[1]  sheppy:celery:<q>:unique:<key> (or :beat:<id>)   string  holder's task id
-- ARGV[1]  the task id
-- ARGV[2]  "release" (DEL) or "renew" (PEXPIRE)
-- ARGV[3]  the new time to live, ms ("renew")
--
-- Returns 1 if the task id held the claim, else 0 (another task took it since).

if redis.call('GET', KEYS[1]) ~= ARGV[1] then
    return 0
end
if ARGV[2] == 'release' then
    redis.call('DEL', KEYS[1])
else
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return 1
