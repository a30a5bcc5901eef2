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
        for command in ["run", "validate", "exec", "signal", "version"] {
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
        &["exec", "web"],
        &["exec", "web", "ls"],
        &["signal", "web"],
    ] {
        let output = run(args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(output.stdout.is_empty(), "{args:?}");
    }
}

/// `exec` and `signal` without a `run` to talk to, or with a control
/// directory someone else planted: a clear error and exit code 1, and
/// nothing is connected to or created.
#[test]
fn exec_and_signal_need_a_run_and_refuse_hostile_control_dirs() {
    use std::os::unix::fs::PermissionsExt;
    let temp = tempfile::tempdir().expect("tempdir");
    let with_base = |base: &std::path::Path, args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_nomad-driver-virt"))
            .env_remove(MAGIC_COOKIE_KEY)
            .env("NOMAD_DRIVER_VIRT_CONTROL_DIR", base)
            .args(args)
            .output()
            .expect("run the binary")
    };
    let missing = temp.path().join("none");
    for args in [
        &["exec", "web", "--", "true"][..],
        &["signal", "web", "SIGHUP"],
    ] {
        let output = with_base(&missing, args);
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        let stderr = text(&output.stderr);
        assert!(
            stderr.contains("no running `nomad-driver-virt run` owns a task named \"web\"")
                && stderr.contains(&missing.display().to_string()),
            "{stderr}"
        );
        assert!(!missing.exists(), "clients create nothing");
    }

    // A base that is a link, or others may write into, is not trusted.
    let elsewhere = temp.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).expect("mkdir");
    std::fs::set_permissions(&elsewhere, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let link = temp.path().join("link");
    std::os::unix::fs::symlink(&elsewhere, &link).expect("symlink");
    let output = with_base(&link, &["exec", "web", "--", "true"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output.stderr).contains("is a symbolic link"),
        "{}",
        text(&output.stderr)
    );
    let open = temp.path().join("open");
    std::fs::create_dir(&open).expect("mkdir");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let output = with_base(&open, &["signal", "web", "SIGHUP"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output.stderr).contains("has mode 0777, not 0700"),
        "{}",
        text(&output.stderr)
    );
}
