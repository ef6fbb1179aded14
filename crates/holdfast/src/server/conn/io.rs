//! The client socket under hyper: notes when a request starts arriving (so the
//! connection's phase leaves `Idle`), and closes with a half-close and a linger.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::super::drain::Tracked;
use super::{ConnPhase, ConnState, LINGER};

/// The client socket: notes when a request starts arriving, and lingers on close.
pub(super) struct ClientIo {
    pub(super) stream: Option<TcpStream>,
    pub(super) state: Arc<ConnState>,
    pub(super) read_eof: bool,
    pub(super) tracked: Option<Tracked>,
}

impl ClientIo {
    fn stream(&mut self) -> io::Result<&mut TcpStream> {
        self.stream
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(this.stream()?).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = res {
            let n = buf.filled().len() - before;
            if n == 0 {
                this.read_eof = true;
            } else if this.state.phase.load(Relaxed) == ConnPhase::Idle as u8 {
                this.state.set(ConnPhase::Reading);
            }
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
        Pin::new(self.get_mut().stream()?).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.get_mut().stream()?).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().stream()?).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().stream()?).poll_shutdown(cx)
    }
}

impl Drop for ClientIo {
    fn drop(&mut self) {
        let Some(stream) = self.stream.take() else {
            return;
        };
        if self.read_eof {
            return;
        }
        // Anything unread makes close() send a reset; see whether the client is
        // already gone before paying for a linger task.
        let mut probe = [0u8; 1];
        match stream.try_read(&mut probe) {
            Ok(0) => return,
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => return,
            _ => {}
        }
        let tracked = self.tracked.take();
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(linger(stream, tracked));
        }
    }
}

/// Half-closes, then discards what the client still sends until it closes too or
/// the linger time runs out.
async fn linger(mut stream: TcpStream, tracked: Option<Tracked>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = stream.shutdown().await;
    let deadline = Instant::now() + LINGER;
    let mut buf = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
        if n == 0 {
            break;
        }
    }
    drop(tracked);
}
