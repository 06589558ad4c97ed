-- set_status: change an agent's status, keeping the group's counts in step.
-- KEYS: agent, stats, finished
-- ARGV: status, now, agent_id
-- Returns {1, old status, status, budget_spent, pii_detections, budget_limit}, or {-1} when the
-- agent does not exist.
local agent, stats = KEYS[1], KEYS[2]
local status, now = ARGV[1], ARGV[2]
local f = redis.call('HMGET', agent, 'status', 'budget_spent', 'pii_detections', 'budget_limit')
if not f[1] then return {-1} end
if f[1] ~= status then
  redis.call('HINCRBY', stats, f[1], -1)
  redis.call('HINCRBY', stats, status, 1)
end
redis.call('HSET', agent, 'status', status, 'changed_at', now)
index_finished(KEYS[3], ARGV[3], f[1], status, now)
return {1, f[1], status, f[2], f[3], f[4] or ''}
