//! keel-vmm-bench: the backend's own cost without a guest. The Rust test VMM drives a
//! vhost-user-blk socket directly (no QEMU, no TCG) at QD1, QD32 and QD128 with 4 KiB and
//! 64 KiB random reads and writes, against keel-vhost (→ mTLS → keel-storage) and against
//! qemu-storage-daemon on a local raw file, alternated round by round.
//!
//! Usage: keel-vmm-bench [--smoke] [--rounds N] [--seconds S] [--out DIR]

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use keel_tests::bench::{cpu_ticks, start_qsd};
use keel_tests::cluster::{Pki, Storage, Vhost, VhostOptions};
use keel_tests::vmm::{LoadOp, LoadSpec, TestVmm, VmmOptions};
use serde_json::json;

const SIZE: u64 = 256 << 20;

fn main() -> Result<()> {
    let mut smoke = false;
    let mut rounds = 3u32;
    let mut seconds = 3.0f64;
    let mut out = PathBuf::from("target/vmm-bench");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--smoke" => smoke = true,
            "--rounds" => rounds = args.next().context("--rounds N")?.parse()?,
            "--seconds" => seconds = args.next().context("--seconds S")?.parse()?,
            "--out" => out = PathBuf::from(args.next().context("--out DIR")?),
            "-h" | "--help" => {
                println!("usage: keel-vmm-bench [--smoke] [--rounds N] [--seconds S] [--out DIR]");
                return Ok(());
            }
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    if smoke {
        rounds = 1;
        seconds = 0.3;
    }
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(&dir.path().join("pki"))?;
    let storage = Storage::start(&pki, "s1", &dir.path().join("data"), &["b2:256MiB"])?;
    let vhost = Vhost::start(
        &pki,
        VhostOptions {
            socket: dir.path().join("keel.sock"),
            server: storage.addr,
            volume: "b2".into(),
            size: "256MiB".into(),
            epoch: 1,
            node_id: "n1".into(),
            num_queues: 1,
            read_only: false,
            extra: vec!["--queue-size".into(), "512".into()],
        },
    )?;
    let (mut qsd, qsd_sock) = start_qsd(dir.path(), SIZE)?;
    let opts = VmmOptions {
        queue_size: 512,
        mem_size: 256 << 20,
        event_idx: true,
        io_timeout: Duration::from_secs(30),
        ..VmmOptions::default()
    };
    let mut k = TestVmm::connect(&vhost.opts.socket, opts.clone())?;
    let mut q = TestVmm::connect(&qsd_sock, opts)?;
    let sectors = SIZE / 512;
    // Fill both once so reads hit written data.
    for vmm in [&mut k, &mut q] {
        let fill = LoadSpec {
            op: LoadOp::Write,
            depth: 16,
            block_size: 1 << 20,
            random: false,
            region: Some((0, sectors)),
            count: Some(SIZE >> 20),
            ..LoadSpec::default()
        };
        let r = vmm.run_load(0, fill)?;
        if r.errors != 0 {
            bail!("prefill failed: {:?}", r.first_error);
        }
    }
    let pids: Vec<u32> = [storage.pid(), vhost.pid()].into_iter().flatten().collect();
    let keel_cpu = || pids.iter().map(|&p| cpu_ticks(p)).sum::<u64>();
    let jobs: Vec<(LoadOp, usize, usize)> = [4096usize, 65536]
        .into_iter()
        .flat_map(|bs| {
            [1usize, 32, 128].into_iter().flat_map(move |qd| {
                [LoadOp::Read, LoadOp::Write]
                    .into_iter()
                    .map(move |op| (op, bs, qd))
            })
        })
        .collect();
    let mut results: Vec<(String, &str, f64, u64, f64)> = Vec::new();
    for round in 0..rounds {
        for (op, bs, qd) in &jobs {
            let name = format!(
                "{}-{}k-qd{qd}",
                if *op == LoadOp::Read {
                    "randread"
                } else {
                    "randwrite"
                },
                bs / 1024
            );
            for (cfg, vmm) in [("K1", &mut k), ("Q", &mut q)] {
                let spec = LoadSpec {
                    op: *op,
                    depth: *qd,
                    block_size: *bs,
                    random: true,
                    region: Some((0, sectors)),
                    count: None,
                    duration: Some(Duration::from_secs_f64(seconds)),
                    seed: u64::from(round) + 1,
                    ..LoadSpec::default()
                };
                let c0 = keel_cpu();
                let r = vmm.run_load(0, spec)?;
                let c1 = keel_cpu();
                if r.errors != 0 {
                    bail!(
                        "{name} on {cfg}: {} errors, first {:?}",
                        r.errors,
                        r.first_error
                    );
                }
                let cpu_us = if cfg == "K1" && r.completed > 0 {
                    (c1 - c0) as f64 * 10_000.0 / r.completed as f64
                } else {
                    f64::NAN
                };
                eprintln!(
                    "vmm-bench: round {round} {name} {cfg}: {:.0} IOPS, p99 {} µs",
                    r.iops(),
                    r.percentile_us(99.0)
                );
                results.push((name.clone(), cfg, r.iops(), r.percentile_us(99.0), cpu_us));
            }
        }
    }
    let _ = qsd.kill();
    let _ = qsd.wait();
    let mut md = format!(
        "Guest-free benchmark: Rust test VMM on the vhost-user socket, {rounds} round(s) of {seconds} s per job, 256 MiB region.\n\n| job | K1 median IOPS | Q median IOPS | K/Q | K1 p99 µs | Q p99 µs | keel CPU µs/IO |\n|---|---:|---:|---:|---:|---:|---:|\n"
    );
    let mut json_rows = Vec::new();
    let mut names: Vec<String> = results.iter().map(|r| r.0.clone()).collect();
    names.dedup();
    names.sort();
    names.dedup();
    for name in names {
        let pick = |cfg: &str| -> (f64, u64, f64) {
            let mut v: Vec<&(String, &str, f64, u64, f64)> = results
                .iter()
                .filter(|r| r.0 == name && r.1 == cfg)
                .collect();
            v.sort_by(|a, b| a.2.total_cmp(&b.2));
            v.get(v.len() / 2)
                .map(|r| (r.2, r.3, r.4))
                .unwrap_or((0.0, 0, f64::NAN))
        };
        let (ki, kp, kc) = pick("K1");
        let (qi, qp, _) = pick("Q");
        let ratio = if qi > 0.0 { ki / qi } else { 0.0 };
        let _ = writeln!(
            md,
            "| {name} | {ki:.0} | {qi:.0} | {ratio:.2} | {kp} | {qp} | {kc:.1} |"
        );
        json_rows.push(json!({"job": name, "k1_iops": ki, "q_iops": qi, "k_over_q": ratio,
            "k1_p99_us": kp, "q_p99_us": qp, "keel_cpu_us_per_io": if kc.is_nan() { serde_json::Value::Null } else { json!(kc) }}));
    }
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("results.md"), &md)?;
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(
            &json!({"rounds": rounds, "seconds": seconds, "results": json_rows}),
        )?,
    )?;
    println!("{md}");
    println!("keel-vmm-bench: results in {}", out.display());
    Ok(())
}
