//! Keel's wire protocol and transport security, shared by every daemon.
//!
//! * [`frame`]: the binary, length-prefixed frames (hello, request, response), their encoding and
//!   a total decoder that never panics and checks sizes before allocating.
//! * [`types`]: the small value types carried on the wire (volume ids, epochs, ops, statuses).
//! * [`io`]: reading and writing frames on an async byte stream.
//! * [`limits`]: connection limits, an accept loop that survives fd exhaustion, the file limit.
//! * [`tls`]: mutual TLS 1.3 configuration against the cluster CA, and the peer's identity
//!   (role + id) taken from its certificate.
//! * [`pki`]: creating a cluster CA and issuing role certificates (used by `keelctl pki` and tests).
//! * [`members`]: a copy's membership list: its mirrors and its access list (who may use it).
//! * [`admin`]: the controller's one-shot client for copy administration on a storage server.
//! * [`fuzz`]: fuzz target bodies, replayed by `cargo test` over the checked-in corpus.
//!
//! The format is documented in `docs/protocol.md`.

pub mod admin;
pub mod frame;
pub mod fuzz;
pub mod io;
pub mod limits;
pub mod members;
pub mod pki;
pub mod size;
pub mod tls;
pub mod tuning;
pub mod types;

pub use frame::{DecodeError, Frame, Hello, HelloReply, Request, Response};
pub use size::{human_size, parse_size};
pub use types::{Epoch, MemberRole, Op, ReqFlags, Role, Status, VolumeId};
