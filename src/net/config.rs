//! The task's `network_interface` blocks: types, schema and validation.

use serde::{Deserialize, Serialize};

use crate::config::Problems;
use crate::nomad::hclspec::Spec;

/// Every `network_interface` block of a task (at most one for now).
pub type NetworkInterfacesConfig = Vec<NetworkInterfaceConfig>;

/// One interface: exactly one of `bridge` or `macvtap`.
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

/// macvtap modes libvirt supports for `direct` interfaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MacvtapMode {
    Bridge,
    Private,
    Vepa,
    Passthrough,
}

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
    pub fn parse(text: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|mode| mode.as_str() == text)
            .ok_or_else(|| {
                let valid: Vec<String> = Self::ALL
                    .iter()
                    .map(|m| format!("{:?}", m.as_str()))
                    .collect();
                format!(
                    "{text:?} is not a macvtap mode; use one of {}",
                    valid.join(", ")
                )
            })
    }
}

impl NetworkInterfaceMacvtapConfig {
    /// The mode, `bridge` when unset.
    pub fn mode(&self) -> Result<MacvtapMode, String> {
        MacvtapMode::parse(self.mode.as_deref().unwrap_or("bridge"))
    }
}

/// The interfaces that take part in host port mapping and lease discovery.
pub fn configurable_only(
    interfaces: &[NetworkInterfaceConfig],
) -> Vec<&NetworkInterfaceBridgeConfig> {
    interfaces
        .iter()
        .filter_map(|interface| interface.bridge.as_ref())
        .collect()
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

/// Names that go into libvirt XML and iptables arguments: interface names
/// as Linux allows them (at most 15 bytes, no '/', whitespace or ':').
pub fn is_valid_device_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && name != "."
        && name != ".."
}

/// Port labels as Nomad allows them: letters, digits, '_' and '-'.
pub fn is_valid_port_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 64
        && label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
}

/// Validates the interface list, recording problems under `network_interface`.
pub fn validate(interfaces: &[NetworkInterfaceConfig], problems: &mut Problems) {
    if interfaces.len() > 1 {
        problems.add(
            "network_interface",
            format!(
                "{} blocks given; only one network_interface is supported per task",
                interfaces.len()
            ),
        );
    }
    for (index, interface) in interfaces.iter().enumerate() {
        let field = format!("network_interface[{index}]");
        match (&interface.bridge, &interface.macvtap) {
            (Some(_), Some(_)) => {
                problems.add(&field, "set either a bridge or a macvtap block, not both")
            }
            (None, None) => problems.add(&field, "needs a bridge or a macvtap block"),
            _ => {}
        }
        if let Some(bridge) = &interface.bridge {
            if bridge.name.is_empty() {
                problems.add(
                    format!("{field}.bridge.name"),
                    "is required: the bridge of a libvirt network, e.g. \"virbr0\"",
                );
            } else if !is_valid_device_name(&bridge.name) {
                problems.add(
                    format!("{field}.bridge.name"),
                    format!(
                        "{:?} is not a valid bridge name (up to 15 letters, digits, '-', '_', '.')",
                        bridge.name
                    ),
                );
            }
            for (port_index, label) in bridge.ports.iter().flatten().enumerate() {
                if !is_valid_port_label(label) {
                    problems.add(
                        format!("{field}.bridge.ports[{port_index}]"),
                        format!("{label:?} is not a port label; use the label of a group network port block (letters, digits, '_', '-')"),
                    );
                }
            }
        }
        if let Some(macvtap) = &interface.macvtap {
            if macvtap.device.is_empty() {
                problems.add(
                    format!("{field}.macvtap.device"),
                    "is required: the host network device, e.g. \"eth0\"",
                );
            } else if !is_valid_device_name(&macvtap.device) {
                problems.add(
                    format!("{field}.macvtap.device"),
                    format!("{:?} is not a valid network device name", macvtap.device),
                );
            }
            if let Err(message) = macvtap.mode() {
                problems.add(format!("{field}.macvtap.mode"), message);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bridge(name: &str, ports: &[&str]) -> NetworkInterfaceConfig {
        NetworkInterfaceConfig {
            bridge: Some(NetworkInterfaceBridgeConfig {
                name: name.into(),
                ports: Some(ports.iter().map(|p| p.to_string()).collect()),
            }),
            macvtap: None,
        }
    }

    fn problems_of(interfaces: &[NetworkInterfaceConfig]) -> Vec<String> {
        let mut problems = Problems::default();
        validate(interfaces, &mut problems);
        match problems.into_result("task config", ()) {
            Ok(()) => Vec::new(),
            Err(error) => error.errors.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn good_interfaces_pass() {
        assert!(problems_of(&[bridge("virbr0", &["http", "ssh_2"])]).is_empty());
        let macvtap = NetworkInterfaceConfig {
            bridge: None,
            macvtap: Some(NetworkInterfaceMacvtapConfig {
                device: "eth0".into(),
                mode: Some("vepa".into()),
            }),
        };
        assert!(problems_of(&[macvtap]).is_empty());
    }

    #[test]
    fn bad_interfaces_are_named() {
        let two = problems_of(&[bridge("virbr0", &[]), bridge("virbr1", &[])]);
        assert!(two[0].contains("only one network_interface"), "{two:?}");
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
        let mode = problems_of(&[NetworkInterfaceConfig {
            bridge: None,
            macvtap: Some(NetworkInterfaceMacvtapConfig {
                device: "eth0".into(),
                mode: Some("bridged".into()),
            }),
        }]);
        assert!(
            mode[0].contains("\"bridge\", \"private\", \"vepa\", \"passthrough\""),
            "{mode:?}"
        );
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
            let errors = problems_of(&[bridge(name, &[])]);
            assert!(!errors.is_empty(), "{name:?} accepted");
        }
        for label in ["http --dport 22", "x;y", "", "h\"t"] {
            let errors = problems_of(&[bridge("virbr0", &[label])]);
            assert!(!errors.is_empty(), "{label:?} accepted");
        }
    }

    #[test]
    fn is_active_and_configurable_only() {
        assert_eq!(crate::net::is_active_string(true), "active");
        assert_eq!(crate::net::is_active_string(false), "inactive");
        let macvtap = NetworkInterfaceConfig {
            bridge: None,
            macvtap: Some(NetworkInterfaceMacvtapConfig {
                device: "eth0".into(),
                mode: None,
            }),
        };
        let list = [bridge("virbr0", &["http"]), macvtap];
        let configurable = configurable_only(&list);
        assert_eq!(configurable.len(), 1);
        assert_eq!(configurable[0].name, "virbr0");
    }
}
