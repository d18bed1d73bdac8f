//! keel-storage: holds volume copies on local disk and serves Keel's data path.
//!
//! * [`admission`]: who may send a data request to a copy, and at which epochs (pure rules).
//! * [`copy`]: one copy's on-disk format and its I/O (see `docs/format.md`).
//! * [`sync`]: group commit of fdatasync for flushes and FUA writes.
//! * [`dirty`]: a primary's dirty-chunk maps of its mirrors, for incremental resync.
//! * [`session`]: client sessions, so an abandoned connection's late frames change nothing.
//! * [`store`]: the copies in a data directory.
//! * [`server`]: the mutual-TLS request server (data path and copy administration).
//! * [`replicate`]: synchronous primary → mirror replication and the mirror-failure hook.
//! * [`register`]: registration with the controller and heartbeats.
//! * [`daemon`]: the `keel-storage` daemon's arguments and main loop.

pub mod admission;
pub mod copy;
pub mod daemon;
pub mod dirty;
pub mod register;
pub mod replicate;
pub mod server;
pub mod session;
pub mod store;
pub mod sync;
