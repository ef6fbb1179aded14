//! A request for the test clients, serialized exactly as described.

use bytes::Bytes;

/// Method, target, headers and body of a request. Serialization adds `Host` and
/// `Content-Length` unless the request sets them (or sets `Transfer-Encoding`, in which
/// case the body is sent raw, already framed by the test).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientRequest {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

// === impl ClientRequest ===

impl ClientRequest {
    pub fn new(method: impl Into<String>, target: impl Into<String>) -> ClientRequest {
        ClientRequest {
            method: method.into(),
            target: target.into(),
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    pub fn get(target: impl Into<String>) -> ClientRequest {
        ClientRequest::new("GET", target)
    }

    pub fn head(target: impl Into<String>) -> ClientRequest {
        ClientRequest::new("HEAD", target)
    }

    pub fn post(target: impl Into<String>, body: impl Into<Bytes>) -> ClientRequest {
        ClientRequest::new("POST", target).body(body)
    }

    /// Adds a header (kept in order, duplicates allowed).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> ClientRequest {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn body(mut self, body: impl Into<Bytes>) -> ClientRequest {
        self.body = body.into();
        self
    }

    fn has_header(&self, name: &str) -> bool {
        self.headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case(name))
    }

    /// Whether the request asks the server to close after responding.
    pub fn asks_close(&self) -> bool {
        self.headers.iter().any(|(n, v)| {
            n.eq_ignore_ascii_case("connection")
                && v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close"))
        })
    }

    /// The bytes sent on the wire; `host` is used when no `Host` header was given.
    pub fn to_bytes(&self, host: &str) -> Vec<u8> {
        let mut out = format!("{} {} HTTP/1.1\r\n", self.method, self.target).into_bytes();
        if !self.has_header("host") {
            out.extend_from_slice(format!("host: {host}\r\n").as_bytes());
        }
        for (name, value) in &self.headers {
            out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
        let framed = self.has_header("content-length") || self.has_header("transfer-encoding");
        let needs_length = !self.body.is_empty()
            || matches!(
                self.method.to_ascii_uppercase().as_str(),
                "POST" | "PUT" | "PATCH"
            );
        if !framed && needs_length {
            out.extend_from_slice(format!("content-length: {}\r\n", self.body.len()).as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.body);
        out
    }
}
