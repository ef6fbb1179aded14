//! Fuzzes the name-value pair decoder and the PARAMS encoder.
//!
//! Checks that decoding never panics, that whatever decodes re-encodes to no
//! more bytes than it came from, and that the pairs survive `encode_params`,
//! the record decoder and `decode_pairs` unchanged. Not checked: php-fpm's
//! view of the records; the unit tests cover the per-record packing.

#![no_main]

use bytes::BytesMut;
use holdfast_fastcgi::params::{decode_pairs, encoded_len};
use holdfast_fastcgi::record::encode_params;
use holdfast_fastcgi::{RecordDecoder, RecordType};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut pairs = Vec::new();
    let mut used = 0;
    for pair in decode_pairs(data) {
        let Ok((name, value)) = pair else {
            break;
        };
        used += encoded_len(name, value).expect("decoded lengths are below 2^31");
        assert!(used <= data.len());
        pairs.push((name, value));
    }

    let mut wire = BytesMut::new();
    encode_params(&mut wire, 1, pairs.iter().copied()).expect("decoded lengths are below 2^31");
    let mut decoder = RecordDecoder::new();
    let mut stream = Vec::new();
    while let Some(record) = decoder.decode(&mut wire).expect("own records decode") {
        assert_eq!((record.kind, record.request_id), (RecordType::Params, 1));
        stream.extend_from_slice(&record.content);
    }
    assert!(wire.is_empty());
    let again: Vec<_> = decode_pairs(&stream)
        .collect::<Result<_, _>>()
        .expect("own pairs decode");
    assert_eq!(again, pairs);
});
