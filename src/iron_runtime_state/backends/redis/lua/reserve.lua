-- reserve: hold part of an agent's budget if spent + open holds + amount stays within the limit.
-- Expired holds are dropped first. The holds key expires (by the server's clock) a second after
-- its last hold, so the holds of a process that died are released and nothing leaks. A refusal
-- queues its budget_exceeded event in the group's outbox. Run once per op key (see `once`).
-- KEYS: agent, holds, outbox, op
-- ARGV: amount, ttl in seconds, reservation_id, now (the caller's, for the event), agent_id,
--       op ttl (ms)
-- Returns {1, expires_at} when held, {0, status, budget_spent, pii_detections, budget_limit,
-- reserved, then the queued event (see `queue_event`: its id, its fields, the entries waiting)}
-- when the limit refused it, {-1} when the agent does not exist and {-2, status} when it is not
-- running.
return once(KEYS[4], ARGV[6], function()
  local agent, holds = KEYS[1], KEYS[2]
  local f = redis.call('HMGET', agent, 'status', 'budget_spent', 'pii_detections', 'budget_limit')
  if not f[1] then return {-1} end
  if f[1] ~= 'running' then return {-2, f[1]} end
  local amount = tonumber(ARGV[1])
  local now = server_now()
  local total, others = open_holds(holds, now)
  local reserved = num(total)
  if f[4] and exceeds(tonumber(f[2]) + tonumber(reserved) + amount, tonumber(f[4])) then
    local id, fields, waiting = queue_event(KEYS[3], {'kind', 'reserve', 'agent', ARGV[5],
      'at', ARGV[4], 'spent', f[2], 'limit', f[4], 'reserved', reserved, 'amount', ARGV[1]})
    return {0, f[1], f[2], f[3], f[4], reserved, id, fields, waiting}
  end
  local expires_at = now + tonumber(ARGV[2])
  local text = num(expires_at)
  redis.call('ZADD', holds, text, ARGV[3] .. ':' .. ARGV[1])
  local latest = expires_at
  if others > 0 then latest = tonumber(redis.call('ZRANGE', holds, -1, -1, 'WITHSCORES')[2]) end
  redis.call('PEXPIREAT', holds, math.ceil(latest * 1000) + 1000)
  return {1, text}
end)
