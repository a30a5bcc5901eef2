//! Generates the gRPC bindings for the Nomad plugin protocol from `proto/`
//! using protox (pure Rust; no system `protoc`).

const PROTOS: &[&str] = &[
    "proto/plugins/shared/hclspec/hcl_spec.proto",
    "proto/plugins/shared/structs/proto/attribute.proto",
    "proto/plugins/shared/structs/proto/recoverable_error.proto",
    "proto/plugins/base/proto/base.proto",
    "proto/plugins/drivers/proto/driver.proto",
    "proto/plugin/grpc_controller.proto",
    "proto/plugin/grpc_stdio.proto",
    "proto/plugin/grpc_broker.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=build.rs");

    let fds = protox::compile(PROTOS, ["proto"])?;

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .generate_default_stubs(true)
        .include_file("mod.rs")
        .compile_fds(fds)?;

    Ok(())
}
