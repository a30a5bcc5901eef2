//! The plugin's identity: the name jobs use, the Nomad plugin API version we
//! speak and this build's version. One home, so the driver, the transport,
//! the orchestrator and the CLI read the same values without depending on
//! each other.

/// The plugin name jobs use: `driver = "virt"`.
pub const PLUGIN_NAME: &str = "virt";
/// Nomad's driver plugin API version we speak.
pub const PLUGIN_API_VERSION: &str = "v0.1.0";
/// This build's version, reported to Nomad and in `driver.virt.version`.
pub const PLUGIN_VERSION: &str = env!("CARGO_PKG_VERSION");
