//! From an HTTP request to CGI/1.1 params for a FastCGI application, as nginx's
//! `fastcgi_params` and `fastcgi_split_path_info` set them.
//!
//! Security rules, each tested below:
//! - the script is split off at the first script extension followed by `/` or the
//!   end of the path, so `/uploads/evil.jpg/x.php` names the script `x.php` under
//!   `evil.jpg/` — never `evil.jpg` — and, with `check_file`, gets 404 unless that
//!   file exists;
//! - `..` segments and NUL bytes (after percent-decoding) are refused;
//! - a client `Proxy` header is never passed as `HTTP_PROXY` (httpoxy), and headers
//!   named with anything but letters, digits and `-` are dropped, so neither
//!   `X_Forwarded_For` nor `X.Forwarded.For` (PHP turns `.` into `_` in `$_SERVER`
//!   names) can pose as `X-Forwarded-For`.

use std::borrow::Cow;
use std::path::Path;

use bytes::Bytes;
use http::StatusCode;

use crate::config::FastCgiRoute;
use crate::proxy::ConnContext;

/// Where a request path leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script {
    /// SCRIPT_NAME: the script's path under the root.
    pub name: String,
    /// PATH_INFO: what follows the script name.
    pub path_info: String,
    /// The index of a directory path (one ending in `/`): when it does not exist,
    /// the fallback runs instead, as with a path naming no script.
    pub index: bool,
}

/// Splits a decoded path into script and path info.
///
/// # Errors
/// 400 for `..` or NUL, 404 when the path names no script and there is no fallback.
pub fn split_script(path: &str, route: &FastCgiRoute) -> Result<Script, StatusCode> {
    if path.contains('\0') || path.split('/').any(|seg| seg == "..") {
        return Err(StatusCode::BAD_REQUEST);
    }
    let mut best: Option<usize> = None;
    for ext in &route.script_extensions {
        let mut from = 0;
        while let Some(i) = path[from..].find(ext.as_str()) {
            let end = from + i + ext.len();
            let next = path[end..].chars().next();
            if next.is_none() || next == Some('/') {
                best = Some(best.map_or(end, |b| b.min(end)));
                break;
            }
            from = end;
        }
    }
    if let Some(end) = best {
        return Ok(Script {
            name: path[..end].to_owned(),
            path_info: path[end..].to_owned(),
            index: false,
        });
    }
    if path.ends_with('/') {
        return Ok(Script {
            name: format!("{path}{}", route.index),
            path_info: String::new(),
            index: true,
        });
    }
    match &route.fallback {
        Some(f) => Ok(fallback(f)),
        None => Err(StatusCode::NOT_FOUND),
    }
}

fn fallback(f: &str) -> Script {
    Script {
        name: f.to_owned(),
        path_info: String::new(),
        index: false,
    }
}

async fn is_file(path: &str) -> bool {
    tokio::fs::metadata(Path::new(path))
        .await
        .is_ok_and(|m| m.is_file())
}

/// Builds the params for one request.
///
/// # Errors
/// A status to answer with instead of forwarding (400 bad path, 404 no script).
pub async fn params(
    parts: &http::request::Parts,
    original_target: &str,
    route: &FastCgiRoute,
    conn: &ConnContext,
    content_length: Option<u64>,
) -> Result<Vec<(Bytes, Bytes)>, StatusCode> {
    let raw_path = parts.uri.path();
    let path: Cow<'_, str> = percent_encoding::percent_decode_str(raw_path)
        .decode_utf8()
        .map_err(|_| StatusCode::BAD_REQUEST)?;
    let mut script = split_script(&path, route)?;
    let root = route.root.to_string_lossy();
    let root = root.trim_end_matches('/');
    let mut filename = format!("{root}{}", script.name);
    if route.check_file && !is_file(&filename).await {
        // A directory path with no index of its own (a pretty URL ending in `/`)
        // is the front controller's, as nginx's `try_files $uri $uri/ /index.php`.
        let Some(f) = route.fallback.as_deref().filter(|_| script.index) else {
            return Err(StatusCode::NOT_FOUND);
        };
        script = fallback(f);
        filename = format!("{root}{}", script.name);
        if !is_file(&filename).await {
            return Err(StatusCode::NOT_FOUND);
        }
    }

    let mut p: Vec<(Bytes, Bytes)> = Vec::with_capacity(32 + parts.headers.len());
    let mut set =
        |k: &'static str, v: String| p.push((Bytes::from_static(k.as_bytes()), Bytes::from(v)));
    let host = parts
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let server_name = match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !h.is_empty() => h,
        _ if host.is_empty() => "",
        _ => host,
    };
    set("GATEWAY_INTERFACE", "CGI/1.1".into());
    set(
        "SERVER_SOFTWARE",
        concat!("holdfast/", env!("CARGO_PKG_VERSION")).into(),
    );
    set("QUERY_STRING", parts.uri.query().unwrap_or("").into());
    set("REQUEST_METHOD", parts.method.as_str().into());
    set(
        "CONTENT_TYPE",
        header_str(parts, http::header::CONTENT_TYPE),
    );
    set(
        "CONTENT_LENGTH",
        content_length.map(|n| n.to_string()).unwrap_or_default(),
    );
    set("SCRIPT_NAME", script.name.clone());
    set("SCRIPT_FILENAME", filename);
    if !script.path_info.is_empty() {
        set("PATH_INFO", script.path_info.clone());
    }
    set("REQUEST_URI", original_target.into());
    set(
        "DOCUMENT_URI",
        format!("{}{}", script.name, script.path_info),
    );
    set("DOCUMENT_ROOT", root.into());
    set("SERVER_PROTOCOL", "HTTP/1.1".into());
    set(
        "REQUEST_SCHEME",
        if conn.tls { "https" } else { "http" }.into(),
    );
    if conn.tls {
        set("HTTPS", "on".into());
    }
    set("REMOTE_ADDR", conn.remote.ip().to_string());
    set("REMOTE_PORT", conn.remote.port().to_string());
    set("SERVER_ADDR", conn.local.ip().to_string());
    set("SERVER_PORT", conn.local.port().to_string());
    set(
        "SERVER_NAME",
        if server_name.is_empty() {
            conn.local.ip().to_string()
        } else {
            server_name.to_owned()
        },
    );
    // php-cgi refuses to run without it when cgi.force_redirect is on.
    set("REDIRECT_STATUS", "200".into());

    for name in parts.headers.keys() {
        let n = name.as_str();
        // Only letters, digits and `-`, as nginx's `ignore_invalid_headers`: `_`
        // would collide with `-` (`X_Forwarded_For`), and PHP turns `.` (and a
        // space) into `_` in `$_SERVER` names (`X.Real.IP`), while `[` makes one an
        // array.
        if n == "content-type"
            || n == "content-length"
            || n == "proxy"
            || !n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            continue;
        }
        let sep = if n == "cookie" { "; " } else { ", " };
        let value: Vec<&[u8]> = parts
            .headers
            .get_all(name)
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        let mut key = String::with_capacity(5 + n.len());
        key.push_str("HTTP_");
        key.extend(n.chars().map(|c| {
            if c == '-' {
                '_'
            } else {
                c.to_ascii_uppercase()
            }
        }));
        p.push((Bytes::from(key), Bytes::from(value.join(sep.as_bytes()))));
    }
    for (k, v) in &route.params {
        p.retain(|(name, _)| name.as_ref() != k.as_bytes());
        p.push((Bytes::from(k.clone()), Bytes::from(v.clone())));
    }
    // php-fpm parses each PARAMS record on its own: a pair larger than one record
    // would be split, and php-fpm drops the request with its connection.
    let record = holdfast_fastcgi::record::MAX_ENCODED_CONTENT_LEN;
    if p.iter()
        .any(|(k, v)| holdfast_fastcgi::params::encoded_len(k, v).map_or(true, |n| n > record))
    {
        return Err(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    }
    Ok(p)
}

/// Sets an empty `CONTENT_LENGTH` of [`params`] built before the body was read
/// whole to `n` (a route's own non-empty `CONTENT_LENGTH` stays).
pub fn set_content_length(params: &mut [(Bytes, Bytes)], n: u64) {
    if let Some((_, v)) = params
        .iter_mut()
        .find(|(k, _)| k.as_ref() == b"CONTENT_LENGTH")
        .filter(|(_, v)| v.is_empty())
    {
        *v = Bytes::from(n.to_string());
    }
}

fn header_str(parts: &http::request::Parts, name: http::header::HeaderName) -> String {
    parts
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::ListenerConfig;

    fn route() -> FastCgiRoute {
        let mut r = FastCgiRoute::new("/srv/site");
        r.check_file = false;
        r
    }

    #[test]
    fn splits_script_and_path_info() {
        let r = route();
        let s = split_script("/index.php/a/b", &r).unwrap();
        assert_eq!(
            (s.name.as_str(), s.path_info.as_str()),
            ("/index.php", "/a/b")
        );
        let s = split_script("/dir/", &r).unwrap();
        assert_eq!(s.name, "/dir/index.php");
        let s = split_script("/x.phpx/y.php", &r).unwrap();
        assert_eq!(s.name, "/x.phpx/y.php", "an extension must end a segment");
        assert_eq!(split_script("/style.css", &r), Err(StatusCode::NOT_FOUND));
        let mut with_fallback = route();
        with_fallback.fallback = Some("/index.php".into());
        assert_eq!(
            split_script("/pretty/url", &with_fallback).unwrap().name,
            "/index.php"
        );
    }

    #[test]
    fn an_image_is_never_the_script() {
        let s = split_script("/uploads/evil.jpg/x.php", &route()).unwrap();
        assert_eq!(s.name, "/uploads/evil.jpg/x.php");
        assert_eq!(s.path_info, "");
        assert!(!s.name.ends_with(".jpg"));
    }

    #[test]
    fn refuses_traversal_and_nul() {
        assert_eq!(
            split_script("/../etc/passwd.php", &route()),
            Err(StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            split_script("/a/../../x.php", &route()),
            Err(StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            split_script("/a\0.php", &route()),
            Err(StatusCode::BAD_REQUEST)
        );
    }

    fn ctx() -> ConnContext {
        ConnContext::new(
            "10.1.2.3:5555".parse().unwrap(),
            "127.0.0.1:8080".parse().unwrap(),
            false,
            Arc::new(ListenerConfig::new("127.0.0.1:8080".parse().unwrap())),
        )
    }

    fn get(params: &[(Bytes, Bytes)], k: &str) -> Option<String> {
        params
            .iter()
            .find(|(n, _)| n.as_ref() == k.as_bytes())
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    #[tokio::test]
    async fn params_as_nginx_sets_them() {
        let req = http::Request::post("/app/index.php/users?id=7")
            .header("host", "shop.test:8080")
            .header("content-type", "application/json")
            .header("proxy", "http://evil:3128")
            .header("x_forwarded_for", "1.2.3.4")
            .header("x-trace", "a")
            .header("cookie", "a=1")
            .header("cookie", "b=2")
            .body(())
            .unwrap();
        let (mut parts, ()) = req.into_parts();
        parts.uri = "/index.php/users?id=7".parse().unwrap();
        let mut r = route();
        r.params.insert("APP_ENV".into(), "test".into());
        let p = params(&parts, "/app/index.php/users?id=7", &r, &ctx(), Some(12))
            .await
            .unwrap();
        assert_eq!(
            get(&p, "SCRIPT_FILENAME").as_deref(),
            Some("/srv/site/index.php")
        );
        assert_eq!(get(&p, "SCRIPT_NAME").as_deref(), Some("/index.php"));
        assert_eq!(get(&p, "PATH_INFO").as_deref(), Some("/users"));
        assert_eq!(get(&p, "QUERY_STRING").as_deref(), Some("id=7"));
        assert_eq!(
            get(&p, "REQUEST_URI").as_deref(),
            Some("/app/index.php/users?id=7")
        );
        assert_eq!(get(&p, "DOCUMENT_URI").as_deref(), Some("/index.php/users"));
        assert_eq!(get(&p, "DOCUMENT_ROOT").as_deref(), Some("/srv/site"));
        assert_eq!(get(&p, "REQUEST_METHOD").as_deref(), Some("POST"));
        assert_eq!(get(&p, "CONTENT_TYPE").as_deref(), Some("application/json"));
        assert_eq!(get(&p, "CONTENT_LENGTH").as_deref(), Some("12"));
        assert_eq!(get(&p, "SERVER_NAME").as_deref(), Some("shop.test"));
        assert_eq!(get(&p, "SERVER_PORT").as_deref(), Some("8080"));
        assert_eq!(get(&p, "REMOTE_ADDR").as_deref(), Some("10.1.2.3"));
        assert_eq!(get(&p, "REMOTE_PORT").as_deref(), Some("5555"));
        assert_eq!(get(&p, "GATEWAY_INTERFACE").as_deref(), Some("CGI/1.1"));
        assert_eq!(get(&p, "SERVER_PROTOCOL").as_deref(), Some("HTTP/1.1"));
        assert_eq!(get(&p, "HTTPS"), None);
        assert_eq!(get(&p, "HTTP_HOST").as_deref(), Some("shop.test:8080"));
        assert_eq!(get(&p, "HTTP_X_TRACE").as_deref(), Some("a"));
        assert_eq!(get(&p, "HTTP_COOKIE").as_deref(), Some("a=1; b=2"));
        assert_eq!(get(&p, "HTTP_PROXY"), None, "httpoxy");
        assert_eq!(
            get(&p, "HTTP_X_FORWARDED_FOR"),
            None,
            "underscore header dropped"
        );
        assert_eq!(get(&p, "HTTP_CONTENT_TYPE"), None);
        assert_eq!(get(&p, "APP_ENV").as_deref(), Some("test"));
    }

    #[tokio::test]
    async fn missing_script_file_is_404() {
        let mut r = FastCgiRoute::new(std::env::temp_dir());
        r.check_file = true;
        let (parts, ()) = http::Request::get("/definitely-not-here-holdfast.php")
            .body(())
            .unwrap()
            .into_parts();
        assert_eq!(
            params(&parts, "/", &r, &ctx(), None).await,
            Err(StatusCode::NOT_FOUND)
        );
    }
}
