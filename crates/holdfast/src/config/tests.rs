use std::path::Path;

use super::*;

const GOOD: &str = r#"
[[listener]]
listen = "127.0.0.1:8080"

[[route]]
path = "/api"
strip_prefix = true
upstream = "api"

[upstream.api]
addresses = ["http://127.0.0.1:9000"]

[upstream.api.pool]
idle_timeout = "7s"
"#;

fn parse(text: &str) -> Result<Config, ConfigErrors> {
    Config::from_toml(text, Path::new("holdfast.toml"))
}

fn only_error(text: &str) -> ConfigError {
    let errs = parse(text).expect_err("config should be rejected");
    assert_eq!(errs.0.len(), 1, "{errs}");
    errs.0.into_iter().next().unwrap()
}

#[test]
fn defaults_fill_in_what_is_not_written() {
    let c = parse(GOOD).unwrap();
    let up = &c.upstreams["api"];
    assert_eq!(up.pool.idle_timeout, Dur::secs(7));
    assert_eq!(up.pool.max_connections, 256);
    assert_eq!(up.timeouts.connect, Dur::secs(5));
    assert_eq!(c.listeners[0].keepalive_timeout, Dur::secs(60));
    assert_eq!(c.drain.timeout, Dur::secs(30));
    assert!(c.routes[0].strip_prefix);
}

#[test]
fn a_zero_header_timeout_is_refused_naming_its_line() {
    let text = GOOD.replace(
        "listen = \"127.0.0.1:8080\"",
        "listen = \"127.0.0.1:8080\"\nheader_timeout = \"0s\"",
    );
    let e = only_error(&text);
    assert_eq!(e.key.as_deref(), Some("listener[0].header_timeout"), "{e}");
    assert_eq!(e.line, 4, "{e}");
    assert!(e.message.contains("more than 0s"), "{e}");
}

#[test]
fn two_sockets_on_one_address_are_refused_naming_the_second() {
    let text = GOOD.replace(
        "[[route]]",
        "[[listener]]\nlisten = \"0.0.0.0:8080\"\n\n[[route]]",
    );
    let e = only_error(&text);
    assert_eq!(e.key.as_deref(), Some("listener[1].listen"), "{e}");
    assert!(e.message.contains("listener[0]"), "{e}");
    let admin = GOOD.replace(
        "[[listener]]",
        "[admin]\nlisten = \"127.0.0.1:8080\"\n\n[[listener]]",
    );
    let e = only_error(&admin);
    assert!(e.message.contains("[admin]"), "{e}");
    // Port 0 asks for a fresh port each time; IPv6 listeners are IPv6-only.
    for fine in ["127.0.0.1:0", "[::1]:8080", "127.0.0.2:8080"] {
        let text = GOOD.replace(
            "[[route]]",
            &format!("[[listener]]\nlisten = \"{fine}\"\n\n[[route]]"),
        );
        let text = if fine.ends_with(":0") {
            text.replace("127.0.0.1:8080", "127.0.0.1:0")
        } else {
            text
        };
        assert!(parse(&text).is_ok(), "{fine}: {:?}", parse(&text).err());
    }
}

#[test]
fn route_hosts_match_as_written_or_refuse() {
    for bad in [
        "*example.com",
        "shop.*.com",
        "shop.example.com:8080",
        "[::1]:80",
        // A Host like these gets 400 before routing: the route would never be used.
        "shop example.com",
        "bücher.example",
        "*.",
        "shop.example.com/x",
    ] {
        let text = GOOD.replace(
            "path = \"/api\"",
            &format!("host = \"{bad}\"\npath = \"/api\""),
        );
        let e = only_error(&text);
        assert_eq!(e.key.as_deref(), Some("route[0].host"), "{bad}: {e}");
    }
    for fine in [
        "*",
        "*.example.com",
        "shop.example.com",
        "[::1]",
        "127.0.0.1",
        "xn--bcher-kva.example",
        "Shop_1.example.com.",
    ] {
        let text = GOOD.replace(
            "path = \"/api\"",
            &format!("host = \"{fine}\"\npath = \"/api\""),
        );
        assert!(parse(&text).is_ok(), "{fine}: {:?}", parse(&text).err());
    }
}

#[test]
fn effective_config_round_trips() {
    let c = parse(GOOD).unwrap();
    let again = parse(&c.to_effective_toml()).unwrap();
    assert_eq!(c, again);
}

#[test]
fn unknown_key_names_file_line_and_key() {
    let text = GOOD.replace("idle_timeout = \"7s\"", "idle_timout = \"7s\"");
    let e = only_error(&text);
    assert_eq!(e.line, 14, "{e}");
    assert_eq!(
        e.key.as_deref(),
        Some("upstream.api.pool.idle_timout"),
        "{e}"
    );
    assert!(e.message.contains("unknown field `idle_timout`"), "{e}");
    assert!(
        e.message.contains("idle_timeout"),
        "lists what is allowed: {e}"
    );
    assert!(
        e.to_string()
            .starts_with("holdfast.toml:14:1: key `upstream.api.pool.idle_timout`"),
        "{e}"
    );
}

#[test]
fn bad_duration_says_how_to_write_one() {
    let text = GOOD.replace("\"7s\"", "\"7 parsecs\"");
    let e = only_error(&text);
    assert_eq!(e.line, 14);
    assert_eq!(e.key.as_deref(), Some("upstream.api.pool.idle_timeout"));
    assert!(e.message.contains("`30s`"), "{e}");
    let e = only_error(&GOOD.replace("\"7s\"", "7"));
    assert!(e.message.contains("\"7s\""), "{e}");
}

#[test]
fn route_to_missing_upstream_is_located() {
    let text = GOOD.replace("upstream = \"api\"", "upstream = \"apj\"");
    let e = only_error(&text);
    assert_eq!(e.line, 8, "{e}");
    assert_eq!(e.key.as_deref(), Some("route[0].upstream"));
    assert!(
        e.message.contains("\"apj\"") && e.message.contains("api"),
        "{e}"
    );
}

#[test]
fn every_validation_error_is_reported() {
    let text = GOOD
        .replace("upstream = \"api\"", "upstream = \"nope\"")
        .replace("path = \"/api\"", "path = \"api\"")
        + "[upstream.api.retry]\nattempts = 0\n";
    let errs = parse(&text).unwrap_err();
    assert_eq!(errs.0.len(), 3, "{errs}");
    let retry = errs
        .0
        .iter()
        .find(|e| e.key.as_deref() == Some("upstream.api.retry.attempts"))
        .unwrap();
    assert_eq!(retry.line, 16, "{errs}");
}

#[test]
fn bad_address_and_syntax_errors_have_lines() {
    let e = only_error(&GOOD.replace("http://127.0.0.1:9000", "ftp://x"));
    assert_eq!(e.line, 11, "{e}");
    assert!(e.message.contains("unknown upstream scheme"), "{e}");
    let e = only_error("[[listener]\nlisten = 1");
    assert_eq!(e.line, 1, "{e}");
}

#[test]
fn missing_file_is_an_error_naming_it() {
    let errs = Config::load(Path::new("/nonexistent/holdfast.toml")).unwrap_err();
    assert!(
        errs.to_string()
            .contains("/nonexistent/holdfast.toml: cannot read config"),
        "{errs}"
    );
}

/// GOOD with `[listener.tls]` (and `extra` lines in the listener) for a certificate
/// written into `dir`.
fn with_tls(dir: &Path, extra: &str) -> String {
    let c = rcgen::generate_simple_self_signed(vec!["a.test".to_owned()]).unwrap();
    let (cert, key) = (dir.join("a.pem"), dir.join("a.key"));
    std::fs::write(&cert, c.cert.pem()).unwrap();
    std::fs::write(&key, c.signing_key.serialize_pem()).unwrap();
    GOOD.replace(
        "listen = \"127.0.0.1:8080\"\n",
        &format!(
            "listen = \"127.0.0.1:8080\"\n{extra}\n[listener.tls]\ncert = {:?}\nkey = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        ),
    )
}

#[test]
fn tls_and_http2_settings_round_trip() {
    let dir = holdfast_test::tempdir();
    let text = with_tls(dir.path(), "[listener.http2]\nmax_concurrent_streams = 9\n");
    let c = parse(&text).unwrap();
    let l = &c.listeners[0];
    assert!(l.tls.is_some());
    assert_eq!(l.http2.max_concurrent_streams, 9);
    assert_eq!(l.http2.max_pending_accept_reset_streams, 20);
    assert_eq!(parse(&c.to_effective_toml()).unwrap(), c);
}

#[test]
fn unusable_certificate_files_name_file_line_and_key() {
    let dir = holdfast_test::tempdir();
    let text = with_tls(dir.path(), "").replace("a.key", "missing.key");
    let e = only_error(&text);
    assert_eq!(e.key.as_deref(), Some("listener[0].tls.key"), "{e}");
    assert_eq!(e.line, 7, "{e}");
    assert!(e.message.contains("missing.key"), "{e}");
}

#[test]
fn h2c_and_redirect_are_for_plain_listeners() {
    let dir = holdfast_test::tempdir();
    let errs = parse(&with_tls(dir.path(), "h2c = true\nredirect_https = true\n")).unwrap_err();
    let keys: Vec<_> = errs.0.iter().filter_map(|e| e.key.as_deref()).collect();
    assert_eq!(
        keys,
        ["listener[0].h2c", "listener[0].redirect_https"],
        "{errs}"
    );
    let e = only_error(&GOOD.replace(
        "listen = \"127.0.0.1:8080\"\n",
        "listen = \"127.0.0.1:8080\"\n[listener.http2]\ninitial_stream_window = \"4GiB\"\n",
    ));
    assert_eq!(
        e.key.as_deref(),
        Some("listener[0].http2.initial_stream_window"),
        "{e}"
    );
}

#[test]
fn upstream_http2_idle_timeout_defaults_to_a_minute_and_names_its_key_when_bad() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.upstreams["api"].http2.idle_timeout, Dur::secs(60));
    let c = parse(&format!(
        "{GOOD}[upstream.api.http2]\nidle_timeout = \"0s\"\n"
    ))
    .unwrap();
    assert_eq!(c.upstreams["api"].http2.idle_timeout.non_zero(), None);
    let e = only_error(&format!(
        "{GOOD}[upstream.api.http2]\nidle_timeout = \"soon\"\n"
    ));
    assert_eq!(
        e.key.as_deref(),
        Some("upstream.api.http2.idle_timeout"),
        "{e}"
    );
    assert_eq!(e.line, 16, "{e}");
}

/// `max_connections` sizes a semaphore, which panics above `MAX_PERMITS`: taken, such a
/// value left a listener accepting nothing, and a reload to it stopped the server.
#[test]
fn connection_caps_beyond_what_holdfast_can_count_are_refused() {
    let huge = tokio::sync::Semaphore::MAX_PERMITS + 1;
    let e = only_error(&GOOD.replace(
        "idle_timeout = \"7s\"",
        &format!("max_connections = {huge}\nmax_idle = 1"),
    ));
    assert_eq!(
        e.key.as_deref(),
        Some("upstream.api.pool.max_connections"),
        "{e}"
    );
    assert_eq!(e.line, 14, "{e}");
    let e = only_error(&GOOD.replace(
        "listen = \"127.0.0.1:8080\"",
        &format!("listen = \"127.0.0.1:8080\"\nmax_connections = {huge}"),
    ));
    assert_eq!(e.key.as_deref(), Some("listener[0].max_connections"), "{e}");
    let most = tokio::sync::Semaphore::MAX_PERMITS;
    assert!(
        parse(&GOOD.replace(
            "idle_timeout = \"7s\"",
            &format!("max_connections = {most}"),
        ))
        .is_ok()
    );
}

/// TCP keepalive options are set on every new upstream socket in whole seconds, and
/// Linux refuses 0 and values past its limits: such a value failed every connect
/// (502, `Invalid argument`), so it is refused where it is written.
#[test]
fn tcp_keepalive_values_the_kernel_refuses_are_refused_naming_the_key() {
    for (line, key) in [
        (
            "keepalive_idle = \"500ms\"",
            "upstream.api.tcp.keepalive_idle",
        ),
        (
            "keepalive_idle = \"10h\"",
            "upstream.api.tcp.keepalive_idle",
        ),
        (
            "keepalive_interval = \"0s\"",
            "upstream.api.tcp.keepalive_interval",
        ),
        ("keepalive_count = 0", "upstream.api.tcp.keepalive_count"),
        ("keepalive_count = 128", "upstream.api.tcp.keepalive_count"),
    ] {
        let e = only_error(&format!("{GOOD}[upstream.api.tcp]\n{line}\n"));
        assert_eq!(e.key.as_deref(), Some(key), "{line}: {e}");
        assert_eq!(e.line, 16, "{line}: {e}");
    }
    for fine in [
        "keepalive_idle = \"1s\"\nkeepalive_interval = \"32767s\"\nkeepalive_count = 127",
        "keepalive = false\nkeepalive_idle = \"0s\"",
    ] {
        let text = format!("{GOOD}[upstream.api.tcp]\n{fine}\n");
        assert!(parse(&text).is_ok(), "{fine}: {:?}", parse(&text).err());
    }
}

/// Host names are resolved again every `resolve_every` by a timer whose period must
/// not be zero: `0s` killed that task with a panic, so vanished or new addresses were
/// never seen.
#[test]
fn a_zero_resolve_interval_is_refused_naming_its_line() {
    let e = only_error(&GOOD.replace(
        "addresses = [\"http://127.0.0.1:9000\"]",
        "addresses = [\"http://localhost:9000\"]\nresolve_every = \"0s\"",
    ));
    assert_eq!(e.key.as_deref(), Some("upstream.api.resolve_every"), "{e}");
    assert_eq!(e.line, 12, "{e}");
    assert!(e.message.contains("more than 0s"), "{e}");
}

/// A problem with a key left to its default (here `max_idle`, 64, above a written
/// `max_connections`) is located at the nearest part of its path in the file, its
/// table, rather than at no line at all.
#[test]
fn a_problem_with_a_defaulted_key_names_the_line_of_its_table() {
    let e = only_error(&GOOD.replace("idle_timeout = \"7s\"", "max_connections = 10"));
    assert_eq!(e.key.as_deref(), Some("upstream.api.pool.max_idle"), "{e}");
    assert_eq!(e.line, 13, "{e}");
    assert!(e.to_string().starts_with("holdfast.toml:13:"), "{e}");
}

/// A `[log] level` that is not a tracing filter used to fall back to `info` without a
/// word, at start and on a reload alike.
#[test]
fn a_log_level_that_is_no_filter_is_refused_naming_its_line() {
    let e = only_error(&format!("[log]\nlevel = \"holdfast=loud\"\n{GOOD}"));
    assert_eq!(e.key.as_deref(), Some("log.level"), "{e}");
    assert_eq!(e.line, 2, "{e}");
    assert!(e.message.contains("holdfast=loud"), "{e}");
    for fine in ["info", "warn,holdfast::access=off", "holdfast=debug"] {
        let text = format!("[log]\nlevel = \"{fine}\"\n{GOOD}");
        assert!(parse(&text).is_ok(), "{fine}: {:?}", parse(&text).err());
    }
}

/// `timeouts.response_headers = "0s"` is no "off" (as `total`'s is): every request
/// was sent and then answered 504 at once, so it is refused where it is written.
#[test]
fn a_zero_response_headers_timeout_is_refused_naming_its_line() {
    let e = only_error(&format!(
        "{GOOD}[upstream.api.timeouts]\nresponse_headers = \"0s\"\n"
    ));
    assert_eq!(
        e.key.as_deref(),
        Some("upstream.api.timeouts.response_headers"),
        "{e}"
    );
    assert_eq!(e.line, 16, "{e}");
    assert!(e.message.contains("more than 0s"), "{e}");
}

/// The successor of an upgrade has `upgrade.ready_timeout` to say it serves: `0s`
/// failed every upgrade, so it is refused where it is written.
#[test]
fn a_zero_upgrade_ready_timeout_is_refused_naming_its_line() {
    let e = only_error(&format!("[upgrade]\nready_timeout = \"0s\"\n{GOOD}"));
    assert_eq!(e.key.as_deref(), Some("upgrade.ready_timeout"), "{e}");
    assert_eq!(e.line, 2, "{e}");
    assert!(e.message.contains("more than 0s"), "{e}");
}

/// `host_header` is `client`, `upstream` or a literal sent as the `Host`. A literal
/// that is no host (`"api example"`, a control character, empty) was dropped at each
/// request, which then went upstream with the client's `Host` without a word.
#[test]
fn a_host_header_that_is_no_host_is_refused_naming_its_line() {
    for bad in [
        "api example",
        "api.test\\n",
        "",
        "user@api.test",
        "api.test/x",
    ] {
        let e = only_error(&GOOD.replace(
            "addresses = [\"http://127.0.0.1:9000\"]",
            &format!("addresses = [\"http://127.0.0.1:9000\"]\nhost_header = \"{bad}\""),
        ));
        assert_eq!(
            e.key.as_deref(),
            Some("upstream.api.host_header"),
            "{bad}: {e}"
        );
        assert_eq!(e.line, 12, "{bad}: {e}");
    }
    for fine in [
        "client",
        "upstream",
        "api.test",
        "api.test:8080",
        "[::1]:81",
        "10.0.0.1",
    ] {
        let text = GOOD.replace(
            "addresses = [\"http://127.0.0.1:9000\"]",
            &format!("addresses = [\"http://127.0.0.1:9000\"]\nhost_header = \"{fine}\""),
        );
        assert!(parse(&text).is_ok(), "{fine}: {:?}", parse(&text).err());
    }
}

/// Two routes with one host and one path prefix (as matching reads them: `/api/` is
/// `/api`, hosts ignore case) took the first one's requests, all of them: the second
/// was never used, without a word.
#[test]
fn a_route_that_an_earlier_one_hides_is_refused_naming_its_line() {
    for (first, second) in [
        ("path = \"/api\"", "path = \"/api\""),
        ("path = \"/api\"", "path = \"/api/\""),
        (
            "host = \"Shop.test\"\npath = \"/api\"",
            "host = \"shop.test.\"\npath = \"/%61pi\"",
        ),
        ("path = \"/\"", "host = \"*\""),
    ] {
        let text = GOOD.replace(
            "path = \"/api\"\nstrip_prefix = true\nupstream = \"api\"",
            &format!("{first}\nupstream = \"api\"\n\n[[route]]\n{second}\nupstream = \"api\""),
        );
        let e = only_error(&text);
        assert_eq!(e.key.as_deref(), Some("route[1].path"), "{second}: {e}");
        assert!(e.message.contains("route[0]"), "{e}");
        assert!(e.line > 8, "the second route's line: {e}");
    }
    for (first, second) in [
        ("path = \"/api\"", "path = \"/apix\""),
        ("path = \"/api\"", "host = \"shop.test\"\npath = \"/api\""),
        ("host = \"*.shop.test\"", "host = \"shop.test\""),
    ] {
        let text = GOOD.replace(
            "path = \"/api\"\nstrip_prefix = true\nupstream = \"api\"",
            &format!("{first}\nupstream = \"api\"\n\n[[route]]\n{second}\nupstream = \"api\""),
        );
        assert!(parse(&text).is_ok(), "{second}: {:?}", parse(&text).err());
    }
}

/// `health.max_fails = 0` was taken as 1: the first failed connect ejected the
/// address, where an operator used to nginx's `max_fails=0` meant "never eject".
#[test]
fn zero_max_fails_is_refused_naming_its_line() {
    let e = only_error(&format!("{GOOD}[upstream.api.health]\nmax_fails = 0\n"));
    assert_eq!(
        e.key.as_deref(),
        Some("upstream.api.health.max_fails"),
        "{e}"
    );
    assert_eq!(e.line, 16, "{e}");
    assert!(e.message.contains("at least 1"), "{e}");
}

/// A negative bare number was told to write `"-5s"`, which is refused in turn.
#[test]
fn a_negative_duration_is_refused_as_negative() {
    let e = only_error(&GOOD.replace("\"7s\"", "-5"));
    assert_eq!(
        e.key.as_deref(),
        Some("upstream.api.pool.idle_timeout"),
        "{e}"
    );
    assert_eq!(e.line, 14, "{e}");
    assert!(e.message.contains("negative"), "{e}");
    assert!(!e.message.contains("-5s"), "{e}");
}

/// An empty `[log] level` is a filter with no directive, which turns every line off,
/// errors included: a start that failed exited without a word.
#[test]
fn an_empty_log_level_is_refused_naming_its_line() {
    for empty in ["", ",", ",,"] {
        assert_eq!(
            tracing_subscriber::EnvFilter::try_new(empty)
                .map(|f| f.max_level_hint())
                .ok(),
            Some(Some(tracing::level_filters::LevelFilter::OFF)),
            "{empty:?} is taken as a filter that logs nothing"
        );
        let e = only_error(&format!("[log]\nlevel = \"{empty}\"\n{GOOD}"));
        assert_eq!(e.key.as_deref(), Some("log.level"), "{empty:?}: {e}");
        assert_eq!(e.line, 2, "{e}");
    }
    assert!(parse(&format!("[log]\nlevel = \"off\"\n{GOOD}")).is_ok());
}

/// `pid_file = ""` passed `check`, and `run` then failed to write it and did not
/// start.
#[test]
fn an_empty_pid_file_is_refused_naming_its_line() {
    let e = only_error(&format!("pid_file = \"\"\n{GOOD}"));
    assert_eq!(e.key.as_deref(), Some("pid_file"), "{e}");
    assert_eq!(e.line, 1, "{e}");
}

/// `drain.timeout = "0s"` is no "no limit" (as `0s` is for `send_timeout` or
/// `timeouts.total`): every drain, an upgrade's too, cut every request in flight at
/// once. It is refused where it is written.
#[test]
fn a_zero_drain_timeout_is_refused_naming_its_line() {
    let e = only_error(&format!("[drain]\ntimeout = \"0s\"\n{GOOD}"));
    assert_eq!(e.key.as_deref(), Some("drain.timeout"), "{e}");
    assert_eq!(e.line, 2, "{e}");
    assert!(e.message.contains("more than 0s"), "{e}");
}

/// A `max_header_bytes` near the top of what a size holds passed `check`, and the
/// start then panicked sizing hyper's read buffer (the head plus a little).
#[test]
fn a_max_header_bytes_beyond_4gib_is_refused_naming_its_line() {
    for huge in ["\"18446744073709551615\"", "\"5GiB\""] {
        let e = only_error(&GOOD.replace(
            "listen = \"127.0.0.1:8080\"",
            &format!("listen = \"127.0.0.1:8080\"\nmax_header_bytes = {huge}"),
        ));
        assert_eq!(
            e.key.as_deref(),
            Some("listener[0].max_header_bytes"),
            "{huge}: {e}"
        );
        assert_eq!(e.line, 4, "{huge}: {e}");
    }
    let text = GOOD.replace(
        "listen = \"127.0.0.1:8080\"",
        "listen = \"127.0.0.1:8080\"\nmax_header_bytes = \"4GiB\"",
    );
    assert!(parse(&text).is_ok(), "{:?}", parse(&text).err());
}

/// README: a config error names the key. The TOML parser's "duplicate key" named
/// none, only a place.
#[test]
fn a_key_written_twice_is_named() {
    let e = only_error(&GOOD.replace(
        "listen = \"127.0.0.1:8080\"",
        "listen = \"127.0.0.1:8080\"\nlisten = \"127.0.0.1:8081\"",
    ));
    assert_eq!(e.line, 4, "{e}");
    assert!(e.message.contains("duplicate key `listen`"), "{e}");
    let e = only_error(&format!(
        "{GOOD}[upstream.api]\nbalance = \"round_robin\"\n"
    ));
    assert_eq!(e.line, 15, "{e}");
    assert!(e.message.contains("duplicate key `api`"), "{e}");
}

/// Requests' paths are matched without their query and hold no space: a prefix with
/// `?`, `#` or a space matched nothing, and the route was never used, without a word.
#[test]
fn a_route_path_no_request_can_match_is_refused_naming_its_line() {
    for bad in ["/api?v=1", "/api#x", "/my api"] {
        let e = only_error(&GOOD.replace("path = \"/api\"", &format!("path = \"{bad}\"")));
        assert_eq!(e.key.as_deref(), Some("route[0].path"), "{bad}: {e}");
        assert_eq!(e.line, 6, "{bad}: {e}");
    }
    for fine in ["/my%20api", "/a;b", "/~user", "/%7Euser"] {
        let text = GOOD.replace("path = \"/api\"", &format!("path = \"{fine}\""));
        assert!(parse(&text).is_ok(), "{fine}: {:?}", parse(&text).err());
    }
}

#[test]
fn a_fastcgi_body_temp_dir_that_cannot_take_a_file_is_refused_naming_its_line() {
    let fastcgi = |extra: &str| {
        GOOD.replace(
            "addresses = [\"http://127.0.0.1:9000\"]",
            "addresses = [\"fastcgi://127.0.0.1:9000\"]",
        )
        .replace(
            "upstream = \"api\"\n",
            &format!("upstream = \"api\"\n[route.fastcgi]\nroot = \"/srv\"\n{extra}"),
        )
    };
    let c = parse(&fastcgi("")).unwrap();
    let f = c.routes[0].fastcgi.as_ref().unwrap();
    assert!(f.request_buffering);
    assert_eq!(f.body_memory, ByteSize::kib(64));
    assert_eq!(f.temp_dir(), std::env::temp_dir());

    let dir = holdfast_test::tempdir();
    let missing = dir.path().join("gone");
    let e = only_error(&fastcgi(&format!("body_temp_dir = {missing:?}\n")));
    assert_eq!(
        e.key.as_deref(),
        Some("route[0].fastcgi.body_temp_dir"),
        "{e}"
    );
    assert_eq!(e.line, 11, "{e}");
    assert!(e.message.contains("cannot create a file"), "{e}");

    let e = only_error(&fastcgi("body_temp_dir = \"tmp\"\n"));
    assert!(e.message.contains("absolute"), "{e}");

    let ok = fastcgi(&format!(
        "body_temp_dir = {:?}\nrequest_buffering = false\nbody_memory = \"1MiB\"\n",
        dir.path()
    ));
    let c = parse(&ok).unwrap();
    let f = c.routes[0].fastcgi.as_ref().unwrap();
    assert!(!f.request_buffering);
    assert_eq!(f.body_memory, ByteSize::mib(1));
    assert_eq!(f.temp_dir(), dir.path());
}

/// README: `max_header_list_size` is 1KiB to 4GiB. `4GiB` was refused with "must be
/// between 1KiB and 4GiB" (the check stopped at 4GiB less one byte), as
/// `max_header_bytes` was before it.
#[test]
fn an_http2_header_list_size_of_4gib_is_taken_as_readme_says() {
    let text = GOOD.replace(
        "listen = \"127.0.0.1:8080\"\n",
        "listen = \"127.0.0.1:8080\"\n[listener.http2]\nmax_header_list_size = \"4GiB\"\n",
    );
    let c = parse(&text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.listeners[0].http2.max_header_list_size, ByteSize(4 << 30));
    let e = only_error(&text.replace("\"4GiB\"", "4294967297"));
    assert_eq!(
        e.key.as_deref(),
        Some("listener[0].http2.max_header_list_size"),
        "{e}"
    );
    assert_eq!(e.line, 5, "{e}");
}

/// `health.eject_for` longer than `health.eject_max` was taken without a word, and
/// every ejection lasted eject_max, the first one included; `0s` turned ejection into
/// a warning logged at each failure that kept no request away. Both are refused,
/// naming the line, as `pool.max_idle` over `pool.max_connections` is.
#[test]
fn an_ejection_time_over_its_maximum_or_zero_is_refused_naming_its_line() {
    let e = only_error(&format!(
        "{GOOD}[upstream.api.health]\neject_max = \"2s\"\neject_for = \"10s\"\n"
    ));
    assert_eq!(
        e.key.as_deref(),
        Some("upstream.api.health.eject_for"),
        "{e}"
    );
    assert_eq!(e.line, 17, "{e}");
    assert!(e.message.contains("eject_max (2s)"), "{e}");
    // Over the default eject_max (60s), not written.
    let e = only_error(&format!(
        "{GOOD}[upstream.api.health]\neject_for = \"2m\"\n"
    ));
    assert_eq!(
        e.key.as_deref(),
        Some("upstream.api.health.eject_for"),
        "{e}"
    );
    let e = only_error(&format!(
        "{GOOD}[upstream.api.health]\neject_for = \"0s\"\n"
    ));
    assert!(e.message.contains("more than 0s"), "{e}");
    let c = parse(&format!(
        "{GOOD}[upstream.api.health]\neject_for = \"60s\"\n"
    ))
    .unwrap();
    assert_eq!(c.upstreams["api"].health.eject_for, Dur::secs(60));
}
