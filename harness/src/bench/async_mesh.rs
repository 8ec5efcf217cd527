//! Baseline (c): the asynchronous multi-master users build today from native
//! logical replication (seeds 002 and 003): three PostgreSQL 15 nodes, each
//! publishing `mm` and subscribing to both others (`copy_data = false`, the
//! table created on every node first), with last-writer-wins triggers that
//! fire in the apply workers (`ENABLE REPLICA TRIGGER`). The seed's scripts
//! run one per node; afterwards the nodes' `count(*)` and
//! `sum(hashtext(t.id||t.info||t.mod_time))` are polled until they agree.
//!
//! # Why the triggers look like this
//!
//! PostgreSQL 15 has no `origin = none` subscription option: a change a node
//! applies from a peer is decoded again from its WAL and sent to its other
//! peer and back to where it came from. Every applied change echoes around
//! the mesh. So, in the apply workers:
//!
//! - A replicated INSERT may find the row already there (its own echo, or the
//!   same change arriving from both peers); a plain insert would stop the
//!   apply worker on a duplicate key. The trigger turns it into
//!   `INSERT ... ON CONFLICT DO UPDATE ... WHERE` the incoming version is
//!   newer (race-free against another apply worker inserting the same row)
//!   and suppresses the original (a BEFORE trigger returning NULL).
//! - A version is `(mod_time, info)`, compared as a row: newer wins, and an
//!   equal version (an echo) is skipped. Skipping matters: returning NULL from
//!   the BEFORE trigger writes nothing, so nothing is decoded and re-sent and
//!   the echo dies after one hop instead of circling forever.
//! - Deletes: a delete carries only the key, and the insert or update it
//!   removed may come back later as the echo of an older change, re-creating
//!   the row. Without tombstones that echo is applied again, re-published, and
//!   (insert, delete) pairs bounce around the mesh for ever, multiplying; the
//!   nodes never agree and nothing reports it (`MeshOptions::tombstones =
//!   false` shows it; see the test `tombstones_matter`).
//!
//! With tombstones (the default), `mm_tomb(id, del_time)` records deletes:
//! a local delete inserts `(id, clock_timestamp())` before removing the row,
//! and the table is replicated with `mm` (same transaction, so the tombstone
//! reaches a peer just before the delete). Replicated tombstones are merged
//! (duplicates from echoes dropped). Then, with `T` the newest tombstone of
//! the id a node knows:
//!
//! - a replicated insert or update with `mod_time <= T` is dropped (it is
//!   older than the delete); an insert that had to wait for a local delete
//!   of its row looks at the tombstones again after the wait;
//! - a newly learned tombstone deletes the local row at once if the row is
//!   not newer (an echo may carry the tombstone without the delete, so the
//!   delete cannot be left to the replicated DELETE);
//! - a replicated delete removes the local row only if `mod_time <= T`; a
//!   newer row (updated concurrently with the delete, after it in LWW order)
//!   stays, and so does any row when no tombstone is known (a re-assertion,
//!   next);
//! - when a newly learned tombstone is older than the local row, the node
//!   re-asserts the row (deletes and re-inserts it in one transaction),
//!   because a peer that deleted the row has dropped the concurrent UPDATE
//!   (PostgreSQL's apply skips an update whose row is missing) and would
//!   otherwise never get it back; the re-insert reaches it as an INSERT;
//! - a local insert or update that ends up not newer than a tombstone (an
//!   upsert that waited for a concurrent delete of its row, then inserted
//!   with the `now()` of before it) is re-inserted with `clock_timestamp()`,
//!   so peers do not drop it.
//!
//! So a row exists on a node only while it is newer than every tombstone of
//! its id the node knows, and every node ends with the newest version if it
//! is newer than the newest tombstone, else without the row. Each stream
//! carries a node's changes in the order it made or applied them, so an
//! update reaches a node after the row's insert unless a tombstone removed
//! the row there: the one loss the re-assertion repairs.
//!
//! Tombstones are replicated rather than kept per node because the delete
//! itself carries no time: each node must order the same delete against the
//! same concurrent writes, or they settle differently. Every insert (local
//! or applied) and every tombstone merge first takes an advisory lock on the
//! id, so a merge waits for an insert of the same id it cannot see yet
//! instead of missing its row; updates and deletes only touch rows already
//! there, which the merge's `SELECT ... FOR UPDATE` waits for. Locks are
//! taken in one order (advisory lock, `mm` row, tombstone), so apply workers
//! and clients do not deadlock. Tombstones are never collected here (a
//! benchmark run makes tens of thousands).
//!
//! The apply worker runs with an empty `search_path`, so every name in the
//! trigger functions is schema-qualified.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::Path;
use std::time::{Duration, Instant};

use super::{
    count_and_hash_sum, run_seed_scripts, BenchOptions, PgbenchFigures, ScriptFigures, CREATE_MM,
};
use crate::backend::local::{LocalCluster, LocalClusterConfig, LocalNode};
use crate::pg_bin::PgBin;

/// How the mesh is built.
#[derive(Debug, Clone)]
pub struct MeshOptions {
    /// Publication `<name>_pub`, subscriptions and slots `<name>_sub_<i>_<j>`
    /// (node i subscribing to node j, 1-based). Slot names are per server, so
    /// two meshes in different databases of the same servers need two names.
    pub name: String,
    /// Keep and replicate tombstones (the mesh converges); `false` is the
    /// broken variant: last-writer-wins without tombstones.
    pub tombstones: bool,
    /// How long to wait for equal nodes after the load.
    pub convergence_timeout: Duration,
    /// How often to compare them.
    pub poll_interval: Duration,
}

impl Default for MeshOptions {
    fn default() -> Self {
        MeshOptions {
            name: "mm_mesh".into(),
            tombstones: true,
            convergence_timeout: Duration::from_secs(120),
            poll_interval: Duration::from_millis(200),
        }
    }
}

/// The asynchronous baseline's figures.
#[derive(Debug, Clone, Serialize)]
pub struct AsyncMeshResult {
    /// "async-mesh".
    pub baseline: String,
    pub nodes: usize,
    pub seconds: u32,
    pub clients_per_script: u32,
    pub fsync: bool,
    pub tombstones: bool,
    pub figures: PgbenchFigures,
    pub scripts: Vec<ScriptFigures>,
    /// All nodes showed the same row count and hash sum (twice in a row).
    pub converged: bool,
    /// Seconds from the end of the load (the last pgbench exiting) to the
    /// first poll that found the nodes equal; `None` if they never did.
    pub convergence_s: Option<f64>,
    pub convergence_timeout_s: f64,
    /// Per node at the last poll.
    pub rows: Vec<i64>,
    pub hash_sums: Vec<i64>,
    /// `apply_error_count` of the mesh's subscriptions (pg_stat_subscription_stats).
    pub apply_errors: i64,
}

/// Settings the mesh needs on every node, beyond mm's (which already give
/// `wal_level = logical` and enough slots and senders): room for the apply
/// workers of two meshes, and a quick restart of an apply worker after an error.
pub fn mesh_settings() -> Vec<(String, String)> {
    vec![
        ("max_logical_replication_workers".into(), "8".into()),
        ("wal_retrieve_retry_interval".into(), "'1s'".into()),
    ]
}

/// Three nodes, the mesh with tombstones, `secs` seconds of the seed
/// workload (one script per node), then up to 120 s for the nodes to agree.
/// Durable settings (fsync on); the cluster lives in `<work_root>/bench-async-mesh`.
pub async fn run_async_mesh(bin: &PgBin, secs: u32, work_root: &Path) -> Result<AsyncMeshResult> {
    run_async_mesh_with(
        bin,
        &BenchOptions::new(secs, work_root),
        &MeshOptions::default(),
    )
    .await
}

pub async fn run_async_mesh_with(
    bin: &PgBin,
    opts: &BenchOptions,
    mesh: &MeshOptions,
) -> Result<AsyncMeshResult> {
    let mut cfg = LocalClusterConfig::new("bench-async-mesh", 3);
    cfg.work_dir = Some(opts.work_root.join("bench-async-mesh"));
    cfg.fsync = opts.fsync;
    cfg.extra_settings = mesh_settings();
    let cluster = LocalCluster::start(cfg)
        .await
        .context("starting the three nodes")?;
    let nodes = cluster.nodes();
    setup_mesh(nodes, mesh).await?;
    let run = run_seed_scripts(
        bin,
        [&nodes[0], &nodes[1], &nodes[2]],
        opts.seconds,
        opts.clients,
        &cluster.work_dir().join("pgbench"),
    )
    .await?;
    let conv = wait_converged(
        nodes,
        run.ended,
        mesh.convergence_timeout,
        mesh.poll_interval,
    )
    .await?;
    let apply_errors = apply_error_count(nodes, mesh).await?;
    Ok(AsyncMeshResult {
        baseline: "async-mesh".into(),
        nodes: nodes.len(),
        seconds: opts.seconds,
        clients_per_script: opts.clients,
        fsync: opts.fsync,
        tombstones: mesh.tombstones,
        figures: run.figures,
        scripts: run.scripts,
        converged: conv.converged,
        convergence_s: conv.converged.then_some(conv.seconds),
        convergence_timeout_s: mesh.convergence_timeout.as_secs_f64(),
        rows: conv.rows,
        hash_sums: conv.hash_sums,
        apply_errors,
    })
}

/// The table, the trigger functions and the publication, for one node.
pub fn schema_sql(mesh: &MeshOptions) -> String {
    let pub_name = format!("{}_pub", mesh.name);
    if mesh.tombstones {
        format!(
            "{CREATE_MM};\n{LWW_WITH_TOMBSTONES}\n\
             create publication {pub_name} for table public.mm, public.mm_tomb;\n"
        )
    } else {
        format!("{CREATE_MM};\n{LWW_WITHOUT_TOMBSTONES}\ncreate publication {pub_name} for table public.mm;\n")
    }
}

/// Last-writer-wins with tombstones (see the module documentation).
/// Triggers `ENABLE REPLICA` fire only in the apply workers
/// (`session_replication_role = replica`), plain ones only for local writes.
pub const LWW_WITH_TOMBSTONES: &str = r#"
create table public.mm_tomb(id int not null, del_time timestamp not null, primary key (id, del_time));

create function public.mm_tomb_of(p_id int) returns timestamp language sql stable as
$$ select max(del_time) from public.mm_tomb where id = p_id $$;

-- Apply workers, BEFORE INSERT OR UPDATE on mm.
create function public.mm_apply_write() returns trigger language plpgsql as $$
declare
  t timestamp;
  n bigint;
begin
  if pg_trigger_depth() > 1 then
    return new;                       -- our own nested write (below)
  end if;
  if tg_op = 'INSERT' then
    -- Serializes with mm_tomb_merge on this id: a tombstone merged while
    -- this insert is uncommitted could not see (and delete) its row.
    perform pg_advisory_xact_lock(7411, new.id);
  end if;
  t := public.mm_tomb_of(new.id);
  if new.mod_time <= t then
    return null;                      -- deleted after this version
  end if;
  if tg_op = 'UPDATE' then
    if (new.mod_time, new.info) > (old.mod_time, old.info) then
      return new;
    end if;
    return null;                      -- older, or the same version echoing back
  end if;
  insert into public.mm as cur values (new.id, new.info, new.mod_time)
    on conflict (id) do update set info = excluded.info, mod_time = excluded.mod_time
    where (cur.mod_time, cur.info) < (excluded.mod_time, excluded.info);
  get diagnostics n = row_count;
  -- The upsert may have waited for a local delete of the row, whose
  -- tombstone was not yet visible above: look again.
  if n = 1 and new.mod_time <= public.mm_tomb_of(new.id) then
    delete from public.mm where id = new.id;
  end if;
  return null;
end $$;

-- Apply workers, BEFORE DELETE on mm.
create function public.mm_apply_delete() returns trigger language plpgsql as $$
begin
  if pg_trigger_depth() > 1 or old.mod_time <= public.mm_tomb_of(old.id) then
    return old;
  end if;
  return null;                        -- newer than every delete we know of
end $$;

-- Apply workers, BEFORE INSERT on mm_tomb: merge a replicated tombstone.
create function public.mm_tomb_merge() returns trigger language plpgsql as $$
declare
  r public.mm%rowtype;
  n bigint;
begin
  if pg_trigger_depth() > 1 then
    return new;
  end if;
  perform pg_advisory_xact_lock(7411, new.id);
  select * into r from public.mm where id = new.id for update;
  insert into public.mm_tomb values (new.id, new.del_time) on conflict do nothing;
  get diagnostics n = row_count;
  if r.id is null then
    return null;
  end if;
  if r.mod_time <= public.mm_tomb_of(new.id) then
    -- Dead under the tombstone: delete it now, whether or not the delete
    -- itself follows in this transaction (an echo may carry only the tombstone).
    delete from public.mm where id = r.id;
  elsif n = 1 then
    -- A new tombstone older than our row: peers that deleted the row dropped
    -- the update that made it (no row to update); send it again as an insert.
    delete from public.mm where id = r.id;
    insert into public.mm values (r.id, r.info, r.mod_time);
  end if;
  return null;
end $$;

-- Local inserts, BEFORE INSERT on mm: a tombstone merged while this insert
-- is uncommitted could not see (and delete) its row; make it wait.
create function public.mm_local_insert() returns trigger language plpgsql as $$
begin
  perform pg_advisory_xact_lock(7411, new.id);
  return new;
end $$;

-- Local deletes, BEFORE DELETE on mm: the tombstone.
create function public.mm_local_delete() returns trigger language plpgsql as $$
begin
  if pg_trigger_depth() = 1 then
    insert into public.mm_tomb values (old.id, clock_timestamp());
  end if;
  return old;
end $$;

-- Local writes, AFTER INSERT OR UPDATE on mm: a version not newer than a
-- tombstone would be dropped by every peer. AFTER, not BEFORE: an upsert
-- that waited for a concurrent delete of its row inserts afterwards with the
-- now() of before the delete. Re-inserted rather than updated, because the
-- peers have no row to update.
create function public.mm_local_write() returns trigger language plpgsql as $$
begin
  if pg_trigger_depth() = 1 and new.mod_time <= public.mm_tomb_of(new.id) then
    delete from public.mm where id = new.id;
    insert into public.mm values (new.id, new.info, clock_timestamp());
  end if;
  return null;
end $$;

create trigger mm_apply_write before insert or update on public.mm
  for each row execute function public.mm_apply_write();
create trigger mm_apply_delete before delete on public.mm
  for each row execute function public.mm_apply_delete();
create trigger mm_tomb_merge before insert on public.mm_tomb
  for each row execute function public.mm_tomb_merge();
alter table public.mm enable replica trigger mm_apply_write;
alter table public.mm enable replica trigger mm_apply_delete;
alter table public.mm_tomb enable replica trigger mm_tomb_merge;
create trigger mm_local_insert before insert on public.mm
  for each row execute function public.mm_local_insert();
create trigger mm_local_delete before delete on public.mm
  for each row execute function public.mm_local_delete();
create trigger mm_local_write after insert or update on public.mm
  for each row execute function public.mm_local_write();
"#;

/// Last-writer-wins on inserts and updates only: deletes are applied as they
/// come, and nothing remembers them.
pub const LWW_WITHOUT_TOMBSTONES: &str = r#"
create function public.mm_apply_write() returns trigger language plpgsql as $$
begin
  if pg_trigger_depth() > 1 then
    return new;
  end if;
  if tg_op = 'UPDATE' then
    if (new.mod_time, new.info) > (old.mod_time, old.info) then
      return new;
    end if;
    return null;
  end if;
  insert into public.mm as cur values (new.id, new.info, new.mod_time)
    on conflict (id) do update set info = excluded.info, mod_time = excluded.mod_time
    where (cur.mod_time, cur.info) < (excluded.mod_time, excluded.info);
  return null;
end $$;

create trigger mm_apply_write before insert or update on public.mm
  for each row execute function public.mm_apply_write();
alter table public.mm enable replica trigger mm_apply_write;
"#;

fn subscription_name(mesh: &MeshOptions, i: usize, j: usize) -> String {
    format!("{}_sub_{}_{}", mesh.name, i + 1, j + 1)
}

/// Creates the schema on every node, then on each node one subscription per
/// peer (`copy_data = false`), and waits until every slot is streaming.
pub async fn setup_mesh(nodes: &[LocalNode], mesh: &MeshOptions) -> Result<()> {
    if nodes.len() < 2 {
        bail!("a mesh needs at least two nodes");
    }
    let schema = schema_sql(mesh);
    let mut clients = Vec::new();
    for node in nodes {
        let c = node.connect().await?;
        c.batch_execute(&schema)
            .await
            .with_context(|| format!("creating mm and its triggers on {}", node.name()))?;
        clients.push(c);
    }
    for (i, c) in clients.iter().enumerate() {
        for (j, peer) in nodes.iter().enumerate() {
            if i == j {
                continue;
            }
            let sql = format!(
                "create subscription {} connection '{}' publication {}_pub with (copy_data = false)",
                subscription_name(mesh, i, j),
                peer.conninfo().replace('\'', "''"),
                mesh.name
            );
            c.batch_execute(&sql)
                .await
                .with_context(|| format!("{}: subscribing to {}", nodes[i].name(), peer.name()))?;
        }
    }
    // The launcher starts apply workers a moment later; changes committed
    // before that are kept by the slots anyway, but the load should not start
    // before the mesh does.
    let prefix = format!("{}_sub_", mesh.name);
    let deadline = Instant::now() + Duration::from_secs(60);
    for (i, c) in clients.iter().enumerate() {
        loop {
            let active: i64 = c
                .query_one(
                    "select count(*) from pg_replication_slots where starts_with(slot_name::text, $1) and active",
                    &[&prefix],
                )
                .await?
                .get(0);
            if active as usize >= nodes.len() - 1 {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{}: only {active} of {} subscriber slots active after 60 s",
                    nodes[i].name(),
                    nodes.len() - 1
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Whether the nodes agreed, and when.
#[derive(Debug, Clone)]
pub struct Convergence {
    pub converged: bool,
    /// Seconds from `since` to the first poll that found them equal (or to
    /// the last poll when they never were).
    pub seconds: f64,
    pub rows: Vec<i64>,
    pub hash_sums: Vec<i64>,
}

/// Polls every node's row count and hash sum every `interval` until all are
/// equal at two consecutive polls (the time reported is the first of the
/// two) or `timeout` passes.
pub async fn wait_converged(
    nodes: &[LocalNode],
    since: Instant,
    timeout: Duration,
    interval: Duration,
) -> Result<Convergence> {
    let mut clients = Vec::new();
    for n in nodes {
        clients.push(n.connect().await?);
    }
    let deadline = since + timeout;
    let mut first_equal: Option<(Instant, Vec<(i64, i64)>)> = None;
    loop {
        let polled = Instant::now();
        let mut seen = Vec::new();
        for c in &clients {
            seen.push(count_and_hash_sum(c).await?);
        }
        let equal = seen.windows(2).all(|w| w[0] == w[1]);
        match (&first_equal, equal) {
            (Some((at, before)), true) if *before == seen => {
                return Ok(convergence(true, *at - since, seen));
            }
            (_, true) => first_equal = Some((polled, seen.clone())),
            (_, false) => first_equal = None,
        }
        if Instant::now() > deadline {
            return Ok(convergence(false, polled - since, seen));
        }
        tokio::time::sleep(interval).await;
    }
}

fn convergence(converged: bool, after: Duration, seen: Vec<(i64, i64)>) -> Convergence {
    Convergence {
        converged,
        seconds: after.as_secs_f64(),
        rows: seen.iter().map(|s| s.0).collect(),
        hash_sums: seen.iter().map(|s| s.1).collect(),
    }
}

/// Sum of `apply_error_count` of the mesh's subscriptions on every node.
pub async fn apply_error_count(nodes: &[LocalNode], mesh: &MeshOptions) -> Result<i64> {
    let prefix = format!("{}_sub_", mesh.name);
    let mut total = 0;
    for n in nodes {
        let c = n.connect().await?;
        let errors: i64 = c
            .query_one(
                "select coalesce(sum(apply_error_count), 0)::bigint from pg_stat_subscription_stats \
                 where starts_with(subname::text, $1)",
                &[&prefix],
            )
            .await?
            .get(0);
        total += errors;
    }
    Ok(total)
}
