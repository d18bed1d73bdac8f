//! keel-bench: the same guest, the same fio jobs, Keel and its peers alternated in one run on
//! one machine.
//!
//! Configurations: **K2** a Keel volume with 2 copies (keel-vhost → mutual TLS → the primary
//! keel-storage, which replicates every write over mutual TLS to a mirror on a second
//! keel-storage before acknowledging), **K1** a Keel volume with 1 copy (its copy on the same
//! keel-storage as K2's primary), **Q** qemu-storage-daemon exporting a local raw file as
//! vhost-user-blk (`aio=native,cache.direct=on`), and **N** qemu-nbd serving a raw file over NBD
//! with mutual x509 TLS on loopback, opened by a qemu-storage-daemon that exports it as
//! vhost-user-blk (TCP_NODELAY forced on with `libkeel_nodelay.so`; `--nagle` leaves it off).
//! One guest sees all four (vda = K1, vdb = K2, vdc = Q, vdd = N); each job runs on K2, K1, Q
//! then N, round after round, over a 256 MiB region written once first.
//!
//! Usage: keel-bench [--smoke] [--rounds N] [--runtime S] [--ramp S] [--out DIR] [--job NAME]...
//! [--config NAME]... [--nagle]. Prints a table per job (median IOPS, min–max, mean and p99
//! completion latency, CPU per I/O of the configuration's daemons) and the ratios K/Q, K/N
//! with the targets they meet; writes `results.json` and `results.md` to DIR.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use keel_tests::bench::{cpu_ticks, start_nbd_peer, start_qsd, ticks_per_second};
use keel_tests::cluster::{replicate, Pki, Storage, Vhost, VhostOptions};
use keel_tests::guest::{self, Disk, GuestConfig};
use serde_json::{json, Value};

struct Job {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    qd: u32,
}

const JOBS: &[Job] = &[
    Job {
        name: "randread-4k-qd1",
        rw: "randread",
        bs: "4k",
        qd: 1,
    },
    Job {
        name: "randwrite-4k-qd1",
        rw: "randwrite",
        bs: "4k",
        qd: 1,
    },
    Job {
        name: "randread-4k-qd32",
        rw: "randread",
        bs: "4k",
        qd: 32,
    },
    Job {
        name: "randwrite-4k-qd32",
        rw: "randwrite",
        bs: "4k",
        qd: 32,
    },
    Job {
        name: "write-1m-qd8",
        rw: "write",
        bs: "1m",
        qd: 8,
    },
    Job {
        name: "read-1m-qd8",
        rw: "read",
        bs: "1m",
        qd: 8,
    },
];

/// (name, guest device), in the order each job runs them.
const CONFIGS: &[(&str, &str)] = &[("K2", "vdb"), ("K1", "vda"), ("Q", "vdc"), ("N", "vdd")];

/// The targets: (job, config, against, at least).
const TARGETS: &[(&str, &str, &str, f64)] = &[
    ("randread-4k-qd1", "K2", "Q", 0.8),
    ("randwrite-4k-qd1", "K2", "Q", 0.8),
    ("randread-4k-qd32", "K2", "Q", 0.8),
    ("randwrite-4k-qd32", "K2", "Q", 0.8),
    ("write-1m-qd8", "K2", "N", 2.0),
    ("read-1m-qd8", "K2", "N", 2.0),
    ("randread-4k-qd1", "K1", "Q", 0.9),
    ("randwrite-4k-qd1", "K1", "Q", 0.9),
    ("randread-4k-qd32", "K1", "Q", 1.0),
    ("randwrite-4k-qd32", "K1", "Q", 0.9),
];

struct Opts {
    smoke: bool,
    rounds: u32,
    runtime: u32,
    ramp: u32,
    out: PathBuf,
    /// Only these jobs (`--job NAME`, repeatable); all when empty.
    only: Vec<String>,
    /// Only these configurations (`--config NAME`, repeatable); all when empty.
    configs: Vec<String>,
    /// Force TCP_NODELAY on qemu-nbd's sockets (the default; `--nagle` measures without).
    nodelay: bool,
}

impl Opts {
    fn jobs(&self) -> impl Iterator<Item = &'static Job> + '_ {
        JOBS.iter()
            .filter(|j| self.only.is_empty() || self.only.iter().any(|o| o == j.name))
    }

    fn configs(&self) -> impl Iterator<Item = &'static (&'static str, &'static str)> + '_ {
        CONFIGS
            .iter()
            .filter(|c| self.configs.is_empty() || self.configs.iter().any(|o| o == c.0))
    }
}

fn parse_args() -> Result<Opts> {
    let mut o = Opts {
        smoke: false,
        rounds: 3,
        runtime: 8,
        ramp: 2,
        out: PathBuf::from("target/bench"),
        only: Vec::new(),
        configs: Vec::new(),
        nodelay: true,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> Result<u32> {
            args.next()
                .with_context(|| format!("{name} needs a value"))?
                .parse()
                .with_context(|| format!("{name} needs a number"))
        };
        match a.as_str() {
            "--smoke" => o.smoke = true,
            "--rounds" => o.rounds = num("--rounds")?,
            "--runtime" => o.runtime = num("--runtime")?,
            "--ramp" => o.ramp = num("--ramp")?,
            "--out" => o.out = PathBuf::from(args.next().context("--out needs a directory")?),
            "--job" => {
                let j = args.next().context("--job needs a job name")?;
                if !JOBS.iter().any(|x| x.name == j) {
                    let names: Vec<&str> = JOBS.iter().map(|x| x.name).collect();
                    bail!("unknown job {j:?}; jobs: {}", names.join(", "));
                }
                o.only.push(j);
            }
            "--config" => {
                let c = args.next().context("--config needs K2, K1, Q or N")?;
                if !CONFIGS.iter().any(|x| x.0 == c) {
                    bail!("unknown configuration {c:?}; configurations: K2, K1, Q, N");
                }
                o.configs.push(c);
            }
            "--nagle" => o.nodelay = false,
            "-h" | "--help" => {
                println!(
                    "usage: keel-bench [--smoke] [--rounds N] [--runtime S] [--ramp S] [--out DIR] [--job NAME]... [--config K2|K1|Q|N]... [--nagle]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    if o.smoke {
        o.rounds = 1;
        o.runtime = 1;
        o.ramp = 0;
    }
    if o.rounds == 0 || o.runtime == 0 {
        bail!("--rounds and --runtime must be positive");
    }
    Ok(o)
}

fn guest_script(o: &Opts, size: &str) -> String {
    let mut s = String::from("set -e\n");
    for (_, dev) in o.configs() {
        // Write the region once so reads hit allocated data on both sides.
        let _ = writeln!(
            s,
            "fio --name=prefill --filename=/dev/{dev} --direct=1 --ioengine=libaio --rw=write --bs=1m --iodepth=8 --size={size} >/dev/null"
        );
    }
    s.push_str("echo BENCH-PREFILLED\n");
    for round in 0..o.rounds {
        for job in o.jobs() {
            for (cfg, dev) in o.configs() {
                let id = format!("{round}-{}-{cfg}", job.name);
                let _ = writeln!(
                    s,
                    "echo BENCH-BEGIN {id}\n\
                     fio --name={} --filename=/dev/{dev} --direct=1 --ioengine=libaio --rw={} --bs={} \
                     --iodepth={} --size={size} --runtime={} --ramp_time={} --time_based \
                     --randrepeat=0 --norandommap --output-format=json --output=/tmp/r.json\n\
                     echo BENCH-END {id}\necho BENCH-JSON-BEGIN {id}\ntr -d '\\n' < /tmp/r.json\necho\necho BENCH-JSON-END {id}",
                    job.name, job.rw, job.bs, job.qd, o.runtime, o.ramp
                );
            }
        }
    }
    s
}

struct Sample {
    iops: f64,
    mean_us: f64,
    p99_us: f64,
    /// CPU seconds the configuration's daemons used during the job.
    cpu_s: f64,
    ios: f64,
}

fn parse_fio(json_line: &str, rw: &str) -> Result<(f64, f64, f64, f64)> {
    let v: Value = serde_json::from_str(json_line).context("fio JSON")?;
    let job = &v["jobs"][0];
    let side = if rw.contains("read") { "read" } else { "write" };
    let d = &job[side];
    let iops = d["iops"].as_f64().context("iops")?;
    let mean = d["clat_ns"]["mean"].as_f64().unwrap_or(0.0) / 1000.0;
    let p99 = d["clat_ns"]["percentile"]["99.000000"]
        .as_f64()
        .unwrap_or(0.0)
        / 1000.0;
    let ios = d["total_ios"].as_f64().unwrap_or(0.0);
    if job["error"].as_i64().unwrap_or(0) != 0 {
        bail!("fio reported error {}", job["error"]);
    }
    Ok((iops, mean, p99, ios))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() -> Result<()> {
    let o = parse_args()?;
    guest::require_tools()?;
    let region = if o.smoke { "16M" } else { "256M" };
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(&dir.path().join("pki"))?;
    let storage = Storage::start(&pki, "s1", &dir.path().join("data"), &["b1:512MiB"])?;
    let vhost = Vhost::start(
        &pki,
        VhostOptions {
            socket: dir.path().join("keel.sock"),
            server: storage.addr,
            volume: "b1".into(),
            size: "512MiB".into(),
            epoch: 1,
            node_id: "n1".into(),
            num_queues: 1,
            read_only: false,
            extra: Vec::new(),
        },
    )?;
    // K2: primary on s1 (next to K1's copy), mirror on s2; writes carry epoch 2.
    let mirror = Storage::start(&pki, "s2", &dir.path().join("data2"), &[])?;
    replicate(&pki, "b2", 512 << 20, &storage, &[&mirror])?;
    let vhost2 = Vhost::start(
        &pki,
        VhostOptions {
            socket: dir.path().join("keel2.sock"),
            server: storage.addr,
            volume: "b2".into(),
            size: "512MiB".into(),
            epoch: 2,
            node_id: "n1".into(),
            num_queues: 1,
            read_only: false,
            extra: Vec::new(),
        },
    )?;
    let (mut qsd, qsd_sock) = start_qsd(dir.path(), 512 << 20)?;
    let nbd = start_nbd_peer(dir.path(), &pki.dir, 512 << 20, o.nodelay)?;
    let disk = |socket: &std::path::Path| Disk {
        socket: socket.to_path_buf(),
        num_queues: 1,
        reconnect: false,
    };
    let cfg = GuestConfig {
        // vda = K1, vdb = K2, vdc = Q, vdd = N.
        disks: vec![
            disk(&vhost.opts.socket),
            disk(&vhost2.opts.socket),
            disk(&qsd_sock),
            disk(&nbd.socket),
        ],
        script: guest_script(&o, region),
        timeout: Duration::from_secs(3600),
        ..GuestConfig::default()
    };
    // The CPU each configuration's daemons use. K1 and K2 share the primary's keel-storage; the
    // idle one's share is small.
    let pids = |cfg: &str| -> Vec<u32> {
        match cfg {
            "K1" => [storage.pid(), vhost.pid()].into_iter().flatten().collect(),
            "K2" => [storage.pid(), mirror.pid(), vhost2.pid()]
                .into_iter()
                .flatten()
                .collect(),
            "Q" => vec![qsd.id()],
            _ => nbd.pids().to_vec(),
        }
    };
    let cpu = |pids: &[u32]| pids.iter().map(|&p| cpu_ticks(p)).sum::<u64>();
    let tps = ticks_per_second();
    let g = guest::spawn(&cfg)?;
    let slot = Duration::from_secs(u64::from(o.runtime + o.ramp) + 120);
    g.wait_for_line("BENCH-PREFILLED", Duration::from_secs(600))?;
    let mut results: Vec<(String, String, Sample)> = Vec::new();
    for round in 0..o.rounds {
        for job in o.jobs() {
            for (cfgname, _) in o.configs() {
                let id = format!("{round}-{}-{cfgname}", job.name);
                let p = pids(cfgname);
                g.wait_for_line(&format!("BENCH-BEGIN {id}"), slot)?;
                let c0 = cpu(&p);
                g.wait_for_line(&format!("BENCH-END {id}"), slot)?;
                let c1 = cpu(&p);
                g.wait_for_line(&format!("BENCH-JSON-END {id}"), slot)?;
                let console = g.console();
                let begin = format!("BENCH-JSON-BEGIN {id}");
                let json_line = console
                    .lines()
                    .skip_while(|l| !l.contains(&begin))
                    .nth(1)
                    .with_context(|| format!("no fio JSON for {id}"))?;
                let (iops, mean_us, p99_us, ios) = parse_fio(json_line.trim(), job.rw)
                    .with_context(|| format!("parsing fio output of {id}"))?;
                let cpu_s = c1.saturating_sub(c0) as f64 / tps;
                eprintln!("bench: {id}: {iops:.0} IOPS, mean {mean_us:.0} µs, p99 {p99_us:.0} µs");
                results.push((
                    job.name.to_string(),
                    cfgname.to_string(),
                    Sample {
                        iops,
                        mean_us,
                        p99_us,
                        cpu_s,
                        ios,
                    },
                ));
            }
        }
    }
    let out = g.wait()?;
    if out.exit_status != Some(0) {
        bail!("benchmark guest failed: exit {:?}", out.exit_status);
    }
    let _ = qsd.kill();
    let _ = qsd.wait();
    drop(nbd);

    let header = format!(
        "Keel benchmark: {} round(s), {} s per job after {} s ramp, {} region, guest TCG 1 vCPU, fio libaio direct=1; \
         configurations alternated per job in the order {}.\n\n\
         K2 = Keel, 2 copies (keel-vhost → mTLS → primary keel-storage, which writes locally and to a mirror on a second keel-storage over mTLS before acknowledging); \
         K1 = Keel, 1 copy; Q = qemu-storage-daemon, local raw file, aio=native, cache.direct=on; \
         N = qemu-nbd (raw file, cache=none, aio=native) over NBD with mutual x509 TLS on loopback, opened by qemu-storage-daemon as vhost-user-blk{}. \
         CPU µs/IO: user+system time of the configuration's daemons (/proc/PID/stat) over the job, per I/O.\n\n",
        o.rounds,
        o.runtime,
        o.ramp,
        region,
        o.configs().map(|c| c.0).collect::<Vec<_>>().join(" "),
        if o.nodelay {
            " (TCP_NODELAY forced on both ends by libkeel_nodelay.so)"
        } else {
            " (Nagle left on, as qemu-nbd 7.2 does)"
        },
    );
    let (md, json_results) = summarize(&o, &results);
    let md = header + &md;
    std::fs::create_dir_all(&o.out)?;
    std::fs::write(o.out.join("results.md"), &md)?;
    std::fs::write(
        o.out.join("results.json"),
        serde_json::to_string_pretty(&json!({
            "rounds": o.rounds, "runtime_s": o.runtime, "ramp_s": o.ramp, "region": region,
            "nodelay": o.nodelay,
            "results": json_results["results"], "ratios": json_results["ratios"],
        }))?,
    )?;
    println!("{md}");
    println!("keel-bench: results in {}", o.out.display());
    drop(vhost);
    drop(vhost2);
    drop(storage);
    drop(mirror);
    Ok(())
}

/// The Markdown tables (one row per job and configuration, then the ratios and targets) and
/// their JSON form.
fn summarize(o: &Opts, results: &[(String, String, Sample)]) -> (String, Value) {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "| job | config | median IOPS | min–max IOPS | mean lat µs | p99 lat µs | CPU µs/IO |"
    );
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|");
    let mut rows = Vec::new();
    let mut med = std::collections::HashMap::new();
    for job in o.jobs() {
        for (cfgname, _) in o.configs() {
            let s: Vec<&Sample> = results
                .iter()
                .filter(|(j, c, _)| j == job.name && c == cfgname)
                .map(|(_, _, s)| s)
                .collect();
            let mut iops: Vec<f64> = s.iter().map(|x| x.iops).collect();
            let mut mean: Vec<f64> = s.iter().map(|x| x.mean_us).collect();
            let mut p99: Vec<f64> = s.iter().map(|x| x.p99_us).collect();
            let min = iops.iter().cloned().fold(f64::INFINITY, f64::min);
            let max = iops.iter().cloned().fold(0.0, f64::max);
            let m = median(&mut iops);
            let cpu: f64 = s.iter().map(|x| x.cpu_s).sum();
            let ios: f64 = s.iter().map(|x| x.ios).sum();
            let cpu_per_io = if ios > 0.0 { cpu / ios * 1e6 } else { 0.0 };
            let (mean, p99) = (median(&mut mean), median(&mut p99));
            med.insert((job.name, *cfgname), m);
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {:.0}–{:.0} | {:.0} | {:.0} | {:.1} |",
                job.name, cfgname, m, min, max, mean, p99, cpu_per_io
            );
            rows.push(json!({
                "job": job.name, "config": cfgname, "median_iops": m, "min_iops": min, "max_iops": max,
                "mean_lat_us": mean, "p99_lat_us": p99, "cpu_us_per_io": cpu_per_io,
                "rounds": s.len(),
            }));
        }
    }
    let ratio = |job: &str, a: &str, b: &str| -> Option<f64> {
        let (a, b) = (med.get(&(job, a))?, med.get(&(job, b))?);
        (*b > 0.0).then(|| a / b)
    };
    let fmt = |r: Option<f64>| r.map_or("–".to_string(), |r| format!("{r:.2}"));
    let _ = writeln!(
        md,
        "\n| job | K2/Q | K1/Q | K2/N | K1/N | K2/K1 | targets |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---|");
    let mut ratios = Vec::new();
    for job in o.jobs() {
        let r = |a, b| ratio(job.name, a, b);
        let mut verdicts = Vec::new();
        for (j, a, b, at_least) in TARGETS {
            if *j != job.name {
                continue;
            }
            if let Some(x) = r(a, b) {
                let met = x >= *at_least;
                verdicts.push(format!(
                    "{a}/{b} ≥ {at_least}: {}",
                    if met { "met" } else { "**not met**" }
                ));
            }
        }
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} |",
            job.name,
            fmt(r("K2", "Q")),
            fmt(r("K1", "Q")),
            fmt(r("K2", "N")),
            fmt(r("K1", "N")),
            fmt(r("K2", "K1")),
            verdicts.join("; ")
        );
        ratios.push(json!({
            "job": job.name, "K2/Q": r("K2", "Q"), "K1/Q": r("K1", "Q"), "K2/N": r("K2", "N"),
            "K1/N": r("K1", "N"), "K2/K1": r("K2", "K1"), "targets": verdicts,
        }));
    }
    (md, json!({"results": rows, "ratios": ratios}))
}
