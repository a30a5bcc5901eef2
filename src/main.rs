//! The `nomad-driver-virt` binary. Started by Nomad (magic cookie set) it
//! serves the plugin; otherwise it is a small CLI.

use std::process::ExitCode;

use nomad_driver_virt::cli;
use nomad_driver_virt::driver::{Driver, PLUGIN_VERSION};
use nomad_driver_virt::plugin::{self, handshake, hclog};

const USAGE: &str =
    "nomad-driver-virt: a Nomad task driver that runs virtual machines through libvirt

Nomad starts this binary from its plugin_dir; it is not meant to be run by hand
except through these commands:

  nomad-driver-virt run JOBFILE [--plugin-config FILE] [--task NAME]
                                run the job's virt tasks on this machine's
                                libvirt, as a Nomad client would (run --help)
  nomad-driver-virt validate JOBFILE
                                check the job's virt tasks without libvirt
  nomad-driver-virt version     print the plugin version
  nomad-driver-virt help        print this text
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match std::env::var(handshake::MAGIC_COOKIE_KEY) {
        Ok(cookie) => {
            if !handshake::cookie_matches(Some(&cookie)) {
                eprint!("{}", handshake::NOT_A_PLUGIN_MESSAGE);
                return ExitCode::from(1);
            }
            serve_plugin(&args)
        }
        Err(_) => run_cli(&args),
    }
}

fn serve_plugin(args: &[String]) -> ExitCode {
    hclog::init(hclog::LogFormat::HclogJson);
    if !args.is_empty() {
        tracing::warn!(args = ?args, "ignoring plugin arguments; this plugin takes none");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(error = %error, "cannot start the async runtime");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(plugin::serve(Driver::new()));
    let code = match result {
        Ok(()) => 0,
        Err(error) => {
            tracing::error!(error = %error, "plugin failed");
            1
        }
    };
    // Blocking libvirt calls may still be in flight; do not wait for them.
    std::process::exit(code)
}

fn run_cli(args: &[String]) -> ExitCode {
    match args.first().map(String::as_str) {
        Some("version" | "--version" | "-v") => {
            println!("nomad-driver-virt {PLUGIN_VERSION}");
            ExitCode::SUCCESS
        }
        Some("run") => {
            cli::init_logging();
            exit_code(cli::run::command(&args[1..]))
        }
        Some("validate") => {
            cli::init_logging();
            exit_code(cli::validate::command(&args[1..]))
        }
        Some("help" | "--help" | "-h") => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        None => {
            eprint!("{}", handshake::NOT_A_PLUGIN_MESSAGE);
            ExitCode::from(1)
        }
        Some(other) => {
            eprintln!("unknown command {other:?}\n\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

/// A command's exit code as the process's; out-of-range codes become 1.
fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
