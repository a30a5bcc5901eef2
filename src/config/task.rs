//! The task config: what a job author writes in `config { ... }` of a
//! `driver = "virt"` task. The wire form ([`TaskConfig`], exactly the fields
//! of the schema, unknown ones rejected) is decoded from Nomad's msgpack and
//! then checked into the typed [`TaskSpec`] ([`parse_task_config`]), which is
//! what every consumer reads.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::hclspec::Spec;
use super::names::{GuestDeviceName, Hostname, ObjectName, Timezone};
use super::network::{self, BridgeInterface, NetworkInterface, NetworkInterfaceConfig};
use super::units::ByteSize;
use super::{ConfigErrors, Problems};

/// The task config as Nomad encodes it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskConfig {
    pub hostname: Option<String>,
    pub user_data: Option<String>,
    pub default_user_password: Option<String>,
    pub default_user_authorized_ssh_key: Option<String>,
    /// Let sshd accept password logins (cloud-init `ssh_pwauth`). Default
    /// false: a `default_user_password` alone opens only the console.
    pub ssh_password_auth: Option<bool>,
    pub cmds: Option<Vec<String>>,
    pub timezone: Option<String>,
    pub os: Option<OsConfig>,
    pub disk: Option<Vec<DiskConfig>>,
    pub network_interface: Option<Vec<NetworkInterfaceConfig>>,
    /// Give the VM the QEMU guest agent's channel (exec, signals, agent
    /// shutdown, guest addresses). Default true.
    pub guest_agent: Option<bool>,
    /// Signal name (e.g. `SIGHUP`) to a shell command run in the guest.
    pub signal_commands: Option<BTreeMap<String, String>>,
    /// How shared directories reach the guest: `auto`, `virtiofs` or `9p`.
    pub shared_dirs_driver: Option<String>,
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

/// What a disk is to the guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DiskKind {
    #[default]
    Disk,
    Cdrom,
    /// SCSI pass-through of a block device (a disk on a Nomad volume).
    Lun,
}

/// The bus a disk is attached to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskBus {
    Virtio,
    Sata,
    Scsi,
    Ide,
    Usb,
}

/// An image format we read and write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DiskFormat {
    #[default]
    Qcow2,
    Raw,
}

/// The hypervisor-side disk driver; QEMU domains have one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DiskDriver {
    #[default]
    Qemu,
}

/// Declares `ALL`, `as_str` and `parse` for a config keyword enum.
macro_rules! keywords {
    ($ty:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl $ty {
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            /// The keyword as written in a job.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $text),+
                }
            }

            /// Parses the keyword, or says which keywords exist.
            pub fn parse(text: &str) -> Result<Self, UnknownKeyword> {
                Self::ALL
                    .iter()
                    .copied()
                    .find(|value| value.as_str() == text)
                    .ok_or_else(|| UnknownKeyword {
                        given: text.to_string(),
                        allowed: Self::ALL.iter().map(|value| value.as_str()).collect(),
                    })
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

keywords!(DiskKind { Disk => "disk", Cdrom => "cdrom", Lun => "lun" });
keywords!(DiskBus { Virtio => "virtio", Sata => "sata", Scsi => "scsi", Ide => "ide", Usb => "usb" });
keywords!(DiskFormat { Qcow2 => "qcow2", Raw => "raw" });
keywords!(DiskDriver { Qemu => "qemu" });
keywords!(SharedDirsDriver { Auto => "auto", Virtiofs => "virtiofs", NineP => "9p" });

/// How the alloc, local, secrets and `volume_mount` directories reach the
/// guest (`shared_dirs_driver`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SharedDirsDriver {
    /// Per share, as the Go driver chooses: virtiofs where QEMU offers it,
    /// except read-only shares libvirt cannot protect (before 11.0.0),
    /// which use 9p unless the plugin allows insecure read-only mounts.
    #[default]
    Auto,
    Virtiofs,
    NineP,
}

/// A keyword that is not one of the allowed ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{given:?} is not one of {}", quoted(allowed))]
pub struct UnknownKeyword {
    pub given: String,
    pub allowed: Vec<&'static str>,
}

/// The task config checked into types: what every consumer reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskSpec {
    /// The guest hostname; the driver derives one from the task name when unset.
    pub hostname: Option<Hostname>,
    /// A cloud-init user-data file, relative to the task directory.
    pub user_data: Option<String>,
    pub default_user_password: Option<String>,
    pub default_user_authorized_ssh_key: Option<String>,
    /// sshd accepts password logins (`ssh_password_auth = true`).
    pub ssh_password_auth: bool,
    /// Commands cloud-init runs once, in order.
    pub cmds: Vec<String>,
    pub timezone: Option<Timezone>,
    pub os: OsSpec,
    pub disks: Vec<DiskSpec>,
    pub network_interfaces: Vec<NetworkInterface>,
    /// The domain gets the QEMU guest agent's channel.
    pub guest_agent: bool,
    /// Checked signal names (`SIGHUP`) to the shell command run for them.
    pub signal_commands: BTreeMap<String, String>,
    pub shared_dirs_driver: SharedDirsDriver,
}

/// Guest architecture and machine type, e.g. `x86_64` / `pc`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OsSpec {
    pub arch: Option<String>,
    pub machine: Option<String>,
}

/// One checked `disk` block.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskSpec {
    /// The storage pool for the disk's volume; the plugin's default when unset.
    pub pool: Option<ObjectName>,
    pub volume: Option<String>,
    pub devname: Option<GuestDeviceName>,
    pub driver: Option<DiskDriver>,
    pub kind: DiskKind,
    /// The bus as written; see [`DiskSpec::bus`] for the one used.
    pub bus_type: Option<DiskBus>,
    pub format: Option<DiskFormat>,
    pub primary: bool,
    pub size: Option<ByteSize>,
    pub chained: bool,
    pub read_only: bool,
    /// As written; see [`DiskSpec::sparse`] for the one used.
    pub sparse: Option<bool>,
    /// Where the contents come from; `None` is an empty disk of `size`.
    pub source: Option<DiskSource>,
}

/// Where a disk's contents come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSource {
    /// An image file, copied (or, `chained`, overlaid) into a new volume.
    Image {
        path: String,
        format: Option<DiskFormat>,
    },
    /// An existing pool volume of the operator's, never deleted. Go clones
    /// it into the task's volume (an overlay on it with `chained`).
    Volume {
        name: ObjectName,
        format: Option<DiskFormat>,
    },
}

impl DiskSpec {
    /// The bus the disk uses: `bus_type`, else IDE for cdroms, SCSI for
    /// luns and virtio otherwise.
    pub fn bus(&self) -> DiskBus {
        match (self.bus_type, self.kind) {
            (Some(bus), _) => bus,
            (None, DiskKind::Cdrom) => DiskBus::Ide,
            (None, DiskKind::Lun) => DiskBus::Scsi,
            (None, DiskKind::Disk) => DiskBus::Virtio,
        }
    }

    /// Whether the volume is made sparse: `sparse` as written, else (as in
    /// the Go driver's directory pools) sparse for qcow2 and allocated in
    /// full for raw.
    pub fn sparse(&self, format: DiskFormat) -> bool {
        self.sparse.unwrap_or(format == DiskFormat::Qcow2)
    }

    /// The guest device a disk on a Nomad volume is matched by: the
    /// `destination` of the task's `volume_mount` (`/dev/vdb`).
    pub fn nomad_volume(&self) -> Option<&str> {
        self.volume.as_deref().filter(|volume| !volume.is_empty())
    }

    /// The image path, when the disk is made from an image.
    pub fn image(&self) -> Option<&str> {
        match &self.source {
            Some(DiskSource::Image { path, .. }) => Some(path),
            _ => None,
        }
    }
}

impl TaskSpec {
    /// Checks that every port the bridge interfaces map is one of `labels`,
    /// the ports of the task's group (`group` names it in the message).
    pub fn check_port_labels(
        &self,
        labels: &std::collections::BTreeSet<&str>,
        group: &str,
    ) -> Result<(), ConfigErrors> {
        let mut problems = Problems::default();
        for (index, interface) in self.network_interfaces.iter().enumerate() {
            let Some(bridge) = interface.bridge() else {
                continue;
            };
            for (port_index, label) in bridge.ports.iter().enumerate() {
                let label = label.as_str();
                if labels.contains(label) {
                    continue;
                }
                let known = if labels.is_empty() {
                    "the group has no network ports".to_string()
                } else {
                    format!(
                        "the group's ports are {}",
                        quoted(&labels.iter().copied().collect::<Vec<_>>())
                    )
                };
                problems.add(
                    format!("network_interface[{index}].bridge.ports[{port_index}]"),
                    format!(
                        "{label:?} is not a port of {group} ({known}); add network {{ port {label:?} {{ to = ... }} }} to the group"
                    ),
                );
            }
        }
        problems.into_result("task config", ())
    }

    /// Checks that every disk on a Nomad volume names the `destination` of
    /// one of the task's `volume_mount`s (`destinations`), as StartTask
    /// matches them.
    pub fn check_volume_mounts(
        &self,
        destinations: &std::collections::BTreeSet<&str>,
    ) -> Result<(), ConfigErrors> {
        let mut problems = Problems::default();
        for (index, disk) in self.disks.iter().enumerate() {
            let Some(volume) = disk.nomad_volume() else {
                continue;
            };
            if !destinations.contains(volume) {
                problems.add(
                    format!("disk[{index}].volume"),
                    format!(
                        "no volume_mount of this task has destination {volume:?}; add volume_mount {{ volume = \"...\" destination = {volume:?} }} to the task"
                    ),
                );
            }
        }
        problems.into_result("task config", ())
    }

    /// The interfaces that take part in host port mapping and lease discovery.
    pub fn bridges(&self) -> impl Iterator<Item = &BridgeInterface> {
        self.network_interfaces
            .iter()
            .filter_map(NetworkInterface::bridge)
    }
}

/// The schema Nomad decodes the task config block with.
pub fn schema() -> Spec {
    Spec::object([
        ("hostname", Spec::attr("string")),
        ("user_data", Spec::attr("string")),
        ("default_user_password", Spec::attr("string")),
        ("default_user_authorized_ssh_key", Spec::attr("string")),
        ("ssh_password_auth", Spec::attr("bool")),
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
        ("network_interface", network::schema()),
        (
            "guest_agent",
            Spec::attr_with_default("guest_agent", "bool", "true"),
        ),
        ("signal_commands", Spec::attr("map(string)")),
        (
            "shared_dirs_driver",
            Spec::attr_with_default("shared_dirs_driver", "string", "\"auto\""),
        ),
    ])
}

/// A hostname derived from a Nomad task name; see [`Hostname::from_task_name`].
pub fn hostname_from_task_name(task_name: &str) -> String {
    Hostname::from_task_name(task_name).to_string()
}

/// Decodes the msgpack task config Nomad sends (StartTask) or the CLI
/// encodes (`validate`, `run`) and checks it into a [`TaskSpec`]: the one
/// place the task config rules live. Reports every problem, each naming its
/// field path and the fix.
pub fn parse_task_config(msgpack: &[u8]) -> Result<TaskSpec, ConfigErrors> {
    let wire: TaskConfig = super::decode_msgpack("task config", msgpack)?;
    TaskSpec::try_from(&wire)
}

/// Decodes and checks like [`parse_task_config`], returning the wire form
/// (what the driver state keeps in the task handle).
pub fn decode_and_validate(msgpack: &[u8]) -> Result<TaskConfig, ConfigErrors> {
    let wire: TaskConfig = super::decode_msgpack("task config", msgpack)?;
    TaskSpec::try_from(&wire)?;
    Ok(wire)
}

impl TaskConfig {
    /// Checks what can be checked without the host; reports all problems.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        TaskSpec::try_from(self).map(drop)
    }
}

impl TryFrom<&TaskConfig> for TaskSpec {
    type Error = ConfigErrors;

    fn try_from(wire: &TaskConfig) -> Result<TaskSpec, ConfigErrors> {
        let mut problems = Problems::default();
        let hostname = wire
            .hostname
            .as_deref()
            .and_then(|hostname| problems.check("hostname", Hostname::parse(hostname)));
        let timezone = wire
            .timezone
            .as_deref()
            .and_then(|zone| problems.check("timezone", Timezone::parse(zone)));
        let os = wire.os.clone().unwrap_or_default();
        for (field, what, example, value) in [
            ("os.arch", "arch", "\"x86_64\" or \"aarch64\"", &os.arch),
            ("os.machine", "machine", "\"pc\" or \"q35\"", &os.machine),
        ] {
            if let Some(value) = value {
                if value.is_empty()
                    || !value
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                {
                    problems.add(
                        field,
                        format!("{value:?} is not a libvirt {what} name; use e.g. {example}"),
                    );
                }
            }
        }
        let cmds = wire.cmds.clone().unwrap_or_default();
        for (index, command) in cmds.iter().enumerate() {
            if command.trim().is_empty() {
                problems.add(
                    format!("cmds[{index}]"),
                    "is empty; remove it or give a command",
                );
            }
        }
        // Bounds checked before any work: hashing a password costs more the
        // longer it is, and everything here ends up in the seed ISO.
        for (field, value, limit) in [
            (
                "default_user_password",
                wire.default_user_password.as_deref(),
                MAX_PASSWORD_BYTES,
            ),
            ("user_data", wire.user_data.as_deref(), MAX_USER_DATA_BYTES),
            (
                "default_user_authorized_ssh_key",
                wire.default_user_authorized_ssh_key.as_deref(),
                MAX_SSH_KEY_BYTES,
            ),
        ] {
            if let Some(value) = value.filter(|value| value.len() > limit) {
                problems.add(
                    field,
                    format!("is {} bytes; at most {limit} are accepted", value.len()),
                );
            }
        }
        if cmds.len() > MAX_CMDS
            || cmds.iter().map(String::len).sum::<usize>() > MAX_USER_DATA_BYTES
        {
            problems.add(
                "cmds",
                format!(
                    "at most {MAX_CMDS} commands of {MAX_USER_DATA_BYTES} bytes in all are accepted; \
                     put longer scripts in user_data or an artifact"
                ),
            );
        }
        let disks = check_disks(wire.disk.as_deref().unwrap_or_default(), &mut problems);
        let network_interfaces = network::check(
            wire.network_interface.as_deref().unwrap_or_default(),
            &mut problems,
        );
        let signal_commands = check_signal_commands(
            wire.signal_commands.as_ref().unwrap_or(&BTreeMap::new()),
            &mut problems,
        );
        let shared_dirs_driver = wire
            .shared_dirs_driver
            .as_deref()
            .and_then(|driver| {
                problems.check("shared_dirs_driver", SharedDirsDriver::parse(driver))
            })
            .unwrap_or_default();
        problems.into_result(
            "task config",
            TaskSpec {
                hostname,
                user_data: wire.user_data.clone(),
                default_user_password: wire.default_user_password.clone(),
                default_user_authorized_ssh_key: wire.default_user_authorized_ssh_key.clone(),
                ssh_password_auth: wire.ssh_password_auth.unwrap_or(false),
                cmds,
                timezone,
                os: OsSpec {
                    arch: os.arch,
                    machine: os.machine,
                },
                disks,
                network_interfaces,
                guest_agent: wire.guest_agent.unwrap_or(true),
                signal_commands,
                shared_dirs_driver,
            },
        )
    }
}

/// Longest `default_user_password` accepted (SHA-512-crypt's cost grows
/// with the length).
pub const MAX_PASSWORD_BYTES: usize = 256;
/// Largest inline `user_data`, and largest `user_data` file read (cloud
/// providers stop at 16-64 KiB too).
pub const MAX_USER_DATA_BYTES: usize = 64 * 1024;
/// Largest `default_user_authorized_ssh_key`.
pub const MAX_SSH_KEY_BYTES: usize = 16 * 1024;
/// Most `cmds` entries.
pub const MAX_CMDS: usize = 256;

/// Longest `signal_commands` entry accepted (it travels in every handle).
pub const MAX_SIGNAL_COMMAND_LEN: usize = 4096;
/// Most `signal_commands` entries accepted.
const MAX_SIGNAL_COMMANDS: usize = 64;

/// Whether `name` is a signal name as Nomad sends it: `SIG` then upper-case
/// letters and digits (`SIGHUP`, `SIGUSR1`, `SIGRTMIN`).
pub fn is_signal_name(name: &str) -> bool {
    name.strip_prefix("SIG").is_some_and(|rest| {
        !rest.is_empty()
            && rest.len() <= 12
            && rest
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
            && rest.starts_with(|c: char| c.is_ascii_uppercase())
    })
}

fn check_signal_commands(
    wire: &BTreeMap<String, String>,
    problems: &mut Problems,
) -> BTreeMap<String, String> {
    if wire.len() > MAX_SIGNAL_COMMANDS {
        problems.add(
            "signal_commands",
            format!(
                "has {} entries; at most {MAX_SIGNAL_COMMANDS} are allowed",
                wire.len()
            ),
        );
    }
    let mut checked = BTreeMap::new();
    for (name, command) in wire {
        let field = format!("signal_commands.{name}");
        if !is_signal_name(name) {
            problems.add(
                field,
                format!("{name:?} is not a signal name; use the upper-case name with SIG, e.g. SIGHUP or SIGUSR1"),
            );
            continue;
        }
        if command.trim().is_empty() {
            problems.add(field, "is empty; give the shell command to run in the guest, e.g. \"systemctl reload nginx\"");
            continue;
        }
        if command.len() > MAX_SIGNAL_COMMAND_LEN || command.contains('\0') {
            problems.add(
                field,
                format!("must be at most {MAX_SIGNAL_COMMAND_LEN} bytes without NUL bytes; put a longer script in the image and call it"),
            );
            continue;
        }
        checked.insert(name.clone(), command.clone());
    }
    checked
}

fn check_disks(disks: &[DiskConfig], problems: &mut Problems) -> Vec<DiskSpec> {
    if disks.is_empty() {
        problems.add(
            "disk",
            "a VM needs at least one disk block, e.g. disk { source { image = \"debian-12.qcow2\" } }",
        );
    }
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
    disks
        .iter()
        .enumerate()
        .map(|(index, disk)| check_disk(disk, &format!("disk[{index}]"), problems))
        .collect()
}

/// Checks one disk. The result is only used when `problems` stays empty, so
/// a field that failed its check takes its default here.
fn check_disk(disk: &DiskConfig, field: &str, problems: &mut Problems) -> DiskSpec {
    let kind = disk
        .kind
        .as_deref()
        .and_then(|kind| problems.check(format!("{field}.kind"), DiskKind::parse(kind)))
        .unwrap_or_default();
    let bus_type = disk
        .bus_type
        .as_deref()
        .and_then(|bus| problems.check(format!("{field}.bus_type"), DiskBus::parse(bus)));
    let format = disk
        .format
        .as_deref()
        .and_then(|format| problems.check(format!("{field}.format"), DiskFormat::parse(format)));
    let driver = disk
        .driver
        .as_deref()
        .and_then(|driver| problems.check(format!("{field}.driver"), DiskDriver::parse(driver)));
    let devname = disk.devname.as_deref().and_then(|devname| {
        problems.check(format!("{field}.devname"), GuestDeviceName::parse(devname))
    });
    let pool = disk
        .pool
        .as_deref()
        .and_then(|pool| problems.check(format!("{field}.pool"), ObjectName::parse(pool)));
    let source = disk
        .source
        .as_ref()
        .and_then(|source| check_source(source, field, problems));
    let chained = disk.chained == Some(true);
    let has_contents = disk
        .source
        .as_ref()
        .is_some_and(|s| s.image.is_some() || s.volume.is_some());
    // As in Go, a chained disk overlays either a source image or a source
    // volume.
    if chained && !has_contents {
        problems.add(
            format!("{field}.chained"),
            "needs source.image or source.volume: a chained disk is an overlay on one",
        );
    }
    // As in Go's directory pools: the overlay is a qcow2 file.
    if chained && format.is_some_and(|format| format != DiskFormat::Qcow2) {
        problems.add(
            format!("{field}.format"),
            "must be \"qcow2\" (or unset) on a chained disk: the overlay is a qcow2 file",
        );
    }
    // A disk on a Nomad volume (`volume = "/dev/vdX"`, matched to the task's
    // volume_mount) takes its size from the block device, as in Go.
    let on_nomad_volume = disk.volume.as_deref().is_some_and(|v| !v.is_empty());
    if on_nomad_volume {
        // Go's rules: the volume is the disk, so nothing may reshape it.
        let not_on_volume = "cannot be set on a disk on a Nomad volume (volume = \"...\"): the volume is the disk as it is";
        if disk.format.as_deref().is_some_and(|f| f != "raw") {
            problems.add(
                format!("{field}.format"),
                "must be \"raw\" (or unset) on a disk on a Nomad volume",
            );
        }
        for (name, set) in [
            ("size", disk.size.is_some()),
            ("sparse", disk.sparse.is_some()),
            ("pool", disk.pool.is_some()),
            ("chained", chained),
            (
                "source.volume",
                disk.source.as_ref().is_some_and(|s| s.volume.is_some()),
            ),
        ] {
            if set {
                problems.add(format!("{field}.{name}"), not_on_volume);
            }
        }
    }
    if let Some(volume) = disk.volume.as_deref() {
        // Matched to a volume_mount whose destination is under /dev/, as in
        // Go; the name after /dev/ becomes the guest device name.
        let name_ok = volume
            .strip_prefix("/dev/")
            .is_some_and(|name| GuestDeviceName::parse(name).is_ok());
        if !name_ok {
            problems.add(
                format!("{field}.volume"),
                format!("{volume:?} is not a volume_mount destination under /dev/; use the destination of the task's volume_mount, e.g. volume = \"/dev/vdb\" with volume_mount {{ destination = \"/dev/vdb\" }}"),
            );
        }
    }
    if kind == DiskKind::Lun && !on_nomad_volume {
        problems.add(
            format!("{field}.kind"),
            "\"lun\" passes a block device through: use it on a disk on a Nomad volume (volume = \"/dev/...\")",
        );
    }
    if disk
        .source
        .as_ref()
        .is_some_and(|s| s.image.is_none() && s.volume.is_none())
    {
        problems.add(
            format!("{field}.source"),
            "needs image = \"...\" or volume = \"...\"; remove the block for an empty disk",
        );
    }
    if !has_contents && !on_nomad_volume && disk.size.is_none() && kind == DiskKind::Disk {
        problems.add(
            format!("{field}.size"),
            "is required for an empty disk (no source.image or source.volume); e.g. size = \"10GiB\"",
        );
    }
    if disk.size == Some(ByteSize(0)) {
        problems.add(format!("{field}.size"), "must be greater than zero");
    }
    DiskSpec {
        pool,
        volume: disk.volume.clone(),
        devname,
        driver,
        kind,
        bus_type,
        format,
        primary: disk.primary == Some(true),
        size: disk.size,
        chained,
        read_only: disk.read_only == Some(true),
        sparse: disk.sparse,
        source,
    }
}

fn check_source(
    source: &DiskSourceConfig,
    field: &str,
    problems: &mut Problems,
) -> Option<DiskSource> {
    let format = source.format.as_deref().and_then(|format| {
        problems.check(format!("{field}.source.format"), DiskFormat::parse(format))
    });
    match (&source.image, &source.volume) {
        (Some(_), Some(_)) => {
            problems.add(
                format!("{field}.source"),
                "set either image or volume, not both",
            );
            None
        }
        (Some(image), None) if image.is_empty() => {
            problems.add(
                format!("{field}.source.image"),
                "is empty; give the image path",
            );
            None
        }
        (Some(image), None) => Some(DiskSource::Image {
            path: image.clone(),
            format,
        }),
        (None, Some(volume)) => problems
            .check(format!("{field}.source.volume"), ObjectName::parse(volume))
            .map(|name| DiskSource::Volume { name, format }),
        (None, None) => None,
    }
}

fn quoted(values: &[&str]) -> String {
    values
        .iter()
        .map(|v| format!("{v:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let error = TaskConfig::default().validate().expect_err("no disk");
        assert_eq!(error.errors[0].field, "disk");
        let one_disk = TaskConfig {
            disk: Some(vec![DiskConfig {
                size: Some(ByteSize(1 << 30)),
                ..Default::default()
            }]),
            ..Default::default()
        };
        assert!(one_disk.validate().is_ok());
    }

    #[test]
    fn oversized_secrets_and_scripts_are_refused_up_front() {
        let base = TaskConfig {
            disk: Some(vec![DiskConfig {
                size: Some(ByteSize(1 << 30)),
                ..Default::default()
            }]),
            ..Default::default()
        };
        let fields = |config: TaskConfig| -> Vec<String> {
            config
                .validate()
                .err()
                .map(|e| {
                    let mut fields: Vec<String> =
                        e.errors.iter().map(|p| p.field.clone()).collect();
                    fields.sort();
                    fields
                })
                .unwrap_or_default()
        };
        let at_limit = TaskConfig {
            default_user_password: Some("p".repeat(MAX_PASSWORD_BYTES)),
            user_data: Some(format!(
                "#cloud-config\n{}",
                "x".repeat(MAX_USER_DATA_BYTES - 14)
            )),
            ..base.clone()
        };
        assert!(fields(at_limit).is_empty());
        let over = TaskConfig {
            default_user_password: Some("p".repeat(MAX_PASSWORD_BYTES + 1)),
            user_data: Some("#".repeat(MAX_USER_DATA_BYTES + 1)),
            default_user_authorized_ssh_key: Some("k".repeat(MAX_SSH_KEY_BYTES + 1)),
            cmds: Some(vec!["true".to_string(); MAX_CMDS + 1]),
            ..base
        };
        assert_eq!(
            fields(over),
            vec![
                "cmds",
                "default_user_authorized_ssh_key",
                "default_user_password",
                "user_data"
            ]
        );
    }

    /// What the Go examples (storage/directory/08, storage/dhv/02 and 04)
    /// rely on: a chained disk on a source volume, and a disk on a Nomad
    /// volume with no size.
    #[test]
    fn go_accepted_disks_are_valid() {
        let chained_on_volume = TaskConfig {
            disk: Some(vec![DiskConfig {
                chained: Some(true),
                source: Some(DiskSourceConfig {
                    volume: Some("focal.img".into()),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        };
        assert_eq!(chained_on_volume.validate(), Ok(()));
        let on_nomad_volume = TaskConfig {
            disk: Some(vec![DiskConfig {
                volume: Some("/dev/vda".into()),
                ..Default::default()
            }]),
            ..Default::default()
        };
        assert_eq!(on_nomad_volume.validate(), Ok(()));
    }

    #[test]
    fn guest_agent_defaults_on_and_signal_commands_are_checked() {
        let disk = Some(vec![DiskConfig {
            size: Some(ByteSize(1 << 30)),
            ..Default::default()
        }]);
        let spec = TaskSpec::try_from(&TaskConfig {
            disk: disk.clone(),
            signal_commands: Some(BTreeMap::from([(
                "SIGHUP".to_string(),
                "touch /run/hup".to_string(),
            )])),
            ..Default::default()
        })
        .expect("valid");
        assert!(spec.guest_agent);
        assert_eq!(spec.signal_commands["SIGHUP"], "touch /run/hup");
        let error = TaskConfig {
            disk,
            guest_agent: Some(false),
            signal_commands: Some(BTreeMap::from([
                ("hup".to_string(), "x".to_string()),
                ("SIGUSR1".to_string(), " ".to_string()),
                (
                    "SIGUSR2".to_string(),
                    "x".repeat(MAX_SIGNAL_COMMAND_LEN + 1),
                ),
            ])),
            ..Default::default()
        }
        .validate()
        .expect_err("invalid");
        let fields: Vec<&str> = error.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "signal_commands.SIGUSR1",
                "signal_commands.SIGUSR2",
                "signal_commands.hup"
            ]
        );
        assert!(is_signal_name("SIGRTMIN"));
        assert!(!is_signal_name("SIG"));
        assert!(!is_signal_name("SIG1"));
        assert!(!is_signal_name("HUP"));
    }

    #[test]
    fn shared_dirs_driver_defaults_to_auto_and_is_checked() {
        let disk = Some(vec![DiskConfig {
            size: Some(ByteSize(1 << 30)),
            ..Default::default()
        }]);
        let spec = TaskSpec::try_from(&TaskConfig {
            disk: disk.clone(),
            ..Default::default()
        })
        .expect("valid");
        assert_eq!(spec.shared_dirs_driver, SharedDirsDriver::Auto);
        for (text, driver) in [
            ("9p", SharedDirsDriver::NineP),
            ("virtiofs", SharedDirsDriver::Virtiofs),
            ("auto", SharedDirsDriver::Auto),
        ] {
            let spec = TaskSpec::try_from(&TaskConfig {
                disk: disk.clone(),
                shared_dirs_driver: Some(text.into()),
                ..Default::default()
            })
            .expect("valid");
            assert_eq!(spec.shared_dirs_driver, driver);
        }
        let error = TaskConfig {
            disk,
            shared_dirs_driver: Some("nfs".into()),
            ..Default::default()
        }
        .validate()
        .expect_err("invalid");
        assert_eq!(error.errors[0].field, "shared_dirs_driver");
        assert!(
            error.errors[0]
                .message
                .contains("\"auto\", \"virtiofs\", \"9p\""),
            "{error}"
        );
    }

    /// Issue 11.3: kind "lun" (block devices only), Nomad volume names,
    /// chained needs qcow2, and sparse defaults as in Go (qcow2 sparse,
    /// raw allocated).
    #[test]
    fn disk_attributes_go_accepts_are_checked_and_honoured() {
        let spec = |disk: DiskConfig| {
            TaskSpec::try_from(&TaskConfig {
                disk: Some(vec![disk]),
                ..Default::default()
            })
        };
        let fields = |disk: DiskConfig| -> Vec<String> {
            spec(disk)
                .err()
                .map(|e| e.errors.iter().map(|p| p.field.clone()).collect())
                .unwrap_or_default()
        };
        let lun = spec(DiskConfig {
            volume: Some("/dev/sdb".into()),
            kind: Some("lun".into()),
            ..Default::default()
        })
        .expect("lun on a Nomad volume");
        assert_eq!(lun.disks[0].kind, DiskKind::Lun);
        assert_eq!(lun.disks[0].bus(), DiskBus::Scsi);
        assert_eq!(lun.disks[0].nomad_volume(), Some("/dev/sdb"));
        assert_eq!(
            fields(DiskConfig {
                size: Some(ByteSize(1 << 20)),
                kind: Some("lun".into()),
                ..Default::default()
            }),
            ["disk[0].kind"]
        );
        for bad in [
            "vdb",
            "/dev/../etc/passwd",
            "/dev/VDB",
            "/mnt/data",
            "/dev/",
        ] {
            assert_eq!(
                fields(DiskConfig {
                    volume: Some(bad.into()),
                    ..Default::default()
                }),
                ["disk[0].volume"],
                "{bad}"
            );
        }
        assert_eq!(
            fields(DiskConfig {
                chained: Some(true),
                format: Some("raw".into()),
                source: Some(DiskSourceConfig {
                    volume: Some("base.img".into()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ["disk[0].format"]
        );
        let sized = |sparse: Option<bool>| {
            spec(DiskConfig {
                size: Some(ByteSize(1 << 20)),
                sparse,
                ..Default::default()
            })
            .expect("valid")
            .disks[0]
                .clone()
        };
        assert!(sized(None).sparse(DiskFormat::Qcow2));
        assert!(!sized(None).sparse(DiskFormat::Raw));
        assert!(sized(Some(true)).sparse(DiskFormat::Raw));
        assert!(!sized(Some(false)).sparse(DiskFormat::Qcow2));
    }

    /// Go's rules for disks on Nomad volumes and for empty source blocks.
    #[test]
    fn nomad_volume_disks_cannot_be_reshaped() {
        let config = TaskConfig {
            disk: Some(vec![DiskConfig {
                volume: Some("/dev/vdb".into()),
                format: Some("qcow2".into()),
                size: Some(ByteSize(1 << 30)),
                sparse: Some(false),
                pool: Some("p".into()),
                chained: Some(true),
                source: Some(DiskSourceConfig::default()),
                ..Default::default()
            }]),
            ..Default::default()
        };
        let error = config.validate().expect_err("invalid");
        let fields: Vec<&str> = error.errors.iter().map(|e| e.field.as_str()).collect();
        for expected in [
            "disk[0].format",
            "disk[0].size",
            "disk[0].sparse",
            "disk[0].pool",
            "disk[0].chained",
            "disk[0].source",
        ] {
            assert!(fields.contains(&expected), "{expected} not in {fields:?}");
        }
    }
}
