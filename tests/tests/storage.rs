//! keel-storage over real mutual TLS on loopback: every op, every refusal, pipelining,
//! malformed input, restart and kill -9, and a full disk.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use keel_proto::frame::{checksum, MAX_FRAME_LEN};
use keel_proto::io::{connect, read_frame, ClientStream};
use keel_proto::tls::{client_config, TlsPaths};
use keel_proto::{Epoch, Frame, Op, ReqFlags, Request, Response, Role, Status, VolumeId};
use keel_tests::cluster::{Pki, Storage};
use tokio::io::AsyncWriteExt;

const VOL: VolumeId = VolumeId(0x51);

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

struct Client {
    s: ClientStream,
    buf: Vec<u8>,
    next: u64,
    epoch: Epoch,
}

impl Client {
    async fn new(pki: &Pki, role: Role, id: &str, storage: &Storage) -> Result<Client> {
        pki.issue(role, id)?;
        let cfg = client_config(&TlsPaths::in_dir(&pki.dir, &format!("{role}-{id}")))?;
        let (s, peer) = connect(storage.addr, cfg, Role::Storage).await?;
        assert_eq!(peer.role, Role::Storage);
        Ok(Client {
            s,
            buf: Vec::new(),
            next: 1,
            epoch: Epoch(1),
        })
    }

    fn req(&mut self, op: Op, offset: u64, length: u32, payload: Vec<u8>) -> Request {
        let mut r = Request::new(op, self.next, VOL, self.epoch);
        self.next += 1;
        r.offset = offset;
        r.length = length;
        r.crc = checksum(&payload);
        r.payload = payload;
        r
    }

    async fn send(&mut self, r: &Request) -> Result<()> {
        self.s
            .write_all(&Frame::Request(r.clone()).to_bytes())
            .await?;
        self.s.flush().await?;
        Ok(())
    }

    async fn recv(&mut self) -> Result<Response> {
        match read_frame(&mut self.s, &mut self.buf).await? {
            Some(Frame::Response(r)) => Ok(r),
            other => anyhow::bail!("expected a response, got {other:?}"),
        }
    }

    async fn call(&mut self, r: Request) -> Result<Response> {
        self.send(&r).await?;
        let resp = self.recv().await?;
        assert_eq!(resp.request_id, r.request_id);
        Ok(resp)
    }

    async fn write(&mut self, offset: u64, data: Vec<u8>) -> Result<Status> {
        let len = data.len() as u32;
        let r = self.req(Op::Write, offset, len, data);
        Ok(self.call(r).await?.status)
    }

    async fn read(&mut self, offset: u64, len: u32) -> Result<(Status, Vec<u8>)> {
        let r = self.req(Op::Read, offset, len, Vec::new());
        let resp = self.call(r).await?;
        assert!(resp.crc_ok(), "read payload checksum");
        Ok((resp.status, resp.payload))
    }

    async fn simple(&mut self, op: Op, offset: u64, len: u32) -> Result<Status> {
        let r = self.req(op, offset, len, Vec::new());
        Ok(self.call(r).await?.status)
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn setup(dir: &std::path::Path) -> Result<(Pki, Storage)> {
    let pki = Pki::new(&dir.join("pki"))?;
    let storage = Storage::start(&pki, "s1", &dir.join("data"), &["51:64MiB"])?;
    Ok((pki, storage))
}

#[test]
fn every_op_and_refusal() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (pki, storage) = setup(dir.path())?;
    rt().block_on(async {
        let mut c = Client::new(&pki, Role::Node, "n1", &storage).await?;
        // Never-written data reads as zeros.
        let (st, d) = c.read(0, 8192).await?;
        assert_eq!(st, Status::Ok);
        assert!(d.iter().all(|&b| b == 0));
        // Read after write, content checked.
        let data = pattern(1, 65536);
        assert_eq!(c.write(1 << 20, data.clone()).await?, Status::Ok);
        let (st, back) = c.read(1 << 20, 65536).await?;
        assert_eq!(st, Status::Ok);
        assert_eq!(checksum(&back), checksum(&data));
        // FUA write and flush.
        let mut r = c.req(Op::Write, 0, 4096, pattern(2, 4096));
        r.flags = ReqFlags(ReqFlags::FUA);
        assert_eq!(c.call(r).await?.status, Status::Ok);
        assert_eq!(c.simple(Op::Flush, 0, 0).await?, Status::Ok);
        assert_eq!(c.simple(Op::Ping, 0, 0).await?, Status::Ok);
        // Discard and write-zeroes read back as zeros, neighbours intact.
        assert_eq!(
            c.simple(Op::Discard, (1 << 20) + 4096, 8192).await?,
            Status::Ok
        );
        assert_eq!(
            c.simple(Op::WriteZeroes, (1 << 20) + 32768, 4096).await?,
            Status::Ok
        );
        let (_, back) = c.read(1 << 20, 65536).await?;
        assert_eq!(&back[..4096], &data[..4096]);
        assert!(back[4096..12288].iter().all(|&b| b == 0));
        assert_eq!(&back[12288..32768], &data[12288..32768]);
        assert!(back[32768..36864].iter().all(|&b| b == 0));
        assert_eq!(&back[36864..], &data[36864..]);
        // Out of range, misaligned.
        assert_eq!(c.read(64 << 20, 512).await?.0, Status::OutOfRange);
        assert_eq!(
            c.write((64 << 20) - 512, vec![1; 1024]).await?,
            Status::OutOfRange
        );
        assert_eq!(c.read(100, 512).await?.0, Status::BadRequest);
        // Bad checksum on a write is refused and nothing lands.
        let mut r = c.req(Op::Write, 0, 4096, vec![0xee; 4096]);
        r.crc ^= 1;
        assert_eq!(c.call(r).await?.status, Status::ChecksumMismatch);
        let (_, d) = c.read(0, 4096).await?;
        assert_eq!(d, pattern(2, 4096));
        // Unknown volume.
        let mut r = c.req(Op::Read, 0, 512, Vec::new());
        r.volume = VolumeId(0x999);
        assert_eq!(c.call(r).await?.status, Status::UnknownVolume);
        // An older epoch is fenced; a newer one is not (yet) served here.
        c.epoch = Epoch(0);
        let resp = {
            let r = c.req(Op::Write, 0, 512, vec![7; 512]);
            c.call(r).await?
        };
        assert_eq!(resp.status, Status::StaleEpoch);
        assert_eq!(resp.epoch, Epoch(1));
        c.epoch = Epoch(2);
        assert_eq!(c.write(0, vec![7; 512]).await?, Status::NotPrimary);
        c.epoch = Epoch(1);
        let (_, d) = c.read(0, 4096).await?;
        assert_eq!(d, pattern(2, 4096), "fenced writes must not land");
        // A peer with the wrong role may not do I/O.
        let mut other = Client::new(&pki, Role::Storage, "s9", &storage).await?;
        assert_eq!(other.read(0, 512).await?.0, Status::Unauthorized);
        anyhow::Ok(())
    })
}

#[test]
fn pipelined_requests_complete_out_of_order_with_correct_data() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (pki, storage) = setup(dir.path())?;
    rt().block_on(async {
        let mut c = Client::new(&pki, Role::Node, "n1", &storage).await?;
        // 64 writes sent back to back before any answer is read.
        let mut reqs = Vec::new();
        for i in 0..64u64 {
            reqs.push(c.req(Op::Write, i * 16384, 16384, pattern(100 + i, 16384)));
        }
        let mut batch = Vec::new();
        for r in &reqs {
            Frame::Request(r.clone()).encode(&mut batch);
        }
        c.s.write_all(&batch).await?;
        c.s.flush().await?;
        let mut seen = std::collections::HashSet::new();
        for _ in 0..64 {
            let r = c.recv().await?;
            assert_eq!(r.status, Status::Ok);
            assert!(seen.insert(r.request_id));
        }
        // 64 reads pipelined, each checked against what was written.
        let mut batch = Vec::new();
        let mut want = std::collections::HashMap::new();
        for i in 0..64u64 {
            let r = c.req(Op::Read, i * 16384, 16384, Vec::new());
            want.insert(r.request_id, checksum(&pattern(100 + i, 16384)));
            Frame::Request(r).encode(&mut batch);
        }
        c.s.write_all(&batch).await?;
        c.s.flush().await?;
        for _ in 0..64 {
            let r = c.recv().await?;
            assert_eq!(r.status, Status::Ok);
            assert_eq!(Some(&checksum(&r.payload)), want.get(&r.request_id));
        }
        anyhow::Ok(())
    })
}

#[test]
fn malformed_frames_close_the_connection_not_the_server() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (pki, storage) = setup(dir.path())?;
    rt().block_on(async {
        let bad: Vec<Vec<u8>> = vec![
            ((MAX_FRAME_LEN as u32) + 1).to_le_bytes().to_vec(), // oversized: no allocation
            u32::MAX.to_le_bytes().to_vec(),
            vec![0, 0, 0, 0],                 // empty frame
            vec![5, 0, 0, 0, 99, 1, 2, 3, 4], // unknown type
            vec![60, 0, 0, 0, 3, 1, 0, 0, 0], // truncated request, then close
        ];
        for b in bad {
            let mut c = Client::new(&pki, Role::Node, "n1", &storage).await?;
            c.s.write_all(&b).await?;
            c.s.flush().await?;
            let _ = c.s.shutdown().await;
            // The server closes the connection without answering a request.
            let r = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut c.s, &mut c.buf))
                .await?;
            assert!(
                !matches!(r, Ok(Some(Frame::Response(_)))),
                "no answer to garbage"
            );
        }
        // The server still serves.
        let mut c = Client::new(&pki, Role::Node, "n1", &storage).await?;
        assert_eq!(c.simple(Op::Ping, 0, 0).await?, Status::Ok);
        anyhow::Ok(())
    })
}

#[test]
fn untrusted_certificates_are_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (_pki, storage) = setup(dir.path())?;
    // A second, unrelated CA: its node certificate must not get in.
    let rogue = Pki::new(&dir.path().join("rogue"))?;
    rt().block_on(async {
        rogue.issue(Role::Node, "evil")?;
        let cfg = client_config(&TlsPaths::in_dir(&rogue.dir, "node-evil"))?;
        let r = connect(storage.addr, cfg, Role::Storage).await;
        assert!(r.is_err(), "a certificate from another CA must be refused");
        anyhow::Ok(())
    })
}

#[test]
fn flushed_writes_survive_kill_9_and_restart() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (pki, mut storage) = setup(dir.path())?;
    let rt = rt();
    rt.block_on(async {
        let mut c = Client::new(&pki, Role::Node, "n1", &storage).await?;
        for i in 0..32u64 {
            assert_eq!(
                c.write(i * 65536, pattern(500 + i, 65536)).await?,
                Status::Ok
            );
        }
        assert_eq!(c.simple(Op::Flush, 0, 0).await?, Status::Ok);
        anyhow::Ok(())
    })?;
    storage.kill9();
    storage.restart()?;
    rt.block_on(async {
        let mut c = Client::new(&pki, Role::Node, "n1", &storage).await?;
        for i in 0..32u64 {
            let (st, d) = c.read(i * 65536, 65536).await?;
            assert_eq!(st, Status::Ok);
            assert_eq!(
                checksum(&d),
                checksum(&pattern(500 + i, 65536)),
                "block {i}"
            );
        }
        anyhow::Ok(())
    })
}

/// A copy on a filesystem that fills up: the write that does not fit is an I/O error, and
/// everything acknowledged before it is intact, also after kill -9 and restart.
#[test]
fn full_disk_is_an_io_error_and_loses_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(&dir.path().join("pki"))?;
    let data = dir.path().join("small");
    std::fs::create_dir_all(&data)?;
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=6m", "keel-test"])
        .arg(&data)
        .status()?;
    anyhow::ensure!(
        st.success(),
        "mounting a small tmpfs needs root (the test command runs as root)"
    );
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _guard = Unmount(data.clone());
    let mut storage = Storage::start(&pki, "s1", &data, &["51:64MiB"])?;
    let rt = rt();
    let acked = rt.block_on(async {
        let mut c = Client::new(&pki, Role::Node, "n1", &storage).await?;
        let mut acked = 0u64;
        let mut failed = false;
        for i in 0..16u64 {
            match c.write(i << 20, pattern(900 + i, 1 << 20)).await? {
                Status::Ok => acked += 1,
                Status::IoError => {
                    failed = true;
                    break;
                }
                other => anyhow::bail!("unexpected status {other}"),
            }
        }
        assert!(failed, "a 6 MiB filesystem cannot take 16 MiB");
        assert!(acked >= 2, "only {acked} writes fit");
        // Space freed by a discard makes room again; the flush covers what was acknowledged.
        assert_eq!(c.simple(Op::Flush, 0, 0).await?, Status::Ok);
        anyhow::Ok(acked)
    })?;
    storage.kill9();
    storage.restart()?;
    rt.block_on(async {
        let mut c = Client::new(&pki, Role::Node, "n1", &storage).await?;
        for i in 0..acked {
            let (st, d) = c.read(i << 20, 1 << 20).await?;
            assert_eq!(st, Status::Ok);
            assert_eq!(
                checksum(&d),
                checksum(&pattern(900 + i, 1 << 20)),
                "MiB {i}"
            );
        }
        anyhow::Ok(())
    })?;
    drop(storage);
    Ok(())
}

#[test]
fn concurrent_connections_share_a_volume() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (pki, storage) = setup(dir.path())?;
    let storage = Arc::new(storage);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut tasks = Vec::new();
        for t in 0..4u64 {
            let mut c = Client::new(&pki, Role::Node, &format!("n{t}"), &storage).await?;
            tasks.push(tokio::spawn(async move {
                for i in 0..16u64 {
                    let off = (t * 16 + i) * 8192;
                    assert_eq!(c.write(off, pattern(t * 100 + i, 8192)).await?, Status::Ok);
                }
                for i in 0..16u64 {
                    let off = (t * 16 + i) * 8192;
                    let (_, d) = c.read(off, 8192).await?;
                    assert_eq!(d, pattern(t * 100 + i, 8192));
                }
                anyhow::Ok(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        anyhow::Ok(())
    })
}
