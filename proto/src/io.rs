//! Reading and writing frames on async byte streams, and the connection handshake.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::frame::{DecodeError, Frame, Hello, HelloReply, PROTOCOL_VERSION};
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
    let mut prefix = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut prefix[got..]).await?;
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
    let read_exact = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            FrameIoError::TruncatedStream
        } else {
            FrameIoError::Io(e)
        }
    };
    // The fixed part first, then the payload straight into a buffer of its own: no copy.
    let mut ty = [0u8; 1];
    r.read_exact(&mut ty).await.map_err(read_exact)?;
    let Some(fixed) = Frame::fixed_len(ty[0]) else {
        return Err(DecodeError::UnknownType(ty[0]).into());
    };
    let fixed = fixed.min(len);
    buf.clear();
    buf.push(ty[0]);
    buf.resize(fixed, 0);
    r.read_exact(&mut buf[1..]).await.map_err(read_exact)?;
    // Read into spare capacity: no zero-fill of a buffer about to be overwritten.
    let want = len - fixed;
    let mut payload = Vec::with_capacity(want);
    while payload.len() < want {
        let room = want - payload.len();
        let mut limited = bytes::BufMut::limit(&mut payload, room);
        if r.read_buf(&mut limited).await? == 0 {
            return Err(FrameIoError::TruncatedStream);
        }
    }
    Ok(Some(Frame::decode_parts(buf, payload)?))
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
}
