//! The admission rules of a copy as pure functions (docs/security.md, docs/protocol.md): who
//! may send a data request to a copy ([`authorize`], the access list) and at which epochs
//! ([`admission`]). [`crate::copy::Copy`] applies them under its fencing gate; keeping them
//! apart from the file and its locks lets the tables of cases be tested directly.

use keel_proto::members::{Access, MemberList};
use keel_proto::tls::Identity;
use keel_proto::{Epoch, Op, Role};

/// What a copy is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyRole {
    Primary = 1,
    Mirror = 2,
}

/// Why a copy refuses a data request at a given epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The copy was deleted.
    Deleted,
    /// The request's epoch is older than the copy's (carried): the client was fenced.
    Stale(Epoch),
    /// The request's epoch is newer than the copy's (carried), or a node's request reached a
    /// mirror.
    NotPrimary(Epoch),
    /// The peer's role may not send data requests to this copy (a controller, an admin; a
    /// storage server to a primary).
    Unauthorized,
    /// A newer connection of the same client claimed the copy (carried: the copy's epoch):
    /// this connection was abandoned ([`crate::session`]).
    Superseded(Epoch),
    /// A mutation from a node granted read-only access (carried: the copy's epoch).
    ReadOnly(Epoch),
    /// A node whose grant this copy withdrew (a detach, a takeover): it was fenced. Answered
    /// `stale epoch` without an epoch, so its client fails the guest's I/O at once (a node
    /// that never had a grant gets `unauthorized` and learns nothing).
    Revoked,
    /// The copy failed an I/O (docs/replication.md, R10; carried: its epoch): it serves
    /// nothing more, and another copy takes over. Answered only to peers the copy's access
    /// list allows (checked first).
    Lost(Epoch),
}

/// Whether an op changes data.
pub fn is_mutation(op: Op) -> bool {
    matches!(op, Op::Write | Op::WriteZeroes | Op::Discard)
}

/// The access rule (docs/security.md): may `peer` send data op `op` to a copy whose access
/// list is `list`? A node needs a grant for its certificate id (read-write for a mutation); a
/// storage server must be the primary the list names; nobody else sends data ops. Checked
/// before the epoch rules, so a refusal tells the peer nothing about the copy. Pure, so the
/// table of cases is unit-tested.
pub fn authorize(list: &MemberList, peer: &Identity, op: Op, epoch: Epoch) -> Result<(), Refusal> {
    match peer.role {
        Role::Node => match list.access_of(&peer.id) {
            None => Err(Refusal::Unauthorized),
            Some(Access::ReadOnly) if is_mutation(op) => Err(Refusal::ReadOnly(epoch)),
            Some(_) => Ok(()),
        },
        Role::Storage if list.primary.as_deref() == Some(peer.id.as_str()) => Ok(()),
        _ => Err(Refusal::Unauthorized),
    }
}

/// The epoch rules for a data request with epoch `request` from a peer of role `peer` on a copy
/// with `role`, `epoch` and `writer_epoch` (see the module documentation and
/// `docs/protocol.md`). Pure, so the table of cases is unit-tested.
pub fn admission(
    role: CopyRole,
    epoch: Epoch,
    writer_epoch: Epoch,
    request: Epoch,
    peer: Role,
) -> Result<(), Refusal> {
    match peer {
        Role::Node => {
            if request < writer_epoch {
                Err(Refusal::Stale(epoch))
            } else if role != CopyRole::Primary || request > epoch {
                Err(Refusal::NotPrimary(epoch))
            } else {
                Ok(())
            }
        }
        Role::Storage => {
            if request < epoch {
                Err(Refusal::Stale(epoch))
            } else if role != CopyRole::Mirror {
                // A primary takes data only from nodes.
                Err(Refusal::Unauthorized)
            } else if request > epoch {
                Err(Refusal::NotPrimary(epoch))
            } else {
                Ok(())
            }
        }
        Role::Controller | Role::Admin => Err(Refusal::Unauthorized),
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    /// The access rule, as a table: (access list, peer, op) → outcome.
    #[test]
    fn access_rules_table() {
        let list = MemberList::parse(b"primary s1\nnode w rw\nnode r ro").expect("list");
        let id = |role, id: &str| Identity {
            role,
            id: id.into(),
        };
        let e = Epoch(4);
        let unauth = Err(Refusal::Unauthorized);
        let all = [
            Op::Read,
            Op::Write,
            Op::Flush,
            Op::Discard,
            Op::WriteZeroes,
            Op::Ping,
            Op::Claim,
        ];
        for op in all {
            // The writer's node may do everything; a node without a grant nothing.
            assert_eq!(authorize(&list, &id(Role::Node, "w"), op, e), Ok(()));
            assert_eq!(authorize(&list, &id(Role::Node, "evil"), op, e), unauth);
            // A read-only grant: everything but mutations.
            let want = if is_mutation(op) {
                Err(Refusal::ReadOnly(e))
            } else {
                Ok(())
            };
            assert_eq!(
                authorize(&list, &id(Role::Node, "r"), op, e),
                want,
                "{op:?}"
            );
            // Only the named primary among storage servers.
            assert_eq!(authorize(&list, &id(Role::Storage, "s1"), op, e), Ok(()));
            assert_eq!(authorize(&list, &id(Role::Storage, "s2"), op, e), unauth);
            // Ids are not roles: a node called s1, a storage server called w.
            assert_eq!(authorize(&list, &id(Role::Node, "s1"), op, e), unauth);
            assert_eq!(authorize(&list, &id(Role::Storage, "w"), op, e), unauth);
            assert_eq!(authorize(&list, &id(Role::Controller, "s1"), op, e), unauth);
            assert_eq!(authorize(&list, &id(Role::Admin, "w"), op, e), unauth);
            // An empty list allows nobody.
            let none = MemberList::default();
            assert_eq!(authorize(&none, &id(Role::Node, "w"), op, e), unauth);
            assert_eq!(authorize(&none, &id(Role::Storage, "s1"), op, e), unauth);
        }
    }

    /// The epoch rules, as a table: (copy role, copy epoch, writer epoch, request epoch, peer
    /// role) → outcome.
    #[test]
    fn epoch_rules_table() {
        use CopyRole::{Mirror as M, Primary as P};
        let ok = Ok(());
        let stale = |e| Err(Refusal::Stale(Epoch(e)));
        let notp = |e| Err(Refusal::NotPrimary(Epoch(e)));
        let unauth = Err(Refusal::Unauthorized);
        type Case = (CopyRole, u64, u64, u64, Role, Result<(), Refusal>);
        let table: &[Case] = &[
            // A node on a primary: fenced below the writer epoch, behind above the epoch,
            // accepted in between (a membership bump alone keeps the writer).
            (P, 5, 5, 5, Role::Node, ok),
            (P, 5, 5, 4, Role::Node, stale(5)),
            (P, 5, 5, 6, Role::Node, notp(5)),
            (P, 7, 5, 5, Role::Node, ok),
            (P, 7, 5, 6, Role::Node, ok),
            (P, 7, 5, 7, Role::Node, ok),
            (P, 7, 5, 4, Role::Node, stale(7)),
            (P, 7, 5, 8, Role::Node, notp(7)),
            // A node on a mirror: never served (stale writers are still told they are fenced).
            (M, 7, 5, 5, Role::Node, notp(7)),
            (M, 7, 5, 7, Role::Node, notp(7)),
            (M, 7, 5, 4, Role::Node, stale(7)),
            // A storage server (a primary replicating) on a mirror: exactly the mirror's epoch.
            (M, 7, 5, 7, Role::Storage, ok),
            (M, 7, 5, 6, Role::Storage, stale(7)),
            (M, 7, 5, 5, Role::Storage, stale(7)),
            (M, 7, 5, 8, Role::Storage, notp(7)),
            // A storage server on a primary: not its business (stale senders are told so).
            (P, 7, 5, 7, Role::Storage, unauth),
            (P, 7, 5, 8, Role::Storage, unauth),
            (P, 7, 5, 6, Role::Storage, stale(7)),
            // Other roles do no I/O.
            (P, 7, 5, 7, Role::Controller, unauth),
            (M, 7, 5, 7, Role::Admin, unauth),
        ];
        for &(role, e, w, c, peer, want) in table {
            assert_eq!(
                admission(role, Epoch(e), Epoch(w), Epoch(c), peer),
                want,
                "{role:?} e={e} w={w} request={c} peer={peer}"
            );
        }
    }
}
