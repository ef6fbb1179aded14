//! Upstream sockets: connecting with the configured TCP options, and the I/O type the
//! protocol clients run on.
//!
//! The socket is shared (`Arc`) between the protocol client, which reads and writes it,
//! and the pool, which peeks at an idle connection before handing it out so that a FIN
//! or stray bytes already in the kernel are seen before a request is written.
//! Write stalls longer than the write timeout fail here, in one place for every protocol.
//! Reads date when each answer began to arrive ([`Stream::answer_began`]): the pool
//! counts a connection idle from then.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::Instant;

use crate::config::TcpConfig;
use crate::timer;

mod unacked;

/// A connected upstream socket, and when the answer to the request on it began to
/// arrive.
#[derive(Debug)]
pub struct Stream {
    sock: Sock,
    answer: AnswerClock,
    /// Bytes were written since the protocol client last flushed (see
    /// [`Stream::sending`]).
    unflushed: AtomicBool,
}

#[derive(Debug)]
enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// When the answer to the request now on the connection began to arrive: the first
/// bytes read after the pool handed the connection out.
///
/// The pool counts a connection idle from then, not from when holdfast finished reading
/// the answer. The upstream's idle timer starts once it has written its answer, and
/// behind a slow client the end of a large one waits, unread, in socket buffers for as
/// long as the client takes: counted from the read, the connection would look seconds
/// younger than the upstream knows it is, and be reused as the upstream closes it.
///
/// No later read dates the end of the writing: bytes read after a pause may have
/// waited in the upstream's own send buffer, written long before (TCP flow control
/// holds them there while holdfast's receive buffer is full). The first bytes can only
/// have been written before the last, so this date is early by the answer's transfer
/// time, and by at most one RTT late: a long or slowly read answer leaves a connection
/// that looks older than it is, which the pool closes rather than reuses. Over TLS the
/// first bytes may be a session ticket sent after the handshake, earlier still (safe,
/// but no time to first byte: that is read from the clock there).
#[derive(Debug, Default)]
struct AnswerClock {
    /// Handed out, and nothing read since.
    expecting: AtomicBool,
    /// µs since [`timer::clock_base`], plus one; 0: no answer yet.
    began: AtomicU64,
}

impl AnswerClock {
    /// One task at a time drives the connection, and the pool's lock orders one
    /// request's use after the last: loads and stores suffice.
    fn on_read(&self) {
        if self.expecting.load(Relaxed) {
            self.expecting.store(false, Relaxed);
            let at = timer::micros_since_base(Instant::now()) + 1;
            self.began.store(at, Relaxed);
        }
    }
}

impl From<Sock> for Stream {
    fn from(sock: Sock) -> Stream {
        Stream {
            sock,
            answer: AnswerClock::default(),
            unflushed: AtomicBool::new(false),
        }
    }
}

/// What a non-blocking look at an idle connection found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleProbe {
    /// Nothing to read: the connection looks reusable.
    Quiet,
    /// The upstream closed its side (FIN).
    Closed,
    /// Bytes arrived that no request asked for.
    UnexpectedBytes,
    /// The socket reported an error (typically a reset).
    Failed,
}

impl Stream {
    /// A Unix stream socket already connected (tests use socket pairs).
    pub fn unix(sock: UnixStream) -> Stream {
        Sock::Unix(sock).into()
    }

    pub async fn connect_tcp(addr: std::net::SocketAddr, tcp: &TcpConfig) -> io::Result<Stream> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(tcp.nodelay)?;
        if tcp.keepalive {
            // TCP keepalive probes find a dead peer or path; they are not HTTP keep-alive.
            let ka = TcpKeepalive::new()
                .with_time(tcp.keepalive_idle.get())
                .with_interval(tcp.keepalive_interval.get())
                .with_retries(tcp.keepalive_count);
            SockRef::from(&stream).set_tcp_keepalive(&ka)?;
        }
        Ok(Sock::Tcp(stream).into())
    }

    pub async fn connect_unix(path: &std::path::Path) -> io::Result<Stream> {
        Ok(Sock::Unix(UnixStream::connect(path).await?).into())
    }

    /// The pool hands the connection to a request: what it reads next is the answer.
    pub fn expect_answer(&self) {
        self.answer.expecting.store(true, Relaxed);
    }

    /// When the answer to the request last handed the connection began to arrive
    /// (the first bytes read since; see `AnswerClock`); `None` before any.
    pub fn answer_began(&self) -> Option<Instant> {
        match self.answer.began.load(Relaxed) {
            0 => None,
            at => Some(timer::instant_from_micros(at - 1)),
        }
    }

    /// The protocol client is in the middle of sending: it wrote bytes and has not
    /// flushed since. hyper's client (HTTP/1.1 over TLS, and TLS under it) flushes
    /// once everything it holds is written, and goes on sending a request body after
    /// an early answer: after a whole answer, this means the request is not all out,
    /// and the connection takes no other one until it is, maybe never (an upstream
    /// that answered early and reads nothing more). Holdfast's own HTTP/1.1 client
    /// does not flush (it knows itself when its request is written): not for it.
    pub fn sending(&self) -> bool {
        self.unflushed.load(Relaxed)
    }

    /// Looks at an idle connection without blocking and without consuming anything.
    pub fn probe_idle(&self) -> IdleProbe {
        let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        let res = match &self.sock {
            Sock::Tcp(s) => SockRef::from(s).peek(&mut byte),
            Sock::Unix(s) => SockRef::from(s).peek(&mut byte),
        };
        idle_probe(res).unwrap_or(IdleProbe::Quiet)
    }

    /// Waits until an idle connection shows anything: a FIN, bytes, or an error.
    /// Readiness left over from the last exchange is cleared by the peek, not reported.
    ///
    /// # Cancel safety
    /// Cancel safe: it consumes nothing.
    pub async fn idle_event(&self) -> IdleProbe {
        loop {
            let ready = match &self.sock {
                Sock::Tcp(s) => s.readable().await,
                Sock::Unix(s) => s.readable().await,
            };
            if ready.is_err() {
                return IdleProbe::Failed;
            }
            if let Some(probe) = self.peek_ready() {
                return probe;
            }
        }
    }

    /// [`Stream::idle_event`] as a poll: `Pending` registers `cx`'s waker for the
    /// socket's next event. A plain HTTP/1.1 connection parks by registering its
    /// own waker here (it wakes the connection's driver), so no task runs for it
    /// until something happens.
    pub fn poll_idle(&self, cx: &mut Context<'_>) -> Poll<IdleProbe> {
        loop {
            match self.poll_read_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(_)) => return Poll::Ready(IdleProbe::Failed),
                Poll::Ready(Ok(())) => {}
            }
            if let Some(probe) = self.peek_ready() {
                return Poll::Ready(probe);
            }
        }
    }

    /// Peeks at a socket reported readable; `None` when the readiness was left over
    /// from the last exchange (the peek would block), which this clears.
    fn peek_ready(&self) -> Option<IdleProbe> {
        let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        let res = match &self.sock {
            Sock::Tcp(s) => s.try_io(tokio::io::Interest::READABLE, || {
                SockRef::from(s).peek(&mut byte)
            }),
            Sock::Unix(s) => s.try_io(tokio::io::Interest::READABLE, || {
                SockRef::from(s).peek(&mut byte)
            }),
        };
        idle_probe(res)
    }

    /// After a FIN that came with no answer: whether the peer still holds its end
    /// open and takes what is written, having shut down only its sending side.
    /// php-fpm retires a worker (`pm.max_requests`) so: right after its last
    /// request's END_REQUEST it calls `shutdown(SHUT_WR)` on the kept connection,
    /// then reads and discards until holdfast closes, never taking a request from it
    /// again. A peer that died instead (a crashed worker) has closed its socket
    /// whole: a Unix socket then refuses the write (`EPIPE`), and over TCP the peer's
    /// kernel answers it with a reset where a live socket acknowledges it.
    ///
    /// `probe` is written (something the peer may read and ignore). Over TCP the
    /// acknowledgement or the reset is waited for at most `within`; an
    /// acknowledgement wakes no task, so the send queue is looked at in doubling
    /// steps from 1 ms (on loopback the peer's delayed ACK can take up to ~40 ms).
    /// `false` whenever the answer is not certain.
    pub async fn peer_reads_on(&self, probe: &[u8], within: Duration) -> bool {
        if !matches!(self.try_write(probe), Ok(n) if n == probe.len()) {
            return false;
        }
        let Sock::Tcp(s) = &self.sock else {
            // A Unix stream socket takes a write only while the peer's end is open
            // for reading: the write is the answer.
            return true;
        };
        let deadline = Instant::now() + within;
        let mut step = Duration::from_millis(1);
        loop {
            // A reset sets the socket's error before it empties the send queue: an
            // empty queue seen before an unset error was emptied by acknowledgements.
            let acked = matches!(unacked::unacked_bytes(s), Ok(0));
            if !matches!(s.take_error(), Ok(None)) {
                return false;
            }
            if acked {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            tokio::time::sleep_until((now + step).min(deadline)).await;
            step = (step * 2).min(Duration::from_millis(50));
        }
    }

    /// Writes what fits right now without waiting (a last word before closing).
    pub fn try_write_now(&self, buf: &[u8]) -> io::Result<usize> {
        self.try_write(buf)
    }

    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &self.sock {
            Sock::Tcp(s) => s.poll_read_ready(cx),
            Sock::Unix(s) => s.poll_read_ready(cx),
        }
    }

    /// Reads what is there without waiting. A read that leaves room in `buf` drained
    /// the socket (epoll is edge-triggered), so readiness is cleared then, as tokio's
    /// own `poll_read` does: without that the next read is a syscall that only says
    /// `EAGAIN`, one per response.
    fn try_read_buf(&self, buf: &mut ReadBuf<'_>) -> io::Result<usize> {
        let want = buf.remaining();
        let mut read = 0;
        let res = match &self.sock {
            Sock::Tcp(s) => s.try_io(tokio::io::Interest::READABLE, || {
                partial_as_would_block(s.try_read_buf(buf), want, &mut read)
            }),
            Sock::Unix(s) => s.try_io(tokio::io::Interest::READABLE, || {
                partial_as_would_block(s.try_read_buf(buf), want, &mut read)
            }),
        };
        match res {
            // The "would block" that cleared readiness after a partial read.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && read > 0 => Ok(read),
            other => other,
        }
    }

    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &self.sock {
            Sock::Tcp(s) => s.poll_write_ready(cx),
            Sock::Unix(s) => s.poll_write_ready(cx),
        }
    }

    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match &self.sock {
            Sock::Tcp(s) => s.try_write(buf),
            Sock::Unix(s) => s.try_write(buf),
        }
    }

    fn try_write_vectored(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match &self.sock {
            Sock::Tcp(s) => s.try_write_vectored(bufs),
            Sock::Unix(s) => s.try_write_vectored(bufs),
        }
    }

    /// Shuts both directions down now (FIN), whoever else still holds the socket.
    pub fn shutdown_both(&self) {
        let _ = match &self.sock {
            Sock::Tcp(s) => SockRef::from(s).shutdown(std::net::Shutdown::Both),
            Sock::Unix(s) => SockRef::from(s).shutdown(std::net::Shutdown::Both),
        };
    }

    fn shutdown_write(&self) -> io::Result<()> {
        let res = match &self.sock {
            Sock::Tcp(s) => SockRef::from(s).shutdown(std::net::Shutdown::Write),
            Sock::Unix(s) => SockRef::from(s).shutdown(std::net::Shutdown::Write),
        };
        match res {
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            other => other,
        }
    }
}

/// What a one-byte peek at an idle connection says; `None` for "would block".
fn idle_probe(peeked: io::Result<usize>) -> Option<IdleProbe> {
    match peeked {
        Ok(0) => Some(IdleProbe::Closed),
        Ok(_) => Some(IdleProbe::UnexpectedBytes),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
        Err(_) => Some(IdleProbe::Failed),
    }
}

/// Reports a partial read as `WouldBlock` (the count stays in `read`) so that the
/// enclosing `try_io` clears the socket's readiness.
fn partial_as_would_block(
    n: io::Result<usize>,
    want: usize,
    read: &mut usize,
) -> io::Result<usize> {
    let n = n?;
    *read = n;
    if n > 0 && n < want {
        return Err(io::ErrorKind::WouldBlock.into());
    }
    Ok(n)
}

/// The I/O handed to a protocol client: the shared socket plus a write-stall deadline.
pub struct UpstreamIo {
    stream: Arc<Stream>,
    write_timeout: Duration,
    write_stall: crate::timer::StallDeadline,
}

impl UpstreamIo {
    pub fn new(stream: Arc<Stream>, write_timeout: Duration) -> Self {
        UpstreamIo {
            stream,
            write_timeout,
            write_stall: Default::default(),
        }
    }

    /// Called when a write would block: fails once the stall outlasts the timeout.
    fn check_write_stall(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.write_stall.expired(self.write_timeout, cx) {
            Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "upstream write timed out",
            )))
        } else {
            Poll::Pending
        }
    }

    fn poll_write_with<F>(&mut self, cx: &mut Context<'_>, mut write: F) -> Poll<io::Result<usize>>
    where
        F: FnMut(&Stream) -> io::Result<usize>,
    {
        loop {
            match self.stream.poll_write_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    ready!(self.check_write_stall(cx))?;
                    return Poll::Pending;
                }
            }
            match write(&self.stream) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                res => {
                    self.write_stall.progressed();
                    // A load per write; a store only after a flush.
                    if matches!(res, Ok(n) if n > 0) && !self.stream.unflushed.load(Relaxed) {
                        self.stream.unflushed.store(true, Relaxed);
                    }
                    return Poll::Ready(res);
                }
            }
        }
    }
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.stream.poll_read_ready(cx))?;
            match self.stream.try_read_buf(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
                Ok(n) => {
                    if n > 0 {
                        self.stream.answer.on_read();
                    }
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_with(cx, |s| s.try_write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_write_with(cx, |s| s.try_write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Everything written is with the kernel; a TLS layer above calls this only
        // once it has written all its records.
        if self.stream.unflushed.load(Relaxed) {
            self.stream.unflushed.store(false, Relaxed);
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.stream.shutdown_write())
    }
}
