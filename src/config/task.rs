//! The task config: what a job author writes in `config { ... }` of a
//! `driver = "virt"` task, its schema and validation.

use serde::{Deserialize, Serialize};

use super::units::ByteSize;
use super::{ConfigError, Problems};
use crate::net::config::{self as net_config, NetworkInterfaceConfig};
use crate::nomad::hclspec::Spec;

/// The task config as Nomad encodes it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskConfig {
    pub hostname: Option<String>,
    pub user_data: Option<String>,
    pub default_user_password: Option<String>,
    pub default_user_authorized_ssh_key: Option<String>,
    pub cmds: Option<Vec<String>>,
    pub timezone: Option<String>,
    pub os: Option<OsConfig>,
    pub disk: Option<Vec<DiskConfig>>,
    pub network_interface: Option<Vec<NetworkInterfaceConfig>>,
}

/// Guest architecture and machine type, e.g. `x86_64` / `pc`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OsConfig {
    pub arch: Option<String>,
    pub machine: Option<String>,
}

/// One `disk` block.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub pool: Option<String>,
    pub volume: Option<String>,
    pub devname: Option<String>,
    pub driver: Option<String>,
    pub kind: Option<String>,
    pub bus_type: Option<String>,
    pub format: Option<String>,
    pub primary: Option<bool>,
    pub size: Option<ByteSize>,
    pub chained: Option<bool>,
    pub read_only: Option<bool>,
    pub sparse: Option<bool>,
    pub source: Option<DiskSourceConfig>,
}

/// Where a disk's contents come from: an image file or an existing volume.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSourceConfig {
    pub image: Option<String>,
    pub volume: Option<String>,
    pub format: Option<String>,
}

/// Disk kinds we attach.
pub const DISK_KINDS: [&str; 2] = ["disk", "cdrom"];
/// Buses libvirt/QEMU offer for disks.
pub const BUS_TYPES: [&str; 5] = ["virtio", "sata", "scsi", "ide", "usb"];
/// Image formats we read and write.
pub const DISK_FORMATS: [&str; 2] = ["qcow2", "raw"];

/// The schema Nomad decodes the task config block with.
pub fn schema() -> Spec {
    Spec::object([
        ("hostname", Spec::attr("string")),
        ("user_data", Spec::attr("string")),
        ("default_user_password", Spec::attr("string")),
        ("default_user_authorized_ssh_key", Spec::attr("string")),
        ("cmds", Spec::attr("list(string)")),
        ("timezone", Spec::attr("string")),
        (
            "os",
            Spec::block(Spec::object([
                ("arch", Spec::attr("string")),
                ("machine", Spec::attr("string")),
            ])),
        ),
        (
            "disk",
            Spec::block_list(Spec::object([
                ("pool", Spec::attr("string")),
                ("volume", Spec::attr("string")),
                ("devname", Spec::attr("string")),
                ("driver", Spec::attr("string")),
                (
                    "kind",
                    Spec::attr_with_default("kind", "string", "\"disk\""),
                ),
                ("bus_type", Spec::attr("string")),
                ("format", Spec::attr("string")),
                ("primary", Spec::attr("bool")),
                // `any` so both 10737418240 and "10GiB" arrive as written.
                ("size", Spec::attr("any")),
                ("chained", Spec::attr("bool")),
                ("read_only", Spec::attr("bool")),
                ("sparse", Spec::attr("bool")),
                (
                    "source",
                    Spec::block(Spec::object([
                        ("image", Spec::attr("string")),
                        ("volume", Spec::attr("string")),
                        ("format", Spec::attr("string")),
                    ])),
                ),
            ])),
        ),
        ("network_interface", net_config::schema()),
    ])
}

/// An RFC 1123 DNS label: what a guest hostname must be.
pub fn is_dns_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
        && bytes.first() != Some(&b'-')
        && bytes.last() != Some(&b'-')
}

/// A hostname derived from a Nomad task name: lower-case, invalid runs
/// replaced by '-', trimmed to a DNS label.
pub fn hostname_from_task_name(task_name: &str) -> String {
    let mut label = String::new();
    for c in task_name.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_alphanumeric() {
            label.push(c);
        } else if !label.ends_with('-') {
            label.push('-');
        }
    }
    let label: String = label.trim_matches('-').chars().take(63).collect();
    let label = label.trim_end_matches('-').to_string();
    if label.is_empty() {
        "vm".to_string()
    } else {
        label
    }
}

impl TaskConfig {
    /// Checks what can be checked without the host; reports all problems.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Problems::default();
        if let Some(hostname) = &self.hostname {
            if !is_dns_label(hostname) {
                problems.add(
                    "hostname",
                    format!("{hostname:?} is not a valid hostname: use 1-63 letters, digits and '-', not starting or ending with '-'"),
                );
            }
        }
        if let Some(timezone) = &self.timezone {
            let valid = !timezone.is_empty()
                && timezone.len() <= 64
                && timezone
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '_' | '-' | '+'))
                && !timezone.contains("..");
            if !valid {
                problems.add("timezone", format!("{timezone:?} is not a tz database name such as \"Europe/Berlin\" or \"UTC\""));
            }
        }
        if let Some(os) = &self.os {
            for (field, value) in [("os.arch", &os.arch), ("os.machine", &os.machine)] {
                if let Some(value) = value {
                    if value.is_empty()
                        || !value
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                    {
                        problems.add(
                            field,
                            format!("{value:?} is not a libvirt {} name", &field[3..]),
                        );
                    }
                }
            }
        }
        if let Some(commands) = &self.cmds {
            for (index, command) in commands.iter().enumerate() {
                if command.trim().is_empty() {
                    problems.add(
                        format!("cmds[{index}]"),
                        "is empty; remove it or give a command",
                    );
                }
            }
        }
        self.validate_disks(&mut problems);
        net_config::validate(
            self.network_interface.as_deref().unwrap_or_default(),
            &mut problems,
        );
        problems.into_result("task config", ())
    }

    fn validate_disks(&self, problems: &mut Problems) {
        let disks = self.disk.as_deref().unwrap_or_default();
        let primaries = disks
            .iter()
            .filter(|disk| disk.primary == Some(true))
            .count();
        if primaries > 1 {
            problems.add(
                "disk",
                format!("{primaries} disks are marked primary; mark at most one"),
            );
        }
        for (index, disk) in disks.iter().enumerate() {
            let field = format!("disk[{index}]");
            let kind = disk.kind.as_deref().unwrap_or("disk");
            if !DISK_KINDS.contains(&kind) {
                problems.add(
                    format!("{field}.kind"),
                    format!("{kind:?} is not one of \"disk\", \"cdrom\""),
                );
            }
            if let Some(bus) = &disk.bus_type {
                if !BUS_TYPES.contains(&bus.as_str()) {
                    problems.add(
                        format!("{field}.bus_type"),
                        format!("{bus:?} is not one of {}", quoted(&BUS_TYPES)),
                    );
                }
            }
            for (name, format) in [
                ("format", &disk.format),
                (
                    "source.format",
                    &disk.source.as_ref().and_then(|s| s.format.clone()),
                ),
            ] {
                if let Some(format) = format {
                    if !DISK_FORMATS.contains(&format.as_str()) {
                        problems.add(
                            format!("{field}.{name}"),
                            format!("{format:?} is not one of {}", quoted(&DISK_FORMATS)),
                        );
                    }
                }
            }
            if let Some(devname) = &disk.devname {
                let valid = devname.len() <= 8
                    && !devname.is_empty()
                    && devname
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
                if !valid {
                    problems.add(
                        format!("{field}.devname"),
                        format!(
                            "{devname:?} is not a guest device name such as \"vda\" or \"sdb\""
                        ),
                    );
                }
            }
            for (name, value) in [
                ("pool", &disk.pool),
                (
                    "source.volume",
                    &disk.source.as_ref().and_then(|s| s.volume.clone()),
                ),
            ] {
                if let Some(value) = value {
                    if !crate::config::plugin::is_valid_object_name(value) {
                        problems.add(format!("{field}.{name}"), format!("{value:?} is not a valid libvirt object name (letters, digits, '-', '_', '.')"));
                    }
                }
            }
            if let Some(source) = &disk.source {
                if source.image.is_some() && source.volume.is_some() {
                    problems.add(
                        format!("{field}.source"),
                        "set either image or volume, not both",
                    );
                }
                if source.image.as_deref() == Some("") {
                    problems.add(
                        format!("{field}.source.image"),
                        "is empty; give the image path",
                    );
                }
            }
            if disk.chained == Some(true)
                && disk
                    .source
                    .as_ref()
                    .and_then(|s| s.image.as_ref())
                    .is_none()
            {
                problems.add(
                    format!("{field}.chained"),
                    "needs source.image: a chained disk is an overlay on an image",
                );
            }
            if disk.source.is_none() && disk.size.is_none() && kind == "disk" {
                problems.add(
                    format!("{field}.size"),
                    "is required for an empty disk (no source); e.g. size = \"10GiB\"",
                );
            }
            if disk.size == Some(ByteSize(0)) {
                problems.add(format!("{field}.size"), "must be greater than zero");
            }
        }
    }
}

fn quoted(values: &[&str]) -> String {
    values
        .iter()
        .map(|v| format!("{v:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Validates and wraps a decode failure the same way.
pub fn decode_and_validate(bytes: &[u8]) -> Result<TaskConfig, ConfigError> {
    let config: TaskConfig = crate::config::decode_msgpack("task config", bytes)?;
    config.validate()?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        assert!(is_dns_label("web-1"));
        assert!(!is_dns_label("-web"));
        assert!(!is_dns_label("web_1"));
        assert!(!is_dns_label(&"a".repeat(64)));
        assert_eq!(hostname_from_task_name("My_Web Task!"), "my-web-task");
        assert_eq!(hostname_from_task_name("___"), "vm");
        assert!(is_dns_label(&hostname_from_task_name(&"x-".repeat(80))));
    }

    #[test]
    fn disk_problems_are_named() {
        let config = TaskConfig {
            hostname: Some("bad_host".into()),
            disk: Some(vec![
                DiskConfig {
                    kind: Some("floppy".into()),
                    bus_type: Some("pci".into()),
                    primary: Some(true),
                    source: Some(DiskSourceConfig {
                        image: Some("a".into()),
                        volume: Some("b".into()),
                        format: Some("vmdk".into()),
                    }),
                    ..Default::default()
                },
                DiskConfig {
                    primary: Some(true),
                    chained: Some(true),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        };
        let error = config.validate().expect_err("invalid");
        let fields: Vec<&str> = error.errors.iter().map(|e| e.field.as_str()).collect();
        for expected in [
            "hostname",
            "disk",
            "disk[0].kind",
            "disk[0].bus_type",
            "disk[0].source.format",
            "disk[0].source",
            "disk[1].chained",
            "disk[1].size",
        ] {
            assert!(fields.contains(&expected), "{expected} not in {fields:?}");
        }
    }

    #[test]
    fn minimal_config_is_valid() {
        assert!(TaskConfig::default().validate().is_ok());
    }
}
