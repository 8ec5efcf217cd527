//! Runs one `mm_core::Node` on tokio. The driver is deliberately thin: it
//! turns mesh messages, database results, client requests and the timer
//! into inputs, and carries out outputs in order; every decision is the
//! core's. A `Persist` is awaited before any later output is released
//! (raft-rs: persist, then send), and a storage failure stops the node
//! (fail-stop) rather than let it act on state it could not save. A lazy
//! `Record` waits for the next persist batch to ride with (or
//! [`LAZY_FLUSH_AFTER`], or [`LAZY_FLUSH_OPS`] of them): it costs no fsync
//! of its own under load and holds up nothing.

use crate::mesh::Mesh;
use crate::storage::{Loaded, Storage, StorageError};
use mm_core::{
    ClientId, Config, DurableOp, Event, Generation, Input, Message, Node, NodeId, NodeSet,
    NodeStatus, Outcome, Output, Time,
};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

/// How long lazy records may wait for a persist batch before they get one.
pub const LAZY_FLUSH_AFTER: Duration = Duration::from_millis(100);
/// How many lazy records may wait at most.
pub const LAZY_FLUSH_OPS: usize = 4096;

/// Requests to a running driver (from the client proxy, status, tests).
#[derive(Debug)]
pub enum Command {
    /// The client's open transaction wrote something and asks to commit.
    Commit {
        client: ClientId,
        /// Answer once every member shows it (the session's `mm.wait_peer_commits`).
        wait_peers: bool,
        reply: oneshot::Sender<Outcome>,
    },
    Status {
        reply: oneshot::Sender<StatusSnapshot>,
    },
    /// Send nothing to peers (true) or resume (false); see [`DriverHandle::silence`].
    Silence(bool),
    Shutdown,
}

/// What `mtm.status()` and `mmctl status` show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusSnapshot {
    pub node_id: NodeId,
    pub status: NodeStatus,
    pub generation: Generation,
    /// Peers heard from within the heartbeat timeout (the core's view).
    pub connected: NodeSet,
    /// Peers with a live authenticated mesh link (the transport's view).
    pub links: NodeSet,
    pub in_doubt: usize,
    /// Until when reads keep the read-after-commit guarantee here absent
    /// news (`None`: not now); see `mm_core::Node::readable_until`.
    pub readable_until: Option<Instant>,
}

impl StatusSnapshot {
    /// Whether a transaction starting now sees every acknowledged commit.
    pub fn readable_now(&self) -> bool {
        self.readable_until.is_some_and(|t| Instant::now() < t)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("storage failed, node stopped to stay safe: {0}")]
    Storage(#[from] StorageError),
}

/// A handle to send commands to a running driver.
#[derive(Clone, Debug)]
pub struct DriverHandle {
    tx: mpsc::Sender<Command>,
    watch: watch::Receiver<StatusSnapshot>,
}

impl DriverHandle {
    /// Ask to commit; `None` if the driver has stopped.
    pub async fn commit(&self, client: ClientId, wait_peers: bool) -> Option<Outcome> {
        let (reply, rx) = oneshot::channel();
        let cmd = Command::Commit {
            client,
            wait_peers,
            reply,
        };
        self.tx.send(cmd).await.ok()?;
        rx.await.ok()
    }
    /// While silenced the node still hears its peers but sends them nothing,
    /// so they vote it out of their generation. A member that needs a resync
    /// uses it: the resync replaces the database only of a node out of the
    /// generation (`catchup`), and a `recovery` member whose lost slot keeps
    /// it from catching up would otherwise stay one forever.
    pub async fn silence(&self, on: bool) {
        let _ = self.tx.send(Command::Silence(on)).await; // stopped: nothing to silence
    }
    pub async fn status(&self) -> Option<StatusSnapshot> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Status { reply }).await.ok()?;
        rx.await.ok()
    }
    /// The node's status, updated as it changes (for the proxy and `mtm.status()`).
    pub fn watch(&self) -> watch::Receiver<StatusSnapshot> {
        self.watch.clone()
    }
    pub async fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown).await;
    }
}

pub struct Driver<S: Storage> {
    node: Node,
    storage: S,
    mesh: Mesh,
    inbox: mpsc::Receiver<(NodeId, Message)>,
    commands: mpsc::Receiver<Command>,
    results_tx: mpsc::UnboundedSender<Input>,
    results: mpsc::UnboundedReceiver<Input>,
    pending: BTreeMap<ClientId, oneshot::Sender<Outcome>>,
    epoch: Instant,
    watch: watch::Sender<StatusSnapshot>,
    silenced: bool,
    /// Sees every core event as it is output (a simulator's phase tap).
    on_event: Option<EventHook>,
    /// The core's lazy records not yet written, in output order, and since when.
    lazy: Vec<DurableOp>,
    lazy_since: Option<Instant>,
}

/// A synchronous observer of the core's events, called in output order.
pub type EventHook = Box<dyn FnMut(NodeId, &Event) + Send>;

impl<S: Storage> Driver<S> {
    /// Load the node's state from `storage` (bootstrapping a fresh member)
    /// and get ready to run. `results` must be the channel `storage` reports on.
    pub async fn start(
        cfg: Config,
        storage: S,
        mesh: Mesh,
        inbox: mpsc::Receiver<(NodeId, Message)>,
        results: (mpsc::UnboundedSender<Input>, mpsc::UnboundedReceiver<Input>),
    ) -> Result<(Driver<S>, DriverHandle), DriverError> {
        Self::start_as(cfg, storage, mesh, inbox, results, false).await
    }

    /// As [`Self::start`]; `joining`: a fresh node added to a running
    /// cluster (`mmctl add-node`) starts as a member of no generation.
    pub async fn start_as(
        cfg: Config,
        mut storage: S,
        mesh: Mesh,
        inbox: mpsc::Receiver<(NodeId, Message)>,
        results: (mpsc::UnboundedSender<Input>, mpsc::UnboundedReceiver<Input>),
        joining: bool,
    ) -> Result<(Driver<S>, DriverHandle), DriverError> {
        let epoch = Instant::now();
        let node = match storage.load().await? {
            Loaded::Fresh => {
                let node = if joining {
                    Node::new_joiner(cfg, Time::ZERO)
                } else {
                    Node::new(cfg, Time::ZERO)
                };
                // Make the bootstrap state durable before the node says anything.
                let d = node.durable().clone();
                for op in [
                    DurableOp::Boot(d.boot),
                    DurableOp::AdoptGen(d.gen),
                    DurableOp::PromiseGen(d.promised_gen),
                    DurableOp::LastOnline(d.last_online_gen),
                ] {
                    storage.persist(&op).await?;
                }
                node
            }
            Loaded::Existing { durable, prepared } => {
                Node::recover(cfg, durable, &prepared, Time::ZERO)
            }
        };
        let (tx, commands) = mpsc::channel(1024);
        let first = StatusSnapshot {
            node_id: node.id(),
            status: node.status(),
            generation: node.generation(),
            connected: node.connected(),
            links: mesh.connected(),
            in_doubt: node.in_doubt().count(),
            readable_until: None,
        };
        let (watch_tx, watch_rx) = watch::channel(first);
        let driver = Driver {
            node,
            storage,
            mesh,
            inbox,
            commands,
            results_tx: results.0,
            results: results.1,
            pending: BTreeMap::new(),
            epoch,
            silenced: false,
            on_event: None,
            watch: watch_tx,
            lazy: Vec::new(),
            lazy_since: None,
        };
        Ok((
            driver,
            DriverHandle {
                tx,
                watch: watch_rx,
            },
        ))
    }

    fn now(&self) -> Time {
        Time(self.epoch.elapsed().as_micros() as u64)
    }

    /// Calls `hook` with every core event, synchronously, before the next
    /// input: the turmoil tier's phase tap (a `tracing` subscriber missed
    /// events when other threads changed the global callsite cache).
    pub fn on_event(mut self, hook: impl FnMut(NodeId, &Event) + Send + 'static) -> Self {
        self.on_event = Some(Box::new(hook));
        self
    }

    /// Run until shutdown. Returns an error only if storage failed.
    pub async fn run(mut self) -> Result<(), DriverError> {
        self.flush().await?;
        loop {
            let deadline = self.epoch + Duration::from_micros(self.node.next_timer().0);
            let lazy_at = self.lazy_since.map(|t| t + LAZY_FLUSH_AFTER);
            // `biased`: a fixed branch order keeps runs reproducible under
            // turmoil. Peers' messages and database results go before client
            // commands, so a node that was starved judges a request on fresh
            // views rather than on heartbeats still queued.
            tokio::select! {
                biased;
                Some((from, msg)) = self.inbox.recv() => {
                    let now = self.now();
                    self.node.handle(now, Input::Receive { from, msg });
                }
                Some(input) = self.results.recv() => {
                    tracing::trace!(node = self.node.id(), ?input);
                    let now = self.now();
                    self.node.handle(now, input);
                }
                _ = tokio::time::sleep_until(lazy_at.unwrap_or(deadline)), if lazy_at.is_some() => {
                    self.flush_lazy().await?;
                }
                _ = tokio::time::sleep_until(deadline) => {
                    let now = self.now();
                    self.node.handle(now, Input::Tick);
                }
                cmd = self.commands.recv() => match cmd {
                    None | Some(Command::Shutdown) => break,
                    Some(Command::Commit { client, wait_peers, reply }) => {
                        self.pending.insert(client, reply);
                        let now = self.now();
                        self.node.handle(now, Input::CommitRequest { client, wait_peers });
                    }
                    Some(Command::Status { reply }) => {
                        let _ = reply.send(self.snapshot());
                    }
                    Some(Command::Silence(on)) => {
                        if on != self.silenced {
                            tracing::warn!(node = self.node.id(), silenced = on, "{}", if on {
                                "silenced: sending peers nothing until they vote this node out"
                            } else {
                                "speaking to peers again"
                            });
                        }
                        self.silenced = on;
                    }
                },
            }
            self.drain_ready();
            self.flush().await?;
            let snap = self.snapshot();
            self.watch.send_if_modified(|old| {
                let changed = *old != snap;
                if changed {
                    *old = snap;
                }
                changed
            });
        }
        self.flush_lazy().await?;
        self.mesh.shutdown().await;
        Ok(())
    }

    /// Write the waiting lazy records on their own.
    async fn flush_lazy(&mut self) -> Result<(), DriverError> {
        self.lazy_since = None;
        if self.lazy.is_empty() {
            return Ok(());
        }
        let ops = std::mem::take(&mut self.lazy);
        tracing::trace!(node = self.node.id(), ops = ops.len(), "lazy records batch");
        self.storage.persist_batch(&ops).await?;
        Ok(())
    }

    /// Handle what else is already waiting (peers' messages, database
    /// results), so one flush persists the state of many transactions in
    /// one database transaction. Bounded, so commands and timers still run.
    fn drain_ready(&mut self) {
        for _ in 0..256 {
            let input = if let Ok((from, msg)) = self.inbox.try_recv() {
                Input::Receive { from, msg }
            } else if let Ok(input) = self.results.try_recv() {
                input
            } else {
                return;
            };
            let now = self.now();
            self.node.handle(now, input);
        }
    }

    /// Carry out the node's outputs in the core's order, persisting in one
    /// batch: what comes before the round's first `Persist` is released at
    /// once (the core orders an output after every state it asserts, so
    /// these assert nothing new, e.g. a precommit's Accept to the peers
    /// while the coordinator's own acceptance is written); every state
    /// change of the round is then made durable with one write and fsync;
    /// then the rest, in order. Persisting a later op early is harmless: the
    /// core already acts on it. The waiting lazy records lead the batch (a
    /// `Persist` never overtakes a `Record` output before it); with no
    /// `Persist` in the round they keep waiting.
    async fn flush(&mut self) -> Result<(), DriverError> {
        let mut outs = Vec::new();
        while let Some(out) = self.node.poll_output() {
            outs.push(out);
        }
        let first_persist = outs
            .iter()
            .position(|o| matches!(o, Output::Persist(_)))
            .unwrap_or(outs.len());
        let mut outs = outs.into_iter();
        for out in outs.by_ref().take(first_persist) {
            match out {
                Output::Record(op) => self.lazy.push(op),
                out => self.release(out),
            }
        }
        let rest: Vec<Output> = outs.collect();
        if !rest.is_empty() {
            let mut batch = std::mem::take(&mut self.lazy);
            self.lazy_since = None;
            batch.extend(rest.iter().filter_map(|o| match o {
                Output::Persist(op) | Output::Record(op) => Some(op.clone()),
                _ => None,
            }));
            tracing::trace!(node = self.node.id(), ops = batch.len(), "persist batch");
            self.storage.persist_batch(&batch).await?;
        } else if self.lazy.len() >= LAZY_FLUSH_OPS {
            self.flush_lazy().await?;
        } else if !self.lazy.is_empty() && self.lazy_since.is_none() {
            self.lazy_since = Some(Instant::now());
        }
        for out in rest {
            self.release(out);
        }
        Ok(())
    }

    /// Carry out one output whose state, if any, is durable.
    fn release(&mut self, out: Output) {
        tracing::trace!(node = self.node.id(), output = ?out);
        match out {
            Output::Persist(_) | Output::Record(_) => {}
            Output::Send { to, msg } => {
                if !self.silenced {
                    self.mesh.send(to, msg)
                }
            }
            Output::Db(cmd) => self.storage.execute(cmd, &self.results_tx),
            Output::Reply { client, outcome } => {
                if let Some(reply) = self.pending.remove(&client) {
                    let _ = reply.send(outcome); // the client may have gone
                }
            }
            Output::Event(e) => {
                log_event(self.node.id(), &e);
                if let Some(hook) = self.on_event.as_mut() {
                    hook(self.node.id(), &e);
                }
            }
        }
    }

    fn snapshot(&self) -> StatusSnapshot {
        StatusSnapshot {
            node_id: self.node.id(),
            status: self.node.status(),
            generation: self.node.generation(),
            connected: self.node.connected(),
            links: self.mesh.connected(),
            in_doubt: self.node.in_doubt().count(),
            // Unbounded (one node, nothing held) becomes a day: refreshed long before.
            readable_until: self.node.readable_until().map(|t| {
                let day = Time::from_millis(86_400_000);
                self.epoch + Duration::from_micros(t.min(self.now() + day).0)
            }),
        }
    }
}

fn log_event(node: NodeId, e: &Event) {
    match e {
        Event::StatusChanged { status } => tracing::info!(node, ?status, "status changed"),
        Event::GenerationAdopted { gen } => {
            tracing::info!(node, gen = gen.num, members = %gen.members, donors = %gen.donors, "generation adopted")
        }
        Event::CatchupStarted {
            donor,
            from_gen,
            upto_gen,
        } => {
            tracing::info!(node, donor, from_gen, ?upto_gen, "catch-up started")
        }
        Event::CatchupCompleted { donor, upto_gen } => {
            tracing::info!(node, donor, ?upto_gen, "catch-up completed")
        }
        Event::CoordinatorResolving { gid, reason } => {
            tracing::info!(node, %gid, ?reason, "votes incomplete after this node's yes: a resolver settles the transaction")
        }
        Event::ResolverDecided { gid, commit, rule } => {
            tracing::info!(node, %gid, commit, ?rule, "in-doubt transaction resolved")
        }
        other => tracing::debug!(node, event = ?other),
    }
}
