pub mod bench;
pub mod cluster;
pub mod guest;
pub mod keel_up;
pub mod vmm;
pub mod wire;
