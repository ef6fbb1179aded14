//! The process around a [`Server`]: PID file, readiness notices (predecessor pipe,
//! systemd), and signals.
//!
//! | signal | effect |
//! |---|---|
//! | SIGTERM, SIGQUIT, first SIGINT | graceful drain, then exit |
//! | second SIGINT | exit at once |
//! | SIGHUP | reload the config file (or, started from flags, the certificate files); a bad one is logged and the old one kept; during an upgrade, also passed on to the new process once it is ready; after a hand-over, passed on; otherwise ignored while draining |
//! | SIGUSR2 | start the binary at our path, hand it the listeners, drain once it is ready; ignored while draining |
//! | any of them while starting | a stop signal: exit at once, status 0, before the PID file or readiness; SIGHUP: read the config again once ready; SIGUSR2: logged and ignored |
//!
//! They are held (blocked) from the first moments of the binary ([`held::hold`]), so
//! none can kill the process before its handlers are in.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::server::drain::Phase;
use crate::server::{Control, Server, inherit};

pub mod held;

/// Where the running config came from, so it can be read again and handed on.
#[derive(Debug, Clone)]
pub struct Origin {
    /// The config file, for SIGHUP; `None` when the config came from flags.
    pub config_path: Option<PathBuf>,
    /// The binary's path, captured at start (`own_path`): after an upgrade it
    /// holds the new build, and a symlink in it is followed then.
    pub exe: PathBuf,
    /// Arguments to start a successor with (our own, minus the program name).
    pub args: Vec<OsString>,
}

impl Origin {
    pub fn current(config_path: Option<PathBuf>) -> Origin {
        Origin {
            config_path,
            exe: own_path(),
            args: std::env::args_os().skip(1).collect(),
        }
    }
}

/// The path this binary was started by, as an absolute path, symlinks kept: a deploy
/// that repoints a symlink to a new build (`current -> releases/N`) upgrades to what
/// it names at the SIGUSR2. `current_exe` reads `/proc/self/exe`, which names the file
/// the symlink led to at start, so every upgrade would start that first build again.
/// `argv[0]` is taken (found in `PATH` if it names no directory, as the shell did)
/// only if it leads to the very file running now; otherwise `current_exe`.
fn own_path() -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    let running = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("holdfast"));
    let Ok(this) = std::fs::metadata("/proc/self/exe") else {
        return running;
    };
    let is_this = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.dev() == this.dev() && m.ino() == this.ino())
    };
    let Some(arg0) = std::env::args_os().next().filter(|a| !a.is_empty()) else {
        return running;
    };
    let cwd = std::env::current_dir().ok();
    let absolute = |p: PathBuf| match &cwd {
        Some(dir) if p.is_relative() => dir.join(p),
        _ => p,
    };
    let found = if arg0.as_bytes().contains(&b'/') {
        Some(absolute(PathBuf::from(&arg0)))
    } else {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| absolute(dir.join(&arg0)))
                .find(|p| is_this(p))
        })
    };
    found.filter(|p| is_this(p)).unwrap_or(running)
}

/// Runs the gateway until it has drained. Returns the process exit status.
pub async fn run(config: Config, origin: Origin) -> i32 {
    let pid_file = config.pid_file.clone();
    let ready_timeout = config.upgrade.ready_timeout.get();
    // Started from flags: SIGHUP applies the same config again, which reads the
    // certificate files again.
    let fixed = origin.config_path.is_none().then(|| config.clone());
    // Handlers first: binding and resolving upstream names can take seconds, and a
    // signal before the handlers (held until now, see `held`) would kill the process.
    let mut signals = match Signals::install() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install signal handlers");
            return 1;
        }
    };
    let mut starting = Starting::default();
    for signal in held::release() {
        if let Some(code) = starting.heard(held::name(signal)) {
            return code;
        }
    }
    let server = {
        let bind = Server::bind(config);
        tokio::pin!(bind);
        let heard = loop {
            let heard = tokio::select! {
                biased;
                _ = signals.term.recv() => "SIGTERM",
                _ = signals.quit.recv() => "SIGQUIT",
                _ = signals.int.recv() => "SIGINT",
                _ = signals.hup.recv() => "SIGHUP",
                _ = signals.usr2.recv() => "SIGUSR2",
                r = &mut bind => break r,
            };
            if let Some(code) = starting.heard(heard) {
                return code;
            }
        };
        match heard {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                return 1;
            }
        }
    };
    for addr in server.listen_addrs() {
        tracing::info!(%addr, "listening");
    }
    if let Some(addr) = server.admin_addr() {
        tracing::info!(%addr, "admin listening");
    }
    let pid = std::process::id();
    if let Some(path) = &pid_file
        && let Err(e) = write_pid_file(path, pid)
    {
        // Not started: scripts and systemd find the process by this file, and after an
        // upgrade it would name the predecessor, which removes it as it exits. (As
        // a successor, this fails the upgrade; the predecessor goes on serving.)
        tracing::error!(path = %path.display(), error = %e, "cannot write pid file; not starting");
        return 1;
    }
    // systemd first: once the predecessor hears `ready` it drains and may exit at
    // once, and systemd, not yet told of the new main PID, would take the service
    // for gone.
    let _ = sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::MainPid(pid),
            sd_notify::NotifyState::Ready,
        ],
    );
    inherit::notify_ready(server.released());

    let (tx, rx) = mpsc::channel(8);
    let listeners = server.listener_fds();
    let state = server.state.clone();
    // `false` while a successor told to stop as it started is not yet settled (see
    // `reap_stopped`).
    let (settled_tx, mut settled) = watch::channel(true);
    let signals = tokio::spawn(handle_signals(
        (signals, starting.reload),
        tx,
        (origin, fixed),
        (listeners, pid_file.clone()),
        ready_timeout,
        state,
        settled_tx,
    ));
    let report = server.run(rx).await;
    // Not before a stopped successor is either serving (and draining) or killed: one
    // stuck in its start must not outlive us with our sockets.
    let _ = settled.wait_for(|done| *done).await;
    signals.abort();
    if let Some(path) = &pid_file {
        // A successor rewrote the file; leave it alone then.
        if read_pid_file(path) == Some(pid) {
            let _ = std::fs::remove_file(path);
        }
    }
    if report.cut > 0 { 2 } else { 0 }
}

/// How long the exit waits, once [`run`] has returned and every task is dropped, for
/// work still on tokio's blocking pool (see [`shut_down`]).
pub const EXIT_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Ends the runtime [`run`] ran on: every task is dropped (a request a drain cut
/// writes its `drain_cut` access line then), and the exit waits at most
/// [`EXIT_GRACE`] for work on tokio's blocking pool. A runtime that is dropped waits
/// for that work without limit: a FastCGI route's `check_file` stat (`tokio::fs`)
/// hung on a dead network file system kept a drained process from exiting, past
/// `drain.timeout`, for good.
pub fn shut_down(rt: tokio::runtime::Runtime) {
    rt.shutdown_timeout(EXIT_GRACE);
}

/// What the signals heard while starting (before the PID file and readiness) ask for.
#[derive(Default)]
struct Starting {
    /// A SIGHUP came: read the config again once ready. The file was read a moment
    /// ago, maybe before the change the SIGHUP was sent for.
    reload: bool,
}

impl Starting {
    /// Takes note of `signal`; `Some(exit status)` if the process is to exit now.
    fn heard(&mut self, signal: &str) -> Option<i32> {
        match signal {
            "SIGHUP" => {
                if !self.reload {
                    tracing::info!(
                        "SIGHUP while starting: the config will be read again once ready"
                    );
                }
                self.reload = true;
                None
            }
            "SIGUSR2" => {
                tracing::warn!(
                    "SIGUSR2 ignored: this process is still starting; send it again once it is ready"
                );
                None
            }
            // Nothing served yet, nothing written: exit before anyone is told we run
            // (the PID file, systemd, a predecessor), rather than bind and start only
            // to drain at once.
            stop => {
                tracing::info!("{stop} while starting: exiting before serving");
                Some(0)
            }
        }
    }
}

/// The signals holdfast acts on, registered with the runtime.
struct Signals {
    term: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr2: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            quit: signal(SignalKind::quit())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            usr2: signal(SignalKind::user_defined2())?,
        })
    }
}

/// `reload_first`: a SIGHUP came while starting (see `Starting`).
async fn handle_signals(
    (signals, reload_first): (Signals, bool),
    tx: mpsc::Sender<Control>,
    (origin, fixed): (Origin, Option<Config>),
    (listeners, pid_file): (
        Vec<(std::net::SocketAddr, std::os::fd::RawFd)>,
        Option<PathBuf>,
    ),
    mut ready_timeout: std::time::Duration,
    state: std::sync::Arc<crate::server::ServerState>,
    settled: watch::Sender<bool>,
) {
    let Signals {
        mut term,
        mut quit,
        mut int,
        mut hup,
        mut usr2,
    } = signals;
    let mut interrupts = 0;
    let mut phase = Phase::Running;
    // After a hand-over, the way to the new process (see `keep`): a SIGHUP sent here
    // (by a script that read the PID file a moment before it changed) is passed on.
    let mut handed_to: Option<mpsc::UnboundedSender<()>> = None;
    // `true` once told to exit at once (a second SIGINT): a successor told to stop as
    // it started is killed then, not waited for.
    let (exit_now, _) = watch::channel(false);
    if reload_first && let Some(cmd) = reload(&origin, fixed.as_ref(), &state, &mut ready_timeout) {
        let _ = tx.send(cmd).await;
    }
    loop {
        let cmd = tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: draining"); Some(Control::Drain) }
            _ = quit.recv() => { tracing::info!("SIGQUIT: draining"); Some(Control::Drain) }
            _ = int.recv() => {
                interrupts += 1;
                if interrupts == 1 {
                    tracing::info!("SIGINT: draining (again to exit at once)");
                    Some(Control::Drain)
                } else {
                    tracing::warn!("second SIGINT: exiting at once");
                    Some(Control::Exit)
                }
            }
            _ = hup.recv() => match &handed_to {
                Some(successor) => {
                    if successor.send(()).is_err() {
                        tracing::warn!("SIGHUP ignored: the new process this one handed over to has exited");
                    }
                    None
                }
                // README: logged and ignored. Not even read: a bad file would be
                // reported, and counted, as a reload that failed.
                None if phase == Phase::Draining => {
                    tracing::warn!("SIGHUP ignored: this process is draining");
                    None
                }
                None => reload(&origin, fixed.as_ref(), &state, &mut ready_timeout),
            },
            _ = usr2.recv() => match phase {
                Phase::Running => {
                    let during = DuringUpgrade {
                        term: &mut term,
                        quit: &mut quit,
                        int: &mut int,
                        hup: &mut hup,
                        tx: &tx,
                        origin: (&origin, fixed.as_ref()),
                        ready_timeout: &mut ready_timeout,
                    };
                    let hand = (listeners.as_slice(), pid_file.as_deref());
                    match upgrade(during, hand, &state, (&settled, &exit_now)).await {
                        Upgraded::No => None,
                        Upgraded::HandedOver { released, mut successor, reloaded } => {
                            // The new process may have read the config file before the
                            // change the SIGHUP was sent for.
                            if reloaded {
                                pass_on_sighup(&mut successor);
                            }
                            handed_to = Some(keep(successor));
                            Some(Control::HandedOver(released))
                        }
                        Upgraded::Stopped(signal) => {
                            if signal == "SIGINT" {
                                interrupts += 1;
                            }
                            Some(Control::Drain)
                        }
                    }
                }
                // Our listeners are closed (or handed over) by now: a successor would
                // inherit dead descriptor numbers, or ones reused by client sockets.
                Phase::Draining => {
                    tracing::warn!("SIGUSR2 ignored: this process is draining; signal the process in the PID file");
                    None
                }
            },
        };
        let Some(cmd) = cmd else { continue };
        if !matches!(cmd, Control::Reload(_)) {
            phase = Phase::Draining;
        }
        if matches!(cmd, Control::Exit) {
            exit_now.send_replace(true);
        }
        // Fails once the server has drained; this task goes on while the process
        // waits for a stopped successor, for a second SIGINT to cut that wait short.
        let _ = tx.send(cmd).await;
    }
}

/// Watches the process this one handed its sockets to, and passes it a SIGHUP for each
/// message on the returned channel, which closes once it has exited (and is reaped:
/// the signal is sent only before, so its PID cannot name another process).
fn keep(mut successor: Box<inherit::Successor>) -> mpsc::UnboundedSender<()> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = successor.child.wait() => return,
                Some(()) = rx.recv() => pass_on_sighup(&mut successor),
            }
        }
    });
    tx
}

/// Passes a SIGHUP on to the process this one handed its sockets to, which reads the
/// config file again.
fn pass_on_sighup(successor: &mut inherit::Successor) {
    match successor.signal(libc::SIGHUP) {
        Some(pid) => tracing::info!(
            pid,
            "SIGHUP: passed on to the new process, which serves now"
        ),
        None => {
            tracing::warn!("SIGHUP ignored: the new process this one handed over to has exited")
        }
    }
}

/// Reads the config again (SIGHUP). A config read sets `ready_timeout`: the next
/// upgrade waits as long as the config in force says.
fn reload(
    origin: &Origin,
    fixed: Option<&Config>,
    state: &crate::server::ServerState,
    ready_timeout: &mut std::time::Duration,
) -> Option<Control> {
    let Some(path) = &origin.config_path else {
        return match fixed {
            Some(c) if c.listeners.iter().any(|l| l.tls.is_some()) => {
                tracing::info!("SIGHUP: reading the certificate files again");
                Some(Control::Reload(Box::new(c.clone())))
            }
            _ => {
                tracing::warn!("SIGHUP: no config file to reload (started without --config)");
                None
            }
        };
    };
    match Config::load(path) {
        Ok(c) => {
            tracing::info!(path = %path.display(), "SIGHUP: reloading config");
            *ready_timeout = c.upgrade.ready_timeout.get();
            Some(Control::Reload(Box::new(c)))
        }
        Err(errors) => {
            state.reload_failures.fetch_add(1, Relaxed);
            for e in &errors.0 {
                tracing::error!("{e}");
            }
            tracing::error!("SIGHUP: config rejected; keeping the running config");
            None
        }
    }
}

/// What the signal task hears while a new binary starts, and what it needs to act on
/// a SIGHUP then.
struct DuringUpgrade<'a> {
    term: &'a mut tokio::signal::unix::Signal,
    quit: &'a mut tokio::signal::unix::Signal,
    int: &'a mut tokio::signal::unix::Signal,
    hup: &'a mut tokio::signal::unix::Signal,
    tx: &'a mpsc::Sender<Control>,
    origin: (&'a Origin, Option<&'a Config>),
    ready_timeout: &'a mut std::time::Duration,
}

/// How an upgrade ended.
enum Upgraded {
    /// It failed; this process serves on.
    No,
    /// The new process serves; `reloaded`: a SIGHUP came while it started.
    HandedOver {
        released: Vec<std::net::SocketAddr>,
        successor: Box<inherit::Successor>,
        reloaded: bool,
    },
    /// A stop signal (named) came first; the successor was told to stop too (see
    /// [`reap_stopped`]), and the caller drains.
    Stopped(&'static str),
}

/// Starts the new binary and waits until it is ready. A SIGHUP meanwhile is applied
/// here at once (the upgrade may yet fail) and reported, to be passed on to the new
/// process: it may have read the config file before the change the SIGHUP is for.
async fn upgrade(
    during: DuringUpgrade<'_>,
    (listeners, pid_file): (&[(std::net::SocketAddr, std::os::fd::RawFd)], Option<&Path>),
    state: &crate::server::ServerState,
    (settled, exit_now): (&watch::Sender<bool>, &watch::Sender<bool>),
) -> Upgraded {
    let DuringUpgrade {
        term,
        quit,
        int,
        hup,
        tx,
        origin: (origin, fixed),
        ready_timeout,
    } = during;
    let timeout = *ready_timeout;
    tracing::info!(exe = %origin.exe.display(), "SIGUSR2: starting the new binary");
    let ready_by = tokio::time::Instant::now() + timeout;
    let mut successor = match inherit::spawn_successor(&origin.exe, &origin.args, listeners) {
        Ok(s) => s,
        Err(e) => {
            state.upgrade_failures.fetch_add(1, Relaxed);
            tracing::error!(error = %e, "upgrade failed: cannot start the new binary; still serving");
            return Upgraded::No;
        }
    };
    let mut reloaded = false;
    let outcome = {
        let ready = successor.wait_ready(timeout);
        tokio::pin!(ready);
        loop {
            tokio::select! {
                r = &mut ready => break Ok(r),
                // A stop signal is not left waiting for the new process.
                _ = term.recv() => break Err("SIGTERM"),
                _ = quit.recv() => break Err("SIGQUIT"),
                _ = int.recv() => break Err("SIGINT"),
                _ = hup.recv() => {
                    reloaded = true;
                    if let Some(cmd) = reload(origin, fixed, state, ready_timeout) {
                        // Fails only once the server has stopped, which it does only
                        // when this task tells it to.
                        let _ = tx.send(cmd).await;
                    }
                }
            }
        }
    };
    match outcome {
        Ok(Ok(released)) => {
            state.upgrades.fetch_add(1, Relaxed);
            tracing::info!(
                pid = successor.child.id(),
                "new binary is ready; draining this one"
            );
            Upgraded::HandedOver {
                released,
                successor: Box::new(successor),
                reloaded,
            }
        }
        Ok(Err(why)) => {
            state.upgrade_failures.fetch_add(1, Relaxed);
            tracing::error!("upgrade failed: {why}; still serving");
            // Never leave a half-started successor sharing our sockets.
            kill(&mut successor, pid_file).await;
            Upgraded::No
        }
        Err(signal) => {
            state.upgrade_failures.fetch_add(1, Relaxed);
            tracing::warn!(
                pid = successor.child.id(),
                "{signal} while the new binary was starting: stopping it, and draining this process"
            );
            // SIGTERM, not SIGKILL: it may have said ready a moment ago, unread yet,
            // and taken connections from our sockets, which it then drains.
            successor.terminate();
            settled.send_replace(false);
            let settled = settled.clone();
            let pid_file = pid_file.map(Path::to_path_buf);
            let exit_now = exit_now.subscribe();
            tokio::spawn(async move {
                reap_stopped(successor, ready_by, pid_file.as_deref(), exit_now).await;
                settled.send_replace(true);
            });
            Upgraded::Stopped(signal)
        }
    }
}

/// A successor told to stop while it started, in the background while this process
/// drains. If it says ready in its time it serves, and drains on the SIGTERM it was
/// sent; otherwise it has taken nothing from our sockets, and is killed (one stuck in
/// its start, a config that hangs on DNS, would not act on the SIGTERM), at once if
/// this process is told to exit at once (`exit_now`). Returns once it is one or the
/// other (a successor that serves may outlive this process).
async fn reap_stopped(
    mut successor: inherit::Successor,
    ready_by: tokio::time::Instant,
    pid_file: Option<&Path>,
    mut exit_now: watch::Receiver<bool>,
) {
    let left = ready_by.saturating_duration_since(tokio::time::Instant::now());
    let ready = tokio::select! {
        r = successor.wait_ready(left) => r.is_ok(),
        // Not when the signal task is gone (`Err`): nobody said exit at once.
        Ok(_) = exit_now.wait_for(|now| *now) => {
            tracing::warn!(pid = successor.child.id(), "killing the new binary, stopped as it started");
            false
        }
    };
    if !ready {
        kill(&mut successor, pid_file).await;
    }
}

/// Kills a successor that did not take over (if it has not died), and names this
/// process the service again: the successor may have rewritten the PID file and told systemd its PID
/// (it does both just before it says ready), and a script reading the file must find
/// a live holdfast.
async fn kill(successor: &mut inherit::Successor, pid_file: Option<&Path>) {
    // Also one that has died by now, reaped as it was waited for.
    let theirs = successor.pid;
    let _ = successor.child.start_kill();
    let _ = successor.child.wait().await;
    let own = std::process::id();
    if let Some(path) = pid_file
        && theirs.is_some()
        && read_pid_file(path) == theirs
    {
        match write_pid_file(path, own) {
            Ok(()) => tracing::info!(path = %path.display(), "pid file names this process again"),
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot write pid file back")
            }
        }
    }
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        // On a thread of its own: a send to a notify socket whose queue is full waits,
        // and must hold up neither the signal task nor the exit.
        let _ = std::thread::Builder::new()
            .name("sd-notify".into())
            .spawn(move || {
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::MainPid(own)]);
            });
    }
}

fn write_pid_file(path: &Path, pid: u32) -> std::io::Result<()> {
    // Write then rename, so a reader never sees a half-written file.
    let tmp = path.with_extension("pid.tmp");
    std::fs::write(&tmp, format!("{pid}\n"))?;
    std::fs::rename(&tmp, path)
}

fn read_pid_file(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::SeqCst;
    use std::time::Duration;

    use super::*;
    use crate::upstream::tests::{HUNG_HOST, HUNG_LOOKUPS};

    const SOON: Duration = Duration::from_secs(10);

    fn send_self(signal: libc::c_int) {
        holdfast_test::sys::send_signal(std::process::id(), signal).expect("kill");
    }

    /// A drained process exits although a task on tokio's blocking pool never ends
    /// (a `check_file` stat hung on a dead network file system): before, the runtime
    /// was dropped, which waits for such a task for good.
    #[test]
    fn the_exit_does_not_wait_for_a_hung_blocking_task() {
        for workers in [1, 2] {
            let rt = if workers == 1 {
                tokio::runtime::Builder::new_current_thread()
            } else {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                b.worker_threads(workers);
                b
            }
            .enable_all()
            .build()
            .expect("runtime");
            let (begun_tx, begun_rx) = std::sync::mpsc::channel();
            rt.block_on(async {
                tokio::task::spawn_blocking(move || {
                    let _ = begun_tx.send(());
                    loop {
                        std::thread::park();
                    }
                });
            });
            assert!(begun_rx.recv_timeout(SOON).is_ok(), "the task began");
            let (done_tx, done_rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                shut_down(rt);
                let _ = done_tx.send(());
            });
            assert!(
                done_rx.recv_timeout(SOON).is_ok(),
                "{workers} worker(s): the runtime ends"
            );
        }
    }

    /// A start held up resolving an upstream name (a resolver that never answers):
    /// a SIGHUP and a SIGUSR2 then do not kill the process, and a SIGTERM ends the
    /// start at once, status 0, with no PID file written. Before, the handlers went
    /// in only once the listeners were bound and the names resolved, so any of these
    /// took its default action and killed the process.
    #[test]
    fn signals_while_resolving_at_start_neither_kill_nor_wait_for_the_resolver() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let dir = holdfast_test::tempdir();
        let pid_file = dir.path().join("holdfast.pid");
        let text = format!(
            "pid_file = \"{}\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
             [[listener]]\nlisten = \"127.0.0.1:0\"\n\n\
             [[route]]\nupstream = \"u\"\n\n[upstream.u]\naddresses = [\"http://{HUNG_HOST}:9\"]\n",
            pid_file.display()
        );
        let config = Config::from_toml(&text, Path::new("t.toml")).expect("valid config");
        let origin = Origin {
            config_path: None,
            exe: PathBuf::from("holdfast"),
            args: Vec::new(),
        };
        let code = rt.block_on(async {
            let before = HUNG_LOOKUPS.load(SeqCst);
            let run = tokio::spawn(run(config, origin));
            let asked = crate::upstream::tests::hung_lookup_begun(before, SOON).await;
            assert!(asked, "the start asked the resolver");
            send_self(libc::SIGHUP);
            send_self(libc::SIGUSR2);
            send_self(libc::SIGTERM);
            tokio::time::timeout(SOON, run)
                .await
                .expect("the stop signal ends the start without waiting for the resolver")
                .expect("no panic")
        });
        assert_eq!(code, 0);
        assert!(!pid_file.exists(), "a PID file was written");
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(rt);
            let _ = done_tx.send(());
        });
        assert!(done_rx.recv_timeout(SOON).is_ok(), "the runtime shuts down");
    }
}
