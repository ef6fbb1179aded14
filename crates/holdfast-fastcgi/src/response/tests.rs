use proptest::prelude::*;

use super::*;

/// Feeds all of `input` at once.
fn parse(input: &[u8]) -> Result<Progress, ResponseError> {
    HeadParser::new().feed(input)
}

fn complete(input: &[u8]) -> ResponseHead {
    match parse(input) {
        Ok(Progress::Complete(head)) => head,
        other => panic!("expected a complete head for {input:?}, got {other:?}"),
    }
}

fn error(input: &[u8]) -> ResponseError {
    match parse(input) {
        Err(error) => error,
        other => panic!("expected an error for {input:?}, got {other:?}"),
    }
}

/// Feeds `chunks` one after another.
fn feed_chunks<'a>(
    mut parser: HeadParser,
    chunks: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Progress, ResponseError> {
    let mut chunks = chunks.into_iter().peekable();
    while let Some(chunk) = chunks.next() {
        match parser.feed(chunk)? {
            Progress::Partial(next) if chunks.peek().is_some() => parser = next,
            progress => return Ok(progress),
        }
    }
    Ok(Progress::Partial(parser))
}

fn field(name: &str, value: &str) -> HeaderField {
    HeaderField {
        name: Bytes::copy_from_slice(name.as_bytes()),
        value: Bytes::copy_from_slice(value.as_bytes()),
    }
}

const PHP: &[u8] =
    b"X-Powered-By: PHP/8.2.7\r\nContent-type: text/html; charset=UTF-8\r\n\r\n<p>hi</p>";

#[test]
fn parses_a_php_head_and_keeps_the_body_start() {
    let head = complete(PHP);
    assert_eq!(head.status, Status::ImplicitOk);
    assert_eq!(head.status.code(), 200);
    assert_eq!(
        head.headers,
        vec![
            field("X-Powered-By", "PHP/8.2.7"),
            field("Content-type", "text/html; charset=UTF-8"),
        ]
    );
    assert_eq!(&head.body[..], b"<p>hi</p>");
}

#[test]
fn byte_by_byte_gives_the_same_head() {
    let head = match feed_chunks(HeadParser::new(), PHP.chunks(1)) {
        Ok(Progress::Complete(head)) => head,
        other => panic!("{other:?}"),
    };
    // The head completes on the blank line's LF; the body comes later.
    assert_eq!(head.body.len(), 0);
    assert_eq!(head.headers, complete(PHP).headers);
}

#[test]
fn any_split_gives_the_same_head_and_body() {
    let whole = complete(PHP);
    for split in 0..=PHP.len() {
        let (a, b) = PHP.split_at(split);
        let head = match feed_chunks(HeadParser::new(), [a, b]) {
            Ok(Progress::Complete(head)) => head,
            other => panic!("split {split}: {other:?}"),
        };
        assert_eq!(
            (&head.status, &head.headers),
            (&whole.status, &whole.headers)
        );
        assert!(whole.body.starts_with(&head.body), "split {split}");
    }
}

#[test]
fn partial_head_asks_for_more() {
    let parser = match parse(b"Content-Type: text/plain\r\n") {
        Ok(Progress::Partial(parser)) => parser,
        other => panic!("{other:?}"),
    };
    assert_eq!(parser.buffered_len(), 26);
    assert!(matches!(parser.feed(b"\r"), Ok(Progress::Partial(_))));
}

#[test]
fn accepts_lf_and_mixed_line_ends() {
    for input in [
        &b"A: 1\nB: 2\n\nbody"[..],
        b"A: 1\r\nB: 2\n\r\nbody",
        b"A: 1\nB: 2\r\n\nbody",
        b"A: 1\r\nB: 2\r\n\r\nbody",
    ] {
        let head = complete(input);
        assert_eq!(head.headers, vec![field("A", "1"), field("B", "2")]);
        assert_eq!(&head.body[..], b"body", "{input:?}");
    }
}

#[test]
fn a_blank_line_in_the_body_stays_in_the_body() {
    let head = complete(b"A: 1\n\nline\r\n\r\nmore");
    assert_eq!(&head.body[..], b"line\r\n\r\nmore");
}

#[test]
fn an_empty_head_is_a_200_with_no_headers() {
    let head = complete(b"\r\nbody");
    assert_eq!((head.status, head.headers.len()), (Status::ImplicitOk, 0));
    assert_eq!(&head.body[..], b"body");
}

#[test]
fn values_lose_surrounding_whitespace_but_keep_inner() {
    let head = complete(b"A:\t  x  y \t\r\nB:\r\n\r\n");
    assert_eq!(head.headers, vec![field("A", "x  y"), field("B", "")]);
}

#[test]
fn obs_text_in_values_is_kept() {
    let head = complete(b"X: caf\xc3\xa9\n\n");
    assert_eq!(&head.headers[0].value[..], b"caf\xc3\xa9");
}

// === status ===

#[test]
fn status_field_sets_the_status_and_is_not_a_header() {
    let head = complete(b"Status: 404 Not Found\r\nContent-Type: text/html\r\n\r\n");
    assert_eq!(
        head.status,
        Status::Explicit {
            code: 404,
            reason: Bytes::from_static(b"Not Found")
        }
    );
    assert_eq!(head.headers, vec![field("Content-Type", "text/html")]);
}

#[test]
fn status_forms_that_are_accepted() {
    for (input, code, reason) in [
        (&b"Status: 200\n\n"[..], 200, &b""[..]),
        (b"status:201 Created\n\n", 201, b"Created"),
        (
            b"STATUS:  503\tService  Unavailable \n\n",
            503,
            b"Service  Unavailable",
        ),
        (b"Status: 999 x\n\n", 999, b"x"),
        (b"Status: 100 \n\n", 100, b""),
    ] {
        let head = complete(input);
        let want = Status::Explicit {
            code,
            reason: Bytes::copy_from_slice(reason),
        };
        assert_eq!(head.status, want, "{input:?}");
    }
}

#[test]
fn invalid_status_is_rejected_with_its_line() {
    for value in [
        &b""[..],
        b"20",
        b"2000",
        b"200OK",
        b"099 Low",
        b"abc",
        b"-200",
        b"+200",
        b"2 00",
    ] {
        let mut input = b"A: 1\r\nStatus: ".to_vec();
        input.extend_from_slice(value);
        input.extend_from_slice(b"\r\n\r\n");
        assert_eq!(
            error(&input),
            ResponseError::InvalidStatus { line: 2 },
            "{value:?}"
        );
    }
}

#[test]
fn a_second_status_is_rejected() {
    assert_eq!(
        error(b"Status: 200\nStatus: 404\n\n"),
        ResponseError::DuplicateStatus { line: 2 }
    );
}

#[test]
fn absolute_location_without_status_is_a_302_client_redirect() {
    let head = complete(b"Location: https://example.com/x\r\n\r\n");
    assert_eq!(head.status, Status::ClientRedirect);
    assert_eq!(head.status.code(), 302);
    assert_eq!(
        head.location().map(|l| &l[..]),
        Some(&b"https://example.com/x"[..])
    );
}

#[test]
fn local_location_without_status_is_a_local_redirect() {
    let head = complete(b"Location: /index.php?q=1\r\n\r\n");
    assert_eq!(head.status, Status::LocalRedirect);
    assert_eq!(head.headers, vec![field("Location", "/index.php?q=1")]);
}

#[test]
fn network_path_location_is_a_client_redirect_not_a_local_one() {
    let head = complete(b"Location: //other.example/\r\n\r\n");
    assert_eq!(head.status, Status::ClientRedirect);
}

#[test]
fn status_wins_over_location() {
    let head = complete(b"Location: /moved\r\nStatus: 301 Moved Permanently\r\n\r\n");
    assert_eq!(head.status.code(), 301);
    assert_eq!(head.location().map(|l| &l[..]), Some(&b"/moved"[..]));
}

#[test]
fn empty_location_is_not_a_redirect() {
    assert_eq!(complete(b"Location:\r\n\r\n").status, Status::ImplicitOk);
}

#[test]
fn a_second_location_is_rejected() {
    assert_eq!(
        error(b"Location: /a\nlocation: https://b/\n\n"),
        ResponseError::DuplicateLocation { line: 2 }
    );
}

// === malformed lines ===

#[test]
fn obs_fold_is_rejected() {
    assert_eq!(
        error(b"X-Long: a\r\n  continued\r\n\r\n"),
        ResponseError::ObsFold { line: 2 }
    );
    assert_eq!(error(b"\tX: 1\n\n"), ResponseError::ObsFold { line: 1 });
}

#[test]
fn line_without_colon_is_malformed() {
    assert_eq!(
        error(b"HTTP/1.1 200 OK\r\n\r\n"),
        ResponseError::MalformedLine { line: 1 }
    );
}

#[test]
fn bad_names_are_rejected() {
    for line in [
        &b": v"[..],
        b"Bad Name: v",
        b"Name : v",
        b"N\x00: v",
        b"N\xc3\xa9: v",
        b"N\r: v",
    ] {
        let mut input = line.to_vec();
        input.extend_from_slice(b"\r\n\r\n");
        assert_eq!(
            error(&input),
            ResponseError::InvalidName { line: 1 },
            "{line:?}"
        );
    }
}

#[test]
fn control_characters_in_values_are_rejected() {
    for line in [
        &b"X: a\x00b"[..],
        b"X: a\rb",
        b"X: a\x7f",
        b"X: \x1b[31m",
        b"X: a\r\r",
    ] {
        let mut input = line.to_vec();
        input.extend_from_slice(b"\r\n\r\n");
        assert_eq!(
            error(&input),
            ResponseError::InvalidValue { line: 1 },
            "{line:?}"
        );
    }
}

#[test]
fn a_bad_line_fails_before_the_head_ends() {
    assert!(matches!(
        parse(b"A: 1\nno colon here\n"),
        Err(ResponseError::MalformedLine { line: 2 })
    ));
}

// === limit ===

#[test]
fn a_head_of_exactly_the_limit_is_accepted() {
    let input = b"A: 1\r\n\r\nbody";
    let head_len = 8;
    let head = match HeadParser::with_limit(head_len).feed(input) {
        Ok(Progress::Complete(head)) => head,
        other => panic!("{other:?}"),
    };
    assert_eq!(&head.body[..], b"body");
    assert_eq!(
        HeadParser::with_limit(head_len - 1)
            .feed(input)
            .unwrap_err(),
        ResponseError::HeadTooLarge {
            limit: head_len - 1
        }
    );
}

#[test]
fn a_head_that_cannot_fit_fails_before_its_end_arrives() {
    // 7 bytes and no blank line: the head is at least 8 bytes.
    assert_eq!(
        HeadParser::with_limit(7).feed(b"A: 1\r\n\r").unwrap_err(),
        ResponseError::HeadTooLarge { limit: 7 }
    );
    assert!(matches!(
        HeadParser::with_limit(8).feed(b"A: 1\r\n\r"),
        Ok(Progress::Partial(_))
    ));
    // A line with no LF yet, fed one byte at a time.
    let err = feed_chunks(HeadParser::with_limit(100), [b'x'; 200].chunks(1)).unwrap_err();
    assert_eq!(err, ResponseError::HeadTooLarge { limit: 100 });
}

#[test]
fn the_default_limit_is_64_kib() {
    let mut input = b"X: ".to_vec();
    input.resize(DEFAULT_HEAD_LIMIT - 4, b'v');
    input.extend_from_slice(b"\r\n\r\n");
    assert!(matches!(parse(&input), Ok(Progress::Complete(_))));
    input.insert(3, b'v');
    assert_eq!(
        error(&input),
        ResponseError::HeadTooLarge {
            limit: DEFAULT_HEAD_LIMIT
        }
    );
}

// === properties ===

fn arb_head_line() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"Status: 404 Not Found".to_vec()),
        Just(b"Location: /x".to_vec()),
        Just(b"Location: http://h/".to_vec()),
        Just(b"Content-Type: text/html".to_vec()),
        Just(b" folded".to_vec()),
        Just(b"".to_vec()),
        "[A-Za-z-]{1,8}: [ -~]{0,12}".prop_map(String::into_bytes),
        proptest::collection::vec(any::<u8>(), 0..12),
    ]
}

fn arb_stdout() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..300),
        (
            proptest::collection::vec(
                (
                    arb_head_line(),
                    prop_oneof![Just(&b"\r\n"[..]), Just(&b"\n"[..])]
                ),
                0..8,
            ),
            proptest::collection::vec(any::<u8>(), 0..40),
        )
            .prop_map(|(lines, tail)| {
                let mut out = Vec::new();
                for (line, end) in lines {
                    out.extend_from_slice(&line);
                    out.extend_from_slice(end);
                }
                out.extend_from_slice(&tail);
                out
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn parser_never_panics_and_never_reads_past_its_input(
        input in arb_stdout(),
        limit in prop_oneof![Just(DEFAULT_HEAD_LIMIT), 0usize..120],
        cuts in proptest::collection::vec(0usize..50, 0..10),
    ) {
        let mut chunks = Vec::new();
        let mut rest = &input[..];
        for cut in cuts {
            let (now, later) = rest.split_at(cut.min(rest.len()));
            chunks.push(now);
            rest = later;
        }
        chunks.push(rest);
        let chunked = feed_chunks(HeadParser::with_limit(limit), chunks.iter().copied());
        let whole = HeadParser::with_limit(limit).feed(&input);
        match (chunked, whole) {
            (Ok(Progress::Complete(a)), Ok(Progress::Complete(b))) => {
                prop_assert_eq!(&a.status, &b.status);
                prop_assert_eq!(&a.headers, &b.headers);
                // The body is a suffix of what was fed, and the head plus
                // the body is never more than the input.
                prop_assert!(input.ends_with(&b.body));
                prop_assert!(b.body.starts_with(&a.body));
                let head_len = input.len() - b.body.len();
                prop_assert!(head_len <= limit);
                for field in &b.headers {
                    prop_assert!(input[..head_len].windows(field.name.len()).any(|w| w == &field.name[..]));
                }
            }
            (Ok(Progress::Partial(a)), Ok(Progress::Partial(b))) => {
                prop_assert_eq!(a.buffered_len(), input.len());
                prop_assert_eq!(b.buffered_len(), input.len());
            }
            (Err(a), Err(b)) => prop_assert_eq!(a, b),
            (a, b) => prop_assert!(false, "chunked {a:?} but whole {b:?}"),
        }
    }
}
