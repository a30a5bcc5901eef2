//! Crash points for fault-injection tests: with
//! `NOMAD_DRIVER_VIRT_CRASH_AT=<name>` set, a debug build aborts the
//! process the moment it passes that point, as a SIGKILL would end it.
//! Release builds compile the points away.

/// The variable naming the point to crash at.
pub const CRASH_AT_ENV: &str = "NOMAD_DRIVER_VIRT_CRASH_AT";

/// Aborts here when this point was asked for (debug builds only).
#[inline]
pub fn crash_point(name: &str) {
    #[cfg(debug_assertions)]
    if std::env::var(CRASH_AT_ENV).is_ok_and(|wanted| wanted == name) {
        tracing::error!(point = name, "crashing on purpose ({CRASH_AT_ENV})");
        std::process::abort();
    }
    #[cfg(not(debug_assertions))]
    let _ = name;
}
