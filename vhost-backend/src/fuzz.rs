//! Fuzz target bodies, replayed by `cargo test` over the checked-in corpus
//! (`vhost-backend/fuzz/corpus/<target>/`) and driven by `cargo fuzz` (see `fuzz/`).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::virtio::request::{parse, Desc, Kind};
use crate::virtio::spec::Limits;

/// Guest memory size of the parser target.
pub const FUZZ_MEM: u64 = 64 * 1024;
const CAPACITY: u64 = 1 << 20;

/// Parser target. Input: `n` (1 byte, up to 32 descriptors), then `n` descriptors of 14 bytes
/// (addr u64, len u32, flags u16: bit 0 next, bit 1 write), then guest memory content. The
/// parser must not panic, and whatever it accepts must lie inside memory and the capacity.
pub fn parse_request(data: &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = (n % 33) as usize;
    let Some(table) = rest.get(..n * 14) else {
        return;
    };
    let content = &rest[n * 14..];
    let descs: Vec<Desc> = table
        .chunks_exact(14)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&c[0..8]);
            let flags = u16::from_le_bytes([c[12], c[13]]);
            Desc {
                addr: u64::from_le_bytes(a),
                len: u32::from_le_bytes([c[8], c[9], c[10], c[11]]),
                has_next: flags & 1 != 0,
                writable: flags & 2 != 0,
            }
        })
        .collect();
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), FUZZ_MEM as usize)])
    else {
        return;
    };
    let take = content.len().min(FUZZ_MEM as usize);
    if mem.write_slice(&content[..take], GuestAddress(0)).is_err() {
        return;
    }
    let limits = Limits::new(CAPACITY, false);
    if let Ok(req) = parse(&descs, &mem, &limits) {
        assert!(req.status.0 < FUZZ_MEM);
        let mut total = 0u64;
        for s in &req.data {
            assert!(s.addr.0 + u64::from(s.len) <= FUZZ_MEM);
            total += u64::from(s.len);
        }
        assert_eq!(total, req.data_len);
        match req.kind {
            Kind::In { offset } | Kind::Out { offset } => {
                assert!(offset + req.data_len <= CAPACITY);
                assert_eq!(req.data_len % 512, 0);
            }
            Kind::Discard(ranges) | Kind::WriteZeroes { ranges, .. } => {
                for r in ranges {
                    assert!(r.offset + r.len <= CAPACITY);
                }
            }
            Kind::Flush | Kind::GetId => {}
        }
    }
}

/// Seed inputs: well-formed requests of every type and a few broken ones.
pub fn parse_request_seeds() -> Vec<(&'static str, Vec<u8>)> {
    fn desc(addr: u64, len: u32, next: bool, write: bool) -> Vec<u8> {
        let mut v = addr.to_le_bytes().to_vec();
        v.extend_from_slice(&len.to_le_bytes());
        v.extend_from_slice(&(u16::from(next) | (u16::from(write) << 1)).to_le_bytes());
        v
    }
    fn input(descs: &[Vec<u8>], header: (u32, u64), extra: &[(usize, &[u8])]) -> Vec<u8> {
        let mut v = vec![descs.len() as u8];
        for d in descs {
            v.extend_from_slice(d);
        }
        let mut mem = vec![0u8; 8192];
        mem[0..4].copy_from_slice(&header.0.to_le_bytes());
        mem[8..16].copy_from_slice(&header.1.to_le_bytes());
        for (at, bytes) in extra {
            mem[*at..*at + bytes.len()].copy_from_slice(bytes);
        }
        v.extend_from_slice(&mem);
        v
    }
    let hdr = desc(0, 16, true, false);
    let status = desc(8000, 1, false, true);
    let mut range = 8u64.to_le_bytes().to_vec();
    range.extend_from_slice(&16u32.to_le_bytes());
    range.extend_from_slice(&1u32.to_le_bytes());
    vec![
        (
            "read",
            input(
                &[hdr.clone(), desc(4096, 4096, true, true), status.clone()],
                (0, 8),
                &[],
            ),
        ),
        (
            "write",
            input(
                &[hdr.clone(), desc(4096, 512, true, false), status.clone()],
                (1, 0),
                &[],
            ),
        ),
        ("flush", input(&[hdr.clone(), status.clone()], (4, 0), &[])),
        (
            "get_id",
            input(
                &[hdr.clone(), desc(4096, 20, true, true), status.clone()],
                (8, 0),
                &[],
            ),
        ),
        (
            "discard",
            input(
                &[hdr.clone(), desc(4096, 16, true, false), status.clone()],
                (11, 0),
                &[(4096, &range[..12])],
            ),
        ),
        (
            "write_zeroes",
            input(
                &[hdr.clone(), desc(4096, 16, true, false), status.clone()],
                (13, 0),
                &[(4096, &range)],
            ),
        ),
        (
            "out_of_range",
            input(
                &[hdr.clone(), desc(4096, 4096, true, true), status.clone()],
                (0, 4096),
                &[],
            ),
        ),
        (
            "outside_memory",
            input(
                &[
                    hdr.clone(),
                    desc(u64::MAX - 4, 4096, true, true),
                    status.clone(),
                ],
                (0, 0),
                &[],
            ),
        ),
        (
            "no_status",
            input(&[hdr.clone(), desc(4096, 512, false, false)], (1, 0), &[]),
        ),
        (
            "truncated",
            input(&[hdr, desc(4096, 512, true, true)], (0, 0), &[]),
        ),
        (
            "unsupported",
            input(&[desc(0, 16, true, false), status], (77, 0), &[]),
        ),
    ]
}

#[cfg(test)]
mod unit_tests {
    use std::path::PathBuf;

    fn corpus() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/parse_request")
    }

    /// The checked-in corpus holds every seed and every input parses without panicking.
    #[test]
    fn seed_corpus_is_checked_in_and_replays() {
        let seeds = super::parse_request_seeds();
        let n = keel_proto::fuzz::check_and_replay_corpus(&corpus(), &seeds, super::parse_request);
        assert!(n >= 10, "corpus has only {n} inputs");
    }

    proptest::proptest! {
        #[test]
        fn parser_never_panics(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..1024)) {
            super::parse_request(&data);
        }
    }
}
