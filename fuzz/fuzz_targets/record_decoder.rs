//! Fuzzes `RecordDecoder` fed in chunks, and the END_REQUEST,
//! BEGIN_REQUEST and GET_VALUES_RESULT body parsers on what it yields.
//!
//! Checks that it never panics, that every record's content is the bytes
//! right after its header, and that the buffer always holds exactly the
//! bytes not yet returned. Not checked: what a caller does with the records.

#![no_main]

use bytes::{BufMut, BytesMut};
use holdfast_fastcgi::record::HEADER_LEN;
use holdfast_fastcgi::{BeginRequest, EndRequest, RecordDecoder, RecordType, ServerValues};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte sets the read size, so records split at any offset.
    let Some((&step, wire)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    let mut decoder = RecordDecoder::new();
    let mut buf = BytesMut::new();
    let mut fed = 0;
    let mut taken = 0;
    for chunk in wire.chunks(step) {
        buf.put_slice(chunk);
        fed += chunk.len();
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(record)) => {
                    let content = &wire[taken + HEADER_LEN..][..record.content.len()];
                    assert_eq!(&record.content[..], content);
                    let padding = usize::from(wire[taken + 6]);
                    taken += HEADER_LEN + record.content.len() + padding;
                    match record.kind {
                        RecordType::BeginRequest => {
                            let _ = BeginRequest::parse(&record.content);
                        }
                        RecordType::EndRequest => {
                            let _ = EndRequest::parse(&record.content);
                        }
                        RecordType::GetValuesResult => {
                            let _ = ServerValues::parse(&record.content);
                        }
                        _ => {}
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(taken <= fed);
        assert_eq!(&buf[..], &wire[taken..fed]);
    }
});
