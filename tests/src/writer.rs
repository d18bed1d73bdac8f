//! What the cluster tests' writer does through a test VMM: writes with a known pattern, reads
//! back and compares, and the copies `keelctl volume describe` shows.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use crate::keel_up::{connect_vmm, Cluster};
use crate::vmm::*;

pub const CAPACITY: &str = "4GiB";

pub fn vmm_opts(io_timeout: Duration) -> VmmOptions {
    VmmOptions {
        io_timeout,
        ..VmmOptions::default()
    }
}

/// Waits for `socket` to appear and connects a test VMM to it.
pub fn connect(socket: &Path, io_timeout: Duration) -> Result<TestVmm> {
    connect_vmm(socket, vmm_opts(io_timeout))
}

/// Writes `len` bytes of `pattern(seed, ...)` at `sector` and requires OK.
pub fn write_ok(vmm: &mut TestVmm, sector: u64, len: usize, seed: u64) -> Result<()> {
    let st = vmm.write(0, sector, &pattern(seed, sector, len))?;
    ensure!(
        st == VIRTIO_BLK_S_OK,
        "write of {len} bytes at sector {sector} returned status {st}, expected OK"
    );
    Ok(())
}

/// Reads `len` bytes at `sector` and requires OK and `pattern(seed, ...)`.
pub fn verify(vmm: &mut TestVmm, sector: u64, len: usize, seed: u64) -> Result<()> {
    let (st, d) = vmm.read(0, sector, len)?;
    ensure!(
        st == VIRTIO_BLK_S_OK,
        "read of {len} bytes at sector {sector} returned status {st}, expected OK"
    );
    let want = pattern(seed, sector, len);
    if d != want {
        let bad = d
            .chunks(512)
            .zip(want.chunks(512))
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        bail!(
            "data mismatch reading {len} bytes at sector {sector} (seed {seed}): first bad sector {}",
            sector + bad as u64
        );
    }
    Ok(())
}

pub fn flush_ok(vmm: &mut TestVmm) -> Result<()> {
    let st = vmm.flush(0)?;
    ensure!(st == VIRTIO_BLK_S_OK, "flush returned status {st}");
    Ok(())
}

/// What the test wrote: `(sector, len, seed)`. A write at a sector already written replaces
/// the earlier entry (tests rewrite ranges only at the same sector and length).
pub struct Written(pub Vec<(u64, usize, u64)>);

impl Written {
    pub fn write(&mut self, vmm: &mut TestVmm, sector: u64, len: usize, seed: u64) -> Result<()> {
        write_ok(vmm, sector, len, seed)?;
        self.0.retain(|&(s, _, _)| s != sector);
        self.0.push((sector, len, seed));
        Ok(())
    }

    pub fn verify_all(&self, vmm: &mut TestVmm) -> Result<()> {
        for &(s, l, seed) in &self.0 {
            verify(vmm, s, l, seed)?;
        }
        Ok(())
    }
}

/// Creates a two-copy volume, waits until both copies report, attaches it read-write to
/// node1/vm1 and connects a test VMM; returns the primary's and the mirror's servers.
pub fn two_copies(cluster: &Cluster, volume: &str) -> Result<(String, String, TestVmm)> {
    let v = cluster.json(&[
        "volume",
        "create",
        "64MiB",
        "--name",
        volume,
        "--replicas",
        "2",
    ])?;
    let c = copies(&v);
    let find = |role: &str| {
        c.iter()
            .find(|x| x.1 == role)
            .map(|x| x.0.clone())
            .with_context(|| format!("no {role}: {v}"))
    };
    let (primary, mirror) = (find("primary")?, find("mirror")?);
    cluster.wait_for(Duration::from_secs(10), "both copies reported", || {
        copies(&cluster.describe(volume).ok()?)
            .iter()
            .all(|x| x.2 == "ok" || x.2 == "in_sync")
            .then_some(())
    })?;
    let (sock, _) = cluster.attach(volume, "node1", "vm1", &[])?;
    let vmm = connect(&sock, Duration::from_secs(60))?;
    Ok((primary, mirror, vmm))
}

/// The copies of `describe` as `(server, role, state)`.
pub fn copies(v: &Value) -> Vec<(String, String, String)> {
    copy_fields(v, ["server", "role", "state"])
        .into_iter()
        .map(|[a, b, c]| (a, b, c))
        .collect()
}

/// The string fields `keys` of each copy `keelctl volume describe -o json` shows (empty where
/// one is missing).
pub fn copy_fields<const N: usize>(v: &Value, keys: [&str; N]) -> Vec<[String; N]> {
    v["copies"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| keys.map(|k| c[k].as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}
