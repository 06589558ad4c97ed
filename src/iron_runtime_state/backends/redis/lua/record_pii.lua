-- record_pii: add to an agent's pii_detections (exact 64-bit integers, as HINCRBY counts) and
-- queue its pii_detected event in the group's outbox, in one step. A count that would pass
-- 2^63 - 1 (the agent's or the fleet's) changes nothing. Run once per op key (see `once`).
-- KEYS: agent, stats, finished, outbox, op
-- ARGV: count, now, agent_id, event_type, timestamp, details, op ttl (ms)
-- Returns {1, state (see state_reply)} followed by the event queued (see queue_events), {-1} when
-- the agent does not exist, {LEGACY} when it is stored as 0.4/0.5 wrote it, {-4, the agent's
-- count} when its count would overflow and {-5, the group's count} when the group's total would.
-- The last ARGV: the outbox's newest entry the client knows appended ('' for none), trimmed
-- first (see trim_landed).
trim_landed(KEYS[4])
return once(KEYS[5], ARGV[7], function()
  local agent, stats = KEYS[1], KEYS[2]
  local found = redis.call('HMGET', agent, 'status', 'spent_micros')
  local status = found[1]
  if not status then return {-1} end
  if not found[2] then return {LEGACY} end
  if type(redis.pcall('HINCRBY', agent, 'pii_detections', ARGV[1])) == 'table' then
    return {-4, redis.call('HGET', agent, 'pii_detections')}
  end
  if type(redis.pcall('HINCRBY', stats, 'pii_detections', ARGV[1])) == 'table' then
    redis.call('HINCRBY', agent, 'pii_detections', '-' .. ARGV[1])
    return {-5, redis.call('HGET', stats, 'pii_detections')}
  end
  redis.call('HSET', agent, 'changed_at', ARGV[2])
  index_finished(KEYS[3], ARGV[3], status, status, ARGV[2])
  local reply = state_reply(1, redis.call('HMGET', agent, unpack(AGENT_FIELDS)))
  return queue_events(KEYS[4], {{'kind', 'event', 'agent', ARGV[3], 'type', ARGV[4],
    'timestamp', ARGV[5], 'details', ARGV[6]}}, reply)
end)
