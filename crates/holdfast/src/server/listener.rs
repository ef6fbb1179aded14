//! Accepting client connections, at most `max_connections` at once per listener;
//! more wait in the kernel's accept queue rather than being refused.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::conn::{self, ListenerShared};
use super::drain::{DrainWatch, Tracker};

/// Accepts until the drain starts, then returns the listener: during an upgrade the
/// successor holds the same socket, so dropping it loses nothing queued; otherwise
/// [`take_queued`] serves what already waits in the kernel's queue first.
pub async fn accept_loop(
    listener: TcpListener,
    shared: Arc<ListenerShared>,
    drain: DrainWatch,
    tracker: Tracker,
) -> TcpListener {
    let limit = Arc::new(Semaphore::new(shared.config.max_connections));
    // One registration with the drain signal for the loop's whole life, not one per
    // connection: the accept path is paid by every new client.
    let mut watch = drain.clone();
    let draining = watch.draining();
    tokio::pin!(draining);
    loop {
        // A free slot is taken without a future; only a full listener waits.
        let permit = match limit.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => tokio::select! {
                biased;
                () = draining.as_mut() => return listener,
                p = limit.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return listener, // never closed
                },
            },
        };
        let accepted = tokio::select! {
            biased;
            () = draining.as_mut() => return listener,
            r = listener.accept() => r,
        };
        let (stream, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                pause_after_accept_error(&e, "accept failed").await;
                continue;
            }
        };
        // Linux copies TCP_NODELAY from the listening socket (set in `bind_tcp` and
        // `Server::bind`); elsewhere each connection needs it.
        #[cfg(not(target_os = "linux"))]
        let _ = stream.set_nodelay(true);
        let tracked = tracker.track();
        let shared = shared.clone();
        let drain = drain.clone();
        // The permit goes with the connection's socket, not this task: a connection
        // upgraded (a WebSocket) outlives `serve` and still counts.
        tokio::spawn(conn::serve(
            stream,
            remote,
            shared,
            drain,
            tracked,
            Some(permit),
        ));
    }
}

/// In a drain with no successor: accepts every connection already in the kernel's
/// queue (past `max_connections`: they are served with the drain's rules, each its
/// current request with `Connection: close`), then closes the listener. Closing it with
/// connections queued would reset them, and their clients may have sent a request.
pub fn take_queued(
    listener: TcpListener,
    shared: &Arc<ListenerShared>,
    drain: &DrainWatch,
    tracker: &Tracker,
) {
    let Ok(std) = listener.into_std() else { return };
    // Non-blocking (set when bound or adopted): stops at an empty queue, and at most
    // a backlog's worth, so that clients still arriving cannot keep the drain here.
    let mut taken = 0usize;
    for _ in 0..crate::server::LISTEN_BACKLOG {
        let Ok((stream, remote)) = std.accept() else {
            break;
        };
        let Ok(stream) = stream
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpStream::from_std(stream))
        else {
            continue;
        };
        taken += 1;
        let tracked = tracker.track();
        let (shared, drain) = (shared.clone(), drain.clone());
        tokio::spawn(async move {
            conn::serve(stream, remote, shared, drain, tracked, None).await;
        });
    }
    if taken > 0 {
        tracing::info!(
            connections = taken,
            "took the connections still queued at the listener"
        );
    }
}

/// After a failed accept (EMFILE and friends): logs it and backs off briefly, so that
/// the accept loop does not spin on an error that lasts.
pub(crate) async fn pause_after_accept_error(e: &std::io::Error, what: &'static str) {
    tracing::warn!(error = %e, "{what}");
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
}
