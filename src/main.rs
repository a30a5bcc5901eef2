//! The `nomad-driver-virt` binary. Started by Nomad (magic cookie set) it
//! serves the plugin; otherwise it is a small CLI.

use std::process::ExitCode;

use clap::Parser as _;
use nomad_driver_virt::cli::{self, Cli, Command};
use nomad_driver_virt::driver::Driver;
use nomad_driver_virt::logging::{self, LogFormat};
use nomad_driver_virt::meta::PLUGIN_VERSION;
use nomad_driver_virt::plugin::{self, handshake};

fn main() -> ExitCode {
    match std::env::var(handshake::MAGIC_COOKIE_KEY) {
        Ok(cookie) => {
            if !handshake::cookie_matches(Some(&cookie)) {
                eprint!("{}", handshake::NOT_A_PLUGIN_MESSAGE);
                return ExitCode::from(1);
            }
            // Nomad passes no arguments we act on; none are parsed.
            let args: Vec<String> = std::env::args().skip(1).collect();
            serve_plugin(&args)
        }
        Err(_) => run_cli(),
    }
}

fn serve_plugin(args: &[String]) -> ExitCode {
    logging::init(LogFormat::HclogJson);
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

/// The CLI: clap prints help and version and exits 2 on usage errors.
fn run_cli() -> ExitCode {
    let cli = Cli::parse_from(cli::normalize_flags(std::env::args()));
    match cli.command {
        Some(Command::Version) => {
            println!("nomad-driver-virt {PLUGIN_VERSION}");
            ExitCode::SUCCESS
        }
        Some(Command::Run(args)) => {
            logging::init(LogFormat::Human);
            exit_code(cli::run::command(args))
        }
        Some(Command::Exec(args)) => {
            logging::init(LogFormat::Human);
            exit_code(cli::exec::exec_command(args))
        }
        Some(Command::Signal(args)) => {
            logging::init(LogFormat::Human);
            exit_code(cli::exec::signal_command(args))
        }
        Some(Command::Validate { files }) => {
            logging::init(LogFormat::Human);
            exit_code(cli::validate::command(&files))
        }
        None => {
            eprint!("{}", handshake::NOT_A_PLUGIN_MESSAGE);
            ExitCode::from(1)
        }
    }
}

/// A command's exit code as the process's; out-of-range codes become 1.
fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
