//! keel-vhost driven by the Rust test VMM over a real vhost-user socket (no QEMU), with a real
//! keel-storage behind it over mutual TLS.

use std::time::Duration;

use anyhow::{Context, Result};
use keel_tests::cluster::{
    control_args, vhost_status_server, DataPath, Pki, Storage, Vhost, VhostOptions, VhostStatus,
};
use keel_tests::vmm::*;

const SIZE_BYTES: u64 = 64 << 20;
const SECTORS: u64 = SIZE_BYTES / 512;

struct Setup {
    _dir: tempfile::TempDir,
    _pki: Pki,
    storage: Storage,
    vhost: Vhost,
}

fn setup(num_queues: u16, read_only: bool) -> Result<Setup> {
    setup_with(num_queues, read_only, &[])
}

fn setup_with(num_queues: u16, read_only: bool, extra: &[&str]) -> Result<Setup> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(&dir.path().join("pki"))?;
    let storage = Storage::start(&pki, "s1", &dir.path().join("data"), &["abc123:64MiB"])?;
    let vhost = Vhost::start(
        &pki,
        VhostOptions {
            socket: dir.path().join("blk.sock"),
            server: storage.addr,
            volume: "abc123".into(),
            size: "64MiB".into(),
            epoch: 1,
            node_id: "n1".into(),
            num_queues,
            read_only,
            extra: ["--request-timeout-ms", "2000"]
                .iter()
                .chain(extra)
                .map(|a| a.to_string())
                .collect(),
        },
    )?;
    Ok(Setup {
        _dir: dir,
        _pki: pki,
        storage,
        vhost,
    })
}

fn opts(num_queues: u16) -> VmmOptions {
    VmmOptions {
        num_queues,
        event_idx: true,
        indirect_desc: true,
        ..VmmOptions::default()
    }
}

fn crc(d: &[u8]) -> u32 {
    crc32c::crc32c(d)
}

#[test]
fn config_features_and_every_request_type() -> Result<()> {
    let s = setup(2, false)?;
    let mut vmm = TestVmm::connect(&s.vhost.opts.socket, opts(2))?;
    let cfg = vmm.config();
    assert_eq!(cfg.capacity, SECTORS);
    assert_eq!(cfg.num_queues, 2);
    // 512-byte logical blocks by default, 4 KiB physical blocks (2^3 logical), aligned at 0,
    // minimum I/O one physical block; discards aligned to physical blocks.
    assert_eq!(cfg.blk_size, 512);
    assert_eq!(cfg.physical_block_exp, 3);
    assert_eq!(cfg.alignment_offset, 0);
    assert_eq!(cfg.min_io_size, 8);
    assert_eq!(cfg.discard_sector_alignment, 8);
    assert!(cfg.seg_max >= 1);
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_BLK_F_MQ,
    ] {
        assert!(vmm.device_features() & (1 << bit) != 0, "feature bit {bit}");
    }
    assert_eq!(vmm.device_features() & (1 << VIRTIO_BLK_F_RO), 0);

    // Read-after-write with content checksums, on both queues, sizes from 512 B to 1 MiB.
    let mut expect = Vec::new();
    for (i, len) in [512usize, 4096, 65536, 1 << 20].into_iter().enumerate() {
        let sector = (i as u64) * 4096;
        let data = pattern(7, sector, len);
        assert_eq!(vmm.write((i % 2) as u16, sector, &data)?, VIRTIO_BLK_S_OK);
        expect.push((sector, len, crc(&data)));
    }
    for (i, (sector, len, c)) in expect.iter().enumerate() {
        let (st, d) = vmm.read(((i + 1) % 2) as u16, *sector, *len)?;
        assert_eq!(st, VIRTIO_BLK_S_OK);
        assert_eq!(crc(&d), *c, "sector {sector}");
    }
    // A request larger than one wire frame (6 MiB > 4 MiB) is split and reassembled.
    let big = pattern(9, 20_000, 6 << 20);
    assert_eq!(vmm.write(0, 20_000, &big)?, VIRTIO_BLK_S_OK);
    let (st, d) = vmm.read(1, 20_000, 6 << 20)?;
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert_eq!(crc(&d), crc(&big));
    // Never-written space reads as zeros.
    let (st, d) = vmm.read(0, SECTORS - 8, 4096)?;
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert!(d.iter().all(|&b| b == 0));
    assert_eq!(vmm.flush(0)?, VIRTIO_BLK_S_OK);
    // Discard and write-zeroes read back as zeros; neighbours are intact.
    let data = pattern(3, 50_000, 32768);
    assert_eq!(vmm.write(0, 50_000, &data)?, VIRTIO_BLK_S_OK);
    assert_eq!(vmm.discard(0, 50_008, 8)?, VIRTIO_BLK_S_OK);
    assert_eq!(vmm.write_zeroes(1, 50_032, 8, false)?, VIRTIO_BLK_S_OK);
    assert_eq!(vmm.write_zeroes(1, 50_048, 8, true)?, VIRTIO_BLK_S_OK);
    let (_, d) = vmm.read(0, 50_000, 32768)?;
    assert_eq!(&d[..4096], &data[..4096]);
    assert!(d[4096..8192].iter().all(|&b| b == 0));
    assert_eq!(&d[8192..16384], &data[8192..16384]);
    assert!(d[16384..20480].iter().all(|&b| b == 0));
    assert_eq!(&d[20480..24576], &data[20480..24576]);
    assert!(d[24576..28672].iter().all(|&b| b == 0));
    assert_eq!(&d[28672..], &data[28672..]);
    // GET_ID: the volume id as serial.
    let (st, id) = vmm.get_id(0)?;
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert_eq!(id, b"abc123");
    // Out of range: IOERR, and a read crossing the end too.
    assert_eq!(vmm.read(0, SECTORS, 512)?.0, VIRTIO_BLK_S_IOERR);
    assert_eq!(vmm.read(0, SECTORS - 1, 1024)?.0, VIRTIO_BLK_S_IOERR);
    assert_eq!(vmm.write(0, SECTORS, &[0u8; 512])?, VIRTIO_BLK_S_IOERR);
    assert_eq!(vmm.discard(0, SECTORS - 1, 8)?, VIRTIO_BLK_S_IOERR);
    // Unknown request type: UNSUPP.
    assert_eq!(vmm.request(0, 99, 0, &[], 0)?.status, VIRTIO_BLK_S_UNSUPP);
    Ok(())
}

/// What a 512-byte-sector guest does (a boot loader, fdisk, a filesystem with 1 KiB blocks):
/// requests at sectors that are not 4 KiB-aligned, of lengths that are not multiples of 4 KiB,
/// read, write, discard and write-zeroes, each checked against a model of the disk.
#[test]
fn sub_4k_requests_at_512_byte_sectors() -> Result<()> {
    let s = setup(1, false)?;
    let mut vmm = TestVmm::connect(&s.vhost.opts.socket, opts(1))?;
    assert_eq!(vmm.config().blk_size, 512);
    const BASE: u64 = 70_000; // sectors; 70_000 * 512 is 4 KiB-aligned, so +1..+7 are not
    const LEN: usize = 64 * 512;
    let mut model = pattern(11, BASE, LEN);
    assert_eq!(vmm.write(0, BASE, &model)?, VIRTIO_BLK_S_OK);
    let put = |model: &mut Vec<u8>, sector: u64, data: &[u8]| {
        let at = ((sector - BASE) * 512) as usize;
        model[at..at + data.len()].copy_from_slice(data);
    };
    // Writes of 1, 3 and 9 sectors at odd sectors (one straddles a 4 KiB boundary).
    for (i, (sector, n)) in [(BASE + 1, 1u64), (BASE + 5, 3), (BASE + 13, 9)]
        .into_iter()
        .enumerate()
    {
        let d = pattern(20 + i as u64, sector, (n * 512) as usize);
        assert_eq!(vmm.write(0, sector, &d)?, VIRTIO_BLK_S_OK);
        put(&mut model, sector, &d);
        // A read of exactly that range returns it.
        let (st, back) = vmm.read(0, sector, d.len())?;
        assert_eq!(st, VIRTIO_BLK_S_OK);
        assert_eq!(crc(&back), crc(&d), "sector {sector}");
    }
    // Discard 1 sector, write-zeroes 3 (with and without unmap), all unaligned to 4 KiB.
    assert_eq!(vmm.discard(0, BASE + 25, 1)?, VIRTIO_BLK_S_OK);
    put(&mut model, BASE + 25, &[0u8; 512]);
    assert_eq!(vmm.write_zeroes(0, BASE + 30, 3, false)?, VIRTIO_BLK_S_OK);
    put(&mut model, BASE + 30, &[0u8; 3 * 512]);
    assert_eq!(vmm.write_zeroes(0, BASE + 39, 3, true)?, VIRTIO_BLK_S_OK);
    put(&mut model, BASE + 39, &[0u8; 3 * 512]);
    let (st, back) = vmm.read(0, BASE, LEN)?;
    assert_eq!(st, VIRTIO_BLK_S_OK);
    for (i, (a, b)) in back.chunks(512).zip(model.chunks(512)).enumerate() {
        assert_eq!(crc(a), crc(b), "sector {}", BASE + i as u64);
    }
    // A read of one sector at an odd place.
    let (_, one) = vmm.read(0, BASE + 7, 512)?;
    assert_eq!(one, model[7 * 512..8 * 512]);
    Ok(())
}

/// `--block-size 4096`: the device offers 4 KiB logical blocks (physical the same).
#[test]
fn block_size_4096_on_request() -> Result<()> {
    let s = setup_with(1, false, &["--block-size", "4096"])?;
    let vmm = TestVmm::connect(&s.vhost.opts.socket, opts(1))?;
    let cfg = vmm.config();
    assert_eq!(cfg.blk_size, 4096);
    assert_eq!(cfg.physical_block_exp, 0);
    assert_eq!(cfg.min_io_size, 1);
    assert_eq!(cfg.capacity, SECTORS, "capacity stays in 512-byte sectors");
    Ok(())
}

#[test]
fn read_only_volume_refuses_writes() -> Result<()> {
    let s = setup(1, true)?;
    let mut vmm = TestVmm::connect(&s.vhost.opts.socket, opts(1))?;
    assert!(vmm.device_features() & (1 << VIRTIO_BLK_F_RO) != 0);
    assert_eq!(vmm.write(0, 0, &[1u8; 512])?, VIRTIO_BLK_S_IOERR);
    let (st, d) = vmm.read(0, 0, 512)?;
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert!(d.iter().all(|&b| b == 0));
    Ok(())
}

#[test]
fn deep_queues_on_several_queues_verify() -> Result<()> {
    let s = setup(2, false)?;
    let mut vmm = TestVmm::connect(&s.vhost.opts.socket, opts(2))?;
    let region = Some((0, 8192));
    let w = LoadSpec {
        op: LoadOp::Write,
        depth: 32,
        random: false,
        region,
        count: Some(2048),
        data_seed: Some(11),
        ..LoadSpec::default()
    };
    let r = vmm.run_load(0, w)?;
    assert_eq!((r.errors, r.mismatches), (0, 0));
    let rd = LoadSpec {
        op: LoadOp::Read,
        depth: 32,
        region,
        count: Some(2000),
        data_seed: Some(11),
        ..LoadSpec::default()
    };
    let res = vmm.run_load_multi(&[(0, rd.clone()), (1, LoadSpec { seed: 2, ..rd })])?;
    for r in res {
        assert_eq!(r.completed, 2000);
        assert_eq!((r.errors, r.mismatches), (0, 0), "{:?}", r.first_error);
    }
    let st = vmm.stats();
    assert_eq!(st.stray_used, 0);
    Ok(())
}

fn alloc_header(vmm: &mut TestVmm, ty: u32, sector: u64) -> Result<u64> {
    let a = vmm.alloc(16)?;
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&ty.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    vmm.write_mem(a, &h)?;
    Ok(a)
}

/// Every malformed chain is answered (or safely given back) and the daemon keeps serving.
#[test]
fn malformed_descriptor_chains_never_crash_or_hang() -> Result<()> {
    let mut s = setup(1, false)?;
    let mut vmm = TestVmm::connect(&s.vhost.opts.socket, opts(1))?;
    let t = Duration::from_secs(5);
    let mem = vmm.mem_size();
    let data = vmm.alloc(4096)?;
    let status = vmm.alloc(1)?;
    let mut cases: Vec<(&str, Vec<RawDesc>, Option<u8>)> = Vec::new();
    let h_in = alloc_header(&mut vmm, VIRTIO_BLK_T_IN, 0)?;
    let h_out = alloc_header(&mut vmm, VIRTIO_BLK_T_OUT, 0)?;
    let h_far = alloc_header(&mut vmm, VIRTIO_BLK_T_IN, u64::MAX / 256)?;
    let h_end = alloc_header(&mut vmm, VIRTIO_BLK_T_IN, SECTORS - 1)?;
    cases.push((
        "status read-only",
        vec![
            RawDesc::ro(h_in, 16),
            RawDesc::wo(data, 512),
            RawDesc::ro(status, 1),
        ],
        None,
    ));
    cases.push((
        "status missing",
        vec![RawDesc::ro(h_in, 16), RawDesc::ro(data, 512)],
        None,
    ));
    cases.push((
        "short header",
        vec![RawDesc::ro(h_in, 8), RawDesc::wo(status, 1)],
        Some(VIRTIO_BLK_S_IOERR),
    ));
    cases.push((
        "zero-length status",
        vec![RawDesc::ro(h_in, 16), RawDesc::wo(status, 0)],
        None,
    ));
    cases.push((
        "data outside memory",
        vec![
            RawDesc::ro(h_in, 16),
            RawDesc::wo(mem - 256, 4096),
            RawDesc::wo(status, 1),
        ],
        Some(VIRTIO_BLK_S_IOERR),
    ));
    cases.push((
        "address overflow",
        vec![
            RawDesc::ro(h_in, 16),
            RawDesc::wo(u64::MAX - 100, 4096),
            RawDesc::wo(status, 1),
        ],
        Some(VIRTIO_BLK_S_IOERR),
    ));
    cases.push((
        "header outside memory",
        vec![RawDesc::ro(mem + 4096, 16), RawDesc::wo(status, 1)],
        Some(VIRTIO_BLK_S_IOERR),
    ));
    cases.push((
        "read with read-only data",
        vec![
            RawDesc::ro(h_in, 16),
            RawDesc::ro(data, 512),
            RawDesc::wo(status, 1),
        ],
        Some(VIRTIO_BLK_S_IOERR),
    ));
    cases.push((
        "write with writable data",
        vec![
            RawDesc::ro(h_out, 16),
            RawDesc::wo(data, 512),
            RawDesc::wo(status, 1),
        ],
        Some(VIRTIO_BLK_S_IOERR),
    ));
    cases.push((
        "unaligned length",
        vec![
            RawDesc::ro(h_in, 16),
            RawDesc::wo(data, 100),
            RawDesc::wo(status, 1),
        ],
        Some(VIRTIO_BLK_S_IOERR),
    ));
    cases.push((
        "sector overflow",
        vec![
            RawDesc::ro(h_far, 16),
            RawDesc::wo(data, 512),
            RawDesc::wo(status, 1),
        ],
        Some(VIRTIO_BLK_S_IOERR),
    ));
    cases.push((
        "past capacity",
        vec![
            RawDesc::ro(h_end, 16),
            RawDesc::wo(data, 1024),
            RawDesc::wo(status, 1),
        ],
        Some(VIRTIO_BLK_S_IOERR),
    ));
    cases.push((
        "readable after writable",
        vec![
            RawDesc::ro(h_in, 16),
            RawDesc::wo(data, 512),
            RawDesc::ro(data, 512),
            RawDesc::wo(status, 1),
        ],
        Some(VIRTIO_BLK_S_IOERR),
    ));
    // A loop: entry 1 points back at itself.
    cases.push((
        "descriptor loop",
        vec![
            RawDesc::ro(h_in, 16),
            RawDesc {
                addr: data,
                len: 512,
                flags: VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
                next: RawNext::Entry(1),
            },
        ],
        None,
    ));
    // next index outside the table.
    cases.push((
        "next outside the table",
        vec![RawDesc {
            addr: h_in,
            len: 16,
            flags: VIRTQ_DESC_F_NEXT,
            next: RawNext::Table(60000),
        }],
        None,
    ));
    // An indirect table outside guest memory.
    cases.push((
        "indirect table outside memory",
        vec![RawDesc::indirect(mem + 8192, 64)],
        None,
    ));
    for (name, chain, want) in cases {
        vmm.write_mem(status, &[0xee])?;
        let used = vmm.submit_raw(0, &chain, t)?;
        assert!(
            used.is_some(),
            "{name}: the head was never given back (guest would hang)"
        );
        if let Some(want) = want {
            assert_eq!(vmm.read_mem(status, 1)?[0], want, "{name}: status");
        }
        assert!(s.vhost.running(), "{name}: keel-vhost died");
        assert!(vmm.alive(), "{name}: session died");
    }
    // The device still does I/O afterwards.
    let d = pattern(5, 100, 4096);
    assert_eq!(vmm.write(0, 100, &d)?, VIRTIO_BLK_S_OK);
    assert_eq!(vmm.read(0, 100, 4096)?.1, d);
    Ok(())
}

/// Hostile vhost-user messages end that session at most; the daemon serves the next frontend.
#[test]
fn hostile_vhost_user_messages_end_the_session_at_most() -> Result<()> {
    let mut s = setup(1, false)?;
    let socket = s.vhost.opts.socket.clone();
    for case in HostileCase::ALL {
        let outcome = hostile_session(&socket, *case);
        eprintln!("{case:?}: {outcome:?}");
        std::thread::sleep(Duration::from_millis(50));
        assert!(s.vhost.running(), "{case:?} killed keel-vhost");
        let mut vmm = TestVmm::connect(&socket, opts(1))?;
        let d = pattern(1, 8, 4096);
        assert_eq!(vmm.write(0, 8, &d)?, VIRTIO_BLK_S_OK, "after {case:?}");
        assert_eq!(vmm.read(0, 8, 4096)?.1, d, "after {case:?}");
    }
    Ok(())
}

/// One frontend at a time; the next one gets the same volume with its data.
#[test]
fn reconnecting_frontend_finds_its_data() -> Result<()> {
    let s = setup(1, false)?;
    let d = pattern(21, 0, 65536);
    {
        let mut vmm = TestVmm::connect(&s.vhost.opts.socket, opts(1))?;
        assert_eq!(vmm.write(0, 0, &d)?, VIRTIO_BLK_S_OK);
    }
    for _ in 0..3 {
        let mut vmm = TestVmm::connect(&s.vhost.opts.socket, opts(1))?;
        let (st, back) = vmm.read(0, 0, 65536)?;
        assert_eq!(st, VIRTIO_BLK_S_OK);
        assert_eq!(crc(&back), crc(&d));
    }
    Ok(())
}

/// With `--poll-us`, a request the guest makes available while the vring thread still polls
/// its queue is served without a kick (the device leaves the guest's notifications off); with
/// polling off, every request made after the previous one completed needs a kick.
#[test]
fn polling_serves_requests_made_without_a_kick() -> Result<()> {
    for (poll_us, polled) in [("500000", true), ("0", false)] {
        let s = setup_with(1, false, &["--poll-us", poll_us])?;
        let mut vmm = TestVmm::connect(&s.vhost.opts.socket, opts(1))?;
        let before = vmm.stats();
        let mut written = Vec::new();
        for i in 0..4u64 {
            let d = pattern(40 + i, i * 8, 4096);
            assert_eq!(vmm.write(0, i * 8, &d)?, VIRTIO_BLK_S_OK);
            written.push(d);
        }
        let after = vmm.stats();
        let kicks = after.kicks - before.kicks;
        let suppressed = after.suppressed_kicks - before.suppressed_kicks;
        if polled {
            assert!(
                kicks <= 1 && suppressed >= 3,
                "polling: {kicks} kicks, {suppressed} suppressed"
            );
        } else {
            assert_eq!(
                (kicks, suppressed),
                (4, 0),
                "no polling: every request kicks"
            );
        }
        for (i, d) in written.iter().enumerate() {
            let (st, back) = vmm.read(0, i as u64 * 8, 4096)?;
            assert_eq!(st, VIRTIO_BLK_S_OK);
            assert_eq!(crc(&back), crc(d), "poll {poll_us}: block {i}");
        }
    }
    Ok(())
}

/// After keel-vhost ended a session with a broken ring: it still runs, and a new frontend
/// finds `earlier` (written at sector 0 by the broken session) and writes and reads anew.
fn the_next_frontend_is_served(s: &mut Setup, earlier: &[u8], what: &str) -> Result<()> {
    assert!(s.vhost.running(), "{what}: keel-vhost died");
    let mut vmm = TestVmm::connect(&s.vhost.opts.socket, opts(1))
        .with_context(|| format!("{what}: a new frontend cannot connect"))?;
    let (st, back) = vmm.read(0, 0, earlier.len())?;
    assert_eq!(st, VIRTIO_BLK_S_OK, "{what}: read after reconnecting");
    assert_eq!(crc(&back), crc(earlier), "{what}: data written before");
    let d = pattern(70, 64, 16384);
    assert_eq!(vmm.write(0, 64, &d)?, VIRTIO_BLK_S_OK, "{what}: write");
    let (st, back) = vmm.read(0, 64, d.len())?;
    assert_eq!(st, VIRTIO_BLK_S_OK, "{what}: read back");
    assert_eq!(crc(&back), crc(&d), "{what}: data written after");
    Ok(())
}

/// How long a broken session may stay open (generous: two cores shared with other tests).
const BROKEN_SESSION_ENDS_WITHIN: Duration = Duration::from_secs(5);

/// A guest whose avail ring names a descriptor head outside the table (virtio-queue pops it as
/// a chain with no descriptors that the used ring then refuses: that request could never
/// complete) has its session ended by keel-vhost, which lives on and serves the next frontend
/// its data; with event-idx and polling, and without either.
#[test]
fn an_out_of_range_head_index_ends_the_session() -> Result<()> {
    for (poll_us, event_idx, past) in [("100", true, 0u16), ("0", false, u16::MAX)] {
        let what = format!("poll {poll_us}, event-idx {event_idx}");
        let mut s = setup_with(1, false, &["--poll-us", poll_us])?;
        let mut vmm = TestVmm::connect(
            &s.vhost.opts.socket,
            VmmOptions {
                event_idx,
                ..opts(1)
            },
        )?;
        let d = pattern(60, 0, 8192);
        assert_eq!(vmm.write(0, 0, &d)?, VIRTIO_BLK_S_OK);
        let size = vmm.queue_layout(0)?.size;
        let head = size.saturating_add(past);
        vmm.push_raw_head(0, head)?;
        vmm.kick(0)?;
        assert!(
            vmm.wait_peer_closed(BROKEN_SESSION_ENDS_WITHIN)?,
            "{what}: head {head} of a {size}-entry queue left the session open (the guest would wait forever)"
        );
        assert!(!vmm.alive(), "{what}: the ended session still answers");
        drop(vmm);
        the_next_frontend_is_served(&mut s, &d, &what)?;
    }
    Ok(())
}

/// A guest whose avail index runs further ahead than the queue holds (virtio-queue refuses to
/// pop from such a ring: nothing could ever complete) has its session ended by keel-vhost,
/// which neither dies nor keeps its vring thread spinning, with polling on or off, and serves
/// the next frontend its data.
#[test]
fn an_out_of_range_avail_index_does_not_spin_the_vring_thread() -> Result<()> {
    use keel_tests::bench::{cpu_ticks, ticks_per_second};
    for poll_us in ["100", "0"] {
        let mut s = setup_with(1, false, &["--poll-us", poll_us])?;
        let mut vmm = TestVmm::connect(&s.vhost.opts.socket, opts(1))?;
        let d = pattern(50, 0, 4096);
        assert_eq!(vmm.write(0, 0, &d)?, VIRTIO_BLK_S_OK);
        let layout = vmm.queue_layout(0)?;
        let published = u16::from_le_bytes(
            vmm.read_mem(layout.avail + 2, 2)?
                .try_into()
                .map_err(|_| anyhow::anyhow!("short read"))?,
        );
        let bogus = published.wrapping_add(layout.size).wrapping_add(7);
        vmm.write_mem(layout.avail + 2, &bogus.to_le_bytes())?;
        let pid = s.vhost.pid().context("keel-vhost has no pid")?;
        let before = cpu_ticks(pid);
        vmm.kick(0)?;
        assert!(
            vmm.wait_peer_closed(BROKEN_SESSION_ENDS_WITHIN)?,
            "poll {poll_us}: an avail index {} ahead left the session open",
            bogus.wrapping_sub(published)
        );
        // The guest keeps kicking a session that is gone: nothing spins.
        for _ in 0..10 {
            vmm.kick(0)?;
            std::thread::sleep(Duration::from_millis(100));
        }
        let cpu = (cpu_ticks(pid) - before) as f64 / ticks_per_second();
        assert!(
            cpu < 0.3,
            "poll {poll_us}: keel-vhost used {cpu:.2} s of CPU in 1 s with a broken ring"
        );
        drop(vmm);
        the_next_frontend_is_served(&mut s, &d, &format!("poll {poll_us}"))?;
    }
    Ok(())
}

/// Writes a verified pattern over a region, then runs verified mixed I/O at depth 32 for
/// `secs` seconds while `disrupt` acts on keel-storage from another thread.
fn load_while(
    s: &mut Setup,
    seed: u64,
    secs: u64,
    disrupt: impl FnOnce(&mut Storage) -> Result<()> + Send,
) -> Result<LoadResult> {
    let mut vmm = TestVmm::connect(
        &s.vhost.opts.socket,
        VmmOptions {
            io_timeout: Duration::from_secs(30),
            ..opts(1)
        },
    )?;
    let region = Some((0, 16384));
    let w = LoadSpec {
        op: LoadOp::Write,
        depth: 32,
        random: false,
        region,
        count: Some(16384 / 8),
        data_seed: Some(seed),
        ..LoadSpec::default()
    };
    assert_eq!(vmm.run_load(0, w)?.errors, 0);
    let load = LoadSpec {
        op: LoadOp::Mixed { read_percent: 50 },
        depth: 32,
        region,
        count: None,
        duration: Some(Duration::from_secs(secs)),
        data_seed: Some(seed),
        ..LoadSpec::default()
    };
    let storage = &mut s.storage;
    std::thread::scope(|sc| {
        let h = sc.spawn(move || disrupt(storage));
        let r = vmm.run_load(0, load);
        h.join().expect("disruptor thread")?;
        r
    })
}

/// keel-storage killed while requests are in flight: they stall, then complete with the right
/// data once it is back; no error reaches the guest.
#[test]
fn storage_kill_9_under_load_only_stalls() -> Result<()> {
    let mut s = setup(1, false)?;
    let r = load_while(&mut s, 77, 4, |storage| {
        std::thread::sleep(Duration::from_millis(300));
        storage.kill9();
        std::thread::sleep(Duration::from_secs(1));
        storage.restart()
    })?;
    assert!(
        r.completed > 1000,
        "only {} requests completed",
        r.completed
    );
    assert_eq!((r.errors, r.mismatches), (0, 0), "{:?}", r.first_error);
    assert!(
        r.percentile_us(100.0) > 500_000,
        "the kill should have stalled some request"
    );
    Ok(())
}

/// More data queued than keel-vhost's in-flight budget (64 MiB): popping pauses and resumes as
/// completions come back; everything completes with the right data.
#[test]
fn in_flight_budget_throttles_and_resumes() -> Result<()> {
    let s = setup(1, false)?;
    let mut vmm = TestVmm::connect(
        &s.vhost.opts.socket,
        VmmOptions {
            queue_size: 256,
            mem_size: 512 << 20,
            ..opts(1)
        },
    )?;
    let region = Some((0, SECTORS));
    let w = LoadSpec {
        op: LoadOp::Write,
        depth: 80,
        block_size: 1 << 20,
        random: false,
        region,
        count: Some(640),
        data_seed: Some(5),
        ..LoadSpec::default()
    };
    let r = vmm.run_load(0, w)?;
    assert_eq!((r.completed, r.errors), (640, 0), "{:?}", r.first_error);
    let rd = LoadSpec {
        op: LoadOp::Read,
        depth: 80,
        block_size: 1 << 20,
        region,
        count: Some(400),
        data_seed: Some(5),
        ..LoadSpec::default()
    };
    let r = vmm.run_load(0, rd)?;
    assert_eq!(
        (r.completed, r.errors, r.mismatches),
        (400, 0, 0),
        "{:?}",
        r.first_error
    );
    Ok(())
}

/// keel-storage frozen (SIGSTOP) under load: requests time out, keel-vhost reconnects and
/// resends; after SIGCONT everything completes with the right data and no error.
#[test]
fn storage_sigstop_under_load_only_stalls() -> Result<()> {
    let mut s = setup(1, false)?;
    let r = load_while(&mut s, 78, 6, |storage| {
        std::thread::sleep(Duration::from_millis(300));
        storage.pause(true);
        std::thread::sleep(Duration::from_secs(3));
        storage.pause(false);
        Ok(())
    })?;
    assert!(
        r.completed > 1000,
        "only {} requests completed",
        r.completed
    );
    assert_eq!((r.errors, r.mismatches), (0, 0), "{:?}", r.first_error);
    assert!(
        r.percentile_us(100.0) > 2_000_000,
        "the freeze should have stalled some request"
    );
    Ok(())
}

/// A keel-vhost steered by a control file, with a status file; the copy is created with
/// `create` (`VOLUME:SIZE[:EPOCH]`) and keel-vhost started with `size`, `epoch`, `read_only`.
fn controlled(create: &str, size: &str, epoch: u64, read_only: bool) -> Result<DataPath> {
    DataPath::start(create, "blk.sock", |dir, o| {
        let mut extra = vec!["--request-timeout-ms".into(), "2000".into()];
        extra.extend(control_args(dir));
        VhostOptions {
            size: size.into(),
            epoch,
            read_only,
            extra,
            ..o
        }
    })
}

const WAIT: Duration = Duration::from_secs(15);

/// Online resize: a larger size in the control file + SIGHUP grows the device, the frontend
/// gets VHOST_USER_BACKEND_CONFIG_CHANGE_MSG on its backend channel and GET_CONFIG then shows
/// the new capacity; I/O beyond the old end works. Shrinking and bad control files change
/// nothing. The status file follows the session.
#[test]
fn online_resize_notifies_the_frontend_and_grows_the_device() -> Result<()> {
    let c = controlled("abc123:128MiB", "64MiB", 1, false)?;
    let st = VhostStatus::read(&c.status())?;
    assert_eq!(
        (st.connected, st.size, st.epoch, Some(st.pid)),
        (false, 64 << 20, 1, c.vhost.pid())
    );

    let mut vmm = TestVmm::connect(
        &c.vhost.opts.socket,
        VmmOptions {
            backend_req: true,
            ..opts(1)
        },
    )?;
    assert!(
        vmm.protocol_features() & vhost::vhost_user::VhostUserProtocolFeatures::BACKEND_REQ.bits()
            != 0,
        "BACKEND_REQ must be negotiated"
    );
    VhostStatus::wait_for(&c.status(), WAIT, |s| s.connected)?;
    assert_eq!(vmm.config().capacity, SECTORS);
    // Once per session, when the device starts, keel-vhost asks the frontend to re-read the
    // config space (a QEMU reconnecting to a restarted keel-vhost has an old copy).
    let config_change = BackendMessage {
        request: BACKEND_CONFIG_CHANGE_MSG,
        flags: 1,
        payload: Vec::new(),
    };
    assert_eq!(vmm.recv_backend_message(WAIT)?, Some(config_change.clone()));
    assert_eq!(vmm.recv_backend_message(Duration::from_millis(300))?, None);
    // Beyond the old end: refused.
    assert_eq!(vmm.read(0, SECTORS, 4096)?.0, VIRTIO_BLK_S_IOERR);

    c.push(128 << 20, 1)?;
    assert_eq!(VhostStatus::read(&c.status())?.size, 128 << 20);
    let msg = vmm
        .recv_backend_message(WAIT)?
        .context("no config-change message after the resize")?;
    assert_eq!(msg, config_change);
    assert_eq!(vmm.reread_config()?.capacity, 2 * SECTORS);
    assert!(VhostStatus::read(&c.status())?.connected);

    // Data beyond the old end, up to the new one.
    let at = (100 << 20) / 512;
    let d = pattern(31, at, 1 << 20);
    assert_eq!(vmm.write(0, at, &d)?, VIRTIO_BLK_S_OK);
    let (status, back) = vmm.read(0, at, 1 << 20)?;
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert_eq!(crc(&back), crc(&d));
    let last = 2 * SECTORS - 8;
    assert_eq!(vmm.write(0, last, &[7u8; 4096])?, VIRTIO_BLK_S_OK);
    assert_eq!(vmm.read(0, 2 * SECTORS, 512)?.0, VIRTIO_BLK_S_IOERR);

    // Shrinking, a malformed file, a missing file: ignored, the daemon keeps serving.
    c.push(64 << 20, 1)?;
    std::fs::write(c.control(), b"{\"size\": 12")?;
    c.reload()?;
    std::fs::remove_file(c.control())?;
    c.reload()?;
    assert_eq!(vmm.recv_backend_message(Duration::from_secs(1))?, None);
    assert_eq!(vmm.reread_config()?.capacity, 2 * SECTORS);
    let (status, back) = vmm.read(0, at, 1 << 20)?;
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert_eq!(crc(&back), crc(&d));
    assert_eq!(VhostStatus::read(&c.status())?.size, 128 << 20);

    drop(vmm);
    VhostStatus::wait_for(&c.status(), WAIT, |s| !s.connected)?;
    // The next session starts with the new size.
    let vmm = TestVmm::connect(&c.vhost.opts.socket, opts(1))?;
    assert_eq!(vmm.config().capacity, 2 * SECTORS);
    Ok(())
}

/// A writer whose epoch is behind the copy's is fenced (IOERR); after the node manager gives
/// it the copy's epoch (control file + SIGHUP), its writes carry that epoch and succeed.
#[test]
fn epoch_from_the_control_file_is_carried_by_later_writes() -> Result<()> {
    let c = controlled("abc123:64MiB:2", "64MiB", 1, false)?;
    let mut vmm = TestVmm::connect(&c.vhost.opts.socket, opts(1))?;
    let d = pattern(41, 8, 4096);
    assert_eq!(
        vmm.write(0, 8, &d)?,
        VIRTIO_BLK_S_IOERR,
        "fenced at epoch 1"
    );
    assert_eq!(
        vmm.read(0, 8, 4096)?.0,
        VIRTIO_BLK_S_IOERR,
        "fenced at epoch 1"
    );

    c.push(64 << 20, 2)?;
    assert_eq!(VhostStatus::read(&c.status())?.epoch, 2);
    assert_eq!(vmm.write(0, 8, &d)?, VIRTIO_BLK_S_OK);
    let (status, back) = vmm.read(0, 8, 4096)?;
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert_eq!(back, d);

    // A lower epoch is refused: writes keep epoch 2.
    c.push(64 << 20, 1)?;
    assert_eq!(VhostStatus::read(&c.status())?.epoch, 2);
    assert_eq!(vmm.write(0, 16, &d)?, VIRTIO_BLK_S_OK);
    Ok(())
}

/// A read-only attachment behind the copy's epoch does not fail reads: they stall until the
/// node manager pushes the new epoch, then complete.
#[test]
fn read_only_attachment_waits_for_the_new_epoch() -> Result<()> {
    let c = controlled("abc123:64MiB:2", "64MiB", 1, true)?;
    let mut vmm = TestVmm::connect(
        &c.vhost.opts.socket,
        VmmOptions {
            io_timeout: Duration::from_secs(60),
            ..opts(1)
        },
    )?;
    let started = std::time::Instant::now();
    let (read, pushed) = std::thread::scope(|sc| {
        let pusher = sc.spawn(|| -> Result<()> {
            std::thread::sleep(Duration::from_secs(3));
            c.push(64 << 20, 2)
        });
        let read = vmm.read(0, 0, 4096);
        let pushed = pusher
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the pusher thread panicked")));
        (read, pushed)
    });
    let waited = started.elapsed();
    pushed?;
    let (status, data) = read?;
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert!(data.iter().all(|&b| b == 0));
    assert!(
        waited >= Duration::from_millis(2500),
        "the read must have waited for the new epoch (took {waited:?})"
    );
    // Later reads go straight through.
    assert_eq!(vmm.read(0, 8, 4096)?.0, VIRTIO_BLK_S_OK);
    Ok(())
}

/// A new primary named through the control file (+ SIGHUP): keel-vhost drops its connection to
/// the old server, connects to the new one and resends the write in flight there. The guest's
/// write stalls and completes OK; later reads come from the new server. Two independent copies
/// of the volume stand in for a primary and its promoted mirror.
#[test]
fn switching_servers_resends_the_write_in_flight_to_the_new_one() -> Result<()> {
    // A request timeout far beyond the test's waits: only the switch can complete the write.
    let c = DataPath::start("abc123:64MiB", "blk.sock", |dir, o| {
        let mut extra = vec!["--request-timeout-ms".into(), "60000".into()];
        extra.extend(control_args(dir));
        VhostOptions { extra, ..o }
    })?;
    let s2 = Storage::start(&c.pki, "s2", &c.dir.path().join("data2"), &["abc123:64MiB"])?;
    let s1_addr = c.storage.addr.to_string();
    assert_eq!(
        vhost_status_server(&c.status())?.as_deref(),
        Some(s1_addr.as_str())
    );
    let mut vmm = TestVmm::connect(
        &c.vhost.opts.socket,
        VmmOptions {
            io_timeout: Duration::from_secs(60),
            ..opts(1)
        },
    )?;
    let a = pattern(51, 0, 64 << 10);
    assert_eq!(vmm.write(0, 0, &a)?, VIRTIO_BLK_S_OK);
    assert_eq!(vmm.read(0, 0, 64 << 10)?, (VIRTIO_BLK_S_OK, a.clone()));

    // s1 frozen: the next write hangs at s1 until keel-vhost is told of s2.
    c.storage.pause(true);
    let b = pattern(52, 256, 64 << 10);
    let started = std::time::Instant::now();
    let (written, pushed) = std::thread::scope(|sc| {
        let pusher = sc.spawn(|| -> Result<()> {
            std::thread::sleep(Duration::from_millis(1500));
            c.push_server(SIZE_BYTES, 1, &s2.addr.to_string())
        });
        let written = vmm.write(0, 256, &b);
        let pushed = pusher
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the pusher thread panicked")));
        (written, pushed)
    });
    let waited = started.elapsed();
    let result = (|| -> Result<()> {
        pushed?;
        assert_eq!(
            written?, VIRTIO_BLK_S_OK,
            "the hung write must complete, not fail"
        );
        assert!(
            waited >= Duration::from_millis(1400),
            "the write must have waited for the switch (took {waited:?})"
        );
        assert!(
            waited < Duration::from_secs(30),
            "the switch must resend at once, not after the request timeout (took {waited:?})"
        );
        let s2_addr = s2.addr.to_string();
        assert_eq!(
            vhost_status_server(&c.status())?.as_deref(),
            Some(s2_addr.as_str())
        );
        // B reads back from s2; A was only ever written to s1, so s2 has zeros there.
        assert_eq!(vmm.read(0, 256, 64 << 10)?, (VIRTIO_BLK_S_OK, b.clone()));
        let (status, old) = vmm.read(0, 0, 64 << 10)?;
        assert_eq!(status, VIRTIO_BLK_S_OK);
        assert!(old.iter().all(|&x| x == 0), "reads must come from s2");

        // A server address that does not parse changes nothing.
        c.push_server(SIZE_BYTES, 1, "not-an-address")?;
        assert_eq!(
            vhost_status_server(&c.status())?.as_deref(),
            Some(s2_addr.as_str())
        );
        let d = pattern(53, 512, 4096);
        assert_eq!(vmm.write(0, 512, &d)?, VIRTIO_BLK_S_OK);
        assert_eq!(vmm.read(0, 512, 4096)?, (VIRTIO_BLK_S_OK, d));
        assert!(
            VhostStatus::read(&c.status())?.connected,
            "the session survived"
        );
        Ok(())
    })();
    c.storage.pause(false);
    result
}

/// A data path whose keel-vhost has a control and a status file and the given extra flags.
fn with_flags(flags: &[&str]) -> Result<DataPath> {
    DataPath::start("abc123:64MiB", "blk.sock", |dir, o| {
        let mut extra: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
        extra.extend(control_args(dir));
        VhostOptions { extra, ..o }
    })
}

/// The status file's `unanswered` object and `io_failed` count (absent: `None`, 0).
fn unanswered(c: &DataPath) -> Result<(Option<serde_json::Value>, u64)> {
    let text = std::fs::read(c.status())?;
    let v: serde_json::Value = serde_json::from_slice(&text)?;
    Ok((
        v.get("unanswered").cloned(),
        v.get("io_failed").and_then(|n| n.as_u64()).unwrap_or(0),
    ))
}

/// Polls the status file until `want` holds; returns how long that took.
fn wait_status(
    c: &DataPath,
    timeout: Duration,
    want: impl Fn(&(Option<serde_json::Value>, u64)) -> bool,
) -> Result<Duration> {
    let started = std::time::Instant::now();
    loop {
        let got = unanswered(c);
        if got.as_ref().is_ok_and(&want) {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(
            started.elapsed() < timeout,
            "status not reached within {timeout:?}; last: {got:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

const IO_FAIL_AFTER: Duration = Duration::from_millis(3000);

/// R9: with its only copy's server frozen (SIGSTOP), a guest write stalls, then completes with
/// IOERR no earlier than --io-fail-after-ms after its submission; the status file counts it.
/// Once the server is back, I/O works again.
#[test]
fn a_write_to_a_frozen_server_fails_after_io_fail_after() -> Result<()> {
    let c = with_flags(&["--request-timeout-ms", "1000", "--io-fail-after-ms", "3000"])?;
    let mut vmm = TestVmm::connect(
        &c.vhost.opts.socket,
        VmmOptions {
            io_timeout: Duration::from_secs(60),
            ..opts(1)
        },
    )?;
    let a = pattern(61, 0, 64 << 10);
    assert_eq!(vmm.write(0, 0, &a)?, VIRTIO_BLK_S_OK);
    c.storage.pause(true);
    let b = pattern(62, 0, 64 << 10);
    let started = std::time::Instant::now();
    let written = vmm.write(0, 0, &b);
    let waited = started.elapsed();
    let result = (|| -> Result<()> {
        assert_eq!(
            written?, VIRTIO_BLK_S_IOERR,
            "the write must fail after --io-fail-after-ms"
        );
        assert!(
            waited >= IO_FAIL_AFTER,
            "failed before --io-fail-after-ms (after {waited:?})"
        );
        eprintln!("the write failed after {waited:?} (--io-fail-after-ms 3000)");
        wait_status(&c, WAIT, |(_, failed)| *failed == 1)?;
        Ok(())
    })();
    c.storage.pause(false);
    result?;
    // The server answers again: new I/O succeeds (the failed write may or may not have landed:
    // the guest was told it failed).
    let d = pattern(63, 256, 64 << 10);
    assert_eq!(vmm.write(0, 256, &d)?, VIRTIO_BLK_S_OK);
    let (status, back) = vmm.read(0, 256, 64 << 10)?;
    assert_eq!((status, crc(&back)), (VIRTIO_BLK_S_OK, crc(&d)));
    Ok(())
}

/// R9 with the server killed and not restarted: the write fails after --io-fail-after-ms.
#[test]
fn a_write_to_a_killed_server_fails_after_io_fail_after() -> Result<()> {
    let mut c = with_flags(&["--request-timeout-ms", "1000", "--io-fail-after-ms", "3000"])?;
    let mut vmm = TestVmm::connect(
        &c.vhost.opts.socket,
        VmmOptions {
            io_timeout: Duration::from_secs(60),
            ..opts(1)
        },
    )?;
    assert_eq!(vmm.write(0, 0, &pattern(64, 0, 4096))?, VIRTIO_BLK_S_OK);
    c.storage.kill9();
    let started = std::time::Instant::now();
    let status = vmm.write(0, 8, &pattern(65, 8, 4096))?;
    let waited = started.elapsed();
    assert_eq!(status, VIRTIO_BLK_S_IOERR);
    assert!(
        waited >= IO_FAIL_AFTER,
        "failed before --io-fail-after-ms (after {waited:?})"
    );
    // Reads fail the same way; the device keeps serving.
    assert_eq!(vmm.read(0, 0, 4096)?.0, VIRTIO_BLK_S_IOERR);
    assert!(c.vhost.running());
    Ok(())
}

/// R9's other half: a server that comes back before --io-fail-after-ms completes the stalled
/// write normally, and its data reads back.
#[test]
fn a_write_completes_if_the_server_returns_before_io_fail_after() -> Result<()> {
    let c = with_flags(&["--request-timeout-ms", "1000", "--io-fail-after-ms", "8000"])?;
    let mut vmm = TestVmm::connect(
        &c.vhost.opts.socket,
        VmmOptions {
            io_timeout: Duration::from_secs(60),
            ..opts(1)
        },
    )?;
    assert_eq!(vmm.write(0, 0, &pattern(66, 0, 4096))?, VIRTIO_BLK_S_OK);
    c.storage.pause(true);
    let b = pattern(67, 512, 256 << 10);
    let started = std::time::Instant::now();
    let (written, resumed) = std::thread::scope(|sc| {
        let resumer = sc.spawn(|| {
            std::thread::sleep(Duration::from_millis(2500));
            c.storage.pause(false);
        });
        let written = vmm.write(0, 512, &b);
        let resumed = resumer.join();
        (written, resumed)
    });
    let waited = started.elapsed();
    c.storage.pause(false);
    assert!(resumed.is_ok(), "the resumer thread panicked");
    assert_eq!(written?, VIRTIO_BLK_S_OK, "the stalled write must complete");
    assert!(
        waited >= Duration::from_millis(2000),
        "the write must have stalled (took {waited:?})"
    );
    let (status, back) = vmm.read(0, 512, 256 << 10)?;
    assert_eq!((status, crc(&back)), (VIRTIO_BLK_S_OK, crc(&b)));
    assert_eq!(unanswered(&c)?.1, 0, "nothing failed");
    Ok(())
}

/// A frozen primary (SIGSTOP) shows in keel-vhost's status file as `unanswered`, naming the
/// server and the epoch, within a few seconds — with no guest I/O at all (idle pings) — and
/// the field goes away once the server answers again (SIGCONT).
#[test]
fn an_unanswered_primary_shows_in_the_status_file_and_clears() -> Result<()> {
    let c = with_flags(&[
        "--request-timeout-ms",
        "2000",
        "--primary-timeout-ms",
        "1000",
    ])?;
    let server = c.storage.addr.to_string();
    // Connected and answering: no field.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(unanswered(&c)?, (None, 0));
    c.storage.pause(true);
    let seen = wait_status(&c, WAIT, |(u, _)| u.is_some());
    let result = (|| -> Result<Duration> {
        let seen = seen?;
        let (u, _) = unanswered(&c)?;
        let u = u.context("unanswered")?;
        assert_eq!(u["server"].as_str(), Some(server.as_str()), "{u}");
        assert_eq!(u["epoch"].as_u64(), Some(1), "{u}");
        let since = u["since_unix_ms"].as_u64().context("since_unix_ms")?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as u64;
        assert!(
            since <= now && now - since < 10_000,
            "since {since}, now {now}"
        );
        assert!(
            seen >= Duration::from_millis(900),
            "reported before --primary-timeout-ms ({seen:?})"
        );
        assert!(seen < Duration::from_secs(5), "took {seen:?}");
        Ok(seen)
    })();
    c.storage.pause(false);
    let seen = result?;
    let cleared = wait_status(&c, WAIT, |(u, _)| u.is_none())?;
    eprintln!("unanswered reported {seen:?} after SIGSTOP, cleared {cleared:?} after SIGCONT");
    // Guest I/O still works.
    let mut vmm = TestVmm::connect(&c.vhost.opts.socket, opts(1))?;
    let d = pattern(68, 0, 4096);
    assert_eq!(vmm.write(0, 0, &d)?, VIRTIO_BLK_S_OK);
    assert_eq!(vmm.read(0, 0, 4096)?, (VIRTIO_BLK_S_OK, d));
    Ok(())
}

/// R9 when the frozen server's socket is full: 32 MiB of writes queued to a stopped server fill
/// the TCP buffers, so keel-vhost's own writes to the socket block. Every request still fails
/// after --io-fail-after-ms (bounded by the request timeout it waits on the socket), none
/// hangs; after SIGCONT new I/O works.
#[test]
fn a_frozen_server_with_a_full_socket_still_fails_io_after_io_fail_after() -> Result<()> {
    let c = with_flags(&["--request-timeout-ms", "2000", "--io-fail-after-ms", "3000"])?;
    let mut vmm = TestVmm::connect(
        &c.vhost.opts.socket,
        VmmOptions {
            io_timeout: Duration::from_secs(60),
            mem_size: 256 << 20,
            ..opts(1)
        },
    )?;
    assert_eq!(vmm.write(0, 0, &pattern(69, 0, 4096))?, VIRTIO_BLK_S_OK);
    c.storage.pause(true);
    let w = LoadSpec {
        op: LoadOp::Write,
        depth: 32,
        block_size: 1 << 20,
        random: false,
        region: Some((0, SECTORS)),
        count: Some(64),
        data_seed: Some(70),
        ..LoadSpec::default()
    };
    let started = std::time::Instant::now();
    let r = vmm.run_load(0, w);
    let waited = started.elapsed();
    c.storage.pause(false);
    let r = r?;
    eprintln!(
        "{} of 64 failed, in {waited:?}; fastest failure {} us",
        r.errors,
        r.latencies_us.iter().min().copied().unwrap_or_default()
    );
    assert_eq!(r.completed, 64);
    assert_eq!(r.errors, 64, "the server never answered: every write fails");
    assert!(
        r.latencies_us.iter().all(|&us| us >= 3_000_000),
        "a write failed before --io-fail-after-ms"
    );
    let d = pattern(71, 256, 4096);
    assert_eq!(vmm.write(0, 256, &d)?, VIRTIO_BLK_S_OK);
    assert_eq!(vmm.read(0, 256, 4096)?, (VIRTIO_BLK_S_OK, d));
    Ok(())
}
