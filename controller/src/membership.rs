//! The membership and epoch rules of docs/replication.md as pure functions over a volume
//! record: every change of E, W, the primary or the in-sync set goes through one of these,
//! inside the compare-and-swap of `service.rs`. Liveness is passed in (a predicate over server
//! ids, or a chosen target), so the rules can be driven by a model (`model_tests`).
//!
//! Each function either changes the record — and then bumps E by exactly one (R1) — or leaves
//! it untouched and says why ([`Refusal`]), or reports that the change is already made
//! ([`Change::Unchanged`]).

use crate::model::{AttachmentRecord, CopyRecord, CopyRole, Mode, VolumeRecord};

/// The result of a change that may already have been made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change<T> {
    /// The record changed (E bumped); `T` says what changed.
    Changed(T),
    /// The record already is in the asked state: nothing to commit.
    Unchanged,
}

/// Why a membership change was not made. The messages are the API's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("server {server} is not the primary of volume {volume}")]
    NotPrimary { server: String, volume: String },
    #[error("epoch {given} is not the volume's epoch {current}: the primary's view is old")]
    OldEpoch { given: u64, current: u64 },
    #[error("{mirror} is not a mirror of volume {volume}")]
    NoSuchMirror { mirror: String, volume: String },
    #[error("{mirror} is not being rebuilt for volume {volume}")]
    NotRebuilding { mirror: String, volume: String },
    #[error("volume {volume} is already attached {mode} to instance {instance} on node {node}; detach it first")]
    AlreadyAttached {
        volume: String,
        mode: String,
        instance: String,
        node: String,
    },
    #[error("volume {volume} is attached read-write to instance {instance} on node {node}; detach it there, or force the takeover (--force) to fence that writer")]
    WriterAttached {
        volume: String,
        instance: String,
        node: String,
    },
    #[error("volume {volume} is not attached to instance {instance} on node {node}")]
    NotAttached {
        volume: String,
        instance: String,
        node: String,
    },
    #[error("volume {volume} is attached on {MAX_NODES} nodes already, the most its copies' access list holds; detach it somewhere first")]
    TooManyNodes { volume: String },
    #[error("volume {volume} has no primary")]
    NoPrimary { volume: String },
    #[error("the primary of volume {volume} is up")]
    PrimaryUp { volume: String },
    #[error("the primary of volume {volume} is down")]
    PrimaryDown { volume: String },
    #[error("volume {volume} has no in-sync mirror on a server that is up")]
    NoInSyncMirror { volume: String },
    #[error("volume {volume} has no mirror on a server that is down")]
    NoLostMirror { volume: String },
    #[error("volume {volume} has no stale mirror that may be rebuilt")]
    NoStaleMirror { volume: String },
    #[error("server {server} already holds a copy of volume {volume}")]
    TargetHoldsCopy { server: String, volume: String },
}

impl Refusal {
    /// Whether the refusal means "no such thing" (404) rather than "not now" (409).
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            Refusal::NoSuchMirror { .. } | Refusal::NotAttached { .. }
        )
    }
}

/// Most nodes one volume may be attached on: each is a line of its copies' access list, which
/// must stay within [`keel_proto::members::MAX_MEMBERSHIP_PAYLOAD`] (a node id is at most 64
/// bytes: 256 lines of at most 73 bytes, with the mirrors' lines, fit easily).
pub const MAX_NODES: usize = 256;

/// A promotion (R6): `old` was the primary's server, `new` the promoted mirror's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Promotion {
    pub old: String,
    pub new: String,
}

/// A read-write or read-only attachment made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    /// E was bumped (always: the access list changed), and for a read-write attach W := E.
    pub bumped: bool,
    /// The writer a forced takeover removed.
    pub fenced: Option<AttachmentRecord>,
}

fn bump(v: &mut VolumeRecord) {
    v.epoch += 1;
}

/// R1/R3: a read-write attach or a forced detach replaces the writer: E := E + 1, W := E.
fn fence_writer(v: &mut VolumeRecord) {
    bump(v);
    v.writer_epoch = v.epoch;
}

/// R5/R7: a report about a mirror is accepted only from the volume's primary (`reporter`, a
/// server id) naming the volume's current epoch.
pub fn check_reporter(v: &VolumeRecord, reporter: &str, epoch: u64) -> Result<(), Refusal> {
    if v.primary().map(|p| p.server.as_str()) != Some(reporter) {
        return Err(Refusal::NotPrimary {
            server: reporter.to_string(),
            volume: v.id.clone(),
        });
    }
    if epoch != v.epoch {
        return Err(Refusal::OldEpoch {
            given: epoch,
            current: v.epoch,
        });
    }
    Ok(())
}

/// The index of the mirror on server `mirror` (`None`: the reported address is no registered
/// server's); `label` names it in the refusal.
fn mirror_index(v: &VolumeRecord, mirror: Option<&str>, label: &str) -> Result<usize, Refusal> {
    mirror
        .and_then(|m| {
            v.copies
                .iter()
                .position(|c| c.role == CopyRole::Mirror && c.server == m)
        })
        .ok_or_else(|| Refusal::NoSuchMirror {
            mirror: label.to_string(),
            volume: v.id.clone(),
        })
}

/// R5: the primary `reporter`, at `epoch`, could not replicate to the mirror on server
/// `mirror` (`label`: its address): the mirror leaves the in-sync (or rebuilding) set and
/// becomes stale. Returns the dropped mirror's server.
pub fn drop_mirror(
    v: &mut VolumeRecord,
    reporter: &str,
    epoch: u64,
    mirror: Option<&str>,
    label: &str,
) -> Result<Change<String>, Refusal> {
    check_reporter(v, reporter, epoch)?;
    let i = mirror_index(v, mirror, label)?;
    let m = &mut v.copies[i];
    if !m.in_sync && !m.rebuilding {
        return Ok(Change::Unchanged);
    }
    m.in_sync = false;
    m.rebuilding = false;
    let server = m.server.clone();
    bump(v);
    Ok(Change::Changed(server))
}

/// R7: the primary `reporter`, at `epoch`, finished rebuilding the mirror on `mirror`: it
/// joins the in-sync set.
pub fn mirror_synced(
    v: &mut VolumeRecord,
    reporter: &str,
    epoch: u64,
    mirror: Option<&str>,
    label: &str,
) -> Result<Change<String>, Refusal> {
    check_reporter(v, reporter, epoch)?;
    let i = mirror_index(v, mirror, label)?;
    let volume = v.id.clone();
    let m = &mut v.copies[i];
    if m.in_sync {
        return Ok(Change::Unchanged);
    }
    if !m.rebuilding {
        return Err(Refusal::NotRebuilding {
            mirror: label.to_string(),
            volume,
        });
    }
    m.rebuilding = false;
    m.in_sync = true;
    let server = m.server.clone();
    bump(v);
    Ok(Change::Changed(server))
}

fn primary_up(v: &VolumeRecord, up: &impl Fn(&str) -> bool) -> Result<(), Refusal> {
    match v.primary() {
        None => Err(Refusal::NoPrimary {
            volume: v.id.clone(),
        }),
        Some(p) if !up(&p.server) => Err(Refusal::PrimaryDown {
            volume: v.id.clone(),
        }),
        Some(_) => Ok(()),
    }
}

/// R10: the in-sync mirrors on servers for which `lost` holds leave the in-sync set (stale);
/// E bumps once if any did. Returns their servers.
pub fn drop_lost(v: &mut VolumeRecord, lost: impl Fn(&str) -> bool) -> Vec<String> {
    let mut dropped = Vec::new();
    for m in v
        .copies
        .iter_mut()
        .filter(|c| c.role == CopyRole::Mirror && c.in_sync && lost(&c.server))
    {
        m.in_sync = false;
        m.rebuilding = false;
        dropped.push(m.server.clone());
    }
    if !dropped.is_empty() {
        bump(v);
    }
    dropped
}

/// Whether `c` is a stale mirror (dropped, not being rebuilt).
pub fn is_stale_mirror(c: &CopyRecord) -> bool {
    c.role == CopyRole::Mirror && !c.in_sync && !c.rebuilding
}

/// R7/R8: with the primary's server up, the first stale mirror for which `target` holds
/// (its server is up and has heartbeated since its drop) starts being rebuilt. Returns its
/// server.
pub fn start_rebuild(
    v: &mut VolumeRecord,
    up: impl Fn(&str) -> bool,
    target: impl Fn(&str) -> bool,
) -> Result<String, Refusal> {
    primary_up(v, &up)?;
    let volume = v.id.clone();
    let m = v
        .copies
        .iter_mut()
        .find(|c| is_stale_mirror(c) && target(&c.server))
        .ok_or(Refusal::NoStaleMirror { volume })?;
    m.rebuilding = true;
    let server = m.server.clone();
    bump(v);
    Ok(server)
}

/// Re-replication: with the primary's server up, the first mirror whose server is down
/// moves to server `to` (which holds no copy of the volume) as `rebuilding`. Returns the server
/// it left.
pub fn replace_lost_mirror(
    v: &mut VolumeRecord,
    up: impl Fn(&str) -> bool,
    to: &str,
) -> Result<String, Refusal> {
    primary_up(v, &up)?;
    if v.copies.iter().any(|c| c.server == to) {
        return Err(Refusal::TargetHoldsCopy {
            server: to.to_string(),
            volume: v.id.clone(),
        });
    }
    let volume = v.id.clone();
    let m = v
        .copies
        .iter_mut()
        .find(|c| c.role == CopyRole::Mirror && !up(&c.server))
        .ok_or(Refusal::NoLostMirror { volume })?;
    let old = std::mem::replace(&mut m.server, to.to_string());
    m.in_sync = false;
    m.rebuilding = true;
    bump(v);
    Ok(old)
}

/// R6: the primary's server is down by `up` (the controller's own view: heartbeats, or its
/// probe after a node's report); the first in-sync mirror whose server is up becomes the
/// primary, the old primary a stale mirror. A copy outside the in-sync set is never promoted;
/// with none, nothing changes.
pub fn promote(v: &mut VolumeRecord, up: impl Fn(&str) -> bool) -> Result<Promotion, Refusal> {
    let volume = v.id.clone();
    let pi = v
        .copies
        .iter()
        .position(|c| c.role == CopyRole::Primary)
        .ok_or(Refusal::NoPrimary {
            volume: volume.clone(),
        })?;
    if up(&v.copies[pi].server) {
        return Err(Refusal::PrimaryUp { volume });
    }
    let mi = v
        .copies
        .iter()
        .position(|c| c.role == CopyRole::Mirror && c.in_sync && up(&c.server))
        .ok_or(Refusal::NoInSyncMirror { volume })?;
    v.copies[pi].role = CopyRole::Mirror;
    v.copies[pi].in_sync = false;
    v.copies[pi].rebuilding = false;
    v.copies[mi].role = CopyRole::Primary;
    v.copies[mi].in_sync = true;
    v.copies[mi].rebuilding = false;
    bump(v);
    Ok(Promotion {
        old: v.copies[pi].server.clone(),
        new: v.copies[mi].server.clone(),
    })
}

/// Attaches `a`. A read-write attach bumps E and sets W := E (the old writer, with `force`,
/// is removed and fenced); a second read-write attach without `force` is refused. A read-only
/// attach bumps E only (the copies' access lists change: docs/security.md). The same node and
/// instance attached in the same mode is [`Change::Unchanged`].
pub fn attach(
    v: &mut VolumeRecord,
    a: AttachmentRecord,
    force: bool,
) -> Result<Change<Attached>, Refusal> {
    if let Some(x) = v
        .attachments
        .iter()
        .find(|x| x.node == a.node && x.instance == a.instance)
    {
        if x.mode == a.mode {
            return Ok(Change::Unchanged);
        }
        return Err(Refusal::AlreadyAttached {
            volume: v.id.clone(),
            mode: x.mode.as_str().replace('_', "-"),
            instance: x.instance.clone(),
            node: x.node.clone(),
        });
    }
    let nodes: std::collections::BTreeSet<&str> =
        v.attachments.iter().map(|x| x.node.as_str()).collect();
    if !nodes.contains(a.node.as_str()) && nodes.len() >= MAX_NODES {
        return Err(Refusal::TooManyNodes {
            volume: v.id.clone(),
        });
    }
    let mut out = Attached {
        bumped: false,
        fenced: None,
    };
    if a.mode == Mode::ReadWrite {
        if let Some(w) = v.writer().cloned() {
            if !force {
                return Err(Refusal::WriterAttached {
                    volume: v.id.clone(),
                    instance: w.instance,
                    node: w.node,
                });
            }
            v.attachments.retain(|x| x != &w);
            out.fenced = Some(w);
        }
        fence_writer(v);
    } else {
        bump(v);
    }
    out.bumped = true;
    v.attachments.push(a);
    Ok(Change::Changed(out))
}

/// The attachment of `node`/`instance`.
pub fn find_attachment(
    v: &VolumeRecord,
    node: &str,
    instance: &str,
) -> Result<AttachmentRecord, Refusal> {
    v.attachments
        .iter()
        .find(|a| a.node == node && a.instance == instance)
        .cloned()
        .ok_or_else(|| Refusal::NotAttached {
            volume: v.id.clone(),
            instance: instance.to_string(),
            node: node.to_string(),
        })
}

/// Removes attachment `a` and bumps E (the copies' access lists change); a forced detach of
/// the writer also sets W := E (fencing it). Returns whether E moved (always).
pub fn detach(v: &mut VolumeRecord, a: &AttachmentRecord, force: bool) -> bool {
    v.attachments.retain(|x| x != a);
    if force && a.mode == Mode::ReadWrite {
        fence_writer(v);
    } else {
        bump(v);
    }
    true
}

/// The access list every copy of `v` is given with its membership (docs/security.md): each
/// node with an attachment, read-write if any of its attachments is (one certificate per
/// host: instances on one node share it), and the storage server of the primary, the only
/// peer the mirrors take replicated requests from. Pure; sorted by node for stable pushes.
/// The digest of [`access_list`] a storage server reports for a copy that has it
/// ([`keel_proto::members::MemberList::access_digest`]).
pub fn access_digest(v: &VolumeRecord) -> u32 {
    let (primary, grants) = access_list(v);
    keel_proto::members::MemberList {
        primary,
        grants,
        ..Default::default()
    }
    .access_digest()
}

pub fn access_list(v: &VolumeRecord) -> (Option<String>, Vec<keel_proto::members::Grant>) {
    use keel_proto::members::{Access, Grant};
    let mut grants: Vec<Grant> = Vec::new();
    for a in &v.attachments {
        let access = match a.mode {
            Mode::ReadWrite => Access::ReadWrite,
            Mode::ReadOnly => Access::ReadOnly,
        };
        match grants.iter_mut().find(|g| g.node == a.node) {
            Some(g) => g.access = g.access.max(access),
            None => grants.push(Grant {
                node: a.node.clone(),
                access,
            }),
        }
    }
    grants.sort_by(|a, b| a.node.cmp(&b.node));
    (v.primary().map(|p| p.server.clone()), grants)
}

#[cfg(test)]
mod model_tests;

#[cfg(test)]
mod access_tests {
    use super::*;
    use crate::model::VolumeRecordState;
    use keel_proto::members::Access;

    fn volume() -> VolumeRecord {
        VolumeRecord {
            id: "00000000000000ab".into(),
            name: None,
            size: 1 << 20,
            replicas: 2,
            block_size: 512,
            state: VolumeRecordState::Ready,
            epoch: 1,
            writer_epoch: 1,
            copies: ["s1", "s2"]
                .iter()
                .enumerate()
                .map(|(i, s)| CopyRecord {
                    server: s.to_string(),
                    role: if i == 0 {
                        CopyRole::Primary
                    } else {
                        CopyRole::Mirror
                    },
                    in_sync: true,
                    rebuilding: false,
                })
                .collect(),
            attachments: vec![],
            created_at_unix: 0,
        }
    }

    fn att(node: &str, instance: &str, mode: Mode) -> AttachmentRecord {
        AttachmentRecord {
            node: node.into(),
            instance: instance.into(),
            mode,
            socket: String::new(),
            attached_at_unix: 0,
        }
    }

    #[test]
    fn every_attachment_change_moves_e_and_the_access_list() {
        let mut v = volume();
        let empty = access_digest(&v);
        assert_eq!(access_list(&v), (Some("s1".into()), vec![]));
        // Read-only attach: E moves, W stays; n2 may read.
        assert!(matches!(
            attach(&mut v, att("n2", "r", Mode::ReadOnly), false),
            Ok(Change::Changed(Attached { bumped: true, .. }))
        ));
        assert_eq!((v.epoch, v.writer_floor()), (2, 1));
        let ro = access_digest(&v);
        assert_ne!(ro, empty);
        // Read-write attach of another instance on the same node: one entry, read-write.
        assert!(attach(&mut v, att("n2", "w", Mode::ReadWrite), false).is_ok());
        assert_eq!((v.epoch, v.writer_floor()), (3, 3));
        let (_, grants) = access_list(&v);
        assert_eq!(grants.len(), 1);
        assert_eq!(grants[0].access, Access::ReadWrite);
        // Detaching the writer instance leaves n2 read-only again; E moves, W stays.
        let w = find_attachment(&v, "n2", "w").expect("attached");
        assert!(detach(&mut v, &w, false));
        assert_eq!((v.epoch, v.writer_floor()), (4, 3));
        assert_eq!(access_digest(&v), ro);
        // The primary named follows a promotion-like role change.
        v.copies[0].role = CopyRole::Mirror;
        v.copies[1].role = CopyRole::Primary;
        assert_eq!(access_list(&v).0.as_deref(), Some("s2"));
        assert_ne!(access_digest(&v), ro);
    }

    #[test]
    fn a_volume_is_attached_on_at_most_max_nodes() {
        let mut v = volume();
        for n in 0..MAX_NODES {
            attach(&mut v, att(&format!("n{n}"), "r", Mode::ReadOnly), false).expect("attach");
        }
        // Another instance on a node already there is fine; a new node is refused.
        attach(&mut v, att("n0", "r2", Mode::ReadOnly), false).expect("same node");
        assert!(matches!(
            attach(&mut v, att("extra", "r", Mode::ReadOnly), false),
            Err(Refusal::TooManyNodes { .. })
        ));
        // The full list still fits a set-membership payload.
        let (primary, grants) = access_list(&v);
        let list = keel_proto::members::MemberList {
            primary,
            grants,
            ..Default::default()
        };
        assert!(list.encode().len() < keel_proto::members::MAX_MEMBERSHIP_PAYLOAD / 4);
    }
}
