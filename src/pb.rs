//! Generated protobuf / gRPC bindings for the Nomad plugin protocol and the
//! go-plugin internal services (see `build.rs` and `proto/`).
#![allow(
    clippy::all,
    clippy::pedantic,
    clippy::nursery,
    missing_docs,
    unreachable_pub,
    unused_qualifications,
    rustdoc::all
)]

include!(concat!(env!("OUT_DIR"), "/mod.rs"));
