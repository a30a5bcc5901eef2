//! The iptables edge against real iptables: each test creates a network
//! namespace and runs `iptables`, `iptables-save` and `iptables-restore`
//! inside it, so these need root, iproute2 and iptables. Plain `cargo test`
//! skips them when those are missing; with NOMAD_DRIVER_VIRT_HOST_TESTS=1
//! (CI) a missing prerequisite fails. Pure parts stay unit tests in
//! src/net/iptables/.

mod common;

use std::io::Write as _;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use nomad_driver_virt::net::iptables::apply::{
    route_localnet_enabled, route_localnet_fix, Iptables, IptablesError, RestoreFailure, Rollback,
};
use nomad_driver_virt::net::iptables::rules::{
    base_chains, chain_declared, delete_lines_for_tags, parent_jump_args, parse_save,
    port_forward_rules, table_batch, task_chain, task_port_rules, task_removal_batch, task_tag,
    ForwardTarget, IptablesRule, PortForward, RuleError, CHAIN_FW, CHAIN_IN, CHAIN_OUT, CHAIN_PRT,
    CHAIN_PST, FILTER, NAT,
};

const GUEST: Ipv4Addr = Ipv4Addr::new(192, 168, 122, 10);
/// Rules `forwards()` makes: 13 in the task's chains and 5 jumps.
const FORWARDS_RULES: usize = 18;
/// Chains per task, which `remove_tag` counts.
const TASK_CHAIN_COUNT: usize = 5;

/// A network namespace deleted (with its lock file) on drop.
struct Netns {
    name: String,
    ipt: Iptables,
}

impl Netns {
    fn new() -> Netns {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "ndvtest-ipt-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .unwrap_or_else(|e| panic!("cannot run `ip netns add {name}` (iproute2?): {e}"));
        assert!(
            out.status.success(),
            "`ip netns add {name}` failed ({}): {} -- these tests need root",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let ns = Netns {
            ipt: Iptables::in_netns(&name).unwrap(),
            name,
        };
        let version = ns.exec(&["iptables", "--version"]);
        assert!(version.contains("iptables"), "{version}");
        ns
    }

    /// Runs a command in the namespace; panics on failure.
    fn exec(&self, argv: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(argv)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {argv:?}: {e}"));
        assert!(
            out.status.success(),
            "{argv:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Feeds `batch` to `iptables-restore -w --noflush` in the namespace;
    /// panics on failure.
    fn restore(&self, batch: &str) {
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.name,
                "iptables-restore",
                "-w",
                "--noflush",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run iptables-restore: {e}"));
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(batch.as_bytes())
            .expect("write the batch");
        let out = child.wait_with_output().expect("wait for iptables-restore");
        assert!(
            out.status.success(),
            "iptables-restore of\n{batch}\nfailed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `iptables-save` of all tables without the timestamp comments and
    /// with chain counters zeroed.
    fn save_all(&self) -> String {
        self.exec(&["iptables-save"])
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| match (l.starts_with(':'), l.rfind(" [")) {
                (true, Some(i)) => format!("{} [0:0]", &l[..i]),
                _ => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
        let _ = std::fs::remove_file(self.ipt.lock_path());
    }
}

fn forwards() -> Vec<PortForward> {
    vec![
        PortForward {
            label: "http".into(),
            host_ip: Ipv4Addr::new(10, 0, 0, 5),
            host_port: 8080,
            guest_port: 80,
        },
        PortForward {
            label: "ssh".into(),
            host_ip: Ipv4Addr::LOCALHOST,
            host_port: 2222,
            guest_port: 22,
        },
    ]
}

fn bad_rule(table: &str, chain: &str, args: &str) -> IptablesRule {
    IptablesRule {
        table: table.into(),
        chain: chain.into(),
        args: args.split(' ').map(String::from).collect(),
    }
}

fn assert_single_jumps(ns: &Netns) {
    for (table, chain, parent) in base_chains() {
        let save = ns.ipt.save(table).unwrap();
        assert!(chain_declared(&save, chain), "{chain} missing:\n{save}");
        let jumps = parse_save(&save)
            .into_iter()
            .filter(|r| r.chain == parent && r.args == parent_jump_args(chain))
            .count();
        assert_eq!(jumps, 1, "{parent}:\n{save}");
    }
}

#[test]
fn init_is_idempotent_and_jumps_first() {
    if !common::host_ready(common::host::NETNS_IPTABLES) {
        return;
    }
    let ns = Netns::new();
    ns.exec(&[
        "iptables", "-w", "-A", "FORWARD", "-o", "eth9", "-j", "REJECT",
    ]);
    ns.ipt.init().unwrap();
    let first = ns.save_all();
    assert_single_jumps(&ns);
    ns.ipt.init().unwrap();
    assert_eq!(ns.save_all(), first);
    assert_single_jumps(&ns);
    // Position 1: the jump precedes the rule that was there before.
    let forward: Vec<_> = parse_save(&ns.ipt.save(FILTER).unwrap())
        .into_iter()
        .filter(|r| r.chain == "FORWARD")
        .collect();
    assert_eq!(forward[0].args, ["-j", CHAIN_FW]);
    assert_eq!(forward.len(), 2);
}

#[test]
fn init_reduces_duplicate_jumps_to_one() {
    if !common::host_ready(common::host::NETNS_IPTABLES) {
        return;
    }
    let ns = Netns::new();
    ns.ipt.init().unwrap();
    ns.exec(&[
        "iptables", "-w", "-t", "nat", "-A", "OUTPUT", "-j", CHAIN_OUT,
    ]);
    ns.ipt.init().unwrap();
    assert_single_jumps(&ns);
}

#[test]
fn init_moves_our_jump_back_in_front() {
    if !common::host_ready(common::host::NETNS_IPTABLES) {
        return;
    }
    let ns = Netns::new();
    ns.ipt.init().unwrap();
    // What libvirt does when its network restarts: its own jump on top.
    ns.exec(&["iptables", "-w", "-N", "LIBVIRT_FWI"]);
    ns.exec(&["iptables", "-w", "-I", "FORWARD", "1", "-j", "LIBVIRT_FWI"]);
    ns.ipt.init().unwrap();
    assert_single_jumps(&ns);
    let forward: Vec<_> = parse_save(&ns.ipt.save(FILTER).unwrap())
        .into_iter()
        .filter(|r| r.chain == "FORWARD")
        .collect();
    assert_eq!(forward[0].args, ["-j", CHAIN_FW]);
    assert_eq!(forward[1].args, ["-j", "LIBVIRT_FWI"]);
}

#[test]
fn concurrent_init_adds_each_jump_once() {
    if !common::host_ready(common::host::NETNS_IPTABLES) {
        return;
    }
    let ns = Netns::new();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4).map(|_| scope.spawn(|| ns.ipt.init())).collect();
        for handle in handles {
            handle.join().unwrap().unwrap();
        }
    });
    assert_single_jumps(&ns);
}

#[test]
fn apply_then_remove_restores_the_ruleset_exactly() {
    if !common::host_ready(common::host::NETNS_IPTABLES) {
        return;
    }
    let ns = Netns::new();
    ns.ipt.init().unwrap();
    let before = ns.save_all();
    let tag = task_tag("alloc-1/web/abcd1234");
    let rules = port_forward_rules(&tag, GUEST, "virbr0", &forwards()).unwrap();
    ns.ipt.apply(&rules).unwrap();

    // Every rule is in place, spelled exactly as iptables-save prints it.
    let mut saved = parse_save(&ns.ipt.save(NAT).unwrap());
    saved.extend(parse_save(&ns.ipt.save(FILTER).unwrap()));
    for rule in &rules {
        assert!(
            saved
                .iter()
                .any(|s| s.chain == rule.chain && s.args == rule.args),
            "missing {rule:?}"
        );
    }
    assert_eq!(
        saved
            .iter()
            .filter(|s| s.tag.as_deref() == Some(&tag))
            .count(),
        FORWARDS_RULES
    );

    assert_eq!(ns.ipt.remove_tag(&tag).unwrap(), TASK_CHAIN_COUNT);
    assert_eq!(ns.save_all(), before);
    assert_eq!(ns.ipt.remove_tag(&tag).unwrap(), 0);
    assert_eq!(
        ns.ipt
            .remove_tag("nomad-driver-virt:never-applied")
            .unwrap(),
        0
    );
    assert_eq!(ns.save_all(), before);
}

/// A task with two bridge interfaces: the ports of both go in with one
/// batch into the task's one set of chains (a second batch for the same
/// tag is refused: `-N` finds the chains there), each to its own guest
/// address, and come out with the tag.
#[test]
fn two_interfaces_of_a_task_share_its_chains_and_one_batch() {
    if !common::host_ready(common::host::NETNS_IPTABLES) {
        return;
    }
    let ns = Netns::new();
    ns.ipt.init().unwrap();
    let before = ns.save_all();
    let tag = task_tag("alloc-2/web/abcd1234");
    let second_guest = Ipv4Addr::new(192, 168, 122, 11);
    let first = forwards();
    let second = vec![PortForward {
        label: "admin".into(),
        host_ip: Ipv4Addr::new(10, 0, 0, 5),
        host_port: 9090,
        guest_port: 9000,
    }];
    // What applying per interface did: the second batch fails.
    ns.ipt
        .apply(&port_forward_rules(&tag, GUEST, "virbr0", &first).unwrap())
        .unwrap();
    let again = ns
        .ipt
        .apply(&port_forward_rules(&tag, second_guest, "virbr0", &second).unwrap());
    assert!(again.is_err(), "a second batch of one tag must not apply");
    assert_eq!(ns.ipt.remove_tag(&tag).unwrap(), TASK_CHAIN_COUNT);
    assert_eq!(ns.save_all(), before);

    let rules = task_port_rules(
        &tag,
        &[
            ForwardTarget {
                guest_ip: GUEST,
                bridge: "virbr0",
                forwards: &first,
            },
            ForwardTarget {
                guest_ip: second_guest,
                bridge: "virbr0",
                forwards: &second,
            },
        ],
    )
    .unwrap();
    ns.ipt.apply(&rules).unwrap();
    let nat = ns.ipt.save(NAT).unwrap();
    for to in [
        "192.168.122.10:80",
        "192.168.122.10:22",
        "192.168.122.11:9000",
    ] {
        assert!(
            nat.contains(&format!("--to-destination {to}")),
            "{to}:\n{nat}"
        );
    }
    // One jump per shared chain, one loopback guard for the one bridge.
    let mut saved = parse_save(&nat);
    saved.extend(parse_save(&ns.ipt.save(FILTER).unwrap()));
    let tagged: Vec<_> = saved
        .iter()
        .filter(|s| s.tag.as_deref() == Some(&tag))
        .collect();
    // forwards() plus the admin port's tcp/udp DNATs (PREROUTING and
    // OUTPUT) and FORWARD accepts.
    assert_eq!(tagged.len(), FORWARDS_RULES + 6, "{tagged:?}");
    assert_eq!(ns.ipt.remove_tag(&tag).unwrap(), TASK_CHAIN_COUNT);
    assert_eq!(ns.save_all(), before);
}

#[test]
fn remove_tag_leaves_other_tags_and_rejects_bad_tags() {
    if !common::host_ready(common::host::NETNS_IPTABLES) {
        return;
    }
    let ns = Netns::new();
    ns.ipt.init().unwrap();
    let (a, b) = (task_tag("a"), task_tag("b"));
    ns.ipt
        .apply(&port_forward_rules(&a, GUEST, "virbr0", &forwards()).unwrap())
        .unwrap();
    let after_a = ns.save_all();
    ns.ipt
        .apply(&port_forward_rules(&b, GUEST, "virbr0", &forwards()).unwrap())
        .unwrap();
    assert_eq!(ns.ipt.remove_tag(&b).unwrap(), TASK_CHAIN_COUNT);
    assert_eq!(ns.save_all(), after_a);
    assert!(matches!(
        ns.ipt.remove_tag("x\" -j ACCEPT"),
        Err(IptablesError::Rule(_))
    ));
}

#[test]
fn failed_batch_in_first_table_applies_nothing() {
    if !common::host_ready(common::host::NETNS_IPTABLES) {
        return;
    }
    let ns = Netns::new();
    ns.ipt.init().unwrap();
    let before = ns.save_all();
    let mut rules = port_forward_rules(&task_tag("t"), GUEST, "virbr0", &forwards()).unwrap();
    // Bad in nat, the first section: iptables-restore rejects it at parse time.
    rules.insert(
        1,
        bad_rule(
            NAT,
            CHAIN_PRT,
            "-p tcp -m tcp --dport 1 -j DNAT --to-destination 999.1.1.1:80",
        ),
    );
    let err = ns.ipt.apply(&rules).unwrap_err();
    let IptablesError::Restore(failure) = &err else {
        panic!("unexpected error {err}");
    };
    let RestoreFailure {
        line,
        offending,
        stderr,
        rollback,
        ..
    } = failure.as_ref();
    assert_eq!(*rollback, Rollback::NothingApplied, "{err}");
    // *nat, three -N lines, the first rule, then the bad one.
    assert_eq!(*line, Some(6), "{err}");
    assert!(offending.as_deref().unwrap().contains("999.1.1.1"), "{err}");
    assert!(stderr.contains("999.1.1.1"), "{err}");
    assert!(
        err.to_string().contains("iptables-restore -w --noflush"),
        "{err}"
    );
    assert_eq!(ns.save_all(), before);
}

#[test]
fn failed_batch_in_second_table_rolls_back_the_first() {
    if !common::host_ready(common::host::NETNS_IPTABLES) {
        return;
    }
    let ns = Netns::new();
    ns.ipt.init().unwrap();
    // Another task's rules, and a plain rule in a shared chain that is
    // identical to one of the failing batch: both must survive.
    ns.ipt
        .apply(&port_forward_rules(&task_tag("other"), GUEST, "virbr0", &forwards()).unwrap())
        .unwrap();
    let plain = bad_rule(NAT, CHAIN_PRT, "-p tcp -m tcp --dport 7 -j RETURN");
    ns.ipt.apply(std::slice::from_ref(&plain)).unwrap();
    let before = ns.save_all();

    let tag = task_tag("t");
    let mut batch = port_forward_rules(&tag, GUEST, "virbr0", &forwards()).unwrap();
    batch.insert(0, plain);
    // DNAT is valid syntax but the kernel refuses it in filter, so the
    // nat section has already been committed when this line fails.
    batch.push(bad_rule(
        FILTER,
        CHAIN_FW,
        "-p tcp -m tcp --dport 1 -j DNAT --to-destination 192.168.122.10:80",
    ));
    let err = ns.ipt.apply(&batch).unwrap_err();
    let IptablesError::Restore(failure) = &err else {
        panic!("unexpected error {err}");
    };
    let RestoreFailure {
        offending,
        rollback,
        ..
    } = failure.as_ref();
    // The plain rule, 8 rules in the task's 3 nat chains and the 3 jumps
    // had been committed and were removed (with the chains).
    assert_eq!(*rollback, Rollback::Undone { rules: 12 }, "{err}");
    assert!(offending.as_deref().unwrap().contains("-j DNAT"), "{err}");
    assert!(err.to_string().contains("RULE_APPEND failed"), "{err}");
    assert_eq!(ns.save_all(), before);
    // The same task applies cleanly afterwards.
    let rules = port_forward_rules(&tag, GUEST, "virbr0", &forwards()).unwrap();
    ns.ipt.apply(&rules).unwrap();
    assert_eq!(ns.ipt.remove_tag(&tag).unwrap(), TASK_CHAIN_COUNT);
    assert_eq!(ns.save_all(), before);
}

#[test]
fn applying_a_task_twice_fails_without_touching_the_first() {
    if !common::host_ready(common::host::NETNS_IPTABLES) {
        return;
    }
    let ns = Netns::new();
    ns.ipt.init().unwrap();
    let tag = task_tag("twice");
    let rules = port_forward_rules(&tag, GUEST, "virbr0", &forwards()).unwrap();
    ns.ipt.apply(&rules).unwrap();
    let once = ns.save_all();
    let err = ns.ipt.apply(&rules).unwrap_err();
    let IptablesError::Restore(failure) = &err else {
        panic!("unexpected error {err}");
    };
    assert_eq!(failure.rollback, Rollback::NothingApplied, "{err}");
    assert_eq!(ns.save_all(), once);
}

#[test]
fn removal_is_retryable_after_a_partial_removal() {
    if !common::host_ready(common::host::NETNS_IPTABLES) {
        return;
    }
    let ns = Netns::new();
    ns.ipt.init().unwrap();
    let before = ns.save_all();
    let tag = task_tag("half-removed");
    ns.ipt
        .apply(&port_forward_rules(&tag, GUEST, "virbr0", &forwards()).unwrap())
        .unwrap();
    // What a plugin killed between the two table commits of the removal
    // batch leaves: the nat part gone, the filter part still there.
    let removal = task_removal_batch(&tag);
    let nat_part = &removal[..removal.find("*filter").unwrap()];
    ns.restore(nat_part);
    assert!(ns.save_all().contains(&task_chain(&tag, CHAIN_FW).unwrap()));
    assert_eq!(ns.ipt.remove_tag(&tag).unwrap(), 2);
    assert_eq!(ns.save_all(), before);
    assert_eq!(ns.ipt.remove_tag(&tag).unwrap(), 0);
}

#[test]
fn old_layout_rules_are_removed_by_tag() {
    if !common::host_ready(common::host::NETNS_IPTABLES) {
        return;
    }
    let ns = Netns::new();
    ns.ipt.init().unwrap();
    let other = task_tag("new-layout");
    ns.ipt
        .apply(&port_forward_rules(&other, GUEST, "virbr0", &forwards()).unwrap())
        .unwrap();
    let before = ns.save_all();
    // The previous version's shape: tagged rules directly in the shared
    // chains, as a TeardownSpec of a task it started lists them.
    let tag = task_tag("old-layout");
    let c = format!("-m comment --comment {tag}");
    let dnat = format!(
        "-d 10.0.0.5/32 -p tcp -m tcp --dport 8080 {c} -j DNAT --to-destination 192.168.122.10:80"
    );
    let old = [
        bad_rule(NAT, CHAIN_PRT, &dnat),
        bad_rule(NAT, CHAIN_OUT, &dnat),
        bad_rule(
            FILTER,
            CHAIN_FW,
            &format!("-d 192.168.122.10/32 -o virbr0 -p tcp -m tcp --dport 80 {c} -j ACCEPT"),
        ),
    ];
    ns.ipt.apply(&old).unwrap();
    assert_ne!(ns.save_all(), before);
    assert_eq!(ns.ipt.remove_tag(&tag).unwrap(), 3);
    assert_eq!(ns.save_all(), before);
    assert_eq!(ns.ipt.remove_tag(&tag).unwrap(), 0);
}

#[test]
fn quoting_agrees_with_real_iptables() {
    if !common::host_ready(common::host::NETNS_IPTABLES) {
        return;
    }
    let ns = Netns::new();
    ns.ipt.init().unwrap();
    let before = ns.save_all();
    let comment = r#"it's "quoted" \ and spaced"#;
    let rule = IptablesRule {
        table: NAT.into(),
        chain: CHAIN_PST.into(),
        args: ["-m", "comment", "--comment", comment, "-j", "RETURN"]
            .map(String::from)
            .to_vec(),
    };
    ns.ipt.apply(std::slice::from_ref(&rule)).unwrap();
    let saved = parse_save(&ns.ipt.save(NAT).unwrap());
    let ours: Vec<_> = saved.iter().filter(|r| r.chain == CHAIN_PST).collect();
    assert_eq!(ours.len(), 1);
    assert_eq!(ours[0].args, rule.args);
    assert_eq!(ours[0].tag.as_deref(), Some(comment));
    // The save line, turned into `-D`, deletes exactly that rule.
    let lines = delete_lines_for_tags(&ns.ipt.save(NAT).unwrap(), NAT, |_| false);
    ns.restore(&table_batch(NAT, &lines));
    assert_eq!(ns.save_all(), before);
}

#[test]
fn apply_refuses_rules_outside_our_chains() {
    if !common::host_ready(common::host::NETNS_IPTABLES) {
        return;
    }
    let ns = Netns::new();
    ns.ipt.init().unwrap();
    let before = ns.save_all();
    let err = ns
        .ipt
        .apply(&[bad_rule(FILTER, "FORWARD", "-j ACCEPT")])
        .unwrap_err();
    assert!(matches!(
        err,
        IptablesError::Rule(RuleError::ForeignChain { .. })
    ));
    let err = ns
        .ipt
        .apply(&[bad_rule(NAT, CHAIN_PST, "-j ACCEPT\n-A FORWARD -j ACCEPT")])
        .unwrap_err();
    assert!(matches!(
        err,
        IptablesError::Rule(RuleError::BadArgument { .. })
    ));
    assert_eq!(ns.save_all(), before);
    ns.ipt.apply(&[]).unwrap();
}

#[test]
fn concurrent_apply_and_remove_do_not_interfere() {
    if !common::host_ready(common::host::NETNS_IPTABLES) {
        return;
    }
    let ns = Netns::new();
    ns.ipt.init().unwrap();
    let before = ns.save_all();
    std::thread::scope(|scope| {
        for i in 0..4u8 {
            let ipt = ns.ipt.clone();
            scope.spawn(move || {
                let tag = task_tag(&format!("task-{i}"));
                let guest = Ipv4Addr::new(192, 168, 122, 20 + i);
                let rules = port_forward_rules(&tag, guest, "virbr0", &forwards()).unwrap();
                ipt.apply(&rules).unwrap();
                assert_eq!(ipt.remove_tag(&tag).unwrap(), TASK_CHAIN_COUNT);
            });
        }
    });
    assert_eq!(ns.save_all(), before);
}

#[test]
fn route_localnet_is_read_in_the_namespace() {
    if !common::host_ready(common::host::NETNS_IPTABLES) {
        return;
    }
    let ns = Netns::new();
    assert!(!ns.ipt.route_localnet_enabled("lo"));
    let fix = route_localnet_fix("lo");
    assert_eq!(fix, "sysctl -w net.ipv4.conf.lo.route_localnet=1");
    ns.exec(&fix.split(' ').collect::<Vec<_>>());
    assert!(ns.ipt.route_localnet_enabled("lo"));
    assert!(!ns.ipt.route_localnet_enabled("../lo"));
    // The host's value is readable too (whatever it is).
    let _ = route_localnet_enabled("lo");
}

#[test]
fn errors_name_the_command() {
    if !common::host_ready(&[common::host::IP]) {
        return;
    }
    let ipt = Iptables::in_netns("ndvtest-ipt-does-not-exist")
        .unwrap()
        .with_lock_path(std::env::temp_dir().join("ndvtest-ipt-unused.lock"));
    let err = ipt.save(NAT).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("ip netns exec ndvtest-ipt-does-not-exist iptables-save -t nat"),
        "{text}"
    );
    assert!(matches!(err, IptablesError::Command { .. }), "{text}");
}

/// Runs `f` on a thread that has entered network namespace `name`; sockets
/// made there stay in that namespace.
fn in_netns<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{name}");
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                // Only this short-lived thread changes namespace.
                rustix::thread::move_into_link_name_space(
                    std::os::fd::AsFd::as_fd(&file),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .unwrap_or_else(|e| panic!("setns {path}: {e}"));
                f()
            })
            .join()
            .expect("netns thread")
    })
}

/// Whether a TCP connection from namespace `ns` to `addr` is established
/// within a short timeout (a DROP shows as a timeout).
fn connects(ns: &str, addr: &str) -> bool {
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    in_netns(ns, || {
        std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(700)).is_ok()
    })
}

/// Accepts connections on `listener` forever (until the test process ends).
fn serve(listener: std::net::TcpListener) {
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
        }
    });
}

/// Issue 9 point 5 (CVE-2020-8558): with `route_localnet` on the bridge, a
/// guest that sends to 127.0.0.1 through the bridge reaches the host's
/// loopback services. The task's rules drop that, while the loopback port
/// mapping itself keeps working. "host" is a namespace with a bridge,
/// "guest" a namespace whose veth is a port of that bridge.
#[test]
fn guests_cannot_reach_unmapped_loopback_services_of_the_host() {
    if !common::host_ready(common::host::NETNS_IPTABLES) {
        return;
    }
    let host = Netns::new();
    let guest = Netns::new();
    let bridge = "ndvbr-t";
    let (host_veth, guest_veth) = ("ndvh-t", "ndvg-t");
    for argv in [
        vec!["ip", "link", "set", "lo", "up"],
        vec!["ip", "link", "add", bridge, "type", "bridge"],
        vec![
            "ip",
            "link",
            "add",
            host_veth,
            "type",
            "veth",
            "peer",
            "name",
            guest_veth,
            "netns",
            &guest.name,
        ],
        vec!["ip", "link", "set", host_veth, "master", bridge, "up"],
        vec!["ip", "addr", "add", "10.77.0.1/24", "dev", bridge],
        vec!["ip", "link", "set", bridge, "up"],
        vec![
            "sysctl",
            "-qw",
            &format!("net.ipv4.conf.{bridge}.route_localnet=1"),
        ],
    ] {
        host.exec(&argv);
    }
    // The attacking guest routes 127/8 to the host's bridge address instead
    // of its own loopback (left down, so 127.0.0.1 is not its own address
    // and the host's answers from it are accepted).
    for argv in [
        vec!["ip", "addr", "add", "10.77.0.2/24", "dev", guest_veth],
        vec!["ip", "link", "set", guest_veth, "up"],
        vec![
            "ip",
            "route",
            "add",
            "127.0.0.0/8",
            "via",
            "10.77.0.1",
            "dev",
            guest_veth,
        ],
        vec![
            "sysctl",
            "-qw",
            &format!("net.ipv4.conf.{guest_veth}.route_localnet=1"),
        ],
    ] {
        guest.exec(&argv);
    }
    assert!(host.ipt.route_localnet_enabled(bridge));

    // A loopback-only service of the host, and the guest's mapped service.
    let secret = in_netns(&host.name, || std::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let secret_addr = secret.local_addr().unwrap().to_string();
    serve(secret);
    let service = in_netns(&guest.name, || {
        std::net::TcpListener::bind("10.77.0.2:8022")
    })
    .unwrap();
    serve(service);

    // Without the driver's rules the attack works: this proves the setup
    // can tell the difference.
    assert!(
        connects(&guest.name, &secret_addr),
        "baseline: the guest should reach {secret_addr} through the bridge before any rules"
    );

    host.ipt.init().unwrap();
    let tag = task_tag("guard/web/0001");
    let mapped = [PortForward {
        label: "ssh".into(),
        host_ip: Ipv4Addr::LOCALHOST,
        host_port: 2222,
        guest_port: 8022,
    }];
    let rules = port_forward_rules(&tag, Ipv4Addr::new(10, 77, 0, 2), bridge, &mapped).unwrap();
    host.ipt.apply(&rules).unwrap();

    // The mapped loopback port reaches the guest (DNAT + MASQUERADE), the
    // unmapped loopback service is no longer reachable from the guest.
    assert!(connects(&host.name, "127.0.0.1:2222"), "mapped port");
    assert!(
        !connects(&guest.name, &secret_addr),
        "the guest still reaches the host's loopback service {secret_addr}"
    );
    // The drop came from the task's guard rule.
    let guard = host.exec(&[
        "iptables",
        "-w",
        "-v",
        "-x",
        "-n",
        "-L",
        &task_chain(&tag, CHAIN_IN).unwrap(),
    ]);
    let dropped: u64 = guard
        .lines()
        .find(|l| l.contains("DROP"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(dropped > 0, "{guard}");

    // Removing the task removes the guard with it.
    assert_eq!(host.ipt.remove_tag(&tag).unwrap(), TASK_CHAIN_COUNT);
    assert!(connects(&guest.name, &secret_addr));
}

/// CI runs the port-mapping benchmark in its short mode (issue 13: the
/// programs must keep working). `cargo test --all-targets` builds the
/// example next to this test binary; a run of this test file alone may not
/// have it, and then says so and returns.
#[test]
fn bench_port_mapping_short_mode_runs() {
    if !common::host_ready(common::host::NETNS_IPTABLES) {
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let Some(bench) = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("examples").join("bench_port_mapping"))
        .filter(|path| path.is_file())
    else {
        eprintln!("bench_port_mapping is not built (cargo test --all-targets builds it); skipped");
        return;
    };
    let out = Command::new(&bench).arg("--short").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{} --short failed: {stdout}\n{}",
        bench.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("| N other tasks |"), "{stdout}");
    assert!(stdout.contains("\n| 10 |"), "{stdout}");
}

/// Issue 9 point 5, FORWARD side: the task's FORWARD chain accepts
/// connections to the guest port only when our DNAT made them. A client on
/// the "LAN" reaches the guest through the mapped host port, but not by
/// routing to the guest's address directly (FORWARD policy DROP, and a
/// libvirt-like accept for what leaves the bridge).
#[test]
fn forward_accepts_only_connections_our_dnat_made() {
    if !common::host_ready(common::host::NETNS_IPTABLES) {
        return;
    }
    let host = Netns::new();
    let guest = Netns::new();
    let client = Netns::new();
    let bridge = "ndvbr-f";
    for argv in [
        vec!["ip", "link", "set", "lo", "up"],
        vec!["ip", "link", "add", bridge, "type", "bridge"],
        vec![
            "ip",
            "link",
            "add",
            "ndvh-f",
            "type",
            "veth",
            "peer",
            "name",
            "ndvg-f",
            "netns",
            &guest.name,
        ],
        vec!["ip", "link", "set", "ndvh-f", "master", bridge, "up"],
        vec!["ip", "addr", "add", "10.78.0.1/24", "dev", bridge],
        vec!["ip", "link", "set", bridge, "up"],
        vec![
            "ip",
            "link",
            "add",
            "ndvl-h",
            "type",
            "veth",
            "peer",
            "name",
            "ndvl-c",
            "netns",
            &client.name,
        ],
        vec!["ip", "addr", "add", "10.79.0.1/24", "dev", "ndvl-h"],
        vec!["ip", "link", "set", "ndvl-h", "up"],
        vec!["sysctl", "-qw", "net.ipv4.ip_forward=1"],
        vec!["iptables", "-w", "-P", "FORWARD", "DROP"],
        vec![
            "iptables", "-w", "-A", "FORWARD", "-i", bridge, "-j", "ACCEPT",
        ],
    ] {
        host.exec(&argv);
    }
    for argv in [
        vec!["ip", "addr", "add", "10.78.0.2/24", "dev", "ndvg-f"],
        vec!["ip", "link", "set", "ndvg-f", "up"],
        vec!["ip", "route", "add", "default", "via", "10.78.0.1"],
    ] {
        guest.exec(&argv);
    }
    for argv in [
        vec!["ip", "addr", "add", "10.79.0.2/24", "dev", "ndvl-c"],
        vec!["ip", "link", "set", "ndvl-c", "up"],
        vec!["ip", "route", "add", "10.78.0.0/24", "via", "10.79.0.1"],
    ] {
        client.exec(&argv);
    }
    let service = in_netns(&guest.name, || {
        std::net::TcpListener::bind("10.78.0.2:8080")
    })
    .unwrap();
    serve(service);

    host.ipt.init().unwrap();
    let tag = task_tag("forward/web/0001");
    let mapped = [PortForward {
        label: "http".into(),
        host_ip: Ipv4Addr::new(10, 79, 0, 1),
        host_port: 18080,
        guest_port: 8080,
    }];
    let rules = port_forward_rules(&tag, Ipv4Addr::new(10, 78, 0, 2), bridge, &mapped).unwrap();
    host.ipt.apply(&rules).unwrap();

    assert!(connects(&client.name, "10.79.0.1:18080"), "mapped port");
    assert!(
        !connects(&client.name, "10.78.0.2:8080"),
        "a connection routed to the guest without our DNAT was accepted"
    );
    // Proof that only the DNAT condition stood in the way: the same accept
    // without it lets the direct connection through.
    host.exec(&[
        "iptables",
        "-w",
        "-I",
        "FORWARD",
        "1",
        "-d",
        "10.78.0.2/32",
        "-o",
        bridge,
        "-p",
        "tcp",
        "--dport",
        "8080",
        "-j",
        "ACCEPT",
    ]);
    assert!(connects(&client.name, "10.78.0.2:8080"));
    assert_eq!(host.ipt.remove_tag(&tag).unwrap(), TASK_CHAIN_COUNT);
}

/// On the host's own ruleset the chains are checked and listed through the
/// `iptables` crate (read-only here: nothing on the host changes).
#[test]
fn host_chains_are_checked_and_listed_through_the_iptables_crate() {
    if !common::host_ready(common::host::NETNS_IPTABLES) {
        return;
    }
    let host = Iptables::host();
    let forward = host
        .list_chain(FILTER, "FORWARD")
        .unwrap()
        .expect("FORWARD exists");
    assert!(
        forward.lines().any(|line| line.starts_with("-P FORWARD")),
        "{forward}"
    );
    assert_eq!(
        host.list_chain(FILTER, "NDVTEST_NO_SUCH_CHAIN").unwrap(),
        None
    );
}
