//! The control-plane mesh over loopback TCP: exchange, authentication
//! refusals, garbage, restarts, unreachable peers.

use mm_core::{Message, NodeId, NodeSet};
use mm_runtime::mesh::{Mesh, MeshConfig, MeshOptions, TcpTransport};
use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc::Receiver;
use tracing_subscriber::fmt::MakeWriter;

type Inbox = Receiver<(NodeId, Message)>;

const CLUSTER: &str = "test-cluster";
const SECRET: &[u8] = b"shared secret";

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// An address nobody dials: lower ids are never dialed, only admitted.
fn unused() -> SocketAddr {
    "127.0.0.1:1".parse().unwrap()
}

fn cfg(id: NodeId, listen: SocketAddr, peers: &[(NodeId, SocketAddr)]) -> MeshConfig {
    MeshConfig {
        cluster_id: CLUSTER.to_string(),
        node_id: id,
        listen,
        peers: peers.iter().copied().collect::<BTreeMap<_, _>>(),
        secret: SECRET.to_vec(),
    }
}

fn opts() -> MeshOptions {
    MeshOptions {
        handshake_timeout: Duration::from_millis(500),
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        ping_interval: Duration::from_millis(200),
        idle_timeout: Duration::from_secs(2),
        ..MeshOptions::default()
    }
}

async fn start(c: MeshConfig) -> (Mesh, Inbox) {
    Mesh::start_with(c, opts(), TcpTransport).await.unwrap()
}

fn init_log() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "mm_runtime=info".into()),
        )
        .try_init();
}

/// Fails the test instead of hanging.
async fn within<F: Future>(secs: u64, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("test timed out")
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn set(ids: &[NodeId]) -> NodeSet {
    ids.iter().copied().collect()
}

fn msg(n: u64) -> Message {
    Message::Propose {
        num: n,
        members: NodeSet::first_n(3),
    }
}

async fn recv(rx: &mut Inbox) -> (NodeId, Message) {
    tokio::time::timeout(Duration::from_secs(3), rx.recv())
        .await
        .expect("no message within 3 s")
        .expect("inbox closed")
}

async fn assert_silent(rx: &mut Inbox, ms: u64) {
    if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(ms), rx.recv()).await {
        panic!("unexpected message {m:?}");
    }
}

/// Starts nodes 3, 2, 1 (acceptors first, so dialers know their ports).
async fn three() -> [(Mesh, Inbox); 3] {
    let m3 = start(cfg(3, any_port(), &[(1, unused()), (2, unused())])).await;
    let a3 = m3.0.local_addr();
    let m2 = start(cfg(2, any_port(), &[(1, unused()), (3, a3)])).await;
    let a2 = m2.0.local_addr();
    let m1 = start(cfg(1, any_port(), &[(2, a2), (3, a3)])).await;
    [m1, m2, m3]
}

#[tokio::test]
async fn three_meshes_exchange_messages_both_ways() {
    init_log();
    within(10, async {
        let [(m1, mut r1), (m2, mut r2), (m3, mut r3)] = three().await;
        wait_until("full mesh", || {
            m1.connected() == set(&[2, 3])
                && m2.connected() == set(&[1, 3])
                && m3.connected() == set(&[1, 2])
        })
        .await;

        let meshes = [&m1, &m2, &m3];
        for (i, from) in meshes.iter().enumerate() {
            for to in 1..=3u8 {
                if to as usize != i + 1 {
                    from.send(to, msg(10 * (i as u64 + 1) + to as u64));
                }
            }
        }
        for (me, rx) in [(1u64, &mut r1), (2, &mut r2), (3, &mut r3)] {
            let mut got = vec![recv(rx).await, recv(rx).await];
            got.sort_by_key(|(from, _)| *from);
            let want: Vec<_> = (1..=3u64)
                .filter(|&f| f != me)
                .map(|f| (f as NodeId, msg(10 * f + me)))
                .collect();
            assert_eq!(got, want, "node {me}");
        }

        // Order is kept on a link, in both directions.
        for n in 0..500 {
            m1.send(3, msg(n));
            m3.send(1, msg(n));
        }
        for n in 0..500 {
            assert_eq!(recv(&mut r3).await, (1, msg(n)));
            assert_eq!(recv(&mut r1).await, (3, msg(n)));
        }
        let s1 = m1.stats();
        assert_eq!(s1.dropped, 0);
        assert_eq!(s1.sent, 502);
        assert_eq!(s1.received, 502);
        assert_eq!(s1.handshake_failures, 0);
        m1.shutdown().await;
        m2.shutdown().await;
        m3.shutdown().await;
    })
    .await
}

/// Collects the log lines of the current thread's tasks.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Capture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Capture {
        self.clone()
    }
}

/// A subscriber for this thread only (tests run the mesh on a
/// current-thread runtime, so all its tasks log here).
fn capture() -> (Capture, tracing::subscriber::DefaultGuard) {
    let cap = Capture::default();
    let sub = tracing_subscriber::fmt()
        .with_writer(cap.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    (cap, tracing::subscriber::set_default(sub))
}

#[tokio::test]
async fn wrong_secret_is_refused_both_ways() {
    let (log, _guard) = capture();
    within(10, async {
        let (m2, mut r2) = start(cfg(2, any_port(), &[(1, unused())])).await;
        let a2 = m2.local_addr();
        let mut bad = cfg(1, any_port(), &[(2, a2)]);
        bad.secret = b"not the secret".to_vec();
        let (m1, mut r1) = start(bad).await;

        wait_until("refusals on both sides", || {
            m1.stats().handshake_failures >= 2 && m2.stats().handshake_failures >= 2
        })
        .await;
        assert_eq!(m1.connected(), NodeSet::EMPTY);
        assert_eq!(m2.connected(), NodeSet::EMPTY);
        m1.send(2, msg(1));
        m2.send(1, msg(2));
        assert_silent(&mut r2, 200).await;
        assert_silent(&mut r1, 0).await;
        assert_eq!(m1.stats().dropped, 1);
        assert_eq!(m1.stats().links_established, 0);
        assert_eq!(m2.stats().links_established, 0);

        let text = log.text();
        // The dialer finds the acceptor's proof wrong and names the address.
        assert!(
            text.contains("WARN")
                && text.contains("node 2 failed to prove the shared secret (wrong secret?)")
                && text.contains(&format!("peer_addr={a2}")),
            "{text}"
        );
        // The acceptor logs the refusal it was told about.
        assert!(
            text.contains("incoming connection refused") && text.contains("authentication failed"),
            "{text}"
        );
        m1.shutdown().await;
        m2.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn acceptor_with_wrong_secret_is_refused_by_dialer_and_vice_versa() {
    // The other half: the acceptor is the impostor; a correct third node still links.
    init_log();
    within(10, async {
        let mut c3 = cfg(3, any_port(), &[(1, unused()), (2, unused())]);
        c3.secret = b"impostor".to_vec();
        let (m3, _r3) = start(c3).await;
        let (m2, mut r2) = start(cfg(2, any_port(), &[(1, unused()), (3, m3.local_addr())])).await;
        let (m1, _r1) = start(cfg(
            1,
            any_port(),
            &[(2, m2.local_addr()), (3, m3.local_addr())],
        ))
        .await;
        wait_until("1-2 link and refusals of 3", || {
            m1.connected() == set(&[2]) && m3.stats().handshake_failures >= 2
        })
        .await;
        assert_eq!(m3.connected(), NodeSet::EMPTY);
        m1.send(2, msg(7));
        assert_eq!(recv(&mut r2).await, (1, msg(7)));
        m1.shutdown().await;
        m2.shutdown().await;
        m3.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn wrong_cluster_id_is_refused() {
    let (log, _guard) = capture();
    within(10, async {
        let (m2, mut r2) = start(cfg(2, any_port(), &[(1, unused())])).await;
        let mut other = cfg(1, any_port(), &[(2, m2.local_addr())]);
        other.cluster_id = "other-cluster".into();
        let (m1, _r1) = start(other).await;
        wait_until("refusal", || m2.stats().handshake_failures >= 1).await;
        assert_eq!(m1.connected(), NodeSet::EMPTY);
        assert_eq!(m2.connected(), NodeSet::EMPTY);
        m1.send(2, msg(1));
        assert_silent(&mut r2, 200).await;
        let text = log.text();
        assert!(
            text.contains("wrong cluster id \\\"other-cluster\\\"")
                || text.contains("wrong cluster id \"other-cluster\""),
            "{text}"
        );
        m1.shutdown().await;
        m2.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn unknown_own_and_reversed_node_ids_are_refused() {
    let (log, _guard) = capture();
    within(10, async {
        // Node 3 knows only node 2: node 1 is unknown to it.
        let (m3, _r3) = start(cfg(3, any_port(), &[(2, unused())])).await;
        let (m1, _r1) = start(cfg(1, any_port(), &[(3, m3.local_addr())])).await;
        // A node claiming id 4 dials "node 5", which is really another node 4.
        let (m4, _r4) = start(cfg(4, any_port(), &[(1, unused())])).await;
        let (m4b, _r4b) = start(cfg(4, any_port(), &[(5, m4.local_addr())])).await;
        // A misconfigured node 3 dials "node 4", which is really node 2: only lower ids dial.
        let (m2, _r2) = start(cfg(2, any_port(), &[(3, unused())])).await;
        let (m3b, _r3b) = start(cfg(3, any_port(), &[(4, m2.local_addr())])).await;
        wait_until("refusals", || {
            m3.stats().handshake_failures >= 1
                && m4.stats().handshake_failures >= 1
                && m2.stats().handshake_failures >= 1
        })
        .await;
        for m in [&m1, &m2, &m3, &m3b, &m4, &m4b] {
            assert_eq!(m.connected(), NodeSet::EMPTY);
        }
        let text = log.text();
        assert!(text.contains("unknown node id 1"), "{text}");
        assert!(text.contains("peer claims our own node id 4"), "{text}");
        assert!(
            text.contains("node 3 dialed node 2, but only the lower id dials"),
            "{text}"
        );
        for m in [m1, m2, m3, m3b, m4, m4b] {
            m.shutdown().await;
        }
    })
    .await
}

/// Writes `bytes` to a raw connection and expects the mesh to close it.
async fn garbage(addr: SocketAddr, bytes: &[u8]) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {} // e.g. a Refused frame
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "mesh kept a garbage connection open: {bytes:?}"
    );
}

#[tokio::test]
async fn garbage_is_refused_and_the_mesh_keeps_serving() {
    init_log();
    within(15, async {
        let (m2, mut r2) = start(cfg(2, any_port(), &[(1, unused())])).await;
        let a2 = m2.local_addr();

        let mut wrong_version = vec![0, 0, 0, 3, 99];
        wrong_version.extend_from_slice(&[1, 2]);
        let cases: Vec<Vec<u8>> = vec![
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), // length prefix way over the limit
            vec![0x7f, 0xff, 0xff, 0xff, 1, 2, 3],         // oversized frame
            wrong_version,                                 // unknown protocol version
            vec![0, 0, 0, 4, 1, 0xff, 0xff, 0xff],         // version 1, undecodable body
            vec![0, 0, 0, 0],                              // empty frame
            vec![0, 0, 0, 2, 1, 5],                        // decodes to a Welcome: wrong step
            vec![0, 0],                                    // incomplete: handshake timeout
            vec![],                                        // silent: handshake timeout
        ];
        let n = cases.len() as u64;
        for c in &cases {
            garbage(a2, c).await;
        }
        wait_until("all refusals counted", || {
            m2.stats().handshake_failures == n
        })
        .await;
        assert_eq!(m2.connected(), NodeSet::EMPTY);

        // A real peer still gets in, and messages flow both ways.
        let (m1, mut r1) = start(cfg(1, any_port(), &[(2, a2)])).await;
        wait_until("link", || {
            m1.connected() == set(&[2]) && m2.connected() == set(&[1])
        })
        .await;
        m1.send(2, msg(1));
        m2.send(1, msg(2));
        assert_eq!(recv(&mut r2).await, (1, msg(1)));
        assert_eq!(recv(&mut r1).await, (2, msg(2)));
        m1.shutdown().await;
        m2.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn restarted_peers_are_reconnected() {
    init_log();
    within(15, async {
        let (m2, _r2) = start(cfg(2, any_port(), &[(1, unused())])).await;
        let a2 = m2.local_addr();
        let (m1, mut r1) = start(cfg(1, any_port(), &[(2, a2)])).await;
        let a1 = m1.local_addr();
        wait_until("link", || m1.connected() == set(&[2])).await;

        // The acceptor restarts on the same address: the dialer notices and redials.
        m2.shutdown().await;
        wait_until("link down", || m1.connected().is_empty()).await;
        m1.send(2, msg(0)); // dropped, not queued for later
        let (m2, mut r2) = start(cfg(2, a2, &[(1, unused())])).await;
        wait_until("relink", || {
            m1.connected() == set(&[2]) && m2.connected() == set(&[1])
        })
        .await;
        m1.send(2, msg(1));
        m2.send(1, msg(2));
        assert_eq!(recv(&mut r2).await, (1, msg(1)));
        assert_eq!(recv(&mut r1).await, (2, msg(2)));
        assert!(m1.stats().dropped >= 1);
        assert_eq!(m1.stats().links_established, 2);

        // The dialer restarts: the acceptor sees the link go and come back.
        m1.shutdown().await;
        wait_until("link down", || m2.connected().is_empty()).await;
        let (m1, mut r1) = start(cfg(1, a1, &[(2, a2)])).await;
        wait_until("relink", || {
            m1.connected() == set(&[2]) && m2.connected() == set(&[1])
        })
        .await;
        m1.send(2, msg(3));
        m2.send(1, msg(4));
        assert_eq!(recv(&mut r2).await, (1, msg(3)));
        assert_eq!(recv(&mut r1).await, (2, msg(4)));
        m1.shutdown().await;
        m2.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn unreachable_peer_is_retried_while_others_work() {
    init_log();
    within(15, async {
        // An address with nothing listening (connection refused).
        let dead = {
            let l = std::net::TcpListener::bind(any_port()).unwrap();
            l.local_addr().unwrap()
        };
        let (m2, mut r2) = start(cfg(2, any_port(), &[(1, unused()), (3, dead)])).await;
        let (m1, mut r1) = start(cfg(1, any_port(), &[(2, m2.local_addr()), (3, dead)])).await;
        wait_until("1-2 link", || m1.connected() == set(&[2])).await;
        m1.send(2, msg(1));
        m2.send(1, msg(2));
        assert_eq!(recv(&mut r2).await, (1, msg(1)));
        assert_eq!(recv(&mut r1).await, (2, msg(2)));

        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(m1.connected(), set(&[2]));
        assert_eq!(m2.connected(), set(&[1]));
        let dropped = m1.stats().dropped;
        m1.send(3, msg(3)); // never blocks; dropped and counted
        m1.send(9, msg(9)); // not a peer at all
        assert_eq!(m1.stats().dropped, dropped + 2);

        // Node 3 comes up late on that address: both dialers were still retrying.
        let (m3, mut r3) = start(cfg(3, dead, &[(1, unused()), (2, unused())])).await;
        wait_until("node 3 joins", || {
            m1.connected() == set(&[2, 3]) && m2.connected() == set(&[1, 3])
        })
        .await;
        m1.send(3, msg(4));
        m2.send(3, msg(5));
        let mut got = vec![recv(&mut r3).await, recv(&mut r3).await];
        got.sort_by_key(|(f, _)| *f);
        assert_eq!(got, vec![(1, msg(4)), (2, msg(5))]);
        for m in [m1, m2, m3] {
            m.shutdown().await;
        }
    })
    .await
}

#[tokio::test]
async fn start_fails_on_a_taken_address_or_bad_config() {
    let (m, _r) = start(cfg(2, any_port(), &[(1, unused())])).await;
    let taken = m.local_addr();
    assert!(Mesh::start(cfg(1, taken, &[(2, unused())])).await.is_err());
    // Peers must not include ourselves.
    let e = Mesh::start(cfg(1, any_port(), &[(1, unused())]))
        .await
        .err()
        .expect("own id among peers accepted");
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    m.shutdown().await;
}
