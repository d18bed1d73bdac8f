//! Printing API answers as aligned tables (for people) or JSON (stable, for scripts).

use keel_api::{DeleteResult, NodeInfo, ServerInfo, VolumeInfo};
use serde::Serialize;

use crate::Format;

/// `1073741824` -> `1 GiB`, `1536` -> `1.5 KiB` ([`keel_proto::human_size`]).
pub fn human(bytes: u64) -> String {
    keel_proto::human_size(bytes)
}

fn json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn table(head: &[&str], rows: Vec<Vec<String>>) {
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(head.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

fn ago(ms: u64) -> String {
    if ms == u64::MAX {
        "never".into()
    } else {
        format!("{:.1}s ago", ms as f64 / 1000.0)
    }
}

fn health(h: keel_api::Health) -> String {
    serde_json::to_value(h)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

pub fn servers(f: Format, list: &[ServerInfo]) -> anyhow::Result<()> {
    if f == Format::Json {
        return json(&list);
    }
    table(
        &[
            "ID",
            "ADDRESS",
            "ZONE",
            "HEALTH",
            "CAPACITY",
            "ALLOCATED",
            "COPIES",
            "LAST SEEN",
        ],
        list.iter()
            .map(|s| {
                vec![
                    s.id.clone(),
                    s.address.clone(),
                    s.zone.clone(),
                    health(s.health),
                    human(s.capacity_bytes),
                    human(s.allocated_bytes),
                    s.copies.to_string(),
                    ago(s.last_seen_ms_ago),
                ]
            })
            .collect(),
    );
    Ok(())
}

pub fn nodes(f: Format, list: &[NodeInfo]) -> anyhow::Result<()> {
    if f == Format::Json {
        return json(&list);
    }
    table(
        &["ID", "HEALTH", "ATTACHMENTS", "SOCKET DIR", "LAST SEEN"],
        list.iter()
            .map(|n| {
                vec![
                    n.id.clone(),
                    health(n.health),
                    n.attachments.to_string(),
                    n.socket_dir.clone(),
                    ago(n.last_seen_ms_ago),
                ]
            })
            .collect(),
    );
    Ok(())
}

fn state(v: &VolumeInfo) -> String {
    serde_json::to_value(v.state)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

pub fn volumes(f: Format, list: &[VolumeInfo]) -> anyhow::Result<()> {
    if f == Format::Json {
        return json(&list);
    }
    table(
        &[
            "ID",
            "NAME",
            "SIZE",
            "STATE",
            "EPOCH",
            "COPIES",
            "ATTACHED TO",
        ],
        list.iter()
            .map(|v| {
                vec![
                    v.id.clone(),
                    v.name.clone().unwrap_or_else(|| "-".into()),
                    human(v.size),
                    state(v),
                    v.epoch.to_string(),
                    v.copies.len().to_string(),
                    v.attachments
                        .iter()
                        .map(|a| format!("{}/{}", a.node, a.instance))
                        .collect::<Vec<_>>()
                        .join(","),
                ]
            })
            .collect(),
    );
    Ok(())
}

pub fn volume(f: Format, v: &VolumeInfo) -> anyhow::Result<()> {
    if f == Format::Json {
        return json(v);
    }
    println!("id:        {}", v.id);
    println!("name:      {}", v.name.as_deref().unwrap_or("-"));
    println!("size:      {} ({} bytes)", human(v.size), v.size);
    println!("state:     {}", state(v));
    println!("epoch:     {}", v.epoch);
    println!("replicas:  {}", v.replicas);
    println!("block size: {}", v.block_size);
    println!("copies:");
    table(
        &["  SERVER", "ADDRESS", "ROLE", "STATE"],
        v.copies
            .iter()
            .map(|c| {
                vec![
                    format!("  {}", c.server),
                    c.address.clone(),
                    c.role.clone(),
                    match c.rebuild_percent {
                        Some(p) => format!("{} {p}%", c.state),
                        None => c.state.clone(),
                    },
                ]
            })
            .collect(),
    );
    if v.attachments.is_empty() {
        println!("attachments: none");
    } else {
        println!("attachments:");
        table(
            &["  NODE", "INSTANCE", "MODE", "CONNECTED", "SOCKET"],
            v.attachments
                .iter()
                .map(|a| {
                    vec![
                        format!("  {}", a.node),
                        a.instance.clone(),
                        a.mode.clone(),
                        a.connected.to_string(),
                        a.socket.clone(),
                    ]
                })
                .collect(),
        );
    }
    Ok(())
}

/// After an attach: JSON is the attachment (socket, mode, epoch, and `ready`: the socket
/// accepts connections, as the node reported); the table form prints the socket to give QEMU.
pub fn attached(f: Format, v: &VolumeInfo, node: &str, instance: &str) -> anyhow::Result<()> {
    let a = v
        .attachments
        .iter()
        .find(|a| a.node == node && a.instance == instance);
    if f == Format::Json {
        #[derive(Serialize)]
        struct Attached<'a> {
            volume: &'a str,
            node: &'a str,
            instance: &'a str,
            socket: Option<&'a str>,
            mode: Option<&'a str>,
            epoch: u64,
            ready: bool,
        }
        return json(&Attached {
            volume: &v.id,
            node,
            instance,
            socket: a.map(|a| a.socket.as_str()),
            mode: a.map(|a| a.mode.as_str()),
            epoch: v.epoch,
            ready: a.is_some_and(|a| a.ready),
        });
    }
    match a {
        Some(a) => {
            println!(
                "attached {} to {node}/{instance} ({}, epoch {})",
                v.id, a.mode, v.epoch
            );
            println!("socket: {}", a.socket);
            print!("{}", qemu_hint(&a.socket));
        }
        None => println!("attached {}", v.id),
    }
    Ok(())
}

/// The QEMU options that attach a volume served on `socket`, several lines, each ending in a
/// newline, complete enough to paste after `qemu-system-x86_64 -kernel ...` (checked against
/// QEMU 7.2 booting the test kernel). keel-vhost reads and writes the guest's buffers
/// directly, so the guest's RAM must be a shared memory backend of the size given to `-m`; the
/// node manager (`keel-vhost node`) offers `--num-queues` virtqueues (default 1), which
/// `num-queues` must not exceed. `reconnect=1` rather than `reconnect-ms=`: QEMU 7.2 (Debian
/// 12) refuses `reconnect-ms`, which replaced it in QEMU 9.2.
fn qemu_hint(socket: &str) -> String {
    // QEMU option values escape a comma by doubling it.
    let path = socket.replace(',', ",,");
    format!(
        "qemu:   the disk; vhost-user needs the guest's RAM in shared memory, size= equal to -m:\n\
         \x20         -m 1G -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem\n\
         \x20         -chardev socket,id=keel0,path={path},reconnect=1\n\
         \x20         -device vhost-user-blk-pci,chardev=keel0,num-queues=1\n\
         \x20       num-queues may be raised up to the node's `keel-vhost node --num-queues` (default 1);\n\
         \x20       or run qemu-configs/qemu.sh SOCKET (see qemu-configs/README.md)\n"
    )
}

pub fn deleted(f: Format, r: &DeleteResult) -> anyhow::Result<()> {
    if f == Format::Json {
        return json(r);
    }
    if r.complete {
        println!("deleted {}", r.id);
    } else {
        println!(
            "deleting {}: a storage server is unreachable; the controller finishes when it is back",
            r.id
        );
    }
    Ok(())
}

#[cfg(test)]
mod unit_tests {
    use super::{human, qemu_hint};

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1 << 30), "1 GiB");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(10 << 30), "10 GiB");
    }

    #[test]
    fn qemu_hint_is_complete() {
        let hint = qemu_hint("/run/keel/a,b.sock");
        for needed in [
            "-m 1G -object memory-backend-memfd,id=mem,size=1G,share=on",
            "-numa node,memdev=mem",
            "-chardev socket,id=keel0,path=/run/keel/a,,b.sock,reconnect=1",
            "-device vhost-user-blk-pci,chardev=keel0,num-queues=1",
            "vhost-user needs the guest's RAM in shared memory, size= equal to -m",
        ] {
            assert!(hint.contains(needed), "missing {needed:?} in:\n{hint}");
        }
        assert!(hint.ends_with('\n'));
        assert!(hint.lines().all(|l| l.len() <= 100), "{hint}");
    }
}
