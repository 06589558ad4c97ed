-- record_spend: add an amount to budget_spent unless spent + open holds + amount passes the limit.
-- KEYS: agent, stats, holds
-- ARGV: amount, now
-- Returns {1, status, budget_spent, pii_detections, budget_limit, reserved} when spent,
-- the same with 0 first when the limit refused it (nothing changed), {-1} when the agent does
-- not exist and {-2, status} when it is not running.
local agent = KEYS[1]
local f = redis.call('HMGET', agent, 'status', 'budget_spent', 'pii_detections', 'budget_limit')
if not f[1] then return {-1} end
if f[1] ~= 'running' then return {-2, f[1]} end
local amount = tonumber(ARGV[1])
local spent = tonumber(f[2])
local reserved = open_holds(KEYS[3])
if f[4] and exceeds(spent + reserved + amount, tonumber(f[4])) then
  return {0, f[1], f[2], f[3], f[4], num(reserved)}
end
local new = num(spent + amount)
redis.call('HSET', agent, 'budget_spent', new, 'changed_at', ARGV[2])
add_float(KEYS[2], 'budget_spent', amount)
return {1, f[1], new, f[3], f[4] or '', num(reserved)}
