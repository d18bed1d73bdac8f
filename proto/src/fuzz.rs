//! Fuzz target bodies. Each is a plain function so that `cargo test` replays the checked-in
//! corpus (`proto/fuzz/corpus/<target>/`) on stable Rust and `cargo fuzz` drives it for real.

use crate::frame::Frame;

/// Frame decoder target: decoding arbitrary bytes never panics, and whatever decodes
/// re-encodes to exactly the bytes it came from.
pub fn decode_frame(data: &[u8]) {
    if let Ok(Some((frame, used))) = Frame::decode(data) {
        let again = frame.to_bytes();
        assert_eq!(again.as_slice(), &data[..used], "re-encoding differs");
    }
}

/// Test support shared by every crate's fuzz targets: checks that the checked-in corpus `dir`
/// holds each seed (rewriting them when `KEEL_WRITE_CORPUS` is set), then replays every input
/// of the corpus through `target`. Returns how many inputs were replayed. Panics on a missing
/// or differing seed: it is meant for tests.
pub fn check_and_replay_corpus(
    dir: &std::path::Path,
    seeds: &[(&str, Vec<u8>)],
    target: impl Fn(&[u8]),
) -> usize {
    for (name, bytes) in seeds {
        let path = dir.join(format!("seed-{name}"));
        if std::env::var_os("KEEL_WRITE_CORPUS").is_some() {
            std::fs::create_dir_all(dir).expect("mkdir");
            std::fs::write(&path, bytes).expect("write seed");
        }
        let on_disk =
            std::fs::read(&path).expect("seed file missing: run with KEEL_WRITE_CORPUS=1");
        assert_eq!(&on_disk, bytes, "{name} differs from the checked-in seed");
    }
    let mut n = 0;
    for e in std::fs::read_dir(dir).expect("corpus dir") {
        let data = std::fs::read(e.expect("entry").path()).expect("read");
        target(&data);
        n += 1;
    }
    n
}

/// Seed inputs for the frame decoder: one valid frame of every kind plus malformed variants.
pub fn decode_frame_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use crate::frame::{checksum, Hello, HelloReply, Request, Response, MAX_FRAME_LEN};
    use crate::types::{Epoch, MemberRole, Op, ReqFlags, Status, VolumeId};
    let mut seeds = Vec::new();
    let data = vec![0x5au8; 512];
    let mut w = Request::new(Op::Write, 1, VolumeId(42), Epoch(1));
    w.flags = ReqFlags(ReqFlags::FUA);
    w.offset = 4096;
    w.length = 512;
    w.crc = checksum(&data);
    w.payload = data.clone().into();
    seeds.push(("write", Frame::Request(w.clone()).to_bytes()));
    for (name, op) in [
        ("read", Op::Read),
        ("discard", Op::Discard),
        ("write_zeroes", Op::WriteZeroes),
    ] {
        let mut r = Request::new(op, 2, VolumeId(42), Epoch(1));
        r.offset = 512;
        r.length = 1024;
        seeds.push((name, Frame::Request(r).to_bytes()));
    }
    seeds.push((
        "flush",
        Frame::Request(Request::new(Op::Flush, 3, VolumeId(1), Epoch(1))).to_bytes(),
    ));
    seeds.push((
        "ping",
        Frame::Request(Request::new(Op::Ping, 4, VolumeId(1), Epoch(1))).to_bytes(),
    ));
    // Copy administration (controller to storage): size in `offset`, role in `length`.
    for (name, op, size, role) in [
        (
            "create_copy",
            Op::CreateCopy,
            1u64 << 30,
            MemberRole::Primary as u32,
        ),
        ("delete_copy", Op::DeleteCopy, 0, 0),
        (
            "set_membership",
            Op::SetMembership,
            0,
            MemberRole::Mirror as u32,
        ),
        ("resize", Op::Resize, 2 << 30, 0),
        // Malformed: an unaligned size and a role that does not exist.
        ("create_copy_unaligned", Op::CreateCopy, 1000, 0),
        ("set_membership_bad_role", Op::SetMembership, 0, 2),
    ] {
        let mut r = Request::new(op, 6, VolumeId(42), Epoch(2));
        r.offset = size;
        r.length = role;
        seeds.push((name, Frame::Request(r).to_bytes()));
    }
    // Set membership of a primary with its mirrors (writer epoch in `offset`), and one whose
    // list has a line that is not an address.
    for (name, text) in [
        (
            "set_membership_mirrors",
            &b"10.0.0.2:7500\n[fd00::3]:7500\n"[..],
        ),
        ("set_membership_bad_mirror", &b"10.0.0.2:7500\nnope"[..]),
    ] {
        let mut r = Request::new(Op::SetMembership, 7, VolumeId(42), Epoch(3));
        r.offset = 2;
        r.length = MemberRole::Primary as u32;
        r.payload = text.to_vec().into();
        r.crc = checksum(&r.payload);
        seeds.push((name, Frame::Request(r).to_bytes()));
    }
    seeds.push((
        "response_read",
        Frame::Response(Response {
            status: Status::Ok,
            request_id: 2,
            epoch: Epoch(1),
            crc: checksum(&data),
            payload: data,
        })
        .to_bytes(),
    ));
    seeds.push((
        "response_stale",
        Frame::Response(Response::status(Status::StaleEpoch, 5, Epoch(9))).to_bytes(),
    ));
    seeds.push((
        "hello",
        Frame::Hello(Hello {
            min_version: 1,
            max_version: 1,
        })
        .to_bytes(),
    ));
    seeds.push((
        "hello_reply",
        Frame::HelloReply(HelloReply {
            status: Status::Ok,
            version: 1,
        })
        .to_bytes(),
    ));
    let mut t = Frame::Request(w.clone()).to_bytes();
    t.truncate(t.len() - 7);
    seeds.push(("truncated_write", t));
    seeds.push((
        "oversized_len",
        ((MAX_FRAME_LEN + 1) as u32).to_le_bytes().to_vec(),
    ));
    let mut bad = Frame::Request(w).to_bytes();
    bad[4 + 1] = 0xee;
    seeds.push(("unknown_op", bad));
    seeds.push(("empty_len", vec![0, 0, 0, 0]));
    seeds
}

#[cfg(test)]
mod unit_tests {
    use std::path::PathBuf;

    /// The checked-in corpus holds every seed and every input decodes without panicking.
    #[test]
    fn seed_corpus_is_checked_in_and_replays() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/decode_frame");
        let seeds = super::decode_frame_seeds();
        let n = super::check_and_replay_corpus(&dir, &seeds, super::decode_frame);
        assert!(n >= 10, "corpus has only {n} inputs");
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            super::decode_frame(&data);
        }
    }
}
