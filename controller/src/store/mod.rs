//! The controller's metadata store: versioned records under string keys.
//!
//! The trait is deliberately narrow — get, put, compare-and-swap, list by prefix, watch — so a
//! distributed store (etcd) can implement it later with the same semantics:
//! * every write bumps one store-wide revision and stamps the record with it (its version);
//! * a compare-and-swap names the version it read (0: "must not exist") and fails with
//!   [`StoreError::Conflict`] if the record changed meanwhile;
//! * a write returns only once it is durable (survives kill -9 and power loss);
//! * `watch` yields the newest revision, so a waiter learns that *something* changed and
//!   re-reads what it cares about.
//!
//! * `txn` applies puts and deletes of several keys atomically, only if every compared record
//!   is still at the version read (0: absent) — etcd's `Txn` with `mod_revision` compares.
//!
//! A state change of the controller is one compare-and-swap of one record, or — when a
//! decision reads several records (a volume's name, the servers' room) — one `txn` comparing
//! every record the decision read.

mod redb_store;

pub use redb_store::RedbStore;

/// A record and the revision that last wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub version: u64,
    pub value: Vec<u8>,
}

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("record {key} changed concurrently (now at version {current})")]
    Conflict { key: String, current: u64 },
    #[error("metadata store: {0}")]
    Backend(String),
}

/// Versioned key-value records with compare-and-swap and change notification.
pub trait MetaStore: Send + Sync + 'static {
    /// The record at `key`, if any.
    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError>;
    /// Writes `value` at `key` whatever was there; returns the new version.
    fn put(&self, key: &str, value: &[u8]) -> Result<u64, StoreError>;
    /// Writes `value` (or deletes, with `None`) only if the record's version is `expected`
    /// (0: the record must not exist). Returns the new version (the revision, for a delete).
    fn cas(&self, key: &str, expected: u64, value: Option<&[u8]>) -> Result<u64, StoreError>;
    /// Atomically: if every `(key, version)` in `compares` holds (version 0: the key is
    /// absent), writes every `puts` record and removes every `deletes` key (absent ones are
    /// skipped), all stamped with one new revision. `Ok(Some(revision))` when applied (the
    /// current revision if there was nothing to write), `Ok(None)` when a compare failed and
    /// nothing was written. A key may not be both put and deleted.
    fn txn(
        &self,
        compares: &[(&str, u64)],
        puts: &[(&str, &[u8])],
        deletes: &[&str],
    ) -> Result<Option<u64>, StoreError>;
    /// Every record whose key starts with `prefix`, in key order.
    fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError>;
    /// The store-wide revision: the version of the newest write.
    fn revision(&self) -> u64;
    /// Follows the revision; changes each time a write commits.
    fn watch(&self) -> tokio::sync::watch::Receiver<u64>;
}
