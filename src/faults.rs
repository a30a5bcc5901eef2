//! Fault points for fault-injection tests (debug builds only; release builds
//! compile them away):
//! - `NOMAD_DRIVER_VIRT_CRASH_AT=<name>` aborts the process the moment it
//!   passes that point, as a SIGKILL would end it;
//! - `NOMAD_DRIVER_VIRT_PAUSE_AT=<name>[,<name>...]` with
//!   `NOMAD_DRIVER_VIRT_PAUSE_FILE=<path>` stops the calling thread the first
//!   time it passes each of those points: it writes the point's name to `<path>` and
//!   waits until the test removes the file (after restarting libvirtd,
//!   killing dnsmasq, ...). It gives up after five minutes.

/// The variable naming the point to crash at.
pub const CRASH_AT_ENV: &str = "NOMAD_DRIVER_VIRT_CRASH_AT";
/// The variable naming the point to pause at.
pub const PAUSE_AT_ENV: &str = "NOMAD_DRIVER_VIRT_PAUSE_AT";
/// The file a pause is announced in and lifted by removing.
pub const PAUSE_FILE_ENV: &str = "NOMAD_DRIVER_VIRT_PAUSE_FILE";

/// Aborts or pauses here when this point was asked for (debug builds only).
#[inline]
pub fn crash_point(name: &str) {
    #[cfg(debug_assertions)]
    {
        if std::env::var(CRASH_AT_ENV).is_ok_and(|wanted| wanted == name) {
            tracing::error!(point = name, "crashing on purpose ({CRASH_AT_ENV})");
            std::process::abort();
        }
        if std::env::var(PAUSE_AT_ENV).is_ok_and(|wanted| wanted.split(',').any(|w| w == name)) {
            pause(name);
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = name;
}

#[cfg(debug_assertions)]
fn pause(name: &str) {
    use std::sync::Mutex;
    use std::time::{Duration, Instant};
    static PAUSED: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let Some(file) = std::env::var_os(PAUSE_FILE_ENV) else {
        return;
    };
    // Once per point and process: a retry passing it again runs through.
    {
        let mut paused = PAUSED
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if paused.iter().any(|p| p == name) {
            return;
        }
        paused.push(name.to_string());
    }
    if let Err(error) = std::fs::write(&file, name) {
        tracing::error!(point = name, error = %error, "cannot announce the pause");
        return;
    }
    tracing::warn!(point = name, "pausing on purpose ({PAUSE_AT_ENV})");
    let deadline = Instant::now() + Duration::from_secs(300);
    while std::path::Path::new(&file).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    tracing::warn!(point = name, "pause lifted");
}
