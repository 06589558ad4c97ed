-- reserve: hold part of an agent's budget if spent + open holds + amount stays within the limit.
-- Expired holds are dropped first. The holds key expires (by the server's clock) a second after
-- its last hold, so the holds of a process that died are released and nothing leaks.
-- KEYS: agent, holds
-- ARGV: amount, ttl in seconds, reservation_id
-- Returns {1, expires_at} when held, {0, status, budget_spent, pii_detections, budget_limit,
-- reserved} when the limit refused it, {-1} when the agent does not exist and {-2, status} when
-- it is not running.
local agent, holds = KEYS[1], KEYS[2]
local f = redis.call('HMGET', agent, 'status', 'budget_spent', 'pii_detections', 'budget_limit')
if not f[1] then return {-1} end
if f[1] ~= 'running' then return {-2, f[1]} end
local amount = tonumber(ARGV[1])
local now = server_now()
local reserved, others = open_holds(holds, now)
if f[4] and exceeds(tonumber(f[2]) + reserved + amount, tonumber(f[4])) then
  return {0, f[1], f[2], f[3], f[4], num(reserved)}
end
local expires_at = now + tonumber(ARGV[2])
local text = num(expires_at)
redis.call('ZADD', holds, text, ARGV[3] .. ':' .. ARGV[1])
local latest = expires_at
if others > 0 then latest = tonumber(redis.call('ZRANGE', holds, -1, -1, 'WITHSCORES')[2]) end
redis.call('PEXPIREAT', holds, math.ceil(latest * 1000) + 1000)
return {1, text}
