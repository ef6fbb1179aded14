//! A scripted HTTP/1.1 upstream on raw tokio TCP, written by hand so it can misbehave
//! exactly: close idle connections silently, announce keep-alive and close anyway, hang,
//! reset mid-body, send garbage or unsolicited bytes.
//!
//! [`TestUpstream::start`] binds `127.0.0.1:0` and serves every connection with one
//! [`Behaviour`]. Every request it sees is recorded ([`TestUpstream::requests`]), every
//! lifecycle step is an [`Event`], and the counters in [`Stats`] can be awaited with a
//! timeout ([`TestUpstream::wait_for`]), so tests never sleep to let the upstream catch up.
//! Built-in answers carry `x-upstream-conn` (connection id, 1-based in accept order) and
//! `x-upstream-seq` (request number on that connection), so a test can see whether a
//! proxy reused a connection.
//!
//! Not here: TLS, HTTP/2, pipelining beyond answering buffered requests in order.
//!
//! # Drop behavior
//!
//! Dropping the fixture stops accepting and closes every connection it holds (a `Hang`
//! connection too), without waiting.

mod behaviour;
mod conn;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use self::behaviour::Plan;
pub use self::behaviour::{Behaviour, Framing, Reply, Request, Responder};

/// How long [`TestUpstream::kill_all_connections`] waits for its connections to close.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// A running scripted upstream.
pub struct TestUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// Bumped to close every open connection; dropped to close them all for good.
    kill: watch::Sender<u64>,
    accept: Mutex<Option<JoinHandle<()>>>,
}

/// Counters, as a snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub connections_accepted: usize,
    pub connections_open: usize,
    pub connections_closed: usize,
    /// Complete requests read (head and body).
    pub requests_seen: usize,
    /// Responses written completely.
    pub responses_sent: usize,
}

/// One step in the life of the upstream's connections, in the order they happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Accepted {
        conn: u64,
        peer: SocketAddr,
    },
    Request {
        conn: u64,
        seq: u32,
        method: String,
        target: String,
    },
    Responded {
        conn: u64,
        seq: u32,
        status: u16,
    },
    Closed {
        conn: u64,
        cause: CloseCause,
    },
}

/// Why a connection ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloseCause {
    /// The client closed (EOF while idle or mid-request).
    PeerEof,
    /// The client reset or another I/O error happened.
    PeerError(std::io::ErrorKind),
    /// The request could not be parsed (a 400 was sent).
    Malformed(String),
    /// `CloseIdleAfter` fired.
    IdleTimeout,
    /// The script closed it after a response (or garbage, or mid-body).
    Script,
    /// The client asked for `Connection: close` (or spoke HTTP/1.0).
    RequestedClose,
    /// [`TestUpstream::kill_all_connections`] or drop.
    Killed,
}

/// A wait that timed out, with the counters at that moment.
#[derive(Clone, Debug)]
pub struct WaitTimeout {
    pub waited: Duration,
    pub stats: Stats,
}

impl std::fmt::Display for WaitTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "upstream condition not met within {:?}; stats: {:?}",
            self.waited, self.stats
        )
    }
}

impl std::error::Error for WaitTimeout {}

/// State shared with the accept loop and connection tasks.
pub(crate) struct Shared {
    plan: Plan,
    stats: watch::Sender<Stats>,
    events: Mutex<Vec<Event>>,
    requests: Mutex<Vec<Request>>,
    open: Mutex<Vec<u64>>,
    next_conn: AtomicU64,
}

// === impl TestUpstream ===

impl TestUpstream {
    /// Binds `127.0.0.1:0` and serves with `behaviour`.
    ///
    /// # Panics
    ///
    /// If the loopback bind fails, or outside a tokio runtime.
    pub async fn start(behaviour: Behaviour) -> TestUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0 for the test upstream");
        let addr = listener.local_addr().expect("listener has an address");
        let shared = Arc::new(Shared {
            plan: behaviour.plan(),
            stats: watch::Sender::new(Stats::default()),
            events: Mutex::new(Vec::new()),
            requests: Mutex::new(Vec::new()),
            open: Mutex::new(Vec::new()),
            next_conn: AtomicU64::new(0),
        });
        let (kill, _) = watch::channel(0);
        let accept = tokio::spawn(accept_loop(listener, shared.clone(), kill.subscribe()));
        TestUpstream {
            addr,
            shared,
            kill,
            accept: Mutex::new(Some(accept)),
        }
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        *self.shared.stats.borrow()
    }

    pub fn connections_accepted(&self) -> usize {
        self.stats().connections_accepted
    }

    pub fn requests_seen(&self) -> usize {
        self.stats().requests_seen
    }

    /// Connections currently open.
    pub fn open_connections(&self) -> usize {
        self.stats().connections_open
    }

    /// Every complete request seen so far, in order.
    pub fn requests(&self) -> Vec<Request> {
        lock(&self.shared.requests).clone()
    }

    /// Every event so far, in order.
    pub fn events(&self) -> Vec<Event> {
        lock(&self.shared.events).clone()
    }

    /// Waits until `done(stats)` holds, at most `timeout`.
    ///
    /// # Errors
    ///
    /// [`WaitTimeout`] with the counters at the deadline.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&Stats) -> bool,
    ) -> Result<Stats, WaitTimeout> {
        let mut rx = self.shared.stats.subscribe();
        match tokio::time::timeout(timeout, rx.wait_for(|s| done(s))).await {
            Ok(Ok(stats)) => Ok(*stats),
            // The sender lives in `shared`, which `self` keeps alive.
            Ok(Err(_)) | Err(_) => Err(WaitTimeout {
                waited: timeout,
                stats: self.stats(),
            }),
        }
    }

    /// Waits until at least `n` connections were accepted.
    ///
    /// # Errors
    ///
    /// [`WaitTimeout`] if that does not happen within `timeout`.
    pub async fn wait_for_connections(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<Stats, WaitTimeout> {
        self.wait_for(timeout, |s| s.connections_accepted >= n)
            .await
    }

    /// Waits until at least `n` complete requests were read.
    ///
    /// # Errors
    ///
    /// [`WaitTimeout`] if that does not happen within `timeout`.
    pub async fn wait_for_requests(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<Stats, WaitTimeout> {
        self.wait_for(timeout, |s| s.requests_seen >= n).await
    }

    /// Waits until at least `n` connections have closed.
    ///
    /// # Errors
    ///
    /// [`WaitTimeout`] if that does not happen within `timeout`.
    pub async fn wait_for_closed(&self, n: usize, timeout: Duration) -> Result<Stats, WaitTimeout> {
        self.wait_for(timeout, |s| s.connections_closed >= n).await
    }

    /// Closes every open connection at once, as an upstream restart would (FIN, or RST
    /// where the client had sent unread bytes), and waits until they are all closed.
    /// New connections are still accepted.
    pub async fn kill_all_connections(&self) {
        let victims = lock(&self.shared.open).clone();
        self.kill.send_modify(|generation| *generation += 1);
        let shared = self.shared.clone();
        let closed = self
            .wait_for(KILL_WAIT, move |_| {
                let open = lock(&shared.open);
                victims.iter().all(|id| !open.contains(id))
            })
            .await;
        if let Err(e) = closed {
            tracing::warn!(%e, "kill_all_connections: connections still open");
        }
    }

    /// Stops accepting: the listening socket is closed, so new connections are refused
    /// (and any in the accept queue are reset). Open connections are kept.
    pub async fn stop_accepting(&self) {
        let task = lock(&self.accept).take();
        if let Some(task) = task {
            task.abort();
            // Once the task is gone, its listener has been dropped.
            let _ = task.await;
        }
    }

    /// Listens again on the same address after [`stop_accepting`](Self::stop_accepting).
    ///
    /// # Panics
    ///
    /// If the address cannot be bound again (another socket took the port).
    pub async fn resume_accepting(&self) {
        if lock(&self.accept).is_some() {
            return;
        }
        let listener = TcpListener::bind(self.addr)
            .await
            .unwrap_or_else(|e| panic!("rebind test upstream on {}: {e}", self.addr));
        let task = tokio::spawn(accept_loop(
            listener,
            self.shared.clone(),
            self.kill.subscribe(),
        ));
        *lock(&self.accept) = Some(task);
    }

    /// An upstream restart: stop accepting, close every connection, listen again.
    pub async fn restart(&self) {
        self.stop_accepting().await;
        self.kill_all_connections().await;
        self.resume_accepting().await;
    }
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.accept).take() {
            task.abort();
        }
        // Connection tasks end when `self.kill` is dropped with us.
    }
}

impl std::fmt::Debug for TestUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestUpstream")
            .field("addr", &self.addr)
            .field("stats", &self.stats())
            .finish()
    }
}

// === impl Shared ===

impl Shared {
    pub(crate) fn record(&self, event: Event) {
        lock(&self.events).push(event);
    }

    pub(crate) fn record_request(&self, request: Request) {
        self.record(Event::Request {
            conn: request.conn,
            seq: request.seq,
            method: request.method.clone(),
            target: request.target.clone(),
        });
        lock(&self.requests).push(request);
        self.stats.send_modify(|s| s.requests_seen += 1);
    }

    pub(crate) fn record_response(&self, conn: u64, seq: u32, status: u16) {
        self.record(Event::Responded { conn, seq, status });
        self.stats.send_modify(|s| s.responses_sent += 1);
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, kill: watch::Receiver<u64>) {
    // Ends when the task is aborted (stop_accepting or drop).
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(%e, "test upstream accept failed");
                tokio::task::yield_now().await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        // Mark the current generation seen before the connection counts as open, so a
        // kill_all_connections that lists it as a victim is sure to reach it.
        let mut kill = kill.clone();
        kill.borrow_and_update();
        let id = shared.next_conn.fetch_add(1, Ordering::Relaxed) + 1;
        lock(&shared.open).push(id);
        shared.record(Event::Accepted { conn: id, peer });
        shared.stats.send_modify(|s| {
            s.connections_accepted += 1;
            s.connections_open += 1;
        });
        let shared = shared.clone();
        tokio::spawn(async move {
            let cause = tokio::select! {
                cause = conn::serve(&shared, stream, id) => cause,
                // Ok: kill_all_connections; Err: the fixture was dropped.
                _ = kill.changed() => CloseCause::Killed,
            };
            lock(&shared.open).retain(|c| *c != id);
            shared.record(Event::Closed { conn: id, cause });
            shared.stats.send_modify(|s| {
                s.connections_open -= 1;
                s.connections_closed += 1;
            });
        });
    }
}

/// Locks a fixture mutex; a panic in another test thread must not hide this test's result.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
