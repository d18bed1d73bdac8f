pub mod guest;
pub mod vmm;
pub mod cluster;
