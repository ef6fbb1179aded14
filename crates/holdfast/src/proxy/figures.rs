//! Figures kept per route: requests by status class and latency histograms, read by
//! `/metrics`.
//!
//! The cells are built with the route table ([`RouteFigures::build`], from
//! `Routing::build`) and carried over a reload for every route whose config did not
//! change, so the request path only indexes a vector. Recording a request is a few
//! relaxed atomic adds: no allocation, no lock, no label lookup.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::RouteConfig;
use crate::upstream::figures::Histogram;

/// Status classes, as `/metrics` labels them; index `status / 100 - 1`.
pub const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The figures of one route (or of requests no route matched).
#[derive(Debug, Default)]
pub struct RouteCell {
    requests: [AtomicU64; STATUS_CLASSES.len()],
    /// From the request head to the end of the response (or the switch, for 101).
    pub duration: Histogram,
    /// From sending the request upstream to the upstream's response head, for the
    /// attempt that answered.
    pub upstream_ttfb: Histogram,
}

impl RouteCell {
    /// Requests that ended with a status of class `STATUS_CLASSES[i]`.
    pub fn requests(&self, class: usize) -> u64 {
        self.requests.get(class).map_or(0, |c| c.load(Relaxed))
    }
}

/// Every route's cell, in config order, and one for requests without a route.
#[derive(Debug, Default)]
pub struct RouteFigures {
    pub routes: Vec<Arc<RouteCell>>,
    pub unrouted: Arc<RouteCell>,
}

impl RouteFigures {
    /// Cells for `routes`, keeping the previous cell of a route whose config is the same
    /// at the same position, so its counters survive a reload.
    pub fn build(
        routes: &[RouteConfig],
        previous: Option<(&[RouteConfig], &RouteFigures)>,
    ) -> Self {
        let kept = |i: usize, r: &RouteConfig| {
            let (configs, figures) = previous?;
            (configs.get(i)? == r)
                .then(|| figures.routes.get(i).cloned())
                .flatten()
        };
        RouteFigures {
            routes: routes
                .iter()
                .enumerate()
                .map(|(i, r)| kept(i, r).unwrap_or_default())
                .collect(),
            unrouted: previous.map_or_else(Arc::default, |(_, f)| f.unrouted.clone()),
        }
    }

    /// The cell a request is counted in; `None` is "no route".
    pub fn cell(&self, route: Option<usize>) -> Arc<RouteCell> {
        route
            .and_then(|i| self.routes.get(i))
            .unwrap_or(&self.unrouted)
            .clone()
    }
}

/// The status a request is counted (and logged) with when its client went away
/// before any response was made for it (nginx's 499, "client closed request").
pub const CLIENT_CLOSED_REQUEST: u16 = 499;

/// One request on its way: counted in its route's cell when it ends, or, if it is
/// dropped unfinished (the client went away and hyper cancelled the request), as
/// [`CLIENT_CLOSED_REQUEST`] then.
pub struct Tally {
    cell: Arc<RouteCell>,
    start: Instant,
    status: u16,
    ttfb: Option<Duration>,
    done: bool,
}

impl Tally {
    pub fn new(cell: Arc<RouteCell>, start: Instant) -> Self {
        Tally {
            cell,
            start,
            status: 0,
            ttfb: None,
            done: false,
        }
    }

    /// The upstream answered with `status` after `ttfb`.
    pub fn upstream_responded(&mut self, status: u16, ttfb: Duration) {
        self.status = status;
        self.ttfb = Some(ttfb);
    }

    /// The response ended with the status given to [`Tally::upstream_responded`].
    pub fn finish(self) {
        let status = self.status;
        self.finish_with(status);
    }

    /// The response ended at `now`, with the status given to
    /// [`Tally::upstream_responded`].
    pub fn finish_at(self, now: Instant) {
        let status = self.status;
        self.finish_with_at(status, now);
    }

    /// The response ended with `status`.
    pub fn finish_with(self, status: u16) {
        self.finish_with_at(status, Instant::now());
    }

    fn finish_with_at(mut self, status: u16, now: Instant) {
        self.record(status, now);
        self.done = true;
    }

    fn record(&self, status: u16, now: Instant) {
        let class = usize::from(status / 100).clamp(1, STATUS_CLASSES.len()) - 1;
        self.cell.requests[class].fetch_add(1, Relaxed);
        self.cell
            .duration
            .observe(now.saturating_duration_since(self.start));
        if let Some(t) = self.ttfb {
            self.cell.upstream_ttfb.observe(t);
        }
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        if !self.done {
            self.record(CLIENT_CLOSED_REQUEST, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_tally_counts_its_class_and_latencies() {
        let cell = Arc::new(RouteCell::default());
        let mut t = Tally::new(cell.clone(), Instant::now());
        tokio::time::advance(Duration::from_millis(30)).await;
        t.upstream_responded(204, Duration::from_millis(20));
        t.finish();
        Tally::new(cell.clone(), Instant::now()).finish_with(504);
        Tally::new(cell.clone(), Instant::now()).finish_with(0);
        assert_eq!(
            (0..5).map(|c| cell.requests(c)).collect::<Vec<_>>(),
            [1, 1, 0, 0, 1],
            "an impossible status counts as 1xx rather than vanish"
        );
        let d = cell.duration.snapshot();
        assert_eq!(d.count(), 3);
        assert!((d.sum_secs - 0.03).abs() < 1e-6, "{}", d.sum_secs);
        let t = cell.upstream_ttfb.snapshot();
        assert_eq!(t.count(), 1, "only requests the upstream answered");
        assert!((t.sum_secs - 0.02).abs() < 1e-6);
    }

    #[test]
    fn cells_survive_a_reload_only_for_unchanged_routes() {
        let a = RouteConfig::new("/a", "up");
        let b = RouteConfig::new("/b", "up");
        let first = RouteFigures::build(&[a.clone(), b.clone()], None);
        let c = RouteConfig::new("/c", "up");
        let configs = [a.clone(), b.clone()];
        let second = RouteFigures::build(&[a, c], Some((&configs, &first)));
        assert!(Arc::ptr_eq(&first.routes[0], &second.routes[0]));
        assert!(!Arc::ptr_eq(&first.routes[1], &second.routes[1]));
        assert!(Arc::ptr_eq(&first.unrouted, &second.unrouted));
        assert!(Arc::ptr_eq(&second.cell(None), &second.unrouted));
        assert!(Arc::ptr_eq(&second.cell(Some(7)), &second.unrouted));
    }
}
