//! Drain, reload and binary upgrade, end to end: the real binary, real signals, loopback
//! upstreams and clients.
//!
//! Story 1b (`../shared/PROBLEMS.md`): a keep-alive client, busy or quiet, must not keep
//! a draining process alive, and a slow request must not be cut. Story 3: five binary
//! upgrades (SIGUSR2) under keep-alive load must cost no client a single request.
//!
//! Every test starts its own gateway on free loopback ports with a generated config, and
//! stops every process it started (successors included) by PID. Set
//! `HOLDFAST_UPGRADE_ROUNDS=N` to repeat the upgrade-under-load scenario N times
//! (`scripts/upgrade-stress` does, with 10).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use holdfast_test::{
    Behaviour, ClientRequest, ErrorKind, HoldfastProcess, KeepAliveClient, Load, LoadConfig,
    LoadReport, PeerClose, RawClient, RequestSlot, Response, TestUpstream, TransportError,
    free_addr, read_pid_file, sys, wait_until, wait_until_async,
};
use tokio::sync::watch;
use tokio::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");

/// How long a started gateway may take to answer `/ready`.
const START: Duration = Duration::from_secs(15);
/// Bound for waits on a log line or a request that should come at once.
const SOON: Duration = Duration::from_secs(10);
/// How long holdfast keeps reading a closed connection (`server::conn::LINGER`): a quiet
/// client that never reads holds its connection open for this long after the FIN.
const LINGER: Duration = Duration::from_secs(2);
/// Timer and scheduling slack on a busy machine.
const SLACK: Duration = Duration::from_millis(1500);

/// Logged once listeners stop accepting, after `drain.pre_delay`.
const STOPPED_ACCEPTING: &str = "listeners closed";

// === fixtures ===

/// A holdfast process with its listener and admin addresses.
struct Gateway {
    proc: HoldfastProcess,
    listen: SocketAddr,
    admin: SocketAddr,
    /// Processes that took over by SIGUSR2, in order.
    successors: Vec<u32>,
}

/// What a test's config holds besides listener, admin and routes.
#[derive(Default)]
struct Setup<'a> {
    /// `(path prefix, upstream)`: one `[[route]]` and `[upstream.uN]` each.
    routes: Vec<(&'a str, SocketAddr)>,
    /// Extra tables (`[drain]`, `[upgrade]`), written before the listener.
    extra: &'a str,
    /// Run this binary instead of the one cargo built.
    binary: Option<PathBuf>,
    /// Extra environment; `{listen}` in a value becomes the listener's address.
    env: Vec<(&'a str, &'a str)>,
    /// Extra keys of the `[[listener]]` table.
    listener: &'a str,
    /// `log.access_log` on (off otherwise).
    access_log: bool,
}

impl Gateway {
    async fn start(setup: Setup<'_>) -> Gateway {
        let listen = free_addr();
        let admin = free_addr();
        let mut toml = config_toml(listen, admin, &setup.routes, setup.extra).replacen(
            &format!("listen = \"{listen}\"\n"),
            &format!("listen = \"{listen}\"\n{}\n", setup.listener),
            1,
        );
        if setup.access_log {
            toml = toml.replacen("access_log = false", "access_log = true", 1);
        }
        let binary = setup.binary.unwrap_or_else(|| PathBuf::from(BIN));
        let env: Vec<(&str, String)> = setup
            .env
            .iter()
            .map(|(k, v)| (*k, v.replace("{listen}", &listen.to_string())))
            // Plain log lines (no ANSI colours), so the tests can match fields too.
            .chain([("NO_COLOR", "1".to_owned())])
            .collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let proc = HoldfastProcess::spawn_with_env(
            &binary,
            &["run", "--pid-file", "{dir}/holdfast.pid"],
            Some(&toml),
            &env,
        );
        let mut gw = Gateway {
            proc,
            listen,
            admin,
            successors: Vec::new(),
        };
        let pid = gw.proc.pid();
        // Stop waiting early if it exits (a config it rejects, a port taken).
        let ready = wait_until_async(START, || async move {
            !sys::is_running(pid) || ready_status(admin).await
        })
        .await;
        assert!(
            ready && gw.proc.exited().is_none(),
            "holdfast did not become ready; logs:\n{}",
            gw.proc.logs()
        );
        gw
    }

    /// Records a successor, so it is stopped by PID with the rest.
    fn adopt(&mut self, pid: u32) {
        self.proc.kill_on_drop(pid);
        self.successors.push(pid);
    }

    fn pid_file(&self) -> PathBuf {
        self.proc.dir().join("holdfast.pid")
    }

    fn config_path(&self) -> &Path {
        self.proc.config_path().expect("started with a config")
    }

    /// Rewrites the config file (the path SIGHUP and a successor read).
    fn rewrite_config(&self, toml: &str) {
        std::fs::write(self.config_path(), toml).expect("rewrite the config");
    }

    /// Writes `toml` over the config file, sends SIGHUP, and waits for the reload.
    async fn reload_with(&mut self, toml: &str) {
        self.rewrite_config(toml);
        self.signal(sys::SIGHUP);
        self.wait_for_log("config reloaded").await;
    }

    fn config_with(&self, routes: &[(&str, SocketAddr)], extra: &str) -> String {
        config_toml(self.listen, self.admin, routes, extra)
    }

    fn signal(&mut self, signal: sys::c_int) {
        self.proc
            .signal(signal)
            .unwrap_or_else(|e| panic!("signal {signal}: {e}\nlogs:\n{}", self.proc.logs()));
    }

    async fn wait_for_log(&self, needle: &str) {
        assert!(
            self.proc.wait_for_log(needle, SOON).await,
            "no {needle:?} in the logs within {SOON:?}:\n{}",
            self.proc.logs()
        );
    }

    fn count_in_logs(&self, needle: &str) -> usize {
        self.proc.logs().matches(needle).count()
    }

    /// Asserts that a new connection gets a 2xx for `GET target`.
    async fn assert_serves(&self, target: &str) -> Response {
        let resp = KeepAliveClient::new(self.listen)
            .get(target)
            .await
            .unwrap_or_else(|e| panic!("GET {target}: {e}\nlogs:\n{}", self.proc.logs()));
        assert!(resp.is_success(), "GET {target}: {}", resp.status);
        resp
    }
}

impl Drop for Gateway {
    /// A test that fails half-way may leave a successor it never learned the PID of:
    /// kill every child (a successor it started) of every generation still running, by
    /// PID; the fixture then kills the generations themselves.
    fn drop(&mut self) {
        let first = self.proc.exited().is_none().then(|| self.proc.pid());
        let running = first.into_iter().chain(
            self.successors
                .iter()
                .copied()
                .filter(|p| sys::is_running(*p)),
        );
        for pid in running.collect::<Vec<_>>() {
            for child in sys::children_of(pid) {
                let _ = sys::send_signal(child, sys::SIGKILL);
            }
        }
    }
}

fn config_toml(
    listen: SocketAddr,
    admin: SocketAddr,
    routes: &[(&str, SocketAddr)],
    extra: &str,
) -> String {
    let mut toml = format!(
        "[log]\naccess_log = false\n\n[admin]\nlisten = \"{admin}\"\n\n{extra}\n\n\
         [[listener]]\nlisten = \"{listen}\"\n"
    );
    for (i, (path, _)) in routes.iter().enumerate() {
        toml.push_str(&format!(
            "\n[[route]]\npath = \"{path}\"\nupstream = \"u{i}\"\n"
        ));
    }
    for (i, (_, addr)) in routes.iter().enumerate() {
        toml.push_str(&format!(
            "\n[upstream.u{i}]\naddresses = [\"http://{addr}\"]\n"
        ));
    }
    toml
}

/// Whether `GET /ready` on the admin port answers 200.
async fn ready_status(admin: SocketAddr) -> bool {
    matches!(admin_status(admin, "/ready").await, Some(200))
}

async fn admin_status(admin: SocketAddr, path: &str) -> Option<u16> {
    let mut client = KeepAliveClient::new(admin).with_timeout(Duration::from_secs(2));
    client.get(path).await.ok().map(|r| r.status)
}

/// The status of `GET target` on a new connection to `addr`, if one came.
async fn status_of(addr: SocketAddr, target: &str) -> Option<u16> {
    let mut client = KeepAliveClient::new(addr).with_timeout(SOON);
    client.get(target).await.ok().map(|r| r.status)
}

fn has_connection_close(resp: &Response) -> bool {
    resp.headers.has_token("connection", "close")
}

/// Every request of a client that sends `GET /tick` on one keep-alive connection every
/// `period` until told to stop (at most 60 requests).
async fn periodic_client(
    addr: SocketAddr,
    period: Duration,
    mut stop: watch::Receiver<bool>,
) -> Vec<(Instant, Result<u16, TransportError>)> {
    let mut client = KeepAliveClient::new(addr).with_timeout(SOON);
    let mut sent = Vec::new();
    for _ in 0..60 {
        if *stop.borrow() {
            break;
        }
        let at = Instant::now();
        sent.push((at, client.get("/tick").await.map(|r| r.status)));
        tokio::select! {
            () = tokio::time::sleep_until(at + period) => {}
            _ = stop.changed() => break,
        }
    }
    sent
}

// === drain ===

/// Story 1b: one client sends every second on a keep-alive connection, another sent once
/// and went quiet. Neither may keep the process alive after SIGTERM, and no request sent
/// before it may fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_clients_do_not_keep_a_draining_process_alive() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    // idle_close_after stays at its default, 1 s; drain.timeout at 30 s, far beyond.
    let mut gw = Gateway::start(Setup {
        routes: vec![("/", up.addr())],
        ..Setup::default()
    })
    .await;
    let idle_close_after = Duration::from_secs(1);

    let mut quiet = KeepAliveClient::new(gw.listen);
    let first = quiet
        .get("/once")
        .await
        .expect("the quiet client's request");
    assert!(first.is_success() && first.keeps_alive(), "{first:?}");

    let (stop_tx, stop_rx) = watch::channel(false);
    let busy = tokio::spawn(periodic_client(gw.listen, Duration::from_secs(1), stop_rx));
    up.wait_for_requests(1 + 3, SOON)
        .await
        .expect("the periodic client got going");

    let stopped_at = Instant::now();
    gw.signal(sys::SIGTERM);
    let bound = idle_close_after + LINGER + SLACK;
    let status = gw.proc.wait_exit(bound + SOON).await;
    let took = stopped_at.elapsed();
    let _ = stop_tx.send(true);
    let sent = busy.await.expect("periodic client");

    let status = status.unwrap_or_else(|| panic!("still running; logs:\n{}", gw.proc.logs()));
    assert!(status.success(), "{status}; logs:\n{}", gw.proc.logs());
    assert!(
        took <= bound,
        "exit took {took:?}, more than {bound:?}; logs:\n{}",
        gw.proc.logs()
    );
    let before: Vec<_> = sent.iter().filter(|(at, _)| *at < stopped_at).collect();
    assert!(before.len() >= 3, "{sent:?}");
    for (_, outcome) in &before {
        assert!(
            matches!(outcome, Ok(200)),
            "a request sent before SIGTERM failed: {outcome:?}"
        );
    }
    // The quiet client's connection was closed with a FIN, not a reset.
    let conn = quiet.connection().expect("still holds its connection");
    assert_eq!(conn.wait_close(SOON).await, PeerClose::Eof);
}

/// A request in flight when the drain starts is not cut: it completes with 200, tells
/// the client to close, and the process exits right after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_in_flight_completes_during_a_drain() {
    let delay = Duration::from_secs(2);
    let slow = TestUpstream::start(Behaviour::Delay(delay)).await;
    let mut gw = Gateway::start(Setup {
        routes: vec![("/", slow.addr())],
        ..Setup::default()
    })
    .await;

    let addr = gw.listen;
    let in_flight = tokio::spawn(async move {
        let mut client = KeepAliveClient::new(addr).with_timeout(SOON);
        client.get("/slow").await
    });
    slow.wait_for_requests(1, SOON)
        .await
        .expect("the slow request reached the upstream");
    let stopped_at = Instant::now();
    gw.signal(sys::SIGTERM);

    let resp = in_flight
        .await
        .expect("client task")
        .unwrap_or_else(|e| panic!("in-flight request failed: {e}\nlogs:\n{}", gw.proc.logs()));
    assert_eq!(resp.status, 200);
    assert!(
        has_connection_close(&resp),
        "a response during the drain must carry Connection: close: {:?}",
        resp.headers
    );
    let status = gw.proc.wait_exit(delay + SOON).await;
    let took = stopped_at.elapsed();
    let status = status.unwrap_or_else(|| panic!("still running; logs:\n{}", gw.proc.logs()));
    assert!(status.success(), "{status}; logs:\n{}", gw.proc.logs());
    assert!(
        took <= delay + SLACK,
        "exit took {took:?} after SIGTERM; the only request took {delay:?}"
    );
}

/// The drain's order: `/ready` fails first; during `pre_delay` new connections are still
/// served; then listeners close, and the next request on an idle keep-alive connection is
/// served with `Connection: close`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_fails_first_then_responses_carry_connection_close() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let mut gw = Gateway::start(Setup {
        routes: vec![("/", up.addr())],
        extra: "[drain]\npre_delay = \"2s\"\nidle_close_after = \"8s\"\n",
        ..Setup::default()
    })
    .await;

    let mut kept = KeepAliveClient::new(gw.listen);
    let resp = kept.get("/before").await.expect("request before the drain");
    assert!(resp.keeps_alive() && !has_connection_close(&resp));
    assert_eq!(admin_status(gw.admin, "/ready").await, Some(200));

    gw.signal(sys::SIGTERM);
    let not_ready = wait_until_async(SOON, || async {
        admin_status(gw.admin, "/ready").await == Some(503)
    })
    .await;
    assert!(
        not_ready,
        "/ready never turned 503; logs:\n{}",
        gw.proc.logs()
    );

    // Still in pre_delay: a new connection is accepted and served normally.
    let mut late = KeepAliveClient::new(gw.listen);
    let resp = late
        .get("/during-pre-delay")
        .await
        .expect("served in pre_delay");
    assert!(resp.is_success());
    assert!(
        !gw.proc.logs().contains(STOPPED_ACCEPTING),
        "pre_delay ended before the request; it is 2 s"
    );
    late.disconnect();

    gw.wait_for_log(STOPPED_ACCEPTING).await;
    let resp = kept
        .get("/during-drain")
        .await
        .expect("the idle connection's next request is served");
    assert_eq!(resp.status, 200);
    assert!(
        has_connection_close(&resp),
        "a response during the drain must carry Connection: close: {:?}",
        resp.headers
    );
    let refused = KeepAliveClient::new(gw.listen).get("/after").await;
    assert!(
        matches!(&refused, Err(e) if e.kind == ErrorKind::Refused),
        "the listener should be closed: {refused:?}"
    );

    let status = gw.proc.wait_exit(SOON).await.expect("exits");
    assert!(status.success(), "{status}; logs:\n{}", gw.proc.logs());
}

/// A first SIGINT drains (and waits for the request in flight); a second one exits at
/// once, cutting it, and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_sigint_exits_at_once() {
    let (mut gw, _hang, in_flight) = with_a_hung_request("60s").await;

    gw.signal(sys::SIGINT);
    gw.wait_for_log(STOPPED_ACCEPTING).await;
    assert!(
        gw.proc.exited().is_none(),
        "a first SIGINT must drain, not exit"
    );

    let second = Instant::now();
    gw.signal(sys::SIGINT);
    let status = gw.proc.wait_exit(SOON).await;
    let took = second.elapsed();
    let status = status.unwrap_or_else(|| panic!("still running; logs:\n{}", gw.proc.logs()));
    assert!(took <= SLACK, "second SIGINT took {took:?} to exit");
    assert_eq!(status.code(), Some(2), "cut work exits 2: {status}");
    assert!(
        gw.proc.logs().contains("cutting them"),
        "{}",
        gw.proc.logs()
    );
    // Cut: the connection drops, or, if the request's task runs once more as the
    // upstream connection's task goes, it answers 502 (never a 400 blaming the client).
    let cut = in_flight.await.expect("client task");
    assert!(
        cut.as_ref().map_or(true, |r| r.status == 502),
        "the hung request was cut: {cut:?}"
    );
}

/// Story 1b's last resort: a request still running at `drain.timeout` (an upstream that
/// never answers) is waited for until then, not cut early, and then cut: the drain
/// ends at its deadline whatever is left, the process exits with status 2, and the log
/// says how many connections it cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_ends_at_its_timeout_and_says_what_it_cut() {
    let timeout = Duration::from_secs(2);
    let (mut gw, _hang, in_flight) = with_a_hung_request("2s").await;

    let stopped_at = Instant::now();
    gw.signal(sys::SIGTERM);
    let status = gw.proc.wait_exit(timeout + SOON).await;
    let took = stopped_at.elapsed();
    let status =
        status.unwrap_or_else(|| panic!("the drain never ended; logs:\n{}", gw.proc.logs()));
    assert!(
        took >= timeout && took <= timeout + SLACK,
        "exit took {took:?} after SIGTERM, drain.timeout is {timeout:?}; logs:\n{}",
        gw.proc.logs()
    );
    assert_eq!(status.code(), Some(2), "cut work exits 2: {status}");
    let logs = gw.proc.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("cutting them") && l.contains("connections=1")),
        "{logs}"
    );
    let cut = in_flight.await.expect("client task");
    assert!(
        cut.as_ref().map_or(true, |r| r.status == 502),
        "the hung request was cut: {cut:?}"
    );
}

/// A request in flight at SIGTERM that completes, to a client that keeps its end of
/// the connection open afterwards (as a pool does that notices a close only when it
/// next uses the connection): holdfast's close then lingers (`LINGER`, reading what the
/// client may still send) past a `drain.timeout` shorter than that. Nothing was cut:
/// the process exits 0 and does not say it cut anything. It exited 2 and logged one
/// connection cut, counting the lingering close as open work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_still_lingering_at_the_drain_timeout_is_not_counted_cut() {
    let up = TestUpstream::start(Behaviour::Delay(Duration::from_millis(300))).await;
    let timeout = Duration::from_secs(1);
    let mut gw = Gateway::start(Setup {
        routes: vec![("/", up.addr())],
        extra: "[drain]\ntimeout = \"1s\"\n",
        ..Setup::default()
    })
    .await;
    let mut client = RawClient::connect(gw.listen).await.expect("connect");
    client
        .send_request(&ClientRequest::get("/slow"))
        .await
        .expect("request");
    up.wait_for_requests(1, SOON)
        .await
        .expect("the request reached the upstream");
    gw.signal(sys::SIGTERM);
    let resp = client.read_response(SOON).await.expect("answered");
    assert_eq!(resp.status, 200);
    assert!(has_connection_close(&resp), "{:?}", resp.headers);
    assert_eq!(client.wait_close(SOON).await, PeerClose::Eof);
    // The client's end stays open (kept in `client`) until the process has exited.
    let status = gw.proc.wait_exit(timeout + LINGER + SOON).await;
    let logs = gw.proc.logs();
    let status = status.unwrap_or_else(|| panic!("the drain never ended; logs:\n{logs}"));
    assert_eq!(
        status.code(),
        Some(0),
        "nothing was cut: {status}; logs:\n{logs}"
    );
    assert!(!logs.contains("cutting them"), "{logs}");
    drop(client);
}

/// Requests still running when the drain ends at `drain.timeout` are cut by holdfast,
/// and their access lines say so: `drain_cut`, with status 444 (nginx's for a
/// connection closed with no response) for one with no answer yet, and its own status
/// for one whose body was cut. They said `client_gone` (and 499 for the first), the
/// client's doing, as the last lines the process wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_cut_at_the_drain_timeout_are_logged_as_cut_not_as_the_clients_doing() {
    let hang = TestUpstream::start(Behaviour::Hang).await;
    let big = TestUpstream::start(Behaviour::StreamBody { len: 1 << 40 }).await;
    let mut gw = Gateway::start(Setup {
        routes: vec![("/hang", hang.addr()), ("/big", big.addr())],
        extra: "[drain]\ntimeout = \"1s\"\n",
        access_log: true,
        ..Setup::default()
    })
    .await;
    let mut waiting = RawClient::connect(gw.listen).await.expect("connect");
    waiting
        .send_request(&ClientRequest::get("/hang"))
        .await
        .expect("request");
    hang.wait_for_requests(1, SOON)
        .await
        .expect("the request reached the upstream");
    // A download the client reads none of once its head has come: still running at
    // the drain's end (send_timeout is far longer).
    let mut reading = RawClient::connect(gw.listen).await.expect("connect");
    reading
        .send_request(&ClientRequest::get("/big"))
        .await
        .expect("request");
    let PeerClose::Data(head) = reading.wait_close(SOON).await else {
        panic!("no response head for /big; logs:\n{}", gw.proc.logs());
    };
    assert!(head.starts_with(b"HTTP/1.1 200"), "{head:?}");
    gw.signal(sys::SIGTERM);
    let status = gw.proc.wait_exit(SOON).await;
    let logs = gw.proc.logs();
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{logs}");
    let line = |path: &str| {
        logs.lines()
            .find(|l| l.contains("holdfast::access") && l.contains(path))
            .unwrap_or_else(|| panic!("no access line for {path}:\n{logs}"))
            .to_owned()
    };
    let hung = line("path=/hang");
    assert!(
        hung.contains("status=444") && hung.contains("outcome=\"drain_cut\""),
        "{hung}"
    );
    let cut = line("path=/big");
    assert!(
        cut.contains("status=200") && cut.contains("outcome=\"drain_cut\""),
        "{cut}"
    );
    drop((waiting, reading));
}

/// A gateway with `drain.timeout` set, and one request in flight to an upstream that
/// never answers (it has reached the upstream): the gateway, the upstream, and the
/// client's task.
async fn with_a_hung_request(
    drain_timeout: &str,
) -> (
    Gateway,
    TestUpstream,
    tokio::task::JoinHandle<Result<Response, TransportError>>,
) {
    let hang = TestUpstream::start(Behaviour::Hang).await;
    let extra = format!("[drain]\ntimeout = \"{drain_timeout}\"\n");
    let gw = Gateway::start(Setup {
        routes: vec![("/", hang.addr())],
        extra: &extra,
        ..Setup::default()
    })
    .await;
    let addr = gw.listen;
    let in_flight = tokio::spawn(async move {
        let mut client = KeepAliveClient::new(addr).with_timeout(Duration::from_secs(30));
        client.get("/hang").await
    });
    hang.wait_for_requests(1, SOON)
        .await
        .expect("the request reached the upstream");
    (gw, hang, in_flight)
}

/// SIGUSR2 to a process that is already draining is ignored and logged: its listening
/// sockets are closed by then, so there is nothing left to hand on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_during_a_drain_is_ignored() {
    let slow = TestUpstream::start(Behaviour::Delay(Duration::from_secs(2))).await;
    let mut gw = Gateway::start(Setup {
        routes: vec![("/", slow.addr())],
        ..Setup::default()
    })
    .await;
    let addr = gw.listen;
    let in_flight = tokio::spawn(async move {
        let mut client = KeepAliveClient::new(addr).with_timeout(SOON);
        client.get("/slow").await
    });
    slow.wait_for_requests(1, SOON)
        .await
        .expect("the slow request reached the upstream");

    gw.signal(sys::SIGTERM);
    gw.wait_for_log(STOPPED_ACCEPTING).await;
    gw.signal(sys::SIGUSR2);
    // Either "SIGUSR2 ignored" or "SIGUSR2: starting the new binary".
    gw.wait_for_log("SIGUSR2").await;
    assert_eq!(
        gw.count_in_logs("starting the new binary"),
        0,
        "{}",
        gw.proc.logs()
    );
    gw.wait_for_log("SIGUSR2 ignored").await;
    assert!(sys::children_of(gw.proc.pid()).is_empty());

    let resp = in_flight
        .await
        .expect("client task")
        .expect("in-flight request");
    assert_eq!(resp.status, 200);
    let status = gw.proc.wait_exit(SOON).await.expect("exits");
    assert!(status.success(), "{status}; logs:\n{}", gw.proc.logs());
}

// === reload ===

/// SIGHUP: a changed route applies to new requests (on open connections too) while the
/// request in flight finishes on the old route; a bad config is rejected, logged, and
/// the running one kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_changes_routes_for_new_requests_and_keeps_in_flight_ones() {
    let old = TestUpstream::start(Behaviour::Delay(Duration::from_secs(2))).await;
    let new = TestUpstream::start(Behaviour::Echo).await;
    let mut gw = Gateway::start(Setup {
        routes: vec![("/", old.addr())],
        ..Setup::default()
    })
    .await;

    let addr = gw.listen;
    let in_flight = tokio::spawn(async move {
        let mut client = KeepAliveClient::new(addr).with_timeout(SOON);
        let first = client.get("/in-flight").await;
        let second = client.get("/next-on-same-connection").await;
        (first, second, client.connections_opened())
    });
    old.wait_for_requests(1, SOON)
        .await
        .expect("the slow request reached the old upstream");

    let toml = gw.config_with(&[("/", new.addr())], "");
    gw.reload_with(&toml).await;
    gw.assert_serves("/after-reload").await;
    assert_eq!(
        new.requests_seen(),
        1,
        "a new request must use the new route"
    );

    let (first, second, opened) = in_flight.await.expect("client task");
    let first = first.expect("the in-flight request finishes");
    assert_eq!(first.status, 200);
    assert!(
        !has_connection_close(&first),
        "reload must not close connections"
    );
    assert!(second.expect("next request").is_success());
    assert_eq!(opened, 1, "the open connection was kept");
    assert_eq!(old.requests_seen(), 1);
    assert_eq!(new.requests_seen(), 2);

    gw.rewrite_config("this is = not [ a config\n");
    gw.signal(sys::SIGHUP);
    gw.wait_for_log("config rejected").await;
    gw.assert_serves("/after-bad-reload").await;
    assert_eq!(new.requests_seen(), 3, "the running config was kept");
    assert_eq!(gw.count_in_logs("config reloaded"), 1);
    assert!(gw.proc.exited().is_none());

    gw.signal(sys::SIGTERM);
    let status = gw.proc.wait_exit(SOON).await.expect("exits");
    assert!(status.success(), "{status}");
}

// === upgrade ===

/// Story 3: under 50 keep-alive connections (GET and POST) for about 15 s, five SIGUSR2
/// upgrades in a row cost no request: no transport error, no non-2xx. Each new process
/// rewrites the PID file, and each old one drains and exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_upgrades_under_load_lose_no_request() {
    let rounds: usize = std::env::var("HOLDFAST_UPGRADE_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1)
        .clamp(1, 50);
    let mut dirty = Vec::new();
    let mut requests = 0;
    for round in 1..=rounds {
        // A round that panics (a broken upgrade) is reported too, and the next one runs;
        // the round's processes are killed as its fixtures unwind.
        let outcome = tokio::spawn(upgrades_under_load(5, Duration::from_secs(15))).await;
        let line = match outcome {
            Ok(report) => {
                requests += report.requests();
                let line = format!("round {round}/{rounds}: {report}");
                if !report.is_clean() {
                    dirty.push(line.clone());
                }
                line
            }
            Err(e) => {
                let why = match e.try_into_panic() {
                    Ok(p) => p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                        .unwrap_or_default(),
                    Err(e) => e.to_string(),
                };
                let line = format!("round {round}/{rounds}: the upgrade broke: {why}");
                dirty.push(line.clone());
                line
            }
        };
        println!("{line}");
    }
    println!(
        "{rounds} rounds x 5 upgrades: {requests} requests, {} rounds with errors",
        dirty.len()
    );
    assert!(
        dirty.is_empty(),
        "rounds with errors:\n{}",
        dirty.join("\n")
    );
}

/// What the clients of one upgrade-under-load round saw.
struct RoundReport {
    /// 40 connections sending back to back.
    busy: LoadReport,
    /// 10 connections pausing between requests, so a drain finds them idle.
    paced: LoadReport,
    /// `GET /ready` on the admin port, a new connection each time: what was not 200.
    probes: Vec<Result<u16, TransportError>>,
    probes_sent: usize,
}

impl RoundReport {
    fn requests(&self) -> u64 {
        self.busy.requests + self.paced.requests
    }

    fn is_clean(&self) -> bool {
        [&self.busy, &self.paced]
            .iter()
            .all(|r| r.ok > 0 && r.error_count() == 0 && r.non_2xx_count() == 0)
            && self.probes.is_empty()
    }
}

impl std::fmt::Display for RoundReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "busy: {}\n  paced: {}\n  /ready: {} probes, not 200: {:?}",
            self.busy, self.paced, self.probes_sent, self.probes
        )
    }
}

/// Half GET, half POST with a small body.
fn get_or_post(slot: RequestSlot) -> ClientRequest {
    if slot.global.is_multiple_of(2) {
        ClientRequest::get(format!("/get/{}", slot.global))
    } else {
        ClientRequest::post(format!("/post/{}", slot.global), vec![b'x'; 512])
    }
}

/// Asks the admin port for `/ready` every 20 ms (at most 5000 times) until told to
/// stop; returns how many probes were sent and every one that did not get 200.
async fn probe_ready(
    admin: SocketAddr,
    mut stop: watch::Receiver<bool>,
) -> (usize, Vec<Result<u16, TransportError>>) {
    let mut failed = Vec::new();
    let mut sent = 0;
    while sent < 5000 && !*stop.borrow() {
        sent += 1;
        let mut client = KeepAliveClient::new(admin).with_timeout(SOON);
        match client.get("/ready").await.map(|r| r.status) {
            Ok(200) => {}
            other => failed.push(other),
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
            _ = stop.changed() => {}
        }
    }
    (sent, failed)
}

/// One run of the upgrade-under-load scenario; panics on a broken upgrade, returns the
/// clients' outcomes.
async fn upgrades_under_load(upgrades: u32, duration: Duration) -> RoundReport {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let mut gw = Gateway::start(Setup {
        routes: vec![("/", up.addr())],
        ..Setup::default()
    })
    .await;
    let pid_file = gw.pid_file();
    assert_eq!(read_pid_file(&pid_file), Some(gw.proc.pid()));

    // Bounded in count too, at over ten times what a round sends in `duration`
    // (about 36,000 in 15 s here); running out before the last upgrade fails the
    // "requests served after it" check below rather than passing quietly.
    let load = |connections, think_time| LoadConfig {
        connections,
        max_duration: duration + Duration::from_secs(30),
        max_requests: 500_000,
        request_timeout: SOON,
        think_time,
    };
    let busy = Load::spawn(gw.listen, load(40, Duration::ZERO), get_or_post);
    // Idle for less than keepalive_min_idle (1 s) at a time: a drain must serve their
    // next request (with `Connection: close`), not close under them.
    let paced = Load::spawn(gw.listen, load(10, Duration::from_millis(250)), get_or_post);
    assert!(
        busy.wait_for_completed(500, SOON).await,
        "the load got going"
    );
    // The admin socket is handed on too: /ready must answer 200 throughout.
    let (stop_probes, stopped) = watch::channel(false);
    let prober = tokio::spawn(probe_ready(gw.admin, stopped));

    let started = Instant::now();
    let mut current = gw.proc.pid();
    for i in 1..=upgrades {
        // Spread the upgrades over the run, the last one well before its end.
        tokio::time::sleep_until(started + duration * i / (upgrades + 2)).await;
        sys::send_signal(current, sys::SIGUSR2).expect("SIGUSR2");
        let mut new = None;
        let rewritten = wait_until(SOON * 2, || {
            new = read_pid_file(&pid_file).filter(|p| *p != current);
            new.is_some()
        })
        .await;
        let Some(new) = new.filter(|_| rewritten) else {
            panic!(
                "upgrade {i}: the PID file still says {current}; logs:\n{}",
                gw.proc.logs()
            )
        };
        gw.adopt(new);
        gw.wait_for_log(&format!(
            "new binary is ready; draining this one pid={new}\n"
        ))
        .await;
        let exited = if current == gw.proc.pid() {
            let status = gw.proc.wait_exit(SOON * 2).await;
            assert!(
                status.is_none_or(|s| s.success()),
                "upgrade {i}: the old process failed: {status:?}"
            );
            status.is_some()
        } else {
            wait_until(SOON * 2, || !sys::is_running(current)).await
        };
        assert!(
            exited,
            "upgrade {i}: old process {current} is still running; logs:\n{}",
            gw.proc.logs()
        );
        assert!(sys::is_running(new), "upgrade {i}: new process {new} died");
        assert_eq!(read_pid_file(&pid_file), Some(new), "upgrade {i}");
        let done = busy.completed();
        assert!(
            busy.wait_for_completed(done + 200, SOON).await,
            "upgrade {i}: no requests served after it"
        );
        current = new;
    }
    assert_eq!(
        gw.count_in_logs("drained: no connection left open"),
        upgrades as usize
    );
    assert_eq!(gw.count_in_logs("cutting them"), 0, "{}", gw.proc.logs());
    // The load runs for the whole `duration`, past the last upgrade: the run's length
    // is the scenario.
    tokio::time::sleep_until(started + duration).await;
    let _ = stop_probes.send(true);
    let (probes_sent, probes) = prober.await.expect("prober");
    let report = RoundReport {
        busy: busy.stop().await,
        paced: paced.stop().await,
        probes,
        probes_sent,
    };

    // The last generation drains on SIGTERM and removes its PID file.
    sys::send_signal(current, sys::SIGTERM).expect("SIGTERM");
    assert!(
        wait_until(SOON, || !sys::is_running(current)).await,
        "the last generation did not exit"
    );
    assert!(
        wait_until(SOON, || !pid_file.exists()).await,
        "the PID file was left behind"
    );
    report
}

/// A successor that cannot take over (its config became invalid, the binary at our
/// path exits at once, or it never says ready) leaves the old process serving, with the
/// PID file unchanged and the reason logged; no half-started successor is left running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_upgrade_leaves_the_old_process_serving() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let (_bin_dir, binary) = replaceable_binary();
    let mut gw = Gateway::start(Setup {
        routes: vec![("/", up.addr())],
        extra: "[upgrade]\nready_timeout = \"2s\"\n",
        binary: Some(binary.clone()),
        ..Setup::default()
    })
    .await;
    let pid = gw.proc.pid();
    let good_config = std::fs::read_to_string(gw.config_path()).expect("read config");

    let mut kept = KeepAliveClient::new(gw.listen);
    assert!(kept.get("/before").await.expect("served").is_success());

    // 1. The config the successor would read is garbage: it exits (64) before ready.
    gw.rewrite_config("listener = [ garbage\n");
    gw.signal(sys::SIGUSR2);
    gw.wait_for_log("upgrade failed").await;
    assert!(
        gw.proc
            .logs()
            .contains("exited before it was ready (exit status: 64)"),
        "{}",
        gw.proc.logs()
    );
    gw.rewrite_config(&good_config);
    assert_still_serving(&mut gw, &mut kept, pid, 1).await;

    // 2. The binary at our path now exits at once.
    replace_file(&binary, "#!/bin/sh\nexit 3\n");
    gw.signal(sys::SIGUSR2);
    assert!(
        gw.proc.wait_for_log("exit status: 3", SOON).await,
        "{}",
        gw.proc.logs()
    );
    assert_still_serving(&mut gw, &mut kept, pid, 2).await;

    // 3. The binary at our path starts and never says ready: killed after ready_timeout.
    replace_file(&binary, "#!/bin/sh\nexec sleep 60\n");
    gw.signal(sys::SIGUSR2);
    assert!(
        gw.proc.wait_for_log("not ready within", SOON).await,
        "{}",
        gw.proc.logs()
    );
    assert_still_serving(&mut gw, &mut kept, pid, 3).await;

    gw.signal(sys::SIGTERM);
    let status = gw.proc.wait_exit(SOON).await.expect("exits");
    assert!(status.success(), "{status}");
}

/// SIGTERM while a new binary is starting (one that never says ready, with a
/// ready_timeout longer than the test) is not held up behind it: the successor is
/// stopped, and this process drains and exits at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_an_upgrade_stops_the_successor_and_drains() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let (_bin_dir, binary) = replaceable_binary();
    let mut gw = Gateway::start(Setup {
        routes: vec![("/", up.addr())],
        extra: "[upgrade]\nready_timeout = \"60s\"\n",
        binary: Some(binary.clone()),
        ..Setup::default()
    })
    .await;
    replace_file(&binary, "#!/bin/sh\nexec sleep 60\n");
    gw.signal(sys::SIGUSR2);
    gw.wait_for_log("SIGUSR2: starting the new binary").await;
    gw.signal(sys::SIGTERM);
    let status = gw
        .proc
        .wait_exit(SOON)
        .await
        .unwrap_or_else(|| panic!("still waiting for the successor\n{}", gw.proc.logs()));
    let logs = gw.proc.logs();
    assert!(status.success(), "{status}\n{logs}");
    assert!(
        logs.contains("SIGTERM while the new binary was starting"),
        "{logs}"
    );
    let successor = stopped_successor_pid(&logs);
    gw.adopt(successor);
    assert!(
        !sys::is_running(successor),
        "the successor was left running"
    );
}

/// The successor of an upgrade that a stop signal interrupts may have said ready a
/// moment before, and taken connections from the shared sockets: it is asked to stop
/// with SIGTERM (it drains what it took), not killed. Here a script notes the SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_stopped_as_it_starts_gets_sigterm_not_sigkill() {
    let (_gw, _successor, dir) = stop_during_upgrade("60s", |dir| {
        format!(
            "trap 'kill $child; echo term > {}/terminated; exit 0' TERM\nsleep 60 &\nchild=$!\n\
             echo > {}/armed\nwait $child\n",
            dir.display(),
            dir.display()
        )
    })
    .await;
    let marker = dir.path().join("terminated");
    assert!(
        wait_until(SOON, || marker.exists()).await,
        "the successor never got SIGTERM"
    );
}

/// A successor told to stop that does not act on SIGTERM (stuck in its start; here a
/// script ignoring it) is killed once its `ready_timeout` is up, and this process
/// exits then: it is never left holding our sockets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_deaf_to_sigterm_is_killed_at_its_ready_timeout() {
    let (_gw, successor, _dir) = stop_during_upgrade("2s", |dir| {
        format!(
            "trap '' TERM\necho > {}/armed\nexec sleep 60\n",
            dir.display()
        )
    })
    .await;
    assert!(
        wait_until(SOON, || !sys::is_running(successor)).await,
        "the successor was left running"
    );
}

/// SIGUSR2 with the binary replaced by a shell script (`script(dir)`, which touches
/// `dir/armed` once its signal handling is set), then SIGTERM once it is: returns
/// the exited gateway, the successor's PID (adopted, so stopped at the end) and the
/// script's folder.
async fn stop_during_upgrade(
    ready_timeout: &str,
    script: impl FnOnce(&Path) -> String,
) -> (Gateway, u32, holdfast_test::TempDir) {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let (dir, binary) = replaceable_binary();
    let extra = format!("[upgrade]\nready_timeout = \"{ready_timeout}\"\n");
    let mut gw = Gateway::start(Setup {
        routes: vec![("/", up.addr())],
        extra: &extra,
        binary: Some(binary.clone()),
        ..Setup::default()
    })
    .await;
    replace_file(&binary, &format!("#!/bin/sh\n{}", script(dir.path())));
    gw.signal(sys::SIGUSR2);
    // Before its handling is set, a SIGTERM would end the shell by default.
    let armed = dir.path().join("armed");
    assert!(
        wait_until(SOON, || armed.exists()).await,
        "the successor did not start"
    );
    gw.signal(sys::SIGTERM);
    let status = gw
        .proc
        .wait_exit(SOON)
        .await
        .unwrap_or_else(|| panic!("still waiting for the successor\n{}", gw.proc.logs()));
    assert!(status.success(), "{status}\n{}", gw.proc.logs());
    let successor = stopped_successor_pid(&gw.proc.logs());
    gw.adopt(successor);
    (gw, successor, dir)
}

/// The successor's PID, from the line that says a stop signal interrupted its start.
fn stopped_successor_pid(logs: &str) -> u32 {
    let line = logs
        .lines()
        .find(|l| l.contains("while the new binary was starting"))
        .unwrap_or_else(|| panic!("no log line about it\n{logs}"));
    line.split("pid=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line}"))
}

/// A successor adopts only a socket that listens on the configured address: a stale
/// descriptor number in the hand-off (here stdin, /dev/null) is ignored with a warning,
/// not accepted on, and the address is bound afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inherited_descriptor_that_is_not_a_listener_is_not_adopted() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let mut gw = Gateway::start(Setup {
        routes: vec![("/", up.addr())],
        env: vec![("HOLDFAST_LISTEN_FDS", "{listen}=0;")],
        ..Setup::default()
    })
    .await;
    assert!(
        gw.proc
            .logs()
            .contains("inherited fd is not a socket listening on that address"),
        "{}",
        gw.proc.logs()
    );
    gw.assert_serves("/").await;
    gw.signal(sys::SIGTERM);
    let status = gw.proc.wait_exit(SOON).await.expect("exits");
    assert!(status.success(), "{status}");
}

/// A successor that cannot write the PID file does not start: the upgrade fails and
/// this process goes on serving. Started, it would leave the file naming this
/// process, which removes it as it exits, and nothing would find the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_that_cannot_write_the_pid_file_fails_the_upgrade() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let mut gw = Gateway::start(Setup {
        routes: vec![("/", up.addr())],
        ..Setup::default()
    })
    .await;
    let pid = gw.proc.pid();
    let pid_file = gw.pid_file();
    // A directory where the file goes: no rename replaces it, root or not.
    std::fs::remove_file(&pid_file).expect("remove the PID file");
    std::fs::create_dir(&pid_file).expect("a directory in its place");
    gw.signal(sys::SIGUSR2);
    gw.wait_for_log("upgrade failed").await;
    assert!(
        gw.proc
            .logs()
            .contains("cannot write pid file; not starting"),
        "{}",
        gw.proc.logs()
    );
    assert!(gw.proc.exited().is_none(), "{}", gw.proc.logs());
    gw.assert_serves("/").await;
    let gone = wait_until(SOON, || sys::children_of(pid).is_empty()).await;
    assert!(gone, "the failed successor is still running");
}

/// A PID file that cannot be written stops holdfast at start, with the reason.
#[tokio::test]
async fn a_pid_file_that_cannot_be_written_stops_the_start() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let toml = config_toml(free_addr(), free_addr(), &[("/", up.addr())], "");
    let mut proc = HoldfastProcess::spawn_with_env(
        Path::new(BIN),
        &["run", "--pid-file", "{dir}/no-such-dir/holdfast.pid"],
        Some(&toml),
        &[("NO_COLOR", "1")],
    );
    let status = proc.wait_exit(START).await.expect("exits");
    assert_eq!(status.code(), Some(1), "{}", proc.logs());
    assert!(
        proc.logs().contains("cannot write pid file; not starting"),
        "{}",
        proc.logs()
    );
}

/// The old process still answers on a kept connection and a new one, still owns the PID
/// file, and has no successor left running.
async fn assert_still_serving(
    gw: &mut Gateway,
    kept: &mut KeepAliveClient,
    pid: u32,
    failures: usize,
) {
    assert_eq!(
        gw.count_in_logs("upgrade failed"),
        failures,
        "{}",
        gw.proc.logs()
    );
    assert!(gw.proc.exited().is_none(), "{}", gw.proc.logs());
    let resp = kept
        .get("/kept")
        .await
        .expect("the kept connection is served");
    assert!(resp.is_success() && !has_connection_close(&resp));
    gw.assert_serves("/new").await;
    assert_eq!(admin_status(gw.admin, "/ready").await, Some(200));
    assert_eq!(read_pid_file(&gw.pid_file()), Some(pid));
    let gone = wait_until(SOON, || sys::children_of(pid).is_empty()).await;
    assert!(
        gone,
        "a failed successor is still running: {:?}",
        sys::children_of(pid)
    );
}

/// Replaces `path` with an executable script by rename, so a hard link's other name (the
/// real binary) is untouched.
/// A link to (or copy of) the binary in a new directory, so a test can replace the
/// file at "holdfast's path" that SIGUSR2 starts; the directory lives as long as the
/// returned guard.
fn replaceable_binary() -> (holdfast_test::TempDir, PathBuf) {
    let dir = holdfast_test::tempdir();
    let binary = dir.path().join("holdfast");
    if std::fs::hard_link(BIN, &binary).is_err() {
        std::fs::copy(BIN, &binary).expect("copy the binary");
    }
    (dir, binary)
}

fn replace_file(path: &Path, script: &str) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, script).expect("write script");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::rename(&tmp, path).expect("replace the binary");
}

// === reload and upgrade: operator signals, accept queue, durations ===

/// README: "second SIGINT: exit at once". During `drain.pre_delay`, any other control
/// message (here the Drain of a SIGTERM; a SIGHUP is ignored before it reaches the
/// server) must not make the server deaf to the Exit that follows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_sigint_exits_at_once_after_a_sighup_during_pre_delay() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let mut gw = Gateway::start(Setup {
        routes: vec![("/", up.addr())],
        extra: "[drain]\npre_delay = \"30s\"\n",
        ..Setup::default()
    })
    .await;
    gw.signal(sys::SIGINT);
    gw.wait_for_log("SIGINT: draining").await;
    assert!(
        wait_until_async(SOON, || async { !ready_status(gw.admin).await }).await,
        "the drain started (/ready fails)"
    );
    gw.signal(sys::SIGHUP);
    gw.wait_for_log("SIGHUP ignored").await;
    gw.signal(sys::SIGTERM);
    gw.wait_for_log("SIGTERM: draining").await;
    let second = Instant::now();
    gw.signal(sys::SIGINT);
    gw.wait_for_log("second SIGINT: exiting at once").await;
    let status = gw.proc.wait_exit(SOON).await;
    let took = second.elapsed();
    assert!(
        status.is_some() && took <= SLACK,
        "second SIGINT took {took:?} (status {status:?}); logs:\n{}",
        gw.proc.logs()
    );
}

/// README: "A `SIGHUP` to a process that is already draining is logged and ignored."
/// Its config file is not read then: a bad one is not reported as a rejected config,
/// nor counted in `holdfast_reload_failures_total`, which `/metrics` still shows
/// during `drain.pre_delay`. Before, the draining process read and checked the file,
/// logged "config rejected" and counted a failed reload it never meant to apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_while_draining_reads_nothing_and_counts_no_failed_reload() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let mut gw = Gateway::start(Setup {
        routes: vec![("/", up.addr())],
        extra: "[drain]\npre_delay = \"30s\"\n",
        ..Setup::default()
    })
    .await;
    gw.signal(sys::SIGTERM);
    gw.wait_for_log("SIGTERM: draining").await;
    assert!(
        wait_until_async(SOON, || async { !ready_status(gw.admin).await }).await,
        "the drain started (/ready fails)"
    );
    gw.rewrite_config("this is not a config");
    gw.signal(sys::SIGHUP);
    // "SIGHUP ignored", or (before) the rejected file's errors.
    gw.wait_for_log("SIGHUP").await;
    let metrics = KeepAliveClient::new(gw.admin)
        .with_timeout(SOON)
        .get("/metrics")
        .await
        .expect("GET /metrics during pre_delay");
    let text = metrics.text();
    let failures = text
        .lines()
        .find(|l| l.starts_with("holdfast_reload_failures_total"))
        .unwrap_or_default();
    assert!(
        failures.ends_with(" 0"),
        "{failures:?}; logs:\n{}",
        gw.proc.logs()
    );
    assert_eq!(gw.count_in_logs("config rejected"), 0, "{}", gw.proc.logs());
    gw.wait_for_log("SIGHUP ignored: this process is draining")
        .await;
    // Two, one at a time (a signal sent twice before it is taken is taken once).
    gw.signal(sys::SIGINT);
    gw.wait_for_log("SIGINT: draining").await;
    gw.signal(sys::SIGINT);
    assert!(
        gw.proc.wait_exit(SOON).await.is_some(),
        "{}",
        gw.proc.logs()
    );
}

/// README: SIGHUP applies new "settings"; `upgrade.ready_timeout` is one, and the
/// next SIGUSR2 must use the reloaded value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloaded_upgrade_ready_timeout_applies_to_the_next_upgrade() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let (_bin_dir, binary) = replaceable_binary();
    let mut gw = Gateway::start(Setup {
        routes: vec![("/", up.addr())],
        extra: "[upgrade]\nready_timeout = \"60s\"\n",
        binary: Some(binary.clone()),
        ..Setup::default()
    })
    .await;
    let toml = gw.config_with(&[("/", up.addr())], "[upgrade]\nready_timeout = \"1s\"\n");
    gw.reload_with(&toml).await;
    replace_file(&binary, "#!/bin/sh\nexec sleep 60\n");
    gw.signal(sys::SIGUSR2);
    gw.wait_for_log("SIGUSR2: starting the new binary").await;
    assert!(
        gw.proc.wait_for_log("not ready within 1s", SOON).await,
        "the reloaded ready_timeout (1s) was not used; logs:\n{}",
        gw.proc.logs()
    );
}

/// README: SIGHUP applies new "settings" to new requests; `log.access_log` turned on
/// by a reload must log the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloaded_access_log_setting_applies_to_new_requests() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let mut gw = Gateway::start(Setup {
        routes: vec![("/", up.addr())],
        ..Setup::default()
    })
    .await;
    gw.assert_serves("/before-reload").await;
    let on = gw
        .config_with(&[("/", up.addr())], "")
        .replace("access_log = false", "access_log = true");
    let toml = on;
    gw.reload_with(&toml).await;
    gw.assert_serves("/after-reload").await;
    assert!(
        gw.proc.wait_for_log("path=/after-reload", SOON).await,
        "no access line after access_log = true was reloaded; logs:\n{}",
        gw.proc.logs()
    );
}

/// A client waiting in the kernel's accept queue (the listener is at
/// `max_connections`, which the README says makes clients wait rather than be
/// refused) has sent its request; a drain must not reset it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_does_not_reset_a_client_waiting_in_the_accept_queue() {
    let slow = TestUpstream::start(Behaviour::Delay(Duration::from_secs(2))).await;
    let mut gw = Gateway::start(Setup {
        routes: vec![("/", slow.addr())],
        listener: "max_connections = 1",
        ..Setup::default()
    })
    .await;
    let addr = gw.listen;
    let first = tokio::spawn(async move {
        let mut client = KeepAliveClient::new(addr).with_timeout(SOON);
        client.get("/holds-the-only-slot").await
    });
    slow.wait_for_requests(1, SOON)
        .await
        .expect("the first request reached the upstream");
    // Connected by the kernel, waiting to be accepted; its request is sent.
    let mut queued = holdfast_test::RawClient::connect(addr)
        .await
        .expect("connect");
    queued
        .send_request(&ClientRequest::get("/queued"))
        .await
        .expect("send");
    gw.signal(sys::SIGTERM);
    gw.wait_for_log(STOPPED_ACCEPTING).await;
    let first = first.await.expect("client task").expect("first request");
    assert_eq!(first.status, 200);
    let second = queued.read_response(SOON).await;
    assert!(
        second.as_ref().is_ok_and(|r| r.status == 200),
        "the queued client's request was lost: {second:?}; logs:\n{}",
        gw.proc.logs()
    );
    let _ = gw.proc.wait_exit(SOON).await;
}

/// A duration past what `Instant` can hold is accepted by `holdfast check` today and
/// panics where it is added to a clock reading: `upgrade.ready_timeout` on SIGUSR2
/// (the signal task dies, the process drains and exits 0, the successor is left
/// running unwatched), `timeouts.response_headers` on every request (the client
/// connection is dropped). The config must be rejected up front.
#[test]
fn durations_too_long_for_the_clock_are_rejected() {
    let dir = holdfast_test::tempdir();
    let path = dir.path().join("huge.toml");
    for (extra, upstream_extra) in [
        ("[upgrade]\nready_timeout = \"300000000000y\"\n", ""),
        (
            "",
            "\n[upstream.u0.timeouts]\nresponse_headers = \"300000000000y\"\n",
        ),
    ] {
        let toml = config_toml(
            free_addr(),
            free_addr(),
            &[("/", "127.0.0.1:9".parse().unwrap())],
            extra,
        ) + upstream_extra;
        std::fs::write(&path, &toml).unwrap();
        let out = std::process::Command::new(BIN)
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .expect("run holdfast check");
        assert!(
            !out.status.success(),
            "accepted a duration that overflows Instant:\n{toml}"
        );
    }
}

/// `workers = 100000` would have the runtime start that many threads before serving
/// anything (gigabytes of stacks, or a panic once the system refuses one): `check`
/// refuses it, naming the key and the bound, as `run` does. The bound itself, 1024,
/// is allowed (README), and one more is not.
#[test]
fn a_worker_count_no_machine_needs_is_refused() {
    let dir = holdfast_test::tempdir();
    let path = dir.path().join("workers.toml");
    let toml = config_toml(
        free_addr(),
        free_addr(),
        &[("/", "127.0.0.1:9".parse().unwrap())],
        "",
    );
    for (workers, allowed) in [(1024, true), (1025, false), (100_000, false)] {
        std::fs::write(&path, format!("workers = {workers}\n{toml}")).unwrap();
        let out = std::process::Command::new(BIN)
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .expect("run holdfast check");
        let err = String::from_utf8_lossy(&out.stderr);
        if allowed {
            assert!(out.status.success(), "refused workers = {workers}: {err}");
            continue;
        }
        assert_eq!(
            out.status.code(),
            Some(1),
            "accepted workers = {workers}: {err}"
        );
        assert!(
            err.contains("workers") && err.contains("more than 1024"),
            "{err}"
        );
    }
}

/// README: after an upgrade "every admin answer also says `Connection: close`, so a
/// keep-alive checker reconnects ... to the new process". A checker's kept admin
/// connection to the old process, still draining a slow request, must be told to
/// reconnect rather than go on asking a process that is about to exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_upgrade_a_kept_admin_connection_is_told_to_reconnect() {
    let slow = TestUpstream::start(Behaviour::Delay(Duration::from_secs(3))).await;
    let mut gw = Gateway::start(Setup {
        routes: vec![("/", slow.addr())],
        ..Setup::default()
    })
    .await;
    let old = gw.proc.pid();
    let mut checker = KeepAliveClient::new(gw.admin).with_timeout(SOON);
    let before = checker.get("/ready").await.expect("GET /ready");
    assert!(before.status == 200 && !has_connection_close(&before));
    // A slow request keeps the old process draining after the hand-over.
    let addr = gw.listen;
    let in_flight = tokio::spawn(async move {
        KeepAliveClient::new(addr)
            .with_timeout(SOON)
            .get("/slow")
            .await
    });
    slow.wait_for_requests(1, SOON)
        .await
        .expect("the slow request reached the upstream");

    gw.signal(sys::SIGUSR2);
    // Logged once the old process has taken the hand-over in.
    gw.wait_for_log("draining open=1").await;
    let pid_file = gw.pid_file();
    let new = read_pid_file(&pid_file).filter(|p| *p != old);
    let new = new.unwrap_or_else(|| panic!("no successor in the PID file\n{}", gw.proc.logs()));
    gw.adopt(new);

    let after = checker
        .get("/ready")
        .await
        .expect("GET /ready after the upgrade");
    assert!(
        gw.proc.exited().is_none(),
        "the old process answered while still draining"
    );
    assert_eq!(
        after.status, 200,
        "the service is ready: the successor serves"
    );
    assert!(
        has_connection_close(&after),
        "the old process's admin answer after the hand-over keeps the checker: {:?}\n{}",
        after.headers,
        gw.proc.logs()
    );
    let served = in_flight.await.expect("client task").expect("slow request");
    assert_eq!(served.status, 200);
    assert!(gw.proc.wait_exit(SOON).await.is_some_and(|s| s.success()));
    // The checker's next request reaches the successor.
    assert_eq!(checker.get("/ready").await.expect("GET /ready").status, 200);
    sys::send_signal(new, sys::SIGTERM).expect("SIGTERM");
    assert!(wait_until(SOON, || !sys::is_running(new)).await);
}

/// A listener and the admin socket may both be configured on port 0 (any free port;
/// `check` accepts it). An upgrade must hand each socket to its own role: the client
/// listener must go on serving on its port and the admin one on its own, neither closed
/// nor swapped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_keeps_each_port_0_socket_in_its_role() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let toml = format!(
        "[log]\naccess_log = false\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [[listener]]\nlisten = \"127.0.0.1:0\"\n\n[[route]]\npath = \"/\"\nupstream = \"u0\"\n\n\
         [upstream.u0]\naddresses = [\"http://{}\"]\n",
        up.addr()
    );
    let mut proc = HoldfastProcess::spawn_with_env(
        Path::new(BIN),
        &["run", "--pid-file", "{dir}/holdfast.pid"],
        Some(&toml),
        &[("NO_COLOR", "1")],
    );
    let old = proc.pid();
    assert!(
        proc.wait_for_log("admin listening", SOON).await,
        "{}",
        proc.logs()
    );
    let addr_after = |logs: &str, needle: &str| -> SocketAddr {
        logs.lines()
            .find(|l| l.contains(needle))
            .and_then(|l| l.split("addr=").nth(1))
            .and_then(|a| a.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no {needle:?} line with an address:\n{logs}"))
    };
    let logs = proc.logs();
    let listen = addr_after(&logs, " listening addr=");
    let admin = addr_after(&logs, "admin listening addr=");
    assert_ne!(listen, admin);
    assert!(
        KeepAliveClient::new(listen)
            .get("/")
            .await
            .expect("GET /")
            .is_success()
    );
    assert!(ready_status(admin).await);

    proc.signal(sys::SIGUSR2).expect("SIGUSR2");
    assert!(
        proc.wait_for_log("new binary is ready", SOON).await,
        "{}",
        proc.logs()
    );
    let new = read_pid_file(&proc.dir().join("holdfast.pid")).filter(|p| *p != old);
    let new = new.unwrap_or_else(|| panic!("no successor in the PID file\n{}", proc.logs()));
    proc.kill_on_drop(new);
    assert!(proc.wait_exit(SOON).await.is_some(), "{}", proc.logs());

    let resp = KeepAliveClient::new(listen)
        .with_timeout(SOON)
        .get("/")
        .await;
    assert!(
        resp.as_ref().is_ok_and(Response::is_success),
        "the client listener after the upgrade: {resp:?}\n{}",
        proc.logs()
    );
    assert!(
        ready_status(admin).await,
        "the admin socket after the upgrade\n{}",
        proc.logs()
    );
    sys::send_signal(new, sys::SIGTERM).expect("SIGTERM");
    assert!(wait_until(SOON, || !sys::is_running(new)).await);
}

/// Listener changes take effect on an upgrade (README), so removing a listener is done
/// with one. A client waiting in the removed listener's accept queue (the listener is
/// at `max_connections`) has sent its request; the hand-over must not reset it: the
/// successor closed its copy of that socket, so the old process is the last holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_that_removes_a_listener_does_not_reset_its_queued_client() {
    let slow = TestUpstream::start(Behaviour::Delay(Duration::from_secs(2))).await;
    let removed = free_addr();
    let extra = format!("[[listener]]\nlisten = \"{removed}\"\nmax_connections = 1\n");
    let mut gw = Gateway::start(Setup {
        routes: vec![("/", slow.addr())],
        extra: &extra,
        ..Setup::default()
    })
    .await;
    let old = gw.proc.pid();
    let first = tokio::spawn(async move {
        let mut client = KeepAliveClient::new(removed).with_timeout(SOON);
        client.get("/holds-the-only-slot").await
    });
    slow.wait_for_requests(1, SOON)
        .await
        .expect("the first request reached the upstream");
    // Connected by the kernel, waiting to be accepted; its request is sent.
    let mut queued = holdfast_test::RawClient::connect(removed)
        .await
        .expect("connect");
    queued
        .send_request(&ClientRequest::get("/queued"))
        .await
        .expect("send");

    gw.rewrite_config(&gw.config_with(&[("/", slow.addr())], ""));
    gw.signal(sys::SIGUSR2);
    gw.wait_for_log("draining open=").await;
    let new = read_pid_file(&gw.pid_file()).filter(|p| *p != old);
    let new = new.unwrap_or_else(|| panic!("no successor in the PID file\n{}", gw.proc.logs()));
    gw.adopt(new);

    let first = first.await.expect("client task").expect("first request");
    assert_eq!(first.status, 200);
    let second = queued.read_response(SOON).await;
    assert!(
        second.is_ok(),
        "the queued client's request was lost: {second:?}; logs:\n{}",
        gw.proc.logs()
    );
    assert!(gw.proc.wait_exit(SOON).await.is_some_and(|s| s.success()));
    gw.assert_serves("/after").await;
    sys::send_signal(new, sys::SIGTERM).expect("SIGTERM");
    assert!(wait_until(SOON, || !sys::is_running(new)).await);
}

/// A systemd notify socket (`NOTIFY_SOCKET`) made by the test, whose queue it can fill
/// so that the next process to notify waits in `sd_notify`: a new binary held between
/// writing the PID file and saying ready.
struct NotifySocket {
    _dir: holdfast_test::TempDir,
    path: PathBuf,
    socket: tokio::net::UnixDatagram,
}

impl NotifySocket {
    fn bind() -> NotifySocket {
        let dir = holdfast_test::tempdir();
        let path = dir.path().join("notify");
        let socket = tokio::net::UnixDatagram::bind(&path).expect("bind the notify socket");
        NotifySocket {
            _dir: dir,
            path,
            socket,
        }
    }

    /// The next message, within `SOON`.
    async fn recv(&self) -> String {
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(SOON, self.socket.recv(&mut buf))
            .await
            .expect("a notify message")
            .expect("recv");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Fills the socket's queue: the next `sd_notify` blocks until [`Self::empty`].
    fn fill(&self) {
        let sender = std::os::unix::net::UnixDatagram::unbound().expect("socket");
        sender.set_nonblocking(true).expect("non-blocking");
        // The kernel queues `net.unix.max_dgram_qlen` (10 by default) datagrams.
        for sent in 0..100_000 {
            match sender.send_to(b"X_TEST=1\n", &self.path) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && sent > 0 => return,
                Err(e) => panic!("filling the notify socket: {e}"),
            }
        }
        panic!("the notify socket's queue never filled");
    }

    /// Takes every message queued; returns how many.
    fn empty(&self) -> usize {
        let mut buf = [0u8; 512];
        let mut n = 0;
        // Bounded: at most what `fill` queued, and whatever holdfast sends meanwhile.
        while n < 100_000 && self.socket.try_recv(&mut buf).is_ok() {
            n += 1;
        }
        n
    }
}

/// systemd's `ExecReload` signals `$MAINPID`, which names the old process until the
/// new one's notice arrives: a SIGHUP sent after a config edit, while the new binary
/// is starting, reaches the old process, and the new one may have read the file before
/// the edit. The reload applies to the old process at once (the upgrade may yet
/// fail), and is passed on to the new one once it serves. Before, the old process read
/// the SIGHUP only after the hand-over and ignored it as draining: the new process ran
/// the config from before the edit, and nothing said so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_while_the_new_binary_starts_reaches_it_once_it_serves() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let notify = NotifySocket::bind();
    let notify_path = notify.path.display().to_string();
    let mut gw = Gateway::start(Setup {
        routes: vec![("/a", up.addr())],
        env: vec![("NOTIFY_SOCKET", &notify_path)],
        ..Setup::default()
    })
    .await;
    let old = gw.proc.pid();
    assert!(notify.recv().await.contains(&format!("MAINPID={old}")));
    assert_eq!(status_of(gw.listen, "/b").await, Some(404), "no route yet");

    // The new process reads its config, writes the PID file, then waits to notify.
    notify.fill();
    gw.signal(sys::SIGUSR2);
    let mut new = None;
    let started = wait_until(SOON, || {
        new = read_pid_file(&gw.pid_file()).filter(|p| *p != old);
        new.is_some()
    })
    .await;
    let new = new
        .filter(|_| started)
        .unwrap_or_else(|| panic!("no new process in the PID file\n{}", gw.proc.logs()));
    gw.adopt(new);

    // The operator adds a route and reloads the process systemd knows of.
    let toml = gw.config_with(&[("/a", up.addr()), ("/b", up.addr())], "");
    gw.rewrite_config(&toml);
    gw.signal(sys::SIGHUP);
    gw.wait_for_log("config reloaded").await;
    // Only the old process accepts yet: it serves the new route.
    assert_eq!(status_of(gw.listen, "/b").await, Some(200));

    notify.empty();
    gw.wait_for_log("new binary is ready").await;
    let status = gw.proc.wait_exit(SOON).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        gw.proc.logs()
    );
    // Only the new process serves now.
    assert_eq!(
        status_of(gw.listen, "/b").await,
        Some(200),
        "the new process does not have the reloaded route\n{}",
        gw.proc.logs()
    );
    sys::send_signal(new, sys::SIGTERM).expect("SIGTERM");
    assert!(wait_until(SOON, || !sys::is_running(new)).await);
}

/// A script that read the PID file a moment before the new process rewrote it sends
/// its SIGHUP to the old one, draining after the hand-over: it is passed on to the new
/// process, which serves. Before, the old process logged it and ignored it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_to_the_old_process_after_a_hand_over_reaches_the_new_one() {
    let slow = TestUpstream::start(Behaviour::Delay(Duration::from_secs(3))).await;
    let mut gw = Gateway::start(Setup {
        routes: vec![("/a", slow.addr())],
        ..Setup::default()
    })
    .await;
    let old = gw.proc.pid();
    // A slow request keeps the old process draining after the hand-over.
    let addr = gw.listen;
    let in_flight = tokio::spawn(async move { status_of(addr, "/a/slow").await });
    slow.wait_for_requests(1, SOON)
        .await
        .expect("the slow request reached the upstream");
    gw.signal(sys::SIGUSR2);
    gw.wait_for_log("draining open=1").await;
    let new = read_pid_file(&gw.pid_file()).filter(|p| *p != old);
    let new = new.unwrap_or_else(|| panic!("no successor in the PID file\n{}", gw.proc.logs()));
    gw.adopt(new);

    gw.rewrite_config(&gw.config_with(&[("/a", slow.addr()), ("/b", slow.addr())], ""));
    gw.signal(sys::SIGHUP);
    gw.wait_for_log("config reloaded").await;
    assert!(
        gw.proc.exited().is_none(),
        "the old process is still draining"
    );
    assert_eq!(
        status_of(gw.listen, "/b").await,
        Some(200),
        "the new process does not have the reloaded route\n{}",
        gw.proc.logs()
    );
    assert_eq!(in_flight.await.expect("client task"), Some(200));
    assert!(gw.proc.wait_exit(SOON).await.is_some_and(|s| s.success()));
    sys::send_signal(new, sys::SIGTERM).expect("SIGTERM");
    assert!(wait_until(SOON, || !sys::is_running(new)).await);
}

/// A new binary that is killed after it named itself the service (wrote the PID file;
/// here held there by a full notify socket until its `ready_timeout` is up) leaves
/// the old process serving, and the old process names itself again: in the PID file,
/// so a script that reads it finds a live holdfast, and to systemd (`MAINPID`), which
/// may have taken the new one's notice. Before, the PID file named the killed process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_upgrade_leaves_the_pid_file_naming_the_old_process() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let notify = NotifySocket::bind();
    let notify_path = notify.path.display().to_string();
    let mut gw = Gateway::start(Setup {
        routes: vec![("/", up.addr())],
        extra: "[upgrade]\nready_timeout = \"5s\"\n",
        env: vec![("NOTIFY_SOCKET", &notify_path)],
        ..Setup::default()
    })
    .await;
    let old = gw.proc.pid();
    let main_pid = format!("MAINPID={old}\n");
    assert!(notify.recv().await.contains(&main_pid));

    notify.fill();
    gw.signal(sys::SIGUSR2);
    let pid_file = gw.pid_file();
    let mut new = None;
    let named_itself = wait_until(SOON, || {
        new = read_pid_file(&pid_file).filter(|p| *p != old);
        new.is_some()
    })
    .await;
    assert!(
        named_itself,
        "the new process did not write the PID file\n{}",
        gw.proc.logs()
    );
    if let Some(new) = new {
        gw.adopt(new);
    }
    gw.wait_for_log("not ready within 5s").await;
    assert!(gw.proc.exited().is_none(), "{}", gw.proc.logs());
    let named = wait_until(SOON, || read_pid_file(&pid_file) == Some(old)).await;
    assert!(
        named,
        "the PID file names {:?}, not the serving process {old}\n{}",
        read_pid_file(&pid_file),
        gw.proc.logs()
    );
    gw.assert_serves("/").await;

    // Each message taken makes room for the next; the test's fill comes first.
    let mut told = false;
    for _ in 0..100 {
        if notify.recv().await.contains(&main_pid) {
            told = true;
            break;
        }
    }
    assert!(
        told,
        "systemd was not told the old process is the main one again"
    );
}

/// README: "second SIGINT: exit at once". A first SIGINT while a new binary starts
/// stops it with SIGTERM and drains; one deaf to SIGTERM (stuck in its start; here a
/// script) would be killed at its `ready_timeout`, and this process waits for that so
/// as not to leave it holding our sockets. A second SIGINT must not wait out that
/// timeout: the successor is killed at once, and this process exits. Before, it waited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigint_kills_a_stopped_successor_and_exits_at_once() {
    second_sigint_with_a_stopped_successor(&[sys::SIGINT, sys::SIGINT]).await;
}

/// The same after a SIGTERM stopped the upgrade: the process has drained (nothing was
/// open) and only waits for the successor, and the first SIGINT, which has nothing
/// left to drain, must not leave the second unheard. Before, the signal task ended
/// when the drained server no longer took its message, and the second SIGINT did
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sigints_after_a_sigterm_kill_a_stopped_successor_and_exit_at_once() {
    second_sigint_with_a_stopped_successor(&[sys::SIGTERM, sys::SIGINT, sys::SIGINT]).await;
}

/// SIGUSR2 with a successor deaf to SIGTERM and SIGINT and a 60 s `ready_timeout`,
/// then `signals` (the first stops the upgrade): the last one must end this process at
/// once, and the successor with it.
async fn second_sigint_with_a_stopped_successor(signals: &[sys::c_int]) {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let (dir, binary) = replaceable_binary();
    let mut gw = Gateway::start(Setup {
        routes: vec![("/", up.addr())],
        extra: "[upgrade]\nready_timeout = \"60s\"\n",
        binary: Some(binary.clone()),
        ..Setup::default()
    })
    .await;
    let armed = dir.path().join("armed");
    replace_file(
        &binary,
        &format!(
            "#!/bin/sh\ntrap '' TERM INT\necho > {}\nexec sleep 60\n",
            armed.display()
        ),
    );
    gw.signal(sys::SIGUSR2);
    assert!(
        wait_until(SOON, || armed.exists()).await,
        "the successor did not start"
    );
    let (last, first) = signals.split_last().expect("signals");
    let (stop, between) = first.split_first().expect("a stop signal");
    gw.signal(*stop);
    gw.wait_for_log("while the new binary was starting").await;
    let successor = stopped_successor_pid(&gw.proc.logs());
    gw.adopt(successor);
    // Nothing was open: the drain is over, and the process waits for the successor.
    gw.wait_for_log("drained: no connection left open").await;
    for &signal in between {
        assert_eq!(signal, sys::SIGINT);
        gw.signal(signal);
        gw.wait_for_log("SIGINT: draining (again to exit at once)")
            .await;
    }
    let second = Instant::now();
    gw.signal(*last);
    let status = gw.proc.wait_exit(SOON).await;
    let took = second.elapsed();
    assert!(
        status.is_some() && took <= SLACK,
        "the last SIGINT took {took:?} (status {status:?}); logs:\n{}",
        gw.proc.logs()
    );
    assert!(
        wait_until(SOON, || !sys::is_running(successor)).await,
        "the successor was left running"
    );
}

/// A deploy that installs each build beside the last and repoints a symlink to it
/// (`current -> releases/N`) runs holdfast by the symlink: SIGUSR2 must start what the
/// symlink names then. Before, the path was read from `/proc/self/exe`, which resolves
/// symlinks, so every upgrade started the build the first process ran, and said it
/// had upgraded. (Here the new build is a script that exits 3: the upgrade fails.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_starts_the_binary_a_symlink_names_now() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let (dir, first_build) = replaceable_binary();
    let link = dir.path().join("current");
    std::os::unix::fs::symlink(&first_build, &link).expect("symlink");
    let mut gw = Gateway::start(Setup {
        routes: vec![("/", up.addr())],
        binary: Some(link.clone()),
        ..Setup::default()
    })
    .await;
    let next_build = dir.path().join("next");
    replace_file(&next_build, "#!/bin/sh\nexit 3\n");
    let tmp = dir.path().join("current.new");
    std::os::unix::fs::symlink(&next_build, &tmp).expect("symlink");
    std::fs::rename(&tmp, &link).expect("repoint the symlink");

    let old = gw.proc.pid();
    gw.signal(sys::SIGUSR2);
    gw.wait_for_log("SIGUSR2: starting the new binary").await;
    let failed = gw.proc.wait_for_log("exit status: 3", SOON).await;
    // The first build, started instead, is stopped with the rest.
    if let Some(started) = read_pid_file(&gw.pid_file()).filter(|p| *p != old) {
        gw.adopt(started);
    }
    assert!(
        failed,
        "the binary the symlink names was not started\n{}",
        gw.proc.logs()
    );
    assert!(gw.proc.exited().is_none(), "{}", gw.proc.logs());
    gw.assert_serves("/").await;
}

/// The same for a new binary that dies on its own after writing the PID file (here a
/// script that writes its PID there and exits 1): the upgrade fails, and the PID file
/// names the old process again. Before, only one the old process killed was looked
/// for: one that had died was already reaped, its PID forgotten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_that_dies_after_writing_the_pid_file_leaves_it_naming_the_old_process() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let (_bin_dir, binary) = replaceable_binary();
    let mut gw = Gateway::start(Setup {
        routes: vec![("/", up.addr())],
        binary: Some(binary.clone()),
        ..Setup::default()
    })
    .await;
    let old = gw.proc.pid();
    let pid_file = gw.pid_file();
    replace_file(
        &binary,
        &format!("#!/bin/sh\necho $$ > {}\nexit 1\n", pid_file.display()),
    );
    gw.signal(sys::SIGUSR2);
    gw.wait_for_log("exit status: 1").await;
    let named = wait_until(SOON, || read_pid_file(&pid_file) == Some(old)).await;
    assert!(
        named,
        "the PID file names {:?}, not the serving process {old}\n{}",
        read_pid_file(&pid_file),
        gw.proc.logs()
    );
    gw.assert_serves("/").await;
}

/// A holdfast held at its very start, reading its config file from a FIFO the test
/// writes: signals sent then reach it before it has a runtime, let alone handlers.
struct HeldAtConfig {
    proc: HoldfastProcess,
    /// Keeps the FIFO's directory.
    _dir: holdfast_test::TempDir,
    fifo: Option<std::fs::File>,
    config: PathBuf,
    listen: SocketAddr,
    admin: SocketAddr,
}

impl HeldAtConfig {
    async fn start() -> HeldAtConfig {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = holdfast_test::tempdir();
        let config = dir.path().join("holdfast.toml");
        let made = std::process::Command::new("mkfifo")
            .arg(&config)
            .status()
            .expect("run mkfifo");
        assert!(made.success(), "mkfifo {}", config.display());
        let config_text = config.display().to_string();
        let proc = HoldfastProcess::spawn_with_env(
            Path::new(BIN),
            &[
                "run",
                "-c",
                &config_text,
                "--pid-file",
                "{dir}/holdfast.pid",
            ],
            None,
            &[("NO_COLOR", "1")],
        );
        // A non-blocking open for writing succeeds once a reader has the FIFO open:
        // holdfast is reading its config then.
        let mut fifo = None;
        let opened = wait_until(START, || {
            fifo = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&config)
                .ok();
            fifo.is_some()
        })
        .await;
        assert!(
            opened,
            "holdfast never opened its config; logs:\n{}",
            proc.logs()
        );
        HeldAtConfig {
            proc,
            _dir: dir,
            fifo,
            config,
            listen: free_addr(),
            admin: free_addr(),
        }
    }

    /// Lets the start go on: puts a plain file with the same config at the config's
    /// path (for a reload to read: the FIFO is open already), then writes the config
    /// into the FIFO and closes it.
    fn go_on(&mut self, upstream: SocketAddr) {
        use std::io::Write;
        let toml = config_toml(self.listen, self.admin, &[("/", upstream)], "");
        let plain = self.config.with_extension("plain");
        std::fs::write(&plain, &toml).expect("write the config");
        std::fs::rename(&plain, &self.config).expect("replace the FIFO");
        let mut fifo = self.fifo.take().expect("held");
        fifo.write_all(toml.as_bytes())
            .expect("write the config into the FIFO");
    }
}

/// A SIGHUP and a SIGUSR2 that come while holdfast reads its config at start (as
/// `systemctl kill -s HUP` or `pkill -HUP holdfast` would send to a successor still
/// starting) neither kill it nor are lost: it starts, then reads its config again; the
/// SIGUSR2 is logged and ignored (no new binary started). Before, until the handlers went
/// in after binding and resolving, either took its default action and killed it.
#[tokio::test]
async fn a_sighup_or_sigusr2_while_starting_does_not_kill_it() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let mut held = HeldAtConfig::start().await;
    held.proc.signal(sys::SIGHUP).expect("signal");
    held.proc.signal(sys::SIGUSR2).expect("signal");
    held.go_on(up.addr());
    let pid = held.proc.pid();
    let admin = held.admin;
    let ready = wait_until_async(START, || async move {
        !sys::is_running(pid) || ready_status(admin).await
    })
    .await;
    assert!(
        ready && held.proc.exited().is_none(),
        "holdfast did not start: {:?}; logs:\n{}",
        held.proc.exited(),
        held.proc.logs()
    );
    assert!(
        held.proc.wait_for_log("config reloaded", SOON).await,
        "no reload once ready; logs:\n{}",
        held.proc.logs()
    );
    let logs = held.proc.logs();
    assert!(logs.contains("SIGHUP while starting"), "{logs}");
    assert!(
        logs.contains("SIGUSR2 ignored: this process is still starting"),
        "{logs}"
    );
    assert!(sys::children_of(pid).is_empty(), "a new binary was started");
    let resp = KeepAliveClient::new(held.listen)
        .get("/")
        .await
        .expect("served");
    assert!(resp.is_success(), "{}", resp.status);
}

/// A SIGTERM while holdfast reads its config at start makes it exit cleanly (status 0,
/// not killed by the signal) before it binds, writes the PID file or says ready.
#[tokio::test]
async fn a_stop_signal_while_starting_exits_before_serving() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let mut held = HeldAtConfig::start().await;
    held.proc.signal(sys::SIGTERM).expect("signal");
    held.go_on(up.addr());
    let status = held.proc.wait_exit(SOON).await.expect("exits");
    let logs = held.proc.logs();
    assert_eq!(status.code(), Some(0), "{status:?}; logs:\n{logs}");
    assert!(
        logs.contains("SIGTERM while starting: exiting before serving"),
        "{logs}"
    );
    assert!(!logs.contains("listening"), "{logs}");
    assert!(!held.proc.dir().join("holdfast.pid").exists());
}
