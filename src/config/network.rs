//! The task's `network_interface` blocks: the wire form Nomad sends, the
//! typed [`NetworkInterface`] it is checked into, and the schema.

use serde::{Deserialize, Serialize};

use super::hclspec::Spec;
use super::names::{InterfaceName, PortLabel};
use super::Problems;

/// Every `network_interface` block of a task, one guest NIC each, in order.
pub type NetworkInterfacesConfig = Vec<NetworkInterfaceConfig>;

/// One interface block as Nomad sends it: exactly one of `bridge` or `macvtap`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfaceConfig {
    pub bridge: Option<NetworkInterfaceBridgeConfig>,
    pub macvtap: Option<NetworkInterfaceMacvtapConfig>,
}

/// Join the libvirt network whose bridge is `name`; map `ports` (labels of
/// the group's `network { port ... }` blocks) to the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfaceBridgeConfig {
    pub name: String,
    pub ports: Option<Vec<String>>,
}

/// A libvirt `direct` (macvtap) interface on a host device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfaceMacvtapConfig {
    pub device: String,
    pub mode: Option<String>,
}

/// A checked network interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkInterface {
    Bridge(BridgeInterface),
    Macvtap(MacvtapInterface),
}

/// A checked `bridge` block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeInterface {
    /// The bridge of a libvirt network, e.g. `virbr0`.
    pub name: InterfaceName,
    /// Group port labels mapped to the guest.
    pub ports: Vec<PortLabel>,
}

/// A checked `macvtap` block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MacvtapInterface {
    /// The host network device, e.g. `eth0`.
    pub device: InterfaceName,
    pub mode: MacvtapMode,
}

impl NetworkInterface {
    /// The bridge block, if this interface is one.
    pub fn bridge(&self) -> Option<&BridgeInterface> {
        match self {
            Self::Bridge(bridge) => Some(bridge),
            Self::Macvtap(_) => None,
        }
    }
}

/// macvtap modes libvirt supports for `direct` interfaces.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MacvtapMode {
    #[default]
    Bridge,
    Private,
    Vepa,
    Passthrough,
}

/// Why a text is not a macvtap mode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a macvtap mode; use one of \"bridge\", \"private\", \"vepa\", \"passthrough\""
)]
pub struct UnknownMacvtapMode(pub String);

impl MacvtapMode {
    pub const ALL: [MacvtapMode; 4] = [Self::Bridge, Self::Private, Self::Vepa, Self::Passthrough];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bridge => "bridge",
            Self::Private => "private",
            Self::Vepa => "vepa",
            Self::Passthrough => "passthrough",
        }
    }

    /// Parses a mode, or explains which modes exist.
    pub fn parse(text: &str) -> Result<Self, UnknownMacvtapMode> {
        Self::ALL
            .into_iter()
            .find(|mode| mode.as_str() == text)
            .ok_or_else(|| UnknownMacvtapMode(text.to_string()))
    }
}

impl NetworkInterfaceMacvtapConfig {
    /// The mode, `bridge` when unset.
    pub fn checked_mode(&self) -> Result<MacvtapMode, UnknownMacvtapMode> {
        self.mode
            .as_deref()
            .map_or(Ok(MacvtapMode::Bridge), MacvtapMode::parse)
    }

    /// [`Self::checked_mode`] with the error as text, for callers that still
    /// read the wire form (net); they should take [`MacvtapInterface`].
    pub fn mode(&self) -> Result<MacvtapMode, String> {
        self.checked_mode().map_err(|error| error.to_string())
    }
}

/// The hclspec of the `network_interface` block list.
pub fn schema() -> Spec {
    Spec::block_list(Spec::object([
        (
            "bridge",
            Spec::block(Spec::object([
                ("name", Spec::required_attr("string")),
                ("ports", Spec::attr("list(string)")),
            ])),
        ),
        (
            "macvtap",
            Spec::block(Spec::object([
                ("device", Spec::required_attr("string")),
                (
                    "mode",
                    Spec::attr_with_default("mode", "string", "\"bridge\""),
                ),
            ])),
        ),
    ]))
}

/// Names that go into libvirt XML and iptables arguments; see [`InterfaceName`].
pub fn is_valid_device_name(name: &str) -> bool {
    super::names::is_interface_name(name)
}

/// Checks the interface list into typed interfaces, recording every problem
/// under `network_interface`.
pub fn check(
    interfaces: &[NetworkInterfaceConfig],
    problems: &mut Problems,
) -> Vec<NetworkInterface> {
    let mut checked = Vec::new();
    for (index, interface) in interfaces.iter().enumerate() {
        let field = format!("network_interface[{index}]");
        let bridge = interface
            .bridge
            .as_ref()
            .and_then(|bridge| check_bridge(bridge, &field, problems));
        let macvtap = interface
            .macvtap
            .as_ref()
            .and_then(|macvtap| check_macvtap(macvtap, &field, problems));
        match (&interface.bridge, &interface.macvtap) {
            (Some(_), Some(_)) => {
                problems.add(&field, "set either a bridge or a macvtap block, not both");
            }
            (None, None) => problems.add(&field, "needs a bridge or a macvtap block"),
            _ => {}
        }
        match (bridge, macvtap) {
            (Some(bridge), None) => checked.push(NetworkInterface::Bridge(bridge)),
            (None, Some(macvtap)) => checked.push(NetworkInterface::Macvtap(macvtap)),
            _ => {}
        }
    }
    check_ports_mapped_once(interfaces, problems);
    checked
}

/// A port label maps to one guest: two blocks listing it would forward one
/// host port to two addresses.
fn check_ports_mapped_once(interfaces: &[NetworkInterfaceConfig], problems: &mut Problems) {
    let mut first_use: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (index, interface) in interfaces.iter().enumerate() {
        let Some(bridge) = &interface.bridge else {
            continue;
        };
        for (port_index, label) in bridge.ports.iter().flatten().enumerate() {
            match first_use.get(label.as_str()) {
                Some(&first) if first != index => problems.add(
                    format!("network_interface[{index}].bridge.ports[{port_index}]"),
                    format!(
                        "{label:?} is already mapped by network_interface[{first}]; list each port in one interface only"
                    ),
                ),
                Some(_) => {}
                None => {
                    first_use.insert(label, index);
                }
            }
        }
    }
}

fn check_bridge(
    bridge: &NetworkInterfaceBridgeConfig,
    field: &str,
    problems: &mut Problems,
) -> Option<BridgeInterface> {
    let name = if bridge.name.is_empty() {
        problems.add(
            format!("{field}.bridge.name"),
            "is required: the bridge of a libvirt network, e.g. \"virbr0\"",
        );
        None
    } else {
        problems.check(
            format!("{field}.bridge.name"),
            InterfaceName::parse(&bridge.name),
        )
    };
    let mut ports = Vec::new();
    let mut ports_ok = true;
    for (port_index, label) in bridge.ports.iter().flatten().enumerate() {
        match problems.check(
            format!("{field}.bridge.ports[{port_index}]"),
            PortLabel::parse(label),
        ) {
            Some(label) => ports.push(label),
            None => ports_ok = false,
        }
    }
    let name = name?;
    ports_ok.then_some(BridgeInterface { name, ports })
}

fn check_macvtap(
    macvtap: &NetworkInterfaceMacvtapConfig,
    field: &str,
    problems: &mut Problems,
) -> Option<MacvtapInterface> {
    let device = if macvtap.device.is_empty() {
        problems.add(
            format!("{field}.macvtap.device"),
            "is required: the host network device, e.g. \"eth0\"",
        );
        None
    } else {
        problems.check(
            format!("{field}.macvtap.device"),
            InterfaceName::parse(&macvtap.device),
        )
    };
    let mode = problems.check(format!("{field}.macvtap.mode"), macvtap.checked_mode());
    Some(MacvtapInterface {
        device: device?,
        mode: mode?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bridge(name: &str, ports: &[&str]) -> NetworkInterfaceConfig {
        NetworkInterfaceConfig {
            bridge: Some(NetworkInterfaceBridgeConfig {
                name: name.into(),
                ports: Some(ports.iter().map(ToString::to_string).collect()),
            }),
            macvtap: None,
        }
    }

    fn macvtap(device: &str, mode: Option<&str>) -> NetworkInterfaceConfig {
        NetworkInterfaceConfig {
            bridge: None,
            macvtap: Some(NetworkInterfaceMacvtapConfig {
                device: device.into(),
                mode: mode.map(Into::into),
            }),
        }
    }

    fn checked(
        interfaces: &[NetworkInterfaceConfig],
    ) -> Result<Vec<NetworkInterface>, Vec<String>> {
        let mut problems = Problems::default();
        let typed = check(interfaces, &mut problems);
        problems
            .into_result("task config", typed)
            .map_err(|error| error.errors.iter().map(ToString::to_string).collect())
    }

    fn problems_of(interfaces: &[NetworkInterfaceConfig]) -> Vec<String> {
        checked(interfaces).err().unwrap_or_default()
    }

    #[test]
    fn good_interfaces_become_typed() {
        let typed = checked(&[bridge("virbr0", &["http", "ssh_2"])]).expect("valid");
        let NetworkInterface::Bridge(bridge) = &typed[0] else {
            panic!("{typed:?}");
        };
        assert_eq!(bridge.name.as_str(), "virbr0");
        assert_eq!(bridge.ports.len(), 2);
        let typed = checked(&[macvtap("eth0", Some("vepa"))]).expect("valid");
        assert_eq!(
            typed,
            vec![NetworkInterface::Macvtap(MacvtapInterface {
                device: InterfaceName::parse("eth0").expect("valid"),
                mode: MacvtapMode::Vepa,
            })]
        );
        let default_mode = checked(&[macvtap("eth0", None)]).expect("valid");
        assert!(matches!(
            &default_mode[0],
            NetworkInterface::Macvtap(MacvtapInterface {
                mode: MacvtapMode::Bridge,
                ..
            })
        ));
    }

    #[test]
    fn several_interfaces_keep_their_order() {
        let typed = checked(&[
            bridge("virbr0", &["http"]),
            macvtap("eth0", None),
            bridge("virbr1", &["ssh"]),
        ])
        .expect("valid");
        assert_eq!(typed.len(), 3);
        assert_eq!(typed[0].bridge().map(|b| b.name.as_str()), Some("virbr0"));
        assert!(matches!(typed[1], NetworkInterface::Macvtap(_)));
        assert_eq!(typed[2].bridge().map(|b| b.name.as_str()), Some("virbr1"));
    }

    #[test]
    fn bad_interfaces_are_named() {
        let twice = problems_of(&[
            bridge("virbr0", &["http"]),
            macvtap("eth0", None),
            bridge("virbr1", &["ssh", "http"]),
        ]);
        assert_eq!(twice.len(), 1, "{twice:?}");
        assert!(
            twice[0].starts_with("network_interface[2].bridge.ports[1]")
                && twice[0].contains("already mapped by network_interface[0]"),
            "{twice:?}"
        );
        let second_bad = problems_of(&[bridge("virbr0", &[]), macvtap("eth 0", None)]);
        assert!(
            second_bad[0].starts_with("network_interface[1].macvtap.device"),
            "{second_bad:?}"
        );
        let both = problems_of(&[NetworkInterfaceConfig {
            bridge: Some(NetworkInterfaceBridgeConfig {
                name: "virbr0".into(),
                ports: None,
            }),
            macvtap: Some(NetworkInterfaceMacvtapConfig {
                device: "eth0".into(),
                mode: None,
            }),
        }]);
        assert!(both[0].contains("not both"), "{both:?}");
        let neither = problems_of(&[NetworkInterfaceConfig::default()]);
        assert!(
            neither[0].contains("needs a bridge or a macvtap"),
            "{neither:?}"
        );
        let unnamed = problems_of(&[bridge("", &[])]);
        assert!(
            unnamed[0].starts_with("network_interface[0].bridge.name"),
            "{unnamed:?}"
        );
        let mode = problems_of(&[macvtap("eth0", Some("bridged"))]);
        assert!(
            mode[0].starts_with("network_interface[0].macvtap.mode")
                && mode[0].contains("\"bridge\", \"private\", \"vepa\", \"passthrough\""),
            "{mode:?}"
        );
        // Every problem is reported, not just the first.
        let many = problems_of(&[macvtap("eth 0", Some("x"))]);
        assert_eq!(many.len(), 2, "{many:?}");
    }

    #[test]
    fn hostile_names_cannot_inject_arguments() {
        for name in [
            "virbr0 -j ACCEPT",
            "br'0",
            "br0\n",
            "a-very-long-bridge-name",
            "../x",
            "br<0>",
        ] {
            assert!(
                !problems_of(&[bridge(name, &[])]).is_empty(),
                "{name:?} accepted"
            );
        }
        for label in ["http --dport 22", "x;y", "", "h\"t"] {
            assert!(
                !problems_of(&[bridge("virbr0", &[label])]).is_empty(),
                "{label:?} accepted"
            );
        }
    }
}
