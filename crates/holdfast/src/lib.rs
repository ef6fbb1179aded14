//! holdfast: a reverse proxy in which no request is lost to a connection-lifecycle
//! race.
//!
//! The data path, in module order: [`server`] accepts client connections and runs
//! HTTP/1.1 or HTTP/2 on them, over TLS or not; [`proxy`] routes each request
//! ([`route`]), rewrites its headers and hands it to an [`upstream`], whose pools own
//! every upstream connection and decide about reuse and retries; the response
//! streams back through [`proxy::response`]. [`config`] parses the TOML once at the
//! edge; [`admin`] serves the operators' endpoints; [`process`] maps signals to
//! drains, reloads and upgrades; [`probe`] measures an upstream's keep-alive
//! behaviour for the `probe` command. ARCHITECTURE.md walks through it.

pub mod admin;
pub mod body;
pub mod config;
pub mod demo;
pub mod probe;
pub mod process;
pub mod proxy;
pub mod route;
pub mod server;
pub mod telemetry;
pub mod timer;
pub mod upstream;
