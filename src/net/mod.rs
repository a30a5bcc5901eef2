//! VM networking: the `Net` contract the driver calls, its types, and the
//! libvirt implementation (bridge and macvtap attachment, DHCP lease
//! discovery and reservation, iptables port mapping).

pub mod iptables;
pub mod libvirt;
pub mod routes;

/// The interface config types live with the rest of the task config;
/// this path keeps `net::config::...` working for net's own modules.
pub use crate::config::network as config;

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use self::config::NetworkInterface;
use self::iptables::rules::IptablesRule;
use crate::libvirt::dhcp::Reservation;
use crate::libvirt::domain_xml::FilterRef;

/// Prefix of every network fingerprint attribute.
pub const ATTRIBUTE_PREFIX: &str = "driver.virt.network.";

/// "active" or "inactive", as the network fingerprint attributes spell it.
pub fn is_active_string(active: bool) -> &'static str {
    if active {
        "active"
    } else {
        "inactive"
    }
}

/// One port Nomad allocated to the task group (`network { port ... }`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocatedPort {
    pub label: String,
    /// The host port.
    pub value: u16,
    /// The port inside the guest (`to`); 0 means the same as `value`.
    pub to: u16,
    /// The host address the port is allocated on.
    pub host_ip: String,
}

/// What `vm_started_build` needs about a started VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmStartedBuildRequest {
    pub vm_name: String,
    pub hostname: String,
    /// Identifies the task's host rules (iptables comment) for teardown and
    /// reconciliation.
    pub task_tag: String,
    pub net_config: Vec<NetworkInterface>,
    /// The ports Nomad allocated to the task's group.
    pub resources: Vec<AllocatedPort>,
    /// MAC addresses of the VM's interfaces, in `net_config` order.
    pub hwaddrs: Vec<String>,
    /// How long to wait for the guest's DHCP lease.
    pub dhcp_timeout: Duration,
}

/// The guest address Nomad may use for services with address_mode "driver".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriverNetwork {
    pub ip: Ipv4Addr,
    /// Port label → guest port.
    pub port_map: HashMap<String, u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmStartedBuildResponse {
    pub driver_network: Option<DriverNetwork>,
    pub teardown_spec: TeardownSpec,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmTerminatedTeardownRequest {
    pub teardown_spec: TeardownSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmTerminatedTeardownResponse {}

/// Exactly what `vm_started_build` put on the host, kept in the task handle
/// so teardown (even by a restarted plugin) undoes it without re-deriving.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeardownSpec {
    /// The comment tag on every rule of this task.
    #[serde(default)]
    pub task_tag: String,
    #[serde(default)]
    pub iptables_rules: Vec<IptablesRule>,
    /// Untagged rules removed by exact match: those the Go driver
    /// installed, adopted from its task handle.
    #[serde(default)]
    pub legacy_iptables_rules: Vec<IptablesRule>,
    #[serde(default)]
    pub dhcp_reservation: Option<Reservation>,
    /// The libvirt network the VM joined, if any.
    #[serde(default)]
    pub network: Option<String>,
    /// That network's bridge (for the DHCP release).
    #[serde(default)]
    pub bridge: Option<String>,
    /// The reservations of every bridge interface after the first, in
    /// interface order. The first keeps the fields above so handles
    /// written before several interfaces existed still decode.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub more_bridges: Vec<BridgeTeardown>,
}

/// What a bridge interface after the first put on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BridgeTeardown {
    pub network: String,
    pub bridge: String,
    pub dhcp_reservation: Reservation,
}

/// Network setup a start began, recorded before it touches the host: enough
/// to undo it when the start never finished (the plugin was killed).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetIntent {
    /// The tag on every port-mapping rule of the task.
    pub task_tag: String,
    /// (bridge, MAC) of each interface that joined a libvirt network.
    pub interfaces: Vec<(String, String)>,
}

/// An interface to put in the domain XML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attachment {
    /// Join a libvirt network (found by its bridge name).
    Network {
        network: String,
        bridge: String,
        mac: String,
        /// The network's own DHCP servers: the only ones whose replies
        /// the traffic filter learns the guest's address from.
        dhcp_servers: Vec<Ipv4Addr>,
    },
    /// A macvtap (`direct`) interface on a host device.
    Direct {
        device: String,
        mode: String,
        mac: String,
    },
}

/// The libvirt network filter guests on a shared bridge get: no MAC, IP
/// or ARP spoofing. It ships with libvirt (`virsh nwfilter-list`).
pub const CLEAN_TRAFFIC_FILTER: &str = "clean-traffic";

/// How to get [`CLEAN_TRAFFIC_FILTER`] when libvirt lacks it, or do without.
pub const CLEAN_TRAFFIC_FIX: &str = "libvirt ships it with its nwfilter driver (Debian: \
     libvirt-daemon-driver-nwfilter; `virsh nwfilter-list` lists it); or set clean_traffic = \
     false in the plugin config to run guests on shared bridges without it";

/// `clean-traffic` for a guest whose address is not known yet (it comes
/// from DHCP after boot): on a network with DHCP, libvirt learns it from
/// the replies of the network's own servers only, so neither the guest's
/// first packet nor a rogue DHCP server on the bridge can pick it. On a
/// network without DHCP libvirt's default applies (the first address the
/// guest uses is the only one it may use).
pub fn clean_traffic_filter(dhcp_servers: &[Ipv4Addr]) -> FilterRef {
    let mut parameters = Vec::new();
    if !dhcp_servers.is_empty() {
        parameters.push(("CTRL_IP_LEARNING".to_string(), "dhcp".to_string()));
        parameters.extend(
            dhcp_servers
                .iter()
                .map(|server| ("DHCPSERVER".to_string(), server.to_string())),
        );
    }
    FilterRef {
        filter: CLEAN_TRAFFIC_FILTER.into(),
        parameters,
    }
}

/// Errors from networking, each naming what to fix.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A problem with the job's config or ports (not worth retrying).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Dhcp(#[from] crate::libvirt::dhcp::DhcpError),
    #[error(transparent)]
    Iptables(#[from] iptables::apply::IptablesError),
    #[error(transparent)]
    Libvirt(#[from] crate::libvirt::LibvirtError),
    #[error("network teardown incomplete: {0}")]
    Teardown(String),
}

/// The networking contract the driver calls. Methods block; call them from
/// blocking threads.
pub trait Net: Send + Sync {
    /// Prepares the host (chains and jump rules). Idempotent.
    fn init(&self) -> Result<(), NetError>;
    /// `driver.virt.network.*` attributes; errors are logged, never fatal.
    fn fingerprint(&self) -> BTreeMap<String, String>;
    /// Resolves the job's interfaces into domain interfaces before boot,
    /// checking everything that can be checked then (bridge exists, port
    /// labels are allocated, loopback forwarding is possible).
    fn attachments(
        &self,
        net_config: &[NetworkInterface],
        ports: &[AllocatedPort],
        hwaddrs: &[String],
    ) -> Result<Vec<Attachment>, NetError>;
    /// After boot: finds the guest's address, reserves it, maps ports,
    /// reporting long steps through `progress`. On failure it removes
    /// whatever it added before returning.
    fn vm_started_build(
        &self,
        request: &VmStartedBuildRequest,
        progress: &(dyn Fn(&str) + Sync),
    ) -> Result<VmStartedBuildResponse, NetError>;
    /// Undoes exactly what the spec lists; safe to call again.
    fn vm_terminated_teardown(
        &self,
        request: &VmTerminatedTeardownRequest,
    ) -> Result<VmTerminatedTeardownResponse, NetError>;
    /// Undoes a start that never finished: removes the task's rules, and
    /// any reservation and lease of its MACs. Safe to call again.
    fn remove_unfinished(&self, intent: &NetIntent) -> Result<(), NetError>;
}

/// A stable, locally administered MAC for a task's interface.
pub fn mac_for(task_id: &str, index: usize) -> String {
    // FNV-1a: stable across releases, unlike std's hasher.
    let mut hash: u32 = 0x811c_9dc5;
    for byte in task_id.bytes().chain(std::iter::once(index as u8)) {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    let bytes = hash.to_be_bytes();
    format!(
        "52:54:00:{:02x}:{:02x}:{:02x}",
        bytes[1], bytes[2], bytes[3]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_traffic_learns_addresses_from_the_networks_dhcp_only() {
        let servers = [Ipv4Addr::new(192, 168, 122, 1)];
        let filter = clean_traffic_filter(&servers);
        assert_eq!(filter.filter, "clean-traffic");
        assert_eq!(
            filter.parameters,
            vec![
                ("CTRL_IP_LEARNING".to_string(), "dhcp".to_string()),
                ("DHCPSERVER".to_string(), "192.168.122.1".to_string()),
            ]
        );
        assert!(clean_traffic_filter(&[]).parameters.is_empty());
    }

    #[test]
    fn is_active_strings() {
        assert_eq!(is_active_string(true), "active");
        assert_eq!(is_active_string(false), "inactive");
    }

    #[test]
    fn macs_are_stable_and_distinct() {
        let a = mac_for("alloc/web/12345678", 0);
        assert_eq!(a, mac_for("alloc/web/12345678", 0));
        assert_ne!(a, mac_for("alloc/web/87654321", 0));
        assert_ne!(a, mac_for("alloc/web/12345678", 1));
        assert!(a.starts_with("52:54:00:") && a.len() == 17, "{a}");
    }

    #[test]
    fn teardown_spec_round_trips_and_tolerates_older_handles() {
        let spec = TeardownSpec {
            task_tag: "nomad-driver-virt:a/b/c".into(),
            iptables_rules: vec![IptablesRule {
                table: "nat".into(),
                chain: "NOMAD_VT_PRT".into(),
                args: vec!["-j".into(), "ACCEPT".into()],
            }],
            legacy_iptables_rules: Vec::new(),
            dhcp_reservation: None,
            network: Some("default".into()),
            bridge: Some("virbr0".into()),
            more_bridges: Vec::new(),
        };
        // A spec of one interface is written as before (old plugins can
        // read it back after a downgrade).
        assert!(!serde_json::to_string(&spec)
            .expect("json")
            .contains("more_bridges"));
        let json = serde_json::to_string(&spec).expect("json");
        assert_eq!(
            serde_json::from_str::<TeardownSpec>(&json).expect("back"),
            spec
        );
        assert_eq!(
            serde_json::from_str::<TeardownSpec>("{}").expect("empty"),
            TeardownSpec::default()
        );
        let two = TeardownSpec {
            more_bridges: vec![BridgeTeardown {
                network: "ndvtest".into(),
                bridge: "ndvtestbr0".into(),
                dhcp_reservation: Reservation {
                    network: "ndvtest".into(),
                    mac: "52:54:00:00:00:02".into(),
                    ip: Ipv4Addr::new(10, 9, 0, 5),
                    hostname: None,
                },
            }],
            ..spec
        };
        let json = serde_json::to_string(&two).expect("json");
        assert_eq!(
            serde_json::from_str::<TeardownSpec>(&json).expect("back"),
            two
        );
    }
}
