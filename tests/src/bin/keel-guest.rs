//! keel-guest: boots the tiny test guest on vhost-user-blk sockets with its console on this
//! terminal. Used by `scripts/run-guest.sh`; tests use `keel_tests::guest` directly.
//!
//! Usage: keel-guest [--num-queues N] [--script FILE] SOCKET...
//! Without --script the guest drops into a busybox shell (`poweroff -f` to leave).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use keel_tests::guest::{self, Disk, GuestConfig};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut num_queues = 1u16;
    let mut script = String::from(
        "echo; echo 'Keel guest: /dev/vda is your volume. Try: fio --name=t --filename=/dev/vda --direct=1 --ioengine=libaio --rw=randrw --bs=4k --size=64M --iodepth=16'\necho 'Leave with: poweroff -f'\nsetsid cttyhack sh\n",
    );
    let mut sockets = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--num-queues" => {
                num_queues = args
                    .next()
                    .context("--num-queues needs a number")?
                    .parse()
                    .context("--num-queues needs a number")?
            }
            "--script" => {
                let f = args.next().context("--script needs a file")?;
                script = std::fs::read_to_string(&f).with_context(|| format!("reading {f}"))?;
            }
            "-h" | "--help" => {
                println!("usage: keel-guest [--num-queues N] [--script FILE] SOCKET...");
                return Ok(());
            }
            s => sockets.push(s.to_string()),
        }
    }
    if sockets.is_empty() {
        bail!("give at least one vhost-user-blk socket (see --help)");
    }
    guest::require_tools()?;
    let cfg = GuestConfig {
        disks: sockets
            .into_iter()
            .map(|s| Disk {
                socket: s.into(),
                num_queues,
                reconnect: true,
            })
            .collect(),
        script,
        timeout: Duration::from_secs(24 * 3600),
        ..GuestConfig::default()
    };
    let status = guest::interactive(&cfg)?;
    if !status.success() {
        bail!("QEMU exited with {status}");
    }
    Ok(())
}
