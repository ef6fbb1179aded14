//! Accepting client connections, at most `max_connections` at once per listener;
//! more wait in the kernel's accept queue rather than being refused.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::conn::{self, ListenerShared};
use super::drain::{DrainWatch, Tracker};

/// Accepts until the drain starts, then returns (dropping the listener; during an
/// upgrade the successor holds the same socket, so nothing queued is lost).
pub async fn accept_loop(
    listener: TcpListener,
    shared: Arc<ListenerShared>,
    mut drain: DrainWatch,
    tracker: Tracker,
) {
    let limit = Arc::new(Semaphore::new(shared.config.max_connections));
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return, // never closed
            },
            () = drain.draining() => return,
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = drain.draining() => return,
        };
        let (stream, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
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
        tokio::spawn(async move {
            conn::serve(stream, remote, shared, drain, tracked).await;
            drop(permit);
        });
    }
}
