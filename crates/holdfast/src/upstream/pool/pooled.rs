//! A connection checked out for one request ([`PooledConn`]): what the request
//! learns about the connection on the way (its response head, how it ended), and the
//! one way back to the pool, [`PooledConn::release`]. Anything else closes it.

use std::sync::Arc;

use tokio::time::Instant;

use super::learn::KeepAliveHint;
use super::shared::Lease;
use super::slots::SlotHeld;
use super::{Client, Conn, Pool};
use crate::body::{BodyEnd, BodyFailure};
use crate::upstream::figures::CloseReason;

/// What the response head said about the connection's future.
#[derive(Debug, Clone, Copy, Default)]
pub struct ResponseHint {
    pub connection_close: bool,
    pub keep_alive: KeepAliveHint,
}

/// A connection checked out for one request. Dropping it closes the connection;
/// [`PooledConn::release`] is the only way back to the pool.
pub struct PooledConn {
    conn: Option<Conn>,
    /// HTTP/2: a stream on a shared connection instead of `conn`.
    lease: Option<Lease>,
    pool: Arc<Pool>,
    /// Holds one of the pool's slots, given back as it drops (after the connection
    /// closed, so that the slot cannot open another one before the upstream sees the
    /// close).
    slot: bool,
    idle_since: Option<Instant>,
    /// When its last answer had been read in full, if it was reused (see
    /// `IdleEntry::settled_at`).
    settled_at: Option<Instant>,
    /// When the pool handed this connection out, if it read the clock then: the
    /// request is sent at once, so this serves as its send time.
    handed_at: Option<Instant>,
    hint: ResponseHint,
    close_reason: CloseReason,
    /// With `free_workers`: this new connection's id until its first response.
    pub(super) first_response_pending: Option<u64>,
    /// Set once the request's streamed body was taken to its end, when the protocol
    /// handle may still be sending it after the response ended (see `release`).
    body_ended: Option<Arc<BodyEnd>>,
}

impl PooledConn {
    pub(super) fn new(
        conn: Conn,
        pool: Arc<Pool>,
        slot: SlotHeld<'_>,
        reused: Option<(Instant, Instant)>,
        handed_at: Instant,
    ) -> Self {
        conn.stream.expect_answer();
        slot.hand_over();
        PooledConn {
            conn: Some(conn),
            lease: None,
            pool,
            slot: true,
            idle_since: reused.map(|(since, _)| since),
            settled_at: reused.map(|(_, settled)| settled),
            handed_at: Some(handed_at),
            hint: ResponseHint::default(),
            close_reason: CloseReason::Abandoned,
            first_response_pending: None,
            body_ended: None,
        }
    }

    pub(super) fn shared(lease: Lease, pool: Arc<Pool>) -> Self {
        PooledConn {
            conn: None,
            idle_since: lease.reused.then(|| lease.created()),
            settled_at: None,
            handed_at: None,
            lease: Some(lease),
            pool,
            slot: false,
            hint: ResponseHint::default(),
            close_reason: CloseReason::Abandoned,
            first_response_pending: None,
            body_ended: None,
        }
    }

    /// A stream on a shared (HTTP/2) connection: failures and timeouts end the stream,
    /// not the connection, and say nothing about idle connections.
    pub fn is_shared(&self) -> bool {
        self.lease.is_some()
    }

    /// The response head arrived, `ttfb` after the request was sent.
    pub fn responded(&mut self, ttfb: std::time::Duration) {
        if self.pool.settings.free_workers {
            // From the end of a streamed body, if any: a slow client's upload is not
            // the application's answer time.
            let wait = match &self.conn {
                Some(Conn {
                    client: Client::FastCgi(c),
                    ..
                }) => c.body_written().map_or(ttfb, |at| at.elapsed()),
                _ => ttfb,
            };
            let mut st = self.pool.lock();
            // Only a reused connection's: it had its worker already. A new one's
            // answer may have waited for a worker too, and the longer that wait, the
            // longer the next new connection would be left waiting.
            if self.idle_since.is_some() {
                st.answer_wait.record(wait);
            }
            if let Some(id) = self.first_response_pending.take() {
                st.fresh.remove(&id);
            }
        }
    }

    /// Plain HTTP/1.1, which holdfast speaks itself: a request is sent from a
    /// borrowed head, so the head needs no copy for another attempt.
    pub fn is_plain_http1(&self) -> bool {
        matches!(
            &self.conn,
            Some(Conn {
                client: Client::Http1(_),
                ..
            })
        )
    }

    /// The protocol handle.
    pub fn client(&mut self) -> &mut Client {
        if let Some(lease) = self.lease.as_mut() {
            return &mut lease.client;
        }
        // `conn` is only `None` after `release` or in `drop`, both of which consume
        // us, or for a lease, handled above.
        &mut self
            .conn
            .as_mut()
            .expect("connection present until release")
            .client
    }

    /// `Some(idle_since)` when this connection served an earlier request.
    pub fn reused_since(&self) -> Option<Instant> {
        self.idle_since
    }

    /// When its last answer had been read in full, if reused: the latest the upstream
    /// may have started counting it idle, what an observed close is learned from.
    pub fn reused_settled_at(&self) -> Option<Instant> {
        self.settled_at
    }

    /// When the pool handed the connection out, or `None` if it did not read the
    /// clock (a stream on a shared connection).
    pub fn handed_at(&self) -> Option<Instant> {
        self.handed_at
    }

    /// When the upstream's answer to a request sent at `sent_at` began to arrive, as
    /// dated when read; `None` on a shared connection (another stream's bytes) or if
    /// nothing arrived since.
    pub fn answer_began(&self, sent_at: Instant) -> Option<Instant> {
        let began = self.conn.as_ref()?.stream.answer_began()?;
        (began >= sent_at).then_some(began)
    }

    pub fn is_reused(&self) -> bool {
        self.idle_since.is_some()
    }

    /// Which connection this is, for tests and logs.
    pub fn conn_id(&self) -> u64 {
        self.conn.as_ref().map_or(0, |c| c.id)
    }

    pub fn requests(&self) -> u64 {
        match &self.lease {
            Some(lease) => lease.served(),
            None => self.conn.as_ref().map_or(0, |c| c.requests),
        }
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Why the connection will be closed if dropped now.
    pub fn set_close_reason(&mut self, reason: CloseReason) {
        self.close_reason = reason;
    }

    /// Records what the response head says about reuse, and learns the upstream's
    /// announced idle timeout.
    pub fn on_response_head(&mut self, headers: &http::HeaderMap, version: http::Version) {
        if self.is_shared() {
            return; // HTTP/2 has no Connection or Keep-Alive (RFC 9113 8.2.2).
        }
        let (connection_close, keep_alive) = match &self.conn {
            // holdfast's own codec read both while parsing (and may have left the
            // fields out of the map).
            Some(Conn {
                client: Client::Http1(c),
                ..
            }) => (
                c.must_close(),
                c.keep_alive().map(KeepAliveHint::parse).unwrap_or_default(),
            ),
            _ => {
                let close = headers.get_all(http::header::CONNECTION).iter().any(|v| {
                    v.as_bytes()
                        .split(|&b| b == b',')
                        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
                }) || version == http::Version::HTTP_10
                    // RFC 9112 6.3 point 3: chunked with a Content-Length too is
                    // framing someone else may read otherwise; hyper reads the chunks
                    // and would keep the connection (holdfast's codec closes it).
                    || headers.contains_key(http::header::TRANSFER_ENCODING)
                        && headers.contains_key(http::header::CONTENT_LENGTH);
                const KEEP_ALIVE: http::HeaderName = http::HeaderName::from_static("keep-alive");
                let keep_alive = headers
                    .get(&KEEP_ALIVE)
                    .map(|v| KeepAliveHint::parse(v.as_bytes()))
                    .unwrap_or_default();
                (close, keep_alive)
            }
        };
        if let Some(secs) = keep_alive.timeout_secs {
            let learned = self.pool.lock().learner.on_announced_timeout(secs);
            self.pool.apply_learned(learned);
        }
        self.hint = ResponseHint {
            connection_close,
            keep_alive,
        };
    }

    /// The protocol handed the socket over to an upgraded stream (`101 Switching
    /// Protocols`): dropping this must leave the socket open for it.
    pub fn hand_over(&mut self) {
        if let Some(conn) = self.conn.as_mut() {
            conn.handed_over = true;
        }
    }

    /// The request's body streams through a protocol handle that keeps sending it
    /// after the response has ended: `ended` is set when it has been taken whole.
    pub fn watch_body_end(&mut self, ended: Arc<BodyEnd>) {
        self.body_ended = Some(ended);
    }

    /// How the request's streamed body failed, if it did (and was watched).
    pub fn body_failure(&self) -> Option<BodyFailure> {
        self.body_ended.as_ref().and_then(|e| e.failure())
    }

    /// The response was read to its end, at `now`: the connection goes back to the
    /// pool unless a rule retires it.
    pub fn release(mut self, now: Instant) {
        if let Some(end) = self.body_ended.take().filter(|e| !e.is_ended()) {
            // The upstream answered before the request body was all sent, which is
            // still on its way.
            match self.lease.take() {
                // HTTP/2: the stream stays open (and counts against the upstream's
                // SETTINGS_MAX_CONCURRENT_STREAMS) until the body's last piece went
                // out: it is given back then, not now (or now, if that was meanwhile).
                Some(lease) => drop(end.hold(Box::new(lease))),
                // HTTP/1.1: the connection is not ready for another request until
                // then, maybe never (an upstream that stopped reading): closed.
                None => self.close_reason = CloseReason::NotPoolable,
            }
            return;
        }
        if let Some(Conn {
            client: Client::Http1Tls(_),
            stream,
            ..
        }) = &self.conn
            && stream.sending()
        {
            // The upstream answered before taking the whole request, and hyper still
            // has some of it to write (a body held whole, which no streamed body's
            // end watches, or the tail of a streamed one): not ready for another
            // request until that is written, maybe never.
            self.close_reason = CloseReason::NotPoolable;
            return;
        }
        if let Some(conn) = self.conn.take() {
            // The short bound: the upstream may have counted it idle from its last
            // answer's first bytes, but no later than once they had all been read.
            let survived = self
                .settled_at
                .zip(self.handed_at)
                .map(|(settled, handed)| handed.saturating_duration_since(settled));
            self.pool.checkin(conn, self.hint, now, survived);
        }
        // A lease gives its stream back as it drops.
    }
}

impl Drop for PooledConn {
    fn drop(&mut self) {
        if let Some(id) = self.first_response_pending.take() {
            self.pool.lock().fresh.remove(&id);
        }
        if let Some(conn) = self.conn.take() {
            self.pool.figures.closed(self.close_reason);
            match &conn.client {
                // A FastCGI request given up while its body, held whole, is still
                // going out: the application would run the script on the part it
                // got. The rest is written first, the connection keeping its slot.
                Client::FastCgi(c) if c.sending_held_body() => {
                    if let Ok(rt) = tokio::runtime::Handle::try_current() {
                        let slot = std::mem::take(&mut self.slot).then(|| self.pool.clone());
                        rt.spawn(finish_held_body(conn, slot));
                    }
                }
                _ => drop(conn),
            }
        }
        if self.slot {
            self.pool.slots.give_back();
        }
    }
}

/// Writes the rest of a FastCGI request's body held whole, then closes its
/// connection and gives back its slot (see `PooledConn`'s drop).
async fn finish_held_body(mut conn: Conn, slot: Option<Arc<Pool>>) {
    if let Client::FastCgi(c) = &mut conn.client {
        c.finish_held_body().await;
    }
    drop(conn);
    if let Some(pool) = slot {
        pool.slots.give_back();
    }
}
