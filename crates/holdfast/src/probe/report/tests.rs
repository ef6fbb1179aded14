use super::*;

fn first(connection: Option<&str>, keep_alive: Option<&str>) -> FirstResponse {
    let hint = keep_alive
        .map(|v| KeepAliveHint::parse(v.as_bytes()))
        .unwrap_or_default();
    FirstResponse {
        status: 200,
        version: "HTTP/1.1",
        connection: connection.map(str::to_owned),
        keep_alive: keep_alive.map(str::to_owned),
        announced_timeout_secs: hint.timeout_secs,
        announced_max: hint.max,
    }
}

fn limit(n: Option<u32>, close: Option<CloseStyle>) -> RequestLimit {
    RequestLimit {
        sent: n.map_or(100, |n| n + 1),
        limit: n,
        close,
        searched_up_to: 100,
        error: None,
    }
}

fn idle(closes: &[f64], style: Option<CloseStyle>) -> IdleReport {
    let timeout = closes
        .iter()
        .copied()
        .filter(|&s| !is_prompt(Duration::from_secs_f64(s)))
        .reduce(f64::min);
    IdleReport {
        connections: 3,
        max_idle_secs: 120.0,
        closes_secs: closes.to_vec(),
        timeout_secs: timeout,
        close: style,
        closes_after_every_response: !closes.is_empty() && timeout.is_none(),
        still_open: 3 - closes.len(),
        usable_after_max_idle: vec![true; 3 - closes.len()],
        unsolicited_bytes: 0,
        errors: Vec::new(),
    }
}

#[test]
fn story_1a_provider_is_measured_and_gets_seven_seconds() {
    // The provider announces timeout=8 and closes at 8 s: it keeps its word, and the
    // recommendation is the team's own fix, 7 s.
    let f = first(Some("keep-alive"), Some("timeout=8"));
    let l = limit(None, None);
    let i = idle(&[8.01, 8.0, 8.02], Some(CloseStyle::Fin));
    let v = verdict(&f, &l, &i);
    assert_eq!(v.keeps_its_word, Some(true), "{:?}", v.findings);
    let r = recommend("pay", "http://pay/", &f, &l, &i);
    assert_eq!(r.idle_timeout.as_deref(), Some("7s"));
    assert_eq!(r.max_requests, None);
    assert!(
        r.toml
            .contains("[upstream.pay.pool]\nidle_timeout = \"7s\""),
        "{}",
        r.toml
    );
}

#[test]
fn an_announced_timeout_longer_than_the_real_one_is_a_broken_word() {
    let f = first(None, Some("timeout=15"));
    let i = idle(&[8.0, 8.1, 8.0], Some(CloseStyle::Fin));
    let v = verdict(&f, &limit(None, None), &i);
    assert_eq!(v.keeps_its_word, Some(false));
    assert!(v.findings[0].contains("timeout=15"), "{:?}", v.findings);
    // The shorter of announced and measured decides.
    let r = recommend("x", "u", &f, &limit(None, None), &i);
    assert_eq!(r.idle_timeout.as_deref(), Some("7s"));
}

#[test]
fn keep_alive_then_close_is_a_broken_word_and_never_reused() {
    let f = first(Some("keep-alive"), Some("timeout=5"));
    let l = limit(Some(1), Some(CloseStyle::Fin));
    let i = idle(&[0.001, 0.002, 0.001], Some(CloseStyle::Fin));
    assert!(i.closes_after_every_response);
    let v = verdict(&f, &l, &i);
    assert_eq!(v.keeps_its_word, Some(false));
    assert!(
        v.findings[0].starts_with("announces keep-alive but closed"),
        "{:?}",
        v.findings
    );
    let r = recommend("x", "u", &f, &l, &i);
    assert_eq!(r.idle_timeout, None);
    assert_eq!(r.max_requests, Some(1));
    assert!(
        r.toml.contains("never lets a connection be reused"),
        "{}",
        r.toml
    );
}

#[test]
fn a_silent_request_limit_is_noted_and_capped_one_below() {
    let f = first(None, None);
    let l = limit(Some(5), Some(CloseStyle::Fin));
    let v = verdict(&f, &l, &idle(&[], None));
    assert_eq!(v.keeps_its_word, None, "it promised nothing");
    assert!(
        v.findings[0].contains("after 5 request(s) silently"),
        "{:?}",
        v.findings
    );
    let r = recommend("x", "u", &f, &l, &idle(&[], None));
    assert_eq!(r.max_requests, Some(4));
    assert!(r.toml.contains("max_requests = 4"), "{}", r.toml);
    assert!(r.toml.contains("no idle close within 120 s"), "{}", r.toml);
}

/// A FastCGI application's limit is per process (php-fpm's `pm.max_requests`): the
/// snippet retires connections at it, so that a connection ends with its worker.
#[test]
fn a_fastcgi_request_limit_is_capped_at_itself() {
    let f = FirstResponse {
        version: FASTCGI,
        ..first(None, None)
    };
    let l = limit(Some(5), Some(CloseStyle::Fin));
    let r = recommend("php", "u", &f, &l, &idle(&[], None));
    assert_eq!(r.max_requests, Some(5));
    assert!(r.toml.contains("max_requests = 5  #"), "{}", r.toml);
    assert!(r.toml.contains("pm.max_requests"), "{}", r.toml);
}

#[test]
fn an_announced_max_that_is_not_honoured_is_a_broken_word() {
    let f = first(None, Some("timeout=5, max=100"));
    let v = verdict(
        &f,
        &limit(Some(7), Some(CloseStyle::ConnectionClose)),
        &idle(&[], None),
    );
    assert_eq!(v.keeps_its_word, Some(false));
    assert!(v.findings[0].contains("max=100"), "{:?}", v.findings);
}

#[test]
fn the_snippet_is_valid_config() {
    let f = first(None, None);
    let l = limit(Some(7), Some(CloseStyle::ConnectionClose));
    let i = idle(&[3.0, 3.0, 3.0], Some(CloseStyle::Fin));
    let r = recommend("nginx", "http://127.0.0.1/", &f, &l, &i);
    let text = format!(
        "[[listener]]\nlisten = \"127.0.0.1:0\"\n[upstream.nginx]\naddresses = [\"http://127.0.0.1:1\"]\n{}",
        r.toml
    );
    let c = crate::config::Config::from_toml(&text, std::path::Path::new("snippet.toml"))
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    let pool = &c.upstreams["nginx"].pool;
    assert_eq!(pool.idle_timeout.get(), Duration::from_millis(2500));
    assert_eq!(pool.max_requests, 6);
}

#[test]
fn idle_margin_is_an_eighth_at_least_half_a_second() {
    let ms = Duration::from_millis;
    assert_eq!(idle_below(ms(8000)), Some(ms(7000)));
    assert_eq!(idle_below(ms(2000)), Some(ms(1500)));
    assert_eq!(idle_below(ms(60_000)), Some(ms(52_500)));
    assert_eq!(
        idle_below(ms(2996)),
        Some(ms(2500)),
        "a 3 s timer firing early"
    );
    assert_eq!(idle_below(ms(3004)), Some(ms(2500)));
    assert_eq!(
        idle_below(ms(2940)),
        Some(ms(2400)),
        "rounded down to 100 ms"
    );
    assert_eq!(idle_below(ms(540)), None, "no room for a margin");
}
