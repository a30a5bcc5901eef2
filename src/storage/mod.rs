//! Storage: directory pools, volumes for task disks, and the image allow-list.

pub mod images;
pub mod pool;
pub mod volume;
