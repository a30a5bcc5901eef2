//! The domain orchestrator: start, stop, destroy and recover tasks, each
//! undoing what it did when it fails part-way.

pub mod console;
pub mod plan;
