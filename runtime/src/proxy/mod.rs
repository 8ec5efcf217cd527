//! The client proxy: PostgreSQL's wire protocol on `listen.client`, one
//! backend session on the local PostgreSQL per client session, and the
//! commit path through the protocol core (see [`session`]).
//!
//! - [`frame`]: framing and the messages the proxy says itself (`pgwire`);
//! - [`classify`]: what a statement means for replication;
//! - [`backend`]: reaching the local PostgreSQL;
//! - [`session`]: the per-client relay and commit path.

pub mod backend;
pub mod classify;
pub mod frame;
pub mod session;

use crate::driver::DriverHandle;
use crate::driver::StatusSnapshot;
use crate::pg::hub::Hub;
use backend::BackendAddr;
use mm_core::{ClientId, NodeId};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// What every session of one `mmd` shares.
pub struct ProxyContext {
    pub node_id: NodeId,
    pub nodes: usize,
    pub backend: BackendAddr,
    pub driver: DriverHandle,
    pub hub: Arc<Hub>,
    pub status: watch::Receiver<StatusSnapshot>,
    /// The node's `[visibility]`: sessions' default `mm.wait_peer_commits`.
    pub visibility: crate::config::Visibility,
    next_client: AtomicU64,
}

impl ProxyContext {
    pub fn new(
        node_id: NodeId,
        nodes: usize,
        backend: BackendAddr,
        driver: DriverHandle,
        hub: Arc<Hub>,
        status: watch::Receiver<StatusSnapshot>,
        visibility: crate::config::Visibility,
    ) -> ProxyContext {
        ProxyContext {
            node_id,
            nodes,
            backend,
            driver,
            hub,
            status,
            visibility,
            next_client: AtomicU64::new(1),
        }
    }
}

/// Accept client connections until the listener fails.
pub async fn serve(listener: TcpListener, ctx: Arc<ProxyContext>) -> std::io::Result<()> {
    loop {
        let (sock, _) = listener.accept().await?;
        let id = ClientId(ctx.next_client.fetch_add(1, Ordering::Relaxed));
        tokio::spawn(session::run(sock, ctx.clone(), id));
    }
}
