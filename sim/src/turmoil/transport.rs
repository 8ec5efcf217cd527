//! The mesh's [`Transport`] over turmoil's simulated TCP, so the runtime's
//! own mesh (handshake, pings, idle timeout, reconnect) runs on turmoil's
//! network with its partitions, holds and latencies.

use mm_runtime::mesh::{Listener, Transport};
use std::io;
use std::net::SocketAddr;

/// Dials and listens on turmoil's network. Only usable inside a turmoil
/// simulation (on a host or client runtime).
#[derive(Clone, Copy, Debug, Default)]
pub struct TurmoilTransport;

/// A turmoil listener behind the mesh's [`Listener`] trait.
pub struct TurmoilListener(::turmoil::net::TcpListener);

impl Transport for TurmoilTransport {
    type Stream = ::turmoil::net::TcpStream;
    type Listener = TurmoilListener;

    async fn bind(&self, addr: SocketAddr) -> io::Result<TurmoilListener> {
        ::turmoil::net::TcpListener::bind(addr)
            .await
            .map(TurmoilListener)
    }

    async fn connect(&self, addr: SocketAddr) -> io::Result<::turmoil::net::TcpStream> {
        ::turmoil::net::TcpStream::connect(addr).await
    }
}

impl Listener for TurmoilListener {
    type Stream = ::turmoil::net::TcpStream;

    async fn accept(&mut self) -> io::Result<(::turmoil::net::TcpStream, SocketAddr)> {
        self.0.accept().await
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
}
