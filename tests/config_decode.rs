//! Decoding config msgpack exactly as Nomad encodes it (cty/msgpack):
//! every attribute present, nil when unset, sorted keys, compact ints,
//! exact fractions as float64 and inexact ones as strings.

use nomad_driver_virt::config::network::NetworkInterface;
use nomad_driver_virt::config::plugin::PluginConfig;
use nomad_driver_virt::config::task::{
    decode_and_validate, parse_task_config, DiskBus, DiskKind, TaskConfig,
};
use nomad_driver_virt::config::units::ByteSize;
use nomad_driver_virt::config::{decode_msgpack, ConfigError};
use proptest::prelude::*;

/// A tiny msgpack builder for hand-made inputs.
enum Mp {
    Nil,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(&'static str),
    Array(Vec<Mp>),
    Map(Vec<(&'static str, Mp)>),
}

fn encode(value: &Mp, out: &mut Vec<u8>) {
    match value {
        Mp::Nil => rmp::encode::write_nil(out).expect("write"),
        Mp::Bool(flag) => rmp::encode::write_bool(out, *flag).expect("write"),
        Mp::Int(number) => {
            rmp::encode::write_sint(out, *number).expect("write");
        }
        Mp::UInt(number) => {
            rmp::encode::write_uint(out, *number).expect("write");
        }
        Mp::Float(number) => rmp::encode::write_f64(out, *number).expect("write"),
        Mp::Str(text) => rmp::encode::write_str(out, text).expect("write"),
        Mp::Array(items) => {
            rmp::encode::write_array_len(out, items.len() as u32).expect("write");
            for item in items {
                encode(item, out);
            }
        }
        Mp::Map(entries) => {
            rmp::encode::write_map_len(out, entries.len() as u32).expect("write");
            for (key, item) in entries {
                rmp::encode::write_str(out, key).expect("write");
                encode(item, out);
            }
        }
    }
}

fn bytes(value: Mp) -> Vec<u8> {
    let mut out = Vec::new();
    encode(&value, &mut out);
    out
}

/// A task config map with every attribute present and nil, as Nomad sends
/// an empty `config {}` block, with `overrides` replacing some entries.
fn task(overrides: Vec<(&'static str, Mp)>) -> Vec<u8> {
    let mut entries: Vec<(&'static str, Mp)> = [
        "cmds",
        "default_user_authorized_ssh_key",
        "default_user_password",
        "disk",
        "guest_agent",
        "hostname",
        "network_interface",
        "os",
        "shared_dirs_driver",
        "signal_commands",
        "ssh_password_auth",
        "timezone",
        "user_data",
    ]
    .into_iter()
    .map(|key| (key, Mp::Nil))
    .collect();
    for (key, value) in overrides {
        if let Some(slot) = entries.iter_mut().find(|(k, _)| *k == key) {
            slot.1 = value;
        } else {
            entries.push((key, value));
        }
    }
    bytes(Mp::Map(entries))
}

fn disk(size: Mp) -> Mp {
    Mp::Map(vec![
        ("bus_type", Mp::Nil),
        ("chained", Mp::Nil),
        ("devname", Mp::Nil),
        ("driver", Mp::Nil),
        ("format", Mp::Nil),
        ("kind", Mp::Str("disk")),
        ("pool", Mp::Nil),
        ("primary", Mp::Bool(true)),
        ("read_only", Mp::Nil),
        ("size", size),
        ("source", Mp::Nil),
        ("sparse", Mp::Nil),
        ("volume", Mp::Nil),
    ])
}

fn first_error(error: ConfigError) -> (String, String) {
    let first = error.errors.into_iter().next().expect("at least one error");
    (first.field, first.message)
}

#[test]
fn nil_and_missing_are_both_unset() {
    let with_nils: TaskConfig = decode_msgpack("task config", &task(vec![])).expect("all nil");
    let missing: TaskConfig =
        decode_msgpack("task config", &bytes(Mp::Map(vec![]))).expect("empty map");
    assert_eq!(with_nils, TaskConfig::default());
    assert_eq!(missing, TaskConfig::default());
    let empty: TaskConfig = decode_msgpack("task config", &[]).expect("no config block at all");
    assert_eq!(empty, TaskConfig::default());
}

#[test]
fn sizes_arrive_as_ints_floats_or_strings() {
    for (size, expected) in [
        (Mp::Int(1024), 1024),
        (Mp::Int(10_737_418_240), 10 << 30),
        (Mp::Float(4096.0), 4096),
        (Mp::Str("10GiB"), 10 << 30),
        (Mp::Str("1.5GiB"), 3 << 29),
    ] {
        let config = decode_and_validate(&task(vec![("disk", Mp::Array(vec![disk(size)]))]))
            .expect("valid size");
        let disks = config.disk.expect("disks");
        assert_eq!(disks[0].size, Some(ByteSize(expected)));
    }
}

#[test]
fn inexact_fractions_arrive_as_strings_and_are_rejected_by_field() {
    // cty encodes 0.1 as the string "0.1" (not exact in binary64) and 0.5 as float64.
    for size in [Mp::Str("0.1"), Mp::Float(0.5)] {
        let error = decode_and_validate(&task(vec![("disk", Mp::Array(vec![disk(size)]))]))
            .expect_err("fraction");
        let (field, message) = first_error(error);
        assert_eq!(field, "disk[0].size");
        assert!(message.contains("whole number of bytes"), "{message}");
    }
}

#[test]
fn one_or_many_blocks() {
    let one =
        decode_and_validate(&task(vec![("disk", Mp::Array(vec![disk(Mp::Int(1))]))])).expect("one");
    assert_eq!(one.disk.map(|d| d.len()), Some(1));
    let three = decode_msgpack::<TaskConfig>(
        "task config",
        &task(vec![(
            "disk",
            Mp::Array(vec![disk(Mp::Int(1)), disk(Mp::Int(2)), disk(Mp::Int(3))]),
        )]),
    )
    .expect("three");
    assert_eq!(three.disk.map(|d| d.len()), Some(3));
}

#[test]
fn wrong_types_name_the_field() {
    let (field, message) = first_error(
        decode_msgpack::<TaskConfig>("task config", &task(vec![("hostname", Mp::Int(5))]))
            .expect_err("int hostname"),
    );
    assert_eq!(field, "hostname");
    assert!(message.contains("wrong type"), "{message}");

    let (field, _) = first_error(
        decode_msgpack::<TaskConfig>("task config", &task(vec![("cmds", Mp::Str("echo"))]))
            .expect_err("string cmds"),
    );
    assert_eq!(field, "cmds");

    let (field, message) = first_error(
        decode_msgpack::<TaskConfig>("task config", &task(vec![("surprise", Mp::Bool(true))]))
            .expect_err("unknown key"),
    );
    assert!(
        message.contains("unknown attribute or block `surprise`"),
        "{field}: {message}"
    );

    let bad_mode = Mp::Array(vec![Mp::Map(vec![
        ("bridge", Mp::Nil),
        (
            "macvtap",
            Mp::Map(vec![
                ("device", Mp::Str("eth0")),
                ("mode", Mp::Str("bridged")),
            ]),
        ),
    ])]);
    let error = decode_and_validate(&task(vec![
        ("disk", Mp::Array(vec![disk(Mp::Int(1))])),
        ("network_interface", bad_mode),
    ]))
    .expect_err("bad mode");
    let (field, message) = first_error(error);
    assert_eq!(field, "network_interface[0].macvtap.mode");
    assert!(message.contains("\"private\""), "{message}");
}

#[test]
fn the_task_spec_is_typed() {
    let interface = Mp::Array(vec![Mp::Map(vec![
        (
            "bridge",
            Mp::Map(vec![
                ("name", Mp::Str("virbr0")),
                ("ports", Mp::Array(vec![Mp::Str("http")])),
            ]),
        ),
        ("macvtap", Mp::Nil),
    ])]);
    let spec = parse_task_config(&task(vec![
        ("hostname", Mp::Str("web-1")),
        ("disk", Mp::Array(vec![disk(Mp::Str("1.5GiB"))])),
        ("network_interface", interface),
    ]))
    .expect("valid");
    assert_eq!(spec.hostname.as_ref().map(|h| h.as_str()), Some("web-1"));
    assert_eq!(spec.disks.len(), 1);
    let disk = &spec.disks[0];
    assert_eq!(disk.kind, DiskKind::Disk);
    assert_eq!(disk.bus(), DiskBus::Virtio);
    assert_eq!(disk.size, Some(ByteSize(3 << 29)));
    assert!(disk.primary);
    let NetworkInterface::Bridge(bridge) = &spec.network_interfaces[0] else {
        panic!("{spec:?}");
    };
    assert_eq!(bridge.name.as_str(), "virbr0");
    assert_eq!(bridge.ports[0].as_str(), "http");
}

#[test]
fn every_problem_is_reported_with_its_path() {
    let bad_disk = Mp::Map(vec![
        ("bus_type", Mp::Str("pci")),
        ("devname", Mp::Str("VDA")),
        ("driver", Mp::Str("xen")),
        ("kind", Mp::Str("floppy")),
        (
            "source",
            Mp::Map(vec![
                ("format", Mp::Str("vmdk")),
                ("image", Mp::Str("")),
                ("volume", Mp::Nil),
            ]),
        ),
    ]);
    let error = parse_task_config(&task(vec![
        ("hostname", Mp::Str("web_1")),
        ("timezone", Mp::Str("../etc")),
        ("disk", Mp::Array(vec![disk(Mp::Int(1)), bad_disk])),
    ]))
    .expect_err("invalid");
    let fields: Vec<&str> = error.errors.iter().map(|e| e.field.as_str()).collect();
    for expected in [
        "hostname",
        "timezone",
        "disk[1].kind",
        "disk[1].bus_type",
        "disk[1].driver",
        "disk[1].devname",
        "disk[1].source.format",
        "disk[1].source.image",
    ] {
        assert!(fields.contains(&expected), "{expected} not in {fields:?}");
    }
    let text = error.to_string();
    assert!(text.contains("\"virtio\", \"sata\""), "{text}");
}

#[test]
fn plugin_config_decodes_repeated_labelled_blocks() {
    let config = bytes(Mp::Map(vec![
        ("accelerator", Mp::Str("tcg")),
        (
            "image_paths",
            Mp::Array(vec![Mp::Str("/var/lib/virt/images")]),
        ),
        ("log_level", Mp::Nil),
        (
            "provider",
            Mp::Map(vec![(
                "libvirt",
                Mp::Map(vec![
                    ("password", Mp::Nil),
                    ("uri", Mp::Str("test:///default")),
                    ("user", Mp::Nil),
                ]),
            )]),
        ),
        (
            "storage_pools",
            Mp::Map(vec![
                ("default", Mp::Str("b")),
                (
                    "directory",
                    Mp::Map(vec![
                        ("a", Mp::Map(vec![("path", Mp::Str("/srv/a"))])),
                        ("b", Mp::Map(vec![("path", Mp::Str("/srv/b"))])),
                    ]),
                ),
            ]),
        ),
    ]));
    let decoded: PluginConfig = decode_msgpack("plugin config", &config).expect("decodes");
    let settings = decoded.validate().expect("valid");
    assert_eq!(settings.pools.len(), 2);
    assert_eq!(settings.default_pool, "b");
    assert_eq!(settings.libvirt_uri, "test:///default");
    assert!(!settings.insecure_readonly_virtiofs());
}

/// Go's `provider.libvirt.allow_insecure_readonly_mounts`, a bool that
/// defaults to false.
#[test]
fn plugin_config_allows_insecure_readonly_mounts() {
    let config = |flag: Mp| {
        bytes(Mp::Map(vec![(
            "provider",
            Mp::Map(vec![(
                "libvirt",
                Mp::Map(vec![
                    ("allow_insecure_readonly_mounts", flag),
                    ("password", Mp::Nil),
                    ("uri", Mp::Str("qemu:///system")),
                    ("user", Mp::Nil),
                ]),
            )]),
        )]))
    };
    let settings = |flag| {
        decode_msgpack::<PluginConfig>("plugin config", &config(flag))
            .expect("decodes")
            .validate()
            .expect("valid")
    };
    assert!(settings(Mp::Bool(true)).insecure_readonly_virtiofs());
    assert!(!settings(Mp::Bool(false)).insecure_readonly_virtiofs());
    assert!(!settings(Mp::Nil).insecure_readonly_virtiofs());
    let error = decode_msgpack::<PluginConfig>("plugin config", &config(Mp::Str("yes")))
        .expect_err("not a bool");
    assert_eq!(
        first_error(error).0,
        "provider.libvirt.allow_insecure_readonly_mounts"
    );
}

/// Our `provider.libvirt.allow_writable_virtiofs`, a bool that defaults
/// to false (writable shares then stay on 9p).
#[test]
fn plugin_config_allows_writable_virtiofs() {
    let config = |flag: Mp| {
        bytes(Mp::Map(vec![(
            "provider",
            Mp::Map(vec![(
                "libvirt",
                Mp::Map(vec![
                    ("allow_writable_virtiofs", flag),
                    ("uri", Mp::Str("qemu:///system")),
                ]),
            )]),
        )]))
    };
    let settings = |flag| {
        decode_msgpack::<PluginConfig>("plugin config", &config(flag))
            .expect("decodes")
            .validate()
            .expect("valid")
    };
    assert!(settings(Mp::Bool(true)).allow_writable_virtiofs);
    assert!(!settings(Mp::Bool(false)).allow_writable_virtiofs);
    assert!(!settings(Mp::Nil).allow_writable_virtiofs);
    assert!(
        !PluginConfig::default()
            .validate()
            .expect("valid")
            .allow_writable_virtiofs
    );
    let error = decode_msgpack::<PluginConfig>("plugin config", &config(Mp::Int(1)))
        .expect_err("not a bool");
    assert_eq!(
        first_error(error).0,
        "provider.libvirt.allow_writable_virtiofs"
    );
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(input in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_msgpack::<TaskConfig>("task config", &input);
        let _ = decode_msgpack::<PluginConfig>("plugin config", &input);
    }

    #[test]
    fn mutated_valid_configs_never_panic(position in 0usize..400, byte in any::<u8>()) {
        let mut input = task(vec![("disk", Mp::Array(vec![disk(Mp::Str("10GiB"))])), ("hostname", Mp::Str("web"))]);
        let index = position % input.len();
        input[index] = byte;
        let _ = decode_and_validate(&input);
    }
}

#[test]
fn huge_declared_lengths_do_not_allocate_or_panic() {
    // array32 / map32 / str32 headers claiming ~4 GiB with no data behind them.
    for input in [
        vec![0xdd, 0xff, 0xff, 0xff, 0xff],
        vec![0xdf, 0xff, 0xff, 0xff, 0xff],
        vec![
            0x81, 0xa4, b'c', b'm', b'd', b's', 0xdd, 0xff, 0xff, 0xff, 0xff,
        ],
        vec![0xdb, 0xff, 0xff, 0xff, 0xff],
    ] {
        assert!(decode_msgpack::<TaskConfig>("task config", &input).is_err());
    }
}

/// The operator's allow_* settings, as Nomad sends them (every attribute
/// present, nil when unset): defaults when nil, lists and sizes when set.
#[test]
fn plugin_config_decodes_the_operator_settings() {
    use nomad_driver_virt::config::network::MacvtapMode;
    use nomad_driver_virt::config::plugin::parse_plugin_config;
    let config = |entries: Vec<(&'static str, Mp)>| {
        let mut all: Vec<(&'static str, Mp)> = [
            "allow_macvtap_devices",
            "allow_macvtap_modes",
            "allow_networks",
            "allow_storage_pools",
            "clean_traffic",
            "max_disk_size",
        ]
        .into_iter()
        .map(|key| (key, Mp::Nil))
        .collect();
        for (key, value) in entries {
            if let Some(slot) = all.iter_mut().find(|(k, _)| *k == key) {
                slot.1 = value;
            }
        }
        bytes(Mp::Map(all))
    };
    let defaults = parse_plugin_config(&config(vec![])).expect("defaults");
    assert_eq!(defaults.policy.networks, None);
    assert_eq!(defaults.policy.macvtap_devices, None);
    assert_eq!(
        defaults.policy.macvtap_modes,
        vec![MacvtapMode::Bridge, MacvtapMode::Private, MacvtapMode::Vepa]
    );
    assert_eq!(defaults.policy.storage_pools, None);
    assert_eq!(defaults.policy.max_disk_size, None);
    assert!(defaults.policy.clean_traffic);

    let set = parse_plugin_config(&config(vec![
        ("allow_networks", Mp::Array(vec![Mp::Str("default")])),
        ("allow_macvtap_devices", Mp::Array(vec![Mp::Str("eth1")])),
        (
            "allow_macvtap_modes",
            Mp::Array(vec![Mp::Str("passthrough")]),
        ),
        ("allow_storage_pools", Mp::Array(vec![])),
        ("clean_traffic", Mp::Bool(false)),
        ("max_disk_size", Mp::Str("10GiB")),
    ]))
    .expect("valid");
    assert_eq!(set.policy.networks, Some(vec!["default".to_string()]));
    assert_eq!(set.policy.macvtap_devices, Some(vec!["eth1".to_string()]));
    assert_eq!(set.policy.macvtap_modes, vec![MacvtapMode::Passthrough]);
    assert_eq!(set.policy.storage_pools, Some(Vec::new()));
    assert_eq!(set.policy.max_disk_size, Some(10 << 30));
    assert!(!set.policy.clean_traffic);

    // Huge values: the largest size decodes exactly; beyond it, negative,
    // fractional or unknown units are refused by name, never wrapped.
    let largest = parse_plugin_config(&config(vec![("max_disk_size", Mp::UInt(u64::MAX))]))
        .expect("u64::MAX bytes");
    assert_eq!(largest.policy.max_disk_size, Some(u64::MAX));
    for bad in [
        Mp::Int(-1),
        Mp::Int(0),
        Mp::Float(1e30),
        Mp::Float(18_446_744_073_709_551_616.0),
        Mp::Str("16EiB"),
        Mp::Str("99999999999999999999999TiB"),
    ] {
        let error =
            parse_plugin_config(&config(vec![("max_disk_size", bad)])).expect_err("refused");
        assert!(error.to_string().contains("max_disk_size"), "{error}");
    }
    for (key, value, field) in [
        (
            "allow_macvtap_devices",
            Mp::Array(vec![Mp::Str("eth 0; x")]),
            "allow_macvtap_devices[0]",
        ),
        (
            "allow_networks",
            Mp::Array(vec![Mp::Str("")]),
            "allow_networks[0]",
        ),
        (
            "allow_storage_pools",
            Mp::Array(vec![Mp::Str("other")]),
            "allow_storage_pools[0]",
        ),
        (
            "allow_macvtap_modes",
            Mp::Array(vec![Mp::Str("all")]),
            "allow_macvtap_modes[0]",
        ),
    ] {
        let error = parse_plugin_config(&config(vec![(key, value)])).expect_err("refused");
        assert!(
            error.errors.iter().any(|e| e.field == field),
            "{field} not named: {error}"
        );
    }
}

/// Sizes and durations at and beyond their limits through the msgpack
/// path: no panic, no wrap, a named refusal.
#[test]
fn huge_sizes_and_durations_decode_or_are_refused_by_name() {
    use nomad_driver_virt::config::plugin::parse_plugin_config;
    let disk = |size: Mp| {
        task(vec![(
            "disk",
            Mp::Array(vec![Mp::Map(vec![("size", size)])]),
        )])
    };
    let largest = parse_task_config(&disk(Mp::UInt(u64::MAX))).expect("u64::MAX bytes");
    assert_eq!(largest.disks[0].size, Some(ByteSize(u64::MAX)));
    for bad in [
        Mp::Int(i64::MIN),
        Mp::Float(f64::MAX),
        Mp::Float(f64::INFINITY),
        Mp::Str("18446744073709551616"),
        Mp::Str("17179869184GiB"),
    ] {
        let error = parse_task_config(&disk(bad)).expect_err("refused");
        assert!(error.to_string().contains("disk"), "{error}");
    }
    for timeout in ["2562048h", "9223372036854775808ns", "25h", "-1s"] {
        let config = bytes(Mp::Map(vec![("dhcp_timeout", Mp::Str(timeout))]));
        let error = parse_plugin_config(&config).expect_err(timeout);
        assert!(
            error.errors.iter().any(|e| e.field == "dhcp_timeout"),
            "{timeout}: {error}"
        );
    }
}
