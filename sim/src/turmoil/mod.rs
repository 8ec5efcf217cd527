//! T2: the runtime's own node driver (`mm_runtime::driver::Driver`, the one
//! `mmd` runs) and its own TCP mesh, under turmoil's simulated network and
//! clock, with in-memory databases behind the `Storage` trait.
//!
//! One u64 seed derives everything: turmoil's RNG (`rng_seed`), message
//! latencies, the mesh's jitter and nonces (a seeded [`MeshRng`]), the
//! client's choices, and the fault schedule. A run has a safety phase
//! (commits from a client on random nodes; crash-restarts, partitions and
//! held links) and a liveness phase (everything healed, no new work, the
//! cluster must settle); then the checks.
//!
//! Besides the time-based schedule, a seed arms up to four phase targets
//! ([`phases`]): a (protocol phase, fault) pair that fires the first time a
//! node reaches the phase after the load started: crash-restart the node,
//! partition it from its partner in the phase or from everyone, or hold
//! its link to a peer. [`PhaseCoverage`] counts which pairs a sweep fired.
//!
//! The databases are one [`MemCluster`], shared by all hosts: it stands for
//! each node's local PostgreSQL, which outlives a crash of the node's
//! software (a crashed host reloads its durable state and prepared
//! transactions from it when bounced). Its data plane (a local prepare
//! reaches every running peer at once; catch-up copies after a seeded
//! delay, during which the donor's host must stay up, so faults can land
//! mid-stream) crosses hosts outside turmoil's network: acceptable for this
//! tier, which tests the control plane (mesh, handshake, timers,
//! reconnects, the driver's ordering); the data plane's own faults are
//! T1's business.

pub mod phases;
pub mod slot_loss;
pub mod transport;

pub use phases::{Phase, PhaseCoverage, PhaseFault, PhaseFaults, Target};
pub use slot_loss::{Resync, SlotLoss};
pub use transport::{TurmoilListener, TurmoilTransport};

use phases::{Hit, PhaseTap, SharedTap};
use slot_loss::{SharedSlots, Slots};

use crate::fnv::Fnv;
use mm_core::Outcome;
use mm_core::{ClientId, DbCmd, DurableOp, Event, Gid, Input, Mutant, NodeId, NodeSet, NodeStatus};
use mm_runtime::driver::{Driver, DriverHandle};
use mm_runtime::mesh::{Mesh, MeshConfig, MeshOptions, MeshRng};
use mm_runtime::storage::{Loaded, MemCluster, MemStorage, Storage, StorageError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;

/// The mesh port every host listens on.
const PORT: u16 = 7400;
/// Simulated time step.
const TICK: Duration = Duration::from_millis(1);
/// The client starts committing.
const LOAD_START_MS: u64 = 500;
/// Faults start within [FAULTS_START_MS, HEAL_MS).
const FAULTS_START_MS: u64 = 1500;
/// Safety phase ends: every fault healed, crashed hosts restarted, no new work.
const HEAL_MS: u64 = 7000;
/// The cluster must settle within this after healing.
const SETTLE_BOUND_MS: u64 = 15_000;
/// A client request with no answer within this counts as unknown.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// At most this many client requests in flight.
const MAX_IN_FLIGHT: u32 = 4;

/// What to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TurmoilOptions {
    pub seed: u64,
    pub nodes: usize,
    /// A deliberately broken protocol variant (mm-core's `mutants`).
    pub mutant: Option<Mutant>,
    /// A deliberately broken storage: node 2 turns the first commit of a
    /// transaction it did not originate into a rollback, yet the protocol
    /// goes on as if it had committed. The checks must catch it.
    pub lossy_storage: bool,
    /// Phase-targeted faults on top of the time-based schedule.
    pub phase_faults: PhaseFaults,
    /// Whether crashes lose the crashed node's replication slots.
    pub slot_loss: SlotLoss,
    /// A deliberately broken resync: its copy misses the donor's oldest
    /// commit. The checks must catch it.
    pub broken_resync: bool,
    /// Leave out mmd's silence of a `recovery` member that needs a resync
    /// (to show what it is for: such a member then stays one).
    pub no_silence: bool,
}

impl TurmoilOptions {
    pub fn new(seed: u64, nodes: usize) -> TurmoilOptions {
        TurmoilOptions {
            seed,
            nodes,
            mutant: None,
            lossy_storage: false,
            phase_faults: PhaseFaults::Random,
            slot_loss: SlotLoss::Seeded,
            broken_resync: false,
            no_silence: false,
        }
    }

    /// The command line that runs exactly this.
    pub fn repro(&self) -> String {
        let mut s = turmoil_repro_line(self.seed, self.nodes);
        if let Some(m) = self.mutant {
            s.push_str(&format!(" --mutant {}", m.name()));
        }
        if self.lossy_storage {
            s.push_str(" --lossy-storage");
        }
        if self.phase_faults != PhaseFaults::Random {
            s.push_str(&format!(" --phase-faults {}", self.phase_faults));
        }
        if self.slot_loss != SlotLoss::Seeded {
            s.push_str(&format!(" --slot-loss {}", self.slot_loss));
        }
        if self.broken_resync {
            s.push_str(" --broken-resync");
        }
        if self.no_silence {
            s.push_str(" --no-silence");
        }
        s
    }
}

/// The outcome of one seed.
#[derive(Clone, Debug)]
pub struct TurmoilReport {
    pub seed: u64,
    pub nodes: usize,
    pub violations: Vec<String>,
    /// Client requests answered Committed / Aborted / Refused, and those
    /// with no answer (node crashed, or no reply within the client timeout).
    pub committed: u64,
    pub aborted: u64,
    pub refused: u64,
    pub unknown: u64,
    /// The fault schedule, one line per action (targets' included).
    pub faults: Vec<String>,
    /// The phase targets the seed armed.
    pub targets: Vec<Target>,
    /// The targets that fired, in firing order.
    pub phase_hits: Vec<(Phase, PhaseFault)>,
    /// How often each phase was reached while targets could fire.
    pub phases_reached: BTreeMap<Phase, u64>,
    /// Catch-up streams take a delay uniform in [0, this].
    pub stream_delay_max_ms: u64,
    /// Catch-up streams donors started, and those that never landed (a
    /// crash of the donor's host dropped them, or the run ended first).
    pub streams_started: u64,
    pub streams_dropped: u64,
    /// Whether this run's crashes lost slots, and the resyncs that followed.
    pub slot_loss_on: bool,
    pub resyncs: Vec<Resync>,
    /// Times a `recovery` member with lost slots went silent to be voted out.
    pub silences: u64,
    pub options: TurmoilOptions,
    /// Simulated time from healing to settled; None if it never settled.
    pub settled_after_ms: Option<u64>,
    /// Simulated time of the whole run.
    pub sim_ms: u64,
    /// Committed transactions on node 1 at the end.
    pub committed_txs: usize,
    /// FNV-1a over the event log: faults applied, client outcomes (with
    /// simulated times), every node's final commit order.
    pub event_hash: u64,
}

impl TurmoilReport {
    /// What a failing seed prints: its violations, its faults, the repro.
    pub fn failure(&self) -> String {
        format!(
            "seed {} ({} nodes) failed:\n  {}\nfaults:\n  {}\nrepro: {}",
            self.seed,
            self.nodes,
            self.violations.join("\n  "),
            self.faults.join("\n  "),
            self.repro()
        )
    }

    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }
    /// The one-line command that replays this run.
    pub fn repro(&self) -> String {
        self.options.repro()
    }
}

pub fn turmoil_repro_line(seed: u64, nodes: usize) -> String {
    format!("cargo run --release -p mm-sim -- turmoil --seeds 1 --start {seed} --nodes {nodes}")
}

/// Run one seed with defaults (no mutant, correct storage).
pub fn run_turmoil_seed(seed: u64, nodes: usize) -> TurmoilReport {
    run_turmoil(&TurmoilOptions::new(seed, nodes))
}

fn host_name(id: NodeId) -> String {
    format!("n{id}")
}

/// The node's configuration: the fast-network timeouts the runtime's tests use.
fn core_config(id: NodeId, n: usize, mutant: Option<Mutant>) -> mm_core::Config {
    let mut c = mm_core::Config::new(id, n).with_fast_timeouts();
    c.mutant = mutant;
    c
}

fn mesh_options(seed: u64, id: NodeId, incarnation: u64) -> MeshOptions {
    MeshOptions {
        handshake_timeout: Duration::from_millis(1000),
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(500),
        ping_interval: Duration::from_millis(100),
        idle_timeout: Duration::from_millis(1000),
        rng: MeshRng::seeded(mix(seed, ((id as u64) << 32) | incarnation)),
        local_tasks: true,
        ..MeshOptions::default()
    }
}

/// splitmix64 of `a ^ rotate(b)`: independent sub-seeds.
fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.rotate_left(29) ^ 0x9e37_79b9_7f4a_7c15;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

// ---------------------------------------------------------------- storage

/// What the checks learn from the storage: which gid each client's commit
/// request became (so an acknowledged commit can be looked up on every node).
#[derive(Default)]
struct Observed {
    client_gid: BTreeMap<ClientId, Gid>,
    /// The lossy variant dropped its commit already (once per run).
    lost: Option<Gid>,
}

/// `MemStorage` with an observer, and optionally the lossy variant. It
/// reports phases to the tap and delays catch-up streams.
struct ObservedStorage {
    id: NodeId,
    inner: MemStorage,
    cluster: MemCluster,
    obs: Arc<Mutex<Observed>>,
    lossy: bool,
    tap: SharedTap,
    slots: SharedSlots,
    broken_resync: bool,
    /// Draws stream delays; seeded per node and incarnation.
    rng: ChaCha8Rng,
    stream_delay_max_ms: u64,
}

impl Storage for ObservedStorage {
    async fn load(&mut self) -> Result<Loaded, StorageError> {
        self.inner.load().await
    }

    async fn persist(&mut self, op: &DurableOp) -> Result<(), StorageError> {
        self.inner.persist(op).await?;
        let halt = self.tap.lock().expect("lock").on_persist(self.id, op);
        if halt {
            // A crash target fired on this write: the main loop crashes the
            // host after this step; until then nothing more leaves the node.
            std::future::pending::<()>().await;
        }
        Ok(())
    }

    fn execute(&mut self, cmd: DbCmd, results: &UnboundedSender<Input>) {
        let mut cmd = cmd;
        self.tap.lock().expect("lock").on_db_cmd(self.id, &cmd);
        if let DbCmd::StreamCatchup { to, upto_gen, .. } = cmd {
            self.tap.lock().expect("lock").streams_started += 1;
            let delay = self.rng.gen_range(0..=self.stream_delay_max_ms);
            let lost = |slots: &SharedSlots| slots.lock().expect("lock").is_lost(self.id, to);
            if delay > 0 || lost(&self.slots) {
                // The stream lands at once after the delay, if this host is
                // still up (a crash drops the task, as it would the walsender).
                let (cluster, id, results) = (self.cluster.clone(), self.id, results.clone());
                let (tap, slots, broken) =
                    (self.tap.clone(), self.slots.clone(), self.broken_resync);
                // On the host's LocalSet: a crash drops it in spawn order
                // (see MeshOptions::local_tasks).
                tokio::task::spawn_local(async move {
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                    if !slot_loss::resync(&cluster, &slots, (to, id), upto_gen, broken).await {
                        cluster.storage(id, results.clone()).execute(cmd, &results);
                    }
                    tap.lock().expect("lock").streams_landed += 1;
                });
                return;
            }
            self.tap.lock().expect("lock").streams_landed += 1;
        }
        {
            let mut o = self.obs.lock().expect("lock");
            match cmd {
                DbCmd::PrepareLocal { client, gid } => {
                    o.client_gid.insert(client, gid);
                }
                DbCmd::CommitPrepared { gid }
                    if self.lossy && self.id == 2 && gid.origin != 2 && o.lost.is_none() =>
                {
                    o.lost = Some(gid);
                    cmd = DbCmd::RollbackPrepared { gid };
                }
                _ => {}
            }
        }
        self.inner.execute(cmd, results);
    }
}

// ---------------------------------------------------------------- faults

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Crash(NodeId),
    Bounce(NodeId),
    Partition(NodeId, NodeId),
    Repair(NodeId, NodeId),
    Hold(NodeId, NodeId),
    Release(NodeId, NodeId),
    /// The node's slots on every peer are invalidated (it stayed away
    /// longer than they keep WAL for it); skipped unless the others
    /// committed without it.
    LoseSlots(NodeId),
}

#[derive(Clone, Copy, Debug)]
struct Scheduled {
    at_ms: u64,
    action: Action,
}

fn pair(rng: &mut ChaCha8Rng, n: usize) -> (NodeId, NodeId) {
    let a = rng.gen_range(1..=n as NodeId);
    let mut b = rng.gen_range(1..n as NodeId);
    if b >= a {
        b += 1;
    }
    (a, b)
}

/// The seed's fault schedule, in the safety phase, sorted by time.
fn schedule(rng: &mut ChaCha8Rng, n: usize) -> Vec<Scheduled> {
    let mut out = Vec::new();
    let count = rng.gen_range(1..=5);
    for _ in 0..count {
        let start = rng.gen_range(FAULTS_START_MS..HEAL_MS - 200);
        let end = (start + rng.gen_range(200..=2500)).min(HEAL_MS - 1);
        let mut push = |at_ms, action| out.push(Scheduled { at_ms, action });
        match rng.gen_range(0..4) {
            0 => {
                let x = rng.gen_range(1..=n as NodeId);
                push(start, Action::Crash(x));
                push(end, Action::Bounce(x));
            }
            1 => {
                let (a, b) = pair(rng, n);
                push(start, Action::Partition(a, b));
                push(end, Action::Repair(a, b));
            }
            2 => {
                // Isolate one node from every other.
                let x = rng.gen_range(1..=n as NodeId);
                for y in (1..=n as NodeId).filter(|&y| y != x) {
                    push(start, Action::Partition(x, y));
                    push(end, Action::Repair(x, y));
                }
            }
            _ => {
                let (a, b) = pair(rng, n);
                push(start, Action::Hold(a, b));
                push(end, Action::Release(a, b));
            }
        }
    }
    out.sort_by_key(|s| s.at_ms); // stable: ties keep generation order
    out
}

/// The seed's phase targets: for `Random`, none in one seed of eight, else
/// one to four, of distinct phases and distinct faults.
fn arm_targets(rng: &mut ChaCha8Rng, mode: PhaseFaults) -> Vec<Target> {
    fn draw(rng: &mut ChaCha8Rng, (phase, fault): (Phase, PhaseFault)) -> Target {
        Target {
            phase,
            fault,
            duration_ms: match fault {
                PhaseFault::Crash => rng.gen_range(50..=1500),
                _ => rng.gen_range(100..=2000),
            },
            peer_pick: rng.gen(),
        }
    }
    match mode {
        PhaseFaults::Off => Vec::new(),
        PhaseFaults::Forced(p, x) => vec![draw(rng, (p, x))],
        PhaseFaults::Random => {
            // Distinct phases and distinct faults, so a sweep spreads evenly.
            let mut phases = Phase::ALL.to_vec();
            let mut faults = PhaseFault::ALL.to_vec();
            let k = [0, 1, 2, 2, 3, 3, 4, 4][rng.gen_range(0..8)];
            let mut out = Vec::new();
            for _ in 0..k {
                let p = phases.remove(rng.gen_range(0..phases.len()));
                let x = faults.remove(rng.gen_range(0..faults.len()));
                out.push((p, x));
            }
            out.into_iter().map(|px| draw(rng, px)).collect()
        }
    }
}

/// What a fired target does, from `now`: the fault, then its end.
fn target_actions(t: &Target, hit: &Hit, n: usize, now: u64) -> Vec<(u64, Action)> {
    let x = hit.node;
    let others: Vec<NodeId> = (1..=n as NodeId).filter(|&y| y != x).collect();
    let peer = hit
        .partner
        .filter(|p| *p != x)
        .unwrap_or(others[t.peer_pick as usize % others.len()]);
    let end = (now + t.duration_ms).min(HEAL_MS - 1).max(now + 1);
    match t.fault {
        PhaseFault::Crash => vec![(now, Action::Crash(x)), (end, Action::Bounce(x))],
        PhaseFault::PartitionOne => vec![
            (now, Action::Partition(x, peer)),
            (end, Action::Repair(x, peer)),
        ],
        PhaseFault::PartitionAll => others
            .iter()
            .map(|&y| (now, Action::Partition(x, y)))
            .chain(others.iter().map(|&y| (end, Action::Repair(x, y))))
            .collect(),
        PhaseFault::Hold => vec![
            (now, Action::Hold(x, peer)),
            (end, Action::Release(x, peer)),
        ],
    }
}

fn apply(
    sim: &mut ::turmoil::Sim<'_>,
    (slots, cluster): (&SharedSlots, &MemCluster),
    n: usize,
    a: Action,
) -> bool {
    match a {
        Action::Crash(x) => {
            if !sim.is_host_running(host_name(x)) {
                return false;
            }
            sim.crash(host_name(x));
        }
        Action::Bounce(x) => {
            if sim.is_host_running(host_name(x)) {
                return false;
            }
            sim.bounce(host_name(x));
        }
        Action::Partition(a, b) => sim.partition(host_name(a), host_name(b)),
        Action::Repair(a, b) => sim.repair(host_name(a), host_name(b)),
        Action::Hold(a, b) => sim.hold(host_name(a), host_name(b)),
        Action::Release(a, b) => sim.release(host_name(a), host_name(b)),
        Action::LoseSlots(x) => return slots.lock().expect("lock").lose(cluster, x, n),
    }
    true
}

// ---------------------------------------------------------------- panics

thread_local! {
    static PANICS: Cell<u64> = const { Cell::new(0) };
}

/// Counts panics per thread (a seed runs on one thread), including those
/// tokio catches in spawned tasks, then defers to the previous hook.
fn install_panic_counter() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.with(|p| p.set(p.get() + 1));
            prev(info);
        }));
    });
}

// ---------------------------------------------------------------- nodes

type Registry = Rc<RefCell<BTreeMap<NodeId, DriverHandle>>>;

struct NodeCtx {
    id: NodeId,
    n: usize,
    seed: u64,
    incarnation: u64,
    mutant: Option<Mutant>,
    lossy: bool,
    cluster: MemCluster,
    obs: Arc<Mutex<Observed>>,
    registry: Registry,
    tap: SharedTap,
    slots: SharedSlots,
    broken_resync: bool,
    silence: bool,
    stream_delay_max_ms: u64,
}

/// One host's software: the mesh and the driver, exactly as `mmd` wires
/// them, over turmoil's network. Restarted from scratch by `bounce`.
async fn run_node(c: NodeCtx) -> ::turmoil::Result {
    let peers: BTreeMap<NodeId, SocketAddr> = (1..=c.n as NodeId)
        .filter(|&p| p != c.id)
        .map(|p| (p, SocketAddr::new(::turmoil::lookup(host_name(p)), PORT)))
        .collect();
    let cfg = MeshConfig {
        cluster_id: "turmoil".into(),
        node_id: c.id,
        listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), PORT),
        peers,
        secret: b"turmoil secret".to_vec(),
    };
    let opts = mesh_options(c.seed, c.id, c.incarnation);
    let (mesh, inbox) = Mesh::start_with(cfg, opts, TurmoilTransport).await?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let storage = ObservedStorage {
        id: c.id,
        inner: c.cluster.storage(c.id, tx.clone()),
        cluster: c.cluster.clone(),
        obs: c.obs,
        lossy: c.lossy,
        tap: c.tap.clone(),
        slots: c.slots.clone(),
        broken_resync: c.broken_resync,
        rng: ChaCha8Rng::seed_from_u64(mix(c.seed ^ 0x57ea, ((c.id as u64) << 32) | c.incarnation)),
        stream_delay_max_ms: c.stream_delay_max_ms,
    };
    let cfg = core_config(c.id, c.n, c.mutant);
    let (driver, handle) = Driver::start(cfg, storage, mesh, inbox, (tx, rx)).await?;
    let tap = c.tap;
    let driver = driver.on_event(move |node, e| {
        if let Event::CatchupStarted { donor, .. } = e {
            tap.lock()
                .expect("lock")
                .observe(Phase::CatchupJoiner, node, Some(*donor));
        }
    });
    c.slots.lock().expect("lock").started(c.id, handle.clone());
    let silence = slot_loss::silence_while_stuck(c.slots.clone(), c.id, handle.clone(), c.silence);
    c.registry.borrow_mut().insert(c.id, handle);
    // In this future, not a task of its own: the run stays one seed's
    // alone when seeds run on parallel threads (with a spawned task,
    // `same_seed_same_run` differed when run beside other tests).
    tokio::select! {
        biased;
        r = driver.run() => r?,
        _ = silence => {}
    }
    Ok(())
}

// ---------------------------------------------------------------- client

#[derive(Default)]
struct ClientLog {
    /// (simulated ms, client, node, outcome; None = no answer)
    outcomes: Vec<(u64, ClientId, NodeId, Option<Outcome>)>,
    settled_at_ms: Option<u64>,
    /// Why the cluster was not settled at the last look.
    unsettled: String,
}

fn elapsed_ms(start: tokio::time::Instant) -> u64 {
    start.elapsed().as_millis() as u64
}

/// Whether every node is online in one generation of all nodes with nothing
/// in doubt, and the databases agree with nothing left prepared; if not, why.
async fn settled(registry: &Registry, cluster: &MemCluster, n: usize) -> Result<(), String> {
    let all = NodeSet::first_n(n);
    let mut gen = None;
    for id in 1..=n as NodeId {
        let h = registry.borrow().get(&id).cloned();
        let Some(h) = h else {
            return Err(format!("node {id} never started"));
        };
        let s = tokio::time::timeout(Duration::from_millis(200), h.status()).await;
        let Ok(Some(s)) = s else {
            return Err(format!("node {id} does not answer"));
        };
        if s.status != NodeStatus::Online || s.generation.members != all {
            return Err(format!(
                "node {id} is {:?} in generation {} of {}",
                s.status, s.generation.num, s.generation.members
            ));
        }
        if s.in_doubt > 0 {
            return Err(format!("node {id} has {} in doubt", s.in_doubt));
        }
        match &gen {
            None => gen = Some(s.generation),
            Some(g) if *g != s.generation => {
                return Err(format!(
                    "node {id} in generation {}, node 1 in {}",
                    s.generation.num, g.num
                ))
            }
            Some(_) => {}
        }
    }
    let first: BTreeSet<Gid> = cluster.db(1).committed.into_iter().collect();
    for id in 1..=n as NodeId {
        let db = cluster.db(id);
        if !db.prepared.is_empty() {
            return Err(format!("node {id} holds {} prepared", db.prepared.len()));
        }
        if db.committed.iter().copied().collect::<BTreeSet<_>>() != first {
            return Err(format!("node {id} committed set differs from node 1's"));
        }
    }
    Ok(())
}

struct ClientCtx {
    seed: u64,
    n: usize,
    cluster: MemCluster,
    registry: Registry,
    log: Rc<RefCell<ClientLog>>,
}

async fn run_client(c: ClientCtx) -> ::turmoil::Result {
    let start = tokio::time::Instant::now();
    let mut rng = ChaCha8Rng::seed_from_u64(mix(c.seed, 0xc11e));
    let in_flight = Rc::new(Cell::new(0u32));
    let mut next_client = 1u64;
    tokio::time::sleep(Duration::from_millis(LOAD_START_MS)).await;
    while elapsed_ms(start) < HEAL_MS {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(5..=40))).await;
        if in_flight.get() >= MAX_IN_FLIGHT {
            continue;
        }
        let node = rng.gen_range(1..=c.n as NodeId);
        let client = ClientId(next_client);
        next_client += 1;
        let h = c.registry.borrow().get(&node).cloned();
        let (log, in_flight) = (c.log.clone(), in_flight.clone());
        in_flight.set(in_flight.get() + 1);
        tokio::task::spawn_local(async move {
            let r = match h {
                None => None,
                Some(h) => tokio::time::timeout(CLIENT_TIMEOUT, h.commit(client, true))
                    .await
                    .ok()
                    .flatten(),
            };
            let at = elapsed_ms(start);
            log.borrow_mut().outcomes.push((at, client, node, r));
            in_flight.set(in_flight.get() - 1);
        });
    }
    // Liveness: no new work; wait for the answers and for the cluster to settle.
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = elapsed_ms(start);
        if in_flight.get() == 0 {
            match settled(&c.registry, &c.cluster, c.n).await {
                Ok(()) => {
                    c.log.borrow_mut().settled_at_ms = Some(elapsed_ms(start));
                    break;
                }
                Err(why) => c.log.borrow_mut().unsettled = why,
            }
        } else {
            c.log.borrow_mut().unsettled =
                format!("{} client requests unanswered", in_flight.get());
        }
        if now > HEAL_MS + SETTLE_BOUND_MS {
            break;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- run

/// Run one seed through both phases and check the result.
pub fn run_turmoil(opts: &TurmoilOptions) -> TurmoilReport {
    install_panic_counter();
    let panics_before = PANICS.with(|p| p.get());
    let (seed, n) = (opts.seed, opts.nodes);
    let mut rng = ChaCha8Rng::seed_from_u64(mix(seed, 0xfa17));
    let max_latency = [1u64, 5, 20, 50][rng.gen_range(0..4)];
    let plan = schedule(&mut rng, n);
    let mut trng = ChaCha8Rng::seed_from_u64(mix(seed, 0x7a26_0000 + n as u64));
    let stream_delay_max_ms = [0u64, 50, 300, 1000][trng.gen_range(0..4)];
    let targets = arm_targets(&mut trng, opts.phase_faults);
    // A stream of its own, so the schedules above stay as they were.
    let slot_loss_on = opts
        .slot_loss
        .on(ChaCha8Rng::seed_from_u64(mix(seed, 0x5107)).gen_range(0..3));
    let slots: SharedSlots = Arc::new(Mutex::new(Slots::default()));
    let tap: SharedTap = Arc::new(Mutex::new(PhaseTap {
        armed: targets.iter().map(|t| (t.phase, t.fault)).collect(),
        ..PhaseTap::default()
    }));

    let mut sim = ::turmoil::Builder::new()
        .rng_seed(seed)
        .simulation_duration(Duration::from_millis(HEAL_MS + SETTLE_BOUND_MS + 10_000))
        .tick_duration(TICK)
        .min_message_latency(Duration::ZERO)
        .max_message_latency(Duration::from_millis(max_latency))
        .build();

    let cluster = MemCluster::new(n);
    let registry: Registry = Rc::new(RefCell::new(BTreeMap::new()));
    let obs = Arc::new(Mutex::new(Observed::default()));
    for id in 1..=n as NodeId {
        let (cluster, registry, obs, tap, slots) = (
            cluster.clone(),
            registry.clone(),
            obs.clone(),
            tap.clone(),
            slots.clone(),
        );
        let (mutant, lossy, broken_resync) = (opts.mutant, opts.lossy_storage, opts.broken_resync);
        let silence = !opts.no_silence;
        let boots = Cell::new(0u64);
        sim.host(host_name(id), move || {
            let incarnation = boots.get();
            boots.set(incarnation + 1);
            run_node(NodeCtx {
                id,
                n,
                seed,
                incarnation,
                mutant,
                lossy,
                cluster: cluster.clone(),
                obs: obs.clone(),
                registry: registry.clone(),
                tap: tap.clone(),
                slots: slots.clone(),
                broken_resync,
                silence,
                stream_delay_max_ms,
            })
        });
    }
    let log = Rc::new(RefCell::new(ClientLog::default()));
    sim.client(
        "client",
        run_client(ClientCtx {
            seed,
            n,
            cluster: cluster.clone(),
            registry: registry.clone(),
            log: log.clone(),
        }),
    );

    let mut violations = Vec::new();
    let mut faults = vec![format!(
        "max message latency {max_latency}ms; catch-up stream delay up to {stream_delay_max_ms}ms{}",
        if slot_loss_on { "; a node back from a crash finds its slots lost" } else { "" }
    )];
    for t in &targets {
        faults.push(format!(
            "armed: {}:{} for {}ms",
            t.phase, t.fault, t.duration_ms
        ));
    }
    let mut hash = Fnv::new();
    hash.u64(max_latency);
    for line in &faults {
        hash.bytes(line.as_bytes());
    }
    // (time, order) -> action: the schedule, then targets' actions as they fire.
    let mut queue: BTreeMap<(u64, u64), Action> = plan
        .iter()
        .enumerate()
        .map(|(i, s)| ((s.at_ms, i as u64), s.action))
        .collect();
    let mut order = queue.len() as u64;
    let mut phase_hits = Vec::new();
    let mut healed = false;
    loop {
        let now = sim.elapsed().as_millis() as u64;
        let hits = {
            let mut t = tap.lock().expect("lock");
            t.active = (LOAD_START_MS..HEAL_MS - 100).contains(&now);
            std::mem::take(&mut t.hits)
        };
        for hit in hits {
            let Some(t) = targets.iter().find(|t| t.phase == hit.phase) else {
                continue;
            };
            let line = format!(
                "{now}ms target {}:{} fired on node {}{}",
                t.phase,
                t.fault,
                hit.node,
                hit.partner
                    .map_or(String::new(), |p| format!(" (partner {p})"))
            );
            hash.bytes(line.as_bytes());
            faults.push(line);
            phase_hits.push((t.phase, t.fault));
            for (at, a) in target_actions(t, &hit, n, now) {
                queue.insert((at, order), a);
                order += 1;
            }
        }
        while let Some(entry) = queue.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let a = entry.remove();
            let done = apply(&mut sim, (&slots, &cluster), n, a);
            let line = format!("{}ms {:?}{}", now, a, if done { "" } else { " (skipped)" });
            hash.bytes(line.as_bytes());
            faults.push(line);
            if let (Action::Bounce(x), true, true) = (a, done, slot_loss_on) {
                queue.insert((now, order), Action::LoseSlots(x));
                order += 1;
            }
        }
        slots.lock().expect("lock").repair_online();
        if !healed && now >= HEAL_MS {
            healed = true;
            for a in 1..=n as NodeId {
                for b in a + 1..=n as NodeId {
                    sim.repair(host_name(a), host_name(b));
                    sim.release(host_name(a), host_name(b));
                }
                if !sim.is_host_running(host_name(a)) {
                    sim.bounce(host_name(a));
                    faults.push(format!("{now}ms heal: Bounce({a})"));
                    if slot_loss_on {
                        let done = apply(&mut sim, (&slots, &cluster), n, Action::LoseSlots(a));
                        let skipped = if done { "" } else { " (skipped)" };
                        faults.push(format!("{now}ms heal: LoseSlots({a}){skipped}"));
                    }
                }
            }
            faults.push(format!("{now}ms heal: all links repaired and released"));
        }
        match sim.step() {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => {
                violations.push(format!("simulation failed: {e}"));
                break;
            }
        }
    }
    let sim_ms = sim.elapsed().as_millis() as u64;
    drop(sim); // stops every host; the databases stay for the checks
    let (phases_reached, streams_started, streams_dropped) = {
        let mut t = tap.lock().expect("lock");
        let dropped = t.streams_started - t.streams_landed;
        (std::mem::take(&mut t.reached), t.streams_started, dropped)
    };
    for t in &targets {
        if !phase_hits.iter().any(|(p, _)| *p == t.phase) {
            faults.push(format!("target {}:{} never fired", t.phase, t.fault));
        }
    }

    let (resyncs, silences) = {
        let mut s = slots.lock().expect("lock");
        (std::mem::take(&mut s.resyncs), s.silences)
    };
    hash.u64(silences);
    for r in &resyncs {
        hash.bytes(format!("{r:?}").as_bytes());
    }
    let log = std::mem::take(&mut *log.borrow_mut());
    let obs = std::mem::take(&mut *obs.lock().expect("lock"));
    let (mut committed, mut aborted, mut refused, mut unknown) = (0, 0, 0, 0);
    for (at, client, node, r) in &log.outcomes {
        match r {
            Some(Outcome::Committed) => committed += 1,
            Some(Outcome::Aborted(_)) => aborted += 1,
            Some(Outcome::Refused(_)) => refused += 1,
            None => unknown += 1,
        }
        hash.bytes(format!("{at} {} {node} {r:?}", client.0).as_bytes());
    }

    // Liveness.
    let settled_after_ms = log.settled_at_ms.map(|t| t.saturating_sub(HEAL_MS));
    if settled_after_ms.is_none() {
        violations.push(format!(
            "liveness: not settled {}ms after healing: {}",
            SETTLE_BOUND_MS, log.unsettled
        ));
    }
    // No panics anywhere (tokio catches those in spawned tasks; the hook counts them).
    let panics = PANICS.with(|p| p.get()) - panics_before;
    if panics > 0 {
        violations.push(format!("{panics} panics"));
    }
    let dbs: Vec<_> = (1..=n as NodeId).map(|id| (id, cluster.db(id))).collect();
    let sets: Vec<BTreeSet<Gid>> = dbs
        .iter()
        .map(|(_, db)| db.committed.iter().copied().collect())
        .collect();
    for (id, db) in &dbs {
        hash.u64(*id as u64);
        for g in &db.committed {
            hash.bytes(g.to_string().as_bytes());
        }
        // No prepared transaction left.
        if let Some(g) = db.prepared.iter().next() {
            violations.push(format!(
                "leftover prepared: node {id} still holds {} prepared (first {g})",
                db.prepared.len()
            ));
        }
        if sets[*id as usize - 1].len() != db.committed.len() {
            violations.push(format!("node {id} committed a gid twice"));
        }
    }
    // Atomicity: one outcome per gid on every node.
    let union: BTreeSet<Gid> = sets.iter().flatten().copied().collect();
    for g in &union {
        let missing: Vec<NodeId> = (1..=n as NodeId)
            .filter(|id| !sets[*id as usize - 1].contains(g))
            .collect();
        if !missing.is_empty() {
            violations.push(format!(
                "atomicity: {g} committed on some nodes but not on {missing:?}"
            ));
        }
    }
    // Durability: every commit acknowledged to the client is on every node.
    for (_, client, node, r) in &log.outcomes {
        if *r != Some(Outcome::Committed) {
            continue;
        }
        match obs.client_gid.get(client) {
            None => violations.push(format!(
                "durability: client {} was told Committed by node {node} but never prepared",
                client.0
            )),
            Some(g) => {
                let missing: Vec<NodeId> = (1..=n as NodeId)
                    .filter(|id| !sets[*id as usize - 1].contains(g))
                    .collect();
                if !missing.is_empty() {
                    violations.push(format!(
                        "durability: {g} acknowledged to client {} by node {node} but missing on {missing:?}",
                        client.0
                    ));
                }
            }
        }
    }
    TurmoilReport {
        seed,
        nodes: n,
        violations,
        committed,
        aborted,
        refused,
        unknown,
        faults,
        settled_after_ms,
        sim_ms,
        committed_txs: sets[0].len(),
        event_hash: hash.finish(),
        targets,
        phase_hits,
        phases_reached,
        stream_delay_max_ms,
        streams_started,
        streams_dropped,
        slot_loss_on,
        resyncs,
        silences,
        options: opts.clone(),
    }
}
