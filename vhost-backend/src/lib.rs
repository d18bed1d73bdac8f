//! keel-vhost: Keel's per-host node manager. It serves each attached volume to a guest as a
//! vhost-user-blk device and forwards every request over mutual TLS to the volume's primary.
//!
//! * [`virtio`]: virtio-blk definitions and the request parser (no I/O; fuzzed).
//! * [`backend`]: the `vhost-user-backend` device: queues, in-order publication, completions.
//! * [`batch`]: guest notifications deferred to the end of a batch of answers.
//! * [`client`]: the connection to the storage server, with reconnect and resend.
//! * [`config_change`]: config-change messages to the frontend (online resize).
//! * [`daemon`]: the `keel-vhost` process serving one attachment: flags, control and status
//!   files, SIGHUP reload.
//! * [`node`]: the node manager: registers with the controller, runs one keel-vhost per
//!   attachment, adopts them after its own restart.
//! * [`fuzz`]: fuzz target bodies replayed by `cargo test`.

pub mod backend;
pub mod batch;
pub mod client;
pub mod config_change;
pub mod daemon;
pub mod fuzz;
pub mod node;
pub mod virtio;
