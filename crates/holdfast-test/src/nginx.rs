//! A real nginx per test: generated config in a temp dir, ephemeral loopback port,
//! stopped by PID.
//!
//! [`Nginx::start`] takes the inside of an `http {}` block, replaces `{port}` with a free
//! loopback port and `{dir}` with the instance's temp dir, and runs
//! `/usr/sbin/nginx -p DIR -c DIR/nginx.conf -e DIR/error.log` in the foreground
//! (`daemon off`). Everything nginx writes (PID file, logs, temp files) stays in DIR, so
//! it runs as root without touching `/var`. A port lost to a bind race is retried with
//! another one.
//!
//! nginx is a test dependency: the README's test command installs it. Without it,
//! [`Nginx::start`] panics saying so.
//!
//! # Drop behavior
//!
//! SIGQUIT (graceful) to the master, SIGKILL to it and its workers after
//! [`NginxOptions::stop_timeout`]; the drop blocks until then.

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tempfile::TempDir;
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::process::reap_blocking;
use crate::sys;

/// Where Debian's `nginx` package installs the binary.
pub const NGINX_BINARY: &str = "/usr/sbin/nginx";
/// Attempts with a new port when nginx lost its port to another socket.
const BIND_ATTEMPTS: usize = 3;

/// How to run nginx.
#[derive(Clone, Debug)]
pub struct NginxOptions {
    /// `master_process on` with one worker (default off: a single process, one PID).
    pub master_process: bool,
    /// Extra main-context directives (e.g. `worker_shutdown_timeout 1s;` or a `stream {}`
    /// block); `{port}` and `{dir}` are replaced here too.
    pub main_directives: String,
    /// How long to wait for the port to accept connections (default 10 s).
    pub startup_timeout: Duration,
    /// How long drop waits after SIGQUIT before SIGKILL (default 5 s).
    pub stop_timeout: Duration,
}

/// A running nginx.
pub struct Nginx {
    child: Child,
    pid: u32,
    addr: SocketAddr,
    dir: TempDir,
    stop_timeout: Duration,
    exit: Option<ExitStatus>,
}

// === impl NginxOptions ===

impl Default for NginxOptions {
    fn default() -> NginxOptions {
        NginxOptions {
            master_process: false,
            main_directives: String::new(),
            startup_timeout: Duration::from_secs(10),
            stop_timeout: Duration::from_secs(5),
        }
    }
}

// === impl Nginx ===

impl Nginx {
    /// Starts nginx with `http_block_snippet` as the body of its `http {}` block; it should
    /// `listen 127.0.0.1:{port};` in a `server {}`.
    ///
    /// # Panics
    ///
    /// If nginx is not installed, the snippet has no `{port}`, or nginx does not accept
    /// connections on the port within the startup timeout (the panic shows its output and
    /// error log).
    pub async fn start(http_block_snippet: &str) -> Nginx {
        Nginx::start_with(NginxOptions::default(), http_block_snippet).await
    }

    /// [`start`](Self::start) with options.
    ///
    /// # Panics
    ///
    /// As `start`.
    pub async fn start_with(options: NginxOptions, http_block_snippet: &str) -> Nginx {
        let binary = nginx_binary();
        assert!(
            http_block_snippet.contains("{port}"),
            "the nginx snippet must listen on 127.0.0.1:{{port}}: {http_block_snippet}"
        );
        let mut failures = Vec::new();
        for _ in 0..BIND_ATTEMPTS {
            match try_start(&binary, &options, http_block_snippet).await {
                Ok(nginx) => return nginx,
                Err(Failure::PortTaken(output)) => failures.push(output),
                Err(Failure::Fatal(output)) => panic!("nginx did not start:\n{output}"),
            }
        }
        panic!(
            "nginx lost its port {BIND_ATTEMPTS} times:\n{}",
            failures.join("\n---\n")
        );
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The master's PID (the only process with `master_process off`).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The instance's prefix dir (config, logs, PID file, temp files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The error log so far.
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    /// The access log so far (nginx writes each line when the request ends).
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }

    /// Sends `signal` to the master (SIGHUP reloads, SIGQUIT drains, SIGTERM stops).
    ///
    /// # Errors
    ///
    /// `NotFound` if nginx has exited; otherwise the `kill(2)` error.
    pub fn signal(&mut self, signal: sys::c_int) -> std::io::Result<()> {
        if self.exited().is_some() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "nginx has exited",
            ));
        }
        sys::send_signal(self.pid, signal)
    }

    /// The exit status if nginx has exited, without waiting.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// Waits at most `timeout` for nginx to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.exit.is_none()
            && let Ok(Ok(status)) = tokio::time::timeout(timeout, self.child.wait()).await
        {
            self.exit = Some(status);
        }
        self.exit
    }

    /// Graceful stop: SIGQUIT, then SIGKILL after the stop timeout.
    pub async fn stop(mut self) -> Option<ExitStatus> {
        if self.exited().is_none() {
            let workers = sys::children_of(self.pid);
            let _ = sys::send_signal(self.pid, sys::SIGQUIT);
            if self.wait_exit(self.stop_timeout).await.is_none() {
                kill_all(self.pid, workers);
                let _ = self.wait_exit(self.stop_timeout).await;
            }
        }
        self.exit
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        let workers = sys::children_of(self.pid);
        let _ = sys::send_signal(self.pid, sys::SIGQUIT);
        if reap_blocking(&mut self.child, self.stop_timeout).is_none() {
            kill_all(self.pid, workers);
            let _ = reap_blocking(&mut self.child, self.stop_timeout);
        }
    }
}

impl std::fmt::Debug for Nginx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nginx")
            .field("pid", &self.pid)
            .field("addr", &self.addr)
            .field("dir", &self.dir.path())
            .finish()
    }
}

/// SIGKILL to the master and every worker it had or has.
fn kill_all(master: u32, mut workers: Vec<u32>) {
    workers.extend(sys::children_of(master));
    let _ = sys::send_signal(master, sys::SIGKILL);
    for worker in workers {
        if sys::is_running(worker) {
            let _ = sys::send_signal(worker, sys::SIGKILL);
        }
    }
}

/// The nginx binary.
///
/// # Panics
///
/// If nginx is not installed, with what to do about it.
pub fn nginx_binary() -> PathBuf {
    let path = PathBuf::from(NGINX_BINARY);
    assert!(
        path.is_file(),
        "nginx is not installed ({NGINX_BINARY} is missing). The tests run against a real \
         nginx: run the test command from the README, which installs it \
         (apt-get install -y nginx-light)."
    );
    path
}

enum Failure {
    /// nginx could not bind its port (another socket took it): try another.
    PortTaken(String),
    Fatal(String),
}

async fn try_start(binary: &Path, options: &NginxOptions, snippet: &str) -> Result<Nginx, Failure> {
    let dir = crate::tempdir();
    let port = crate::free_port();
    let conf_path = dir.path().join("nginx.conf");
    let conf = render(options, snippet, dir.path(), port);
    std::fs::write(&conf_path, &conf)
        .map_err(|e| Failure::Fatal(format!("write nginx.conf: {e}")))?;
    let output_path = dir.path().join("output.log");
    let output = std::fs::File::create(&output_path)
        .map_err(|e| Failure::Fatal(format!("create output.log: {e}")))?;
    let output_err = output
        .try_clone()
        .map_err(|e| Failure::Fatal(format!("dup output.log: {e}")))?;
    let child = Command::new(binary)
        .arg("-p")
        .arg(dir.path())
        .arg("-c")
        .arg(&conf_path)
        .arg("-e")
        .arg(dir.path().join("error.log"))
        .stdin(Stdio::null())
        .stdout(output)
        .stderr(output_err)
        .spawn()
        .map_err(|e| Failure::Fatal(format!("spawn {}: {e}", binary.display())))?;
    let pid = child.id().expect("a just-spawned child has a pid");
    let mut nginx = Nginx {
        child,
        pid,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        dir,
        stop_timeout: options.stop_timeout,
        exit: None,
    };
    let pid_file = nginx.dir().join("nginx.pid");
    let deadline = Instant::now() + options.startup_timeout;
    let mut pause = Duration::from_millis(2);
    // Bounded by the startup deadline. nginx writes its PID file only after binding its
    // listening sockets, so "our PID in the file and the port accepts" means it is ours.
    loop {
        if let Some(status) = nginx.exited() {
            let report = report(&nginx, &conf, &format!("nginx exited with {status}"));
            if report.contains("Address already in use") {
                return Err(Failure::PortTaken(report));
            }
            return Err(Failure::Fatal(report));
        }
        let ours = crate::process::read_pid_file(&pid_file) == Some(pid);
        if ours && TcpStream::connect(nginx.addr).await.is_ok() {
            return Ok(nginx);
        }
        if Instant::now() >= deadline {
            let why = format!(
                "nginx did not accept connections on {} within {:?}",
                nginx.addr, options.startup_timeout
            );
            return Err(Failure::Fatal(report(&nginx, &conf, &why)));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

fn report(nginx: &Nginx, conf: &str, why: &str) -> String {
    let output = std::fs::read_to_string(nginx.dir().join("output.log")).unwrap_or_default();
    format!(
        "{why}\n--- output ---\n{output}\n--- error.log ---\n{}\n--- nginx.conf ---\n{conf}",
        nginx.error_log()
    )
}

fn render(options: &NginxOptions, snippet: &str, dir: &Path, port: u16) -> String {
    let d = dir.display().to_string();
    let substitute = |text: &str| {
        text.replace("{port}", &port.to_string())
            .replace("{dir}", &d)
    };
    // As root, workers would switch to `nobody`, who cannot enter the 0700 temp dir.
    let as_root = std::fs::metadata(dir).is_ok_and(|m| m.uid() == 0);
    let user = if options.master_process && as_root {
        "user root root;\n"
    } else {
        ""
    };
    let master = if options.master_process { "on" } else { "off" };
    format!(
        "# generated by holdfast-test\n\
         daemon off;\n\
         master_process {master};\n\
         worker_processes 1;\n\
         {user}\
         pid {d}/nginx.pid;\n\
         error_log {d}/error.log info;\n\
         events {{\n    worker_connections 1024;\n}}\n\
         {main}\n\
         http {{\n\
         \x20   access_log {d}/access.log;\n\
         \x20   client_body_temp_path {d}/client_body_temp;\n\
         \x20   proxy_temp_path {d}/proxy_temp;\n\
         \x20   fastcgi_temp_path {d}/fastcgi_temp;\n\
         \x20   uwsgi_temp_path {d}/uwsgi_temp;\n\
         \x20   scgi_temp_path {d}/scgi_temp;\n\
         {snippet}\n\
         }}\n",
        main = substitute(&options.main_directives),
        snippet = substitute(snippet),
    )
}
