//! Secrets out of `/config`: every value under a key named like a secret is replaced
//! (a table under such a name, an upstream called `keycloak`, is looked into instead).
//!
//! A key matches when its name, lower-cased, contains `key`, `pass` (`password`,
//! `passwd`, `DB_PASS`), `secret`, `token`, `credential` or `dsn` (TLS `key_file`s,
//! FastCGI `params` such as `DB_PASSWORD` or `SENTRY_DSN`). Only the value is hidden:
//! the key stays, so an operator sees that it is set. Matching is by name because the
//! config has user-named keys (FastCGI params) that no schema can mark; a value under
//! any other name that is a URL with a password (`postgres://user:pw@db/app`) keeps
//! everything but the password.

use toml::Value;

/// What a redacted value shows.
pub const REDACTED: &str = "<redacted>";

const SECRET_WORDS: [&str; 6] = ["key", "pass", "secret", "token", "credential", "dsn"];

/// Whether a key names a secret.
pub fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    SECRET_WORDS.iter().any(|w| key.contains(w))
}

/// Replaces, at any depth, the value of every secret-named key.
pub fn redact(value: &mut Value) {
    match value {
        Value::Table(t) => {
            for (k, v) in t.iter_mut() {
                // A table is looked into, whatever its name: an upstream named
                // `keycloak` or `passport` holds settings, not a secret.
                if is_secret_key(k) && !v.is_table() {
                    *v = Value::String(REDACTED.to_owned());
                } else {
                    redact(v);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(redact),
        Value::String(text) => {
            if let Some(hidden) = without_url_password(text) {
                *text = hidden;
            }
        }
        _ => {}
    }
}

/// `scheme://user:password@rest` with the password replaced, if `text` has one.
///
/// Read as loosely as the clients that take such URLs: libpq takes `?` and `#` in a
/// password as they are, SQLAlchemy `/` too, so none of them ends it. The user is what
/// comes before the first `:` (with no `/`, `?`, `#` or `@` in it); the password runs
/// to the last `@` before the host's end, the first `/` after an `@` (a password may
/// hold `@`, and a path may too). A URL with a port and an `@` in its path shows with
/// both hidden: more hidden than needed, never a password shown.
fn without_url_password(text: &str) -> Option<String> {
    let (scheme, rest) = text.split_once("://")?;
    let colon = rest.find([':', '/', '?', '#', '@'])?;
    if !rest[colon..].starts_with(':') {
        return None;
    }
    let first_at = colon + rest[colon..].find('@')?;
    let host_end = rest[first_at..]
        .find('/')
        .map_or(rest.len(), |i| first_at + i);
    let at = rest[..host_end].rfind('@')?;
    let user = &rest[..colon];
    Some(format!("{scheme}://{user}:{REDACTED}{}", &rest[at..]))
}

/// The config as TOML with every default filled in and secrets redacted.
pub fn effective_toml(config: &crate::config::Config) -> String {
    match Value::try_from(config) {
        Ok(mut v) => {
            redact(&mut v);
            toml::to_string_pretty(&v).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
        }
        Err(e) => format!("# cannot render config: {e}\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_named_values_are_hidden_at_any_depth() {
        let mut v: Value = toml::from_str(
            r#"
            keepalive_timeout = "60s"
            [tls]
            key_file = "/etc/holdfast/site.key"
            cert_file = "/etc/holdfast/site.crt"
            [[route]]
            path = "/"
            [route.fastcgi.params]
            DB_PASSWORD = "hunter2"
            API_Token = "t0k"
            APP_ENV = "prod"
            "#,
        )
        .unwrap();
        redact(&mut v);
        let text = toml::to_string(&v).unwrap();
        for secret in ["hunter2", "t0k", "site.key"] {
            assert!(!text.contains(secret), "{secret} shown:\n{text}");
        }
        for kept in ["60s", "site.crt", "prod", "DB_PASSWORD", "key_file"] {
            assert!(text.contains(kept), "{kept} missing:\n{text}");
        }
        assert_eq!(v["tls"]["key_file"].as_str(), Some(REDACTED));
    }

    #[test]
    fn passwords_in_urls_and_dsn_like_names_are_hidden() {
        let mut v: Value = toml::from_str(
            r#"
            [route.fastcgi.params]
            DATABASE_URL = "postgres://app:s3cr3t@db.internal:5432/app?sslmode=require"
            SENTRY_DSN = "https://abc@o1.ingest.example/2"
            DB_PASS = "pw1"
            HOME_URL = "https://www.example.com/a@b"
            "#,
        )
        .unwrap();
        redact(&mut v);
        let p = &v["route"]["fastcgi"]["params"];
        assert_eq!(
            p["DATABASE_URL"].as_str(),
            Some("postgres://app:<redacted>@db.internal:5432/app?sslmode=require")
        );
        assert_eq!(p["SENTRY_DSN"].as_str(), Some(REDACTED));
        assert_eq!(p["DB_PASS"].as_str(), Some(REDACTED));
        assert_eq!(p["HOME_URL"].as_str(), Some("https://www.example.com/a@b"));
    }

    /// A password written as DSN parsers take it, with `?`, `#` or `/` not
    /// percent-encoded (libpq takes the first two, SQLAlchemy all three), is hidden
    /// whole. Before, the URL's authority was taken to end at the first of them, no
    /// `@` was found before it, and the URL was shown as it was, password and all.
    #[test]
    fn url_passwords_with_characters_dsn_parsers_take_raw_are_hidden() {
        for (url, shown) in [
            (
                "postgres://app:Ab?9x@db.internal:5432/app",
                "postgres://app:<redacted>@db.internal:5432/app",
            ),
            (
                "mysql://app:Ab#9x@db/app?charset=utf8",
                "mysql://app:<redacted>@db/app?charset=utf8",
            ),
            (
                "postgresql://app:Ab/9x@db/app",
                "postgresql://app:<redacted>@db/app",
            ),
            (
                "postgres://app:p@ss@db/app?x=a@b",
                "postgres://app:<redacted>@db/app?x=a@b",
            ),
            (
                "redis://:s3cr3t@cache:6379/0",
                "redis://:<redacted>@cache:6379/0",
            ),
        ] {
            let mut v = Value::String(url.to_owned());
            redact(&mut v);
            assert_eq!(v.as_str(), Some(shown), "{url}");
        }
        for kept in [
            "https://www.example.com/a@b",
            "https://www.example.com/?next=a:b@c",
            "https://user@example.com/",
            "http://10.0.0.5:8080/status",
        ] {
            let mut v = Value::String(kept.to_owned());
            redact(&mut v);
            assert_eq!(v.as_str(), Some(kept), "{kept}");
        }
    }

    #[test]
    fn an_upstream_named_like_a_secret_still_shows_its_settings() {
        let mut v: Value = toml::from_str(
            r#"
            [[route]]
            upstream = "keycloak"
            [upstream.keycloak]
            addresses = ["https://10.0.0.1:8443"]
            [upstream.keycloak.tls]
            client_key = "/etc/holdfast/client.key"
            [upstream.passport.pool]
            max_connections = 9
            "#,
        )
        .unwrap();
        redact(&mut v);
        let up = &v["upstream"];
        assert_eq!(
            up["keycloak"]["addresses"][0].as_str(),
            Some("https://10.0.0.1:8443"),
            "{v:#?}"
        );
        assert_eq!(up["keycloak"]["tls"]["client_key"].as_str(), Some(REDACTED));
        assert_eq!(
            up["passport"]["pool"]["max_connections"].as_integer(),
            Some(9)
        );
        assert_eq!(v["route"][0]["upstream"].as_str(), Some("keycloak"));
    }

    #[test]
    fn keep_alive_is_not_a_key() {
        assert!(!is_secret_key("keepalive_timeout"));
        assert!(!is_secret_key("keepalive_min_idle"));
        assert!(is_secret_key("private_KEY_path"));
        assert!(is_secret_key("client_secret"));
    }
}
