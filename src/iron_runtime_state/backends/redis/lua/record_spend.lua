-- record_spend: add an amount to budget_spent unless spent + open holds + amount passes the limit.
-- A refusal changes nothing but queues its budget_exceeded event in the group's outbox. Run once
-- per op key (see `once`), so a call resent after a lost reply is not applied twice.
-- KEYS: agent, stats, holds, outbox, op
-- ARGV: amount, now, agent_id, op ttl (ms)
-- Returns {1, status, budget_spent, pii_detections, budget_limit, reserved} when spent,
-- {0, the same fields, then the queued event (see `queue_event`: its id, its fields, the entries
-- waiting)} when the limit refused it, {-1} when the agent does not exist and {-2, status} when it
-- is not running.
return once(KEYS[5], ARGV[4], function()
  local agent = KEYS[1]
  local f = redis.call('HMGET', agent, 'status', 'budget_spent', 'pii_detections', 'budget_limit')
  if not f[1] then return {-1} end
  if f[1] ~= 'running' then return {-2, f[1]} end
  local amount = tonumber(ARGV[1])
  local spent = tonumber(f[2])
  local reserved = num(open_holds(KEYS[3]))
  if f[4] and exceeds(spent + tonumber(reserved) + amount, tonumber(f[4])) then
    local id, fields, waiting = queue_event(KEYS[4], {'kind', 'spend', 'agent', ARGV[3],
      'at', ARGV[2], 'spent', f[2], 'limit', f[4], 'reserved', reserved, 'amount', ARGV[1]})
    return {0, f[1], f[2], f[3], f[4], reserved, id, fields, waiting}
  end
  local new = num(spent + amount)
  redis.call('HSET', agent, 'budget_spent', new, 'changed_at', ARGV[2])
  add_float(KEYS[2], 'budget_spent', amount)
  return {1, f[1], new, f[3], f[4] or '', reserved}
end)
