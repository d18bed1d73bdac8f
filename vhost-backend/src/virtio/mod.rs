//! Everything that knows virtio: the virtio-blk constants and config space ([`spec`]) and the
//! request parser ([`request`]). Nothing here does I/O.

pub mod request;
pub mod spec;
