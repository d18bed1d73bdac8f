//! The set of copies a storage server holds: one file per copy under `<data-dir>/copies/`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use keel_proto::{Epoch, VolumeId};

use crate::copy::{Copy, CopyError, CopyRole};

/// All copies of one server, by volume.
pub struct Store {
    dir: PathBuf,
    /// Taken briefly: lookups on every request, insertions and removals. Never held across
    /// disk I/O.
    copies: RwLock<HashMap<VolumeId, Arc<Copy>>>,
    /// Serialises creations and deletions (which fsync) without blocking lookups.
    admin: Mutex<()>,
    /// Copy files that could not be opened at start (R10), by volume: reported lost, kept on
    /// disk until the controller deletes the copy.
    broken: Mutex<HashMap<VolumeId, Broken>>,
}

/// A copy file [`Store::open`] could not open.
#[derive(Debug, Clone)]
pub struct Broken {
    pub path: PathBuf,
    /// Why (the open error).
    pub why: String,
}

impl Store {
    /// Opens (creating if needed) a data directory and every copy in it.
    pub fn open(data_dir: &Path) -> Result<Store, CopyError> {
        let dir = data_dir.join("copies");
        std::fs::create_dir_all(&dir).map_err(|source| CopyError::Io {
            path: dir.clone(),
            source,
        })?;
        let mut copies = HashMap::new();
        let mut broken = HashMap::new();
        let entries = std::fs::read_dir(&dir).map_err(|source| CopyError::Io {
            path: dir.clone(),
            source,
        })?;
        for e in entries {
            let e = e.map_err(|source| CopyError::Io {
                path: dir.clone(),
                source,
            })?;
            let p = e.path();
            match p.extension().and_then(|x| x.to_str()) {
                Some("keel") => match Copy::open(&p) {
                    Ok(c) => {
                        tracing::info!(volume = %c.volume(), size = c.size(), epoch = %c.epoch(), "opened copy");
                        copies.insert(c.volume(), Arc::new(c));
                    }
                    // One unreadable copy must not keep the server's other copies down: it
                    // is reported lost (R10) and left on disk as it is.
                    Err(e) => match volume_of(&p) {
                        Some(v) => {
                            tracing::error!(volume = %v, path = %p.display(), error = %e, "copy file cannot be opened: reported lost, left as it is");
                            broken.insert(
                                v,
                                Broken {
                                    path: p.clone(),
                                    why: format!("unreadable at start: {e}"),
                                },
                            );
                        }
                        None => {
                            tracing::error!(path = %p.display(), error = %e, "a file in the copies directory is not a copy; ignored");
                        }
                    },
                },
                Some("members-tmp") => {
                    // A membership list replaced by a change that was never acknowledged.
                    let _ = std::fs::remove_file(&p);
                }
                Some("creating") => {
                    // A creation interrupted before its rename: it was never acknowledged.
                    tracing::warn!(path = %p.display(), "removing an interrupted copy creation");
                    let _ = std::fs::remove_file(&p);
                }
                _ => {}
            }
        }
        Ok(Store {
            dir,
            copies: RwLock::new(copies),
            admin: Mutex::new(()),
            broken: Mutex::new(broken),
        })
    }

    /// The copy files that could not be opened at start and are not deleted yet.
    pub fn broken(&self) -> Vec<(VolumeId, Broken)> {
        self.broken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(v, b)| (*v, b.clone()))
            .collect()
    }

    fn path_of(&self, v: VolumeId) -> PathBuf {
        self.dir.join(format!("{v}.keel"))
    }

    pub fn get(&self, v: VolumeId) -> Option<Arc<Copy>> {
        self.copies
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&v)
            .cloned()
    }

    pub fn list(&self) -> Vec<Arc<Copy>> {
        self.copies
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Sum of the sizes of every copy, in bytes (what the copies may take on disk once fully
    /// written).
    pub fn used_bytes(&self) -> u64 {
        self.copies
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .fold(0u64, |sum, c| sum.saturating_add(c.size()))
    }

    fn lock_admin(&self) -> std::sync::MutexGuard<'_, ()> {
        self.admin.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates a copy; if one exists with the same size it is kept as it is (idempotent; its
    /// role and epoch are not changed), otherwise [`CopyError::Exists`].
    pub fn create(
        &self,
        v: VolumeId,
        size: u64,
        role: CopyRole,
        epoch: Epoch,
    ) -> Result<Arc<Copy>, CopyError> {
        let _admin = self.lock_admin();
        if self
            .broken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&v)
        {
            // Its file is still there: the controller deletes the lost copy first.
            return Err(CopyError::Exists(v));
        }
        if let Some(c) = self.get(v) {
            return if c.size() == size {
                Ok(c)
            } else {
                Err(CopyError::Exists(v))
            };
        }
        let c = Arc::new(Copy::create(&self.path_of(v), v, size, role, epoch)?);
        self.copies
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(v, c.clone());
        Ok(c)
    }

    /// Deletes a copy and its file, returning it (`None` if there was none: deleting is
    /// idempotent). Data requests admitted before finish first; later ones are refused (the
    /// copy is marked deleted), also through references taken before the deletion.
    pub fn delete(&self, v: VolumeId) -> Result<Option<Arc<Copy>>, CopyError> {
        let _admin = self.lock_admin();
        self.delete_broken(v)?;
        let Some(c) = self.get(v) else {
            return Ok(None);
        };
        // The file first: if that fails nothing changed. Requests running meanwhile write to
        // the unlinked file and complete before the deletion is answered.
        match std::fs::remove_file(c.path()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(CopyError::Io {
                    path: c.path().to_owned(),
                    source,
                })
            }
        }
        match std::fs::remove_file(crate::copy::members_path(c.path())) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(CopyError::Io {
                    path: crate::copy::members_path(c.path()),
                    source,
                })
            }
        }
        c.retire();
        self.copies
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&v);
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| CopyError::Io {
                path: self.dir.clone(),
                source,
            })?;
        Ok(Some(c))
    }
}

impl Store {
    /// Removes a broken copy's files (if `v` has one), then forgets it.
    fn delete_broken(&self, v: VolumeId) -> Result<(), CopyError> {
        let Some(b) = self
            .broken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&v)
            .cloned()
        else {
            return Ok(());
        };
        for p in [b.path.clone(), crate::copy::members_path(&b.path)] {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(CopyError::Io { path: p, source }),
            }
        }
        self.broken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&v);
        tracing::info!(volume = %v, path = %b.path.display(), "deleted a copy that could not be opened");
        Ok(())
    }
}

/// The volume a copy file is named for (`<id>.keel`).
fn volume_of(path: &Path) -> Option<VolumeId> {
    path.file_stem()?.to_str()?.parse().ok()
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    /// R10: a copy whose file is removed under it reports a fault but keeps serving from its
    /// open file; a deletion then clears it.
    #[test]
    fn a_copy_whose_file_was_removed_reports_a_fault_and_still_serves() {
        let d = tempfile::tempdir().expect("tmp");
        let s = Store::open(d.path()).expect("open");
        let c = s
            .create(VolumeId(1), 8 << 20, CopyRole::Primary, Epoch(1))
            .expect("create");
        c.write(0, &[7u8; 4096]).expect("write");
        assert_eq!(c.fault(), None);
        std::fs::remove_file(c.path()).expect("remove");
        let f = c.fault().expect("a removed file is a fault");
        assert!(f.contains("removed"), "{f}");
        assert!(!c.is_failed(), "it still serves");
        let mut b = vec![0u8; 4096];
        c.read(0, &mut b).expect("read");
        assert_eq!(b, vec![7u8; 4096]);
        assert!(s.delete(VolumeId(1)).expect("delete").is_some());
        assert_eq!(c.fault(), None, "a deleted copy is no longer reported");
    }

    /// R10: a copy file that cannot be opened does not keep the store (and so the server)
    /// from opening; it is reported broken, refuses a create until deleted, and the delete
    /// removes its files.
    #[test]
    fn a_damaged_copy_file_is_set_aside_not_fatal() {
        let d = tempfile::tempdir().expect("tmp");
        let s = Store::open(d.path()).expect("open");
        let good = s
            .create(VolumeId(1), 8 << 20, CopyRole::Primary, Epoch(1))
            .expect("create");
        let bad = s
            .create(VolumeId(2), 8 << 20, CopyRole::Mirror, Epoch(1))
            .expect("create");
        let bad_path = bad.path().to_owned();
        drop((good, bad, s));
        std::fs::write(&bad_path, vec![0x5au8; 8192]).expect("damage");
        // A stray file that is not a copy is ignored.
        std::fs::write(d.path().join("copies").join("notes.keel"), b"x").expect("stray");

        let s = Store::open(d.path()).expect("a damaged copy must not stop the store");
        assert!(s.get(VolumeId(1)).is_some(), "the good copy is served");
        assert!(s.get(VolumeId(2)).is_none());
        let broken = s.broken();
        assert_eq!(broken.len(), 1, "{broken:?}");
        assert_eq!(broken[0].0, VolumeId(2));
        assert!(
            broken[0].1.why.contains("unreadable at start"),
            "{broken:?}"
        );
        assert!(matches!(
            s.create(VolumeId(2), 8 << 20, CopyRole::Mirror, Epoch(3)),
            Err(CopyError::Exists(_))
        ));
        assert!(s.delete(VolumeId(2)).expect("delete").is_none());
        assert!(s.broken().is_empty());
        assert!(!bad_path.exists(), "the damaged file is deleted");
        let again = s
            .create(VolumeId(2), 8 << 20, CopyRole::Mirror, Epoch(3))
            .expect("created again");
        assert_eq!(again.epoch(), Epoch(3));
    }

    #[test]
    fn create_delete_and_used_bytes() {
        let d = tempfile::tempdir().expect("tmp");
        let s = Store::open(d.path()).expect("open");
        assert_eq!(s.used_bytes(), 0);
        let a = s
            .create(VolumeId(1), 8 << 20, CopyRole::Primary, Epoch(1))
            .expect("create");
        s.create(VolumeId(2), 4 << 20, CopyRole::Mirror, Epoch(2))
            .expect("create");
        assert_eq!(s.used_bytes(), 12 << 20);
        // Idempotent with the same size, refused with another.
        let again = s
            .create(VolumeId(1), 8 << 20, CopyRole::Mirror, Epoch(9))
            .expect("again");
        assert!(Arc::ptr_eq(&a, &again));
        assert_eq!(again.epoch(), Epoch(1));
        assert!(matches!(
            s.create(VolumeId(1), 16 << 20, CopyRole::Primary, Epoch(1)),
            Err(CopyError::Exists(_))
        ));
        let path = a.path().to_owned();
        assert!(path.exists());
        let gone = s.delete(VolumeId(1)).expect("delete").expect("existed");
        assert!(gone.is_deleted() && a.is_deleted());
        assert!(!path.exists());
        assert!(s.get(VolumeId(1)).is_none());
        assert!(s.delete(VolumeId(1)).expect("again").is_none());
        assert_eq!(s.used_bytes(), 4 << 20);
        // A deleted volume can be created again, afresh; the store reopens what is left.
        let b = s
            .create(VolumeId(1), 16 << 20, CopyRole::Primary, Epoch(5))
            .expect("recreate");
        assert!(!b.is_deleted());
        drop((a, b, gone, s));
        let s = Store::open(d.path()).expect("reopen");
        assert_eq!(s.list().len(), 2);
        assert_eq!(s.get(VolumeId(1)).expect("v1").epoch(), Epoch(5));
    }
}
