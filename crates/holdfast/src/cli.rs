//! Command-line interface: parsing only, and turning `proxy` flags into a `Config`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use holdfast::config::{
    Config, Dur, FastCgiRoute, ListenerConfig, LogFormat, Protocol, RouteConfig, TlsConfig,
    UpstreamAddr, UpstreamConfig,
};
use holdfast::probe::ProbeOptions;

#[derive(Debug, Parser)]
#[command(
    name = "holdfast",
    version,
    about = "A reverse proxy that never loses a request to a connection-lifecycle race"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway from a config file.
    Run {
        /// The TOML config file.
        #[arg(short, long)]
        config: PathBuf,
        /// Write the process id here (overrides `pid_file` in the config).
        #[arg(long)]
        pid_file: Option<PathBuf>,
    },
    /// Validate a config file and print the effective config (defaults filled in).
    Check {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Run a one-upstream proxy without a config file.
    Proxy(Box<ProxyArgs>),
    /// Measure an upstream's keep-alive behaviour and recommend pool settings.
    ///
    /// Reports the Connection and Keep-Alive headers it sends and whether it keeps its
    /// word, after how long it closes idle connections, how many requests it allows on
    /// one connection, how it closes (Connection: close, FIN or RST), and the
    /// [upstream.NAME.pool] settings that follow. Progress goes to stderr; it takes the
    /// time of --max-requests answers on one connection (each bounded by --timeout)
    /// plus up to --max-idle, with --connections + 1 connections.
    ///
    /// URLs: http[s]://host[:port]/path, or fastcgi://host:port and
    /// fastcgi+unix:///path.sock with --script.
    Probe(ProbeArgs),
    /// Show story 1a happening to a naive client and not through holdfast.
    Demo {
        /// How long to send requests.
        #[arg(long, default_value = "12s")]
        duration: Dur,
    },
}

#[derive(Debug, clap::Args)]
pub struct ProbeArgs {
    /// http[s]://host[:port]/path, fastcgi://host:port or fastcgi+unix:///path.sock.
    pub url: String,
    /// https: PEM CA certificates to verify the upstream's certificate with
    /// (default: the system's trust store).
    #[arg(long)]
    pub ca_file: Option<std::path::PathBuf>,
    /// https: the name to send as SNI and verify the certificate for (default: the
    /// URL's host), as the upstream TLS key server_name.
    #[arg(long)]
    pub server_name: Option<String>,
    /// https: PEM certificate chain to present when the upstream asks for one
    /// (mutual TLS), as the upstream TLS key client_cert; needs --client-key.
    #[arg(long)]
    pub client_cert: Option<std::path::PathBuf>,
    /// https: PEM private key of --client-cert, as the upstream TLS key client_key.
    #[arg(long)]
    pub client_key: Option<std::path::PathBuf>,
    /// FastCGI: the script to run, as the application sees it (SCRIPT_FILENAME).
    #[arg(long)]
    pub script: Option<String>,
    /// Longest idle time to watch for a close.
    #[arg(long, default_value = "120s")]
    pub max_idle: Dur,
    /// Most requests to send on one connection.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_requests: u32,
    /// Idle connections to watch at once (staggered).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub connections: u16,
    /// Bound on each connect and each response.
    #[arg(long, default_value = "10s")]
    pub timeout: Dur,
    /// Upstream name in the recommended snippet.
    #[arg(long, default_value = "NAME")]
    pub name: String,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

impl ProbeArgs {
    /// The probe these flags describe, and whether to print JSON.
    pub fn into_options(self) -> (ProbeOptions, bool) {
        let mut o = ProbeOptions::new(self.url);
        o.script = self.script;
        o.ca_file = self.ca_file;
        o.server_name = self.server_name;
        o.client_cert = self.client_cert;
        o.client_key = self.client_key;
        o.max_idle = self.max_idle.get();
        o.max_requests = self.max_requests;
        o.connections = usize::from(self.connections);
        o.timeout = self.timeout.get();
        o.name = self.name;
        (o, self.json)
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Debug, clap::Args)]
pub struct ProxyArgs {
    /// Address to listen on, e.g. 127.0.0.1:8080.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Upstream URL, e.g. http://127.0.0.1:9000 (repeat for several addresses).
    #[arg(long, required = true)]
    pub to: Vec<UpstreamAddr>,
    /// Time to wait for the upstream's response headers.
    #[arg(long)]
    pub timeout: Option<Dur>,
    /// Upstream connect timeout.
    #[arg(long)]
    pub connect_timeout: Option<Dur>,
    /// Upstream pool idle timeout (HTTP keep-alive).
    #[arg(long)]
    pub idle_timeout: Option<Dur>,
    /// Most connections per upstream address.
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Admin listener address (default 127.0.0.1:9901); `off` disables it.
    #[arg(long)]
    pub admin: Option<String>,
    /// Runtime worker threads (0: one per CPU; at most 1024).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// One log line per request.
    #[arg(long, value_enum, default_value = "on")]
    pub access_log: OnOff,
    /// Log format.
    #[arg(long, default_value = "text")]
    pub log_format: String,
    /// Write the process id here.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Document root for a FastCGI upstream (php-fpm), as the application sees it.
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// Front controller for paths that name no script, e.g. /index.php.
    #[arg(long)]
    pub fallback: Option<String>,
    /// Serve HTTPS (HTTP/2 and HTTP/1.1) with this PEM certificate chain, leaf first.
    /// Read again on SIGHUP.
    #[arg(long, requires = "tls_key", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
}

impl ProxyArgs {
    /// The config these flags describe.
    pub fn into_config(self) -> Result<Config, String> {
        let mut c = Config::empty();
        c.workers = self.workers;
        c.pid_file = self.pid_file;
        c.log.access_log = matches!(self.access_log, OnOff::On);
        c.log.format = match self.log_format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => return Err(format!("--log-format: {other:?} is not text or json")),
        };
        match self.admin.as_deref() {
            None => {}
            Some("off") => c.admin.enabled = false,
            Some(a) => {
                c.admin.listen = a
                    .parse()
                    .map_err(|_| format!("--admin: {a:?} is not an address or `off`"))?
            }
        }
        let mut listener = ListenerConfig::new(self.listen);
        if let (Some(cert), Some(key)) = (self.tls_cert, self.tls_key) {
            let tls = TlsConfig::new(cert, key);
            if let Some((key, msg)) = holdfast::server::tls::check(&tls).into_iter().next() {
                let flag = if key == "cert" {
                    "--tls-cert"
                } else {
                    "--tls-key"
                };
                return Err(format!("{flag}: {msg}"));
            }
            listener.tls = Some(tls);
        }
        c.listeners.push(listener);
        let mut route = RouteConfig::new("/", "default");
        let up = UpstreamConfig::new(self.to);
        match (up.protocol(), self.root) {
            (Protocol::FastCgi, Some(root)) => {
                let mut f = FastCgiRoute::new(root);
                f.fallback = self.fallback;
                route.fastcgi = Some(f);
            }
            (Protocol::FastCgi, None) => {
                return Err("--root is required with a fastcgi:// upstream".into());
            }
            (Protocol::Http1 | Protocol::Http2, Some(_)) => {
                return Err("--root only applies to fastcgi:// upstreams".into());
            }
            (Protocol::Http1 | Protocol::Http2, None) if self.fallback.is_some() => {
                return Err("--fallback only applies to fastcgi:// upstreams".into());
            }
            (Protocol::Http1 | Protocol::Http2, None) => {}
        }
        c.routes.push(route);
        let mut up = up;
        if let Some(t) = self.timeout {
            up.timeouts.response_headers = t;
        }
        if let Some(t) = self.connect_timeout {
            up.timeouts.connect = t;
        }
        if let Some(t) = self.idle_timeout {
            up.pool.idle_timeout = t;
        }
        if let Some(n) = self.max_connections {
            up.pool.max_connections = n;
            up.pool.max_idle = up.pool.max_idle.min(n);
        }
        c.upstreams.insert("default".into(), up);
        // The checks `run` and `check` make of a file, said in terms of the flags.
        let problems = c.problems();
        if !problems.is_empty() {
            return Err(problems
                .into_iter()
                .map(|(key, msg)| format!("{}: {msg}", flag_of(&key)))
                .collect::<Vec<_>>()
                .join("\n"));
        }
        Ok(c)
    }
}

/// The flag that set a config key of the config `proxy` builds.
fn flag_of(key: &str) -> &str {
    match key {
        "listener[0].listen" => "--listen",
        "upstream.default.addresses" => "--to",
        "upstream.default.timeouts.connect" => "--connect-timeout",
        "upstream.default.timeouts.response_headers" => "--timeout",
        "upstream.default.pool.max_connections" | "upstream.default.pool.max_idle" => {
            "--max-connections"
        }
        "route[0].fastcgi.root" => "--root",
        "route[0].fastcgi.fallback" => "--fallback",
        "workers" => "--workers",
        k if k.starts_with("listener[0].tls.") => "--tls-cert/--tls-key",
        k => k,
    }
}
