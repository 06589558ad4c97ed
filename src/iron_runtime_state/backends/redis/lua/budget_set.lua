-- budget_set: create a budget scope, or change its limit, period, time zone and thresholds,
-- queueing its budget_set event in the budgets outbox. A new scope starts with nothing spent in
-- the period that contains now, and nothing alerted; a changed one keeps its spend, holds and
-- alerted level, and when its period or time zone changed its spend counts in the period that
-- contains now (start and end, from the client) and its alerted level starts again from 0.
-- Run once per op key (see `once`).
-- KEYS: scope, its holds, the names of every scope, budgets outbox, op
-- ARGV: name, limit ('' for none), period ('' for none), tz, the start and end of the period
--       that contains now ('' without a period), now, op ttl (ms), thresholds (as
--       thresholds.thresholds_text writes them: '' for none; ABSENT for the default)
-- Returns {1, the scope (budget_row)} followed by the events queued (see queue_events).
-- The last ARGV: the outbox's newest entry the client knows appended ('' for none), trimmed
-- first (see trim_landed).
trim_landed(KEYS[4])
return once(KEYS[5], ARGV[8], function()
  local key, name, limit, period, tz = KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4]
  local f = redis.call('HMGET', key, 'limit_micros', 'spent_micros', 'period', 'tz', 'period_start',
    'period_end')
  local new = not f[2]
  if new then
    redis.call('HSET', key, 'spent_micros', 0)
    f[2] = '0'
  end
  if new or (f[3] or '') ~= period or (f[4] or 'UTC') ~= tz or (period ~= '' and not f[5]) then
    if period == '' then
      redis.call('HDEL', key, 'period', 'period_start', 'period_end', 'alerted')
      f[3], f[5], f[6] = false, false, false
    else
      redis.call('HSET', key, 'period', period, 'period_start', ARGV[5], 'period_end', ARGV[6])
      redis.call('HDEL', key, 'alerted')
      f[3], f[5], f[6] = period, ARGV[5], ARGV[6]
    end
  end
  redis.call('HSET', key, 'tz', tz)
  f[4] = tz
  if limit == '' then
    redis.call('HDEL', key, 'limit_micros')
    f[1] = false
  else
    redis.call('HSET', key, 'limit_micros', limit)
    f[1] = limit
  end
  local event = {'kind', 'set', 'scope', name, 'limit', limit, 'period', period, 'tz', tz, 'at', ARGV[7]}
  if ARGV[9] == ABSENT then
    redis.call('HDEL', key, 'thresholds')
    f[7] = false
  else
    redis.call('HSET', key, 'thresholds', ARGV[9])
    f[7] = ARGV[9]
    event[#event + 1] = 'thresholds'
    event[#event + 1] = ARGV[9]
  end
  redis.call('ZADD', KEYS[3], 0, name)
  local b = budget(key, name, f)
  b.held = held_at(KEYS[2], server_now())
  return queue_events(KEYS[4], {event}, {1, budget_row(b)})
end)
