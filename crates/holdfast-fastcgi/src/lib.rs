//! Sans-I/O FastCGI 1.0 codec: records, name-value pairs and the CGI response head.
//!
//! Scope: turning requests into bytes appended to a [`bytes::BytesMut`]
//! ([`record`], [`params`]), turning bytes read from an upstream back into
//! [`Record`]s ([`RecordDecoder`]), and parsing the CGI header block at the
//! start of the STDOUT stream ([`response::HeadParser`]). Every decoder takes
//! only what it was given and never panics on malformed input.
//!
//! Not in scope: sockets, timeouts, connection pooling, request multiplexing
//! and the mapping of FastCGI failures to HTTP responses. The proxy owns the
//! `TcpStream`/`UnixStream`, drives these types over it, and decides whether a
//! connection opened with `FCGI_KEEP_CONN` goes back to its pool.
//!
//! Why not the `fastcgi-client` crate (0.12): its `Client` takes the stream by
//! value and has no way to hand it back, so a pool cannot own the connection;
//! it writes BEGIN_REQUEST, PARAMS and the whole STDIN to EOF before reading a
//! single response byte, so a request body and a response cannot flow at the
//! same time; it does not say whether a connection sits on a record boundary
//! after a response stream is dropped or fails, which is what decides reuse;
//! and it parses CGI headers only after buffering all of STDOUT, with no size
//! limit and no local-redirect case. A codec with no I/O is smaller than
//! wrapping that.
//!
//! # Example
//!
//! One request on a kept-alive connection, with the upstream's reply
//! already in the read buffer:
//!
//! ```
//! use bytes::BytesMut;
//! use holdfast_fastcgi::record::{self, RecordType};
//! use holdfast_fastcgi::{
//!     EndRequest, HeadParser, Progress, ProtocolStatus, RecordDecoder, Role,
//! };
//!
//! let mut out = BytesMut::new();
//! record::encode_begin_request(&mut out, 1, Role::Responder, true);
//! let params: [(&[u8], &[u8]); 2] = [
//!     (b"REQUEST_METHOD", b"GET"),
//!     (b"SCRIPT_FILENAME", b"/srv/i.php"),
//! ];
//! record::encode_params(&mut out, 1, params)?;
//! record::encode_stdin(&mut out, 1, b"");
//! // ... write `out` to the socket, read the reply into `input` ...
//! # let mut input = BytesMut::new();
//! # record::encode_stream(&mut input, RecordType::Stdout, 1, b"Status: 404 Not Found\r\n\r\ngone");
//! # record::encode_stream(&mut input, RecordType::Stdout, 1, b"");
//! # let end = EndRequest { app_status: 0, protocol_status: ProtocolStatus::RequestComplete };
//! # record::encode_end_request(&mut input, 1, &end);
//!
//! let mut decoder = RecordDecoder::new();
//! let mut head = Some(HeadParser::new());
//! while let Some(record) = decoder.decode(&mut input)? {
//!     match record.kind {
//!         RecordType::Stdout => {
//!             if let Some(parser) = head.take() {
//!                 match parser.feed(&record.content)? {
//!                     Progress::Partial(parser) => head = Some(parser),
//!                     Progress::Complete(response) => {
//!                         assert_eq!(response.status.code(), 404);
//!                         assert_eq!(&response.body[..], b"gone");
//!                     }
//!                 }
//!             }
//!         }
//!         RecordType::EndRequest => {
//!             let end = EndRequest::parse(&record.content)?;
//!             assert_eq!(end.protocol_status, ProtocolStatus::RequestComplete);
//!         }
//!         _ => {}
//!     }
//! }
//! // An empty buffer here: the connection sits on a record boundary.
//! assert!(input.is_empty());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod params;
pub mod record;
pub mod response;

pub use record::{
    BeginRequest, DecodeError, EncodeError, EndRequest, Header, ProtocolStatus, Record,
    RecordDecoder, RecordType, Role, ServerValues,
};
pub use response::{HeadParser, HeaderField, Progress, ResponseError, ResponseHead, Status};
