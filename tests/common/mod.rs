//! Shared helpers for integration tests.
#![allow(dead_code)]

pub mod host;
pub mod vm;

// Not every test binary uses both.
#[allow(unused_imports)]
pub use host::{host_ready, Need};

use std::path::{Path, PathBuf};

use nomad_driver_virt::nomad_client::{LaunchOptions, PluginClient};

/// The plugin binary cargo built for these tests.
pub fn plugin_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_nomad-driver-virt"))
}

/// Launches the plugin as Nomad would, with default options.
pub async fn launch() -> PluginClient {
    launch_with(LaunchOptions::default()).await
}

pub async fn launch_with(options: LaunchOptions) -> PluginClient {
    PluginClient::launch(&plugin_binary(), options)
        .await
        .expect("plugin launches and handshakes")
}

/// A libvirt test-driver node file private to one test, so tests do not
/// share state (test:///default is process-wide).
pub fn test_driver_node(dir: &Path) -> PathBuf {
    let path = dir.join("node.xml");
    std::fs::write(&path, TEST_NODE_XML).expect("write node xml");
    path
}

pub const TEST_NODE_XML: &str = r#"<node>
  <network>
    <name>default</name>
    <bridge name='virbr0'/>
    <forward/>
    <ip address='192.168.122.1' netmask='255.255.255.0'>
      <dhcp>
        <range start='192.168.122.2' end='192.168.122.254'/>
      </dhcp>
    </ip>
  </network>
  <pool type='dir'>
    <name>ndvpool</name>
    <target>
      <path>/var/lib/ndvpool</path>
    </target>
  </pool>
</node>
"#;

/// Plugin config HCL pointing the plugin at a test-driver node file.
pub fn test_driver_config(node: &Path) -> String {
    format!(
        "provider {{\n  libvirt {{\n    uri = \"test://{}\"\n  }}\n}}\n",
        node.display()
    )
}
