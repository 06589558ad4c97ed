-- prune_audit: remove the oldest records up to a given one, which becomes the anchor the first
-- remaining record links to, with the anchor's seal (made with the audit key, '' without one).
-- The client read the run and sealed its last record; the records are removed only if they are
-- still the oldest ones and every one of them is older than the cut-off.
-- Run once per op key (see `once`): a resend after a lost reply gets the first answer.
-- KEYS: log, head, op, time highs, time lows
-- ARGV: before, the last removed record's entry id, its hash, the anchor's seal, chunk, op ttl
-- Returns how many were removed, or -1 when the oldest records are no longer those the client
-- read (another prune ran meanwhile): the client reads again.
return once(KEYS[3], ARGV[6], function()
  local log, head = KEYS[1], KEYS[2]
  local last, chunk = ARGV[2], tonumber(ARGV[5])
  local entries = redis.call('XRANGE', log, '-', last, 'COUNT', chunk + 1)
  local n = #entries
  if n == 0 or n > chunk or entries[n][1] ~= last then return -1 end
  local before = tonumber(ARGV[1])
  for _, entry in ipairs(entries) do
    if tonumber(entry_fields(entry[2]).timestamp) >= before then return -1 end
  end
  if entry_fields(entries[n][2]).hash ~= ARGV[3] then return -1 end
  redis.call('XTRIM', log, 'MINID', next_id(last))
  local limit = math.ceil(chunk / TIME_BLOCK) + 2
  prune_time(KEYS[4], KEYS[5], tonumber(string.match(last, '^%d+')), limit)
  redis.call('HSET', head, 'anchor_seq', string.match(last, '^%d+'), 'anchor_hash', ARGV[3])
  if ARGV[4] == '' then
    redis.call('HDEL', head, 'anchor_seal')
  else
    redis.call('HSET', head, 'anchor_seal', ARGV[4])
  end
  return n
end)
