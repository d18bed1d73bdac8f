//! The data-path server: mutual-TLS connections, pipelined requests answered out of order.
//!
//! Per connection, one task reads frames and checks each request (authorisation, volume,
//! epoch, range, checksum) before starting it; the disk work runs on the blocking pool, and one
//! writer task batches finished responses into as few TLS writes as possible. In-flight work
//! per connection is bounded by a byte budget, so a client that floods requests is slowed by
//! TCP back-pressure instead of growing the server's memory.

use std::sync::Arc;

use keel_proto::frame::checksum;
use keel_proto::io::{accept, read_frame, FrameIoError};
use keel_proto::tls::Identity;
use keel_proto::{Epoch, Frame, Op, Request, Response, Role, Status};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::copy::{Copy, CopyError, CopyRole, SECTOR};
use crate::store::Store;

/// In-flight budget per connection, in 4 KiB units (128 MiB).
const BUDGET_UNITS: u32 = 32 * 1024;
const UNIT: usize = 4096;

/// Accepts connections forever.
pub async fn serve(
    listener: TcpListener,
    store: Arc<Store>,
    tls: Arc<tokio_rustls::rustls::ServerConfig>,
) -> std::io::Result<()> {
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let (tcp, addr) = listener.accept().await?;
        let store = store.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            match accept(tcp, &acceptor).await {
                Ok((stream, peer)) => {
                    tracing::info!(%addr, %peer, "client connected");
                    match serve_conn(stream, peer.clone(), store).await {
                        Ok(()) => tracing::info!(%addr, %peer, "client disconnected"),
                        Err(e) => tracing::warn!(%addr, %peer, error = %e, "connection closed"),
                    }
                }
                Err(e) => tracing::warn!(%addr, error = %e, "handshake failed"),
            }
        });
    }
}

async fn serve_conn(
    stream: keel_proto::io::ServerStream,
    peer: Identity,
    store: Arc<Store>,
) -> Result<(), FrameIoError> {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::unbounded_channel::<Response>();
    let writer = tokio::spawn(async move {
        let mut buf = Vec::with_capacity(1 << 20);
        while let Some(first) = rx.recv().await {
            buf.clear();
            Frame::Response(first).encode(&mut buf);
            while buf.len() < (1 << 20) {
                match rx.try_recv() {
                    Ok(r) => Frame::Response(r).encode(&mut buf),
                    Err(_) => break,
                }
            }
            if wr.write_all(&buf).await.is_err() || wr.flush().await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    let budget = Arc::new(Semaphore::new(BUDGET_UNITS as usize));
    let mut buf = Vec::new();
    let result = loop {
        let frame = match read_frame(&mut rd, &mut buf).await {
            Ok(Some(f)) => f,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        let req = match frame {
            Frame::Request(r) => r,
            other => {
                break Err(FrameIoError::Handshake(format!(
                    "unexpected {} frame after the hello",
                    frame_name(&other)
                )))
            }
        };
        let units =
            (req.payload.len().max(req.length as usize) / UNIT).clamp(1, BUDGET_UNITS as usize);
        let permit = match budget.clone().acquire_many_owned(units as u32).await {
            Ok(p) => p,
            Err(_) => break Ok(()),
        };
        match check(&store, &peer, &req) {
            Err(resp) => {
                if tx.send(resp).is_err() {
                    break Ok(());
                }
            }
            Ok(None) => {
                let resp = Response::status(Status::Ok, req.request_id, store_epoch(&store, &req));
                if tx.send(resp).is_err() {
                    break Ok(());
                }
            }
            Ok(Some(copy)) => {
                // Reads and writes the page cache can take without waiting are done right here
                // (a thread hand-off costs more than a 4 KiB copy); everything else runs on the
                // blocking pool so a slow disk never stalls the connection.
                let req = match try_cached(&copy, req) {
                    Ok(resp) => {
                        drop(permit);
                        if tx.send(resp).is_err() {
                            break Ok(());
                        }
                        continue;
                    }
                    Err(req) => req,
                };
                let tx = tx.clone();
                tokio::task::spawn_blocking(move || {
                    let resp = execute(&copy, req);
                    drop(permit);
                    let _ = tx.send(resp);
                });
            }
        }
    };
    drop(tx);
    // Let in-flight work finish and its responses go out before the socket closes.
    let _ = writer.await;
    result
}

fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Hello(_) => "hello",
        Frame::HelloReply(_) => "hello reply",
        Frame::Request(_) => "request",
        Frame::Response(_) => "response",
    }
}

fn store_epoch(store: &Store, req: &Request) -> Epoch {
    store.get(req.volume).map(|c| c.epoch()).unwrap_or_default()
}

/// Checks a request before any work: `Err` is the answer, `Ok(None)` means answer Ok at once
/// (ping), `Ok(Some(copy))` means execute on that copy.
#[allow(clippy::result_large_err)]
fn check(store: &Store, peer: &Identity, req: &Request) -> Result<Option<Arc<Copy>>, Response> {
    let fail = |s: Status, e: Epoch| Err(Response::status(s, req.request_id, e));
    if req.op == Op::Ping {
        return Ok(None);
    }
    if peer.role != Role::Node {
        return fail(Status::Unauthorized, Epoch(0));
    }
    let Some(copy) = store.get(req.volume) else {
        return fail(Status::UnknownVolume, Epoch(0));
    };
    let epoch = copy.epoch();
    if req.epoch < epoch {
        return fail(Status::StaleEpoch, epoch);
    }
    if req.epoch > epoch || copy.role() != CopyRole::Primary {
        return fail(Status::NotPrimary, epoch);
    }
    if req.op.has_range() {
        if !req.offset.is_multiple_of(SECTOR) || !u64::from(req.length).is_multiple_of(SECTOR) {
            return fail(Status::BadRequest, epoch);
        }
        if !copy.in_range(req.offset, u64::from(req.length)) {
            return fail(Status::OutOfRange, epoch);
        }
    }
    if req.op == Op::Write && !req.crc_ok() {
        return fail(Status::ChecksumMismatch, epoch);
    }
    Ok(Some(copy))
}

/// Requests up to this size may be served inline from the page cache.
const INLINE_MAX: u32 = 256 << 10;

/// Serves a checked read or plain write without blocking if the page cache allows; gives the
/// request back otherwise.
#[allow(clippy::result_large_err)]
fn try_cached(copy: &Copy, req: Request) -> Result<Response, Request> {
    if req.length > INLINE_MAX || req.flags.fua() {
        return Err(req);
    }
    let epoch = copy.epoch();
    match req.op {
        Op::Read => {
            let mut data = vec![0u8; req.length as usize];
            match copy.try_read_cached(req.offset, &mut data) {
                Ok(true) => Ok(Response {
                    status: Status::Ok,
                    request_id: req.request_id,
                    epoch,
                    crc: checksum(&data),
                    payload: data,
                }),
                _ => Err(req),
            }
        }
        Op::Write => match copy.try_write_cached(req.offset, &req.payload) {
            Ok(true) => Ok(Response::status(Status::Ok, req.request_id, epoch)),
            // Where the filesystem cannot tell whether a write would block, a small buffered
            // write into the page cache is still done here, with the runtime told that this
            // worker may block for a moment (dirty-page throttling).
            _ => Ok(tokio::task::block_in_place(|| execute(copy, req))),
        },
        _ => Err(req),
    }
}

/// Runs a checked request on its copy (blocking).
fn execute(copy: &Copy, req: Request) -> Response {
    let epoch = copy.epoch();
    let result: Result<Vec<u8>, CopyError> = match req.op {
        Op::Read => {
            let mut data = vec![0u8; req.length as usize];
            copy.read(req.offset, &mut data).map(|()| data)
        }
        Op::Write => copy
            .write(req.offset, &req.payload)
            .and_then(|()| {
                if req.flags.fua() {
                    copy.flush()
                } else {
                    Ok(())
                }
            })
            .map(|()| Vec::new()),
        Op::Flush => copy.flush().map(|()| Vec::new()),
        Op::Discard | Op::WriteZeroes => copy
            .zero_range(req.offset, u64::from(req.length))
            .map(|()| Vec::new()),
        Op::Ping => Ok(Vec::new()),
    };
    match result {
        Ok(payload) => Response {
            status: Status::Ok,
            request_id: req.request_id,
            epoch,
            crc: checksum(&payload),
            payload,
        },
        Err(e) => {
            tracing::warn!(volume = %req.volume, op = ?req.op, offset = req.offset, len = req.length, error = %e, "request failed");
            Response::status(Status::IoError, req.request_id, epoch)
        }
    }
}
