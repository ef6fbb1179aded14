//! Raw HTTP/2 frames for scripted clients: exactly the frames a test chooses, in the
//! order it chooses, and every frame the server sends back, so a test can check what a
//! real client cannot show (the two GOAWAYs of a graceful shutdown, the error code
//! that cuts off a rapid-reset abuser).
//!
//! Not an HTTP/2 client: no flow control, no HPACK decoder. Requests are GETs encoded
//! with literal fields only; responses are seen as frames.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The client connection preface (RFC 9113 3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Frame types (RFC 9113 6).
pub mod kind {
    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const WINDOW_UPDATE: u8 = 0x8;
}

/// Frame flags.
pub mod flag {
    pub const END_STREAM: u8 = 0x1;
    pub const ACK: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
}

/// Error codes (RFC 9113 7).
pub mod code {
    pub const NO_ERROR: u32 = 0x0;
    pub const CANCEL: u32 = 0x8;
    pub const ENHANCE_YOUR_CALM: u32 = 0xb;
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn encode(&self) -> Vec<u8> {
        let len = self.payload.len();
        assert!(len < 1 << 24, "frame too long");
        let mut out = Vec::with_capacity(9 + len);
        out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
        out.push(self.kind);
        out.push(self.flags);
        out.extend_from_slice(&(self.stream & 0x7fff_ffff).to_be_bytes());
        out.extend_from_slice(&self.payload);
        out
    }

    pub fn is(&self, kind: u8) -> bool {
        self.kind == kind
    }

    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// GOAWAY: (last stream id, error code).
    ///
    /// # Panics
    /// If this is not a well-formed GOAWAY.
    pub fn goaway(&self) -> (u32, u32) {
        assert!(self.is(kind::GOAWAY) && self.payload.len() >= 8, "{self:?}");
        let last = u32::from_be_bytes(self.payload[0..4].try_into().unwrap()) & 0x7fff_ffff;
        let code = u32::from_be_bytes(self.payload[4..8].try_into().unwrap());
        (last, code)
    }

    /// HEADERS of a response: the status, when the block starts with an indexed
    /// `:status` from the static table (RFC 7541 appendix A), as hyper sends them.
    pub fn indexed_status(&self) -> Option<u16> {
        let idx = self.payload.first()? & 0x7f;
        [
            (8, 200),
            (9, 204),
            (10, 206),
            (11, 304),
            (12, 400),
            (13, 404),
            (14, 500),
        ]
        .iter()
        .find(|(i, _)| *i == idx)
        .map(|(_, s)| *s)
    }
}

/// An empty SETTINGS frame: take every default.
pub fn settings() -> Frame {
    Frame {
        kind: kind::SETTINGS,
        flags: 0,
        stream: 0,
        payload: Vec::new(),
    }
}

pub fn settings_ack() -> Frame {
    Frame {
        kind: kind::SETTINGS,
        flags: flag::ACK,
        stream: 0,
        payload: Vec::new(),
    }
}

pub fn ping_ack(payload: &[u8]) -> Frame {
    Frame {
        kind: kind::PING,
        flags: flag::ACK,
        stream: 0,
        payload: payload.to_vec(),
    }
}

pub fn rst_stream(stream: u32, code: u32) -> Frame {
    Frame {
        kind: kind::RST_STREAM,
        flags: 0,
        stream,
        payload: code.to_be_bytes().to_vec(),
    }
}

/// A complete GET request on `stream` (HEADERS with END_STREAM and END_HEADERS).
pub fn get(stream: u32, scheme: &str, authority: &str, path: &str) -> Frame {
    let mut block = vec![0x82]; // :method GET, indexed
    block.push(if scheme == "https" { 0x87 } else { 0x86 });
    for (name_index, value) in [(1u8, authority), (4, path)] {
        // Literal without indexing, indexed name (RFC 7541 6.2.2), short plain value.
        assert!(value.len() < 127, "value too long for this encoder");
        block.push(name_index);
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    Frame {
        kind: kind::HEADERS,
        flags: flag::END_STREAM | flag::END_HEADERS,
        stream,
        payload: block,
    }
}

/// Writes the preface and an empty SETTINGS frame.
///
/// # Errors
/// The write failed.
pub async fn start<W: AsyncWrite + Unpin>(w: &mut W) -> io::Result<()> {
    let mut out = PREFACE.to_vec();
    out.extend(settings().encode());
    w.write_all(&out).await?;
    w.flush().await
}

/// Writes frames in one write.
///
/// # Errors
/// The write failed.
pub async fn send<W: AsyncWrite + Unpin>(w: &mut W, frames: &[Frame]) -> io::Result<()> {
    let out: Vec<u8> = frames.iter().flat_map(Frame::encode).collect();
    w.write_all(&out).await?;
    w.flush().await
}

/// Reads one frame; `None` at a clean end of the stream.
///
/// # Errors
/// The read failed or the stream ended inside a frame.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<Frame>> {
    let mut head = [0u8; 9];
    let mut got = 0;
    while got < head.len() {
        let n = r.read(&mut head[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        got += n;
    }
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok(Some(Frame {
        kind: head[3],
        flags: head[4],
        stream: u32::from_be_bytes(head[5..9].try_into().unwrap()) & 0x7fff_ffff,
        payload,
    }))
}
