//! The plugin config: the `plugin "nomad-driver-virt" { config { ... } }`
//! block of a Nomad client, its schema, defaults and validation.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tracing_subscriber::filter::LevelFilter;

use super::hclspec::Spec;
use super::network::MacvtapMode;
use super::{ConfigErrors, Problems};

/// libvirt URI used when the plugin config names none.
pub const DEFAULT_LIBVIRT_URI: &str = "qemu:///system";
/// Name and path of the storage pool used when none is configured.
pub const DEFAULT_POOL_NAME: &str = "nomad-virt";
pub const DEFAULT_POOL_PATH: &str = "/var/lib/nomad-driver-virt/pools/nomad-virt";

/// The plugin config as Nomad encodes it (every field optional on the wire).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    pub provider: Option<ProviderConfig>,
    pub image_paths: Option<Vec<String>>,
    pub storage_pools: Option<StoragePoolsConfig>,
    pub accelerator: Option<String>,
    pub log_level: Option<String>,
    pub dhcp_timeout: Option<String>,
    /// What jobs may touch: see [`Policy`].
    pub allow_networks: Option<Vec<String>>,
    pub allow_macvtap_devices: Option<Vec<String>>,
    pub allow_macvtap_modes: Option<Vec<String>>,
    pub allow_storage_pools: Option<Vec<String>>,
    pub max_disk_size: Option<super::units::ByteSize>,
    pub clean_traffic: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub libvirt: Option<LibvirtConfig>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LibvirtConfig {
    pub uri: Option<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    /// Go's `allow_insecure_readonly_mounts`: see
    /// [`Settings::insecure_readonly_virtiofs`].
    pub allow_insecure_readonly_mounts: Option<bool>,
    /// Ours, not Go's: see [`Settings::allow_writable_virtiofs`].
    pub allow_writable_virtiofs: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoragePoolsConfig {
    pub default: Option<String>,
    pub directory: Option<BTreeMap<String, DirectoryPoolConfig>>,
    /// Go's Ceph RBD pools (libvirt `rbd` pools).
    pub ceph: Option<BTreeMap<String, CephPoolConfig>>,
}

/// A `ceph "<name>" { ... }` pool block, as the Go driver spells it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CephPoolConfig {
    pub pool: Option<String>,
    pub hosts: Option<Vec<String>>,
    pub authentication: Option<CephAuthenticationConfig>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CephAuthenticationConfig {
    pub username: Option<String>,
    pub secret: Option<CephKey>,
}

/// A cephx key (base64, as `ceph auth get-key` prints it). Never shown:
/// its `Debug` and `Display` print `<redacted>`, and it is not kept in task
/// state, handles or errors; it reaches libvirt only through the secret API.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CephKey(String);

impl CephKey {
    pub fn new(key: impl Into<String>) -> Self {
        CephKey(key.into())
    }

    /// The key as configured (base64 text). Only for handing to libvirt's
    /// secret API or to a 0600 key file for qemu-img.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The decoded key bytes, as libvirt's secret value holds them.
    pub fn decoded(&self) -> Option<Vec<u8>> {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(self.0.trim())
            .ok()
    }
}

impl std::fmt::Debug for CephKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::fmt::Display for CephKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectoryPoolConfig {
    pub path: Option<String>,
}

/// The schema Nomad decodes the plugin config block with.
pub fn schema() -> Spec {
    Spec::object([
        (
            "provider",
            Spec::block(Spec::object([(
                "libvirt",
                Spec::block(Spec::object([
                    (
                        "uri",
                        Spec::attr_with_default(
                            "uri",
                            "string",
                            &format!("{DEFAULT_LIBVIRT_URI:?}"),
                        ),
                    ),
                    ("user", Spec::attr("string")),
                    ("password", Spec::attr("string")),
                    ("allow_insecure_readonly_mounts", Spec::attr("bool")),
                    ("allow_writable_virtiofs", Spec::attr("bool")),
                ])),
            )])),
        ),
        ("image_paths", Spec::attr("list(string)")),
        (
            "storage_pools",
            Spec::block(Spec::object([
                ("default", Spec::attr("string")),
                (
                    "directory",
                    Spec::block_map(
                        "name",
                        Spec::object([("path", Spec::required_attr("string"))]),
                    ),
                ),
                (
                    "ceph",
                    Spec::block_map(
                        "name",
                        Spec::object([
                            ("pool", Spec::required_attr("string")),
                            ("hosts", Spec::required_attr("list(string)")),
                            (
                                "authentication",
                                Spec::block(Spec::object([
                                    ("username", Spec::required_attr("string")),
                                    ("secret", Spec::required_attr("string")),
                                ])),
                            ),
                        ]),
                    ),
                ),
            ])),
        ),
        (
            "accelerator",
            Spec::attr_with_default("accelerator", "string", "\"auto\""),
        ),
        ("log_level", Spec::attr("string")),
        (
            "dhcp_timeout",
            Spec::attr_with_default("dhcp_timeout", "string", "\"2m\""),
        ),
        ("allow_networks", Spec::attr("list(string)")),
        ("allow_macvtap_devices", Spec::attr("list(string)")),
        ("allow_macvtap_modes", Spec::attr("list(string)")),
        ("allow_storage_pools", Spec::attr("list(string)")),
        // A number of bytes or a string such as "100GiB", like a disk's size.
        ("max_disk_size", Spec::attr("any")),
        ("clean_traffic", Spec::attr("bool")),
    ])
}

/// Longest DHCP wait an operator may configure: far beyond any real boot,
/// and small enough that deadline arithmetic can never overflow.
pub const MAX_DHCP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// macvtap modes allowed when `allow_macvtap_modes` is unset: everything
/// but `passthrough`, which hands the whole host device to one guest.
pub const DEFAULT_MACVTAP_MODES: [MacvtapMode; 3] =
    [MacvtapMode::Bridge, MacvtapMode::Private, MacvtapMode::Vepa];

/// What the operator lets jobs touch (the `allow_*` settings). `None` in a
/// list means the documented default, not "anything".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// libvirt networks (by network or bridge name) a `bridge` interface
    /// may join; `None`: every libvirt network.
    pub networks: Option<Vec<String>>,
    /// Host devices a `macvtap` interface may use; `None`: the devices
    /// that carry the host's default route.
    pub macvtap_devices: Option<Vec<String>>,
    pub macvtap_modes: Vec<MacvtapMode>,
    /// Pools a job's disks may use; `None`: every configured pool.
    pub storage_pools: Option<Vec<String>>,
    /// Largest disk (bytes); `None`: bounded by the pool's free space only.
    pub max_disk_size: Option<u64>,
    /// Guests on a libvirt network get the `clean-traffic` nwfilter.
    pub clean_traffic: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            networks: None,
            macvtap_devices: None,
            macvtap_modes: DEFAULT_MACVTAP_MODES.to_vec(),
            storage_pools: None,
            max_disk_size: None,
            clean_traffic: true,
        }
    }
}

/// How long StartTask waits for a bridge-attached guest's DHCP lease.
pub const DEFAULT_DHCP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Which QEMU accelerator domains use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AcceleratorChoice {
    /// KVM when /dev/kvm is usable and libvirt offers it, else TCG.
    Auto,
    Kvm,
    Tcg,
}

/// A directory storage pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryPool {
    pub name: String,
    pub path: PathBuf,
}

/// A Ceph monitor address from `hosts`: a name or address and an optional
/// port (librados picks the default ports without one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CephHost {
    pub name: String,
    pub port: Option<u16>,
}

impl CephHost {
    /// Parses `host`, `host:port`, `[v6]` or `[v6]:port`.
    pub fn parse(text: &str) -> Result<CephHost, String> {
        let text = text.trim();
        let (name, port) = if let Some(rest) = text.strip_prefix('[') {
            let (name, after) = rest
                .split_once(']')
                .ok_or_else(|| format!("{text:?}: an IPv6 address needs its closing ']'"))?;
            match after {
                "" => (name, None),
                after => match after.strip_prefix(':') {
                    Some(port) => (name, Some(port)),
                    None => return Err(format!("{text:?}: expected \":port\" after ']'")),
                },
            }
        } else {
            match text.rsplit_once(':') {
                Some((name, _)) if name.contains(':') => {
                    return Err(format!(
                        "{text:?}: write an IPv6 address in brackets, e.g. \"[::1]:3300\""
                    ))
                }
                Some((name, port)) => (name, Some(port)),
                None => (text, None),
            }
        };
        let name_ok = !name.is_empty()
            && name.len() <= 253
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':' | '_'))
            && !name.starts_with('-');
        if !name_ok {
            return Err(format!(
                "{text:?} is not a monitor address; use \"host\" or \"host:port\" \
                 (e.g. \"10.0.0.1:3300\" or \"[fd00::1]:6789\")"
            ));
        }
        let port = match port {
            None => None,
            Some(port) => match port.parse::<u16>() {
                Ok(port) if port > 0 => Some(port),
                _ => return Err(format!("{text:?}: {port:?} is not a port (1-65535)")),
            },
        };
        Ok(CephHost {
            name: name.to_string(),
            port,
        })
    }
}

/// A Ceph RBD storage pool: libvirt pool `name` (an `rbd` pool) on Ceph
/// pool `pool`, reached through `hosts` as cephx user `username`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CephPool {
    pub name: String,
    pub pool: String,
    pub hosts: Vec<CephHost>,
    /// The cephx id without `client.` (as libvirt's `<auth username>`).
    pub username: String,
    pub key: CephKey,
}

/// Whether `name` can be a Ceph pool or user id here: what Ceph accepts
/// and what is safe in a qemu option string and an RBD image spec.
pub fn is_ceph_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.')
}

/// The validated plugin settings with defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub libvirt_uri: String,
    pub libvirt_credentials: Option<(String, String)>,
    pub image_paths: Vec<PathBuf>,
    pub pools: Vec<DirectoryPool>,
    /// `storage_pools { ceph "name" { ... } }`.
    pub ceph_pools: Vec<CephPool>,
    pub default_pool: String,
    pub accelerator: AcceleratorChoice,
    pub log_level: Option<LevelFilter>,
    pub dhcp_timeout: std::time::Duration,
    /// `provider.libvirt.allow_insecure_readonly_mounts` (default false).
    /// Read it through [`Settings::insecure_readonly_virtiofs`].
    pub allow_insecure_readonly_mounts: bool,
    /// The `allow_*` settings, `max_disk_size` and `clean_traffic`.
    pub policy: Policy,
    /// `provider.libvirt.allow_writable_virtiofs` (default false): whether
    /// writable shares may use virtiofs. virtiofsd runs as root without an
    /// id map, so guest root could create root-owned and setuid files in
    /// the host directory; without this, writable shares use 9p (files
    /// owned by QEMU's unprivileged user).
    pub allow_writable_virtiofs: bool,
}

impl Settings {
    /// The Ceph pool named `name`, if one is configured.
    pub fn ceph_pool(&self, name: &str) -> Option<&CephPool> {
        self.ceph_pools.iter().find(|pool| pool.name == name)
    }

    /// Names of every configured pool (directory, then Ceph).
    pub fn pool_names(&self) -> Vec<&str> {
        self.pools
            .iter()
            .map(|pool| pool.name.as_str())
            .chain(self.ceph_pools.iter().map(|pool| pool.name.as_str()))
            .collect()
    }

    /// Whether read-only shared directories may use virtiofs even where
    /// libvirt cannot enforce read-only virtiofs (before 11.0.0), as the Go
    /// driver's `allow_insecure_readonly_mounts` allows.
    ///
    /// When true, a read-only mount that would otherwise need 9p (or fail
    /// when the guest has no 9p) uses virtiofs instead: the domain's
    /// `<filesystem>` for it carries no `<readonly/>` element, and only the
    /// guest's `mount -o ro` makes it read-only. That is insecure: the guest
    /// can remount it read-write and write to the host directory.
    pub fn insecure_readonly_virtiofs(&self) -> bool {
        self.allow_insecure_readonly_mounts
    }
}

impl Default for Settings {
    fn default() -> Self {
        PluginConfig::default()
            .validate()
            .unwrap_or_else(|_| unreachable_default())
    }
}

// The empty config always validates (tested); this only satisfies the types.
fn unreachable_default() -> Settings {
    Settings {
        libvirt_uri: DEFAULT_LIBVIRT_URI.into(),
        libvirt_credentials: None,
        image_paths: Vec::new(),
        pools: vec![DirectoryPool {
            name: DEFAULT_POOL_NAME.into(),
            path: DEFAULT_POOL_PATH.into(),
        }],
        ceph_pools: Vec::new(),
        default_pool: DEFAULT_POOL_NAME.into(),
        accelerator: AcceleratorChoice::Auto,
        log_level: None,
        dhcp_timeout: DEFAULT_DHCP_TIMEOUT,
        allow_insecure_readonly_mounts: false,
        policy: Policy::default(),
        allow_writable_virtiofs: false,
    }
}

/// Decodes the msgpack plugin config (SetConfig, or a client config file
/// encoded by the CLI) and checks it into [`Settings`].
pub fn parse_plugin_config(msgpack: &[u8]) -> Result<Settings, ConfigErrors> {
    super::decode_msgpack::<PluginConfig>("plugin config", msgpack)?.validate()
}

impl PluginConfig {
    /// Checks every field and applies defaults; reports all problems at once.
    pub fn validate(&self) -> Result<Settings, ConfigErrors> {
        let mut problems = Problems::default();
        let libvirt = self
            .provider
            .as_ref()
            .and_then(|p| p.libvirt.clone())
            .unwrap_or_default();

        let libvirt_uri = libvirt
            .uri
            .clone()
            .unwrap_or_else(|| DEFAULT_LIBVIRT_URI.into());
        if libvirt_uri.trim().is_empty() || !libvirt_uri.contains(':') {
            problems.add(
                "provider.libvirt.uri",
                format!("{libvirt_uri:?} is not a libvirt URI; use e.g. \"qemu:///system\" or \"qemu+ssh://host/system\""),
            );
        }
        let user = libvirt.user.as_deref().filter(|user| !user.is_empty());
        let password = libvirt
            .password
            .as_deref()
            .filter(|password| !password.is_empty());
        let libvirt_credentials = match (user, password) {
            (None, None) => None,
            (Some(user), Some(password)) => Some((user.to_string(), password.to_string())),
            (Some(_), None) => {
                problems.add(
                    "provider.libvirt.password",
                    "is required when provider.libvirt.user is set",
                );
                None
            }
            (None, Some(_)) => {
                problems.add(
                    "provider.libvirt.user",
                    "is required when provider.libvirt.password is set",
                );
                None
            }
        };

        let mut image_paths = Vec::new();
        for (index, path) in self.image_paths.iter().flatten().enumerate() {
            let candidate = PathBuf::from(path);
            if !candidate.is_absolute() {
                problems.add(
                    format!("image_paths[{index}]"),
                    format!("{path:?} must be an absolute path"),
                );
            } else {
                image_paths.push(candidate);
            }
        }

        let pools_config = self.storage_pools.clone().unwrap_or_default();
        let mut pools = Vec::new();
        for (name, pool) in pools_config.directory.iter().flatten() {
            let field = format!("storage_pools.directory[{name:?}]");
            if !super::names::is_object_name(name) {
                problems.add(
                    field.clone(),
                    "pool names may use letters, digits, '-', '_' and '.', up to 64 characters",
                );
            }
            match pool.path.as_deref() {
                Some(path) if PathBuf::from(path).is_absolute() => pools.push(DirectoryPool {
                    name: name.clone(),
                    path: PathBuf::from(path),
                }),
                Some(path) => problems.add(
                    format!("{field}.path"),
                    format!("{path:?} must be an absolute path"),
                ),
                None => problems.add(
                    format!("{field}.path"),
                    "is required: the directory that holds the pool's volumes",
                ),
            }
        }
        let ceph_pools = ceph_pools(&pools_config, &mut problems);
        let configured_pools = pools_config.directory.as_ref().map_or(0, BTreeMap::len);
        if configured_pools == 0 {
            pools.push(DirectoryPool {
                name: DEFAULT_POOL_NAME.into(),
                path: DEFAULT_POOL_PATH.into(),
            });
        }
        let default_pool = match pools_config.default.as_deref() {
            Some(name) if ceph_pools.iter().any(|pool| pool.name == name) => {
                problems.add(
                    "storage_pools.default",
                    format!(
                        "{name:?} is a Ceph pool; the default pool also holds each task's \
                         cloud-init seed, which needs a directory pool: name a directory pool \
                         here and set pool = {name:?} on the disks that belong in Ceph"
                    ),
                );
                name.to_string()
            }
            Some(name) if configured_pools > 0 => {
                if !pools_config
                    .directory
                    .iter()
                    .flatten()
                    .any(|(pool, _)| pool == name)
                {
                    let known: Vec<&str> = pools_config
                        .directory
                        .iter()
                        .flatten()
                        .map(|(n, _)| n.as_str())
                        .collect();
                    problems.add(
                        "storage_pools.default",
                        format!(
                            "{name:?} is not a configured pool; configured: {}",
                            known.join(", ")
                        ),
                    );
                }
                name.to_string()
            }
            Some(name) => {
                problems.add(
                    "storage_pools.default",
                    format!(
                        "{name:?} names a pool but no storage_pools.directory block is configured"
                    ),
                );
                name.to_string()
            }
            None if configured_pools > 1 => {
                problems.add(
                    "storage_pools.default",
                    "is required when more than one pool is configured",
                );
                String::new()
            }
            None => pools
                .first()
                .map(|pool| pool.name.clone())
                .unwrap_or_default(),
        };

        let accelerator = match self.accelerator.as_deref().unwrap_or("auto") {
            "auto" => AcceleratorChoice::Auto,
            "kvm" => AcceleratorChoice::Kvm,
            "tcg" => AcceleratorChoice::Tcg,
            other => {
                problems.add(
                    "accelerator",
                    format!("{other:?} is not one of \"auto\", \"kvm\", \"tcg\""),
                );
                AcceleratorChoice::Auto
            }
        };

        let log_level = match self.log_level.as_deref() {
            None | Some("") => None,
            Some(level) => match crate::logging::parse_level(level) {
                Some(level) => Some(level),
                None => {
                    problems.add(
                        "log_level",
                        format!("{level:?} is not one of trace, debug, info, warn, error, off"),
                    );
                    None
                }
            },
        };

        let dhcp_timeout = match self.dhcp_timeout.as_deref() {
            None => DEFAULT_DHCP_TIMEOUT,
            Some(text) => match super::units::parse_duration(text) {
                Ok(duration) if duration > MAX_DHCP_TIMEOUT => {
                    problems.add(
                        "dhcp_timeout",
                        format!("{text:?} is too long; use at most \"24h\""),
                    );
                    DEFAULT_DHCP_TIMEOUT
                }
                Ok(duration) if duration >= std::time::Duration::from_secs(1) => duration,
                Ok(_) => {
                    problems.add(
                        "dhcp_timeout",
                        format!("{text:?} is too short; use at least \"1s\""),
                    );
                    DEFAULT_DHCP_TIMEOUT
                }
                Err(error) => {
                    problems.add("dhcp_timeout", error.to_string());
                    DEFAULT_DHCP_TIMEOUT
                }
            },
        };

        let mut all_pools: Vec<&str> = pools.iter().map(|pool| pool.name.as_str()).collect();
        all_pools.extend(ceph_pools.iter().map(|pool| pool.name.as_str()));
        let policy = self.policy(&all_pools, &mut problems);

        problems.into_result(
            "plugin config",
            Settings {
                libvirt_uri,
                libvirt_credentials,
                image_paths,
                pools,
                ceph_pools,
                default_pool,
                accelerator,
                log_level,
                dhcp_timeout,
                allow_insecure_readonly_mounts: libvirt
                    .allow_insecure_readonly_mounts
                    .unwrap_or(false),
                policy,
                allow_writable_virtiofs: libvirt.allow_writable_virtiofs.unwrap_or(false),
            },
        )
    }

    /// Checks the `allow_*` settings into a [`Policy`].
    fn policy(&self, pools: &[&str], problems: &mut Problems) -> Policy {
        let names = |field: &str,
                     list: &Option<Vec<String>>,
                     valid: fn(&str) -> bool,
                     what: &str,
                     problems: &mut Problems| {
            list.as_ref().map(|list| {
                let mut kept = Vec::new();
                for (index, name) in list.iter().enumerate() {
                    if valid(name) {
                        kept.push(name.clone());
                    } else {
                        problems.add(
                            format!("{field}[{index}]"),
                            format!("{name:?} is not {what}"),
                        );
                    }
                }
                kept
            })
        };
        let networks = names(
            "allow_networks",
            &self.allow_networks,
            super::names::is_object_name,
            "a libvirt network or bridge name",
            problems,
        );
        let macvtap_devices = names(
            "allow_macvtap_devices",
            &self.allow_macvtap_devices,
            super::names::is_interface_name,
            "a host network device name such as \"eth0\"",
            problems,
        );
        let macvtap_modes = match &self.allow_macvtap_modes {
            None => DEFAULT_MACVTAP_MODES.to_vec(),
            Some(list) => list
                .iter()
                .enumerate()
                .filter_map(|(index, mode)| {
                    problems.check(
                        format!("allow_macvtap_modes[{index}]"),
                        MacvtapMode::parse(mode),
                    )
                })
                .collect(),
        };
        let storage_pools = names(
            "allow_storage_pools",
            &self.allow_storage_pools,
            super::names::is_object_name,
            "a pool name",
            problems,
        );
        for (index, name) in storage_pools.iter().flatten().enumerate() {
            if !pools.contains(&name.as_str()) {
                problems.add(
                    format!("allow_storage_pools[{index}]"),
                    format!(
                        "{name:?} is not a configured pool; configured: {}",
                        pools.join(", ")
                    ),
                );
            }
        }
        let max_disk_size = self.max_disk_size.map(|size| size.0);
        if max_disk_size == Some(0) {
            problems.add(
                "max_disk_size",
                "must be greater than zero; leave it unset for no limit but the pool's free space",
            );
        }
        Policy {
            networks,
            macvtap_devices,
            macvtap_modes,
            storage_pools,
            max_disk_size,
            clean_traffic: self.clean_traffic.unwrap_or(true),
        }
    }
}

/// Checks the `storage_pools { ceph "name" { ... } }` blocks. The key is
/// checked to be base64 but never quoted in a message.
fn ceph_pools(config: &StoragePoolsConfig, problems: &mut Problems) -> Vec<CephPool> {
    let mut out = Vec::new();
    for (name, pool) in config.ceph.iter().flatten() {
        let field = format!("storage_pools.ceph[{name:?}]");
        let mut ok = true;
        if !super::names::is_object_name(name) {
            problems.add(
                field.clone(),
                "pool names may use letters, digits, '-', '_' and '.', up to 64 characters",
            );
            ok = false;
        }
        if config
            .directory
            .iter()
            .flatten()
            .any(|(dir, _)| dir == name)
        {
            problems.add(
                field.clone(),
                format!("{name:?} is also a directory pool; give each pool its own name"),
            );
            ok = false;
        }
        let ceph_pool = match pool.pool.as_deref() {
            Some(ceph_pool) if is_ceph_name(ceph_pool) => ceph_pool.to_string(),
            Some(ceph_pool) => {
                problems.add(
                    format!("{field}.pool"),
                    format!(
                        "{ceph_pool:?} is not a Ceph pool name (letters, digits, '-', '_', '.')"
                    ),
                );
                ok = false;
                String::new()
            }
            None => {
                problems.add(
                    format!("{field}.pool"),
                    "is required: the Ceph (RBD) pool that holds the volumes",
                );
                ok = false;
                String::new()
            }
        };
        let mut hosts = Vec::new();
        match pool.hosts.as_deref() {
            None | Some([]) => {
                problems.add(
                    format!("{field}.hosts"),
                    "is required: the Ceph monitors, e.g. [\"10.0.0.1:3300\", \"10.0.0.2:3300\"]",
                );
                ok = false;
            }
            Some(list) => {
                for (index, host) in list.iter().enumerate() {
                    match CephHost::parse(host) {
                        Ok(host) => hosts.push(host),
                        Err(message) => {
                            problems.add(format!("{field}.hosts[{index}]"), message);
                            ok = false;
                        }
                    }
                }
            }
        }
        let auth = pool.authentication.clone().unwrap_or_default();
        let username = match auth.username.as_deref() {
            Some(user) if user.starts_with("client.") => {
                problems.add(
                    format!("{field}.authentication.username"),
                    format!(
                        "{user:?}: write the cephx id without \"client.\", e.g. {:?}",
                        user.trim_start_matches("client.")
                    ),
                );
                ok = false;
                String::new()
            }
            Some(user) if is_ceph_name(user) => user.to_string(),
            Some(user) => {
                problems.add(
                    format!("{field}.authentication.username"),
                    format!("{user:?} is not a cephx user id (letters, digits, '-', '_', '.')"),
                );
                ok = false;
                String::new()
            }
            None => {
                problems.add(
                    format!("{field}.authentication.username"),
                    "is required: the cephx user id (without \"client.\"), e.g. \"nomad\"",
                );
                ok = false;
                String::new()
            }
        };
        let key = match &auth.secret {
            Some(key) if key.decoded().is_some_and(|bytes| !bytes.is_empty()) => key.clone(),
            Some(_) => {
                problems.add(
                    format!("{field}.authentication.secret"),
                    "is not a cephx key: use the base64 key `ceph auth get-key client.<id>` prints",
                );
                ok = false;
                CephKey::default()
            }
            None => {
                problems.add(
                    format!("{field}.authentication.secret"),
                    "is required: the user's cephx key (`ceph auth get-key client.<id>`)",
                );
                ok = false;
                CephKey::default()
            }
        };
        if ok {
            out.push(CephPool {
                name: name.clone(),
                pool: ceph_pool,
                hosts,
                username,
                key,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_gets_defaults() {
        let settings = PluginConfig::default()
            .validate()
            .expect("defaults are valid");
        assert_eq!(settings.libvirt_uri, DEFAULT_LIBVIRT_URI);
        assert_eq!(settings.default_pool, DEFAULT_POOL_NAME);
        assert_eq!(settings.accelerator, AcceleratorChoice::Auto);
        assert_eq!(settings, Settings::default());
    }

    #[test]
    fn every_problem_is_named() {
        let config = PluginConfig {
            provider: Some(ProviderConfig {
                libvirt: Some(LibvirtConfig {
                    uri: Some("nonsense".into()),
                    user: Some("u".into()),
                    password: None,
                    allow_insecure_readonly_mounts: None,
                    allow_writable_virtiofs: None,
                }),
            }),
            image_paths: Some(vec!["relative/dir".into()]),
            storage_pools: Some(StoragePoolsConfig {
                default: Some("missing".into()),
                directory: Some(BTreeMap::from([
                    (
                        "ok".to_string(),
                        DirectoryPoolConfig {
                            path: Some("/srv/pool".into()),
                        },
                    ),
                    ("bad/name".to_string(), DirectoryPoolConfig { path: None }),
                ])),
                ceph: None,
            }),
            accelerator: Some("hvf".into()),
            log_level: Some("loud".into()),
            dhcp_timeout: Some("soon".into()),
            ..Default::default()
        };
        let error = config.validate().expect_err("invalid");
        let text = error.to_string();
        for field in [
            "provider.libvirt.uri",
            "provider.libvirt.password",
            "image_paths[0]",
            "storage_pools.directory[\"bad/name\"]",
            "storage_pools.directory[\"bad/name\"].path",
            "storage_pools.default",
            "accelerator",
            "log_level",
            "dhcp_timeout",
        ] {
            assert!(
                error.errors.iter().any(|e| e.field == field),
                "{field} missing from {text}"
            );
        }
        assert!(text.contains("\"auto\", \"kvm\", \"tcg\""), "{text}");
    }

    #[test]
    fn two_pools_need_a_default() {
        let config = PluginConfig {
            storage_pools: Some(StoragePoolsConfig {
                default: None,
                directory: Some(BTreeMap::from([
                    (
                        "a".to_string(),
                        DirectoryPoolConfig {
                            path: Some("/a".into()),
                        },
                    ),
                    (
                        "b".to_string(),
                        DirectoryPoolConfig {
                            path: Some("/b".into()),
                        },
                    ),
                ])),
                ceph: None,
            }),
            ..Default::default()
        };
        let error = config.validate().expect_err("ambiguous default");
        assert_eq!(error.errors[0].field, "storage_pools.default");
    }

    fn ceph(pool: CephPoolConfig) -> PluginConfig {
        PluginConfig {
            storage_pools: Some(StoragePoolsConfig {
                ceph: Some(BTreeMap::from([("remote".to_string(), pool)])),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    const KEY: &str = "AQD8bvtpvFsSHxAAetpPOmzr4VBwu1zk7YQB+w==";

    fn good_ceph() -> CephPoolConfig {
        CephPoolConfig {
            pool: Some("nomad-pool".into()),
            hosts: Some(vec![
                "10.0.0.1:3300".into(),
                "[fd00::1]".into(),
                "mon.example".into(),
            ]),
            authentication: Some(CephAuthenticationConfig {
                username: Some("nomad".into()),
                secret: Some(CephKey::new(KEY)),
            }),
        }
    }

    #[test]
    fn ceph_pools_are_accepted_next_to_the_default_directory_pool() {
        let settings = ceph(good_ceph()).validate().expect("valid");
        assert_eq!(settings.default_pool, DEFAULT_POOL_NAME);
        assert_eq!(settings.ceph_pools.len(), 1);
        let pool = &settings.ceph_pools[0];
        assert_eq!(pool.name, "remote");
        assert_eq!(pool.pool, "nomad-pool");
        assert_eq!(pool.username, "nomad");
        assert_eq!(
            pool.hosts,
            vec![
                CephHost {
                    name: "10.0.0.1".into(),
                    port: Some(3300)
                },
                CephHost {
                    name: "fd00::1".into(),
                    port: None
                },
                CephHost {
                    name: "mon.example".into(),
                    port: None
                },
            ]
        );
        assert_eq!(pool.key.decoded().map(|k| k.len()), Some(28));
        assert_eq!(settings.pool_names(), vec![DEFAULT_POOL_NAME, "remote"]);
    }

    #[test]
    fn the_ceph_key_is_never_shown() {
        let settings = ceph(good_ceph()).validate().expect("valid");
        let shown = format!("{settings:?} {:?}", ceph(good_ceph()));
        assert!(!shown.contains(KEY), "{shown}");
        assert!(!shown.contains("AQD8bvtp"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
        // Nor in an error about it.
        let mut bad = good_ceph();
        bad.authentication = Some(CephAuthenticationConfig {
            username: Some("nomad".into()),
            secret: Some(CephKey::new("not base64 !!! secret-words")),
        });
        let error = ceph(bad).validate().expect_err("bad key").to_string();
        assert!(error.contains("authentication.secret"), "{error}");
        assert!(!error.contains("secret-words"), "{error}");
    }

    #[test]
    fn ceph_pool_problems_are_named() {
        let config = ceph(CephPoolConfig {
            pool: Some("a/b".into()),
            hosts: Some(vec!["10.0.0.1:99999".into(), "fd00::1".into(), "".into()]),
            authentication: Some(CephAuthenticationConfig {
                username: Some("client.nomad".into()),
                secret: None,
            }),
        });
        let error = config.validate().expect_err("invalid");
        let fields: Vec<&str> = error.errors.iter().map(|e| e.field.as_str()).collect();
        for field in [
            "storage_pools.ceph[\"remote\"].pool",
            "storage_pools.ceph[\"remote\"].hosts[0]",
            "storage_pools.ceph[\"remote\"].hosts[1]",
            "storage_pools.ceph[\"remote\"].hosts[2]",
            "storage_pools.ceph[\"remote\"].authentication.username",
            "storage_pools.ceph[\"remote\"].authentication.secret",
        ] {
            assert!(fields.contains(&field), "{field} missing from {error}");
        }
        let error = ceph(CephPoolConfig {
            hosts: Some(vec![]),
            ..good_ceph()
        })
        .validate()
        .expect_err("no hosts");
        assert_eq!(
            error.errors[0].field,
            "storage_pools.ceph[\"remote\"].hosts"
        );
    }

    #[test]
    fn a_ceph_pool_cannot_be_the_default_but_can_be_allowed() {
        let mut config = ceph(good_ceph());
        if let Some(pools) = config.storage_pools.as_mut() {
            pools.default = Some("remote".into());
        }
        let error = config.validate().expect_err("ceph default");
        assert_eq!(error.errors[0].field, "storage_pools.default");
        assert!(
            error.errors[0].message.contains("cloud-init seed"),
            "{error}"
        );

        let mut config = ceph(good_ceph());
        config.allow_storage_pools = Some(vec!["remote".into()]);
        let settings = config.validate().expect("allowed");
        assert_eq!(
            settings.policy.storage_pools,
            Some(vec!["remote".to_string()])
        );
    }
}
