//! Frames: the unit of Keel's wire protocol.
//!
//! Every frame is `len: u32 LE` (the number of bytes that follow, at most [`MAX_FRAME_LEN`])
//! followed by a one-byte frame type and the type's fields, all little-endian:
//!
//! ```text
//! Hello       (1): magic u32 "KEEL" | min_version u16 | max_version u16
//! HelloReply  (2): status u8 | version u16
//! Request     (3): op u8 | flags u8 | reserved u16 = 0 | request_id u64 | volume u128
//!                  | epoch u64 | offset u64 | length u32 | crc32c u32 | payload
//! Response    (4): status u8 | reserved u8 = 0 | reserved u16 = 0 | request_id u64
//!                  | epoch u64 | crc32c u32 | payload
//! ```
//!
//! Decoding is total: every malformed input yields a [`DecodeError`], never a panic, and the
//! length prefix is checked against [`MAX_FRAME_LEN`] before any buffer is allocated.
//! See `docs/protocol.md` for the rules each field obeys.

use std::net::SocketAddr;

use crate::types::{Epoch, MemberRole, Op, ReqFlags, Status, VolumeId};

/// Protocol versions this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// "KEEL" as a little-endian u32.
pub const HELLO_MAGIC: u32 = u32::from_le_bytes(*b"KEEL");
/// Largest data payload one frame may carry (reads and writes larger than this are split).
pub const MAX_PAYLOAD: usize = 4 << 20;
/// The unit of offsets, lengths and volume sizes, in bytes.
pub const SECTOR_SIZE: u64 = 512;
pub use crate::members::{MAX_MEMBERSHIP_PAYLOAD, REBUILD_PREFIX};

const TYPE_HELLO: u8 = 1;
const TYPE_HELLO_REPLY: u8 = 2;
const TYPE_REQUEST: u8 = 3;
const TYPE_RESPONSE: u8 = 4;

const HELLO_LEN: usize = 1 + 4 + 2 + 2;
const HELLO_REPLY_LEN: usize = 1 + 1 + 2;
/// Fixed part of a request, after the length prefix.
pub const REQUEST_FIXED_LEN: usize = 1 + 1 + 1 + 2 + 8 + 16 + 8 + 8 + 4 + 4;
/// Fixed part of a response, after the length prefix.
pub const RESPONSE_FIXED_LEN: usize = 1 + 1 + 1 + 2 + 8 + 8 + 4;
/// Largest value the length prefix may hold.
pub const MAX_FRAME_LEN: usize = REQUEST_FIXED_LEN + MAX_PAYLOAD;

/// Why bytes could not be decoded as a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame length {0} exceeds the maximum of {MAX_FRAME_LEN} bytes")]
    TooLong(usize),
    #[error("frame is empty")]
    Empty,
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("{what} frame is truncated: {got} bytes, need {need}")]
    Truncated {
        what: &'static str,
        got: usize,
        need: usize,
    },
    #[error("{what} frame has {extra} trailing bytes")]
    Trailing { what: &'static str, extra: usize },
    #[error("bad hello magic {0:#010x}")]
    BadMagic(u32),
    #[error("unknown op {0}")]
    UnknownOp(u8),
    #[error("unknown flags {0:#04x}")]
    UnknownFlags(u8),
    #[error("unknown status {0}")]
    UnknownStatus(u8),
    #[error("reserved field is not zero")]
    Reserved,
    #[error("{op:?} request: {reason}")]
    InvalidRequest { op: Op, reason: &'static str },
    /// A set-membership payload that is not a list of `IP:PORT` lines.
    #[error("SetMembership request: membership list line {line}: {reason}")]
    InvalidMembership { line: usize, reason: String },
}

/// Opening message of a connection (client to server).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub min_version: u16,
    pub max_version: u16,
}

/// Answer to a [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloReply {
    pub status: Status,
    pub version: u16,
}

/// One request: a data-path op, or a copy administration op (see [`Op::is_admin`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub op: Op,
    pub flags: ReqFlags,
    pub request_id: u64,
    pub volume: VolumeId,
    /// The client's epoch (data ops); the epoch to set ([`Op::CreateCopy`],
    /// [`Op::SetMembership`]).
    pub epoch: Epoch,
    /// Byte offset into the volume (0 for ops without a range); the volume's size in bytes for
    /// [`Op::CreateCopy`] and [`Op::Resize`]; the writer epoch for [`Op::SetMembership`].
    pub offset: u64,
    /// Byte length of the range (0 for ops without a range); the [`MemberRole`] code for
    /// [`Op::CreateCopy`] and [`Op::SetMembership`].
    pub length: u32,
    /// CRC32C of `payload` (0 when there is none).
    pub crc: u32,
    /// Write data; the membership list of [`Op::SetMembership`] (see [`parse_members`]);
    /// empty for every other op. Shared, not copied, when a request is cloned (a primary
    /// forwards the same bytes to its mirrors, a node keeps them for resends).
    pub payload: bytes::Bytes,
}

/// Answer to one [`Request`], matched by `request_id`; responses may come in any order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: Status,
    pub request_id: u64,
    /// The epoch the copy serves (lets a client fenced by [`Status::StaleEpoch`] see the new one).
    pub epoch: Epoch,
    /// CRC32C of `payload` (0 when there is none).
    pub crc: u32,
    /// Read data for a successful read; empty otherwise.
    pub payload: Vec<u8>,
}

/// Any frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    HelloReply(HelloReply),
    Request(Request),
    Response(Response),
}

/// CRC32C of a payload (0 for an empty one).
pub fn checksum(data: &[u8]) -> u32 {
    if data.is_empty() {
        0
    } else {
        crc32c::crc32c(data)
    }
}

impl Request {
    /// A request without payload.
    pub fn new(op: Op, request_id: u64, volume: VolumeId, epoch: Epoch) -> Request {
        Request {
            op,
            flags: ReqFlags::default(),
            request_id,
            volume,
            epoch,
            offset: 0,
            length: 0,
            crc: 0,
            payload: Vec::new().into(),
        }
    }

    /// Whether the payload matches its checksum.
    pub fn crc_ok(&self) -> bool {
        checksum(&self.payload) == self.crc
    }

    /// Encodes the fixed part for a request whose payload (of `payload_len` bytes, checksum
    /// `crc`) the caller appends itself. Lets writers copy guest data straight into the buffer.
    pub fn encode_header(&self, payload_len: usize, out: &mut Vec<u8>) {
        let len = REQUEST_FIXED_LEN + payload_len;
        out.extend_from_slice(&(len as u32).to_le_bytes());
        out.push(TYPE_REQUEST);
        out.push(self.op as u8);
        out.push(self.flags.0);
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&self.request_id.to_le_bytes());
        out.extend_from_slice(&self.volume.0.to_le_bytes());
        out.extend_from_slice(&self.epoch.0.to_le_bytes());
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.length.to_le_bytes());
        out.extend_from_slice(&self.crc.to_le_bytes());
    }
}

impl Response {
    /// A response without payload.
    pub fn status(status: Status, request_id: u64, epoch: Epoch) -> Response {
        Response {
            status,
            request_id,
            epoch,
            crc: 0,
            payload: Vec::new(),
        }
    }

    /// Whether the payload matches its checksum.
    pub fn crc_ok(&self) -> bool {
        checksum(&self.payload) == self.crc
    }

    /// Encodes the fixed part for a response whose payload the caller appends itself.
    pub fn encode_header(&self, payload_len: usize, out: &mut Vec<u8>) {
        let len = RESPONSE_FIXED_LEN + payload_len;
        out.extend_from_slice(&(len as u32).to_le_bytes());
        out.push(TYPE_RESPONSE);
        out.push(self.status as u8);
        out.push(0);
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&self.request_id.to_le_bytes());
        out.extend_from_slice(&self.epoch.0.to_le_bytes());
        out.extend_from_slice(&self.crc.to_le_bytes());
    }
}

impl Frame {
    /// Appends the encoded frame (length prefix included) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Frame::Hello(h) => {
                out.extend_from_slice(&(HELLO_LEN as u32).to_le_bytes());
                out.push(TYPE_HELLO);
                out.extend_from_slice(&HELLO_MAGIC.to_le_bytes());
                out.extend_from_slice(&h.min_version.to_le_bytes());
                out.extend_from_slice(&h.max_version.to_le_bytes());
            }
            Frame::HelloReply(r) => {
                out.extend_from_slice(&(HELLO_REPLY_LEN as u32).to_le_bytes());
                out.push(TYPE_HELLO_REPLY);
                out.push(r.status as u8);
                out.extend_from_slice(&r.version.to_le_bytes());
            }
            Frame::Request(r) => {
                r.encode_header(r.payload.len(), out);
                out.extend_from_slice(&r.payload);
            }
            Frame::Response(r) => {
                r.encode_header(r.payload.len(), out);
                out.extend_from_slice(&r.payload);
            }
        }
    }

    /// Encodes into a fresh buffer.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }

    /// Checks a length prefix before the body is read or allocated.
    pub fn check_len(prefix: [u8; 4]) -> Result<usize, DecodeError> {
        let len = u32::from_le_bytes(prefix) as usize;
        if len > MAX_FRAME_LEN {
            return Err(DecodeError::TooLong(len));
        }
        if len == 0 {
            return Err(DecodeError::Empty);
        }
        Ok(len)
    }

    /// Decodes one frame body (the bytes after the length prefix).
    pub fn decode_body(body: &[u8]) -> Result<Frame, DecodeError> {
        let mut c = Cursor::new(body);
        let ty = c.u8("frame")?;
        match ty {
            TYPE_HELLO => {
                c.need("hello", HELLO_LEN - 1)?;
                let magic = c.u32("hello")?;
                if magic != HELLO_MAGIC {
                    return Err(DecodeError::BadMagic(magic));
                }
                let min_version = c.u16("hello")?;
                let max_version = c.u16("hello")?;
                c.finish("hello")?;
                Ok(Frame::Hello(Hello {
                    min_version,
                    max_version,
                }))
            }
            TYPE_HELLO_REPLY => {
                c.need("hello reply", HELLO_REPLY_LEN - 1)?;
                let s = c.u8("hello reply")?;
                let status = Status::from_u8(s).ok_or(DecodeError::UnknownStatus(s))?;
                let version = c.u16("hello reply")?;
                c.finish("hello reply")?;
                Ok(Frame::HelloReply(HelloReply { status, version }))
            }
            TYPE_REQUEST => {
                let fixed = body.get(..REQUEST_FIXED_LEN).unwrap_or(body);
                let payload = body.get(REQUEST_FIXED_LEN..).unwrap_or(&[]).to_vec();
                let mut c = Cursor::new(fixed);
                c.u8("frame")?;
                decode_request(&mut c, payload).map(Frame::Request)
            }
            TYPE_RESPONSE => {
                let fixed = body.get(..RESPONSE_FIXED_LEN).unwrap_or(body);
                let payload = body.get(RESPONSE_FIXED_LEN..).unwrap_or(&[]).to_vec();
                let mut c = Cursor::new(fixed);
                c.u8("frame")?;
                decode_response(&mut c, payload).map(Frame::Response)
            }
            other => Err(DecodeError::UnknownType(other)),
        }
    }

    /// Bytes of a frame type's fixed part (type byte included), or `None` for an unknown type.
    /// Lets a reader take the fixed part first and read the payload straight into its own
    /// buffer (see [`Frame::decode_parts`]).
    pub fn fixed_len(frame_type: u8) -> Option<usize> {
        match frame_type {
            TYPE_HELLO => Some(HELLO_LEN),
            TYPE_HELLO_REPLY => Some(HELLO_REPLY_LEN),
            TYPE_REQUEST => Some(REQUEST_FIXED_LEN),
            TYPE_RESPONSE => Some(RESPONSE_FIXED_LEN),
            _ => None,
        }
    }

    /// Decodes a frame from its fixed part (`fixed_len` bytes, type byte first) and its payload,
    /// taking ownership of the payload without copying it.
    pub fn decode_parts(fixed: &[u8], payload: Vec<u8>) -> Result<Frame, DecodeError> {
        match fixed.first() {
            Some(&TYPE_REQUEST) => {
                let mut c = Cursor::new(fixed);
                c.u8("frame")?;
                decode_request(&mut c, payload).map(Frame::Request)
            }
            Some(&TYPE_RESPONSE) => {
                let mut c = Cursor::new(fixed);
                c.u8("frame")?;
                decode_response(&mut c, payload).map(Frame::Response)
            }
            _ if payload.is_empty() => Frame::decode_body(fixed),
            _ => {
                let mut body = fixed.to_vec();
                body.extend_from_slice(&payload);
                Frame::decode_body(&body)
            }
        }
    }

    /// Decodes the first frame of `buf` if it is complete: `Ok(None)` asks for more bytes,
    /// `Ok(Some((frame, used)))` says how many bytes it took.
    pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, DecodeError> {
        let Some(prefix) = buf.get(..4) else {
            return Ok(None);
        };
        let mut p = [0u8; 4];
        p.copy_from_slice(prefix);
        let len = Frame::check_len(p)?;
        let Some(body) = buf.get(4..4 + len) else {
            return Ok(None);
        };
        Ok(Some((Frame::decode_body(body)?, 4 + len)))
    }
}

fn decode_request(c: &mut Cursor<'_>, payload: Vec<u8>) -> Result<Request, DecodeError> {
    const WHAT: &str = "request";
    c.need(WHAT, REQUEST_FIXED_LEN - 1)?;
    let op_raw = c.u8(WHAT)?;
    let op = Op::from_u8(op_raw).ok_or(DecodeError::UnknownOp(op_raw))?;
    let flags = c.u8(WHAT)?;
    if flags & !ReqFlags::KNOWN != 0 {
        return Err(DecodeError::UnknownFlags(flags));
    }
    if c.u16(WHAT)? != 0 {
        return Err(DecodeError::Reserved);
    }
    let request_id = c.u64(WHAT)?;
    let volume = VolumeId(c.u128(WHAT)?);
    let epoch = Epoch(c.u64(WHAT)?);
    let offset = c.u64(WHAT)?;
    let length = c.u32(WHAT)?;
    let crc = c.u32(WHAT)?;
    let invalid = |reason| Err(DecodeError::InvalidRequest { op, reason });
    if flags & ReqFlags::FUA != 0 && op != Op::Write {
        return invalid("FUA is only valid on writes");
    }
    if op == Op::SetMembership {
        if let Some(reason) = membership_fields_error(epoch, offset, length, &payload, crc) {
            return invalid(reason);
        }
        let list = crate::members::MemberList::parse(&payload)?;
        if MemberRole::from_u32(length) == Some(MemberRole::Mirror) && list.has_mirrors() {
            return invalid("a mirror has no mirrors");
        }
    } else if op.is_admin() {
        if let Some(reason) = admin_fields_error(op, offset, length, payload.len(), crc) {
            return invalid(reason);
        }
    } else if !op.has_range() && op != Op::Claim && (offset != 0 || length != 0) {
        return invalid("offset and length must be 0");
    }
    if op.request_has_payload() {
        if payload.len() != length as usize {
            return invalid("payload length differs from length");
        }
    } else if op == Op::SetMembership {
        // Checked above.
    } else if !payload.is_empty() {
        return invalid("unexpected payload");
    } else if crc != 0 {
        return invalid("checksum without payload");
    }
    if op == Op::Read && length as usize > MAX_PAYLOAD {
        return invalid("read longer than the maximum payload");
    }
    if op.has_range() && offset.checked_add(u64::from(length)).is_none() {
        return invalid("offset + length overflows");
    }
    Ok(Request {
        op,
        flags: ReqFlags(flags),
        request_id,
        volume,
        epoch,
        offset,
        length,
        crc,
        payload: payload.into(),
    })
}

/// Why a set-membership request's fixed fields are malformed, if they are: `length` is the
/// role, `offset` the writer epoch (not above `epoch`), the payload (the membership list) at
/// most [`MAX_MEMBERSHIP_PAYLOAD`] bytes (a mirror's without mirrors: checked after parsing),
/// with its checksum in `crc`.
fn membership_fields_error(
    epoch: Epoch,
    writer_epoch: u64,
    length: u32,
    payload: &[u8],
    crc: u32,
) -> Option<&'static str> {
    if MemberRole::from_u32(length).is_none() {
        return Some("role (length) must be 0 (primary) or 1 (mirror)");
    }
    if writer_epoch > epoch.0 {
        return Some("writer epoch (offset) must not exceed the epoch");
    }
    if payload.len() > MAX_MEMBERSHIP_PAYLOAD {
        return Some("membership list longer than 64 KiB");
    }
    if checksum(payload) != crc {
        return Some("membership list checksum mismatch");
    }
    None
}

/// Parses a membership list and returns its in-sync mirrors (see [`parse_membership`], which
/// also returns the mirrors being rebuilt).
pub fn parse_members(payload: &[u8]) -> Result<Vec<SocketAddr>, DecodeError> {
    parse_membership(payload).map(|(in_sync, _)| in_sync)
}

/// Parses a membership list ([`crate::members::MemberList::parse`]) and returns its in-sync
/// mirrors and its mirrors being rebuilt, each in the order given.
#[allow(clippy::type_complexity)]
pub fn parse_membership(payload: &[u8]) -> Result<(Vec<SocketAddr>, Vec<SocketAddr>), DecodeError> {
    crate::members::MemberList::parse(payload).map(|l| (l.in_sync, l.rebuilding))
}

/// Encodes a membership list of in-sync mirrors only: one `IP:PORT` per line.
pub fn encode_members(members: &[SocketAddr]) -> Vec<u8> {
    encode_membership(members, &[])
}

/// Encodes a membership list of mirrors only for an [`Op::SetMembership`] payload: one
/// `IP:PORT` per line for each in-sync mirror, then one `rebuild IP:PORT` per line for each
/// mirror being rebuilt.
pub fn encode_membership(in_sync: &[SocketAddr], rebuilding: &[SocketAddr]) -> Vec<u8> {
    crate::members::MemberList::mirrors(in_sync, rebuilding).encode()
}

/// Why an admin request's fields are malformed, if they are: no payload, and `offset` (the
/// size) and `length` (the role) as each op defines them.
fn admin_fields_error(
    op: Op,
    offset: u64,
    length: u32,
    payload_len: usize,
    crc: u32,
) -> Option<&'static str> {
    if payload_len != 0 {
        return Some("admin requests carry no payload");
    }
    if crc != 0 {
        return Some("checksum without payload");
    }
    let size_ok = offset != 0 && offset.is_multiple_of(SECTOR_SIZE);
    let role_ok = MemberRole::from_u32(length).is_some();
    match op {
        Op::CreateCopy | Op::Resize if !size_ok => {
            Some("size (offset) must be a positive multiple of 512 bytes")
        }
        Op::CreateCopy | Op::SetMembership if !role_ok => {
            Some("role (length) must be 0 (primary) or 1 (mirror)")
        }
        Op::DeleteCopy if offset != 0 => Some("offset must be 0"),
        Op::DeleteCopy | Op::Resize if length != 0 => Some("length must be 0"),
        _ => None,
    }
}

fn decode_response(c: &mut Cursor<'_>, payload: Vec<u8>) -> Result<Response, DecodeError> {
    const WHAT: &str = "response";
    c.need(WHAT, RESPONSE_FIXED_LEN - 1)?;
    let s = c.u8(WHAT)?;
    let status = Status::from_u8(s).ok_or(DecodeError::UnknownStatus(s))?;
    if c.u8(WHAT)? != 0 || c.u16(WHAT)? != 0 {
        return Err(DecodeError::Reserved);
    }
    let request_id = c.u64(WHAT)?;
    let epoch = Epoch(c.u64(WHAT)?);
    let crc = c.u32(WHAT)?;
    if payload.len() > MAX_PAYLOAD {
        return Err(DecodeError::TooLong(payload.len()));
    }
    Ok(Response {
        status,
        request_id,
        epoch,
        crc,
        payload,
    })
}

/// A bounds-checked little-endian reader over a byte slice.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }

    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn need(&self, what: &'static str, n: usize) -> Result<(), DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated {
                what,
                got: self.buf.len(),
                need: self.pos + n,
            });
        }
        Ok(())
    }

    fn take<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        self.need(what, N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(&self.buf[self.pos..self.pos + N]);
        self.pos += N;
        Ok(a)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take::<1>(what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.take(what)?))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take(what)?))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take(what)?))
    }
    fn u128(&mut self, what: &'static str) -> Result<u128, DecodeError> {
        Ok(u128::from_le_bytes(self.take(what)?))
    }

    fn finish(&self, what: &'static str) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(DecodeError::Trailing { what, extra }),
        }
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    fn write_req() -> Request {
        let payload = vec![0xabu8; 4096];
        Request {
            op: Op::Write,
            flags: ReqFlags(ReqFlags::FUA),
            request_id: 7,
            volume: VolumeId(0xfeed),
            epoch: Epoch(3),
            offset: 8192,
            length: 4096,
            crc: checksum(&payload),
            payload: payload.into(),
        }
    }

    fn round_trip(f: Frame) {
        let bytes = f.to_bytes();
        let (g, used) = Frame::decode(&bytes).expect("decodes").expect("complete");
        assert_eq!(used, bytes.len());
        assert_eq!(g, f);
        // Every strict prefix asks for more bytes or is a clean error, never a panic.
        for cut in 0..bytes.len() {
            match Frame::decode(&bytes[..cut]) {
                Ok(None) | Err(_) => {}
                Ok(Some(_)) => panic!("prefix of {cut} bytes decoded as a whole frame"),
            }
        }
    }

    #[test]
    fn every_op_round_trips() {
        round_trip(Frame::Request(write_req()));
        for op in [Op::Read, Op::Discard, Op::WriteZeroes] {
            let mut r = Request::new(op, 9, VolumeId(1), Epoch(2));
            r.offset = 512;
            r.length = 4096;
            round_trip(Frame::Request(r));
        }
        for op in [Op::Flush, Op::Ping, Op::DeleteCopy] {
            round_trip(Frame::Request(Request::new(op, 10, VolumeId(1), Epoch(2))));
        }
        // A claim carries its generation and client key in offset and length.
        let mut claim = Request::new(Op::Claim, 12, VolumeId(1), Epoch(2));
        claim.offset = 1_795_573_554_715;
        claim.length = 0xdead_beef;
        round_trip(Frame::Request(claim));
        for (op, offset, length) in [
            (Op::CreateCopy, 1 << 30, MemberRole::Primary as u32),
            (Op::CreateCopy, 512, MemberRole::Mirror as u32),
            (Op::SetMembership, 0, MemberRole::Mirror as u32),
            (Op::Resize, 2 << 30, 0),
        ] {
            let mut r = Request::new(op, 13, VolumeId(u128::MAX), Epoch(u64::MAX));
            r.offset = offset;
            r.length = length;
            round_trip(Frame::Request(r));
        }
        let data = vec![1u8, 2, 3, 4];
        round_trip(Frame::Response(Response {
            status: Status::Ok,
            request_id: 11,
            epoch: Epoch(4),
            crc: checksum(&data),
            payload: data,
        }));
        round_trip(Frame::Response(Response::status(
            Status::StaleEpoch,
            12,
            Epoch(5),
        )));
        round_trip(Frame::Hello(Hello {
            min_version: 1,
            max_version: 1,
        }));
        round_trip(Frame::HelloReply(HelloReply {
            status: Status::Ok,
            version: 1,
        }));
    }

    #[test]
    fn oversized_length_rejected_before_allocation() {
        let len = (MAX_FRAME_LEN as u32 + 1).to_le_bytes();
        assert_eq!(
            Frame::decode(&len),
            Err(DecodeError::TooLong(MAX_FRAME_LEN + 1))
        );
        assert_eq!(
            Frame::check_len(u32::MAX.to_le_bytes()),
            Err(DecodeError::TooLong(u32::MAX as usize))
        );
        assert_eq!(Frame::check_len([0; 4]), Err(DecodeError::Empty));
    }

    fn body_of(f: &Frame) -> Vec<u8> {
        f.to_bytes()[4..].to_vec()
    }

    #[test]
    fn malformed_requests_are_errors() {
        let good = body_of(&Frame::Request(write_req()));
        // Unknown frame type.
        let mut b = good.clone();
        b[0] = 99;
        assert_eq!(Frame::decode_body(&b), Err(DecodeError::UnknownType(99)));
        // Unknown op.
        let mut b = good.clone();
        b[1] = 0;
        assert_eq!(Frame::decode_body(&b), Err(DecodeError::UnknownOp(0)));
        // Unknown flags.
        let mut b = good.clone();
        b[2] = 0x80;
        assert!(matches!(
            Frame::decode_body(&b),
            Err(DecodeError::UnknownFlags(_))
        ));
        // Reserved field set.
        let mut b = good.clone();
        b[3] = 1;
        assert_eq!(Frame::decode_body(&b), Err(DecodeError::Reserved));
        // Payload shorter than the length.
        let b = &good[..good.len() - 1];
        assert!(matches!(
            Frame::decode_body(b),
            Err(DecodeError::InvalidRequest { .. })
        ));
        // Truncated fixed part.
        assert!(matches!(
            Frame::decode_body(&good[..10]),
            Err(DecodeError::Truncated { .. })
        ));
        // Payload on a read.
        let mut r = Request::new(Op::Read, 1, VolumeId(1), Epoch(1));
        r.length = 4;
        r.payload = vec![0; 4].into();
        assert!(matches!(
            Frame::decode_body(&body_of(&Frame::Request(r))),
            Err(DecodeError::InvalidRequest { .. })
        ));
        // Range on a flush.
        let mut r = Request::new(Op::Flush, 1, VolumeId(1), Epoch(1));
        r.offset = 512;
        assert!(matches!(
            Frame::decode_body(&body_of(&Frame::Request(r))),
            Err(DecodeError::InvalidRequest { .. })
        ));
        // FUA on a read.
        let mut r = Request::new(Op::Read, 1, VolumeId(1), Epoch(1));
        r.flags = ReqFlags(ReqFlags::FUA);
        assert!(matches!(
            Frame::decode_body(&body_of(&Frame::Request(r))),
            Err(DecodeError::InvalidRequest { .. })
        ));
        // Read larger than the maximum payload.
        let mut r = Request::new(Op::Read, 1, VolumeId(1), Epoch(1));
        r.length = MAX_PAYLOAD as u32 + 1;
        assert!(matches!(
            Frame::decode_body(&body_of(&Frame::Request(r))),
            Err(DecodeError::InvalidRequest { .. })
        ));
        // offset + length overflowing.
        let mut r = Request::new(Op::Discard, 1, VolumeId(1), Epoch(1));
        r.offset = u64::MAX;
        r.length = 512;
        assert!(matches!(
            Frame::decode_body(&body_of(&Frame::Request(r))),
            Err(DecodeError::InvalidRequest { .. })
        ));
    }

    fn admin(op: Op, offset: u64, length: u32) -> Request {
        let mut r = Request::new(op, 1, VolumeId(5), Epoch(3));
        r.offset = offset;
        r.length = length;
        r
    }

    fn reason_of(r: Request) -> Option<&'static str> {
        let op = r.op;
        match Frame::decode_body(&body_of(&Frame::Request(r))) {
            Ok(_) => None,
            Err(DecodeError::InvalidRequest { op: o, reason }) => {
                assert_eq!(o, op);
                Some(reason)
            }
            Err(other) => panic!("{op:?}: unexpected error {other}"),
        }
    }

    #[test]
    fn admin_requests_decode_and_malformed_ones_are_refused() {
        // Valid.
        assert_eq!(reason_of(admin(Op::CreateCopy, 64 << 20, 0)), None);
        assert_eq!(reason_of(admin(Op::CreateCopy, 512, 1)), None);
        assert_eq!(reason_of(admin(Op::SetMembership, 0, 1)), None);
        assert_eq!(reason_of(admin(Op::Resize, 1 << 40, 0)), None);
        assert_eq!(reason_of(admin(Op::DeleteCopy, 0, 0)), None);
        // Size zero or unaligned.
        for op in [Op::CreateCopy, Op::Resize] {
            for size in [0, 1, 511, 513, u64::MAX] {
                let why = reason_of(admin(op, size, 0)).expect("refused");
                assert!(why.contains("multiple of 512"), "{op:?} {size}: {why}");
            }
        }
        // Bad role.
        for op in [Op::CreateCopy, Op::SetMembership] {
            let size = if op == Op::CreateCopy { 4096 } else { 0 };
            for role in [2, 7, u32::MAX] {
                let why = reason_of(admin(op, size, role)).expect("refused");
                assert!(why.contains("role"), "{op:?} {role}: {why}");
            }
        }
        // Fields an op does not use must be zero.
        assert_eq!(
            reason_of(admin(Op::DeleteCopy, 512, 0)),
            Some("offset must be 0")
        );
        assert_eq!(
            reason_of(admin(Op::SetMembership, 512, 0)),
            Some("writer epoch (offset) must not exceed the epoch")
        );
        // The writer epoch rides in `offset`, up to the epoch.
        assert_eq!(reason_of(admin(Op::SetMembership, 3, 0)), None);
        assert_eq!(
            reason_of(admin(Op::DeleteCopy, 0, 1)),
            Some("length must be 0")
        );
        assert_eq!(
            reason_of(admin(Op::Resize, 4096, 1)),
            Some("length must be 0")
        );
        // A payload (with a matching checksum, or without one) or a stray checksum.
        for op in [Op::CreateCopy, Op::DeleteCopy, Op::Resize] {
            let size = if matches!(op, Op::CreateCopy | Op::Resize) {
                4096
            } else {
                0
            };
            let mut r = admin(op, size, 0);
            r.payload = vec![1; 512].into();
            r.crc = checksum(&r.payload);
            assert_eq!(reason_of(r), Some("admin requests carry no payload"));
            let mut r = admin(op, size, 0);
            r.payload = vec![1; 4].into();
            assert_eq!(reason_of(r), Some("admin requests carry no payload"));
            let mut r = admin(op, size, 0);
            r.crc = 9;
            assert_eq!(reason_of(r), Some("checksum without payload"));
            // FUA is a write flag.
            let mut r = admin(op, size, 0);
            r.flags = ReqFlags(ReqFlags::FUA);
            assert!(reason_of(r).is_some());
        }
        // The streaming path (fixed part and payload apart) agrees.
        let mut r = admin(Op::Resize, 4096, 0);
        r.payload = vec![0; 8].into();
        let body = body_of(&Frame::Request(r));
        assert!(matches!(
            Frame::decode_parts(
                &body[..REQUEST_FIXED_LEN],
                body[REQUEST_FIXED_LEN..].to_vec()
            ),
            Err(DecodeError::InvalidRequest { .. })
        ));
    }

    fn membership(role: MemberRole, text: &[u8]) -> Request {
        let mut r = admin(Op::SetMembership, 2, role as u32);
        r.payload = text.to_vec().into();
        r.crc = checksum(text);
        r
    }

    fn decode_membership(r: Request) -> Result<Request, DecodeError> {
        let body = body_of(&Frame::Request(r));
        // The streaming path (fixed part and payload apart) must agree with the whole body.
        let parts = Frame::decode_parts(
            &body[..REQUEST_FIXED_LEN],
            body[REQUEST_FIXED_LEN..].to_vec(),
        );
        let whole = Frame::decode_body(&body);
        assert_eq!(parts, whole);
        match whole? {
            Frame::Request(r) => Ok(r),
            other => panic!("decoded {other:?}"),
        }
    }

    #[test]
    fn membership_payload_is_validated() {
        // Good: a list, with or without a final newline, IPv4 and IPv6; empty.
        let a: SocketAddr = "10.0.0.1:7500".parse().expect("addr");
        let b: SocketAddr = "[fd00::2]:7501".parse().expect("addr");
        for text in [
            &b"10.0.0.1:7500\n[fd00::2]:7501"[..],
            b"10.0.0.1:7500\n[fd00::2]:7501\n",
        ] {
            let r = decode_membership(membership(MemberRole::Primary, text)).expect("valid");
            assert_eq!(parse_members(&r.payload).expect("parse"), vec![a, b]);
            assert_eq!(r.offset, 2);
        }
        assert_eq!(
            encode_members(&[a, b]),
            b"10.0.0.1:7500\n[fd00::2]:7501".to_vec()
        );
        assert_eq!(
            parse_members(&encode_members(&[a, b])).expect("parse"),
            vec![a, b]
        );
        let r = decode_membership(membership(MemberRole::Primary, b"")).expect("empty");
        assert!(parse_members(&r.payload).expect("parse").is_empty());
        decode_membership(membership(MemberRole::Mirror, b"")).expect("mirror");
        // Bad addresses, each with the line it is on.
        for (text, line) in [
            (&b"10.0.0.1"[..], 1),
            (b"10.0.0.1:7500\nlocalhost:80", 2),
            (b"10.0.0.1:7500\n\n10.0.0.2:1", 2),
            (b"10.0.0.1:99999", 1),
            (b" 10.0.0.1:7500", 1),
            (b"10.0.0.1:7500\n10.0.0.1:7500", 2),
            (b"\n\n", 1),
        ] {
            match decode_membership(membership(MemberRole::Primary, text)) {
                Err(DecodeError::InvalidMembership { line: l, reason }) => {
                    assert_eq!(l, line, "{reason}");
                    assert!(!reason.is_empty());
                }
                other => panic!("{:?}: {other:?}", String::from_utf8_lossy(text)),
            }
        }
        assert!(matches!(
            decode_membership(membership(MemberRole::Primary, &[0xff, 0xfe])),
            Err(DecodeError::InvalidMembership { line: 0, .. })
        ));
        // Too long: over 64 KiB even if every line is an address.
        let mut long = Vec::new();
        let mut port = 1u16;
        while long.len() <= MAX_MEMBERSHIP_PAYLOAD {
            long.extend_from_slice(format!("10.0.0.1:{port}\n").as_bytes());
            port += 1;
        }
        assert_eq!(
            reason_of(membership(MemberRole::Primary, &long)),
            Some("membership list longer than 64 KiB")
        );
        assert!(parse_members(&long).is_err());
        // Mirrors being rebuilt: `rebuild IP:PORT` lines, never also in sync or listed twice.
        let c: SocketAddr = "10.0.0.3:7500".parse().expect("addr");
        assert_eq!(
            encode_membership(&[a], &[b, c]),
            b"10.0.0.1:7500\nrebuild [fd00::2]:7501\nrebuild 10.0.0.3:7500".to_vec()
        );
        let text = encode_membership(&[a], &[b, c]);
        let r = decode_membership(membership(MemberRole::Primary, &text)).expect("valid");
        assert_eq!(
            parse_membership(&r.payload).expect("parse"),
            (vec![a], vec![b, c])
        );
        assert_eq!(parse_members(&text).expect("parse"), vec![a]);
        assert_eq!(
            parse_membership(b"rebuild 10.0.0.1:7500\n").expect("parse"),
            (vec![], vec![a])
        );
        for (text, line) in [
            (&b"10.0.0.1:7500\nrebuild 10.0.0.1:7500"[..], 2),
            (b"rebuild 10.0.0.1:7500\n10.0.0.1:7500", 2),
            (b"rebuild 10.0.0.1:7500\nrebuild 10.0.0.1:7500", 2),
            (b"rebuild", 1),
            (b"rebuild  10.0.0.1:7500", 1),
            (b"rebuild:10.0.0.1:7500", 1),
            (b"REBUILD 10.0.0.1:7500", 1),
        ] {
            match decode_membership(membership(MemberRole::Primary, text)) {
                Err(DecodeError::InvalidMembership { line: l, .. }) => assert_eq!(l, line),
                other => panic!("{:?}: {other:?}", String::from_utf8_lossy(text)),
            }
        }
        assert_eq!(
            reason_of(membership(MemberRole::Mirror, b"rebuild 10.0.0.1:7500")),
            Some("a mirror has no mirrors")
        );
        // A mirror's list holds access entries only.
        decode_membership(membership(MemberRole::Mirror, b"primary s1\nnode n1 rw"))
            .expect("a mirror's access list");
        let mut long = Vec::new();
        let mut port = 1u16;
        while long.len() <= MAX_MEMBERSHIP_PAYLOAD {
            long.extend_from_slice(format!("rebuild 10.0.0.1:{port}\n").as_bytes());
            port += 1;
        }
        assert_eq!(
            reason_of(membership(MemberRole::Primary, &long)),
            Some("membership list longer than 64 KiB")
        );
        // A mirror has no mirrors; the checksum must match; the writer epoch is at most the epoch.
        assert_eq!(
            reason_of(membership(MemberRole::Mirror, b"10.0.0.1:7500")),
            Some("a mirror has no mirrors")
        );
        let mut r = membership(MemberRole::Primary, b"10.0.0.1:7500");
        r.crc ^= 1;
        assert_eq!(reason_of(r), Some("membership list checksum mismatch"));
        let mut r = membership(MemberRole::Primary, b"");
        r.crc = 9;
        assert_eq!(reason_of(r), Some("membership list checksum mismatch"));
        let mut r = membership(MemberRole::Primary, b"");
        r.offset = 4;
        assert_eq!(
            reason_of(r),
            Some("writer epoch (offset) must not exceed the epoch")
        );
    }

    #[test]
    fn malformed_hello_and_response_are_errors() {
        let mut h = body_of(&Frame::Hello(Hello {
            min_version: 1,
            max_version: 1,
        }));
        h[1] = b'X';
        assert!(matches!(
            Frame::decode_body(&h),
            Err(DecodeError::BadMagic(_))
        ));
        let mut h = body_of(&Frame::Hello(Hello {
            min_version: 1,
            max_version: 1,
        }));
        h.push(0);
        assert!(matches!(
            Frame::decode_body(&h),
            Err(DecodeError::Trailing { .. })
        ));
        let mut r = body_of(&Frame::Response(Response::status(Status::Ok, 1, Epoch(1))));
        r[1] = 200;
        assert_eq!(Frame::decode_body(&r), Err(DecodeError::UnknownStatus(200)));
        assert_eq!(
            Frame::decode_body(&[]),
            Err(DecodeError::Truncated {
                what: "frame",
                got: 0,
                need: 1
            })
        );
    }

    #[test]
    fn checksum_detects_corruption() {
        let mut r = write_req();
        assert!(r.crc_ok());
        let mut p = r.payload.to_vec();
        p[100] ^= 1;
        r.payload = p.into();
        assert!(!r.crc_ok());
    }
}
