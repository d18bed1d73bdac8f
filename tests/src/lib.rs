pub mod guest;
pub mod cluster;
