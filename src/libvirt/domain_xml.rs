//! Domain XML: a pure renderer from a typed [`DomainSpec`] to the libvirt
//! domain XML that `virDomainDefineXML` takes. No libvirt calls happen here.
//!
//! API:
//! - [`render_domain_xml`]`(&DomainSpec) -> Result<String, DomainXmlError>`
//!   validates the spec (see [`DomainSpec::validate`]) and renders it.
//! - [`DomainSpec::validate`] runs the same checks alone, so a caller can
//!   refuse a task before it creates volumes or seeds.
//! - [`METADATA_NAMESPACE`] / [`METADATA_PREFIX`] / [`METADATA_ELEMENT`]:
//!   our element inside `<metadata>`, for `virDomainGetMetadata`.
//!
//! Rules:
//! - Identifiers libvirt or QEMU interpret (name, target dev, share tag, MAC,
//!   arch, machine, cpuset, format, macvtap mode) are validated against a
//!   strict grammar; an error names the field (`disks[1].target_dev`).
//! - Free text (paths, network and device names, metadata) is escaped, never
//!   filtered: a path may contain `'` or `&`. Text with characters XML 1.0
//!   cannot carry (NUL, other C0 controls except tab/newline/CR, U+FFFE/U+FFFF)
//!   is rejected, because no escaping can represent them.
//! - Paths must be absolute UTF-8: libvirtd resolves them in its own working
//!   directory, and XML carries text, not bytes.
//! - The document is written by [`super::xml::XmlWriter`] (quick-xml), the
//!   one escaping path of the crate.

use std::borrow::Cow;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::xml::{is_xml_char, XmlWriter};

/// XML namespace of our `<metadata>` child. Stable: recovery reads it back.
pub const METADATA_NAMESPACE: &str = "urn:nomad-driver-virt:task:1";
/// Prefix used for [`METADATA_NAMESPACE`] in the rendered XML.
pub const METADATA_PREFIX: &str = "nomad";
/// Local name of our element inside `<metadata>`.
pub const METADATA_ELEMENT: &str = "task";

/// Our own cap on domain names (libvirt sets none); ours are `<task>-<8hex>`,
/// and a short name keeps derived names such as volume files sane.
const MAX_NAME_LEN: usize = 64;
/// Linux block-device names like `vda`/`sdb`/`hdc`; a generous cap.
const MAX_TARGET_DEV_LEN: usize = 8;
/// QEMU's 9p `mount_tag` limit; applied to virtiofs too, to be uniform.
const MAX_TAG_LEN: usize = 31;

/// Accelerator libvirt asks QEMU for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainType {
    /// Hardware virtualisation through /dev/kvm.
    Kvm,
    /// TCG software emulation: slow, but works without (nested) KVM.
    Qemu,
}

impl DomainType {
    pub fn as_str(self) -> &'static str {
        match self {
            DomainType::Kvm => "kvm",
            DomainType::Qemu => "qemu",
        }
    }
}

/// What the guest sees a disk as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskDevice {
    Disk,
    /// Always rendered read-only (e.g. the cloud-init NoCloud seed ISO).
    Cdrom,
    /// SCSI commands passed through to a block device.
    Lun,
}

impl DiskDevice {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskDevice::Disk => "disk",
            DiskDevice::Cdrom => "cdrom",
            DiskDevice::Lun => "lun",
        }
    }
}

/// Bus a disk is attached to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskBus {
    Virtio,
    Sata,
    Scsi,
    Ide,
    Usb,
}

impl DiskBus {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskBus::Virtio => "virtio",
            DiskBus::Sata => "sata",
            DiskBus::Scsi => "scsi",
            DiskBus::Ide => "ide",
            DiskBus::Usb => "usb",
        }
    }
}

/// Where a disk's bytes live on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSource {
    /// An image file (`<disk type='file'>`, `<source file=…>`).
    File(PathBuf),
    /// A block device (`<disk type='block'>`, `<source dev=…>`).
    Block(PathBuf),
    /// An RBD image in a Ceph pool (`<disk type='network'>`, `<source
    /// protocol='rbd'>` with the monitors and the cephx user's secret).
    Rbd {
        access: crate::libvirt::storage::rbd::RbdAccess,
        image: String,
    },
}

/// One disk of the domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    pub source: DiskSource,
    /// Image format QEMU opens the source with: `qcow2` or `raw`.
    pub format: String,
    /// Guest device name, e.g. `vda`, `hdc`, `sda`.
    pub target_dev: String,
    pub bus: DiskBus,
    pub device: DiskDevice,
    pub read_only: bool,
    /// Per-device boot order (1 = first). When any disk has one, the domain
    /// uses per-device ordering only: libvirt forbids mixing it with
    /// `<os><boot dev=…/>`.
    pub boot_order: Option<u32>,
    /// The backing file of a qcow2 overlay and its format (`qcow2`/`raw`).
    /// The chain is always spelled out: `None` renders `<backingStore/>`,
    /// so QEMU never follows a backing file named inside an image.
    pub backing: Option<(PathBuf, String)>,
}

/// How a host directory reaches the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShareDriver {
    /// virtio-9p, `accessmode='mapped'`.
    NineP,
    /// virtiofs; needs shared memory, which the renderer adds. Read-only
    /// virtiofs needs libvirt ≥ 11.0: gate that before asking for it.
    Virtiofs,
}

/// A host directory shared into the guest under a mount tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareSpec {
    pub source_dir: PathBuf,
    /// Mount tag the guest mounts by (`mount -t 9p TAG /dir`).
    pub tag: String,
    pub read_only: bool,
    pub driver: ShareDriver,
}

/// A network interface; the model is always virtio.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InterfaceSpec {
    /// Attached to a libvirt network (e.g. `default`), optionally behind a
    /// libvirt network filter (`clean-traffic` on shared bridges).
    Network {
        network: String,
        mac: String,
        filter: Option<FilterRef>,
    },
    /// macvtap on a host device; `mode` is bridge, private, vepa or passthrough.
    Direct {
        device: String,
        mode: String,
        mac: String,
    },
}

/// `<filterref filter='NAME'>` with its `<parameter name= value=>`s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterRef {
    pub filter: String,
    /// e.g. `("CTRL_IP_LEARNING", "dhcp")`, `("DHCPSERVER", "192.168.122.1")`.
    pub parameters: Vec<(String, String)>,
}

/// Who the domain belongs to, kept inside `<metadata>` so a restarted plugin
/// (or an operator with `virsh dumpxml`) can tell which task owns a domain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DomainMetadata {
    pub task_id: String,
    pub alloc_id: String,
    pub task_name: String,
    pub plugin_version: String,
}

/// Everything the renderer needs for one domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainSpec {
    pub name: String,
    pub domain_type: DomainType,
    /// Maximum memory (Nomad `memory_max`, else `memory`), KiB.
    pub memory_kib: u64,
    /// Memory at boot (Nomad `memory`), KiB; at most `memory_kib`.
    pub current_memory_kib: u64,
    pub vcpus: u32,
    /// Host CPUs to pin to, libvirt list syntax (`0,2-3`), from reserved cores.
    pub cpuset: Option<String>,
    /// `<cputune><shares>`: relative CPU weight.
    pub cpu_shares: Option<u64>,
    /// Guest architecture, e.g. `x86_64`.
    pub arch: String,
    /// Machine type, e.g. `pc`.
    pub machine: String,
    pub disks: Vec<DiskSpec>,
    pub shares: Vec<ShareSpec>,
    pub interfaces: Vec<InterfaceSpec>,
    /// When set, the serial console is appended to this file; otherwise it
    /// is a pty.
    pub console_log: Option<PathBuf>,
    pub metadata: DomainMetadata,
    /// The QEMU guest agent's virtio-serial channel
    /// (`org.qemu.guest_agent.0`); libvirt picks the host socket itself.
    pub guest_agent: bool,
}

/// A spec field that cannot be rendered, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid domain {field}: {reason}")]
pub struct DomainXmlError {
    /// Path of the field, e.g. `name` or `interfaces[0].mac`.
    pub field: String,
    pub reason: String,
}

impl DomainXmlError {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        DomainXmlError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Validates `spec` and renders it as libvirt domain XML.
pub fn render_domain_xml(spec: &DomainSpec) -> Result<String, DomainXmlError> {
    spec.validate()?;
    Ok(write_domain(spec))
}

impl DomainSpec {
    /// Checks every field the way [`render_domain_xml`] does, without
    /// rendering.
    pub fn validate(&self) -> Result<(), DomainXmlError> {
        check_domain_name(&self.name)?;
        if self.vcpus == 0 {
            return Err(DomainXmlError::new("vcpus", "must be at least 1"));
        }
        if self.memory_kib == 0 {
            return Err(DomainXmlError::new("memory_kib", "must be greater than 0"));
        }
        if self.current_memory_kib == 0 {
            return Err(DomainXmlError::new(
                "current_memory_kib",
                "must be greater than 0",
            ));
        }
        if self.current_memory_kib > self.memory_kib {
            return Err(DomainXmlError::new(
                "current_memory_kib",
                format!(
                    "{} KiB exceeds the maximum memory_kib {} KiB",
                    self.current_memory_kib, self.memory_kib
                ),
            ));
        }
        if let Some(cpuset) = &self.cpuset {
            check_cpuset(cpuset)?;
        }
        if self.cpu_shares == Some(0) {
            return Err(DomainXmlError::new(
                "cpu_shares",
                "must be at least 1 (leave it unset for libvirt's default)",
            ));
        }
        check_token("arch", &self.arch)?;
        check_token("machine", &self.machine)?;

        let mut targets = HashSet::new();
        let mut boot_orders = HashSet::new();
        for (i, disk) in self.disks.iter().enumerate() {
            check_disk(i, disk)?;
            if !targets.insert(disk.target_dev.as_str()) {
                return Err(DomainXmlError::new(
                    format!("disks[{i}].target_dev"),
                    format!("{:?} is used by another disk", disk.target_dev),
                ));
            }
            if let Some(order) = disk.boot_order {
                if !boot_orders.insert(order) {
                    return Err(DomainXmlError::new(
                        format!("disks[{i}].boot_order"),
                        format!("{order} is used by another disk; boot orders must be unique"),
                    ));
                }
            }
        }

        let mut tags = HashSet::new();
        for (i, share) in self.shares.iter().enumerate() {
            check_share(i, share)?;
            if !tags.insert(share.tag.as_str()) {
                return Err(DomainXmlError::new(
                    format!("shares[{i}].tag"),
                    format!("{:?} is used by another share", share.tag),
                ));
            }
        }

        let mut macs = HashSet::new();
        for (i, interface) in self.interfaces.iter().enumerate() {
            check_interface(i, interface)?;
            let mac = match interface {
                InterfaceSpec::Network { mac, .. } | InterfaceSpec::Direct { mac, .. } => mac,
            };
            if !macs.insert(mac.to_ascii_lowercase()) {
                return Err(DomainXmlError::new(
                    format!("interfaces[{i}].mac"),
                    format!("{mac:?} is used by another interface"),
                ));
            }
        }

        if let Some(log) = &self.console_log {
            check_path("console_log", log)?;
        }

        let metadata = &self.metadata;
        check_text("metadata.task_id", &metadata.task_id)?;
        check_text("metadata.alloc_id", &metadata.alloc_id)?;
        check_text("metadata.task_name", &metadata.task_name)?;
        check_text("metadata.plugin_version", &metadata.plugin_version)?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Validation helpers

/// Rejects characters XML 1.0 cannot represent, even escaped.
fn check_text(field: &str, value: &str) -> Result<(), DomainXmlError> {
    match value.chars().find(|c| !is_xml_char(*c)) {
        None => Ok(()),
        Some(c) => Err(DomainXmlError::new(
            field,
            format!(
                "contains the control character U+{:04X}, which XML cannot carry",
                u32::from(c)
            ),
        )),
    }
}

fn check_non_empty_text(field: &str, value: &str) -> Result<(), DomainXmlError> {
    if value.is_empty() {
        return Err(DomainXmlError::new(field, "must not be empty"));
    }
    check_text(field, value)
}

fn check_path(field: &str, path: &Path) -> Result<(), DomainXmlError> {
    let Some(text) = path.to_str() else {
        return Err(DomainXmlError::new(
            field,
            format!("{} is not valid UTF-8", path.display()),
        ));
    };
    if !path.is_absolute() {
        return Err(DomainXmlError::new(
            field,
            format!("{text:?} must be an absolute path (libvirtd resolves paths itself)"),
        ));
    }
    check_text(field, text)
}

fn check_domain_name(name: &str) -> Result<(), DomainXmlError> {
    if name.is_empty() {
        return Err(DomainXmlError::new("name", "must not be empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(DomainXmlError::new(
            "name",
            format!("{} characters; at most {MAX_NAME_LEN} allowed", name.len()),
        ));
    }
    if name.starts_with('.') {
        return Err(DomainXmlError::new("name", "must not start with '.'"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(DomainXmlError::new(
            "name",
            format!("{name:?} contains {c:?}; only A-Z a-z 0-9 _ . - are allowed"),
        ));
    }
    Ok(())
}

/// `[A-Za-z0-9_.-]+`, for arch and machine names.
fn check_token(field: &str, value: &str) -> Result<(), DomainXmlError> {
    if value.is_empty() {
        return Err(DomainXmlError::new(field, "must not be empty"));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(DomainXmlError::new(
            field,
            format!("{value:?} contains {c:?}; only A-Z a-z 0-9 _ . - are allowed"),
        ));
    }
    Ok(())
}

/// libvirt's cpuset list: comma-separated `N` or `N-M` (N ≤ M).
fn check_cpuset(cpuset: &str) -> Result<(), DomainXmlError> {
    let invalid = || {
        DomainXmlError::new(
            "cpuset",
            format!("{cpuset:?} is not a CPU list like \"0,2-3\""),
        )
    };
    if cpuset.is_empty() {
        return Err(invalid());
    }
    for item in cpuset.split(',') {
        let (low, high) = match item.split_once('-') {
            Some((low, high)) => (low, high),
            None => (item, item),
        };
        let parse = |s: &str| -> Option<u32> {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            s.parse().ok()
        };
        match (parse(low), parse(high)) {
            (Some(low), Some(high)) if low <= high => {}
            _ => return Err(invalid()),
        }
    }
    Ok(())
}

/// `xx:xx:xx:xx:xx:xx` in hex, unicast (libvirt refuses multicast NIC MACs).
fn check_mac(field: &str, mac: &str) -> Result<(), DomainXmlError> {
    let octets: Vec<&str> = mac.split(':').collect();
    let well_formed = octets.len() == 6
        && octets
            .iter()
            .all(|o| o.len() == 2 && o.bytes().all(|b| b.is_ascii_hexdigit()));
    if !well_formed {
        return Err(DomainXmlError::new(
            field,
            format!("{mac:?} is not a MAC address like 52:54:00:12:34:56"),
        ));
    }
    let first = u8::from_str_radix(octets[0], 16)
        .map_err(|_| DomainXmlError::new(field, format!("{mac:?} is not a MAC address")))?;
    if first & 1 == 1 {
        return Err(DomainXmlError::new(
            field,
            format!("{mac:?} is a multicast address; a NIC needs a unicast one (lowest bit of the first octet clear)"),
        ));
    }
    Ok(())
}

fn check_disk(i: usize, disk: &DiskSpec) -> Result<(), DomainXmlError> {
    match &disk.source {
        DiskSource::File(path) | DiskSource::Block(path) => {
            check_path(&format!("disks[{i}].source"), path)?;
        }
        DiskSource::Rbd { access, image } => {
            let ok = |name: &str| crate::config::plugin::is_ceph_name(name);
            if !ok(&access.ceph_pool) || !ok(image) || !ok(&access.username) {
                return Err(DomainXmlError::new(
                    format!("disks[{i}].source"),
                    format!(
                        "RBD image {:?}/{image:?} (user {:?}) is not a plain Ceph name",
                        access.ceph_pool, access.username
                    ),
                ));
            }
            if access.hosts.is_empty() {
                return Err(DomainXmlError::new(
                    format!("disks[{i}].source"),
                    "an RBD disk needs at least one monitor host",
                ));
            }
        }
    }
    if !matches!(disk.format.as_str(), "qcow2" | "raw") {
        return Err(DomainXmlError::new(
            format!("disks[{i}].format"),
            format!(
                "{:?} is not supported; use \"qcow2\" or \"raw\"",
                disk.format
            ),
        ));
    }
    let dev = disk.target_dev.as_bytes();
    let dev_ok = !dev.is_empty()
        && dev.len() <= MAX_TARGET_DEV_LEN
        && dev[0].is_ascii_lowercase()
        && dev
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !dev_ok {
        return Err(DomainXmlError::new(
            format!("disks[{i}].target_dev"),
            format!(
                "{:?} is not a device name like \"vda\" (a-z then a-z/0-9, at most {MAX_TARGET_DEV_LEN})",
                disk.target_dev
            ),
        ));
    }
    // QEMU has no virtio cdrom; libvirt would only refuse this at start.
    if disk.device == DiskDevice::Cdrom && disk.bus == DiskBus::Virtio {
        return Err(DomainXmlError::new(
            format!("disks[{i}].bus"),
            "a cdrom cannot use the virtio bus; use ide, sata or scsi",
        ));
    }
    if disk.device == DiskDevice::Lun {
        if !matches!(disk.source, DiskSource::Block(_)) {
            return Err(DomainXmlError::new(
                format!("disks[{i}].device"),
                "a lun must be a block device; libvirt passes SCSI commands only to those",
            ));
        }
        if disk.bus != DiskBus::Scsi {
            return Err(DomainXmlError::new(
                format!("disks[{i}].bus"),
                "a lun needs the scsi bus",
            ));
        }
    }
    if let Some((path, format)) = &disk.backing {
        check_path(&format!("disks[{i}].backing"), path)?;
        if !matches!(format.as_str(), "qcow2" | "raw") {
            return Err(DomainXmlError::new(
                format!("disks[{i}].backing"),
                format!("format {format:?} is not supported; use \"qcow2\" or \"raw\""),
            ));
        }
        if disk.format != "qcow2" {
            return Err(DomainXmlError::new(
                format!("disks[{i}].backing"),
                "only a qcow2 disk can have a backing file",
            ));
        }
    }
    if disk.boot_order == Some(0) {
        return Err(DomainXmlError::new(
            format!("disks[{i}].boot_order"),
            "must be at least 1",
        ));
    }
    Ok(())
}

fn check_share(i: usize, share: &ShareSpec) -> Result<(), DomainXmlError> {
    check_path(&format!("shares[{i}].source_dir"), &share.source_dir)?;
    let field = format!("shares[{i}].tag");
    if share.tag.is_empty() {
        return Err(DomainXmlError::new(field, "must not be empty"));
    }
    if share.tag.len() > MAX_TAG_LEN {
        return Err(DomainXmlError::new(
            field,
            format!(
                "{:?} is {} characters; mount tags allow at most {MAX_TAG_LEN}",
                share.tag,
                share.tag.len()
            ),
        ));
    }
    if let Some(c) = share
        .tag
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-')))
    {
        return Err(DomainXmlError::new(
            field,
            format!(
                "{:?} contains {c:?}; only A-Z a-z 0-9 _ - are allowed",
                share.tag
            ),
        ));
    }
    Ok(())
}

fn check_interface(i: usize, interface: &InterfaceSpec) -> Result<(), DomainXmlError> {
    match interface {
        InterfaceSpec::Network {
            network,
            mac,
            filter,
        } => {
            check_non_empty_text(&format!("interfaces[{i}].network"), network)?;
            if let Some(filter) = filter {
                check_filter(&format!("interfaces[{i}].filter"), filter)?;
            }
            check_mac(&format!("interfaces[{i}].mac"), mac)
        }
        InterfaceSpec::Direct { device, mode, mac } => {
            check_non_empty_text(&format!("interfaces[{i}].device"), device)?;
            if !matches!(mode.as_str(), "bridge" | "private" | "vepa" | "passthrough") {
                return Err(DomainXmlError::new(
                    format!("interfaces[{i}].mode"),
                    format!(
                        "{mode:?} is not a macvtap mode; use bridge, private, vepa or passthrough"
                    ),
                ));
            }
            check_mac(&format!("interfaces[{i}].mac"), mac)
        }
    }
}

/// Filter and parameter names as libvirt spells them (`clean-traffic`,
/// `CTRL_IP_LEARNING`); values are plain text.
fn check_filter(field: &str, filter: &FilterRef) -> Result<(), DomainXmlError> {
    let is_name = |name: &str, extra: &[char]| {
        !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || extra.contains(&c))
    };
    if !is_name(&filter.filter, &['-', '.']) {
        return Err(DomainXmlError::new(
            field,
            format!("{:?} is not a network filter name", filter.filter),
        ));
    }
    for (name, value) in &filter.parameters {
        if !is_name(name, &[]) {
            return Err(DomainXmlError::new(
                format!("{field}.parameters"),
                format!("{name:?} is not a filter parameter name"),
            ));
        }
        check_non_empty_text(&format!("{field}.parameters.{name}"), value)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Rendering (input already validated)

/// Validated paths are UTF-8, so this never loses anything.
fn path_text(path: &Path) -> Cow<'_, str> {
    path.to_string_lossy()
}

fn write_domain(spec: &DomainSpec) -> String {
    let mut w = XmlWriter::new();
    w.open("domain", &[("type", spec.domain_type.as_str())]);
    w.text("name", &[], &spec.name);

    let ns_attr = format!("xmlns:{METADATA_PREFIX}");
    let element = format!("{METADATA_PREFIX}:{METADATA_ELEMENT}");
    w.open("metadata", &[]);
    w.empty(
        &element,
        &[
            (ns_attr.as_str(), METADATA_NAMESPACE),
            ("task_id", &spec.metadata.task_id),
            ("alloc_id", &spec.metadata.alloc_id),
            ("task_name", &spec.metadata.task_name),
            ("plugin_version", &spec.metadata.plugin_version),
        ],
    );
    w.close("metadata");

    w.text("memory", &[("unit", "KiB")], &spec.memory_kib.to_string());
    w.text(
        "currentMemory",
        &[("unit", "KiB")],
        &spec.current_memory_kib.to_string(),
    );
    // virtiofsd maps guest RAM, so QEMU must allocate it shareable.
    if spec
        .shares
        .iter()
        .any(|s| s.driver == ShareDriver::Virtiofs)
    {
        w.open("memoryBacking", &[]);
        w.empty("source", &[("type", "memfd")]);
        w.empty("access", &[("mode", "shared")]);
        w.close("memoryBacking");
    }

    let vcpus = spec.vcpus.to_string();
    match &spec.cpuset {
        Some(cpuset) => w.text(
            "vcpu",
            &[("placement", "static"), ("cpuset", cpuset)],
            &vcpus,
        ),
        None => w.text("vcpu", &[("placement", "static")], &vcpus),
    }
    if let Some(shares) = spec.cpu_shares {
        w.open("cputune", &[]);
        w.text("shares", &[], &shares.to_string());
        w.close("cputune");
    }

    let per_device_boot = spec.disks.iter().any(|d| d.boot_order.is_some());
    w.open("os", &[]);
    w.text(
        "type",
        &[("arch", &spec.arch), ("machine", &spec.machine)],
        "hvm",
    );
    // libvirt refuses <os><boot> together with per-device <boot order>.
    if !per_device_boot {
        w.empty("boot", &[("dev", "hd")]);
    }
    w.close("os");

    // ACPI so a graceful stop can press the virtual power button.
    w.open("features", &[]);
    w.empty("acpi", &[]);
    w.empty("apic", &[]);
    w.close("features");
    // TCG cannot pass the host CPU through; it keeps QEMU's default model.
    if spec.domain_type == DomainType::Kvm {
        w.empty("cpu", &[("mode", "host-passthrough")]);
    }
    w.empty("clock", &[("offset", "utc")]);
    w.text("on_poweroff", &[], "destroy");
    w.text("on_reboot", &[], "restart");
    w.text("on_crash", &[], "destroy");

    w.open("devices", &[]);
    for disk in &spec.disks {
        write_disk(&mut w, disk);
    }
    for share in &spec.shares {
        write_share(&mut w, share);
    }
    for interface in &spec.interfaces {
        write_interface(&mut w, interface);
    }
    write_console(&mut w, spec.console_log.as_deref());
    if spec.guest_agent {
        w.open("channel", &[("type", "unix")]);
        w.empty(
            "target",
            &[("type", "virtio"), ("name", "org.qemu.guest_agent.0")],
        );
        w.close("channel");
    }
    // Stats period so virDomainMemoryStats reports guest-side numbers.
    w.open("memballoon", &[("model", "virtio")]);
    w.empty("stats", &[("period", "5")]);
    w.close("memballoon");
    // Entropy for guests that block on early randomness (ssh host keys).
    w.open("rng", &[("model", "virtio")]);
    w.text("backend", &[("model", "random")], "/dev/urandom");
    w.close("rng");
    w.close("devices");

    w.close("domain");
    w.finish(true)
}

fn write_disk(w: &mut XmlWriter, disk: &DiskSpec) {
    let (disk_type, source_attr, path) = match &disk.source {
        DiskSource::File(path) => ("file", "file", path),
        DiskSource::Block(path) => ("block", "dev", path),
        DiskSource::Rbd { access, image } => return write_rbd_disk(w, disk, access, image),
    };
    let path = path_text(path);
    w.open(
        "disk",
        &[("type", disk_type), ("device", disk.device.as_str())],
    );
    w.empty("driver", &[("name", "qemu"), ("type", &disk.format)]);
    w.empty("source", &[(source_attr, &path)]);
    // The chain ends here, whatever the image files say: a parent with a
    // backing file of its own (or a raw disk holding a qcow2 header) must
    // not make QEMU open other host files.
    match &disk.backing {
        Some((parent, format)) => {
            w.open("backingStore", &[("type", "file")]);
            w.empty("format", &[("type", format)]);
            w.empty("source", &[("file", &path_text(parent))]);
            w.empty("backingStore", &[]);
            w.close("backingStore");
        }
        None => w.empty("backingStore", &[]),
    }
    w.empty(
        "target",
        &[("dev", &disk.target_dev), ("bus", disk.bus.as_str())],
    );
    if disk.read_only || disk.device == DiskDevice::Cdrom {
        w.empty("readonly", &[]);
    }
    if let Some(order) = disk.boot_order {
        w.empty("boot", &[("order", &order.to_string())]);
    }
    w.close("disk");
}

/// A disk on an RBD image: QEMU reaches it through librbd with the key of
/// libvirt secret `secret_uuid` (never in the XML). Its clone parent, if
/// any, is RBD's business, so the chain ends here.
fn write_rbd_disk(
    w: &mut XmlWriter,
    disk: &DiskSpec,
    access: &crate::libvirt::storage::rbd::RbdAccess,
    image: &str,
) {
    w.open(
        "disk",
        &[("type", "network"), ("device", disk.device.as_str())],
    );
    w.empty(
        "driver",
        &[("name", "qemu"), ("type", "raw"), ("cache", "writeback")],
    );
    w.open(
        "source",
        &[
            ("protocol", "rbd"),
            ("name", &format!("{}/{image}", access.ceph_pool)),
        ],
    );
    for host in &access.hosts {
        crate::libvirt::storage::rbd::write_host(w, host);
    }
    w.close("source");
    w.open("auth", &[("username", &access.username)]);
    w.empty("secret", &[("type", "ceph"), ("uuid", &access.secret_uuid)]);
    w.close("auth");
    w.empty("backingStore", &[]);
    w.empty(
        "target",
        &[("dev", &disk.target_dev), ("bus", disk.bus.as_str())],
    );
    if disk.read_only || disk.device == DiskDevice::Cdrom {
        w.empty("readonly", &[]);
    }
    if let Some(order) = disk.boot_order {
        w.empty("boot", &[("order", &order.to_string())]);
    }
    w.close("disk");
}

fn write_share(w: &mut XmlWriter, share: &ShareSpec) {
    let dir = path_text(&share.source_dir);
    match share.driver {
        ShareDriver::NineP => {
            w.open("filesystem", &[("type", "mount"), ("accessmode", "mapped")]);
        }
        ShareDriver::Virtiofs => {
            w.open("filesystem", &[("type", "mount")]);
            w.empty("driver", &[("type", "virtiofs"), ("queue", "1024")]);
        }
    }
    w.empty("source", &[("dir", &dir)]);
    w.empty("target", &[("dir", &share.tag)]);
    if share.read_only {
        w.empty("readonly", &[]);
    }
    w.close("filesystem");
}

fn write_interface(w: &mut XmlWriter, interface: &InterfaceSpec) {
    match interface {
        InterfaceSpec::Network {
            network,
            mac,
            filter,
        } => {
            w.open("interface", &[("type", "network")]);
            w.empty("mac", &[("address", &mac.to_ascii_lowercase())]);
            w.empty("source", &[("network", network)]);
            if let Some(filter) = filter {
                w.open("filterref", &[("filter", &filter.filter)]);
                for (name, value) in &filter.parameters {
                    w.empty("parameter", &[("name", name), ("value", value)]);
                }
                w.close("filterref");
            }
        }
        InterfaceSpec::Direct { device, mode, mac } => {
            w.open("interface", &[("type", "direct")]);
            w.empty("mac", &[("address", &mac.to_ascii_lowercase())]);
            w.empty("source", &[("dev", device), ("mode", mode)]);
        }
    }
    w.empty("model", &[("type", "virtio")]);
    w.close("interface");
}

/// The serial port is the guest's console (`console=ttyS0`); `<console>`
/// names the same port so `virsh console` and libvirt agree on it.
fn write_console(w: &mut XmlWriter, console_log: Option<&Path>) {
    match console_log {
        Some(log) => {
            let log = path_text(log);
            // append='on': a restarted domain adds to the log, not truncates it.
            let source: &[(&str, &str)] = &[("path", &log), ("append", "on")];
            w.open("serial", &[("type", "file")]);
            w.empty("source", source);
            w.empty("target", &[("port", "0")]);
            w.close("serial");
            w.open("console", &[("type", "file")]);
            w.empty("source", source);
            w.empty("target", &[("type", "serial"), ("port", "0")]);
            w.close("console");
        }
        None => {
            w.open("serial", &[("type", "pty")]);
            w.empty("target", &[("port", "0")]);
            w.close("serial");
            w.open("console", &[("type", "pty")]);
            w.empty("target", &[("type", "serial"), ("port", "0")]);
            w.close("console");
        }
    }
}

/// The task id in our metadata element as libvirt hands it back
/// (`virDomainGetMetadata` by [`METADATA_NAMESPACE`]).
pub fn metadata_task_id(element_xml: &str) -> Option<String> {
    let element = super::xml::parse(element_xml).ok()?;
    (element.name == METADATA_ELEMENT)
        .then(|| element.attr("task_id").map(str::to_string))
        .flatten()
        .filter(|id| !id.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::libvirt::xml::Element;
    use proptest::prelude::*;
    use std::path::PathBuf;

    const ALLOC: &str = "/opt/nomad/data/alloc/8c1f2a3b-4d5e-6f70-8192-a3b4c5d6e7f8";

    fn tcg_minimal() -> DomainSpec {
        DomainSpec {
            name: "web-1a2b3c4d".into(),
            domain_type: DomainType::Qemu,
            memory_kib: 524_288,
            current_memory_kib: 524_288,
            vcpus: 1,
            cpuset: None,
            cpu_shares: None,
            arch: "x86_64".into(),
            machine: "pc".into(),
            disks: vec![
                DiskSpec {
                    source: DiskSource::File(
                        "/var/lib/nomad-driver-virt/pool/web-1a2b3c4d_vda.img".into(),
                    ),
                    format: "qcow2".into(),
                    target_dev: "vda".into(),
                    bus: DiskBus::Virtio,
                    device: DiskDevice::Disk,
                    read_only: false,
                    boot_order: None,
                    backing: None,
                },
                DiskSpec {
                    source: DiskSource::File(
                        "/var/lib/nomad-driver-virt/pool/web-1a2b3c4d_cidata.iso".into(),
                    ),
                    format: "raw".into(),
                    target_dev: "hdc".into(),
                    bus: DiskBus::Ide,
                    device: DiskDevice::Cdrom,
                    read_only: false, // a cdrom is read-only regardless
                    boot_order: None,
                    backing: None,
                },
            ],
            shares: [
                ("alloc", "allocDir"),
                ("web/local", "localDir"),
                ("web/secrets", "secretsDir"),
            ]
            .iter()
            .map(|(dir, tag)| ShareSpec {
                source_dir: PathBuf::from(format!("{ALLOC}/{dir}")),
                tag: (*tag).into(),
                read_only: true,
                driver: ShareDriver::NineP,
            })
            .collect(),
            interfaces: vec![InterfaceSpec::Network {
                network: "default".into(),
                mac: "52:54:00:12:34:56".into(),
                filter: None,
            }],
            console_log: Some(format!("{ALLOC}/alloc/logs/web.console.log").into()),
            metadata: DomainMetadata {
                task_id: "8c1f2a3b-4d5e-6f70-8192-a3b4c5d6e7f8/web/1a2b3c4d".into(),
                alloc_id: "8c1f2a3b-4d5e-6f70-8192-a3b4c5d6e7f8".into(),
                task_name: "web".into(),
                plugin_version: "0.1.0".into(),
            },
            guest_agent: false,
        }
    }

    fn kvm_full() -> DomainSpec {
        DomainSpec {
            name: "db-0011aabb".into(),
            domain_type: DomainType::Kvm,
            memory_kib: 2_097_152,
            current_memory_kib: 1_048_576,
            vcpus: 3,
            cpuset: Some("0,2-3".into()),
            cpu_shares: Some(1024),
            arch: "x86_64".into(),
            machine: "pc".into(),
            disks: vec![
                DiskSpec {
                    source: DiskSource::File(
                        "/var/lib/nomad-driver-virt/pool/db-0011aabb_vda.img".into(),
                    ),
                    format: "qcow2".into(),
                    target_dev: "vda".into(),
                    bus: DiskBus::Virtio,
                    device: DiskDevice::Disk,
                    read_only: false,
                    boot_order: Some(1),
                    backing: Some((
                        "/var/lib/nomad-driver-virt/pool/nomad-virt-base-raw-00ff.img".into(),
                        "raw".into(),
                    )),
                },
                DiskSpec {
                    source: DiskSource::Block("/dev/mapper/vg0-dbdata".into()),
                    format: "raw".into(),
                    target_dev: "vdb".into(),
                    bus: DiskBus::Virtio,
                    device: DiskDevice::Disk,
                    read_only: false,
                    boot_order: Some(2),
                    backing: None,
                },
                DiskSpec {
                    source: DiskSource::File(
                        "/var/lib/nomad-driver-virt/pool/db-0011aabb_cidata.iso".into(),
                    ),
                    format: "raw".into(),
                    target_dev: "sda".into(),
                    bus: DiskBus::Sata,
                    device: DiskDevice::Cdrom,
                    read_only: true,
                    boot_order: None,
                    backing: None,
                },
            ],
            // Read-write: read-only virtiofs needs libvirt >= 11.0.
            shares: vec![ShareSpec {
                source_dir: format!("{ALLOC}/alloc").into(),
                tag: "allocDir".into(),
                read_only: false,
                driver: ShareDriver::Virtiofs,
            }],
            interfaces: vec![InterfaceSpec::Direct {
                device: "eth0".into(),
                mode: "bridge".into(),
                mac: "52:54:00:AB:CD:EF".into(),
            }],
            console_log: None,
            metadata: DomainMetadata {
                task_id: "8c1f2a3b-4d5e-6f70-8192-a3b4c5d6e7f8/db/0011aabb".into(),
                alloc_id: "8c1f2a3b-4d5e-6f70-8192-a3b4c5d6e7f8".into(),
                task_name: "db".into(),
                plugin_version: "0.1.0".into(),
            },
            guest_agent: false,
        }
    }

    fn goldens() -> Vec<(&'static str, DomainSpec)> {
        vec![("tcg_minimal", tcg_minimal()), ("kvm_full", kvm_full())]
    }

    fn golden_path(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden/domain")
            .join(format!("{name}.xml"))
    }

    fn render(spec: &DomainSpec) -> String {
        render_domain_xml(spec).expect("spec renders")
    }

    fn rejected(spec: &DomainSpec) -> DomainXmlError {
        render_domain_xml(spec).expect_err("spec must be rejected")
    }

    fn parse_xml(xml: &str) -> Result<Element, String> {
        crate::libvirt::xml::parse(xml).map_err(|e| crate::libvirt::error::with_sources(&e))
    }

    /// Every element named `name` in the document.
    fn all<'a>(root: &'a Element, name: &str) -> Vec<&'a Element> {
        root.descendants()
            .into_iter()
            .filter(|e| e.name == name)
            .collect()
    }

    #[test]
    fn the_checker_rejects_broken_xml() {
        for bad in [
            "<a><b></a>",
            "<a x='1' x='2'/>",
            "<a x='<'/>",
            "<a>&bogus;</a>",
            "<a>&#0;</a>",
            "<a/><b/>",
            "<a>",
            "text",
            "<a x=1/>",
        ] {
            assert!(parse_xml(bad).is_err(), "accepted {bad:?}");
        }
        let ok = parse_xml("<a x='&apos;&amp;'><b y=\"&quot;\">t&lt;</b></a>").unwrap();
        assert_eq!(ok.attr("x"), Some("'&"));
        assert_eq!(ok.children[0].text, "t<");
    }

    // -- Golden files

    #[test]
    fn golden_files_match() {
        let update = std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1");
        for (name, spec) in goldens() {
            let xml = render(&spec);
            let path = golden_path(name);
            if update {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, &xml).unwrap();
                continue;
            }
            let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
                panic!(
                    "{}: {e}; run `UPDATE_GOLDEN=1 cargo test --lib domain_xml` to create it",
                    path.display()
                )
            });
            assert_eq!(
                xml,
                expected,
                "{} is out of date; review the diff, then rerun with UPDATE_GOLDEN=1",
                path.display()
            );
        }
    }

    /// `kind = "lun"`: a block device on the scsi bus, nothing else.
    #[test]
    fn a_lun_is_a_block_device_on_scsi() {
        let mut spec = kvm_full();
        spec.disks[1].device = DiskDevice::Lun;
        spec.disks[1].bus = DiskBus::Scsi;
        spec.disks[1].target_dev = "sdb".into();
        let xml = render(&spec);
        assert!(
            xml.contains("<disk type=\"block\" device=\"lun\">"),
            "{xml}"
        );
        spec.disks[1].bus = DiskBus::Virtio;
        assert_eq!(rejected(&spec).field, "disks[1].bus");
        let mut file_lun = kvm_full();
        file_lun.disks[0].device = DiskDevice::Lun;
        file_lun.disks[0].bus = DiskBus::Scsi;
        assert_eq!(rejected(&file_lun).field, "disks[0].device");
    }

    /// Issue 9.7: QEMU never follows a backing file named inside an image;
    /// an overlay's chain is spelled out and ends in `<backingStore/>`.
    #[test]
    fn every_disk_pins_its_backing_chain() {
        let xml = render(&kvm_full());
        let root = parse_xml(&xml).unwrap();
        for disk in all(&root, "disk") {
            let chain = disk
                .child("backingStore")
                .expect("backingStore on every disk");
            let source = disk.child("source").unwrap();
            if source.attr("file").is_some_and(|f| f.ends_with("_vda.img")) {
                assert_eq!(chain.attr("type"), Some("file"));
                assert_eq!(
                    chain.child("source").and_then(|s| s.attr("file")),
                    Some("/var/lib/nomad-driver-virt/pool/nomad-virt-base-raw-00ff.img")
                );
                assert_eq!(
                    chain.child("format").and_then(|f| f.attr("type")),
                    Some("raw")
                );
                let end = chain.child("backingStore").expect("the chain ends");
                assert!(end.children.is_empty() && end.attributes.is_empty());
            } else {
                assert!(chain.children.is_empty(), "{xml}");
            }
        }
        let mut raw_with_backing = kvm_full();
        raw_with_backing.disks[1].backing = Some(("/x/base.img".into(), "raw".into()));
        assert_eq!(rejected(&raw_with_backing).field, "disks[1].backing");
        let mut bad_format = kvm_full();
        bad_format.disks[0].backing = Some(("/x/base.img".into(), "vmdk".into()));
        assert_eq!(rejected(&bad_format).field, "disks[0].backing");
    }

    #[test]
    fn guest_agent_channel_golden() {
        let mut with_agent = tcg_minimal();
        with_agent.guest_agent = true;
        let xml = render_domain_xml(&with_agent).expect("spec renders");
        let path = golden_path("tcg_guest_agent");
        if std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1") {
            std::fs::write(&path, &xml).unwrap();
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; run `UPDATE_GOLDEN=1 cargo test --lib domain_xml` to create it",
                path.display()
            )
        });
        assert_eq!(xml, expected, "{} is out of date", path.display());
        let root = crate::libvirt::xml::parse(&xml).unwrap();
        let channels: Vec<_> = root
            .descendants()
            .into_iter()
            .filter(|element| element.name == "channel")
            .collect();
        assert_eq!(channels.len(), 1);
        let target = channels[0].child("target").unwrap();
        assert_eq!(target.attr("name"), Some("org.qemu.guest_agent.0"));
        // Without the option the channel is absent (virt-xml-validate checks
        // the golden file with the others, in tests/domain_xml.rs).
        assert!(!render(&tcg_minimal()).contains("<channel"));
    }

    #[test]
    fn golden_outputs_are_well_formed() {
        for (name, spec) in goldens() {
            let root = parse_xml(&render(&spec)).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(root.name, "domain");
        }
    }

    /// A private libvirt test-driver connection: the node file gives this
    /// test its own state (test:///default is shared process-wide).
    fn private_test_connection(dir: &Path) -> virt::connect::Connect {
        virt::error::clear_error_callback();
        let node = dir.join("node.xml");
        std::fs::write(&node, "<node/>\n").unwrap();
        let uri = format!("test://{}", node.display());
        virt::connect::Connect::open(Some(&uri)).expect("open the libvirt test driver")
    }

    /// Defines `xml` with schema validation, checks it, and undefines it.
    fn define_and_undefine(
        conn: &virt::connect::Connect,
        name: &str,
        xml: &str,
        check: impl Fn(&str),
    ) {
        let domain = conn
            .define_domain_xml_flags(xml, virt::sys::VIR_DOMAIN_DEFINE_VALIDATE)
            .unwrap_or_else(|e| panic!("libvirt refused {name}: {e}"));
        let described = domain.xml_desc(0).unwrap();
        check(&described);
        domain.undefine().unwrap();
        assert!(conn.lookup_domain_by_name(name).is_err());
    }

    #[test]
    fn libvirt_test_driver_accepts_golden_domains() {
        let dir = tempfile::tempdir().unwrap();
        let conn = private_test_connection(dir.path());
        for (_, spec) in goldens() {
            let xml = render(&spec);
            define_and_undefine(&conn, &spec.name, &xml, |described| {
                let root = parse_xml(described).expect("libvirt's XML is well-formed");
                assert_eq!(root.child("name").unwrap().text, spec.name);
                assert_eq!(all(&root, "disk").len(), spec.disks.len());
                assert_eq!(all(&root, "filesystem").len(), spec.shares.len());
                assert_eq!(all(&root, "interface").len(), spec.interfaces.len());
            });
            // Our metadata element is readable by namespace, as recovery needs.
            let domain = conn
                .define_domain_xml_flags(&xml, virt::sys::VIR_DOMAIN_DEFINE_VALIDATE)
                .unwrap();
            let metadata = domain
                .metadata(
                    virt::sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
                    Some(METADATA_NAMESPACE),
                    0,
                )
                .expect("metadata by namespace");
            let task = parse_xml(&metadata).unwrap();
            assert_eq!(task.name, METADATA_ELEMENT);
            assert_eq!(task.attr("task_id"), Some(spec.metadata.task_id.as_str()));
            domain.undefine().unwrap();
        }
    }

    fn rbd_source(image: &str) -> DiskSource {
        DiskSource::Rbd {
            access: crate::libvirt::storage::rbd::RbdAccess {
                ceph_pool: "ndvtest-rbd".into(),
                hosts: vec![crate::config::plugin::CephHost {
                    name: "127.0.0.1".into(),
                    port: Some(6789),
                }],
                username: "ndvtest".into(),
                secret_uuid: "0b0c5f7e-1111-2222-3333-444455556666".into(),
            },
            image: image.into(),
        }
    }

    /// An RBD disk is a network disk with the monitors and the secret's
    /// UUID (no key), and libvirt's schema accepts it.
    #[test]
    fn rbd_disks_are_network_disks_libvirt_accepts() {
        let mut spec = tcg_minimal();
        spec.disks[0].source = rbd_source("vm_vda.img");
        spec.disks[0].format = "raw".into();
        let xml = render_domain_xml(&spec).expect("renders");
        let root = parse_xml(&xml).unwrap();
        let disk = all(&root, "disk")[0];
        assert_eq!(disk.attr("type"), Some("network"));
        let source = disk.child("source").unwrap();
        assert_eq!(source.attr("protocol"), Some("rbd"));
        assert_eq!(source.attr("name"), Some("ndvtest-rbd/vm_vda.img"));
        let host = source.child("host").unwrap();
        assert_eq!(host.attr("name"), Some("127.0.0.1"));
        assert_eq!(host.attr("port"), Some("6789"));
        let auth = disk.child("auth").unwrap();
        assert_eq!(auth.attr("username"), Some("ndvtest"));
        let secret = auth.child("secret").unwrap();
        assert_eq!(secret.attr("type"), Some("ceph"));
        assert_eq!(
            secret.attr("uuid"),
            Some("0b0c5f7e-1111-2222-3333-444455556666")
        );
        let dir = tempfile::tempdir().unwrap();
        let conn = private_test_connection(dir.path());
        define_and_undefine(&conn, &spec.name, &xml, |described| {
            assert!(described.contains("protocol='rbd'"), "{described}");
        });

        // A name that could split the image spec is refused.
        spec.disks[0].source = rbd_source("vm@snap");
        assert_eq!(rejected(&spec).field, "disks[0].source");
    }

    // -- Hostile input

    #[test]
    fn hostile_name_is_rejected() {
        let mut spec = tcg_minimal();
        spec.name = "x'/><evil/>".into();
        let err = rejected(&spec);
        assert_eq!(err.field, "name");
        assert!(err.to_string().contains("name"), "{err}");
    }

    fn hostile_path_spec(path: &str) -> DomainSpec {
        let mut spec = tcg_minimal();
        spec.disks[0].source = DiskSource::File(path.into());
        spec.shares[0].source_dir = path.into();
        spec.console_log = Some(path.into());
        spec.metadata.task_name = path.into();
        spec
    }

    #[test]
    fn hostile_path_is_escaped_and_round_trips() {
        let path = "/tmp/a'b\"c<d>e&f/evil'/><disk type='file'>";
        let xml = render(&hostile_path_spec(path));
        assert!(!xml.contains("<d>"), "raw markup leaked:\n{xml}");
        assert!(xml.contains("a&apos;b&quot;c&lt;d&gt;e&amp;f"), "{xml}");
        let root = parse_xml(&xml).unwrap_or_else(|e| panic!("{e}:\n{xml}"));
        let disks = all(&root, "disk");
        assert_eq!(disks.len(), 2, "an injected <disk> appeared");
        let source = disks[0].child("source").unwrap();
        assert_eq!(source.attr("file"), Some(path));
        let share = all(&root, "filesystem")[0].child("source").unwrap();
        assert_eq!(share.attr("dir"), Some(path));
        let task = all(&root, "nomad:task")[0];
        assert_eq!(task.attr("task_name"), Some(path));
    }

    #[test]
    fn libvirt_reads_a_hostile_path_back_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let conn = private_test_connection(dir.path());
        let path = "/tmp/a'b\"c<d>e&f.img";
        let spec = hostile_path_spec(path);
        define_and_undefine(&conn, &spec.name, &render(&spec), |described| {
            let root = parse_xml(described).unwrap();
            let source = all(&root, "disk")[0].child("source").unwrap();
            assert_eq!(source.attr("file"), Some(path));
        });
    }

    #[test]
    fn bad_macs_are_rejected() {
        for mac in [
            "52:54:00:zz:00:01",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52-54-00-12-34-56",
            "525:4:00:12:34:56",
            "",
            "01:00:5e:00:00:01", // multicast
        ] {
            let mut spec = tcg_minimal();
            spec.interfaces[0] = InterfaceSpec::Network {
                network: "default".into(),
                mac: mac.into(),
                filter: None,
            };
            assert_eq!(rejected(&spec).field, "interfaces[0].mac", "{mac:?}");
        }
    }

    #[test]
    fn control_characters_are_rejected_with_the_field() {
        let mut spec = tcg_minimal();
        spec.disks[1].source = DiskSource::File("/tmp/a\0b".into());
        let err = rejected(&spec);
        assert_eq!(err.field, "disks[1].source");
        assert!(err.reason.contains("U+0000"), "{err}");

        let mut spec = tcg_minimal();
        spec.metadata.task_name = "web\u{1b}[31m".into();
        assert_eq!(rejected(&spec).field, "metadata.task_name");

        let mut spec = tcg_minimal();
        spec.console_log = Some("/tmp/\u{FFFF}".into());
        assert_eq!(rejected(&spec).field, "console_log");
    }

    #[test]
    fn tabs_and_newlines_survive_as_character_references() {
        let mut spec = tcg_minimal();
        spec.metadata.task_name = "a\tb\nc\rd".into();
        let xml = render(&spec);
        assert!(xml.contains("a&#9;b&#10;c&#13;d"));
        let root = parse_xml(&xml).unwrap();
        assert_eq!(
            all(&root, "nomad:task")[0].attr("task_name"),
            Some("a\tb\nc\rd")
        );
    }

    #[test]
    fn relative_and_non_utf8_paths_are_rejected() {
        let mut spec = tcg_minimal();
        spec.shares[2].source_dir = "alloc/secrets".into();
        assert_eq!(rejected(&spec).field, "shares[2].source_dir");

        use std::os::unix::ffi::OsStrExt;
        let mut spec = tcg_minimal();
        spec.disks[0].source = DiskSource::Block(std::ffi::OsStr::from_bytes(b"/dev/\xff").into());
        let err = rejected(&spec);
        assert_eq!(err.field, "disks[0].source");
        assert!(err.reason.contains("UTF-8"), "{err}");
    }

    // -- Validation of the other fields

    #[test]
    fn names_follow_the_grammar() {
        for good in ["a", "web-1a2b3c4d", "A_b.c-9", &"x".repeat(64)] {
            let mut spec = tcg_minimal();
            spec.name = good.to_string();
            assert!(render_domain_xml(&spec).is_ok(), "{good:?}");
        }
        for bad in ["", ".hidden", "has space", "slash/", "é", &"x".repeat(65)] {
            let mut spec = tcg_minimal();
            spec.name = bad.to_string();
            assert_eq!(rejected(&spec).field, "name", "{bad:?}");
        }
    }

    #[test]
    fn cpu_and_memory_bounds() {
        let mut spec = tcg_minimal();
        spec.vcpus = 0;
        assert_eq!(rejected(&spec).field, "vcpus");

        let mut spec = tcg_minimal();
        spec.memory_kib = 0;
        spec.current_memory_kib = 0;
        assert_eq!(rejected(&spec).field, "memory_kib");

        let mut spec = tcg_minimal();
        spec.current_memory_kib = 0;
        assert_eq!(rejected(&spec).field, "current_memory_kib");

        let mut spec = tcg_minimal();
        spec.current_memory_kib = spec.memory_kib + 1;
        assert_eq!(rejected(&spec).field, "current_memory_kib");

        let mut spec = tcg_minimal();
        spec.cpu_shares = Some(0);
        assert_eq!(rejected(&spec).field, "cpu_shares");
    }

    #[test]
    fn cpusets_follow_libvirts_list_syntax() {
        for good in ["0", "0,2-3", "1-1", "10-12,15"] {
            assert!(check_cpuset(good).is_ok(), "{good:?}");
        }
        for bad in ["", ",", "0,", "3-1", "1--2", "-1", "a", "0 1", "^2", "0-"] {
            let mut spec = tcg_minimal();
            spec.cpuset = Some(bad.into());
            assert_eq!(rejected(&spec).field, "cpuset", "{bad:?}");
        }
    }

    #[test]
    fn arch_and_machine_are_tokens() {
        let mut spec = tcg_minimal();
        spec.machine = "pc-q35-7.2".into();
        assert!(render_domain_xml(&spec).is_ok());
        spec.machine = "pc' foo='".into();
        assert_eq!(rejected(&spec).field, "machine");
        let mut spec = tcg_minimal();
        spec.arch = String::new();
        assert_eq!(rejected(&spec).field, "arch");
    }

    #[test]
    fn disk_fields_are_checked() {
        let mut spec = tcg_minimal();
        spec.disks[0].format = "vmdk".into();
        assert_eq!(rejected(&spec).field, "disks[0].format");

        for bad in ["", "1vda", "vDa", "vd-a", "vdabcdefg", "../x"] {
            let mut spec = tcg_minimal();
            spec.disks[0].target_dev = bad.into();
            assert_eq!(rejected(&spec).field, "disks[0].target_dev", "{bad:?}");
        }

        let mut spec = tcg_minimal();
        spec.disks[1].target_dev = "vda".into();
        assert_eq!(rejected(&spec).field, "disks[1].target_dev");

        let mut spec = tcg_minimal();
        spec.disks[1].bus = DiskBus::Virtio;
        assert_eq!(rejected(&spec).field, "disks[1].bus");

        let mut spec = kvm_full();
        spec.disks[1].boot_order = Some(1);
        assert_eq!(rejected(&spec).field, "disks[1].boot_order");
        spec.disks[1].boot_order = Some(0);
        assert_eq!(rejected(&spec).field, "disks[1].boot_order");
    }

    #[test]
    fn share_tags_are_checked() {
        for bad in ["", "has space", "a/b", "tag'", &"t".repeat(32)] {
            let mut spec = tcg_minimal();
            spec.shares[0].tag = bad.to_string();
            assert_eq!(rejected(&spec).field, "shares[0].tag", "{bad:?}");
        }
        let mut spec = tcg_minimal();
        spec.shares[0].tag = "t".repeat(31);
        assert!(render_domain_xml(&spec).is_ok());
        spec.shares[1].tag = "t".repeat(31);
        assert_eq!(rejected(&spec).field, "shares[1].tag");
    }

    #[test]
    fn interface_fields_are_checked() {
        let mut spec = kvm_full();
        spec.interfaces[0] = InterfaceSpec::Direct {
            device: "eth0".into(),
            mode: "bridged".into(),
            mac: "52:54:00:00:00:01".into(),
        };
        assert_eq!(rejected(&spec).field, "interfaces[0].mode");
        for mode in ["bridge", "private", "vepa", "passthrough"] {
            spec.interfaces[0] = InterfaceSpec::Direct {
                device: "eth0".into(),
                mode: mode.into(),
                mac: "52:54:00:00:00:01".into(),
            };
            assert!(render_domain_xml(&spec).is_ok(), "{mode}");
        }

        let mut spec = tcg_minimal();
        spec.interfaces[0] = InterfaceSpec::Network {
            network: String::new(),
            mac: "52:54:00:00:00:01".into(),
            filter: None,
        };
        assert_eq!(rejected(&spec).field, "interfaces[0].network");

        let mut spec = tcg_minimal();
        spec.interfaces.push(InterfaceSpec::Network {
            network: "other".into(),
            mac: "52:54:00:12:34:56".to_uppercase(),
            filter: None,
        });
        assert_eq!(rejected(&spec).field, "interfaces[1].mac");
    }

    #[test]
    fn network_interfaces_carry_their_filter() {
        let mut spec = tcg_minimal();
        spec.interfaces[0] = InterfaceSpec::Network {
            network: "default".into(),
            mac: "52:54:00:00:00:01".into(),
            filter: Some(FilterRef {
                filter: "clean-traffic".into(),
                parameters: vec![
                    ("CTRL_IP_LEARNING".into(), "dhcp".into()),
                    ("DHCPSERVER".into(), "192.168.122.1".into()),
                ],
            }),
        };
        let xml = render_domain_xml(&spec).expect("renders");
        let root = crate::libvirt::xml::parse(&xml).expect("parses");
        let interface = root
            .child("devices")
            .and_then(|devices| devices.child("interface"))
            .expect("interface");
        let filterref = interface.child("filterref").expect("filterref");
        assert_eq!(filterref.attr("filter"), Some("clean-traffic"));
        let parameters: Vec<(&str, &str)> = filterref
            .children_named("parameter")
            .filter_map(|p| Some((p.attr("name")?, p.attr("value")?)))
            .collect();
        assert_eq!(
            parameters,
            vec![
                ("CTRL_IP_LEARNING", "dhcp"),
                ("DHCPSERVER", "192.168.122.1")
            ]
        );
        // No filter, no filterref.
        let plain = render_domain_xml(&tcg_minimal()).expect("renders");
        assert!(!plain.contains("filterref"), "{plain}");

        for (filter, parameter, field) in [
            ("clean traffic", "IP", "interfaces[0].filter"),
            (
                "clean-traffic",
                "IP'/><x",
                "interfaces[0].filter.parameters",
            ),
        ] {
            spec.interfaces[0] = InterfaceSpec::Network {
                network: "default".into(),
                mac: "52:54:00:00:00:01".into(),
                filter: Some(FilterRef {
                    filter: filter.into(),
                    parameters: vec![(parameter.into(), "10.0.0.1".into())],
                }),
            };
            assert_eq!(rejected(&spec).field, field);
        }
    }

    // -- Shape of the output

    #[test]
    fn boot_uses_os_boot_or_per_device_order_never_both() {
        let root = parse_xml(&render(&tcg_minimal())).unwrap();
        let os = root.child("os").unwrap();
        assert_eq!(os.child("boot").and_then(|b| b.attr("dev")), Some("hd"));
        assert!(all(&root, "disk").iter().all(|d| d.child("boot").is_none()));

        let root = parse_xml(&render(&kvm_full())).unwrap();
        assert!(root.child("os").unwrap().child("boot").is_none());
        let orders: Vec<_> = all(&root, "disk")
            .iter()
            .filter_map(|d| d.child("boot").and_then(|b| b.attr("order")))
            .collect();
        assert_eq!(orders, ["1", "2"]);
    }

    #[test]
    fn cpu_mode_only_for_kvm() {
        let tcg = parse_xml(&render(&tcg_minimal())).unwrap();
        assert_eq!(tcg.attr("type"), Some("qemu"));
        assert!(tcg.child("cpu").is_none());
        let kvm = parse_xml(&render(&kvm_full())).unwrap();
        assert_eq!(kvm.attr("type"), Some("kvm"));
        assert_eq!(
            kvm.child("cpu").and_then(|c| c.attr("mode")),
            Some("host-passthrough")
        );
        let vcpu = kvm.child("vcpu").unwrap();
        assert_eq!(vcpu.attr("cpuset"), Some("0,2-3"));
        assert_eq!(vcpu.text, "3");
        assert_eq!(
            kvm.child("cputune")
                .and_then(|c| c.child("shares"))
                .unwrap()
                .text,
            "1024"
        );
        assert!(tcg.child("cputune").is_none());
        assert!(tcg.child("vcpu").unwrap().attr("cpuset").is_none());
    }

    #[test]
    fn virtiofs_brings_shared_memory_and_9p_does_not() {
        let tcg = parse_xml(&render(&tcg_minimal())).unwrap();
        assert!(tcg.child("memoryBacking").is_none());
        let kvm = parse_xml(&render(&kvm_full())).unwrap();
        let backing = kvm.child("memoryBacking").unwrap();
        assert_eq!(
            backing.child("source").and_then(|s| s.attr("type")),
            Some("memfd")
        );
        assert_eq!(
            backing.child("access").and_then(|a| a.attr("mode")),
            Some("shared")
        );
    }

    #[test]
    fn cdroms_are_always_read_only() {
        let mut spec = tcg_minimal();
        spec.disks[1].read_only = false;
        let root = parse_xml(&render(&spec)).unwrap();
        let disks = all(&root, "disk");
        assert!(disks[0].child("readonly").is_none());
        assert_eq!(disks[1].attr("device"), Some("cdrom"));
        assert!(disks[1].child("readonly").is_some());
    }

    #[test]
    fn console_is_a_pty_without_a_log_file() {
        let mut spec = tcg_minimal();
        spec.console_log = None;
        let root = parse_xml(&render(&spec)).unwrap();
        assert_eq!(all(&root, "serial")[0].attr("type"), Some("pty"));
        assert_eq!(all(&root, "console")[0].attr("type"), Some("pty"));
    }

    proptest! {
        /// Any string in a free-text field either is rejected (it holds a
        /// character XML cannot carry) or renders to well-formed XML that
        /// reads back as exactly that string.
        #[test]
        fn free_text_is_rejected_or_round_trips(text in any::<String>()) {
            let path = format!("/{text}");
            let mut spec = tcg_minimal();
            spec.disks[0].source = DiskSource::File(path.clone().into());
            spec.metadata.task_name = text.clone();
            match render_domain_xml(&spec) {
                Err(err) => {
                    prop_assert!(text.chars().any(|c| !is_xml_char(c)), "{err}");
                }
                Ok(xml) => {
                    let root = parse_xml(&xml).map_err(TestCaseError::fail)?;
                    let source = all(&root, "disk")[0].child("source").unwrap();
                    prop_assert_eq!(source.attr("file"), Some(path.as_str()));
                    let task = all(&root, "nomad:task")[0];
                    prop_assert_eq!(task.attr("task_name"), Some(text.as_str()));
                }
            }
        }
    }
}
