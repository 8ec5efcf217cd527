//! Wire frames of the control-plane mesh.
//!
//! Every frame is length-prefixed (4-byte big-endian length, tokio-util
//! `LengthDelimitedCodec`, at most [`MAX_FRAME_LEN`] bytes) and carries one
//! byte of protocol version followed by a postcard-encoded [`Frame`].

use bytes::{Bytes, BytesMut};
use mm_core::{Message, NodeId};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio_util::codec::LengthDelimitedCodec;

/// Version of the frame encoding and handshake. A frame with another
/// version byte closes the connection.
pub const PROTOCOL_VERSION: u8 = 1;

/// Largest frame body accepted or sent.
pub const MAX_FRAME_LEN: usize = 1 << 20;

/// Length of handshake nonces and HMAC-SHA256 proofs.
pub const NONCE_LEN: usize = 32;
pub const PROOF_LEN: usize = 32;

pub type Nonce = [u8; NONCE_LEN];
pub type Proof = [u8; PROOF_LEN];

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// Dialer → acceptor: who I am, and my nonce.
    Hello {
        cluster_id: String,
        node_id: NodeId,
        version: u8,
        nonce: Nonce,
    },
    /// Acceptor → dialer: who I am, my nonce, and my proof of the secret.
    Challenge {
        node_id: NodeId,
        nonce: Nonce,
        proof: Proof,
    },
    /// Dialer → acceptor: my proof of the secret.
    Proof { proof: Proof },
    /// Acceptor → dialer: the link is up.
    Welcome,
    /// Either side: the handshake failed, and why.
    Refused { reason: String },
    /// Keepalive on an idle link.
    Ping,
    /// A protocol message.
    Msg(Message),
}

impl Frame {
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Hello { .. } => "Hello",
            Frame::Challenge { .. } => "Challenge",
            Frame::Proof { .. } => "Proof",
            Frame::Welcome => "Welcome",
            Frame::Refused { .. } => "Refused",
            Frame::Ping => "Ping",
            Frame::Msg(_) => "Msg",
        }
    }
}

#[derive(Debug, Error)]
pub enum FrameError {
    #[error("empty frame")]
    Empty,
    #[error("unknown protocol version {0} (we speak {PROTOCOL_VERSION})")]
    UnknownVersion(u8),
    #[error("undecodable frame: {0}")]
    Decode(postcard::Error),
    #[error("{0} trailing bytes after the frame")]
    Trailing(usize),
    #[error("cannot encode frame: {0}")]
    Encode(postcard::Error),
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_LEN}-byte limit")]
    TooLarge(usize),
}

/// The length-delimited codec with our frame limit.
pub fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME_LEN)
        .new_codec()
}

pub fn encode(frame: &Frame) -> Result<Bytes, FrameError> {
    let mut buf = vec![PROTOCOL_VERSION];
    buf = postcard::to_extend(frame, buf).map_err(FrameError::Encode)?;
    if buf.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(buf.len()));
    }
    Ok(Bytes::from(buf))
}

pub fn decode(body: &BytesMut) -> Result<Frame, FrameError> {
    let (&version, rest) = body.split_first().ok_or(FrameError::Empty)?;
    if version != PROTOCOL_VERSION {
        return Err(FrameError::UnknownVersion(version));
    }
    let (frame, trailing) = postcard::take_from_bytes::<Frame>(rest).map_err(FrameError::Decode)?;
    if !trailing.is_empty() {
        return Err(FrameError::Trailing(trailing.len()));
    }
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects() {
        let f = Frame::Msg(Message::Propose {
            num: 7,
            members: mm_core::NodeSet::first_n(3),
        });
        let b = encode(&f).unwrap();
        assert_eq!(b[0], PROTOCOL_VERSION);
        assert_eq!(decode(&BytesMut::from(&b[..])).unwrap(), f);

        let mut bad = BytesMut::from(&b[..]);
        bad[0] = 99;
        assert!(matches!(decode(&bad), Err(FrameError::UnknownVersion(99))));
        assert!(matches!(decode(&BytesMut::new()), Err(FrameError::Empty)));
        let junk = BytesMut::from(&[PROTOCOL_VERSION, 0xff, 0xff, 0xff][..]);
        assert!(decode(&junk).is_err());
        let mut long = BytesMut::from(&b[..]);
        long.extend_from_slice(&[0]);
        assert!(matches!(decode(&long), Err(FrameError::Trailing(1))));
    }
}
