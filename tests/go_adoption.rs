//! Adopting tasks the Go driver (hashicorp/nomad-driver-virt) started: its
//! task handles are built here from its struct definitions, encoded the way
//! Nomad's Go codec encodes them, then recovered and torn down.
//!
//! Go side, for reference (read from the Go sources, not copied):
//! - `plugin/driver.go`: `TaskState{TaskConfig *drivers.TaskConfig;
//!   StartedAt time.Time; NetTeardown *net.TeardownSpec}`, stored with
//!   `handle.SetDriverState` under task handle version 1.
//! - Nomad `plugins/drivers/task_handle.go` + `plugins/base/plugin.go`:
//!   go-msgpack v2 `MsgpackHandle{RawToString, TimeNotBuiltin}`, `WriteExt`
//!   off, only `codec` tags (none on these structs).
//! - `virt/net/net.go`: `TeardownSpec` (beta.1: `IPTablesRules [][]string`;
//!   main: `FilterRemoval *FilterRemoval{Name string; Data any}`), plus
//!   `DHCPReservation string` and `Network string`.
//! - `net/filter/iptables/tables.go`: the removable rules are
//!   `[table, chain, args...]` in NOMAD_VT_PRT, NOMAD_VT_OUT, NOMAD_VT_FW.

mod common;

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use nomad_driver_virt::driver::convert::recovered_state;
use nomad_driver_virt::libvirt::Libvirt;
use nomad_driver_virt::net::iptables::{
    port_forward_rules, task_tag, Iptables, IptablesRule, PortForward, CHAIN_FW, CHAIN_OUT,
    CHAIN_PRT, CHAIN_PST,
};
use nomad_driver_virt::net::libvirt::LibvirtNet;
use nomad_driver_virt::net::{Net, VmTerminatedTeardownRequest};
use nomad_driver_virt::nomad::driver_state::{DriverState, StateOrigin};
use nomad_driver_virt::nomad::go_handle::{self, GoHandleError};
use nomad_driver_virt::pb::hashicorp::nomad::plugins::drivers::proto::{
    DestroyTaskRequest, InspectTaskRequest, RecoverTaskRequest, TaskConfig as ProtoTaskConfig,
    TaskHandle, TaskState as ProtoTaskState,
};

// ---------------------------------------------------------------------------
// The Go codec: hashicorp/go-msgpack v2 with Nomad's MsgpackHandle.

/// A Go value as the codec sees it.
#[derive(Debug, Clone)]
enum Go {
    Nil,
    Bool(bool),
    Int(i64),
    Uint(u64),
    Str(String),
    /// `[]byte` (and `time.Time` via MarshalBinary).
    Bytes(Vec<u8>),
    Slice(Vec<Go>),
    /// A struct: every exported field, in declaration order, by Go name.
    Struct(Vec<(&'static str, Go)>),
    /// A `map[string]T`.
    Map(Vec<(String, Go)>),
}

fn s(text: &str) -> Go {
    Go::Str(text.to_string())
}

fn strings(items: &[&str]) -> Go {
    Go::Slice(items.iter().map(|item| s(item)).collect())
}

/// go-msgpack `writeContainerLen` for the raw legacy spec (no str8, no bin:
/// `WriteExt` is off), arrays and maps.
fn container(out: &mut Vec<u8>, len: usize, fix: u8, fix_cutoff: usize, b16: u8, b32: u8) {
    if len < fix_cutoff {
        out.push(fix | len as u8);
    } else if len < 65536 {
        out.push(b16);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(b32);
        out.extend_from_slice(&(len as u32).to_be_bytes());
    }
}

fn encode_go(value: &Go, out: &mut Vec<u8>) {
    match value {
        Go::Nil => out.push(0xc0),
        Go::Bool(b) => out.push(if *b { 0xc3 } else { 0xc2 }),
        // EncodeInt with PositiveIntUnsigned off: positives above 127 are
        // written as signed ints.
        Go::Int(i) => {
            let i = *i;
            if i > 127 {
                if i <= i64::from(i16::MAX) {
                    out.push(0xd1);
                    out.extend_from_slice(&(i as i16).to_be_bytes());
                } else if i <= i64::from(i32::MAX) {
                    out.push(0xd2);
                    out.extend_from_slice(&(i as i32).to_be_bytes());
                } else {
                    out.push(0xd3);
                    out.extend_from_slice(&i.to_be_bytes());
                }
            } else if i >= -32 {
                out.push(i as u8);
            } else if i >= -128 {
                out.extend_from_slice(&[0xd0, i as u8]);
            } else {
                out.push(0xd3);
                out.extend_from_slice(&i.to_be_bytes());
            }
        }
        Go::Uint(u) => {
            let u = *u;
            if u <= 127 {
                out.push(u as u8);
            } else if u <= 0xff {
                out.extend_from_slice(&[0xcc, u as u8]);
            } else if u <= 0xffff {
                out.push(0xcd);
                out.extend_from_slice(&(u as u16).to_be_bytes());
            } else if u <= 0xffff_ffff {
                out.push(0xce);
                out.extend_from_slice(&(u as u32).to_be_bytes());
            } else {
                out.push(0xcf);
                out.extend_from_slice(&u.to_be_bytes());
            }
        }
        Go::Str(text) => {
            container(out, text.len(), 0xa0, 32, 0xda, 0xdb);
            out.extend_from_slice(text.as_bytes());
        }
        Go::Bytes(bytes) => {
            container(out, bytes.len(), 0xa0, 32, 0xda, 0xdb);
            out.extend_from_slice(bytes);
        }
        Go::Slice(items) => {
            container(out, items.len(), 0x90, 16, 0xdc, 0xdd);
            for item in items {
                encode_go(item, out);
            }
        }
        Go::Struct(fields) => {
            container(out, fields.len(), 0x80, 16, 0xde, 0xdf);
            for (name, value) in fields {
                encode_go(&s(name), out);
                encode_go(value, out);
            }
        }
        Go::Map(entries) => {
            container(out, entries.len(), 0x80, 16, 0xde, 0xdf);
            for (key, value) in entries {
                encode_go(&s(key), out);
                encode_go(value, out);
            }
        }
    }
}

fn go_bytes(value: &Go) -> Vec<u8> {
    let mut out = Vec::new();
    encode_go(value, &mut out);
    out
}

/// `time.Time.MarshalBinary` (version 1): seconds since 0001-01-01, nanos,
/// zone offset in minutes (-1 for UTC; `time.Now()` in a UTC zone gives 0).
fn go_time(unix_secs: i64, nanos: u32, offset_minutes: i16) -> Go {
    let mut bytes = vec![1];
    bytes.extend_from_slice(&(unix_secs + 62_135_596_800).to_be_bytes());
    bytes.extend_from_slice(&nanos.to_be_bytes());
    bytes.extend_from_slice(&offset_minutes.to_be_bytes());
    Go::Bytes(bytes)
}

// ---------------------------------------------------------------------------
// The Go driver's structs, field for field.

const TASK_ID: &str = "5f0e3c1a-7d2b-4c3e-9a8b-0c1d2e3f4a5b/web/9f8e7d6c";
const STARTED_SECS: i64 = 1_767_225_600; // 2026-01-01T00:00:00Z

/// Nomad v1.11.3 `drivers.TaskConfig` (rawDriverConfig is unexported and
/// never encoded).
fn go_task_config() -> Go {
    let alloc_dir = "/opt/nomad/data/alloc/5f0e3c1a-7d2b-4c3e-9a8b-0c1d2e3f4a5b";
    Go::Struct(vec![
        ("ID", s(TASK_ID)),
        ("JobName", s("web")),
        ("JobID", s("web")),
        ("TaskGroupName", s("web")),
        ("ParentJobID", s("")),
        ("Name", s("web")),
        ("Namespace", s("default")),
        ("NodeName", s("client-1")),
        ("NodeID", s("0a1b2c3d-0000-0000-0000-000000000001")),
        (
            "Env",
            Go::Map(vec![
                ("NOMAD_TASK_NAME".into(), s("web")),
                ("NOMAD_ALLOC_DIR".into(), s("/alloc")),
            ]),
        ),
        ("DeviceEnv", Go::Map(Vec::new())),
        (
            "Resources",
            Go::Struct(vec![
                (
                    "NomadResources",
                    Go::Struct(vec![
                        (
                            "Cpu",
                            Go::Struct(vec![
                                ("CpuShares", Go::Int(1000)),
                                ("ReservedCores", Go::Slice(vec![Go::Uint(0), Go::Uint(1)])),
                            ]),
                        ),
                        (
                            "Memory",
                            Go::Struct(vec![
                                ("MemoryMB", Go::Int(1024)),
                                ("MemoryMaxMB", Go::Int(0)),
                            ]),
                        ),
                        ("Networks", Go::Nil),
                        ("Devices", Go::Nil),
                    ]),
                ),
                (
                    "LinuxResources",
                    Go::Struct(vec![
                        ("CPUPeriod", Go::Int(0)),
                        ("CPUQuota", Go::Int(0)),
                        ("CPUShares", Go::Int(1000)),
                        ("MemoryLimitBytes", Go::Int(1 << 30)),
                        ("OOMScoreAdj", Go::Int(0)),
                        ("CpusetCpus", s("0-1")),
                        ("CpusetCgroupPath", s("")),
                        ("PercentTicks", Go::Bytes(Vec::new())),
                    ]),
                ),
                (
                    "Ports",
                    Go::Slice(vec![Go::Struct(vec![
                        ("Label", s("http")),
                        ("Value", Go::Int(24_000)),
                        ("To", Go::Int(8000)),
                        ("HostIP", s("10.0.0.5")),
                    ])]),
                ),
            ]),
        ),
        ("Devices", Go::Nil),
        (
            "Mounts",
            Go::Slice(vec![Go::Struct(vec![
                ("TaskPath", s("/dev/vdb")),
                ("HostPath", s("/var/lib/nomad-volumes/data")),
                ("Readonly", Go::Bool(false)),
                ("PropagationMode", s("private")),
                ("SELinuxLabel", s("")),
            ])]),
        ),
        ("User", s("")),
        ("AllocDir", s(alloc_dir)),
        (
            "StdoutPath",
            s(&format!("{alloc_dir}/alloc/logs/.web.stdout.fifo")),
        ),
        (
            "StderrPath",
            s(&format!("{alloc_dir}/alloc/logs/.web.stderr.fifo")),
        ),
        ("AllocID", s("5f0e3c1a-7d2b-4c3e-9a8b-0c1d2e3f4a5b")),
        ("NetworkIsolation", Go::Nil),
        ("DNS", Go::Nil),
    ])
}

/// The rules the Go filter records as removable for one non-loopback port
/// and one loopback port (`tables.go` Configure), `[table, chain, args...]`.
fn go_rules() -> Vec<Vec<&'static str>> {
    vec![
        vec![
            "nat",
            CHAIN_PRT,
            "-d",
            "10.0.0.5",
            "-i",
            "eth0",
            "-p",
            "tcp",
            "-m",
            "tcp",
            "--dport",
            "24000",
            "-j",
            "DNAT",
            "--to-destination",
            "192.168.122.10:8000",
        ],
        vec![
            "filter",
            CHAIN_FW,
            "-d",
            "192.168.122.10",
            "-p",
            "tcp",
            "-m",
            "state",
            "--state",
            "NEW",
            "-m",
            "tcp",
            "--dport",
            "8000",
            "-j",
            "ACCEPT",
        ],
        vec![
            "nat",
            CHAIN_OUT,
            "-s",
            "127.0.0.1",
            "-o",
            "lo",
            "-p",
            "tcp",
            "-m",
            "tcp",
            "--dport",
            "24001",
            "-j",
            "DNAT",
            "--to-destination",
            "192.168.122.10:22",
        ],
    ]
}

fn go_rules_value() -> Go {
    Go::Slice(go_rules().iter().map(|rule| strings(rule)).collect())
}

/// libvirtxml `NetworkDHCPHost.Marshal()`.
const GO_RESERVATION: &str =
    r#"<host mac="52:54:00:aa:bb:cc" name="nomad-web-9f8e7d6c" ip="192.168.122.10"></host>"#;

/// main's `net.TeardownSpec`.
fn go_teardown_main(network: &str) -> Go {
    Go::Struct(vec![
        (
            "FilterRemoval",
            Go::Struct(vec![("Name", s("iptables")), ("Data", go_rules_value())]),
        ),
        ("DHCPReservation", s(GO_RESERVATION)),
        ("Network", s(network)),
    ])
}

/// v0.0.2-beta.1's `net.TeardownSpec`.
fn go_teardown_beta(network: &str) -> Go {
    Go::Struct(vec![
        ("IPTablesRules", go_rules_value()),
        ("DHCPReservation", s(GO_RESERVATION)),
        ("Network", s(network)),
    ])
}

/// `plugin.TaskState`.
fn go_task_state(teardown: Go) -> Go {
    Go::Struct(vec![
        ("TaskConfig", go_task_config()),
        ("StartedAt", go_time(STARTED_SECS, 123_000_000, 0)),
        ("NetTeardown", teardown),
    ])
}

fn handle(driver_state: Vec<u8>) -> TaskHandle {
    TaskHandle {
        // The Go driver's taskHandleVersion.
        version: 1,
        config: Some(ProtoTaskConfig {
            id: TASK_ID.into(),
            ..ProtoTaskConfig::default()
        }),
        state: 1,
        driver_state,
    }
}

fn expected_rules() -> Vec<IptablesRule> {
    go_rules()
        .into_iter()
        .map(|rule| IptablesRule {
            table: rule[0].into(),
            chain: rule[1].into(),
            args: rule[2..].iter().map(|arg| arg.to_string()).collect(),
        })
        .collect()
}

fn assert_adopted(state: &DriverState, network: &str) {
    assert_eq!(state.origin, StateOrigin::GoDriver);
    assert_eq!(state.task_id, TASK_ID);
    assert_eq!(state.task_name, "web");
    assert_eq!(state.alloc_id, "5f0e3c1a-7d2b-4c3e-9a8b-0c1d2e3f4a5b");
    assert_eq!(state.domain_name, "web-9f8e7d6c");
    assert_eq!(
        state.started_at_unix_nanos,
        STARTED_SECS * 1_000_000_000 + 123_000_000
    );
    assert!(state.stdout_path.ends_with("/alloc/logs/.web.stdout.fifo"));
    assert!(state.volumes.is_empty() && state.console_log.is_none());
    let net = state.net.as_ref().expect("teardown spec");
    assert_eq!(net.legacy_iptables_rules, expected_rules());
    assert!(net.iptables_rules.is_empty() && net.task_tag.is_empty());
    assert_eq!(net.network.as_deref(), Some(network));
    let reservation = net.dhcp_reservation.as_ref().expect("reservation");
    assert_eq!(reservation.network, network);
    assert_eq!(reservation.mac, "52:54:00:aa:bb:cc");
    assert_eq!(reservation.ip, Ipv4Addr::new(192, 168, 122, 10));
    assert_eq!(reservation.hostname.as_deref(), Some("nomad-web-9f8e7d6c"));
    assert_eq!(state.guest_ip, Some(Ipv4Addr::new(192, 168, 122, 10)));
}

// ---------------------------------------------------------------------------
// Decoding.

#[test]
fn the_go_codec_bytes_look_as_expected() {
    let bytes = go_bytes(&go_task_state(go_teardown_main("default")));
    // fixmap of 3, then fixstr "TaskConfig".
    assert_eq!(bytes[0], 0x83);
    assert_eq!(&bytes[1..12], b"\xaaTaskConfig");
    // StartedAt: 15 raw bytes (fixstr marker 0xaf), MarshalBinary version 1.
    let at = bytes
        .windows(10)
        .position(|w| w == b"\xa9StartedAt")
        .expect("StartedAt");
    assert_eq!(&bytes[at + 10..at + 12], &[0xaf, 0x01]);
    // The 83-byte reservation uses str16 (0xda), never str8 (0xd9).
    assert!(GO_RESERVATION.len() > 31 && GO_RESERVATION.len() < 256);
    assert!(bytes
        .windows(3)
        .any(|w| w == [0xda, 0, GO_RESERVATION.len() as u8]));
    assert!(!bytes.contains(&0xd9) && !bytes.contains(&0xc4));
}

#[test]
fn a_main_handle_is_adopted() {
    let state = recovered_state(&handle(go_bytes(&go_task_state(go_teardown_main(
        "default",
    )))))
    .expect("adopted");
    assert_adopted(&state, "default");
}

#[test]
fn a_beta1_handle_is_adopted() {
    let state = recovered_state(&handle(go_bytes(&go_task_state(go_teardown_beta(
        "default",
    )))))
    .expect("adopted");
    assert_adopted(&state, "default");
}

#[test]
fn a_handle_without_network_or_config_is_adopted_from_the_handle_id() {
    let bare = Go::Struct(vec![
        ("TaskConfig", Go::Nil),
        ("StartedAt", go_time(STARTED_SECS, 0, -1)),
        ("NetTeardown", Go::Nil),
    ]);
    let state = recovered_state(&handle(go_bytes(&bare))).expect("adopted");
    assert_eq!(state.task_id, TASK_ID);
    assert_eq!(state.domain_name, "web-9f8e7d6c");
    assert_eq!(state.task_name, "web");
    assert!(state.net.is_none());
    // A macvtap-only task: an empty FilterRemoval and no reservation.
    let macvtap = go_task_state(Go::Struct(vec![
        (
            "FilterRemoval",
            Go::Struct(vec![("Name", s("iptables")), ("Data", Go::Nil)]),
        ),
        ("DHCPReservation", s("")),
        ("Network", s("")),
    ]));
    let state = recovered_state(&handle(go_bytes(&macvtap))).expect("adopted");
    let net = state.net.expect("spec");
    assert!(net.legacy_iptables_rules.is_empty() && net.dhcp_reservation.is_none());
}

/// The same structs through rmp-serde (new-spec markers: str8, bin) decode
/// alike: the decoder does not depend on the legacy spelling.
#[test]
fn rmp_serde_encoded_go_structs_decode_alike() {
    use serde::Serialize;

    struct GoTime(Vec<u8>);
    impl Serialize for GoTime {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.serialize_bytes(&self.0)
        }
    }
    #[derive(Serialize)]
    #[serde(rename_all = "PascalCase")]
    struct TaskConfig {
        #[serde(rename = "ID")]
        id: String,
        name: String,
        #[serde(rename = "AllocID")]
        alloc_id: String,
        stdout_path: String,
    }
    #[derive(Serialize)]
    #[serde(rename_all = "PascalCase")]
    struct FilterRemoval {
        name: String,
        data: Vec<Vec<String>>,
    }
    #[derive(Serialize)]
    struct TeardownSpec {
        #[serde(rename = "FilterRemoval")]
        filter_removal: Option<FilterRemoval>,
        #[serde(rename = "DHCPReservation")]
        dhcp_reservation: String,
        #[serde(rename = "Network")]
        network: String,
    }
    #[derive(Serialize)]
    #[serde(rename_all = "PascalCase")]
    struct TaskState {
        task_config: Option<TaskConfig>,
        started_at: GoTime,
        net_teardown: Option<TeardownSpec>,
    }
    let Go::Bytes(time) = go_time(STARTED_SECS, 123_000_000, 0) else {
        unreachable!()
    };
    let state = TaskState {
        task_config: Some(TaskConfig {
            id: TASK_ID.into(),
            name: "web".into(),
            alloc_id: "5f0e3c1a-7d2b-4c3e-9a8b-0c1d2e3f4a5b".into(),
            stdout_path: "/x/alloc/logs/.web.stdout.fifo".into(),
        }),
        started_at: GoTime(time),
        net_teardown: Some(TeardownSpec {
            filter_removal: Some(FilterRemoval {
                name: "iptables".into(),
                data: go_rules()
                    .iter()
                    .map(|rule| rule.iter().map(|w| w.to_string()).collect())
                    .collect(),
            }),
            dhcp_reservation: GO_RESERVATION.into(),
            network: "default".into(),
        }),
    };
    let bytes = rmp_serde::to_vec_named(&state).expect("encode");
    assert_adopted(
        &recovered_state(&handle(bytes)).expect("adopted"),
        "default",
    );
}

#[test]
fn our_own_json_state_still_wins() {
    let ours = DriverState {
        version: 1,
        task_id: "a/web/1".into(),
        task_name: "web".into(),
        alloc_id: "a".into(),
        domain_name: "web-1".into(),
        started_at_unix_nanos: 5,
        volumes: Vec::new(),
        console_log: None,
        stdout_path: String::new(),
        net: None,
        guest_ip: None,
        origin: StateOrigin::Native,
        guest_agent: false,
        signal_commands: Default::default(),
    };
    assert_eq!(recovered_state(&handle(ours.encode())).expect("ours"), ours);
    // A handle from before the origin field existed decodes as ours.
    let mut old: serde_json::Value = serde_json::from_slice(&ours.encode()).expect("json");
    old.as_object_mut().expect("object").remove("origin");
    let old = serde_json::to_vec(&old).expect("json");
    assert_eq!(
        recovered_state(&handle(old)).expect("old").origin,
        StateOrigin::Native
    );
}

#[test]
fn bad_handles_say_what_is_wrong() {
    let message = |bytes: Vec<u8>| {
        recovered_state(&handle(bytes))
            .expect_err("refused")
            .to_string()
    };
    // Neither JSON nor a msgpack map.
    let text = message(b"garbage".to_vec());
    assert!(text.contains("not readable"), "{text}");
    // A msgpack map cut short.
    let mut cut = go_bytes(&go_task_state(go_teardown_main("default")));
    cut.truncate(cut.len() / 2);
    let text = message(cut);
    assert!(
        text.contains("Go driver's msgpack") && text.contains("truncated"),
        "{text}"
    );
    // Another filter than iptables.
    let other_filter = go_task_state(Go::Struct(vec![
        (
            "FilterRemoval",
            Go::Struct(vec![("Name", s("nftables")), ("Data", go_rules_value())]),
        ),
        ("DHCPReservation", s("")),
        ("Network", s("")),
    ]));
    let text = message(go_bytes(&other_filter));
    assert!(
        text.contains("NetTeardown.FilterRemoval.Name") && text.contains("nftables"),
        "{text}"
    );
    // A rule outside the driver's chains is never adopted for deletion.
    let foreign = go_task_state(Go::Struct(vec![(
        "IPTablesRules",
        Go::Slice(vec![strings(&["filter", "FORWARD", "-j", "ACCEPT"])]),
    )]));
    let text = message(go_bytes(&foreign));
    assert!(
        text.contains("NetTeardown.IPTablesRules[0]") && text.contains("FORWARD"),
        "{text}"
    );
    // A reservation that is not libvirt's host entry.
    let junk = go_task_state(Go::Struct(vec![
        ("DHCPReservation", s("<host ip=\"192.168.122.10\"></host>")),
        ("Network", s("default")),
    ]));
    let text = message(go_bytes(&junk));
    assert!(text.contains("NetTeardown.DHCPReservation"), "{text}");
    // A field of the wrong type.
    let wrong = Go::Struct(vec![("TaskConfig", s("not a struct"))]);
    let text = message(go_bytes(&wrong));
    assert!(text.contains("TaskConfig should be a map"), "{text}");
    // A task ID Nomad never writes, and no fallback in the handle.
    let decoded = go_handle::decode(
        &go_bytes(&Go::Struct(vec![(
            "TaskConfig",
            Go::Struct(vec![("ID", s("no-slashes"))]),
        )])),
        "",
    );
    assert!(
        matches!(&decoded, Err(GoHandleError::Invalid { field, .. }) if field == "TaskConfig.ID"),
        "{decoded:?}"
    );
}

// ---------------------------------------------------------------------------
// Teardown: real iptables in a private network namespace, libvirt's test
// driver for the network and its DHCP reservation.

struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "ndvtest-goadopt-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("run `ip netns add` (iproute2)");
        assert!(
            out.status.success(),
            "`ip netns add {name}` failed: {} -- this test needs root",
            String::from_utf8_lossy(&out.stderr)
        );
        Netns { name }
    }

    fn iptables(&self) -> Iptables {
        Iptables::in_netns(&self.name)
            .expect("netns name")
            .with_lock_path(std::env::temp_dir().join(format!("{}.lock", self.name)))
    }

    fn exec(&self, argv: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(argv)
            .output()
            .expect("run in netns");
        assert!(
            out.status.success(),
            "{argv:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Both tables, without comments and counters.
    fn save_all(&self) -> String {
        ["nat", "filter"]
            .iter()
            .map(|table| {
                self.exec(&["iptables-save", "-t", table])
                    .lines()
                    .filter(|line| !line.starts_with('#'))
                    .map(|line| match line.strip_prefix(':') {
                        Some(chain) => chain.split(' ').next().unwrap_or_default().to_string(),
                        None => line.to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Adds a rule the way go-iptables' `Append` does.
    fn go_append(&self, rule: &[&str]) {
        let mut argv = vec!["iptables", "-t", rule[0], "-A", rule[1], "--wait"];
        argv.extend_from_slice(&rule[2..]);
        self.exec(&argv);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .output();
        let _ = std::fs::remove_file(std::env::temp_dir().join(format!("{}.lock", self.name)));
    }
}

const NETWORK: &str = "ndvgo-net";

/// A test-driver node whose network holds the Go driver's reservation and
/// one that is not the task's.
fn test_node(dir: &std::path::Path) -> String {
    let node = dir.join("node.xml");
    std::fs::write(
        &node,
        format!(
            "<node>\n  <network>\n    <name>{NETWORK}</name>\n    <bridge name='ndvgobr0'/>\n    \
             <ip address='192.168.122.1' netmask='255.255.255.0'>\n      <dhcp>\n        \
             <range start='192.168.122.2' end='192.168.122.254'/>\n        \
             <host mac='52:54:00:aa:bb:cc' name='nomad-web-9f8e7d6c' ip='192.168.122.10'/>\n        \
             <host mac='52:54:00:11:22:33' name='other' ip='192.168.122.11'/>\n      \
             </dhcp>\n    </ip>\n  </network>\n</node>\n"
        ),
    )
    .expect("write node");
    format!("test://{}", node.display())
}

fn reservations(libvirt: &Libvirt) -> Vec<(String, Ipv4Addr, Option<String>)> {
    libvirt
        .call_blocking(|conn| {
            Ok(nomad_driver_virt::libvirt::network::reservations(
                conn, NETWORK,
            ))
        })
        .expect("libvirt")
        .expect("network xml")
}

#[test]
fn go_rules_and_reservation_are_removed_and_nothing_else() {
    if !common::host_ready(common::host::NETNS_IPTABLES) {
        return;
    }
    let ns = Netns::new();
    let ipt = ns.iptables();
    ipt.init().expect("chains");
    // What the Go driver's setup never removes (its loopback MASQUERADE),
    // our own tagged rules of another task, and a hand-made rule that looks
    // like the Go driver's but is not in its handle.
    ns.go_append(&[
        "nat",
        CHAIN_PST,
        "-o",
        "virbr0",
        "-m",
        "addrtype",
        "--src-type",
        "LOCAL",
        "--dst-type",
        "UNICAST",
        "-j",
        "MASQUERADE",
    ]);
    let ours = port_forward_rules(
        &task_tag("other-alloc/db/11112222"),
        Ipv4Addr::new(192, 168, 122, 20),
        "virbr0",
        &[PortForward {
            label: "db".into(),
            host_ip: Ipv4Addr::new(10, 0, 0, 5),
            host_port: 24_002,
            guest_port: 5432,
        }],
    )
    .expect("rules");
    ipt.apply(&ours).expect("ours");
    ns.go_append(&[
        "nat",
        CHAIN_PRT,
        "-d",
        "10.0.0.5",
        "-i",
        "eth0",
        "-p",
        "tcp",
        "-m",
        "tcp",
        "--dport",
        "24999",
        "-j",
        "DNAT",
        "--to-destination",
        "192.168.122.10:8000",
    ]);
    let expected = ns.save_all();

    // The Go task's rules, one of them twice over (a pre-#226 duplicate).
    for rule in go_rules() {
        ns.go_append(&rule);
    }
    ns.go_append(&go_rules()[1]);
    assert_ne!(ns.save_all(), expected);

    let dir = tempfile::tempdir().expect("tempdir");
    let libvirt = Libvirt::new(test_node(dir.path()), None);
    assert_eq!(reservations(&libvirt).len(), 2);
    let net = LibvirtNet::new(libvirt.clone(), ns.iptables());
    let state = recovered_state(&handle(go_bytes(&go_task_state(go_teardown_main(NETWORK)))))
        .expect("adopted");
    let spec = state.net.expect("spec");
    net.vm_terminated_teardown(&VmTerminatedTeardownRequest {
        teardown_spec: spec.clone(),
    })
    .expect("teardown");

    // The listed duplicate's second copy stays: only what is listed goes.
    ns.exec(&[
        "iptables",
        "-w",
        "-D",
        CHAIN_FW,
        "-d",
        "192.168.122.10",
        "-p",
        "tcp",
        "-m",
        "state",
        "--state",
        "NEW",
        "-m",
        "tcp",
        "--dport",
        "8000",
        "-j",
        "ACCEPT",
    ]);
    assert_eq!(ns.save_all(), expected);
    assert_eq!(
        reservations(&libvirt),
        [(
            "52:54:00:11:22:33".to_string(),
            Ipv4Addr::new(192, 168, 122, 11),
            Some("other".to_string())
        )]
    );

    // Again, with everything already gone: nothing to do, no error.
    net.vm_terminated_teardown(&VmTerminatedTeardownRequest {
        teardown_spec: spec.clone(),
    })
    .expect("teardown is idempotent");
    assert_eq!(ns.save_all(), expected);

    // Half gone (a retry after a partial teardown): the rest goes in one batch.
    ns.go_append(&go_rules()[2]);
    assert_eq!(
        ipt.remove_rules(&spec.legacy_iptables_rules)
            .expect("remove"),
        1
    );
    assert_eq!(ns.save_all(), expected);

    // A spelling iptables-save prints differently (`--destination-port`) is
    // still found, by `iptables -C`, and deleted by its own spelling.
    let odd = [
        "nat",
        CHAIN_PRT,
        "-d",
        "10.0.0.6",
        "-p",
        "tcp",
        "-m",
        "tcp",
        "--destination-port",
        "24003",
        "-j",
        "DNAT",
        "--to-destination",
        "192.168.122.10:8000",
    ];
    ns.go_append(&odd);
    let odd = IptablesRule {
        table: odd[0].into(),
        chain: odd[1].into(),
        args: odd[2..].iter().map(|arg| arg.to_string()).collect(),
    };
    assert_eq!(
        ipt.remove_rules(std::slice::from_ref(&odd))
            .expect("remove"),
        1
    );
    assert_eq!(ns.save_all(), expected);
    assert_eq!(ipt.remove_rules(&[odd]).expect("remove"), 0);
}

/// Through the real wire path: a plugin that never started the task takes
/// a Go handle in RecoverTask, reports the Go VM running, and destroys it.
#[tokio::test]
async fn recover_task_over_grpc_adopts_a_running_go_domain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = dir.path().join("node.xml");
    // The test driver runs the domains its node file defines.
    std::fs::write(
        &node,
        "<node>\n  <domain type='test'>\n    <name>web-9f8e7d6c</name>\n    \
         <memory unit='MiB'>128</memory>\n    <os><type>hvm</type></os>\n  </domain>\n</node>\n",
    )
    .expect("write node");
    let plugin = common::launch().await;
    plugin
        .set_config_hcl(&common::test_driver_config(&node), None)
        .await
        .expect("set config");
    let mut driver = plugin.driver();
    let bare = Go::Struct(vec![
        ("TaskConfig", go_task_config()),
        ("StartedAt", go_time(STARTED_SECS, 0, 0)),
        ("NetTeardown", Go::Nil),
    ]);
    driver
        .recover_task(RecoverTaskRequest {
            task_id: TASK_ID.into(),
            handle: Some(handle(go_bytes(&bare))),
        })
        .await
        .expect("RecoverTask takes the Go handle");
    let inspected = driver
        .inspect_task(InspectTaskRequest {
            task_id: TASK_ID.into(),
        })
        .await
        .expect("InspectTask")
        .into_inner();
    let status = inspected.task.expect("status");
    assert_eq!(status.state, ProtoTaskState::Running as i32, "{status:?}");
    assert_eq!(
        status.started_at.map(|t| t.seconds),
        Some(STARTED_SECS),
        "StartedAt comes from the Go handle"
    );
    assert_eq!(
        inspected.driver.expect("driver status").attributes["domain_name"],
        "web-9f8e7d6c"
    );
    for _ in 0..2 {
        driver
            .destroy_task(DestroyTaskRequest {
                task_id: TASK_ID.into(),
                force: true,
            })
            .await
            .expect("DestroyTask (and again)");
    }
    let gone = driver
        .inspect_task(InspectTaskRequest {
            task_id: TASK_ID.into(),
        })
        .await
        .expect_err("destroyed tasks are forgotten");
    assert_eq!(gone.code(), tonic::Code::NotFound);
    plugin.kill().await.expect("exit");
}
