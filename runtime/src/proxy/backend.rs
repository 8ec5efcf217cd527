//! The connection to the local PostgreSQL a client session relays to: TCP
//! or a Unix socket, as the node's conninfo says.

use std::io;
use std::path::PathBuf;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::frame::{FrameReader, FrameWriter};

/// Where the local PostgreSQL listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendAddr {
    Tcp { host: String, port: u16 },
    Unix { path: PathBuf },
}

impl BackendAddr {
    /// From a libpq-style conninfo: its first host (a directory means a
    /// Unix socket) and port (default 5432).
    pub fn from_conninfo(conninfo: &str) -> Result<BackendAddr, String> {
        let cfg: tokio_postgres::Config = conninfo
            .parse()
            .map_err(|e| format!("invalid postgres.conninfo: {e}"))?;
        let port = cfg.get_ports().first().copied().unwrap_or(5432);
        match cfg.get_hosts().first() {
            None => Ok(BackendAddr::Tcp {
                host: "localhost".into(),
                port,
            }),
            Some(tokio_postgres::config::Host::Tcp(h)) => Ok(BackendAddr::Tcp {
                host: h.clone(),
                port,
            }),
            Some(tokio_postgres::config::Host::Unix(dir)) => Ok(BackendAddr::Unix {
                path: dir.join(format!(".s.PGSQL.{port}")),
            }),
        }
    }
}

pub enum BackendStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

type Halves = (
    FrameReader<Box<dyn AsyncRead + Unpin + Send>>,
    FrameWriter<Box<dyn AsyncWrite + Unpin + Send>>,
);

impl BackendStream {
    pub fn into_split(
        self,
    ) -> (
        Box<dyn AsyncRead + Unpin + Send>,
        Box<dyn AsyncWrite + Unpin + Send>,
    ) {
        match self {
            BackendStream::Tcp(s) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            BackendStream::Unix(s) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
        }
    }
    pub fn into_frames(self) -> Halves {
        let (r, w) = self.into_split();
        (FrameReader::new(r), FrameWriter::new(w))
    }
    pub async fn write_raw(&mut self, b: &[u8]) -> io::Result<()> {
        match self {
            BackendStream::Tcp(s) => s.write_all(b).await,
            BackendStream::Unix(s) => s.write_all(b).await,
        }
    }
}

pub async fn connect_backend(addr: &BackendAddr) -> io::Result<BackendStream> {
    match addr {
        BackendAddr::Tcp { host, port } => {
            let s = TcpStream::connect((host.as_str(), *port)).await?;
            s.set_nodelay(true)?;
            Ok(BackendStream::Tcp(s))
        }
        BackendAddr::Unix { path } => Ok(BackendStream::Unix(UnixStream::connect(path).await?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conninfo_to_address() {
        assert_eq!(
            BackendAddr::from_conninfo("host=127.0.0.1 port=5433 user=postgres").unwrap(),
            BackendAddr::Tcp {
                host: "127.0.0.1".into(),
                port: 5433
            }
        );
        assert_eq!(
            BackendAddr::from_conninfo("host=/tmp/pg port=6000").unwrap(),
            BackendAddr::Unix {
                path: "/tmp/pg/.s.PGSQL.6000".into()
            }
        );
        assert!(BackendAddr::from_conninfo("host='unterminated").is_err());
    }
}
