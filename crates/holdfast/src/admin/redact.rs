//! Secrets out of `/config`: every value under a key named like a secret is replaced.
//!
//! A key matches when its name, lower-cased, contains `key`, `password`, `passwd`,
//! `secret` or `token` (TLS `key_file`s to come, FastCGI `params` such as
//! `DB_PASSWORD`). Only the value is hidden: the key stays, so an operator sees that
//! it is set. Matching is by name because the config has user-named keys (FastCGI
//! params) that no schema can mark.

use toml::Value;

/// What a redacted value shows.
pub const REDACTED: &str = "<redacted>";

const SECRET_WORDS: [&str; 5] = ["key", "password", "passwd", "secret", "token"];

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
                if is_secret_key(k) {
                    *v = Value::String(REDACTED.to_owned());
                } else {
                    redact(v);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(redact),
        _ => {}
    }
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
    fn keep_alive_is_not_a_key() {
        assert!(!is_secret_key("keepalive_timeout"));
        assert!(!is_secret_key("keepalive_min_idle"));
        assert!(is_secret_key("private_KEY_path"));
        assert!(is_secret_key("client_secret"));
    }
}
