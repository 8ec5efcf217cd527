//! The control-plane TCP mesh between `mmd` processes.
//!
//! - Frames: length-prefixed, one version byte, postcard-encoded
//!   [`Frame`] (see [`frame`]). A frame that does not decode, or carries an
//!   unknown version, closes the connection with a warning.
//! - Handshake: both directions authenticated with HMAC-SHA256 over the
//!   shared secret (see [`handshake`]); wrong cluster id, unknown or own node
//!   id, wrong secret and timeouts are refused and logged at warn with the
//!   peer's address and the reason.
//! - Links: exactly one per peer pair. The node with the lower id dials, the
//!   higher one only accepts; the dialer reconnects with jittered
//!   exponential backoff until shutdown. A link idle for
//!   [`MeshOptions::idle_timeout`] (pings flow every
//!   [`MeshOptions::ping_interval`]) is dropped and re-dialed, so half-open
//!   connections do not linger.
//! - [`Mesh::send`] never blocks: a message to a peer without a live link,
//!   or whose queue is full, is dropped and counted ([`MeshStats::dropped`]);
//!   the protocol tolerates loss.
//!
//! Tasks never use an unbiased `select!`, for determinism under a simulated
//! network; the transport is pluggable ([`Transport`]).

pub mod frame;
pub mod handshake;
pub mod rng;
pub mod transport;

pub use frame::{Frame, MAX_FRAME_LEN, PROTOCOL_VERSION};
pub use handshake::HandshakeError;
pub use rng::MeshRng;
pub use transport::{Listener, TcpTransport, Transport};

use crate::config::{ConfigError, NodeConfig};
use futures::{SinkExt, StreamExt};
use handshake::{FramedStream, Identity};
use mm_core::{Message, NodeId, NodeSet};
use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// Who this node is on the mesh and whom it talks to.
#[derive(Clone, PartialEq, Eq)]
pub struct MeshConfig {
    pub cluster_id: String,
    pub node_id: NodeId,
    /// Where to listen for peers with lower ids.
    pub listen: SocketAddr,
    /// Every other node. Only the addresses of higher ids are dialed; lower
    /// ids are just admitted when they dial us.
    pub peers: BTreeMap<NodeId, SocketAddr>,
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for MeshConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshConfig")
            .field("cluster_id", &self.cluster_id)
            .field("node_id", &self.node_id)
            .field("listen", &self.listen)
            .field("peers", &self.peers)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl MeshConfig {
    pub fn from_node_config(c: &NodeConfig) -> Result<MeshConfig, ConfigError> {
        let m = MeshConfig {
            cluster_id: c.cluster_id.clone(),
            node_id: c.node_id,
            listen: c.listen.mesh,
            peers: c.peers(),
            secret: c.secret.clone(),
        };
        m.validate()?;
        Ok(m)
    }

    /// Checks a hand-built configuration (`from_node_config` output always passes).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |s: String| Err(ConfigError::Mesh(s));
        let max = mm_core::ids::MAX_NODES as NodeId;
        if self.cluster_id.is_empty() {
            return bad("empty cluster id".into());
        }
        if self.secret.is_empty() {
            return bad("empty secret".into());
        }
        if !(1..=max).contains(&self.node_id) {
            return bad(format!("node id {} outside 1..={max}", self.node_id));
        }
        if self.peers.contains_key(&self.node_id) {
            return bad(format!("peers include our own id {}", self.node_id));
        }
        if let Some(id) = self.peers.keys().find(|&&id| !(1..=max).contains(&id)) {
            return bad(format!("peer id {id} outside 1..={max}"));
        }
        Ok(())
    }
}

/// Tuning of the mesh. The defaults suit production; tests shorten them.
#[derive(Clone, Debug)]
pub struct MeshOptions {
    /// Connect, and separately the whole handshake, must finish within this.
    pub handshake_timeout: Duration,
    /// First reconnect delay; doubles up to `backoff_max` (with jitter:
    /// the actual delay is between half and all of the current backoff).
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// An idle link sends a `Ping` this often.
    pub ping_interval: Duration,
    /// A link that received nothing for this long is closed (and re-dialed).
    pub idle_timeout: Duration,
    /// Per-peer outgoing queue; beyond it, `send` drops.
    pub send_queue: usize,
    /// Capacity of the inbound channel returned by `start`.
    pub inbound_queue: usize,
    /// Randomness for reconnect jitter and handshake nonces: the OS's by
    /// default; seeded only under a simulated network.
    pub rng: MeshRng,
    /// Spawn the mesh's tasks on the current `LocalSet` (a simulated host):
    /// a crash then drops them in spawn order. Runtime tasks are dropped in
    /// an order derived from tokio's process-wide task ids, which tasks of
    /// other threads shift, so a seed's run depended on its neighbours.
    pub local_tasks: bool,
}

impl Default for MeshOptions {
    fn default() -> MeshOptions {
        MeshOptions {
            handshake_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            ping_interval: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(5),
            send_queue: 4096,
            inbound_queue: 4096,
            rng: MeshRng::os(),
            local_tasks: false,
        }
    }
}

/// Counters since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeshStats {
    /// Messages queued to a peer's link by `send`.
    pub sent: u64,
    /// Messages `send` dropped: no live link, full queue, unknown peer, or too large.
    pub dropped: u64,
    /// Messages received from peers.
    pub received: u64,
    /// Authenticated links brought up.
    pub links_established: u64,
    /// Handshakes that failed, on either side (refused, bad proof, timeout, bad frames).
    pub handshake_failures: u64,
    /// Established links closed because of an undecodable or unexpected frame.
    pub bad_frames: u64,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    dropped: AtomicU64,
    received: AtomicU64,
    links_established: AtomicU64,
    handshake_failures: AtomicU64,
    bad_frames: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

struct Link {
    id: u64,
    tx: mpsc::Sender<Message>,
}

struct Shared {
    cfg: MeshConfig,
    opts: MeshOptions,
    /// One slot per peer; `Some` while an authenticated link is live.
    links: BTreeMap<NodeId, Mutex<Option<Link>>>,
    /// Bitmask of `links` that are `Some` (a `NodeSet`), updated under the slot's lock.
    connected: AtomicU32,
    next_link: AtomicU64,
    counters: Counters,
    inbound: mpsc::Sender<(NodeId, Message)>,
    cancel: CancellationToken,
}

impl Shared {
    fn identity(&self) -> Identity<'_> {
        Identity {
            cluster_id: &self.cfg.cluster_id,
            node_id: self.cfg.node_id,
            secret: &self.cfg.secret,
            peers: &self.cfg.peers,
            rng: &self.opts.rng,
        }
    }

    fn slot(&self, peer: NodeId) -> std::sync::MutexGuard<'_, Option<Link>> {
        self.links[&peer]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running mesh. Clones share it; the mesh stops at [`Mesh::shutdown`]
/// or when the last clone is dropped.
#[derive(Clone)]
pub struct Mesh {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    tracker: TaskTracker,
    local_addr: SocketAddr,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.cancel.cancel();
    }
}

impl Mesh {
    /// Binds the listener (error if the address is taken) and starts
    /// dialing/accepting in background tasks, over TCP with default options.
    pub async fn start(cfg: MeshConfig) -> io::Result<(Mesh, mpsc::Receiver<(NodeId, Message)>)> {
        Mesh::start_with(cfg, MeshOptions::default(), TcpTransport).await
    }

    /// [`Mesh::start`] with explicit options and transport.
    pub async fn start_with<T: Transport>(
        cfg: MeshConfig,
        opts: MeshOptions,
        transport: T,
    ) -> io::Result<(Mesh, mpsc::Receiver<(NodeId, Message)>)> {
        cfg.validate()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let listener = transport.bind(cfg.listen).await?;
        let local_addr = listener.local_addr()?;
        let (inbound, rx) = mpsc::channel(opts.inbound_queue.max(1));
        let links = cfg.peers.keys().map(|&p| (p, Mutex::new(None))).collect();
        let shared = Arc::new(Shared {
            cfg,
            opts,
            links,
            connected: AtomicU32::new(0),
            next_link: AtomicU64::new(0),
            counters: Counters::default(),
            inbound,
            cancel: CancellationToken::new(),
        });
        let tracker = TaskTracker::new();
        info!(
            node = shared.cfg.node_id,
            cluster = %shared.cfg.cluster_id,
            listen = %local_addr,
            "mesh started"
        );
        spawn_task(
            &shared,
            &tracker,
            accept_loop(shared.clone(), listener, tracker.clone()),
        );
        let me = shared.cfg.node_id;
        for (&peer, &addr) in shared.cfg.peers.range(me.saturating_add(1)..) {
            let dial = dial_loop(shared.clone(), transport.clone(), peer, addr);
            spawn_task(&shared, &tracker, dial);
        }
        let mesh = Mesh {
            inner: Arc::new(Inner {
                shared,
                tracker,
                local_addr,
            }),
        };
        Ok((mesh, rx))
    }

    /// Never blocks: queues `msg` to the peer's link. If the peer has no
    /// live link, its queue is full, or it is not a configured peer, the
    /// message is dropped and counted.
    pub fn send(&self, to: NodeId, msg: Message) {
        let s = &self.inner.shared;
        let queued = match s.links.get(&to) {
            None => {
                debug!(
                    to,
                    kind = msg.kind(),
                    "mesh: message to an unknown peer dropped"
                );
                false
            }
            Some(_) => match s.slot(to).as_ref() {
                Some(link) => link.tx.try_send(msg).is_ok(),
                None => false,
            },
        };
        bump(if queued {
            &s.counters.sent
        } else {
            &s.counters.dropped
        });
    }

    /// Peers with an authenticated live link now.
    pub fn connected(&self) -> NodeSet {
        NodeSet(self.inner.shared.connected.load(Ordering::Acquire))
    }

    /// The address the listener is bound to (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    pub fn node_id(&self) -> NodeId {
        self.inner.shared.cfg.node_id
    }

    pub fn stats(&self) -> MeshStats {
        let c = &self.inner.shared.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MeshStats {
            sent: g(&c.sent),
            dropped: g(&c.dropped),
            received: g(&c.received),
            links_established: g(&c.links_established),
            handshake_failures: g(&c.handshake_failures),
            bad_frames: g(&c.bad_frames),
        }
    }

    /// Stops every task, closes the listener and all links, and waits for
    /// them. Other clones of this `Mesh` are stopped too.
    pub async fn shutdown(self) {
        let tracker = self.inner.tracker.clone();
        self.inner.shared.cancel.cancel();
        tracker.close();
        tracker.wait().await;
        info!(node = self.inner.shared.cfg.node_id, "mesh stopped");
    }
}

/// Runs `f` with a timeout, unless the mesh shuts down first (`None`).
async fn guarded<F: Future>(
    cancel: &CancellationToken,
    limit: Duration,
    f: F,
) -> Option<Result<F::Output, tokio::time::error::Elapsed>> {
    tokio::select! {
        biased;
        _ = cancel.cancelled() => None,
        r = tokio::time::timeout(limit, f) => Some(r),
    }
}

/// Sleeps, unless the mesh shuts down first (`false`).
async fn pause(cancel: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        biased;
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

fn jittered(rng: &MeshRng, backoff: Duration) -> Duration {
    let ms = backoff.as_millis() as u64;
    let half = ms / 2;
    Duration::from_millis(half + rng.range_inclusive(0, ms - half))
}

fn spawn_task<F>(shared: &Shared, tracker: &TaskTracker, task: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    if shared.opts.local_tasks {
        tracker.spawn_local(task);
    } else {
        tracker.spawn(task);
    }
}

async fn accept_loop<L: Listener>(shared: Arc<Shared>, mut listener: L, tracker: TaskTracker) {
    loop {
        let r = tokio::select! {
            biased;
            _ = shared.cancel.cancelled() => break,
            r = listener.accept() => r,
        };
        match r {
            Ok((stream, addr)) => {
                debug!(peer_addr = %addr, "mesh: connection accepted");
                spawn_task(&shared, &tracker, accepted(shared.clone(), stream, addr));
            }
            Err(e) => {
                warn!(error = %e, "mesh: accept failed");
                if !pause(&shared.cancel, Duration::from_millis(50)).await {
                    break;
                }
            }
        }
    }
}

async fn accepted<S>(shared: Arc<Shared>, stream: S, addr: SocketAddr)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut io = Framed::new(stream, frame::codec());
    let limit = shared.opts.handshake_timeout;
    let r = match guarded(
        &shared.cancel,
        limit,
        handshake::accept(&mut io, &shared.identity()),
    )
    .await
    {
        None => return,
        Some(Ok(r)) => r,
        Some(Err(_)) => Err(HandshakeError::Timeout),
    };
    match r {
        Ok(peer) => run_link(&shared, peer, io, addr).await,
        Err(e) => {
            bump(&shared.counters.handshake_failures);
            warn!(
                node = shared.cfg.node_id,
                peer_addr = %addr,
                reason = %e,
                "mesh: incoming connection refused"
            );
        }
    }
}

enum DialError {
    Connect(io::Error),
    Handshake(HandshakeError),
}

async fn dial_loop<T: Transport>(
    shared: Arc<Shared>,
    transport: T,
    peer: NodeId,
    addr: SocketAddr,
) {
    let opts = shared.opts.clone();
    let mut backoff = opts.backoff_min;
    let mut last_error: Option<String> = None;
    loop {
        let attempt = async {
            let stream =
                match tokio::time::timeout(opts.handshake_timeout, transport.connect(addr)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => return Err(DialError::Connect(e)),
                    Err(_) => {
                        return Err(DialError::Connect(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "connect timed out",
                        )))
                    }
                };
            let mut io = Framed::new(stream, frame::codec());
            let id = shared.identity();
            match tokio::time::timeout(opts.handshake_timeout, handshake::dial(&mut io, &id, peer))
                .await
            {
                Ok(Ok(())) => Ok(io),
                Ok(Err(e)) => Err(DialError::Handshake(e)),
                Err(_) => Err(DialError::Handshake(HandshakeError::Timeout)),
            }
        };
        let r = tokio::select! {
            biased;
            _ = shared.cancel.cancelled() => break,
            r = attempt => r,
        };
        match r {
            Ok(io) => {
                last_error = None;
                backoff = opts.backoff_min;
                run_link(&shared, peer, io, addr).await;
                if shared.cancel.is_cancelled() {
                    break;
                }
            }
            Err(DialError::Connect(e)) => {
                let msg = e.to_string();
                if last_error.as_deref() != Some(msg.as_str()) {
                    info!(node = shared.cfg.node_id, peer, peer_addr = %addr, error = %e,
                        "mesh: cannot connect to peer; retrying");
                } else {
                    debug!(node = shared.cfg.node_id, peer, peer_addr = %addr, error = %e,
                        "mesh: cannot connect to peer; retrying");
                }
                last_error = Some(msg);
            }
            Err(DialError::Handshake(e)) => {
                bump(&shared.counters.handshake_failures);
                warn!(
                    node = shared.cfg.node_id,
                    peer,
                    peer_addr = %addr,
                    reason = %e,
                    "mesh: handshake with peer failed"
                );
                last_error = Some(e.to_string());
            }
        }
        if !pause(&shared.cancel, jittered(&opts.rng, backoff)).await {
            break;
        }
        backoff = (backoff * 2).min(opts.backoff_max);
    }
}

/// Why a link went down, and whether that deserves a warning.
struct Down {
    reason: String,
    warn: bool,
}

impl Down {
    fn info(reason: impl Into<String>) -> Down {
        Down {
            reason: reason.into(),
            warn: false,
        }
    }
    fn warn(reason: impl Into<String>) -> Down {
        Down {
            reason: reason.into(),
            warn: true,
        }
    }
}

/// Runs an authenticated link until it fails, is superseded, or the mesh
/// shuts down.
async fn run_link<S>(shared: &Shared, peer: NodeId, io: FramedStream<S>, addr: SocketAddr)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let me = shared.cfg.node_id;
    let opts = &shared.opts;
    let (tx, mut rx) = mpsc::channel::<Message>(opts.send_queue.max(1));
    let link_id = shared.next_link.fetch_add(1, Ordering::Relaxed);
    {
        let mut slot = shared.slot(peer);
        // A previous link to this peer (if any) is superseded: dropping its
        // sender ends its writer.
        *slot = Some(Link { id: link_id, tx });
        shared
            .connected
            .fetch_or(NodeSet::single(peer).0, Ordering::AcqRel);
    }
    bump(&shared.counters.links_established);
    info!(node = me, peer, peer_addr = %addr, "mesh: link up");

    let (mut sink, mut stream) = io.split();
    let writer = async {
        loop {
            let first = match tokio::time::timeout(opts.ping_interval, rx.recv()).await {
                Ok(Some(m)) => Frame::Msg(m),
                Ok(None) => return Down::info("superseded by a newer link"),
                Err(_) => Frame::Ping,
            };
            let mut next = Some(first);
            while let Some(f) = next.take() {
                match frame::encode(&f) {
                    Ok(b) => {
                        if let Err(e) = sink.feed(b).await {
                            return Down::info(format!("write failed: {e}"));
                        }
                    }
                    Err(e) => {
                        bump(&shared.counters.dropped);
                        warn!(node = me, peer, error = %e, "mesh: message dropped");
                    }
                }
                next = rx.try_recv().ok().map(Frame::Msg);
            }
            if let Err(e) = sink.flush().await {
                return Down::info(format!("write failed: {e}"));
            }
        }
    };
    let reader = async {
        loop {
            let body = match tokio::time::timeout(opts.idle_timeout, stream.next()).await {
                Err(_) => {
                    return Down::warn(format!("nothing received for {:?}", opts.idle_timeout))
                }
                Ok(None) => return Down::info("closed by the peer"),
                Ok(Some(Err(e))) if e.kind() == io::ErrorKind::InvalidData => {
                    bump(&shared.counters.bad_frames);
                    return Down::warn(format!("bad frame: {e}"));
                }
                Ok(Some(Err(e))) => return Down::info(format!("read failed: {e}")),
                Ok(Some(Ok(b))) => b,
            };
            match frame::decode(&body) {
                Ok(Frame::Msg(m)) => {
                    bump(&shared.counters.received);
                    // The driver's queue applies backpressure to this link.
                    // If the driver is gone, messages are discarded.
                    let _ = shared.inbound.send((peer, m)).await;
                }
                Ok(Frame::Ping) => {}
                Ok(Frame::Refused { reason }) => {
                    return Down::warn(format!("refused by the peer: {reason}"))
                }
                Ok(f) => {
                    bump(&shared.counters.bad_frames);
                    return Down::warn(format!("unexpected {} frame on a live link", f.kind()));
                }
                Err(e) => {
                    bump(&shared.counters.bad_frames);
                    return Down::warn(format!("bad frame: {e}"));
                }
            }
        }
    };
    let down = tokio::select! {
        biased;
        _ = shared.cancel.cancelled() => Down::info("mesh shutting down"),
        d = reader => d,
        d = writer => d,
    };
    {
        let mut slot = shared.slot(peer);
        if slot.as_ref().is_some_and(|l| l.id == link_id) {
            *slot = None;
            shared
                .connected
                .fetch_and(!NodeSet::single(peer).0, Ordering::AcqRel);
        }
    }
    if down.warn {
        warn!(node = me, peer, peer_addr = %addr, reason = %down.reason, "mesh: link down");
    } else {
        info!(node = me, peer, peer_addr = %addr, reason = %down.reason, "mesh: link down");
    }
}
