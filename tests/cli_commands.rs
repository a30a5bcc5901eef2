//! The binary's command line without Nomad: version, help and usage errors
//! keep their exit codes (0, 0, 2) now that clap parses them.

use std::process::{Command, Output};

use nomad_driver_virt::plugin::handshake::MAGIC_COOKIE_KEY;

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nomad-driver-virt"))
        .env_remove(MAGIC_COOKIE_KEY)
        .args(args)
        .output()
        .expect("run the binary")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn version_in_every_spelling() {
    let expected = format!("nomad-driver-virt {}\n", env!("CARGO_PKG_VERSION"));
    for args in [&["version"][..], &["--version"], &["-v"]] {
        let output = run(args);
        assert_eq!(output.status.code(), Some(0), "{args:?}");
        assert_eq!(text(&output.stdout), expected, "{args:?}");
    }
}

#[test]
fn help_lists_the_commands() {
    for args in [&["help"][..], &["--help"], &["-h"]] {
        let output = run(args);
        assert_eq!(output.status.code(), Some(0), "{args:?}");
        let stdout = text(&output.stdout);
        for command in ["run", "validate", "version"] {
            assert!(stdout.contains(command), "{args:?}: {stdout}");
        }
    }
    let run_help = run(&["run", "--help"]);
    assert_eq!(run_help.status.code(), Some(0));
    let stdout = text(&run_help.stdout);
    for flag in ["--plugin-config", "--task", "--state-dir", "--verbose"] {
        assert!(stdout.contains(flag), "{stdout}");
    }
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["frobnicate"][..],
        &["run"],
        &["run", "a.hcl", "b.hcl"],
        &["run", "a.hcl", "--task"],
        &["run", "a.hcl", "--bogus"],
        &["validate"],
    ] {
        let output = run(args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(output.stdout.is_empty(), "{args:?}");
    }
}
