//! A holdfast (or any) binary run as a child process: config in a temp dir, output
//! captured, signals and exit by PID, killed by PID on drop.
//!
//! Also the polling helpers for process-level events that cannot be awaited otherwise
//! (a PID file appearing or changing): [`wait_until`] and [`read_pid_file`].
//!
//! # Drop behavior
//!
//! A [`HoldfastProcess`] still running is sent SIGKILL by PID, as is every PID handed to
//! [`HoldfastProcess::kill_on_drop`] (an upgraded successor), then reaped within a bound.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tempfile::TempDir;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::sys;
use crate::upstream::lock;

/// How long `wait_exit` waits for output after the exit, if a successor keeps the pipes.
const OUTPUT_DRAIN: Duration = Duration::from_millis(200);
/// How long drop waits for a killed child to be reaped.
const REAP_WAIT: Duration = Duration::from_secs(2);
/// Longest pause between two polls of [`wait_until`].
const MAX_POLL_PAUSE: Duration = Duration::from_millis(50);

/// A running child process with captured output.
pub struct HoldfastProcess {
    child: Child,
    pid: u32,
    logs: Arc<Logs>,
    dir: TempDir,
    config_path: Option<PathBuf>,
    also_kill: Vec<u32>,
    exit: Option<ExitStatus>,
}

/// stdout and stderr interleaved in arrival order, with a change counter to await.
struct Logs {
    bytes: Mutex<Vec<u8>>,
    changed: watch::Sender<u64>,
    /// Pipes not yet at EOF.
    open_pipes: watch::Sender<usize>,
}

// === impl HoldfastProcess ===

impl HoldfastProcess {
    /// Spawns `binary` with `args`.
    ///
    /// If `config_toml` is given it is written to `DIR/holdfast.toml`, where DIR is a new
    /// temp dir ([`dir`](Self::dir)). In the config and in every arg, `{dir}` becomes DIR
    /// (for PID files, sockets, logs) and `{config}` the config path; if no arg mentions
    /// `{config}`, `-c PATH` is appended.
    ///
    /// # Panics
    ///
    /// If the temp dir or config cannot be written, the binary cannot be started, or
    /// outside a tokio runtime.
    pub fn spawn(binary: &Path, args: &[&str], config_toml: Option<&str>) -> HoldfastProcess {
        HoldfastProcess::spawn_with_env(binary, args, config_toml, &[])
    }

    /// [`spawn`](Self::spawn) with extra environment variables for the child.
    ///
    /// # Panics
    ///
    /// As `spawn`.
    pub fn spawn_with_env(
        binary: &Path,
        args: &[&str],
        config_toml: Option<&str>,
        env: &[(&str, &str)],
    ) -> HoldfastProcess {
        HoldfastProcess::spawn_with_stdin(binary, args, config_toml, env, Stdio::null())
    }

    /// [`spawn_with_env`](Self::spawn_with_env) with `stdin` as the child's fd 0
    /// instead of /dev/null: a listening socket made by the test, handed over with
    /// `HOLDFAST_LISTEN_FDS=ADDR=0;` as an upgrade would.
    ///
    /// # Panics
    ///
    /// As `spawn`.
    pub fn spawn_with_stdin(
        binary: &Path,
        args: &[&str],
        config_toml: Option<&str>,
        env: &[(&str, &str)],
        stdin: Stdio,
    ) -> HoldfastProcess {
        let dir = crate::tempdir();
        let dir_text = dir.path().display().to_string();
        let config_path = config_toml.map(|toml| {
            let path = dir.path().join("holdfast.toml");
            std::fs::write(&path, toml.replace("{dir}", &dir_text))
                .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
            path
        });
        let config_text = config_path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let mut argv: Vec<String> = args
            .iter()
            .map(|a| {
                a.replace("{dir}", &dir_text)
                    .replace("{config}", &config_text)
            })
            .collect();
        if config_path.is_some() && !args.iter().any(|a| a.contains("{config}")) {
            argv.push("-c".into());
            argv.push(config_text);
        }
        let mut command = Command::new(binary);
        command
            .args(&argv)
            .envs(env.iter().copied())
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} {argv:?}: {e}", binary.display()));
        let pid = child.id().expect("a just-spawned child has a pid");
        let logs = Arc::new(Logs {
            bytes: Mutex::new(Vec::new()),
            changed: watch::Sender::new(0),
            open_pipes: watch::Sender::new(2),
        });
        // Both are piped above, so both are present.
        if let Some(out) = child.stdout.take() {
            tokio::spawn(capture(out, logs.clone()));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(capture(err, logs.clone()));
        }
        HoldfastProcess {
            child,
            pid,
            logs,
            dir,
            config_path,
            also_kill: Vec::new(),
            exit: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The temp dir holding the config; it lives as long as `self`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Where the config was written, if one was given.
    pub fn config_path(&self) -> Option<&Path> {
        self.config_path.as_deref()
    }

    /// Everything written to stdout and stderr so far (lossy UTF-8). A successor that
    /// inherited the pipes writes here too.
    pub fn logs(&self) -> String {
        String::from_utf8_lossy(&lock(&self.logs.bytes)).into_owned()
    }

    /// Waits until the output contains `needle`; false on timeout.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let mut rx = self.logs.changed.subscribe();
        let logs = self.logs.clone();
        let found =
            rx.wait_for(move |_| String::from_utf8_lossy(&lock(&logs.bytes)).contains(needle));
        matches!(tokio::time::timeout(timeout, found).await, Ok(Ok(_)))
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the process.
    ///
    /// # Errors
    ///
    /// `NotFound` if it has already exited (its PID may belong to another process now);
    /// otherwise the `kill(2)` error.
    pub fn signal(&mut self, signal: sys::c_int) -> io::Result<()> {
        if self.exited().is_some() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("pid {} has exited", self.pid),
            ));
        }
        sys::send_signal(self.pid, signal)
    }

    /// The exit status if the process has exited, without waiting.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// Waits at most `timeout` for the process to exit. Once it has, its output is in
    /// [`logs`](Self::logs) (waiting up to 200 ms more for the pipes to drain when a
    /// successor keeps them open).
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.exit.is_none()
            && let Ok(Ok(status)) = tokio::time::timeout(timeout, self.child.wait()).await
        {
            self.exit = Some(status);
            let mut pipes = self.logs.open_pipes.subscribe();
            let _ = tokio::time::timeout(OUTPUT_DRAIN, pipes.wait_for(|open| *open == 0)).await;
        }
        self.exit
    }

    /// Also SIGKILL `pid` on drop (a successor started by an upgrade, say), if it is still
    /// running then.
    pub fn kill_on_drop(&mut self, pid: u32) {
        self.also_kill.push(pid);
    }
}

impl Drop for HoldfastProcess {
    fn drop(&mut self) {
        for pid in self.also_kill.drain(..) {
            if pid != self.pid && sys::is_running(pid) {
                let _ = sys::send_signal(pid, sys::SIGKILL);
            }
        }
        if self.exited().is_none() {
            let _ = sys::send_signal(self.pid, sys::SIGKILL);
            reap_blocking(&mut self.child, REAP_WAIT);
        }
    }
}

impl std::fmt::Debug for HoldfastProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HoldfastProcess")
            .field("pid", &self.pid)
            .field("dir", &self.dir.path())
            .field("exit", &self.exit)
            .finish()
    }
}

async fn capture(mut pipe: impl AsyncRead + Unpin, logs: Arc<Logs>) {
    let mut buf = vec![0u8; 8192];
    // Ends at EOF: when every holder of the pipe has exited.
    while let Ok(n) = pipe.read(&mut buf).await {
        if n == 0 {
            break;
        }
        lock(&logs.bytes).extend_from_slice(&buf[..n]);
        logs.changed.send_modify(|c| *c += 1);
    }
    logs.open_pipes.send_modify(|open| *open -= 1);
}

/// Polls `try_wait` until the child is reaped or `bound` passes. For drop, which cannot
/// await; the pauses are short and the loop is bounded.
pub(crate) fn reap_blocking(child: &mut Child, bound: Duration) -> Option<ExitStatus> {
    let step = Duration::from_millis(5);
    let rounds = bound.as_millis() / step.as_millis();
    for _ in 0..=rounds {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(step);
    }
    None
}

/// The PID in a PID file, if the file exists and holds one (a half-written file reads as
/// `None`).
pub fn read_pid_file(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Polls `condition` with a short backoff (1 ms doubling to 50 ms) until it holds or
/// `timeout` passes; returns whether it held. Only for process-level events that cannot
/// be awaited (a PID file changing, a process disappearing).
pub async fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    // Bounded by the deadline.
    loop {
        if condition() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(MAX_POLL_PAUSE);
    }
}

/// [`wait_until`] for an async condition.
pub async fn wait_until_async<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    // Bounded by the deadline.
    loop {
        if let Ok(true) = tokio::time::timeout_at(deadline, condition()).await {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(MAX_POLL_PAUSE);
    }
}
