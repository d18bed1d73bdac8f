//! Reading and writing frames on async byte streams, and the connection handshake.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::frame::{DecodeError, Frame, Hello, HelloReply, Request, Response, PROTOCOL_VERSION};
use crate::tls::{self, Identity, TlsError};
use crate::types::{Role, Status};

/// Why a frame could not be read or a connection set up.
#[derive(Debug, thiserror::Error)]
pub enum FrameIoError {
    #[error("connection I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed frame: {0}")]
    Decode(#[from] DecodeError),
    #[error("connection closed in the middle of a frame")]
    TruncatedStream,
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("peer {peer} has role {got}, expected {expected}")]
    WrongRole {
        peer: String,
        got: Role,
        expected: Role,
    },
    #[error("handshake: {0}")]
    Handshake(String),
}

/// Reads one frame. `Ok(None)` is a clean end of stream at a frame boundary. The length prefix
/// is checked before the body buffer (reused across calls) grows.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Option<Frame>, FrameIoError> {
    match read_head(r, buf).await? {
        None => Ok(None),
        Some(head) => read_body(r, buf, head).await.map(Some),
    }
}

/// A frame whose fixed part [`read_head`] read (into its `buf`); its payload is still to come.
#[derive(Debug, Clone, Copy)]
pub struct FrameHead {
    len: usize,
    fixed: usize,
}

impl FrameHead {
    /// Bytes of payload still to be read (allocated at once by [`read_body`]): what a server
    /// charges to its memory budget before reading them.
    pub fn payload_len(&self) -> usize {
        self.len - self.fixed
    }
}

fn truncated(e: std::io::Error) -> FrameIoError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        FrameIoError::TruncatedStream
    } else {
        FrameIoError::Io(e)
    }
}

/// Reads a frame's length prefix and fixed part into `buf` (at most a few dozen bytes).
/// `Ok(None)` is a clean end of stream at a frame boundary. A TLS peer that closes its
/// connection without `close_notify` (a process that exits: keel-vhost on detach, any daemon
/// killed) also ends cleanly when it stops at a frame boundary: `close_notify` guards against
/// truncation, which the frames' lengths already reveal (`TruncatedStream` inside a frame).
pub async fn read_head<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Option<FrameHead>, FrameIoError> {
    let mut prefix = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = match r.read(&mut prefix[got..]).await {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(FrameIoError::TruncatedStream)
            };
        }
        got += n;
    }
    let len = Frame::check_len(prefix)?;
    // The fixed part first, then the payload straight into a buffer of its own: no copy.
    let mut ty = [0u8; 1];
    r.read_exact(&mut ty).await.map_err(truncated)?;
    let Some(fixed) = Frame::fixed_len(ty[0]) else {
        return Err(DecodeError::UnknownType(ty[0]).into());
    };
    let fixed = fixed.min(len);
    buf.clear();
    buf.push(ty[0]);
    buf.resize(fixed, 0);
    r.read_exact(&mut buf[1..]).await.map_err(truncated)?;
    Ok(Some(FrameHead { len, fixed }))
}

/// Reads the payload of the frame [`read_head`] started and decodes the frame.
pub async fn read_body<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &[u8],
    head: FrameHead,
) -> Result<Frame, FrameIoError> {
    // Read into spare capacity: no zero-fill of a buffer about to be overwritten.
    let want = head.payload_len();
    let mut payload = Vec::with_capacity(want);
    while payload.len() < want {
        let room = want - payload.len();
        let mut limited = bytes::BufMut::limit(&mut payload, room);
        if r.read_buf(&mut limited).await? == 0 {
            return Err(FrameIoError::TruncatedStream);
        }
    }
    Ok(Frame::decode_parts(buf, payload)?)
}

/// Payloads up to this size are copied next to their frame's fixed part; larger ones are
/// written from their own buffer.
const INLINE_PAYLOAD: usize = 2048;

/// Frames queued for one vectored write: the fixed parts (and small payloads) are encoded into
/// one buffer, large payloads are written from the buffers they arrived in. Before, every
/// payload was copied into a send buffer first: one more pass over each MiB.
#[derive(Default)]
pub struct WriteBatch {
    head: Vec<u8>,
    /// Large payloads, each written after `head[..cut]`.
    parts: Vec<(usize, bytes::Bytes)>,
    /// Bytes in `parts`.
    bytes: usize,
}

impl WriteBatch {
    pub fn new() -> WriteBatch {
        WriteBatch::default()
    }

    /// Queues a request.
    pub fn push_request(&mut self, mut r: Request) {
        let payload = std::mem::take(&mut r.payload);
        r.encode_header(payload.len(), &mut self.head);
        self.add(payload);
    }

    /// Queues a response (its payload moves into the batch).
    pub fn push_response(&mut self, mut r: Response) {
        let payload = std::mem::take(&mut r.payload);
        r.encode_header(payload.len(), &mut self.head);
        self.add(payload.into());
    }

    /// Queues a request the caller keeps (its payload is shared, not copied).
    pub fn push_request_ref(&mut self, r: &Request) {
        r.encode_header(r.payload.len(), &mut self.head);
        self.add(r.payload.clone());
    }

    fn add(&mut self, payload: bytes::Bytes) {
        if payload.len() <= INLINE_PAYLOAD {
            self.head.extend_from_slice(&payload);
        } else {
            self.bytes += payload.len();
            self.parts.push((self.head.len(), payload));
        }
    }

    /// Bytes queued (fixed parts and payloads).
    pub fn len(&self) -> usize {
        self.head.len() + self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.head.is_empty() && self.parts.is_empty()
    }

    /// Drops everything queued.
    pub fn clear(&mut self) {
        self.head.clear();
        self.parts.clear();
        self.bytes = 0;
    }

    /// Writes everything queued, flushes, and empties the batch (also on error).
    pub async fn write_to<W: AsyncWrite + Unpin>(&mut self, w: &mut W) -> std::io::Result<()> {
        let r = self.write_all(w).await;
        self.clear();
        r?;
        w.flush().await
    }

    async fn write_all<W: AsyncWrite + Unpin>(&self, w: &mut W) -> std::io::Result<()> {
        let mut segs: Vec<&[u8]> = Vec::with_capacity(2 * self.parts.len() + 1);
        let mut at = 0;
        for (cut, p) in &self.parts {
            segs.push(&self.head[at..*cut]);
            segs.push(p);
            at = *cut;
        }
        segs.push(&self.head[at..]);
        segs.retain(|s| !s.is_empty());
        let (mut i, mut off) = (0usize, 0usize);
        while i < segs.len() {
            let slices: Vec<std::io::IoSlice<'_>> = std::iter::once(&segs[i][off..])
                .chain(segs[i + 1..].iter().copied())
                .take(64)
                .map(std::io::IoSlice::new)
                .collect();
            let mut n = w.write_vectored(&slices).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            while n > 0 && i < segs.len() {
                let left = segs[i].len() - off;
                if n >= left {
                    n -= left;
                    i += 1;
                    off = 0;
                } else {
                    off += n;
                    n = 0;
                }
            }
        }
        Ok(())
    }
}

/// Writes one frame and flushes it.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, f: &Frame) -> std::io::Result<()> {
    w.write_all(&f.to_bytes()).await?;
    w.flush().await
}

/// A TLS stream to a server, client side.
pub type ClientStream = tokio_rustls::client::TlsStream<TcpStream>;
/// A TLS stream from a client, server side.
pub type ServerStream = tokio_rustls::server::TlsStream<TcpStream>;

/// Connects to `addr`, completes mutual TLS, checks that the server's certificate has role
/// `expected`, and exchanges hellos.
pub async fn connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    expected: Role,
) -> Result<(ClientStream, Identity), FrameIoError> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
    let mut tls = TlsConnector::from(config).connect(name, tcp).await?;
    let peer = tls::peer_identity(tls.get_ref().1)?;
    if peer.role != expected {
        return Err(FrameIoError::WrongRole {
            peer: peer.to_string(),
            got: peer.role,
            expected,
        });
    }
    write_frame(
        &mut tls,
        &Frame::Hello(Hello {
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
        }),
    )
    .await?;
    let mut buf = Vec::new();
    match read_frame(&mut tls, &mut buf).await? {
        Some(Frame::HelloReply(HelloReply {
            status: Status::Ok,
            version,
        })) if version == PROTOCOL_VERSION => Ok((tls, peer)),
        Some(Frame::HelloReply(r)) => Err(FrameIoError::Handshake(format!(
            "server refused hello: {} (version {})",
            r.status, r.version
        ))),
        Some(other) => Err(FrameIoError::Handshake(format!(
            "expected a hello reply, got {other:?}"
        ))),
        None => Err(FrameIoError::Handshake(
            "server closed the connection during the hello".into(),
        )),
    }
}

/// Accepts one TLS connection and its hello; answers the hello. Returns the client's identity.
pub async fn accept(
    tcp: TcpStream,
    acceptor: &TlsAcceptor,
) -> Result<(ServerStream, Identity), FrameIoError> {
    tcp.set_nodelay(true)?;
    let mut tls = acceptor.accept(tcp).await?;
    let peer = tls::peer_identity(tls.get_ref().1)?;
    let mut buf = Vec::new();
    let hello = match read_frame(&mut tls, &mut buf).await? {
        Some(Frame::Hello(h)) => h,
        Some(_) => return Err(FrameIoError::Handshake("expected a hello".into())),
        None => return Err(FrameIoError::Handshake("closed before the hello".into())),
    };
    let ok = hello.min_version <= PROTOCOL_VERSION && PROTOCOL_VERSION <= hello.max_version;
    let reply = HelloReply {
        status: if ok {
            Status::Ok
        } else {
            Status::UnsupportedVersion
        },
        version: PROTOCOL_VERSION,
    };
    write_frame(&mut tls, &Frame::HelloReply(reply)).await?;
    if !ok {
        return Err(FrameIoError::Handshake(format!(
            "client speaks versions {}..={}, this server {}",
            hello.min_version, hello.max_version, PROTOCOL_VERSION
        )));
    }
    Ok((tls, peer))
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    /// The streaming reader (fixed part, then the payload into its own buffer) agrees with the
    /// whole-buffer decoder on every seed input, valid or not, and on every truncation.
    #[test]
    fn streaming_reader_agrees_with_the_decoder() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        for (name, bytes) in crate::fuzz::decode_frame_seeds() {
            for cut in [bytes.len(), bytes.len().saturating_sub(1), 5, 4, 0] {
                let input = &bytes[..cut.min(bytes.len())];
                let mut r = input;
                let mut buf = Vec::new();
                let streamed = rt.block_on(read_frame(&mut r, &mut buf));
                match Frame::decode(input) {
                    Ok(Some((f, _))) => {
                        assert_eq!(streamed.expect(name).expect(name), f, "{name} cut {cut}")
                    }
                    Ok(None) => assert!(
                        matches!(streamed, Ok(None) | Err(FrameIoError::TruncatedStream)),
                        "{name} cut {cut}: {streamed:?}"
                    ),
                    Err(_) => assert!(streamed.is_err(), "{name} cut {cut}"),
                }
            }
        }
    }

    /// Yields its bytes, then fails as rustls does when the peer closed without
    /// `close_notify` (UnexpectedEof).
    struct NoCloseNotify<'a>(&'a [u8]);

    impl AsyncRead for NoCloseNotify<'_> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            if self.0.is_empty() {
                return std::task::Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "peer closed connection without sending TLS close_notify",
                )));
            }
            let n = buf.remaining().min(self.0.len());
            buf.put_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// A peer that exits without `close_notify` after a whole frame has closed cleanly; one
    /// that stops inside a frame (its length prefix included) is an error.
    #[test]
    fn a_missing_close_notify_at_a_frame_boundary_is_a_clean_end() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let (_, bytes) = crate::fuzz::decode_frame_seeds()
            .into_iter()
            .find(|(_, b)| matches!(Frame::decode(b), Ok(Some(_))))
            .expect("a valid seed frame");
        let mut buf = Vec::new();
        let mut r = NoCloseNotify(&bytes);
        assert!(matches!(
            rt.block_on(read_frame(&mut r, &mut buf)),
            Ok(Some(_))
        ));
        assert!(matches!(
            rt.block_on(read_frame(&mut r, &mut buf)),
            Ok(None)
        ));
        for cut in [2, 4, bytes.len() - 1] {
            let mut r = NoCloseNotify(&bytes[..cut]);
            let got = rt.block_on(read_frame(&mut r, &mut buf));
            assert!(got.is_err(), "cut {cut}: {got:?}");
        }
    }

    /// Takes at most 7 bytes per call, gathering across slices.
    struct Trickle(Vec<u8>);

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let n = buf.len().min(7);
            self.0.extend_from_slice(&buf[..n]);
            std::task::Poll::Ready(Ok(n))
        }
        fn poll_write_vectored(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(7 - n);
                self.0.extend_from_slice(&b[..take]);
                n += take;
                if n == 7 {
                    break;
                }
            }
            std::task::Poll::Ready(Ok(n))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// A batch of small and large frames, written through partial vectored writes, yields
    /// exactly the bytes of the frames encoded one after another.
    #[test]
    fn write_batch_writes_the_frames_in_order() {
        use crate::types::{Epoch, Op, Status, VolumeId};
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let vol = VolumeId(7);
        let mut frames = Vec::new();
        for (i, len) in [0usize, 5, 4096, 2048, 2049, 70_000, 1]
            .into_iter()
            .enumerate()
        {
            let payload: Vec<u8> = (0..len).map(|b| (b * 31 + i) as u8).collect();
            if i % 2 == 0 {
                let mut r = crate::frame::Request::new(Op::Write, i as u64, vol, Epoch(3));
                r.length = len as u32;
                r.crc = crate::frame::checksum(&payload);
                r.payload = payload.into();
                frames.push(Frame::Request(r));
            } else {
                let mut r = crate::frame::Response::status(Status::Ok, i as u64, Epoch(3));
                r.crc = crate::frame::checksum(&payload);
                r.payload = payload;
                frames.push(Frame::Response(r));
            }
        }
        let mut want = Vec::new();
        let mut batch = WriteBatch::new();
        for f in &frames {
            f.encode(&mut want);
            match f.clone() {
                Frame::Request(r) if r.request_id == 4 => batch.push_request_ref(&r),
                Frame::Request(r) => batch.push_request(r),
                Frame::Response(r) => batch.push_response(r),
                _ => unreachable!(),
            }
        }
        assert_eq!(batch.len(), want.len());
        let mut w = Trickle(Vec::new());
        rt.block_on(batch.write_to(&mut w)).expect("write");
        assert_eq!(w.0, want);
        assert!(batch.is_empty());
        // And they decode back.
        let mut r = &w.0[..];
        let mut buf = Vec::new();
        for f in &frames {
            let got = rt.block_on(read_frame(&mut r, &mut buf)).expect("read");
            assert_eq!(got.as_ref(), Some(f));
        }
    }
}
