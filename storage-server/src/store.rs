//! The set of copies a storage server holds: one file per copy under `<data-dir>/copies/`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use keel_proto::{Epoch, VolumeId};

use crate::copy::{Copy, CopyError, CopyRole};

/// All copies of one server, by volume.
pub struct Store {
    dir: PathBuf,
    copies: RwLock<HashMap<VolumeId, Arc<Copy>>>,
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
                Some("keel") => {
                    let c = Copy::open(&p)?;
                    tracing::info!(volume = %c.volume(), size = c.size(), epoch = %c.epoch(), "opened copy");
                    copies.insert(c.volume(), Arc::new(c));
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
        })
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

    /// Creates a copy; if one exists with the same size it is kept (idempotent), otherwise
    /// [`CopyError::Exists`].
    pub fn create(
        &self,
        v: VolumeId,
        size: u64,
        role: CopyRole,
        epoch: Epoch,
    ) -> Result<Arc<Copy>, CopyError> {
        let mut map = self.copies.write().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(&v) {
            return if c.size() == size {
                Ok(c.clone())
            } else {
                Err(CopyError::Exists(v))
            };
        }
        let c = Arc::new(Copy::create(&self.path_of(v), v, size, role, epoch)?);
        map.insert(v, c.clone());
        Ok(c)
    }
}
