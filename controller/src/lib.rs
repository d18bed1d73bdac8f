//! keel-controller: the system manager that owns every volume (metadata store, placement,
//! attachments with epoch fencing, the HTTPS API), and the pieces of `keelctl`.

pub mod daemon;
pub mod error;
pub mod http;
pub mod membership;
pub mod model;
pub mod openapi;
pub mod pki;
pub mod placement;
pub mod push;
pub mod service;
pub mod store;
