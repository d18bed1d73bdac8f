//! keel-storage over real mutual TLS on loopback: every op, every refusal, pipelining,
//! malformed input, restart and kill -9, a full disk, and the controller's copy administration
//! (create, delete, membership and fencing, resize).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use keel_proto::admin::{admin_call, AdminError, AdminRequest};
use keel_proto::frame::{checksum, MAX_FRAME_LEN};
use keel_proto::io::{connect, read_frame, ClientStream};
use keel_proto::members::{Access, Grant};
use keel_proto::tls::{client_config, TlsPaths};
use keel_proto::{
    Epoch, Frame, MemberRole, Op, ReqFlags, Request, Response, Role, Status, VolumeId,
};
use keel_tests::cluster::{Pki, Storage, TEST_NODES};
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
    vol: VolumeId,
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
            vol: VOL,
        })
    }

    fn req(&mut self, op: Op, offset: u64, length: u32, payload: Vec<u8>) -> Request {
        let mut r = Request::new(op, self.next, self.vol, self.epoch);
        self.next += 1;
        r.offset = offset;
        r.length = length;
        r.crc = checksum(&payload);
        r.payload = payload.into();
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

/// Claims `VOL` on `c`'s connection at `generation` for client key `key`.
async fn claim(c: &mut Client, generation: u64, key: u32) -> Result<Status> {
    let mut r = c.req(Op::Claim, 0, 0, Vec::new());
    r.offset = generation;
    r.length = key;
    Ok(c.call(r).await?.status)
}

/// A client's new connection claims the volume: frames still arriving on its older connection
/// (left in a frozen server's socket buffer, sent before the client gave up on it) are
/// refused, never applied after the writes resent on the new one; an older generation cannot
/// claim back; another client key (another attachment on the same node) is independent.
#[test]
fn a_newer_claim_fences_the_clients_older_connection() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (pki, storage) = setup(dir.path())?;
    rt().block_on(async {
        let mut old = Client::new(&pki, Role::Node, "n1", &storage).await?;
        assert_eq!(claim(&mut old, 100, 7).await?, Status::Ok);
        assert_eq!(old.write(0, pattern(1, 4096)).await?, Status::Ok);
        let mut new = Client::new(&pki, Role::Node, "n1", &storage).await?;
        assert_eq!(claim(&mut new, 200, 7).await?, Status::Ok);
        assert_eq!(new.write(0, pattern(2, 4096)).await?, Status::Ok);
        // The old connection's late write and flush: refused, the data unchanged.
        assert_eq!(old.write(0, pattern(3, 4096)).await?, Status::NotPrimary);
        assert_eq!(old.simple(Op::Flush, 0, 0).await?, Status::NotPrimary);
        assert_eq!(old.read(0, 4096).await?.0, Status::NotPrimary);
        assert_eq!(new.read(0, 4096).await?, (Status::Ok, pattern(2, 4096)));
        // The old connection cannot claim back with an older generation.
        assert_eq!(claim(&mut old, 150, 7).await?, Status::NotPrimary);
        assert_eq!(new.write(4096, pattern(4, 4096)).await?, Status::Ok);
        // Another attachment of the volume on the same node (another key) is not fenced,
        // nor does it fence; a connection that never claims is not checked.
        let mut other = Client::new(&pki, Role::Node, "n1", &storage).await?;
        assert_eq!(claim(&mut other, 1, 8).await?, Status::Ok);
        assert_eq!(
            other.read(4096, 4096).await?,
            (Status::Ok, pattern(4, 4096))
        );
        assert_eq!(new.read(4096, 4096).await?, (Status::Ok, pattern(4, 4096)));
        let mut plain = Client::new(&pki, Role::Node, "n1", &storage).await?;
        assert_eq!(plain.read(0, 4096).await?, (Status::Ok, pattern(2, 4096)));
        // Only nodes claim.
        let mut peer = Client::new(&pki, Role::Storage, "s9", &storage).await?;
        assert_eq!(claim(&mut peer, 300, 7).await?, Status::Unauthorized);
        anyhow::Ok(())
    })
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
        // A volume the server does not hold is refused like one the node may not use: no
        // grant, no epoch, nothing said about whether it exists.
        let mut r = c.req(Op::Read, 0, 512, Vec::new());
        r.volume = VolumeId(0x999);
        let resp = c.call(r).await?;
        assert_eq!((resp.status, resp.epoch), (Status::Unauthorized, Epoch(0)));
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
            let node = TEST_NODES[t as usize % TEST_NODES.len()];
            let mut c = Client::new(&pki, Role::Node, node, &storage).await?;
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

/// One admin request with the certificate `<role>-<id>` (issued if needed).
async fn admin_as(
    pki: &Pki,
    role: Role,
    id: &str,
    storage: &Storage,
    req: &AdminRequest,
) -> Result<Result<Response, AdminError>> {
    pki.issue(role, id)?;
    let cfg = client_config(&TlsPaths::in_dir(&pki.dir, &format!("{role}-{id}")))?;
    Ok(admin_call(storage.addr, cfg, req.clone()).await)
}

/// One admin request as the controller `c1`: the status and the epoch it carries.
async fn admin(pki: &Pki, storage: &Storage, req: &AdminRequest) -> Result<(Status, Epoch)> {
    match admin_as(pki, Role::Controller, "c1", storage, req).await? {
        Ok(r) => {
            assert_eq!(r.status, Status::Ok);
            Ok((Status::Ok, r.epoch))
        }
        Err(AdminError::Status { status, epoch, .. }) => Ok((status, epoch)),
        Err(e) => Err(e.into()),
    }
}

fn create(volume: VolumeId, size: u64, role: MemberRole, epoch: u64) -> AdminRequest {
    AdminRequest::CreateCopy {
        volume,
        size,
        role,
        epoch: Epoch(epoch),
    }
}

fn set_membership(volume: VolumeId, role: MemberRole, epoch: u64) -> AdminRequest {
    membership(volume, role, epoch, epoch, &[])
}

/// Set membership with a writer epoch and (for a primary) in-sync mirrors; the access list of
/// these tests: nodes [`TEST_NODES`] read-write, `s1` the primary.
fn membership(
    volume: VolumeId,
    role: MemberRole,
    epoch: u64,
    writer_epoch: u64,
    mirrors: &[&Storage],
) -> AdminRequest {
    membership_rebuilding(volume, role, epoch, writer_epoch, mirrors, &[])
}

/// [`membership`] with mirrors being rebuilt.
fn membership_rebuilding(
    volume: VolumeId,
    role: MemberRole,
    epoch: u64,
    writer_epoch: u64,
    mirrors: &[&Storage],
    rebuilding: &[&Storage],
) -> AdminRequest {
    AdminRequest::SetMembership {
        volume,
        role,
        epoch: Epoch(epoch),
        writer_epoch: Epoch(writer_epoch),
        mirrors: mirrors.iter().map(|s| s.addr).collect(),
        rebuilding: rebuilding.iter().map(|s| s.addr).collect(),
        primary: Some("s1".into()),
        grants: TEST_NODES
            .iter()
            .map(|n| Grant {
                node: n.to_string(),
                access: Access::ReadWrite,
            })
            .collect(),
    }
}

fn copy_file(storage: &Storage, v: VolumeId) -> std::path::PathBuf {
    storage.data_dir.join("copies").join(format!("{v}.keel"))
}

#[test]
fn admin_created_copy_serves_nodes_and_create_is_idempotent() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(&dir.path().join("pki"))?;
    let storage = Storage::start(&pki, "s1", &dir.path().join("data"), &[])?;
    let v = VolumeId(0x52);
    rt().block_on(async {
        let req = create(v, 16 << 20, MemberRole::Primary, 3);
        assert_eq!(admin(&pki, &storage, &req).await?, (Status::Ok, Epoch(3)));
        assert!(copy_file(&storage, v).exists());
        // A new copy serves nobody: its access list is empty until a membership grants it.
        let mut c = Client::new(&pki, Role::Node, "n1", &storage).await?;
        c.vol = v;
        c.epoch = Epoch(3);
        assert_eq!(c.read(0, 512).await?.0, Status::Unauthorized);
        let grant = membership(v, MemberRole::Primary, 3, 3, &[]);
        assert_eq!(admin(&pki, &storage, &grant).await?, (Status::Ok, Epoch(3)));
        // A node at the copy's epoch reads and writes it.
        let data = pattern(7, 1 << 20);
        assert_eq!(c.write(15 << 20, data.clone()).await?, Status::Ok);
        let (st, back) = c.read(15 << 20, 1 << 20).await?;
        assert_eq!(st, Status::Ok);
        assert_eq!(checksum(&back), checksum(&data));
        assert_eq!(c.read(16 << 20, 512).await?.0, Status::OutOfRange);
        // The same create again (a controller retry) is ok and changes nothing.
        assert_eq!(admin(&pki, &storage, &req).await?, (Status::Ok, Epoch(3)));
        let (_, back) = c.read(15 << 20, 1 << 20).await?;
        assert_eq!(
            checksum(&back),
            checksum(&data),
            "a retried create keeps the data"
        );
        // An older epoch is a late retry: ok, the copy stays at its epoch.
        let older = create(v, 16 << 20, MemberRole::Primary, 2);
        assert_eq!(admin(&pki, &storage, &older).await?, (Status::Ok, Epoch(3)));
        // Another size conflicts with the existing copy.
        let other = create(v, 32 << 20, MemberRole::Primary, 3);
        assert_eq!(
            admin(&pki, &storage, &other).await?,
            (Status::BadRequest, Epoch(3))
        );
        // A newer epoch raises the existing copy's membership, like SetMembership.
        let newer = create(v, 16 << 20, MemberRole::Primary, 4);
        assert_eq!(admin(&pki, &storage, &newer).await?, (Status::Ok, Epoch(4)));
        assert_eq!(c.write(0, vec![1; 512]).await?, Status::StaleEpoch);
        c.epoch = Epoch(4);
        let (st, back) = c.read(15 << 20, 1 << 20).await?;
        assert_eq!(st, Status::Ok);
        assert_eq!(checksum(&back), checksum(&data));
        // A mirror copy does not serve nodes.
        let w = VolumeId(0x53);
        let mirror = create(w, 1 << 20, MemberRole::Mirror, 1);
        assert_eq!(
            admin(&pki, &storage, &mirror).await?,
            (Status::Ok, Epoch(1))
        );
        c.vol = w;
        c.epoch = Epoch(1);
        assert_eq!(c.read(0, 512).await?.0, Status::Unauthorized);
        let grant = membership(w, MemberRole::Mirror, 1, 1, &[]);
        assert_eq!(admin(&pki, &storage, &grant).await?, (Status::Ok, Epoch(1)));
        assert_eq!(c.read(0, 512).await?.0, Status::NotPrimary);
        // Malformed requests are refused before anything is sent.
        let bad = create(VolumeId(0x54), 1000, MemberRole::Primary, 1);
        assert!(matches!(
            admin_as(&pki, Role::Controller, "c1", &storage, &bad).await?,
            Err(AdminError::Invalid(_))
        ));
        anyhow::Ok(())
    })
}

#[test]
fn admin_ops_need_a_controller_and_data_ops_a_node() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (pki, storage) = setup(dir.path())?;
    rt().block_on(async {
        let ops = [
            create(VolumeId(0x60), 1 << 20, MemberRole::Primary, 1),
            AdminRequest::DeleteCopy { volume: VOL },
            set_membership(VOL, MemberRole::Mirror, 9),
            AdminRequest::Resize {
                volume: VOL,
                size: 128 << 20,
            },
        ];
        for role in [Role::Node, Role::Storage, Role::Admin] {
            for req in &ops {
                let r = admin_as(&pki, role, "x1", &storage, req).await?;
                assert!(
                    matches!(
                        r,
                        Err(AdminError::Status {
                            status: Status::Unauthorized,
                            ..
                        })
                    ),
                    "{role} {req:?}: {r:?}"
                );
            }
        }
        // Nothing happened: the copy is there, same size and epoch, the other was not made.
        assert!(copy_file(&storage, VOL).exists());
        assert!(!copy_file(&storage, VolumeId(0x60)).exists());
        let mut n = Client::new(&pki, Role::Node, "n1", &storage).await?;
        assert_eq!(n.read((64 << 20) - 512, 512).await?.0, Status::Ok);
        assert_eq!(n.read(64 << 20, 512).await?.0, Status::OutOfRange);
        assert_eq!(n.write(0, pattern(1, 4096)).await?, Status::Ok);
        // The controller may not do I/O; ping is for anyone.
        let mut c = Client::new(&pki, Role::Controller, "c1", &storage).await?;
        assert_eq!(c.read(0, 512).await?.0, Status::Unauthorized);
        assert_eq!(c.write(0, vec![9; 512]).await?, Status::Unauthorized);
        assert_eq!(c.simple(Op::Flush, 0, 0).await?, Status::Unauthorized);
        assert_eq!(c.simple(Op::Ping, 0, 0).await?, Status::Ok);
        let (_, d) = n.read(0, 4096).await?;
        assert_eq!(d, pattern(1, 4096), "the controller's write must not land");
        anyhow::Ok(())
    })
}

#[test]
fn set_membership_fences_older_epochs() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (pki, storage) = setup(dir.path())?;
    rt().block_on(async {
        let mut old = Client::new(&pki, Role::Node, "n1", &storage).await?;
        let a = pattern(10, 65536);
        assert_eq!(old.write(0, a.clone()).await?, Status::Ok);
        // The fence: epoch 2.
        let req = set_membership(VOL, MemberRole::Primary, 2);
        assert_eq!(admin(&pki, &storage, &req).await?, (Status::Ok, Epoch(2)));
        // The old attachment (same connection, epoch 1) is refused and its write does not land.
        let r = old.req(Op::Write, 0, 65536, pattern(11, 65536));
        let resp = old.call(r).await?;
        assert_eq!((resp.status, resp.epoch), (Status::StaleEpoch, Epoch(2)));
        assert_eq!(old.read(0, 512).await?.0, Status::StaleEpoch);
        assert_eq!(old.simple(Op::Flush, 0, 0).await?, Status::StaleEpoch);
        let mut new = Client::new(&pki, Role::Node, "n2", &storage).await?;
        new.epoch = Epoch(2);
        let (st, back) = new.read(0, 65536).await?;
        assert_eq!(st, Status::Ok);
        assert_eq!(
            checksum(&back),
            checksum(&a),
            "the fenced write must not land"
        );
        // Lower is refused with the current epoch; equal is ok (idempotent).
        let lower = set_membership(VOL, MemberRole::Primary, 1);
        assert_eq!(
            admin(&pki, &storage, &lower).await?,
            (Status::StaleEpoch, Epoch(2))
        );
        assert_eq!(admin(&pki, &storage, &req).await?, (Status::Ok, Epoch(2)));
        assert_eq!(new.write(65536, pattern(12, 4096)).await?, Status::Ok);
        // Demoted to mirror at epoch 3: a node at epoch 3 is told this is not a primary.
        let demote = set_membership(VOL, MemberRole::Mirror, 3);
        assert_eq!(
            admin(&pki, &storage, &demote).await?,
            (Status::Ok, Epoch(3))
        );
        new.epoch = Epoch(3);
        assert_eq!(new.read(0, 512).await?.0, Status::NotPrimary);
        // An absent copy.
        let absent = set_membership(VolumeId(0x999), MemberRole::Primary, 5);
        assert_eq!(
            admin(&pki, &storage, &absent).await?,
            (Status::UnknownVolume, Epoch(0))
        );
        anyhow::Ok(())
    })
}

/// A node keeps pipelined writes in flight while the controller moves the copy to a new epoch:
/// every write sent after the controller got its answer is refused, and every refused write
/// left no data behind, while every acknowledged one is intact.
#[test]
fn fencing_under_load_lets_no_refused_write_land() -> Result<()> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    const BLOCK: u64 = 4096;
    let dir = tempfile::tempdir()?;
    let (pki, storage) = setup(dir.path())?;
    let storage = Arc::new(storage);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let fenced = Arc::new(AtomicBool::new(false));
        let acks = Arc::new(AtomicU64::new(0));
        let mut c = Client::new(&pki, Role::Node, "n1", &storage).await?;
        let node = {
            let (fenced, acks) = (fenced.clone(), acks.clone());
            tokio::spawn(async move {
                let blocks = (64u64 << 20) / BLOCK;
                // Each block is written once: block -> status of its write.
                let mut outcome = std::collections::HashMap::new();
                let mut stale_after_fence = 0;
                let mut i = 0u64;
                while stale_after_fence < 16 && i + 8 <= blocks {
                    let mut batch = Vec::new();
                    // request id -> (block, sent after the controller had its answer)
                    let mut sent = std::collections::HashMap::new();
                    for _ in 0..8 {
                        let r = c.req(
                            Op::Write,
                            i * BLOCK,
                            BLOCK as u32,
                            pattern(1000 + i, BLOCK as usize),
                        );
                        sent.insert(r.request_id, (i, fenced.load(Ordering::SeqCst)));
                        Frame::Request(r).encode(&mut batch);
                        i += 1;
                    }
                    c.s.write_all(&batch).await?;
                    c.s.flush().await?;
                    for _ in 0..8 {
                        let resp = c.recv().await?;
                        let (block, after) = sent[&resp.request_id];
                        if after {
                            assert_eq!(
                                resp.status,
                                Status::StaleEpoch,
                                "block {block} sent after the fence"
                            );
                            stale_after_fence += 1;
                        }
                        if resp.status == Status::Ok {
                            acks.fetch_add(1, Ordering::SeqCst);
                        }
                        outcome.insert(block, resp.status);
                    }
                    // Paced, so that the blocks last until well after the fence.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                anyhow::ensure!(stale_after_fence >= 16, "the fence never came ({i} blocks)");
                anyhow::Ok(outcome)
            })
        };
        while acks.load(Ordering::SeqCst) < 64 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let req = set_membership(VOL, MemberRole::Primary, 2);
        assert_eq!(admin(&pki, &storage, &req).await?, (Status::Ok, Epoch(2)));
        fenced.store(true, Ordering::SeqCst);
        let outcome = node.await??;
        let acked = outcome.values().filter(|s| **s == Status::Ok).count();
        let stale = outcome
            .values()
            .filter(|s| **s == Status::StaleEpoch)
            .count();
        assert_eq!(acked + stale, outcome.len(), "only ok or stale epoch");
        assert!(acked >= 64 && stale >= 16, "acked {acked}, stale {stale}");
        let mut r = Client::new(&pki, Role::Node, "n2", &storage).await?;
        r.epoch = Epoch(2);
        for (block, status) in outcome {
            let (st, d) = r.read(block * BLOCK, BLOCK as u32).await?;
            assert_eq!(st, Status::Ok);
            if status == Status::Ok {
                assert_eq!(
                    d,
                    pattern(1000 + block, BLOCK as usize),
                    "acknowledged block {block}"
                );
            } else {
                assert!(d.iter().all(|&b| b == 0), "refused block {block} landed");
            }
        }
        anyhow::Ok(())
    })
}

#[test]
fn resize_grows_durably_and_never_shrinks() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (pki, mut storage) = setup(dir.path())?;
    let rt = rt();
    let grow = AdminRequest::Resize {
        volume: VOL,
        size: 128 << 20,
    };
    let tail = pattern(20, 1 << 20);
    rt.block_on(async {
        let mut c = Client::new(&pki, Role::Node, "n1", &storage).await?;
        assert_eq!(c.read(64 << 20, 512).await?.0, Status::OutOfRange);
        assert_eq!(admin(&pki, &storage, &grow).await?, (Status::Ok, Epoch(1)));
        // Past the old end, on the same connection.
        assert_eq!(c.write(100 << 20, tail.clone()).await?, Status::Ok);
        let (st, back) = c.read(100 << 20, 1 << 20).await?;
        assert_eq!(st, Status::Ok);
        assert_eq!(checksum(&back), checksum(&tail));
        let (st, zeros) = c.read((128 << 20) - 4096, 4096).await?;
        assert_eq!(st, Status::Ok);
        assert!(zeros.iter().all(|&b| b == 0));
        assert_eq!(c.read(128 << 20, 512).await?.0, Status::OutOfRange);
        // Same size again is ok; smaller is refused; the volume is unchanged.
        assert_eq!(admin(&pki, &storage, &grow).await?, (Status::Ok, Epoch(1)));
        let shrink = AdminRequest::Resize {
            volume: VOL,
            size: 32 << 20,
        };
        assert_eq!(
            admin(&pki, &storage, &shrink).await?,
            (Status::BadRequest, Epoch(1))
        );
        assert_eq!(c.read((128 << 20) - 512, 512).await?.0, Status::Ok);
        let absent = AdminRequest::Resize {
            volume: VolumeId(0x999),
            size: 1 << 20,
        };
        assert_eq!(
            admin(&pki, &storage, &absent).await?,
            (Status::UnknownVolume, Epoch(0))
        );
        // A new epoch too, then kill -9: size and epoch were durable when answered.
        let req = set_membership(VOL, MemberRole::Primary, 4);
        assert_eq!(admin(&pki, &storage, &req).await?, (Status::Ok, Epoch(4)));
        c.epoch = Epoch(4);
        assert_eq!(c.simple(Op::Flush, 0, 0).await?, Status::Ok);
        anyhow::Ok(())
    })?;
    storage.kill9();
    assert_eq!(
        std::fs::metadata(copy_file(&storage, VOL))?.len(),
        (1 << 20) + (128 << 20)
    );
    storage.restart()?;
    rt.block_on(async {
        let mut c = Client::new(&pki, Role::Node, "n1", &storage).await?;
        assert_eq!(c.read(0, 512).await?.0, Status::StaleEpoch);
        c.epoch = Epoch(4);
        let (st, back) = c.read(100 << 20, 1 << 20).await?;
        assert_eq!(st, Status::Ok);
        assert_eq!(checksum(&back), checksum(&tail));
        assert_eq!(c.read((128 << 20) - 512, 512).await?.0, Status::Ok);
        assert_eq!(c.read(128 << 20, 512).await?.0, Status::OutOfRange);
        assert_eq!(admin(&pki, &storage, &grow).await?, (Status::Ok, Epoch(4)));
        anyhow::Ok(())
    })
}

#[test]
fn delete_copy_refuses_later_io_and_is_idempotent() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (pki, mut storage) = setup(dir.path())?;
    let rt = rt();
    let delete = AdminRequest::DeleteCopy { volume: VOL };
    rt.block_on(async {
        let mut c = Client::new(&pki, Role::Node, "n1", &storage).await?;
        assert_eq!(c.write(0, pattern(30, 65536)).await?, Status::Ok);
        assert!(copy_file(&storage, VOL).exists());
        assert_eq!(
            admin(&pki, &storage, &delete).await?,
            (Status::Ok, Epoch(1))
        );
        assert!(!copy_file(&storage, VOL).exists(), "the file is gone");
        // The open connection's next requests find no volume (refused as for any volume the
        // server does not hold: no grant).
        assert_eq!(c.read(0, 512).await?.0, Status::Unauthorized);
        assert_eq!(c.write(0, vec![1; 512]).await?, Status::Unauthorized);
        assert_eq!(c.simple(Op::Flush, 0, 0).await?, Status::Unauthorized);
        // Retried: still ok. Other ops on it: unknown volume.
        assert_eq!(
            admin(&pki, &storage, &delete).await?,
            (Status::Ok, Epoch(0))
        );
        let req = set_membership(VOL, MemberRole::Primary, 2);
        assert_eq!(
            admin(&pki, &storage, &req).await?,
            (Status::UnknownVolume, Epoch(0))
        );
        anyhow::Ok(())
    })?;
    // Gone for good after a restart (the --create of `setup` is not repeated by restart).
    storage.kill9();
    storage.restart()?;
    rt.block_on(async {
        let mut c = Client::new(&pki, Role::Node, "n1", &storage).await?;
        assert_eq!(c.read(0, 512).await?.0, Status::Unauthorized);
        // Created again, it is a fresh, zeroed copy (with a fresh, empty access list).
        let req = create(VOL, 8 << 20, MemberRole::Primary, 5);
        assert_eq!(admin(&pki, &storage, &req).await?, (Status::Ok, Epoch(5)));
        let grant = membership(VOL, MemberRole::Primary, 5, 5, &[]);
        assert_eq!(admin(&pki, &storage, &grant).await?, (Status::Ok, Epoch(5)));
        c.epoch = Epoch(5);
        let (st, d) = c.read(0, 65536).await?;
        assert_eq!(st, Status::Ok);
        assert!(d.iter().all(|&b| b == 0), "a recreated copy starts empty");
        anyhow::Ok(())
    })
}

/// Two storage servers: `s1` will hold the primary, `s2` the mirror, both created empty (by
/// the controller `c1`) for `VOL` (64 MiB) at epoch 1, then put in a membership at epoch 2
/// whose writer attached at epoch 1 (mirror first, as the controller pushes).
fn replicated_pair(dir: &std::path::Path) -> Result<(Pki, Storage, Storage)> {
    let pki = Pki::new(&dir.join("pki"))?;
    let s1 = Storage::start(&pki, "s1", &dir.join("d1"), &[])?;
    let s2 = Storage::start(&pki, "s2", &dir.join("d2"), &[])?;
    rt().block_on(async {
        let c = create(VOL, 64 << 20, MemberRole::Mirror, 1);
        assert_eq!(admin(&pki, &s2, &c).await?, (Status::Ok, Epoch(1)));
        let c = create(VOL, 64 << 20, MemberRole::Primary, 1);
        assert_eq!(admin(&pki, &s1, &c).await?, (Status::Ok, Epoch(1)));
        let m = membership(VOL, MemberRole::Mirror, 2, 1, &[]);
        assert_eq!(admin(&pki, &s2, &m).await?, (Status::Ok, Epoch(2)));
        let p = membership(VOL, MemberRole::Primary, 2, 1, &[&s2]);
        assert_eq!(admin(&pki, &s1, &p).await?, (Status::Ok, Epoch(2)));
        anyhow::Ok(())
    })?;
    Ok((pki, s1, s2))
}

/// Reads `len` bytes at `offset` from `storage` in 1 MiB pieces.
async fn read_all(c: &mut Client, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let n = (len - out.len()).min(1 << 20);
        let (st, d) = c.read(offset + out.len() as u64, n as u32).await?;
        anyhow::ensure!(st == Status::Ok, "read answered {st}");
        out.extend_from_slice(&d);
    }
    Ok(out)
}

/// Every write, write-zeroes, discard and flush a node gets acknowledged by the primary is on
/// the mirror: pipelined writes, FUA, zeroing, a membership bump that keeps the writer, and a
/// kill -9 and restart of the primary (its mirror list is durable).
#[test]
fn replication_puts_every_acknowledged_write_on_the_mirror() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (pki, mut s1, s2) = replicated_pair(dir.path())?;
    const SPAN: usize = 8 << 20;
    let mut model = vec![0u8; SPAN];
    let rt = rt();
    rt.block_on(async {
        // The writer attached at epoch 1; the copy is at epoch 2: accepted.
        let mut n = Client::new(&pki, Role::Node, "n1", &s1).await?;
        // 64 pipelined writes of 64 KiB, some FUA.
        let mut sent = Vec::new();
        for i in 0..64u64 {
            let off = (i * 131072) % SPAN as u64;
            let data = pattern(100 + i, 65536);
            model[off as usize..off as usize + 65536].copy_from_slice(&data);
            let mut r = n.req(Op::Write, off, 65536, data);
            if i % 8 == 0 {
                r.flags = ReqFlags(ReqFlags::FUA);
            }
            n.send(&r).await?;
            sent.push(r.request_id);
        }
        for _ in 0..sent.len() {
            let resp = n.recv().await?;
            assert_eq!(resp.status, Status::Ok, "write {}", resp.request_id);
        }
        // Zeroing ops are replicated too.
        assert_eq!(n.simple(Op::WriteZeroes, 131072, 8192).await?, Status::Ok);
        model[131072..131072 + 8192].fill(0);
        assert_eq!(n.simple(Op::Discard, 262144, 65536).await?, Status::Ok);
        model[262144..262144 + 65536].fill(0);
        assert_eq!(n.simple(Op::Flush, 0, 0).await?, Status::Ok);
        // Reads are served by the primary.
        assert_eq!(
            checksum(&read_all(&mut n, 0, SPAN).await?),
            checksum(&model)
        );
        // The mirror holds the same bytes: read it as its primary would.
        let mut m = Client::new(&pki, Role::Storage, "s1", &s2).await?;
        m.epoch = Epoch(2);
        assert_eq!(
            checksum(&read_all(&mut m, 0, SPAN).await?),
            checksum(&model),
            "every acknowledged write is on the mirror"
        );
        // Another storage server's certificate (not the primary the mirror's access list
        // names) may not write into the mirror, at any epoch, and learns no epoch; nothing
        // it sent lands.
        let mut rogue = Client::new(&pki, Role::Storage, "s9", &s2).await?;
        for e in 0..6 {
            rogue.epoch = Epoch(e);
            for op in [Op::Write, Op::WriteZeroes, Op::Discard, Op::Read, Op::Flush] {
                let (off, len, payload) = match op {
                    Op::Write => (0, 4096, pattern(99, 4096)),
                    Op::Flush => (0, 0, Vec::new()),
                    _ => (0, 4096, Vec::new()),
                };
                let r = rogue.req(op, off, len, payload);
                let resp = rogue.call(r).await?;
                assert_eq!(
                    (resp.status, resp.epoch),
                    (Status::Unauthorized, Epoch(0)),
                    "{op:?} at epoch {e}"
                );
            }
        }
        assert_eq!(
            checksum(&read_all(&mut m, 0, SPAN).await?),
            checksum(&model),
            "nothing the other storage server sent landed on the mirror"
        );
        // Nodes are not served by the mirror; storage servers are not served by the primary.
        let mut nm = Client::new(&pki, Role::Node, "n1", &s2).await?;
        nm.epoch = Epoch(2);
        assert_eq!(nm.read(0, 512).await?.0, Status::NotPrimary);
        assert_eq!(nm.write(0, vec![1; 512]).await?, Status::NotPrimary);
        let mut sp = Client::new(&pki, Role::Storage, "s9", &s1).await?;
        sp.epoch = Epoch(2);
        assert_eq!(sp.write(0, vec![1; 512]).await?, Status::Unauthorized);

        // A membership bump that keeps the writer (epoch 3, writer epoch 1) does not disturb
        // it, and its writes still reach the mirror.
        let bump = membership(VOL, MemberRole::Mirror, 3, 1, &[]);
        assert_eq!(admin(&pki, &s2, &bump).await?, (Status::Ok, Epoch(3)));
        let bump = membership(VOL, MemberRole::Primary, 3, 1, &[&s2]);
        assert_eq!(admin(&pki, &s1, &bump).await?, (Status::Ok, Epoch(3)));
        let data = pattern(200, 65536);
        model[65536..131072].copy_from_slice(&data);
        assert_eq!(n.write(65536, data).await?, Status::Ok);
        m.epoch = Epoch(3);
        assert_eq!(
            checksum(&read_all(&mut m, 0, SPAN).await?),
            checksum(&model)
        );
        anyhow::Ok(())
    })?;
    // The primary's mirror list survives kill -9 and restart.
    s1.kill9();
    s1.restart()?;
    rt.block_on(async {
        let mut n = Client::new(&pki, Role::Node, "n1", &s1).await?;
        let data = pattern(300, 65536);
        model[0..65536].copy_from_slice(&data);
        assert_eq!(n.write(0, data).await?, Status::Ok);
        assert_eq!(n.simple(Op::Flush, 0, 0).await?, Status::Ok);
        let mut m = Client::new(&pki, Role::Storage, "s1", &s2).await?;
        m.epoch = Epoch(3);
        assert_eq!(
            checksum(&read_all(&mut m, 0, SPAN).await?),
            checksum(&model),
            "after the primary's restart, writes still reach the mirror"
        );
        anyhow::Ok(())
    })
}

/// The mirror takes replicated requests only at exactly its epoch: an older epoch (a replaced
/// primary) is `stale epoch` and lands nothing, a newer one `not primary`; and a primary whose
/// epoch is behind its mirror's cannot get a write acknowledged.
#[test]
fn mirror_refuses_replication_at_another_epoch() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (pki, s1, s2) = replicated_pair(dir.path())?;
    rt().block_on(async {
        let mut m = Client::new(&pki, Role::Storage, "s1", &s2).await?;
        m.epoch = Epoch(1);
        let r = m.req(Op::Write, 0, 4096, pattern(1, 4096));
        let resp = m.call(r).await?;
        assert_eq!((resp.status, resp.epoch), (Status::StaleEpoch, Epoch(2)));
        assert_eq!(m.simple(Op::Flush, 0, 0).await?, Status::StaleEpoch);
        m.epoch = Epoch(3);
        assert_eq!(m.write(0, pattern(2, 4096)).await?, Status::NotPrimary);
        m.epoch = Epoch(2);
        let (st, d) = m.read(0, 4096).await?;
        assert_eq!(st, Status::Ok);
        assert!(d.iter().all(|&b| b == 0), "no refused write landed");
        // The mirror moves on to epoch 4 without the primary (it was replaced): the old
        // primary's writes are refused by the mirror, so the node never gets `ok`.
        let ahead = membership(VOL, MemberRole::Mirror, 4, 1, &[]);
        assert_eq!(admin(&pki, &s2, &ahead).await?, (Status::Ok, Epoch(4)));
        let mut n = Client::new(&pki, Role::Node, "n1", &s1).await?;
        assert_eq!(n.write(0, pattern(3, 4096)).await?, Status::NotPrimary);
        assert_eq!(n.simple(Op::Flush, 0, 0).await?, Status::NotPrimary);
        m.epoch = Epoch(4);
        let (st, d) = m.read(0, 4096).await?;
        assert_eq!(st, Status::Ok);
        assert!(
            d.iter().all(|&b| b == 0),
            "the stale primary's write is not on the mirror"
        );
        anyhow::Ok(())
    })
}

/// kill -9 of the mirror: with no controller (the default handler refuses), the primary
/// answers `not primary` to writes and flushes, never `ok`; reads still work. Once the
/// membership drops the mirror, writes are acknowledged again.
#[test]
fn dead_mirror_makes_the_primary_refuse_rather_than_acknowledge() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (pki, s1, mut s2) = replicated_pair(dir.path())?;
    rt().block_on(async {
        let mut n = Client::new(&pki, Role::Node, "n1", &s1).await?;
        assert_eq!(n.write(0, pattern(1, 65536)).await?, Status::Ok);
        s2.kill9();
        let started = std::time::Instant::now();
        assert_eq!(n.write(65536, pattern(2, 65536)).await?, Status::NotPrimary);
        assert_eq!(n.simple(Op::Flush, 0, 0).await?, Status::NotPrimary);
        let mut r = n.req(Op::Write, 0, 4096, pattern(3, 4096));
        r.flags = ReqFlags(ReqFlags::FUA);
        assert_eq!(n.call(r).await?.status, Status::NotPrimary);
        assert_eq!(
            n.simple(Op::WriteZeroes, 0, 4096).await?,
            Status::NotPrimary
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "refusals come within the replication timeout"
        );
        let (st, d) = n.read(0, 65536).await?;
        assert_eq!(st, Status::Ok);
        assert_eq!(d.len(), 65536);
        // The controller drops the mirror (epoch 3, same writer): acknowledged again.
        let drop_mirror = membership(VOL, MemberRole::Primary, 3, 1, &[]);
        assert_eq!(
            admin(&pki, &s1, &drop_mirror).await?,
            (Status::Ok, Epoch(3))
        );
        let data = pattern(4, 65536);
        assert_eq!(n.write(65536, data.clone()).await?, Status::Ok);
        assert_eq!(n.simple(Op::Flush, 0, 0).await?, Status::Ok);
        assert_eq!(n.read(65536, 65536).await?.1, data);
        anyhow::Ok(())
    })
}

/// A writer fenced by a newer attachment (request epoch below the writer epoch) gets
/// `stale epoch`; membership bumps that keep the writer do not break it; a request ahead of
/// the copy is `not primary`.
#[test]
fn fenced_writer_gets_stale_epoch_but_membership_bumps_do_not_break_the_writer() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (pki, storage) = setup(dir.path())?;
    rt().block_on(async {
        let mut w = Client::new(&pki, Role::Node, "n1", &storage).await?;
        assert_eq!(w.write(0, pattern(1, 4096)).await?, Status::Ok);
        // Bumps (a mirror dropped, a promotion elsewhere...) keeping the writer of epoch 1.
        for e in [2, 3] {
            let bump = membership(VOL, MemberRole::Primary, e, 1, &[]);
            assert_eq!(admin(&pki, &storage, &bump).await?, (Status::Ok, Epoch(e)));
            assert_eq!(w.write(0, pattern(e, 4096)).await?, Status::Ok);
            assert_eq!(w.simple(Op::Flush, 0, 0).await?, Status::Ok);
            assert_eq!(w.read(0, 4096).await?, (Status::Ok, pattern(e, 4096)));
        }
        // The writer may also move to any epoch up to the copy's.
        w.epoch = Epoch(3);
        assert_eq!(w.write(0, pattern(9, 4096)).await?, Status::Ok);
        w.epoch = Epoch(4);
        assert_eq!(w.write(0, pattern(10, 4096)).await?, Status::NotPrimary);
        w.epoch = Epoch(1);
        // A new writer attaches at epoch 4: the old one is fenced, the new one served.
        let attach = membership(VOL, MemberRole::Primary, 4, 4, &[]);
        assert_eq!(
            admin(&pki, &storage, &attach).await?,
            (Status::Ok, Epoch(4))
        );
        let r = w.req(Op::Write, 0, 4096, pattern(11, 4096));
        let resp = w.call(r).await?;
        assert_eq!((resp.status, resp.epoch), (Status::StaleEpoch, Epoch(4)));
        w.epoch = Epoch(3);
        assert_eq!(w.simple(Op::Flush, 0, 0).await?, Status::StaleEpoch);
        let mut n = Client::new(&pki, Role::Node, "n2", &storage).await?;
        n.epoch = Epoch(4);
        assert_eq!(
            n.read(0, 4096).await?,
            (Status::Ok, pattern(9, 4096)),
            "the fenced write did not land"
        );
        // A later bump with a lower writer epoch does not un-fence the old writer.
        let bump = membership(VOL, MemberRole::Primary, 5, 1, &[]);
        assert_eq!(admin(&pki, &storage, &bump).await?, (Status::Ok, Epoch(5)));
        w.epoch = Epoch(3);
        assert_eq!(w.write(0, pattern(12, 4096)).await?, Status::StaleEpoch);
        assert_eq!(n.write(0, pattern(13, 4096)).await?, Status::Ok);
        anyhow::Ok(())
    })
}

/// Set membership's mirror list is validated: a malformed list closes the connection without
/// an answer (nothing changes); a mirror given a list is refused before sending.
#[test]
fn malformed_membership_lists_are_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (pki, storage) = setup(dir.path())?;
    rt().block_on(async {
        let mut c = Client::new(&pki, Role::Controller, "c1", &storage).await?;
        let mut r = c.req(Op::SetMembership, 0, MemberRole::Primary as u32, Vec::new());
        r.epoch = Epoch(2);
        r.payload = b"127.0.0.1:7500\nnot-an-address".to_vec().into();
        r.crc = checksum(&r.payload);
        c.send(&r).await?;
        assert!(c.recv().await.is_err(), "no answer to a malformed frame");
        let bad = membership(VOL, MemberRole::Mirror, 2, 1, &[&storage]);
        let r = admin_as(&pki, Role::Controller, "c1", &storage, &bad).await?;
        assert!(matches!(r, Err(AdminError::Invalid(_))), "{r:?}");
        let mut n = Client::new(&pki, Role::Node, "n1", &storage).await?;
        assert_eq!(
            n.write(0, pattern(1, 512)).await?,
            Status::Ok,
            "epoch unchanged"
        );
        anyhow::Ok(())
    })
}

/// A mirror that stops answering (SIGSTOP) fails the write after the replication timeout
/// (1 s by default): `not primary`, not `ok`, and not a hang.
#[test]
fn hung_mirror_times_out_into_not_primary() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (pki, s1, s2) = replicated_pair(dir.path())?;
    let r = rt().block_on(async {
        let mut n = Client::new(&pki, Role::Node, "n1", &s1).await?;
        assert_eq!(n.write(0, pattern(1, 4096)).await?, Status::Ok);
        s2.pause(true);
        let started = std::time::Instant::now();
        let st = tokio::time::timeout(Duration::from_secs(20), n.write(0, pattern(2, 4096)))
            .await
            .map_err(|_| anyhow::anyhow!("the write hung"))??;
        assert_eq!(st, Status::NotPrimary);
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(10),
            "{took:?}"
        );
        anyhow::Ok(())
    });
    s2.pause(false);
    r
}

/// R7 rebuild: a primary with 64 MiB of data gets an empty mirror as `rebuilding`; while a
/// node keeps writing overlapping ranges (across chunk boundaries), the primary copies every
/// chunk to the mirror in the background and forwards the new writes. Without a controller
/// the mirror stays rebuilding once copied (and keeps getting writes); its data must then
/// equal the primary's, including every write made during the rebuild. Prints the rate.
#[test]
fn rebuild_fills_a_new_mirror_while_writes_continue() -> Result<()> {
    const SIZE: usize = 64 << 20;
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(&dir.path().join("pki"))?;
    let s1 = Storage::start(&pki, "s1", &dir.path().join("d1"), &[])?;
    let s2 = Storage::start(&pki, "s2", &dir.path().join("d2"), &[])?;
    rt().block_on(async {
        let c = create(VOL, SIZE as u64, MemberRole::Primary, 1);
        assert_eq!(admin(&pki, &s1, &c).await?, (Status::Ok, Epoch(1)));
        let grant = membership(VOL, MemberRole::Primary, 1, 1, &[]);
        assert_eq!(admin(&pki, &s1, &grant).await?, (Status::Ok, Epoch(1)));
        let mut model = vec![0u8; SIZE];
        let mut n = Client::new(&pki, Role::Node, "n1", &s1).await?;
        for (i, piece) in model.chunks_mut(1 << 20).enumerate() {
            let data = pattern(1000 + i as u64, piece.len());
            piece.copy_from_slice(&data);
            assert_eq!(n.write((i << 20) as u64, data).await?, Status::Ok);
        }
        assert_eq!(n.simple(Op::Flush, 0, 0).await?, Status::Ok);
        // The mirror: a fresh, empty copy at the new epoch.
        let c = create(VOL, SIZE as u64, MemberRole::Mirror, 2);
        assert_eq!(admin(&pki, &s2, &c).await?, (Status::Ok, Epoch(2)));
        let m = membership(VOL, MemberRole::Mirror, 2, 1, &[]);
        assert_eq!(admin(&pki, &s2, &m).await?, (Status::Ok, Epoch(2)));
        let p = membership_rebuilding(VOL, MemberRole::Primary, 2, 1, &[], &[&s2]);
        let t0 = std::time::Instant::now();
        assert_eq!(admin(&pki, &s1, &p).await?, (Status::Ok, Epoch(2)));
        // Writes during the rebuild: 192 KiB at offsets straddling 4 MiB chunk boundaries and
        // overlapping each other, all acknowledged at once (the mirror is not in sync).
        let mut writes = 0u64;
        while writes < 100 || t0.elapsed() < Duration::from_millis(400) {
            let chunk = (writes * 7) % (SIZE as u64 >> 22);
            let off = ((chunk << 22) + (4 << 20) - 65536 * (writes % 3 + 1))
                .min(SIZE as u64 - 196608);
            let data = pattern(5000 + writes, 196608);
            model[off as usize..off as usize + data.len()].copy_from_slice(&data);
            assert_eq!(n.write(off, data).await?, Status::Ok, "write {writes}");
            writes += 1;
        }
        let writes_done = t0.elapsed();
        // The mirror converges to the model (the copy finished and no forwarded write was
        // lost or overwritten by an older chunk copy).
        let mut m = Client::new(&pki, Role::Storage, "s1", &s2).await?;
        m.epoch = Epoch(2);
        let want = checksum(&model);
        let mut synced = None;
        for _ in 0..300 {
            if checksum(&read_all(&mut m, 0, SIZE).await?) == want {
                synced = Some(t0.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let synced = synced.ok_or_else(|| anyhow::anyhow!("the mirror never matched"))?;
        assert_eq!(
            checksum(&read_all(&mut n, 0, SIZE).await?),
            want,
            "the primary holds the model"
        );
        println!(
            "rebuild of {} MiB with {writes} concurrent writes (for {writes_done:?}): mirror in sync after {synced:?} = {:.0} MiB/s (default throttle 200 MiB/s)",
            SIZE >> 20,
            (SIZE >> 20) as f64 / synced.as_secs_f64()
        );
        // Still rebuilding (no controller to put it in sync): later writes keep reaching it.
        let data = pattern(9999, 65536);
        model[4096..4096 + 65536].copy_from_slice(&data);
        assert_eq!(n.write(4096, data).await?, Status::Ok);
        assert_eq!(
            checksum(&read_all(&mut m, 0, SIZE).await?),
            checksum(&model),
            "writes after the copy are forwarded"
        );
        anyhow::Ok(())
    })
}

const CHUNK: u64 = 4 << 20;

/// CRC32C of every 4 MiB chunk of the first `size` bytes, read through `c`.
async fn chunk_sums(c: &mut Client, size: u64) -> Result<Vec<u32>> {
    let mut v = Vec::new();
    for off in (0..size).step_by(CHUNK as usize) {
        v.push(checksum(
            &read_all(c, off, CHUNK.min(size - off) as usize).await?,
        ));
    }
    Ok(v)
}

/// Polls (every 100 ms, at most 30 s) until the mirror's chunks equal the primary's at every
/// chunk but `except`; returns the mirror's sums.
async fn wait_for_chunks(
    n: &mut Client,
    m: &mut Client,
    size: u64,
    except: &[usize],
) -> Result<Vec<u32>> {
    let want = chunk_sums(n, size).await?;
    for _ in 0..300 {
        let got = chunk_sums(m, size).await?;
        if (0..want.len()).all(|i| except.contains(&i) || got[i] == want[i]) {
            return Ok(got);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the mirror never matched the primary")
}

/// SIGSTOP of `storage`, waiting until every thread of it is stopped (the signal is not
/// delivered at once: a write sent right after it could still be answered).
fn stop_and_wait(storage: &Storage) -> Result<()> {
    storage.pause(true);
    let pid = storage
        .pid()
        .ok_or_else(|| anyhow::anyhow!("not running"))?;
    for _ in 0..500 {
        let mut all = true;
        for t in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let stat = std::fs::read_to_string(t?.path().join("stat")).unwrap_or_default();
            // The state follows the command name, which is in parentheses.
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            all &= state.starts_with('T') || state.starts_with('t');
        }
        if all {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    anyhow::bail!("keel-storage {pid} did not stop")
}

/// Writes `bytes` straight into the mirror's copy file at volume offset `off` (behind its
/// server's back: a probe showing whether a resync rewrote that chunk).
fn poke_copy_file(storage: &Storage, off: u64, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(copy_file(storage, VOL))?;
    f.write_all_at(bytes, (1 << 20) + off)?;
    Ok(())
}

/// A primary and its in-sync mirror (created together) with 64 MiB written everywhere; the
/// mirror hangs (SIGSTOP): the write in flight fails (not acknowledged) and the mirror is
/// dropped at epoch 3, after which two more chunks are written. Returns the fully written
/// pair, with the mirror resumed but still at epoch 2: chunks 3, 8, 9 and 12 are dirty.
fn dropped_mirror_with_three_dirty_chunks(
    dir: &std::path::Path,
    probe: Option<(u64, &[u8])>,
) -> Result<(Pki, Storage, Storage)> {
    let (pki, s1, s2) = replicated_pair(dir)?;
    rt().block_on(async {
        let mut n = Client::new(&pki, Role::Node, "n1", &s1).await?;
        for i in 0..64u64 {
            assert_eq!(
                n.write(i << 20, pattern(7000 + i, 1 << 20)).await?,
                Status::Ok
            );
        }
        assert_eq!(n.simple(Op::Flush, 0, 0).await?, Status::Ok);
        let mut m = Client::new(&pki, Role::Storage, "s1", &s2).await?;
        m.epoch = Epoch(2);
        assert_eq!(
            chunk_sums(&mut m, 64 << 20).await?,
            chunk_sums(&mut n, 64 << 20).await?,
            "in sync before the drop"
        );
        stop_and_wait(&s2)?;
        // The forward fails: not acknowledged (no controller), but applied on the primary.
        let st = n.write(3 * CHUNK + 8192, pattern(1, 65536)).await?;
        assert_eq!(st, Status::NotPrimary);
        // The controller drops the mirror (epoch 3, same writer): writes go on without it.
        let drop_mirror = membership(VOL, MemberRole::Primary, 3, 1, &[]);
        assert_eq!(
            admin(&pki, &s1, &drop_mirror).await?,
            (Status::Ok, Epoch(3))
        );
        assert_eq!(
            n.write(9 * CHUNK - 4096, pattern(2, 8192)).await?,
            Status::Ok
        );
        assert_eq!(
            n.simple(Op::WriteZeroes, 12 * CHUNK, 1 << 20).await?,
            Status::Ok
        );
        assert_eq!(n.simple(Op::Flush, 0, 0).await?, Status::Ok);
        if let Some((off, bytes)) = probe {
            poke_copy_file(&s2, off, bytes)?;
        }
        s2.pause(false);
        anyhow::Ok(())
    })?;
    Ok((pki, s1, s2))
}

/// Puts `s2` back as a rebuilding mirror of `s1` at `epoch` (mirror first, as the controller
/// pushes).
async fn rejoin_as_rebuilding(pki: &Pki, s1: &Storage, s2: &Storage, epoch: u64) -> Result<()> {
    let m = membership(VOL, MemberRole::Mirror, epoch, 1, &[]);
    assert_eq!(admin(pki, s2, &m).await?, (Status::Ok, Epoch(epoch)));
    let p = membership_rebuilding(VOL, MemberRole::Primary, epoch, 1, &[], &[s2]);
    assert_eq!(admin(pki, s1, &p).await?, (Status::Ok, Epoch(epoch)));
    Ok(())
}

/// R7 incremental resync: a dropped mirror that returns with the same copy gets only the
/// chunks written since the drop (3, 8, 9, 12; the write whose forward failed included). A byte
/// changed behind the mirror's back in a clean chunk (6) survives the resync, which proves the
/// chunk was not copied; every other chunk, including writes made during the resync, ends up
/// equal on both copies.
#[test]
fn incremental_resync_copies_only_the_chunks_dirtied_since_the_drop() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let probe = vec![0xa5u8; 4096];
    let (pki, s1, s2) =
        dropped_mirror_with_three_dirty_chunks(dir.path(), Some((6 * CHUNK + 4096, &probe)))?;
    rt().block_on(async {
        let mut n = Client::new(&pki, Role::Node, "n1", &s1).await?;
        let mut m = Client::new(&pki, Role::Storage, "s1", &s2).await?;
        let t0 = std::time::Instant::now();
        rejoin_as_rebuilding(&pki, &s1, &s2, 4).await?;
        m.epoch = Epoch(4);
        // Writes during the resync (across chunk boundaries, never in chunk 6): forwarded, or
        // dirty and copied by a later pass.
        for i in 0..8u64 {
            let off = [0u64, 1, 10, 13][i as usize % 4] * CHUNK + CHUNK - 65536;
            assert_eq!(n.write(off, pattern(300 + i, 131072)).await?, Status::Ok);
        }
        let got = wait_for_chunks(&mut n, &mut m, 64 << 20, &[6]).await?;
        let took = t0.elapsed();
        let want = chunk_sums(&mut n, 64 << 20).await?;
        assert_ne!(got[6], want[6], "chunk 6 was never dirty: not copied");
        let (st, d) = m.read(6 * CHUNK + 4096, 4096).await?;
        assert_eq!((st, d), (Status::Ok, probe.clone()), "the probe is still there");
        println!("incremental resync of a 64 MiB volume (4 dirty chunks + 8 writes during it): mirror equal after {took:?}");
        // A write to chunk 6 is forwarded (the mirror stays rebuilding without a controller):
        // then every chunk is equal.
        assert_eq!(n.write(6 * CHUNK, pattern(400, 4 << 20)).await?, Status::Ok);
        assert_eq!(
            chunk_sums(&mut m, 64 << 20).await?,
            chunk_sums(&mut n, 64 << 20).await?
        );
        anyhow::Ok(())
    })
}

/// A dropped mirror whose copy was deleted and recreated (another incarnation) is resynced
/// whole: the new, empty copy ends up equal to the primary everywhere.
#[test]
fn a_recreated_mirror_copy_is_resynced_whole() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (pki, s1, s2) = dropped_mirror_with_three_dirty_chunks(dir.path(), None)?;
    rt().block_on(async {
        let del = AdminRequest::DeleteCopy { volume: VOL };
        assert_eq!(admin(&pki, &s2, &del).await?.0, Status::Ok);
        let c = create(VOL, 64 << 20, MemberRole::Mirror, 4);
        assert_eq!(admin(&pki, &s2, &c).await?, (Status::Ok, Epoch(4)));
        let grant = membership(VOL, MemberRole::Mirror, 4, 1, &[]);
        assert_eq!(admin(&pki, &s2, &grant).await?, (Status::Ok, Epoch(4)));
        let mut m = Client::new(&pki, Role::Storage, "s1", &s2).await?;
        m.epoch = Epoch(4);
        let (st, d) = m.read(0, 4096).await?;
        assert_eq!((st, d), (Status::Ok, vec![0u8; 4096]), "a new, empty copy");
        let mut n = Client::new(&pki, Role::Node, "n1", &s1).await?;
        let t0 = std::time::Instant::now();
        rejoin_as_rebuilding(&pki, &s1, &s2, 4).await?;
        let got = wait_for_chunks(&mut n, &mut m, 64 << 20, &[]).await?;
        assert_eq!(got, chunk_sums(&mut n, 64 << 20).await?);
        println!(
            "full resync of a 64 MiB volume: mirror equal after {:?}",
            t0.elapsed()
        );
        anyhow::Ok(())
    })
}

/// A primary restarted after the drop has no map (it lives in memory): the returning mirror
/// is resynced whole, so a byte changed behind its back in a clean chunk is overwritten. That
/// full pass starts a map, kept while the mirror is back in sync: when it is dropped again
/// (its write failing) and returns, only the chunk written since is copied (a probe in a clean
/// chunk survives), and the copies end up equal.
#[test]
fn after_a_primary_restart_the_resync_is_whole_then_incremental_again() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let probe = vec![0x5au8; 4096];
    let (pki, mut s1, s2) =
        dropped_mirror_with_three_dirty_chunks(dir.path(), Some((6 * CHUNK + 4096, &probe)))?;
    s1.kill9();
    s1.restart()?;
    rt().block_on(async {
        let mut n = Client::new(&pki, Role::Node, "n1", &s1).await?;
        let mut m = Client::new(&pki, Role::Storage, "s1", &s2).await?;
        rejoin_as_rebuilding(&pki, &s1, &s2, 4).await?;
        m.epoch = Epoch(4);
        let got = wait_for_chunks(&mut n, &mut m, 64 << 20, &[]).await?;
        assert_eq!(
            got,
            chunk_sums(&mut n, 64 << 20).await?,
            "the probe was overwritten"
        );
        // The controller puts the mirror in sync (epoch 5): writes reach both.
        let m5 = membership(VOL, MemberRole::Mirror, 5, 1, &[]);
        assert_eq!(admin(&pki, &s2, &m5).await?, (Status::Ok, Epoch(5)));
        let p5 = membership(VOL, MemberRole::Primary, 5, 1, &[&s2]);
        assert_eq!(admin(&pki, &s1, &p5).await?, (Status::Ok, Epoch(5)));
        assert_eq!(n.write(2 * CHUNK, pattern(50, 65536)).await?, Status::Ok);
        // Dropped again: its write fails, then the controller drops it (epoch 6).
        stop_and_wait(&s2)?;
        let st = n.write(14 * CHUNK + 4096, pattern(51, 8192)).await?;
        assert_eq!(st, Status::NotPrimary);
        let p6 = membership(VOL, MemberRole::Primary, 6, 1, &[]);
        assert_eq!(admin(&pki, &s1, &p6).await?, (Status::Ok, Epoch(6)));
        poke_copy_file(&s2, 7 * CHUNK, &probe)?;
        s2.pause(false);
        rejoin_as_rebuilding(&pki, &s1, &s2, 7).await?;
        m.epoch = Epoch(7);
        let got = wait_for_chunks(&mut n, &mut m, 64 << 20, &[7]).await?;
        let want = chunk_sums(&mut n, 64 << 20).await?;
        assert_ne!(got[7], want[7], "chunk 7 was never dirty: not copied");
        assert_eq!(m.read(7 * CHUNK, 4096).await?, (Status::Ok, probe.clone()));
        assert_eq!(n.write(7 * CHUNK, pattern(52, 4 << 20)).await?, Status::Ok);
        assert_eq!(
            chunk_sums(&mut m, 64 << 20).await?,
            chunk_sums(&mut n, 64 << 20).await?
        );
        anyhow::Ok(())
    })
}

/// Figures, not run by default (`cargo nextest run -p keel-tests --test storage
/// resync_figures --run-ignored only --no-capture`): a 1 GiB volume written in full, its mirror
/// dropped while 3 chunks are written, then resynced incrementally; then the mirror's copy is
/// recreated and resynced whole. Prints both times (until the last chunk to copy matches) and
/// checks every chunk afterwards.
#[test]
#[ignore]
fn resync_figures_for_a_1_gib_volume() -> Result<()> {
    const SIZE: u64 = 1 << 30;
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(&dir.path().join("pki"))?;
    let s1 = Storage::start(&pki, "s1", &dir.path().join("d1"), &[])?;
    let s2 = Storage::start(&pki, "s2", &dir.path().join("d2"), &[])?;
    rt().block_on(async {
        let c = create(VOL, SIZE, MemberRole::Mirror, 1);
        assert_eq!(admin(&pki, &s2, &c).await?, (Status::Ok, Epoch(1)));
        let c = create(VOL, SIZE, MemberRole::Primary, 1);
        assert_eq!(admin(&pki, &s1, &c).await?, (Status::Ok, Epoch(1)));
        let m = membership(VOL, MemberRole::Mirror, 2, 1, &[]);
        assert_eq!(admin(&pki, &s2, &m).await?, (Status::Ok, Epoch(2)));
        let p = membership(VOL, MemberRole::Primary, 2, 1, &[&s2]);
        assert_eq!(admin(&pki, &s1, &p).await?, (Status::Ok, Epoch(2)));
        let mut n = Client::new(&pki, Role::Node, "n1", &s1).await?;
        for i in 0..(SIZE >> 20) {
            assert_eq!(n.write(i << 20, pattern(i, 1 << 20)).await?, Status::Ok);
            if i % 32 == 31 {
                // Small flushes: one of 1 GiB takes longer than the replication timeout here.
                assert_eq!(n.simple(Op::Flush, 0, 0).await?, Status::Ok);
            }
        }
        stop_and_wait(&s2)?;
        assert_eq!(n.write(3 * CHUNK, pattern(1, 4096)).await?, Status::NotPrimary);
        let p = membership(VOL, MemberRole::Primary, 3, 1, &[]);
        assert_eq!(admin(&pki, &s1, &p).await?, (Status::Ok, Epoch(3)));
        assert_eq!(n.write(100 * CHUNK, pattern(2, 4096)).await?, Status::Ok);
        assert_eq!(n.write(255 * CHUNK, pattern(3, 4096)).await?, Status::Ok);
        s2.pause(false);
        let mut m = Client::new(&pki, Role::Storage, "s1", &s2).await?;
        // Until chunk `last` (the last one a pass copies) matches on both copies.
        async fn until_equal(n: &mut Client, m: &mut Client, last: u64) -> Result<()> {
            let want = checksum(&read_all(n, last * CHUNK, CHUNK as usize).await?);
            for _ in 0..6000 {
                if checksum(&read_all(m, last * CHUNK, CHUNK as usize).await?) == want {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            anyhow::bail!("chunk {last} never matched")
        }
        let t0 = std::time::Instant::now();
        rejoin_as_rebuilding(&pki, &s1, &s2, 4).await?;
        m.epoch = Epoch(4);
        until_equal(&mut n, &mut m, 255).await?;
        let incremental = t0.elapsed();
        assert_eq!(
            chunk_sums(&mut m, SIZE).await?,
            chunk_sums(&mut n, SIZE).await?
        );
        // The same volume, the mirror's copy recreated: full.
        let p = membership(VOL, MemberRole::Primary, 5, 1, &[]);
        assert_eq!(admin(&pki, &s1, &p).await?, (Status::Ok, Epoch(5)));
        let del = AdminRequest::DeleteCopy { volume: VOL };
        assert_eq!(admin(&pki, &s2, &del).await?.0, Status::Ok);
        let c = create(VOL, SIZE, MemberRole::Mirror, 6);
        assert_eq!(admin(&pki, &s2, &c).await?, (Status::Ok, Epoch(6)));
        let t0 = std::time::Instant::now();
        rejoin_as_rebuilding(&pki, &s1, &s2, 6).await?;
        m.epoch = Epoch(6);
        until_equal(&mut n, &mut m, 255).await?;
        let full = t0.elapsed();
        assert_eq!(
            chunk_sums(&mut m, SIZE).await?,
            chunk_sums(&mut n, SIZE).await?
        );
        println!(
            "1 GiB volume (256 chunks): incremental resync of 3 dirty chunks {incremental:?}, full resync {full:?} (throttle 200 MiB/s)"
        );
        anyhow::Ok(())
    })
}

/// 512-byte guests (a boot loader, fdisk, ext4 with 1 KiB blocks) write single sectors that are
/// not 4 KiB-aligned: writes, discards and write-zeroes of one or a few sectors are applied
/// exactly (neighbouring sectors intact) and forwarded to the mirror; those made while the
/// mirror is dropped mark their chunks dirty, and the incremental resync brings them over.
/// Checked sector by sector against a model of the volume's first 8 MiB, on both copies.
#[test]
fn sub_4k_requests_replicate_and_resync_sector_exactly() -> Result<()> {
    const SPAN: usize = 8 << 20;
    let dir = tempfile::tempdir()?;
    let (pki, s1, s2) = replicated_pair(dir.path())?;
    rt().block_on(async {
        let mut n = Client::new(&pki, Role::Node, "n1", &s1).await?;
        let mut m = Client::new(&pki, Role::Storage, "s1", &s2).await?;
        m.epoch = Epoch(2);
        let mut model = pattern(90, SPAN);
        for i in 0..(SPAN >> 20) as u64 {
            let at = (i << 20) as usize;
            assert_eq!(
                n.write(i << 20, model[at..at + (1 << 20)].to_vec()).await?,
                Status::Ok
            );
        }
        // (sector, sectors, op): at odd sectors, one straddling a 4 KiB boundary and one the
        // chunk boundary (sector 8191 of 4 MiB chunks).
        let ops = |seed: u64| {
            [
                (1u64, 1u32, Op::Write),
                (13, 3, Op::Write),
                (8191, 2, Op::Write),
                (27, 1, Op::Discard),
                (41, 3, Op::WriteZeroes),
                (8201 + seed, 1, Op::Write),
            ]
        };
        async fn apply(
            n: &mut Client,
            model: &mut [u8],
            ops: &[(u64, u32, Op)],
            seed: u64,
        ) -> Result<Vec<Status>> {
            let mut out = Vec::new();
            for (i, &(sector, count, op)) in ops.iter().enumerate() {
                let (off, len) = (sector * 512, count * 512);
                let range = off as usize..(off + u64::from(len)) as usize;
                let st = if op == Op::Write {
                    let d = pattern(seed * 100 + i as u64, len as usize);
                    model[range].copy_from_slice(&d);
                    n.write(off, d).await?
                } else {
                    model[range].fill(0);
                    n.simple(op, off, len).await?
                };
                out.push(st);
            }
            Ok(out)
        }
        let st = apply(&mut n, &mut model, &ops(0), 1).await?;
        assert!(st.iter().all(|s| *s == Status::Ok), "{st:?}");
        let same = |a: &[u8], b: &[u8], what: &str| {
            for (i, (x, y)) in a.chunks(512).zip(b.chunks(512)).enumerate() {
                assert_eq!(checksum(x), checksum(y), "{what}: sector {i}");
            }
        };
        same(&read_all(&mut n, 0, SPAN).await?, &model, "primary");
        same(
            &read_all(&mut m, 0, SPAN).await?,
            &model,
            "mirror (forwarded)",
        );

        // The mirror hangs and is dropped: sub-4K changes while it is away.
        stop_and_wait(&s2)?;
        let first = n.write(3 * 512, pattern(5, 512)).await?;
        assert_eq!(first, Status::NotPrimary, "the forward fails");
        model[3 * 512..4 * 512].copy_from_slice(&pattern(5, 512));
        let drop_mirror = membership(VOL, MemberRole::Primary, 3, 1, &[]);
        assert_eq!(
            admin(&pki, &s1, &drop_mirror).await?,
            (Status::Ok, Epoch(3))
        );
        let st = apply(&mut n, &mut model, &ops(7), 2).await?;
        assert!(st.iter().all(|s| *s == Status::Ok), "{st:?}");
        assert_eq!(n.simple(Op::Flush, 0, 0).await?, Status::Ok);
        s2.pause(false);
        rejoin_as_rebuilding(&pki, &s1, &s2, 4).await?;
        m.epoch = Epoch(4);
        wait_for_chunks(&mut n, &mut m, 64 << 20, &[]).await?;
        same(&read_all(&mut n, 0, SPAN).await?, &model, "primary after");
        same(
            &read_all(&mut m, 0, SPAN).await?,
            &model,
            "mirror after resync",
        );
        anyhow::Ok(())
    })
}
