//! No code: this crate only aligns the features of shared dependencies across the workspace
//! (see its Cargo.toml).
