//! The cloud-init seed against the host tools that read it: `isoinfo` and
//! `blkid` read the seed ISO back, the real `cloud-init` (its schema check
//! and its YAML loader) reads the documents, and libc's crypt() (through
//! perl) checks the password hashes. Plain `cargo test` skips
//! these when a tool is missing; with NOMAD_DRIVER_VIRT_HOST_TESTS=1 (CI) a
//! missing tool fails. The pure rendering tests stay in src/cloudinit/.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::Need;
use nomad_driver_virt::cloudinit::docs::{env_script, ENV_SCRIPT_PATH};
use nomad_driver_virt::cloudinit::{
    build_seed_iso, random_salt, render, sha512_crypt, CloudInitInput, SeedFiles,
};

const ISOINFO: Need = Need::Tool {
    program: "isoinfo",
    package: "genisoimage",
};
const BLKID: Need = Need::Tool {
    program: "blkid",
    package: "util-linux",
};
const PERL: Need = Need::Tool {
    program: "perl",
    package: "perl-base",
};
const CLOUD_INIT: Need = Need::Tool {
    program: "cloud-init",
    package: "cloud-init",
};

// The seed ISO, read back by isoinfo and blkid (moved from src/cloudinit/iso.rs).

fn run(tool: &str, package: &str, args: &[&str]) -> Output {
    let out = Command::new(tool).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run {tool} ({e}): install it with `apt-get install -y {package}`")
    });
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn isoinfo(args: &[&str]) -> Output {
    run("isoinfo", "genisoimage", args)
}

fn seed() -> SeedFiles {
    SeedFiles {
        meta_data: "instance-id: \"i-1\"\nlocal-hostname: \"web-1\"\n".into(),
        user_data: "#cloud-config\n# caf\u{e9} \u{1f680}\nruncmd: [\"echo hi\"]\n".into(),
        // Bigger than one 2048-byte sector, to cover multi-sector files.
        vendor_data: format!("#cloud-config\nruncmd:\n{}", "  - \"x\"\n".repeat(600)),
    }
}

fn write_iso(dir: &Path, files: &SeedFiles) -> String {
    let path = dir.join("seed.iso");
    std::fs::write(&path, build_seed_iso(files).unwrap()).unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn volume_label_and_extensions() {
    if !common::host_ready(&[ISOINFO]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let iso = write_iso(dir.path(), &seed());
    let info = String::from_utf8(isoinfo(&["-d", "-i", &iso]).stdout).unwrap();
    assert!(info.contains("Volume id: cidata\n"), "{info}");
    assert!(info.contains("Rock Ridge signatures"), "{info}");
    assert!(info.contains("Joliet with UCS level 3 found"), "{info}");
}

#[test]
fn files_round_trip_byte_exact_via_rock_ridge_and_joliet() {
    if !common::host_ready(&[ISOINFO]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let files = seed();
    let iso = write_iso(dir.path(), &files);
    for flag in ["-R", "-J"] {
        let listing = String::from_utf8(isoinfo(&[flag, "-f", "-i", &iso]).stdout).unwrap();
        let mut names: Vec<&str> = listing.lines().collect();
        names.sort_unstable();
        assert_eq!(
            names,
            ["/meta-data", "/user-data", "/vendor-data"],
            "{flag}"
        );

        for (name, content) in [
            ("/meta-data", &files.meta_data),
            ("/user-data", &files.user_data),
            ("/vendor-data", &files.vendor_data),
        ] {
            let got = isoinfo(&[flag, "-x", name, "-i", &iso]).stdout;
            assert_eq!(got, content.as_bytes(), "{flag} {name}");
        }
    }
}

#[test]
fn rendered_seed_survives_the_iso() {
    if !common::host_ready(&[ISOINFO]) {
        return;
    }
    let input = CloudInitInput {
        instance_id: "i-2".into(),
        hostname: "db".into(),
        default_user_password: Some("pw".into()),
        cmds: vec!["echo \"a\nb\"".into()],
        env: [("K".to_owned(), "v'1".to_owned())].into(),
        ..Default::default()
    };
    let files = render(&input, [9; 12]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let iso = write_iso(dir.path(), &files);
    let got = isoinfo(&["-R", "-x", "/vendor-data", "-i", &iso]).stdout;
    assert_eq!(got, files.vendor_data.as_bytes());
}

#[test]
fn blkid_sees_cidata_label() {
    if !common::host_ready(&[BLKID]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let iso = write_iso(dir.path(), &seed());
    // -p probes the file directly, bypassing blkid's cache.
    let out = run("blkid", "util-linux", &["-p", "-o", "export", &iso]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.lines().any(|l| l == "LABEL=cidata"), "{text}");
    assert!(text.lines().any(|l| l == "TYPE=iso9660"), "{text}");
}

#[test]
fn empty_files_are_fine() {
    if !common::host_ready(&[ISOINFO]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let files = SeedFiles {
        meta_data: String::new(),
        user_data: String::new(),
        vendor_data: String::new(),
    };
    let iso = write_iso(dir.path(), &files);
    assert!(isoinfo(&["-R", "-x", "/user-data", "-i", &iso])
        .stdout
        .is_empty());
}

// The documents, read by the real cloud-init (moved from src/cloudinit/docs.rs).

const SALT: [u8; 12] = *b"fixed-salt!!";

fn input() -> CloudInitInput {
    CloudInitInput {
        instance_id: "nomad-1234abcd-web".into(),
        hostname: "web-1".into(),
        ..Default::default()
    }
}

/// Strings that try every way out of a YAML scalar or a shell quote.
fn hostile() -> Vec<String> {
    [
        "echo \"hi\"",
        "a\nruncmd: [\"rm -rf /\"]\n",
        "x\n---\npassword: owned\n...",
        "# comment? \" # not",
        "key: value",
        "- item",
        "{flow: map}",
        "[1, 2]",
        "&anchor *alias !!python/object:os.system",
        "'single' and \\back\\slash \\n",
        "tab\there\r\nCRLF",
        "nul\0bell\x07esc\x1bdel\x7f",
        "c1\u{85}nel\u{2028}ls\u{2029}ps\u{feff}bom\u{9b}csi",
        "unicode é 中文 🚀",
        "",
        "   leading and trailing   ",
        "yes",
        "~",
        "null",
        "0644",
        "'; echo pwned; '",
        "$(id) `id` ${HOME}",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Everything set, with hostile strings wherever the driver writes user text.
fn hostile_full_input() -> CloudInitInput {
    let mut i = input();
    i.default_user_password = Some("pw\n---\nx: y".into());
    i.ssh_authorized_key = Some("ssh-ed25519 AAAA \"me\": #x".into());
    i.timezone = Some("Etc/GMT+5".into());
    i.cmds = hostile();
    i.bootcmds = hostile();
    i.env = hostile()
        .into_iter()
        .enumerate()
        .map(|(n, v)| (format!("V_{n}"), v))
        .collect();
    i
}

/// The real cloud-init (Debian package `cloud-init`, 22.4 on Debian 12)
/// must accept what we write.
fn cloud_init(args: &[&str]) -> Output {
    Command::new("cloud-init")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run cloud-init ({e}): install it with \
                 `apt-get install -y --no-install-recommends cloud-init`"
            )
        })
}

#[test]
fn cloud_init_schema_accepts_vendor_data_and_default_user_data() {
    if !common::host_ready(&[CLOUD_INIT]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let full = render(&hostile_full_input(), SALT).unwrap();
    let minimal = render(&input(), SALT).unwrap();
    for (name, text) in [
        ("vendor-data-full", &full.vendor_data),
        ("vendor-data-minimal", &minimal.vendor_data),
        ("user-data-default", &minimal.user_data),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let out = cloud_init(&["schema", "--config-file", path.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "cloud-init schema rejected {name}: {}{}\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // And the check is real: a wrong type is refused.
    let bad = dir.path().join("bad");
    std::fs::write(&bad, "#cloud-config\nruncmd: 5\n").unwrap();
    assert!(
        !cloud_init(&["schema", "--config-file", bad.to_str().unwrap()])
            .status
            .success()
    );
}

/// cloud-init's own YAML loader (PyYAML, YAML 1.1) reads back exactly the
/// inputs; serde_norway (YAML 1.2) is checked in the other tests.
#[test]
fn cloud_init_yaml_loader_reads_back_the_inputs() {
    if !common::host_ready(&[CLOUD_INIT]) {
        return;
    }
    // Make sure the package is there, for a clear message if not.
    assert!(cloud_init(&["--version"]).status.success());
    let i = hostile_full_input();
    let seed = render(&i, SALT).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let load = |text: &str| -> serde_json::Value {
        let path = dir.path().join("doc");
        std::fs::write(&path, text).unwrap();
        // /usr/bin/python3 is the interpreter cloud-init is installed for.
        let out = Command::new("/usr/bin/python3")
            .args([
                "-c",
                "import json, sys\n\
                 from cloudinit import util\n\
                 doc = util.load_yaml(open(sys.argv[1], encoding='utf-8').read())\n\
                 assert doc is not None, 'cloud-init could not load the YAML'\n\
                 sys.stdout.write(json.dumps(doc))",
                path.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    };

    let meta = load(&seed.meta_data);
    assert_eq!(meta["instance-id"], i.instance_id.as_str());
    assert_eq!(meta["local-hostname"], "web-1");

    let v = load(&seed.vendor_data);
    let list = |key: &str| -> Vec<String> {
        v[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(list("runcmd"), i.cmds);
    assert_eq!(list("bootcmd"), i.bootcmds);
    assert_eq!(list("ssh_authorized_keys"), [i.ssh_authorized_key.unwrap()]);
    assert_eq!(v["hostname"], "web-1");
    assert_eq!(v["timezone"], "Etc/GMT+5");
    assert_eq!(v["password"], sha512_crypt("pw\n---\nx: y", SALT).unwrap());
    assert_eq!(v["chpasswd"]["expire"], false);
    assert_eq!(v["ssh_pwauth"], false);
    assert_eq!(v["write_files"][0]["path"], ENV_SCRIPT_PATH);
    assert_eq!(v["write_files"][0]["permissions"], "0600");
    assert_eq!(v["write_files"][0]["owner"], "root:root");
    assert_eq!(
        v["write_files"][0]["content"].as_str(),
        env_script(&i.env).as_deref()
    );
    let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    assert_eq!(keys.len(), 9, "unexpected keys {keys:?}");
}

// SHA-512 crypt hashes against libc's crypt() (moved from src/cloudinit/password.rs).

fn perl_crypt(password: &str, setting: &str) -> String {
    // Perl's crypt() is libcrypt's (libxcrypt on Debian 12), the same code
    // PAM runs at login. perl-base is essential on Debian, so always present.
    let out = Command::new("perl")
        .args(["-e", "print crypt($ARGV[0], $ARGV[1])", password, setting])
        .output()
        .expect("perl must be installed (Debian package perl-base)");
    assert!(out.status.success(), "perl failed: {out:?}");
    String::from_utf8(out.stdout).expect("crypt output is ASCII")
}

/// The `$6$rounds=5000$<salt>$` prefix of a hash, used as crypt()'s setting.
fn setting_of(hash: &str) -> String {
    let mut parts: Vec<&str> = hash.split('$').collect();
    assert_eq!(parts.len(), 5, "unexpected hash shape {hash}");
    parts[4] = "";
    parts.join("$")
}

#[test]
fn random_salts_agree_with_libc_crypt() {
    if !common::host_ready(&[PERL]) {
        return;
    }
    // The trap this guards: hashes that sha-crypt verifies but libxcrypt
    // (and therefore login) rejects.
    for i in 0..8 {
        let password = format!("pass word {i} with ' and \" and $");
        let salt = random_salt().unwrap();
        let hash = sha512_crypt(&password, salt).unwrap();
        assert_eq!(perl_crypt(&password, &setting_of(&hash)), hash);
    }
}
