//! Loopback test fixtures for holdfast: scripted upstreams, raw clients, a real nginx,
//! the holdfast binary as a child process, and bounded keep-alive load.
//!
//! Every fixture listens on `127.0.0.1:0` and exposes its address; every loop is bounded
//! by a count or a deadline; waits are for events (a counter reaching n, a log line, a
//! process exit) with a timeout, never a fixed sleep; every process a fixture starts is
//! stopped by its PID when the fixture drops.
//!
//! - [`upstream`]: [`TestUpstream`], a hand-written HTTP/1.1 origin that can misbehave
//!   exactly ([`Behaviour`]).
//! - [`client`]: [`RawClient`] (exact bytes in, one response out) and
//!   [`KeepAliveClient`] (persistent connection, precise [`TransportError`]s).
//! - [`load`]: [`Load`] / [`run_load`], N keep-alive connections for at most D.
//! - [`nginx`]: [`Nginx`], a real nginx on an ephemeral port with a generated config.
//! - [`php`]: [`PhpFpm`], a real php-fpm on an ephemeral port and a unix socket, with a
//!   document root for the test's scripts.
//! - [`process`]: [`HoldfastProcess`], plus [`wait_until`] and [`read_pid_file`].
//! - [`sys`]: signals by PID ([`sys::send_signal`]) and the signal numbers.
//! - [`h2`]: raw HTTP/2 frames, for scripted clients that must send (and see) exact
//!   frames.
//!
//! Paused tokio time (`tokio::time::pause`) auto-advances whenever the runtime waits on
//! real sockets, so the timeouts here fire at once under it: use these fixtures with real
//! time, and paused time for in-process logic only.
//!
//! Not here: TLS and real HTTP/2 clients (tests use tokio-rustls and hyper's client).

pub mod client;
pub mod h2;
pub mod load;
pub mod nginx;
pub mod php;
pub mod process;
pub mod sys;
pub mod upstream;
mod wire;

use std::net::{SocketAddr, TcpListener};

pub use tempfile::TempDir;

pub use crate::client::{
    Checkout, ClientRequest, Echoed, ErrorKind, KeepAliveClient, PeerClose, Phase, RawClient,
    Response, TransportError,
};
pub use crate::load::{Load, LoadConfig, LoadReport, RequestSlot, run_load};
pub use crate::nginx::{Nginx, NginxOptions};
pub use crate::php::{PhpFpm, PhpFpmOptions};
pub use crate::process::{HoldfastProcess, read_pid_file, wait_until, wait_until_async};
pub use crate::upstream::{
    Behaviour, CloseCause, Event, Framing, Reply, Request, Stats, TestUpstream, WaitTimeout,
};
pub use crate::wire::{BodyFraming, Headers, is_pattern, pattern, pattern_byte};

/// A new temp dir, removed when dropped.
///
/// # Panics
///
/// If it cannot be created.
pub fn tempdir() -> TempDir {
    tempfile::Builder::new()
        .prefix("holdfast-test-")
        .tempdir()
        .expect("create a temp dir")
}

/// A loopback port that was free a moment ago (bound to `127.0.0.1:0`, read, released).
/// Another socket may take it before the caller binds it; prefer passing a bound
/// listener where the code under test allows it.
///
/// # Panics
///
/// If binding `127.0.0.1:0` fails.
pub fn free_port() -> u16 {
    free_addr().port()
}

/// `127.0.0.1:PORT` for a port from [`free_port`].
///
/// # Panics
///
/// As `free_port`.
pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
}
