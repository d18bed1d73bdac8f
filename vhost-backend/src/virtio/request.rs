//! Parsing one virtio-blk request from its descriptor chain: a pure function of the chain's
//! descriptors and the guest memory they point at (it reads the header and discard ranges but
//! does no I/O), so it can be fuzzed and property-tested.
//!
//! The guest is untrusted. The parser does not assume a layout: device-readable descriptors
//! must all come before device-writable ones; the first 16 readable bytes are the header,
//! the rest of the readable bytes are OUT data or discard/write-zeroes ranges; the last
//! writable byte is the status, the writable bytes before it are IN data or the GET_ID answer.
//! Every descriptor must lie inside guest memory, every sector computation is checked, and
//! every range must fit the capacity. A rejected request reports whether a status byte can
//! still be written, so the caller can always give the head back to the guest.

use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use super::spec::*;

/// A piece of guest memory: address and length, already checked to lie inside guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A descriptor as the parser sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
    /// The descriptor said another one follows (set on the last one means the chain was cut:
    /// it looped or pointed outside the descriptor table).
    pub has_next: bool,
}

impl From<virtio_queue::desc::split::Descriptor> for Desc {
    fn from(d: virtio_queue::desc::split::Descriptor) -> Self {
        Desc {
            addr: d.addr().0,
            len: d.len(),
            writable: d.is_write_only(),
            has_next: d.has_next(),
        }
    }
}

/// A byte range of the volume to discard or zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub offset: u64,
    pub len: u64,
}

/// What the request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Read `data` bytes at `offset`.
    In {
        offset: u64,
    },
    /// Write `data` bytes at `offset`.
    Out {
        offset: u64,
    },
    Flush,
    /// Write the volume's serial into `data` (up to 20 bytes).
    GetId,
    Discard(Vec<Range>),
    WriteZeroes {
        ranges: Vec<Range>,
        unmap: bool,
    },
}

/// A parsed, validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkRequest {
    pub kind: Kind,
    /// IN/OUT data (or the GET_ID buffer), in order.
    pub data: Vec<Segment>,
    /// Total bytes of `data`.
    pub data_len: u64,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("descriptor chain is empty")]
    Empty,
    #[error("descriptor chain has more than {0} descriptors")]
    TooManyDescriptors(usize),
    #[error("descriptor chain is cut short (loop, or next index outside the table)")]
    Truncated,
    #[error("descriptor at {addr:#x}+{len} lies outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("request header shorter than 16 bytes")]
    ShortHeader,
    #[error("no device-writable status byte")]
    NoStatus,
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    #[error("data length {0} is not a multiple of 512")]
    UnalignedLength(u64),
    #[error("request has {0} data bytes, more than the limit")]
    TooLarge(u64),
    #[error("too many data segments ({0})")]
    TooManySegments(usize),
    #[error("sector arithmetic overflows")]
    Overflow,
    #[error("range ends past the volume's capacity")]
    OutOfRange,
    #[error("data in the wrong direction for the request type")]
    WrongDirection,
    #[error("write to a read-only volume")]
    ReadOnly,
    #[error("bad discard/write-zeroes segment list")]
    BadRanges,
    #[error("unknown discard/write-zeroes flags {0:#x}")]
    BadRangeFlags(u32),
}

impl ParseError {
    /// The status to give the guest.
    pub fn status(self) -> u8 {
        match self {
            ParseError::Unsupported(_) | ParseError::BadRangeFlags(_) => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        }
    }
}

/// A refused request: the error, and where its status byte can be written (if anywhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejected {
    pub error: ParseError,
    pub status: Option<GuestAddress>,
}

/// Most descriptors one request may use (indirect tables included).
pub const MAX_DESCRIPTORS: usize = 1024;

/// Splits `segs` at byte `at`: (first `at` bytes, the rest).
fn split_segments(segs: &[Segment], at: u64) -> (Vec<Segment>, Vec<Segment>) {
    let mut head = Vec::new();
    let mut tail = Vec::new();
    let mut pos = 0u64;
    for s in segs {
        let end = pos + u64::from(s.len);
        if end <= at {
            head.push(*s);
        } else if pos >= at {
            tail.push(*s);
        } else {
            let first = (at - pos) as u32;
            head.push(Segment {
                addr: s.addr,
                len: first,
            });
            tail.push(Segment {
                addr: GuestAddress(s.addr.0 + u64::from(first)),
                len: s.len - first,
            });
        }
        pos = end;
    }
    (head, tail)
}

fn total(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Walks `len` bytes of `segs` starting `skip` bytes in, calling `f(position, address, n)`
/// for each contiguous piece; stops and returns false as soon as `f` does, or if the segments
/// hold fewer bytes.
fn walk_segments(
    segs: &[Segment],
    mut skip: u64,
    len: usize,
    mut f: impl FnMut(usize, GuestAddress, usize) -> bool,
) -> bool {
    let mut done = 0usize;
    for s in segs {
        if done == len {
            break;
        }
        let slen = u64::from(s.len);
        if skip >= slen {
            skip -= slen;
            continue;
        }
        let n = ((slen - skip) as usize).min(len - done);
        if !f(done, GuestAddress(s.addr.0 + skip), n) {
            return false;
        }
        done += n;
        skip = 0;
    }
    done == len
}

/// Writes `data` into `segs` starting `skip` bytes in; false if guest memory refused.
pub fn write_segments<M: GuestMemory>(mem: &M, segs: &[Segment], skip: u64, data: &[u8]) -> bool {
    walk_segments(segs, skip, data.len(), |at, addr, n| {
        mem.write_slice(&data[at..at + n], addr).is_ok()
    })
}

/// Reads `buf.len()` bytes starting `skip` bytes into `segs`; false if guest memory refused.
pub fn read_segments<M: GuestMemory>(mem: &M, segs: &[Segment], skip: u64, buf: &mut [u8]) -> bool {
    let len = buf.len();
    walk_segments(segs, skip, len, |at, addr, n| {
        mem.read_slice(&mut buf[at..at + n], addr).is_ok()
    })
}

/// Parses one request. `descs` are the chain's descriptors in order (indirect tables expanded).
pub fn parse<M: GuestMemory>(
    descs: &[Desc],
    mem: &M,
    limits: &Limits,
) -> Result<BlkRequest, Rejected> {
    // Where a refusal can be reported: the last byte of the last non-empty descriptor, if that
    // descriptor is device-writable and its last byte lies in guest memory. Writing IOERR there
    // (rather than leaving whatever the byte held) keeps a refused request from looking like a
    // success to the driver.
    let status_hint = descs.iter().rev().find(|d| d.len > 0).and_then(|d| {
        let last = d.addr.checked_add(u64::from(d.len) - 1)?;
        (d.writable && mem.check_range(GuestAddress(last), 1, Permissions::Write))
            .then_some(GuestAddress(last))
    });
    let reject = |error| {
        Err(Rejected {
            error,
            status: status_hint,
        })
    };
    if descs.is_empty() {
        return reject(ParseError::Empty);
    }
    if descs.len() > MAX_DESCRIPTORS {
        return reject(ParseError::TooManyDescriptors(MAX_DESCRIPTORS));
    }
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    for d in descs {
        if d.len == 0 {
            continue;
        }
        let inside = d.addr.checked_add(u64::from(d.len)).is_some()
            && mem.check_range(
                GuestAddress(d.addr),
                d.len as usize,
                if d.writable {
                    Permissions::Write
                } else {
                    Permissions::Read
                },
            );
        if !inside {
            return reject(ParseError::OutsideMemory {
                addr: d.addr,
                len: d.len,
            });
        }
        let seg = Segment {
            addr: GuestAddress(d.addr),
            len: d.len,
        };
        if d.writable {
            writable.push(seg);
        } else if !writable.is_empty() {
            return reject(ParseError::ReadableAfterWritable);
        } else {
            readable.push(seg);
        }
    }
    // The status byte: the last writable byte.
    let Some(last) = writable.last_mut() else {
        return reject(ParseError::NoStatus);
    };
    let status = GuestAddress(last.addr.0 + u64::from(last.len) - 1);
    last.len -= 1;
    if last.len == 0 {
        writable.pop();
    }
    let fail = |error| {
        Err(Rejected {
            error,
            status: Some(status),
        })
    };
    if descs.last().is_some_and(|d| d.has_next) {
        return fail(ParseError::Truncated);
    }
    let mut header = [0u8; 16];
    if total(&readable) < 16 || !read_segments(mem, &readable, 0, &mut header) {
        return fail(ParseError::ShortHeader);
    }
    let req_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(sector_bytes);
    let (_, rdata) = split_segments(&readable, 16);
    let capacity_bytes = limits
        .capacity_sectors
        .checked_mul(SECTOR_SIZE)
        .ok_or(Rejected {
            error: ParseError::Overflow,
            status: Some(status),
        })?;

    let check_rw = |data: &[Segment]| -> Result<(u64, u64), ParseError> {
        let len = total(data);
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(ParseError::UnalignedLength(len));
        }
        if len > limits.max_request_bytes {
            return Err(ParseError::TooLarge(len));
        }
        if data.len() > MAX_DESCRIPTORS {
            return Err(ParseError::TooManySegments(data.len()));
        }
        let offset = sector
            .checked_mul(SECTOR_SIZE)
            .ok_or(ParseError::Overflow)?;
        let end = offset.checked_add(len).ok_or(ParseError::Overflow)?;
        if end > capacity_bytes {
            return Err(ParseError::OutOfRange);
        }
        Ok((offset, len))
    };

    match req_type {
        VIRTIO_BLK_T_IN => {
            if !rdata.is_empty() {
                return fail(ParseError::WrongDirection);
            }
            match check_rw(&writable) {
                Ok((offset, len)) => Ok(BlkRequest {
                    kind: Kind::In { offset },
                    data: writable,
                    data_len: len,
                    status,
                }),
                Err(e) => fail(e),
            }
        }
        VIRTIO_BLK_T_OUT => {
            if !writable.is_empty() {
                return fail(ParseError::WrongDirection);
            }
            if limits.read_only {
                return fail(ParseError::ReadOnly);
            }
            match check_rw(&rdata) {
                Ok((offset, len)) => Ok(BlkRequest {
                    kind: Kind::Out { offset },
                    data: rdata,
                    data_len: len,
                    status,
                }),
                Err(e) => fail(e),
            }
        }
        VIRTIO_BLK_T_FLUSH => Ok(BlkRequest {
            kind: Kind::Flush,
            data: Vec::new(),
            data_len: 0,
            status,
        }),
        VIRTIO_BLK_T_GET_ID => {
            let len = total(&writable).min(VIRTIO_BLK_ID_BYTES as u64);
            let (data, _) = split_segments(&writable, len);
            Ok(BlkRequest {
                kind: Kind::GetId,
                data,
                data_len: len,
                status,
            })
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let zeroes = req_type == VIRTIO_BLK_T_WRITE_ZEROES;
            if limits.read_only {
                return fail(ParseError::ReadOnly);
            }
            if !writable.is_empty() {
                return fail(ParseError::WrongDirection);
            }
            let (max_seg, max_sectors) = if zeroes {
                (limits.max_write_zeroes_seg, limits.max_write_zeroes_sectors)
            } else {
                (limits.max_discard_seg, limits.max_discard_sectors)
            };
            let bytes = total(&rdata);
            let n = bytes / 16;
            if bytes == 0 || !bytes.is_multiple_of(16) || n > u64::from(max_seg) {
                return fail(ParseError::BadRanges);
            }
            let mut ranges = Vec::with_capacity(n as usize);
            let mut unmap = true;
            for i in 0..n {
                let mut seg = [0u8; 16];
                if !read_segments(mem, &rdata, i * 16, &mut seg) {
                    return fail(ParseError::BadRanges);
                }
                let mut s = [0u8; 8];
                s.copy_from_slice(&seg[0..8]);
                let start = u64::from_le_bytes(s);
                let num = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
                let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
                let allowed = if zeroes {
                    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                } else {
                    0
                };
                if flags & !allowed != 0 {
                    return fail(ParseError::BadRangeFlags(flags));
                }
                unmap &= flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
                if num > max_sectors {
                    return fail(ParseError::BadRanges);
                }
                let Some(offset) = start.checked_mul(SECTOR_SIZE) else {
                    return fail(ParseError::Overflow);
                };
                let len = u64::from(num) * SECTOR_SIZE;
                match offset.checked_add(len) {
                    Some(end) if end <= capacity_bytes => {}
                    Some(_) => return fail(ParseError::OutOfRange),
                    None => return fail(ParseError::Overflow),
                }
                ranges.push(Range { offset, len });
            }
            let kind = if zeroes {
                Kind::WriteZeroes { ranges, unmap }
            } else {
                Kind::Discard(ranges)
            };
            Ok(BlkRequest {
                kind,
                data: Vec::new(),
                data_len: 0,
                status,
            })
        }
        other => fail(ParseError::Unsupported(other)),
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const MEM: u64 = 1 << 20;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).expect("mem")
    }

    fn header(m: &GuestMemoryMmap, at: u64, ty: u32, sector: u64) -> Desc {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        m.write_slice(&h, GuestAddress(at)).expect("write");
        Desc {
            addr: at,
            len: 16,
            writable: false,
            has_next: true,
        }
    }

    fn d(addr: u64, len: u32, writable: bool) -> Desc {
        Desc {
            addr,
            len,
            writable,
            has_next: true,
        }
    }

    fn status(addr: u64) -> Desc {
        Desc {
            addr,
            len: 1,
            writable: true,
            has_next: false,
        }
    }

    fn limits() -> Limits {
        Limits::new(1 << 20, false)
    }

    #[test]
    fn read_request_parses() {
        let m = mem();
        let descs = [
            header(&m, 0, VIRTIO_BLK_T_IN, 8),
            d(4096, 4096, true),
            status(8192),
        ];
        let r = parse(&descs, &m, &limits()).expect("parse");
        assert_eq!(r.kind, Kind::In { offset: 4096 });
        assert_eq!(r.data_len, 4096);
        assert_eq!(r.status, GuestAddress(8192));
    }

    #[test]
    fn any_layout_header_and_status_in_one_buffer() {
        // Header + data in one readable descriptor; data + status in one writable one.
        let m = mem();
        header(&m, 0, VIRTIO_BLK_T_OUT, 0);
        let descs = [
            Desc {
                addr: 0,
                len: 16 + 512,
                writable: false,
                has_next: true,
            },
            Desc {
                addr: 4096,
                len: 1,
                writable: true,
                has_next: false,
            },
        ];
        let r = parse(&descs, &m, &limits()).expect("parse");
        assert_eq!(r.kind, Kind::Out { offset: 0 });
        assert_eq!(
            r.data,
            vec![Segment {
                addr: GuestAddress(16),
                len: 512
            }]
        );
    }

    #[test]
    fn malformed_chains_are_rejected() {
        let m = mem();
        let l = limits();
        // Each case gets its own header address: the cases are built before any is parsed.
        let next = std::cell::Cell::new(0x10000u64);
        let h = |ty, s| {
            let at = next.get();
            next.set(at + 16);
            header(&m, at, ty, s)
        };
        let cases: Vec<(Vec<Desc>, ParseError, bool)> = vec![
            (vec![], ParseError::Empty, false),
            (
                vec![h(VIRTIO_BLK_T_IN, 0), d(4096, 512, true)],
                ParseError::Truncated,
                true,
            ),
            (vec![h(VIRTIO_BLK_T_IN, 0)], ParseError::NoStatus, false),
            (
                vec![h(VIRTIO_BLK_T_IN, 0), d(MEM - 100, 512, true), status(8192)],
                ParseError::OutsideMemory {
                    addr: MEM - 100,
                    len: 512,
                },
                true,
            ),
            (
                vec![
                    h(VIRTIO_BLK_T_IN, 0),
                    d(u64::MAX - 10, 512, true),
                    status(8192),
                ],
                ParseError::OutsideMemory {
                    addr: u64::MAX - 10,
                    len: 512,
                },
                true,
            ),
            (
                vec![d(4096, 1, true), h(VIRTIO_BLK_T_IN, 0), status(8192)],
                ParseError::ReadableAfterWritable,
                true,
            ),
            (
                vec![d(0, 8, false), status(8192)],
                ParseError::ShortHeader,
                true,
            ),
            (
                vec![h(VIRTIO_BLK_T_IN, 0), d(4096, 100, true), status(8192)],
                ParseError::UnalignedLength(100),
                true,
            ),
            (
                vec![h(VIRTIO_BLK_T_IN, 2047), d(4096, 1024, true), status(8192)],
                ParseError::OutOfRange,
                true,
            ),
            (
                vec![
                    h(VIRTIO_BLK_T_IN, u64::MAX / 256),
                    d(4096, 512, true),
                    status(8192),
                ],
                ParseError::Overflow,
                true,
            ),
            (
                vec![h(VIRTIO_BLK_T_IN, 0), d(4096, 512, false), status(8192)],
                ParseError::WrongDirection,
                true,
            ),
            (
                vec![h(VIRTIO_BLK_T_OUT, 0), d(4096, 512, true), status(8192)],
                ParseError::WrongDirection,
                true,
            ),
            (
                vec![h(99, 0), status(8192)],
                ParseError::Unsupported(99),
                true,
            ),
            (
                vec![h(VIRTIO_BLK_T_DISCARD, 0), status(8192)],
                ParseError::BadRanges,
                true,
            ),
        ];
        for (descs, want, has_status) in cases {
            let r = parse(&descs, &m, &l).expect_err("must reject");
            assert_eq!(r.error, want, "{descs:?}");
            assert_eq!(r.status.is_some(), has_status, "{descs:?}");
        }
    }

    #[test]
    fn read_only_refuses_writes() {
        let m = mem();
        let l = Limits::new(1 << 20, true);
        let descs = [
            header(&m, 0, VIRTIO_BLK_T_OUT, 0),
            d(4096, 512, false),
            status(8192),
        ];
        assert_eq!(
            parse(&descs, &m, &l).expect_err("ro").error,
            ParseError::ReadOnly
        );
    }

    #[test]
    fn discard_ranges_parse_and_check_flags() {
        let m = mem();
        let mut seg = [0u8; 32];
        seg[0..8].copy_from_slice(&8u64.to_le_bytes());
        seg[8..12].copy_from_slice(&16u32.to_le_bytes());
        seg[16..24].copy_from_slice(&100u64.to_le_bytes());
        seg[24..28].copy_from_slice(&8u32.to_le_bytes());
        seg[28..32].copy_from_slice(&1u32.to_le_bytes());
        m.write_slice(&seg, GuestAddress(4096)).expect("w");
        let descs = [
            header(&m, 0, VIRTIO_BLK_T_WRITE_ZEROES, 0),
            d(4096, 32, false),
            status(8192),
        ];
        let r = parse(&descs, &m, &limits()).expect("parse");
        assert_eq!(
            r.kind,
            Kind::WriteZeroes {
                ranges: vec![
                    Range {
                        offset: 4096,
                        len: 8192
                    },
                    Range {
                        offset: 51200,
                        len: 4096
                    }
                ],
                unmap: false
            }
        );
        // The same flags on a discard are unsupported.
        let descs = [
            header(&m, 0, VIRTIO_BLK_T_DISCARD, 0),
            d(4096, 32, false),
            status(8192),
        ];
        assert_eq!(
            parse(&descs, &m, &limits()).expect_err("flags").error,
            ParseError::BadRangeFlags(1)
        );
    }
}
