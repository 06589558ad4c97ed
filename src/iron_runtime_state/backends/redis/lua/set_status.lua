-- set_status: change an agent's status, keeping the group's counts in step; a real change queues
-- its status_changed event in the group's outbox in the same step. Run once per op key.
-- KEYS: agent, stats, finished, the group's running, stopped and failed sets, outbox, op
-- ARGV: status, now, agent_id, op ttl (ms)
-- Returns {1, old status, state (see state_reply, without its code)}, followed for a real change
-- by the event queued (see queue_events); {-1} when the agent does not exist, {LEGACY} when it is
-- stored as 0.4/0.5 wrote it.
-- The last ARGV: the outbox's newest entry the client knows appended ('' for none), trimmed
-- first (see trim_landed).
trim_landed(KEYS[7])
return once(KEYS[8], ARGV[4], function()
  local agent, stats = KEYS[1], KEYS[2]
  local status, now = ARGV[1], ARGV[2]
  local f = redis.call('HMGET', agent, unpack(AGENT_FIELDS))
  if not f[1] then return {-1} end
  if not f[2] then return {LEGACY} end
  local old = f[1]
  redis.call('HSET', agent, 'status', status, 'changed_at', now)
  index_finished(KEYS[3], ARGV[3], old, status, now)
  index_status(status_sets(4), ARGV[3], old, status)
  f[1] = status
  local reply = state_reply(1, f)
  table.insert(reply, 2, old)
  if old == status then return reply end
  redis.call('HINCRBY', stats, old, -1)
  redis.call('HINCRBY', stats, status, 1)
  return queue_events(KEYS[7], {{'kind', 'status', 'agent', ARGV[3], 'at', now, 'from', old,
    'to', status}}, reply)
end)
