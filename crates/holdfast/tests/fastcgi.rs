//! FastCGI through holdfast to a real php-fpm (story 4 in PROBLEMS.md): with
//! FCGI_KEEP_CONN php-fpm keeps a connection after FCGI_END_REQUEST, and holdfast pools
//! those connections under the same lifecycle rules as HTTP ones.
//!
//! Every test starts its own php-fpm (`holdfast_test::PhpFpm`: a loopback port and a
//! unix socket, a static pool, a temp document root), writes the PHP scripts it needs
//! and starts holdfast in-process on `127.0.0.1:0` (`support::start`); both stop when
//! the test ends. php-fpm is installed by the README's test command (`scripts/test`).
//! `HOLDFAST_TEST_LOG=holdfast=debug` shows holdfast's logs.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use holdfast_test::{
    ClientRequest, HoldfastProcess, KeepAliveClient, Load, LoadConfig, PeerClose, PhpFpm,
    PhpFpmOptions, RawClient, Response, is_pattern, pattern, wait_until_async,
};
use support::Gateway;
use support::fastcgi_app::{FastCgiApp, FastCgiAppOptions};
use tokio::time::Instant;

/// Per-response bound for the clients.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

// === fixtures ===

/// The config of a holdfast with one catch-all route to the FastCGI upstream `php`.
struct Site<'a> {
    /// `fastcgi://...` or `fastcgi+unix://...`.
    upstream: String,
    root: &'a Path,
    /// Lines under `[route.fastcgi]`.
    route: &'a str,
    /// Tables after `[upstream.php]` (`[upstream.php.pool]`, ...).
    tables: &'a str,
}

impl<'a> Site<'a> {
    fn tcp(fpm: &'a PhpFpm) -> Site<'a> {
        Site {
            upstream: format!("fastcgi://{}", fpm.addr()),
            root: fpm.www(),
            route: "",
            tables: "",
        }
    }

    fn unix(fpm: &'a PhpFpm) -> Site<'a> {
        Site {
            upstream: format!("fastcgi+unix://{}", fpm.socket_path().display()),
            ..Site::tcp(fpm)
        }
    }

    fn route(mut self, lines: &'a str) -> Self {
        self.route = lines;
        self
    }

    fn tables(mut self, tables: &'a str) -> Self {
        self.tables = tables;
        self
    }

    fn toml(&self) -> String {
        format!(
            "[[route]]\nupstream = \"php\"\n\n[route.fastcgi]\nroot = \"{root}\"\n{route}\n\n\
             [upstream.php]\naddresses = [\"{upstream}\"]\n{tables}\n",
            root = self.root.display(),
            route = self.route,
            upstream = self.upstream,
            tables = self.tables,
        )
    }

    async fn start(&self) -> Gateway {
        support::start(&self.toml()).await
    }
}

fn client(gw: &Gateway) -> KeepAliveClient {
    KeepAliveClient::new(gw.addr).with_timeout(RESPONSE_TIMEOUT)
}

async fn send(gw: &Gateway, req: &ClientRequest) -> Response {
    client(gw)
        .send(req)
        .await
        .unwrap_or_else(|e| panic!("{} {}: {e}", req.method, req.target))
}

async fn get(gw: &Gateway, target: &str) -> Response {
    send(gw, &ClientRequest::get(target)).await
}

/// `/pools` for upstream `php`: the upstream's figures and its one address's.
async fn pools(gw: &Gateway) -> (serde_json::Value, serde_json::Value) {
    let resp = KeepAliveClient::new(gw.admin)
        .get("/pools")
        .await
        .expect("GET /pools");
    let all: serde_json::Value = serde_json::from_slice(&resp.body).expect("/pools is JSON");
    let up = all
        .as_array()
        .and_then(|ups| ups.iter().find(|u| u["name"] == "php"))
        .cloned()
        .expect("upstream php in /pools");
    let address = up["addresses"][0].clone();
    (up, address)
}

fn figure(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

/// Drops PHP's own output buffers so `flush()` reaches php-fpm's socket.
const NO_OB: &str = "while (ob_get_level()) { ob_end_flush(); }";

/// Prints the worker's PID and the inode of its FastCGI connection: the socket among
/// its fds that its master does not have (the master holds the listening sockets,
/// which the worker inherited; their fd numbers vary).
const WHOAMI_PHP: &str = r#"<?php
function sockets($pid) {
    $s = [];
    foreach (scandir("/proc/$pid/fd") as $fd) {
        $l = @readlink("/proc/$pid/fd/$fd");
        if ($l !== false && preg_match('/^socket:\[(\d+)\]$/', $l, $m)) { $s[$m[1]] = true; }
    }
    return $s;
}
usleep((int) ($_GET['us'] ?? 0));
$stat = file_get_contents('/proc/self/stat');
$ppid = explode(' ', substr($stat, strrpos($stat, ')') + 2))[1];
echo getmypid(), ' ', implode(',', array_keys(array_diff_key(sockets('self'), sockets($ppid))));
"#;

/// (worker PID, connection inode) from a [`WHOAMI_PHP`] response.
fn whoami(resp: &Response) -> (u32, String) {
    assert_eq!(resp.status, 200, "whoami: {}", resp.text());
    let text = resp.text();
    let (pid, inodes) = text.split_once(' ').expect("pid and inode");
    let inodes: Vec<&str> = inodes.split(',').filter(|s| !s.is_empty()).collect();
    assert_eq!(inodes.len(), 1, "exactly one connected socket: {text}");
    (pid.parse().expect("pid"), inodes[0].to_owned())
}

// === the basics ===

#[tokio::test]
async fn hello_php() {
    let fpm = PhpFpm::start(PhpFpmOptions::default()).await;
    fpm.script("hello.php", "<?php echo 'Hello from PHP ', PHP_VERSION;");
    fpm.script("index.php", "<?php echo 'index';");
    let gw = Site::tcp(&fpm).start().await;

    let resp = get(&gw, "/hello.php").await;
    assert_eq!(resp.status, 200);
    assert!(
        resp.text().starts_with("Hello from PHP 8."),
        "{}",
        resp.text()
    );
    assert_eq!(
        resp.header("content-type"),
        Some("text/html; charset=UTF-8")
    );
    assert_eq!(
        get(&gw, "/").await.text(),
        "index",
        "index file for a path ending in /"
    );
    assert_eq!(get(&gw, "/style.css").await.status, 404, "not a script");
    assert_eq!(get(&gw, "/missing.php").await.status, 404, "no such file");
}

/// 10 MiB up as FastCGI STDIN (streamed: larger than the replay buffer) and back as
/// STDOUT, byte for byte. (PHP reads a POST body whole before the script runs, so
/// the two directions do not overlap here.)
#[tokio::test]
async fn post_echo_of_10_mib() {
    let fpm = PhpFpm::start(PhpFpmOptions {
        pool_directives: "php_admin_value[post_max_size] = 64M".into(),
        ..PhpFpmOptions::default()
    })
    .await;
    fpm.script(
        "echo.php",
        "<?php header('Content-Type: application/octet-stream');\n\
         echo $_SERVER['CONTENT_LENGTH'], \"\\n\";\n\
         stream_copy_to_stream(fopen('php://input', 'rb'), fopen('php://output', 'wb'));",
    );
    let gw = Site::tcp(&fpm).start().await;
    let body = pattern(0, 10 << 20);
    let req = ClientRequest::post("/echo.php", body.clone())
        .header("content-type", "application/octet-stream");
    let resp = send(&gw, &req).await;
    assert_eq!(
        resp.status,
        200,
        "{}",
        String::from_utf8_lossy(&resp.body[..200.min(resp.body.len())])
    );
    let prefix = format!("{}\n", 10 << 20);
    assert!(
        resp.body.starts_with(prefix.as_bytes()),
        "CONTENT_LENGTH first"
    );
    let echoed = &resp.body[prefix.len()..];
    assert_eq!(echoed.len(), body.len(), "length");
    assert!(is_pattern(0, echoed), "byte for byte");
}

#[tokio::test]
async fn php_sets_status_and_headers() {
    let fpm = PhpFpm::start(PhpFpmOptions::default()).await;
    fpm.script(
        "teapot.php",
        "<?php header('X-From-Php: yes'); header('Set-Cookie: a=1');\n\
         header('Set-Cookie: b=2', false); http_response_code(418); echo 'short and stout';",
    );
    fpm.script(
        "created.php",
        "<?php header('Status: 201 Created'); echo 'made';",
    );
    fpm.script(
        "gone.php",
        "<?php header('HTTP/1.1 410 Gone'); echo 'gone';",
    );
    let gw = Site::tcp(&fpm).start().await;

    let resp = get(&gw, "/teapot.php").await;
    assert_eq!(resp.status, 418);
    assert_eq!(resp.text(), "short and stout");
    assert_eq!(resp.header("x-from-php"), Some("yes"));
    let cookies: Vec<&[u8]> = resp.headers.get_all("set-cookie").collect();
    assert_eq!(cookies, [&b"a=1"[..], &b"b=2"[..]]);
    assert!(
        resp.header("status").is_none(),
        "CGI Status is not an HTTP header"
    );

    let resp = get(&gw, "/created.php").await;
    assert_eq!((resp.status, resp.text().as_ref()), (201, "made"));
    let resp = get(&gw, "/gone.php").await;
    assert_eq!((resp.status, resp.text().as_ref()), (410, "gone"));
}

/// PHP adds `Status: 302` to a `Location` header by itself; a script that then sets 200
/// sends a bare CGI redirect: a local path (RFC 3875 6.2.2) is sent to the client as a
/// 302, as nginx does and as `into_response` documents, and so is an absolute URL
/// (6.2.3).
#[tokio::test]
async fn redirects() {
    let fpm = PhpFpm::start(PhpFpmOptions::default()).await;
    fpm.script(
        "abs.php",
        "<?php header('Location: https://example.com/next');",
    );
    fpm.script(
        "moved.php",
        "<?php header('Location: /new-home', true, 301);",
    );
    fpm.script(
        "local.php",
        "<?php header('Location: /local/target?x=1'); http_response_code(200);",
    );
    fpm.script(
        "client.php",
        "<?php header('Location: https://example.com/elsewhere'); http_response_code(200);",
    );
    let gw = Site::tcp(&fpm).start().await;

    for (script, status, location) in [
        ("/abs.php", 302, "https://example.com/next"),
        ("/moved.php", 301, "/new-home"),
        ("/local.php", 302, "/local/target?x=1"),
        ("/client.php", 302, "https://example.com/elsewhere"),
    ] {
        let resp = get(&gw, script).await;
        assert_eq!(resp.status, status, "{script}");
        assert_eq!(resp.header("location"), Some(location), "{script}");
    }
}

/// 1 MiB of STDOUT reaches the client as it is produced: the script sends 512 KiB,
/// then waits (bounded) for the test to say it received them before sending the rest.
/// A proxy that held the response until END_REQUEST would only ever deliver half.
#[tokio::test]
async fn a_1_mib_response_is_streamed() {
    let fpm = PhpFpm::start(PhpFpmOptions::default()).await;
    let gate = fpm.www().join("gate");
    fpm.script(
        "stream.php",
        &format!(
            "<?php {NO_OB}\n\
             $half = str_repeat(implode('', array_map('chr', range(0, 255))), 2048);\n\
             echo $half; flush();\n\
             for ($i = 0; $i < 1000 && !file_exists('{gate}'); $i++) {{ usleep(10000); clearstatcache(); }}\n\
             if (file_exists('{gate}')) {{ echo $half; }}",
            gate = gate.display()
        ),
    );
    let gw = Site::tcp(&fpm).start().await;

    let mut conn = RawClient::connect(gw.addr).await.expect("connect");
    conn.send_request(&ClientRequest::get("/stream.php"))
        .await
        .expect("send");
    let mut received = 0usize;
    let mut in_order = true;
    let resp = conn
        .read_response_streaming("GET", Duration::from_secs(20), |chunk| {
            in_order &= chunk
                .iter()
                .enumerate()
                .all(|(i, b)| *b == ((received + i) % 256) as u8);
            received += chunk.len();
            if received >= 512 * 1024 && !gate.exists() {
                std::fs::write(&gate, b"go").expect("open the gate");
            }
        })
        .await
        .expect("response");
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.body_len,
        1 << 20,
        "the whole MiB: the first half came before the end"
    );
    assert!(in_order, "bytes in order");
}

// === timeouts and aborts ===

/// Story 2 for FastCGI: the deadline answers 504 and frees the connection; the one
/// worker comes back when its script ends, and the next request gets it.
#[tokio::test]
async fn slow_script_times_out_with_504_and_the_worker_comes_back() {
    let fpm = PhpFpm::start(PhpFpmOptions {
        max_children: 1,
        ..PhpFpmOptions::default()
    })
    .await;
    fpm.script("pid.php", "<?php echo getmypid();");
    fpm.script("slow.php", "<?php sleep(2); echo 'too late';");
    let gw = Site::tcp(&fpm)
        .tables(
            "[upstream.php.timeouts]\nresponse_headers = \"500ms\"\n\
             [upstream.php.pool]\nmax_connections = 1\nmax_idle = 1\nqueue_timeout = \"10s\"\n",
        )
        .start()
        .await;

    let worker = get(&gw, "/pid.php").await.text().into_owned();
    let started = Instant::now();
    let resp = get(&gw, "/slow.php").await;
    assert_eq!(resp.status, 504, "{}", resp.text());
    assert!(
        started.elapsed() < Duration::from_millis(1800),
        "answered at the deadline, not when the script ended: {:?}",
        started.elapsed()
    );
    // Until the script ends the one worker is busy and requests time out too; then
    // it serves again: neither the worker nor holdfast's one slot was lost.
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut back = get(&gw, "/pid.php").await;
    // Bounded by the deadline; each try ends within the 500 ms timeout.
    while back.status != 200 && Instant::now() < deadline {
        assert_eq!(back.status, 504, "{}", back.text());
        back = get(&gw, "/pid.php").await;
    }
    assert_eq!(
        (back.status, back.text().into_owned()),
        (200, worker),
        "the same worker, back from its script within 8 s"
    );
    let (_, pool) = pools(&gw).await;
    assert!(figure(&pool["closed"]["timeout"]) >= 1, "{pool}");
}

/// A request that cannot be retried (POST) does not take a connection that has been idle
/// for a while (it may be about to close) and opens a new one. php-fpm's only worker is
/// still bound to the idle connection, so the new one waits in php-fpm's accept queue
/// until holdfast closes the idle one: promptly, not at its idle timeout (60 s here).
#[tokio::test]
async fn post_is_not_starved_by_an_idle_connection_holding_the_worker() {
    let fpm = PhpFpm::start(PhpFpmOptions {
        max_children: 1,
        ..PhpFpmOptions::default()
    })
    .await;
    fpm.script("pid.php", "<?php echo getmypid();");
    let gw = Site::tcp(&fpm)
        .tables("[upstream.php.pool]\nidle_timeout = \"60s\"\n")
        .start()
        .await;
    let worker = get(&gw, "/pid.php").await.text().into_owned();
    let waited = post_after_the_idle_one_aged(&gw, &worker).await;
    assert!(
        waited < Duration::from_secs(2),
        "waited {waited:?} for the worker"
    );
}

/// Lets the idle connection grow older than the idle age a POST accepts on a reused
/// connection (1 s at most), then POSTs to `/pid.php`: a new connection, which waits
/// for the worker (`worker`, php-fpm's only one) the idle one holds. Returns how long
/// the POST took.
async fn post_after_the_idle_one_aged(gw: &Gateway, worker: &str) -> Duration {
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let started = Instant::now();
    let resp = KeepAliveClient::new(gw.addr)
        .with_timeout(Duration::from_secs(5))
        .send(&ClientRequest::post("/pid.php", "x"))
        .await
        .expect("POST");
    assert_eq!((resp.status, &*resp.text()), (200, worker));
    started.elapsed()
}

/// How long answers usually take is counted from the end of a streamed request body,
/// not from when the request started: a slow client's upload is not the application's
/// time. Counted from the start, one slow upload would stretch the wait after which a
/// new connection counts as starved of a worker to its 2 s cap, and the POST below
/// would wait that long for the worker an idle connection holds.
#[tokio::test]
async fn a_slow_upload_does_not_slow_the_freeing_of_a_worker() {
    let fpm = PhpFpm::start(PhpFpmOptions {
        max_children: 1,
        ..PhpFpmOptions::default()
    })
    .await;
    fpm.script("pid.php", "<?php echo getmypid();");
    fpm.script(
        "len.php",
        "<?php echo strlen(file_get_contents('php://input'));",
    );
    // Streamed uploads only: a body read whole first never keeps a worker waiting.
    let gw = Site::tcp(&fpm)
        .route("request_buffering = false")
        .tables("retry.attempts = 1\n[upstream.php.pool]\nidle_timeout = \"60s\"\n")
        .start()
        .await;
    let worker = get(&gw, "/pid.php").await.text().into_owned();

    // A streamed upload, slow: three pieces 500 ms apart, on the kept connection.
    let mut uploader = RawClient::connect(gw.addr).await.expect("connect");
    uploader
        .send("POST /len.php HTTP/1.1\r\nhost: a.test\r\ncontent-length: 3000\r\n\r\n")
        .await
        .expect("head");
    for i in 0..3 {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        uploader
            .send([b'x'; 1000])
            .await
            .expect("a piece of the body");
    }
    let resp = uploader
        .read_response(RESPONSE_TIMEOUT)
        .await
        .expect("upload answered");
    assert_eq!(resp.text(), "3000");
    let (_, pool) = pools(&gw).await;
    assert_eq!(
        figure(&pool["reused"]),
        1,
        "the upload reused the connection: {pool}"
    );

    let waited = post_after_the_idle_one_aged(&gw, &worker).await;
    assert!(
        waited < Duration::from_secs(1),
        "waited {waited:?} for the worker"
    );
}

/// With `request_buffering = false`, `timeouts.response_headers` counts from the end
/// of the streamed body, as for HTTP upstreams: a slow upload used to get 504 while it
/// still arrived, timed from its head.
#[tokio::test]
async fn a_slow_streamed_upload_is_timed_for_its_answer_from_its_end() {
    let fpm = PhpFpm::start(PhpFpmOptions::default()).await;
    fpm.script(
        "len.php",
        "<?php echo strlen(file_get_contents('php://input'));",
    );
    let gw = Site::tcp(&fpm)
        .route("request_buffering = false")
        .tables("retry.attempts = 1\n[upstream.php.timeouts]\nresponse_headers = \"1s\"\n")
        .start()
        .await;
    let mut uploader = RawClient::connect(gw.addr).await.expect("connect");
    uploader
        .send("POST /len.php HTTP/1.1\r\nhost: a.test\r\ncontent-length: 3000\r\n\r\n")
        .await
        .expect("head");
    for i in 0..3 {
        if i > 0 {
            // The client's own pace, slower in all than response_headers.
            tokio::time::sleep(Duration::from_millis(600)).await;
        }
        uploader
            .send([b'x'; 1000])
            .await
            .expect("a piece of the body");
    }
    let resp = uploader
        .read_response(RESPONSE_TIMEOUT)
        .await
        .expect("upload answered");
    assert_eq!((resp.status, &*resp.text()), (200, "3000"));
}

/// The client goes away while PHP streams its response: holdfast closes the FastCGI
/// connection (after ABORT_REQUEST), PHP's next flush fails and, with
/// `ignore_user_abort(false)`, the script is stopped. Its shutdown function says so.
#[tokio::test]
async fn client_gone_mid_response_aborts_the_script() {
    let fpm = PhpFpm::start(PhpFpmOptions::default()).await;
    let state = fpm.www().join("state");
    fpm.script(
        "long.php",
        &format!(
            "<?php {NO_OB} ignore_user_abort(false);\n\
             register_shutdown_function(function () {{\n\
                 file_put_contents('{state}', connection_aborted() ? 'aborted' : 'finished');\n\
             }});\n\
             for ($i = 0; $i < 200; $i++) {{ echo str_repeat('x', 1024), \"\\n\"; flush(); usleep(50000); }}",
            state = state.display()
        ),
    );
    let gw = Site::tcp(&fpm).start().await;

    let mut conn = RawClient::connect(gw.addr).await.expect("connect");
    conn.send_request(&ClientRequest::get("/long.php"))
        .await
        .expect("send");
    // The head and the first line mean the script is running.
    let mut head = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    // Bounded by the deadline.
    while !head.windows(4).any(|w| w == b"xxxx") && Instant::now() < deadline {
        match conn.wait_close(Duration::from_secs(1)).await {
            PeerClose::Data(d) => head.extend_from_slice(&d),
            PeerClose::StillOpen => {}
            other => panic!("holdfast closed the client connection: {other:?}"),
        }
    }
    assert!(
        String::from_utf8_lossy(&head).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    conn.reset();

    let ended = holdfast_test::wait_until(Duration::from_secs(5), || state.exists()).await;
    assert!(
        ended,
        "the script still runs 5 s after its client left (it would for 10 s)"
    );
    assert_eq!(std::fs::read_to_string(&state).unwrap(), "aborted");
}

/// The client goes away before the response head, while PHP works without output:
/// holdfast closes the FastCGI connection, so PHP's first output fails and
/// `connection_aborted()` says so.
#[tokio::test]
async fn client_gone_before_the_head_closes_the_fastcgi_connection() {
    let fpm = PhpFpm::start(PhpFpmOptions::default()).await;
    let started = fpm.www().join("started");
    let state = fpm.www().join("state");
    fpm.script(
        "work.php",
        &format!(
            "<?php {NO_OB} ignore_user_abort(true);\n\
             touch('{started}');\n\
             for ($i = 0; $i < 100 && file_exists('{started}'); $i++) {{ usleep(10000); clearstatcache(); }}\n\
             for ($i = 0; $i < 5; $i++) {{ echo str_repeat('y', 8192); flush(); usleep(20000); }}\n\
             file_put_contents('{state}', connection_aborted() ? 'aborted' : 'finished');",
            started = started.display(),
            state = state.display()
        ),
    );
    let gw = Site::tcp(&fpm).start().await;

    let mut conn = RawClient::connect(gw.addr).await.expect("connect");
    conn.send_request(&ClientRequest::get("/work.php"))
        .await
        .expect("send");
    assert!(
        holdfast_test::wait_until(Duration::from_secs(10), || started.exists()).await,
        "the script started"
    );
    drop(conn);
    // Once holdfast has let go of the request, let the script produce output.
    assert!(
        wait_until_async(Duration::from_secs(5), || async {
            figure(&pools(&gw).await.1["closed"]["abandoned"]) == 1
        })
        .await,
        "holdfast dropped the request and its connection"
    );
    std::fs::remove_file(&started).expect("release the script");
    assert!(
        holdfast_test::wait_until(Duration::from_secs(5), || state.exists()).await,
        "the script ended"
    );
    assert_eq!(std::fs::read_to_string(&state).unwrap(), "aborted");
}

// === php-fpm going away ===

/// php-fpm stopped and started again (a new master on the same port): it closes every
/// kept connection, and the pool notices while they are idle, before any request needs
/// them: no stale connection is caught at checkout and nothing is retried.
#[tokio::test]
async fn restarted_php_fpm_closes_idle_connections_and_the_pool_notices() {
    let mut fpm = PhpFpm::start(PhpFpmOptions {
        process_control_timeout: Duration::from_secs(1),
        ..PhpFpmOptions::default()
    })
    .await;
    fpm.script("whoami.php", WHOAMI_PHP);
    let gw = Site::tcp(&fpm)
        .tables("[upstream.php.pool]\nidle_timeout = \"60s\"\n")
        .start()
        .await;
    let mut c = client(&gw);
    let (old_worker, _) = whoami(&c.get("/whoami.php").await.expect("before"));
    let (_, pool) = pools(&gw).await;
    assert_eq!(figure(&pool["idle"]), 1, "{pool}");

    fpm.restart().await;
    assert!(
        wait_until_async(Duration::from_secs(5), || async {
            figure(&pools(&gw).await.1["closed"]["closed_by_upstream_idle"]) == 1
        })
        .await,
        "the pool noticed that php-fpm closed its idle connection: {}",
        pools(&gw).await.1
    );
    // A POST may not be retried: it only succeeds on a connection that works.
    let resp = c
        .send(&ClientRequest::post("/whoami.php", "x"))
        .await
        .expect("after");
    let (new_worker, _) = whoami(&resp);
    assert_ne!(new_worker, old_worker, "served by the new php-fpm");
    let (up, pool) = pools(&gw).await;
    assert_eq!(figure(&pool["stale_caught"]), 0, "{pool}");
    assert_eq!(figure(&up["retries"]["stale_connection"]), 0, "{up}");
    assert_eq!(figure(&pool["created"]), 2, "{pool}");
}

/// php-fpm's graceful restart (SIGUSR2) four times under keep-alive GET load: every
/// worker exits and closes its kept connection, some while idle in the pool, some just
/// as a request goes out on them (php-fpm then resets it, the request unread). No
/// client sees an error: idle closes are noticed, the race is retried on a new
/// connection.
#[tokio::test]
async fn php_fpm_restarted_under_get_load_no_client_errors() {
    let mut fpm = PhpFpm::start(PhpFpmOptions {
        max_children: 4,
        process_control_timeout: Duration::from_secs(2),
        ..PhpFpmOptions::default()
    })
    .await;
    fpm.script("hello.php", "<?php echo 'hello';");
    let gw = Site::tcp(&fpm).start().await;
    let load = Load::spawn(
        gw.addr,
        LoadConfig {
            connections: 4,
            max_duration: Duration::from_secs(40),
            max_requests: 1_000_000,
            request_timeout: RESPONSE_TIMEOUT,
            think_time: Duration::ZERO,
        },
        |_| ClientRequest::get("/hello.php"),
    );
    for _ in 0..4 {
        let next = load.completed() + 300;
        assert!(
            load.wait_for_completed(next, Duration::from_secs(10)).await,
            "load runs"
        );
        fpm.reload().await;
    }
    let next = load.completed() + 300;
    assert!(
        load.wait_for_completed(next, Duration::from_secs(10)).await,
        "load runs after"
    );
    let report = load.stop().await;
    report.assert_clean();
    let (up, pool) = pools(&gw).await;
    let closed_under_us = figure(&pool["closed"]["closed_by_upstream_idle"])
        + figure(&pool["stale_caught"])
        + figure(&up["retries"]["stale_connection"]);
    assert!(
        closed_under_us > 0,
        "php-fpm closed pooled connections: {up}"
    );
}

/// php-fpm with `pm.max_requests` retires each worker after that many requests, on
/// whatever connection it then holds: END_REQUEST, then a half-close. The script here
/// ends its response early (`fastcgi_finish_request`) and runs 30 ms more, so that
/// the next POST is on its way when its worker retires: every fifth. Each is sent
/// again on another connection and answered; before, each was a 502. Over TCP and
/// over the Unix socket.
#[tokio::test]
async fn php_fpm_retiring_its_worker_loses_no_post() {
    let fpm = PhpFpm::start(PhpFpmOptions {
        pool_directives: "pm.max_requests = 5".into(),
        ..PhpFpmOptions::default()
    })
    .await;
    fpm.script(
        "echo.php",
        "<?php echo 'got ', file_get_contents('php://input'); \
         fastcgi_finish_request(); usleep(30000);",
    );
    for site in [Site::tcp(&fpm), Site::unix(&fpm)] {
        let gw = site.start().await;
        let mut client = client(&gw);
        for i in 0..16 {
            let body = format!("post {i}");
            let resp = client
                .send(&ClientRequest::post("/echo.php", body.clone()))
                .await
                .expect("answered");
            assert_eq!(resp.status, 200, "{}: POST {i}", site.upstream);
            assert_eq!(resp.body, format!("got {body}"));
        }
        let (up, _) = pools(&gw).await;
        assert!(
            figure(&up["retries"]["not_sent"]) >= 2,
            "{}: POSTs met retiring workers: {up}",
            site.upstream
        );
    }
}

// === security ===

/// `/uploads/evil.jpg/x.php` names the script `x.php` under `evil.jpg/`, which does not
/// exist: 404, even with a php-fpm that would run `.jpg` files (its default
/// `security.limit_extensions` would refuse) and with `cgi.fix_pathinfo` on (PHP's
/// default), which walks up to the file that exists. A proxy that split at `.jpg` or
/// left the file check to php-fpm would run the upload.
#[tokio::test]
async fn path_info_trap_never_runs_an_upload() {
    let fpm = PhpFpm::start(PhpFpmOptions {
        pool_directives: "security.limit_extensions = .php .jpg".into(),
        ..PhpFpmOptions::default()
    })
    .await;
    fpm.script("uploads/evil.jpg", "<?php echo 'EVIL CODE RAN';");
    fpm.script(
        "info.php",
        "<?php echo 'info:', $_SERVER['PATH_INFO'] ?? '-';",
    );
    let gw = Site::tcp(&fpm).start().await;

    for target in [
        "/uploads/evil.jpg/x.php",
        "/uploads/evil.jpg/.php",
        "/uploads/evil.jpg%2fx.php",
        "/uploads/evil.jpg",
        "/uploads/evil.jpg/",
    ] {
        let resp = get(&gw, target).await;
        assert!(!resp.text().contains("EVIL"), "{target} ran the upload");
        assert!(
            matches!(resp.status, 400 | 404),
            "{target}: {} {}",
            resp.status,
            resp.text()
        );
    }
    // The split itself still works for a real script.
    assert_eq!(get(&gw, "/info.php/a/b").await.text(), "info:/a/b");
}

/// httpoxy: a client's `Proxy` header must never become `HTTP_PROXY`, which libraries
/// read as the outgoing proxy. PHP (since 5.6.24 / 7.0.9) also drops it itself, so
/// what a script sees cannot tell whether holdfast sent it: the params holdfast writes
/// are checked on the wire too, with a one-request FastCGI application standing in
/// for php-fpm (other FastCGI applications do not protect themselves).
#[tokio::test]
async fn proxy_header_never_becomes_http_proxy() {
    let req = ClientRequest::get("/env.php")
        .header("Proxy", "http://attacker.example:3128")
        .header("X-Other", "kept");

    let fpm = PhpFpm::start(PhpFpmOptions::default()).await;
    fpm.script(
        "env.php",
        "<?php echo json_encode([getenv('HTTP_PROXY'), $_SERVER['HTTP_PROXY'] ?? null,\n\
         $_SERVER['HTTP_X_OTHER'] ?? null]);",
    );
    let gw = Site::tcp(&fpm).start().await;
    let resp = send(&gw, &req).await;
    assert_eq!(resp.text(), r#"[false,null,"kept"]"#);

    let app = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let site = Site {
        upstream: format!("fastcgi://{}", app.local_addr().expect("addr")),
        ..Site::tcp(&fpm)
    };
    let gw = site.start().await;
    let params = tokio::spawn(params_of_one_request(app));
    assert_eq!(send(&gw, &req).await.text(), "recorded");
    let params = params.await.expect("the application saw the request");
    let names: Vec<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"HTTP_X_OTHER"), "{names:?}");
    assert!(!names.contains(&"HTTP_PROXY"), "{params:?}");
}

/// REQUEST_URI is the target as sent, in origin form: an absolute-form target with a
/// query and no path (`http://host?q`) gives `/?q`, as its empty path reads. It gave
/// `?q`, which a front controller routing on REQUEST_URI cannot take for a path.
#[tokio::test]
async fn request_uri_of_an_absolute_target_without_a_path_starts_with_a_slash() {
    let root = holdfast_test::tempdir();
    std::fs::write(root.path().join("index.php"), "<?php\n").expect("index.php");
    let app = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let gw = Site {
        upstream: format!("fastcgi://{}", app.local_addr().expect("addr")),
        root: root.path(),
        route: "",
        tables: "",
    }
    .start()
    .await;
    let params = tokio::spawn(params_of_one_request(app));
    let mut conn = RawClient::connect(gw.addr).await.expect("connect");
    conn.send("GET http://shop.test?q=1 HTTP/1.1\r\nHost: shop.test\r\n\r\n")
        .await
        .expect("send");
    let resp = conn
        .read_response(RESPONSE_TIMEOUT)
        .await
        .expect("response");
    assert_eq!(resp.text(), "recorded");
    let params = params.await.expect("the application saw the request");
    let uri = params.iter().find(|(n, _)| n == "REQUEST_URI");
    assert_eq!(uri.map(|(_, v)| v.as_str()), Some("/?q=1"), "{params:?}");
}

/// A FastCGI application for one request: answers "recorded" and returns the params it
/// received. A connection asking GET_VALUES is closed unanswered.
async fn params_of_one_request(listener: tokio::net::TcpListener) -> Vec<(String, String)> {
    use bytes::BytesMut;
    use holdfast_fastcgi::record::{self, RecordType};
    use holdfast_fastcgi::{EndRequest, ProtocolStatus, RecordDecoder};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    // Bounded: GET_VALUES and the request, or a few stray connections at most.
    for _ in 0..4 {
        let (mut sock, _) = listener.accept().await.expect("accept");
        let mut buf = BytesMut::new();
        let mut decoder = RecordDecoder::new();
        let mut content = Vec::new();
        loop {
            match decoder.decode(&mut buf).expect("valid records") {
                Some(r) if r.kind == RecordType::Params && r.content.is_empty() => break,
                Some(r) if r.kind == RecordType::Params => content.extend_from_slice(&r.content),
                Some(r) if r.kind == RecordType::BeginRequest => {}
                Some(_) => {
                    content.clear();
                    break;
                }
                None => {
                    if sock.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                        break;
                    }
                }
            }
        }
        if content.is_empty() {
            continue;
        }
        let mut out = BytesMut::new();
        record::encode_stream(
            &mut out,
            RecordType::Stdout,
            1,
            b"Content-Type: text/plain\r\n\r\nrecorded",
        );
        record::encode_stream(&mut out, RecordType::Stdout, 1, b"");
        let end = EndRequest {
            app_status: 0,
            protocol_status: ProtocolStatus::RequestComplete,
        };
        record::encode_end_request(&mut out, 1, &end);
        sock.write_all(&out).await.expect("reply");
        return holdfast_fastcgi::params::decode_pairs(&content)
            .map(|pair| {
                let (n, v) = pair.expect("valid params");
                (
                    String::from_utf8_lossy(n).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            })
            .collect();
    }
    panic!("no FastCGI request arrived");
}

// === CGI params ===

#[tokio::test]
async fn cgi_params_as_php_sees_them() {
    let fpm = PhpFpm::start(PhpFpmOptions::default()).await;
    fpm.script(
        "app/params.php",
        "<?php $k = ['SCRIPT_NAME', 'SCRIPT_FILENAME', 'PATH_INFO', 'QUERY_STRING',\n\
         'REQUEST_URI', 'DOCUMENT_URI', 'DOCUMENT_ROOT', 'REQUEST_METHOD', 'CONTENT_TYPE',\n\
         'CONTENT_LENGTH', 'REMOTE_ADDR', 'REMOTE_PORT', 'SERVER_ADDR', 'SERVER_PORT',\n\
         'SERVER_NAME', 'SERVER_PROTOCOL', 'GATEWAY_INTERFACE', 'HTTP_HOST', 'HTTP_X_TRACE',\n\
         'APP_ENV', 'HTTPS'];\n\
         $out = []; foreach ($k as $n) { $out[$n] = $_SERVER[$n] ?? null; }\n\
         $out['body'] = file_get_contents('php://input'); $out['get'] = $_GET;\n\
         echo json_encode($out);",
    );
    let gw = Site::tcp(&fpm)
        .route("params = { APP_ENV = \"test\", SERVER_NAME = \"site.example\" }")
        .start()
        .await;

    let mut conn = RawClient::connect(gw.addr).await.expect("connect");
    let client_port = conn.local_addr().expect("local addr").port();
    let req = ClientRequest::post("/app/params.php/extra/path?a=1&b=two%20words", "k=v")
        .header("Host", "shop.test")
        .header("Content-Type", "application/x-www-form-urlencoded")
        .header("X-Trace", "t1");
    conn.send_request(&req).await.expect("send");
    let resp = conn
        .read_response_for("POST", RESPONSE_TIMEOUT)
        .await
        .expect("response");
    assert_eq!(resp.status, 200, "{}", resp.text());
    let p: serde_json::Value = serde_json::from_slice(&resp.body).expect("JSON");
    let root = fpm.www().display().to_string();
    let expect = serde_json::json!({
        "SCRIPT_NAME": "/app/params.php",
        "SCRIPT_FILENAME": format!("{root}/app/params.php"),
        "PATH_INFO": "/extra/path",
        "QUERY_STRING": "a=1&b=two%20words",
        "REQUEST_URI": "/app/params.php/extra/path?a=1&b=two%20words",
        "DOCUMENT_URI": "/app/params.php/extra/path",
        "DOCUMENT_ROOT": root,
        "REQUEST_METHOD": "POST",
        "CONTENT_TYPE": "application/x-www-form-urlencoded",
        "CONTENT_LENGTH": "3",
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": client_port.to_string(),
        "SERVER_ADDR": "127.0.0.1",
        "SERVER_PORT": gw.addr.port().to_string(),
        "SERVER_NAME": "site.example",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "GATEWAY_INTERFACE": "CGI/1.1",
        "HTTP_HOST": "shop.test",
        "HTTP_X_TRACE": "t1",
        "APP_ENV": "test",
        "HTTPS": null,
        "body": "k=v",
        "get": { "a": "1", "b": "two words" },
    });
    assert_eq!(p, expect);
}

// === connections ===

#[tokio::test]
async fn unix_socket_upstream() {
    let fpm = PhpFpm::start(PhpFpmOptions::default()).await;
    fpm.script("whoami.php", WHOAMI_PHP);
    let gw = Site::unix(&fpm).start().await;
    let mut c = client(&gw);
    let first = whoami(&c.get("/whoami.php").await.expect("first"));
    for _ in 0..20 {
        let next = whoami(&c.get("/whoami.php").await.expect("next"));
        assert_eq!(next, first, "one kept unix connection, one worker");
    }
    let (_, pool) = pools(&gw).await;
    assert!(
        pool["address"].as_str().unwrap().starts_with("unix:"),
        "{pool}"
    );
    assert_eq!(figure(&pool["created"]), 1, "{pool}");
}

/// Story 4 itself: with FCGI_KEEP_CONN, 300 requests travel on a handful of
/// connections. php-fpm's own "accepted conn" counts requests, so PHP reports the
/// inode of the socket it was served on; the pool's `created` figure agrees.
#[tokio::test]
async fn connections_are_reused() {
    let fpm = PhpFpm::start(PhpFpmOptions {
        max_children: 2,
        ..PhpFpmOptions::default()
    })
    .await;
    fpm.script("whoami.php", WHOAMI_PHP);
    let gw = Site::tcp(&fpm).start().await;

    // One client after another, then two at once (no more than php-fpm's workers).
    let mut seen = BTreeSet::new();
    let mut c = client(&gw);
    for _ in 0..100 {
        seen.insert(whoami(&c.get("/whoami.php").await.expect("sequential")));
    }
    let tasks: Vec<_> = (0..2)
        .map(|_| {
            let mut c = client(&gw);
            tokio::spawn(async move {
                let mut seen = Vec::new();
                for _ in 0..100 {
                    let resp = c.get("/whoami.php?us=5000").await.expect("concurrent");
                    seen.push(whoami(&resp));
                }
                seen
            })
        })
        .collect();
    for t in tasks {
        seen.extend(t.await.expect("client task"));
    }
    let connections: BTreeSet<&String> = seen.iter().map(|(_, inode)| inode).collect();
    assert!(
        connections.len() <= 4,
        "300 requests on {} FastCGI connections: {seen:?}",
        connections.len()
    );
    let (_, pool) = pools(&gw).await;
    assert_eq!(
        figure(&pool["created"]),
        connections.len() as u64,
        "the pool's count agrees with PHP's: {pool}"
    );
    assert_eq!(
        figure(&pool["reused"]) + figure(&pool["created"]),
        300,
        "{pool}"
    );
}

/// A pool allowed 16 connections in front of 2 php-fpm workers. php-fpm gives each
/// open connection a worker until it closes, so 14 new connections wait in its accept
/// queue while 2 kept ones hold the workers; pooling those idle would starve the queue
/// until the idle timeout (60 s here). holdfast closes a connection instead of pooling
/// it while a new one waits for its first response, so a burst of 48 requests is
/// served promptly.
#[tokio::test]
async fn pool_larger_than_max_children_serves_a_burst() {
    let fpm = PhpFpm::start(PhpFpmOptions {
        max_children: 2,
        ..PhpFpmOptions::default()
    })
    .await;
    fpm.script("work.php", "<?php usleep(10000); echo 'done';");
    let gw = Site::tcp(&fpm)
        .tables(
            "[upstream.php.pool]\nmax_connections = 16\nmax_idle = 16\n\
             idle_timeout = \"60s\"\nqueue_timeout = \"20s\"\n\
             [upstream.php.timeouts]\nconnect = \"30s\"\n",
        )
        .start()
        .await;

    let started = Instant::now();
    let tasks: Vec<_> = (0..48)
        .map(|_| {
            let mut c = KeepAliveClient::new(gw.addr).with_timeout(Duration::from_secs(20));
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                for _ in 0..2 {
                    statuses.push(c.get("/work.php").await.map(|r| r.status));
                }
                statuses
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        for s in t.await.expect("client task") {
            assert_eq!(s.as_ref().ok(), Some(&200), "{s:?}");
            ok += 1;
        }
    }
    assert_eq!(ok, 96);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "96 requests of 10 ms on 2 workers took {:?}",
        started.elapsed()
    );
}

/// Scripts slower than the 50 ms after which a new connection may be waiting for a
/// worker, on a php-fpm with workers to spare: a new connection unanswered that long is
/// running its script. Taking it for one starved of a worker would close connections
/// for it, and the next request would open another: every request on a new
/// connection (story 4). The pool waits twice as long as answers usually take.
#[tokio::test]
async fn slow_scripts_keep_their_connections() {
    let fpm = PhpFpm::start(PhpFpmOptions {
        max_children: 4,
        ..PhpFpmOptions::default()
    })
    .await;
    fpm.script("slow.php", "<?php usleep(150000); echo 'done';");
    let gw = Site::tcp(&fpm).start().await;
    assert_eq!(get(&gw, "/slow.php").await.status, 200);

    // Two clients, the second starting while the first one's request runs, so that
    // it opens a connection of its own. The offset is the scenario, not a wait: 70 ms
    // into the 150 ms script, each client's answer then comes while the other's new
    // connection has waited longer than WORKER_WAIT (50 ms) but less than twice the
    // usual answer time, the window in which the pool must not take it for starved.
    let tasks: Vec<_> = (0..2u64)
        .map(|i| {
            let mut c = client(&gw);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(70 * i)).await;
                let mut statuses = Vec::new();
                for _ in 0..6 {
                    statuses.push(c.get("/slow.php").await.map(|r| r.status).ok());
                }
                statuses
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.expect("client task"), vec![Some(200); 6]);
    }
    let (_, pool) = pools(&gw).await;
    assert!(
        figure(&pool["created"]) <= 3,
        "13 requests from 2 clients opened {} connections: {pool}",
        figure(&pool["created"])
    );
}

/// An application that says how many connections it takes (`FCGI_MAX_CONNS`) gets no
/// more, even from a burst of first requests that arrive while holdfast still waits
/// for that answer: the cap takes back slots in use only as they come back, so
/// requests wait for the answer before taking one.
#[tokio::test]
async fn the_applications_connection_cap_holds_for_a_burst_of_first_requests() {
    let app = FastCgiApp::start_with(FastCgiAppOptions {
        max_conns: 2,
        values_delay: Duration::from_millis(300),
        ..FastCgiAppOptions::default()
    })
    .await;
    let root = holdfast_test::tempdir();
    let gw = Site {
        upstream: format!("fastcgi://{}", app.addr),
        root: root.path(),
        route: "check_file = false\nfallback = \"/index.php\"",
        tables: "",
    }
    .start()
    .await;
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let mut c = client(&gw);
            tokio::spawn(async move { c.get("/x").await.map(|r| r.status).ok() })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.expect("client task"), Some(200));
    }
    let (_, pool) = pools(&gw).await;
    assert_eq!(figure(&pool["max_connections"]), 2, "{pool}");
    assert!(
        app.connections.most_open() <= 2,
        "the application took {} connections at once: {pool}",
        app.connections.most_open()
    );
}

/// A reload that gives the address a new pool (a `pool.*` key changed) keeps what the
/// application said it takes: the new pool is capped at once, not from its first
/// request's question, which with every worker busy would wait in the application's
/// accept queue (and until then the old pool's waiting requests could have taken the
/// config's `max_connections`). Before, `/pools` showed the config's 256 after the
/// reload.
#[tokio::test]
async fn the_applications_connection_cap_holds_across_a_reload_that_replaces_the_pool() {
    let app = FastCgiApp::start(2, None).await;
    let root = holdfast_test::tempdir();
    let site = |queue_size: u32| {
        let tables = format!("[upstream.php.pool]\nqueue_size = {queue_size}\n");
        Site {
            upstream: format!("fastcgi://{}", app.addr),
            root: root.path(),
            route: "check_file = false\nfallback = \"/index.php\"",
            tables: &tables,
        }
        .toml()
    };
    let gw = support::start(&site(1024)).await;
    assert_eq!(get(&gw, "/x").await.status, 200);
    assert_eq!(figure(&pools(&gw).await.1["max_connections"]), 2);
    let before = gw.state.reloads.load(std::sync::atomic::Ordering::SeqCst);
    gw.send(holdfast::server::Control::Reload(Box::new(
        support::config(&site(1000)),
    )))
    .await;
    assert!(
        holdfast_test::wait_until(Duration::from_secs(5), || {
            gw.state.reloads.load(std::sync::atomic::Ordering::SeqCst) > before
        })
        .await,
        "the reload was applied"
    );
    let (_, pool) = pools(&gw).await;
    assert_eq!(figure(&pool["max_connections"]), 2, "{pool}");
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let mut c = client(&gw);
            tokio::spawn(async move { c.get("/x").await.map(|r| r.status).ok() })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.expect("client task"), Some(200));
    }
    assert!(
        app.connections.most_open() <= 2,
        "the application took {} connections at once",
        app.connections.most_open()
    );
}

/// The application is not up yet when the first request comes (holdfast started
/// first, or the application restarts): that request fails, but the question
/// about `FCGI_MAX_CONNS` is asked again once the application runs, and its cap holds.
#[tokio::test]
async fn the_applications_connection_cap_is_learned_when_it_comes_up_late() {
    // An address nobody listens on until the application starts there.
    let reserved = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = reserved.local_addr().expect("addr");
    drop(reserved);
    let root = holdfast_test::tempdir();
    let gw = Site {
        upstream: format!("fastcgi://{addr}"),
        root: root.path(),
        route: "check_file = false\nfallback = \"/index.php\"",
        tables: "",
    }
    .start()
    .await;
    let resp = get(&gw, "/x").await;
    assert_eq!(resp.status, 502, "nothing listens yet");

    let listener = tokio::net::TcpListener::bind(addr).await.expect("rebind");
    let _app = FastCgiApp::start_on(
        listener,
        FastCgiAppOptions {
            max_conns: 2,
            ..FastCgiAppOptions::default()
        },
    );
    assert_eq!(get(&gw, "/x").await.status, 200);
    let (_, pool) = pools(&gw).await;
    assert_eq!(figure(&pool["max_connections"]), 2, "{pool}");
}

// === logging ===

/// What PHP writes to FastCGI STDERR (`error_log()` without an error_log file) is
/// logged by holdfast with the address it came from. The binary runs as a child so
/// its real log output is checked.
#[tokio::test]
async fn fastcgi_stderr_goes_to_the_log() {
    let fpm = PhpFpm::start(PhpFpmOptions::default()).await;
    fpm.script(
        "warn.php",
        "<?php error_log('disk almost full: marker-7f3a'); echo 'ok';",
    );
    let port = holdfast_test::free_port();
    let config = format!(
        "[admin]\nenabled = false\n\n[[listener]]\nlisten = \"127.0.0.1:{port}\"\n\n{}",
        Site::tcp(&fpm).toml()
    );
    let hf = HoldfastProcess::spawn(
        Path::new(env!("CARGO_BIN_EXE_holdfast")),
        &["run"],
        Some(&config),
    );
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    assert!(
        wait_until_async(Duration::from_secs(10), || async {
            tokio::net::TcpStream::connect(addr).await.is_ok()
        })
        .await,
        "holdfast listens: {}",
        hf.logs()
    );
    let resp = KeepAliveClient::new(addr)
        .get("/warn.php")
        .await
        .expect("GET");
    assert_eq!((resp.status, resp.text().as_ref()), (200, "ok"));
    assert!(
        hf.wait_for_log(
            "FastCGI stderr: PHP message: disk almost full: marker-7f3a",
            Duration::from_secs(5)
        )
        .await,
        "{}",
        hf.logs()
    );
    let line = hf
        .logs()
        .lines()
        .find(|l| l.contains("marker-7f3a"))
        .map(str::to_owned)
        .unwrap_or_default();
    assert!(
        line.contains(&fpm.addr().to_string()),
        "names the address: {line}"
    );
}

// === a request as CGI params, a CGI response as HTTP ===

/// Serves one FastCGI request on `listener`: returns its params and STDIN, after
/// answering with `stdout` as the whole CGI response and END_REQUEST. A connection
/// asking GET_VALUES is closed unanswered.
async fn answer_one_request(
    listener: tokio::net::TcpListener,
    stdout: &'static [u8],
) -> (Vec<(String, String)>, Vec<u8>) {
    use bytes::BytesMut;
    use holdfast_fastcgi::record::{self, RecordType};
    use holdfast_fastcgi::{EndRequest, ProtocolStatus, RecordDecoder};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    // Bounded: GET_VALUES and the request, or a few stray connections at most.
    for _ in 0..4 {
        let (mut sock, _) = listener.accept().await.expect("accept");
        let mut buf = BytesMut::new();
        let mut decoder = RecordDecoder::new();
        let mut params = Vec::new();
        let mut stdin = Vec::new();
        let mut request = false;
        loop {
            match decoder.decode(&mut buf).expect("valid records") {
                Some(r) if r.kind == RecordType::BeginRequest => request = true,
                Some(r) if r.kind == RecordType::Params => params.extend_from_slice(&r.content),
                Some(r) if r.kind == RecordType::Stdin && r.content.is_empty() => break,
                Some(r) if r.kind == RecordType::Stdin => stdin.extend_from_slice(&r.content),
                Some(_) => {
                    request = false;
                    break;
                }
                None => {
                    if sock.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                        request = false;
                        break;
                    }
                }
            }
        }
        if !request {
            continue;
        }
        let mut out = BytesMut::new();
        record::encode_stream(&mut out, RecordType::Stdout, 1, stdout);
        record::encode_stream(&mut out, RecordType::Stdout, 1, b"");
        let end = EndRequest {
            app_status: 0,
            protocol_status: ProtocolStatus::RequestComplete,
        };
        record::encode_end_request(&mut out, 1, &end);
        sock.write_all(&out).await.expect("reply");
        let params = holdfast_fastcgi::params::decode_pairs(&params)
            .map(|pair| {
                let (n, v) = pair.expect("valid params");
                (
                    String::from_utf8_lossy(n).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            })
            .collect();
        return (params, stdin);
    }
    panic!("no FastCGI request arrived");
}

/// A holdfast in front of a scripted one-request application that answers `stdout`.
async fn scripted(
    root: &Path,
    stdout: &'static [u8],
) -> (
    Gateway,
    tokio::task::JoinHandle<(Vec<(String, String)>, Vec<u8>)>,
) {
    let app = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let site = Site {
        upstream: format!("fastcgi://{}", app.local_addr().expect("addr")),
        root,
        route: "check_file = false",
        tables: "",
    };
    let gw = site.start().await;
    (gw, tokio::spawn(answer_one_request(app, stdout)))
}

/// A chunked upload is read whole first so that CONTENT_LENGTH can be given; one
/// that ends with a trailer section must get its CONTENT_LENGTH too, or PHP reads
/// no body at all (no `$_POST`, an empty `php://input`) although STDIN carries it.
#[tokio::test]
async fn a_chunked_upload_with_trailers_keeps_its_content_length() {
    let fpm = PhpFpm::start(PhpFpmOptions::default()).await;
    fpm.script(
        "form.php",
        "<?php echo $_SERVER['CONTENT_LENGTH'], '|', file_get_contents('php://input'), '|',\n\
         $_POST['k'] ?? '-';",
    );
    let gw = Site::tcp(&fpm).start().await;
    for trailer in ["", "X-Checksum: abc\r\n"] {
        let mut conn = RawClient::connect(gw.addr).await.expect("connect");
        let head = "POST /form.php HTTP/1.1\r\nHost: t\r\n\
                    Content-Type: application/x-www-form-urlencoded\r\n\
                    Transfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n";
        conn.send(format!("{head}3\r\nk=v\r\n0\r\n{trailer}\r\n"))
            .await
            .expect("send");
        let resp = conn
            .read_response_for("POST", RESPONSE_TIMEOUT)
            .await
            .expect("response");
        assert_eq!(
            (resp.status, resp.text().as_ref()),
            (200, "3|k=v|v"),
            "trailer section {trailer:?}"
        );
    }
}

/// A CGI head whose Content-Length hyper cannot write (here PHP's
/// `header('Content-Length: ' . filesize($missing))`, an empty value) must be a 502
/// with a log line, as nginx answers "upstream sent invalid Content-Length"; hyper's
/// server instead drops the response and the client gets a closed connection.
#[tokio::test]
async fn an_invalid_content_length_from_the_application_is_a_502() {
    // The list of one value may be passed on as that value (as the HTTP/1 path
    // does) or refused; an empty or conflicting one must be refused.
    for (stdout, allowed) in [
        (
            &b"Content-Type: text/plain\r\nContent-Length: \r\n\r\nhello"[..],
            &[502][..],
        ),
        (
            b"Content-Type: text/plain\r\nContent-Length: 5, 5\r\n\r\nhello",
            &[200, 502],
        ),
        (
            b"Content-Type: text/plain\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
            &[502],
        ),
    ] {
        let (gw, app) = scripted(Path::new("/srv/none"), stdout).await;
        let mut conn = RawClient::connect(gw.addr).await.expect("connect");
        conn.send_request(&ClientRequest::get("/x.php"))
            .await
            .expect("send");
        let resp = conn.read_response(RESPONSE_TIMEOUT).await;
        app.await.expect("the application saw the request");
        assert!(
            resp.as_ref().is_ok_and(|r| allowed.contains(&r.status)),
            "{:?}: {resp:?}",
            String::from_utf8_lossy(stdout)
        );
    }
}

/// A CGI `Status` of 1xx cannot be a final HTTP response: it must be a 502. hyper's
/// HTTP/1 server turns it into its own 500 and closes; a 101 to a request that asked
/// for an upgrade is relayed and the connection then cut (FastCGI has no tunnel).
#[tokio::test]
async fn a_1xx_status_from_the_application_is_a_502() {
    for (stdout, upgrade) in [
        (
            &b"Status: 103 Early Hints\r\nLink: </a.css>\r\n\r\n"[..],
            false,
        ),
        (b"Status: 100 Continue\r\n\r\nbody", false),
        (
            b"Status: 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
            true,
        ),
    ] {
        let (gw, app) = scripted(Path::new("/srv/none"), stdout).await;
        let mut conn = RawClient::connect(gw.addr).await.expect("connect");
        let mut req = ClientRequest::get("/x.php");
        if upgrade {
            req = req
                .header("Connection", "Upgrade")
                .header("Upgrade", "websocket");
        }
        conn.send_request(&req).await.expect("send");
        app.await.expect("the application saw the request");
        // Whatever arrives until the connection closes (1xx included).
        let mut got = Vec::new();
        for _ in 0..16 {
            match conn.wait_close(RESPONSE_TIMEOUT).await {
                PeerClose::Data(b) => got.extend_from_slice(&b),
                _ => break,
            }
            if got.windows(4).any(|w| w == b"\r\n\r\n") && !upgrade {
                break;
            }
        }
        let text = String::from_utf8_lossy(&got);
        assert!(
            text.starts_with("HTTP/1.1 502"),
            "{:?}: {text}",
            String::from_utf8_lossy(stdout)
        );
    }
}

/// PHP reads a PUT body (or a POST without a form type) as the script reads
/// `php://input`, not before it runs. A script that answers as it reads (a
/// transcoder, an echo) fills its STDOUT while holdfast, writing STDIN, reads
/// none: both sides stall until the write timeout. nginx reads the upstream while
/// it sends.
#[tokio::test]
async fn a_script_answering_while_it_reads_its_upload_does_not_stall() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fpm = PhpFpm::start(PhpFpmOptions::default()).await;
    fpm.script(
        "echo.php",
        &format!(
            "<?php {NO_OB}\n\
             $in = fopen('php://input', 'rb');\n\
             while (!feof($in)) {{ echo fread($in, 65536); flush(); }}"
        ),
    );
    let gw = Site::tcp(&fpm)
        .tables("[upstream.php.timeouts]\nwrite = \"5s\"\n")
        .start()
        .await;
    let size = 16 << 20;
    let stream = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    let (mut rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        let head = format!(
            "PUT /echo.php HTTP/1.1\r\nHost: t\r\nContent-Length: {size}\r\n\
             Connection: close\r\n\r\n"
        );
        let _ = wr.write_all(head.as_bytes()).await;
        let _ = wr.write_all(&pattern(0, size)).await;
        wr
    });
    let started = Instant::now();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), rd.read_to_end(&mut got)).await;
    let _ = writer.await;
    let text = String::from_utf8_lossy(&got[..got.len().min(200)]).into_owned();
    assert!(read.is_ok(), "no end within 30 s: {text}");
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "after {:?}, {} bytes: {text}",
        started.elapsed(),
        got.len()
    );
    assert!(got.len() > size, "the whole echo: {} bytes", got.len());
}

/// php-fpm parses each PARAMS record on its own, so a name-value pair must not span
/// two records; one larger than a record (a header over 64 KiB, allowed by a
/// raised `max_header_bytes`) was split, and php-fpm dropped the request and its
/// connection: holdfast saw a stale connection, retried, and answered 502. Such a
/// request gets 431 instead, before anything is sent.
#[tokio::test]
async fn a_header_larger_than_a_params_record_is_not_a_502() {
    let fpm = PhpFpm::start(PhpFpmOptions::default()).await;
    fpm.script(
        "big.php",
        "<?php echo strlen($_SERVER['HTTP_X_BIG'] ?? '');",
    );
    let gw = Site::tcp(&fpm)
        .tables("\n[[listener]]\nlisten = \"127.0.0.1:0\"\nmax_header_bytes = \"256KiB\"\n")
        .start()
        .await;
    let req = ClientRequest::get("/big.php").header("X-Big", "a".repeat(70_000));
    let resp = send(&gw, &req).await;
    // Refused up front: php-fpm takes no pair longer than a record.
    assert_eq!(resp.status, 431, "{}", resp.text());
}

/// A response that has no body by its status (204, 304) or by its request's method
/// (HEAD) still ends with END_REQUEST on the FastCGI connection, after whatever STDOUT
/// the script wrote anyway: that connection is pooled again, not closed as if the
/// client had gone away (hyper's server never polls such a body).
#[tokio::test]
async fn bodiless_responses_keep_their_fastcgi_connection() {
    let fpm = PhpFpm::start(PhpFpmOptions::default()).await;
    fpm.script("hello.php", "<?php echo 'hello';");
    fpm.script(
        "fresh.php",
        "<?php header('ETag: \"x\"'); http_response_code(304); echo 'ignored';",
    );
    fpm.script("none.php", "<?php http_response_code(204); echo 'ignored';");
    let gw = Site::tcp(&fpm).start().await;
    let mut c = client(&gw);
    for (req, status, body) in [
        (ClientRequest::head("/hello.php"), 200, ""),
        (ClientRequest::get("/fresh.php"), 304, ""),
        (ClientRequest::get("/none.php"), 204, ""),
        (ClientRequest::get("/hello.php"), 200, "hello"),
    ] {
        let resp = c.send(&req).await.expect("response");
        assert_eq!(
            (resp.status, resp.text().as_ref()),
            (status, body),
            "{} {}",
            req.method,
            req.target
        );
        assert!(
            wait_until_async(Duration::from_secs(5), || async {
                figure(&pools(&gw).await.1["in_use"]) == 0
            })
            .await,
            "{} {}: the connection comes back",
            req.method,
            req.target
        );
    }
    let (_, pool) = pools(&gw).await;
    assert_eq!(figure(&pool["closed"]["abandoned"]), 0, "{pool}");
    assert_eq!(figure(&pool["open"]), figure(&pool["created"]), "{pool}");
    assert_eq!(
        figure(&pool["reused"]) + figure(&pool["created"]),
        4,
        "{pool}"
    );
}

/// A script that sends its own `Content-Length` (a download, `readfile` behind
/// `header('Content-Length: ...')`): hyper's server stops polling the body once that
/// many bytes went out, before holdfast has read END_REQUEST. The connection is
/// still pooled, not closed as if the client had gone away.
#[tokio::test]
async fn a_response_with_content_length_keeps_its_fastcgi_connection() {
    let fpm = PhpFpm::start(PhpFpmOptions::default()).await;
    fpm.script(
        "file.php",
        &format!(
            "<?php {NO_OB} $n = (int) $_GET['n']; header('Content-Length: ' . $n);\n\
             echo str_repeat('a', intdiv($n, 2)); flush(); echo str_repeat('b', $n - intdiv($n, 2));"
        ),
    );
    let gw = Site::tcp(&fpm).start().await;
    let mut c = client(&gw);
    let sizes = [5usize, 200_000, 1, 5];
    for n in sizes {
        let resp = c.get(&format!("/file.php?n={n}")).await.expect("response");
        assert_eq!(resp.status, 200);
        assert_eq!(resp.header("content-length"), Some(n.to_string().as_str()));
        assert_eq!(resp.body.len(), n);
        assert!(
            wait_until_async(Duration::from_secs(5), || async {
                figure(&pools(&gw).await.1["in_use"]) == 0
            })
            .await,
            "{n} bytes: the connection comes back"
        );
    }
    let (_, pool) = pools(&gw).await;
    assert_eq!(figure(&pool["closed"]["abandoned"]), 0, "{pool}");
    assert_eq!(figure(&pool["open"]), figure(&pool["created"]), "{pool}");
    assert_eq!(
        figure(&pool["reused"]) + figure(&pool["created"]),
        sizes.len() as u64,
        "{pool}"
    );
}

/// A FastCGI response is framed by END_REQUEST, not by the `Content-Length` its
/// script declares, and scripts get it wrong (a size taken before compression, a
/// `filesize` of another file). HTTP/2 forbids DATA that disagrees with the declared
/// length (RFC 9113 8.1.1: malformed, and an intermediary must not forward it): a
/// client's HTTP/2 stack refuses the whole response. More bytes than declared are cut
/// at the length, as hyper's HTTP/1 server does; fewer end in a reset stream, never
/// in END_STREAM.
#[tokio::test]
async fn an_http2_client_never_gets_data_disagreeing_with_the_declared_length() {
    use holdfast_test::h2 as frames;
    for (stdout, expect_ended) in [
        (
            &b"Content-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello world"[..],
            Some(5),
        ),
        (
            b"Content-Type: text/plain\r\nContent-Length: 20\r\n\r\nhello",
            None,
        ),
    ] {
        let app = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let upstream = format!("fastcgi://{}", app.local_addr().expect("addr"));
        let gw = Site {
            upstream,
            root: Path::new("/srv/none"),
            route: "check_file = false",
            tables: "\n[[listener]]\nlisten = \"127.0.0.1:0\"\nh2c = true\n",
        }
        .start()
        .await;
        let served = tokio::spawn(answer_one_request(app, stdout));
        let mut s = tokio::net::TcpStream::connect(gw.addr)
            .await
            .expect("connect");
        frames::start(&mut s).await.expect("preface");
        frames::send(&mut s, &[frames::get(1, "http", "t", "/x.php")])
            .await
            .expect("request");
        let (mut data, mut ended, mut reset) = (0, false, false);
        let until = Instant::now() + RESPONSE_TIMEOUT;
        // Bounded by the deadline and by the end of the stream or connection.
        while !ended && !reset {
            let Ok(Ok(Some(f))) = tokio::time::timeout_at(until, frames::read_frame(&mut s)).await
            else {
                break;
            };
            if f.is(frames::kind::SETTINGS) && !f.has(frames::flag::ACK) {
                frames::send(&mut s, &[frames::settings_ack()])
                    .await
                    .expect("ack");
            }
            if f.stream != 1 {
                continue;
            }
            if f.is(frames::kind::DATA) {
                data += f.payload.len();
            }
            if (f.is(frames::kind::DATA) || f.is(frames::kind::HEADERS))
                && f.has(frames::flag::END_STREAM)
            {
                ended = true;
            }
            reset |= f.is(frames::kind::RST_STREAM);
        }
        served.await.expect("the application saw the request");
        let what = String::from_utf8_lossy(stdout);
        match expect_ended {
            Some(n) => assert!(ended && data == n, "{what:?}: {data} bytes, ended {ended}"),
            None => assert!(reset && !ended, "{what:?}: {data} bytes, ended {ended}"),
        }
    }
}

/// PHP registers `$_SERVER` names as it registers any variable name: a `.` or a space
/// in one becomes `_`. A client field (`.` is allowed in a field name) `X.Real.IP` would be `HTTP_X.REAL.IP` to
/// php-fpm and `$_SERVER['HTTP_X_REAL_IP']` to the script, the field holdfast
/// removes from an untrusted client; `X.Forwarded.For` would pose as the
/// `X-Forwarded-For` holdfast sets. Like nginx (`ignore_invalid_headers`), holdfast
/// passes only fields named with letters, digits and `-`.
#[tokio::test]
async fn a_field_named_with_a_dot_cannot_pose_as_a_forwarding_field() {
    let fpm = PhpFpm::start(PhpFpmOptions::default()).await;
    fpm.script(
        "env.php",
        "<?php echo json_encode([$_SERVER['HTTP_X_REAL_IP'] ?? null,\n\
         $_SERVER['HTTP_X_FORWARDED_FOR'] ?? null, $_SERVER['HTTP_X_OTHER'] ?? null]);",
    );
    let gw = Site::tcp(&fpm).start().await;
    let resp = send(
        &gw,
        &ClientRequest::get("/env.php")
            .header("X.Real.IP", "6.6.6.6")
            .header("X.Forwarded.For", "6.6.6.6")
            .header("X-Other", "kept"),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.text(), r#"[null,"127.0.0.1","kept"]"#);
}

/// A pretty URL ending in `/` (WordPress's `/2024/01/hello/`) names a directory, not a
/// script: with no index file there, the front controller answers it, as nginx's
/// `try_files $uri $uri/ /index.php` does, not a 404. A directory with its own index
/// still runs that.
#[tokio::test]
async fn a_directory_path_without_an_index_goes_to_the_fallback() {
    let fpm = PhpFpm::start(PhpFpmOptions::default()).await;
    fpm.script(
        "index.php",
        "<?php echo 'front ', $_SERVER['SCRIPT_NAME'], ' ', $_SERVER['REQUEST_URI'];",
    );
    fpm.script("docs/index.php", "<?php echo 'docs index';");
    let gw = Site::tcp(&fpm)
        .route("fallback = \"/index.php\"")
        .start()
        .await;
    let resp = get(&gw, "/2024/01/hello/").await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.text(), "front /index.php /2024/01/hello/");
    assert_eq!(get(&gw, "/docs/").await.text(), "docs index");
    assert_eq!(get(&gw, "/missing.php").await.status, 404, "a script named");
}

/// A slow upload on a new connection keeps it unanswered for as long as the client
/// takes; php-fpm has workers to spare, so that is no sign of one starved of a worker.
/// Taken for one, every other connection would be closed as its answer ends, and
/// each request of another client would open a new connection for the whole upload
/// (story 4).
#[tokio::test]
async fn a_slow_upload_on_a_new_connection_does_not_close_everyone_elses() {
    let fpm = PhpFpm::start(PhpFpmOptions {
        max_children: 4,
        ..PhpFpmOptions::default()
    })
    .await;
    fpm.script("pid.php", "<?php echo getmypid();");
    fpm.script(
        "len.php",
        "<?php echo strlen(file_get_contents('php://input'));",
    );
    // Streamed uploads only: a body read whole first opens no connection until it is in.
    let gw = Site::tcp(&fpm)
        .route("request_buffering = false")
        .tables("retry.attempts = 1\n")
        .start()
        .await;

    // The first request: a streamed upload, on a new connection, its body held back.
    let mut uploader = RawClient::connect(gw.addr).await.expect("connect");
    uploader
        .send("POST /len.php HTTP/1.1\r\nhost: a.test\r\ncontent-length: 2000\r\n\r\n")
        .await
        .expect("head");
    uploader.send([b'x'; 1000]).await.expect("a piece");
    assert!(
        wait_until_async(RESPONSE_TIMEOUT, || async {
            figure(&pools(&gw).await.1["created"]) == 1
        })
        .await,
        "the upload's connection was opened"
    );
    // Longer than the 50 ms after which an unanswered new connection may be waiting
    // for a worker: the scenario, not a wait for an event.
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut other = client(&gw);
    for _ in 0..5 {
        let resp = other.get("/pid.php").await.expect("GET");
        assert_eq!(resp.status, 200);
    }
    uploader.send([b'x'; 1000]).await.expect("the rest");
    let resp = uploader
        .read_response(RESPONSE_TIMEOUT)
        .await
        .expect("upload answered");
    assert_eq!(resp.text(), "2000");
    let (_, pool) = pools(&gw).await;
    assert_eq!(
        figure(&pool["created"]),
        2,
        "5 requests beside one upload: {pool}"
    );
}

// === request buffering: the body read whole before the application sees it ===

/// A client that goes away mid-upload never runs the script. PHP runs a script on
/// whatever STDIN came when the connection ends early (it reads up to EOF, with no
/// error), so a body streamed to php-fpm and cut short ran the script on part of
/// the POST. holdfast reads a body whole before the request goes to the application
/// (`request_buffering`, nginx's default too): the cut body reaches no one. Both
/// ways a body is kept are tried: in memory, and past `body_memory` in a file.
#[tokio::test]
async fn a_client_gone_mid_upload_never_runs_the_script() {
    let fpm = PhpFpm::start(PhpFpmOptions {
        max_children: 1,
        ..PhpFpmOptions::default()
    })
    .await;
    let runs = fpm.www().join("runs");
    fpm.script(
        "save.php",
        &format!(
            "<?php file_put_contents('{runs}', strlen(file_get_contents('php://input')) . \"\\n\", FILE_APPEND);",
            runs = runs.display()
        ),
    );
    fpm.script("pid.php", "<?php echo getmypid();");
    // Streamed (without request buffering), the upload below goes upstream once
    // its first 64 KiB are in; with no retries its body is kept no longer.
    let gw = Site::tcp(&fpm).tables("retry.attempts = 1\n").start().await;
    for (len, sent) in [(60_000, 30_000), (300_000, 200_000)] {
        let mut uploader = RawClient::connect(gw.addr).await.expect("connect");
        uploader
            .send(format!(
                "POST /save.php HTTP/1.1\r\nhost: a.test\r\ncontent-length: {len}\r\n\r\n"
            ))
            .await
            .expect("head");
        uploader
            .send(vec![b'x'; sent])
            .await
            .expect("part of the body");
        drop(uploader);
    }
    gw.wait_metric("holdfast_client_connections", 0.0, RESPONSE_TIMEOUT)
        .await;
    // One worker: it has finished whatever it was given before it answers this.
    assert_eq!(get(&gw, "/pid.php").await.status, 200);
    assert_eq!(
        std::fs::read_to_string(&runs).unwrap_or_default(),
        "",
        "the script ran on a cut body"
    );
    let resp = send(&gw, &ClientRequest::post("/save.php", vec![b'y'; 300_000])).await;
    assert_eq!(resp.status, 200);
    assert_eq!(std::fs::read_to_string(&runs).unwrap(), "300000\n");
}

/// A slow upload holds no worker: with php-fpm's only worker, another client is
/// served while an upload is still arriving. Streamed, the upload took the worker
/// from its first bytes to its last, and the other client waited for its answer
/// until the upload ended (here: 504 after `response_headers`).
#[tokio::test]
async fn a_slow_upload_holds_no_worker() {
    let fpm = PhpFpm::start(PhpFpmOptions {
        max_children: 1,
        ..PhpFpmOptions::default()
    })
    .await;
    fpm.script("pid.php", "<?php echo getmypid();");
    fpm.script(
        "len.php",
        "<?php echo strlen(file_get_contents('php://input'));",
    );
    let gw = Site::tcp(&fpm)
        .tables("[upstream.php.timeouts]\nresponse_headers = \"3s\"\n")
        .start()
        .await;
    let size = 16 << 20;
    let mut uploader = RawClient::connect(gw.addr).await.expect("connect");
    uploader
        .send(format!(
            "PUT /len.php HTTP/1.1\r\nhost: a.test\r\ncontent-length: {size}\r\n\r\n"
        ))
        .await
        .expect("head");
    // Half the body: more than the sockets' buffers hold, so once it is written
    // someone has read it (holdfast, or, streamed, the worker).
    tokio::time::timeout(RESPONSE_TIMEOUT, uploader.send(pattern(0, size / 2)))
        .await
        .expect("half the body taken in time")
        .expect("half the body");
    let resp = get(&gw, "/pid.php").await;
    assert_eq!(
        resp.status,
        200,
        "served beside the upload: {}",
        resp.text()
    );
    uploader
        .send(pattern((size / 2) as u64, size / 2))
        .await
        .expect("the rest");
    let resp = uploader
        .read_response(RESPONSE_TIMEOUT)
        .await
        .expect("upload answered");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), size.to_string());
}

/// The spool file is holdfast's own: when it cannot be written (here its directory
/// was removed after the start; a full disk is the same) the upload gets 500 and a
/// log line, the application sees nothing, and smaller bodies, kept in memory, are
/// still served.
#[tokio::test]
async fn an_upload_that_cannot_be_spooled_gets_500_and_others_go_on() {
    let fpm = PhpFpm::start(PhpFpmOptions::default()).await;
    fpm.script(
        "len.php",
        "<?php echo strlen(file_get_contents('php://input'));",
    );
    let spool = holdfast_test::tempdir();
    let dir = spool.path().join("bodies");
    std::fs::create_dir(&dir).expect("spool dir");
    let route = format!("body_temp_dir = {dir:?}");
    let gw = Site::tcp(&fpm).route(&route).start().await;
    std::fs::remove_dir(&dir).expect("remove the spool dir");

    let resp = send(&gw, &ClientRequest::post("/len.php", vec![b'x'; 100_000])).await;
    assert_eq!(resp.status, 500, "{}", resp.text());
    let (_, pool) = pools(&gw).await;
    assert_eq!(figure(&pool["created"]), 0, "nothing went upstream: {pool}");
    let resp = send(&gw, &ClientRequest::post("/len.php", vec![b'x'; 1000])).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), "1000");
}

// === a worker retiring its connection: the request sent into the close ===

/// How the scripted application ends its first connection, after one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FirstConnEnd {
    /// As php-fpm retires a worker at `pm.max_requests`: once the next request has
    /// begun to arrive, `shutdown(SHUT_WR)`, then read and discard until holdfast
    /// closes. That request never runs.
    Retire,
    /// As a worker that dies running the next request: reads it whole (it may have
    /// run, so it counts as run) and closes the socket without a record.
    Die,
}

/// Reads one FastCGI request whole: its STDIN; `None` at EOF first, or for a
/// GET_VALUES (a connection asking that is closed unanswered).
async fn read_fastcgi_request<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut bytes::BytesMut,
    dec: &mut holdfast_fastcgi::RecordDecoder,
) -> Option<Vec<u8>> {
    use holdfast_fastcgi::record::RecordType;
    use tokio::io::AsyncReadExt;
    let mut stdin = Vec::new();
    loop {
        match dec.decode(buf).expect("valid records") {
            Some(r) if r.kind == RecordType::Stdin && r.content.is_empty() => return Some(stdin),
            Some(r) if r.kind == RecordType::Stdin => stdin.extend_from_slice(&r.content),
            Some(r) if r.kind == RecordType::GetValues => return None,
            Some(_) => {}
            None => {
                if s.read_buf(buf).await.unwrap_or(0) == 0 {
                    return None;
                }
            }
        }
    }
}

/// One connection of the scripted application: answers `ran <stdin>` to each
/// request, keeping the connection, and notes every request it ran in `runs`; the
/// first connection to carry a request takes `first` and ends after that request
/// as it says.
async fn serve_retiring<S>(
    mut s: S,
    first: std::sync::Arc<std::sync::Mutex<Option<FirstConnEnd>>>,
    runs: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use holdfast_fastcgi::record::{self, RecordType};
    use holdfast_fastcgi::{EndRequest, ProtocolStatus, RecordDecoder};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = bytes::BytesMut::new();
    let mut dec = RecordDecoder::new();
    let mut ending = None;
    let mut requests = 0;
    while let Some(stdin) = read_fastcgi_request(&mut s, &mut buf, &mut dec).await {
        requests += 1;
        if requests == 1 {
            ending = first.lock().unwrap().take();
        }
        let stdin = String::from_utf8_lossy(&stdin).into_owned();
        runs.lock().unwrap().push(stdin.clone());
        let mut out = bytes::BytesMut::new();
        let cgi = format!("Status: 200 OK\r\nContent-Type: text/plain\r\n\r\nran {stdin}");
        record::encode_stream(&mut out, RecordType::Stdout, 1, cgi.as_bytes());
        record::encode_stream(&mut out, RecordType::Stdout, 1, b"");
        let end = EndRequest {
            app_status: 0,
            protocol_status: ProtocolStatus::RequestComplete,
        };
        record::encode_end_request(&mut out, 1, &end);
        if s.write_all(&out).await.is_err() {
            return;
        }
        match ending {
            None => {}
            Some(FirstConnEnd::Retire) => {
                // The next request is on its way before the worker lets go.
                if buf.is_empty() && s.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                    return;
                }
                let _ = s.shutdown().await;
                let mut sink = [0u8; 1024];
                while s.read(&mut sink).await.is_ok_and(|n| n > 0) {}
                return;
            }
            Some(FirstConnEnd::Die) => {
                if let Some(next) = read_fastcgi_request(&mut s, &mut buf, &mut dec).await {
                    runs.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&next).into_owned());
                }
                return;
            }
        }
    }
}

/// Two POSTs through holdfast to a scripted application on `transport` ("tcp" or
/// "unix") whose first connection ends as `end` after the first request: the
/// statuses, and the requests the application ran.
async fn post_twice_into_a_connection_end(
    transport: &str,
    end: FirstConnEnd,
) -> (Vec<u16>, Vec<String>) {
    post_into_a_connection_end(transport, end, ["one", "two"].map(String::from)).await
}

/// As [`post_twice_into_a_connection_end`], with the two bodies given.
async fn post_into_a_connection_end(
    transport: &str,
    end: FirstConnEnd,
    bodies: [String; 2],
) -> (Vec<u16>, Vec<String>) {
    let runs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let first = std::sync::Arc::new(std::sync::Mutex::new(Some(end)));
    let dir = holdfast_test::tempdir();
    let upstream;
    let app = if transport == "unix" {
        let path = dir.path().join("app.sock");
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        upstream = format!("fastcgi+unix://{}", path.display());
        let (runs, first) = (runs.clone(), first.clone());
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(serve_retiring(s, first.clone(), runs.clone()));
            }
        })
    } else {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        upstream = format!("fastcgi://{}", listener.local_addr().expect("addr"));
        let (runs, first) = (runs.clone(), first.clone());
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(serve_retiring(s, first.clone(), runs.clone()));
            }
        })
    };
    let site = Site {
        upstream,
        root: dir.path(),
        route: "check_file = false",
        tables: "",
    };
    let gw = site.start().await;
    let mut statuses = Vec::new();
    for body in bodies {
        let resp = send(&gw, &ClientRequest::post("/x.php", body.clone())).await;
        if resp.status == 200 {
            assert_eq!(resp.body, format!("ran {body}"), "{transport} {end:?}");
        }
        statuses.push(resp.status);
    }
    app.abort();
    let runs = runs.lock().unwrap().clone();
    (statuses, runs)
}

/// php-fpm retires a worker at `pm.max_requests` right after its last request's
/// END_REQUEST: `shutdown(SHUT_WR)` on the kept connection, then it reads and
/// discards until the web server closes. A POST written into that window was never
/// run; holdfast sees the worker still reading (a Unix socket takes the write of an
/// ABORT_REQUEST, TCP acknowledges it) and sends the POST again on a new
/// connection, where it runs once. Before, it was a 502 (the request "may have been
/// sent"), under load dozens in 3,000 POSTs.
#[tokio::test]
async fn a_post_sent_as_a_worker_retires_its_connection_runs_once_on_another() {
    for transport in ["tcp", "unix"] {
        let (statuses, runs) =
            post_twice_into_a_connection_end(transport, FirstConnEnd::Retire).await;
        assert_eq!(statuses, [200, 200], "{transport}");
        assert_eq!(runs, ["one", "two"], "{transport}: each ran once");
    }
}

/// The other side of the rule above: a worker that dies running a request (it read
/// it whole, so it may have run it) closes its socket whole, with no record. A POST
/// is then not sent again (502): a second run could repeat what the first did.
#[tokio::test]
async fn a_post_whose_worker_died_running_it_is_not_sent_again() {
    for transport in ["tcp", "unix"] {
        let (statuses, runs) = post_twice_into_a_connection_end(transport, FirstConnEnd::Die).await;
        assert_eq!(statuses, [200, 502], "{transport}");
        assert_eq!(runs, ["one", "two"], "{transport}: run once, not again");
    }
}

/// A body longer than the memory part of request buffering waits in a file, and is
/// read from the file again for another attempt: a long POST sent as a worker
/// retires runs once on another connection too. (Streamed, it could not be sent
/// again: 502.)
#[tokio::test]
async fn a_long_post_sent_as_a_worker_retires_runs_once_on_another() {
    let long = format!("two{}", "x".repeat(200_000));
    for transport in ["tcp", "unix"] {
        let (statuses, runs) = post_into_a_connection_end(
            transport,
            FirstConnEnd::Retire,
            ["one".into(), long.clone()],
        )
        .await;
        assert_eq!(statuses, [200, 200], "{transport}");
        assert_eq!(runs.len(), 2, "{transport}: each ran once");
        assert_eq!(runs[0], "one");
        assert!(runs[1] == long, "{transport}: the long body whole");
    }
}

/// `timeouts.total` runs from the request's start, its upload included: an upload
/// that outlasts it gets 504 at the deadline, and the application sees none of it.
/// The body read whole first, the deadline had passed by the time the request went
/// out: a PUT was written to an idle connection, then cut by the deadline, and PHP
/// ran the script anyway (on the whole body when it went with the head, on an empty
/// one when it was read back from its spool file).
#[tokio::test]
async fn an_upload_that_outlasts_the_total_timeout_runs_no_script() {
    let fpm = PhpFpm::start(PhpFpmOptions {
        max_children: 1,
        ..PhpFpmOptions::default()
    })
    .await;
    let runs = fpm.www().join("runs");
    fpm.script(
        "save.php",
        &format!(
            "<?php file_put_contents('{runs}', strlen(file_get_contents('php://input')) . \"\\n\", FILE_APPEND);",
            runs = runs.display()
        ),
    );
    fpm.script("pid.php", "<?php echo getmypid();");
    let total = Duration::from_millis(800);
    let tables = format!(
        "[upstream.php.pool]\nidle_timeout = \"60s\"\n[upstream.php.timeouts]\ntotal = \"{}ms\"\n",
        total.as_millis()
    );
    let gw = Site::tcp(&fpm).tables(&tables).start().await;
    // PUTs: an idempotent request takes an idle connection at once, unchecked.
    for len in [1_000, 300_000] {
        // An idle connection to take.
        assert_eq!(get(&gw, "/pid.php").await.status, 200);
        let mut uploader = RawClient::connect(gw.addr).await.expect("connect");
        uploader
            .send(format!(
                "PUT /save.php HTTP/1.1\r\nhost: a.test\r\ncontent-length: {len}\r\n\r\n"
            ))
            .await
            .expect("head");
        uploader.send(vec![b'x'; len / 2]).await.expect("half");
        // The deadline passes while the body is still arriving (the time is the event).
        tokio::time::sleep(total + Duration::from_millis(200)).await;
        // The rest may meet a close: holdfast answered already.
        let _ = uploader.send(vec![b'x'; len - len / 2]).await;
        let resp = uploader
            .read_response(RESPONSE_TIMEOUT)
            .await
            .expect("answered");
        assert_eq!(resp.status, 504, "{len}: {}", resp.text());
        // One worker: it has finished whatever it was given before it answers this.
        assert_eq!(get(&gw, "/pid.php").await.status, 200);
        assert_eq!(
            std::fs::read_to_string(&runs).unwrap_or_default(),
            "",
            "{len}: the script ran after the deadline, on what STDIN came"
        );
    }
}

/// A client that leaves once its whole body is in, while the application is still
/// reading it, never has the script run on part of it: the body, held whole, is
/// written to its end before the connection closes. PHP reads a PUT's body as the
/// script reads `php://input`; holdfast, its request dropped with the client (499),
/// closed the connection at once, and the script took the part that had gone out
/// (233,144 of 4 MiB bytes) for the body.
#[tokio::test]
async fn a_client_gone_while_its_spooled_body_goes_out_never_runs_the_script_on_part() {
    let fpm = PhpFpm::start(PhpFpmOptions {
        max_children: 1,
        ..PhpFpmOptions::default()
    })
    .await;
    let runs = fpm.www().join("runs");
    let started = fpm.www().join("started");
    let go = fpm.www().join("go");
    fpm.script(
        "put.php",
        &format!(
            "<?php touch('{started}');
            for ($i = 0; $i < 1000 && !file_exists('{go}'); $i++) {{ usleep(10000); }}
            file_put_contents('{runs}', strlen(file_get_contents('php://input')) . \"\\n\", FILE_APPEND);",
            started = started.display(),
            go = go.display(),
            runs = runs.display()
        ),
    );
    fpm.script("pid.php", "<?php echo getmypid();");
    let gw = Site::unix(&fpm).start().await;
    let size = 4 << 20;
    let mut uploader = RawClient::connect(gw.addr).await.expect("connect");
    uploader
        .send(format!(
            "PUT /put.php HTTP/1.1\r\nhost: a.test\r\ncontent-length: {size}\r\n\r\n"
        ))
        .await
        .expect("head");
    uploader.send(vec![b'x'; size]).await.expect("the body");
    assert!(
        wait_until_async(RESPONSE_TIMEOUT, || async { started.exists() }).await,
        "the script started"
    );
    // The body is whole in holdfast; the script has read none of it yet.
    drop(uploader);
    gw.wait_metric("holdfast_client_connections", 0.0, RESPONSE_TIMEOUT)
        .await;
    std::fs::write(&go, "").expect("go");
    // One worker: it has finished the script before it answers this.
    assert_eq!(get(&gw, "/pid.php").await.status, 200);
    assert_eq!(
        std::fs::read_to_string(&runs).unwrap_or_default(),
        format!("{size}\n"),
        "the script ran on part of the body"
    );
    // The connection that finished the body gave its slot back.
    assert!(
        wait_until_async(RESPONSE_TIMEOUT, || async {
            figure(&pools(&gw).await.1["in_use"]) == 0
        })
        .await,
        "a slot still held: {}",
        pools(&gw).await.1
    );
}

/// A request for no script is answered before its body is read: with request
/// buffering the whole body (up to `max_body_bytes`) was read, and past
/// `body_memory` written to disk, before the 404; a client asking
/// `Expect: 100-continue` was told to send it all first.
#[tokio::test]
async fn an_upload_to_no_script_gets_404_before_its_body_is_read() {
    let fpm = PhpFpm::start(PhpFpmOptions::default()).await;
    let gw = Site::tcp(&fpm).start().await;
    for expect in ["", "expect: 100-continue\r\n"] {
        let mut uploader = RawClient::connect(gw.addr).await.expect("connect");
        uploader
            .send(format!(
                "POST /missing.php HTTP/1.1\r\nhost: a.test\r\ncontent-length: 50000000\r\n{expect}\r\n"
            ))
            .await
            .expect("head");
        // No byte of the body is sent.
        let resp = uploader
            .read_response(RESPONSE_TIMEOUT)
            .await
            .expect("answered without the body");
        assert_eq!(resp.status, 404, "{expect:?}: {}", resp.text());
    }
    let (_, pool) = pools(&gw).await;
    assert_eq!(figure(&pool["created"]), 0, "nothing went upstream: {pool}");
    // A chunked body's length is known only once it is in: given then, spooled too.
    fpm.script(
        "len.php",
        "<?php echo $_SERVER['CONTENT_LENGTH'], ' ', strlen(file_get_contents('php://input'));",
    );
    let mut conn = RawClient::connect(gw.addr).await.expect("connect");
    conn.send(format!(
        "PUT /len.php HTTP/1.1\r\nhost: a.test\r\ntransfer-encoding: chunked\r\n\r\n\
         30d40\r\n{}\r\n0\r\n\r\n",
        "x".repeat(200_000)
    ))
    .await
    .expect("send");
    let resp = conn
        .read_response(RESPONSE_TIMEOUT)
        .await
        .expect("answered");
    assert_eq!((resp.status, resp.text().as_ref()), (200, "200000 200000"));
}

/// A body held whole (spooled, `request_buffering` on by default) goes out as STDIN
/// as the script reads it: PHP reads a PUT body as the script reads `php://input`. A
/// script that takes its upload slowly (a WebDAV PUT streamed on to slow storage) is
/// still being sent its request when `timeouts.response_headers` has passed from the
/// head; the time counts from the body's end, as README says, not from the head.
/// Before, the client got 504 while the body still went out, and the script then ran
/// to its end on the rest (written by `finish_held_body`): an upload that succeeded
/// was reported failed.
#[tokio::test]
async fn a_held_body_the_script_reads_slowly_is_timed_for_its_answer_from_its_end() {
    let fpm = PhpFpm::start(PhpFpmOptions::default()).await;
    fpm.script(
        "slow.php",
        "<?php $in = fopen('php://input', 'rb'); $n = 0; $next = 65536;\n\
         while (!feof($in)) {\n\
             $n += strlen(fread($in, 65536));\n\
             if ($n >= $next) { usleep(50000); $next += 65536; }\n\
         }\n\
         echo $n;",
    );
    let gw = Site::unix(&fpm)
        .tables("retry.attempts = 1\n[upstream.php.timeouts]\nresponse_headers = \"1s\"\n")
        .start()
        .await;
    // 50 ms for each 64 KiB read: ~3 s, far past what the unix socket buffers.
    let size = 4 << 20;
    let req = ClientRequest::new("PUT", "/slow.php").body(pattern(0, size));
    let started = Instant::now();
    let resp = send(&gw, &req).await;
    assert_eq!(
        (resp.status, resp.text().as_ref()),
        (200, size.to_string().as_str()),
        "after {:?}",
        started.elapsed()
    );
}

/// A FastCGI connection holdfast cannot reuse after its answer (here a record after
/// END_REQUEST; likewise an answer that ends before its request's STDIN is all
/// written) is closed by holdfast as not poolable. It was counted as
/// `closed_by_upstream_idle`, the application closing an idle connection, which it
/// never did: the figure operators read to tune `idle_timeout` grew, and the
/// histogram of idle ages at the application's close got a 0.
#[tokio::test]
async fn a_connection_unusable_after_its_answer_is_not_counted_as_closed_by_the_application() {
    use bytes::BytesMut;
    use holdfast_fastcgi::record::{self, RecordType};
    use holdfast_fastcgi::{EndRequest, ProtocolStatus, RecordDecoder};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let app = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let site = Site {
        upstream: format!("fastcgi://{}", app.local_addr().expect("addr")),
        root: Path::new("/srv"),
        route: "check_file = false",
        tables: "",
    };
    let (kept_tx, kept_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        // Bounded: GET_VALUES (closed unanswered) and the request's connection.
        for _ in 0..4 {
            let (mut sock, _) = app.accept().await.expect("accept");
            let mut buf = BytesMut::new();
            let mut decoder = RecordDecoder::new();
            let request = loop {
                match decoder.decode(&mut buf).expect("valid records") {
                    Some(r) if r.kind == RecordType::Stdin && r.content.is_empty() => break true,
                    Some(r) if r.kind == RecordType::GetValues => break false,
                    Some(_) => {}
                    None => {
                        if sock.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                            break false;
                        }
                    }
                }
            };
            if !request {
                continue;
            }
            let mut out = BytesMut::new();
            record::encode_stream(
                &mut out,
                RecordType::Stdout,
                1,
                b"Content-Type: text/plain\r\n\r\nok",
            );
            record::encode_stream(&mut out, RecordType::Stdout, 1, b"");
            let end = EndRequest {
                app_status: 0,
                protocol_status: ProtocolStatus::RequestComplete,
            };
            record::encode_end_request(&mut out, 1, &end);
            // A stray record after the request's end.
            record::encode_stream(&mut out, RecordType::Stdout, 1, b"late");
            sock.write_all(&out).await.expect("reply");
            // The connection stays open on this side.
            let _ = kept_tx.send(sock);
            return;
        }
    });
    let gw = site.start().await;
    let resp = get(&gw, "/index.php").await;
    assert_eq!((resp.status, resp.text().as_ref()), (200, "ok"));
    let mut sock = tokio::time::timeout(RESPONSE_TIMEOUT, kept_rx)
        .await
        .expect("the request arrived")
        .expect("the application kept its side");
    // holdfast closes it (the application never does).
    let mut rest = Vec::new();
    tokio::time::timeout(RESPONSE_TIMEOUT, sock.read_to_end(&mut rest))
        .await
        .expect("holdfast closes the connection")
        .expect("read");
    let (_, pool) = pools(&gw).await;
    assert_eq!(
        figure(&pool["closed"]["closed_by_upstream_idle"]),
        0,
        "{pool}"
    );
    assert_eq!(figure(&pool["closed"]["not_poolable"]), 1, "{pool}");
}
