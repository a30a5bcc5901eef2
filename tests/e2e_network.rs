//! End to end networking on real libvirtd + dnsmasq + a TCG guest: bridge
//! attachment, DHCP lease and reservation, port mapping from a network
//! namespace client and on 127.0.0.1, teardown after a plugin crash and
//! recovery; a macvtap interface on a dummy device; and several interfaces
//! on one task (bridge, macvtap, bridge), including a second bridge
//! interface that never gets a lease.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use common::vm::{self, Alloc};
use nomad_driver_virt::pb::hashicorp::nomad::plugins::drivers::proto::{
    DestroyTaskRequest, InspectTaskRequest, PortMapping, RecoverTaskRequest, TaskEventsRequest,
};

fn run(args: &[&str]) -> std::process::Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn must(args: &[&str]) -> String {
    let output = run(args);
    assert!(
        output.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).to_string()
}

/// A network namespace "client host" joined to this host by a veth pair.
struct ClientNamespace {
    name: String,
    host_ip: String,
}

impl ClientNamespace {
    fn new() -> Self {
        let id = vm::short_id();
        let name = format!("ndvtest-ns-{}", &id[..6]);
        let host_if = format!("ndvtest-h{}", &id[..5]);
        let client_if = format!("ndvtest-c{}", &id[..5]);
        let octet = 16 + (u8::from_str_radix(&id[6..8], 16).unwrap_or(0) % 200);
        let (host_ip, client_ip) = (format!("10.251.{octet}.1"), format!("10.251.{octet}.2"));
        must(&["ip", "netns", "add", &name]);
        let namespace = ClientNamespace {
            name: name.clone(),
            host_ip: host_ip.clone(),
        };
        must(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", &client_if,
        ]);
        must(&["ip", "link", "set", &client_if, "netns", &name]);
        must(&[
            "ip",
            "addr",
            "add",
            &format!("{host_ip}/30"),
            "dev",
            &host_if,
        ]);
        must(&["ip", "link", "set", &host_if, "up"]);
        must(&[
            "ip",
            "netns",
            "exec",
            &name,
            "ip",
            "addr",
            "add",
            &format!("{client_ip}/30"),
            "dev",
            &client_if,
        ]);
        must(&[
            "ip", "netns", "exec", &name, "ip", "link", "set", &client_if, "up",
        ]);
        must(&[
            "ip", "netns", "exec", &name, "ip", "link", "set", "lo", "up",
        ]);
        namespace
    }

    fn curl(&self, url: &str) -> Option<String> {
        let output = run(&[
            "ip",
            "netns",
            "exec",
            &self.name,
            "curl",
            "-sS",
            "--max-time",
            "5",
            url,
        ]);
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).to_string())
    }
}

impl Drop for ClientNamespace {
    fn drop(&mut self) {
        // Deleting the namespace removes the veth pair with it.
        let _ = run(&["ip", "netns", "del", &self.name]);
    }
}

/// Sets route_localnet on a device and restores the old value on drop.
struct RouteLocalnet {
    path: String,
    old: String,
}

impl RouteLocalnet {
    fn set(device: &str, value: &str) -> Self {
        let path = format!("/proc/sys/net/ipv4/conf/{device}/route_localnet");
        let old = std::fs::read_to_string(&path)
            .expect("read route_localnet")
            .trim()
            .to_string();
        std::fs::write(&path, value).expect("write route_localnet");
        RouteLocalnet { path, old }
    }
}

impl Drop for RouteLocalnet {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.path, &self.old);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn curl_host(url: &str) -> Option<String> {
    let output = run(&["curl", "-sS", "--max-time", "5", url]);
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).to_string())
}

fn retry<T>(limit: Duration, mut attempt: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(value) = attempt() {
            return Some(value);
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_ports_reach_the_guest_and_teardown_survives_a_plugin_crash() {
    if !common::host_ready(common::host::VM) {
        return;
    }
    let client = ClientNamespace::new();
    let alloc = Alloc::new("net");
    let plugin = common::launch().await;
    plugin
        .set_config_hcl(&alloc.plugin_config(), None)
        .await
        .expect("set config");
    let (http_port, local_port) = (free_port(), free_port());
    let body = "hostname = \"ndvtest-net1\"\ndisk {\n  chained = true\n  source {\n    image = \"guest.qcow2\"\n  }\n}\nnetwork_interface {\n  bridge {\n    name  = \"virbr0\"\n    ports = [\"http\", \"local\"]\n  }\n}\n";
    let msgpack = plugin
        .encode_task_config(body, &HashMap::new())
        .await
        .expect("encode");
    let mut task = alloc.task_config(msgpack, 256);
    if let Some(resources) = task.resources.as_mut() {
        resources.ports = vec![
            PortMapping {
                label: "http".into(),
                value: i32::from(http_port),
                to: 8080,
                host_ip: client.host_ip.clone(),
            },
            PortMapping {
                label: "local".into(),
                value: i32::from(local_port),
                to: 8080,
                host_ip: "127.0.0.1".into(),
            },
        ];
    }
    let domain = vm::domain_name_of(&task);
    let tag = nomad_driver_virt::net::iptables::task_tag(&task.id);
    let mac = nomad_driver_virt::net::mac_for(&task.id, 0);

    // Loopback forwarding needs route_localnet: refused with the fix first.
    let guard = RouteLocalnet::set("virbr0", "0");
    let status = vm::start(&plugin, task.clone())
        .await
        .expect_err("loopback without route_localnet");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status
            .message()
            .contains("sysctl -w net.ipv4.conf.virbr0.route_localnet=1"),
        "{}",
        status.message()
    );
    assert!(!vm::domain_exists(&domain), "refused start left a domain");
    drop(guard);
    // Then on, as the error said (restored at the end: a fresh host has 0).
    let _route_localnet = RouteLocalnet::set("virbr0", "1");

    let mut events = plugin
        .driver()
        .task_events(TaskEventsRequest {})
        .await
        .expect("events")
        .into_inner();
    let started = vm::start(&plugin, task.clone()).await.expect("StartTask");
    let handle = started.handle.expect("handle");
    let network = started
        .network_override
        .expect("guest address for address_mode = driver");
    assert!(network.addr.starts_with("192.168.122."), "{network:?}");
    assert!(
        !network.auto_advertise,
        "the guest IP is not auto-advertised"
    );
    assert_eq!(network.port_map.get("http"), Some(&8080));
    let mut messages = Vec::new();
    while let Ok(Some(Ok(Some(event)))) =
        tokio::time::timeout(Duration::from_millis(200), events.message())
            .await
            .map(Some)
    {
        messages.push(event.message);
    }
    assert!(
        messages
            .iter()
            .any(|m| m.contains(&format!("Guest IP {}", network.addr))),
        "events: {messages:?}"
    );

    // The reservation is added after StartTask returns (off its critical path).
    let reserved = retry(Duration::from_secs(20), || {
        let dumped = must(&["virsh", "-c", "qemu:///system", "net-dumpxml", "default"]);
        (dumped.contains(&mac) && dumped.contains(&network.addr)).then_some(dumped)
    });
    assert!(reserved.is_some(), "reservation missing for {mac}");
    // The guest sits behind clean-traffic (the default), which learns its
    // address from the network's DHCP server only; the lease above and
    // the port mapping below prove the filter lets DHCP and traffic through.
    let xml = must(&["virsh", "-c", "qemu:///system", "dumpxml", &domain]);
    for part in [
        "<filterref filter='clean-traffic'>",
        "<parameter name='CTRL_IP_LEARNING' value='dhcp'/>",
        "<parameter name='DHCPSERVER' value='192.168.122.1'/>",
    ] {
        assert!(xml.contains(part), "{part} missing:\n{xml}");
    }
    alloc.wait_for_console("GUEST-READY", Duration::from_secs(240));

    let from_namespace = retry(Duration::from_secs(30), || {
        client.curl(&format!("http://{}:{http_port}/", client.host_ip))
    });
    let from_namespace =
        from_namespace.expect("the namespace client reaches the guest through host-ip:port");
    assert!(from_namespace.contains("ndvtest-net1"), "{from_namespace}");
    let on_loopback = retry(Duration::from_secs(30), || {
        curl_host(&format!("http://127.0.0.1:{local_port}/"))
    })
    .expect("127.0.0.1:port reaches the guest");
    assert!(on_loopback.contains("ndvtest-net1"), "{on_loopback}");
    let host_itself = retry(Duration::from_secs(30), || {
        curl_host(&format!("http://{}:{http_port}/", client.host_ip))
    })
    .expect("the host itself reaches the guest through its own address");
    assert!(host_itself.contains("ndvtest-net1"), "{host_itself}");
    let nat_rules = must(&["iptables-save", "-t", "nat"]);
    assert!(nat_rules.contains(&tag), "tagged rules installed");

    // The plugin dies; a new one recovers the task and tears it all down.
    let mut crashed = plugin;
    crashed.signal(libc::SIGKILL).expect("SIGKILL");
    crashed
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("wait")
        .expect("died");
    let plugin = common::launch().await;
    plugin
        .set_config_hcl(&alloc.plugin_config(), None)
        .await
        .expect("set config");
    plugin
        .driver()
        .recover_task(RecoverTaskRequest {
            task_id: String::new(),
            handle: Some(handle),
        })
        .await
        .expect("RecoverTask");
    plugin
        .driver()
        .destroy_task(DestroyTaskRequest {
            task_id: task.id.clone(),
            force: true,
        })
        .await
        .expect("DestroyTask");
    assert!(!vm::domain_exists(&domain));
    for table in ["nat", "filter"] {
        let rules = must(&["iptables-save", "-t", table]);
        assert!(
            !rules.contains(&tag),
            "{table} rules of the task remain:\n{rules}"
        );
    }
    let dumped = must(&["virsh", "-c", "qemu:///system", "net-dumpxml", "default"]);
    assert!(!dumped.contains(&mac), "reservation remains:\n{dumped}");
    let lease_gone = retry(Duration::from_secs(10), || {
        let leases = must(&[
            "virsh",
            "-c",
            "qemu:///system",
            "net-dhcp-leases",
            "default",
        ]);
        (!leases.contains(&mac)).then_some(())
    });
    assert!(lease_gone.is_some(), "the guest's lease was not released");
    plugin.kill().await.expect("exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn macvtap_interface_on_a_dummy_device() {
    if !common::host_ready(common::host::VM) {
        return;
    }
    // The kernels here lack the `dummy` module; one end of a veth pair the
    // test creates serves as the otherwise unused host device.
    let id = vm::short_id();
    let device = format!("ndvtest-d{}", &id[..5]);
    let peer = format!("ndvtest-p{}", &id[..5]);
    must(&[
        "ip", "link", "add", &device, "type", "veth", "peer", "name", &peer,
    ]);
    must(&["ip", "link", "set", &device, "up"]);
    struct Link(String);
    impl Drop for Link {
        fn drop(&mut self) {
            let _ = run(&["ip", "link", "del", &self.0]);
        }
    }
    let _link = Link(device.clone());

    let alloc = Alloc::new("macvtap");
    let plugin = common::launch().await;
    // Not a default-route device: the operator allows it by name.
    let config = format!(
        "{}allow_macvtap_devices = [\"{device}\"]\n",
        alloc.plugin_config()
    );
    plugin
        .set_config_hcl(&config, None)
        .await
        .expect("set config");
    // No DHCP behind the macvtap device: the guest skips its DHCP wait
    // (bootcmd), stops udhcpc and takes a static address (runcmd); its guest
    // agent reports it to the driver.
    let user_data = "#cloud-config\\nbootcmd:\\n  - echo 192.0.2.10 >/run/guest-ip\\n";
    let cmds = "cmds = [\"killall udhcpc; ifconfig eth0 192.0.2.10 netmask 255.255.255.0 up\"]";
    let body = format!(
        "user_data = \"{user_data}\"\n{cmds}\ndisk {{\n  chained = true\n  source {{\n    image = \"guest.qcow2\"\n  }}\n}}\nnetwork_interface {{\n  macvtap {{\n    device = \"{device}\"\n    mode   = \"vepa\"\n  }}\n}}\n"
    );
    let msgpack = plugin
        .encode_task_config(&body, &HashMap::new())
        .await
        .expect("encode");
    let task = alloc.task_config(msgpack, 256);
    let domain = vm::domain_name_of(&task);
    // Removes the domain if a check below panics before DestroyTask.
    struct Domain(String);
    impl Drop for Domain {
        fn drop(&mut self) {
            for action in ["destroy", "undefine"] {
                let _ = run(&["virsh", "-q", "-c", "qemu:///system", action, &self.0]);
            }
        }
    }
    let _domain_guard = Domain(domain.clone());
    let started = vm::start(&plugin, task.clone()).await.expect("StartTask");
    // macvtap takes no part in lease discovery: the address comes from the
    // guest agent, for address_mode = "driver" services and InspectTask.
    let address = started
        .network_override
        .as_ref()
        .map(|network| network.addr.clone());
    assert_eq!(
        address.as_deref(),
        Some("192.0.2.10"),
        "the guest agent's address; console:\n{}\nplugin:\n{}",
        alloc.console(),
        plugin
            .stderr_lines()
            .iter()
            .filter(|line| line.contains("agent"))
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    let inspected = plugin
        .driver()
        .inspect_task(InspectTaskRequest {
            task_id: task.id.clone(),
        })
        .await
        .expect("InspectTask")
        .into_inner();
    assert_eq!(
        inspected.network_override.map(|network| network.addr),
        Some("192.0.2.10".to_string())
    );
    let xml = must(&["virsh", "-c", "qemu:///system", "dumpxml", &domain]);
    assert!(xml.contains("<interface type='direct'>"), "{xml}");
    assert!(
        xml.contains(&format!("<source dev='{device}' mode='vepa'/>")),
        "{xml}"
    );
    alloc.wait_for_console("GUEST-BOOT", Duration::from_secs(240));
    plugin
        .driver()
        .destroy_task(DestroyTaskRequest {
            task_id: task.id.clone(),
            force: true,
        })
        .await
        .expect("DestroyTask");
    assert!(!vm::domain_exists(&domain));
    plugin.kill().await.expect("exit");
}

/// The value after `marker` on the console line that has it.
fn console_value(console: &str, marker: &str) -> Option<String> {
    console.lines().find_map(|line| {
        line.find(marker)
            .map(|at| line[at + marker.len()..].trim().to_string())
    })
}

/// The address `virsh net-dhcp-leases` shows for `mac` on `network`.
fn leased_ip(network: &str, mac: &str) -> Option<String> {
    let leases = must(&["virsh", "-c", "qemu:///system", "net-dhcp-leases", network]);
    leases
        .lines()
        .filter(|line| line.contains(mac))
        .find_map(|line| {
            line.split_whitespace()
                .find(|word| word.contains('/') && word.contains('.'))
                .and_then(|word| word.split('/').next())
                .map(str::to_string)
        })
}

/// Three `network_interface` blocks, bridge / macvtap / bridge: the guest
/// sees three NICs in block order with the driver's MACs; each bridge
/// interface gets its own lease and reservation, and the port its block
/// lists reaches a server listening on that interface's address only;
/// Nomad gets the first bridge's address; destroy removes it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_interfaces_each_get_a_nic_a_lease_and_their_own_ports() {
    if !common::host_ready(common::host::VM) {
        return;
    }
    // The macvtap NIC's lower device: one end of a veth pair (as in
    // macvtap_interface_on_a_dummy_device), nothing behind it.
    let id = vm::short_id();
    let device = format!("ndvtest-d{}", &id[..5]);
    let peer = format!("ndvtest-p{}", &id[..5]);
    must(&[
        "ip", "link", "add", &device, "type", "veth", "peer", "name", &peer,
    ]);
    struct Link(String);
    impl Drop for Link {
        fn drop(&mut self) {
            let _ = run(&["ip", "link", "del", &self.0]);
        }
    }
    let _link = Link(device.clone());
    must(&["ip", "link", "set", &device, "up"]);
    let client = ClientNamespace::new();

    let alloc = Alloc::new("nics");
    let plugin = common::launch().await;
    let config = format!(
        "{}allow_macvtap_devices = [\"{device}\"]\n",
        alloc.plugin_config()
    );
    plugin
        .set_config_hcl(&config, None)
        .await
        .expect("set config");
    // eth1 (macvtap) has no DHCP behind it: a bootcmd marks its lease as
    // "none", so the guest does not wait for one. After the network is up
    // the guest prints its NICs, then serves a page naming each bridge
    // NIC's address on that address only (8082 on eth0, 8081 on eth2).
    let user_data = "#cloud-config\\nbootcmd:\\n  - echo none >/run/guest-ip-eth1\\n";
    let cmds = [
        "for n in /sys/class/net/eth*; do echo GUEST-NIC: $(basename $n) $(cat $n/address); done",
        "mkdir -p /www0 /www2 && echo nic0-$(cat /run/guest-ip) >/www0/index.html && echo nic2-$(cat /run/guest-ip-eth2) >/www2/index.html",
        "httpd -p $(cat /run/guest-ip):8082 -h /www0",
        "httpd -p $(cat /run/guest-ip-eth2):8081 -h /www2",
    ]
    .map(|cmd| format!("\"{cmd}\""))
    .join(", ");
    let body = format!(
        "hostname = \"ndvtest-nics\"\nuser_data = \"{user_data}\"\ncmds = [{cmds}]\ndisk {{\n  chained = true\n  source {{\n    image = \"guest.qcow2\"\n  }}\n}}\n\
         network_interface {{\n  bridge {{\n    name  = \"virbr0\"\n    ports = [\"nic0\"]\n  }}\n}}\n\
         network_interface {{\n  macvtap {{\n    device = \"{device}\"\n    mode   = \"vepa\"\n  }}\n}}\n\
         network_interface {{\n  bridge {{\n    name  = \"virbr0\"\n    ports = [\"nic2\"]\n  }}\n}}\n"
    );
    let msgpack = plugin
        .encode_task_config(&body, &HashMap::new())
        .await
        .expect("encode");
    let mut task = alloc.task_config(msgpack, 256);
    let (port0, port2) = (free_port(), free_port());
    if let Some(resources) = task.resources.as_mut() {
        resources.ports = vec![
            PortMapping {
                label: "nic0".into(),
                value: i32::from(port0),
                to: 8082,
                host_ip: client.host_ip.clone(),
            },
            PortMapping {
                label: "nic2".into(),
                value: i32::from(port2),
                to: 8081,
                host_ip: client.host_ip.clone(),
            },
        ];
    }
    let domain = vm::domain_name_of(&task);
    // Removes the domain if a check below panics before DestroyTask.
    struct Domain(String);
    impl Drop for Domain {
        fn drop(&mut self) {
            for action in ["destroy", "undefine"] {
                let _ = run(&["virsh", "-q", "-c", "qemu:///system", action, &self.0]);
            }
        }
    }
    let _domain_guard = Domain(domain.clone());
    let tag = nomad_driver_virt::net::iptables::task_tag(&task.id);
    let macs: Vec<String> = (0..3)
        .map(|index| nomad_driver_virt::net::mac_for(&task.id, index))
        .collect();

    let started = vm::start(&plugin, task.clone()).await.expect("StartTask");

    // The domain has the three NICs in block order, with the driver's MACs.
    let xml = must(&["virsh", "-c", "qemu:///system", "dumpxml", &domain]);
    let in_xml: Vec<&str> = xml
        .match_indices("<mac address='")
        .map(|(at, marker)| &xml[at + marker.len()..at + marker.len() + 17])
        .collect();
    assert_eq!(in_xml, macs, "{xml}");
    let kinds: Vec<&str> = xml
        .match_indices("<interface type='")
        .map(|(at, marker)| {
            let rest = &xml[at + marker.len()..];
            &rest[..rest.find('\'').unwrap_or(0)]
        })
        .collect();
    assert_eq!(kinds, ["network", "direct", "network"], "{xml}");

    // The guest sees them in that order too, and got a lease on each
    // bridge NIC: the addresses on its console are the leases of their MACs.
    let console = alloc.wait_for_console("GUEST-READY", Duration::from_secs(300));
    for (index, mac) in macs.iter().enumerate() {
        assert!(
            console.contains(&format!("GUEST-NIC: eth{index} {mac}")),
            "eth{index} should have {mac}:\n{console}"
        );
    }
    let ip0 = console_value(&console, "GUEST-IP: ").expect("GUEST-IP line");
    let ip2 = console_value(&console, "GUEST-IP-eth2: ").expect("GUEST-IP-eth2 line");
    assert_eq!(
        console_value(&console, "GUEST-IP-eth1: ").as_deref(),
        Some("none"),
        "{console}"
    );
    assert!(ip0.starts_with("192.168.122."), "{console}");
    assert!(ip2.starts_with("192.168.122."), "{console}");
    assert_ne!(ip0, ip2);
    assert_eq!(
        leased_ip("default", &macs[0]).as_deref(),
        Some(ip0.as_str())
    );
    assert_eq!(
        leased_ip("default", &macs[2]).as_deref(),
        Some(ip2.as_str())
    );
    assert_eq!(leased_ip("default", &macs[1]), None, "macvtap has no lease");

    // Nomad gets the first bridge interface's address and its ports.
    let network = started.network_override.expect("driver network");
    assert_eq!(network.addr, ip0);
    assert_eq!(network.port_map.get("nic0"), Some(&8082));
    assert_eq!(network.port_map.get("nic2"), None, "{network:?}");

    // Both addresses are reserved while the task runs (added in the
    // background after StartTask).
    let reserved = retry(Duration::from_secs(20), || {
        let dumped = must(&["virsh", "-c", "qemu:///system", "net-dumpxml", "default"]);
        [(&macs[0], &ip0), (&macs[2], &ip2)]
            .iter()
            .all(|(mac, ip)| dumped.contains(&format!("<host mac='{mac}' ip='{ip}'/>")))
            .then_some(())
    });
    assert!(
        reserved.is_some(),
        "reservations missing:\n{}",
        must(&["virsh", "-c", "qemu:///system", "net-dumpxml", "default"])
    );

    // Each port reaches the server on its own interface's address.
    let through0 = retry(Duration::from_secs(30), || {
        client.curl(&format!("http://{}:{port0}/", client.host_ip))
    })
    .unwrap_or_else(|| {
        panic!(
            "port nic0 does not reach {ip0}:8082; rules:\n{}",
            must(&["iptables-save", "-t", "nat"])
        )
    });
    assert_eq!(through0.trim(), format!("nic0-{ip0}"));
    let through2 = retry(Duration::from_secs(30), || {
        client.curl(&format!("http://{}:{port2}/", client.host_ip))
    })
    .unwrap_or_else(|| {
        panic!(
            "port nic2 does not reach {ip2}:8081; rules:\n{}",
            must(&["iptables-save", "-t", "nat"])
        )
    });
    assert_eq!(through2.trim(), format!("nic2-{ip2}"));
    let nat = must(&["iptables-save", "-t", "nat"]);
    assert!(
        nat.contains(&format!("--to-destination {ip0}:8082")),
        "{nat}"
    );
    assert!(
        nat.contains(&format!("--to-destination {ip2}:8081")),
        "{nat}"
    );
    let of_task = || -> Vec<String> {
        vm::pool_volumes(&alloc.pool_name)
            .into_iter()
            .filter(|volume| volume.contains(&domain))
            .collect()
    };
    assert!(!of_task().is_empty(), "the task's disk and seed volumes");

    plugin
        .driver()
        .destroy_task(DestroyTaskRequest {
            task_id: task.id.clone(),
            force: true,
        })
        .await
        .expect("DestroyTask");
    assert!(!vm::domain_exists(&domain));
    // (The chained disk's base image stays: it is the pool's cache.)
    assert_eq!(of_task(), Vec::<String>::new(), "volumes left behind");
    for table in ["nat", "filter"] {
        let rules = must(&["iptables-save", "-t", table]);
        assert!(
            !rules.contains(&tag),
            "{table} rules of the task remain:\n{rules}"
        );
    }
    let dumped = must(&["virsh", "-c", "qemu:///system", "net-dumpxml", "default"]);
    for mac in &macs {
        assert!(
            !dumped.contains(mac.as_str()),
            "reservation remains:\n{dumped}"
        );
    }
    let leases_gone = retry(Duration::from_secs(10), || {
        (leased_ip("default", &macs[0]).is_none() && leased_ip("default", &macs[2]).is_none())
            .then_some(())
    });
    assert!(leases_gone.is_some(), "a lease was not released");
    plugin.kill().await.expect("exit");
}

/// Two bridge interfaces whose second never gets a lease (the guest renames
/// its NIC before DHCP starts): the start fails at `dhcp_timeout`, and the
/// first interface's reservation, which was in place while the second
/// wait ran, goes with the domain, the volumes and the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_interface_without_a_lease_fails_the_start_and_leaves_nothing() {
    if !common::host_ready(common::host::VM) {
        return;
    }
    let alloc = Alloc::new("nolease");
    let plugin = common::launch().await;
    let config = format!("{}dhcp_timeout = \"90s\"\n", alloc.plugin_config());
    plugin
        .set_config_hcl(&config, None)
        .await
        .expect("set config");
    let user_data = "#cloud-config\\nbootcmd:\\n  - ip link set eth1 name nodhcp1\\n";
    let body = format!(
        "user_data = \"{user_data}\"\ndisk {{\n  chained = true\n  source {{\n    image = \"guest.qcow2\"\n  }}\n}}\n\
         network_interface {{\n  bridge {{\n    name  = \"virbr0\"\n    ports = [\"web\"]\n  }}\n}}\n\
         network_interface {{\n  bridge {{\n    name = \"virbr0\"\n  }}\n}}\n"
    );
    let msgpack = plugin
        .encode_task_config(&body, &HashMap::new())
        .await
        .expect("encode");
    let mut task = alloc.task_config(msgpack, 256);
    if let Some(resources) = task.resources.as_mut() {
        resources.ports = vec![PortMapping {
            label: "web".into(),
            value: i32::from(free_port()),
            to: 8080,
            // The host's address on the bridge: no route_localnet needed
            // (other tests flip it on virbr0).
            host_ip: "192.168.122.1".into(),
        }];
    }
    let domain = vm::domain_name_of(&task);
    let tag = nomad_driver_virt::net::iptables::task_tag(&task.id);
    let macs: Vec<String> = (0..2)
        .map(|index| nomad_driver_virt::net::mac_for(&task.id, index))
        .collect();
    // Watches the network for the first interface's reservation while
    // the start runs.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (done, mac) = (done.clone(), macs[0].clone());
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let dumped = must(&["virsh", "-c", "qemu:///system", "net-dumpxml", "default"]);
                if dumped.contains(&format!("<host mac='{mac}'")) {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            false
        })
    };
    let status = vm::start(&plugin, task.clone())
        .await
        .expect_err("the second interface gets no lease");
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let was_reserved = watcher.join().expect("watcher");
    assert!(
        status.message().contains(&macs[1]),
        "the error names the MAC without a lease: {status:?}"
    );
    assert!(
        was_reserved,
        "the first interface's reservation was in place during the second wait"
    );
    assert!(!vm::domain_exists(&domain), "the domain was rolled back");
    let left: Vec<String> = vm::pool_volumes(&alloc.pool_name)
        .into_iter()
        .filter(|volume| volume.contains(&domain))
        .collect();
    assert!(left.is_empty(), "volumes left behind: {left:?}");
    let dumped = must(&["virsh", "-c", "qemu:///system", "net-dumpxml", "default"]);
    for mac in &macs {
        assert!(
            !dumped.contains(mac.as_str()),
            "reservation remains:\n{dumped}"
        );
    }
    for table in ["nat", "filter"] {
        let rules = must(&["iptables-save", "-t", table]);
        assert!(!rules.contains(&tag), "{table} rules remain:\n{rules}");
    }
    let lease_gone = retry(Duration::from_secs(10), || {
        leased_ip("default", &macs[0]).is_none().then_some(())
    });
    assert!(lease_gone.is_some(), "the first interface's lease remains");
    plugin.kill().await.expect("exit");
}
