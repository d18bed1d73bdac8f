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
}
