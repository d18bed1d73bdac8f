//! Property tests of how the API parses what callers send: sizes (`check_size`), volume ids,
//! names, and request bodies.

use keel_api::{AttachVolume, CreateVolume, DetachVolume, ResizeVolume, SizeInput};
use keel_controller::error::ApiError;
use keel_controller::model::valid_name;
use keel_controller::service::{check_size, MAX_VOLUME_SIZE};
use keel_proto::{parse_size, VolumeId};
use proptest::prelude::*;
use serde_json::Value;

/// The units `parse_size` takes, with their multipliers.
const UNITS: &[(&str, u64)] = &[
    ("", 1),
    ("B", 1),
    ("K", 1 << 10),
    ("k", 1 << 10),
    ("KiB", 1 << 10),
    ("M", 1 << 20),
    ("MiB", 1 << 20),
    ("G", 1 << 30),
    ("GiB", 1 << 30),
    ("T", 1 << 40),
    ("TiB", 1 << 40),
];

/// What the API promises: positive multiples of 512 bytes up to 64 TiB.
fn acceptable(bytes: u64) -> bool {
    bytes > 0 && bytes.is_multiple_of(512) && bytes <= MAX_VOLUME_SIZE
}

/// Byte counts, weighted toward the interesting edges.
fn byte_counts() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        0..=MAX_VOLUME_SIZE + 4096,
        (0..=MAX_VOLUME_SIZE / 512 + 8).prop_map(|k| k * 512),
        (MAX_VOLUME_SIZE - 4096..=MAX_VOLUME_SIZE + 4096),
        (0u64..4096),
        (u64::MAX - 4096..=u64::MAX),
        Just(0),
        Just(512),
        Just(MAX_VOLUME_SIZE),
        Just(MAX_VOLUME_SIZE + 512),
        Just(u64::MAX),
    ]
}

/// The size a refusal suggests instead (`... e.g. to N`), if it suggests one.
fn suggestion(message: &str) -> Option<u64> {
    let rest = &message[message.find("e.g. to ")? + "e.g. to ".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// A refusal is a 400 bad_request whose message says why (any of the reasons that apply),
/// and whose suggested size, if any, is the size rounded up to 512 bytes.
fn assert_refusal(bytes: u64, e: &ApiError) {
    assert_eq!(e.status, http::StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e.code, "bad_request", "{e}");
    let mut reasons = Vec::new();
    if bytes == 0 {
        reasons.push("greater than 0");
    }
    if !bytes.is_multiple_of(512) {
        reasons.push("multiple of 512");
    }
    if bytes > MAX_VOLUME_SIZE {
        reasons.push("exceeds");
    }
    assert!(
        reasons.iter().any(|r| e.message.contains(r)),
        "size {bytes}: message {:?} should say one of {reasons:?}",
        e.message
    );
    if let Some(s) = suggestion(&e.message) {
        assert!(
            s >= bytes && s - bytes < 512 && s.is_multiple_of(512),
            "size {bytes}: {:?} suggests {s}, which is not {bytes} rounded up to 512",
            e.message
        );
    }
    if !bytes.is_multiple_of(512) && bytes <= MAX_VOLUME_SIZE {
        // It names a size that would do.
        let rounded = bytes.div_ceil(512) * 512;
        assert!(
            e.message.contains(&rounded.to_string()),
            "{:?} should suggest {rounded}",
            e.message
        );
    }
}

/// Examples for the properties below, kept as plain tests. Sizes near `u64::MAX` must be
/// refused without overflowing while computing the suggested rounding (`div_ceil(512) * 512`
/// overflows there: a panic in debug builds, a suggestion of 0 in release builds).
#[test]
fn sizes_at_the_edges() {
    assert_eq!(check_size(&SizeInput::Bytes(512)), Ok(512));
    assert_eq!(
        check_size(&SizeInput::Bytes(MAX_VOLUME_SIZE)),
        Ok(MAX_VOLUME_SIZE)
    );
    assert_eq!(
        check_size(&SizeInput::Human("64TiB".into())),
        Ok(MAX_VOLUME_SIZE)
    );
    assert_eq!(
        check_size(&SizeInput::Human(" 10 GiB ".into())),
        Ok(10 << 30)
    );
    for bytes in [0, 1, 511, 513, MAX_VOLUME_SIZE + 1, MAX_VOLUME_SIZE + 512] {
        assert_refusal(
            bytes,
            &check_size(&SizeInput::Bytes(bytes)).expect_err("refused"),
        );
    }
    for bytes in [u64::MAX, u64::MAX - 510, u64::MAX - 511] {
        let got = std::panic::catch_unwind(|| check_size(&SizeInput::Bytes(bytes)));
        let got = got.unwrap_or_else(|_| panic!("check_size panics on {bytes} bytes"));
        assert_refusal(bytes, &got.expect_err("refused"));
        let got = std::panic::catch_unwind(|| check_size(&SizeInput::Human(bytes.to_string())));
        let got = got.unwrap_or_else(|_| panic!("check_size panics on \"{bytes}\""));
        assert_refusal(bytes, &got.expect_err("refused"));
    }
    let e = check_size(&SizeInput::Human("16384TiB".into())).expect_err("refused");
    assert!(e.message.contains("exceeds"), "{e}");
    let e = check_size(&SizeInput::Human("99999999999TiB".into())).expect_err("refused");
    assert!(e.message.contains("too large"), "{e}");
}

/// 512 cases a property; failures found are kept as plain examples in this file, not in a
/// regressions file.
fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn byte_sizes_accepted_exactly_when_positive_aligned_and_at_most_64_tib(bytes in byte_counts()) {
        match check_size(&SizeInput::Bytes(bytes)) {
            Ok(b) => {
                prop_assert!(acceptable(bytes), "accepted {bytes}");
                prop_assert_eq!(b, bytes);
            }
            Err(e) => {
                prop_assert!(!acceptable(bytes), "refused {bytes}: {e}");
                assert_refusal(bytes, &e);
            }
        }
    }

    #[test]
    fn human_sizes_are_n_times_the_unit(
        (unit, n) in (0..UNITS.len()).prop_flat_map(|i| {
            let max_n = MAX_VOLUME_SIZE / UNITS[i].1 + 2;
            (Just(i), prop_oneof![0..=max_n, any::<u64>(), Just(u64::MAX)])
        }),
        lead in "[ \t]{0,2}",
        mid in "[ \t]{0,2}",
        trail in "[ \t]{0,2}",
    ) {
        let (suffix, mult) = UNITS[unit];
        let s = format!("{lead}{n}{mid}{suffix}{trail}");
        let got = check_size(&SizeInput::Human(s.clone()));
        match n.checked_mul(mult) {
            Some(bytes) => {
                // The same verdict as for the byte count (an error quotes the size as typed).
                let want = check_size(&SizeInput::Bytes(bytes));
                prop_assert_eq!(
                    got.as_ref().map_err(|e| (e.status, e.code)),
                    want.as_ref().map_err(|e| (e.status, e.code)),
                    "{:?} is {} bytes", s, bytes
                );
                prop_assert_eq!(got.is_ok(), acceptable(bytes));
            }
            None => {
                let e = got.expect_err("an overflowing size is refused");
                prop_assert_eq!(e.code, "bad_request");
                prop_assert!(e.message.contains("too large"), "{}", e.message);
            }
        }
    }

    #[test]
    fn any_string_size_is_parsed_without_panic_and_consistently(
        s in prop_oneof![
            any::<String>(),
            "\\s{0,2}[0-9]{0,22}\\s{0,2}(B|K|k|KiB|M|MiB|G|GiB|T|TiB|PiB|kb|x|-|\\.5|)\\s{0,2}",
            "[-+]?[0-9]{1,4}(\\.[0-9])?(e[0-9])?[A-Za-z]{0,4}",
        ]
    ) {
        let got = check_size(&SizeInput::Human(s.clone()));
        match parse_size(&s) {
            // The same verdict as for the byte count; an error's message quotes the size as
            // typed, so only its status and code must match.
            Ok(bytes) => prop_assert_eq!(
                got.map_err(|e| (e.status, e.code)),
                check_size(&SizeInput::Bytes(bytes)).map_err(|e| (e.status, e.code))
            ),
            Err(why) => {
                let e = got.expect_err("an unparsable size is refused");
                prop_assert_eq!(e.status, http::StatusCode::BAD_REQUEST);
                prop_assert_eq!(e.code, "bad_request");
                prop_assert!(!why.is_empty());
                prop_assert_eq!(e.message, why);
            }
        }
    }

    #[test]
    fn volume_id_parse_never_panics_and_follows_its_grammar(
        s in prop_oneof![
            any::<String>(),
            "(vol-|VOL-|vol|)[0-9a-fA-FxX_ -]{0,40}",
            "(vol-)?[0-9a-f]{30,34}",
        ]
    ) {
        let got = s.parse::<VolumeId>();
        let digits = s.strip_prefix("vol-").unwrap_or(&s);
        let grammar = (1..=32).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_hexdigit());
        prop_assert_eq!(got.is_ok(), grammar, "{:?}", s);
        if let Ok(v) = got {
            prop_assert_eq!(v.0, u128::from_str_radix(digits, 16).expect("hex"));
        }
    }

    #[test]
    fn volume_ids_round_trip(v in any::<u64>(), w in any::<u128>()) {
        // The controller's ids are 16 hex digits.
        let id = format!("{v:016x}");
        prop_assert_eq!(id.parse::<VolumeId>(), Ok(VolumeId(u128::from(v))));
        prop_assert_eq!(format!("vol-{id}").parse::<VolumeId>(), Ok(VolumeId(u128::from(v))));
        prop_assert_eq!(id.to_ascii_uppercase().parse::<VolumeId>(), Ok(VolumeId(u128::from(v))));
        prop_assert_eq!(VolumeId(w).to_string().parse::<VolumeId>(), Ok(VolumeId(w)));
    }

    #[test]
    fn names_are_1_to_64_of_letters_digits_dot_underscore_dash(
        s in prop_oneof![
            any::<String>(),
            "[A-Za-z0-9._-]{0,70}",
            "[A-Za-z0-9._-]{60,66}",
            "[A-Za-z0-9._/ :@é\u{0}-]{0,12}",
        ]
    ) {
        let model = (1..=64).contains(&s.chars().count())
            && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        prop_assert_eq!(valid_name(&s), model, "{:?}", s);
    }
}

// ----- request bodies -----

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        (0u64..5).prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-5i64..0).prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        Just(Value::from(u64::from(u32::MAX) + 1)),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        ".{0,10}".prop_map(Value::from),
        "[0-9]{1,5} ?(KiB|MiB|GiB|TiB|x)?".prop_map(Value::from),
        "[a-z0-9._-]{1,8}".prop_map(Value::from),
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("size".to_string()),
        Just("replicas".to_string()),
        Just("name".to_string()),
        Just("node".to_string()),
        Just("instance".to_string()),
        Just("read_only".to_string()),
        Just("force".to_string()),
        "[a-z_]{0,8}",
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Top-level objects whose keys are mostly the records' fields.
fn json_object() -> impl Strategy<Value = serde_json::Map<String, Value>> {
    prop::collection::btree_map(key(), prop_oneof![4 => leaf(), 1 => json_value()], 0..8)
        .prop_map(|m| m.into_iter().collect())
}

/// Arbitrary bytes, and JSON bodies with a few bytes changed.
fn body_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        (
            json_object(),
            prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4)
        )
            .prop_map(|(m, edits)| {
                let mut b = serde_json::to_vec(&m).expect("serialize");
                for (i, byte) in edits {
                    let at = i.index(b.len());
                    b[at] = byte;
                }
                b
            }),
    ]
}

fn field_is<'a>(
    m: &'a serde_json::Map<String, Value>,
    k: &str,
    ok: impl Fn(&'a Value) -> bool,
) -> bool {
    match m.get(k) {
        None => true,
        Some(v) => ok(v),
    }
}

/// Deserializing `body` never panics; what deserializes survives a serialize/deserialize
/// round trip, and its size goes through `check_size` without panicking.
fn decode_all(body: &[u8]) {
    if let Ok(c) = serde_json::from_slice::<CreateVolume>(body) {
        let _ = check_size(&c.size);
        let again: CreateVolume =
            serde_json::from_value(serde_json::to_value(&c).expect("to_value"))
                .expect("round trip");
        assert_eq!(
            serde_json::to_value(&again).ok(),
            serde_json::to_value(&c).ok()
        );
    }
    if let Ok(a) = serde_json::from_slice::<AttachVolume>(body) {
        let again: AttachVolume =
            serde_json::from_value(serde_json::to_value(&a).expect("to_value"))
                .expect("round trip");
        assert_eq!(
            (again.node, again.instance, again.read_only, again.force),
            (a.node, a.instance, a.read_only, a.force)
        );
    }
    if let Ok(r) = serde_json::from_slice::<ResizeVolume>(body) {
        let _ = check_size(&r.size);
    }
    let _ = serde_json::from_slice::<DetachVolume>(body);
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn request_bodies_never_panic(body in body_bytes()) {
        decode_all(&body);
    }

    #[test]
    fn arbitrary_json_never_panics(v in json_value()) {
        decode_all(&serde_json::to_vec(&v).expect("serialize"));
    }

    /// The required and optional fields the OpenAPI document gives CreateVolume and
    /// AttachVolume are the ones serde enforces (unknown fields are refused:
    /// `additionalProperties: false`).
    #[test]
    fn object_bodies_decode_exactly_when_their_fields_fit(m in json_object()) {
        let body = serde_json::to_vec(&m).expect("serialize");

        let only = |allowed: &[&str]| m.keys().all(|k| allowed.contains(&k.as_str()));
        let create_fits = only(&["size", "replicas", "name"])
            && m.get("size").is_some_and(|s| s.is_u64() || s.is_string())
            && field_is(&m, "replicas", |r| r.is_null() || r.as_u64().is_some_and(|n| n <= u64::from(u32::MAX)))
            && field_is(&m, "name", |n| n.is_null() || n.is_string());
        let create = serde_json::from_slice::<CreateVolume>(&body);
        prop_assert_eq!(create.is_ok(), create_fits, "CreateVolume from {}: {:?}", Value::Object(m.clone()), create.as_ref().err());
        if let Ok(c) = create {
            match &m["size"] {
                Value::String(s) => prop_assert_eq!(&c.size, &SizeInput::Human(s.clone())),
                n => prop_assert_eq!(Some(c.size.clone()), n.as_u64().map(SizeInput::Bytes)),
            }
            prop_assert_eq!(c.replicas.map(u64::from), m.get("replicas").and_then(Value::as_u64));
            prop_assert_eq!(c.name.as_deref(), m.get("name").and_then(Value::as_str));
        }

        let attach_fits = only(&["node", "instance", "read_only", "force"])
            && m.get("node").is_some_and(Value::is_string)
            && m.get("instance").is_some_and(Value::is_string)
            && field_is(&m, "read_only", Value::is_boolean)
            && field_is(&m, "force", Value::is_boolean);
        let attach = serde_json::from_slice::<AttachVolume>(&body);
        prop_assert_eq!(attach.is_ok(), attach_fits, "AttachVolume from {}: {:?}", Value::Object(m.clone()), attach.as_ref().err());
        if let Ok(a) = attach {
            prop_assert_eq!(a.read_only, m.get("read_only").and_then(Value::as_bool).unwrap_or(false));
            prop_assert_eq!(a.force, m.get("force").and_then(Value::as_bool).unwrap_or(false));
        }
    }
}
