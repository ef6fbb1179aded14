//! The TOML config, parsed once at the edge into typed structs.
//!
//! Owns: the schema with its documented defaults, loading from a file or a string, and
//! errors that name the file, line, key and what is allowed. Does not own: what the
//! settings mean at run time (each module that takes a section documents that), or
//! reloading (see `server::reload`).

mod addr;
mod error;
mod listener;
mod transport;
mod units;
mod upstream;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use self::addr::{Endpoint, Protocol, UpstreamAddr};
pub use self::error::{ConfigError, ConfigErrors};
pub use self::listener::{Http2Config, TlsCertificate, TlsConfig};
pub use self::transport::{HttpVersion, UpstreamHttp2Config, UpstreamTlsConfig};
pub use self::units::{ByteSize, Dur};
pub use self::upstream::{
    Balance, HealthConfig, PoolConfig, RetryConfig, TcpConfig, TimeoutConfig, UpstreamConfig,
};

/// Most runtime worker threads (`workers`): far more than any machine has CPUs.
pub const MAX_WORKERS: usize = 1024;

/// The whole config file.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where to write the process id at start (rewritten by a new binary after an
    /// upgrade). Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_file: Option<PathBuf>,
    /// Runtime worker threads; 0 means one per CPU. Default 0; at most
    /// [`MAX_WORKERS`].
    #[serde(default)]
    pub workers: usize,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub drain: DrainConfig,
    #[serde(default)]
    pub upgrade: UpgradeConfig,
    /// `[[listener]]` tables: where clients connect.
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    /// `[[route]]` tables: which upstream serves which Host and path.
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteConfig>,
    /// `[upstream.NAME]` tables.
    #[serde(default, rename = "upstream")]
    pub upstreams: BTreeMap<String, UpstreamConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `tracing` filter, e.g. `info` or `holdfast=debug`. Default `info`.
    pub level: String,
    /// `text` (default) or `json`.
    pub format: LogFormat,
    /// One line per request at target `holdfast::access`. Default true.
    pub access_log: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
            access_log: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the admin listener (`/live`, `/ready`, `/metrics`, `/pools`,
    /// `/config`). Default `127.0.0.1:9901`; set `enabled = false` to turn it off.
    pub listen: SocketAddr,
    pub enabled: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9901)),
            enabled: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DrainConfig {
    /// Wait after `/ready` turns 503 before listeners stop accepting, so load balancers
    /// notice. Default `0s`.
    pub pre_delay: Dur,
    /// During a drain, an idle client connection is closed once it has been idle this
    /// long (or the advertised keep-alive timeout, if shorter). Default `1s`.
    pub idle_close_after: Dur,
    /// Hard limit for the whole drain; what is still open then is cut and logged.
    /// Default `30s`.
    pub timeout: Dur,
}

impl Default for DrainConfig {
    fn default() -> Self {
        DrainConfig {
            pre_delay: Dur::secs(0),
            idle_close_after: Dur::secs(1),
            timeout: Dur::secs(30),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpgradeConfig {
    /// How long the old process waits for the new binary to say it is ready before it
    /// gives up on the upgrade and keeps serving. Default `30s`.
    pub ready_timeout: Dur,
}

impl Default for UpgradeConfig {
    fn default() -> Self {
        UpgradeConfig {
            ready_timeout: Dur::secs(30),
        }
    }
}

/// One `[[listener]]`: a client-facing socket and the limits of its connections.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Address to bind, e.g. `0.0.0.0:8080` or `[::1]:8080`.
    pub listen: SocketAddr,
    /// Most client connections open at once on this listener; more wait in the kernel's
    /// accept queue. Default 10000.
    #[serde(default = "defaults::max_client_connections")]
    pub max_connections: usize,
    /// HTTP keep-alive: how long an idle client connection is kept. Advertised to
    /// clients in `Keep-Alive: timeout=N`, a margin below this. Default `60s`.
    #[serde(default = "defaults::client_keepalive")]
    pub keepalive_timeout: Dur,
    /// A connection idle for less than this is never closed by holdfast (except at the
    /// drain deadline), so a client's next request cannot race a close. Default `1s`.
    #[serde(default = "defaults::keepalive_min_idle")]
    pub keepalive_min_idle: Dur,
    /// Time allowed from the first byte of a request to the end of its headers
    /// (slowloris). Default `10s`.
    #[serde(default = "defaults::header_timeout")]
    pub header_timeout: Dur,
    /// Longest a write to the client may stall (a client that stops reading its
    /// response); then the connection is cut and the upstream exchange with it.
    /// `0s` = no limit. Default `60s`.
    #[serde(default = "defaults::client_stall")]
    pub send_timeout: Dur,
    /// Longest gap between two pieces of a request body (a slowloris on the body);
    /// then the request fails. `0s` = no limit. Default `60s`.
    #[serde(default = "defaults::client_stall")]
    pub body_timeout: Dur,
    /// Largest request head (request line and headers); larger gets 431. Default `16KiB`.
    #[serde(default = "defaults::max_header_bytes")]
    pub max_header_bytes: ByteSize,
    /// Largest request body; larger gets 413. `0` means no limit. Default `100MiB`.
    #[serde(default = "defaults::max_body_bytes")]
    pub max_body_bytes: ByteSize,
    /// Requests served on one client connection before it is closed with
    /// `Connection: close`. `0` means no limit. Default 10000.
    #[serde(default = "defaults::max_requests_per_connection")]
    pub max_requests_per_connection: u64,
    /// Peers whose `X-Forwarded-*` headers are trusted and extended; from anyone else
    /// they are replaced. Default: none.
    #[serde(default)]
    pub trusted_proxies: Vec<IpNet>,
    /// Also accept HTTP/2 with prior knowledge (h2c, RFC 9113 3.3) on this plain
    /// listener, told apart from HTTP/1.1 by its first bytes. Default false.
    #[serde(default)]
    pub h2c: bool,
    /// Answer every request with `308 Permanent Redirect` to the same host and path
    /// over https instead of proxying it. Plain listeners only. Default false.
    #[serde(default)]
    pub redirect_https: bool,
    /// The port those redirects name; 443 is left out of the URL. Default 443.
    #[serde(default = "defaults::https_port")]
    pub redirect_https_port: u16,
    /// `[listener.http2]`: HTTP/2 limits.
    #[serde(default)]
    pub http2: Http2Config,
    /// `[listener.tls]`: terminate TLS here. Default: none (plain TCP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
}

/// One `[[route]]`: requests whose Host and path match go to `upstream`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Host to match, without port; `*.example.com` matches subdomains. Default: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Path prefix to match, on segment boundaries (`/api` matches `/api` and
    /// `/api/x`, not `/apix`). Default `/`.
    #[serde(default = "defaults::path")]
    pub path: String,
    /// Remove the matched prefix before forwarding. Default false.
    #[serde(default)]
    pub strip_prefix: bool,
    /// Name of an `[upstream.NAME]` table.
    pub upstream: toml::Spanned<String>,
    /// `[route.fastcgi]`: required when the upstream is FastCGI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fastcgi: Option<FastCgiRoute>,
}

/// `[route.fastcgi]`: how a path becomes a script for a FastCGI application (php-fpm),
/// with CGI/1.1 params set as nginx's `fastcgi_params` sets them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FastCgiRoute {
    /// Document root as the application sees it, e.g. `/var/www/site`. Required.
    pub root: PathBuf,
    /// Script for paths ending in `/`. Default `index.php`.
    #[serde(default = "defaults::fastcgi_index")]
    pub index: String,
    /// File extensions run as scripts. A path is split after the first of these
    /// followed by `/` or its end; the rest is PATH_INFO. Default `[".php"]`.
    #[serde(default = "defaults::script_extensions")]
    pub script_extensions: Vec<String>,
    /// Script that serves paths that name no script (a front controller such as
    /// `/index.php`); without it they get 404. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// Answer 404 when the script file does not exist under `root` (nginx's
    /// `try_files $fastcgi_script_name =404`); needs holdfast to see the
    /// application's files. Default true.
    #[serde(default = "defaults::yes")]
    pub check_file: bool,
    /// Extra CGI params, set last (they override the standard ones). Default: none.
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// Read a request body whole before the application gets the request (nginx's
    /// `fastcgi_request_buffering`): a client that stops mid-upload never runs a
    /// script on part of its body, and a slow upload holds no worker. Off, a body
    /// with a length streams as it arrives (a chunked one is still read whole: the
    /// application needs `CONTENT_LENGTH` first). Default true.
    #[serde(default = "defaults::yes")]
    pub request_buffering: bool,
    /// A body read whole stays in memory up to this size; a longer one waits in an
    /// unlinked file in `body_temp_dir`. Default `64KiB`.
    #[serde(default = "defaults::fastcgi_body_memory")]
    pub body_memory: ByteSize,
    /// Where longer bodies wait. Default: `$TMPDIR`, else `/tmp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_temp_dir: Option<PathBuf>,
}

impl FastCgiRoute {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        FastCgiRoute {
            root: root.into(),
            index: defaults::fastcgi_index(),
            script_extensions: defaults::script_extensions(),
            fallback: None,
            check_file: true,
            params: BTreeMap::new(),
            request_buffering: true,
            body_memory: defaults::fastcgi_body_memory(),
            body_temp_dir: None,
        }
    }

    /// The directory for bodies longer than `body_memory`.
    pub fn temp_dir(&self) -> PathBuf {
        self.body_temp_dir
            .clone()
            .unwrap_or_else(std::env::temp_dir)
    }
}

mod defaults {
    use super::{ByteSize, Dur};

    pub fn max_client_connections() -> usize {
        10_000
    }
    pub fn client_keepalive() -> Dur {
        Dur::secs(60)
    }
    pub fn keepalive_min_idle() -> Dur {
        Dur::secs(1)
    }
    pub fn header_timeout() -> Dur {
        Dur::secs(10)
    }
    pub fn client_stall() -> Dur {
        Dur::secs(60)
    }
    pub fn max_header_bytes() -> ByteSize {
        ByteSize::kib(16)
    }
    pub fn max_body_bytes() -> ByteSize {
        ByteSize::mib(100)
    }
    pub fn max_requests_per_connection() -> u64 {
        10_000
    }
    pub fn https_port() -> u16 {
        443
    }
    pub fn path() -> String {
        "/".into()
    }
    pub fn host_header() -> String {
        "client".into()
    }
    pub fn resolve_every() -> Dur {
        Dur::secs(30)
    }
    pub fn fastcgi_index() -> String {
        "index.php".into()
    }
    pub fn fastcgi_body_memory() -> ByteSize {
        ByteSize::kib(64)
    }
    pub fn script_extensions() -> Vec<String> {
        vec![".php".into()]
    }
    pub fn yes() -> bool {
        true
    }
}

impl ListenerConfig {
    /// A listener with every default, for the one-line `proxy` command and tests.
    pub fn new(listen: SocketAddr) -> Self {
        ListenerConfig {
            listen,
            max_connections: defaults::max_client_connections(),
            keepalive_timeout: defaults::client_keepalive(),
            keepalive_min_idle: defaults::keepalive_min_idle(),
            header_timeout: defaults::header_timeout(),
            send_timeout: defaults::client_stall(),
            body_timeout: defaults::client_stall(),
            max_header_bytes: defaults::max_header_bytes(),
            max_body_bytes: defaults::max_body_bytes(),
            max_requests_per_connection: defaults::max_requests_per_connection(),
            trusted_proxies: Vec::new(),
            h2c: false,
            redirect_https: false,
            redirect_https_port: defaults::https_port(),
            http2: Http2Config::default(),
            tls: None,
        }
    }
}

impl RouteConfig {
    pub fn new(path: &str, upstream: &str) -> Self {
        RouteConfig {
            host: None,
            path: path.into(),
            strip_prefix: false,
            upstream: toml::Spanned::new(0..0, upstream.into()),
            fastcgi: None,
        }
    }
}

impl Config {
    /// A config with no listeners, routes or upstreams and every default.
    pub fn empty() -> Self {
        Config {
            pid_file: None,
            workers: 0,
            log: LogConfig::default(),
            admin: AdminConfig::default(),
            drain: DrainConfig::default(),
            upgrade: UpgradeConfig::default(),
            listeners: Vec::new(),
            routes: Vec::new(),
            upstreams: BTreeMap::new(),
        }
    }

    /// Reads and validates a config file.
    ///
    /// # Errors
    /// Every problem found, each naming the file, line, key and what is allowed.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigErrors::single(ConfigError::io(path, &e)))?;
        Config::from_toml(&text, path)
    }

    /// Parses and validates config text; `origin` names it in errors.
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn from_toml(text: &str, origin: &Path) -> Result<Config, ConfigErrors> {
        let de = toml::Deserializer::parse(text)
            .map_err(|e| ConfigErrors::single(ConfigError::from_toml(origin, text, &e, None)))?;
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            ConfigErrors::single(ConfigError::from_toml(origin, text, e.inner(), Some(path)))
        })?;
        let problems = config.validate();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors::located(origin, text, problems))
        }
    }

    /// The problems [`Config::load`] would report for a config built some other way
    /// (`holdfast proxy` flags), as (key path, message) pairs.
    pub fn problems(&self) -> Vec<(String, String)> {
        self.validate()
    }

    /// Checks that hold across keys; returns (key path, message) pairs.
    fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let mut bad = |key: String, msg: String| problems.push((key, msg));
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            // Taken, it would fall back to `info` without a word (at start, before
            // any logger; on a reload, in place of the level in force).
            bad(
                "log.level".into(),
                format!(
                    "{:?} is not a log filter ({e}); write a level or target=level pairs, like \"info,holdfast=debug\"",
                    self.log.level
                ),
            );
        } else if self.log.level.split(',').all(|d| d.trim().is_empty()) {
            // A filter with no directive turns every line off, errors included: a
            // start that fails would exit without saying why.
            bad(
                "log.level".into(),
                "is empty, which logs nothing, errors included; write a level like \"info\" (or \"off\" to mean it)".into(),
            );
        }
        if self
            .pid_file
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            // `check` passed it and `run` failed to write it, and did not start.
            bad(
                "pid_file".into(),
                "is empty; leave pid_file out for no PID file".into(),
            );
        }
        if self.workers > MAX_WORKERS {
            // Taken, the runtime would try to start that many threads before serving
            // anything: gigabytes of stacks, or a panic once the system refuses one.
            bad(
                "workers".into(),
                format!(
                    "{} runtime threads is more than {MAX_WORKERS}; 0 means one per CPU",
                    self.workers
                ),
            );
        }
        if self.drain.timeout.get().is_zero() {
            // Not "no limit", as `0s` is for other keys: every request in flight, and
            // every connection queued at the listeners, would be cut the moment a
            // drain (an upgrade's too) began.
            bad(
                "drain.timeout".into(),
                "must be more than 0s (a drain cuts what is still open at this deadline)".into(),
            );
        }
        if self.upgrade.ready_timeout.get().is_zero() {
            // The successor could never be ready in time: every upgrade would fail.
            bad(
                "upgrade.ready_timeout".into(),
                "must be more than 0s".into(),
            );
        }
        if self.listeners.is_empty() {
            bad(
                "listener".into(),
                "at least one [[listener]] is required".into(),
            );
        }
        for (i, l) in self.listeners.iter().enumerate() {
            if let Some(msg) = connection_cap_problem(l.max_connections) {
                bad(format!("listener[{i}].max_connections"), msg);
            }
            if l.header_timeout.get().is_zero() {
                // Every head (and TLS handshake) would be late: the listener would
                // serve nothing.
                bad(
                    format!("listener[{i}].header_timeout"),
                    "must be more than 0s".into(),
                );
            }
            // Above the top, hyper's read buffer (the head plus a little) could not
            // be sized: the start panicked on an overflow.
            if !(1024..=4 << 30).contains(&l.max_header_bytes.get()) {
                bad(
                    format!("listener[{i}].max_header_bytes"),
                    "must be between 1KiB and 4GiB".into(),
                );
            }
            if l.redirect_https && l.redirect_https_port == 0 {
                bad(
                    format!("listener[{i}].redirect_https_port"),
                    "must be a port, 1 to 65535".into(),
                );
            }
            for (key, msg) in l.http2.problems() {
                bad(format!("listener[{i}].http2.{key}"), msg);
            }
            if let Some(tls) = &l.tls {
                if l.h2c {
                    bad(
                        format!("listener[{i}].h2c"),
                        "h2c is for plain listeners; with [listener.tls] HTTP/2 is offered by ALPN"
                            .into(),
                    );
                }
                if l.redirect_https {
                    bad(
                        format!("listener[{i}].redirect_https"),
                        "redirect_https is for a plain listener in front of a TLS one".into(),
                    );
                }
                // The certificates are read here too, so `holdfast check` and a reload
                // catch a bad file before anything is swapped.
                for (key, msg) in crate::server::tls::check(tls) {
                    bad(format!("listener[{i}].tls.{key}"), msg);
                }
            }
        }
        // Two sockets on one address: `check` would pass and `run` fail to bind.
        for (i, l) in self.listeners.iter().enumerate() {
            if let Some(j) = self.listeners[..i]
                .iter()
                .position(|o| same_socket(o.listen, l.listen))
            {
                bad(
                    format!("listener[{i}].listen"),
                    format!("{} is already taken by listener[{j}]", l.listen),
                );
            }
            if self.admin.enabled && same_socket(self.admin.listen, l.listen) {
                bad(
                    format!("listener[{i}].listen"),
                    format!("{} is also [admin] listen", l.listen),
                );
            }
        }
        for (i, r) in self.routes.iter().enumerate() {
            if let Some(problem) = r.host.as_deref().and_then(host_pattern_problem) {
                bad(format!("route[{i}].host"), problem);
            }
            if !r.path.starts_with('/') {
                bad(
                    format!("route[{i}].path"),
                    format!("{:?} must start with '/'", r.path),
                );
            } else if r
                .path
                .contains(|c: char| c == '?' || c == '#' || c.is_whitespace() || c.is_control())
            {
                // A request's path is matched without its query, and never holds a
                // space: such a prefix would match nothing.
                bad(
                    format!("route[{i}].path"),
                    format!(
                        "{:?}: a path prefix has no query, fragment or space (write %20)",
                        r.path
                    ),
                );
            }
            let protocol = self
                .upstreams
                .get(r.upstream.get_ref())
                .map(UpstreamConfig::protocol);
            match (protocol, &r.fastcgi) {
                (Some(Protocol::FastCgi), None) => bad(
                    format!("route[{i}].upstream"),
                    "this upstream speaks FastCGI: the route needs [route.fastcgi] with at least `root`".into(),
                ),
                (Some(Protocol::Http1 | Protocol::Http2), Some(_)) => bad(
                    format!("route[{i}].fastcgi"),
                    "[route.fastcgi] only applies to routes whose upstream is fastcgi:// or fastcgi+unix://".into(),
                ),
                _ => {}
            }
            if let Some(f) = &r.fastcgi {
                if !f.root.is_absolute() {
                    bad(
                        format!("route[{i}].fastcgi.root"),
                        format!("{:?} must be an absolute path", f.root),
                    );
                }
                if f.script_extensions
                    .iter()
                    .any(|e| !e.starts_with('.') || e.len() < 2)
                {
                    bad(
                        format!("route[{i}].fastcgi.script_extensions"),
                        "each extension starts with '.', like \".php\"".into(),
                    );
                }
                if f.fallback.as_ref().is_some_and(|p| !p.starts_with('/')) {
                    bad(
                        format!("route[{i}].fastcgi.fallback"),
                        "must be a path starting with '/', like \"/index.php\"".into(),
                    );
                }
                // Checked now, not at the first long upload: each would get 500.
                let dir = f.temp_dir();
                let key = if f.body_temp_dir.is_some() {
                    format!("route[{i}].fastcgi.body_temp_dir")
                } else {
                    format!("route[{i}].fastcgi")
                };
                if !dir.is_absolute() {
                    bad(key, format!("{dir:?} must be an absolute path"));
                } else if let Err(e) = tempfile::tempfile_in(&dir) {
                    bad(
                        key,
                        format!(
                            "cannot create a file in {dir:?} ({e}), where request bodies longer than body_memory wait; set body_temp_dir to a writable directory"
                        ),
                    );
                }
            }
            if !self.upstreams.contains_key(r.upstream.get_ref()) {
                let known: Vec<&str> = self.upstreams.keys().map(String::as_str).collect();
                bad(
                    format!("route[{i}].upstream"),
                    format!(
                        "no upstream named {:?}; defined: {}",
                        r.upstream.get_ref(),
                        if known.is_empty() {
                            "none".into()
                        } else {
                            known.join(", ")
                        }
                    ),
                );
            }
        }
        for (i, j) in crate::route::shadowed(&self.routes) {
            // Its requests all go to the earlier one: a route that is never used is a
            // mistake in the file, as two listeners on one address are.
            bad(
                format!("route[{i}].path"),
                format!("route[{j}] has the same host and path: this route would never be used"),
            );
        }
        for (name, u) in &self.upstreams {
            // A name that is not a bare TOML key (`"api.v1"`) is quoted, as the
            // file writes it, so the path stays one path (and can be located).
            let name = toml_key(name);
            let key = |k: &str| format!("upstream.{name}.{k}");
            if u.addresses.is_empty() {
                bad(key("addresses"), "at least one address is required".into());
            }
            if u.addresses
                .iter()
                .any(|a| a.protocol != u.protocol() || a.tls != u.uses_tls())
            {
                bad(
                    key("addresses"),
                    "all addresses of one upstream must use one protocol".into(),
                );
            }
            if let Some(msg) = connection_cap_problem(u.pool.max_connections) {
                bad(key("pool.max_connections"), msg);
            }
            if u.pool.max_idle > u.pool.max_connections {
                bad(
                    key("pool.max_idle"),
                    format!(
                        "{} is more than pool.max_connections ({})",
                        u.pool.max_idle, u.pool.max_connections
                    ),
                );
            }
            if u.retry.attempts == 0 {
                bad(
                    key("retry.attempts"),
                    "must be at least 1 (1 means no retries)".into(),
                );
            }
            if u.health.max_fails == 0 {
                // Taken as 1, the most eager ejection there is, where nginx's 0 means
                // "never eject".
                bad(
                    key("health.max_fails"),
                    "must be at least 1 (1: the first failure ejects the address)".into(),
                );
            }
            if u.health.eject_for.get().is_zero() {
                // An ejection that ends as it begins: every failure past max_fails
                // was logged as an ejection and none kept a request away.
                bad(key("health.eject_for"), "must be more than 0s".into());
            } else if u.health.eject_for > u.health.eject_max {
                // Taken, every ejection lasted eject_max, the first one included.
                bad(
                    key("health.eject_for"),
                    format!(
                        "{} is more than health.eject_max ({}), the longest an ejection lasts",
                        u.health.eject_for, u.health.eject_max
                    ),
                );
            }
            if !(0.0..=1.0).contains(&u.retry.budget_ratio) {
                bad(
                    key("retry.budget_ratio"),
                    "must be between 0.0 and 1.0".into(),
                );
            }
            if let Some(problem) = host_header_problem(&u.host_header) {
                bad(key("host_header"), problem);
            }
            if u.resolve_every.get().is_zero() {
                // `tokio::time::interval` panics on a zero period: the task that
                // resolves host names again would die and never run.
                bad(key("resolve_every"), "must be more than 0s".into());
            }
            for (k, msg) in u.tcp.problems() {
                bad(key(&format!("tcp.{k}")), msg);
            }
            if u.timeouts.connect.get().is_zero() {
                bad(key("timeouts.connect"), "must be more than 0s".into());
            }
            if u.timeouts.response_headers.get().is_zero() {
                // Not "off", as `0s` is for `total`: every answer would be late, and
                // every request 504 after it was sent.
                bad(
                    key("timeouts.response_headers"),
                    "must be more than 0s".into(),
                );
            }
            if u.protocol() == Protocol::Http2 && u.http_version == HttpVersion::Http1 {
                bad(
                    key("http_version"),
                    "h2c:// addresses speak HTTP/2; write http:// for HTTP/1.1".into(),
                );
            }
            if u.protocol() == Protocol::FastCgi && u.http_version != HttpVersion::Auto {
                bad(
                    key("http_version"),
                    "does not apply to fastcgi:// upstreams".into(),
                );
            }
            if u.http2.connections == 0 {
                bad(key("http2.connections"), "must be at least 1".into());
            }
            if u.http2.ping_interval.non_zero().is_some() && u.http2.ping_timeout.get().is_zero() {
                bad(
                    key("http2.ping_timeout"),
                    "must be more than 0s while PINGs are on".into(),
                );
            }
            match &u.tls {
                Some(_) if !u.uses_tls() => bad(
                    key("tls"),
                    "[upstream.NAME.tls] applies to https:// addresses".into(),
                ),
                Some(tls) => {
                    for (k, msg) in tls.problems() {
                        bad(key(&format!("tls.{k}")), msg);
                    }
                    // The files are read here too, so `holdfast check` and a reload
                    // catch a bad one before anything is swapped.
                    if let Err((k, msg)) = crate::upstream::tls::check(tls) {
                        bad(key(&format!("tls.{k}")), msg);
                    }
                }
                None => {}
            }
        }
        problems
    }

    /// The config as TOML with every default filled in, for `holdfast check` and the
    /// admin `/config` endpoint.
    pub fn to_effective_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

/// What is wrong with a `max_connections`, if anything. It sizes a semaphore, which
/// panics above `MAX_PERMITS`: on a listener's accept task (which would then accept
/// nothing) or, for a pool, in the middle of a reload.
fn connection_cap_problem(n: usize) -> Option<String> {
    let max = tokio::sync::Semaphore::MAX_PERMITS;
    if n == 0 {
        Some("must be at least 1".into())
    } else if n > max {
        Some(format!(
            "{n} is more than the most holdfast can count ({max})"
        ))
    } else {
        None
    }
}

/// `name` as a TOML key: bare if it can be, else quoted (`api.v2` is `"api.v2"`).
pub fn toml_key(name: &str) -> String {
    let bare = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if bare {
        name.to_owned()
    } else {
        let mut q = String::from("\"");
        for c in name.chars() {
            match c {
                '"' => q.push_str("\\\""),
                '\\' => q.push_str("\\\\"),
                c if c.is_control() => q.push_str(&format!("\\u{:04X}", c as u32)),
                c => q.push(c),
            }
        }
        q.push('"');
        q
    }
}

/// What is wrong with a route's `host`, if anything: a name matched as written
/// (`shop.example.com`), `*.example.com` for its subdomains, or `*` for any. A `*`
/// elsewhere (`*example.com` would match `badexample.com`) or a port (the request's
/// port is not compared, so the route would never match) is refused.
fn host_pattern_problem(host: &str) -> Option<String> {
    let name = match host {
        "*" | "" => return None,
        h => h.strip_prefix("*.").unwrap_or(h),
    };
    if name.contains('*') {
        return Some(format!(
            "{host:?}: `*` only as a whole label at the start, like \"*.example.com\""
        ));
    }
    // An IPv6 literal, bracketed or not, holds colons of its own.
    let v6 = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name)
        .parse::<std::net::Ipv6Addr>()
        .is_ok();
    if name.contains(':') && !v6 {
        return Some(format!(
            "{host:?}: a host without a port (the port is not compared)"
        ));
    }
    // A Host with other characters gets 400 before routing: such a route would
    // never be used.
    if name.is_empty() || !crate::proxy::is_host_and_port(name.as_bytes()) {
        return Some(format!(
            "{host:?} is not a host name (a name with other than ASCII letters is written in its xn-- form)"
        ));
    }
    None
}

/// What is wrong with an upstream's `host_header`, if anything: `client`, `upstream`,
/// or a literal `host[:port]`. A literal that is no field value was dropped at each
/// request, which then went out with the client's `Host` without a word.
fn host_header_problem(value: &str) -> Option<String> {
    if matches!(value, "client" | "upstream") {
        return None;
    }
    let authority = value.parse::<http::uri::Authority>();
    if value.is_empty() || value.contains('@') || authority.is_err() {
        return Some(format!(
            "{value:?} is not \"client\", \"upstream\" or a host[:port], like \"api.example.com\""
        ));
    }
    None
}

/// Whether two listening addresses would be one socket: the same port (not 0, which
/// asks for a fresh one) and family, and the same address or one of them the
/// wildcard (IPv6 listeners are IPv6-only, so they never meet an IPv4 one).
fn same_socket(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

#[cfg(test)]
mod tests;
