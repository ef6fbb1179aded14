//! The client socket under hyper: plain TCP or TLS over it, bytes already read while
//! telling HTTP/2 from HTTP/1.1 replayed first, a note when an HTTP/1 request starts
//! arriving (so the connection's phase leaves `Idle`), and a close with a half-close
//! and a linger.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::timer::StallDeadline;
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;

use super::super::drain::{Parked, Tracked};
use super::{ConnPhase, ConnState, LINGER, PARK_CLOSING, PARK_NONE, PARK_PARKED, PARK_REQUESTED};

/// What the client connection runs over.
pub(super) enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream<RecordWatch>>),
}

impl Transport {
    pub(super) fn tcp(&self) -> &TcpStream {
        match self {
            Transport::Plain(s) => s,
            Transport::Tls(s) => &s.get_ref().0.tcp,
        }
    }

    fn into_tcp(self) -> TcpStream {
        match self {
            Transport::Plain(s) => s,
            Transport::Tls(s) => s.into_inner().0.tcp,
        }
    }
}

/// The TCP socket under a TLS connection, following the TLS record framing of what
/// is read from it (a 5-byte header whose last two bytes give the length of the
/// rest). rustls takes a record's first bytes off the socket as they come and
/// decrypts nothing until it is whole, so a request whose first record has only
/// partly arrived is neither plaintext for hyper nor bytes a peek at the socket
/// would see: [`RecordWatch::mid_record`] is how the connection knows it began.
/// A few comparisons per record read; no syscall.
pub(super) struct RecordWatch {
    tcp: TcpStream,
    /// Bytes of the current record's header seen (0 between records).
    header: u8,
    /// The high byte of the current record's length, once seen.
    len_high: u8,
    /// Bytes of the current record's body still to come.
    body_left: usize,
}

impl RecordWatch {
    pub(super) fn new(tcp: TcpStream) -> Self {
        RecordWatch {
            tcp,
            header: 0,
            len_high: 0,
            body_left: 0,
        }
    }

    /// Whether what was read ends inside a record: the client has begun sending one.
    fn mid_record(&self) -> bool {
        self.header != 0 || self.body_left != 0
    }

    fn note(&mut self, mut read: &[u8]) {
        while !read.is_empty() {
            if self.body_left > 0 {
                let n = self.body_left.min(read.len());
                self.body_left -= n;
                read = &read[n..];
                continue;
            }
            let byte = read[0];
            read = &read[1..];
            match self.header {
                3 => self.len_high = byte,
                4 => self.body_left = usize::from(u16::from_be_bytes([self.len_high, byte])),
                _ => {}
            }
            self.header = (self.header + 1) % 5;
        }
    }
}

impl AsyncRead for RecordWatch {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.tcp).poll_read(cx, buf);
        if res.is_ready() {
            this.note(&buf.filled()[before..]);
        }
        res
    }
}

impl AsyncWrite for RecordWatch {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// The client socket as hyper sees it.
pub(super) struct ClientIo {
    stream: Option<Transport>,
    /// Bytes read before hyper took over (the h2c sniff), handed out first.
    replay: Bytes,
    state: Arc<ConnState>,
    /// HTTP/1 only: bytes arriving on an idle connection start the next request. On
    /// HTTP/2 they may be a PING or a WINDOW_UPDATE; requests are counted by stream.
    mark_reading: bool,
    read_eof: bool,
    /// How long a write that would block has waited: the client stopped reading.
    /// hyper takes no more of a response body while its write buffer is full, so the
    /// body's own deadlines are never looked at again; this one ends the connection.
    write_stall: StallDeadline,
    tracked: Option<Tracked>,
    /// The connection's place under the listener's `max_connections`, held as long as
    /// the socket is served (an upgraded one, a WebSocket, included), given back when
    /// it closes (a lingering close no longer counts).
    _slot: Option<OwnedSemaphorePermit>,
}

impl ClientIo {
    /// Ready when the socket has something to read (or is closed).
    pub(super) fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &self.stream {
            Some(s) => s.tcp().poll_read_ready(cx),
            None => Poll::Ready(Err(io::Error::from(io::ErrorKind::NotConnected))),
        }
    }

    /// Whether the client has sent bytes not read yet, asked of the socket itself (a
    /// peek): tokio's readiness learns of them only at its reactor's next turn, so a
    /// request that arrived since looks like nothing there.
    pub(super) fn has_unread(&self) -> bool {
        let Some(stream) = &self.stream else {
            return false;
        };
        let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
        matches!(socket2::SockRef::from(stream.tcp()).peek(&mut byte), Ok(n) if n > 0)
    }

    /// A response delimited by the close was cut short (see `ConnState::body_cut`):
    /// the connection ends in a reset, never a FIN, which would pass the first part
    /// off as the whole body.
    fn ends_in_reset(&self) -> bool {
        self.state.body_cut.load(Relaxed) && self.state.close_delimited.load(Relaxed)
    }

    /// The client asked to close after its request (`ConnState::client_closes`) and
    /// sent nothing past it while it was served: closing needs no half-close and no
    /// linger. A client that sends on past its close (pipelining, RFC 9112 9.6) gets
    /// both: hyper reads what arrives while it serves the request only until its
    /// buffer holds something, and a close with the rest unread in the socket would
    /// send a reset, which can destroy the answer on its way. What hyper read then
    /// set `heard` (bytes read while busy; on an earlier request of the connection, a
    /// body did, and this errs towards the linger).
    fn sends_nothing_more(&self) -> bool {
        self.state.client_closes.load(Relaxed) && !self.state.heard.load(Relaxed)
    }

    /// Counts the connection parked (in `/metrics`) while the guard lives.
    pub(super) fn parked(&self) -> Option<Parked<'_>> {
        self.tracked.as_ref().map(Tracked::park)
    }

    /// Puts back bytes hyper had read but not used, to be read first.
    pub(super) fn unread(&mut self, bytes: Bytes) {
        if !bytes.is_empty() {
            let mut joined = BytesMut::from(&bytes[..]);
            joined.extend_from_slice(&self.replay);
            self.replay = joined.freeze();
        }
    }

    pub(super) fn new(
        stream: Transport,
        replay: Bytes,
        state: Arc<ConnState>,
        mark_reading: bool,
        tracked: Tracked,
        slot: Option<OwnedSemaphorePermit>,
    ) -> Self {
        ClientIo {
            stream: Some(stream),
            replay,
            state,
            mark_reading,
            read_eof: false,
            write_stall: StallDeadline::default(),
            tracked: Some(tracked),
            _slot: slot,
        }
    }

    /// Notes how a write or flush went. A flush that finished sent everything hyper
    /// had; if a park waited for it, the connection is polled again to park now.
    fn note_write<T>(&mut self, res: &Poll<io::Result<T>>, flushed: bool, cx: &Context<'_>) {
        match res {
            Poll::Pending => self.state.unsent.store(true, Relaxed),
            Poll::Ready(Ok(_)) if flushed && self.state.unsent.load(Relaxed) => {
                self.state.unsent.store(false, Relaxed);
                if self.state.park.load(Relaxed) == PARK_REQUESTED {
                    cx.waker().wake_by_ref();
                }
            }
            _ => {}
        }
        if matches!(res, Poll::Ready(Ok(_))) {
            self.write_stall.progressed();
        }
    }

    /// A write or flush would block: fails once the stall outlasts `send_timeout`.
    fn check_write_stall<T>(
        &mut self,
        res: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        if res.is_ready() {
            return res;
        }
        let timeout = self.state.shared.config.send_timeout.get();
        if self.write_stall.expired(timeout, cx) {
            if !self.state.send_timed_out.swap(true, Relaxed) {
                tracing::info!(client = %self.state.ctx.remote, timeout = ?timeout, "client did not read its response within send_timeout; closing");
            }
            Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "client did not read its response within send_timeout",
            )))
        } else {
            res
        }
    }

    fn stream(&mut self) -> io::Result<Pin<&mut (dyn AsyncReadWrite + Unpin)>> {
        match self.stream.as_mut() {
            Some(Transport::Plain(s)) => Ok(Pin::new(s)),
            Some(Transport::Tls(s)) => Ok(Pin::new(s.as_mut())),
            None => Err(io::Error::from(io::ErrorKind::NotConnected)),
        }
    }
}

trait AsyncReadWrite: AsyncRead + AsyncWrite {}
impl<T: AsyncRead + AsyncWrite> AsyncReadWrite for T {}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.replay.is_empty() {
            let n = this.replay.len().min(buf.remaining());
            buf.put_slice(&this.replay[..n]);
            this.replay.advance(n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let res = this.stream()?.poll_read(cx, buf);
        match res {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                if n == 0 {
                    this.read_eof = true;
                } else if !this.mark_reading {
                    // HTTP/2: heard from (see `ConnState::heard`).
                    this.state.heard.store(true, Relaxed);
                } else {
                    let phase = this.state.phase.load(Relaxed);
                    if phase == ConnPhase::Idle as u8
                    // Empty lines before a request line are ignored (RFC 9112 2.2):
                    // some clients send a CRLF after a body. Alone they start no
                    // request, and leave the connection under the idle rules.
                    && !buf.filled()[before..].iter().all(|&b| b == b'\r' || b == b'\n')
                    {
                        this.state.set(ConnPhase::Reading);
                        // A request arrived: no parking this time.
                        this.state.park.store(PARK_NONE, Relaxed);
                        this.state.woken.store(false, Relaxed);
                    } else if phase == ConnPhase::Busy as u8 {
                        // A request body arriving (see `UploadHold`).
                        this.state.heard.store(true, Relaxed);
                    }
                }
            }
            // Parking: nothing to read on an idle connection, so tell hyper the
            // input ended; it ends the connection cleanly and the socket stays open.
            // Not while hyper still has bytes to send: they would go with it.
            Poll::Pending
                if this.state.park.load(Relaxed) == PARK_REQUESTED
                    && this.state.phase.load(Relaxed) == ConnPhase::Idle as u8
                    && !this.state.unsent.load(Relaxed) =>
            {
                this.state.park.store(PARK_PARKED, Relaxed);
                return Poll::Ready(Ok(()));
            }
            _ => {}
        }
        // HTTP/1 over TLS: a record begun (and not whole) on an idle connection is a
        // request begun, as a partial head is; it is then timed by `header_timeout`,
        // not closed as idle with the request half sent. (A record that turns out
        // to be no request, a key update, is cut at `header_timeout` if nothing
        // follows it.)
        if let Some(Transport::Tls(s)) = &this.stream
            && this.mark_reading
            && s.get_ref().0.mid_record()
            && this.state.phase.load(Relaxed) == ConnPhase::Idle as u8
        {
            this.state.set(ConnPhase::Reading);
        }
        res
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = this.stream()?.poll_write(cx, buf);
        this.note_write(&res, false, cx);
        this.check_write_stall(res, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = this.stream()?.poll_write_vectored(cx, bufs);
        this.note_write(&res, false, cx);
        this.check_write_stall(res, cx)
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Some(Transport::Plain(s)) => s.is_write_vectored(),
            Some(Transport::Tls(s)) => s.is_write_vectored(),
            None => false,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // hyper flushes after writing all it holds.
        let this = self.get_mut();
        let res = this.stream()?.poll_flush(cx);
        this.note_write(&res, true, cx);
        this.check_write_stall(res, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.ends_in_reset() {
            // No FIN (nor close_notify): the drop resets the connection.
            return Poll::Ready(Ok(()));
        }
        match this.state.park.load(Relaxed) {
            // hyper ends a parked connection; the socket is not closing.
            PARK_PARKED => return Poll::Ready(Ok(())),
            // holdfast closes an idle connection (hyper's graceful shutdown, which
            // reads nothing more): a request already in the socket, which tokio's
            // reactor has not reported yet, was sent before any FIN and would be
            // dropped unanswered. Asked once, before anything of the close is sent
            // (TLS: close_notify); if bytes wait, the socket is handed back as in a
            // park, whose own look serves them (see `park` in `conn.rs`). Not while
            // hyper still holds bytes to send: they would go with it.
            PARK_CLOSING => {
                if this.state.phase.load(Relaxed) == ConnPhase::Idle as u8
                    && !this.state.unsent.load(Relaxed)
                    && this.has_unread()
                {
                    this.state.park.store(PARK_PARKED, Relaxed);
                    return Poll::Ready(Ok(()));
                }
                this.state.park.store(PARK_NONE, Relaxed);
            }
            _ => {}
        }
        if this.sends_nothing_more() && matches!(this.stream, Some(Transport::Plain(_))) {
            // The client asked to close and sends nothing more: dropping the socket
            // right after this sends the FIN; a half-close first would be one more
            // syscall per connection.
            return Poll::Ready(Ok(()));
        }
        // TLS: close_notify, then the TCP half-close. The alert is a write like any
        // other: a client that reads nothing leaves the socket full once hyper's last
        // bytes went in, and it would wait there for as long as the client lives.
        let res = this.stream()?.poll_shutdown(cx);
        this.check_write_stall(res, cx)
    }
}

impl Drop for ClientIo {
    fn drop(&mut self) {
        let Some(stream) = self.stream.take() else {
            return;
        };
        if self.ends_in_reset() {
            let _ = socket2::SockRef::from(stream.tcp()).set_linger(Some(Duration::ZERO));
            return;
        }
        if self.read_eof || self.sends_nothing_more() {
            return;
        }
        // Anything unread makes close() send a reset; see whether the client is
        // already gone before paying for a linger task.
        let mut probe = [0u8; 1];
        match stream.tcp().try_read(&mut probe) {
            Ok(0) => return,
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => return,
            _ => {}
        }
        let tracked = self.tracked.take();
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(linger(stream.into_tcp(), tracked));
        }
    }
}

/// Half-closes, then discards what the client still sends until it closes too or
/// the linger time runs out.
async fn linger(mut stream: TcpStream, tracked: Option<Tracked>) {
    use tokio::io::AsyncWriteExt;
    let _lingering = tracked.as_ref().map(Tracked::linger);
    let _ = stream.shutdown().await;
    let deadline = Instant::now() + LINGER;
    let mut buf = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
        if n == 0 {
            break;
        }
    }
}

/// The HTTP/2 connection preface (RFC 9113 3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads until the first bytes either are the HTTP/2 preface (`true`) or cannot be
/// (`false`, at the first byte that differs); returns them for replay.
///
/// # Errors
/// The client closed, or sent too little within `timeout`.
pub(super) async fn sniff_h2_preface(
    stream: &mut TcpStream,
    timeout: Duration,
) -> io::Result<(bool, Bytes)> {
    let mut buf = BytesMut::with_capacity(PREFACE.len());
    let read = async {
        loop {
            let n = buf.len().min(PREFACE.len());
            if buf[..n] != PREFACE[..n] {
                return Ok(false);
            }
            if n == PREFACE.len() {
                return Ok(true);
            }
            if stream.read_buf(&mut buf).await? == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
        }
    };
    let is_h2 = tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
    Ok((is_h2, buf.freeze()))
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::path::Path;

    use tokio::net::TcpListener;
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::super::{ConnState, ListenerShared};
    use super::*;
    use crate::config::Config;
    use crate::proxy::{ConnContext, Proxy, Routing};
    use crate::server::drain::Tracker;

    /// Record framing followed across reads that split headers and bodies anywhere,
    /// several records in one read, and empty records.
    #[tokio::test]
    async fn record_watch_knows_when_a_record_is_begun_and_not_whole() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (_client, accepted) = tokio::join!(
            TcpStream::connect(listener.local_addr().unwrap()),
            listener.accept()
        );
        let mut watch = RecordWatch::new(accepted.unwrap().0);
        // Two records (3 and 0 bytes of body), then one of 256.
        let wire = [
            &[23, 3, 3, 0, 3, 1, 2, 3][..],
            &[23, 3, 3, 0, 0],
            &[23, 3, 3, 1, 0],
            &[7; 256],
        ]
        .concat();
        for split in 0..=wire.len() {
            let (a, b) = wire.split_at(split);
            watch.note(a);
            let whole = [0, 8, 13, wire.len()].contains(&split);
            assert_eq!(watch.mid_record(), !whole, "split at {split}");
            watch.note(b);
            assert!(!watch.mid_record(), "split at {split}");
        }
    }

    /// A TLS connection closing (hyper's `poll_shutdown`) behind a client that reads
    /// nothing, its socket full: the `close_notify` cannot be written, and the close
    /// fails after `send_timeout` as a stalled write does; it waited for ever.
    #[tokio::test]
    async fn a_tls_close_the_client_takes_nothing_of_fails_after_send_timeout() {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let cert = rustls::pki_types::CertificateDer::from(c.cert.der().to_vec());
        let key =
            rustls::pki_types::PrivateKeyDer::try_from(c.signing_key.serialize_der()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server_config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let client_config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let (client, (server, remote)) = (client.unwrap(), accepted.unwrap());
        socket2::SockRef::from(&server)
            .set_send_buffer_size(4096)
            .unwrap();
        socket2::SockRef::from(&client)
            .set_recv_buffer_size(4096)
            .unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let (client, server) = tokio::join!(
            TlsConnector::from(Arc::new(client_config)).connect(name, client),
            TlsAcceptor::from(Arc::new(server_config)).accept(RecordWatch::new(server)),
        );
        // Kept open, and never read from.
        let _client = client.unwrap();
        let server = server.unwrap();
        // A response's bytes, all handed to the kernel, fill the socket (what they
        // are does not matter to a client that reads none of them).
        // Filled until the socket stays unwritable (what the client's kernel takes in
        // flight frees some room at first).
        let chunk = [0u8; 16 * 1024];
        let tcp = &server.get_ref().0.tcp;
        for _ in 0..1_000 {
            match tcp.try_write(&chunk) {
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            if tokio::time::timeout(Duration::from_millis(200), tcp.writable())
                .await
                .is_err()
            {
                break;
            }
        }

        let config = Config::from_toml(
            "[[listener]]\nlisten = \"127.0.0.1:0\"\nsend_timeout = \"200ms\"\n\n\
             [[route]]\nupstream = \"up\"\n\n[upstream.up]\naddresses = [\"http://127.0.0.1:9\"]\n",
            Path::new("test.toml"),
        )
        .unwrap();
        let listener_config = config.listeners[0].clone();
        let drain = config.drain.clone();
        let proxy = Arc::new(Proxy::new(Routing::build(Arc::new(config), None).await));
        let shared = Arc::new(ListenerShared::new(proxy, listener_config, drain).unwrap());
        let tracked = Tracker::default().track();
        let ctx = ConnContext::new(remote, remote, true, shared.config.clone());
        let state = Arc::new(ConnState::new(
            false,
            true,
            tracked.figures(),
            ctx,
            shared,
            Instant::now(),
        ));
        let mut io = ClientIo::new(
            Transport::Tls(Box::new(server)),
            Bytes::new(),
            state,
            true,
            tracked,
            None,
        );
        let closed = tokio::time::timeout(
            Duration::from_secs(5),
            poll_fn(|cx| Pin::new(&mut io).poll_shutdown(cx)),
        )
        .await
        .expect("the close ends, within send_timeout and then some");
        assert_eq!(
            closed.map_err(|e| e.kind()),
            Err(io::ErrorKind::TimedOut),
            "the close_notify could not be sent"
        );
    }
}
