//! libvirt networks: finding one by its bridge, the network fingerprint,
//! its DHCP servers and the network filters,
//! DHCP leases, and DHCP host reservations through `virNetworkUpdate`. The
//! lease choice and the reservation model are pure, in [`crate::libvirt::dhcp`].
//!
//! Everything here blocks; call it from a blocking thread.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use virt::connect::Connect;
use virt::network::Network;
use virt::sys;

use super::conn::{Libvirt, LibvirtError};
use super::ffi::{self, RawLease};
use crate::libvirt::dhcp::{
    dhcp_hosts, host_xml, poll_for_lease, presence, reservation_xml, validate_hostname,
    validate_mac, DhcpError, HostEntry, Lease, Presence, Reservation, StatusFileWatch,
    LEASE_STATUS_DIR,
};

// ---------------------------------------------------------------------------
// Leases
// ---------------------------------------------------------------------------

/// The IPv4 leases of network `network`, optionally only those of `mac`.
pub fn network_leases(
    conn: &Connect,
    network: &str,
    mac: Option<&str>,
) -> Result<Vec<Lease>, DhcpError> {
    if let Some(mac) = mac {
        validate_mac(mac)?;
    }
    let net = lookup_network(conn, network)?;
    leases_of(&net, network, mac)
}

fn leases_of(net: &Network, network: &str, mac: Option<&str>) -> Result<Vec<Lease>, DhcpError> {
    let raw = ffi::network_dhcp_leases(net, mac).map_err(|error| DhcpError::Leases {
        network: network.to_string(),
        source: error.into(),
    })?;
    Ok(raw.into_iter().filter_map(lease_from_raw).collect())
}

/// One raw lease as a [`Lease`]; IPv6 and malformed entries are skipped.
fn lease_from_raw(raw: RawLease) -> Option<Lease> {
    if !raw.ipv4 {
        return None;
    }
    let (Some(mac), Some(ip_text)) = (raw.mac, raw.ip) else {
        tracing::debug!("skipping a DHCP lease without MAC or IP");
        return None;
    };
    let Ok(ip) = ip_text.parse::<Ipv4Addr>() else {
        tracing::debug!(mac = %mac, ip = %ip_text, "skipping a DHCP lease with an unparsable IPv4 address");
        return None;
    };
    Some(Lease {
        mac,
        ip,
        prefix: raw.prefix,
        // dnsmasq writes "*" for "no name" in some formats.
        hostname: raw.hostname.filter(|h| !h.is_empty() && h != "*"),
        expiry_unix: raw.expiry_unix,
        iface: raw.iface.unwrap_or_default(),
    })
}

/// Waits until network `network` has a lease for `mac` (see
/// [`crate::libvirt::dhcp::pick_lease`]): looks at once, then whenever
/// libvirt's lease helper rewrites the network's status file under
/// [`crate::libvirt::dhcp::LEASE_STATUS_DIR`] (noticed within about 10 ms),
/// at least every second, and a last time at the deadline. Without that
/// directory (another libvirt) it asks libvirt every 40 ms. `on_attempt` gets
/// the 1-based number of each look.
///
/// Every look asks `libvirt` for a live connection, so a libvirtd restart
/// during the wait costs a few failed looks, not the start. A look that
/// finds no lease also checks the network's dnsmasq and has libvirt start
/// it again when it died (see [`respawn_dead_dnsmasq`]).
pub fn wait_for_lease(
    libvirt: &Libvirt,
    network: &str,
    mac: &str,
    hostname: Option<&str>,
    timeout: Duration,
    on_attempt: &mut dyn FnMut(u32),
) -> Result<Lease, DhcpError> {
    validate_mac(mac)?;
    let unreachable = |source: LibvirtError| DhcpError::Unreachable {
        network: network.to_string(),
        source: Box::new(source),
    };
    // A network that does not exist fails at once, not at the deadline; its
    // bridge names the status file to watch.
    let bridge = libvirt
        .call_blocking(|conn| {
            Ok(lookup_network(conn, network).map(|net| net.bridge_name().unwrap_or_default()))
        })
        .map_err(unreachable)??;
    // Watch before the first look, so a lease written in between still wakes us.
    let mut changes = StatusFileWatch::new(Path::new(LEASE_STATUS_DIR), &bridge);
    // One respawn per wait: a dnsmasq that dies again is not ours to chase.
    let mut respawned = false;
    poll_for_lease(
        &mut || {
            let leases = libvirt
                .call_blocking(|conn| Ok(network_leases(conn, network, Some(mac))))
                .map_err(unreachable)??;
            if !respawned
                && !leases
                    .iter()
                    .any(|lease| lease.mac.eq_ignore_ascii_case(mac))
            {
                respawned = libvirt
                    .call_blocking(|conn| Ok(respawn_dead_dnsmasq(conn, network)))
                    .unwrap_or(false);
            }
            Ok(leases)
        },
        &mut changes,
        network,
        mac,
        hostname,
        timeout,
        on_attempt,
    )
}

/// The name of the DNS TXT record whose live add and delete make libvirt
/// restart a network's dead dnsmasq ([`respawn_dead_dnsmasq`]).
pub const RESPAWN_TXT: &str = "nomad-driver-virt-respawn";

fn respawn_txt_xml() -> String {
    format!("<txt name='{RESPAWN_TXT}' value='1'/>")
}

/// Deletes our TXT record from the network's live DNS; `false` when it was
/// not there (or could not be deleted).
fn delete_respawn_txt(net: &Network) -> bool {
    net.update(
        sys::VIR_NETWORK_UPDATE_COMMAND_DELETE,
        sys::VIR_NETWORK_SECTION_DNS_TXT,
        -1,
        &respawn_txt_xml(),
        sys::VIR_NETWORK_UPDATE_AFFECT_LIVE,
    )
    .is_ok()
}

/// When the dnsmasq libvirt runs for `network` has died (killed, crashed),
/// has libvirt start it again: any update of the network's live DNS makes
/// libvirt refresh its DHCP daemon, which starts one when none runs. The
/// update adds and removes a TXT record of our own ([`RESPAWN_TXT`]), so
/// the network's definition ends as it was; a record left by a plugin that
/// died in between is deleted first (and at plugin start by
/// [`remove_respawn_records`]). Only for a libvirt on this machine, whose
/// pid file is the one read here; nothing happens when dnsmasq runs or its
/// state cannot be read. Returns whether it asked libvirt.
pub fn respawn_dead_dnsmasq(conn: &Connect, network: &str) -> bool {
    let uri = conn.uri().unwrap_or_default();
    // The pid file is only read when the libvirt is this host's.
    if !should_respawn(&uri, || crate::libvirt::dhcp::dnsmasq_running(network)) {
        return false;
    }
    let Ok(net) = conn.lookup_network_by_name(network) else {
        return false;
    };
    tracing::warn!(
        network,
        "the network's dnsmasq is not running; asking libvirt to start it"
    );
    delete_respawn_txt(&net);
    let add = net.update(
        sys::VIR_NETWORK_UPDATE_COMMAND_ADD_LAST,
        sys::VIR_NETWORK_SECTION_DNS_TXT,
        -1,
        &respawn_txt_xml(),
        sys::VIR_NETWORK_UPDATE_AFFECT_LIVE,
    );
    match add {
        Ok(()) => {
            if !delete_respawn_txt(&net) {
                tracing::warn!(
                    network,
                    "cannot remove the TXT record {RESPAWN_TXT} that restarted dnsmasq; \
                     the plugin removes it at its next start"
                );
            }
        }
        Err(error) => {
            tracing::warn!(network, error = %error, "cannot make libvirt restart dnsmasq");
        }
    }
    true
}

/// Whether to respawn: the libvirt at `uri` runs on this host (so the pid
/// file read by `running` is its network's) and its dnsmasq is known dead.
fn should_respawn(uri: &str, running: impl FnOnce() -> Option<bool>) -> bool {
    crate::libvirt::shares::is_local_uri(uri) && running() == Some(false)
}

/// Deletes the [`RESPAWN_TXT`] record from every active network that has it
/// (left by a plugin that died between adding and deleting it); returns
/// the networks it was removed from. Errors only log: this is tidying.
pub fn remove_respawn_records(conn: &Connect) -> Vec<String> {
    let networks = match conn.list_all_networks(sys::VIR_CONNECT_LIST_NETWORKS_ACTIVE) {
        Ok(networks) => networks,
        Err(error) => {
            tracing::debug!(error = %error, "cannot list networks to remove respawn records");
            return Vec::new();
        }
    };
    let mut removed = Vec::new();
    for net in networks {
        let has_record = net.xml_desc(0).is_ok_and(|xml| has_respawn_txt(&xml));
        if has_record && delete_respawn_txt(&net) {
            let name = network_name(&net);
            tracing::info!(network = %name, "removed a leftover {RESPAWN_TXT} TXT record");
            removed.push(name);
        }
    }
    removed
}

/// Whether a network's XML has our TXT record.
pub fn has_respawn_txt(xml: &str) -> bool {
    let Ok(root) = crate::libvirt::xml::parse(xml) else {
        return false;
    };
    root.child("dns").is_some_and(|dns| {
        dns.children_named("txt")
            .any(|txt| txt.attr("name") == Some(RESPAWN_TXT))
    })
}

fn network_name(net: &Network) -> String {
    net.name().unwrap_or_else(|_| "<unknown>".into())
}

// ---------------------------------------------------------------------------
// Networks
// ---------------------------------------------------------------------------

/// The name of the libvirt network whose bridge is `bridge`.
pub fn network_by_bridge(conn: &Connect, bridge: &str) -> Result<String, DhcpError> {
    let networks = conn
        .list_all_networks(0)
        .map_err(|error| DhcpError::ListNetworks {
            source: error.into(),
        })?;
    let mut known = Vec::new();
    for net in networks {
        // Networks without a bridge (macvtap, hostdev forwards) answer Err.
        let Ok(name) = net.bridge_name() else {
            continue;
        };
        if name == bridge {
            return net.name().map_err(|error| DhcpError::ListNetworks {
                source: error.into(),
            });
        }
        known.push(format!("{name} (network {})", network_name(&net)));
    }
    known.sort();
    Err(DhcpError::UnknownBridge {
        bridge: bridge.into(),
        known: if known.is_empty() {
            "none (no libvirt network has a bridge)".into()
        } else {
            known.join(", ")
        },
    })
}

/// `(network name, active, bridge)` of every libvirt network, sorted by name,
/// for the `driver.virt.network.<name>.state` / `.bridge_name` attributes.
/// Networks without a bridge get "". A failed listing yields nothing (and a
/// warning): a fingerprint must not fail because of it.
pub fn network_fingerprint(conn: &Connect) -> Vec<(String, bool, String)> {
    let networks = match conn.list_all_networks(0) {
        Ok(networks) => networks,
        Err(error) => {
            tracing::warn!(error = %error, "cannot list libvirt networks for the fingerprint");
            return Vec::new();
        }
    };
    let mut out: Vec<(String, bool, String)> = networks
        .iter()
        .filter_map(|net| {
            let name = net.name().ok()?;
            let active = net.is_active().unwrap_or(false);
            let bridge = net.bridge_name().unwrap_or_default();
            Some((name, active, bridge))
        })
        .collect();
    out.sort();
    out
}

/// The addresses of a network's DHCP servers (its `<ip address>`
/// elements that hold a `<dhcp>` block): the only senders whose DHCP
/// replies the `clean-traffic` filter should learn guest addresses from.
pub fn dhcp_servers(conn: &Connect, network: &str) -> Result<Vec<Ipv4Addr>, DhcpError> {
    let net = lookup_network(conn, network)?;
    let xml = net
        .xml_desc(0)
        .map_err(|error| libvirt_error("read the network XML", network, error))?;
    Ok(dhcp_servers_in_xml(&xml))
}

/// Pure part of [`dhcp_servers`].
pub fn dhcp_servers_in_xml(xml: &str) -> Vec<Ipv4Addr> {
    let Ok(root) = crate::libvirt::xml::parse(xml) else {
        return Vec::new();
    };
    root.children_named("ip")
        .filter(|ip| ip.child("dhcp").is_some())
        .filter_map(|ip| ip.attr("address")?.parse().ok())
        .collect()
}

/// Whether libvirt has the network filter `name` (`virsh nwfilter-list`).
/// `Ok(None)` only for libvirt's test driver (`test://`), which has no
/// network filters at all; a real libvirt without its nwfilter driver has
/// no filter either: `Ok(Some(false))`, whose fix is the same package.
pub fn nwfilter_exists(conn: &Connect, name: &str) -> Result<Option<bool>, LibvirtError> {
    match conn.list_all_nw_filters(0) {
        Ok(filters) => Ok(Some(
            filters
                .iter()
                .any(|filter| filter.name().is_ok_and(|n| n == name)),
        )),
        Err(error) if has_code(&error, sys::VIR_ERR_NO_SUPPORT) => {
            let uri = conn.uri().unwrap_or_default();
            Ok((!filters_optional(&uri)).then_some(false))
        }
        Err(error) => Err(LibvirtError::Host {
            action: "listing network filters",
            source: error.into(),
        }),
    }
}

// ---------------------------------------------------------------------------
// Reservations
// ---------------------------------------------------------------------------

/// Adds `r` to its network's DHCP hosts (live and persistent config).
/// An identical entry already there is success; an entry sharing the MAC,
/// IP or name is a [`DhcpError::Conflict`] (libvirt rejects those too).
pub fn add_reservation(conn: &Connect, r: &Reservation) -> Result<(), DhcpError> {
    validate_mac(&r.mac)?;
    if let Some(name) = &r.hostname {
        // libvirt 9.0 writes the name into the network XML unescaped, and
        // dnsmasq's hosts file is comma-separated: only plain names are safe.
        validate_hostname(name)?;
    }
    let net = lookup_network(conn, &r.network)?;
    let wanted = reservation_xml(r);
    let mut flags = 0;
    for (flag, hosts) in update_targets(&net, &r.network)? {
        match presence(&hosts, r) {
            Presence::Identical => {}
            Presence::Absent => flags |= flag,
            Presence::Conflict(existing) => {
                return Err(DhcpError::Conflict {
                    network: r.network.clone(),
                    wanted,
                    existing,
                })
            }
        }
    }
    if flags == 0 {
        tracing::debug!(network = %r.network, entry = %wanted, "DHCP reservation already present");
        return Ok(());
    }
    let result = net.update(
        sys::VIR_NETWORK_UPDATE_COMMAND_ADD_LAST,
        sys::VIR_NETWORK_SECTION_IP_DHCP_HOST,
        -1,
        &wanted,
        flags,
    );
    match result {
        Ok(()) => {
            tracing::debug!(network = %r.network, entry = %wanted, "added DHCP reservation");
            Ok(())
        }
        // Someone may have added the same entry since we looked.
        Err(error) if has_code(&error, sys::VIR_ERR_OPERATION_INVALID) => {
            let targets = update_targets(&net, &r.network)?;
            if targets
                .iter()
                .all(|(_, hosts)| matches!(presence(hosts, r), Presence::Identical))
            {
                Ok(())
            } else {
                Err(libvirt_error("add a DHCP host entry", &r.network, error))
            }
        }
        Err(error) => Err(libvirt_error("add a DHCP host entry", &r.network, error)),
    }
}

/// Removes the DHCP host entry with `r`'s MAC and IP (whatever its name)
/// from the live and persistent config. A missing network or entry is
/// success: teardown may run more than once.
pub fn remove_reservation(conn: &Connect, r: &Reservation) -> Result<(), DhcpError> {
    validate_mac(&r.mac)?;
    let net = match conn.lookup_network_by_name(&r.network) {
        Ok(net) => net,
        Err(error) if has_code(&error, sys::VIR_ERR_NO_NETWORK) => return Ok(()),
        Err(error) => return Err(libvirt_error("look up the network", &r.network, error)),
    };
    // (entry xml as stored, flags); live and config may hold different names.
    let mut deletions: Vec<(String, sys::virNetworkUpdateFlags)> = Vec::new();
    for (flag, hosts) in update_targets(&net, &r.network)? {
        let Some(entry) = hosts.iter().find(|h| h.is_for(&r.mac, r.ip)) else {
            continue;
        };
        // DELETE needs every attribute it is given to match, so send the
        // entry exactly as libvirt holds it.
        let xml = host_xml(
            entry.mac.as_deref(),
            entry.name.as_deref(),
            entry.ip.as_deref(),
        );
        match deletions.iter_mut().find(|(x, _)| *x == xml) {
            Some((_, flags)) => *flags |= flag,
            None => deletions.push((xml, flag)),
        }
    }
    for (xml, flags) in deletions {
        let result = net.update(
            sys::VIR_NETWORK_UPDATE_COMMAND_DELETE,
            sys::VIR_NETWORK_SECTION_IP_DHCP_HOST,
            -1,
            &xml,
            flags,
        );
        match result {
            Ok(()) => {
                tracing::debug!(network = %r.network, entry = %xml, "removed DHCP reservation");
            }
            // Gone meanwhile (entry or network): that is what we wanted.
            Err(error)
                if has_code(&error, sys::VIR_ERR_OPERATION_INVALID)
                    || has_code(&error, sys::VIR_ERR_NO_NETWORK) =>
            {
                tracing::debug!(network = %r.network, entry = %xml, error = %error, "DHCP reservation already gone");
            }
            Err(error) => return Err(libvirt_error("delete a DHCP host entry", &r.network, error)),
        }
    }
    Ok(())
}

/// Every DHCP host entry of the network's live definition: (MAC, IP, name).
pub fn reservations(
    conn: &Connect,
    network: &str,
) -> Result<Vec<(String, Ipv4Addr, Option<String>)>, DhcpError> {
    let net = lookup_network(conn, network)?;
    let xml = net
        .xml_desc(0)
        .map_err(|error| libvirt_error("read its live XML", network, error))?;
    Ok(crate::libvirt::dhcp::reservations_in_xml(&xml))
}

/// The IPs reserved for `mac` in the network (live or persistent
/// definition); empty when the network is gone.
pub fn reserved_ips(conn: &Connect, network: &str, mac: &str) -> Result<Vec<Ipv4Addr>, DhcpError> {
    let net = match lookup_network(conn, network) {
        Ok(net) => net,
        Err(DhcpError::NoNetwork { .. }) => return Ok(Vec::new()),
        Err(error) => return Err(error),
    };
    let mut ips = Vec::new();
    for (_, hosts) in update_targets(&net, network)? {
        for ip in hosts
            .iter()
            .filter(|host| host.has_mac(mac))
            .filter_map(|host| host.ipv4())
        {
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
    }
    Ok(ips)
}

/// Where an update must go (live if active, config if persistent), each
/// with the DHCP hosts it currently holds.
fn update_targets(
    net: &Network,
    network: &str,
) -> Result<Vec<(sys::virNetworkUpdateFlags, Vec<HostEntry>)>, DhcpError> {
    fn read<T>(
        what: &'static str,
        network: &str,
        result: Result<T, virt::error::Error>,
    ) -> Result<T, DhcpError> {
        result.map_err(|error| libvirt_error(what, network, error))
    }
    let active = read("check whether it is active", network, net.is_active())?;
    let persistent = read(
        "check whether it is persistent",
        network,
        net.is_persistent(),
    )?;
    let mut targets = Vec::new();
    if active {
        let xml = read("read its live XML", network, net.xml_desc(0))?;
        targets.push((sys::VIR_NETWORK_UPDATE_AFFECT_LIVE, dhcp_hosts(&xml)));
    }
    if persistent {
        // The test driver rejects the INACTIVE flag; its live and persistent
        // definitions are the same, so the plain XML stands in.
        let xml = match net.xml_desc(sys::VIR_NETWORK_XML_INACTIVE) {
            Ok(xml) => xml,
            Err(_) => read("read its XML", network, net.xml_desc(0))?,
        };
        targets.push((sys::VIR_NETWORK_UPDATE_AFFECT_CONFIG, dhcp_hosts(&xml)));
    }
    Ok(targets)
}

fn lookup_network(conn: &Connect, network: &str) -> Result<Network, DhcpError> {
    conn.lookup_network_by_name(network).map_err(|error| {
        match has_code(&error, sys::VIR_ERR_NO_NETWORK) {
            true => DhcpError::NoNetwork {
                network: network.into(),
            },
            false => libvirt_error("look up the network", network, error),
        }
    })
}

/// Only libvirt's test driver may lack network filters without that being
/// a problem: a guest on a real host must not go unfiltered.
fn filters_optional(uri: &str) -> bool {
    uri.starts_with("test:")
}

fn has_code(error: &virt::error::Error, code: sys::virErrorNumber) -> bool {
    error.code().to_raw() == code
}

fn libvirt_error(action: &'static str, network: &str, error: virt::error::Error) -> DhcpError {
    DhcpError::Libvirt {
        action,
        network: network.into(),
        source: error.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn only_a_local_libvirt_with_a_dead_dnsmasq_is_respawned() {
        assert!(should_respawn("qemu:///system", || Some(false)));
        assert!(!should_respawn("qemu:///system", || Some(true)));
        assert!(!should_respawn("qemu:///system", || None));
        // A remote libvirt: the local pid file is not its network's.
        assert!(!should_respawn("qemu+ssh://host/system", || {
            panic!("the local pid file must not be read")
        }));
        assert!(has_respawn_txt(
            "<network><name>n</name><dns><txt name='nomad-driver-virt-respawn' value='1'/></dns></network>"
        ));
        assert!(!has_respawn_txt(
            "<network><name>n</name><dns><txt name='other' value='1'/></dns></network>"
        ));
    }

    #[test]
    fn only_the_test_driver_may_lack_network_filters() {
        assert!(filters_optional("test:///default"));
        assert!(!filters_optional("qemu:///system"));
        assert!(!filters_optional("qemu+ssh://host/system"));
        let conn = Connect::open(Some("test:///default")).expect("test driver");
        assert_eq!(
            nwfilter_exists(&conn, "clean-traffic").expect("answer"),
            None
        );
    }

    #[test]
    fn dhcp_servers_are_the_ip_elements_with_dhcp() {
        let xml = "<network><name>n</name>\
            <ip address='192.168.122.1' netmask='255.255.255.0'><dhcp><range start='192.168.122.2' end='192.168.122.254'/></dhcp></ip>\
            <ip address='10.9.0.1' netmask='255.255.255.0'/>\
            <ip family='ipv6' address='fd00::1' prefix='64'><dhcp/></ip></network>";
        assert_eq!(
            dhcp_servers_in_xml(xml),
            vec![Ipv4Addr::new(192, 168, 122, 1)]
        );
        assert!(dhcp_servers_in_xml("not xml").is_empty());
    }

    #[test]
    fn the_test_driver_has_no_network_filters() {
        let (_dir, conn) = private_connection();
        assert_eq!(
            nwfilter_exists(&conn, "clean-traffic").expect("no error"),
            None
        );
    }

    const MAC: &str = "52:54:00:12:34:56";

    fn reservation(mac: &str, ip: [u8; 4], hostname: Option<&str>) -> Reservation {
        Reservation {
            network: "default".into(),
            mac: mac.into(),
            ip: Ipv4Addr::from(ip),
            hostname: hostname.map(Into::into),
        }
    }

    const NODE: &str = "<node>
  <network>
<name>default</name>
<bridge name='virbr0'/>
<ip address='192.168.122.1' netmask='255.255.255.0'>
  <dhcp><range start='192.168.122.2' end='192.168.122.254'/></dhcp>
</ip>
  </network>
  <network>
<name>lab</name>
<bridge name='virbr7'/>
<ip address='10.7.0.1' netmask='255.255.255.0'>
  <dhcp><range start='10.7.0.2' end='10.7.0.254'/></dhcp>
</ip>
  </network>
</node>
";

    /// A private test-driver connection (test:///default is process-wide).
    fn private_connection() -> (tempfile::TempDir, Connect) {
        crate::libvirt::conn::init_process();
        let dir = tempfile::tempdir().expect("tempdir");
        let node = dir.path().join("node.xml");
        std::fs::write(&node, NODE).expect("write node xml");
        let uri = format!("test://{}", node.display());
        let conn = Connect::open(Some(&uri)).expect("open test driver");
        (dir, conn)
    }

    fn hosts(conn: &Connect, network: &str) -> Vec<(String, Ipv4Addr, Option<String>)> {
        let net = conn.lookup_network_by_name(network).expect("network");
        crate::libvirt::dhcp::reservations_in_xml(&net.xml_desc(0).expect("xml"))
    }

    #[test]
    fn network_by_bridge_finds_the_network() {
        let (_dir, conn) = private_connection();
        assert_eq!(network_by_bridge(&conn, "virbr7").expect("lab"), "lab");
        assert_eq!(
            network_by_bridge(&conn, "virbr0").expect("default"),
            "default"
        );
    }

    #[test]
    fn network_by_bridge_unknown_lists_known_bridges() {
        let (_dir, conn) = private_connection();
        let error = network_by_bridge(&conn, "br9").expect_err("unknown");
        assert_eq!(
            error.to_string(),
            "bridge \"br9\" is not the bridge of any libvirt network; \
             known: virbr0 (network default), virbr7 (network lab)"
        );
    }

    #[test]
    fn fingerprint_reports_state_and_bridge() {
        let (_dir, conn) = private_connection();
        assert_eq!(
            network_fingerprint(&conn),
            vec![
                ("default".into(), true, "virbr0".into()),
                ("lab".into(), true, "virbr7".into()),
            ]
        );
        conn.lookup_network_by_name("lab")
            .expect("lab")
            .destroy()
            .expect("destroy");
        assert_eq!(
            network_fingerprint(&conn)[1],
            ("lab".into(), false, "virbr7".into())
        );
    }

    #[test]
    fn leases_are_unsupported_and_waiting_stops_at_once() {
        let (_dir, conn) = private_connection();
        let error = network_leases(&conn, "default", None).expect_err("test driver has no leases");
        assert!(
            matches!(&error, DhcpError::Leases { source, .. } if source.is_unsupported()),
            "{error:?}"
        );
        assert!(error.to_string().contains("\"default\""), "{error}");
        let mut attempts = 0;
        let started = Instant::now();
        let uri = format!("test://{}", _dir.path().join("node.xml").display());
        let libvirt = Libvirt::new(uri, None);
        let result = wait_for_lease(
            &libvirt,
            "default",
            MAC,
            None,
            Duration::from_secs(30),
            &mut |n| attempts = n,
        );
        assert!(result.is_err());
        assert_eq!(attempts, 1);
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(matches!(
            network_leases(&conn, "default", Some("bogus")),
            Err(DhcpError::InvalidMac { .. })
        ));
    }

    #[test]
    fn add_and_remove_reservation_idempotently() {
        let (_dir, conn) = private_connection();
        let r = reservation(MAC, [192, 168, 122, 10], Some("web-1"));
        let entry = (
            MAC.to_string(),
            Ipv4Addr::new(192, 168, 122, 10),
            Some("web-1".to_string()),
        );
        add_reservation(&conn, &r).expect("add");
        assert_eq!(hosts(&conn, "default"), vec![entry.clone()]);
        // Again: no error, still one entry.
        add_reservation(&conn, &r).expect("add again");
        assert_eq!(hosts(&conn, "default"), vec![entry]);
        // The same MAC in other case is the same entry.
        let upper = Reservation {
            mac: MAC.to_uppercase(),
            ..r.clone()
        };
        add_reservation(&conn, &upper).expect("add upper-case MAC");
        assert_eq!(hosts(&conn, "default").len(), 1);
        assert_eq!(hosts(&conn, "lab"), vec![]);

        remove_reservation(&conn, &upper).expect("remove");
        assert_eq!(hosts(&conn, "default"), vec![]);
        remove_reservation(&conn, &r).expect("remove again");
        let missing = Reservation {
            network: "nosuch".into(),
            ..r
        };
        remove_reservation(&conn, &missing).expect("missing network is fine");
    }

    #[test]
    fn remove_ignores_the_name_and_keeps_other_entries() {
        let (_dir, conn) = private_connection();
        let mine = reservation(MAC, [192, 168, 122, 10], Some("web-1"));
        let other = reservation("52:54:00:00:00:02", [192, 168, 122, 11], None);
        add_reservation(&conn, &mine).expect("add mine");
        add_reservation(&conn, &other).expect("add other");
        // Recorded without the name (or the name changed): still removed.
        remove_reservation(
            &conn,
            &Reservation {
                hostname: None,
                ..mine
            },
        )
        .expect("remove");
        assert_eq!(
            hosts(&conn, "default"),
            vec![(
                "52:54:00:00:00:02".into(),
                Ipv4Addr::new(192, 168, 122, 11),
                None
            )]
        );
        // Same MAC, other IP: not ours, left alone.
        remove_reservation(
            &conn,
            &reservation("52:54:00:00:00:02", [192, 168, 122, 12], None),
        )
        .expect("no-op");
        assert_eq!(hosts(&conn, "default").len(), 1);
    }

    #[test]
    fn conflicting_reservations_are_clear_errors() {
        let (_dir, conn) = private_connection();
        add_reservation(&conn, &reservation(MAC, [192, 168, 122, 10], Some("web-1"))).expect("add");
        for clash in [
            reservation(MAC, [192, 168, 122, 11], Some("web-2")),
            reservation("52:54:00:00:00:02", [192, 168, 122, 10], Some("web-2")),
            reservation("52:54:00:00:00:02", [192, 168, 122, 11], Some("web-1")),
            reservation(MAC, [192, 168, 122, 10], Some("other-name")),
        ] {
            let error = add_reservation(&conn, &clash).expect_err("conflict");
            assert!(matches!(error, DhcpError::Conflict { .. }), "{error:?}");
            let message = error.to_string();
            assert!(
                message.contains(
                    "virsh net-update default delete ip-dhcp-host \
                     '<host mac=\"52:54:00:12:34:56\" name=\"web-1\" ip=\"192.168.122.10\"/>'"
                ),
                "{message}"
            );
        }
        assert_eq!(hosts(&conn, "default").len(), 1);
    }

    #[test]
    fn bad_input_is_rejected_before_libvirt() {
        let (_dir, conn) = private_connection();
        let hostile = reservation(MAC, [192, 168, 122, 10], Some("x'<&\",y"));
        assert!(matches!(
            add_reservation(&conn, &hostile),
            Err(DhcpError::InvalidHostname { .. })
        ));
        let bad_mac = reservation("52:54:00:12:34", [192, 168, 122, 10], None);
        assert!(matches!(
            add_reservation(&conn, &bad_mac),
            Err(DhcpError::InvalidMac { .. })
        ));
        assert!(matches!(
            remove_reservation(&conn, &bad_mac),
            Err(DhcpError::InvalidMac { .. })
        ));
        assert_eq!(hosts(&conn, "default"), vec![]);
        let nowhere = Reservation {
            network: "nosuch".into(),
            ..reservation(MAC, [10, 0, 0, 1], None)
        };
        let error = add_reservation(&conn, &nowhere).expect_err("no network");
        assert!(matches!(error, DhcpError::NoNetwork { .. }));
        assert!(error.to_string().contains("\"nosuch\""), "{error}");
    }

    #[test]
    fn reservation_on_an_inactive_network_goes_to_its_config() {
        let (_dir, conn) = private_connection();
        let net = conn.lookup_network_by_name("lab").expect("lab");
        net.destroy().expect("stop lab");
        let r = Reservation {
            network: "lab".into(),
            ..reservation(MAC, [10, 7, 0, 10], Some("vm"))
        };
        add_reservation(&conn, &r).expect("add to config");
        add_reservation(&conn, &r).expect("idempotent");
        net.create().expect("start lab");
        assert_eq!(
            hosts(&conn, "lab"),
            vec![(MAC.into(), Ipv4Addr::new(10, 7, 0, 10), Some("vm".into()))]
        );
        remove_reservation(&conn, &r).expect("remove");
        assert_eq!(hosts(&conn, "lab"), vec![]);
    }
}
