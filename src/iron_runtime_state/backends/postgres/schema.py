"""What a store's schema holds: its tables, indexes, triggers and functions, and their versions.

Every object lives in the store's own PostgreSQL schema (``?schema=``, default ``iron``), so
tenants or fleets can share a database. ``{s}`` in each statement stands for the quoted schema.
:data:`MIGRATIONS` is an ordered list: ``MIGRATIONS[i]`` takes a schema from version ``i`` to
``i + 1``, and the version is kept in ``meta``. A schema written by a newer version is refused
untouched (:class:`~iron_runtime_state.SchemaError`); an older one is migrated on first use, in
one transaction under an advisory lock, so processes starting together migrate it once. This is
the stored format: a shipped entry is never edited, only followed by new ones.

The tables, and why they look as they do:

- ``agents``: one row per agent; amounts in micro-units (``bigint``). ``period_end`` is the end
  of the period ``spent`` belongs to (computed when the row is written), so the hot statements
  check "has the period ended" with one comparison, no calendar arithmetic in SQL.
- ``stats``: the fleet's totals as 64 rows of partial sums, kept by a trigger in the same
  transaction as every change to ``agents``. ``stats()`` adds 64 rows instead of scanning the
  agents, and writers spread over the rows (each transaction updates the one its transaction id
  picks) instead of queueing on one row's lock.
- ``agent_labels``: (key, value, agent) for every label, kept by a trigger: a label filter reads
  one range of its primary key, in agent order, so paging by label never scans the fleet.
- ``budgets``: budget scopes. ``holds``: open budget holds, one row each, with the scopes they
  count against; ``hold_scopes``: each hold again under each of its scopes, keyed by (scope,
  expiry) so a scope's open holds are one index range.
- ``audit`` and ``audit_chain``: the hash-chained trail, and its head and anchor (one row).
  Appends are serialised by the head row (see :mod:`.trail`).
- ``ledger`` (version 2): one row per ``spend`` record, written in the record's transaction,
  indexed for reports over a span (see :mod:`.ledger`). ``agents`` and ``budgets`` keep each
  budget's thresholds (``NULL``: the default ones) and ``alerted``, the highest threshold
  alerted in the current period.

``spend``, ``reserve`` and ``commit_hold`` are the hot paths as functions: each locks the agent
and then its scopes (in name order: every writer takes the same order, so none deadlocks) and
reads the holds *after* taking the locks, which a single SQL statement cannot do (it reads from
a snapshot taken before it waited for a lock). Each one either completes the whole change or
changes nothing and returns no row (``spend``: a row of NULLs), and the store then takes its
general path (:mod:`.spending`): periods that roll, refusals and overspends, thresholds reached,
and holds that lapsed, which write audit events built and hashed in Python. Since version 2,
``spend`` and ``commit_hold`` also take the spend's ledger record and write it with the charge:
on an unkeyed chain they hash it themselves after the head they lock (``seal_spend``, with
``seal``: :meth:`AuditChain.seal`'s bytes through ``sha256()``), so writers never seal again;
on a keyed chain the client hashed it after the head it predicts, and ``log_spend`` writes it
when the prediction holds (see :mod:`.sealing`).
Every writer takes its row of ``stats`` (when it changes an agent) after its scopes' locks, and
the audit head last.
"""

from __future__ import annotations

from typing import Final

from ...audit_chain import GENESIS_HASH
from ...models import AgentStatus
from ...money import MAX_MICROS

__all__ = [
    "MIGRATIONS",
    "RUNNING",
    "SCHEMA_VERSION",
    "STATS_SLOTS",
    "STATUSES",
    "STATUS_CODE",
    "render",
]

#: ``agents.status`` codes: a status is stored as its index here (as in the SQLite store).
STATUSES: Final = (AgentStatus.RUNNING, AgentStatus.STOPPED, AgentStatus.FAILED)
STATUS_CODE: Final = {status._value_: code for code, status in enumerate(STATUSES)}
RUNNING: Final = 0
#: Rows of partial sums in ``stats``.
STATS_SLOTS: Final = 64

_MAX: Final = str(MAX_MICROS)


def render(statement: str, quoted_schema: str) -> str:
    """``statement`` for one schema: ``{s}`` becomes the quoted schema name."""
    return statement.replace("{s}", quoted_schema)


# A period has ended when the manager's clock (p_now) reached its end; a period without a
# stored end (written before its start was known) counts as ended, so it starts properly.
_ENDED = "({r}.period IS NOT NULL AND ({r}.period_end IS NULL OR p_now >= {r}.period_end))"

_SPEND: Final = f"""
CREATE FUNCTION {{s}}.spend(
    p_agent text, p_amount bigint, p_now double precision, OUT r_status smallint, OUT r_spent bigint,
    OUT r_pii bigint, OUT r_limit bigint, OUT r_labels jsonb, OUT r_scopes text[], OUT r_period text,
    OUT r_tz text, OUT r_period_start double precision)
LANGUAGE plpgsql AS $$
DECLARE
    a record;
    b record;
    clock double precision;
    held bigint;
    lapsed bigint;
    counted integer := 0;
BEGIN
    SELECT * INTO a FROM {{s}}.agents WHERE agent_id = p_agent FOR UPDATE;
    IF NOT FOUND OR a.status <> {RUNNING} OR a.spent + p_amount > {_MAX} OR {_ENDED.format(r="a")} THEN
        RETURN;
    END IF;
    -- Read after the lock: holds committed by the writer we waited for are counted. One that
    -- lapsed unsettled is for the general path to drop, with its event.
    clock := extract(epoch FROM clock_timestamp());
    SELECT coalesce(sum(h.amount) FILTER (WHERE h.expires_at > clock), 0),
           count(*) FILTER (WHERE h.expires_at <= clock)
    INTO held, lapsed FROM {{s}}.holds h WHERE h.agent_id = p_agent;
    IF lapsed > 0 OR (a.budget_limit IS NOT NULL AND a.spent + held + p_amount > a.budget_limit) THEN
        RETURN;
    END IF;
    IF cardinality(a.scopes) > 0 THEN
        FOR b IN SELECT * FROM {{s}}.budgets WHERE scope = ANY (a.scopes) ORDER BY scope FOR UPDATE LOOP
            counted := counted + 1;
            IF b.spent + p_amount > {_MAX} OR {_ENDED.format(r="b")} THEN
                RETURN;
            END IF;
            IF b.budget_limit IS NOT NULL THEN
                SELECT coalesce(sum(h.amount), 0) INTO held FROM {{s}}.hold_scopes h
                WHERE h.scope = b.scope AND h.expires_at > clock;
                IF b.spent + held + p_amount > b.budget_limit THEN
                    RETURN;
                END IF;
            END IF;
        END LOOP;
        IF counted < cardinality(a.scopes) THEN
            RETURN;
        END IF;
        UPDATE {{s}}.budgets SET spent = spent + p_amount, changed_at = p_now WHERE scope = ANY (a.scopes);
    END IF;
    -- Last: updating the agent takes a row of stats (by trigger), after every budget's lock.
    UPDATE {{s}}.agents SET spent = spent + p_amount, changed_at = p_now WHERE agent_id = p_agent
    RETURNING status, spent, pii, budget_limit, labels, scopes, period, tz, period_start
    INTO r_status, r_spent, r_pii, r_limit, r_labels, r_scopes, r_period, r_tz, r_period_start;
END
$$"""

_RESERVE: Final = f"""
CREATE FUNCTION {{s}}.reserve(p_agent text, p_amount bigint, p_ttl double precision,
                              p_now double precision, p_id text)
RETURNS TABLE (r_expires_at double precision, r_scopes text[])
LANGUAGE plpgsql AS $$
DECLARE
    a record;
    b record;
    clock double precision;
    held bigint;
    lapsed bigint;
    counted integer := 0;
BEGIN
    SELECT * INTO a FROM {{s}}.agents WHERE agent_id = p_agent FOR UPDATE;
    IF NOT FOUND OR a.status <> {RUNNING} OR {_ENDED.format(r="a")} THEN
        RETURN;
    END IF;
    clock := extract(epoch FROM clock_timestamp());
    SELECT coalesce(sum(h.amount) FILTER (WHERE h.expires_at > clock), 0),
           count(*) FILTER (WHERE h.expires_at <= clock)
    INTO held, lapsed FROM {{s}}.holds h WHERE h.agent_id = p_agent;
    IF lapsed > 0 OR a.spent + held + p_amount > coalesce(a.budget_limit, {_MAX}) THEN
        RETURN;
    END IF;
    IF cardinality(a.scopes) > 0 THEN
        FOR b IN SELECT * FROM {{s}}.budgets WHERE scope = ANY (a.scopes) ORDER BY scope FOR UPDATE LOOP
            counted := counted + 1;
            IF {_ENDED.format(r="b")} THEN
                RETURN;
            END IF;
            SELECT coalesce(sum(h.amount), 0) INTO held FROM {{s}}.hold_scopes h
            WHERE h.scope = b.scope AND h.expires_at > clock;
            IF b.spent + held + p_amount > coalesce(b.budget_limit, {_MAX}) THEN
                RETURN;
            END IF;
        END LOOP;
        IF counted < cardinality(a.scopes) THEN
            RETURN;
        END IF;
    END IF;
    INSERT INTO {{s}}.holds (agent_id, reservation_id, amount, expires_at, scopes)
    VALUES (p_agent, p_id, p_amount, clock + p_ttl, a.scopes);
    IF cardinality(a.scopes) > 0 THEN
        INSERT INTO {{s}}.hold_scopes (scope, expires_at, reservation_id, amount)
        SELECT scope, clock + p_ttl, p_id, p_amount FROM unnest(a.scopes) AS scope;
    END IF;
    RETURN QUERY SELECT clock + p_ttl, a.scopes;
END
$$"""

_COMMIT: Final = f"""
CREATE FUNCTION {{s}}.commit_hold(p_agent text, p_id text, p_actual bigint, p_now double precision)
RETURNS TABLE (r_status smallint, r_spent bigint, r_pii bigint, r_limit bigint, r_labels jsonb,
               r_scopes text[], r_period text, r_tz text, r_period_start double precision)
LANGUAGE plpgsql AS $$
DECLARE
    a record;
    b record;
    h record;
    clock double precision;
BEGIN
    SELECT * INTO a FROM {{s}}.agents WHERE agent_id = p_agent FOR UPDATE;
    IF NOT FOUND OR a.spent + p_actual > coalesce(a.budget_limit, {_MAX}) OR {_ENDED.format(r="a")} THEN
        RETURN;
    END IF;
    clock := extract(epoch FROM clock_timestamp());
    SELECT * INTO h FROM {{s}}.holds
    WHERE agent_id = p_agent AND reservation_id = p_id AND expires_at > clock;
    IF NOT FOUND
       OR EXISTS (SELECT FROM {{s}}.holds l WHERE l.agent_id = p_agent AND l.expires_at <= clock) THEN
        RETURN;
    END IF;
    IF cardinality(h.scopes) > 0 THEN
        FOR b IN SELECT * FROM {{s}}.budgets WHERE scope = ANY (h.scopes) ORDER BY scope FOR UPDATE LOOP
            IF b.spent + p_actual > coalesce(b.budget_limit, {_MAX}) OR {_ENDED.format(r="b")} THEN
                RETURN;
            END IF;
        END LOOP;
        DELETE FROM {{s}}.hold_scopes s
        WHERE s.scope = ANY (h.scopes) AND s.expires_at = h.expires_at AND s.reservation_id = p_id;
        UPDATE {{s}}.budgets SET spent = spent + p_actual, changed_at = p_now WHERE scope = ANY (h.scopes);
    END IF;
    DELETE FROM {{s}}.holds WHERE agent_id = p_agent AND reservation_id = p_id;
    UPDATE {{s}}.agents SET spent = spent + p_actual, changed_at = p_now WHERE agent_id = p_agent;
    RETURN QUERY SELECT a.status, a.spent + p_actual, a.pii, a.budget_limit, a.labels, a.scopes,
        a.period, a.tz, a.period_start;
END
$$"""

# -- version 2 (0.7.0): budget thresholds, and the spend ledger's index -----------------------

#: The thresholds of a budget whose ``thresholds`` column is NULL (``thresholds.DEFAULT_THRESHOLDS``,
#: written out: a shipped migration never changes with the code; a test checks they agree).
_DEFAULT_THRESHOLDS: Final = "'{0.5,0.8,1.0}'::float8[]"

# Whether a charge that leaves a budget at p_spent reaches a threshold above p_alerted: the rule
# of thresholds.crossed(), compared as doubles as Python does (amounts stay below 2**53, so the
# casts are exact). Fast paths leave such a charge to the general path, which writes the events.
_CROSSES: Final = f"""
CREATE FUNCTION {{s}}.crosses(
    p_thresholds double precision[], p_alerted double precision, p_limit bigint, p_spent bigint)
RETURNS boolean LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    t double precision;
BEGIN
    -- plpgsql, not sql: a sql function with a subquery is planned again at every call.
    IF coalesce(p_limit, 0) <= 0 THEN
        RETURN false;
    END IF;
    FOREACH t IN ARRAY coalesce(p_thresholds, {_DEFAULT_THRESHOLDS}) LOOP
        IF t > p_alerted AND p_spent::float8 >= t * p_limit::float8 THEN
            RETURN true;
        END IF;
    END LOOP;
    RETURN false;
END
$$"""

# The ledger's record of a charge the calling function made, sealed by the client after the head
# it predicted (p_after, p_prev): the head moves, the record and its ledger row are inserted, and
# the channel is told (as the append statement does, see trail.py). A head that moved meanwhile
# is a serialization failure: the whole statement, charge included, rolls back.
_LOG_SPEND: Final = """
CREATE FUNCTION {s}.log_spend(
    p_after bigint, p_prev text, p_hash text, p_seal text, p_channel text, p_agent text,
    p_ts bigint, p_details text, p_amount bigint, p_scopes text[], p_labels jsonb, p_model text,
    p_input bigint, p_output bigint, p_cached bigint, p_tags jsonb)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    UPDATE {s}.audit_chain SET head_seq = p_after + 1, head_hash = p_hash, head_seal = p_seal
    WHERE id = 0 AND head_seq = p_after AND head_hash = p_prev;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'the audit head moved' USING ERRCODE = 'serialization_failure';
    END IF;
    INSERT INTO {s}.audit (seq, agent_id, event_type, timestamp, details, prev_hash, hash)
    VALUES (p_after + 1, p_agent, 'spend', p_ts, p_details, p_prev, p_hash);
    INSERT INTO {s}.ledger (seq, ts, agent_id, amount, model, input_tokens, output_tokens,
                            cached_input_tokens, scopes, labels, tags)
    VALUES (p_after + 1, p_ts, p_agent, p_amount, p_model, p_input, p_output, p_cached, p_scopes,
            nullif(p_labels, '{}'), p_tags);
    PERFORM pg_notify(p_channel, (p_after + 1)::text);
END
$$"""

# The hash of a record, as AuditChain.seal computes it without a key: SHA-256 of the UTF-8 bytes
# of prev "\n" seq "\n" and the canonical JSON of the event. agent_id and event_type need no
# escaping (validated); to_json(text) escapes details byte for byte as Python's
# json.encoder.encode_basestring does (", \, \b \f \n \r \t, other characters below U+0020 as
# \u00xx in lowercase hex, everything else as it is; tests/test_postgres_sealing.py checks every
# character). A keyed chain (HMAC) is never sealed here: its key stays with the client.
_SEAL: Final = """
CREATE FUNCTION {s}.seal(
    p_prev text, p_seq bigint, p_agent text, p_type text, p_ts bigint, p_details text)
RETURNS text LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
BEGIN
    -- plpgsql, not sql: its expression is planned once per session (to_json is only stable,
    -- so a sql function would not be inlined, and would be planned again at every call).
    RETURN encode(sha256(convert_to(
        p_prev || E'\\n' || p_seq || E'\\n' || '{"agent_id":"' || p_agent || '","details":'
        || to_json(p_details)::text || ',"event_type":"' || p_type || '","timestamp":' || p_ts
        || '}', 'UTF8')), 'hex');
END
$$"""

# The ledger's record of a charge the calling function made, on an unkeyed chain: sealed here,
# after the head read under its lock (taken last, held to the commit), so no writer ever seals
# again. p_seen, p_seen_hash: the highest head the client saw; a head below it (a restore, a
# failover) rolls the statement back, and the client's general path records the rewind first.
_SEAL_SPEND: Final = """
CREATE FUNCTION {s}.seal_spend(
    p_seen bigint, p_seen_hash text, p_channel text, p_agent text, p_ts bigint, p_details text,
    p_amount bigint, p_scopes text[], p_labels jsonb, p_model text, p_input bigint,
    p_output bigint, p_cached bigint, p_tags jsonb, OUT r_seq bigint, OUT r_prev text,
    OUT r_hash text)
LANGUAGE plpgsql AS $$
BEGIN
    SELECT head_seq, head_hash INTO r_seq, r_prev FROM {s}.audit_chain WHERE id = 0 FOR UPDATE;
    IF p_seen IS NOT NULL AND (r_seq < p_seen OR (r_seq = p_seen AND r_prev <> p_seen_hash)) THEN
        RAISE EXCEPTION 'the audit head went back' USING ERRCODE = 'serialization_failure';
    END IF;
    r_hash := {s}.seal(r_prev, r_seq + 1, p_agent, 'spend', p_ts, p_details);
    PERFORM {s}.log_spend(r_seq, r_prev, r_hash, NULL, p_channel, p_agent, p_ts, p_details,
        p_amount, p_scopes, p_labels, p_model, p_input, p_output, p_cached, p_tags);
    r_seq := r_seq + 1;
END
$$"""

# The parameters both fast paths take for the spend record (see spending.py).
_RECORD_PARAMS: Final = """p_labels jsonb, p_scopes text[], p_after bigint, p_prev text, p_hash text,
    p_seal text, p_ts bigint, p_details text, p_channel text, p_model text, p_input bigint,
    p_output bigint, p_cached bigint, p_tags jsonb"""
_LOG_ARGS: Final = """p_after, p_prev, p_hash, p_seal, p_channel, p_agent, p_ts, p_details, {amount},
        p_scopes, p_labels, p_model, p_input, p_output, p_cached, p_tags"""
_SEAL_ARGS: Final = """p_after, p_prev, p_channel, p_agent, p_ts, p_details, {amount}, p_scopes,
        p_labels, p_model, p_input, p_output, p_cached, p_tags"""
# The head the record was sealed after (when sealed in advance): checked before anything changes,
# so a prediction that missed costs no rollback, and the head found goes back to the client
# (log_spend checks again under the head's lock).
_HEAD_IS: Final = """IF p_hash IS NOT NULL THEN
        SELECT head_seq, head_hash INTO r_head_seq, r_head_hash FROM {s}.audit_chain WHERE id = 0;
        IF r_head_seq <> p_after OR r_head_hash <> p_prev THEN
            RETURN;
        END IF;
    END IF;"""
# The record, in one of three ways:
# - p_details NULL (the client's transaction, after a prediction missed): the head is locked,
#   last, and returned for the client to append after;
# - p_hash NULL (an unkeyed chain): sealed here after the head, under its lock (seal_spend);
#   p_after and p_prev are then the highest head the client saw (NULL: none), not a prediction;
# - else sealed by the client after the head p_after, p_prev it predicted (log_spend).
_LOG: Final = (
    "IF p_details IS NULL THEN\n"
    "        SELECT head_seq, head_hash INTO r_head_seq, r_head_hash FROM {{s}}.audit_chain\n"
    "        WHERE id = 0 FOR UPDATE;\n"
    "    ELSIF p_hash IS NULL THEN\n"
    "        SELECT r_seq, r_prev, r_hash INTO r_head_seq, r_head_prev, r_head_hash\n"
    f"        FROM {{{{s}}}}.seal_spend({_SEAL_ARGS});\n"
    "    ELSE\n"
    f"        PERFORM {{{{s}}}}.log_spend({_LOG_ARGS});\n"
    "    END IF;"
)
# What both fast paths return: the agent's state, then the head (when only the head missed: the
# one found; when sealed here: the record's seq and hash, and the hash before it).
_RESULT: Final = """OUT r_status smallint, OUT r_spent bigint, OUT r_pii bigint, OUT r_limit bigint,
    OUT r_labels jsonb, OUT r_scopes text[], OUT r_period text, OUT r_tz text,
    OUT r_period_start double precision, OUT r_thresholds double precision[],
    OUT r_head_seq bigint, OUT r_head_hash text, OUT r_head_prev text"""

_SPEND_V2: Final = f"""
CREATE FUNCTION {{s}}.spend(
    p_agent text, p_amount bigint, p_now double precision, {_RECORD_PARAMS}, {_RESULT})
LANGUAGE plpgsql AS $$
DECLARE
    a record;
    b record;
    clock double precision;
    held bigint;
    lapsed bigint;
    counted integer := 0;
BEGIN
    SELECT * INTO a FROM {{s}}.agents WHERE agent_id = p_agent FOR UPDATE;
    IF NOT FOUND OR a.status <> {RUNNING} OR a.spent + p_amount > {_MAX} OR {_ENDED.format(r="a")}
       OR (p_details IS NOT NULL AND (a.labels <> p_labels OR a.scopes <> p_scopes))
       OR {{s}}.crosses(a.thresholds, a.alerted, a.budget_limit, a.spent + p_amount) THEN
        RETURN;
    END IF;
    -- Read after the lock: holds committed by the writer we waited for are counted. One that
    -- lapsed unsettled is for the general path to drop, with its event.
    clock := extract(epoch FROM clock_timestamp());
    SELECT coalesce(sum(h.amount) FILTER (WHERE h.expires_at > clock), 0),
           count(*) FILTER (WHERE h.expires_at <= clock)
    INTO held, lapsed FROM {{s}}.holds h WHERE h.agent_id = p_agent;
    IF lapsed > 0 OR (a.budget_limit IS NOT NULL AND a.spent + held + p_amount > a.budget_limit) THEN
        RETURN;
    END IF;
    IF cardinality(a.scopes) > 0 THEN
        FOR b IN SELECT * FROM {{s}}.budgets WHERE scope = ANY (a.scopes) ORDER BY scope FOR UPDATE LOOP
            counted := counted + 1;
            IF b.spent + p_amount > {_MAX} OR {_ENDED.format(r="b")}
               OR {{s}}.crosses(b.thresholds, b.alerted, b.budget_limit, b.spent + p_amount) THEN
                RETURN;
            END IF;
            IF b.budget_limit IS NOT NULL THEN
                SELECT coalesce(sum(h.amount), 0) INTO held FROM {{s}}.hold_scopes h
                WHERE h.scope = b.scope AND h.expires_at > clock;
                IF b.spent + held + p_amount > b.budget_limit THEN
                    RETURN;
                END IF;
            END IF;
        END LOOP;
        IF counted < cardinality(a.scopes) THEN
            RETURN;
        END IF;
    END IF;
    {_HEAD_IS}
    IF cardinality(a.scopes) > 0 THEN
        UPDATE {{s}}.budgets SET spent = spent + p_amount, changed_at = p_now WHERE scope = ANY (a.scopes);
    END IF;
    -- Then the agent, which takes a row of stats (by trigger), after every budget's lock; the
    -- audit head last.
    UPDATE {{s}}.agents SET spent = spent + p_amount, changed_at = p_now WHERE agent_id = p_agent
    RETURNING status, spent, pii, budget_limit, labels, scopes, period, tz, period_start, thresholds
    INTO r_status, r_spent, r_pii, r_limit, r_labels, r_scopes, r_period, r_tz, r_period_start,
         r_thresholds;
    {_LOG.format(amount="p_amount")}
END
$$"""

_COMMIT_V2: Final = f"""
CREATE FUNCTION {{s}}.commit_hold(
    p_agent text, p_id text, p_actual bigint, p_now double precision, {_RECORD_PARAMS}, {_RESULT})
LANGUAGE plpgsql AS $$
DECLARE
    a record;
    b record;
    h record;
    clock double precision;
    counted integer := 0;
BEGIN
    SELECT * INTO a FROM {{s}}.agents WHERE agent_id = p_agent FOR UPDATE;
    IF NOT FOUND OR a.spent + p_actual > coalesce(a.budget_limit, {_MAX}) OR {_ENDED.format(r="a")}
       OR (p_details IS NOT NULL AND a.labels <> p_labels)
       OR {{s}}.crosses(a.thresholds, a.alerted, a.budget_limit, a.spent + p_actual) THEN
        RETURN;
    END IF;
    clock := extract(epoch FROM clock_timestamp());
    SELECT * INTO h FROM {{s}}.holds
    WHERE agent_id = p_agent AND reservation_id = p_id AND expires_at > clock;
    IF NOT FOUND OR h.scopes <> p_scopes
       OR EXISTS (SELECT FROM {{s}}.holds l WHERE l.agent_id = p_agent AND l.expires_at <= clock) THEN
        RETURN;
    END IF;
    IF cardinality(h.scopes) > 0 THEN
        FOR b IN SELECT * FROM {{s}}.budgets WHERE scope = ANY (h.scopes) ORDER BY scope FOR UPDATE LOOP
            counted := counted + 1;
            IF b.spent + p_actual > coalesce(b.budget_limit, {_MAX}) OR {_ENDED.format(r="b")}
               OR {{s}}.crosses(b.thresholds, b.alerted, b.budget_limit, b.spent + p_actual) THEN
                RETURN;
            END IF;
        END LOOP;
        -- A scope removed since the hold was made: the general path leaves it out of the record.
        IF counted < cardinality(h.scopes) THEN
            RETURN;
        END IF;
    END IF;
    {_HEAD_IS}
    IF cardinality(h.scopes) > 0 THEN
        DELETE FROM {{s}}.hold_scopes s
        WHERE s.scope = ANY (h.scopes) AND s.expires_at = h.expires_at AND s.reservation_id = p_id;
        UPDATE {{s}}.budgets SET spent = spent + p_actual, changed_at = p_now WHERE scope = ANY (h.scopes);
    END IF;
    DELETE FROM {{s}}.holds WHERE agent_id = p_agent AND reservation_id = p_id;
    UPDATE {{s}}.agents SET spent = spent + p_actual, changed_at = p_now WHERE agent_id = p_agent;
    {_LOG.format(amount="p_actual")}
    SELECT a.status, a.spent + p_actual, a.pii, a.budget_limit, a.labels, a.scopes, a.period, a.tz,
        a.period_start, a.thresholds
    INTO r_status, r_spent, r_pii, r_limit, r_labels, r_scopes, r_period, r_tz, r_period_start,
         r_thresholds;
END
$$"""


#: Schema migrations, in order: ``MIGRATIONS[i]`` takes a schema from version ``i`` to ``i + 1``.
#: Append new entries; never edit one that has shipped. Each runs in the migrating transaction.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: agents with their labels and fleet totals, budget scopes and holds, the audit trail.
    (
        # status: 0 running, 1 stopped, 2 failed. Amounts in micro-units; budget_limit NULL: no
        # limit. Text keys in the "C" collation: byte order, the fastest compare, and the order
        # Python sorts in. changed_at: Unix time of the last change (purge_agents).
        """CREATE TABLE {s}.agents (
            agent_id     text COLLATE "C" PRIMARY KEY,
            status       smallint NOT NULL,
            spent        bigint   NOT NULL,
            pii          bigint   NOT NULL,
            budget_limit bigint,
            labels       jsonb    NOT NULL DEFAULT '{}',
            scopes       text[] COLLATE "C" NOT NULL DEFAULT '{}',
            period       text,
            tz           text     NOT NULL DEFAULT 'UTC',
            period_start double precision,
            period_end   double precision,
            changed_at   double precision NOT NULL
        )""",
        # The stopped and failed agents by status, in id order (iter_agent_states(status=...),
        # purge_agents). Partial: most of a fleet runs, and a running agent's writes touch no index.
        "CREATE INDEX agents_finished ON {s}.agents (status, agent_id) WHERE status <> 0",
        """CREATE TABLE {s}.agent_labels (
            key      text COLLATE "C",
            value    text COLLATE "C",
            agent_id text COLLATE "C",
            PRIMARY KEY (key, value, agent_id)
        )""",
        """CREATE TABLE {s}.stats (
            slot    integer PRIMARY KEY,
            running bigint  NOT NULL DEFAULT 0,
            stopped bigint  NOT NULL DEFAULT 0,
            failed  bigint  NOT NULL DEFAULT 0,
            spent   numeric NOT NULL DEFAULT 0,
            pii     numeric NOT NULL DEFAULT 0
        )""",
        f"INSERT INTO {{s}}.stats (slot) SELECT generate_series(0, {STATS_SLOTS - 1})",
        # One slot per transaction (its id modulo the slots): a transaction that changes many
        # agents locks one stats row, so two of them cannot deadlock over stats rows. Rows added
        # or removed are counted once per statement (a row updated again and again in one
        # transaction costs PostgreSQL more each time: a bulk insert or purge would be quadratic);
        # a changed agent (a spend, a status) once per row, with no work when none of the counted
        # columns changed.
        f"""CREATE FUNCTION {{s}}.agents_counted() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'UPDATE' THEN
                UPDATE {{s}}.stats SET
                    running = running + (NEW.status = 0)::int - (OLD.status = 0)::int,
                    stopped = stopped + (NEW.status = 1)::int - (OLD.status = 1)::int,
                    failed = failed + (NEW.status = 2)::int - (OLD.status = 2)::int,
                    spent = spent + (NEW.spent - OLD.spent), pii = pii + (NEW.pii - OLD.pii)
                WHERE slot = txid_current() % {STATS_SLOTS};
            ELSE
                UPDATE {{s}}.stats s SET running = s.running + sign * d.running,
                    stopped = s.stopped + sign * d.stopped, failed = s.failed + sign * d.failed,
                    spent = s.spent + sign * d.spent, pii = s.pii + sign * d.pii
                FROM (SELECT CASE WHEN TG_OP = 'INSERT' THEN 1 ELSE -1 END AS sign,
                             count(*) FILTER (WHERE status = 0) AS running,
                             count(*) FILTER (WHERE status = 1) AS stopped,
                             count(*) FILTER (WHERE status = 2) AS failed,
                             coalesce(sum(spent), 0) AS spent, coalesce(sum(pii), 0) AS pii
                      FROM changed) d
                WHERE s.slot = txid_current() % {STATS_SLOTS} AND d.running + d.stopped + d.failed > 0;
            END IF;
            RETURN NULL;
        END
        $$""",
        """CREATE TRIGGER agents_added AFTER INSERT ON {s}.agents REFERENCING NEW TABLE AS changed
        FOR EACH STATEMENT EXECUTE FUNCTION {s}.agents_counted()""",
        """CREATE TRIGGER agents_removed AFTER DELETE ON {s}.agents REFERENCING OLD TABLE AS changed
        FOR EACH STATEMENT EXECUTE FUNCTION {s}.agents_counted()""",
        """CREATE TRIGGER agents_recounted AFTER UPDATE OF status, spent, pii ON {s}.agents
        FOR EACH ROW WHEN (OLD.status <> NEW.status OR OLD.spent <> NEW.spent OR OLD.pii <> NEW.pii)
        EXECUTE FUNCTION {s}.agents_counted()""",
        """CREATE FUNCTION {s}.agents_labelled() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP <> 'INSERT' THEN
                DELETE FROM {s}.agent_labels l USING jsonb_each_text(OLD.labels) o
                WHERE l.key = o.key AND l.value = o.value AND l.agent_id = OLD.agent_id;
            END IF;
            IF TG_OP <> 'DELETE' THEN
                INSERT INTO {s}.agent_labels (key, value, agent_id)
                SELECT key, value, NEW.agent_id FROM jsonb_each_text(NEW.labels);
            END IF;
            RETURN NULL;
        END
        $$""",
        """CREATE TRIGGER agents_labelled AFTER INSERT ON {s}.agents
        FOR EACH ROW WHEN (NEW.labels <> '{}') EXECUTE FUNCTION {s}.agents_labelled()""",
        """CREATE TRIGGER agents_relabelled AFTER UPDATE OF labels ON {s}.agents
        FOR EACH ROW WHEN (OLD.labels <> NEW.labels) EXECUTE FUNCTION {s}.agents_labelled()""",
        """CREATE TRIGGER agents_unlabelled AFTER DELETE ON {s}.agents
        FOR EACH ROW WHEN (OLD.labels <> '{}') EXECUTE FUNCTION {s}.agents_labelled()""",
        """CREATE TABLE {s}.budgets (
            scope        text COLLATE "C" PRIMARY KEY,
            budget_limit bigint,
            period       text,
            tz           text   NOT NULL,
            period_start double precision,
            period_end   double precision,
            spent        bigint NOT NULL,
            changed_at   double precision NOT NULL
        )""",
        # Holds expire by the database's clock (Unix seconds), one clock for every client.
        """CREATE TABLE {s}.holds (
            agent_id       text COLLATE "C",
            reservation_id text COLLATE "C",
            amount         bigint NOT NULL,
            expires_at     double precision NOT NULL,
            scopes         text[] COLLATE "C" NOT NULL,
            PRIMARY KEY (agent_id, reservation_id)
        )""",
        """CREATE TABLE {s}.hold_scopes (
            scope          text COLLATE "C",
            expires_at     double precision,
            reservation_id text COLLATE "C",
            amount         bigint NOT NULL,
            PRIMARY KEY (scope, expires_at, reservation_id)
        )""",
        _SPEND,
        _RESERVE,
        _COMMIT,
        """CREATE TABLE {s}.audit (
            seq        bigint PRIMARY KEY,
            agent_id   text COLLATE "C" NOT NULL,
            event_type text COLLATE "C" NOT NULL,
            timestamp  bigint NOT NULL,
            details    text   NOT NULL,
            prev_hash  text   NOT NULL,
            hash       text   NOT NULL
        )""",
        # Each answers one filter in seq order (by agent, by type), or a time window.
        "CREATE INDEX audit_by_agent ON {s}.audit (agent_id, seq)",
        "CREATE INDEX audit_by_type ON {s}.audit (event_type, seq)",
        "CREATE INDEX audit_by_time ON {s}.audit (timestamp, seq)",
        # head: the newest record ever appended; anchor: what the first remaining record links
        # to (moved by pruning). Seals: AuditChain.seal_mark under an audit key (NULL: none).
        """CREATE TABLE {s}.audit_chain (
            id          integer PRIMARY KEY CHECK (id = 0),
            head_seq    bigint NOT NULL,
            head_hash   text   NOT NULL,
            head_seal   text,
            anchor_seq  bigint NOT NULL,
            anchor_hash text   NOT NULL,
            anchor_seal text
        )""",
        f"INSERT INTO {{s}}.audit_chain VALUES (0, 0, '{GENESIS_HASH}', NULL, 0, '{GENESIS_HASH}', NULL)",
    ),
    # 2 (0.7.0): budget thresholds and alerted levels; the spend ledger's index; the fast paths
    # write the ledger's record (their old versions are replaced).
    (
        # thresholds NULL: the default ones. alerted: the highest threshold alerted in the
        # current period (0: none). Constant defaults: PostgreSQL adds these columns without
        # rewriting the tables.
        "ALTER TABLE {s}.agents ADD COLUMN thresholds double precision[], "
        "ADD COLUMN alerted double precision NOT NULL DEFAULT 0",
        "ALTER TABLE {s}.budgets ADD COLUMN thresholds double precision[], "
        "ADD COLUMN alerted double precision NOT NULL DEFAULT 0",
        # One row per spend record (seq: the record's), written in the record's transaction and
        # removed with it by prune_audit; reports read it instead of parsing records. ts: the
        # record's timestamp; amount in micro-units; labels and tags NULL when empty.
        """CREATE TABLE {s}.ledger (
            seq                 bigint PRIMARY KEY,
            ts                  bigint NOT NULL,
            agent_id            text COLLATE "C" NOT NULL,
            amount              bigint NOT NULL,
            model               text COLLATE "C",
            input_tokens        bigint NOT NULL,
            output_tokens       bigint NOT NULL,
            cached_input_tokens bigint NOT NULL,
            scopes              text[] COLLATE "C" NOT NULL,
            labels              jsonb,
            tags                jsonb
        )""",
        # A report reads the span it asks for, never the whole ledger: by time, the sums come
        # from the index alone (an index-only scan for a report by time); by agent or model, the
        # range of that key within the span.
        "CREATE INDEX ledger_by_time ON {s}.ledger (ts) "
        "INCLUDE (amount, input_tokens, output_tokens, cached_input_tokens)",
        "CREATE INDEX ledger_by_agent ON {s}.ledger (agent_id, ts)",
        "CREATE INDEX ledger_by_model ON {s}.ledger (model, ts)",
        _CROSSES,
        _LOG_SPEND,
        _SEAL,
        _SEAL_SPEND,
        "DROP FUNCTION {s}.spend(text, bigint, double precision)",
        _SPEND_V2,
        "DROP FUNCTION {s}.commit_hold(text, text, bigint, double precision)",
        _COMMIT_V2,
    ),
)

#: The schema version this code writes: the number of migrations.
SCHEMA_VERSION: Final = len(MIGRATIONS)
