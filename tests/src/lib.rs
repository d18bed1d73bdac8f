pub mod bench;
pub mod cluster;
pub mod guest;
pub mod vmm;
pub mod keel_up;
