-- budget_remove: remove a budget scope and its holds, queueing its budget_removed event in the
-- budgets outbox. Agents that list it are not changed. Run once per op key (see `once`).
-- KEYS: scope, its holds, the names of every scope, budgets outbox, op
-- ARGV: name, now, op ttl (ms)
-- Returns {0} when there was no such scope, else {1, the scope as it was (budget_row)} followed
-- by the events queued (see queue_events).
-- The last ARGV: the outbox's newest entry the client knows appended ('' for none), trimmed
-- first (see trim_landed).
trim_landed(KEYS[4])
return once(KEYS[5], ARGV[3], function()
  local key, name = KEYS[1], ARGV[1]
  local f = redis.call('HMGET', key, 'limit_micros', 'spent_micros', 'period', 'tz', 'period_start',
    'period_end', 'thresholds')
  if not f[2] then return {0} end
  local b = budget(key, name, f)
  b.held = held_at(KEYS[2], server_now())
  redis.call('DEL', key, KEYS[2])
  redis.call('ZREM', KEYS[3], name)
  local event = {'kind', 'removed', 'scope', name, 'spent', f[2], 'at', ARGV[2]}
  return queue_events(KEYS[4], {event}, {1, budget_row(b)})
end)
