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
    let mut errors = AcceptErrors::new("accept");
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
                if let Some(pause) = errors.failed(&e) {
                    tokio::select! {
                        biased;
                        () = draining.as_mut() => return listener,
                        () = tokio::time::sleep(pause) => {}
                    }
                }
                continue;
            }
        };
        errors.accepted();
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

/// How long the accept loop waits after a failure that lasts (out of descriptors or
/// memory) before it tries again: the connection stays in the kernel's queue, and each
/// try costs one system call.
const ACCEPT_RETRY: std::time::Duration = std::time::Duration::from_millis(50);

/// The accept failures of one listener since its last accepted connection. A failure
/// that lasts (EMFILE, ENFILE, ENOBUFS, ENOMEM: the connection waits in the kernel's
/// queue, and every try fails until a descriptor or buffer is free) is logged when it
/// begins and when accepting works again, not at every try; one that belongs to a
/// single connection (reset or refused before it was taken) is skipped at once.
#[derive(Debug)]
pub(crate) struct AcceptErrors {
    /// Whose accepts: "accept" or "admin accept", for the log.
    what: &'static str,
    /// Failed tries in this episode; 0: none going on.
    tries: u64,
    /// When the episode began, and its last error's code (a new one is logged).
    since: Option<tokio::time::Instant>,
    code: Option<i32>,
}

impl AcceptErrors {
    /// `what`: whose accepts, for the log ("accept", "admin accept").
    pub(crate) fn new(what: &'static str) -> AcceptErrors {
        AcceptErrors {
            what,
            tries: 0,
            since: None,
            code: None,
        }
    }

    /// After a failed accept: the pause before the next try, `None` to try at once.
    pub(crate) fn failed(&mut self, e: &std::io::Error) -> Option<std::time::Duration> {
        let what = self.what;
        if is_connection_error(e) {
            tracing::debug!(error = %e, "{what} failed: the connection was gone before it was taken");
            return None;
        }
        self.tries += 1;
        let since = *self.since.get_or_insert_with(tokio::time::Instant::now);
        if self.tries == 1 || self.code != e.raw_os_error() {
            self.code = e.raw_os_error();
            tracing::warn!(
                error = %e,
                after_ms = since.elapsed().as_millis() as u64,
                "{what} failed; trying again every {} ms, not logged again until it works",
                ACCEPT_RETRY.as_millis()
            );
        }
        Some(ACCEPT_RETRY)
    }

    /// After an accepted connection: ends the episode of failures going on, if any
    /// (one comparison per connection otherwise).
    #[inline]
    pub(crate) fn accepted(&mut self) {
        if self.tries != 0 {
            self.recovered();
        }
    }

    #[cold]
    fn recovered(&mut self) {
        let lasted = self.since.map_or(0, |s| s.elapsed().as_millis() as u64);
        tracing::warn!(
            failed_tries = self.tries,
            lasted_ms = lasted,
            "{}: accepting again",
            self.what
        );
        *self = AcceptErrors::new(self.what);
    }
}

/// An accept error that concerns only the connection it would have returned (Linux
/// also reports a queued connection's pending network error this way, accept(2)).
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused
    ) || e.raw_os_error().is_some_and(|code| {
        [
            libc::ENETDOWN,
            libc::EPROTO,
            libc::ENOPROTOOPT,
            libc::EHOSTDOWN,
            libc::ENONET,
            libc::EHOSTUNREACH,
            libc::EOPNOTSUPP,
            libc::ENETUNREACH,
            libc::EPERM,
        ]
        .contains(&code)
    })
}
