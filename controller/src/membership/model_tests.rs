//! A model of one replicated volume: the controller's record changed only through the pure
//! functions of [`super`], and storage servers following the storage-side rules of
//! docs/replication.md — a copy's epoch (never lowered), client admission (R3), replication
//! admission (a mirror accepts only its own epoch, R4), pushes to mirrors before the primary
//! (R2), acknowledgement only when every blocking mirror applied the write, else a drop
//! through the controller naming the primary's epoch (R5), rebuild then `synced` (R7),
//! promotion of an in-sync mirror of a failed primary (R6). Servers crash, hang, come back;
//! pushes get lost; the controller's view of liveness lags.
//!
//! After every step the invariants are checked: every acknowledged write is held by the
//! primary and every in-sync mirror; E strictly increases on every change; W ≤ E; a copy's
//! epoch never goes down nor past E; a copy outside the in-sync set is never promoted; only the
//! record's primary ever acknowledges (an old primary never does); nothing is promoted when no
//! in-sync mirror is up.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;
use crate::model::{AttachmentRecord, CopyRecord, CopyRole, Mode, VolumeRecord, VolumeRecordState};

const SERVERS: [&str; 4] = ["s0", "s1", "s2", "s3"];

/// A copy as a storage server holds it.
#[derive(Debug, Clone)]
struct Copy {
    role: CopyRole,
    epoch: u64,
    writer: u64,
    /// A primary's in-sync mirrors (its S), as last pushed.
    in_sync: Vec<String>,
    /// A primary's mirrors being rebuilt, as last pushed.
    rebuilding: Vec<String>,
    /// The writes it applied.
    data: BTreeSet<u64>,
    /// A primary: rebuilding mirrors whose copy pass completed cleanly, at that epoch.
    pass_clean: BTreeMap<String, u64>,
    /// A primary: rebuilding mirrors it asked the controller to put in sync, at that epoch.
    /// With [`Rules::synced_blocks`], such a mirror blocks acknowledgements like a member of S
    /// (and the set survives a crash).
    asked: BTreeMap<String, u64>,
}

#[derive(Debug, Clone)]
struct Server {
    running: bool,
    /// The controller's view: heartbeats within the failure timeout.
    seen_up: bool,
    /// Dropped or demoted, and no heartbeat since (not a rebuild target yet).
    dropped: bool,
    copy: Option<Copy>,
}

/// Storage-side rule variants.
#[derive(Debug, Clone, Copy)]
struct Rules {
    /// A primary that asked to have a rebuilt mirror put in sync treats it as a member of S
    /// for acknowledgements from then on (durably).
    synced_blocks: bool,
}

/// Which pushes get lost: two bits a push, lost when both are set.
#[derive(Debug, Clone, Copy)]
struct Loss(u64);

impl Loss {
    fn lost(&mut self) -> bool {
        let l = self.0 & 3 == 3;
        self.0 = self.0.rotate_right(2);
        l
    }
}

#[derive(Debug, Clone)]
enum Ev {
    /// The writer `w` (index into the writers, the last is current) writes to the record's
    /// primary (`to_primary`) or to server `s` (a stale view).
    Write {
        w: usize,
        to_primary: bool,
        s: usize,
        loss: u64,
    },
    Takeover {
        loss: u64,
    },
    Hang(usize),
    Resume(usize),
    Crash(usize),
    Heartbeat(usize),
    /// The controller stops hearing from the server (dead, or only the link).
    Timeout(usize),
    Reconcile {
        loss: u64,
    },
    RebuildPass {
        p: usize,
        m: usize,
    },
    AskSynced {
        p: usize,
        m: usize,
        loss: u64,
    },
    /// A node reports server `s` unreachable (R6 report): the controller probes it and
    /// promotes only if the probe fails.
    Report {
        s: usize,
        loss: u64,
    },
}

#[derive(Debug)]
struct World {
    rules: Rules,
    rec: VolumeRecord,
    servers: BTreeMap<String, Server>,
    acked: BTreeSet<u64>,
    next_write: u64,
    /// The writers' epochs, in attach order.
    writers: Vec<u64>,
    /// The record's epoch after the last step (E never goes down).
    last_epoch: u64,
    promotions: u32,
    acks: u32,
    refused_drops: u32,
    old_primary_acks: u32,
}

fn attachment(n: usize) -> AttachmentRecord {
    AttachmentRecord {
        node: format!("node{n}"),
        instance: "vm".into(),
        mode: Mode::ReadWrite,
        socket: String::new(),
        attached_at_unix: 0,
    }
}

impl World {
    fn new(replicas: usize, rules: Rules) -> World {
        let copies: Vec<CopyRecord> = SERVERS[..replicas]
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
            .collect();
        let mut servers = BTreeMap::new();
        for s in SERVERS {
            let copy = copies.iter().find(|c| c.server == s).map(|c| Copy {
                role: c.role,
                epoch: 1,
                writer: 1,
                in_sync: Vec::new(),
                rebuilding: Vec::new(),
                data: BTreeSet::new(),
                pass_clean: BTreeMap::new(),
                asked: BTreeMap::new(),
            });
            servers.insert(
                s.to_string(),
                Server {
                    running: true,
                    seen_up: true,
                    dropped: false,
                    copy,
                },
            );
        }
        let rec = VolumeRecord {
            id: "00000000000000aa".into(),
            name: None,
            size: 1 << 20,
            replicas: replicas as u32,
            block_size: 512,
            state: VolumeRecordState::Ready,
            epoch: 1,
            writer_epoch: 1,
            copies,
            attachments: vec![],
            created_at_unix: 0,
        };
        let mut w = World {
            rules,
            rec,
            servers,
            acked: BTreeSet::new(),
            next_write: 0,
            writers: Vec::new(),
            last_epoch: 1,
            promotions: 0,
            acks: 0,
            refused_drops: 0,
            old_primary_acks: 0,
        };
        w.takeover(Loss(0));
        w
    }

    fn srv(&self, s: &str) -> &Server {
        &self.servers[s]
    }

    fn srv_mut(&mut self, s: &str) -> &mut Server {
        self.servers.get_mut(s).expect("known server")
    }

    fn primary_server(&self) -> Option<String> {
        self.rec.primary().map(|p| p.server.clone())
    }

    /// Checks a membership function's effect on E: +1 exactly when it changed the record.
    fn changed(&self, before: &VolumeRecord, changed: bool) {
        if changed {
            assert_eq!(self.rec.epoch, before.epoch + 1, "a change bumps E by one");
        } else {
            assert_eq!(&self.rec, before, "a refusal changes nothing");
        }
        assert!(self.rec.writer_floor() <= self.rec.epoch, "W <= E");
    }

    /// R2: the record's membership to every copy, in-sync and rebuilding mirrors first, then
    /// the primary, then stale mirrors; servers the controller sees down are skipped (except
    /// the primary). Returns whether the primary took it.
    fn push(&mut self, loss: &mut Loss) -> bool {
        let rec = self.rec.clone();
        let mut order: Vec<&CopyRecord> = rec
            .copies
            .iter()
            .filter(|c| c.role == CopyRole::Mirror && (c.in_sync || c.rebuilding))
            .collect();
        order.extend(rec.copies.iter().filter(|c| c.role == CopyRole::Primary));
        order.extend(rec.copies.iter().filter(|c| is_stale_mirror(c)));
        order.retain(|c| c.role == CopyRole::Primary || self.srv(&c.server).seen_up);
        let in_sync: Vec<String> = rec
            .copies
            .iter()
            .filter(|c| c.role == CopyRole::Mirror && c.in_sync)
            .map(|c| c.server.clone())
            .collect();
        let rebuilding: Vec<String> = rec
            .copies
            .iter()
            .filter(|c| c.role == CopyRole::Mirror && c.rebuilding)
            .map(|c| c.server.clone())
            .collect();
        let mut primary_ok = false;
        for c in order {
            let lost = loss.lost();
            let s = self.srv_mut(&c.server);
            if !s.running || lost {
                continue;
            }
            let Some(copy) = s.copy.as_mut() else {
                continue;
            };
            if copy.epoch > rec.epoch {
                unreachable!("a copy is never ahead of the record");
            }
            copy.role = c.role;
            copy.epoch = rec.epoch;
            copy.writer = copy.writer.max(rec.writer_floor());
            if c.role == CopyRole::Primary {
                copy.in_sync = in_sync.clone();
                copy.rebuilding = rebuilding.clone();
                primary_ok = true;
            } else {
                copy.in_sync.clear();
                copy.rebuilding.clear();
            }
            let rb = copy.rebuilding.clone();
            copy.asked.retain(|m, _| rb.contains(m));
            copy.pass_clean.retain(|m, _| rb.contains(m));
        }
        primary_ok
    }

    /// R4: a replicated write at epoch `e` reaches mirror `m`.
    fn replicate(&mut self, m: &str, e: u64, id: u64) -> bool {
        let s = self.srv_mut(m);
        if !s.running {
            return false;
        }
        match s.copy.as_mut() {
            Some(c) if c.role == CopyRole::Mirror && c.epoch == e => {
                c.data.insert(id);
                true
            }
            _ => false,
        }
    }

    /// A write by a writer at epoch `c` sent to server `to`; returns whether it was
    /// acknowledged.
    fn write(&mut self, c: u64, to: &str, loss: &mut Loss) -> bool {
        {
            let s = self.srv(to);
            let Some(copy) = s.copy.as_ref().filter(|_| s.running) else {
                return false;
            };
            // R3.
            if copy.role != CopyRole::Primary || c < copy.writer || c > copy.epoch {
                return false;
            }
        }
        let id = self.next_write;
        self.next_write += 1;
        if let Some(copy) = self.srv_mut(to).copy.as_mut() {
            copy.data.insert(id);
        }
        for _ in 0..4 {
            let Some(p) = self.srv(to).copy.clone() else {
                return false;
            };
            if p.role != CopyRole::Primary {
                return false;
            }
            let e = p.epoch;
            let mut blocking = p.in_sync.clone();
            if self.rules.synced_blocks {
                let extra: Vec<String> = p
                    .asked
                    .keys()
                    .filter(|m| p.rebuilding.contains(m) && !blocking.contains(m))
                    .cloned()
                    .collect();
                blocking.extend(extra);
            }
            let mut failed = Vec::new();
            for m in &blocking {
                if !self.replicate(m, e, id) {
                    failed.push(m.clone());
                }
            }
            for m in p.rebuilding.iter().filter(|m| !blocking.contains(m)) {
                if !self.replicate(m, e, id) {
                    // R7: a missed forward voids the pass; it does not block the write.
                    if let Some(c) = self.srv_mut(to).copy.as_mut() {
                        c.pass_clean.remove(m);
                    }
                }
            }
            let Some(m) = failed.first().cloned() else {
                let primary = self.primary_server().unwrap_or_default();
                if primary != to {
                    // A replaced primary acknowledges only while the promoted mirror has not
                    // heard of its promotion (its push was lost): the write was replicated to
                    // it as a mirror, at the old epoch. Once it knows, never.
                    let np = self.srv(&primary).copy.as_ref();
                    assert!(
                        np.is_some_and(|c| c.role == CopyRole::Mirror
                            && c.epoch == e
                            && c.data.contains(&id)),
                        "replaced primary {to} acknowledged write {id} at epoch {e}; the new \
                         primary {primary} is {np:?}"
                    );
                    self.old_primary_acks += 1;
                }
                self.acked.insert(id);
                self.acks += 1;
                return true;
            };
            // R5: drop the mirror through the controller, naming our epoch.
            let before = self.rec.clone();
            match drop_mirror(&mut self.rec, to, e, Some(&m), &m) {
                Err(_) => {
                    self.changed(&before, false);
                    self.refused_drops += 1;
                    return false;
                }
                Ok(Change::Unchanged) => self.changed(&before, false),
                Ok(Change::Changed(d)) => {
                    self.changed(&before, true);
                    self.srv_mut(&d).dropped = true;
                }
            }
            if !self.push(loss) {
                return false;
            }
        }
        false
    }

    fn takeover(&mut self, mut loss: Loss) {
        let before = self.rec.clone();
        let n = self.writers.len();
        match attach(&mut self.rec, attachment(n), true) {
            Ok(Change::Changed(a)) => {
                assert!(a.bumped);
                self.changed(&before, true);
                assert_eq!(self.rec.writer_epoch, self.rec.epoch, "W := E");
                self.writers.push(self.rec.writer_epoch);
                self.push(&mut loss);
            }
            other => panic!("a forced read-write attach must change the record: {other:?}"),
        }
    }

    /// R6 through `promote` with liveness `up`.
    fn promote_with(&mut self, up: impl Fn(&str) -> bool, loss: &mut Loss) {
        let before = self.rec.clone();
        let can = before
            .copies
            .iter()
            .any(|c| c.role == CopyRole::Mirror && c.in_sync && up(&c.server));
        match promote(&mut self.rec, &up) {
            Ok(Promotion { old, new }) => {
                self.changed(&before, true);
                let was = before
                    .copies
                    .iter()
                    .find(|c| c.server == new)
                    .expect("promoted copy existed");
                assert!(
                    was.role == CopyRole::Mirror && was.in_sync,
                    "only an in-sync mirror is promoted: {was:?}"
                );
                assert!(can);
                self.srv_mut(&old).dropped = true;
                self.promotions += 1;
                self.push(loss);
            }
            Err(r) => {
                self.changed(&before, false);
                if let Refusal::NoInSyncMirror { .. } = r {
                    assert!(!can, "refused although an in-sync mirror is up");
                }
            }
        }
    }

    fn reconcile(&mut self, mut loss: Loss) {
        let seen: BTreeMap<String, bool> = self
            .servers
            .iter()
            .map(|(k, s)| (k.clone(), s.seen_up))
            .collect();
        let up = |s: &str| seen.get(s).copied().unwrap_or(false);
        let primary_down = self.rec.primary().is_some_and(|p| !up(&p.server));
        if primary_down {
            self.promote_with(up, &mut loss);
            return;
        }
        // Re-placement onto the first server holding no copy.
        let lost = self
            .rec
            .copies
            .iter()
            .any(|c| c.role == CopyRole::Mirror && !up(&c.server));
        let spare = SERVERS
            .iter()
            .find(|s| up(s) && !self.rec.copies.iter().any(|c| c.server == **s))
            .map(|s| s.to_string());
        if let (true, Some(to)) = (lost, spare) {
            let before = self.rec.clone();
            match replace_lost_mirror(&mut self.rec, up, &to) {
                Ok(_) => {
                    self.changed(&before, true);
                    // Created at W, empty (or an orphan kept by an idempotent create).
                    let w = self.rec.writer_floor();
                    let s = self.srv_mut(&to);
                    if s.running && !loss.lost() {
                        match s.copy.as_mut() {
                            Some(c) => {
                                c.role = CopyRole::Mirror;
                                c.epoch = c.epoch.max(w);
                            }
                            None => {
                                s.copy = Some(Copy {
                                    role: CopyRole::Mirror,
                                    epoch: w,
                                    writer: w,
                                    in_sync: Vec::new(),
                                    rebuilding: Vec::new(),
                                    data: BTreeSet::new(),
                                    pass_clean: BTreeMap::new(),
                                    asked: BTreeMap::new(),
                                })
                            }
                        }
                    }
                    self.push(&mut loss);
                    return;
                }
                Err(_) => self.changed(&before, false),
            }
        }
        let dropped: BTreeMap<String, bool> = self
            .servers
            .iter()
            .map(|(k, s)| (k.clone(), s.dropped))
            .collect();
        let before = self.rec.clone();
        match start_rebuild(&mut self.rec, up, |s| {
            up(s) && !dropped.get(s).copied().unwrap_or(true)
        }) {
            Ok(_) => self.changed(&before, true),
            Err(_) => self.changed(&before, false),
        }
        // Orphans on live servers are deleted.
        for (k, s) in self.servers.iter_mut() {
            if s.running && s.seen_up && !self.rec.copies.iter().any(|c| &c.server == k) {
                s.copy = None;
            }
        }
        self.push(&mut loss);
    }

    fn rebuild_pass(&mut self, p: &str, m: &str) {
        let Some(pc) = self.srv(p).copy.clone().filter(|_| self.srv(p).running) else {
            return;
        };
        if pc.role != CopyRole::Primary || !pc.rebuilding.iter().any(|x| x == m) {
            return;
        }
        let ms = self.srv_mut(m);
        if !ms.running {
            return;
        }
        match ms.copy.as_mut() {
            Some(c) if c.role == CopyRole::Mirror && c.epoch == pc.epoch => {
                c.data = pc.data.clone();
            }
            _ => return,
        }
        if let Some(c) = self.srv_mut(p).copy.as_mut() {
            c.pass_clean.insert(m.to_string(), pc.epoch);
        }
    }

    fn ask_synced(&mut self, p: &str, m: &str, mut loss: Loss) {
        let Some(pc) = self.srv(p).copy.clone().filter(|_| self.srv(p).running) else {
            return;
        };
        if pc.role != CopyRole::Primary || pc.pass_clean.get(m) != Some(&pc.epoch) {
            return;
        }
        if let Some(c) = self.srv_mut(p).copy.as_mut() {
            c.asked.insert(m.to_string(), pc.epoch);
        }
        let before = self.rec.clone();
        match mirror_synced(&mut self.rec, p, pc.epoch, Some(m), m) {
            Ok(Change::Changed(_)) => {
                self.changed(&before, true);
                self.push(&mut loss);
            }
            Ok(Change::Unchanged) | Err(_) => self.changed(&before, false),
        }
    }

    /// The R6 report path: the named server must be the primary; the controller's probe
    /// reaches it iff it runs; only then is the primary taken as down.
    fn report(&mut self, s: &str, mut loss: Loss) {
        if self.primary_server().as_deref() != Some(s) {
            return;
        }
        if self.srv(s).running {
            return; // primary_answers
        }
        let seen: BTreeMap<String, bool> = self
            .servers
            .iter()
            .map(|(k, x)| (k.clone(), x.seen_up))
            .collect();
        let probed = s.to_string();
        self.promote_with(
            |x| x != probed && seen.get(x).copied().unwrap_or(false),
            &mut loss,
        );
    }

    fn step(&mut self, ev: &Ev) {
        let name = |i: usize| SERVERS[i % SERVERS.len()].to_string();
        match ev {
            Ev::Write {
                w,
                to_primary,
                s,
                loss,
            } => {
                let c = self.writers[w % self.writers.len()];
                let to = match (to_primary, self.primary_server()) {
                    (true, Some(p)) => p,
                    _ => name(*s),
                };
                self.write(c, &to, &mut Loss(*loss));
            }
            Ev::Takeover { loss } => self.takeover(Loss(*loss)),
            Ev::Hang(i) => self.srv_mut(&name(*i)).running = false,
            Ev::Resume(i) => self.srv_mut(&name(*i)).running = true,
            Ev::Crash(i) => {
                let keep = self.rules.synced_blocks;
                let s = self.srv_mut(&name(*i));
                s.running = false;
                if let Some(c) = s.copy.as_mut() {
                    c.pass_clean.clear();
                    if !keep {
                        c.asked.clear();
                    }
                }
            }
            Ev::Heartbeat(i) => {
                let s = self.srv_mut(&name(*i));
                if s.running {
                    s.seen_up = true;
                    s.dropped = false;
                }
            }
            Ev::Timeout(i) => self.srv_mut(&name(*i)).seen_up = false,
            Ev::Reconcile { loss } => self.reconcile(Loss(*loss)),
            Ev::RebuildPass { p, m } => self.rebuild_pass(&name(*p), &name(*m)),
            Ev::AskSynced { p, m, loss } => self.ask_synced(&name(*p), &name(*m), Loss(*loss)),
            Ev::Report { s, loss } => self.report(&name(*s), Loss(*loss)),
        }
        self.check();
    }

    fn check(&mut self) {
        assert!(self.rec.epoch >= self.last_epoch, "E never goes down");
        self.last_epoch = self.rec.epoch;
        assert!(self.rec.writer_floor() <= self.rec.epoch, "W <= E");
        assert_eq!(
            self.rec
                .copies
                .iter()
                .filter(|c| c.role == CopyRole::Primary)
                .count(),
            1,
            "exactly one primary"
        );
        for (k, s) in &self.servers {
            if let Some(c) = &s.copy {
                assert!(c.epoch <= self.rec.epoch, "copy on {k} ahead of the record");
                assert!(c.writer <= c.epoch, "copy on {k}: w <= e");
            }
        }
        for c in &self.rec.copies {
            if c.role == CopyRole::Mirror && !c.in_sync {
                continue;
            }
            let data = self.srv(&c.server).copy.as_ref().map(|x| &x.data);
            let missing: Vec<u64> = self
                .acked
                .iter()
                .filter(|w| !data.is_some_and(|d| d.contains(w)))
                .copied()
                .collect();
            assert!(
                missing.is_empty(),
                "{} copy on {} lacks acknowledged writes {missing:?} (epoch {})",
                c.role.as_str(),
                c.server,
                self.rec.epoch
            );
        }
    }
}

fn ev() -> impl Strategy<Value = Ev> {
    let i = 0usize..4;
    prop_oneof![
        6 => (0usize..3, any::<bool>(), 0usize..4, any::<u64>()).prop_map(|(w, to_primary, s, loss)| Ev::Write { w, to_primary, s, loss }),
        1 => any::<u64>().prop_map(|loss| Ev::Takeover { loss }),
        2 => i.clone().prop_map(Ev::Hang),
        2 => i.clone().prop_map(Ev::Resume),
        1 => i.clone().prop_map(Ev::Crash),
        3 => i.clone().prop_map(Ev::Heartbeat),
        2 => i.clone().prop_map(Ev::Timeout),
        3 => any::<u64>().prop_map(|loss| Ev::Reconcile { loss }),
        2 => (i.clone(), i.clone()).prop_map(|(p, m)| Ev::RebuildPass { p, m }),
        2 => (i.clone(), i.clone(), any::<u64>()).prop_map(|(p, m, loss)| Ev::AskSynced { p, m, loss }),
        1 => (i, any::<u64>()).prop_map(|(s, loss)| Ev::Report { s, loss }),
    ]
}

const STRICT: Rules = Rules {
    synced_blocks: true,
};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn random_event_sequences_keep_every_invariant(
        replicas in 1usize..=3,
        evs in proptest::collection::vec(ev(), 1..150),
    ) {
        let mut w = World::new(replicas, STRICT);
        for e in &evs {
            w.step(e);
        }
    }
}

/// A seeded random walk, far longer than the proptest cases: 2,000 walks of 500 steps.
#[test]
fn seeded_random_walks_keep_every_invariant() {
    let stats = random_walks(STRICT);
    eprintln!("{stats}");
}

/// Runs the walks; panics on the first broken invariant; returns a summary.
fn random_walks(rules: Rules) -> String {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let (mut acks, mut promotions, mut refused, mut old) = (0u64, 0u64, 0u64, 0u64);
    let started = std::time::Instant::now();
    for walk in 0..2000u64 {
        let mut w = World::new(1 + (walk % 3) as usize, rules);
        for _ in 0..500 {
            let r = next();
            let i = (r >> 8) as usize % 4;
            let j = (r >> 16) as usize % 4;
            let loss = next();
            let e = match r % 40 {
                0..=15 => Ev::Write {
                    w: (r >> 24) as usize % 3,
                    to_primary: r >> 30 & 1 == 0,
                    s: i,
                    loss,
                },
                16 => Ev::Takeover { loss },
                17 => Ev::Hang(i),
                18 => Ev::Crash(i),
                19..=21 => Ev::Resume(i),
                22..=26 => Ev::Heartbeat(i),
                27 => Ev::Timeout(i),
                28..=31 => Ev::Reconcile { loss },
                32..=34 => Ev::RebuildPass { p: i, m: j },
                35..=37 => Ev::AskSynced { p: i, m: j, loss },
                _ => Ev::Report { s: i, loss },
            };
            w.step(&e);
        }
        acks += u64::from(w.acks);
        promotions += u64::from(w.promotions);
        refused += u64::from(w.refused_drops);
        old += u64::from(w.old_primary_acks);
    }
    assert!(acks > 1000 && promotions > 100 && refused > 10);
    format!(
        "1,000,000 steps in {:?}: {acks} acknowledged writes, {promotions} promotions, {refused} refused drops, {old} acknowledged by a replaced primary not yet known replaced",
        started.elapsed()
    )
}

/// Without the rule that an asked-for mirror blocks acknowledgements, the walks find the
/// synced window (see `synced_window_loses_a_write_unless_the_asked_mirror_blocks`).
#[test]
fn seeded_random_walks_find_the_synced_window_without_the_rule() {
    let r = std::panic::catch_unwind(|| {
        random_walks(Rules {
            synced_blocks: false,
        })
    });
    assert!(r.is_err(), "the walks must find the hole: {r:?}");
}

/// Two copies, a writer attached: (world, primary, mirror).
fn two_copies() -> (World, String, String) {
    let w = World::new(2, STRICT);
    (w, "s0".into(), "s1".into())
}

/// Race 1: promotion while a write is in flight. The write reaches the old primary after the
/// mirror was promoted (and pushed the new epoch first, R2): the mirror refuses the old
/// epoch, the old primary's drop names an old epoch and is refused — not acknowledged. The
/// writer resends to the new primary, which acknowledges; nothing acknowledged is lost.
#[test]
fn race_promotion_while_a_write_is_in_flight() {
    let (mut w, p, m) = two_copies();
    let c = *w.writers.last().expect("writer");
    assert!(w.write(c, &p, &mut Loss(0)));
    let before = w.acked.clone();
    // The primary hangs; the controller times it out and promotes the mirror.
    w.step(&Ev::Hang(0));
    w.step(&Ev::Timeout(0));
    w.step(&Ev::Reconcile { loss: 0 });
    assert_eq!(w.primary_server().as_deref(), Some(m.as_str()));
    // The in-flight write lands at the old primary, which resumes before hearing anything.
    w.step(&Ev::Resume(0));
    let refused = w.refused_drops;
    assert!(
        !w.write(c, &p, &mut Loss(0)),
        "old primary must not acknowledge"
    );
    assert_eq!(w.refused_drops, refused + 1, "its drop request is refused");
    // keel-vhost resends it to the new primary.
    assert!(w.write(c, &m, &mut Loss(0)));
    w.check();
    assert!(before.is_subset(&w.srv(&m).copy.as_ref().expect("copy").data));
}

/// Race 2: the old primary keeps running (SIGSTOP, then SIGCONT) with its old epoch and old
/// in-sync set, after the controller promoted its mirror from a node's report. Every write it
/// is sent is refused, however often; its data never counts as acknowledged.
#[test]
fn race_the_old_primary_still_running() {
    let (mut w, p, m) = two_copies();
    let c = *w.writers.last().expect("writer");
    w.step(&Ev::Hang(0));
    // A node's report; the controller's probe fails; the mirror is promoted.
    w.step(&Ev::Report { s: 0, loss: 0 });
    assert_eq!(w.primary_server().as_deref(), Some(m.as_str()));
    let e_old = w.srv(&p).copy.as_ref().expect("copy").epoch;
    assert!(e_old < w.rec.epoch);
    w.step(&Ev::Resume(0));
    for _ in 0..5 {
        assert!(!w.write(c, &p, &mut Loss(0)));
    }
    // The old primary still believes it is primary at its old epoch with the mirror in S.
    let old = w.srv(&p).copy.as_ref().expect("copy");
    assert_eq!(old.role, CopyRole::Primary);
    assert_eq!(old.in_sync, vec![m.clone()]);
    // Until the controller's reconciler reaches it: then it is a stale mirror.
    w.step(&Ev::Heartbeat(0));
    w.step(&Ev::Reconcile { loss: 0 });
    let old = w.srv(&p).copy.as_ref().expect("copy");
    assert_eq!(old.role, CopyRole::Mirror);
    assert!(w.write(c, &m, &mut Loss(0)));
}

/// Race 3: the dropped mirror comes back. It hung, the primary dropped it (R5) and kept
/// acknowledging; back, it holds an old epoch and misses writes. It is pushed `stale`, is not
/// rebuilt before a heartbeat, is never promoted while stale, and rejoins only through a clean
/// rebuild (R7) — after which it holds every acknowledged write.
#[test]
fn race_the_dropped_mirror_coming_back() {
    let (mut w, p, m) = two_copies();
    let c = *w.writers.last().expect("writer");
    w.step(&Ev::Hang(1));
    assert!(w.write(c, &p, &mut Loss(0)), "dropped, then acknowledged");
    assert!(is_stale_mirror(
        w.rec.copies.iter().find(|x| x.server == m).expect("mirror")
    ));
    assert!(w.write(c, &p, &mut Loss(0)));
    w.step(&Ev::Resume(1));
    // The primary fails now: the stale mirror must not be promoted.
    w.step(&Ev::Hang(0));
    w.step(&Ev::Timeout(0));
    w.step(&Ev::Reconcile { loss: 0 });
    assert_eq!(
        w.primary_server().as_deref(),
        Some(p.as_str()),
        "stale mirror promoted"
    );
    w.step(&Ev::Resume(0));
    w.step(&Ev::Heartbeat(0));
    // Not rebuilt before the mirror heartbeats again.
    w.step(&Ev::Reconcile { loss: 0 });
    assert!(is_stale_mirror(
        w.rec.copies.iter().find(|x| x.server == m).expect("mirror")
    ));
    w.step(&Ev::Heartbeat(1));
    w.step(&Ev::Reconcile { loss: 0 });
    assert!(w.rec.copies.iter().any(|x| x.server == m && x.rebuilding));
    // A write during the rebuild is forwarded; the pass copies everything; it rejoins.
    assert!(w.write(c, &p, &mut Loss(0)));
    w.step(&Ev::RebuildPass { p: 0, m: 1 });
    w.step(&Ev::AskSynced {
        p: 0,
        m: 1,
        loss: 0,
    });
    assert!(w.rec.copies.iter().any(|x| x.server == m && x.in_sync));
    assert!(w
        .acked
        .is_subset(&w.srv(&m).copy.as_ref().expect("copy").data));
    // Now it may be promoted.
    w.step(&Ev::Hang(0));
    w.step(&Ev::Report { s: 0, loss: 0 });
    assert_eq!(w.primary_server().as_deref(), Some(m.as_str()));
}

/// Nothing is promoted when no in-sync mirror exists (one copy, or the only mirror stale).
#[test]
fn nothing_is_promoted_without_an_in_sync_mirror() {
    let (mut w, p, _m) = two_copies();
    let c = *w.writers.last().expect("writer");
    w.step(&Ev::Hang(1));
    assert!(w.write(c, &p, &mut Loss(0)));
    let e = w.rec.epoch;
    w.step(&Ev::Hang(0));
    w.step(&Ev::Report { s: 0, loss: 0 });
    w.step(&Ev::Timeout(0));
    w.step(&Ev::Reconcile { loss: 0 });
    assert_eq!(w.primary_server().as_deref(), Some(p.as_str()));
    assert_eq!(w.rec.epoch, e);
}

/// The window R7 leaves open unless the primary treats a mirror it asked to have put in sync
/// as a member of S: the controller commits `synced` at E' and pushes the mirror first (R2);
/// the push to the primary is lost (or simply not there yet); the primary, still at E with an
/// S that lacks the mirror, acknowledges a write whose forward the mirror refused (stale
/// epoch) without blocking — and the mirror, in S by the record, lacks it.
#[test]
fn synced_window_loses_a_write_unless_the_asked_mirror_blocks() {
    for synced_blocks in [false, true] {
        let mut w = World::new(2, Rules { synced_blocks });
        let c = *w.writers.last().expect("writer");
        w.step(&Ev::Hang(1));
        assert!(w.write(c, "s0", &mut Loss(0)));
        w.step(&Ev::Resume(1));
        w.step(&Ev::Heartbeat(1));
        w.step(&Ev::Reconcile { loss: 0 });
        w.step(&Ev::RebuildPass { p: 0, m: 1 });
        // The push order is s1 (the mirror) then s0 (the primary): lose the second push.
        w.step(&Ev::AskSynced {
            p: 0,
            m: 1,
            loss: 0b1100,
        });
        assert!(w.rec.copies.iter().any(|x| x.server == "s1" && x.in_sync));
        assert!(w.srv("s0").copy.as_ref().expect("copy").epoch < w.rec.epoch);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let acked = w.write(c, "s0", &mut Loss(0));
            w.check();
            acked
        }));
        if synced_blocks {
            assert_eq!(outcome.ok(), Some(false), "the asked mirror blocks the ack");
        } else {
            assert!(outcome.is_err(), "the hole is there without the rule");
        }
    }
}
