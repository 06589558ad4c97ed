-- query_audit: one page of audit records with seq > after that pass the filters, in seq order.
-- With an index (one agent's or one type's sorted set of seqs) only that index is walked, never
-- the whole stream; with since or until only the seqs between the time index's bounds (see
-- `index_time`). At most `budget` candidates are examined per call, so a selective filter never
-- blocks the server for long: the client calls again from the returned position. Candidates are
-- read a piece at a time: `want` of them when every candidate matches.
-- Every stored record is considered, wherever the anchor and the head are: a reader sees what
-- the verifier checks. Index entries of pruned records find nothing (they are cleaned up after).
-- KEYS: log, index (the log itself when there is none), head, time highs, time lows
-- ARGV: after, want, budget, event_type ('' for any), since ('' for none), until ('' for none),
--       'index' or 'all'
-- Returns {last examined seq, 1 if nothing is left to examine else 0, then for each record:
-- entry id, agent_id, event_type, timestamp, details, prev_hash, hash}; {after, -1} when the
-- query is by time and the time index is not complete (the client builds it: index_time.lua).
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

-- The seqs that can match: from first to last (false: to the end).
local first, last = after + 1, false
if since or till then
  local h = redis.call('HMGET', KEYS[3], 'seq', 'time_indexed')
  if tonumber(h[2] or '0') < tonumber(h[1] or '0') then
    out[2] = -1
    return out
  end
  if since then
    local block = redis.call('ZRANGEBYSCORE', KEYS[4], since, '+inf', 'LIMIT', 0, 1)[1]
    if not block then
      out[2] = 1
      return out
    end
    first = math.max(first, tonumber(block))
  end
  if till then
    local block = redis.call('ZRANGEBYSCORE', KEYS[5], '(' .. int(till), '+inf', 'LIMIT', 0, 1)[1]
    if block then last = tonumber(block) - 1 end
  end
  if last and first > last then
    out[2] = 1
    return out
  end
end

local piece = want
if event_type ~= '' or since or till then piece = math.max(want, 100) end
local seen = 0
local ended = false
if ARGV[7] == 'all' then
  local start, stop = int(first), last and int(last) or '+'
  while not ended and seen < budget and found < want do
    local count = math.min(piece, budget - seen)
    local entries = redis.call('XRANGE', log, start, stop, 'COUNT', count)
    ended = #entries < count
    for _, entry in ipairs(entries) do
      seen = seen + 1
      out[1] = string.match(entry[1], '^%d+')
      consider(entry[1], entry[2])
      if found >= want then break end
    end
    if #entries > 0 then start = '(' .. entries[#entries][1] end
  end
else
  local low, high = '(' .. int(first - 1), last and int(last) or '+inf'
  while not ended and seen < budget and found < want do
    local count = math.min(piece, budget - seen)
    local seqs = redis.call('ZRANGEBYSCORE', KEYS[2], low, high, 'LIMIT', 0, count)
    ended = #seqs < count
    for _, s in ipairs(seqs) do
      seen = seen + 1
      out[1] = s
      local entry = redis.call('XRANGE', log, s, s, 'COUNT', 1)[1]
      if entry then consider(entry[1], entry[2]) end
      if found >= want then break end
    end
    if #seqs > 0 then low = '(' .. seqs[#seqs] end
  end
end
if ended and found < want then out[2] = 1 end
return out
