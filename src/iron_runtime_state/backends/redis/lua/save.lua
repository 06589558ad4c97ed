-- save: insert or replace one agent's state, keeping its group's statistics in step.
-- update_agent_state also sends the values it read: then the state is stored only if the agent
-- still holds them (compare-and-set), and otherwise the client reads again and retries.
-- KEYS: agent, stats, ids, finished, then the group's running, stopped and failed sets
-- ARGV: agent_id, status, budget_spent, pii_detections, budget_limit ('' for none), now,
--       then for a compare-and-set the status, budget_spent, pii_detections, budget_limit read
-- Returns 1 when stored; for a compare-and-set, 0 when the agent changed meanwhile and -1 when
-- it no longer exists.
local agent, stats = KEYS[1], KEYS[2]
local id, status, spent, pii, limit, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local old = redis.call('HMGET', agent, 'status', 'budget_spent', 'pii_detections', 'budget_limit')
if #ARGV > 6 then
  if not old[1] then return -1 end
  if old[1] ~= ARGV[7] or old[2] ~= ARGV[8] or old[3] ~= ARGV[9] or (old[4] or '') ~= ARGV[10] then
    return 0
  end
end
-- The pii total first: it is the one step that can fail (64-bit overflow), and then nothing
-- has been written yet.
if old[3] ~= pii then
  if pii ~= '0' then redis.call('HINCRBY', stats, 'pii_detections', pii) end
  if old[3] and old[3] ~= '0' then redis.call('HINCRBY', stats, 'pii_detections', '-' .. old[3]) end
end
if limit == '' then
  redis.call('HSET', agent, 'status', status, 'budget_spent', spent, 'pii_detections', pii,
    'changed_at', now)
  if old[4] then redis.call('HDEL', agent, 'budget_limit') end
else
  redis.call('HSET', agent, 'status', status, 'budget_spent', spent, 'pii_detections', pii,
    'budget_limit', limit, 'changed_at', now)
end
if old[1] then
  if old[1] ~= status then
    redis.call('HINCRBY', stats, old[1], -1)
    redis.call('HINCRBY', stats, status, 1)
  end
  if old[2] ~= spent then add_float(stats, 'budget_spent', tonumber(spent) - tonumber(old[2])) end
else
  redis.call('ZADD', KEYS[3], 0, id)
  redis.call('HINCRBY', stats, status, 1)
  if tonumber(spent) ~= 0 then add_float(stats, 'budget_spent', tonumber(spent)) end
end
index_finished(KEYS[4], id, old[1], status, now)
index_status(status_sets(5), id, old[1], status)
return 1
