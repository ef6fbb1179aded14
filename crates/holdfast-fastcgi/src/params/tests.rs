use bytes::BytesMut;
use proptest::prelude::*;

use super::*;

fn encode(name: &[u8], value: &[u8]) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode_pair(&mut buf, name, value).expect("short pair encodes");
    buf.to_vec()
}

type OwnedPair = (Vec<u8>, Vec<u8>);

fn decode_all(content: &[u8]) -> Result<Vec<OwnedPair>, ParamsError> {
    decode_pairs(content)
        .map(|pair| pair.map(|(n, v)| (n.to_vec(), v.to_vec())))
        .collect()
}

#[test]
fn short_lengths_take_one_byte() {
    assert_eq!(
        encode(b"SCRIPT_NAME", b"/i.php"),
        b"\x0b\x06SCRIPT_NAME/i.php"
    );
    assert_eq!(encode(b"", b""), b"\x00\x00");
}

#[test]
fn length_127_is_short_and_128_is_long_with_high_bit() {
    let value = vec![b'v'; 127];
    let encoded = encode(b"A", &value);
    assert_eq!(&encoded[..2], b"\x01\x7f");
    assert_eq!(encoded.len(), 2 + 1 + 127);

    let value = vec![b'v'; 128];
    let encoded = encode(b"A", &value);
    assert_eq!(&encoded[..5], b"\x01\x80\x00\x00\x80");
    assert_eq!(encoded.len(), 5 + 1 + 128);
    assert_eq!(encoded_len(b"A", &value), Ok(encoded.len()));

    let name = vec![b'n'; 70_000];
    let encoded = encode(&name, b"");
    assert_eq!(&encoded[..5], b"\x80\x01\x11\x70\x00");
}

#[test]
fn decodes_what_it_encodes_in_order() {
    let mut buf = BytesMut::new();
    let long = vec![b'x'; 300];
    encode_pair(&mut buf, b"REQUEST_METHOD", b"GET").unwrap();
    encode_pair(&mut buf, b"HTTP_COOKIE", &long).unwrap();
    encode_pair(&mut buf, b"EMPTY", b"").unwrap();
    assert_eq!(
        decode_all(&buf).unwrap(),
        vec![
            (b"REQUEST_METHOD".to_vec(), b"GET".to_vec()),
            (b"HTTP_COOKIE".to_vec(), long),
            (b"EMPTY".to_vec(), Vec::new()),
        ]
    );
}

#[test]
fn accepts_a_long_prefix_for_a_short_length() {
    let content = b"\x80\x00\x00\x01\x01AB";
    assert_eq!(
        decode_all(content).unwrap(),
        vec![(b"A".to_vec(), b"B".to_vec())]
    );
}

#[test]
fn truncated_length_prefix_is_an_error() {
    assert_eq!(
        decode_all(b"\x01"),
        Err(ParamsError::TruncatedLength { offset: 0 })
    );
    assert_eq!(
        decode_all(b"\x01\x01AB\x80\x00\x00"),
        Err(ParamsError::TruncatedLength { offset: 4 })
    );
    assert_eq!(
        decode_all(b"\x01\x80\x00"),
        Err(ParamsError::TruncatedLength { offset: 0 })
    );
}

#[test]
fn lengths_past_the_end_are_an_error() {
    assert_eq!(
        decode_all(b"\x01\x02AB"),
        Err(ParamsError::TruncatedData {
            offset: 0,
            needed: 3,
            available: 2
        })
    );
    assert_eq!(
        decode_all(b"\xff\xff\xff\xff\xff\xff\xff\xff"),
        Err(ParamsError::TruncatedData {
            offset: 0,
            needed: 2 * MAX_LEN,
            available: 0
        })
    );
}

#[test]
fn iteration_stops_after_the_first_error() {
    let mut pairs = decode_pairs(b"\x01\x01AB\x05");
    assert_eq!(pairs.next(), Some(Ok((&b"A"[..], &b"B"[..]))));
    assert!(matches!(pairs.next(), Some(Err(_))));
    assert_eq!(pairs.next(), None);
}

#[test]
fn empty_content_has_no_pairs() {
    assert_eq!(decode_pairs(b"").count(), 0);
}

/// Whether `inner` lies inside `outer`'s memory.
fn within(outer: &[u8], inner: &[u8]) -> bool {
    let outer = outer.as_ptr_range();
    let start = inner.as_ptr();
    outer.start <= start && start.wrapping_add(inner.len()) <= outer.end
}

proptest! {
    #[test]
    fn pairs_round_trip(
        pairs in proptest::collection::vec(
            (
                proptest::collection::vec(any::<u8>(), 0..300),
                proptest::collection::vec(any::<u8>(), 0..300),
            ),
            0..8,
        )
    ) {
        let mut buf = BytesMut::new();
        for (name, value) in &pairs {
            encode_pair(&mut buf, name, value).unwrap();
        }
        let expected_len: usize = pairs
            .iter()
            .map(|(n, v)| encoded_len(n, v).unwrap())
            .sum();
        prop_assert_eq!(buf.len(), expected_len);
        prop_assert_eq!(decode_all(&buf).unwrap(), pairs);
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics_or_overreads(
        content in proptest::collection::vec(any::<u8>(), 0..512)
    ) {
        let mut used = 0;
        for pair in decode_pairs(&content) {
            match pair {
                Ok((name, value)) => {
                    prop_assert!(within(&content, name) && within(&content, value));
                    // Each pair is at least its prefixes plus its slices.
                    used += encoded_len(name, value).unwrap_or(usize::MAX);
                    prop_assert!(used <= content.len());
                }
                Err(_) => break,
            }
        }
    }
}
