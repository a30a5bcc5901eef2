//! Port mapping with iptables: a pure rule model and its atomic batch apply.

pub mod apply;
pub mod rules;
