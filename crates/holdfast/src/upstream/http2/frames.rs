//! A watch on the frames an HTTP/2 upstream sends: sans-I/O, fed the bytes hyper
//! reads, it reports each `SETTINGS` (for `SETTINGS_MAX_CONCURRENT_STREAMS`) and
//! `GOAWAY` as it arrives.
//!
//! hyper's client hides both: the pool needs the first to count free streams before
//! it hands out more than the upstream takes, and the second to stop handing out a
//! connection the moment the upstream says it is going away, not at the next request.
//! Only frame headers are parsed (RFC 9113 4.1); payloads are skipped except the few
//! bytes of those two. Not a validator: h2 itself rejects a malformed stream.

/// Frame types (RFC 9113 6).
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;
/// `SETTINGS_MAX_CONCURRENT_STREAMS` (RFC 9113 6.5.2).
const MAX_CONCURRENT_STREAMS: u16 = 0x3;
/// SETTINGS payload kept (one parameter is 6 bytes; real peers send a handful).
const KEEP_SETTINGS: usize = 6 * 16;

/// What the watch saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// A SETTINGS frame (not an acknowledgement); `None` when it leaves the limit as it
    /// was.
    Settings { max_concurrent_streams: Option<u32> },
    /// A GOAWAY: streams above `last_stream_id` were not processed.
    GoAway { last_stream_id: u32, code: u32 },
    /// The first frame is not SETTINGS: the peer does not speak HTTP/2 (RFC 9113 3.4).
    NotHttp2,
}

#[derive(Debug)]
pub struct FrameWatch {
    head: [u8; 9],
    /// Header bytes collected; 9 while in a payload.
    have: usize,
    /// Payload bytes still to pass.
    left: usize,
    kind: u8,
    flags: u8,
    keep: Vec<u8>,
    keep_want: usize,
    first: bool,
    stopped: bool,
}

impl Default for FrameWatch {
    fn default() -> Self {
        FrameWatch {
            head: [0; 9],
            have: 0,
            left: 0,
            kind: 0,
            flags: 0,
            keep: Vec::new(),
            keep_want: 0,
            first: true,
            stopped: false,
        }
    }
}

impl FrameWatch {
    /// Takes the next bytes the peer sent, in order, cut anywhere.
    pub fn feed(&mut self, mut buf: &[u8], seen: &mut impl FnMut(Seen)) {
        while !buf.is_empty() && !self.stopped {
            if self.have < 9 {
                let n = (9 - self.have).min(buf.len());
                self.head[self.have..self.have + n].copy_from_slice(&buf[..n]);
                self.have += n;
                buf = &buf[n..];
                if self.have < 9 {
                    return;
                }
                self.start_frame(seen);
                continue;
            }
            let n = self.left.min(buf.len());
            let keep = self.keep_want.saturating_sub(self.keep.len()).min(n);
            self.keep.extend_from_slice(&buf[..keep]);
            self.left -= n;
            buf = &buf[n..];
            if self.left == 0 {
                self.end_frame(seen);
            }
        }
    }

    fn start_frame(&mut self, seen: &mut impl FnMut(Seen)) {
        let h = &self.head;
        self.left = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
        self.kind = h[3];
        self.flags = h[4];
        if std::mem::take(&mut self.first) && self.kind != SETTINGS {
            self.stopped = true;
            seen(Seen::NotHttp2);
            return;
        }
        self.keep.clear();
        self.keep_want = match self.kind {
            SETTINGS if self.flags & ACK == 0 => self.left.min(KEEP_SETTINGS),
            GOAWAY => self.left.min(8),
            _ => 0,
        };
        if self.left == 0 {
            self.end_frame(seen);
        }
    }

    fn end_frame(&mut self, seen: &mut impl FnMut(Seen)) {
        self.have = 0;
        match self.kind {
            SETTINGS if self.flags & ACK == 0 => {
                let max_concurrent_streams = self
                    .keep
                    .chunks_exact(6)
                    .filter(|p| u16::from_be_bytes([p[0], p[1]]) == MAX_CONCURRENT_STREAMS)
                    .map(|p| u32::from_be_bytes([p[2], p[3], p[4], p[5]]))
                    .next_back();
                seen(Seen::Settings {
                    max_concurrent_streams,
                });
            }
            GOAWAY if self.keep.len() == 8 => {
                let k = &self.keep;
                seen(Seen::GoAway {
                    last_stream_id: u32::from_be_bytes([k[0], k[1], k[2], k[3]]) & 0x7fff_ffff,
                    code: u32::from_be_bytes([k[4], k[5], k[6], k[7]]),
                });
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        out.extend([kind, flags]);
        out.extend(stream.to_be_bytes());
        out.extend(payload);
        out
    }

    fn settings(params: &[(u16, u32)]) -> Vec<u8> {
        let mut p = Vec::new();
        for (id, v) in params {
            p.extend(id.to_be_bytes());
            p.extend(v.to_be_bytes());
        }
        frame(SETTINGS, 0, 0, &p)
    }

    /// A server's preface, a SETTINGS ack, HEADERS and DATA of a response, a new limit,
    /// then a GOAWAY with debug data.
    fn conversation() -> Vec<u8> {
        let mut wire = settings(&[(0x4, 65535), (MAX_CONCURRENT_STREAMS, 2), (0x5, 16384)]);
        wire.extend(frame(SETTINGS, ACK, 0, &[]));
        wire.extend(frame(0x1, 0x4, 1, &[0x88]));
        wire.extend(frame(0x0, 0x1, 1, &[b'x'; 300]));
        wire.extend(settings(&[(MAX_CONCURRENT_STREAMS, 7)]));
        wire.extend(settings(&[(0x4, 1)]));
        let mut goaway = 5u32.to_be_bytes().to_vec();
        goaway.extend(0u32.to_be_bytes());
        goaway.extend(b"bye");
        wire.extend(frame(GOAWAY, 0, 0, &goaway));
        wire
    }

    fn expected() -> Vec<Seen> {
        vec![
            Seen::Settings {
                max_concurrent_streams: Some(2),
            },
            Seen::Settings {
                max_concurrent_streams: Some(7),
            },
            Seen::Settings {
                max_concurrent_streams: None,
            },
            Seen::GoAway {
                last_stream_id: 5,
                code: 0,
            },
        ]
    }

    #[test]
    fn reports_settings_and_goaway_whole() {
        let mut w = FrameWatch::default();
        let mut got = Vec::new();
        w.feed(&conversation(), &mut |s| got.push(s));
        assert_eq!(got, expected());
    }

    #[test]
    fn reports_the_same_whatever_the_read_sizes() {
        let wire = conversation();
        for size in 1..=13 {
            let mut w = FrameWatch::default();
            let mut got = Vec::new();
            for chunk in wire.chunks(size) {
                w.feed(chunk, &mut |s| got.push(s));
            }
            assert_eq!(got, expected(), "reads of {size} bytes");
        }
    }

    #[test]
    fn a_peer_that_does_not_start_with_settings_is_not_http2() {
        let mut w = FrameWatch::default();
        let mut got = Vec::new();
        w.feed(b"HTTP/1.1 400 Bad Request\r\n\r\n", &mut |s| got.push(s));
        w.feed(&settings(&[]), &mut |s| got.push(s));
        assert_eq!(got, vec![Seen::NotHttp2]);
    }
}
