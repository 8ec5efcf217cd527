//! PostgreSQL protocol framing for the relay: a tag byte and a length. The
//! proxy forwards most messages as the raw bytes it read (nothing to
//! re-encode, nothing to get wrong); it decodes the few it must understand
//! with `pgwire`'s message types.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::io;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Larger messages are refused: PostgreSQL itself caps most at 1 GB.
pub const MAX_FRAME: usize = 1 << 30;

/// One protocol message: `tag` and the whole frame (tag, length, body).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    pub raw: Bytes,
}

impl Frame {
    pub fn body(&self) -> &[u8] {
        &self.raw[5..]
    }
    pub fn new(tag: u8, body: &[u8]) -> Frame {
        let mut b = BytesMut::with_capacity(body.len() + 5);
        b.put_u8(tag);
        b.put_i32(body.len() as i32 + 4);
        b.put_slice(body);
        Frame {
            tag,
            raw: b.freeze(),
        }
    }
}

/// Reads frames; `next` is cancel-safe (bytes read stay buffered), so it
/// can sit in a `select!`.
pub struct FrameReader<R> {
    io: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(io: R) -> Self {
        FrameReader {
            io,
            buf: BytesMut::with_capacity(16 * 1024),
        }
    }

    /// The next tagged message; `None` at a clean end of stream.
    pub async fn next(&mut self) -> io::Result<Option<Frame>> {
        loop {
            if self.buf.len() >= 5 {
                let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
                if len < 4 || len as usize > MAX_FRAME {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "invalid message length {len} (tag {:?})",
                            self.buf[0] as char
                        ),
                    ));
                }
                let total = len as usize + 1;
                if self.buf.len() >= total {
                    let raw = self.buf.split_to(total).freeze();
                    return Ok(Some(Frame { tag: raw[0], raw }));
                }
                self.buf.reserve(total - self.buf.len());
            }
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(io::ErrorKind::UnexpectedEof.into())
                };
            }
        }
    }

    /// The untagged first message of a connection (startup, SSL request,
    /// cancel request): the whole packet including its length.
    pub async fn next_untagged(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            if self.buf.len() >= 4 {
                let len = i32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
                if !(8..=10_000).contains(&len) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("invalid startup packet length {len}"),
                    ));
                }
                if self.buf.len() >= len as usize {
                    return Ok(Some(self.buf.split_to(len as usize).freeze()));
                }
            }
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(io::ErrorKind::UnexpectedEof.into())
                };
            }
        }
    }

    /// Bytes read but not yet returned (must be empty when the startup
    /// phase hands over).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

/// Buffers outgoing frames until `flush`.
pub struct FrameWriter<W> {
    io: W,
    buf: BytesMut,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(io: W) -> Self {
        FrameWriter {
            io,
            buf: BytesMut::with_capacity(16 * 1024),
        }
    }
    pub fn push_raw(&mut self, raw: &[u8]) {
        self.buf.put_slice(raw);
    }
    pub fn push(&mut self, f: &Frame) {
        self.buf.put_slice(&f.raw);
    }
    pub async fn flush(&mut self) -> io::Result<()> {
        while self.buf.has_remaining() {
            let n = self.io.write(&self.buf).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.buf.advance(n);
        }
        self.io.flush().await
    }
    pub async fn shutdown(&mut self) {
        let _ = self.flush().await;
        let _ = self.io.shutdown().await;
    }
}

/// Messages the proxy says itself, encoded by `pgwire`.
pub mod build {
    use super::Frame;
    use bytes::BytesMut;
    use pgwire::messages::data::NoData;
    use pgwire::messages::extendedquery::BindComplete;
    use pgwire::messages::response::{
        CommandComplete, ErrorResponse, NoticeResponse, ReadyForQuery, TransactionStatus,
    };
    use pgwire::messages::Message;

    fn encode(m: &impl Message) -> Frame {
        let mut b = BytesMut::new();
        m.encode(&mut b).expect("small message encodes");
        let raw = b.freeze();
        Frame { tag: raw[0], raw }
    }

    pub fn ready(status: u8) -> Frame {
        let status = match status {
            b'T' => TransactionStatus::Transaction,
            b'E' => TransactionStatus::Error,
            _ => TransactionStatus::Idle,
        };
        encode(&ReadyForQuery::new(status))
    }
    pub fn command_complete(tag: &str) -> Frame {
        encode(&CommandComplete::new(tag.to_string()))
    }
    pub fn bind_complete() -> Frame {
        encode(&BindComplete::new())
    }
    pub fn no_data() -> Frame {
        encode(&NoData::new())
    }
    fn fields(severity: &str, code: &str, message: &str) -> Vec<(u8, String)> {
        vec![
            (b'S', severity.to_string()),
            (b'V', severity.to_string()),
            (b'C', code.to_string()),
            (b'M', message.to_string()),
        ]
    }
    pub fn error(code: &str, message: &str) -> Frame {
        encode(&ErrorResponse::new(fields("ERROR", code, message)))
    }
    pub fn fatal(code: &str, message: &str) -> Frame {
        encode(&ErrorResponse::new(fields("FATAL", code, message)))
    }
    pub fn notice(message: &str) -> Frame {
        encode(&NoticeResponse::new(fields("NOTICE", "00000", message)))
    }
}

/// The fields of an ErrorResponse or NoticeResponse body.
pub fn parse_fields(body: &[u8]) -> Vec<(u8, String)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < body.len() && body[i] != 0 {
        let t = body[i];
        i += 1;
        let end = body[i..]
            .iter()
            .position(|&c| c == 0)
            .map_or(body.len(), |p| i + p);
        out.push((t, String::from_utf8_lossy(&body[i..end]).into_owned()));
        i = end + 1;
    }
    out
}

/// The SQLSTATE and message of an ErrorResponse body.
pub fn error_summary(body: &[u8]) -> (String, String) {
    let f = parse_fields(body);
    let get = |t: u8| {
        f.iter()
            .find(|(k, _)| *k == t)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    (get(b'C'), get(b'M'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_split_and_garbage_is_an_error() {
        let mut data = Vec::new();
        data.extend_from_slice(&build::ready(b'I').raw);
        data.extend_from_slice(&build::command_complete("COMMIT").raw);
        let mut r = FrameReader::new(&data[..]);
        assert_eq!(r.next().await.unwrap().unwrap().tag, b'Z');
        let c = r.next().await.unwrap().unwrap();
        assert_eq!(c.tag, b'C');
        assert_eq!(c.body(), b"COMMIT\0");
        assert!(r.next().await.unwrap().is_none());

        let garbage = b"GET / HTTP/1.1\r\n\r\n".to_vec();
        let mut r = FrameReader::new(&garbage[..]);
        assert!(r.next().await.is_err());
        let mut r = FrameReader::new(&garbage[..]);
        assert!(r.next_untagged().await.is_err());
    }

    #[test]
    fn error_fields_round_trip() {
        let e = build::error("40001", "try again");
        assert_eq!(
            error_summary(e.body()),
            ("40001".to_string(), "try again".to_string())
        );
    }
}
