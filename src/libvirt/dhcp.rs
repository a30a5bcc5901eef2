//! DHCP on libvirt-managed networks: which lease is the guest's, the
//! reservation that pins it, and its release at teardown. The libvirt calls
//! (reading leases, updating a network's DHCP hosts) are in
//! [`crate::libvirt::network`].
//!
//! The release and the lease wait block (a child process, sleeps); the
//! driver calls them on blocking threads. Unlike the Go original this looks for the
//! lease at once and again whenever libvirt's lease helper rewrites the
//! network's status file (watched with inotify), picks the NEWEST matching
//! lease, and takes the timeout from the caller (plugin config `dhcp_timeout`).

use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use inotify::{Inotify, WatchMask};

use serde::{Deserialize, Serialize};

use crate::libvirt::xml::{self, XmlWriter};
use crate::libvirt::VirtError;

/// Where libvirt's dnsmasq helper (leaseshelper) keeps `<bridge>.status`,
/// the file `virNetworkGetDHCPLeases` reads, for the system daemon.
pub const LEASE_STATUS_DIR: &str = "/var/lib/libvirt/dnsmasq";
/// How often the watcher checks its (non-blocking) inotify queue: bounds how
/// late a new lease is noticed; an empty check is one failed read().
const WATCH_TICK: Duration = Duration::from_millis(10);
/// Without a usable watch (no such directory: another libvirt, the test
/// driver), how often to ask libvirt; also the longest pause between two
/// looks with a watch, in case a rewrite is missed (e.g. the dir is replaced).
const FALLBACK_LOOK: Duration = Duration::from_millis(40);
const SAFETY_LOOK: Duration = Duration::from_secs(1);

/// The Debian tool (package dnsmasq-utils) that sends a DHCPRELEASE for us.
const DHCP_RELEASE: &str = "dhcp_release";

/// Errors of DHCP lease discovery, reservations and release.
#[derive(Debug, thiserror::Error)]
pub enum DhcpError {
    #[error("cannot read the DHCP leases of libvirt network {network:?}")]
    Leases {
        network: String,
        #[source]
        source: VirtError,
    },
    #[error(
        "no DHCP lease for MAC {mac} on libvirt network {network:?} within {timeout:?} \
         ({attempts} looks{last}); if the guest boots slowly raise dhcp_timeout in the \
         plugin config, and check that the guest runs a DHCP client on the interface with \
         that MAC",
        last = last_error.as_ref().map(|e| format!(", last error: {e}")).unwrap_or_default()
    )]
    LeaseTimeout {
        mac: String,
        network: String,
        timeout: Duration,
        attempts: u32,
        last_error: Option<String>,
    },
    #[error("cannot reach libvirt to look at network {network:?}")]
    Unreachable {
        network: String,
        #[source]
        source: Box<crate::libvirt::LibvirtError>,
    },
    #[error("cannot list libvirt networks; is libvirtd running?")]
    ListNetworks {
        #[source]
        source: VirtError,
    },
    #[error("bridge {bridge:?} is not the bridge of any libvirt network; known: {known}")]
    UnknownBridge { bridge: String, known: String },
    #[error(
        "libvirt network {network:?} does not exist; define and start it (virsh net-define, \
         virsh net-start) or fix the network name"
    )]
    NoNetwork { network: String },
    #[error("cannot {action} on libvirt network {network:?}")]
    Libvirt {
        action: &'static str,
        network: String,
        #[source]
        source: VirtError,
    },
    #[error(
        "DHCP reservation {wanted} conflicts with the existing entry {existing} in libvirt \
         network {network:?} (same MAC, IP or name); remove the stale entry with \
         `virsh net-update {network} delete ip-dhcp-host '{existing}' --live --config` \
         or use another MAC/IP/name"
    )]
    Conflict {
        network: String,
        wanted: String,
        existing: String,
    },
    #[error("invalid MAC address {mac:?}: expected six colon-separated hex pairs such as 52:54:00:12:34:56")]
    InvalidMac { mac: String },
    #[error(
        "invalid network interface name {name:?}: expected 1 to 15 characters from \
         A-Z a-z 0-9 _ . - not starting with '-'"
    )]
    InvalidInterface { name: String },
    #[error(
        "invalid hostname {name:?} for a DHCP reservation: expected dot-separated labels of \
         1 to 63 characters from A-Z a-z 0-9 - _ (at most 253 in all), each starting with a \
         letter or digit"
    )]
    InvalidHostname { name: String },
    #[error(
        "cannot release the DHCP lease of {ip} (MAC {mac}) on bridge {bridge}: {program} is \
         not installed; install Debian package dnsmasq-utils (apt-get install dnsmasq-utils)"
    )]
    ReleaseToolMissing {
        program: String,
        bridge: String,
        ip: Ipv4Addr,
        mac: String,
    },
    #[error(
        "cannot run {program} to release the DHCP lease of {ip} (MAC {mac}) on bridge {bridge}"
    )]
    ReleaseSpawn {
        program: String,
        bridge: String,
        ip: Ipv4Addr,
        mac: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "dhcp_release {bridge} {ip} {mac} failed ({status}): {stderr}; check that bridge \
         {bridge} exists and has an IPv4 address"
    )]
    ReleaseFailed {
        bridge: String,
        ip: Ipv4Addr,
        mac: String,
        status: String,
        stderr: String,
    },
}

impl DhcpError {
    /// Whether retrying could succeed: false for bad input (MAC, interface
    /// or host name), a bridge or network that does not exist and a
    /// conflicting reservation, which need a change by a person; true for
    /// libvirt, timing and host-tool failures. Exhaustive on purpose.
    pub fn is_recoverable(&self) -> bool {
        match self {
            DhcpError::InvalidMac { .. }
            | DhcpError::InvalidInterface { .. }
            | DhcpError::InvalidHostname { .. }
            | DhcpError::UnknownBridge { .. }
            | DhcpError::NoNetwork { .. }
            | DhcpError::Conflict { .. } => false,
            DhcpError::Leases { .. }
            | DhcpError::Unreachable { .. }
            | DhcpError::LeaseTimeout { .. }
            | DhcpError::ListNetworks { .. }
            | DhcpError::Libvirt { .. }
            | DhcpError::ReleaseToolMissing { .. }
            | DhcpError::ReleaseSpawn { .. }
            | DhcpError::ReleaseFailed { .. } => true,
        }
    }
}

// ---------------------------------------------------------------------------
// Leases
// ---------------------------------------------------------------------------

/// One IPv4 DHCP lease as libvirt's dnsmasq reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub mac: String,
    pub ip: Ipv4Addr,
    pub prefix: u32,
    /// The name the guest sent, if any.
    pub hostname: Option<String>,
    /// Unix seconds; 0 means the lease never expires.
    pub expiry_unix: i64,
    /// The bridge the lease was handed out on.
    pub iface: String,
}

/// The lease for `mac` (case-insensitive): its hostname must equal
/// `hostname` when both are known (a lease without a name still matches), it
/// must not have expired (expiry 0 never expires), and the NEWEST one (the
/// latest expiry) wins. The Go original took the oldest.
pub fn pick_lease(
    leases: &[Lease],
    mac: &str,
    hostname: Option<&str>,
    now_unix: i64,
) -> Option<Lease> {
    leases
        .iter()
        .filter(|l| l.mac.eq_ignore_ascii_case(mac))
        .filter(|l| match (&l.hostname, hostname) {
            (Some(have), Some(want)) => have.eq_ignore_ascii_case(want),
            _ => true,
        })
        .filter(|l| l.expiry_unix == 0 || l.expiry_unix > now_unix)
        // Ties on expiry prefer a lease that carries the wanted name.
        .max_by_key(|l| {
            let expiry = if l.expiry_unix == 0 {
                i64::MAX
            } else {
                l.expiry_unix
            };
            (expiry, l.hostname.is_some() && hostname.is_some())
        })
        .cloned()
}

/// Blocks until the lease source may have changed: the network's status
/// file in `dir` was rewritten (dnsmasq's helper writes a new file and
/// renames it over the old one), or a time limit passed.
pub trait LeaseChanges {
    fn wait(&mut self, limit: Duration);
}

/// [`LeaseChanges`] from inotify on the status file's directory; without a
/// watch (the directory is missing or inotify fails) it waits
/// [`FALLBACK_LOOK`], so the caller falls back to fine polling.
pub struct StatusFileWatch {
    inotify: Option<Inotify>,
    file: OsString,
    buffer: Vec<u8>,
}

impl StatusFileWatch {
    /// Watches `<dir>/<bridge>.status`.
    pub fn new(dir: &Path, bridge: &str) -> Self {
        let inotify = Inotify::init().and_then(|inotify| {
            inotify.watches().add(
                dir,
                WatchMask::CLOSE_WRITE | WatchMask::MOVED_TO | WatchMask::CREATE,
            )?;
            Ok(inotify)
        });
        let inotify = match inotify {
            Ok(inotify) => Some(inotify),
            Err(error) => {
                tracing::debug!(dir = %dir.display(), error = %error, "no lease file watch; polling libvirt instead");
                None
            }
        };
        Self {
            inotify,
            file: OsString::from(format!("{bridge}.status")),
            buffer: vec![0u8; 4096],
        }
    }

    /// Whether changes are watched (false: fixed fine polling).
    pub fn is_watching(&self) -> bool {
        self.inotify.is_some()
    }
}

impl LeaseChanges for StatusFileWatch {
    fn wait(&mut self, limit: Duration) {
        let Some(inotify) = self.inotify.as_mut() else {
            std::thread::sleep(limit.min(FALLBACK_LOOK));
            return;
        };
        let deadline = Instant::now() + limit.min(SAFETY_LOOK);
        loop {
            match inotify.read_events(&mut self.buffer) {
                Ok(mut events) => {
                    if events.any(|event| event.name == Some(self.file.as_os_str())) {
                        return;
                    }
                }
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(error) => {
                    tracing::debug!(error = %error, "lease file watch failed; polling libvirt instead");
                    self.inotify = None;
                    return;
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            std::thread::sleep(left.min(WATCH_TICK));
        }
    }
}

/// The look loop of `crate::libvirt::network::wait_for_lease`, with the
/// lease source and its change signal injectable: looks at once, then each
/// time `changes` says the source may have changed, and a last time at the
/// deadline.
pub(crate) fn poll_for_lease(
    lookup: &mut dyn FnMut() -> Result<Vec<Lease>, DhcpError>,
    changes: &mut dyn LeaseChanges,
    network: &str,
    mac: &str,
    hostname: Option<&str>,
    timeout: Duration,
    on_attempt: &mut dyn FnMut(u32),
) -> Result<Lease, DhcpError> {
    // Clamped: `Instant + Duration` panics on overflow, and no caller
    // means to wait longer than a day.
    let deadline = Instant::now() + timeout.min(Duration::from_secs(24 * 3600));
    let mut attempts = 0u32;
    let mut last_error = None;
    loop {
        attempts += 1;
        on_attempt(attempts);
        match lookup() {
            Ok(leases) => {
                if let Some(lease) = pick_lease(&leases, mac, hostname, now_unix()) {
                    tracing::debug!(mac, network, ip = %lease.ip, attempts, "found DHCP lease");
                    return Ok(lease);
                }
            }
            // The driver cannot report leases at all (e.g. libvirt's test
            // driver): waiting cannot help.
            Err(error) if is_unsupported(&error) => return Err(error),
            Err(error) => {
                tracing::debug!(mac, network, attempts, error = %error, "DHCP lease look failed; retrying");
                last_error = Some(crate::libvirt::error::with_sources(&error));
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(DhcpError::LeaseTimeout {
                mac: mac.into(),
                network: network.into(),
                timeout,
                attempts,
                last_error,
            });
        }
        changes.wait(left);
    }
}

/// Where libvirt keeps the pid of a network's dnsmasq (system daemon).
const NETWORK_PID_DIR: &str = "/run/libvirt/network";

/// Whether the dnsmasq libvirt started for `network` runs: `None` when
/// that cannot be told (no pid file here, e.g. a remote or session libvirt,
/// or a network without DHCP).
pub fn dnsmasq_running(network: &str) -> Option<bool> {
    dnsmasq_running_in(Path::new(NETWORK_PID_DIR), network, |pid| {
        std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()
    })
}

fn dnsmasq_running_in(
    dir: &Path,
    network: &str,
    comm_of: impl Fn(u32) -> Option<String>,
) -> Option<bool> {
    // A libvirt network name never holds '/', but it is not ours to trust.
    if network.is_empty() || network.contains(['/', '\0']) || network.starts_with('.') {
        return None;
    }
    let text = std::fs::read_to_string(dir.join(format!("{network}.pid"))).ok()?;
    let pid: u32 = text.trim().parse().ok()?;
    Some(comm_of(pid).is_some_and(|comm| comm.trim() == "dnsmasq"))
}

fn is_unsupported(error: &DhcpError) -> bool {
    matches!(error, DhcpError::Leases { source, .. } if source.is_unsupported())
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Reservations
// ---------------------------------------------------------------------------

/// A DHCP host entry we put into a libvirt network; kept in the task handle
/// so teardown removes exactly it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    pub network: String,
    pub mac: String,
    pub ip: Ipv4Addr,
    pub hostname: Option<String>,
}

/// `<host mac=".." name=".." ip=".."/>` with every attribute escaped.
pub fn reservation_xml(r: &Reservation) -> String {
    host_xml(Some(&r.mac), r.hostname.as_deref(), Some(&r.ip.to_string()))
}

pub(crate) fn host_xml(mac: Option<&str>, name: Option<&str>, ip: Option<&str>) -> String {
    let attributes: Vec<(&str, &str)> = [("mac", mac), ("name", name), ("ip", ip)]
        .into_iter()
        .filter_map(|(key, value)| Some((key, value?)))
        .collect();
    let mut w = XmlWriter::new();
    w.empty("host", &attributes);
    w.finish(false)
}

/// The IPv4 DHCP host entries `(mac, ip, name)` of a network XML; entries
/// without a MAC or an IPv4 address (IPv6 `id=` hosts) are left out. DNS
/// `<host>` elements are not DHCP entries and are ignored.
pub fn reservations_in_xml(network_xml: &str) -> Vec<(String, Ipv4Addr, Option<String>)> {
    dhcp_hosts(network_xml)
        .into_iter()
        .filter_map(|h| {
            let ip = h.ip.as_deref()?.parse().ok()?;
            Some((h.mac?, ip, h.name))
        })
        .collect()
}

/// One `<dhcp><host .../>` element, attributes as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HostEntry {
    pub mac: Option<String>,
    pub ip: Option<String>,
    pub name: Option<String>,
}

impl HostEntry {
    pub(crate) fn ipv4(&self) -> Option<Ipv4Addr> {
        self.ip.as_deref()?.parse().ok()
    }

    pub(crate) fn has_mac(&self, mac: &str) -> bool {
        self.mac
            .as_deref()
            .is_some_and(|m| m.eq_ignore_ascii_case(mac))
    }

    /// Same MAC and IP: the entry that reserves this address for this NIC.
    pub(crate) fn is_for(&self, mac: &str, ip: Ipv4Addr) -> bool {
        self.has_mac(mac) && self.ipv4() == Some(ip)
    }
}

pub(crate) enum Presence {
    Identical,
    Absent,
    /// The conflicting entry, as XML.
    Conflict(String),
}

/// How `r` stands among `hosts`, by libvirt's own ADD rule: an entry with
/// the same MAC, IP or name blocks an add.
pub(crate) fn presence(hosts: &[HostEntry], r: &Reservation) -> Presence {
    if hosts
        .iter()
        .any(|h| h.is_for(&r.mac, r.ip) && h.name == r.hostname)
    {
        return Presence::Identical;
    }
    let clash = hosts.iter().find(|h| {
        h.has_mac(&r.mac)
            || h.ipv4() == Some(r.ip)
            || (r.hostname.is_some() && h.name == r.hostname)
    });
    match clash {
        Some(h) => Presence::Conflict(host_xml(
            h.mac.as_deref(),
            h.name.as_deref(),
            h.ip.as_deref(),
        )),
        None => Presence::Absent,
    }
}

/// The `<host>` elements inside `<dhcp>` sections of a network XML; none
/// when the XML does not parse.
pub(crate) fn dhcp_hosts(network_xml: &str) -> Vec<HostEntry> {
    let Ok(root) = xml::parse(network_xml) else {
        return Vec::new();
    };
    root.descendants()
        .into_iter()
        .filter(|element| element.name == "dhcp")
        .flat_map(|dhcp| dhcp.descendants().into_iter().skip(1))
        .filter(|element| element.name == "host")
        .map(|host| HostEntry {
            mac: host.attr("mac").map(str::to_string),
            ip: host.attr("ip").map(str::to_string),
            name: host.attr("name").map(str::to_string),
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------

/// Six colon-separated pairs of hex digits (either case).
pub fn validate_mac(mac: &str) -> Result<(), DhcpError> {
    let parts: Vec<&str> = mac.split(':').collect();
    let ok = parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
    if ok {
        Ok(())
    } else {
        Err(DhcpError::InvalidMac { mac: mac.into() })
    }
}

/// A Linux interface name we are willing to pass to a program: 1 to 15
/// bytes (IFNAMSIZ - 1) of `[A-Za-z0-9_.-]`, not `.`/`..`, no leading `-`
/// (it would read as an option).
pub fn validate_interface_name(name: &str) -> Result<(), DhcpError> {
    let ok = (1..=15).contains(&name.len())
        && name != "."
        && name != ".."
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(DhcpError::InvalidInterface { name: name.into() })
    }
}

/// A host name dnsmasq accepts and libvirt can store safely: dot-separated
/// labels of 1-63 `[A-Za-z0-9_-]`, each starting with a letter or digit,
/// at most 253 bytes.
pub fn validate_hostname(name: &str) -> Result<(), DhcpError> {
    let ok = (1..=253).contains(&name.len())
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label.starts_with(|c: char| c.is_ascii_alphanumeric())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
        });
    if ok {
        Ok(())
    } else {
        Err(DhcpError::InvalidHostname { name: name.into() })
    }
}

// ---------------------------------------------------------------------------
// Release
// ---------------------------------------------------------------------------

/// Asks the network's dnsmasq to drop the lease of `ip`/`mac` now rather than
/// at expiry, by running `dhcp_release <bridge> <ip> <mac>` (Debian package
/// dnsmasq-utils). Best effort for the caller: dhcp_release exits 0 even when
/// no such lease exists (dnsmasq ignores the release), so an error means the
/// tool is missing or the bridge is gone / has no IPv4 address; callers log
/// it and carry on with teardown.
pub fn release_lease(bridge: &str, ip: Ipv4Addr, mac: &str) -> Result<(), DhcpError> {
    run_release(DHCP_RELEASE, bridge, ip, mac)
}

fn run_release(program: &str, bridge: &str, ip: Ipv4Addr, mac: &str) -> Result<(), DhcpError> {
    validate_interface_name(bridge)?;
    validate_mac(mac)?;
    // Separate arguments, no shell: nothing in them is interpreted.
    let output = Command::new(program)
        .arg(bridge)
        .arg(ip.to_string())
        .arg(mac)
        .output()
        .map_err(|error| match error.kind() {
            std::io::ErrorKind::NotFound => DhcpError::ReleaseToolMissing {
                program: program.into(),
                bridge: bridge.into(),
                ip,
                mac: mac.into(),
            },
            _ => DhcpError::ReleaseSpawn {
                program: program.into(),
                bridge: bridge.into(),
                ip,
                mac: mac.into(),
                source: error,
            },
        })?;
    if output.status.success() {
        tracing::debug!(bridge, %ip, mac, "released DHCP lease");
        Ok(())
    } else {
        Err(DhcpError::ReleaseFailed {
            bridge: bridge.into(),
            ip,
            mac: mac.into(),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lease(mac: &str, ip: [u8; 4], hostname: Option<&str>, expiry_unix: i64) -> Lease {
        Lease {
            mac: mac.into(),
            ip: Ipv4Addr::from(ip),
            prefix: 24,
            hostname: hostname.map(Into::into),
            expiry_unix,
            iface: "virbr0".into(),
        }
    }

    const MAC: &str = "52:54:00:12:34:56";
    const NOW: i64 = 1_700_000_000;

    // ---- dnsmasq state ----------------------------------------------------

    #[test]
    fn dnsmasq_state_from_the_pid_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let comm = |pid: u32| match pid {
            41 => Some("dnsmasq\n".to_string()),
            42 => Some("bash\n".to_string()),
            _ => None,
        };
        // No pid file: cannot tell (remote libvirt, no DHCP).
        assert_eq!(dnsmasq_running_in(dir.path(), "ndvtest", comm), None);
        std::fs::write(dir.path().join("ndvtest.pid"), "41\n").expect("write");
        assert_eq!(dnsmasq_running_in(dir.path(), "ndvtest", comm), Some(true));
        // The pid went to another program, or to none: dnsmasq is dead.
        std::fs::write(dir.path().join("ndvtest.pid"), "42").expect("write");
        assert_eq!(dnsmasq_running_in(dir.path(), "ndvtest", comm), Some(false));
        std::fs::write(dir.path().join("ndvtest.pid"), "43").expect("write");
        assert_eq!(dnsmasq_running_in(dir.path(), "ndvtest", comm), Some(false));
        std::fs::write(dir.path().join("ndvtest.pid"), "junk").expect("write");
        assert_eq!(dnsmasq_running_in(dir.path(), "ndvtest", comm), None);
        // Names that would leave the directory are not looked at.
        for name in ["", "../ndvtest", "a/b", ".ndvtest", "x\0"] {
            assert_eq!(dnsmasq_running_in(dir.path(), name, comm), None, "{name:?}");
        }
    }

    // ---- pick_lease -------------------------------------------------------

    #[test]
    fn pick_lease_none_without_leases() {
        assert_eq!(pick_lease(&[], MAC, None, NOW), None);
    }

    #[test]
    fn pick_lease_matches_mac_case_insensitively() {
        let l = lease("52:54:00:AB:CD:EF", [192, 168, 122, 5], None, NOW + 60);
        let got = pick_lease(std::slice::from_ref(&l), "52:54:00:ab:cd:ef", None, NOW);
        assert_eq!(got, Some(l));
    }

    #[test]
    fn pick_lease_ignores_other_macs() {
        let leases = [lease(
            "52:54:00:00:00:01",
            [192, 168, 122, 5],
            None,
            NOW + 60,
        )];
        assert_eq!(pick_lease(&leases, MAC, None, NOW), None);
    }

    #[test]
    fn pick_lease_hostname_rules() {
        let named = lease(MAC, [192, 168, 122, 5], Some("web-1"), NOW + 60);
        let other = lease(MAC, [192, 168, 122, 6], Some("db-1"), NOW + 90);
        let unnamed = lease(MAC, [192, 168, 122, 7], None, NOW + 30);
        let all = [named.clone(), other.clone(), unnamed.clone()];
        // A lease with a different name is skipped even though it is newest.
        assert_eq!(
            pick_lease(&all, MAC, Some("web-1"), NOW),
            Some(named.clone())
        );
        // Hostnames compare case-insensitively (DNS names).
        assert_eq!(pick_lease(&all, MAC, Some("WEB-1"), NOW), Some(named));
        // A lease without a name still matches a wanted name.
        assert_eq!(
            pick_lease(&[other.clone(), unnamed.clone()], MAC, Some("web-1"), NOW),
            Some(unnamed)
        );
        // Without a wanted name every name matches: newest wins.
        assert_eq!(pick_lease(&all, MAC, None, NOW), Some(other));
    }

    #[test]
    fn pick_lease_skips_expired() {
        let expired = lease(MAC, [192, 168, 122, 5], None, NOW - 1);
        let just_now = lease(MAC, [192, 168, 122, 6], None, NOW);
        assert_eq!(
            pick_lease(&[expired.clone(), just_now], MAC, None, NOW),
            None
        );
        let live = lease(MAC, [192, 168, 122, 7], None, NOW + 1);
        assert_eq!(
            pick_lease(&[expired, live.clone()], MAC, None, NOW),
            Some(live)
        );
    }

    #[test]
    fn pick_lease_expiry_zero_is_infinite_and_newest() {
        let forever = lease(MAC, [192, 168, 122, 5], None, 0);
        let later = lease(MAC, [192, 168, 122, 6], None, NOW + 1_000_000);
        assert_eq!(
            pick_lease(&[forever.clone(), later.clone()], MAC, None, NOW),
            Some(forever.clone())
        );
        assert_eq!(
            pick_lease(&[later, forever.clone()], MAC, None, i64::MAX),
            Some(forever)
        );
    }

    /// The Go original sorted by expiry descending and took the LAST match,
    /// i.e. the oldest lease (a stale one from a previous boot). We take the
    /// newest, whatever the input order.
    #[test]
    fn pick_lease_takes_newest_not_oldest_go_bug() {
        let stale = lease(MAC, [192, 168, 122, 10], None, NOW + 100);
        let fresh = lease(MAC, [192, 168, 122, 20], None, NOW + 3600);
        let middle = lease(MAC, [192, 168, 122, 15], None, NOW + 1800);
        for order in [
            vec![stale.clone(), middle.clone(), fresh.clone()],
            vec![fresh.clone(), middle.clone(), stale.clone()],
            vec![middle, stale, fresh],
        ] {
            let got = pick_lease(&order, MAC, None, NOW).expect("a lease");
            assert_eq!(got.ip, Ipv4Addr::new(192, 168, 122, 20));
        }
    }

    #[test]
    fn pick_lease_tie_prefers_the_named_lease() {
        let unnamed = lease(MAC, [192, 168, 122, 5], None, NOW + 60);
        let named = lease(MAC, [192, 168, 122, 6], Some("web"), NOW + 60);
        for order in [[unnamed.clone(), named.clone()], [named.clone(), unnamed]] {
            assert_eq!(
                pick_lease(&order, MAC, Some("web"), NOW),
                Some(named.clone())
            );
        }
    }

    fn arb_lease() -> impl Strategy<Value = Lease> {
        (
            prop::sample::select(vec![MAC, "52:54:00:12:34:57", "52:54:00:12:34:5A"]),
            any::<[u8; 4]>(),
            prop::option::of(prop::sample::select(vec!["web", "WEB", "db"])),
            prop::sample::select(vec![
                0,
                NOW - 10,
                NOW,
                NOW + 1,
                NOW + 50,
                NOW + 50,
                NOW + 99,
            ]),
        )
            .prop_map(|(mac, ip, name, expiry)| lease(mac, ip, name, expiry))
    }

    proptest! {
        /// The pick matches the filter, and no matching lease is newer.
        #[test]
        fn pick_lease_is_a_newest_match(
            leases in prop::collection::vec(arb_lease(), 0..8),
            wanted in prop::option::of(prop::sample::select(vec!["web", "db"])),
        ) {
            let matches = |l: &Lease| {
                l.mac.eq_ignore_ascii_case(MAC)
                    && l.hostname.as_deref().zip(wanted).is_none_or(|(h, w)| h.eq_ignore_ascii_case(w))
                    && (l.expiry_unix == 0 || l.expiry_unix > NOW)
            };
            let rank = |l: &Lease| if l.expiry_unix == 0 { i64::MAX } else { l.expiry_unix };
            match pick_lease(&leases, MAC, wanted, NOW) {
                None => prop_assert!(!leases.iter().any(matches)),
                Some(got) => {
                    prop_assert!(matches(&got));
                    prop_assert!(leases.iter().filter(|l| matches(l)).all(|l| rank(l) <= rank(&got)));
                }
            }
        }
    }

    // ---- reservation XML ------------------------------------------------------

    fn reservation(mac: &str, ip: [u8; 4], hostname: Option<&str>) -> Reservation {
        Reservation {
            network: "default".into(),
            mac: mac.into(),
            ip: Ipv4Addr::from(ip),
            hostname: hostname.map(Into::into),
        }
    }

    #[test]
    fn reservation_xml_plain() {
        assert_eq!(
            reservation_xml(&reservation(MAC, [192, 168, 122, 10], Some("web-1"))),
            "<host mac=\"52:54:00:12:34:56\" name=\"web-1\" ip=\"192.168.122.10\"/>"
        );
        assert_eq!(
            reservation_xml(&reservation(MAC, [192, 168, 122, 10], None)),
            "<host mac=\"52:54:00:12:34:56\" ip=\"192.168.122.10\"/>"
        );
    }

    #[test]
    fn reservation_xml_escapes_a_hostile_hostname() {
        let hostile = r#"x' ip='6.6.6.6'/><host mac="a" name=<&>"#;
        let xml = reservation_xml(&reservation(MAC, [192, 168, 122, 10], Some(hostile)));
        assert_eq!(
            xml,
            "<host mac=\"52:54:00:12:34:56\" \
             name=\"x&apos; ip=&apos;6.6.6.6&apos;/&gt;&lt;host mac=&quot;a&quot; name=&lt;&amp;&gt;\" \
             ip=\"192.168.122.10\"/>"
        );
        // It stays one element whose name reads back unchanged.
        let doc = format!("<network><ip><dhcp>{xml}</dhcp></ip></network>");
        assert_eq!(
            reservations_in_xml(&doc),
            vec![(
                MAC.to_string(),
                Ipv4Addr::new(192, 168, 122, 10),
                Some(hostile.to_string())
            )]
        );
    }

    #[test]
    fn reservation_serde_round_trip() {
        let r = reservation(MAC, [192, 168, 122, 10], Some("web"));
        let json = serde_json::to_string(&r).expect("serialize");
        assert_eq!(
            json,
            r#"{"network":"default","mac":"52:54:00:12:34:56","ip":"192.168.122.10","hostname":"web"}"#
        );
        assert_eq!(
            serde_json::from_str::<Reservation>(&json).expect("parse"),
            r
        );
    }

    proptest! {
        /// Any name survives escaping and the parser.
        #[test]
        fn reservation_xml_round_trips(name in "\\PC{0,40}", ip in any::<[u8; 4]>()) {
            let r = reservation(MAC, ip, Some(&name));
            let doc = format!("<network><ip><dhcp>{}</dhcp></ip></network>", reservation_xml(&r));
            prop_assert_eq!(
                reservations_in_xml(&doc),
                vec![(MAC.to_string(), Ipv4Addr::from(ip), Some(name))]
            );
        }
    }

    #[test]
    fn reservations_in_xml_reads_libvirt_output() {
        let xml = r#"<network>
  <name>default</name>
  <!-- <dhcp><host mac='52:54:00:00:00:99' ip='192.168.122.99'/></dhcp> -->
  <bridge name='virbr0' stp='on' delay='0'/>
  <dns>
    <host ip='192.168.122.77'><hostname>dns-only</hostname></host>
  </dns>
  <ip address='192.168.122.1' netmask='255.255.255.0'>
    <dhcp>
      <range start='192.168.122.2' end='192.168.122.254'/>
      <host mac='52:54:00:aa:bb:01' name='web-1' ip='192.168.122.10'/>
      <host mac="52:54:00:AA:BB:02" ip="192.168.122.11" />
      <host name='no-mac' ip='192.168.122.12'/>
      <host mac='52:54:00:aa:bb:03' name='caf&#xE9;&amp;co' ip='192.168.122.13'></host>
    </dhcp>
  </ip>
  <ip family='ipv6' address='2001:db8::1' prefix='64'>
    <dhcp>
      <host id='0:4:7e:7d:f0:7d' name='v6' ip='2001:db8::2'/>
    </dhcp>
  </ip>
  <dhcp/>
  <host mac='52:54:00:aa:bb:04' ip='192.168.122.14'/>
</network>"#;
        assert_eq!(
            reservations_in_xml(xml),
            vec![
                (
                    "52:54:00:aa:bb:01".into(),
                    Ipv4Addr::new(192, 168, 122, 10),
                    Some("web-1".into())
                ),
                (
                    "52:54:00:AA:BB:02".into(),
                    Ipv4Addr::new(192, 168, 122, 11),
                    None
                ),
                (
                    "52:54:00:aa:bb:03".into(),
                    Ipv4Addr::new(192, 168, 122, 13),
                    Some("café&co".into())
                ),
            ]
        );
        // The MAC-less entry still counts for conflicts.
        assert_eq!(dhcp_hosts(xml).len(), 5);
    }

    #[test]
    fn reservations_in_xml_tolerates_junk() {
        for junk in [
            "",
            "<",
            "<network",
            "<dhcp><host mac='x",
            "no xml at all",
            "<dhcp><host ip='1.2.3.4' mac=52/></dhcp>",
        ] {
            assert_eq!(reservations_in_xml(junk), vec![], "{junk:?}");
        }
    }

    #[test]
    fn presence_follows_libvirt_add_rules() {
        let hosts = dhcp_hosts(
            "<dhcp><host mac='52:54:00:12:34:56' name='web' ip='192.168.122.10'/>\
             <host name=\"db\" ip=\"192.168.122.20\"/></dhcp>",
        );
        let check = |r: Reservation| presence(&hosts, &r);
        assert!(matches!(
            check(reservation(
                "52:54:00:12:34:56",
                [192, 168, 122, 10],
                Some("web")
            )),
            Presence::Identical
        ));
        assert!(matches!(
            check(reservation("52:54:00:12:34:56", [192, 168, 122, 10], None)),
            Presence::Conflict(_)
        ));
        assert!(matches!(
            check(reservation(
                "52:54:00:12:34:56",
                [192, 168, 122, 11],
                Some("web")
            )),
            Presence::Conflict(_)
        ));
        assert!(matches!(
            check(reservation("52:54:00:00:00:01", [192, 168, 122, 10], None)),
            Presence::Conflict(_)
        ));
        assert!(matches!(
            check(reservation(
                "52:54:00:00:00:01",
                [192, 168, 122, 30],
                Some("db")
            )),
            Presence::Conflict(_)
        ));
        assert!(matches!(
            check(reservation("52:54:00:00:00:01", [192, 168, 122, 30], None)),
            Presence::Absent
        ));
        match check(reservation("52:54:00:00:00:01", [192, 168, 122, 20], None)) {
            Presence::Conflict(existing) => {
                assert_eq!(existing, "<host name=\"db\" ip=\"192.168.122.20\"/>");
            }
            _ => panic!("expected a conflict"),
        }
    }

    // ---- validation -----------------------------------------------------------

    #[test]
    fn mac_validation() {
        for good in [MAC, "52:54:00:AB:cd:EF", "00:00:00:00:00:00"] {
            assert!(validate_mac(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52-54-00-12-34-56",
            "5254.0012.3456",
            "52:54:00:12:34:5g",
            "52:54:00:12:34:567",
            "2:54:00:12:34:56",
            " 52:54:00:12:34:56",
            "52:54:00:12:34:56\n",
            "52:54:00:12:34:5\0",
            "-52:54:00:12:34:5",
        ] {
            let error = validate_mac(bad).expect_err(bad);
            assert!(error.to_string().contains("52:54:00:12:34:56"), "{error}");
        }
    }

    #[test]
    fn interface_name_validation() {
        for good in ["virbr0", "br-lan", "eth0.100", "a", "abcdefghijklmno"] {
            assert!(validate_interface_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "abcdefghijklmnop",
            "-i",
            ".",
            "..",
            "br 0",
            "br/0",
            "br0;rm",
            "vírbr0",
            "br\n0",
        ] {
            assert!(validate_interface_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn hostname_validation() {
        for good in ["web", "web-1", "web_1", "a.b.c", "1web", &"a".repeat(63)] {
            assert!(validate_hostname(good).is_ok(), "{good}");
        }
        let long = vec!["a".repeat(63); 4].join(".") + ".b";
        for bad in [
            "",
            "-web",
            "_web",
            "web,1",
            "a..b",
            ".a",
            "a.",
            "x'<&\"",
            "web 1",
            "wéb",
            &"a".repeat(64),
            &long,
        ] {
            assert!(validate_hostname(bad).is_err(), "{bad:?}");
        }
    }

    // ---- release --------------------------------------------------------------

    #[test]
    fn release_validates_before_running() {
        let ip = Ipv4Addr::new(192, 168, 122, 250);
        // A program that cannot exist: a validation error proves nothing ran.
        let program = "/nonexistent/dhcp_release";
        assert!(matches!(
            run_release(program, "-h", ip, MAC),
            Err(DhcpError::InvalidInterface { .. })
        ));
        assert!(matches!(
            run_release(program, "virbr0;reboot", ip, MAC),
            Err(DhcpError::InvalidInterface { .. })
        ));
        assert!(matches!(
            run_release(program, "virbr0", ip, "zz"),
            Err(DhcpError::InvalidMac { .. })
        ));
    }

    #[test]
    fn release_without_the_tool_says_what_to_install() {
        let error = run_release(
            "/nonexistent/dhcp_release",
            "virbr0",
            Ipv4Addr::new(192, 168, 122, 250),
            MAC,
        )
        .expect_err("missing tool");
        assert!(
            matches!(error, DhcpError::ReleaseToolMissing { .. }),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(message.contains("dnsmasq-utils"), "{message}");
        assert!(
            message.contains("virbr0") && message.contains(MAC),
            "{message}"
        );
    }

    // ---- the look loop ----------------------------------------------------------

    /// Change signals on a fixed tick (or none at all with `tick` zero).
    struct Ticks {
        tick: Duration,
        waits: u32,
    }

    impl LeaseChanges for Ticks {
        fn wait(&mut self, limit: Duration) {
            self.waits += 1;
            std::thread::sleep(limit.min(self.tick));
        }
    }

    fn ticks(tick: Duration) -> Ticks {
        Ticks { tick, waits: 0 }
    }

    #[test]
    fn poll_looks_again_on_each_change_signal() {
        let mut calls = 0;
        let mut lookup = || {
            calls += 1;
            Ok(if calls < 3 {
                vec![]
            } else {
                vec![lease(MAC, [192, 168, 122, 9], None, 0)]
            })
        };
        let mut seen = Vec::new();
        let mut changes = ticks(Duration::ZERO);
        let got = poll_for_lease(
            &mut lookup,
            &mut changes,
            "default",
            MAC,
            None,
            Duration::from_secs(10),
            &mut |n| seen.push(n),
        )
        .expect("lease");
        assert_eq!(got.ip, Ipv4Addr::new(192, 168, 122, 9));
        assert_eq!(seen, vec![1, 2, 3]);
        // One wait between two looks, none before the first.
        assert_eq!(changes.waits, 2);
    }

    /// libvirtd restarting during the wait: looks fail to reach it, then a
    /// reconnected look finds the lease. The wait goes on through the failures.
    #[test]
    fn poll_waits_through_an_unreachable_libvirt() {
        let mut calls = 0;
        let mut lookup = || {
            calls += 1;
            if calls < 3 {
                Err(DhcpError::Unreachable {
                    network: "default".into(),
                    source: Box::new(crate::libvirt::LibvirtError::Worker(
                        "libvirtd restarting".into(),
                    )),
                })
            } else {
                Ok(vec![lease(MAC, [192, 168, 122, 9], None, 0)])
            }
        };
        let mut changes = ticks(Duration::ZERO);
        let got = poll_for_lease(
            &mut lookup,
            &mut changes,
            "default",
            MAC,
            None,
            Duration::from_secs(10),
            &mut |_| {},
        )
        .expect("lease after the restart");
        assert_eq!(got.ip, Ipv4Addr::new(192, 168, 122, 9));
        let error = DhcpError::Unreachable {
            network: "default".into(),
            source: Box::new(crate::libvirt::LibvirtError::Worker("x".into())),
        };
        assert!(error.is_recoverable());
        assert!(error.to_string().contains("\"default\""), "{error}");
    }

    #[test]
    fn poll_looks_at_once() {
        let mut changes = ticks(Duration::from_secs(5));
        let got = poll_for_lease(
            &mut || Ok(vec![lease(MAC, [192, 168, 122, 9], None, 0)]),
            &mut changes,
            "default",
            MAC,
            None,
            Duration::from_secs(10),
            &mut |_| {},
        );
        assert!(got.is_ok());
        assert_eq!(changes.waits, 0);
    }

    #[test]
    fn poll_times_out_with_an_actionable_message() {
        let mut calls = 0;
        let mut lookup = || {
            calls += 1;
            if calls == 2 {
                Err(DhcpError::Leases {
                    network: "default".into(),
                    source: VirtError::sample_missing_network(),
                })
            } else {
                Ok(vec![lease(
                    "52:54:00:00:00:01",
                    [192, 168, 122, 9],
                    None,
                    0,
                )])
            }
        };
        let mut attempts = 0;
        let started = Instant::now();
        let error = poll_for_lease(
            &mut lookup,
            &mut ticks(Duration::from_millis(250)),
            "default",
            MAC,
            None,
            Duration::from_millis(600),
            &mut |n| attempts = n,
        )
        .expect_err("timeout");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(600) && took < Duration::from_millis(1500),
            "{took:?}"
        );
        // Looks at 0, 250, 500 and 600 ms (the last one at the deadline).
        assert_eq!(attempts, 4);
        let message = error.to_string();
        for part in [
            MAC,
            "\"default\"",
            "600ms",
            "4 looks",
            "dhcp_timeout",
            "DHCP client",
            "ndv-no-such",
        ] {
            assert!(message.contains(part), "{part:?} missing from {message}");
        }
    }

    #[test]
    fn poll_gives_up_at_once_when_leases_are_unsupported() {
        let mut attempts = 0;
        let error = poll_for_lease(
            &mut || {
                Err(DhcpError::Leases {
                    network: "default".into(),
                    source: VirtError::sample_unsupported(),
                })
            },
            &mut ticks(Duration::ZERO),
            "default",
            MAC,
            None,
            Duration::from_secs(30),
            &mut |n| attempts = n,
        )
        .expect_err("unsupported");
        assert_eq!(attempts, 1);
        assert!(matches!(error, DhcpError::Leases { .. }));
    }

    // ---- the status file watch ---------------------------------------------------

    #[test]
    fn watch_wakes_when_the_status_file_is_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut watch = StatusFileWatch::new(dir.path(), "ndvtestbr0");
        assert!(watch.is_watching());
        let path = dir.path().to_path_buf();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            // As libvirt's leaseshelper does: write a new file, rename it over.
            let temp = path.join("ndvtestbr0.status.new");
            std::fs::write(&temp, "[]").expect("write");
            std::fs::rename(&temp, path.join("ndvtestbr0.status")).expect("rename");
        });
        let started = Instant::now();
        watch.wait(Duration::from_secs(30));
        let took = started.elapsed();
        writer.join().expect("writer");
        // Woken by the rename, not by the safety limit (1 s) or the caller's.
        assert!(
            took >= Duration::from_millis(90) && took < SAFETY_LOOK,
            "{took:?}"
        );
    }

    #[test]
    fn watch_ignores_other_files_in_the_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut watch = StatusFileWatch::new(dir.path(), "ndvtestbr0");
        std::fs::write(dir.path().join("ndvtestbr1.status"), "[]").expect("write");
        let started = Instant::now();
        watch.wait(Duration::from_millis(300));
        assert!(started.elapsed() >= Duration::from_millis(300));
    }

    #[test]
    fn without_a_directory_it_falls_back_to_fine_polling() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut watch = StatusFileWatch::new(&dir.path().join("missing"), "ndvtestbr0");
        assert!(!watch.is_watching());
        let started = Instant::now();
        watch.wait(Duration::from_secs(30));
        assert!(started.elapsed() < SAFETY_LOOK);
    }
}
