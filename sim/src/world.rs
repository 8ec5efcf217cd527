//! The discrete-event world: virtual time, one event queue, and the nodes'
//! drivers. Events are ordered by (time, seq) with a monotonically
//! increasing seq, so equal-time events run in the order they were
//! scheduled and a seed always replays the same way.

use crate::checkers::{self, atomicity::Atomicity, majority::Majority, Violation};
use crate::coverage::{Coverage, Path};
use crate::data_plane::{DataItem, DataPlane};
use crate::db_model::{Db, Table, Write, Writes};
use crate::faults::{fmt_t, FaultAction, FaultKind};
use crate::net::{Fate, Net};
use crate::params::{rng_for, stream, Params};
use crate::time_util::{Clock, VTime, MS};
use crate::workload::{self, Client, ClientKind, ClientState};
use mm_core::{
    AbortReason, ClientId, Config, CoordPhase, DbCmd, DbResult, Event, Gid, Input, Message, Node,
    NodeId, NodeStatus, Outcome, Output, ResolveRule,
};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap};
use std::rc::Rc;

/// A predicate on a node's output, for scripted crash hooks.
pub type OutputPredicate = Rc<dyn Fn(&Output) -> bool>;

#[derive(Clone)]
enum CrashWhen {
    /// After a `Send` of one of these kinds (any if empty).
    SendKinds(Vec<&'static str>),
    /// After any output matching the predicate.
    Matching(OutputPredicate),
}

/// A scripted fault applied the moment a node emits a matching output (one-shot).
struct OutputHook {
    node: NodeId,
    pred: OutputPredicate,
    action: FaultAction,
}

#[derive(Clone)]
struct CrashTrigger {
    when: CrashWhen,
    until: VTime,
    restart_after: Option<VTime>,
}

enum Ev {
    Tick {
        node: NodeId,
        token: u64,
    },
    Msg {
        from: NodeId,
        to: NodeId,
        inc: u32,
        msg: Message,
    },
    DbDone {
        node: NodeId,
        inc: u32,
        cmd: DbCmd,
    },
    Data {
        from: NodeId,
        to: NodeId,
    },
    Client {
        idx: usize,
    },
    Fault(FaultAction),
    /// Restart after a triggered crash (ignored once healed: heal restarts everyone).
    Restart {
        node: NodeId,
    },
    /// A pause ends: release the node's deferred events.
    Resume {
        node: NodeId,
    },
    Heal,
    SettleCheck,
}

struct Entry {
    at: VTime,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    /// Reversed: BinaryHeap is a max-heap, we pop the earliest.
    fn cmp(&self, o: &Self) -> Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

/// One node's machine: the core (None while down), its durable store, its database.
struct Slot {
    node: Option<Node>,
    /// The driver's copy of what the core persisted: what survives a crash.
    durable: mm_core::DurableState,
    db: Db,
    clock: Clock,
    /// Bumped at every crash: stale in-flight work addressed to an older
    /// incarnation is dropped.
    inc: u32,
    paused_until: VTime,
    tick_token: u64,
    tick_at: Option<VTime>,
    db_busy_until: VTime,
    db_inflight: usize,
    /// Delivered remote transactions awaiting the core's apply/discard.
    pending_remote: BTreeMap<Gid, Writes>,
    trigger: Option<CrashTrigger>,
    /// Events that arrived while paused, in arrival order.
    deferred: Vec<Ev>,
    /// The core's lazy records (`Output::Record`) not yet durable: written
    /// before the next Persist or once `LAZY_FLUSH` old, lost in a crash.
    lazy: Vec<mm_core::DurableOp>,
    lazy_since: VTime,
}

/// How long mmd's driver lets lazy records wait for a Persist to ride with.
const LAZY_FLUSH: VTime = 100 * MS;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Safety,
    Liveness { healed_at: VTime },
    Done,
}

/// Counters of a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub committed: u64,
    pub aborted: u64,
    pub refused: u64,
    pub conflicts: u64,
    pub connection_lost: u64,
    pub crashes: u64,
    pub events: u64,
}

pub struct World {
    pub params: Params,
    now: VTime,
    seq: u64,
    queue: BinaryHeap<Entry>,
    slots: Vec<Slot>,
    net: Net,
    data: DataPlane,
    clients: Vec<Client>,
    db_rng: ChaCha8Rng,
    db_error_prepare_p: f64,
    db_error_apply_p: f64,
    phase: Phase,
    stop_clients: bool,
    atomicity: Atomicity,
    read_after: checkers::read_after_commit::ReadAfterCommit,
    majority: Majority,
    acked: Vec<Gid>,
    violations: Vec<Violation>,
    suppressed_violations: usize,
    coverage: Coverage,
    stats: Stats,
    settled_at: Option<VTime>,
    trace: Option<Vec<String>>,
    /// Scripted scenarios only: fault hooks and scripted transactions' writes.
    hooks: Vec<OutputHook>,
    scripted: BTreeMap<ClientId, Vec<Write>>,
}

macro_rules! tr {
    ($w:expr, $node:expr, $($arg:tt)*) => {
        if $w.trace.is_some() {
            let line = format!("{:>14} n{} {}", fmt_t($w.now), $node, format!($($arg)*));
            if let Some(t) = $w.trace.as_mut() {
                t.push(line);
            }
        }
    };
}

const MAX_VIOLATIONS: usize = 50;
const SETTLE_CHECK_EVERY: VTime = 100 * MS;

impl World {
    /// A world at time zero with the seed's clients and fault schedule queued.
    pub fn new(params: Params, trace: bool) -> World {
        let n = params.nodes;
        let slots = (1..=n)
            .map(|id| Slot {
                node: None,
                durable: mm_core::DurableState::bootstrap(mm_core::NodeSet::first_n(n)),
                db: Db::new(),
                clock: params.faults.clocks[id],
                inc: 0,
                paused_until: 0,
                tick_token: 0,
                tick_at: None,
                db_busy_until: 0,
                db_inflight: 0,
                pending_remote: BTreeMap::new(),
                trigger: None,
                deferred: Vec::new(),
                lazy: Vec::new(),
                lazy_since: 0,
            })
            .collect();
        let mut net = Net::new(
            n,
            params.net_latency_us,
            params.net_jitter_us,
            rng_for(params.seed, stream::NET),
        );
        net.faults = params.faults.msg;
        let mut clients = Vec::new();
        for (i, &k) in params.workload.seed_clients_per_node.iter().enumerate() {
            for _ in 0..k {
                clients.push(ClientKind::SeedMix {
                    node: i as NodeId + 1,
                });
            }
        }
        clients.extend(std::iter::repeat_n(
            ClientKind::Bank,
            params.workload.bank_clients,
        ));
        let clients = clients
            .into_iter()
            .enumerate()
            .map(|(i, kind)| Client {
                id: ClientId(i as u64 + 1),
                kind,
                state: ClientState::Idle,
                rng: rng_for(params.seed, stream::CLIENT_BASE + i as u64),
                counter: 0,
            })
            .collect();
        let mut w = World {
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            slots,
            net,
            data: DataPlane::new(n),
            clients,
            db_rng: rng_for(params.seed, stream::DB),
            db_error_prepare_p: params.faults.db_error_prepare_p,
            db_error_apply_p: params.faults.db_error_apply_p,
            phase: Phase::Safety,
            stop_clients: false,
            atomicity: Atomicity::default(),
            read_after: Default::default(),
            majority: Majority::default(),
            acked: Vec::new(),
            violations: Vec::new(),
            suppressed_violations: 0,
            coverage: Coverage::default(),
            stats: Stats::default(),
            settled_at: None,
            trace: if trace { Some(Vec::new()) } else { None },
            hooks: Vec::new(),
            scripted: BTreeMap::new(),
            params,
        };
        for id in 1..=n as NodeId {
            let cfg = w.config(id);
            let node = Node::new(cfg, w.local_now(id));
            w.slot_mut(id).node = Some(node);
            w.drain(id);
        }
        for i in 0..w.clients.len() {
            let at = w.clients[i].rng.gen_range(0..50 * MS);
            w.push(at, Ev::Client { idx: i });
        }
        for f in w.params.faults.schedule.clone() {
            w.push(f.at, Ev::Fault(f.action));
        }
        let safety = w.params.safety;
        w.push(safety, Ev::Heal);
        w
    }

    // ---- public driving API (scripted scenarios) ----

    /// Schedule a fault action at `at`.
    pub fn inject(&mut self, at: VTime, action: FaultAction) {
        self.push(at, Ev::Fault(action));
    }

    /// Crash `node` right after it emits an output matching `pred` (before
    /// `until`), losing the rest of that output batch; restart it
    /// `restart_after` later if given.
    pub fn crash_after_output(
        &mut self,
        node: NodeId,
        until: VTime,
        restart_after: Option<VTime>,
        pred: impl Fn(&Output) -> bool + 'static,
    ) {
        self.slot_mut(node).trigger = Some(CrashTrigger {
            when: CrashWhen::Matching(Rc::new(pred)),
            until,
            restart_after,
        });
    }

    /// Apply `action` the moment `node` emits an output matching `pred`
    /// (right after that output is released, during the safety phase;
    /// one-shot). Several hooks may match the same output: they fire in the
    /// order they were added.
    pub fn on_output(
        &mut self,
        node: NodeId,
        pred: impl Fn(&Output) -> bool + 'static,
        action: FaultAction,
    ) {
        self.hooks.push(OutputHook {
            node,
            pred: Rc::new(pred),
            action,
        });
    }

    /// A one-off client that, at `at`, writes `writes` on `node` in one
    /// transaction and asks to commit it (retrying while the node refuses
    /// work or a row is locked, never after the request was sent). Returns
    /// its client id, as it appears in `reply to client N` trace lines.
    pub fn script_tx(&mut self, at: VTime, node: NodeId, writes: Vec<Write>) -> ClientId {
        let i = self.clients.len();
        let id = ClientId(i as u64 + 1);
        self.clients.push(Client {
            id,
            kind: ClientKind::Scripted { node },
            state: ClientState::Idle,
            rng: rng_for(self.params.seed, stream::CLIENT_BASE + i as u64),
            counter: 0,
        });
        self.scripted.insert(id, writes);
        self.push(at, Ev::Client { idx: i });
        id
    }

    /// Process every event up to and including time `t` (or until done).
    pub fn run_until(&mut self, t: VTime) {
        while self.phase != Phase::Done {
            match self.queue.peek() {
                Some(e) if e.at <= t => {}
                _ => break,
            }
            let e = self.queue.pop().unwrap();
            self.now = e.at;
            self.stats.events += 1;
            self.dispatch(e.ev);
        }
        if self.phase != Phase::Done {
            self.now = self.now.max(t);
        }
    }

    /// Run both phases to the end and report.
    pub fn run(mut self) -> crate::SeedReport {
        self.run_until(VTime::MAX);
        self.finish()
    }

    pub fn now(&self) -> VTime {
        self.now
    }
    pub fn phase(&self) -> Phase {
        self.phase
    }
    pub fn node(&self, id: NodeId) -> Option<&Node> {
        self.slot(id).node.as_ref()
    }
    pub fn db(&self, id: NodeId) -> &Db {
        &self.slot(id).db
    }
    pub fn trace(&self) -> &[String] {
        self.trace.as_deref().unwrap_or(&[])
    }
    pub fn violations(&self) -> &[Violation] {
        &self.violations
    }
    pub fn coverage(&self) -> Coverage {
        self.coverage
    }
    pub fn stats(&self) -> Stats {
        self.stats
    }
    /// Stop starting client transactions (pending ones still complete).
    pub fn stop_clients(&mut self) {
        self.stop_clients = true;
    }

    // ---- internals ----

    fn slot(&self, id: NodeId) -> &Slot {
        &self.slots[id as usize - 1]
    }
    fn slot_mut(&mut self, id: NodeId) -> &mut Slot {
        &mut self.slots[id as usize - 1]
    }
    fn node_ids(&self) -> impl Iterator<Item = NodeId> {
        1..=self.params.nodes as NodeId
    }

    fn config(&self, id: NodeId) -> Config {
        let mut cfg = Config::new(id, self.params.nodes);
        cfg.vote_timeout = mm_core::Time::from_millis(self.params.vote_timeout_ms);
        cfg.mutant = self.params.mutant;
        cfg
    }

    fn local_now(&self, id: NodeId) -> mm_core::Time {
        self.slot(id).clock.local(self.now)
    }

    fn push(&mut self, at: VTime, ev: Ev) {
        self.seq += 1;
        self.queue.push(Entry {
            at,
            seq: self.seq,
            ev,
        });
    }

    fn violation(&mut self, v: Violation) {
        tr!(self, 0, "VIOLATION {v}");
        if self.violations.len() < MAX_VIOLATIONS {
            self.violations.push(v);
        } else {
            self.suppressed_violations += 1;
        }
    }

    /// If `node` is paused, hold the event until it resumes.
    fn deferred_by_pause(&mut self, node: NodeId, ev: Ev) -> Option<Ev> {
        let now = self.now;
        let s = self.slot_mut(node);
        if now < s.paused_until {
            s.deferred.push(ev);
            None
        } else {
            Some(ev)
        }
    }

    /// End a pause now: deferred events run next, in their arrival order.
    fn resume(&mut self, node: NodeId) {
        if self.slot(node).paused_until > self.now {
            return; // the pause was extended; a later Resume will come
        }
        self.slot_mut(node).paused_until = 0;
        let evs = std::mem::take(&mut self.slot_mut(node).deferred);
        if !evs.is_empty() {
            tr!(self, node, "resumes with {} deferred events", evs.len());
        }
        for ev in evs {
            self.push(self.now, ev);
        }
    }

    fn dispatch(&mut self, ev: Ev) {
        match ev {
            Ev::Tick { node, token } => {
                if self.slot(node).tick_token != token || self.slot(node).node.is_none() {
                    return;
                }
                let Some(Ev::Tick { node, .. }) =
                    self.deferred_by_pause(node, Ev::Tick { node, token })
                else {
                    return;
                };
                self.slot_mut(node).tick_at = None;
                self.feed(node, Input::Tick);
            }
            Ev::Msg { from, to, inc, msg } => {
                let s = self.slot(to);
                if s.node.is_none() || s.inc != inc {
                    tr!(
                        self,
                        to,
                        "lost {} from n{from} (receiver restarted or down)",
                        msg.kind()
                    );
                    return;
                }
                if !self.net.is_up(from, to) {
                    tr!(self, to, "lost {} from n{from} (link down)", msg.kind());
                    return;
                }
                let clog = self.net.clogged_until(from, to);
                if clog > self.now {
                    self.push(clog, Ev::Msg { from, to, inc, msg });
                    return;
                }
                let Some(Ev::Msg { from, to, msg, .. }) =
                    self.deferred_by_pause(to, Ev::Msg { from, to, inc, msg })
                else {
                    return;
                };
                tr!(self, to, "<- n{from} {:?}", msg);
                self.feed(to, Input::Receive { from, msg });
            }
            Ev::DbDone { node, inc, cmd } => {
                if self.slot(node).inc != inc {
                    return;
                }
                let Some(Ev::DbDone { node, cmd, .. }) =
                    self.deferred_by_pause(node, Ev::DbDone { node, inc, cmd })
                else {
                    return;
                };
                self.slot_mut(node).db_inflight -= 1;
                self.exec_db(node, cmd);
            }
            Ev::Data { from, to } => self.deliver_data(from, to),
            Ev::Client { idx } => self.client_step(idx),
            Ev::Fault(action) => {
                if self.phase == Phase::Safety {
                    self.apply_fault(action);
                }
            }
            Ev::Restart { node } => {
                if self.phase == Phase::Safety {
                    self.restart(node);
                }
            }
            Ev::Resume { node } => self.resume(node),
            Ev::Heal => self.heal(),
            Ev::SettleCheck => self.settle_check(),
        }
    }

    /// Feed one input to a live node and release its outputs.
    fn feed(&mut self, id: NodeId, input: Input) {
        let now = self.local_now(id);
        if self.trace.is_some() && input != Input::Tick && !matches!(input, Input::Receive { .. }) {
            tr!(self, id, "input {:?}", input);
        }
        let Some(node) = self.slot_mut(id).node.as_mut() else {
            return;
        };
        node.handle(now, input);
        self.drain(id);
        let readable = self.readable(id);
        if let Some(v) = self.read_after.check(id, readable) {
            self.violation(v);
        }
    }

    /// Whether `id` would serve a read now (its core's lease and holds).
    fn readable(&self, id: NodeId) -> bool {
        let now = self.local_now(id);
        self.slot(id)
            .node
            .as_ref()
            .and_then(|n| n.readable_until())
            .is_some_and(|until| now < until)
    }

    /// Release a node's outputs in order; Persist reaches the store before
    /// anything after it. A mid-batch crash loses the rest of the batch.
    fn drain(&mut self, id: NodeId) {
        while let Some(out) = self
            .slot_mut(id)
            .node
            .as_mut()
            .and_then(|n| n.poll_output())
        {
            let crash_now = self.trigger_fires(id, &out);
            let hooked = self.hooks_firing(id, &out);
            match out {
                Output::Persist(op) => {
                    tr!(self, id, "persist {:?}", op);
                    self.flush_lazy(id);
                    self.slot_mut(id).durable.apply(&op);
                }
                Output::Record(op) => {
                    tr!(self, id, "record lazily {:?}", op);
                    let now = self.now;
                    let slot = self.slot_mut(id);
                    if slot.lazy.is_empty() {
                        slot.lazy_since = now;
                    }
                    slot.lazy.push(op);
                }
                Output::Send { to, msg } => self.send_msg(id, to, msg),
                Output::Db(cmd) => self.submit_db(id, cmd),
                Output::Reply { client, outcome } => self.on_reply(id, client, outcome),
                Output::Event(e) => self.on_event(id, e),
            }
            for action in hooked {
                self.apply_fault(action);
            }
            if crash_now {
                let restart_after = self.slot(id).trigger.as_ref().and_then(|t| t.restart_after);
                tr!(self, id, "CRASH mid-batch (trigger fired)");
                self.crash(id);
                if let Some(d) = restart_after {
                    self.push(self.now + d, Ev::Restart { node: id });
                }
                return;
            }
        }
        if self.now >= self.slot(id).lazy_since + LAZY_FLUSH {
            self.flush_lazy(id);
        }
        self.schedule_tick(id);
    }

    /// Make the lazy records durable (in their order).
    fn flush_lazy(&mut self, id: NodeId) {
        let slot = self.slot_mut(id);
        for op in std::mem::take(&mut slot.lazy) {
            slot.durable.apply(&op);
        }
    }

    /// Take the hooks of `id` that `out` fires (none in seeded runs).
    fn hooks_firing(&mut self, id: NodeId, out: &Output) -> Vec<FaultAction> {
        if self.hooks.is_empty() || self.phase != Phase::Safety {
            return Vec::new();
        }
        let mut fired = Vec::new();
        let mut i = 0;
        while i < self.hooks.len() {
            if self.hooks[i].node == id && (self.hooks[i].pred)(out) {
                fired.push(self.hooks.remove(i).action);
            } else {
                i += 1;
            }
        }
        fired
    }

    fn trigger_fires(&self, id: NodeId, out: &Output) -> bool {
        let Some(t) = &self.slot(id).trigger else {
            return false;
        };
        if self.now > t.until {
            return false;
        }
        match (&t.when, out) {
            (CrashWhen::SendKinds(kinds), Output::Send { msg, .. }) => {
                kinds.is_empty() || kinds.contains(&msg.kind())
            }
            (CrashWhen::SendKinds(_), _) => false,
            (CrashWhen::Matching(p), o) => p(o),
        }
    }

    fn schedule_tick(&mut self, id: NodeId) {
        let now = self.now;
        let s = self.slot_mut(id);
        let Some(node) = s.node.as_ref() else { return };
        let at = s.clock.virtual_at(node.next_timer()).max(now);
        if s.tick_at != Some(at) {
            s.tick_token += 1;
            s.tick_at = Some(at);
            let token = s.tick_token;
            self.push(at, Ev::Tick { node: id, token });
        }
    }

    fn send_msg(&mut self, from: NodeId, to: NodeId, msg: Message) {
        if self.slot(to).node.is_none() {
            tr!(self, from, "-> n{to} {} refused (n{to} down)", msg.kind());
            return;
        }
        match self.net.send(self.now, from, to) {
            Fate::Dropped => {
                tr!(self, from, "-> n{to} {} dropped", msg.kind());
            }
            Fate::Deliver(times) => {
                tr!(
                    self,
                    from,
                    "-> n{to} {:?} (arrives {})",
                    msg,
                    fmt_t(times[0])
                );
                let inc = self.slot(to).inc;
                let last = times.len() - 1;
                let mut msg = Some(msg);
                for (i, t) in times.into_iter().enumerate() {
                    let m = if i == last {
                        msg.take().unwrap()
                    } else {
                        msg.clone().unwrap()
                    };
                    self.push(
                        t,
                        Ev::Msg {
                            from,
                            to,
                            inc,
                            msg: m,
                        },
                    );
                }
            }
        }
    }

    fn submit_db(&mut self, id: NodeId, cmd: DbCmd) {
        tr!(self, id, "db {:?}", cmd);
        match cmd {
            // Immediate: the session must be gone before its client's next
            // transaction reuses the session handle.
            DbCmd::RollbackLocal { client } => self.slot_mut(id).db.rollback_session(client),
            DbCmd::Discard { gid } => {
                self.slot_mut(id).pending_remote.remove(&gid);
            }
            cmd => {
                if let DbCmd::PrepareLocal { client, gid } = cmd {
                    if let Some(c) = self.clients.get_mut(client.0 as usize - 1) {
                        if let ClientState::Waiting {
                            node,
                            inc,
                            gid: None,
                        } = c.state
                        {
                            c.state = ClientState::Waiting {
                                node,
                                inc,
                                gid: Some(gid),
                            };
                        }
                    }
                }
                let lat = self
                    .db_rng
                    .gen_range(self.params.db_latency_min_us..=self.params.db_latency_max_us);
                let now = self.now;
                let s = self.slot_mut(id);
                let done = s.db_busy_until.max(now) + lat;
                s.db_busy_until = done;
                s.db_inflight += 1;
                let inc = s.inc;
                self.push(done, Ev::DbDone { node: id, inc, cmd });
            }
        }
    }

    fn exec_db(&mut self, id: NodeId, cmd: DbCmd) {
        match cmd {
            DbCmd::PrepareLocal { client, gid } => {
                let fail =
                    self.db_error_prepare_p > 0.0 && self.db_rng.gen_bool(self.db_error_prepare_p);
                let ok = if fail {
                    tr!(self, id, "db error: PREPARE {gid} fails");
                    self.slot_mut(id).db.rollback_session(client);
                    false
                } else if let Some(writes) = self.slot_mut(id).db.prepare_session(client, gid) {
                    for to in self.node_ids().filter(|&t| t != id).collect::<Vec<_>>() {
                        self.push_data(
                            id,
                            to,
                            DataItem::Tx {
                                gid,
                                writes: writes.clone(),
                            },
                        );
                    }
                    true
                } else {
                    false
                };
                self.feed(id, Input::Db(DbResult::LocalPrepared { client, gid, ok }));
            }
            DbCmd::ApplyAndPrepare { gid } => {
                let writes = self.slot_mut(id).pending_remote.remove(&gid);
                let fail =
                    self.db_error_apply_p > 0.0 && self.db_rng.gen_bool(self.db_error_apply_p);
                let ok = match writes {
                    None => false,
                    Some(_) if fail => {
                        tr!(self, id, "db error: apply of {gid} fails");
                        false
                    }
                    Some(w) => self.slot_mut(id).db.apply_and_prepare(gid, &w),
                };
                self.feed(id, Input::Db(DbResult::RemotePrepared { gid, ok }));
            }
            DbCmd::CommitPrepared { gid } => {
                self.db_commit_prepared(id, gid);
                self.feed(id, Input::Db(DbResult::Finished { gid, commit: true }));
            }
            DbCmd::RollbackPrepared { gid } => {
                self.db_rollback_prepared(id, gid);
                self.feed(id, Input::Db(DbResult::Finished { gid, commit: false }));
            }
            DbCmd::StreamCatchup {
                to,
                from_gen,
                upto_gen,
            } => {
                let txs: Vec<(Gid, Writes)> = self
                    .slot(id)
                    .db
                    .committed_log()
                    .iter()
                    .filter(|(g, _)| from_gen < g.gen && upto_gen.iter().all(|&u| g.gen < u))
                    .cloned()
                    .collect();
                tr!(
                    self,
                    id,
                    "catch-up batch for n{to}: {} txs of generations ({from_gen}, {upto_gen:?})",
                    txs.len()
                );
                self.push_data(id, to, DataItem::Catchup { upto_gen, txs });
            }
            DbCmd::RollbackLocal { .. } | DbCmd::Discard { .. } => unreachable!("executed at once"),
        }
    }

    fn db_commit_prepared(&mut self, id: NodeId, gid: Gid) {
        if let Some(w) = self.slot_mut(id).db.commit_prepared(gid) {
            self.committed_here(id, gid, &w);
        }
    }

    fn db_rollback_prepared(&mut self, id: NodeId, gid: Gid) {
        if self.slot_mut(id).db.rollback_prepared(gid) {
            if let Some(v) = self.atomicity.record(id, gid, false) {
                self.violation(v);
            }
        } else if self.slot(id).db.is_committed(gid) {
            self.violation(Violation::new(
                "atomicity",
                format!("n{id} was told to roll back {gid}, which it has committed"),
            ));
        }
    }

    /// Checks after a transaction became committed on a node.
    fn committed_here(&mut self, id: NodeId, gid: Gid, writes: &Writes) {
        self.read_after.on_committed(id, gid);
        if let Some(v) = self.atomicity.record(id, gid, true) {
            self.violation(v);
        }
        if writes.iter().any(|w| w.table == Table::Accounts) {
            if let Some(v) = checkers::bank::check(id, gid, &self.slot(id).db) {
                self.violation(v);
            }
        }
    }

    fn push_data(&mut self, from: NodeId, to: NodeId, item: DataItem) {
        if self.data.push(from, to, item) {
            self.push(
                self.now + self.params.data_latency_us,
                Ev::Data { from, to },
            );
        }
    }

    fn deliver_data(&mut self, from: NodeId, to: NodeId) {
        if self.data.stream(from, to).queue.is_empty() {
            self.data.stream(from, to).scheduled = false;
            return;
        }
        let s = self.slot(to);
        let retry = if s.node.is_none() || !self.net.is_up(from, to) {
            Some(self.now + 50 * MS)
        } else if s.paused_until > self.now {
            Some((self.now + 50 * MS).min(s.paused_until))
        } else if self.net.clogged_until(from, to) > self.now {
            Some(self.net.clogged_until(from, to))
        } else {
            None
        };
        if let Some(at) = retry {
            self.push(at, Ev::Data { from, to });
            return;
        }
        let item = self.data.stream(from, to).queue.pop_front().unwrap();
        if self.data.stream(from, to).queue.is_empty() {
            self.data.stream(from, to).scheduled = false;
        } else {
            self.push(
                self.now + self.params.data_latency_us,
                Ev::Data { from, to },
            );
        }
        match item {
            DataItem::Tx { gid, writes } => {
                tr!(
                    self,
                    to,
                    "data from n{from}: {gid} ({} writes)",
                    writes.len()
                );
                // A larger transaction takes a while to arrive: the data
                // plane says so first, as mmd's receiver does.
                if writes.len() > 2 {
                    self.feed(to, Input::RemoteProgress { gid });
                }
                self.slot_mut(to).pending_remote.insert(gid, writes);
                self.feed(to, Input::RemoteTx { gid });
            }
            DataItem::Catchup { upto_gen, txs } => {
                let mut applied = 0;
                for (gid, w) in &txs {
                    if self.slot_mut(to).db.catchup_apply(*gid, w) {
                        applied += 1;
                        self.committed_here(to, *gid, w);
                    }
                }
                tr!(
                    self,
                    to,
                    "catch-up from n{from} applied {applied}/{} txs (upto {upto_gen:?})",
                    txs.len()
                );
                self.feed(
                    to,
                    Input::CatchupApplied {
                        donor: from,
                        upto_gen,
                    },
                );
            }
        }
    }

    fn on_reply(&mut self, id: NodeId, client: ClientId, outcome: Outcome) {
        tr!(self, id, "reply to client {}: {:?}", client.0, outcome);
        let Some(c) = self.clients.get_mut(client.0 as usize - 1) else {
            return;
        };
        let ClientState::Waiting { node, gid, .. } = c.state else {
            tr!(self, id, "stray reply to client {}", client.0);
            return;
        };
        if node != id {
            tr!(
                self,
                id,
                "stray reply to client {} (waiting on n{node})",
                client.0
            );
            return;
        }
        c.state = ClientState::Idle;
        let think = c
            .rng
            .gen_range(self.params.workload.think_min..=self.params.workload.think_max);
        match outcome {
            Outcome::Committed => {
                self.stats.committed += 1;
                let gen = self
                    .slot(id)
                    .node
                    .as_ref()
                    .map(|n| n.generation())
                    .unwrap_or(self.slot(id).durable.gen);
                if let Some(v) = Majority::on_committed_reply(id, gid, gen, self.params.nodes) {
                    self.violation(v);
                }
                match gid {
                    Some(g) => {
                        self.acked.push(g);
                        let lacking: Vec<(NodeId, bool)> = (1..=self.params.nodes as NodeId)
                            .filter(|&n| !self.slot(n).db.is_committed(g))
                            .map(|n| (n, self.readable(n)))
                            .collect();
                        if let Some(v) = self.read_after.on_acked(g, lacking) {
                            self.violation(v);
                        }
                    }
                    None => self.violation(Violation::new(
                        "durability",
                        format!(
                            "n{id} acknowledged client {} committed without preparing",
                            client.0
                        ),
                    )),
                }
            }
            Outcome::Aborted(_) => self.stats.aborted += 1,
            Outcome::Refused(_) => self.stats.refused += 1,
        }
        let idx = client.0 as usize - 1;
        self.push(self.now + think, Ev::Client { idx });
    }

    fn on_event(&mut self, id: NodeId, e: Event) {
        tr!(self, id, "event {:?}", e);
        match e {
            Event::GenerationAdopted { gen } => {
                if gen.num > 1 {
                    self.coverage.hit(Path::GenerationChange);
                }
                if let Some(v) = self.majority.on_adopted(id, gen) {
                    self.violation(v);
                }
            }
            Event::ResolverDecided { commit, rule, .. } => match (commit, rule) {
                (true, ResolveRule::AlreadyDecided) => {
                    self.coverage.hit(Path::ResolverCommitAlreadyDecided)
                }
                (true, ResolveRule::HighestAccepted) => {
                    self.coverage.hit(Path::ResolverCommitHighestAccepted)
                }
                (false, ResolveRule::NothingAccepted) => {
                    self.coverage.hit(Path::ResolverAbortNothingAccepted)
                }
                (false, ResolveRule::AlreadyDecided) => {
                    self.coverage.hit(Path::ResolverAbortAlreadyDecided)
                }
                _ => {}
            },
            Event::CatchupCompleted {
                upto_gen: Some(_), ..
            } => self.coverage.hit(Path::CatchupCompleted),
            Event::CoordinatorAborted { reason, .. }
            | Event::CoordinatorResolving { reason, .. } => match reason {
                AbortReason::VoteTimeout => self.coverage.hit(Path::VotesLost),
                AbortReason::VoteNo => self.coverage.hit(Path::VoteNo),
                AbortReason::GenerationChanged => self.coverage.hit(Path::GenerationChangeAbort),
                _ => {}
            },
            _ => {}
        }
    }

    fn client_step(&mut self, idx: usize) {
        if self.stop_clients || self.clients[idx].state != ClientState::Idle {
            return;
        }
        let nodes = self.params.nodes;
        let retry = self.params.workload.retry_after;
        let node = match self.clients[idx].kind {
            ClientKind::SeedMix { node } => node,
            ClientKind::Bank => self.clients[idx].rng.gen_range(1..=nodes as NodeId),
            ClientKind::Scripted { node } => {
                if self.clients[idx].counter > 0 {
                    return; // sent once already
                }
                node
            }
        };
        let s = self.slot(node);
        let accepts =
            s.paused_until <= self.now && s.node.as_ref().is_some_and(|n| n.accepts_work());
        if !accepts {
            self.stats.refused += 1;
            self.push(self.now + retry, Ev::Client { idx });
            return;
        }
        let local = self.local_now(node).0;
        let c = &mut self.clients[idx];
        let db = &mut self.slots[node as usize - 1].db;
        let res = match c.kind {
            ClientKind::SeedMix { .. } => workload::seed_mix(db, c, node, nodes, local),
            ClientKind::Bank => workload::bank_transfer(db, c),
            ClientKind::Scripted { .. } => {
                let writes = self.scripted.get(&c.id).map_or(&[][..], |w| &w[..]);
                workload::scripted(db, c, writes)
            }
        };
        let cid = c.id;
        if res.is_err() || db.session_writes(cid).unwrap_or(&[]).is_empty() {
            db.rollback_session(cid);
            if res.is_err() {
                self.stats.conflicts += 1;
                tr!(self, node, "client {} lock conflict, retrying", cid.0);
            }
            self.push(self.now + retry, Ev::Client { idx });
            return;
        }
        let inc = self.slot(node).inc;
        self.clients[idx].state = ClientState::Waiting {
            node,
            inc,
            gid: None,
        };
        self.feed(
            node,
            Input::CommitRequest {
                client: cid,
                wait_peers: true,
            },
        );
    }

    fn apply_fault(&mut self, action: FaultAction) {
        tr!(self, 0, "FAULT {action}");
        match action {
            FaultAction::Partition { side } => self.net.partition(&side),
            FaultAction::OneWay { from, to } => self.net.set_link(from, to, false),
            FaultAction::Isolate { node } => self.net.partition(&[node]),
            FaultAction::Ring => self.net.ring(),
            FaultAction::Clog { from, to, until } => self.net.clog(from, to, until),
            FaultAction::HealLinks => {
                for a in self.node_ids().collect::<Vec<_>>() {
                    for b in self.node_ids().collect::<Vec<_>>() {
                        self.net.set_link(a, b, true);
                    }
                }
            }
            FaultAction::Crash { node } => self.crash(node),
            FaultAction::Restart { node } => self.restart(node),
            FaultAction::CrashAfterSend {
                node,
                kinds,
                until,
                restart_after,
            } => {
                if self.slot(node).node.is_some() {
                    self.slot_mut(node).trigger = Some(CrashTrigger {
                        when: CrashWhen::SendKinds(kinds),
                        until,
                        restart_after: Some(restart_after),
                    });
                }
            }
            FaultAction::Pause { node, until } => {
                if self.slot(node).node.is_some() {
                    let s = self.slot_mut(node);
                    s.paused_until = s.paused_until.max(until);
                    self.push(until, Ev::Resume { node });
                }
            }
        }
    }

    fn crash(&mut self, id: NodeId) {
        let Some(node) = self.slot_mut(id).node.take() else {
            return;
        };
        if !self.slot(id).lazy.is_empty() {
            tr!(self, id, "lazy records lost: {}", self.slot(id).lazy.len());
        }
        self.slot_mut(id).lazy.clear();
        tr!(
            self,
            id,
            "CRASH (status {:?}, gen {})",
            node.status(),
            node.generation().num
        );
        self.stats.crashes += 1;
        for (_, phase) in node.coordinating() {
            match phase {
                CoordPhase::PreparingLocally => self.coverage.hit(Path::CoordinatorCrashPreparing),
                CoordPhase::CollectingVotes => {
                    self.coverage.hit(Path::CoordinatorCrashCollectingVotes)
                }
                CoordPhase::PreCommitted => self.coverage.hit(Path::CoordinatorCrashPrecommitted),
                CoordPhase::Committing => self.coverage.hit(Path::CoordinatorCrashCommitting),
                CoordPhase::AwaitingResolver => {}
            }
        }
        if node.applying().next().is_some() {
            self.coverage.hit(Path::ParticipantCrashApplying);
        }
        // In doubt on a participant: voted yes only, or also accepted the precommit.
        for gid in node.in_doubt().filter(|g| g.origin != id) {
            let accepted = node.durable().txs.get(&gid).and_then(|r| r.accepted);
            self.coverage.hit(match accepted {
                Some(_) => Path::ParticipantCrashPrecommitted,
                None => Path::ParticipantCrashPrepared,
            });
        }
        self.finish_inflight_at_crash(id);
        let now = self.now;
        let s = self.slot_mut(id);
        s.inc += 1;
        s.db.crash();
        s.pending_remote.clear();
        s.paused_until = 0;
        // Deferred work addressed to the dead incarnation is dropped when
        // it runs (stale incarnation), data deliveries retry on their own.
        let deferred = std::mem::take(&mut s.deferred);
        s.trigger = None;
        s.tick_at = None;
        s.tick_token += 1;
        s.db_busy_until = now;
        s.db_inflight = 0;
        for ev in deferred {
            self.push(now, ev);
        }
        let retry = self.params.workload.retry_after;
        for idx in 0..self.clients.len() {
            if let ClientState::Waiting { node, .. } = self.clients[idx].state {
                if node == id {
                    self.clients[idx].state = ClientState::Idle;
                    self.stats.connection_lost += 1;
                    self.push(now + retry, Ev::Client { idx });
                }
            }
        }
    }

    /// A `COMMIT PREPARED` or `ROLLBACK PREPARED` that mmd sent before it
    /// died may still run in PostgreSQL: each one in flight takes effect
    /// or not by a seeded coin. (mmd issues COMMIT PREPARED before the
    /// decision is durable, so a node can come back committed with no
    /// decision recorded; only the acceptances it persisted speak for it.)
    fn finish_inflight_at_crash(&mut self, id: NodeId) {
        let inc = self.slot(id).inc;
        let mut inflight: Vec<(VTime, u64, DbCmd)> = self
            .queue
            .iter()
            .filter_map(|e| match &e.ev {
                Ev::DbDone { node, inc: i, cmd }
                    if *node == id
                        && *i == inc
                        && matches!(
                            cmd,
                            DbCmd::CommitPrepared { .. } | DbCmd::RollbackPrepared { .. }
                        ) =>
                {
                    Some((e.at, e.seq, cmd.clone()))
                }
                _ => None,
            })
            .collect();
        inflight.sort_by_key(|(at, seq, _)| (*at, *seq));
        for (_, _, cmd) in inflight {
            if !self.db_rng.gen_bool(0.5) {
                continue;
            }
            tr!(self, id, "db {:?} completes as mmd dies", cmd);
            match cmd {
                DbCmd::CommitPrepared { gid } => self.db_commit_prepared(id, gid),
                DbCmd::RollbackPrepared { gid } => self.db_rollback_prepared(id, gid),
                _ => {}
            }
        }
    }

    fn restart(&mut self, id: NodeId) {
        if self.slot(id).node.is_some() {
            return;
        }
        let cfg = self.config(id);
        let prepared = self.slot(id).db.prepared_gids();
        tr!(self, id, "RESTART with {} prepared in db", prepared.len());
        let durable = self.slot(id).durable.clone();
        let node = Node::recover(cfg, durable, &prepared, self.local_now(id));
        self.slot_mut(id).node = Some(node);
        self.drain(id);
    }

    /// End of the safety phase: heal everything, stop new work, wait to settle.
    fn heal(&mut self) {
        tr!(self, 0, "HEAL: liveness phase begins");
        self.phase = Phase::Liveness {
            healed_at: self.now,
        };
        self.stop_clients = true;
        self.net.heal(self.now);
        self.db_error_prepare_p = 0.0;
        self.db_error_apply_p = 0.0;
        for id in self.node_ids().collect::<Vec<_>>() {
            let s = self.slot_mut(id);
            s.trigger = None;
            s.paused_until = 0;
            self.resume(id);
            self.restart(id);
        }
        self.push(self.now + SETTLE_CHECK_EVERY, Ev::SettleCheck);
    }

    /// What keeps the cluster from being settled, one entry per item.
    pub fn unsettled(&self) -> Vec<String> {
        let mut p = Vec::new();
        let mut gens = std::collections::BTreeSet::new();
        for id in self.node_ids() {
            let s = self.slot(id);
            let Some(n) = s.node.as_ref() else {
                p.push(format!("n{id} down"));
                continue;
            };
            if s.paused_until > self.now {
                p.push(format!("n{id} paused"));
            }
            if n.status() != NodeStatus::Online {
                p.push(format!(
                    "n{id} status {:?} in generation {}",
                    n.status(),
                    n.generation().num
                ));
            }
            gens.insert(n.generation().num);
            let coord: Vec<String> = n
                .coordinating()
                .map(|(g, ph)| format!("{g}:{ph:?}"))
                .collect();
            if !coord.is_empty() {
                p.push(format!("n{id} coordinating [{}]", coord.join(" ")));
            }
            let doubt: Vec<String> = n.in_doubt().map(|g| g.to_string()).collect();
            if !doubt.is_empty() {
                p.push(format!("n{id} in doubt [{}]", doubt.join(" ")));
            }
            let appl: Vec<String> = n.applying().map(|g| g.to_string()).collect();
            if !appl.is_empty() {
                p.push(format!("n{id} applying [{}]", appl.join(" ")));
            }
            if s.db_inflight > 0 {
                p.push(format!("n{id} {} db commands in flight", s.db_inflight));
            }
            let prep = s.db.prepared_gids();
            if !prep.is_empty() {
                let l: Vec<String> = prep.iter().map(|g| g.to_string()).collect();
                p.push(format!("n{id} db prepared [{}]", l.join(" ")));
            }
        }
        if gens.len() > 1 {
            p.push(format!("generations differ: {gens:?}"));
        }
        for (from, to, k) in self.data.pending() {
            p.push(format!("data stream n{from}->n{to} holds {k} items"));
        }
        for c in &self.clients {
            if let ClientState::Waiting { node, .. } = c.state {
                p.push(format!("client {} waits on n{node}", c.id.0));
            }
        }
        p
    }

    fn settle_check(&mut self) {
        let Phase::Liveness { healed_at } = self.phase else {
            return;
        };
        let pending = self.unsettled();
        if pending.is_empty() {
            tr!(self, 0, "SETTLED after {}ms", (self.now - healed_at) / MS);
            self.settled_at = Some(self.now);
            self.phase = Phase::Done;
        } else if self.now >= healed_at + self.params.liveness_bound {
            if let Some(v) = checkers::liveness::check(self.params.liveness_bound / MS, &pending) {
                self.violation(v);
            }
            let outstanding: Vec<(ClientId, NodeId)> = self
                .clients
                .iter()
                .filter_map(|c| match c.state {
                    ClientState::Waiting { node, .. } => Some((c.id, node)),
                    _ => None,
                })
                .collect();
            for v in checkers::answered::check(&outstanding) {
                self.violation(v);
            }
            self.phase = Phase::Done;
        } else {
            self.push(self.now + SETTLE_CHECK_EVERY, Ev::SettleCheck);
        }
    }

    /// End-of-run checks (only meaningful on a settled cluster) and the report.
    pub fn finish(mut self) -> crate::SeedReport {
        if self.settled_at.is_some() {
            let dbs: Vec<(NodeId, &Db)> = self
                .node_ids()
                .map(|id| (id, &self.slots[id as usize - 1].db))
                .collect();
            let mut vs = checkers::durability::check(&self.acked, &dbs);
            vs.extend(checkers::convergence::check(&dbs));
            vs.extend(checkers::prepared_left::check(&dbs));
            let outstanding: Vec<(ClientId, NodeId)> = self
                .clients
                .iter()
                .filter_map(|c| match c.state {
                    ClientState::Waiting { node, .. } => Some((c.id, node)),
                    _ => None,
                })
                .collect();
            vs.extend(checkers::answered::check(&outstanding));
            for v in vs {
                self.violation(v);
            }
        }
        if self.suppressed_violations > 0 {
            let n = self.suppressed_violations;
            self.violations.push(Violation::new(
                "summary",
                format!("{n} more violations not listed"),
            ));
        }
        let healed_at = match self.phase {
            Phase::Liveness { healed_at } => Some(healed_at),
            _ => Some(self.params.safety),
        };
        let trace_hash = self.trace.as_ref().map(|t| {
            let mut h = crate::fnv::Fnv::new();
            for l in t {
                h.bytes(l.as_bytes());
                h.bytes(b"\n");
            }
            h.finish()
        });
        let committed_rows = self
            .slots
            .iter()
            .map(|s| s.db.committed_count() as u64)
            .max()
            .unwrap_or(0);
        crate::SeedReport {
            seed: self.params.seed,
            nodes: self.params.nodes,
            mutant: self.params.mutant,
            violations: self.violations,
            coverage: self.coverage,
            stats: self.stats,
            committed: self.stats.committed,
            aborted: self.stats.aborted,
            refused: self.stats.refused,
            settle_time: self.settled_at.zip(healed_at).map(|(s, h)| s - h),
            end_time: self.now,
            committed_txs: committed_rows,
            enabled_faults: self.params.faults.enabled.clone(),
            trace_hash: trace_hash.unwrap_or(0),
            trace: self.trace,
        }
    }

    /// Whether `kind` is enabled in this world's swarm plan.
    pub fn fault_enabled(&self, kind: FaultKind) -> bool {
        self.params.faults.is_enabled(kind)
    }
}
