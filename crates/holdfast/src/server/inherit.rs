//! Handing listening sockets to a new binary (SIGUSR2) and adopting them in it.
//!
//! The old process starts the binary at its path with the listening sockets (the
//! admin one too) inherited (their close-on-exec flag cleared in the child only) and
//! their numbers in `HOLDFAST_LISTEN_FDS`, plus the write end of a pipe in
//! `HOLDFAST_READY_FD`. The new process adopts the sockets instead of binding, so they
//! are never closed and nothing in the accept queue is lost; it adopts only a socket
//! that really listens on the configured address. Once it serves, it writes `ready`
//! to the pipe, followed by ` released=ADDR` for each handed-on socket it closed (no
//! longer configured: only the old process holds it now), and the old process drains,
//! serving what is queued at those sockets before it closes them. One of the few places
//! allowed `unsafe` (the list is in ARCHITECTURE.md): adopting a file descriptor and
//! clearing flags between fork and exec cannot be done without it.

#![allow(unsafe_code)]

use std::ffi::OsString;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const LISTEN_FDS: &str = "HOLDFAST_LISTEN_FDS";
const READY_FD: &str = "HOLDFAST_READY_FD";

/// Listening sockets inherited from the previous binary, with the address each was
/// configured with, in the order handed on (listeners in config order, then admin).
/// Several may share a configured address (port 0: any free port), so this is a list,
/// taken from the front ([`Inherited::take`]) to give each socket its old role. Taken
/// once per process, so no socket is ever adopted twice.
pub fn take_inherited() -> Inherited {
    static TAKEN: AtomicBool = AtomicBool::new(false);
    let mut out = Inherited(Vec::new());
    if TAKEN.swap(true, Ordering::SeqCst) {
        return out;
    }
    let Ok(spec) = std::env::var(LISTEN_FDS) else {
        return out;
    };
    for item in spec.split(';').filter(|s| !s.is_empty()) {
        let Some((addr, fd)) = item.rsplit_once('=') else {
            continue;
        };
        let (Ok(addr), Ok(fd)) = (addr.parse::<SocketAddr>(), fd.parse::<RawFd>()) else {
            tracing::warn!(%item, "ignoring malformed inherited listener");
            continue;
        };
        // Only adopt what is really an open socket of ours.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            tracing::warn!(%addr, fd, "inherited listener fd is not open");
            continue;
        }
        // SAFETY: the fd is open (checked above) and only borrowed for this check.
        if !is_listener_on(unsafe { BorrowedFd::borrow_raw(fd) }, addr) {
            // Not ours to close: leave the descriptor alone and bind afresh.
            tracing::warn!(%addr, fd, "inherited fd is not a socket listening on that address; ignoring it");
            continue;
        }
        // SAFETY: the fd was passed to us by our predecessor for exactly this use, is
        // a listening socket on `addr` (checked above) and is adopted once (the TAKEN
        // flag).
        let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
        if listener.set_nonblocking(true).is_ok() {
            set_cloexec(fd, true);
            out.0.push((addr, listener));
        }
    }
    out
}

/// Inherited listening sockets not yet taken.
#[derive(Debug)]
pub struct Inherited(Vec<(SocketAddr, std::net::TcpListener)>);

impl Inherited {
    /// The first inherited socket configured with `addr`, if any.
    pub fn take(&mut self, addr: SocketAddr) -> Option<std::net::TcpListener> {
        let i = self.0.iter().position(|(a, _)| *a == addr)?;
        Some(self.0.remove(i).1)
    }

    /// Closes the sockets nobody took; returns the address each was bound to, for
    /// [`notify_ready`].
    pub fn release(self) -> Vec<SocketAddr> {
        self.0
            .into_iter()
            .map(|(configured, listener)| {
                tracing::info!(addr = %configured, "inherited listener is no longer configured; closing it");
                listener.local_addr().unwrap_or(configured)
            })
            .collect()
    }
}

/// Whether `fd` is a TCP socket listening on `addr` (any port if `addr`'s is 0): a
/// predecessor that handed on a closed descriptor whose number was reused must not make
/// us accept on a pipe or a client connection.
fn is_listener_on(fd: BorrowedFd<'_>, addr: SocketAddr) -> bool {
    let sock = socket2::SockRef::from(&fd);
    let bound = sock.local_addr().ok().and_then(|a| a.as_socket());
    matches!(sock.r#type(), Ok(socket2::Type::STREAM))
        && matches!(sock.is_listener(), Ok(true))
        && bound
            .is_some_and(|b| b.ip() == addr.ip() && (addr.port() == 0 || b.port() == addr.port()))
}

/// Tells the predecessor, if any, that this process serves now, and which of the
/// sockets it handed on this process closed (`released`, by bound address).
pub fn notify_ready(released: &[SocketAddr]) {
    let Some(fd) = std::env::var(READY_FD)
        .ok()
        .and_then(|s| s.parse::<RawFd>().ok())
    else {
        return;
    };
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return;
    }
    // SAFETY: the fd is the write end of the ready pipe our predecessor made for us,
    // open (checked above); we take ownership and close it after writing.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    use std::io::Write;
    let mut line = String::from("ready");
    for addr in released {
        line.push_str(&format!(" released={addr}"));
    }
    line.push('\n');
    let _ = (&file).write_all(line.as_bytes());
}

/// A started successor that has not yet said it is ready.
pub struct Successor {
    pub child: tokio::process::Child,
    /// Its PID, also once it is reaped (`child.id()` is `None` then): not to be
    /// signalled, only to recognise it in the PID file.
    pub pid: Option<u32>,
    ready: tokio::net::unix::pipe::Receiver,
}

/// Starts `exe` with `args`, handing it `listeners`.
///
/// # Errors
/// The pipe or the process could not be created.
pub fn spawn_successor(
    exe: &Path,
    args: &[OsString],
    listeners: &[(SocketAddr, RawFd)],
) -> io::Result<Successor> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two fds into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created by pipe2 and are owned by nobody else.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let write_fd = fds[1];
    let spec: String = listeners
        .iter()
        .map(|(a, fd)| format!("{a}={fd};"))
        .collect();
    let inherit: Vec<RawFd> = listeners
        .iter()
        .map(|(_, fd)| *fd)
        .chain([write_fd])
        .collect();
    let mut cmd = tokio::process::Command::new(exe);
    cmd.args(args)
        .env(LISTEN_FDS, spec)
        .env(READY_FD, write_fd.to_string())
        .kill_on_drop(false);
    // The signals `process::held` blocked at our start are still blocked in the
    // runtime's threads, this one included, and a mask survives fork and exec: the new
    // binary starts with them unblocked, as from a shell (a build that does not hold
    // them itself would otherwise never hear a SIGTERM). Made here: nothing is made
    // between fork and exec.
    let held = crate::process::held::set();
    // SAFETY: the closure runs in the child between fork and exec and only calls
    // fcntl and sigprocmask, which are async-signal-safe, on fds and a set made before.
    unsafe {
        cmd.as_std_mut().pre_exec(move || {
            for &fd in &inherit {
                set_cloexec(fd, false);
            }
            libc::sigprocmask(libc::SIG_UNBLOCK, &held, std::ptr::null_mut());
            Ok(())
        });
    }
    // Made before the child starts: failing after, it would leave a child serving on
    // our sockets that nobody watches.
    let ready = tokio::net::unix::pipe::Receiver::from_owned_fd(read_end)?;
    let child = cmd.spawn()?;
    // Our copy of the write end must close, or we would never see EOF if the child dies.
    drop(write_end);
    Ok(Successor {
        pid: child.id(),
        child,
        ready,
    })
}

impl Successor {
    /// Asks the successor to stop the way an operator would, with SIGTERM: if it is
    /// already serving (it may have said ready a moment ago), it drains what it took.
    pub fn terminate(&mut self) {
        self.signal(libc::SIGTERM);
    }

    /// Sends `signal` to the successor, unless it has exited; returns its PID if sent.
    pub fn signal(&mut self, signal: libc::c_int) -> Option<u32> {
        // Reaped here if it has exited: `id()` is `None` then.
        if !matches!(self.child.try_wait(), Ok(None)) {
            return None;
        }
        let pid = self.child.id()?;
        let raw = libc::pid_t::try_from(pid).ok()?;
        // SAFETY: kill takes no pointers; `pid` is our own child, not yet reaped
        // (`id()` is `None` once it is), so the number is not someone else's.
        (unsafe { libc::kill(raw, signal) } == 0).then_some(pid)
    }

    /// Waits until the successor says it is ready; returns the bound addresses of the
    /// handed-on sockets it closed (only we hold them now).
    ///
    /// # Errors
    /// It exited, closed the pipe without saying so, or took longer than `timeout`.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<Vec<SocketAddr>, String> {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 256];
        let read = async {
            let mut got = Vec::new();
            // Bounded by the line's length: a successor says one short line.
            while got.len() < 64 * 1024 {
                match self.ready.read(&mut buf).await {
                    // The line is whole at its newline; an older binary may also close
                    // the pipe right after `ready`.
                    Ok(0) if got.starts_with(b"ready") => return Ok(released(&got)),
                    Ok(0) => {
                        return Err(
                            "the new process closed its ready pipe without saying ready".to_owned()
                        );
                    }
                    Ok(n) => {
                        got.extend_from_slice(&buf[..n]);
                        if got.starts_with(b"ready") && got.contains(&b'\n') {
                            return Ok(released(&got));
                        }
                    }
                    Err(e) => return Err(format!("reading the ready pipe: {e}")),
                }
            }
            Err("the new process said too much on its ready pipe".to_owned())
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let outcome = tokio::select! {
            r = read => r,
            status = self.child.wait() => return Err(exited(status)),
            () = tokio::time::sleep_until(deadline) => {
                return Err(format!("the new process was not ready within {timeout:?}"));
            }
        };
        match outcome {
            Ok(released) => Ok(released),
            // A closed pipe usually means the process is exiting: say how it ended,
            // which is what the operator needs (e.g. 64 for a config it rejected).
            Err(pipe) => match tokio::time::timeout_at(deadline, self.child.wait()).await {
                Ok(status) => Err(exited(status)),
                Err(_) => Err(pipe),
            },
        }
    }
}

/// The ` released=ADDR` items of a ready line.
fn released(line: &[u8]) -> Vec<SocketAddr> {
    let line = String::from_utf8_lossy(line);
    let line = line.lines().next().unwrap_or_default();
    line.split_whitespace()
        .filter_map(|item| item.strip_prefix("released=")?.parse().ok())
        .collect()
}

fn exited(status: io::Result<std::process::ExitStatus>) -> String {
    match status {
        Ok(s) => format!("the new process exited before it was ready ({s})"),
        Err(e) => format!("waiting for the new process: {e}"),
    }
}

fn set_cloexec(fd: RawFd, on: bool) {
    // SAFETY: fcntl on an fd number has no memory-safety preconditions; failures
    // are reported through its return value, which we do not need here.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags >= 0 {
            let flags = if on {
                flags | libc::FD_CLOEXEC
            } else {
                flags & !libc::FD_CLOEXEC
            };
            libc::fcntl(fd, libc::F_SETFD, flags);
        }
    }
}
