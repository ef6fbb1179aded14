//! Fuzzes holdfast's HTTP/1.1 response codec the way a connection drives it: a
//! response head, then a chunked body, fed in reads of a fuzzer-chosen size.
//!
//! Checks that it never panics, that a complete head leaves exactly the bytes
//! after it in the buffer, that a head is never longer than `MAX_HEAD`, and
//! that the chunked decoder yields no more body than it was fed and only
//! consumes what it was given. Not checked: which inputs are accepted; the unit
//! tests and properties in the crate pin that down.

#![no_main]

use bytes::BytesMut;
use holdfast_http1::{Chunk, ChunkedDecoder, MAX_HEAD, parse_response_head};
use http::Method;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Byte 0: read size. Byte 1: the request method (HEAD or GET).
    let Some((&[step, method], input)) = data.split_first_chunk::<2>() else {
        return;
    };
    let step = usize::from(step).max(1);
    let method = if method & 1 == 0 {
        Method::GET
    } else {
        Method::HEAD
    };

    let mut buf = BytesMut::new();
    let mut fed = 0;
    let mut rest = input.chunks(step);
    let head = loop {
        let Some(chunk) = rest.next() else { return };
        buf.extend_from_slice(chunk);
        fed += chunk.len();
        match parse_response_head(&mut buf, &method) {
            Ok(Some(head)) => break head,
            Ok(None) => continue,
            Err(_) => return,
        }
    };
    let head_len = fed - buf.len();
    assert!(head_len <= MAX_HEAD, "head of {head_len} bytes accepted");
    assert_eq!(
        &buf[..],
        &input[head_len..fed],
        "the bytes after the head stay"
    );
    let _ = head.framing;

    // Whatever follows, as a chunked body.
    let mut decoder = ChunkedDecoder::new();
    let mut body = 0usize;
    let mut given = buf.len();
    for round in 0.. {
        // Bounded: each round consumes bytes or asks for more.
        assert!(round <= 4 * input.len() + 8, "the decoder does not advance");
        match decoder.decode(&mut buf) {
            Ok(Chunk::Data(d)) => {
                assert!(!d.is_empty());
                body += d.len();
            }
            Ok(Chunk::Trailers(_)) => {}
            Ok(Chunk::End) | Err(_) => break,
            Ok(Chunk::More) => match rest.next() {
                Some(chunk) => {
                    buf.extend_from_slice(chunk);
                    given += chunk.len();
                }
                None => break,
            },
        }
    }
    assert!(body <= given, "{body} body bytes from {given} fed");
});
