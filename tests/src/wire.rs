//! A raw data-path client for tests that play a peer by hand (a rogue node, a storage server
//! that is not the primary): one TLS connection with any certificate of a PKI directory,
//! requests built field by field, answers returned as they come. Blocking (it owns a small
//! runtime), so `#[test]` functions call it directly.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{bail, Context, Result};
use keel_proto::frame::checksum;
use keel_proto::io::{connect, read_frame, ClientStream};
use keel_proto::tls::{client_config, TlsPaths};
use keel_proto::{Epoch, Frame, Op, Request, Response, Role, VolumeId};
use tokio::io::AsyncWriteExt;

/// One connection to a storage server as `<role>-<id>` of the PKI in `pki_dir`.
pub struct WireClient {
    rt: tokio::runtime::Runtime,
    stream: ClientStream,
    buf: Vec<u8>,
    next_id: u64,
}

impl WireClient {
    /// Connects to `addr` with certificate `<role>-<id>.pem` of `pki_dir` (which must exist),
    /// checking that the server presents a storage certificate.
    pub fn connect(pki_dir: &Path, role: Role, id: &str, addr: SocketAddr) -> Result<WireClient> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let cfg = client_config(&TlsPaths::in_dir(pki_dir, &format!("{role}-{id}")))
            .with_context(|| format!("loading {role}-{id}'s certificate"))?;
        let (stream, _) = rt
            .block_on(connect(addr, cfg, Role::Storage))
            .with_context(|| format!("connecting to {addr} as {role}/{id}"))?;
        Ok(WireClient {
            rt,
            stream,
            buf: Vec::new(),
            next_id: 1,
        })
    }

    /// Sends one request and returns its answer. `payload` is sent with its checksum; for
    /// ops without a payload pass an empty one (then `length` is the range length).
    pub fn call(
        &mut self,
        op: Op,
        volume: VolumeId,
        epoch: Epoch,
        offset: u64,
        length: u32,
        payload: Vec<u8>,
    ) -> Result<Response> {
        let mut r = Request::new(op, self.next_id, volume, epoch);
        self.next_id += 1;
        r.offset = offset;
        r.length = length;
        if !payload.is_empty() {
            r.crc = checksum(&payload);
        }
        r.payload = payload.into();
        let id = r.request_id;
        let (stream, buf) = (&mut self.stream, &mut self.buf);
        let resp = self.rt.block_on(async {
            stream.write_all(&Frame::Request(r).to_bytes()).await?;
            stream.flush().await?;
            read_frame(stream, buf).await.map_err(anyhow::Error::from)
        })?;
        match resp {
            Some(Frame::Response(resp)) if resp.request_id == id => Ok(resp),
            Some(other) => bail!("expected the answer to request {id}, got {other:?}"),
            None => bail!("the server closed the connection instead of answering {op:?}"),
        }
    }

    /// The request each data op is tested with at `offset`: a 4 KiB write of `fill`, a 4 KiB
    /// range for read, discard and write-zeroes, nothing for flush, claim and ping (a claim's
    /// generation and key are 1).
    pub fn probe(
        &mut self,
        op: Op,
        volume: VolumeId,
        epoch: Epoch,
        offset: u64,
        fill: u8,
    ) -> Result<Response> {
        match op {
            Op::Write => self.call(op, volume, epoch, offset, 4096, vec![fill; 4096]),
            Op::Read | Op::Discard | Op::WriteZeroes => {
                self.call(op, volume, epoch, offset, 4096, Vec::new())
            }
            Op::Claim => self.call(op, volume, epoch, 1, 1, Vec::new()),
            _ => self.call(op, volume, epoch, 0, 0, Vec::new()),
        }
    }
}
