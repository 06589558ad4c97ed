-- remove: delete an agent with its open holds, keeping its group's statistics in step.
-- KEYS: agent, stats, ids, finished, holds, then the group's running, stopped and failed sets
-- ARGV: agent_id
-- Returns 1 when the agent existed, 0 otherwise.
local k = {agent = KEYS[1], stats = KEYS[2], ids = KEYS[3], finished = KEYS[4], holds = KEYS[5],
  status = status_sets(6)}
local f = redis.call('HMGET', k.agent, 'status', 'budget_spent', 'pii_detections')
if not f[1] then return 0 end
drop_agent(k, ARGV[1], f)
return 1
