//! An upgraded connection (a WebSocket, after `101 Switching Protocols`): bytes copied
//! both ways until either side closes, or until none has moved either way for the
//! upstream's `timeouts.read_idle`.
//!
//! Without that limit a tunnel whose peers both went silent (a client that vanished
//! without a FIN, an upstream that forgot the socket) would hold its client
//! connection's place under the listener's `max_connections` and its upstream
//! connection's under `pool.max_connections` forever, and keep a drain waiting for
//! its `drain.timeout`. nginx closes such a tunnel after `proxy_read_timeout` (60s).
//! A write that stalls because one side stops reading moves no bytes either, so it
//! ends the same way.

use std::io;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::timer::{instant_from_micros, micros_since_base};

/// How a tunnel ended.
#[derive(Debug, PartialEq, Eq)]
pub enum TunnelEnd {
    /// Both directions finished: each side shut its half down.
    Closed,
    /// A read or write failed (a reset, a stalled write cut by its own deadline).
    Failed(io::ErrorKind),
    /// No byte moved either way for the idle limit.
    Idle,
}

impl TunnelEnd {
    /// Why the upstream connection that carried the tunnel closed, for its pool's
    /// figures.
    pub fn close_reason(&self) -> crate::upstream::figures::CloseReason {
        use crate::upstream::figures::CloseReason;
        match self {
            TunnelEnd::Closed => CloseReason::TunnelClosed,
            TunnelEnd::Failed(_) => CloseReason::Error,
            TunnelEnd::Idle => CloseReason::Timeout,
        }
    }
}

/// Copies between `client` and `upstream` until both directions end, one fails, or
/// nothing has moved for `idle` (None: no limit).
pub async fn run<C, U>(client: &mut C, upstream: &mut U, idle: Option<Duration>) -> TunnelEnd
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let Some(idle) = idle else {
        return ended(tokio::io::copy_bidirectional(client, upstream).await);
    };
    // µs since the clock base of the last byte moved: the copy writes it, the
    // watch below reads it; both run in this task.
    let moved = AtomicU64::new(micros_since_base(Instant::now()));
    let mut client = Noting {
        io: client,
        moved: &moved,
    };
    let mut upstream = Noting {
        io: upstream,
        moved: &moved,
    };
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    tokio::pin!(copy);
    // Woken once per `idle` at most, not once per byte: the deadline moves only
    // when the timer fires and finds traffic since.
    let sleep = tokio::time::sleep(idle);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            result = &mut copy => return ended(result),
            () = &mut sleep => {
                let due = instant_from_micros(moved.load(Relaxed)) + idle;
                if Instant::now() >= due {
                    return TunnelEnd::Idle;
                }
                sleep.as_mut().reset(due);
            }
        }
    }
}

fn ended(result: io::Result<(u64, u64)>) -> TunnelEnd {
    match result {
        Ok(_) => TunnelEnd::Closed,
        Err(e) => TunnelEnd::Failed(e.kind()),
    }
}

/// An I/O half of the tunnel that notes when bytes move through it.
struct Noting<'a, T: ?Sized> {
    io: &'a mut T,
    moved: &'a AtomicU64,
}

impl<T: ?Sized> Noting<'_, T> {
    fn note(&self) {
        self.moved.store(micros_since_base(Instant::now()), Relaxed);
    }
}

impl<T: AsyncRead + Unpin + ?Sized> AsyncRead for Noting<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut *self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.note();
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin + ?Sized> AsyncWrite for Noting<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut *self.io).poll_write(cx, data);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.note();
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_silent_tunnel_ends_after_the_idle_limit() {
        let (mut client, mut client_far) = tokio::io::duplex(64);
        let (mut upstream, mut upstream_far) = tokio::io::duplex(64);
        let start = Instant::now();
        let tunnel = tokio::spawn(async move {
            run(&mut client, &mut upstream, Some(Duration::from_secs(60))).await
        });
        // Traffic at 50s keeps it open past the first 60s.
        tokio::time::sleep(Duration::from_secs(50)).await;
        client_far.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        upstream_far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        assert_eq!(tunnel.await.unwrap(), TunnelEnd::Idle);
        let lasted = start.elapsed();
        assert!(
            lasted >= Duration::from_secs(110) && lasted < Duration::from_secs(111),
            "{lasted:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_limit_a_tunnel_ends_when_both_sides_close() {
        let (mut client, mut client_far) = tokio::io::duplex(64);
        let (mut upstream, mut upstream_far) = tokio::io::duplex(64);
        let tunnel = tokio::spawn(async move { run(&mut client, &mut upstream, None).await });
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(!tunnel.is_finished());
        client_far.shutdown().await.unwrap();
        upstream_far.shutdown().await.unwrap();
        assert_eq!(tunnel.await.unwrap(), TunnelEnd::Closed);
    }
}
