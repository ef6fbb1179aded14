//! A real php-fpm per test: generated config in a temp dir, a loopback port and a unix
//! socket, a document root for the test's scripts, stopped by PID.
//!
//! [`PhpFpm::start`] writes `DIR/php-fpm.conf` with two static pools of
//! [`PhpFpmOptions::max_children`] workers each: `tcp` on `127.0.0.1:PORT` (a free port)
//! and `unix` on `DIR/php-fpm.sock`, both with `pm.status_path = /status` and
//! `clear_env = no`; the PID file and error log are in DIR too. It runs
//! `php-fpm8.2 -y DIR/php-fpm.conf -F -R` (`-R`: the tests may run as root, and the
//! workers then stay root so they can read the 0700 temp dir) and waits, bounded, until
//! the PID file names our process and both addresses accept connections.
//!
//! The test writes its scripts into [`PhpFpm::www`] ([`PhpFpm::script`] does it in one
//! call). holdfast's `[route.fastcgi] root` is that directory: php-fpm and holdfast see
//! the same files.
//!
//! php-fpm is a test dependency: the README's test command (`scripts/test`) installs it
//! (Debian package `php-fpm`). Without it, [`PhpFpm::start`] panics saying so.
//!
//! # Environment
//!
//! `clear_env = no` hands the workers php-fpm's own environment, and PHP's `getenv()`
//! falls back to it. The fixture removes proxy variables (`HTTP_PROXY`, `http_proxy`,
//! ...) from php-fpm's environment, so a script's `getenv('HTTP_PROXY')` can only come
//! from the request: the httpoxy test depends on it.
//!
//! # Drop behavior
//!
//! SIGQUIT to the master; if it has not exited 300 ms later (a worker holding a
//! kept-alive connection waits for that connection's next request until
//! `process_control_timeout`), SIGTERM, php-fpm's fast stop; then SIGKILL to the master
//! and every worker it had after [`PhpFpmOptions::stop_timeout`]. The drop blocks until
//! then. [`PhpFpm::stop`] is the graceful stop, without the SIGTERM.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tempfile::TempDir;
use tokio::net::{TcpStream, UnixStream};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::process::{read_pid_file, reap_blocking};
use crate::sys;

/// Where Debian's `php8.2-fpm` package installs the binary.
pub const PHP_FPM_BINARY: &str = "/usr/sbin/php-fpm8.2";
/// Attempts with a new port when php-fpm lost its port to another socket.
const BIND_ATTEMPTS: usize = 3;
/// How long drop waits after SIGQUIT before SIGTERM.
const DROP_GRACE: Duration = Duration::from_millis(300);
/// Environment variables php-fpm must not pass on to scripts (see the module docs).
const SCRUBBED_ENV: &[&str] = &[
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
];

/// How to run php-fpm.
#[derive(Clone, Debug)]
pub struct PhpFpmOptions {
    /// `pm.max_children` of each pool (`pm = static`, so also the workers running).
    /// Default 2.
    pub max_children: usize,
    /// Extra lines for both pools, e.g. `security.limit_extensions = .php .jpg`.
    pub pool_directives: String,
    /// `process_control_timeout`: how long workers get to finish their request after
    /// SIGQUIT before the master sends SIGTERM. php-fpm's default, 0, sends SIGTERM at
    /// once, which is not a graceful stop. Default 5 s.
    pub process_control_timeout: Duration,
    /// How long to wait for both addresses to accept connections. Default 10 s.
    pub startup_timeout: Duration,
    /// How long stop waits after SIGQUIT before SIGKILL. Default 8 s.
    pub stop_timeout: Duration,
}

/// A running php-fpm.
pub struct PhpFpm {
    options: PhpFpmOptions,
    child: Option<Child>,
    pid: u32,
    addr: SocketAddr,
    socket_path: PathBuf,
    www: PathBuf,
    dir: TempDir,
    /// Every PID this instance's masters and workers had, to kill by PID if a stop
    /// has to use SIGKILL.
    seen_workers: Vec<u32>,
}

// === impl PhpFpmOptions ===

impl Default for PhpFpmOptions {
    fn default() -> PhpFpmOptions {
        PhpFpmOptions {
            max_children: 2,
            pool_directives: String::new(),
            process_control_timeout: Duration::from_secs(5),
            startup_timeout: Duration::from_secs(10),
            stop_timeout: Duration::from_secs(8),
        }
    }
}

// === impl PhpFpm ===

impl PhpFpm {
    /// Starts php-fpm with a generated config; see the module docs.
    ///
    /// # Panics
    ///
    /// If php-fpm is not installed, or does not accept connections on both addresses
    /// within the startup timeout (the panic shows its output and error log).
    pub async fn start(options: PhpFpmOptions) -> PhpFpm {
        let binary = php_fpm_binary();
        let dir = crate::tempdir();
        let www = dir.path().join("www");
        std::fs::create_dir(&www).expect("create the document root");
        let mut fpm = PhpFpm {
            child: None,
            pid: 0,
            addr: crate::free_addr(),
            socket_path: dir.path().join("php-fpm.sock"),
            www,
            dir,
            seen_workers: Vec::new(),
            options,
        };
        let mut failures = Vec::new();
        for _ in 0..BIND_ATTEMPTS {
            match fpm.launch(&binary).await {
                Ok(()) => return fpm,
                Err(Failure::PortTaken(report)) => {
                    failures.push(report);
                    fpm.addr = crate::free_addr();
                }
                Err(Failure::Fatal(report)) => panic!("php-fpm did not start:\n{report}"),
            }
        }
        panic!(
            "php-fpm lost its port {BIND_ATTEMPTS} times:\n{}",
            failures.join("\n---\n")
        );
    }

    /// `127.0.0.1:PORT` of the `tcp` pool.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The unix socket of the `unix` pool.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// The master's PID (changes on [`restart`](Self::restart)).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The workers running now (children of the master).
    pub fn workers(&self) -> Vec<u32> {
        sys::children_of(self.pid)
    }

    /// The document root the test writes scripts into.
    pub fn www(&self) -> &Path {
        &self.www
    }

    /// The instance's dir (config, PID file, error log, socket, `www/`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `www/NAME` (creating directories) and returns its path.
    ///
    /// # Panics
    ///
    /// If the file cannot be written.
    pub fn script(&self, name: &str, source: &str) -> PathBuf {
        let path = self.www.join(name.trim_start_matches('/'));
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .unwrap_or_else(|e| panic!("create {}: {e}", parent.display()));
        }
        std::fs::write(&path, source).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    /// php-fpm's error log so far (master notices, worker output).
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    /// The exit status if the master has exited, without waiting.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Sends `signal` to the master (SIGUSR2 reloads, SIGQUIT stops gracefully).
    ///
    /// # Errors
    ///
    /// `NotFound` if php-fpm has exited; otherwise the `kill(2)` error.
    pub fn signal(&mut self, signal: sys::c_int) -> std::io::Result<()> {
        if self.child.is_none() || self.exited().is_some() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "php-fpm has exited",
            ));
        }
        sys::send_signal(self.pid, signal)
    }

    /// Stops php-fpm (SIGQUIT: workers finish their request) and starts it again on the
    /// same port and socket, with a new master PID: a cold restart. Connections that
    /// arrive while the old master exits are reset (they sat in its accept queue), and
    /// then refused until the new master listens; [`reload`](Self::reload) has
    /// neither gap.
    ///
    /// # Panics
    ///
    /// As [`start`](Self::start), and if the port was taken in between.
    pub async fn restart(&mut self) {
        self.stop().await;
        let binary = php_fpm_binary();
        match self.launch(&binary).await {
            Ok(()) => {}
            Err(Failure::PortTaken(report) | Failure::Fatal(report)) => {
                panic!("php-fpm did not restart:\n{report}")
            }
        }
    }

    /// php-fpm's own graceful restart (SIGUSR2, what `systemctl reload php-fpm` does):
    /// every worker finishes its request and exits, closing every kept connection, and
    /// the master re-executes itself with the same PID, keeping its listening sockets,
    /// so no connection is refused meanwhile. Returns once every old worker is gone and
    /// the new ones are running.
    ///
    /// # Panics
    ///
    /// If php-fpm has exited, or the new workers are not all running within the stop
    /// plus the startup timeout.
    pub async fn reload(&mut self) {
        let old: BTreeSet<u32> = self.workers().into_iter().collect();
        self.seen_workers.extend(old.iter().copied());
        self.signal(sys::SIGUSR2).expect("signal php-fpm to reload");
        let want = 2 * self.options.max_children.max(1);
        let bound = self.options.stop_timeout + self.options.startup_timeout;
        let pid = self.pid;
        let replaced = crate::wait_until(bound, || {
            let now = sys::children_of(pid);
            now.len() == want && now.iter().all(|w| !old.contains(w))
        })
        .await;
        assert!(
            replaced,
            "php-fpm did not replace its workers within {bound:?} of SIGUSR2: before \
             {old:?}, now {:?}\n{}",
            self.workers(),
            self.error_log()
        );
        self.seen_workers.extend(self.workers());
    }

    /// Graceful stop: SIGQUIT, then SIGKILL to master and workers after the stop
    /// timeout. Returns the exit status, if it exited.
    pub async fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        self.seen_workers.extend(sys::children_of(self.pid));
        let _ = sys::send_signal(self.pid, sys::SIGQUIT);
        let timeout = self.options.stop_timeout;
        if let Ok(Ok(status)) = tokio::time::timeout(timeout, child.wait()).await {
            return Some(status);
        }
        self.kill_all();
        tokio::time::timeout(timeout, child.wait()).await.ok()?.ok()
    }

    async fn launch(&mut self, binary: &Path) -> Result<(), Failure> {
        let conf = self.render();
        let conf_path = self.dir.path().join("php-fpm.conf");
        std::fs::write(&conf_path, &conf)
            .map_err(|e| Failure::Fatal(format!("write php-fpm.conf: {e}")))?;
        let output = std::fs::File::create(self.dir.path().join("output.log"))
            .map_err(|e| Failure::Fatal(format!("create output.log: {e}")))?;
        let output_err = output
            .try_clone()
            .map_err(|e| Failure::Fatal(format!("dup output.log: {e}")))?;
        let _ = std::fs::remove_file(self.dir.path().join("php-fpm.pid"));
        let mut command = Command::new(binary);
        command
            .arg("-y")
            .arg(&conf_path)
            .arg("-F")
            .arg("-R")
            .stdin(Stdio::null())
            .stdout(output)
            .stderr(output_err);
        for var in SCRUBBED_ENV {
            command.env_remove(var);
        }
        let child = command
            .spawn()
            .map_err(|e| Failure::Fatal(format!("spawn {}: {e}", binary.display())))?;
        self.pid = child.id().expect("a just-spawned child has a pid");
        self.child = Some(child);

        let pid_file = self.dir.path().join("php-fpm.pid");
        let deadline = Instant::now() + self.options.startup_timeout;
        let mut pause = Duration::from_millis(2);
        // Bounded by the startup deadline. php-fpm writes its PID file after binding
        // its sockets: "our PID in the file and both addresses accept" means it is ours.
        // The kernel accepts before the workers exist, so ready also means every
        // worker of both static pools is running.
        let workers = 2 * self.options.max_children.max(1);
        loop {
            if let Some(status) = self.exited() {
                self.child = None;
                let report = self.report(&conf, &format!("php-fpm exited with {status}"));
                if report.contains("Address already in use") {
                    return Err(Failure::PortTaken(report));
                }
                return Err(Failure::Fatal(report));
            }
            if read_pid_file(&pid_file) == Some(self.pid)
                && TcpStream::connect(self.addr).await.is_ok()
                && UnixStream::connect(&self.socket_path).await.is_ok()
                && sys::children_of(self.pid).len() >= workers
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let why = format!(
                    "php-fpm did not accept connections on {} and {} with {workers} workers \
                     running within {:?}",
                    self.addr,
                    self.socket_path.display(),
                    self.options.startup_timeout
                );
                let report = self.report(&conf, &why);
                self.kill_all();
                return Err(Failure::Fatal(report));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// SIGKILL to the master and every worker it had or has.
    fn kill_all(&mut self) {
        self.seen_workers.extend(sys::children_of(self.pid));
        let _ = sys::send_signal(self.pid, sys::SIGKILL);
        for worker in self.seen_workers.drain(..) {
            if sys::is_running(worker) {
                let _ = sys::send_signal(worker, sys::SIGKILL);
            }
        }
    }

    fn report(&self, conf: &str, why: &str) -> String {
        let output =
            std::fs::read_to_string(self.dir.path().join("output.log")).unwrap_or_default();
        format!(
            "{why}\n--- output ---\n{output}\n--- error.log ---\n{}\n--- php-fpm.conf ---\n{conf}",
            self.error_log()
        )
    }

    fn render(&self) -> String {
        let d = self.dir.path().display();
        let o = &self.options;
        let pool = |name: &str, listen: &str| {
            format!(
                "[{name}]\n\
                 user = root\n\
                 group = root\n\
                 listen = {listen}\n\
                 pm = static\n\
                 pm.max_children = {children}\n\
                 pm.status_path = /status\n\
                 clear_env = no\n\
                 catch_workers_output = yes\n\
                 {extra}\n",
                children = o.max_children.max(1),
                extra = o.pool_directives,
            )
        };
        format!(
            "; generated by holdfast-test\n\
             [global]\n\
             pid = {d}/php-fpm.pid\n\
             error_log = {d}/error.log\n\
             log_level = notice\n\
             daemonize = no\n\
             process_control_timeout = {pct}s\n\n\
             {tcp}\n\
             {unix}",
            pct = o.process_control_timeout.as_secs().max(1),
            tcp = pool("tcp", &self.addr.to_string()),
            unix = pool("unix", &self.socket_path.display().to_string()),
        )
    }
}

impl Drop for PhpFpm {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        self.seen_workers.extend(sys::children_of(self.pid));
        // A worker holding a kept-alive FastCGI connection waits for its next request
        // through SIGQUIT, and a holdfast in the test's runtime cannot close it while
        // this drop blocks: after a short grace, SIGTERM (php-fpm's fast stop).
        let _ = sys::send_signal(self.pid, sys::SIGQUIT);
        if reap_blocking(&mut child, DROP_GRACE).is_some() {
            return;
        }
        let _ = sys::send_signal(self.pid, sys::SIGTERM);
        if reap_blocking(&mut child, self.options.stop_timeout).is_none() {
            self.kill_all();
            let _ = reap_blocking(&mut child, self.options.stop_timeout);
        }
    }
}

impl std::fmt::Debug for PhpFpm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PhpFpm")
            .field("pid", &self.pid)
            .field("addr", &self.addr)
            .field("socket", &self.socket_path)
            .field("dir", &self.dir.path())
            .finish()
    }
}

/// The php-fpm binary.
///
/// # Panics
///
/// If php-fpm is not installed, with what to do about it.
pub fn php_fpm_binary() -> PathBuf {
    let path = PathBuf::from(PHP_FPM_BINARY);
    assert!(
        path.is_file(),
        "php-fpm is not installed ({PHP_FPM_BINARY} is missing). The FastCGI tests run \
         against a real php-fpm: run the test command from the README (scripts/test), \
         which installs it (apt-get install -y php-fpm)."
    );
    path
}

enum Failure {
    /// php-fpm could not bind its port (another socket took it): try another.
    PortTaken(String),
    Fatal(String),
}
