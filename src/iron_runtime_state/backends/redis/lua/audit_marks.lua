-- audit_marks: where the audit trail stands, in one read.
-- KEYS: log, head
-- Returns {head seq, head hash, anchor seq, anchor hash, head seal, anchor seal, records stored};
-- a field the namespace lacks is nil (a namespace written before seals has none).
local h = redis.call('HMGET', KEYS[2], 'seq', 'hash', 'anchor_seq', 'anchor_hash', 'seal',
  'anchor_seal')
h[7] = redis.call('XLEN', KEYS[1])
return h
