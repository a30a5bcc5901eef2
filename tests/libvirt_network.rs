//! DHCP leases and reservations against the real libvirtd (qemu:///system,
//! network "default"), and `dhcp_release`. Needs root, libvirtd with the
//! default network and dnsmasq-utils (tests/setup/host.sh); the tests fail,
//! not skip, when those are missing: CI must provide them.

mod common;

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nomad_driver_virt::libvirt::conn::init_process;
use nomad_driver_virt::libvirt::dhcp::{
    release_lease, reservation_xml, reservations_in_xml, validate_mac, DhcpError, Reservation,
};
use nomad_driver_virt::libvirt::network::{
    add_reservation, dhcp_servers, has_respawn_txt, network_by_bridge, network_fingerprint,
    network_leases, nwfilter_exists, remove_reservation, remove_respawn_records, wait_for_lease,
    RESPAWN_TXT,
};
use virt::connect::Connect;
use virt::network::Network;

const MAC: &str = "52:54:00:12:34:56";

const URI: &str = "qemu:///system";

fn system() -> Connect {
    init_process();
    Connect::open(Some(URI)).unwrap_or_else(|error| {
        panic!(
            "cannot reach libvirtd at {URI} ({}); run tests/setup/host.sh as root \
             to install and start it (it also defines and starts network \"default\")",
            error.message()
        )
    })
}

fn default_network(conn: &Connect) -> Network {
    conn.lookup_network_by_name("default")
        .unwrap_or_else(|error| {
            panic!(
                "libvirt network \"default\" is missing ({}); run tests/setup/host.sh as root",
                error.message()
            )
        })
}

fn virsh_hosts(inactive: bool) -> Vec<(String, Ipv4Addr, Option<String>)> {
    let mut command = Command::new("virsh");
    command.args(["-c", URI, "net-dumpxml", "default"]);
    if inactive {
        command.arg("--inactive");
    }
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run virsh: {e}; run tests/setup/host.sh"));
    assert!(
        output.status.success(),
        "virsh net-dumpxml: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    reservations_in_xml(&String::from_utf8_lossy(&output.stdout))
}

/// A made-up MAC (52:54:00 prefix) unlikely to collide across runs.
fn made_up_mac() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mix = nanos ^ (std::process::id() << 12);
    format!(
        "52:54:00:{:02x}:{:02x}:{:02x}",
        0xd0 | (mix >> 16) as u8 & 0x0f,
        (mix >> 8) as u8,
        mix as u8
    )
}

/// Removes the reservation whatever the test did.
struct ReservationGuard {
    conn: Connect,
    reservation: Reservation,
}

impl Drop for ReservationGuard {
    fn drop(&mut self) {
        if let Err(error) = remove_reservation(&self.conn, &self.reservation) {
            eprintln!(
                "cleanup failed; remove it by hand with virsh net-update default delete \
                 ip-dhcp-host '{}' --live --config: {error}",
                reservation_xml(&self.reservation)
            );
        }
    }
}

#[test]
fn leases_of_default_read_cleanly() {
    if !common::host_ready(&[common::Need::Root, common::Need::Libvirtd]) {
        return;
    }
    let conn = system();
    default_network(&conn);
    let all = network_leases(&conn, "default", None).expect("leases of default");
    for lease in &all {
        assert!(validate_mac(&lease.mac).is_ok(), "{lease:?}");
        assert_eq!(lease.iface, "virbr0", "{lease:?}");
    }
    // Many rounds: any leak would show under valgrind (see the report).
    for _ in 0..20 {
        network_leases(&conn, "default", None).expect("leases again");
    }
    let none = network_leases(&conn, "default", Some(&made_up_mac())).expect("filtered");
    assert_eq!(none, vec![]);
    if let Some(first) = all.first() {
        let mine =
            network_leases(&conn, "default", Some(&first.mac.to_uppercase())).expect("by MAC");
        assert!(
            mine.iter().all(|l| l.mac.eq_ignore_ascii_case(&first.mac)),
            "{mine:?}"
        );
        assert!(!mine.is_empty());
    }
}

#[test]
fn default_is_found_by_its_bridge_and_fingerprinted() {
    if !common::host_ready(&[common::Need::Root, common::Need::Libvirtd]) {
        return;
    }
    let conn = system();
    let net = network_by_bridge(&conn, "virbr0").expect("virbr0");
    assert_eq!(net, "default");
    let fingerprint = network_fingerprint(&conn);
    assert!(
        fingerprint.contains(&("default".into(), true, "virbr0".into())),
        "{fingerprint:?}"
    );
    let error = network_by_bridge(&conn, "ndvnosuch0").expect_err("unknown");
    assert!(
        error.to_string().contains("virbr0 (network default)"),
        "{error}"
    );
}

#[test]
fn waiting_for_a_made_up_mac_times_out_clearly() {
    if !common::host_ready(&[common::Need::Root, common::Need::Libvirtd]) {
        return;
    }
    let conn = system();
    default_network(&conn);
    let mac = made_up_mac();
    let mut attempts = 0;
    let libvirt = nomad_driver_virt::libvirt::Libvirt::new("qemu:///system", None);
    let error = wait_for_lease(
        &libvirt,
        "default",
        &mac,
        None,
        Duration::from_millis(600),
        &mut |n| attempts = n,
    )
    .expect_err("no such lease");
    assert!(attempts >= 2, "{attempts}");
    let message = error.to_string();
    assert!(matches!(error, DhcpError::LeaseTimeout { .. }), "{error:?}");
    for part in [mac.as_str(), "\"default\"", "dhcp_timeout", "DHCP client"] {
        assert!(message.contains(part), "{part:?} missing from {message}");
    }
}

#[test]
fn reservation_round_trip_on_default() {
    if !common::host_ready(&[common::Need::Root, common::Need::Libvirtd]) {
        return;
    }
    let conn = system();
    default_network(&conn);
    let reserved: HashSet<Ipv4Addr> = virsh_hosts(false)
        .into_iter()
        .chain(virsh_hosts(true))
        .map(|(_, ip, _)| ip)
        .collect();
    let leased: HashSet<Ipv4Addr> = network_leases(&conn, "default", None)
        .expect("leases")
        .into_iter()
        .map(|l| l.ip)
        .collect();
    let ip = (200..=250u8)
        .rev()
        .map(|last| Ipv4Addr::new(192, 168, 122, last))
        .find(|ip| !reserved.contains(ip) && !leased.contains(ip))
        .expect("a free address in 192.168.122.200-250");
    let mac = made_up_mac();
    let r = Reservation {
        network: "default".into(),
        mac: mac.clone(),
        ip,
        hostname: Some(format!("ndvtest-{}", mac.replace(':', ""))),
    };
    let _guard = ReservationGuard {
        conn: system(),
        reservation: r.clone(),
    };
    let entry = (mac.clone(), ip, r.hostname.clone());

    add_reservation(&conn, &r).expect("add on default");
    assert!(
        virsh_hosts(false).contains(&entry),
        "live XML lacks {entry:?}"
    );
    assert!(
        virsh_hosts(true).contains(&entry),
        "config XML lacks {entry:?}"
    );
    add_reservation(&conn, &r).expect("idempotent add");
    let clash = Reservation {
        ip: Ipv4Addr::new(192, 168, 122, 1),
        ..r.clone()
    };
    assert!(matches!(
        add_reservation(&conn, &clash),
        Err(DhcpError::Conflict { .. })
    ));

    remove_reservation(&conn, &r).expect("remove");
    assert!(
        !virsh_hosts(false).iter().any(|(m, _, _)| *m == mac),
        "still live"
    );
    assert!(
        !virsh_hosts(true).iter().any(|(m, _, _)| *m == mac),
        "still in config"
    );
    remove_reservation(&conn, &r).expect("idempotent remove");
}

#[test]
fn release_of_a_lease_that_does_not_exist_is_ok() {
    if !common::host_ready(&[common::Need::Root, common::Need::Libvirtd]) {
        return;
    }
    // dnsmasq ignores a DHCPRELEASE for an unknown lease and
    // dhcp_release exits 0: nothing is released, nothing fails.
    release_lease("virbr0", Ipv4Addr::new(192, 168, 122, 251), &made_up_mac())
        .unwrap_or_else(|e| panic!("{e}; install dnsmasq-utils (tests/setup/host.sh)"));
}

#[test]
fn release_on_a_missing_bridge_is_an_error_naming_it() {
    if !common::host_ready(&[common::Need::Root, common::Need::Libvirtd]) {
        return;
    }
    let error = release_lease("ndvnosuch0", Ipv4Addr::new(192, 168, 122, 251), MAC)
        .expect_err("no such interface");
    assert!(
        matches!(error, DhcpError::ReleaseFailed { .. }),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains("ndvnosuch0") && message.contains("No such device"),
        "{message}"
    );
}

/// The filter guests on shared bridges get ships with libvirt, and the
/// default network's DHCP server is what it learns addresses from.
#[test]
fn clean_traffic_filter_exists_and_default_has_a_dhcp_server() {
    if !common::host_ready(&[common::Need::Root, common::Need::Libvirtd]) {
        return;
    }
    let conn = system();
    assert_eq!(
        nwfilter_exists(&conn, nomad_driver_virt::net::CLEAN_TRAFFIC_FILTER)
            .expect("list network filters"),
        Some(true),
        "libvirt's clean-traffic filter is missing: install libvirt's nwfilter driver \
         (tests/setup/host.sh)"
    );
    assert_eq!(
        nwfilter_exists(&conn, "ndvtest-no-such-filter").expect("list network filters"),
        Some(false)
    );
    let _ = default_network(&conn);
    let servers = dhcp_servers(&conn, "default").expect("default's XML");
    assert!(
        servers.contains(&Ipv4Addr::new(192, 168, 122, 1)),
        "{servers:?}"
    );
}

/// A transient network of the test's own; destroyed (and so gone) on drop.
struct TransientNetwork(Network);

impl Drop for TransientNetwork {
    fn drop(&mut self) {
        if let Err(error) = self.0.destroy() {
            eprintln!("cleanup failed; virsh net-destroy it by hand: {error}");
        }
    }
}

/// Issue 9.9: a respawn TXT record left by a plugin that died between
/// adding and deleting it is removed when the plugin starts (LibvirtNet's
/// init runs this), and only that record.
#[test]
fn a_leftover_respawn_record_is_removed_at_plugin_start() {
    if !common::host_ready(&[common::Need::Root, common::Need::Libvirtd]) {
        return;
    }
    let conn = system();
    let id = std::process::id() % 100_000;
    let name = format!("ndvtest-txt-{id}");
    let bridge = format!("ndvtxt{id}");
    let used = Command::new("ip")
        .args(["-4", "-o", "addr"])
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default();
    let mut network = None;
    let mut last = String::new();
    for octet in 160..180 {
        if used.contains(&format!("10.77.{octet}.")) {
            continue;
        }
        let xml = format!(
            "<network><name>{name}</name><bridge name='{bridge}' stp='on' delay='0'/>\
             <dns><txt name='ndvtest-keep' value='kept'/></dns>\
             <ip address='10.77.{octet}.1' netmask='255.255.255.0'/></network>"
        );
        let file = tempfile::NamedTempFile::new().expect("tempfile");
        std::fs::write(file.path(), xml).expect("network xml");
        let created = Command::new("virsh")
            .args(["-q", "-c", URI, "net-create"])
            .arg(file.path())
            .output()
            .expect("run virsh");
        if created.status.success() {
            let net = conn.lookup_network_by_name(&name).expect("the new network");
            network = Some(TransientNetwork(net));
            break;
        }
        last = String::from_utf8_lossy(&created.stderr).into_owned();
    }
    let network = network.unwrap_or_else(|| panic!("cannot create network {name}: {last}"));
    // The plugin died right after adding its record.
    network
        .0
        .update(
            virt::sys::VIR_NETWORK_UPDATE_COMMAND_ADD_LAST,
            virt::sys::VIR_NETWORK_SECTION_DNS_TXT,
            -1,
            &format!("<txt name='{RESPAWN_TXT}' value='1'/>"),
            virt::sys::VIR_NETWORK_UPDATE_AFFECT_LIVE,
        )
        .expect("plant the record");
    let xml = network.0.xml_desc(0).expect("network xml");
    assert!(has_respawn_txt(&xml), "{xml}");

    let removed = remove_respawn_records(&conn);
    assert!(removed.contains(&name), "{removed:?}");
    let xml = network.0.xml_desc(0).expect("network xml");
    assert!(!has_respawn_txt(&xml), "{xml}");
    assert!(xml.contains("ndvtest-keep"), "other records stay: {xml}");
    // Nothing left to remove: a second start finds nothing here.
    assert!(!remove_respawn_records(&conn).contains(&name));
}
