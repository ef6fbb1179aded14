//! The pool's state machine under random sequences of checkouts, releases, drops and
//! the passing of time, on real (in-process) connections.

use std::collections::HashSet;
use std::time::Duration;

use proptest::prelude::*;
use tokio::net::UnixStream;

use super::idle::Take;
use super::*;
use crate::upstream::http1;

#[derive(Debug, Clone)]
enum Op {
    Checkout(u8),
    Release(usize),
    Drop(usize),
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..3).prop_map(Op::Checkout),
        3 => (0usize..8).prop_map(Op::Release),
        1 => (0usize..8).prop_map(Op::Drop),
        2 => (0u64..1500).prop_map(Op::Advance),
    ]
}

const MAX: usize = 4;
const MAX_IDLE: usize = 3;
const IDLE: Duration = Duration::from_millis(1000);

fn settings() -> PoolSettings {
    PoolSettings {
        max_connections: MAX,
        max_idle: MAX_IDLE,
        idle_timeout: IDLE,
        max_requests: None,
        max_lifetime: None,
        // A full pool answers at once, so no step of the test waits.
        queue_size: 0,
        queue_timeout: Duration::from_millis(1),
        learn: true,
        free_workers: false,
        h2_connections: 1,
        h2_idle_timeout: None,
    }
}

/// An HTTP/1 connection over a socket pair; the far ends are kept open (and never
/// written), so connections only close when the pool closes them.
async fn connect(far_ends: Arc<Mutex<Vec<UnixStream>>>) -> Result<Connected, UpstreamError> {
    let (near, far) = UnixStream::pair()
        .map_err(|e| UpstreamError::new(Kind::ConnectFailed, Delivery::NotSent).with_cause(e))?;
    far_ends.lock().unwrap().push(far);
    Ok(http1::connected(Stream::unix(near), Duration::from_secs(5)))
}

async fn settle() {
    for _ in 0..4 {
        tokio::task::yield_now().await;
    }
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let pool = Pool::new("test".into(), settings());
        let far_ends = Arc::new(Mutex::new(Vec::new()));
        let mut held: Vec<PooledConn> = Vec::new();
        for op in ops {
            match op {
                Op::Checkout(kind) => {
                    let want = match kind {
                        0 => Want::Idle(Take::MostRecent),
                        1 => Want::Idle(Take::IdleAtMost(Duration::from_millis(300))),
                        _ => Want::Fresh,
                    };
                    let full = held.len() == MAX;
                    let got = pool
                        .checkout(want, kind == 1, || connect(far_ends.clone()))
                        .await;
                    match got {
                        Ok(c) => {
                            prop_assert!(!full, "a slot was handed out beyond max_connections");
                            let id = c.conn_id();
                            prop_assert!(
                                held.iter().all(|h| h.conn_id() != id),
                                "connection {id} used twice"
                            );
                            if let Some(since) = c.reused_since() {
                                prop_assert!(since.elapsed() < IDLE, "handed out past its expiry");
                                if kind == 1 {
                                    prop_assert!(since.elapsed() <= Duration::from_millis(300));
                                }
                                prop_assert!(kind != 2, "Want::Fresh got a reused connection");
                            }
                            held.push(c);
                        }
                        Err(e) => {
                            prop_assert!(full, "checkout failed with room: {e}");
                            prop_assert_eq!(e.kind(), Kind::QueueFull);
                        }
                    }
                }
                Op::Release(i) if !held.is_empty() => {
                    held.remove(i % held.len()).release(Instant::now())
                }
                Op::Drop(i) if !held.is_empty() => drop(held.remove(i % held.len())),
                Op::Advance(ms) => tokio::time::advance(Duration::from_millis(ms)).await,
                _ => {}
            }
            settle().await;
            let snap = pool.snapshot();
            prop_assert_eq!(snap.in_use, held.len(), "slots leaked or double-freed");
            prop_assert_eq!(
                snap.open,
                held.len() + snap.idle,
                "an open connection is neither held nor idle"
            );
            prop_assert!(snap.open <= MAX);
            prop_assert!(snap.idle <= MAX_IDLE);
            let ids: HashSet<u64> = held.iter().map(PooledConn::conn_id).collect();
            prop_assert_eq!(ids.len(), held.len());
        }
        held.clear();
        settle().await;
        let snap = pool.snapshot();
        prop_assert_eq!(snap.in_use, 0);
        prop_assert_eq!(pool.slots.available(), MAX, "a slot leaked");
        // Everything idle expires in the background.
        tokio::time::advance(IDLE + Duration::from_millis(1)).await;
        settle().await;
        prop_assert_eq!(
            pool.snapshot().open,
            0,
            "an idle connection outlived its expiry"
        );
        Ok(())
    })
}

/// A checked-out plain HTTP/1 connection over a socket pair, with its far end.
async fn exchange_on(pool: &Arc<Pool>) -> (PooledConn, UnixStream) {
    let far_ends = Arc::new(Mutex::new(Vec::new()));
    let conn = pool
        .checkout(Want::Idle(Take::MostRecent), false, || {
            connect(far_ends.clone())
        })
        .await
        .expect("checkout");
    let far = far_ends.lock().unwrap().pop().expect("far end");
    (conn, far)
}

fn http1(conn: &mut PooledConn) -> &mut http1::conn::Http1Conn {
    match conn.client() {
        Client::Http1(h1) => h1,
        _ => unreachable!("a plain HTTP/1 connection"),
    }
}

/// Sends `GET /` (written as the response is first polled).
fn begin_get(conn: &mut PooledConn) {
    let (parts, ()) = http::Request::get("/")
        .header(http::header::HOST, "up")
        .body(())
        .expect("request")
        .into_parts();
    http1(conn)
        .begin(&parts, None, crate::body::RequestBody::Empty)
        .expect("begin");
}

async fn read_head(conn: &mut PooledConn) {
    let resp = std::future::poll_fn(|cx| http1(conn).poll_response(cx))
        .await
        .expect("response");
    assert_eq!(resp.status(), 200);
}

/// Reads the rest of the response; returns its body's length.
async fn read_body(conn: &mut PooledConn) -> usize {
    let mut total = 0;
    while let Some(frame) = std::future::poll_fn(|cx| http1(conn).poll_body(cx)).await {
        total += frame.expect("body").into_data().map_or(0, |d| d.len());
    }
    total
}

/// The upstream's idle timer starts once it has written its answer; behind a slow
/// client the end waits unread in socket buffers (or in the upstream's own send buffer,
/// held there by flow control, written long before it arrives). The pool dates a
/// connection idle from when its answer began to arrive, so one read later than the
/// idle timeout after that is not pooled; one read promptly is.
#[tokio::test(start_paused = true)]
async fn a_response_read_late_leaves_its_connection_idle_since_it_arrived() {
    use tokio::io::AsyncWriteExt;
    const BODY: usize = 64 * 1024;
    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {BODY}\r\n\r\n");
    let mut response = head.clone().into_bytes();
    response.resize(head.len() + BODY, b'x');
    let late = IDLE + Duration::from_millis(500);

    let pool = Pool::new("test".into(), settings());
    let (mut conn, mut far) = exchange_on(&pool).await;
    begin_get(&mut conn);
    // The upstream answers at once (the socket buffers hold it all).
    far.write_all(&response).await.expect("respond");
    read_head(&mut conn).await;
    // The client takes longer than the idle timeout to take the body.
    tokio::time::advance(late).await;
    assert_eq!(read_body(&mut conn).await, BODY);
    conn.release(Instant::now());
    settle().await;
    assert_eq!(pool.snapshot().idle, 0, "pooled as if freshly idle");
    assert_eq!(pool.figures.closed_count(CloseReason::IdleExpired), 1);
    drop(far);

    // The answer's second half arrives later than the idle timeout, read as it
    // arrives: it may have waited in the upstream's send buffer, so it does not date
    // the end of the writing; the answer's start does.
    let (mut conn, mut far) = exchange_on(&pool).await;
    begin_get(&mut conn);
    let half = head.len() + BODY / 2;
    far.write_all(&response[..half]).await.expect("first half");
    read_head(&mut conn).await;
    let rest = response[half..].to_vec();
    let writer = tokio::spawn(async move {
        tokio::time::sleep(late).await;
        far.write_all(&rest).await.expect("second half");
        far
    });
    assert_eq!(read_body(&mut conn).await, BODY);
    drop(writer.await.expect("writer"));
    conn.release(Instant::now());
    settle().await;
    assert_eq!(pool.snapshot().idle, 0, "dated by a late burst");
    assert_eq!(pool.figures.closed_count(CloseReason::IdleExpired), 2);

    // Read promptly: pooled, and handed out again as idle since its answer.
    let (mut conn, mut far) = exchange_on(&pool).await;
    begin_get(&mut conn);
    far.write_all(&response).await.expect("respond");
    let answered = Instant::now();
    read_head(&mut conn).await;
    assert_eq!(read_body(&mut conn).await, BODY);
    tokio::time::advance(Duration::from_millis(300)).await;
    conn.release(Instant::now());
    settle().await;
    assert_eq!(pool.snapshot().idle, 1, "read promptly: reusable");
    let again = pool
        .checkout(Want::Idle(Take::MostRecent), false, || async {
            unreachable!("the idle connection is reused")
        })
        .await
        .expect("checkout");
    // Kept in µs since the process's clock base, which another test (on another
    // paused clock) may have set: up to 1 µs early.
    let since = again.reused_since().expect("reused");
    assert!(
        since <= answered && answered - since < Duration::from_micros(1),
        "idle since {since:?}, not since its answer at {answered:?}"
    );
    drop(far);
}

/// A connection is counted idle from when its answer began to arrive, for expiry and
/// reuse; but when the upstream then closes it, the idle age learned from is taken
/// from when the answer had been read in full, the latest the upstream's timer may
/// have started: a learned idle timeout errs short, never long.
#[tokio::test(start_paused = true)]
async fn an_upstream_close_is_learned_from_the_short_idle_age() {
    use tokio::io::AsyncWriteExt;
    let response = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
    let pool = Pool::new("test".into(), settings());
    let (mut conn, mut far) = exchange_on(&pool).await;
    begin_get(&mut conn);
    far.write_all(response).await.expect("respond");
    read_head(&mut conn).await;
    tokio::time::advance(Duration::from_millis(400)).await;
    assert_eq!(read_body(&mut conn).await, 5);
    conn.release(Instant::now());
    settle().await;
    assert_eq!(pool.snapshot().idle, 1, "within the idle timeout: pooled");

    tokio::time::advance(Duration::from_millis(300)).await;
    far.shutdown().await.expect("FIN"); // the upstream closes it while idle
    for _ in 0..100 {
        if pool.snapshot().idle == 0 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(
        pool.figures.closed_count(CloseReason::ClosedByUpstreamIdle),
        1
    );
    let ages = pool.figures.idle_age_at_upstream_close.snapshot();
    assert_eq!(ages.count(), 1);
    assert!(
        (0.299..0.301).contains(&ages.sum_secs),
        "learned from idle age {} s, not 0.3 s",
        ages.sum_secs
    );
    drop(far);
}

/// An upstream that closes as the connection is checked in closed it right after its
/// answer (a request limit) only if the answer was read promptly; behind a slow client
/// it may as well be its idle timeout, and nothing is learned from it.
#[tokio::test(start_paused = true)]
async fn a_close_at_check_in_is_learned_from_only_after_a_prompt_read() {
    use tokio::io::AsyncWriteExt;
    let response = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
    let pool = Pool::new("test".into(), settings());
    let ages = || pool.figures.idle_age_at_upstream_close.snapshot().count();
    for (read_for, learned) in [(Duration::from_millis(700), 0), (Duration::ZERO, 1)] {
        let (mut conn, mut far) = exchange_on(&pool).await;
        begin_get(&mut conn);
        far.write_all(response).await.expect("respond");
        far.shutdown().await.expect("FIN"); // the upstream closes after its answer
        read_head(&mut conn).await;
        tokio::time::advance(read_for).await;
        assert_eq!(read_body(&mut conn).await, 5);
        conn.release(Instant::now());
        settle().await;
        assert_eq!(pool.snapshot().idle, 0, "closed, not pooled");
        assert_eq!(ages(), learned, "answer read for {read_for:?}");
        drop(far);
    }
    assert_eq!(
        pool.figures.closed_count(CloseReason::ClosedByUpstreamIdle),
        2
    );
}

/// A FastCGI application may close a connection right after its answer (php-fpm at
/// `pm.max_requests`). If its idle watch sees that before the connection is checked in,
/// the watch ends with nothing listed to remove, so the check-in itself must notice and
/// not list a dead connection for the next request.
#[tokio::test(start_paused = true)]
async fn a_fastcgi_connection_closed_before_its_check_in_is_not_listed() {
    use holdfast_fastcgi::record::{self, RecordType};
    use holdfast_fastcgi::{EndRequest, ProtocolStatus, RecordDecoder};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let pool = Pool::new("test".into(), settings());
    let (near, mut far) = UnixStream::pair().expect("socket pair");
    let mut conn = pool
        .checkout(Want::Idle(Take::MostRecent), false, || async move {
            Ok(crate::upstream::fastcgi::connected(
                Stream::unix(near),
                Duration::from_secs(5),
                "test".into(),
            ))
        })
        .await
        .expect("checkout");
    // The application: reads the request up to its empty STDIN, answers, closes.
    let app = tokio::spawn(async move {
        let (mut buf, mut decoder) = (bytes::BytesMut::new(), RecordDecoder::new());
        loop {
            match decoder.decode(&mut buf).expect("a valid request") {
                Some(r) if r.kind == RecordType::Stdin && r.content.is_empty() => break,
                Some(_) => continue,
                None => assert!(far.read_buf(&mut buf).await.expect("read") > 0),
            }
        }
        let mut out = bytes::BytesMut::new();
        record::encode_stream(&mut out, RecordType::Stdout, 1, b"Status: 200 OK\r\n\r\nok");
        record::encode_stream(&mut out, RecordType::Stdout, 1, b"");
        let end = EndRequest {
            app_status: 0,
            protocol_status: ProtocolStatus::RequestComplete,
        };
        record::encode_end_request(&mut out, 1, &end);
        far.write_all(&out).await.expect("answer");
    });
    let Client::FastCgi(f) = conn.client() else {
        unreachable!("a FastCGI connection")
    };
    f.send(&[], crate::body::RequestBody::Empty)
        .await
        .map_err(|(e, _)| e)
        .expect("response head");
    while let Some(chunk) = std::future::poll_fn(|cx| f.poll_body(cx)).await {
        chunk.expect("body");
    }
    app.await.expect("application"); // its end of the socket is closed now
    // The idle watch sees the close before the check-in.
    for _ in 0..100 {
        if f.is_closed() {
            break;
        }
        tokio::task::yield_now().await;
    }
    conn.release(Instant::now());
    settle().await;
    assert_eq!(
        pool.snapshot().idle,
        0,
        "a closed connection was listed idle"
    );
    assert_eq!(
        pool.figures.closed_count(CloseReason::ClosedByUpstreamIdle),
        1
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn pool_state_machine_holds_its_invariants(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops)?;
    }
}

/// Every connection ever opened is open or counted closed (`/pools`: created = open +
/// closed), whatever await a checkout is cancelled at.
fn closed_total(pool: &Pool) -> u64 {
    CloseReason::ALL
        .iter()
        .map(|r| pool.figures.closed_count(*r))
        .sum()
}

/// One exchange (`GET /`, a 5-byte answer read at once) on a new connection; the
/// connection is checked in, the far end kept.
/// Checks out a new hyper HTTP/1.1 connection (as over TLS, on socket pairs), starts
/// an exchange on it that is never answered, and releases it: it is listed idle while
/// hyper's dispatcher is still busy. Returns what must live as long as the test needs
/// it: the socket's far end, the I/O's far end, and the exchange.
async fn release_a_busy_hyper_connection(
    pool: &Arc<Pool>,
) -> (UnixStream, UnixStream, impl Future + use<>) {
    let (near, far) = UnixStream::pair().expect("pair");
    let (io, io_far) = UnixStream::pair().expect("pair");
    let mut conn = pool
        .checkout(Want::Fresh, false, || async move {
            crate::upstream::http1::handshake_on(io, Arc::new(Stream::unix(near))).await
        })
        .await
        .expect("checkout");
    let Client::Http1Tls(sender) = conn.client() else {
        unreachable!("hyper's client")
    };
    let in_flight = sender.send_request(http::Request::new(crate::body::RequestBody::Empty));
    conn.release(Instant::now());
    settle().await;
    (far, io_far, in_flight)
}

async fn one_exchange_new(pool: &Arc<Pool>) -> UnixStream {
    use tokio::io::AsyncWriteExt;
    let far_ends = Arc::new(Mutex::new(Vec::new()));
    let mut conn = pool
        .checkout(Want::Fresh, false, || connect(far_ends.clone()))
        .await
        .expect("checkout");
    let mut far = far_ends.lock().unwrap().pop().expect("far end");
    begin_get(&mut conn);
    far.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        .await
        .expect("respond");
    read_head(&mut conn).await;
    assert_eq!(read_body(&mut conn).await, 5);
    conn.release(Instant::now());
    settle().await;
    far
}

/// Story 1a: the upstream's FIN has arrived while the connection sat idle, but its
/// driver has not run since (here it cannot: one thread, and no await between the FIN
/// and the checkout). A request that cannot be retried (a POST without key) must not
/// go out on it: the look at the socket before reuse catches the close, counts it
/// (`stale_caught`), and a new connection is opened instead.
#[tokio::test]
async fn a_close_not_yet_seen_by_the_driver_is_caught_before_reuse() {
    let pool = Pool::new("test".into(), settings());
    let far = one_exchange_new(&pool).await;
    assert_eq!(pool.snapshot().idle, 1);
    socket2::SockRef::from(&far)
        .shutdown(std::net::Shutdown::Write)
        .expect("FIN");
    let far_ends = Arc::new(Mutex::new(Vec::new()));
    let conn = pool
        .checkout(Want::Idle(Take::IdleAtMost(IDLE)), true, || {
            connect(far_ends.clone())
        })
        .await
        .expect("checkout");
    assert_eq!(
        pool.figures.stale_caught.load(Relaxed),
        1,
        "the closed connection was handed out"
    );
    assert_eq!(pool.figures.reused.load(Relaxed), 0);
    assert_eq!(pool.figures.created.load(Relaxed), 2, "a new one instead");
    assert_eq!(
        pool.figures.closed_count(CloseReason::ClosedByUpstreamIdle),
        1
    );
    drop(conn);
    drop(far);
}

/// Response desync: an upstream sends something after a complete answer (a stray
/// second response, a body longer than its `Content-Length` in a later segment) while
/// the connection sits idle. tokio's reactor has taken the event in, but the
/// connection's driver has not run since (here: one thread, and the checkout comes
/// first). A retryable request takes no peek, and must not take this connection
/// either: it would read the stray response as the answer to its own request.
#[tokio::test]
async fn stray_bytes_the_reactor_saw_keep_an_idle_connection_from_reuse() {
    let pool = Pool::new("test".into(), settings());
    let far = one_exchange_new(&pool).await;
    assert_eq!(pool.snapshot().idle, 1);
    let stray = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray";
    assert_eq!(
        socket2::SockRef::from(&far)
            .send(stray)
            .expect("stray response"),
        stray.len()
    );
    // The reactor takes the event in as the test's task yields, and the test's task
    // runs again before the driver's.
    tokio::task::yield_now().await;
    assert_eq!(pool.snapshot().idle, 1, "the driver has not run yet");
    let far_ends = Arc::new(Mutex::new(Vec::new()));
    let conn = pool
        .checkout(Want::Idle(Take::MostRecent), false, || {
            connect(far_ends.clone())
        })
        .await
        .expect("checkout");
    assert!(
        !conn.is_reused(),
        "handed out a connection with a stray response waiting on it"
    );
    assert_eq!(pool.figures.stale_caught.load(Relaxed), 1);
    assert_eq!(pool.figures.created.load(Relaxed), 2, "a new one instead");
    drop(conn);
    drop(far);
}

/// HTTP/1.1 over TLS (hyper's client): the upstream may close the connection right
/// after its answer, and hyper's driver, on another worker, end between the check-in's
/// first look (`retire_reason`) and the listing. Its `on_driver_end` then finds nothing
/// listed to remove, so the look under the pool's lock (`Client::park`, which the
/// driver's end takes too) must see the end, or a dead connection is listed idle: its
/// descriptor held and a `max_idle` place taken until its expiry, and when a checkout
/// finds it, an idle close learned at the age it had then rather than at 0 (three such,
/// and a bogus idle timeout). The race needs two threads at one instant; this is its
/// second half: a connection whose driver has ended is not parked.
#[tokio::test]
async fn a_hyper_connection_whose_driver_ended_is_not_parked() {
    let (near, _far) = UnixStream::pair().expect("pair");
    let (io, io_far) = UnixStream::pair().expect("pair");
    let connected = crate::upstream::http1::handshake_on(io, Arc::new(Stream::unix(near)))
        .await
        .expect("handshake");
    let mut client = connected.client;
    let driver = tokio::spawn(connected.driver);
    drop(io_far); // the upstream closes
    tokio::time::timeout(Duration::from_secs(5), driver)
        .await
        .expect("the driver ends")
        .expect("driver task");
    assert_eq!(
        client.park().err(),
        Some(CloseReason::ClosedByUpstreamIdle),
        "a connection whose driver ended was parked"
    );
}

/// A reused HTTP/1.1-over-TLS connection waits for hyper to be ready; a client that
/// goes away meanwhile (a deadline, a vanished client) drops the checkout there. The
/// connection it had taken off the idle list is closed, and must be counted closed.
#[tokio::test(start_paused = true)]
async fn a_checkout_cancelled_while_waiting_for_hyper_counts_the_connection_closed() {
    let pool = Pool::new("test".into(), settings());
    // hyper is still busy with an exchange (its end not yet seen by its dispatcher;
    // here: never answered), so `ready` waits.
    let _busy = release_a_busy_hyper_connection(&pool).await;
    assert_eq!(pool.snapshot().idle, 1);
    let cancelled = tokio::time::timeout(
        Duration::from_millis(50),
        pool.checkout(Want::Idle(Take::MostRecent), false, || async {
            unreachable!("the idle connection is taken")
        }),
    )
    .await;
    assert!(cancelled.is_err(), "the checkout waits for hyper");
    settle().await;
    let snap = pool.snapshot();
    assert_eq!((snap.open, snap.idle, snap.in_use), (0, 0, 0));
    assert_eq!(
        pool.figures.created.load(Relaxed),
        snap.open as u64 + closed_total(&pool),
        "created = open + closed drifted: the dropped connection was never counted closed"
    );
}

/// An upstream restart (or a graceful shutdown closing idle connections, story 1b's
/// server) closes every idle connection at one instant. That is one event, not
/// evidence of a per-connection request limit: two connections that had each served
/// one request and were closed together (at different idle ages, which a per-connection
/// rule would not do) must not teach `max_requests = 1`, which
/// would end keep-alive to the address for good.
#[tokio::test(start_paused = true)]
async fn an_upstream_restart_does_not_teach_a_request_limit() {
    use tokio::io::AsyncWriteExt;
    let pool = Pool::new("test".into(), settings());
    let mut fars = Vec::new();
    for _ in 0..2 {
        fars.push(one_exchange_new(&pool).await);
        tokio::time::advance(Duration::from_millis(50)).await;
    }
    assert_eq!(pool.snapshot().idle, 2);
    // Idle for 150 and 100 ms (prompt closes, < 250 ms) when the restart comes.
    // The restart: every connection closed at once.
    for far in &mut fars {
        far.shutdown().await.expect("FIN");
    }
    for _ in 0..100 {
        if pool.snapshot().idle == 0 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(pool.snapshot().idle, 0);
    assert_eq!(
        pool.snapshot().learned_max_requests,
        None,
        "one restart taught a request limit"
    );
    // And the next connection is pooled as before.
    let _far = one_exchange_new(&pool).await;
    assert_eq!(
        pool.snapshot().idle,
        1,
        "keep-alive ended by what was learned"
    );
}

/// A restart closing three idle connections, two of which went idle together: the
/// first close is one sample, the second (a different age at the same instant) shows
/// the event, and the third, of the second's age, belongs to the same event: it is
/// not a second sample, so two connections that had each served one request teach no
/// request limit, whichever order their closes are seen in.
#[tokio::test(start_paused = true)]
async fn an_upstream_restart_teaches_one_sample_whatever_order_its_closes_come_in() {
    use tokio::io::AsyncWriteExt;
    let pool = Pool::new("test".into(), settings());
    let mut fars = vec![one_exchange_new(&pool).await];
    tokio::time::advance(Duration::from_millis(50)).await;
    fars.push(one_exchange_new(&pool).await);
    fars.push(one_exchange_new(&pool).await);
    tokio::time::advance(Duration::from_millis(100)).await;
    assert_eq!(pool.snapshot().idle, 3);
    // Idle for 150, 100 and 100 ms (prompt closes) when the restart closes them all,
    // seen in that order.
    for (seen, far) in (1..).zip(&mut fars) {
        far.shutdown().await.expect("FIN");
        for _ in 0..100 {
            if closed_total(&pool) == seen {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(closed_total(&pool), seen, "the close was seen");
    }
    assert_eq!(pool.snapshot().idle, 0);
    assert_eq!(
        pool.snapshot().learned_max_requests,
        None,
        "one restart taught a request limit"
    );
}

/// A request limit of R means no connection serves more than R requests. Two restarts
/// apart, each closing a connection moments after its first request, gave two prompt
/// closes after one request "in a row", and taught `max_requests = 1` (keep-alive
/// ended for good), although between them a connection had served two requests and
/// been kept: that connection contradicts the first close as a request limit.
#[tokio::test(start_paused = true)]
async fn a_connection_kept_after_more_requests_is_no_request_limit_learned_below() {
    use tokio::io::AsyncWriteExt;
    let response = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
    let pool = Pool::new("test".into(), settings());
    let closed_by_upstream = || pool.figures.closed_count(CloseReason::ClosedByUpstreamIdle);
    // A restart closes a connection that served one request, moments after.
    let mut far = one_exchange_new(&pool).await;
    far.shutdown().await.expect("FIN");
    for _ in 0..100 {
        if closed_by_upstream() == 1 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(closed_by_upstream(), 1);
    drop(far);
    tokio::time::advance(Duration::from_secs(1)).await;

    // Then a connection serves two requests and is kept.
    let mut far = one_exchange_new(&pool).await;
    let mut conn = pool
        .checkout(Want::Idle(Take::MostRecent), false, || async {
            unreachable!("the idle connection is reused")
        })
        .await
        .expect("checkout");
    begin_get(&mut conn);
    far.write_all(response).await.expect("respond");
    read_head(&mut conn).await;
    assert_eq!(read_body(&mut conn).await, 5);
    conn.release(Instant::now());
    settle().await;
    assert_eq!(pool.snapshot().idle, 1, "kept after two requests");
    tokio::time::advance(Duration::from_secs(1)).await;

    // Another restart closes a new connection moments after its one request.
    let mut other = one_exchange_new(&pool).await;
    other.shutdown().await.expect("FIN");
    for _ in 0..100 {
        if closed_by_upstream() == 2 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(closed_by_upstream(), 2);
    assert_eq!(
        pool.snapshot().learned_max_requests,
        None,
        "a request limit of 1 learned after a connection served 2"
    );
    drop(far);
}

/// Likewise for idle closes: three restarts, each closing the one idle connection (idle
/// 1.0, 1.5 and 1.2 s: within a factor of 2), taught an idle timeout of 0.8 s, although
/// between the first two a connection idle for 1.6 s had been reused and answered. A
/// connection that outlived a close's idle age voids it as a sample of the upstream's
/// idle timeout.
#[tokio::test(start_paused = true)]
async fn a_connection_reused_after_a_longer_idle_is_no_idle_timeout_learned_below() {
    use tokio::io::AsyncWriteExt;
    let response = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
    let pool = Pool::new(
        "test".into(),
        PoolSettings {
            idle_timeout: Duration::from_secs(10),
            ..settings()
        },
    );
    let closed_by_upstream = || pool.figures.closed_count(CloseReason::ClosedByUpstreamIdle);
    let close = async |far: &mut UnixStream, n: u64| {
        far.shutdown().await.expect("FIN");
        for _ in 0..100 {
            if closed_by_upstream() == n {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(closed_by_upstream(), n, "close {n} seen");
    };
    // A restart closes the one idle connection, idle for 1 s.
    let mut far = one_exchange_new(&pool).await;
    tokio::time::advance(Duration::from_millis(1000)).await;
    close(&mut far, 1).await;

    // A connection idle for 1.6 s is reused, and answers.
    let mut far = one_exchange_new(&pool).await;
    tokio::time::advance(Duration::from_millis(1600)).await;
    let mut conn = pool
        .checkout(Want::Idle(Take::MostRecent), false, || async {
            unreachable!("the idle connection is reused")
        })
        .await
        .expect("checkout");
    begin_get(&mut conn);
    far.write_all(response).await.expect("respond");
    read_head(&mut conn).await;
    assert_eq!(read_body(&mut conn).await, 5);
    conn.release(Instant::now());
    settle().await;
    assert_eq!(pool.snapshot().idle, 1);

    // Two more restarts, closing a connection idle for 1.5 s, then one idle for 1.2 s.
    tokio::time::advance(Duration::from_millis(1500)).await;
    close(&mut far, 2).await;
    let mut far = one_exchange_new(&pool).await;
    tokio::time::advance(Duration::from_millis(1200)).await;
    close(&mut far, 3).await;
    let snap = pool.snapshot();
    assert_eq!(
        (snap.effective_idle_timeout, snap.idle_timeout_source),
        (Duration::from_secs(10), IdleSource::Config),
        "an idle timeout below what a reused connection outlived"
    );
}

/// Likewise, idle connections of different ages closed together by a restart say
/// nothing about the upstream's idle timeout.
#[tokio::test(start_paused = true)]
async fn an_upstream_restart_does_not_teach_an_idle_timeout() {
    use tokio::io::AsyncWriteExt;
    let pool = Pool::new("test".into(), settings());
    let mut fars = Vec::new();
    for _ in 0..3 {
        fars.push(one_exchange_new(&pool).await);
        tokio::time::advance(Duration::from_millis(100)).await;
    }
    assert_eq!(pool.snapshot().idle, 3);
    tokio::time::advance(Duration::from_millis(200)).await;
    // Idle for 500, 400 and 300 ms: the restart closes them all at once.
    for far in &mut fars {
        far.shutdown().await.expect("FIN");
    }
    for _ in 0..100 {
        if pool.snapshot().idle == 0 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(pool.snapshot().idle, 0);
    let snap = pool.snapshot();
    assert_eq!(
        (snap.effective_idle_timeout, snap.idle_timeout_source),
        (IDLE, IdleSource::Config),
        "one restart taught an idle timeout"
    );
}

/// A connection whose answer a slow client took long to read is checked in late; the
/// upstream's idle timer ran meanwhile, and its idle close can come moments after the
/// check-in. That close is not "right after the response" (the answer began to arrive
/// long before): it may as well be the idle timeout, and two of them must not teach a
/// request limit, which would end keep-alive to the address for good.
#[tokio::test(start_paused = true)]
async fn an_idle_close_soon_after_a_slow_read_does_not_teach_a_request_limit() {
    use tokio::io::AsyncWriteExt;
    let response = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
    let pool = Pool::new("test".into(), settings());
    for round in 0..2 {
        let (mut conn, mut far) = exchange_on(&pool).await;
        assert!(!conn.is_reused(), "a new connection each round");
        begin_get(&mut conn);
        far.write_all(response).await.expect("respond");
        read_head(&mut conn).await;
        // The client takes 600 ms over the body: within the idle timeout, so pooled.
        tokio::time::advance(Duration::from_millis(600)).await;
        assert_eq!(read_body(&mut conn).await, 5);
        conn.release(Instant::now());
        settle().await;
        assert_eq!(pool.snapshot().idle, 1, "round {round}: pooled");
        // The upstream's idle timer, started as it wrote the answer, fires 100 ms
        // after the check-in.
        tokio::time::advance(Duration::from_millis(100)).await;
        far.shutdown().await.expect("FIN");
        for _ in 0..100 {
            if pool.snapshot().idle == 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(pool.snapshot().idle, 0, "round {round}: the close was seen");
        drop(far);
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    assert_eq!(
        pool.figures.closed_count(CloseReason::ClosedByUpstreamIdle),
        2
    );
    assert_eq!(
        pool.snapshot().learned_max_requests,
        None,
        "idle closes after slow reads taught a request limit"
    );
}

/// Likewise for a reused connection that fails before any response byte moments after
/// its check-in: after a slow read of its last answer, that close is no evidence of a
/// request limit.
#[tokio::test(start_paused = true)]
async fn a_stale_reuse_soon_after_a_slow_read_does_not_teach_a_request_limit() {
    let pool = Pool::new("test".into(), settings());
    for _ in 0..2 {
        let answer_began = Instant::now();
        tokio::time::advance(Duration::from_millis(600)).await;
        let settled = Instant::now();
        tokio::time::advance(Duration::from_millis(50)).await;
        pool.on_stale(answer_began, settled, settled.elapsed(), 1);
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    assert_eq!(pool.snapshot().learned_max_requests, None);
    // Read promptly, the same failures do tell of a request limit.
    for _ in 0..2 {
        let answer_began = Instant::now();
        tokio::time::advance(Duration::from_millis(5)).await;
        let settled = Instant::now();
        tokio::time::advance(Duration::from_millis(50)).await;
        pool.on_stale(answer_began, settled, settled.elapsed(), 1);
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    assert_eq!(pool.snapshot().learned_max_requests, Some(1));
}

/// `Keep-Alive: timeout=N` is the word of the server that sent it, about the connection
/// it came on. Behind one address, servers may say different things (a rolling update
/// changing the setting, a balancer in front of several): a connection whose answer
/// said `timeout=2` expires a margin before 2 s, even when an answer on another
/// connection has since said `timeout=60` and the configured idle timeout is longer.
#[tokio::test(start_paused = true)]
async fn a_connection_expires_before_the_timeout_its_own_answer_announced() {
    use tokio::io::AsyncWriteExt;
    let pool = Pool::new(
        "test".into(),
        PoolSettings {
            idle_timeout: Duration::from_secs(30),
            ..settings()
        },
    );
    let answer = |secs: u64| {
        format!("HTTP/1.1 200 OK\r\nKeep-Alive: timeout={secs}\r\nContent-Length: 2\r\n\r\nok")
    };
    let mut fars = Vec::new();
    let mut conns = Vec::new();
    for secs in [2, 60] {
        let (mut conn, mut far) = exchange_on(&pool).await;
        begin_get(&mut conn);
        far.write_all(answer(secs).as_bytes())
            .await
            .expect("respond");
        read_head(&mut conn).await;
        conn.on_response_head(&http::HeaderMap::new(), http::Version::HTTP_11);
        assert_eq!(read_body(&mut conn).await, 2);
        conns.push(conn);
        fars.push(far);
    }
    assert_eq!(pool.snapshot().open, 2, "two connections");
    for conn in conns {
        conn.release(Instant::now());
    }
    settle().await;
    assert_eq!(pool.snapshot().idle, 2);
    // 2 s less the 500 ms margin: the first one's own upstream is about to close it.
    tokio::time::advance(Duration::from_millis(1600)).await;
    settle().await;
    assert_eq!(
        pool.snapshot().idle,
        1,
        "kept past the margin before the timeout its upstream announced"
    );
    assert_eq!(pool.figures.closed_count(CloseReason::IdleExpired), 1);
    drop(fars);
}

/// A checkout may wait on an idle connection (hyper finishing its last exchange) and
/// then find it dead; the next idle connection it looks at is judged by the clock
/// then, not by the clock when the checkout began: a request that cannot be retried
/// must not get one that has meanwhile gone past the idle age it allows.
#[tokio::test(start_paused = true)]
async fn a_checkout_that_waited_judges_the_next_idle_connection_by_the_time_now() {
    let pool = Pool::new(
        "test".into(),
        PoolSettings {
            idle_timeout: Duration::from_secs(30),
            ..settings()
        },
    );
    let _older = one_exchange_new(&pool).await;
    tokio::time::advance(Duration::from_millis(10)).await;
    // The most recent idle connection: hyper's, still busy with an exchange.
    let (_far, io_far, _in_flight) = release_a_busy_hyper_connection(&pool).await;
    assert_eq!(pool.snapshot().idle, 2);

    let max_age = Duration::from_millis(300);
    let far_ends = Arc::new(Mutex::new(Vec::new()));
    let checkout = tokio::spawn({
        let pool = pool.clone();
        let far_ends = far_ends.clone();
        async move {
            pool.checkout(Want::Idle(Take::IdleAtMost(max_age)), true, || {
                connect(far_ends)
            })
            .await
            .map(|c| (c.reused_since(), Instant::now()))
        }
    });
    settle().await;
    assert!(!checkout.is_finished(), "the checkout waits for hyper");
    tokio::time::advance(Duration::from_secs(1)).await;
    drop(io_far); // hyper's connection ends: not ready after all
    let (reused_since, handed_at) = tokio::time::timeout(Duration::from_secs(5), checkout)
        .await
        .expect("checkout ends")
        .expect("task")
        .expect("checkout");
    if let Some(since) = reused_since {
        assert!(
            handed_at - since <= max_age,
            "handed out a connection idle for {:?}, over {max_age:?}",
            handed_at - since
        );
    }
}

/// A client's body streamed to holdfast (hyper's, over an in-process connection):
/// 5 bytes announced, 2 sent, the rest never. Keep the client end open while the body
/// is used.
async fn streamed_body() -> (crate::body::RequestBody, tokio::io::DuplexStream) {
    use tokio::io::AsyncWriteExt;
    let (mut client, server) = tokio::io::duplex(4096);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let tx = Mutex::new(Some(tx));
    tokio::spawn(async move {
        let service =
            hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                if let Some(tx) = tx.lock().unwrap().take() {
                    let _ = tx.send(req.into_body());
                }
                std::future::pending::<Result<http::Response<String>, std::convert::Infallible>>()
            });
        let io = hyper_util::rt::TokioIo::new(server);
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(io, service)
            .await;
    });
    client
        .write_all(b"POST / HTTP/1.1\r\nhost: up\r\ncontent-length: 5\r\n\r\nab")
        .await
        .expect("client request");
    let incoming = rx.await.expect("request body");
    let body = crate::body::RequestBody::stream(incoming, 0, Duration::ZERO);
    assert!(matches!(body, crate::body::RequestBody::Streaming(_)));
    (body, client)
}

/// A connection whose far end closed before a byte of the request was written (the
/// upstream reset it in the moment between the pool's check and the write): the
/// write fails with nothing sent, and a streamed body, which no copy was kept of,
/// must come back for the attempt on another connection.
#[tokio::test]
async fn an_http1_head_that_could_not_be_written_gives_its_streamed_body_back() {
    let pool = Pool::new("test".into(), settings());
    let (mut conn, far) = exchange_on(&pool).await;
    drop(far);
    let (body, _client) = streamed_body().await;
    let (parts, ()) = http::Request::post("/")
        .header(http::header::HOST, "up")
        .header(http::header::CONTENT_LENGTH, "5")
        .body(())
        .expect("request")
        .into_parts();
    let due = crate::upstream::http1::conn::HeadDue {
        timeout: Duration::from_secs(5),
        total: None,
    };
    let sent = crate::upstream::send_http1(&mut conn, &parts, None, body, Instant::now(), due);
    let Ok(sent) = sent.await else {
        panic!("timed out")
    };
    let Err((e, returned)) = sent else {
        panic!("a response from a closed connection")
    };
    assert_eq!(e.delivery(), Delivery::NotSent, "{e}");
    assert!(
        matches!(returned, Some(crate::body::RequestBody::Streaming(_))),
        "the body was not given back"
    );
}

/// A FastCGI connection whose far end closed before a byte of the request was
/// written (the application reset it in the moment between the pool's check and the
/// write): the first write, refused with nothing written, is "not sent"
/// (a POST may go again on another connection), and the body comes back.
#[tokio::test]
async fn a_fastcgi_request_refused_before_its_first_byte_is_not_sent_and_keeps_its_body() {
    let (near, far) = UnixStream::pair().expect("socket pair");
    drop(far);
    let Client::FastCgi(mut f) = crate::upstream::fastcgi::connected(
        Stream::unix(near),
        Duration::from_secs(5),
        "test".into(),
    )
    .client
    else {
        unreachable!("a FastCGI connection")
    };
    let (body, _client) = streamed_body().await;
    let params = [(
        bytes::Bytes::from_static(b"REQUEST_METHOD"),
        bytes::Bytes::from_static(b"POST"),
    )];
    let Err((e, returned)) = f.send(&params, body).await else {
        panic!("a response from a closed connection")
    };
    assert_eq!(e.delivery(), Delivery::NotSent, "{e}");
    assert_eq!(e.kind(), Kind::Closed, "{e}");
    assert!(
        matches!(returned, Some(crate::body::RequestBody::Streaming(_))),
        "the body was not given back"
    );
}
