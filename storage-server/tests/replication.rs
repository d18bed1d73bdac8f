//! In-process primary and mirror: the mirror-failure handler's answer decides whether an op
//! whose mirror failed is acknowledged, and a mirror being put in sync misses no acknowledged
//! write.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keel_proto::frame::checksum;
use keel_proto::io::{connect, read_frame, ClientStream};
use keel_proto::members::{Access, Grant, MemberList};
use keel_proto::tls::{client_config, server_config, TlsPaths};
use keel_proto::{Epoch, Frame, Op, Request, Role, Status, VolumeId};
use keel_storage::copy::{Copy, CopyRole};
use keel_storage::replicate::{
    BoxFuture, MirrorFailure, NewMembership, Refused, Replication, Replicator,
};
use keel_storage::server::{serve, serve_shared, serve_with, Stats};
use keel_storage::store::Store;
use tokio::io::AsyncWriteExt;

const VOL: VolumeId = VolumeId(0x77);

/// Plays the controller: drops the mirror from the primary's copy at a new epoch (keeping
/// the writer), then says so.
struct DropMirror {
    primary: Arc<Store>,
    calls: AtomicUsize,
    /// Refuse instead (as the controller does when this primary was replaced).
    refuse: AtomicBool,
}

impl MirrorFailure for DropMirror {
    fn mirror_failed(
        &self,
        volume: VolumeId,
        mirror: SocketAddr,
        epoch: Epoch,
    ) -> BoxFuture<'_, Result<NewMembership, Refused>> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.refuse.load(Ordering::SeqCst) {
                return Err(Refused {
                    reason: "this primary was replaced".into(),
                });
            }
            let c = self.primary.get(volume).ok_or(Refused {
                reason: "no copy".into(),
            })?;
            let left: Vec<SocketAddr> = c
                .mirrors()
                .iter()
                .copied()
                .filter(|&m| m != mirror)
                .collect();
            let next = Epoch(epoch.0 + 1);
            let (store, l) = (self.primary.clone(), left.clone());
            tokio::task::spawn_blocking(move || {
                let c = store.get(volume).expect("copy");
                c.set_membership(CopyRole::Primary, next, c.writer_epoch(), &l)
            })
            .await
            .expect("join")
            .map_err(|e| Refused {
                reason: e.to_string(),
            })?;
            Ok(NewMembership {
                epoch: next,
                mirrors: left,
            })
        })
    }
}

/// The access list of these tests: node `n` read-write, `p` the primary (docs/security.md).
fn allow(c: Arc<Copy>) -> Arc<Copy> {
    let list = MemberList {
        primary: Some("p".into()),
        grants: vec![Grant {
            node: "n".into(),
            access: Access::ReadWrite,
        }],
        ..MemberList::default()
    };
    c.set_members(c.role(), c.epoch(), c.writer_epoch(), &list)
        .expect("access list");
    c
}

async fn start(
    pki: &std::path::Path,
    id: &str,
    store: Arc<Store>,
    replication: Option<Replication>,
) -> SocketAddr {
    keel_proto::pki::issue(pki, Role::Storage, id, &[]).expect("issue");
    let paths = TlsPaths::in_dir(pki, &format!("storage-{id}"));
    let tls = server_config(&paths).expect("tls");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stats = Arc::new(Stats::default());
    tokio::spawn(async move {
        match replication {
            Some(mut r) => {
                r.client_tls = Some(client_config(&paths).expect("client tls"));
                serve_with(listener, store, tls, stats, r).await
            }
            None => serve(listener, store, tls, stats).await,
        }
    });
    addr
}

async fn call(s: &mut ClientStream, r: Request) -> (Status, Epoch) {
    s.write_all(&Frame::Request(r).to_bytes())
        .await
        .expect("send");
    s.flush().await.expect("flush");
    let mut buf = Vec::new();
    match read_frame(s, &mut buf).await.expect("read") {
        Some(Frame::Response(r)) => (r.status, r.epoch),
        other => panic!("{other:?}"),
    }
}

fn write(id: u64, epoch: u64, offset: u64, data: Vec<u8>) -> Request {
    let mut r = Request::new(Op::Write, id, VOL, Epoch(epoch));
    r.offset = offset;
    r.length = data.len() as u32;
    r.crc = checksum(&data);
    r.payload = data.into();
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_mirror_lets_the_op_be_acknowledged_a_refused_one_does_not() {
    let d = tempfile::tempdir().expect("tmp");
    let pki = d.path().join("pki");
    keel_proto::pki::init_ca(&pki).expect("ca");
    // Two mirrors (no replication of their own) and the primary with the handler.
    let m1 = Arc::new(Store::open(&d.path().join("m1")).expect("store"));
    let m2 = Arc::new(Store::open(&d.path().join("m2")).expect("store"));
    let a1 = start(&pki, "m1", m1.clone(), None).await;
    let a2 = start(&pki, "m2", m2.clone(), None).await;
    let primary = Arc::new(Store::open(&d.path().join("p")).expect("store"));
    let handler = Arc::new(DropMirror {
        primary: primary.clone(),
        calls: AtomicUsize::new(0),
        refuse: AtomicBool::new(false),
    });
    let repl = Replication {
        client_tls: None,
        timeout: Duration::from_millis(500),
        failure: handler.clone(),
        ..Replication::default()
    };
    let paddr = start(&pki, "p", primary.clone(), Some(repl)).await;
    for m in [&m1, &m2] {
        allow(
            m.create(VOL, 8 << 20, CopyRole::Mirror, Epoch(2))
                .expect("mirror copy"),
        );
    }
    let p = allow(
        primary
            .create(VOL, 8 << 20, CopyRole::Primary, Epoch(1))
            .expect("primary copy"),
    );
    p.set_membership(CopyRole::Primary, Epoch(2), Epoch(1), &[a1, a2])
        .expect("membership");

    keel_proto::pki::issue(&pki, Role::Node, "n", &[]).expect("issue");
    let ncfg = client_config(&TlsPaths::in_dir(&pki, "node-n")).expect("tls");
    let (mut n, _) = connect(paddr, ncfg, Role::Storage).await.expect("connect");
    // Both mirrors answer: acknowledged, on both.
    assert_eq!(
        call(&mut n, write(1, 1, 0, vec![7; 4096])).await.0,
        Status::Ok
    );
    let read = |s: &Store| {
        let mut b = vec![0u8; 4096];
        s.get(VOL).expect("copy").read(0, &mut b).expect("read");
        b
    };
    assert_eq!(read(&m1), vec![7; 4096]);
    assert_eq!(read(&m2), vec![7; 4096]);
    assert_eq!(handler.calls.load(Ordering::SeqCst), 0);

    // m2 moves on (epoch 5) without the primary: it refuses the primary's epoch 2. The handler
    // drops it (epoch 3, same writer), and the write is acknowledged without it.
    m2.get(VOL)
        .expect("copy")
        .set_membership(CopyRole::Mirror, Epoch(5), Epoch(1), &[])
        .expect("m2 ahead");
    assert_eq!(
        call(&mut n, write(2, 1, 0, vec![8; 4096])).await.0,
        Status::Ok
    );
    assert_eq!(handler.calls.load(Ordering::SeqCst), 1);
    assert_eq!(*p.mirrors(), vec![a1]);
    assert_eq!(p.epoch(), Epoch(3));
    assert_eq!(read(&m1), vec![8; 4096]);
    assert_eq!(
        read(&m2),
        vec![7; 4096],
        "the refused mirror did not take it"
    );

    // m1 at epoch 3 as well: still replicated (the primary now sends epoch 3).
    m1.get(VOL)
        .expect("copy")
        .set_membership(CopyRole::Mirror, Epoch(3), Epoch(1), &[])
        .expect("m1 follows");
    assert_eq!(
        call(&mut n, write(3, 1, 0, vec![9; 4096])).await.0,
        Status::Ok
    );
    assert_eq!(read(&m1), vec![9; 4096]);

    // A handler that refuses (this primary was replaced): not primary, never ok.
    handler.refuse.store(true, Ordering::SeqCst);
    m1.get(VOL)
        .expect("copy")
        .set_membership(CopyRole::Mirror, Epoch(9), Epoch(1), &[])
        .expect("m1 ahead");
    let flush = Request::new(Op::Flush, 5, VOL, Epoch(1));
    assert_eq!(
        call(&mut n, write(4, 1, 0, vec![10; 4096])).await.0,
        Status::NotPrimary
    );
    assert_eq!(call(&mut n, flush).await.0, Status::NotPrimary);
    assert_eq!(handler.calls.load(Ordering::SeqCst), 3);
    assert_eq!(*p.mirrors(), vec![a1], "nothing dropped");
    assert_eq!(p.epoch(), Epoch(3));
    assert_eq!(read(&m1), vec![9; 4096], "the mirror refused it");

    // A mirror nobody listens at (connection refused): the handler drops it.
    handler.refuse.store(false, Ordering::SeqCst);
    let gone = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    p.set_membership(CopyRole::Primary, Epoch(10), Epoch(1), &[gone])
        .expect("membership");
    assert_eq!(
        call(&mut n, write(6, 1, 0, vec![11; 4096])).await.0,
        Status::Ok
    );
    assert!(p.mirrors().is_empty());
    assert_eq!(p.epoch(), Epoch(11));
    assert_eq!(handler.calls.load(Ordering::SeqCst), 4);
}

/// Plays the controller putting a rebuilt mirror in sync: pushes the new epoch to the mirror
/// first, then waits for `release` before pushing it (with the mirror in sync) to the primary.
/// Refuses to drop mirrors (the epoch the primary names has moved on).
struct SyncMirrorFirst {
    primary: Arc<Store>,
    mirror: Arc<Store>,
    asked: tokio::sync::Notify,
    release: tokio::sync::Notify,
}

impl MirrorFailure for SyncMirrorFirst {
    fn mirror_failed(
        &self,
        _volume: VolumeId,
        _mirror: SocketAddr,
        epoch: Epoch,
    ) -> BoxFuture<'_, Result<NewMembership, Refused>> {
        Box::pin(async move {
            Err(Refused {
                reason: format!("epoch {epoch} is old"),
            })
        })
    }

    fn syncs(&self) -> bool {
        true
    }

    fn mirror_synced(
        &self,
        volume: VolumeId,
        mirror: SocketAddr,
        epoch: Epoch,
    ) -> BoxFuture<'_, Result<NewMembership, Refused>> {
        Box::pin(async move {
            let next = Epoch(epoch.0 + 1);
            let m = self.mirror.get(volume).expect("mirror copy");
            m.set_membership(CopyRole::Mirror, next, Epoch(1), &[])
                .expect("mirror first");
            self.asked.notify_one();
            self.release.notified().await;
            let p = self.primary.get(volume).expect("primary copy");
            p.set_membership(CopyRole::Primary, next, Epoch(1), &[mirror])
                .expect("then the primary");
            Ok(NewMembership {
                epoch: next,
                mirrors: vec![mirror],
            })
        })
    }
}

/// R7: between the controller putting a rebuilt mirror in sync (the mirror at the new epoch
/// already) and the primary learning it, a write the mirror refuses is answered `not primary`,
/// never `ok` without it; once the primary runs the new membership, writes are acknowledged
/// with the mirror. Without that rule the mirror would be in sync missing an acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_missed_by_a_mirror_being_put_in_sync_is_not_acknowledged() {
    let d = tempfile::tempdir().expect("tmp");
    let pki = d.path().join("pki");
    keel_proto::pki::init_ca(&pki).expect("ca");
    let mirror = Arc::new(Store::open(&d.path().join("m")).expect("store"));
    let maddr = start(&pki, "m", mirror.clone(), None).await;
    let primary = Arc::new(Store::open(&d.path().join("p")).expect("store"));
    let handler = Arc::new(SyncMirrorFirst {
        primary: primary.clone(),
        mirror: mirror.clone(),
        asked: tokio::sync::Notify::new(),
        release: tokio::sync::Notify::new(),
    });
    keel_proto::pki::issue(&pki, Role::Storage, "p", &[]).expect("issue");
    let paths = TlsPaths::in_dir(&pki, "storage-p");
    let repl = Arc::new(Replicator::new(Replication {
        client_tls: Some(client_config(&paths).expect("client tls")),
        timeout: Duration::from_millis(1000),
        failure: handler.clone(),
        ..Replication::default()
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let paddr = listener.local_addr().expect("addr");
    let tls = server_config(&paths).expect("tls");
    tokio::spawn(serve_shared(
        listener,
        primary.clone(),
        tls,
        Arc::new(Stats::default()),
        repl.clone(),
    ));
    allow(
        mirror
            .create(VOL, 8 << 20, CopyRole::Mirror, Epoch(2))
            .expect("mirror copy"),
    );
    let p = allow(
        primary
            .create(VOL, 8 << 20, CopyRole::Primary, Epoch(1))
            .expect("primary copy"),
    );
    p.write(0, &[5; 4096]).expect("data");
    p.set_membership_rebuilding(CopyRole::Primary, Epoch(2), Epoch(1), &[], &[maddr])
        .expect("membership");
    repl.reconcile_rebuilds(&p);
    // The copy pass ends and the primary asks; the "controller" has pushed the mirror only.
    handler.asked.notified().await;
    keel_proto::pki::issue(&pki, Role::Node, "n", &[]).expect("issue");
    let ncfg = client_config(&TlsPaths::in_dir(&pki, "node-n")).expect("tls");
    let (mut n, _) = connect(paddr, ncfg, Role::Storage).await.expect("connect");
    assert_eq!(
        call(&mut n, write(1, 1, 8192, vec![6; 4096])).await.0,
        Status::NotPrimary,
        "the mirror refused it (stale epoch): not acknowledged"
    );
    handler.release.notify_one();
    for _ in 0..100 {
        if p.epoch() == Epoch(3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!((p.epoch(), (*p.mirrors()).clone()), (Epoch(3), vec![maddr]));
    assert_eq!(
        call(&mut n, write(2, 1, 8192, vec![7; 4096])).await.0,
        Status::Ok
    );
    let mut b = vec![0u8; 12288];
    mirror
        .get(VOL)
        .expect("copy")
        .read(0, &mut b)
        .expect("read");
    assert_eq!(&b[..4096], &[5; 4096][..], "copied by the rebuild");
    assert_eq!(
        &b[8192..],
        &[7; 4096][..],
        "the acknowledged write is on the mirror"
    );
}

/// R7 across a primary restart: the primary asked to put its rebuilding mirror in sync, the
/// controller said yes and pushed the mirror first (epoch 3), and the primary crashed before
/// its own push. Restarted at epoch 2 with the mirror still `rebuilding` on its disk, it
/// cannot know that the mirror is in sync, so a write the mirror misses (it refuses epoch 2)
/// is acknowledged only if the controller drops the mirror; while the controller refuses (it
/// had put the mirror in sync), the answer is `not primary`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_primary_acknowledges_no_write_its_rebuilding_mirror_missed_unless_dropped() {
    let d = tempfile::tempdir().expect("tmp");
    let pki = d.path().join("pki");
    keel_proto::pki::init_ca(&pki).expect("ca");
    let mirror = Arc::new(Store::open(&d.path().join("m")).expect("store"));
    let maddr = start(&pki, "m", mirror.clone(), None).await;
    allow(
        mirror
            .create(VOL, 8 << 20, CopyRole::Mirror, Epoch(3))
            .expect("mirror copy"),
    );
    {
        // Before the crash.
        let before = Store::open(&d.path().join("p")).expect("store");
        let p = allow(
            before
                .create(VOL, 8 << 20, CopyRole::Primary, Epoch(1))
                .expect("primary copy"),
        );
        p.set_membership_rebuilding(CopyRole::Primary, Epoch(2), Epoch(1), &[], &[maddr])
            .expect("membership");
    }
    let primary = Arc::new(Store::open(&d.path().join("p")).expect("reopen"));
    let handler = Arc::new(DropMirror {
        primary: primary.clone(),
        calls: AtomicUsize::new(0),
        refuse: AtomicBool::new(true),
    });
    let repl = Replication {
        client_tls: None,
        timeout: Duration::from_millis(1000),
        failure: handler.clone(),
        ..Replication::default()
    };
    let paddr = start(&pki, "p", primary.clone(), Some(repl)).await;
    keel_proto::pki::issue(&pki, Role::Node, "n", &[]).expect("issue");
    let ncfg = client_config(&TlsPaths::in_dir(&pki, "node-n")).expect("tls");
    let (mut n, _) = connect(paddr, ncfg, Role::Storage).await.expect("connect");
    assert_eq!(
        call(&mut n, write(1, 1, 8192, vec![6; 4096])).await.0,
        Status::NotPrimary,
        "the mirror (in sync at epoch 3) missed it: not acknowledged while the controller refuses"
    );
    assert!(
        handler.calls.load(Ordering::SeqCst) >= 1,
        "the controller was asked"
    );
    // Had the controller not put it in sync, it drops the mirror and the write is acknowledged.
    handler.refuse.store(false, Ordering::SeqCst);
    assert_eq!(
        call(&mut n, write(2, 1, 8192, vec![7; 4096])).await.0,
        Status::Ok
    );
    let p = primary.get(VOL).expect("copy");
    assert_eq!(p.epoch(), Epoch(3));
    assert!(p.mirrors().is_empty() && p.rebuilding().is_empty());
}
