use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;

use super::*;
use crate::params;

/// Decodes every whole record in `wire`; returns them and the bytes left.
fn decode_all(wire: &[u8]) -> (Vec<Record>, BytesMut) {
    let mut buf = BytesMut::from(wire);
    let mut decoder = RecordDecoder::new();
    let mut records = Vec::new();
    while let Some(record) = decoder.decode(&mut buf).expect("valid records") {
        records.push(record);
    }
    (records, buf)
}

fn record(kind: RecordType, request_id: u16, content: &[u8]) -> Record {
    Record {
        kind,
        request_id,
        content: Bytes::copy_from_slice(content),
    }
}

/// What php-fpm answers for one request: two STDOUT records, a STDERR
/// record, the end of STDOUT, END_REQUEST.
fn php_fpm_reply() -> (BytesMut, Vec<Record>) {
    let mut wire = BytesMut::new();
    let head = b"Content-type: text/html\r\n\r\n";
    encode_stream(&mut wire, RecordType::Stdout, 1, head);
    encode_stream(&mut wire, RecordType::Stdout, 1, b"hello");
    encode_stream(&mut wire, RecordType::Stderr, 1, b"PHP Notice: x");
    encode_stream(&mut wire, RecordType::Stdout, 1, b"");
    let end = EndRequest {
        app_status: 0,
        protocol_status: ProtocolStatus::RequestComplete,
    };
    encode_end_request(&mut wire, 1, &end);
    let expected = vec![
        record(RecordType::Stdout, 1, head),
        record(RecordType::Stdout, 1, b"hello"),
        record(RecordType::Stderr, 1, b"PHP Notice: x"),
        record(RecordType::Stdout, 1, b""),
        record(RecordType::EndRequest, 1, &end.to_bytes()),
    ];
    (wire, expected)
}

/// Checks that every record in `wire` is 8-byte aligned and has content
/// plus padding within 65535, as php-fpm's `fcgi_read_request` requires.
fn assert_fits_php_fpm(wire: &[u8]) {
    let mut rest = wire;
    while let Some(header) = rest.first_chunk::<HEADER_LEN>() {
        let header = Header::decode(header).expect("version 1");
        let padded = usize::from(header.content_length) + usize::from(header.padding_length);
        assert!(padded <= MAX_CONTENT_LEN, "{header:?}");
        assert_eq!(padded % 8, 0, "{header:?}");
        rest = &rest[header.record_len()..];
    }
    assert!(rest.is_empty());
}

// === encoders ===

#[test]
fn begin_request_matches_what_nginx_sends() {
    let mut buf = BytesMut::new();
    encode_begin_request(&mut buf, 1, Role::Responder, true);
    assert_eq!(
        &buf[..],
        b"\x01\x01\x00\x01\x00\x08\x00\x00\x00\x01\x01\x00\x00\x00\x00\x00"
    );

    buf.clear();
    encode_begin_request(&mut buf, 0x1234, Role::Responder, false);
    assert_eq!(&buf[..8], b"\x01\x01\x12\x34\x00\x08\x00\x00");
    assert_eq!(&buf[8..], b"\x00\x01\x00\x00\x00\x00\x00\x00");
    let (records, _) = decode_all(&buf);
    assert_eq!(
        BeginRequest::parse(&records[0].content),
        Ok(BeginRequest {
            role: Role::Responder,
            keep_conn: false
        })
    );
}

#[test]
fn abort_request_is_an_empty_record() {
    let mut buf = BytesMut::new();
    encode_abort_request(&mut buf, 7);
    assert_eq!(&buf[..], b"\x01\x02\x00\x07\x00\x00\x00\x00");
}

#[test]
fn empty_stdin_writes_only_the_terminating_record() {
    let mut buf = BytesMut::new();
    encode_stdin(&mut buf, 3, b"");
    assert_eq!(&buf[..], b"\x01\x05\x00\x03\x00\x00\x00\x00");
}

#[test]
fn stdin_is_split_into_records_php_fpm_accepts() {
    let body: Vec<u8> = (0..=255u8).cycle().take(MAX_CONTENT_LEN + 1).collect();
    let mut buf = BytesMut::new();
    encode_stdin(&mut buf, 1, &body[..MAX_ENCODED_CONTENT_LEN]);
    let (records, rest) = decode_all(&buf);
    assert!(rest.is_empty());
    assert_eq!(
        records,
        vec![record(
            RecordType::Stdin,
            1,
            &body[..MAX_ENCODED_CONTENT_LEN]
        )]
    );
    // 65528 bytes need no padding, and no terminator was written.
    assert_eq!(buf.len(), HEADER_LEN + MAX_ENCODED_CONTENT_LEN);

    buf.clear();
    encode_stdin(&mut buf, 1, &body);
    assert_fits_php_fpm(&buf);
    let (records, _) = decode_all(&buf);
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].content.len(), MAX_ENCODED_CONTENT_LEN);
    assert_eq!(&records[1].content[..], &body[MAX_ENCODED_CONTENT_LEN..]);
}

#[test]
fn content_is_padded_to_a_multiple_of_8() {
    for len in 0..=17 {
        let mut buf = BytesMut::new();
        encode_stdin(&mut buf, 1, &vec![b'x'; len]);
        assert_eq!(buf.len() % 8, 0, "length {len}");
        assert_eq!(usize::from(buf[6]), buf.len() - HEADER_LEN - len);
        assert!(buf[HEADER_LEN + len..].iter().all(|&b| b == 0));
    }
}

#[test]
fn params_without_pairs_are_one_empty_record() {
    let mut buf = BytesMut::new();
    encode_params(&mut buf, 1, []).unwrap();
    assert_eq!(&buf[..], b"\x01\x04\x00\x01\x00\x00\x00\x00");
}

#[test]
fn params_end_with_an_empty_record_and_never_split_a_pair_that_fits() {
    let value = vec![b'v'; 1000];
    let names: Vec<String> = (0..200).map(|i| format!("HTTP_X_{i}")).collect();
    let pairs: Vec<(&[u8], &[u8])> = names.iter().map(|n| (n.as_bytes(), &value[..])).collect();
    let mut buf = BytesMut::new();
    encode_params(&mut buf, 9, pairs.iter().copied()).unwrap();
    assert_fits_php_fpm(&buf);
    let (records, rest) = decode_all(&buf);
    assert!(rest.is_empty());
    assert!(records.len() > 3, "200 kB of pairs needs several records");
    let (last, full) = records.split_last().unwrap();
    assert_eq!(*last, record(RecordType::Params, 9, b""));
    let mut decoded = Vec::new();
    for r in full {
        assert_eq!((r.kind, r.request_id), (RecordType::Params, 9));
        assert!(!r.content.is_empty() && r.content.len() <= MAX_ENCODED_CONTENT_LEN);
        // Each record parses on its own, as php-fpm parses it.
        for pair in params::decode_pairs(&r.content) {
            let (n, v) = pair.expect("whole pairs per record");
            decoded.push((n.to_vec(), v.to_vec()));
        }
    }
    let expected: Vec<_> = pairs
        .iter()
        .map(|(n, v)| (n.to_vec(), v.to_vec()))
        .collect();
    assert_eq!(decoded, expected);
}

#[test]
fn a_pair_longer_than_a_record_spans_records() {
    let big = vec![b'c'; 100_000];
    let pairs: [(&[u8], &[u8]); 3] = [(b"A", b"1"), (b"HTTP_COOKIE", &big), (b"B", b"2")];
    let mut buf = BytesMut::new();
    encode_params(&mut buf, 1, pairs).unwrap();
    assert_fits_php_fpm(&buf);
    let (records, _) = decode_all(&buf);
    let stream: Vec<u8> = records.iter().flat_map(|r| r.content.to_vec()).collect();
    let decoded: Vec<_> = params::decode_pairs(&stream).map(Result::unwrap).collect();
    assert_eq!(decoded, pairs);
    assert!(records.len() > 3);
    assert_eq!(records.last().map(|r| r.content.len()), Some(0));
}

#[test]
fn a_param_over_2_gib_is_refused_and_leaves_the_buffer_alone() {
    // Zeroed allocations are mapped lazily: this touches no 2 GiB.
    let huge = vec![0u8; params::MAX_LEN + 1];
    let mut buf = BytesMut::from(&b"before"[..]);
    let pairs: [(&[u8], &[u8]); 2] = [(b"A", b"1"), (b"BIG", &huge)];
    assert_eq!(
        encode_params(&mut buf, 1, pairs),
        Err(EncodeError::ParamTooLong {
            len: params::MAX_LEN + 1
        })
    );
    assert_eq!(&buf[..], b"before");
}

#[test]
fn get_values_asks_with_empty_values_on_request_id_0() {
    let mut buf = BytesMut::new();
    encode_get_values(&mut buf, ServerValues::NAMES).unwrap();
    let (records, _) = decode_all(&buf);
    assert_eq!(records.len(), 1);
    assert_eq!(
        (records[0].kind, records[0].request_id),
        (RecordType::GetValues, NULL_REQUEST_ID)
    );
    let names: Vec<_> = params::decode_pairs(&records[0].content)
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        names,
        [
            (&b"FCGI_MAX_CONNS"[..], &b""[..]),
            (b"FCGI_MAX_REQS", b""),
            (b"FCGI_MPXS_CONNS", b"")
        ]
    );
}

#[test]
fn get_values_that_do_not_fit_one_record_are_refused() {
    let name = vec![b'N'; 1000];
    let mut buf = BytesMut::new();
    let result = encode_get_values(&mut buf, std::iter::repeat_n(&name[..], 70));
    assert_eq!(result, Err(EncodeError::RecordTooLong { len: 70 * 1005 }));
    assert!(buf.is_empty());
}

// === decoder ===

#[test]
fn decodes_a_reply_and_skips_padding() {
    let (wire, expected) = php_fpm_reply();
    let (records, rest) = decode_all(&wire);
    assert_eq!(records, expected);
    assert!(rest.is_empty());
}

#[test]
fn decodes_a_reply_split_at_every_offset() {
    let (wire, expected) = php_fpm_reply();
    for split in 0..=wire.len() {
        let mut decoder = RecordDecoder::new();
        let mut buf = BytesMut::from(&wire[..split]);
        let mut records = Vec::new();
        while let Some(r) = decoder.decode(&mut buf).unwrap() {
            records.push(r);
        }
        buf.put_slice(&wire[split..]);
        while let Some(r) = decoder.decode(&mut buf).unwrap() {
            records.push(r);
        }
        assert_eq!(records, expected, "split at {split}");
        assert!(buf.is_empty());
    }
}

#[test]
fn decodes_a_reply_fed_byte_by_byte() {
    let (wire, expected) = php_fpm_reply();
    let mut decoder = RecordDecoder::new();
    let mut buf = BytesMut::new();
    let mut records = Vec::new();
    for &byte in wire.iter() {
        buf.put_u8(byte);
        while let Some(r) = decoder.decode(&mut buf).unwrap() {
            records.push(r);
        }
    }
    assert_eq!(records, expected);
}

#[test]
fn an_incomplete_record_is_left_in_the_buffer() {
    let mut decoder = RecordDecoder::new();
    let mut buf = BytesMut::new();
    assert_eq!(decoder.decode(&mut buf), Ok(None));

    buf.put_slice(b"\x01\x06\x00\x01\x00\x05\x03");
    assert_eq!(decoder.decode(&mut buf), Ok(None));
    assert_eq!(buf.len(), 7);

    buf.put_slice(b"\x00hel");
    assert_eq!(decoder.decode(&mut buf), Ok(None));
    assert_eq!(&buf[..], b"\x01\x06\x00\x01\x00\x05\x03\x00hel");
    assert!(buf.capacity() >= HEADER_LEN + 5 + 3, "room for the rest");

    buf.put_slice(b"lo\0\0\0\x01");
    let r = decoder.decode(&mut buf).unwrap();
    assert_eq!(r, Some(record(RecordType::Stdout, 1, b"hello")));
    assert_eq!(&buf[..], b"\x01", "the next record's first byte stays");
}

#[test]
fn the_largest_record_decodes() {
    let mut wire = BytesMut::new();
    wire.put_slice(b"\x01\x06\x00\x01\xff\xff\xff\x00");
    wire.put_bytes(b'a', MAX_CONTENT_LEN);
    wire.put_bytes(0, MAX_PADDING_LEN);
    let (records, rest) = decode_all(&wire);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].content.len(), MAX_CONTENT_LEN);
    assert!(rest.is_empty());
}

#[test]
fn version_other_than_1_is_rejected_on_the_first_byte() {
    let mut decoder = RecordDecoder::new();
    for version in [0u8, 2, b'H', 255] {
        let mut buf = BytesMut::from(&[version][..]);
        assert_eq!(
            decoder.decode(&mut buf),
            Err(DecodeError::UnsupportedVersion { version })
        );
        assert_eq!(buf.len(), 1, "nothing consumed");
    }
    let mut buf = BytesMut::from(&b"HTTP/1.1 400 Bad Request\r\n"[..]);
    let err = decoder.decode(&mut buf).unwrap_err();
    assert_eq!(
        err.to_string(),
        "FastCGI record has version 72, only version 1 exists"
    );
}

#[test]
fn a_bad_header_after_good_records_fails_there() {
    let (mut wire, expected) = php_fpm_reply();
    wire.put_slice(b"\x02\x06\x00\x01\x00\x00\x00\x00");
    let mut decoder = RecordDecoder::new();
    for want in expected {
        assert_eq!(decoder.decode(&mut wire), Ok(Some(want)));
    }
    assert_eq!(
        decoder.decode(&mut wire),
        Err(DecodeError::UnsupportedVersion { version: 2 })
    );
}

#[test]
fn unknown_types_and_management_records_pass_through() {
    let mut wire = BytesMut::new();
    wire.put_slice(b"\x01\x2a\x00\x00\x00\x01\x07\x00z\0\0\0\0\0\0\0");
    let (records, _) = decode_all(&wire);
    assert_eq!(records, vec![record(RecordType::Other(42), 0, b"z")]);
}

#[test]
fn record_type_bytes_round_trip() {
    for byte in 0..=u8::MAX {
        let kind = RecordType::from(byte);
        assert_eq!(u8::from(kind), byte);
        assert_eq!(
            matches!(kind, RecordType::Other(_)),
            !(1..=11).contains(&byte)
        );
    }
    assert!(RecordType::GetValuesResult.is_management());
    assert!(!RecordType::Stdout.is_management());
}

// === bodies ===

#[test]
fn end_request_parses_status_and_protocol_status() {
    let end = EndRequest::parse(b"\x00\x00\x01\x00\x02\x00\x00\x00").unwrap();
    assert_eq!(end.app_status, 256);
    assert_eq!(end.protocol_status, ProtocolStatus::Overloaded);
    assert_eq!(end.to_bytes(), *b"\x00\x00\x01\x00\x02\x00\x00\x00");
    for (byte, status) in [
        (0, ProtocolStatus::RequestComplete),
        (1, ProtocolStatus::CantMpxConn),
        (3, ProtocolStatus::UnknownRole),
        (9, ProtocolStatus::Other(9)),
    ] {
        let content = [0, 0, 0, 0, byte, 0, 0, 0];
        assert_eq!(EndRequest::parse(&content).unwrap().protocol_status, status);
        assert_eq!(status.as_u8(), byte);
    }
}

#[test]
fn end_request_of_the_wrong_length_is_rejected() {
    assert_eq!(
        EndRequest::parse(b"\x00\x00\x00\x00\x00"),
        Err(DecodeError::EndRequestLength { len: 5 })
    );
    assert_eq!(
        EndRequest::parse(&[0; 9]),
        Err(DecodeError::EndRequestLength { len: 9 })
    );
    assert_eq!(
        BeginRequest::parse(&[]),
        Err(DecodeError::BeginRequestLength { len: 0 })
    );
}

#[test]
fn server_values_parse_a_php_fpm_answer() {
    let mut content = BytesMut::new();
    params::encode_pair(&mut content, b"FCGI_MAX_CONNS", b"5").unwrap();
    params::encode_pair(&mut content, b"FCGI_SOMETHING_NEW", b"x").unwrap();
    params::encode_pair(&mut content, b"FCGI_MAX_REQS", b"4294967295").unwrap();
    params::encode_pair(&mut content, b"FCGI_MPXS_CONNS", b"0").unwrap();
    assert_eq!(
        ServerValues::parse(&content),
        Ok(ServerValues {
            max_conns: Some(5),
            max_reqs: Some(u32::MAX),
            mpxs_conns: Some(false),
        })
    );
    assert_eq!(ServerValues::parse(b""), Ok(ServerValues::default()));
}

#[test]
fn server_values_reject_bad_numbers_and_pairs() {
    for (name, value) in [
        (&b"FCGI_MAX_CONNS"[..], &b""[..]),
        (b"FCGI_MAX_CONNS", b"-1"),
        (b"FCGI_MAX_REQS", b"4294967296"),
        (b"FCGI_MAX_REQS", b" 5"),
        (b"FCGI_MPXS_CONNS", b"2"),
    ] {
        let mut content = BytesMut::new();
        params::encode_pair(&mut content, name, value).unwrap();
        assert!(
            matches!(
                ServerValues::parse(&content),
                Err(DecodeError::ServerValue { .. })
            ),
            "{value:?}"
        );
    }
    assert_eq!(
        ServerValues::parse(b"\x0e"),
        Err(DecodeError::Params(params::ParamsError::TruncatedLength {
            offset: 0
        }))
    );
}

#[test]
fn server_values_round_trip_through_get_values_result() {
    let values = ServerValues {
        max_conns: Some(50),
        max_reqs: None,
        mpxs_conns: Some(true),
    };
    let mut wire = BytesMut::new();
    encode_get_values_result(&mut wire, &values);
    let (records, _) = decode_all(&wire);
    assert_eq!(records[0].kind, RecordType::GetValuesResult);
    assert_eq!(ServerValues::parse(&records[0].content), Ok(values));
}

// === properties ===

fn arb_stream_record() -> impl Strategy<Value = (u8, u16, Vec<u8>)> {
    (
        any::<u8>(),
        any::<u16>(),
        prop_oneof![
            4 => proptest::collection::vec(any::<u8>(), 0..200),
            1 => proptest::collection::vec(any::<u8>(), 0..(MAX_CONTENT_LEN + 100)),
        ],
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn records_round_trip_through_any_chunking(
        input in proptest::collection::vec(arb_stream_record(), 0..6),
        cuts in proptest::collection::vec(1usize..4000, 0..40),
    ) {
        let mut wire = BytesMut::new();
        let mut expected = Vec::new();
        for (kind, id, content) in &input {
            let kind = RecordType::from_u8(*kind);
            encode_stream(&mut wire, kind, *id, content);
            if content.is_empty() {
                expected.push(record(kind, *id, b""));
            }
            for chunk in content.chunks(MAX_ENCODED_CONTENT_LEN) {
                expected.push(record(kind, *id, chunk));
            }
        }
        assert_fits_php_fpm(&wire);

        let mut decoder = RecordDecoder::new();
        let mut buf = BytesMut::new();
        let mut decoded = Vec::new();
        let mut rest = &wire[..];
        for cut in cuts.iter().copied().chain(std::iter::once(usize::MAX)) {
            let (now, later) = rest.split_at(cut.min(rest.len()));
            rest = later;
            buf.put_slice(now);
            while let Some(r) = decoder.decode(&mut buf).unwrap() {
                decoded.push(r);
            }
        }
        prop_assert_eq!(decoded, expected);
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn params_round_trip_through_records(
        pairs in proptest::collection::vec(
            (
                proptest::collection::vec(any::<u8>(), 0..200),
                proptest::collection::vec(any::<u8>(), 0..40_000),
            ),
            0..6,
        ),
        id in any::<u16>(),
    ) {
        let mut wire = BytesMut::new();
        encode_params(&mut wire, id, pairs.iter().map(|(n, v)| (&n[..], &v[..]))).unwrap();
        assert_fits_php_fpm(&wire);
        let (records, rest) = decode_all(&wire);
        prop_assert!(rest.is_empty());
        prop_assert!(records.iter().all(|r| r.kind == RecordType::Params && r.request_id == id));
        prop_assert_eq!(records.last().map(|r| r.content.len()), Some(0));
        let stream: Vec<u8> = records.iter().flat_map(|r| r.content.to_vec()).collect();
        let decoded: Vec<(Vec<u8>, Vec<u8>)> = params::decode_pairs(&stream)
            .map(|p| p.map(|(n, v)| (n.to_vec(), v.to_vec())))
            .collect::<Result<_, _>>()
            .unwrap();
        prop_assert_eq!(decoded, pairs);
    }

    #[test]
    fn decoder_never_panics_and_takes_exactly_whole_records(
        input in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..600),
            // Mostly version 1 with short lengths, so records complete.
            proptest::collection::vec(
                (any::<u8>(), any::<u16>(), 0u8..40, 0u8..9, any::<u8>()),
                0..12,
            ).prop_map(|headers| {
                let mut wire = Vec::new();
                for (kind, id, len, pad, fill) in headers {
                    let [hi, lo] = id.to_be_bytes();
                    wire.extend_from_slice(&[1, kind, hi, lo, 0, len, pad, 0]);
                    wire.extend(std::iter::repeat_n(fill, usize::from(len) + usize::from(pad)));
                }
                wire
            }),
        ],
        cut in any::<prop::sample::Index>(),
    ) {
        let cut = cut.index(input.len() + 1);
        let mut decoder = RecordDecoder::new();
        let mut buf = BytesMut::from(&input[..cut]);
        let mut offset = 0;
        for fed in [cut, input.len()] {
            if fed == input.len() {
                buf.put_slice(&input[cut..]);
            }
            loop {
                match decoder.decode(&mut buf) {
                    Ok(Some(r)) => {
                        let pad = usize::from(input[offset + 6]);
                        let len = HEADER_LEN + r.content.len() + pad;
                        prop_assert_eq!(&r.content[..], &input[offset + HEADER_LEN..][..r.content.len()]);
                        offset += len;
                    }
                    Ok(None) => break,
                    Err(DecodeError::UnsupportedVersion { version }) => {
                        prop_assert_eq!(version, input[offset]);
                        break;
                    }
                    Err(other) => prop_assert!(false, "unexpected {other:?}"),
                }
                prop_assert!(offset <= fed);
            }
            prop_assert_eq!(&buf[..], &input[offset..fed]);
        }
    }
}
