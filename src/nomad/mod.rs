//! Nomad's vocabulary: hclspec schemas, cty values and their msgpack form,
//! and fingerprint attributes.

pub mod attribute;
pub mod cty;
pub mod driver_state;
pub mod go_handle;
pub mod hclspec;
