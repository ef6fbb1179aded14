//! Bounded keep-alive load: N persistent client connections sending requests for at most
//! a duration and a request count, every outcome counted.
//!
//! The upgrade and drain tests run it across an event (a restart, a SIGTERM) and assert
//! that no request failed: [`LoadReport::assert_clean`]. A connection that fails records
//! the [`TransportError`] and goes on with a new connection; a response that ends its
//! connection (`Connection: close`) is not an error, the next request simply reconnects.
//!
//! Not a benchmark: no latency histogram, no rate control beyond `think_time`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::client::{ClientRequest, ErrorKind, KeepAliveClient, TransportError};

/// Error samples kept in a report.
const MAX_SAMPLES: usize = 32;

/// Bounds and pacing of a load run.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Concurrent keep-alive connections (default 4).
    pub connections: usize,
    /// Stop issuing requests after this long (default 5 s). A request in flight at the
    /// deadline completes (bounded by `request_timeout`).
    pub max_duration: Duration,
    /// Stop after this many requests in total (default 10 000).
    pub max_requests: u64,
    /// Connect and response timeout per request (default 10 s).
    pub request_timeout: Duration,
    /// Pause between two requests on one connection (default none).
    pub think_time: Duration,
}

/// Which request a closure is asked for.
#[derive(Clone, Copy, Debug)]
pub struct RequestSlot {
    /// Connection index, `0..connections`.
    pub connection: usize,
    /// Request number on that worker, from 0.
    pub seq: u64,
    /// Request number across all workers, from 0.
    pub global: u64,
}

/// Every outcome of a load run.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    /// Requests whose outcome was recorded.
    pub requests: u64,
    /// 2xx responses.
    pub ok: u64,
    /// Other responses, by status.
    pub by_status: BTreeMap<u16, u64>,
    /// Transport failures, by kind.
    pub errors: BTreeMap<ErrorKind, u64>,
    /// The first few failures in full.
    pub samples: Vec<TransportError>,
    /// Connections the clients opened.
    pub connections_opened: u64,
    pub elapsed: Duration,
}

/// A load run in progress.
pub struct Load {
    stop: watch::Sender<bool>,
    completed: watch::Receiver<u64>,
    workers: JoinSet<LoadReport>,
    started: Instant,
}

// === impl LoadConfig ===

impl Default for LoadConfig {
    fn default() -> LoadConfig {
        LoadConfig {
            connections: 4,
            max_duration: Duration::from_secs(5),
            max_requests: 10_000,
            request_timeout: Duration::from_secs(10),
            think_time: Duration::ZERO,
        }
    }
}

// === impl Load ===

impl Load {
    /// Starts `config.connections` workers against `addr`, each asking `request` for the
    /// request to send next.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn spawn<F>(addr: SocketAddr, config: LoadConfig, request: F) -> Load
    where
        F: Fn(RequestSlot) -> ClientRequest + Send + Sync + 'static,
    {
        let request = Arc::new(request);
        let (stop, _) = watch::channel(false);
        let (done_tx, completed) = watch::channel(0u64);
        let done_tx = Arc::new(done_tx);
        let issued = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let deadline = started + config.max_duration;
        let mut workers = JoinSet::new();
        for connection in 0..config.connections {
            let worker = Worker {
                connection,
                client: KeepAliveClient::new(addr).with_timeout(config.request_timeout),
                config: config.clone(),
                deadline,
                issued: issued.clone(),
                stop: stop.subscribe(),
                done: done_tx.clone(),
            };
            let request = request.clone();
            workers.spawn(worker.run(move |slot| request(slot)));
        }
        Load {
            stop,
            completed,
            workers,
            started,
        }
    }

    /// Requests completed so far (any outcome).
    pub fn completed(&self) -> u64 {
        *self.completed.borrow()
    }

    /// Waits until at least `n` requests have completed; false on timeout or if the run
    /// ended first.
    pub async fn wait_for_completed(&self, n: u64, timeout: Duration) -> bool {
        let mut rx = self.completed.clone();
        matches!(
            tokio::time::timeout(timeout, rx.wait_for(|c| *c >= n)).await,
            Ok(Ok(_))
        )
    }

    /// Asks every worker to stop after its current request, and returns the report.
    pub async fn stop(self) -> LoadReport {
        let _ = self.stop.send(true);
        self.finish().await
    }

    /// Waits until the bounds are reached, and returns the report.
    pub async fn finish(mut self) -> LoadReport {
        let mut report = LoadReport::default();
        while let Some(done) = self.workers.join_next().await {
            match done {
                Ok(part) => report.merge(part),
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(e) => panic!("load worker failed: {e}"),
            }
        }
        report.elapsed = self.started.elapsed();
        report
    }
}

impl fmt::Debug for Load {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Load")
            .field("completed", &self.completed())
            .finish()
    }
}

/// Runs a load to its bounds: `Load::spawn(..).finish()`.
pub async fn run_load<F>(addr: SocketAddr, config: LoadConfig, request: F) -> LoadReport
where
    F: Fn(RequestSlot) -> ClientRequest + Send + Sync + 'static,
{
    Load::spawn(addr, config, request).finish().await
}

struct Worker {
    connection: usize,
    client: KeepAliveClient,
    config: LoadConfig,
    deadline: Instant,
    issued: Arc<AtomicU64>,
    stop: watch::Receiver<bool>,
    done: Arc<watch::Sender<u64>>,
}

impl Worker {
    async fn run(mut self, request: impl Fn(RequestSlot) -> ClientRequest) -> LoadReport {
        let mut report = LoadReport::default();
        // Bounded by the deadline, the request budget and the stop signal.
        for seq in 0.. {
            if *self.stop.borrow() || Instant::now() >= self.deadline {
                break;
            }
            let global = self.issued.fetch_add(1, Ordering::Relaxed);
            if global >= self.config.max_requests {
                break;
            }
            let req = request(RequestSlot {
                connection: self.connection,
                seq,
                global,
            });
            let outcome = self.client.send(&req).await;
            report.record(outcome.map(|r| r.status));
            self.done.send_modify(|c| *c += 1);
            if !self.config.think_time.is_zero() {
                let pause = tokio::time::sleep(self.config.think_time);
                tokio::select! {
                    _ = pause => {}
                    _ = self.stop.changed() => {}
                }
            }
        }
        report.connections_opened = self.client.connections_opened();
        report
    }
}

// === impl LoadReport ===

impl LoadReport {
    fn record(&mut self, outcome: Result<u16, TransportError>) {
        self.requests += 1;
        match outcome {
            Ok(status) if (200..300).contains(&status) => self.ok += 1,
            Ok(status) => *self.by_status.entry(status).or_default() += 1,
            Err(e) => {
                *self.errors.entry(e.kind).or_default() += 1;
                if self.samples.len() < MAX_SAMPLES {
                    self.samples.push(e);
                }
            }
        }
    }

    fn merge(&mut self, other: LoadReport) {
        self.requests += other.requests;
        self.ok += other.ok;
        for (status, n) in other.by_status {
            *self.by_status.entry(status).or_default() += n;
        }
        for (kind, n) in other.errors {
            *self.errors.entry(kind).or_default() += n;
        }
        let room = MAX_SAMPLES.saturating_sub(self.samples.len());
        self.samples.extend(other.samples.into_iter().take(room));
        self.connections_opened += other.connections_opened;
    }

    /// Transport failures in total.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Failures of one kind.
    pub fn errors_of(&self, kind: ErrorKind) -> u64 {
        self.errors.get(&kind).copied().unwrap_or(0)
    }

    /// Non-2xx responses in total.
    pub fn non_2xx_count(&self) -> u64 {
        self.by_status.values().sum()
    }

    /// # Panics
    ///
    /// If any request failed or got a non-2xx status, or no request completed.
    pub fn assert_clean(&self) {
        assert!(
            self.requests > 0 && self.error_count() == 0 && self.non_2xx_count() == 0,
            "load was not clean: {self}"
        );
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} requests in {:?} on {} connections: {} 2xx, other statuses {:?}, errors {:?}",
            self.requests,
            self.elapsed,
            self.connections_opened,
            self.ok,
            self.by_status,
            self.errors
        )?;
        for sample in &self.samples {
            write!(f, "\n  {sample}")?;
        }
        Ok(())
    }
}
