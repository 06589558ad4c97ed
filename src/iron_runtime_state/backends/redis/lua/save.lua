-- save: insert or replace one agent's state, keeping its group's statistics, status sets and
-- label sets in step. Money is whole micro-units; a field whose value is the default (no limit,
-- no labels, no scopes, no period, 'UTC', the default thresholds) is absent. The highest
-- threshold alerted in the agent's period (`alerted`) is kept, but for a period the client rolled.
-- update_agent_state also sends the values it read: then the state is stored only if the agent
-- still holds them (compare-and-set), and otherwise the client reads again and retries; when the
-- agent's period ended, the budget_reset event of the closed period comes too, and is queued in
-- the group's outbox with the change.
-- KEYS: agent, stats, ids, finished, the group's running, stopped and failed sets, outbox
-- ARGV: agent_id, status, spent, pii_detections, limit, now, labels (JSON), scopes
--       (comma-separated), period, tz, period_start, period_end, the group's label prefix
--       ('' stands for none in each), thresholds (thresholds_text: '' for none, ABSENT for the
--       default), '1' when the client rolled the agent's period (nothing alerted in the new one)
--       or ''; then for a compare-and-set the first ten AGENT_FIELDS as read (ABSENT for none)
--       and the fields of the event to queue (none: no event)
-- Returns 1 when stored; for a compare-and-set, {1} followed by the events queued (see
-- queue_events), {0} when the agent changed meanwhile and {-1} when it no longer exists.
local agent, stats, id, status, spent, pii, now = KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3],
  ARGV[4], ARGV[6]
local old = redis.call('HMGET', agent, unpack(AGENT_FIELDS))
local cas = #ARGV > 15
if cas then
  if not old[1] then return {-1} end
  for i = 1, 10 do
    if (old[i] or ABSENT) ~= ARGV[15 + i] then return {0} end
  end
end
-- The pii total first: it is the one step that can fail (64-bit overflow), and then nothing
-- has been written yet.
if old[3] ~= pii then
  if pii ~= '0' then redis.call('HINCRBY', stats, 'pii_detections', pii) end
  if old[3] and old[3] ~= '0' then redis.call('HINCRBY', stats, 'pii_detections', '-' .. old[3]) end
end
redis.call('HSET', agent, 'status', status, 'spent_micros', spent, 'pii_detections', pii,
  'changed_at', now)
-- The optional fields, each stored only when it is not the default.
local optional = {{'limit_micros', 5, 4}, {'labels', 7, 5}, {'scopes', 8, 6}, {'period', 9, 7},
  {'tz', 10, 8}, {'period_start', 11, 9}, {'period_end', 12, 11}}
for _, o in ipairs(optional) do
  local value = ARGV[o[2]]
  if o[1] == 'tz' and value == 'UTC' then value = '' end
  if value ~= '' then
    redis.call('HSET', agent, o[1], value)
  elseif old[o[3]] then
    redis.call('HDEL', agent, o[1])
  end
end
if ARGV[14] ~= ABSENT then
  redis.call('HSET', agent, 'thresholds', ARGV[14])
elseif old[10] then
  redis.call('HDEL', agent, 'thresholds')
end
if ARGV[15] == '1' and old[12] then redis.call('HDEL', agent, 'alerted') end
if old[1] then
  if old[1] ~= status then
    redis.call('HINCRBY', stats, old[1], -1)
    redis.call('HINCRBY', stats, status, 1)
  end
  local delta = tonumber(spent) - (tonumber(old[2]) or 0)
  if delta ~= 0 then redis.call('HINCRBY', stats, 'spent_micros', int(delta)) end
else
  redis.call('ZADD', KEYS[3], 0, id)
  redis.call('HINCRBY', stats, status, 1)
  if spent ~= '0' then redis.call('HINCRBY', stats, 'spent_micros', spent) end
end
index_finished(KEYS[4], id, old[1], status, now)
index_status(status_sets(5), id, old[1], status)
index_labels(ARGV[13], id, old[5], ARGV[7])
if not cas then return 1 end
local events = {}
if #ARGV > 25 then events[1] = {unpack(ARGV, 26)} end
return queue_events(KEYS[8], events, {1})
