-- remove: delete an agent with its open and pending holds (its holds on scopes too, see
-- drop_scope_holds), keeping its group's statistics, status sets and label sets in step.
-- KEYS: agent, stats, ids, finished, holds, pending, then the group's running, stopped and failed
--       sets
-- ARGV: agent_id, the group's label prefix, the budgets prefix ('' on a cluster)
-- Returns {1, scope hold members the client drops (cluster)...} when the agent existed, else {0}.
local k = {agent = KEYS[1], stats = KEYS[2], ids = KEYS[3], finished = KEYS[4], holds = KEYS[5],
  pending = KEYS[6], status = status_sets(7), labels = ARGV[2], prefix = ARGV[3], dropped = {1}}
local f = redis.call('HMGET', k.agent, 'status', 'spent_micros', 'pii_detections', 'labels')
if not f[1] then return {0} end
drop_agent(k, ARGV[1], f)
return k.dropped
