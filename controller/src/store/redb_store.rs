//! The embedded default store: one redb file, each write one durable transaction.

use std::path::Path;

use redb::{Database, ReadableTable, TableDefinition};
use tokio::sync::watch;

use super::{MetaStore, StoreError, Versioned};

/// key -> version (u64 LE) ++ value bytes.
const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");
/// "revision" -> newest revision.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Metadata in a redb database file.
pub struct RedbStore {
    db: Database,
    /// Serialises writers so the revision sequence has no gaps (redb allows one writer anyway).
    write: std::sync::Mutex<()>,
    rev: watch::Sender<u64>,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn decode(raw: &[u8]) -> Result<Versioned, StoreError> {
    let (v, value) = raw
        .split_first_chunk::<8>()
        .ok_or_else(|| backend("record shorter than its version"))?;
    Ok(Versioned {
        version: u64::from_le_bytes(*v),
        value: value.to_vec(),
    })
}

impl RedbStore {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        let db = Database::create(path).map_err(backend)?;
        let tx = db.begin_write().map_err(backend)?;
        let rev = {
            tx.open_table(RECORDS).map_err(backend)?;
            let meta = tx.open_table(META).map_err(backend)?;
            let rev = meta.get("revision").map_err(backend)?.map(|g| g.value());
            rev.unwrap_or(0)
        };
        tx.commit().map_err(backend)?;
        Ok(RedbStore {
            db,
            write: std::sync::Mutex::new(()),
            rev: watch::channel(rev).0,
        })
    }

    /// One write transaction: `f` sees the current version of `key` (0 if absent) and
    /// decides; the revision is bumped only when it writes.
    fn write(
        &self,
        key: &str,
        f: impl FnOnce(u64) -> Result<Option<Option<Vec<u8>>>, StoreError>,
    ) -> Result<u64, StoreError> {
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let tx = self.db.begin_write().map_err(backend)?;
        let new_rev = {
            let mut records = tx.open_table(RECORDS).map_err(backend)?;
            let mut meta = tx.open_table(META).map_err(backend)?;
            let current = match records.get(key).map_err(backend)? {
                Some(g) => decode(g.value())?.version,
                None => 0,
            };
            let Some(change) = f(current)? else {
                return Ok(current);
            };
            let rev = meta
                .get("revision")
                .map_err(backend)?
                .map(|g| g.value())
                .unwrap_or(0)
                + 1;
            match change {
                Some(value) => {
                    let mut raw = Vec::with_capacity(8 + value.len());
                    raw.extend_from_slice(&rev.to_le_bytes());
                    raw.extend_from_slice(&value);
                    records.insert(key, raw.as_slice()).map_err(backend)?;
                }
                None => {
                    records.remove(key).map_err(backend)?;
                }
            }
            meta.insert("revision", rev).map_err(backend)?;
            rev
        };
        tx.commit().map_err(backend)?;
        self.rev.send_replace(new_rev);
        Ok(new_rev)
    }
}

impl MetaStore for RedbStore {
    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let tx = self.db.begin_read().map_err(backend)?;
        let records = tx.open_table(RECORDS).map_err(backend)?;
        let got = records.get(key).map_err(backend)?;
        got.map(|g| decode(g.value())).transpose()
    }

    fn put(&self, key: &str, value: &[u8]) -> Result<u64, StoreError> {
        self.write(key, |_| Ok(Some(Some(value.to_vec()))))
    }

    fn cas(&self, key: &str, expected: u64, value: Option<&[u8]>) -> Result<u64, StoreError> {
        self.write(key, |current| {
            if current != expected {
                return Err(StoreError::Conflict {
                    key: key.to_string(),
                    current,
                });
            }
            if current == 0 && value.is_none() {
                // Deleting what is not there: nothing to write.
                return Ok(None);
            }
            Ok(Some(value.map(<[u8]>::to_vec)))
        })
    }

    fn txn(
        &self,
        compares: &[(&str, u64)],
        puts: &[(&str, &[u8])],
        deletes: &[&str],
    ) -> Result<Option<u64>, StoreError> {
        if let Some((k, _)) = puts.iter().find(|(k, _)| deletes.contains(k)) {
            return Err(backend(format!("transaction both writes and deletes {k}")));
        }
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let tx = self.db.begin_write().map_err(backend)?;
        let new_rev = {
            let mut records = tx.open_table(RECORDS).map_err(backend)?;
            let mut meta = tx.open_table(META).map_err(backend)?;
            for (key, expected) in compares {
                let current = match records.get(*key).map_err(backend)? {
                    Some(g) => decode(g.value())?.version,
                    None => 0,
                };
                if current != *expected {
                    // Dropped without commit: nothing is written.
                    return Ok(None);
                }
            }
            let current_rev = meta
                .get("revision")
                .map_err(backend)?
                .map(|g| g.value())
                .unwrap_or(0);
            let mut present = Vec::new();
            for key in deletes {
                if records.get(*key).map_err(backend)?.is_some() {
                    present.push(*key);
                }
            }
            if puts.is_empty() && present.is_empty() {
                return Ok(Some(current_rev));
            }
            let rev = current_rev + 1;
            for (key, value) in puts {
                let mut raw = Vec::with_capacity(8 + value.len());
                raw.extend_from_slice(&rev.to_le_bytes());
                raw.extend_from_slice(value);
                records.insert(*key, raw.as_slice()).map_err(backend)?;
            }
            for key in present {
                records.remove(key).map_err(backend)?;
            }
            meta.insert("revision", rev).map_err(backend)?;
            rev
        };
        tx.commit().map_err(backend)?;
        self.rev.send_replace(new_rev);
        Ok(Some(new_rev))
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        let tx = self.db.begin_read().map_err(backend)?;
        let records = tx.open_table(RECORDS).map_err(backend)?;
        let mut out = Vec::new();
        for item in records.range(prefix..).map_err(backend)? {
            let (k, v) = item.map_err(backend)?;
            let key = k.value();
            if !key.starts_with(prefix) {
                break;
            }
            out.push((key.to_string(), decode(v.value())?));
        }
        Ok(out)
    }

    fn revision(&self) -> u64 {
        *self.rev.borrow()
    }

    fn watch(&self) -> watch::Receiver<u64> {
        self.rev.subscribe()
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn versions_cas_list_and_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("meta.redb");
        let s = RedbStore::open(&path).expect("open");
        assert_eq!(s.revision(), 0);
        let v1 = s.cas("vol/a", 0, Some(b"one")).expect("create");
        assert_eq!(v1, 1);
        assert!(matches!(
            s.cas("vol/a", 0, Some(b"again")),
            Err(StoreError::Conflict { current: 1, .. })
        ));
        let v2 = s.cas("vol/a", v1, Some(b"two")).expect("update");
        assert!(v2 > v1);
        assert!(matches!(
            s.cas("vol/a", v1, Some(b"stale")),
            Err(StoreError::Conflict { .. })
        ));
        s.put("vol/b", b"b").expect("put");
        s.put("server/x", b"x").expect("put");
        let vols = s.list("vol/").expect("list");
        assert_eq!(
            vols.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            ["vol/a", "vol/b"]
        );
        assert_eq!(vols[0].1.value, b"two");
        let mut w = s.watch();
        let before = *w.borrow_and_update();
        s.cas(
            "vol/b",
            s.get("vol/b").expect("get").expect("some").version,
            None,
        )
        .expect("delete");
        assert!(w.has_changed().expect("watch"));
        assert!(*w.borrow() > before);
        assert!(s.get("vol/b").expect("get").is_none());
        let rev = s.revision();
        drop(s);
        let s = RedbStore::open(&path).expect("reopen");
        assert_eq!(s.revision(), rev, "revision survives a reopen");
        assert_eq!(s.get("vol/a").expect("get").expect("some").value, b"two");
        assert_eq!(s.list("vol/").expect("list").len(), 1);
    }

    fn version(s: &RedbStore, key: &str) -> u64 {
        s.get(key).expect("get").map(|v| v.version).unwrap_or(0)
    }

    #[test]
    fn txn_applies_all_or_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = RedbStore::open(&dir.path().join("meta.redb")).expect("open");
        let a = s.put("a", b"a1").expect("put");
        // Name-style create: only if absent, together with the record.
        let rev = s
            .txn(
                &[("name/x", 0), ("a", a)],
                &[("name/x", b"v1"), ("vol/v1", b"r")],
                &[],
            )
            .expect("txn")
            .expect("applied");
        assert_eq!(version(&s, "name/x"), rev);
        assert_eq!(version(&s, "vol/v1"), rev, "one revision for every put");
        assert_eq!(s.revision(), rev);
        // A second create of the same name: refused, and nothing of it is written.
        let before = s.revision();
        assert_eq!(
            s.txn(
                &[("name/x", 0)],
                &[("name/x", b"v2"), ("vol/v2", b"r")],
                &[]
            )
            .expect("txn"),
            None
        );
        assert!(s.get("vol/v2").expect("get").is_none());
        assert_eq!(s.get("name/x").expect("get").expect("some").value, b"v1");
        assert_eq!(s.revision(), before, "a refused txn bumps nothing");
        // Compares that hold: the puts and deletes apply together.
        let rev2 = s
            .txn(
                &[("name/x", rev), ("a", a)],
                &[("a", b"a2")],
                &["vol/v1", "absent"],
            )
            .expect("txn")
            .expect("applied");
        assert_eq!(version(&s, "a"), rev2);
        assert!(s.get("vol/v1").expect("get").is_none());
        // A stale compare anywhere in the list refuses the whole txn.
        assert_eq!(
            s.txn(&[("name/x", rev), ("a", a)], &[("b", b"b")], &["name/x"])
                .expect("txn"),
            None
        );
        assert!(s.get("b").expect("get").is_none());
        assert!(s.get("name/x").expect("get").is_some());
        // Nothing to write: applied without a new revision.
        assert_eq!(
            s.txn(&[("a", rev2)], &[], &["absent"]).expect("txn"),
            Some(rev2)
        );
        assert!(
            s.txn(&[], &[("k", b"v")], &["k"]).is_err(),
            "put and delete of one key"
        );
    }

    /// Threads race to take one name (compare absent) and to reserve room on one server
    /// (compare the server's fence, re-read on conflict): exactly one name holder, and the
    /// reservations never exceed the capacity.
    #[test]
    fn concurrent_txns_never_both_win() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = std::sync::Arc::new(RedbStore::open(&dir.path().join("meta.redb")).expect("open"));
        for round in 0..20 {
            let name = format!("name/n{round}");
            let fence = format!("alloc/s{round}");
            let wins: Vec<(bool, bool)> = std::thread::scope(|sc| {
                let hs: Vec<_> = (0..8)
                    .map(|t| {
                        let (s, name, fence) = (s.clone(), name.clone(), fence.clone());
                        sc.spawn(move || {
                            let vol = format!("vol/{round}-{t}");
                            let named = s
                                .txn(&[(&name, 0)], &[(&name, vol.as_bytes())], &[])
                                .expect("txn")
                                .is_some();
                            // Capacity 3 units: read the fence, count, reserve if room.
                            let reserved = loop {
                                let f = version(&s, &fence);
                                let used = s.list(&format!("res/{round}/")).expect("list").len();
                                if used >= 3 {
                                    break false;
                                }
                                let key = format!("res/{round}/{t}");
                                if s.txn(&[(&fence, f)], &[(&fence, b"x"), (&key, b"1")], &[])
                                    .expect("txn")
                                    .is_some()
                                {
                                    break true;
                                }
                            };
                            (named, reserved)
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().expect("join")).collect()
            });
            assert_eq!(
                wins.iter().filter(|w| w.0).count(),
                1,
                "round {round}: name"
            );
            assert_eq!(
                wins.iter().filter(|w| w.1).count(),
                3,
                "round {round}: room"
            );
            assert_eq!(s.list(&format!("res/{round}/")).expect("list").len(), 3);
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Random transactions over four keys against a model: applied exactly when every
        /// compare holds, then all puts and deletes at one new revision; otherwise nothing.
        #[test]
        fn txn_matches_a_model(
            ops in proptest::collection::vec(
                (
                    proptest::collection::vec((0usize..4, 0u8..3), 0..3),
                    proptest::collection::vec((0usize..4, 0u8..255), 0..3),
                    proptest::collection::vec(0usize..4, 0..2),
                ),
                1..24,
            )
        ) {
            let dir = tempfile::tempdir().expect("tempdir");
            let s = RedbStore::open(&dir.path().join("meta.redb")).expect("open");
            let keys = ["k0", "k1", "k2", "k3"];
            let mut model: std::collections::BTreeMap<&str, (u64, Vec<u8>)> = Default::default();
            let mut rev = 0u64;
            for (compares, puts, deletes) in ops {
                let cur = |k: &str, m: &std::collections::BTreeMap<&str, (u64, Vec<u8>)>| {
                    m.get(k).map(|e| e.0).unwrap_or(0)
                };
                // Mode 0: the version as it is; 1: one off; 2: "absent".
                let cmp: Vec<(&str, u64)> = compares
                    .iter()
                    .map(|(k, mode)| {
                        let v = cur(keys[*k], &model);
                        (keys[*k], match mode { 0 => v, 1 => v + 1, _ => 0 })
                    })
                    .collect();
                let put_vals: Vec<(&str, Vec<u8>)> =
                    puts.iter().map(|(k, b)| (keys[*k], vec![*b])).collect();
                let put: Vec<(&str, &[u8])> =
                    put_vals.iter().map(|(k, v)| (*k, v.as_slice())).collect();
                let del: Vec<&str> = deletes
                    .iter()
                    .map(|k| keys[*k])
                    .filter(|k| !put.iter().any(|(p, _)| p == k))
                    .collect();
                let holds = cmp.iter().all(|(k, v)| cur(k, &model) == *v);
                let got = s.txn(&cmp, &put, &del).expect("txn");
                if !holds {
                    proptest::prop_assert_eq!(got, None);
                } else {
                    let writes = !put.is_empty() || del.iter().any(|k| model.contains_key(k));
                    if writes {
                        rev += 1;
                        for (k, v) in &put {
                            model.insert(k, (rev, v.to_vec()));
                        }
                        for k in &del {
                            model.remove(k);
                        }
                    }
                    proptest::prop_assert_eq!(got, Some(rev));
                }
                proptest::prop_assert_eq!(s.revision(), rev);
                for k in keys {
                    let stored = s.get(k).expect("get").map(|v| (v.version, v.value));
                    proptest::prop_assert_eq!(stored, model.get(k).cloned());
                }
            }
        }
    }
}
