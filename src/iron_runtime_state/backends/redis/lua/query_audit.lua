-- query_audit: one page of audit records with seq > after that pass the filters.
-- With an index (one agent's or one type's sorted set of seqs) only that index is walked, never
-- the whole stream. At most `budget` candidates are examined per call, so a selective filter
-- never blocks the server for long: the client calls again from the returned position.
-- Every stored record is considered, wherever the anchor and the head are: a reader sees what
-- the verifier checks. Index entries of pruned records find nothing (they are cleaned up after).
-- KEYS: log, index (the log itself when there is none)
-- ARGV: after, want, budget, event_type ('' for any), since ('' for none), until ('' for none),
--       'index' or 'all'
-- Returns {last examined seq, 1 if nothing is left to examine else 0, then for each record:
-- entry id, agent_id, event_type, timestamp, details, prev_hash, hash}.
local log = KEYS[1]
local after = tonumber(ARGV[1])
local want, budget = tonumber(ARGV[2]), tonumber(ARGV[3])
local event_type, since, till = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local out = {int(after), 0}
local found = 0

local function consider(id, flat)
  local e = entry_fields(flat)
  local ts = tonumber(e.timestamp)
  if (event_type == '' or e.event_type == event_type) and (not since or ts >= since)
      and (not till or ts <= till) then
    local n = #out
    out[n + 1], out[n + 2], out[n + 3], out[n + 4] = id, e.agent_id, e.event_type, e.timestamp
    out[n + 5], out[n + 6], out[n + 7] = e.details, e.prev_hash, e.hash
    found = found + 1
  end
end

local seen
if ARGV[7] == 'all' then
  local entries = redis.call('XRANGE', log, int(after + 1), '+', 'COUNT', budget)
  seen = #entries
  for _, entry in ipairs(entries) do
    out[1] = string.match(entry[1], '^%d+')
    consider(entry[1], entry[2])
    if found >= want then break end
  end
else
  local seqs = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. int(after), '+inf', 'LIMIT', 0, budget)
  seen = #seqs
  for _, s in ipairs(seqs) do
    out[1] = s
    local entry = redis.call('XRANGE', log, s, s, 'COUNT', 1)[1]
    if entry then consider(entry[1], entry[2]) end
    if found >= want then break end
  end
end
if seen < budget and found < want then out[2] = 1 end
return out
