//! What the driver tells Nomad it can do. Unlike Go plugins, whose gRPC shim
//! drops some of these fields, every value here reaches Nomad as written.

use crate::pb::hashicorp::nomad::plugins::drivers::proto::driver_capabilities::FsIsolation;
use crate::pb::hashicorp::nomad::plugins::drivers::proto::network_isolation_spec::NetworkIsolationMode;
use crate::pb::hashicorp::nomad::plugins::drivers::proto::DriverCapabilities;

/// `ANY_MOUNTS`: the proto aliases it with UNKNOWN_MOUNTS (both 0), and
/// prost keeps only the first name.
pub const ANY_MOUNTS: i32 = 0;

/// The capabilities, each chosen on purpose.
pub fn capabilities() -> DriverCapabilities {
    DriverCapabilities {
        // Signals reach the guest through its agent (`signal_commands`);
        // SIGTERM/SIGINT/SIGKILL without an entry stop the VM.
        send_signals: true,
        // `nomad alloc exec` and script checks run through the guest agent.
        exec: true,
        // The VM is its own filesystem: Nomad builds no chroot, gives guest
        // paths (/alloc, /local, /secrets) in the environment, and we share the
        // host dirs into the guest ourselves.
        fs_isolation: FsIsolation::Image as i32,
        // The VM gets its address from libvirt's network, not from a Nomad
        // network namespace; ports reach it through our port mapping.
        network_isolation_modes: vec![NetworkIsolationMode::Host as i32],
        must_create_network: false,
        // Any mounts, so `volume_mount` works: directories become shares and
        // block devices become disks (NO_MOUNTS would make Nomad reject them).
        mount_configs: ANY_MOUNTS,
        // Log collection on: Nomad's logmon reads the stdout FIFO we write
        // the guest's serial console to, so `nomad alloc logs` shows it.
        disable_log_collection: false,
        dynamic_workload_users: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_values_on_the_wire() {
        let caps = capabilities();
        assert_eq!(caps.fs_isolation, 2, "IMAGE");
        assert_eq!(caps.mount_configs, 0, "ANY_MOUNTS");
        assert_eq!(caps.network_isolation_modes, vec![0], "HOST");
        assert!(!caps.disable_log_collection);
        assert!(caps.exec && caps.send_signals);
    }
}
