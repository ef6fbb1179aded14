//! Fuzzes the CGI response `HeadParser` fed in chunks.
//!
//! Checks that it never panics, that the body it returns is the tail of what
//! it was fed, that the head fits the limit, and that chunked and one-shot
//! feeding agree. Not checked: which heads are accepted; the unit tests pin
//! that down.

#![no_main]

use holdfast_fastcgi::response::DEFAULT_HEAD_LIMIT;
use holdfast_fastcgi::{HeadParser, Progress};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Byte 0: read size. Byte 1: the default limit, or a small one.
    let Some((&[step, limit], input)) = data.split_first_chunk::<2>() else {
        return;
    };
    let step = usize::from(step).max(1);
    let limit = if limit & 1 == 0 {
        DEFAULT_HEAD_LIMIT
    } else {
        usize::from(limit)
    };

    let mut parser = HeadParser::with_limit(limit);
    let mut fed = 0;
    let mut chunked = None;
    for chunk in input.chunks(step) {
        fed += chunk.len();
        match parser.feed(chunk) {
            Ok(Progress::Partial(next)) => {
                assert_eq!(next.buffered_len(), fed);
                parser = next;
            }
            Ok(Progress::Complete(head)) => {
                assert!(input[..fed].ends_with(&head.body));
                assert!(fed - head.body.len() <= limit);
                chunked = Some(Ok(head));
                break;
            }
            Err(error) => {
                chunked = Some(Err(error));
                break;
            }
        }
    }

    let whole = HeadParser::with_limit(limit).feed(input);
    match (chunked, whole) {
        (Some(Ok(a)), Ok(Progress::Complete(b))) => {
            assert_eq!((a.status, a.headers), (b.status, b.headers));
            assert!(b.body.starts_with(&a.body));
        }
        (Some(Err(a)), Err(b)) => assert_eq!(a, b),
        (None, Ok(Progress::Partial(_))) => {}
        (a, b) => panic!("chunked {a:?}, whole {b:?}"),
    }
});
