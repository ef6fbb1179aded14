//! The running gateway: listeners, client connections (TLS, HTTP/1.1 and HTTP/2),
//! admin, reload and drain.
//!
//! [`Server::bind`] opens (or adopts, after an upgrade) the listening sockets;
//! [`Server::run`] serves until told to drain, then drains in the documented order
//! and returns what it had to cut. Signals are mapped to [`Control`] messages by the
//! binary, so tests drive the same code without signals.

pub mod conn;
pub mod drain;
pub mod inherit;
pub mod listener;
pub mod redirect;
pub mod tls;

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use tokio::net::TcpListener;
use tokio::sync::mpsc;

use self::conn::ListenerShared;
use self::drain::Tracker;
use crate::admin;
use crate::config::{Config, TlsConfig};
use crate::proxy::{Proxy, Routing};
use crate::upstream::Upstreams;

/// What the binary (or a test) tells a running server.
#[derive(Debug)]
pub enum Control {
    /// Apply a new, already validated config to new requests.
    Reload(Box<Config>),
    /// Drain and return.
    Drain,
    /// A successor adopted our sockets and serves on them: drain and return, but skip
    /// `drain.pre_delay` (the sockets stay open, so there is nothing for a load
    /// balancer to notice) and stop answering on the admin socket at once, so `/ready`
    /// there comes from the successor alone. The addresses are those of the sockets
    /// the successor closed (no longer configured): what waits in their queues is
    /// served here, as in a drain, before they close.
    HandedOver(Vec<SocketAddr>),
    /// Stop at once, cutting what is open (a second SIGINT).
    Exit,
}

/// Process-wide state the admin endpoints show.
#[derive(Debug, Default)]
pub struct ServerState {
    pub draining: AtomicBool,
    /// A successor serves on our sockets: `/ready` stays as it was, but every admin
    /// answer closes its connection, so a keep-alive checker reconnects to the successor.
    pub handed_over: AtomicBool,
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
    pub upgrades: AtomicU64,
    pub upgrade_failures: AtomicU64,
    /// Client connections: open ones, and their figures.
    pub clients: Tracker,
}

/// Why [`Server::run`] stopped serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Drain,
    HandedOver,
    Exit,
}

/// How the drain went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainReport {
    /// Client connections still open at the drain deadline (or at `Exit`), those
    /// already closed and only lingering left out.
    pub cut: usize,
}

pub struct Server {
    proxy: Arc<Proxy>,
    config: Arc<Config>,
    listeners: Vec<TcpListener>,
    /// Settings, TLS and protocol builders of each listener, in `listeners` order.
    fronts: Vec<Arc<ListenerShared>>,
    admin: Option<TcpListener>,
    /// Bound addresses of inherited sockets no longer configured, closed here.
    released: Vec<SocketAddr>,
    pub state: Arc<ServerState>,
}

impl Server {
    /// Opens every listener in the config (adopting inherited sockets after an
    /// upgrade) and builds routes and upstreams.
    ///
    /// # Errors
    /// A listener or the admin address cannot be bound, or a listener's certificates
    /// cannot be used.
    pub async fn bind(config: Config) -> std::io::Result<Server> {
        let mut inherited = inherit::take_inherited();
        let mut listeners = Vec::new();
        for l in &config.listeners {
            let std = match inherited.take(l.listen) {
                Some(s) => s,
                None => bind_tcp(l.listen)?,
            };
            // Also on an inherited socket: a predecessor may not have set it.
            socket2::SockRef::from(&std).set_tcp_nodelay(true)?;
            listeners.push(TcpListener::from_std(std)?);
        }
        // The admin socket is handed on too: the predecessor holds it until it drains,
        // so binding it again would fail.
        let admin = if config.admin.enabled {
            let std = match inherited.take(config.admin.listen) {
                Some(s) => s,
                None => bind_tcp(config.admin.listen)?,
            };
            Some(TcpListener::from_std(std)?)
        } else {
            None
        };
        let released = inherited.release();
        let config = Arc::new(config);
        let routing = Routing::build(config.clone(), None).await;
        let proxy = Arc::new(Proxy::new(routing));
        let fronts = config
            .listeners
            .iter()
            .map(|lc| {
                ListenerShared::new(proxy.clone(), lc.clone(), config.drain.clone())
                    .map(Arc::new)
                    .map_err(|e| std::io::Error::other(format!("listener {}: {e}", lc.listen)))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Server {
            proxy,
            config,
            listeners,
            fronts,
            admin,
            released,
            state: Arc::new(ServerState::default()),
        })
    }

    pub fn listen_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// Bound addresses of the inherited sockets this process closed (no longer
    /// configured), for the predecessor to serve what is queued there.
    pub fn released(&self) -> &[SocketAddr] {
        &self.released
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The listening sockets (the admin one included), by configured address, for
    /// handing to a successor.
    pub fn listener_fds(&self) -> Vec<(SocketAddr, RawFd)> {
        let admin = self
            .admin
            .as_ref()
            .map(|l| (self.config.admin.listen, l.as_raw_fd()));
        self.config
            .listeners
            .iter()
            .zip(&self.listeners)
            .map(|(c, l)| (c.listen, l.as_raw_fd()))
            .chain(admin)
            .collect()
    }

    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.proxy
    }

    /// Serves until `Control::Drain` or `HandedOver` (or the channel closes), then
    /// drains; `Control::Exit` cuts the drain short.
    pub async fn run(self, mut control: mpsc::Receiver<Control>) -> DrainReport {
        let Server {
            proxy,
            config,
            listeners,
            fronts,
            admin,
            released: _,
            state,
        } = self;
        let (signal, watch) = drain::channel();
        let tracker = state.clients.clone();
        let mut admin_task =
            admin.map(|l| tokio::spawn(admin::serve(l, proxy.clone(), state.clone())));
        let mut accepting = Vec::new();
        for (listener, shared) in listeners.into_iter().zip(&fronts) {
            accepting.push(tokio::spawn(listener::accept_loop(
                listener,
                shared.clone(),
                watch.clone(),
                tracker.clone(),
            )));
        }

        let mut released = Vec::new();
        // A reload resolves its upstreams' host names, which a slow or hung resolver
        // can stretch to any length: it runs beside the loop, which goes on hearing
        // stop messages. A newer config replaces a reload still under way (nothing
        // of it is in force before its last step), so a fix for a name that hangs
        // applies at once.
        let mut reloading: Option<std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>>> = None;
        let mut stop = loop {
            let cmd = match reloading.as_mut() {
                None => control.recv().await,
                Some(running) => tokio::select! {
                    () = running => {
                        reloading = None;
                        continue;
                    }
                    cmd = control.recv() => cmd,
                },
            };
            match cmd {
                Some(Control::Reload(new)) => {
                    if reloading.is_some() {
                        tracing::warn!(
                            "the reload under way (resolving upstream host names) is replaced by a newer one"
                        );
                    }
                    reloading = Some(Box::pin(reload(&proxy, &config, &fronts, *new, &state)));
                }
                Some(Control::Drain) | None => break Stop::Drain,
                Some(Control::HandedOver(closed)) => {
                    released = closed;
                    break Stop::HandedOver;
                }
                Some(Control::Exit) => break Stop::Exit,
            }
        };
        if reloading.take().is_some() {
            tracing::warn!(
                "reload abandoned (still resolving upstream host names): this process is draining"
            );
        }

        // The drain, in order: /ready fails; a pause for load balancers; listeners
        // stop; responses carry `Connection: close` and idle connections close once
        // quiet; upstream pools close idle connections; exit when nothing is open.
        // After a hand-over the successor serves on the same sockets, so neither the
        // readiness change nor the pause applies.
        if stop == Stop::HandedOver {
            // The successor answers on the admin socket now; `/ready` stays true there.
            // Connections already open here are told to reconnect (to the successor).
            state.handed_over.store(true, Relaxed);
            if let Some(t) = admin_task.take() {
                t.abort();
            }
        } else {
            state.draining.store(true, Relaxed);
        }
        let drain_cfg = proxy.routing().config.drain.clone();
        tracing::info!(open = tracker.open(), timeout = %drain_cfg.timeout, "draining");
        if stop == Stop::Drain && !drain_cfg.pre_delay.get().is_zero() {
            // A loop: a message other than Exit (a reload, another drain) must not
            // leave the rest of the pause deaf to the Exit behind it.
            let pause = tokio::time::sleep(drain_cfg.pre_delay.get());
            tokio::pin!(pause);
            let mut listening = true;
            loop {
                tokio::select! {
                    () = &mut pause => break,
                    cmd = control.recv(), if listening => match cmd {
                        Some(Control::Exit) => {
                            stop = Stop::Exit;
                            break;
                        }
                        Some(Control::Reload(_)) => {
                            tracing::warn!("reload ignored: this process is draining");
                        }
                        Some(_) => {}
                        None => listening = false,
                    },
                }
            }
        }
        signal.start();
        // Once every accept loop has returned, no listener of ours is open: a new
        // connection is refused, or (after an upgrade) goes to the successor. A socket
        // the successor closed is ours alone: closing it would reset its queue.
        for (task, shared) in accepting.into_iter().zip(&fronts) {
            if let Ok(l) = task.await
                && (stop == Stop::Drain
                    || (stop == Stop::HandedOver
                        && l.local_addr().is_ok_and(|a| released.contains(&a))))
            {
                listener::take_queued(l, shared, &watch, &tracker);
            }
        }
        tracing::info!(
            open = tracker.open(),
            "listeners closed; closing client connections as their requests end"
        );
        proxy.routing().upstreams.drain();
        // At the end, what is still open is cut; a close still lingering (reading what
        // the client sends after holdfast's FIN) has nothing left to answer.
        let ended = |tracker: &Tracker| (tracker.unfinished(), tracker.open());
        let (cut, open) = if stop == Stop::Exit {
            ended(&tracker)
        } else {
            let deadline = tokio::time::sleep(drain_cfg.timeout.get());
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    () = tracker.wait_zero() => break (0, 0),
                    () = &mut deadline => break ended(&tracker),
                    cmd = control.recv() => match cmd {
                        Some(Control::Exit) => break ended(&tracker),
                        Some(Control::Reload(_)) => {
                            tracing::warn!("reload ignored: this process is draining");
                        }
                        Some(_) => {}
                        // The controller is gone; nobody can say Exit any more.
                        None => {
                            tokio::select! {
                                () = tracker.wait_zero() => break (0, 0),
                                () = &mut deadline => break ended(&tracker),
                            }
                        }
                    },
                }
            }
        };
        if cut > 0 {
            crate::proxy::access_log::drain_cuts();
            tracing::warn!(
                connections = cut,
                "drain ended with connections still open; cutting them"
            );
        } else if open > 0 {
            tracing::info!(
                lingering = open,
                "drained: nothing left to answer; closes still lingering are dropped"
            );
        } else {
            tracing::info!("drained: no connection left open");
        }
        if let Some(t) = admin_task {
            t.abort();
        }
        DrainReport { cut }
    }
}

/// Applies a new config. Cancel safe, as `Server::run` needs (a drain or a newer
/// config drops a reload still resolving host names): nothing of it applies before
/// its one await, the upstreams' build, is over.
///
/// Certificate files are read first: one that cannot be used (config validation read
/// it, but it may have changed since) refuses the whole reload, as any bad file does.
async fn reload(
    proxy: &Proxy,
    running: &Config,
    fronts: &[Arc<ListenerShared>],
    mut new: Config,
    state: &ServerState,
) {
    let old = proxy.routing();
    // The listeners in force, in `fronts` order: what `/config` goes on showing, with
    // the certificates that a reload swaps in.
    let mut listeners = old.config.listeners.clone();
    let mut certificates = Vec::new();
    for (i, (front, in_force)) in fronts.iter().zip(&listeners).enumerate() {
        let listen = in_force.listen;
        let Some(tls) = new
            .listeners
            .iter()
            .find(|l| l.listen == listen)
            .and_then(|l| l.tls.as_ref())
        else {
            continue;
        };
        match front.load_certificates(tls) {
            Some(Ok(store)) => certificates.push((i, tls.clone(), store)),
            Some(Err(e)) => {
                state.reload_failures.fetch_add(1, Relaxed);
                tracing::error!(%listen, "certificates cannot be used: {e}");
                tracing::error!(
                    "reload refused; keeping the running config and the certificates in force"
                );
                return;
            }
            None => {}
        }
    }
    let upstreams = Upstreams::build(&new.upstreams, Some(&old.upstreams)).await;
    // Certificates are the one listener setting a reload applies: their files are read
    // again even when the config names the same ones (a renewal rewrites them).
    let without_certs = |c: &Config| {
        let mut ls = c.listeners.clone();
        for l in &mut ls {
            l.tls = l.tls.as_ref().map(|_| TlsConfig::new("", ""));
        }
        ls
    };
    if without_certs(&new) != without_certs(running) || new.admin != running.admin {
        tracing::warn!(
            "listener and admin changes take effect on the next upgrade (SIGUSR2), not on reload"
        );
    }
    for (i, tls, store) in certificates {
        let (Some(front), Some(in_force)) = (fronts.get(i), listeners.get_mut(i)) else {
            continue;
        };
        let n = front.install_certificates(store);
        in_force.tls = Some(tls);
        tracing::info!(listen = %in_force.listen, certificates = n, "certificates reloaded");
    }
    crate::telemetry::reload(&new.log);
    // What only an upgrade changes stays as it is, in the config `/config` shows too.
    new.listeners = listeners;
    new.admin = old.config.admin.clone();
    new.workers = old.config.workers;
    new.pid_file.clone_from(&old.config.pid_file);
    new.log.format = old.config.log.format;
    new.drain.idle_close_after = old.config.drain.idle_close_after;
    let routing = Routing::with_upstreams(Arc::new(new), upstreams, Some(&old));
    proxy.replace(routing);
    state.reloads.fetch_add(1, Relaxed);
    tracing::info!("config reloaded; new requests use it");
}

/// The accept queue's depth asked of the kernel (capped by `net.core.somaxconn`).
pub(crate) const LISTEN_BACKLOG: usize = 1024;

/// Binds a listening socket the way a server should: SO_REUSEADDR (restart while old
/// connections sit in TIME_WAIT), TCP_NODELAY (Linux gives accepted connections the
/// listener's, which saves a setsockopt per connection), a deep accept queue,
/// non-blocking.
pub fn bind_tcp(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_tcp_nodelay(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket
        .bind(&addr.into())
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
    socket.listen(LISTEN_BACKLOG as i32)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accepted connections get TCP_NODELAY from the listener (Linux), with no
    /// setsockopt of their own.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn accepted_connections_inherit_nodelay_from_the_listener() {
        let listener =
            TcpListener::from_std(bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(
            accepted.nodelay().unwrap(),
            "the accepted socket has TCP_NODELAY"
        );
        drop(client);
    }

    /// A config naming `host` as its one upstream's address, listeners on port 0.
    fn config_to(host: &str) -> Config {
        let text = format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n\n[[listener]]\nlisten = \"127.0.0.1:0\"\n\n\
             [[route]]\nupstream = \"u\"\n\n[upstream.u]\naddresses = [\"http://{host}:9\"]\n"
        );
        Config::from_toml(&text, std::path::Path::new("t.toml")).expect("valid config")
    }

    const SOON: std::time::Duration = std::time::Duration::from_secs(10);

    /// Sends a reload to the hung host and waits until its lookup has begun.
    async fn reload_hung_on_the_resolver(tx: &mpsc::Sender<Control>) {
        use std::sync::atomic::Ordering::SeqCst;

        use crate::upstream::tests::{HUNG_HOST, HUNG_LOOKUPS};
        let before = HUNG_LOOKUPS.load(SeqCst);
        tx.send(Control::Reload(Box::new(config_to(HUNG_HOST))))
            .await
            .expect("running");
        let asked = crate::upstream::tests::hung_lookup_begun(before, SOON).await;
        assert!(asked, "the reload asked the resolver");
    }

    /// A reload whose upstream names a host the resolver never answers for: a drain
    /// (SIGTERM) still goes ahead at once, and the process (its runtime) still ends.
    /// Before, the control loop awaited the reload, so the drain waited behind the
    /// lookup, and the lookup on tokio's blocking pool kept the runtime from shutting
    /// down.
    #[test]
    fn a_reload_hung_on_the_resolver_holds_up_neither_a_drain_nor_the_exit() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let report = rt.block_on(async {
            let server = Server::bind(config_to("127.0.0.1")).await.expect("bind");
            let (tx, rx) = mpsc::channel(4);
            let run = tokio::spawn(server.run(rx));
            reload_hung_on_the_resolver(&tx).await;
            tx.send(Control::Drain).await.expect("running");
            tokio::time::timeout(SOON, run)
                .await
                .expect("the drain goes ahead without waiting for the resolver")
                .expect("the server task did not panic")
        });
        assert_eq!(report.cut, 0);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(rt);
            let _ = done_tx.send(());
        });
        assert!(
            done_rx.recv_timeout(SOON).is_ok(),
            "the runtime shuts down without waiting for the hung lookup"
        );
    }

    /// SIGHUP again with the name fixed, while the first reload waits on the resolver:
    /// the newer config applies at once.
    #[tokio::test]
    async fn a_newer_reload_replaces_one_hung_on_the_resolver() {
        let server = Server::bind(config_to("127.0.0.1")).await.expect("bind");
        let proxy = server.proxy().clone();
        let state = server.state.clone();
        let (tx, rx) = mpsc::channel(4);
        let run = tokio::spawn(server.run(rx));
        reload_hung_on_the_resolver(&tx).await;
        tx.send(Control::Reload(Box::new(config_to("127.0.0.2"))))
            .await
            .expect("running");
        let reloaded = tokio::time::timeout(SOON, async {
            // Bounded by the timeout.
            while state.reloads.load(Relaxed) == 0 {
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
        })
        .await;
        assert!(reloaded.is_ok(), "the newer config was applied");
        assert_eq!(state.reloads.load(Relaxed), 1);
        let peers = proxy
            .routing()
            .upstreams
            .get("u")
            .expect("upstream u")
            .peers();
        let labels: Vec<&str> = peers.iter().map(|p| &*p.label).collect();
        assert_eq!(labels, ["127.0.0.2:9"]);
        tx.send(Control::Drain).await.expect("running");
        let report = tokio::time::timeout(SOON, run)
            .await
            .expect("drained")
            .expect("no panic");
        assert_eq!(report.cut, 0);
    }
}
