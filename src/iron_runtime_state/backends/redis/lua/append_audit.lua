-- append_audit: append a batch of sealed records to the audit stream, all or none.
-- The client hashed the batch against the head it believed current; the batch is appended only
-- if the head is still that one (compare-and-set), otherwise the current head comes back and
-- the client seals again on top of it. So concurrent appenders extend one chain. The new head's
-- seal (made with the audit key, '' without one) is stored beside it.
-- Records drained from a group's outbox carry their outbox entry ids. The group's mark (the id
-- of its last entry appended, in `drained`) makes the drain idempotent: a batch whose first
-- entry is not after the mark is refused like a moved head, and the reply says where the mark
-- is, so a repeated drain appends nothing twice. `landed` keeps the seq of the newest entries'
-- records, so a client whose own entries another process appended finds their records.
-- Each record's entry id is "<seq>-0"; per-agent and per-type sorted sets index its seq, and the
-- time index (see `index_time`) its timestamp, while that index is complete (time_indexed = seq).
-- KEYS: log, head, index registry, drained, landed, time highs, time lows, then every index key
--       the batch touches (and,
--       on a standalone server, the group's outbox, trimmed of the entries appended)
-- ARGV: expected seq, expected hash, head seal, group ('' for events given directly), the
--       caller's own outbox entry ids (comma-separated, '' for none), KEYS position of the outbox to trim (0: none), then for
--       each record: agent_id, event_type, timestamp, details, hash, the KEYS positions of its
--       agent index and its type index, and its outbox entry id ('' for none)
-- Returns {1} when appended; otherwise {0, head seq, head hash, the group's mark ('' for none)},
-- followed, for each of the caller's own entries appended already, by its outbox entry id and
-- its record (entry id, fields).
local log, head, group, own = KEYS[1], KEYS[2], ARGV[4], ARGV[5]
local h = redis.call('HMGET', head, 'seq', 'hash', 'time_indexed')
local seq = tonumber(h[1] or '0')
local prev = h[2] or GENESIS_HASH
local mark = false
local first = ''
if group ~= '' then
  mark = redis.call('HGET', KEYS[4], group)
  for i = 7, #ARGV, 8 do
    if ARGV[i + 7] ~= '' then first = ARGV[i + 7] break end
  end
end
if int(seq) ~= ARGV[1] or prev ~= ARGV[2] or (first ~= '' and not id_after(first, mark)) then
  local reply = {0, int(seq), prev, mark or ''}
  for id in string.gmatch(own, '[^,]+') do
    local at = redis.call('ZSCORE', KEYS[5], group .. '/' .. id)
    local entry = at and redis.call('XRANGE', log, at .. '-0', at .. '-0')[1]
    if entry then
      reply[#reply + 1] = id
      reply[#reply + 1] = entry[1]
      reply[#reply + 1] = entry[2]
    end
  end
  return reply
end
local last = false
local timed = tonumber(h[3] or '0') == seq
for i = 7, #ARGV, 8 do
  seq = seq + 1
  local s = int(seq)
  local record = {s .. '-0', 'agent_id', ARGV[i], 'event_type', ARGV[i + 1],
    'timestamp', ARGV[i + 2], 'details', ARGV[i + 3], 'prev_hash', prev, 'hash', ARGV[i + 4]}
  if type(redis.pcall('XADD', log, unpack(record))) == 'table' then
    -- A stream takes no id at or below the highest it ever held. The newest records were deleted
    -- (a truncation: the client put an audit_rewound record first): its id counter goes back to
    -- the newest record left, so the trail carries on from the head. A record still stored at
    -- this seq is refused all the same.
    local newest = redis.call('XREVRANGE', log, '+', '-', 'COUNT', 1)[1]
    redis.call('XSETID', log, newest and newest[1] or '0-1')
    redis.call('XADD', log, unpack(record))
  end
  redis.call('ZADD', KEYS[tonumber(ARGV[i + 5])], s, s)
  redis.call('ZADD', KEYS[tonumber(ARGV[i + 6])], s, s)
  if timed then index_time(KEYS[6], KEYS[7], seq, tonumber(ARGV[i + 2])) end
  if ARGV[i + 7] ~= '' then
    last = ARGV[i + 7]
    redis.call('ZADD', KEYS[5], s, group .. '/' .. last)
  end
  prev = ARGV[i + 4]
end
redis.call('HSET', head, 'seq', int(seq), 'hash', prev)
if timed then redis.call('HSET', head, 'time_indexed', int(seq)) end
if ARGV[3] == '' then
  redis.call('HDEL', head, 'seal')
else
  redis.call('HSET', head, 'seal', ARGV[3])
end
local trim = tonumber(ARGV[6])
if last then
  redis.call('HSET', KEYS[4], group, last)
  if redis.call('ZCARD', KEYS[5]) > LANDED_KEEP * 1.1 then  -- trimmed now and then, in bulk
    redis.call('ZREMRANGEBYRANK', KEYS[5], 0, -LANDED_KEEP - 1)
  end
  if trim > 0 then redis.call('XTRIM', KEYS[trim], 'MINID', next_id(last)) end
end
if trim == 0 then trim = #KEYS + 1 end
redis.call('SADD', KEYS[3], unpack(KEYS, 8, trim - 1))
return {1}
