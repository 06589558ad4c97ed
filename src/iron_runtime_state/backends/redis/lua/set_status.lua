-- set_status: change an agent's status, keeping the group's counts in step; a real change queues
-- its status_changed event in the group's outbox in the same step. Run once per op key.
-- KEYS: agent, stats, finished, the group's running, stopped and failed sets, outbox, op
-- ARGV: status, now, agent_id, op ttl (ms)
-- Returns {1, old status, status, budget_spent, pii_detections, budget_limit}, followed for a
-- real change by the queued event (see `queue_event`: its id, its fields, the entries waiting);
-- {-1} when the agent does not exist.
return once(KEYS[8], ARGV[4], function()
  local agent, stats = KEYS[1], KEYS[2]
  local status, now = ARGV[1], ARGV[2]
  local f = redis.call('HMGET', agent, 'status', 'budget_spent', 'pii_detections', 'budget_limit')
  if not f[1] then return {-1} end
  redis.call('HSET', agent, 'status', status, 'changed_at', now)
  index_finished(KEYS[3], ARGV[3], f[1], status, now)
  index_status(status_sets(4), ARGV[3], f[1], status)
  local reply = {1, f[1], status, f[2], f[3], f[4] or ''}
  if f[1] == status then return reply end
  redis.call('HINCRBY', stats, f[1], -1)
  redis.call('HINCRBY', stats, status, 1)
  reply[7], reply[8], reply[9] = queue_event(KEYS[7], {'kind', 'status', 'agent', ARGV[3],
    'at', now, 'from', f[1], 'to', status})
  return reply
end)
