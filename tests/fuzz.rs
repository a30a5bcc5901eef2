//! Property tests over everything that parses input a job author, a sibling
//! task or a restarted daemon controls: the msgpack task and plugin config,
//! job files as `validate`/`run` read them, libvirt XML and DHCP host
//! entries, and iptables-save text. Nothing may panic; what we render must
//! parse back to what we meant.
//!
//! Case counts are small so the whole file runs in seconds in CI; set
//! `NOMAD_DRIVER_VIRT_FUZZ_CASES=<n>` to multiply them for a longer local run.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use nomad_driver_virt::cli::validate;
use nomad_driver_virt::config::hclspec::Spec;
use nomad_driver_virt::config::{plugin, task};
use nomad_driver_virt::hypervisor::libvirt::pool_volumes_in_domain_xml;
use nomad_driver_virt::libvirt::dhcp::{self, Reservation};
use nomad_driver_virt::libvirt::domain_xml::{
    self, DiskBus, DiskDevice, DiskSource, DiskSpec, DomainMetadata, DomainSpec, DomainType,
    FilterRef, InterfaceSpec,
};
use nomad_driver_virt::libvirt::host::offers_kvm;
use nomad_driver_virt::libvirt::xml::{self, Element, XmlWriter};
use nomad_driver_virt::net::iptables::rules::{
    self as iprules, BatchOp, IptablesRule, PortForward,
};
use proptest::prelude::*;
use proptest::test_runner::Config;

/// `base` cases, times `NOMAD_DRIVER_VIRT_FUZZ_CASES` when set.
fn cases(base: u32) -> Config {
    let factor = std::env::var("NOMAD_DRIVER_VIRT_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(1)
        .max(1);
    Config {
        cases: base.saturating_mul(factor),
        // Shrinking a slow input can take long; CI wants a bounded run.
        max_shrink_iters: 256,
        failure_persistence: None,
        ..Config::default()
    }
}

// ---------------------------------------------------------------------------
// msgpack
// ---------------------------------------------------------------------------

/// A msgpack value, written with `rmp` so every wire type can appear
/// (including bin and ext, which cty uses for unknown values).
#[derive(Debug, Clone)]
enum Val {
    Nil,
    Bool(bool),
    Int(i64),
    UInt(u64),
    F64(f64),
    Str(String),
    Bin(Vec<u8>),
    Ext(i8, Vec<u8>),
    Arr(Vec<Val>),
    Map(Vec<(Val, Val)>),
}

impl Val {
    fn encode(&self, out: &mut Vec<u8>) {
        use rmp::encode;
        // Writing into a Vec cannot fail.
        let _ = match self {
            Val::Nil => encode::write_nil(out).map_err(|_| ()),
            Val::Bool(b) => encode::write_bool(out, *b).map_err(|_| ()),
            Val::Int(i) => encode::write_sint(out, *i).map(|_| ()).map_err(|_| ()),
            Val::UInt(u) => encode::write_uint(out, *u).map(|_| ()).map_err(|_| ()),
            Val::F64(f) => encode::write_f64(out, *f).map_err(|_| ()),
            Val::Str(s) => encode::write_str(out, s).map_err(|_| ()),
            Val::Bin(b) => encode::write_bin(out, b).map_err(|_| ()),
            Val::Ext(t, d) => encode::write_ext_meta(out, d.len() as u32, *t)
                .map(|_| out.extend_from_slice(d))
                .map_err(|_| ()),
            Val::Arr(items) => {
                let _ = encode::write_array_len(out, items.len() as u32);
                items.iter().for_each(|v| v.encode(out));
                Ok(())
            }
            Val::Map(entries) => {
                let _ = encode::write_map_len(out, entries.len() as u32);
                for (k, v) in entries {
                    k.encode(out);
                    v.encode(out);
                }
                Ok(())
            }
        };
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }
}

/// Strings that sit on the edges of what the config accepts.
fn edgy_string() -> BoxedStrategy<String> {
    prop_oneof![
        Just(String::new()),
        prop::sample::select(vec![
            "0",
            "-1",
            "1",
            "10G",
            "20GB",
            "1.5GiB",
            "18446744073709551616B",
            "9999999999T",
            "1e400",
            "NaN",
            "qcow2",
            "raw",
            "virtio",
            "sata",
            "cdrom",
            "disk",
            "bridge",
            "macvtap",
            "passthrough",
            "vepa",
            "private",
            "default",
            "virbr0",
            "x86_64",
            "pc",
            "SIGHUP",
            "SIGKILL",
            "UTC",
            "Europe/Berlin",
            "../../etc/passwd",
            "/etc/shadow",
            "a/../../b",
            "52:54:00:12:34:56",
            "ff:ff:ff:ff:ff:ff",
            "127.0.0.1",
            "300s",
            "-5m",
            "9223372036854775807s",
            "qemu:///system",
            "test:///default",
            "tcg",
            "kvm",
            "auto",
            "${NOMAD_TASK_NAME}",
            "%{ if true }x%{ endif }",
            "\u{0}",
            "\n",
            "é",
            "🦀",
        ])
        .prop_map(str::to_string),
        "[a-z0-9._/:-]{0,20}",
        any::<String>(),
        "[a-z]{250,300}",
    ]
    .boxed()
}

fn leaf() -> BoxedStrategy<Val> {
    prop_oneof![
        Just(Val::Nil),
        any::<bool>().prop_map(Val::Bool),
        prop_oneof![
            Just(i64::MIN),
            Just(-1i64),
            Just(0),
            Just(1),
            Just(i64::MAX),
            any::<i64>()
        ]
        .prop_map(Val::Int),
        prop_oneof![Just(u64::MAX), any::<u64>()].prop_map(Val::UInt),
        prop_oneof![
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(-0.0),
            Just(1e300),
            any::<f64>()
        ]
        .prop_map(Val::F64),
        edgy_string().prop_map(Val::Str),
        prop::collection::vec(any::<u8>(), 0..8).prop_map(Val::Bin),
        (any::<i8>(), prop::collection::vec(any::<u8>(), 0..8)).prop_map(|(t, d)| Val::Ext(t, d)),
    ]
    .boxed()
}

/// Any msgpack value, keys included.
fn any_val() -> BoxedStrategy<Val> {
    leaf()
        .prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Val::Arr),
                prop::collection::vec((inner.clone(), inner), 0..6).prop_map(Val::Map),
            ]
        })
        .boxed()
}

/// A value of the HCL type `ty`, or (one time in five) any leaf.
fn typed_leaf(ty: &str) -> BoxedStrategy<Val> {
    let typed: BoxedStrategy<Val> = match ty {
        "bool" => any::<bool>().prop_map(Val::Bool).boxed(),
        "number" => prop_oneof![
            any::<i64>().prop_map(Val::Int),
            (0u64..10_000).prop_map(Val::UInt),
            any::<f64>().prop_map(Val::F64),
        ]
        .boxed(),
        t if t.starts_with("list(") || t.starts_with("set(") => {
            prop::collection::vec(edgy_string().prop_map(Val::Str), 0..4)
                .prop_map(Val::Arr)
                .boxed()
        }
        t if t.starts_with("map(") => prop::collection::vec(
            (
                edgy_string().prop_map(Val::Str),
                edgy_string().prop_map(Val::Str),
            ),
            0..4,
        )
        .prop_map(Val::Map)
        .boxed(),
        _ => edgy_string().prop_map(Val::Str).boxed(),
    };
    prop_oneof![4 => typed, 1 => leaf()].boxed()
}

/// A value shaped like `spec` (what Nomad would send after decoding the HCL
/// against it), with random leaves, some keys missing and, now and then, a
/// key the schema does not have.
fn shaped(spec: &Spec) -> BoxedStrategy<Val> {
    match spec {
        Spec::Object(fields) => {
            let entries: Vec<BoxedStrategy<Option<(Val, Val)>>> = fields
                .iter()
                .map(|(key, child)| {
                    let key = Val::Str(key.clone());
                    prop::option::weighted(0.6, shaped(child).prop_map(move |v| (key.clone(), v)))
                        .boxed()
                })
                .collect();
            let stranger =
                prop::option::weighted(0.05, ("[a-z_]{1,12}".prop_map(Val::Str), leaf()).boxed());
            (entries, stranger)
                .prop_map(|(entries, stranger)| {
                    Val::Map(entries.into_iter().flatten().chain(stranger).collect())
                })
                .boxed()
        }
        Spec::Array(items) => items
            .iter()
            .map(shaped)
            .collect::<Vec<_>>()
            .prop_map(Val::Arr)
            .boxed(),
        Spec::Attr { ty, .. } => typed_leaf(ty),
        Spec::BlockAttrs { ty, .. } => typed_leaf(&format!("map({ty})")),
        Spec::Block { nested, .. } => shaped(nested),
        Spec::BlockList { nested, .. } | Spec::BlockSet { nested, .. } => {
            prop::collection::vec(shaped(nested), 0..3)
                .prop_map(Val::Arr)
                .boxed()
        }
        Spec::BlockMap { nested, .. } => {
            prop::collection::vec(("[a-z]{1,6}".prop_map(Val::Str), shaped(nested)), 0..3)
                .prop_map(Val::Map)
                .boxed()
        }
        Spec::Default { primary, .. } => shaped(primary),
        Spec::Literal(_) => leaf(),
    }
}

/// Every error of a decode of a map names the field it is about, or (for
/// problems of the whole config) says which attribute is unknown or missing.
fn check_config_errors(
    result: Result<(), nomad_driver_virt::config::ConfigErrors>,
) -> Result<(), TestCaseError> {
    if let Err(errors) = result {
        prop_assert!(!errors.errors.is_empty());
        for error in &errors.errors {
            prop_assert!(!error.message.is_empty(), "{errors}");
            prop_assert!(
                !error.field.is_empty() || error.message.starts_with("unknown attribute or block"),
                "error names no field: {error:?}"
            );
            // Job text ends up in terminals and logs: nothing in an error
            // may move the cursor or start a fake line.
            prop_assert!(
                !error.to_string().chars().any(char::is_control),
                "control character in {error:?}"
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(256))]

    /// Arbitrary bytes: a clean error or a config, never a panic.
    #[test]
    fn task_config_from_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Err(errors) = task::parse_task_config(&bytes) {
            prop_assert!(!errors.to_string().is_empty());
        }
    }

    #[test]
    fn plugin_config_from_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Err(errors) = plugin::parse_plugin_config(&bytes) {
            prop_assert!(!errors.to_string().is_empty());
        }
    }

    /// Any msgpack value at all: an error or a config.
    #[test]
    fn task_config_from_any_msgpack(value in any_val()) {
        let bytes = value.bytes();
        let _ = task::parse_task_config(&bytes);
        let _ = plugin::parse_plugin_config(&bytes);
    }

    /// Maps shaped like the schema reach the checks behind decoding; every
    /// error they produce names its field.
    #[test]
    fn task_config_shaped_maps_name_their_fields(value in shaped(&task::schema())) {
        check_config_errors(task::parse_task_config(&value.bytes()).map(|_| ()))?;
    }

    #[test]
    fn plugin_config_shaped_maps_name_their_fields(value in shaped(&plugin::schema())) {
        check_config_errors(plugin::parse_plugin_config(&value.bytes()).map(|_| ()))?;
    }
}

// ---------------------------------------------------------------------------
// Job files (`validate`, `run`)
// ---------------------------------------------------------------------------

/// The example jobs and client configs (`validate` takes both).
fn example_jobs() -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut jobs: Vec<String> = [root.join("jobs"), root.clone()]
        .iter()
        .flat_map(|dir| std::fs::read_dir(dir).expect("examples"))
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|e| e == "hcl"))
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .collect();
    jobs.sort();
    assert!(jobs.len() >= 5, "expected example jobs under {root:?}");
    jobs
}

/// One edit of a job file's text.
#[derive(Debug, Clone)]
enum Edit {
    Delete { at: usize, len: usize },
    Insert { at: usize, text: String },
    Duplicate { at: usize, len: usize },
}

fn edit() -> impl Strategy<Value = Edit> {
    let token = prop_oneof![
        prop::sample::select(vec![
            "{",
            "}",
            "[",
            "]",
            "\"",
            "${",
            "%{",
            "= ",
            "\n",
            ",",
            "#",
            "//",
            "/*",
            "<<EOF\n",
            "<<-X\n",
            "\\",
            "1e999",
            "-1",
            "null",
            "true",
            "\"\\u0000\"",
            "${env.X}",
            "disk {",
            "source {",
            "image = ",
            "size = \"99999999999999T\"",
            "config {}",
            "network_interface {",
            "bridge {",
            "macvtap {",
            "ports = [\"http\"]",
            "network { port \"http\" { static = 0 } }",
            "memory = -1",
            "cores = 99999",
            "driver = \"virt\"",
            "task \"t\" {",
            "group \"g\" {",
            "count = 2",
            "user_data = \"/etc/passwd\"",
            "cmds = [1, {}]",
            "primary = \"yes\"",
            // Escapes HCL turns into control characters.
            "signal_commands = { \"\\u001b[2J\\nX\" = 1 }",
            "hostname = \"\\u001b[31m\\r\"",
            "task \"\\u001b[2J\\n\" {",
            "group \"a\\nb\" {",
            "job \"\\r\" {",
            "bus_type = \"\\u0007\"",
            "ports = [\"\\n\"]",
        ])
        .prop_map(str::to_string),
        "\\PC{0,6}",
    ];
    prop_oneof![
        (any::<prop::sample::Index>(), 1usize..40).prop_map(|(i, len)| Edit::Delete {
            at: i.index(usize::MAX),
            len
        }),
        (any::<prop::sample::Index>(), token).prop_map(|(i, text)| Edit::Insert {
            at: i.index(usize::MAX),
            text
        }),
        (any::<prop::sample::Index>(), 1usize..60).prop_map(|(i, len)| Edit::Duplicate {
            at: i.index(usize::MAX),
            len
        }),
    ]
}

/// The nearest char boundary at or below `at % (len + 1)`.
fn boundary(text: &str, at: usize) -> usize {
    let mut at = at % (text.len() + 1);
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

fn apply(text: &mut String, edit: &Edit) {
    match edit {
        Edit::Delete { at, len } => {
            let start = boundary(text, *at);
            let end = boundary(text, start + len.min(&(text.len() - start)));
            text.replace_range(start..end.max(start), "");
        }
        Edit::Insert { at, text: new } => {
            let at = boundary(text, *at);
            text.insert_str(at, new);
        }
        Edit::Duplicate { at, len } => {
            let start = boundary(text, *at);
            let end = boundary(text, start + len.min(&(text.len() - start))).max(start);
            let copy = text[start..end].to_string();
            text.insert_str(end, &copy);
        }
    }
}

/// Validates `source` as `validate` and `run` do (same parser, same task
/// checks), in a private directory so relative paths resolve there.
fn validate_text(dir: &Path, source: String) {
    let path: PathBuf = dir.join("job.nomad.hcl");
    if let Err(diagnostics) = validate::validate_source(&path, source) {
        assert!(!diagnostics.0.is_empty());
        for diagnostic in &diagnostics.0 {
            assert!(!diagnostic.message.is_empty(), "{diagnostic:?}");
            // Job text reaches the terminal through these: no control
            // characters that could forge lines or move the cursor.
            let shown = diagnostic.to_string();
            assert!(
                !shown.chars().any(|c| c.is_control() && c != '\n'),
                "control character in {shown:?}"
            );
        }
    }
}

proptest! {
    #![proptest_config(cases(64))]

    /// Valid example jobs with a few random edits: diagnostics, never a panic.
    #[test]
    fn mutated_jobs_never_panic(
        job in any::<prop::sample::Index>(),
        edits in prop::collection::vec(edit(), 1..6),
    ) {
        let jobs = example_jobs();
        let mut text = jobs[job.index(jobs.len())].clone();
        for edit in &edits {
            apply(&mut text, edit);
        }
        let dir = tempfile::tempdir().expect("tempdir");
        validate_text(dir.path(), text);
    }

    /// Arbitrary text and HCL-looking token soup.
    #[test]
    fn arbitrary_job_text_never_panics(
        text in prop_oneof![
            "\\PC{0,200}",
            "(job \"[a-z]{0,3}\" \\{|group \"g\" \\{|task \"t\" \\{|config \\{|disk \\{|\\}|driver = \"virt\"|[a-z_]{1,8} = (\"[^\"]{0,8}\"|[0-9]{1,4}|\\[\\]|\\{\\})|\n){0,40}",
        ],
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        validate_text(dir.path(), text);
    }
}

// ---------------------------------------------------------------------------
// XML read back from libvirt, DHCP host entries
// ---------------------------------------------------------------------------

fn mutated_xml() -> impl Strategy<Value = String> {
    let base = prop::sample::select(vec![
        "<network><name>default</name><ip address='192.168.122.1' netmask='255.255.255.0'>\
         <dhcp><range start='192.168.122.2' end='192.168.122.254'/>\
         <host mac='52:54:00:aa:bb:01' name='web-1' ip='192.168.122.10'/></dhcp></ip></network>",
        "<capabilities><guest><arch name='x86_64'><domain type='qemu'/><domain type='kvm'/>\
         </arch></guest></capabilities>",
        "<domain type='qemu'><devices><disk type='volume' device='disk'>\
         <source pool='p' volume='v'/></disk><channel type='unix'>\
         <target type='virtio' name='org.qemu.guest_agent.0' state='connected'/></channel>\
         </devices></domain>",
    ]);
    let token = prop::sample::select(vec![
        "<",
        ">",
        "/>",
        "</",
        "'",
        "\"",
        "&",
        "&amp;",
        "&#0;",
        "&#x110000;",
        "&#xFFFE;",
        "&bogus;",
        "<![CDATA[",
        "]]>",
        "<!--",
        "-->",
        "<?",
        "?>",
        "<!DOCTYPE x [<!ENTITY e 'x'>]>",
        "<dhcp>",
        "</dhcp>",
        "<host mac='' ip='999.1.1.1'/>",
        "<host/>",
        " a='<'",
        "\u{0}",
    ]);
    (
        base,
        prop::collection::vec(
            (
                any::<prop::sample::Index>(),
                prop_oneof![token.prop_map(str::to_string), "\\PC{0,4}"],
                0usize..8,
            ),
            0..5,
        ),
    )
        .prop_map(|(base, edits)| {
            let mut text = base.to_string();
            for (at, insert, delete) in edits {
                let start = boundary(&text, at.index(usize::MAX));
                let end = boundary(&text, start + delete.min(text.len() - start)).max(start);
                text.replace_range(start..end, &insert);
            }
            text
        })
}

proptest! {
    #![proptest_config(cases(512))]

    /// Every XML reader takes junk without panicking; the element tree never
    /// holds a character XML cannot carry.
    #[test]
    fn xml_readers_never_panic(text in prop_oneof![mutated_xml(), "\\PC{0,80}", any::<String>()]) {
        if let Ok(root) = xml::parse(&text) {
            for element in root.descendants() {
                prop_assert!(element.text.chars().all(xml::is_xml_char));
                for (_, value) in &element.attributes {
                    prop_assert!(value.chars().all(xml::is_xml_char));
                }
            }
        }
        let _ = dhcp::reservations_in_xml(&text);
        let _ = offers_kvm(&text);
        let _ = pool_volumes_in_domain_xml(&text);
        let _ = domain_xml::metadata_task_id(&text);
    }
}

/// An element tree written with the writer, read back.
fn write_tree(w: &mut XmlWriter, e: &Element) {
    let attrs: Vec<(&str, &str)> = e
        .attributes
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    if e.children.is_empty() {
        w.text(&e.name, &attrs, &e.text);
    } else {
        w.open(&e.name, &attrs);
        for child in &e.children {
            write_tree(w, child);
        }
        w.close(&e.name);
    }
}

fn element() -> impl Strategy<Value = Element> {
    let text = "[^\\p{Cc}\u{FFFE}\u{FFFF}]{0,12}";
    let attrs = prop::collection::btree_map("[a-z]{1,5}", text, 0..3)
        .prop_map(|m| m.into_iter().collect::<Vec<_>>());
    let leaf = ("[a-z]{1,6}", attrs.clone(), text).prop_map(|(name, attributes, text)| Element {
        name,
        attributes,
        text,
        children: Vec::new(),
    });
    leaf.prop_recursive(3, 24, 4, move |inner| {
        (
            "[a-z]{1,6}",
            attrs.clone(),
            prop::collection::vec(inner, 1..4),
        )
            .prop_map(|(name, attributes, children)| Element {
                name,
                attributes,
                text: String::new(),
                children,
            })
    })
}

/// Text of the parsed tree with the writer's indentation removed: the
/// writer puts whitespace between child elements only.
fn strip_layout(mut e: Element) -> Element {
    if !e.children.is_empty() {
        e.text = e.text.trim().to_string();
    }
    e.children = e.children.into_iter().map(strip_layout).collect();
    e
}

proptest! {
    #![proptest_config(cases(256))]

    /// What we write parses back to the same tree.
    #[test]
    fn xml_tree_round_trips(tree in element()) {
        let mut w = XmlWriter::new();
        write_tree(&mut w, &tree);
        let parsed = xml::parse(&w.finish(true)).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(strip_layout(parsed), tree);
    }

    /// A network XML holding the reservations we would add lists exactly
    /// those, whatever the names are.
    #[test]
    fn dhcp_reservations_round_trip(
        hosts in prop::collection::vec(
            (prop::array::uniform6(any::<u8>()), any::<[u8; 4]>(), prop::option::of("[^\\p{Cc}]{0,20}")),
            0..6,
        ),
    ) {
        let reservations: Vec<Reservation> = hosts
            .iter()
            .map(|(mac, ip, name)| Reservation {
                network: "ndvtest".into(),
                mac: mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":"),
                ip: Ipv4Addr::from(*ip),
                hostname: name.clone(),
            })
            .collect();
        let mut doc = String::from(
            "<network><name>ndvtest</name><dns><host ip='10.0.0.9'><hostname>x</hostname></host></dns>\
             <ip address='10.0.0.1' prefix='24'><dhcp><range start='10.0.0.2' end='10.0.0.254'/>",
        );
        for r in &reservations {
            doc.push_str(&dhcp::reservation_xml(r));
        }
        doc.push_str("</dhcp></ip></network>");
        let expected: Vec<(String, Ipv4Addr, Option<String>)> = reservations
            .into_iter()
            .map(|r| (r.mac, r.ip, r.hostname))
            .collect();
        prop_assert_eq!(dhcp::reservations_in_xml(&doc), expected);
    }
}

// ---------------------------------------------------------------------------
// Domain XML we write, read back
// ---------------------------------------------------------------------------

fn domain_spec() -> impl Strategy<Value = DomainSpec> {
    let name = "[a-zA-Z0-9][a-zA-Z0-9_.-]{0,20}";
    let free = "[^\\p{Cc}]{1,16}";
    let disk = (
        any::<bool>(),
        "/[a-z0-9/._ -]{1,30}",
        0usize..26,
        prop::sample::select(vec![DiskBus::Virtio, DiskBus::Sata, DiskBus::Scsi]),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(file, path, letter, bus, cdrom, read_only)| {
            // A CD-ROM cannot sit on virtio.
            let bus = if cdrom && bus == DiskBus::Virtio {
                DiskBus::Sata
            } else {
                bus
            };
            let prefix = match bus {
                DiskBus::Virtio => "vd",
                _ => "sd",
            };
            DiskSpec {
                source: if file {
                    DiskSource::File(path.into())
                } else {
                    DiskSource::Block(path.into())
                },
                format: "raw".into(),
                target_dev: format!("{prefix}{}", char::from(b'a' + letter as u8)),
                bus,
                device: if cdrom {
                    DiskDevice::Cdrom
                } else {
                    DiskDevice::Disk
                },
                read_only,
                boot_order: None,
                backing: None,
            }
        });
    let mac = prop::array::uniform3(any::<u8>())
        .prop_map(|b| format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2]));
    // Filter names and parameter names are checked names; parameter values
    // are any text (quotes, `&`, `<` included).
    let filter = prop::option::of((
        "[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}",
        prop::collection::vec(("[A-Za-z_][A-Za-z0-9_]{0,15}", "[!-~][ -~]{0,15}"), 0..4),
    ))
    .prop_map(|filter| filter.map(|(filter, parameters)| FilterRef { filter, parameters }));
    let interface = prop_oneof![
        ("[a-z][a-z0-9-]{0,10}", mac.clone(), filter).prop_map(|(network, mac, filter)| {
            InterfaceSpec::Network {
                network,
                mac,
                filter,
            }
        }),
        (
            "[a-z][a-z0-9]{0,8}",
            prop::sample::select(vec!["bridge", "private", "vepa"]),
            mac
        )
            .prop_map(|(device, mode, mac)| InterfaceSpec::Direct {
                device,
                mode: mode.into(),
                mac
            }),
    ];
    (
        name,
        (1u64..1 << 30, 1u32..64),
        prop::collection::vec(disk, 1..4),
        prop::collection::vec(interface, 0..3),
        (free, free, free),
        any::<bool>(),
    )
        .prop_map(
            |(
                name,
                (memory_kib, vcpus),
                mut disks,
                interfaces,
                (task_id, alloc_id, task_name),
                guest_agent,
            )| {
                // Target devices must be distinct.
                let mut seen = std::collections::BTreeSet::new();
                disks.retain(|d| seen.insert(d.target_dev.clone()));
                DomainSpec {
                    name,
                    domain_type: DomainType::Qemu,
                    memory_kib,
                    current_memory_kib: memory_kib,
                    vcpus,
                    cpuset: None,
                    cpu_shares: None,
                    arch: "x86_64".into(),
                    machine: "pc".into(),
                    disks,
                    shares: Vec::new(),
                    interfaces,
                    console_log: None,
                    metadata: DomainMetadata {
                        task_id,
                        alloc_id,
                        task_name,
                        plugin_version: "0.1.0".into(),
                    },
                    guest_agent,
                }
            },
        )
}

proptest! {
    #![proptest_config(cases(256))]

    /// The domain XML we render reads back as the spec: name, sizes, every
    /// disk and interface in order, and the owner metadata recovery relies on.
    #[test]
    fn domain_xml_reads_back_as_the_spec(spec in domain_spec()) {
        let xml = match domain_xml::render_domain_xml(&spec) {
            Ok(xml) => xml,
            Err(error) => return Err(TestCaseError::fail(format!("valid spec refused: {error}"))),
        };
        let root = xml::parse(&xml).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(root.text_at(&["name"]), Some(spec.name.clone()));
        prop_assert_eq!(root.text_at(&["vcpu"]), Some(spec.vcpus.to_string()));
        let memory = root.child("memory").expect("memory");
        let kib = match memory.attr("unit") {
            Some("KiB") => memory.text.trim().parse::<u64>().ok(),
            Some("MiB") => memory.text.trim().parse::<u64>().ok().map(|m| m * 1024),
            other => return Err(TestCaseError::fail(format!("memory unit {other:?}"))),
        };
        prop_assert_eq!(kib, Some(spec.memory_kib));

        let devices = root.child("devices").expect("devices");
        let disks: Vec<&Element> = devices.children_named("disk").collect();
        prop_assert_eq!(disks.len(), spec.disks.len());
        for (disk, want) in disks.iter().zip(&spec.disks) {
            let source = disk.child("source").expect("source");
            match &want.source {
                DiskSource::File(path) => {
                    prop_assert_eq!(disk.attr("type"), Some("file"));
                    prop_assert_eq!(source.attr("file"), path.to_str());
                }
                DiskSource::Block(path) => {
                    prop_assert_eq!(disk.attr("type"), Some("block"));
                    prop_assert_eq!(source.attr("dev"), path.to_str());
                }
                DiskSource::Rbd { access, image } => {
                    prop_assert_eq!(disk.attr("type"), Some("network"));
                    let name = format!("{}/{image}", access.ceph_pool);
                    prop_assert_eq!(source.attr("name"), Some(name.as_str()));
                }
            }
            prop_assert_eq!(disk.attr("device"), Some(want.device.as_str()));
            let target = disk.child("target").expect("target");
            prop_assert_eq!(target.attr("dev"), Some(want.target_dev.as_str()));
            prop_assert_eq!(target.attr("bus"), Some(want.bus.as_str()));
            let read_only = want.read_only || want.device == DiskDevice::Cdrom;
            prop_assert_eq!(disk.child("readonly").is_some(), read_only);
        }

        let interfaces: Vec<&Element> = devices.children_named("interface").collect();
        prop_assert_eq!(interfaces.len(), spec.interfaces.len());
        for (interface, want) in interfaces.iter().zip(&spec.interfaces) {
            let source = interface.child("source").expect("source");
            let mac = interface.child("mac").and_then(|m| m.attr("address"));
            match want {
                InterfaceSpec::Network { network, mac: want_mac, filter } => {
                    prop_assert_eq!(interface.attr("type"), Some("network"));
                    prop_assert_eq!(source.attr("network"), Some(network.as_str()));
                    prop_assert_eq!(mac, Some(want_mac.as_str()));
                    let found = interface.child("filterref").map(|filterref| FilterRef {
                        filter: filterref.attr("filter").unwrap_or_default().to_string(),
                        parameters: filterref
                            .children_named("parameter")
                            .map(|p| {
                                (
                                    p.attr("name").unwrap_or_default().to_string(),
                                    p.attr("value").unwrap_or_default().to_string(),
                                )
                            })
                            .collect(),
                    });
                    prop_assert_eq!(&found, filter);
                }
                InterfaceSpec::Direct { device, mode, mac: want_mac } => {
                    prop_assert_eq!(interface.attr("type"), Some("direct"));
                    prop_assert_eq!(source.attr("dev"), Some(device.as_str()));
                    prop_assert_eq!(source.attr("mode"), Some(mode.as_str()));
                    prop_assert_eq!(mac, Some(want_mac.as_str()));
                }
            }
        }
        let agent = devices
            .children_named("channel")
            .filter_map(|c| c.child("target"))
            .any(|t| t.attr("name") == Some("org.qemu.guest_agent.0"));
        prop_assert_eq!(agent, spec.guest_agent);

        // Our metadata element, as virDomainGetMetadata hands it back.
        let ours = root
            .child("metadata")
            .and_then(|m| m.children.first())
            .expect("metadata element");
        let mut w = XmlWriter::new();
        let attrs: Vec<(&str, &str)> = ours
            .attributes
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        prop_assert_eq!(
            ours.name.clone(),
            format!("{}:{}", domain_xml::METADATA_PREFIX, domain_xml::METADATA_ELEMENT)
        );
        // libvirt returns the element without our prefix.
        w.empty(domain_xml::METADATA_ELEMENT, &attrs);
        prop_assert_eq!(ours.attr("alloc_id"), Some(spec.metadata.alloc_id.as_str()));
        prop_assert_eq!(ours.attr("task_name"), Some(spec.metadata.task_name.as_str()));
        prop_assert_eq!(
            domain_xml::metadata_task_id(&w.finish(false)),
            Some(spec.metadata.task_id)
        );
    }
}

// ---------------------------------------------------------------------------
// iptables
// ---------------------------------------------------------------------------

/// `iptables-save` text for the rules an append batch creates: the chains
/// it makes are declared, the rules printed as `-A` lines (the same
/// quoting iptables-save uses), optionally with `-c` counters.
fn as_save_output(rules: &[IptablesRule], counters: bool) -> String {
    let mut out = String::from("# Generated by iptables-save v1.8.9 on a test\n");
    for table in iprules::tables_of(rules) {
        out.push_str(&format!("*{table}\n"));
        for shared in iprules::chains_in_table(table) {
            out.push_str(&format!(":{shared} - [0:0]\n"));
        }
        for line in iprules::table_lines(rules, table, BatchOp::Append) {
            match line.strip_prefix("-N ") {
                Some(chain) => out.push_str(&format!(":{chain} - [0:0]\n")),
                None if counters => out.push_str(&format!("[3:180] {line}\n")),
                None => out.push_str(&format!("{line}\n")),
            }
        }
        out.push_str("COMMIT\n");
    }
    out
}

fn forward() -> impl Strategy<Value = PortForward> {
    (
        "[a-z]{1,8}",
        prop_oneof![
            Just(Ipv4Addr::LOCALHOST),
            Just(Ipv4Addr::new(127, 0, 0, 2)),
            any::<[u8; 4]>().prop_map(Ipv4Addr::from),
        ],
        any::<u16>(),
        any::<u16>(),
    )
        .prop_map(|(label, host_ip, host_port, guest_port)| PortForward {
            label,
            host_ip,
            host_port,
            guest_port,
        })
}

proptest! {
    #![proptest_config(cases(256))]

    /// Rules we render, printed the way iptables-save prints them, parse
    /// back to the same rule set with our tag; the removal lines built from
    /// that parse delete exactly those rules.
    #[test]
    fn port_forward_rules_survive_iptables_save(
        task_id in "\\PC{1,80}",
        guest in any::<[u8; 4]>(),
        bridge in prop_oneof![Just("virbr0".to_string()), "[a-zA-Z0-9_.-]{0,17}", "\\PC{0,4}"],
        forwards in prop::collection::vec(forward(), 0..4),
        counters in any::<bool>(),
    ) {
        let tag = iprules::task_tag(&task_id);
        prop_assert!(iprules::validate_tag(&tag).is_ok());
        let Ok(rules) = iprules::port_forward_rules(&tag, Ipv4Addr::from(guest), &bridge, &forwards) else {
            return Ok(());
        };
        prop_assert_eq!(rules.is_empty(), forwards.is_empty());
        for rule in &rules {
            prop_assert_eq!(iprules::validate_rule(rule), Ok(()));
        }
        let save = as_save_output(&rules, counters);
        let parsed = iprules::parse_save(&save);
        let mut got: Vec<(String, String, Vec<String>)> = parsed
            .iter()
            .map(|r| (r.table.clone(), r.chain.clone(), r.args.clone()))
            .collect();
        let mut want: Vec<(String, String, Vec<String>)> = rules
            .iter()
            .map(|r| (r.table.clone(), r.chain.clone(), r.args.clone()))
            .collect();
        got.sort();
        want.sort();
        prop_assert_eq!(got, want);
        if !rules.is_empty() {
            let tags = iprules::tags_in_save_output(&save, &iprules::chains_in_table("nat"));
            prop_assert!(tags.iter().all(|t| t == &tag), "{:?}", tags);
        }
        let mut used = vec![false; parsed.len()];
        for rule in &rules {
            let found = iprules::find_saved(rule, &parsed, &used);
            prop_assert!(found.is_some(), "{rule:?} not found in\n{save}");
            if let Some(index) = found {
                used[index] = true;
            }
        }
        for table in iprules::tables_of(&rules) {
            let (lines, gone) = iprules::removal_lines(&parsed, table, |t| t == tag);
            // The jumps out of shared chains go; the per-task chains are
            // flushed and deleted whole.
            let jumps = rules
                .iter()
                .filter(|r| r.table == table && iprules::is_our_chain(table, &r.chain))
                .count();
            prop_assert_eq!(gone.len(), jumps);
            let chains = iprules::task_chains_used(&rules, table);
            prop_assert_eq!(lines.len(), jumps + 2 * chains.len());
            // A sibling's tag removes nothing of ours.
            let (other, _) = iprules::removal_lines(&parsed, table, |t| t != tag);
            prop_assert!(other.is_empty(), "{other:?}");
        }
    }

    /// Rules with arbitrary (valid) arguments render to lines that split back
    /// into the same arguments, and parse from save text unchanged.
    #[test]
    fn rule_lines_split_back(args in prop::collection::vec("[^\\p{Cc}]{1,12}", 1..8)) {
        let rule = IptablesRule {
            table: "filter".into(),
            chain: "NOMAD_VT_FW".into(),
            args,
        };
        if iprules::validate_rule(&rule).is_err() {
            return Ok(());
        }
        let batch = iprules::restore_batch(std::slice::from_ref(&rule), BatchOp::Append);
        let line = batch.lines().find(|l| l.starts_with("-A ")).expect("an -A line");
        let split = iprules::split_restore_line(line);
        prop_assert_eq!(&split[2..], rule.args.as_slice());
        let parsed = iprules::parse_save(&format!("*filter\n{line}\nCOMMIT\n"));
        prop_assert_eq!(parsed.len(), 1);
        prop_assert_eq!(&parsed[0].args, &rule.args);
        prop_assert_eq!(parsed[0].delete_line(), iprules::delete_line_for(&rule));
    }

    /// Any text: the save parsers neither panic nor invent lines.
    #[test]
    fn iptables_save_parsers_never_panic(
        text in prop_oneof![
            "\\PC{0,200}",
            "((\\*(nat|filter)|:[A-Z_]{1,8} - \\[0:0\\]|\\[[0-9:]{0,6}\\]? ?-A [A-Z_]{0,8}( [-a-z0-9\"\\\\ ]{0,10}){0,6}|COMMIT|#.{0,5})\n){0,12}",
        ],
    ) {
        for rule in iprules::parse_save(&text) {
            prop_assert!(rule.line.starts_with("-A "));
            prop_assert!(text.contains(&rule.line));
            prop_assert!(rule.delete_line().starts_with("-D "));
        }
        let _ = iprules::tags_in_save_output(&text, &["NOMAD_VT_PRT"]);
        let _ = iprules::delete_lines_for_tags(&text, "nat", |_| false);
        let _ = iprules::chain_declared(&text, "NOMAD_VT_FW");
        let _ = iprules::jump_count(&text, "FORWARD", "NOMAD_VT_FW");
    }
}

/// Control characters a job spells with HCL escapes (in labels, map keys
/// and values) never reach the terminal raw.
#[test]
fn hostile_escapes_in_jobs_are_not_printed_raw() {
    let dir = tempfile::tempdir().expect("tempdir");
    for job in [
        "job \"j\" {\n  group \"g\" {\n    task \"\\u001b[2J\\nfake: ok\" {\n      driver = \"virt\"\n      config {\n        hostname = \"\\u001b[31m\\r\"\n        signal_commands = { \"\\u001b[2J\\nX\" = \"y\" }\n        disk {\n          source {\n            image = \"a.qcow2\"\n          }\n        }\n      }\n    }\n  }\n}\n",
        "job \"j\\r\" {\n  group \"g\\n\" {\n    task \"t\" {\n      driver = \"virt\"\n      config {\n        disk {\n          bus_type = \"\\u0007\"\n        }\n      }\n    }\n  }\n}\n",
    ] {
        let path = dir.path().join("job.nomad.hcl");
        match validate::validate_source(&path, job.to_string()) {
            Ok(summary) => panic!("hostile job accepted: {summary}"),
            Err(diagnostics) => {
                let shown = diagnostics.to_string();
                assert!(
                    !shown.chars().any(|c| c.is_control() && c != '\n'),
                    "{shown:?}"
                );
                assert_eq!(shown.lines().count(), diagnostics.0.len(), "{shown:?}");
            }
        }
    }
}

/// Deep nesting is refused or decoded without exhausting the stack (a
/// stack overflow aborts the process; no panic handler would catch it).
#[test]
fn deep_nesting_does_not_overflow_the_stack() {
    for depth in [1_000usize, 100_000] {
        // msgpack: {"cmds": [[[[...]]]]} and {"signal_commands": {..}}.
        for (key, opener) in [("cmds", 0x91u8), ("disk", 0x91), ("os", 0x81)] {
            let mut bytes = vec![0x81];
            Val::Str(key.into()).encode(&mut bytes);
            for _ in 0..depth {
                bytes.push(opener);
                if opener == 0x81 {
                    Val::Str("a".into()).encode(&mut bytes);
                }
            }
            bytes.push(0xc0);
            assert!(task::parse_task_config(&bytes).is_err());
            assert!(plugin::parse_plugin_config(&bytes).is_err());
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    for depth in [100usize, 5_000, 100_000] {
        let nested = format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
        let job = format!(
            "job \"j\" {{\n  group \"g\" {{\n    task \"t\" {{\n      driver = \"virt\"\n      config {{\n        cmds = {nested}\n      }}\n    }}\n  }}\n}}\n"
        );
        validate_text(dir.path(), job);
        let parens = format!("x = {}1{}\n", "(".repeat(depth), ")".repeat(depth));
        validate_text(dir.path(), parens);
    }
}

/// XML nested deeper than any libvirt document parses (or fails) and is
/// dropped without exhausting the stack.
#[test]
fn deep_xml_does_not_overflow_the_stack() {
    for depth in [1_000usize, 200_000] {
        let doc = format!("{}{}", "<a>".repeat(depth), "</a>".repeat(depth));
        let _ = xml::parse(&doc);
        let _ = dhcp::reservations_in_xml(&doc);
        let _ = offers_kvm(&doc);
        let _ = pool_volumes_in_domain_xml(&doc);
    }
}

proptest! {
    #![proptest_config(cases(256))]

    /// A task handle Nomad hands back at RecoverTask (ours or the Go
    /// driver's) decodes or fails cleanly, whatever the bytes.
    #[test]
    fn go_task_handles_never_panic(
        value in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..128).prop_map(Val::Bin),
            any_val(),
        ],
    ) {
        let bytes = match &value {
            Val::Bin(raw) => raw.clone(),
            other => other.bytes(),
        };
        let _ = nomad_driver_virt::nomad::go_handle::looks_like_go_state(&bytes);
        let _ = nomad_driver_virt::nomad::go_handle::decode(&bytes, "ndvtest/alloc/task");
        let _ = nomad_driver_virt::nomad::go_handle::go_time_unix_nanos(&bytes);
        let _ = nomad_driver_virt::nomad::driver_state::DriverState::decode(&bytes);
    }

    /// Our own handle format (JSON) with random edits.
    #[test]
    fn driver_state_json_never_panics(text in prop_oneof![
        "\\PC{0,120}",
        "\\{(\"[a-z_]{1,12}\": ?(null|[0-9]{1,20}|-1|\"[^\"]{0,8}\"|\\[\\]|\\{\\}|true),? ?){0,8}\\}",
    ]) {
        let _ = nomad_driver_virt::nomad::driver_state::DriverState::decode(text.as_bytes());
    }
}
