pub mod bench;
pub mod cluster;
pub mod guest;
pub mod hostile;
pub mod keel_up;
pub mod vmm;
pub mod wire;
pub mod writer;
