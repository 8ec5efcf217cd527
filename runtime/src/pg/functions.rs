//! SQL objects `mmctl init` installs besides the protocol state:
//! - `mm.adjust_sequences(n, me)`: makes every sequence conflict-free across
//!   the cluster (INCREMENT BY n, next value ≡ me mod n), run after DDL on
//!   the origin and on every applier, as multimaster does;
//! - `mm.status_now`, `mm.nodes_now`: what `mmd` last reported (UNLOGGED:
//!   per node, never decoded into the data plane);
//! - `mtm.status()`, `mtm.nodes()`: multimaster's status functions, same names
//!   and the columns that make sense here, plus `resync` (the last resync
//!   from a donor snapshot, or the one under way). A report older than 5 s means
//!   `mmd` is not running, and `mtm.status()` says so.

pub const FUNCTIONS: &str = r#"
CREATE OR REPLACE FUNCTION mm.adjust_sequences(n int, me int) RETURNS int
LANGUAGE plpgsql AS $fn$
DECLARE
    r record;
    nxt bigint;
    cnt int := 0;
BEGIN
    FOR r IN SELECT schemaname, sequencename, last_value, start_value
             FROM pg_sequences
             WHERE increment_by > 0 AND increment_by <> n
               AND schemaname NOT IN ('mm', 'pg_catalog', 'information_schema')
    LOOP
        nxt := CASE WHEN r.last_value IS NULL THEN r.start_value ELSE r.last_value + 1 END;
        nxt := nxt + (((me - nxt) % n) + n) % n;
        EXECUTE format('ALTER SEQUENCE %I.%I INCREMENT BY %s MINVALUE 1 RESTART WITH %s',
                       r.schemaname, r.sequencename, n, nxt);
        cnt := cnt + 1;
    END LOOP;
    RETURN cnt;
END
$fn$;

-- The origin records its own transaction in mm.applied_tx inside it, as
-- appliers and replays do, so mm.applied_tx lists every transaction this
-- database holds and a donor's copy of it tells a resynced node what its
-- copy holds, whatever the origin. SECURITY DEFINER: client sessions run
-- as any user.
CREATE OR REPLACE FUNCTION mm.record_tx(text, bigint) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS $fn$
    INSERT INTO mm.applied_tx (gid, gen) VALUES ($1, $2)
$fn$;
GRANT USAGE ON SCHEMA mm TO PUBLIC;

CREATE UNLOGGED TABLE IF NOT EXISTS mm.status_now (
    singleton bool PRIMARY KEY DEFAULT true CHECK (singleton),
    my_node_id int NOT NULL,
    status text NOT NULL,
    connected int[] NOT NULL,
    gen_num bigint NOT NULL,
    gen_members int[] NOT NULL,
    gen_donors int[] NOT NULL,
    gen_configured int[] NOT NULL,
    in_doubt int NOT NULL,
    updated_at timestamptz NOT NULL
);
ALTER TABLE mm.status_now ADD COLUMN IF NOT EXISTS resync text;
CREATE UNLOGGED TABLE IF NOT EXISTS mm.nodes_now (
    id int PRIMARY KEY,
    conninfo text,
    is_self bool NOT NULL,
    connected bool NOT NULL,
    link bool NOT NULL,
    receiver_ok bool NOT NULL
);

CREATE SCHEMA IF NOT EXISTS mtm;
-- Dropped first: a re-run of `mmctl init` may change its columns.
DROP FUNCTION IF EXISTS mtm.status();
CREATE FUNCTION mtm.status(
    OUT my_node_id int, OUT status text, OUT connected int[], OUT gen_num bigint,
    OUT gen_members int[], OUT gen_members_online int[], OUT gen_configured int[],
    OUT in_doubt int, OUT reported_at timestamptz, OUT resync text)
RETURNS SETOF record LANGUAGE sql STABLE AS $fn$
    SELECT s.my_node_id,
           CASE WHEN s.updated_at < now() - interval '5 seconds'
                THEN 'disabled (mmd not running)' ELSE s.status END,
           s.connected, s.gen_num, s.gen_members,
           ARRAY(SELECT m FROM unnest(s.gen_members) m WHERE m = ANY (s.connected) ORDER BY m),
           s.gen_configured, s.in_doubt, s.updated_at, s.resync
    FROM mm.status_now s
$fn$;
-- Dropped first: a re-run of `mmctl init` may change its columns.
DROP FUNCTION IF EXISTS mtm.nodes();
CREATE FUNCTION mtm.nodes(
    OUT id int, OUT conninfo text, OUT is_self bool, OUT enabled bool, OUT connected bool,
    OUT link bool, OUT receiver_ok bool, OUT slot_name text, OUT slot_active bool,
    OUT slot_retained_bytes numeric, OUT slot_lag_bytes numeric, OUT slot_wal_status text)
RETURNS SETOF record LANGUAGE sql STABLE AS $fn$
    SELECT n.id, n.conninfo, n.is_self,
           n.is_self OR n.id = ANY (s.gen_members),
           n.connected, n.link, n.receiver_ok,
           r.slot_name::text, r.active,
           pg_wal_lsn_diff(pg_current_wal_lsn(), r.restart_lsn),
           pg_wal_lsn_diff(pg_current_wal_lsn(), r.confirmed_flush_lsn),
           r.wal_status
    FROM mm.nodes_now n
    LEFT JOIN mm.status_now s ON true
    LEFT JOIN pg_replication_slots r ON r.slot_name = 'mm_slot_for_' || n.id
    ORDER BY n.id
$fn$;
"#;
