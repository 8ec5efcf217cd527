//! The mutually authenticated mesh handshake.
//!
//! ```text
//! dialer                                   acceptor
//!   Hello{cluster_id, node_id, version, nd} ->
//!                                          checks cluster, id, version
//!   <- Challenge{node_id, na, proof_a}
//! verifies proof_a
//!   Proof{proof_d} ->
//!                                          verifies proof_d
//!   <- Welcome
//! ```
//! A proof is HMAC-SHA256, keyed with the shared secret, over a role label
//! (so one side's proof can never be replayed as the other's), the cluster
//! id, both node ids and both nonces. Proofs are checked in constant time
//! (`Mac::verify_slice`). Either side refuses with `Refused{reason}` and
//! closes.

use super::frame::{self, Frame, FrameError, Nonce, Proof, NONCE_LEN, PROTOCOL_VERSION};
use super::rng::MeshRng;
use futures::{SinkExt, StreamExt};
use hmac::{Hmac, Mac};
use mm_core::NodeId;
use sha2::Sha256;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

type HmacSha256 = Hmac<Sha256>;

pub(crate) type FramedStream<S> = Framed<S, LengthDelimitedCodec>;

/// Why a handshake failed. Displayed in the warn log of the refusal.
#[derive(Debug, Error)]
pub enum HandshakeError {
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("connection closed during the handshake")]
    Closed,
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("unexpected {got} frame (expected {expected})")]
    Unexpected {
        got: &'static str,
        expected: &'static str,
    },
    #[error("wrong cluster id {got:?} (ours is {ours:?})")]
    WrongCluster { got: String, ours: String },
    #[error("unknown node id {0}")]
    UnknownNode(NodeId),
    #[error("peer claims our own node id {0}")]
    OwnId(NodeId),
    #[error("node {peer} dialed node {us}, but only the lower id dials")]
    WrongDirection { peer: NodeId, us: NodeId },
    #[error("expected node {expected} at this address, but it says it is node {got}")]
    WrongPeer { expected: NodeId, got: NodeId },
    #[error("unsupported protocol version {0} (we speak {PROTOCOL_VERSION})")]
    Version(u8),
    #[error("node {0} failed to prove the shared secret (wrong secret?)")]
    BadProof(NodeId),
    #[error("refused by the peer: {0}")]
    RefusedByPeer(String),
    #[error("handshake timed out")]
    Timeout,
}

impl HandshakeError {
    /// What we tell the peer. Authentication failures stay vague.
    fn reason_for_peer(&self) -> String {
        match self {
            HandshakeError::BadProof(_) => "authentication failed".to_string(),
            e => e.to_string(),
        }
    }
}

/// What a node knows to run handshakes.
pub(crate) struct Identity<'a> {
    pub cluster_id: &'a str,
    pub node_id: NodeId,
    pub secret: &'a [u8],
    pub peers: &'a BTreeMap<NodeId, SocketAddr>,
    pub rng: &'a MeshRng,
}

const DIALER: &[u8] = b"dialer";
const ACCEPTOR: &[u8] = b"acceptor";

fn mac(
    secret: &[u8],
    role: &[u8],
    cluster_id: &str,
    dialer: NodeId,
    acceptor: NodeId,
    dialer_nonce: &Nonce,
    acceptor_nonce: &Nonce,
) -> HmacSha256 {
    let mut m = <HmacSha256 as Mac>::new_from_slice(secret).expect("HMAC takes keys of any length");
    m.update(b"mm-mesh-handshake\0");
    m.update(&[PROTOCOL_VERSION]);
    m.update(&(role.len() as u64).to_be_bytes());
    m.update(role);
    m.update(&(cluster_id.len() as u64).to_be_bytes());
    m.update(cluster_id.as_bytes());
    m.update(&[dialer, acceptor]);
    m.update(dialer_nonce);
    m.update(acceptor_nonce);
    m
}

fn nonce(rng: &MeshRng) -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    rng.fill_bytes(&mut n);
    n
}

async fn send<S>(io: &mut FramedStream<S>, f: &Frame) -> Result<(), HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    io.send(frame::encode(f)?).await?;
    Ok(())
}

async fn recv<S>(io: &mut FramedStream<S>) -> Result<Frame, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match io.next().await {
        None => Err(HandshakeError::Closed),
        Some(Err(e)) => Err(e.into()),
        Some(Ok(b)) => match frame::decode(&b)? {
            Frame::Refused { reason } => Err(HandshakeError::RefusedByPeer(reason)),
            f => Ok(f),
        },
    }
}

/// Tells the peer why (best effort) and returns the error.
async fn refuse<S>(io: &mut FramedStream<S>, e: HandshakeError) -> HandshakeError
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ = send(
        io,
        &Frame::Refused {
            reason: e.reason_for_peer(),
        },
    )
    .await;
    e
}

/// Dialer side, towards the node expected to be `peer`.
pub(crate) async fn dial<S>(
    io: &mut FramedStream<S>,
    me: &Identity<'_>,
    peer: NodeId,
) -> Result<(), HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let nd = nonce(me.rng);
    send(
        io,
        &Frame::Hello {
            cluster_id: me.cluster_id.to_string(),
            node_id: me.node_id,
            version: PROTOCOL_VERSION,
            nonce: nd,
        },
    )
    .await?;
    let (got, na, proof_a) = match recv(io).await? {
        Frame::Challenge {
            node_id,
            nonce,
            proof,
        } => (node_id, nonce, proof),
        f => {
            let e = HandshakeError::Unexpected {
                got: f.kind(),
                expected: "Challenge",
            };
            return Err(refuse(io, e).await);
        }
    };
    if got != peer {
        let e = HandshakeError::WrongPeer {
            expected: peer,
            got,
        };
        return Err(refuse(io, e).await);
    }
    let check = mac(
        me.secret,
        ACCEPTOR,
        me.cluster_id,
        me.node_id,
        peer,
        &nd,
        &na,
    );
    if check.verify_slice(&proof_a).is_err() {
        return Err(refuse(io, HandshakeError::BadProof(peer)).await);
    }
    let proof_d: Proof = mac(me.secret, DIALER, me.cluster_id, me.node_id, peer, &nd, &na)
        .finalize()
        .into_bytes()
        .into();
    send(io, &Frame::Proof { proof: proof_d }).await?;
    match recv(io).await? {
        Frame::Welcome => Ok(()),
        f => {
            let e = HandshakeError::Unexpected {
                got: f.kind(),
                expected: "Welcome",
            };
            Err(refuse(io, e).await)
        }
    }
}

/// Acceptor side: returns the authenticated peer's id.
pub(crate) async fn accept<S>(
    io: &mut FramedStream<S>,
    me: &Identity<'_>,
) -> Result<NodeId, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (cluster_id, peer, version, nd) = match recv(io).await? {
        Frame::Hello {
            cluster_id,
            node_id,
            version,
            nonce,
        } => (cluster_id, node_id, version, nonce),
        f => {
            let e = HandshakeError::Unexpected {
                got: f.kind(),
                expected: "Hello",
            };
            return Err(refuse(io, e).await);
        }
    };
    let check = if version != PROTOCOL_VERSION {
        Err(HandshakeError::Version(version))
    } else if cluster_id != me.cluster_id {
        Err(HandshakeError::WrongCluster {
            got: cluster_id,
            ours: me.cluster_id.to_string(),
        })
    } else if peer == me.node_id {
        Err(HandshakeError::OwnId(peer))
    } else if !me.peers.contains_key(&peer) {
        Err(HandshakeError::UnknownNode(peer))
    } else if peer > me.node_id {
        Err(HandshakeError::WrongDirection {
            peer,
            us: me.node_id,
        })
    } else {
        Ok(())
    };
    if let Err(e) = check {
        return Err(refuse(io, e).await);
    }
    let na = nonce(me.rng);
    let proof_a: Proof = mac(
        me.secret,
        ACCEPTOR,
        me.cluster_id,
        peer,
        me.node_id,
        &nd,
        &na,
    )
    .finalize()
    .into_bytes()
    .into();
    send(
        io,
        &Frame::Challenge {
            node_id: me.node_id,
            nonce: na,
            proof: proof_a,
        },
    )
    .await?;
    let proof_d = match recv(io).await? {
        Frame::Proof { proof } => proof,
        f => {
            let e = HandshakeError::Unexpected {
                got: f.kind(),
                expected: "Proof",
            };
            return Err(refuse(io, e).await);
        }
    };
    let check = mac(me.secret, DIALER, me.cluster_id, peer, me.node_id, &nd, &na);
    if check.verify_slice(&proof_d).is_err() {
        return Err(refuse(io, HandshakeError::BadProof(peer)).await);
    }
    send(io, &Frame::Welcome).await?;
    Ok(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_give_different_proofs() {
        let (nd, na) = ([1u8; 32], [2u8; 32]);
        let a = mac(b"k", ACCEPTOR, "c", 1, 2, &nd, &na)
            .finalize()
            .into_bytes();
        let d = mac(b"k", DIALER, "c", 1, 2, &nd, &na)
            .finalize()
            .into_bytes();
        assert_ne!(a, d);
        let other = mac(b"k2", DIALER, "c", 1, 2, &nd, &na)
            .finalize()
            .into_bytes();
        assert_ne!(d, other);
    }
}
