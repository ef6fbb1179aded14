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
