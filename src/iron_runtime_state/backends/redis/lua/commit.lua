-- commit: settle a hold by recording what was really spent, even past the limit; a spend that
-- takes the agent past its limit queues its budget_exceeded event in the group's outbox. Run
-- once per op key (see `once`), so a call resent after a lost reply is not applied twice.
-- KEYS: agent, stats, holds, finished, outbox, op
-- ARGV: hold ("<reservation id>:<amount>"), actual, now, agent_id, reservation id, amount held,
--       op ttl (ms)
-- Returns {exceeded (1 or 0), status, budget_spent, pii_detections, budget_limit}, followed when
-- exceeded by the queued event (see `queue_event`: its id, its fields, the entries waiting); {-3}
-- when the hold is not open (settled, expired or never made) and {-1} when the agent does not
-- exist.
return once(KEYS[6], ARGV[7], function()
  local agent = KEYS[1]
  if not take_hold(KEYS[3], ARGV[1]) then return {-3} end
  local f = redis.call('HMGET', agent, 'status', 'budget_spent', 'pii_detections', 'budget_limit')
  if not f[1] then return {-1} end
  local actual = tonumber(ARGV[2])
  local spent = tonumber(f[2]) + actual
  local new = num(spent)
  redis.call('HSET', agent, 'budget_spent', new, 'changed_at', ARGV[3])
  add_float(KEYS[2], 'budget_spent', actual)
  index_finished(KEYS[4], ARGV[4], f[1], f[1], ARGV[3])
  if not (f[4] and exceeds(spent, tonumber(f[4]))) then return {0, f[1], new, f[3], f[4] or ''} end
  local id, fields, waiting = queue_event(KEYS[5], {'kind', 'commit', 'agent', ARGV[4],
    'at', ARGV[3], 'spent', new, 'limit', f[4], 'actual', ARGV[2], 'held', ARGV[6],
    'reservation', ARGV[5]})
  return {1, f[1], new, f[3], f[4], id, fields, waiting}
end)
