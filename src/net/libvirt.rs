//! The libvirt implementation of `Net`: bridge attachment to libvirt
//! networks, macvtap `direct` interfaces, DHCP lease discovery and
//! reservation, and iptables port mapping.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::config::NetworkInterface;
use super::iptables::apply::{route_localnet_fix, Iptables};
use super::iptables::rules::{task_port_rules, ForwardTarget, PortForward};
use super::{
    is_active_string, AllocatedPort, Attachment, BridgeTeardown, DriverNetwork, Net, NetError,
    NetIntent, TeardownSpec, VmStartedBuildRequest, VmStartedBuildResponse,
    VmTerminatedTeardownRequest, VmTerminatedTeardownResponse, ATTRIBUTE_PREFIX,
};
use crate::faults::crash_point;
use crate::libvirt::dhcp::{self, Reservation};
use crate::libvirt::error::with_sources;
use crate::libvirt::network as libvirt_network;
use crate::libvirt::Libvirt;
/// `Net` backed by the plugin's libvirt connection and host iptables.
pub struct LibvirtNet {
    libvirt: Libvirt,
    iptables: Iptables,
    /// DHCP reservations still being added, by task tag (see
    /// [`LibvirtNet::reserve_in_background`]); an entry leaves when its add
    /// finished or a teardown waited for it.
    pending_reservations: Arc<Mutex<HashMap<String, JoinHandle<()>>>>,
}

impl LibvirtNet {
    pub fn new(libvirt: Libvirt, iptables: Iptables) -> Self {
        Self {
            libvirt,
            iptables,
            pending_reservations: Arc::default(),
        }
    }

    /// Adds the reservation on a thread of its own, so StartTask does not
    /// wait for libvirt's live network update (about 0.4 s): the guest
    /// already holds its lease, and the reservation only keeps the address
    /// across renewals. Nothing leaks: the caller has put the reservation in
    /// the teardown spec (and the start journal has the MAC) before this
    /// runs, removal is idempotent, and a teardown of the task first waits
    /// for this add ([`LibvirtNet::wait_for_reservation`]). A failed add is
    /// logged, not fatal: the task runs with its lease, unpinned.
    fn reserve_in_background(&self, task_tag: &str, reservation: Reservation) {
        let Ok(mut pending) = self.pending_reservations.lock() else {
            // A poisoned map: add it here instead of losing track.
            self.reserve_now(task_tag, &reservation);
            return;
        };
        // One entry per interface: a task with several bridge interfaces
        // has several adds in flight.
        let key = pending_key(task_tag, &reservation.mac);
        let (libvirt, map, tag, this_key) = (
            self.libvirt.clone(),
            self.pending_reservations.clone(),
            task_tag.to_string(),
            key.clone(),
        );
        let in_thread = reservation.clone();
        // Registered under the map's lock, so the thread cannot remove its
        // entry before it exists.
        let spawned = std::thread::Builder::new()
            .name("dhcp-reserve".into())
            .spawn(move || {
                add_reservation_logged(&libvirt, &tag, &in_thread);
                if let Ok(mut pending) = map.lock() {
                    pending.remove(&this_key);
                }
            });
        match spawned {
            Ok(handle) => {
                pending.insert(key, handle);
            }
            Err(error) => {
                drop(pending);
                tracing::warn!(error = %error, "cannot start a thread for the DHCP reservation; adding it now");
                self.reserve_now(task_tag, &reservation);
            }
        }
    }

    fn reserve_now(&self, task_tag: &str, reservation: &Reservation) {
        add_reservation_logged(&self.libvirt, task_tag, reservation);
    }

    /// Waits until no reservation add of `task_tag` is in flight, so a
    /// removal that follows cannot run before the add it undoes.
    fn wait_for_reservation(&self, task_tag: &str) {
        let prefix = pending_key(task_tag, "");
        let handles: Vec<JoinHandle<()>> = match self.pending_reservations.lock() {
            Ok(mut pending) => {
                let keys: Vec<String> = pending
                    .keys()
                    .filter(|key| key.starts_with(&prefix))
                    .cloned()
                    .collect();
                keys.iter().filter_map(|key| pending.remove(key)).collect()
            }
            Err(_) => Vec::new(),
        };
        for handle in handles {
            if handle.join().is_err() {
                tracing::warn!(task_tag, "the DHCP reservation thread panicked");
            }
        }
    }
}

/// The pending-reservation key of one interface of a task; with an empty
/// `mac`, the prefix every key of the task starts with.
fn pending_key(task_tag: &str, mac: &str) -> String {
    format!("{task_tag}\u{0}{mac}")
}

fn add_reservation_logged(libvirt: &Libvirt, task_tag: &str, reservation: &Reservation) {
    let started = std::time::Instant::now();
    match libvirt.call_blocking(|conn| Ok(libvirt_network::add_reservation(conn, reservation))) {
        Ok(Ok(())) => tracing::debug!(
            task_tag,
            ip = %reservation.ip,
            took = ?started.elapsed(),
            "DHCP reservation added"
        ),
        Ok(Err(error)) => tracing::warn!(
            task_tag,
            error = %with_sources(&error),
            "cannot reserve the guest's DHCP address; the task keeps its lease, but a renewal may hand out another address"
        ),
        Err(error) => tracing::warn!(
            task_tag,
            error = %with_sources(&error),
            "cannot reserve the guest's DHCP address; the task keeps its lease, but a renewal may hand out another address"
        ),
    }
}

/// The forwards for the bridge's port labels; an unknown label is an error.
pub fn forwards_for(
    labels: &[String],
    ports: &[AllocatedPort],
) -> Result<Vec<PortForward>, NetError> {
    let mut forwards = Vec::new();
    for label in labels {
        let port = ports.iter().find(|port| &port.label == label).ok_or_else(|| {
            let known: Vec<&str> = ports.iter().map(|p| p.label.as_str()).collect();
            NetError::Invalid(format!(
                "network_interface.bridge.ports: port label {label:?} is not allocated to this task's group; \
                 add `port \"{label}\" {{ ... }}` to the group's network block (allocated: {})",
                if known.is_empty() { "none".to_string() } else { known.join(", ") }
            ))
        })?;
        let host_ip: Ipv4Addr = port.host_ip.parse().map_err(|_| {
            NetError::Invalid(format!(
                "port {label:?}: host address {:?} is not an IPv4 address",
                port.host_ip
            ))
        })?;
        if port.value == 0 {
            return Err(NetError::Invalid(format!(
                "port {label:?} has no host port allocated"
            )));
        }
        forwards.push(PortForward {
            label: label.clone(),
            host_ip,
            host_port: port.value,
            guest_port: if port.to == 0 { port.value } else { port.to },
        });
    }
    Ok(forwards)
}

impl Net for LibvirtNet {
    fn init(&self) -> Result<(), NetError> {
        self.iptables.init()?;
        // A plugin that died mid-respawn left its TXT record in a network.
        if let Err(error) = self
            .libvirt
            .call_blocking(|conn| Ok(libvirt_network::remove_respawn_records(conn)))
        {
            tracing::warn!(error = %error, "cannot look for leftover respawn records");
        }
        Ok(())
    }

    fn fingerprint(&self) -> BTreeMap<String, String> {
        let mut attributes = BTreeMap::new();
        match self
            .libvirt
            .call_blocking(|conn| Ok(libvirt_network::network_fingerprint(conn)))
        {
            Ok(networks) => {
                for (name, active, bridge) in networks {
                    attributes.insert(
                        format!("{ATTRIBUTE_PREFIX}{name}.state"),
                        is_active_string(active).to_string(),
                    );
                    attributes.insert(format!("{ATTRIBUTE_PREFIX}{name}.bridge_name"), bridge);
                }
            }
            Err(error) => tracing::warn!(error = %error, "network fingerprint failed"),
        }
        attributes
    }

    fn attachments(
        &self,
        net_config: &[NetworkInterface],
        ports: &[AllocatedPort],
        hwaddrs: &[String],
    ) -> Result<Vec<Attachment>, NetError> {
        let mut attachments = Vec::new();
        for (index, interface) in net_config.iter().enumerate() {
            let mac = hwaddrs
                .get(index)
                .cloned()
                .ok_or_else(|| NetError::Invalid("missing MAC address".into()))?;
            match interface {
                NetworkInterface::Bridge(bridge) => {
                    let name = bridge.name.as_str().to_string();
                    let found = self.libvirt.call_blocking(move |conn| {
                        Ok(
                            libvirt_network::network_by_bridge(conn, &name).and_then(|network| {
                                let servers = libvirt_network::dhcp_servers(conn, &network)?;
                                Ok((network, servers))
                            }),
                        )
                    })?;
                    let (network, dhcp_servers) = found.map_err(|e| {
                        NetError::Invalid(format!("network_interface[{index}].bridge.name: {e}"))
                    })?;
                    let labels: Vec<String> = bridge
                        .ports
                        .iter()
                        .map(|label| label.as_str().to_string())
                        .collect();
                    let forwards = forwards_for(&labels, ports)?;
                    if forwards.iter().any(|f| f.host_ip.is_loopback())
                        && !self.iptables.route_localnet_enabled(bridge.name.as_str())
                    {
                        return Err(NetError::Invalid(format!(
                        "ports on 127.0.0.1 need route_localnet on {}: run `{}` (and persist it in /etc/sysctl.d)",
                        bridge.name,
                        route_localnet_fix(bridge.name.as_str())
                    )));
                    }
                    attachments.push(Attachment::Network {
                        network,
                        bridge: bridge.name.as_str().to_string(),
                        mac,
                        dhcp_servers,
                    });
                }
                NetworkInterface::Macvtap(macvtap) => {
                    let mode = macvtap.mode;
                    attachments.push(Attachment::Direct {
                        device: macvtap.device.as_str().to_string(),
                        mode: mode.as_str().to_string(),
                        mac,
                    });
                }
            }
        }
        Ok(attachments)
    }

    fn vm_started_build(
        &self,
        request: &VmStartedBuildRequest,
        progress: &(dyn Fn(&str) + Sync),
    ) -> Result<VmStartedBuildResponse, NetError> {
        let mut spec = TeardownSpec {
            task_tag: request.task_tag.clone(),
            ..TeardownSpec::default()
        };
        // Every bridge interface in order: each gets its lease reserved,
        // then the ports every block lists are forwarded to that
        // interface's address in one batch (the task's chains hold them
        // all). The first one's address is the one Nomad gets. Macvtap
        // interfaces have no host-side lease.
        let built = self.build_bridges(request, &mut spec, progress);
        match built {
            Ok(driver_network) => Ok(VmStartedBuildResponse {
                driver_network,
                teardown_spec: spec,
            }),
            Err(error) => {
                // Undo whatever part was built before reporting: the
                // reservations recorded so far and any rules of the tag.
                if let Err(teardown_error) = self.teardown(&spec) {
                    tracing::warn!(error = %teardown_error, "cleanup after a failed network build failed");
                }
                Err(error)
            }
        }
    }

    fn vm_terminated_teardown(
        &self,
        request: &VmTerminatedTeardownRequest,
    ) -> Result<VmTerminatedTeardownResponse, NetError> {
        self.teardown(&request.teardown_spec)?;
        Ok(VmTerminatedTeardownResponse {})
    }

    fn remove_unfinished(&self, intent: &NetIntent) -> Result<(), NetError> {
        self.wait_for_reservation(&intent.task_tag);
        let mut failures = Vec::new();
        if !intent.task_tag.is_empty() {
            if let Err(error) = self.iptables.remove_tag(&intent.task_tag) {
                failures.push(error.to_string());
            }
        }
        for (bridge, mac) in &intent.interfaces {
            let found = self.libvirt.call_blocking(|conn| {
                // No such network any more: nothing of ours is in it.
                let Ok(network) = libvirt_network::network_by_bridge(conn, bridge) else {
                    return Ok(Ok((None, Vec::new(), Vec::new())));
                };
                let reserved = match libvirt_network::reserved_ips(conn, &network, mac) {
                    Ok(reserved) => reserved,
                    Err(error) => return Ok(Err(error)),
                };
                let leased = libvirt_network::network_leases(conn, &network, Some(mac))
                    .map(|leases| leases.into_iter().map(|lease| lease.ip).collect())
                    .unwrap_or_default();
                Ok(Ok((Some(network), reserved, leased)))
            });
            let (network, reserved, leased) = match found {
                Ok(Ok(found)) => found,
                Ok(Err(error)) => {
                    failures.push(error.to_string());
                    continue;
                }
                Err(error) => {
                    failures.push(error.to_string());
                    continue;
                }
            };
            let Some(network) = network else { continue };
            for ip in reserved {
                let reservation = Reservation {
                    network: network.clone(),
                    mac: mac.clone(),
                    ip,
                    hostname: None,
                };
                match self.libvirt.call_blocking(|conn| {
                    Ok(libvirt_network::remove_reservation(conn, &reservation))
                }) {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => failures.push(error.to_string()),
                    Err(error) => failures.push(error.to_string()),
                }
            }
            for ip in leased {
                if let Err(error) = dhcp::release_lease(bridge, ip, mac) {
                    tracing::debug!(error = %error, "DHCP release failed (best effort)");
                }
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(NetError::Teardown(failures.join("; ")))
        }
    }
}

impl LibvirtNet {
    /// Leases and reservations of every bridge interface, then the port
    /// mapping of all of them; records each step in `spec` before making
    /// it. Returns the first bridge interface's address and ports.
    fn build_bridges(
        &self,
        request: &VmStartedBuildRequest,
        spec: &mut TeardownSpec,
        progress: &(dyn Fn(&str) + Sync),
    ) -> Result<Option<DriverNetwork>, NetError> {
        // (guest address, bridge, forwards) per bridge interface, in order.
        let mut leased: Vec<(Ipv4Addr, String, Vec<PortForward>)> = Vec::new();
        for (index, interface) in request.net_config.iter().enumerate() {
            let Some(bridge) = interface.bridge() else {
                continue;
            };
            let mac = request
                .hwaddrs
                .get(index)
                .ok_or_else(|| NetError::Invalid("missing MAC address".into()))?;
            let labels: Vec<String> = bridge
                .ports
                .iter()
                .map(|label| label.as_str().to_string())
                .collect();
            let forwards = forwards_for(&labels, &request.resources)?;
            let ip = self.lease_and_reserve(request, bridge.name.as_str(), mac, spec, progress)?;
            leased.push((ip, bridge.name.as_str().to_string(), forwards));
        }
        let targets: Vec<ForwardTarget<'_>> = leased
            .iter()
            .map(|(guest_ip, bridge, forwards)| ForwardTarget {
                guest_ip: *guest_ip,
                bridge,
                forwards,
            })
            .collect();
        let rules = task_port_rules(&request.task_tag, &targets)
            .map_err(|e| NetError::Invalid(e.to_string()))?;
        spec.iptables_rules.extend(rules.iter().cloned());
        if !rules.is_empty() {
            // Idempotent; covers clients that never call Driver.Init.
            self.iptables.init()?;
            self.iptables.apply(&rules)?;
        }
        Ok(leased
            .into_iter()
            .next()
            .map(|(ip, _, forwards)| DriverNetwork {
                ip,
                port_map: forwards
                    .iter()
                    .map(|f| (f.label.clone(), f.guest_port))
                    .collect(),
            }))
    }

    /// Waits for the lease of the interface with `mac` on `bridge`'s
    /// network, records its reservation in `spec` and adds it (in the
    /// background). Returns the guest's address on that interface.
    fn lease_and_reserve(
        &self,
        request: &VmStartedBuildRequest,
        bridge: &str,
        mac: &str,
        spec: &mut TeardownSpec,
        progress: &(dyn Fn(&str) + Sync),
    ) -> Result<Ipv4Addr, NetError> {
        let timeout = request.dhcp_timeout;
        let network_name = self
            .libvirt
            .call_blocking(|conn| Ok(libvirt_network::network_by_bridge(conn, bridge)))??;
        progress(&format!(
            "Waiting for a DHCP lease for {mac} on network {network_name}"
        ));
        let lease = libvirt_network::wait_for_lease(
            &self.libvirt,
            &network_name,
            mac,
            Some(&request.hostname),
            timeout,
            &mut |attempt| {
                // Test hook: the guest is booting and we are waiting.
                if attempt == 1 {
                    crash_point("start:lease-wait");
                }
            },
        )?;
        progress(&format!("Guest IP {}", lease.ip));
        let reservation = Reservation {
            network: network_name.clone(),
            mac: mac.to_string(),
            ip: lease.ip,
            // No name: libvirt refuses two host entries with one name, and
            // several allocations of a job may share a hostname.
            hostname: None,
        };
        // Record before create: teardown removes it even if adding half-failed
        // or has not happened yet. The first bridge keeps the fields older
        // handles have.
        if spec.dhcp_reservation.is_none() {
            spec.network = Some(network_name);
            spec.bridge = Some(bridge.to_string());
            spec.dhcp_reservation = Some(reservation.clone());
        } else {
            spec.more_bridges.push(BridgeTeardown {
                network: network_name,
                bridge: bridge.to_string(),
                dhcp_reservation: reservation.clone(),
            });
        }
        self.reserve_in_background(&request.task_tag, reservation);
        Ok(lease.ip)
    }

    /// Removes a reservation and releases its lease (best effort).
    fn release(&self, reservation: &Reservation, bridge: Option<&str>, failures: &mut Vec<String>) {
        match self
            .libvirt
            .call_blocking(|conn| Ok(libvirt_network::remove_reservation(conn, reservation)))
        {
            Ok(Ok(())) => {}
            Ok(Err(error)) => failures.push(with_sources(&error)),
            Err(error) => failures.push(with_sources(&error)),
        }
        if let Some(bridge) = bridge {
            if let Err(error) = dhcp::release_lease(bridge, reservation.ip, &reservation.mac) {
                tracing::debug!(error = %error, "DHCP release failed (best effort)");
            }
        }
    }

    fn teardown(&self, spec: &TeardownSpec) -> Result<(), NetError> {
        self.wait_for_reservation(&spec.task_tag);
        let mut failures = Vec::new();
        if !spec.task_tag.is_empty() {
            if let Err(error) = self.iptables.remove_tag(&spec.task_tag) {
                failures.push(with_sources(&error));
            }
        }
        // Untagged rules (the Go driver's) go by exact match.
        if !spec.legacy_iptables_rules.is_empty() {
            if let Err(error) = self.iptables.remove_rules(&spec.legacy_iptables_rules) {
                failures.push(error.to_string());
            }
        }
        if let Some(reservation) = &spec.dhcp_reservation {
            // Adopted Go handles name only the network: find its bridge.
            let bridge = spec.bridge.clone().or_else(|| {
                let networks = self
                    .libvirt
                    .call_blocking(|conn| Ok(libvirt_network::network_fingerprint(conn)))
                    .ok()?;
                networks
                    .into_iter()
                    .find(|(name, _, _)| *name == reservation.network)
                    .map(|(_, _, bridge)| bridge)
            });
            self.release(reservation, bridge.as_deref(), &mut failures);
        }
        for more in &spec.more_bridges {
            self.release(&more.dhcp_reservation, Some(&more.bridge), &mut failures);
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(NetError::Teardown(failures.join("; ")))
        }
    }
}
