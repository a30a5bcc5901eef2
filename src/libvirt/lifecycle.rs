//! What libvirt's lifecycle events and domain states mean for a Nomad task:
//! pure tables from libvirt's numeric codes to typed events and to the exit
//! result the driver reports. No libvirt calls happen here.
//!
//! Rules the tables encode:
//! - only a domain that is really off (shut off or crashed) ends a task;
//!   paused, suspended or shutting-down domains keep running (libvirt pauses
//!   a guest on disk I/O errors, and the Go original wrongly ended the task);
//! - a guest that powers itself off, or obeys our ACPI request, exits 0;
//! - a domain killed by us after the stop timeout exits 0 with signal 9;
//! - anything killed or lost outside Nomad exits 1 with an error saying what.

use virt::domain::{DomainStateEnum, DomainStateReason, DomainStateReasonEnum};
use virt::enumutil::Enum;
use virt::sys;

/// A libvirt lifecycle event (`VIR_DOMAIN_EVENT_*`), typed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DomainEvent {
    Defined,
    Undefined,
    Started,
    /// Paused, e.g. by an I/O error or a user; the domain still exists and
    /// may resume, so this never ends a task.
    Suspended,
    Resumed,
    Stopped(StopReason),
    /// The guest finished shutting down; a `Stopped` event follows.
    Shutdown,
    PmSuspended,
    /// The guest panicked. What follows depends on the domain's `on_crash`
    /// policy (destroy → `Stopped(Crashed)`, restart, preserve), so the
    /// caller reconciles with the domain state.
    Crashed,
    /// An event number this table does not know.
    Other(i32),
}

/// Why a domain stopped, from a `Stopped` event detail or a shut-off state
/// reason (the two libvirt enums number their values differently).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StopReason {
    /// The guest powered off (by itself or after an ACPI request).
    Shutdown,
    /// The domain was destroyed (hard power-off).
    Destroyed,
    Crashed,
    Migrated,
    Saved,
    /// The hypervisor process failed.
    Failed,
    FromSnapshot,
    /// A reason this table does not know (raw libvirt code of whichever
    /// enum it came from).
    Other(i32),
}

// libvirt's enums are unsigned in the bindings, events arrive as C ints.
const EVENT_DEFINED: i32 = sys::VIR_DOMAIN_EVENT_DEFINED as i32;
const EVENT_UNDEFINED: i32 = sys::VIR_DOMAIN_EVENT_UNDEFINED as i32;
const EVENT_STARTED: i32 = sys::VIR_DOMAIN_EVENT_STARTED as i32;
const EVENT_SUSPENDED: i32 = sys::VIR_DOMAIN_EVENT_SUSPENDED as i32;
const EVENT_RESUMED: i32 = sys::VIR_DOMAIN_EVENT_RESUMED as i32;
const EVENT_STOPPED: i32 = sys::VIR_DOMAIN_EVENT_STOPPED as i32;
const EVENT_SHUTDOWN: i32 = sys::VIR_DOMAIN_EVENT_SHUTDOWN as i32;
const EVENT_PMSUSPENDED: i32 = sys::VIR_DOMAIN_EVENT_PMSUSPENDED as i32;
const EVENT_CRASHED: i32 = sys::VIR_DOMAIN_EVENT_CRASHED as i32;

const STOPPED_SHUTDOWN: i32 = sys::VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN as i32;
const STOPPED_DESTROYED: i32 = sys::VIR_DOMAIN_EVENT_STOPPED_DESTROYED as i32;
const STOPPED_CRASHED: i32 = sys::VIR_DOMAIN_EVENT_STOPPED_CRASHED as i32;
const STOPPED_MIGRATED: i32 = sys::VIR_DOMAIN_EVENT_STOPPED_MIGRATED as i32;
const STOPPED_SAVED: i32 = sys::VIR_DOMAIN_EVENT_STOPPED_SAVED as i32;
const STOPPED_FAILED: i32 = sys::VIR_DOMAIN_EVENT_STOPPED_FAILED as i32;
const STOPPED_FROM_SNAPSHOT: i32 = sys::VIR_DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT as i32;

const SHUTOFF_SHUTDOWN: i32 = sys::VIR_DOMAIN_SHUTOFF_SHUTDOWN as i32;
const SHUTOFF_DESTROYED: i32 = sys::VIR_DOMAIN_SHUTOFF_DESTROYED as i32;
const SHUTOFF_CRASHED: i32 = sys::VIR_DOMAIN_SHUTOFF_CRASHED as i32;
const SHUTOFF_MIGRATED: i32 = sys::VIR_DOMAIN_SHUTOFF_MIGRATED as i32;
const SHUTOFF_SAVED: i32 = sys::VIR_DOMAIN_SHUTOFF_SAVED as i32;
const SHUTOFF_FAILED: i32 = sys::VIR_DOMAIN_SHUTOFF_FAILED as i32;
const SHUTOFF_FROM_SNAPSHOT: i32 = sys::VIR_DOMAIN_SHUTOFF_FROM_SNAPSHOT as i32;

impl DomainEvent {
    /// Types a raw `(event, detail)` pair from a lifecycle callback.
    pub fn from_raw(event: i32, detail: i32) -> Self {
        match event {
            EVENT_DEFINED => DomainEvent::Defined,
            EVENT_UNDEFINED => DomainEvent::Undefined,
            EVENT_STARTED => DomainEvent::Started,
            EVENT_SUSPENDED => DomainEvent::Suspended,
            EVENT_RESUMED => DomainEvent::Resumed,
            EVENT_STOPPED => DomainEvent::Stopped(StopReason::from_stopped_detail(detail)),
            EVENT_SHUTDOWN => DomainEvent::Shutdown,
            EVENT_PMSUSPENDED => DomainEvent::PmSuspended,
            EVENT_CRASHED => DomainEvent::Crashed,
            other => DomainEvent::Other(other),
        }
    }

    /// Whether the event alone cannot tell if the domain still runs, so the
    /// caller should look at `dom.state()` (or whether the domain still
    /// exists): undefining a running domain only makes it transient, a crash
    /// may be followed by a restart, and unknown events are unknown.
    pub fn needs_reconcile(&self) -> bool {
        matches!(
            self,
            DomainEvent::Undefined | DomainEvent::Crashed | DomainEvent::Other(_)
        )
    }
}

impl StopReason {
    /// From the detail of a `VIR_DOMAIN_EVENT_STOPPED` event
    /// (`VIR_DOMAIN_EVENT_STOPPED_*`).
    pub fn from_stopped_detail(detail: i32) -> Self {
        match detail {
            STOPPED_SHUTDOWN => StopReason::Shutdown,
            STOPPED_DESTROYED => StopReason::Destroyed,
            STOPPED_CRASHED => StopReason::Crashed,
            STOPPED_MIGRATED => StopReason::Migrated,
            STOPPED_SAVED => StopReason::Saved,
            STOPPED_FAILED => StopReason::Failed,
            STOPPED_FROM_SNAPSHOT => StopReason::FromSnapshot,
            other => StopReason::Other(other),
        }
    }

    /// From the reason of a `VIR_DOMAIN_SHUTOFF` state
    /// (`VIR_DOMAIN_SHUTOFF_*`, which starts with UNKNOWN = 0).
    pub fn from_shutoff_reason(reason: i32) -> Self {
        match reason {
            SHUTOFF_SHUTDOWN => StopReason::Shutdown,
            SHUTOFF_DESTROYED => StopReason::Destroyed,
            SHUTOFF_CRASHED => StopReason::Crashed,
            SHUTOFF_MIGRATED => StopReason::Migrated,
            SHUTOFF_SAVED => StopReason::Saved,
            SHUTOFF_FAILED => StopReason::Failed,
            SHUTOFF_FROM_SNAPSHOT => StopReason::FromSnapshot,
            other => StopReason::Other(other),
        }
    }
}

/// The exit result to report to Nomad for a task whose domain ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitOutcome {
    pub exit_code: i32,
    pub signal: i32,
    /// Nomad's exit message: why the task failed, or how it was stopped
    /// when that is worth telling (a kill after the stop timeout).
    pub error: Option<String>,
}

impl ExitOutcome {
    fn clean() -> Self {
        ExitOutcome {
            exit_code: 0,
            signal: 0,
            error: None,
        }
    }

    fn failed(message: impl Into<String>) -> Self {
        ExitOutcome {
            exit_code: 1,
            signal: 0,
            error: Some(message.into()),
        }
    }

    fn killed(message: Option<&str>) -> Self {
        ExitOutcome {
            exit_code: 0,
            signal: SIGKILL,
            error: message.map(str::to_string),
        }
    }
}

/// Reported as the signal of a domain we destroyed: a VM has no signals, but
/// a hard power-off is what SIGKILL is to a process.
const SIGKILL: i32 = 9;

/// Maps how a domain stopped to its exit result.
///
/// `stop_requested`: Nomad asked to stop the task (StopTask/DestroyTask).
/// `forced`: we destroyed the domain ourselves because it did not shut down
/// within the stop timeout.
pub fn exit_for_stop(reason: StopReason, stop_requested: bool, forced: bool) -> ExitOutcome {
    match reason {
        // Powered off by the guest, on its own or on our ACPI request; this
        // also wins a race with our destroy.
        StopReason::Shutdown => ExitOutcome::clean(),
        StopReason::Destroyed if forced => {
            ExitOutcome::killed(Some("killed after the stop timeout"))
        }
        StopReason::Destroyed if stop_requested => ExitOutcome::killed(None),
        StopReason::Destroyed => ExitOutcome::failed("domain was destroyed outside Nomad"),
        // A crash or a hypervisor failure is reported even during a stop:
        // it is what happened, and the most useful thing to see.
        StopReason::Crashed => ExitOutcome::failed("the guest crashed and the domain stopped"),
        StopReason::Failed => {
            ExitOutcome::failed("the hypervisor process failed and the domain stopped")
        }
        // Any other way of stopping is fine when we asked for a stop.
        _ if forced => ExitOutcome::killed(Some("killed after the stop timeout")),
        _ if stop_requested => ExitOutcome::clean(),
        StopReason::Migrated => {
            ExitOutcome::failed("domain was migrated to another host outside Nomad")
        }
        StopReason::Saved => ExitOutcome::failed("domain was saved and stopped outside Nomad"),
        StopReason::FromSnapshot => {
            ExitOutcome::failed("domain was stopped by a snapshot revert outside Nomad")
        }
        StopReason::Other(code) => ExitOutcome::failed(format!(
            "domain stopped for a reason libvirt reports as {code}"
        )),
    }
}

/// The exit result for a domain that is gone (no longer defined nor running).
pub fn exit_for_vanished() -> ExitOutcome {
    ExitOutcome::failed("the domain disappeared from libvirt (undefined outside Nomad)")
}

/// The exit result for a domain left in the crashed state (`on_crash` =
/// preserve, or a crash while stopping).
fn exit_for_crashed_state() -> ExitOutcome {
    ExitOutcome::failed("the guest crashed (domain is in the crashed state)")
}

/// Reconciles with `virDomainGetState` after a reconnect or an ambiguous
/// event: `None` while the domain is still alive (running, blocked, paused,
/// shutting down, PM-suspended, or in a state we cannot interpret), else the
/// exit result. Takes raw libvirt codes (`VIR_DOMAIN_*` state and the
/// matching `VIR_DOMAIN_<STATE>_*` reason).
///
/// A paused domain (e.g. paused on an I/O error) must not end the task; the
/// caller logs it instead.
pub fn exit_for_state(
    state: u32,
    reason: i32,
    stop_requested: bool,
    forced: bool,
) -> Option<ExitOutcome> {
    match state {
        sys::VIR_DOMAIN_SHUTOFF => Some(exit_for_stop(
            StopReason::from_shutoff_reason(reason),
            stop_requested,
            forced,
        )),
        sys::VIR_DOMAIN_CRASHED => Some(exit_for_crashed_state()),
        // NOSTATE, RUNNING, BLOCKED, PAUSED, SHUTDOWN (in progress),
        // PMSUSPENDED, and anything unknown: not an exit.
        _ => None,
    }
}

/// [`exit_for_state`] for the typed result of virt's `Domain::state()`.
///
/// Note that virt 0.5's `state()` ignores a failing `virDomainGetState` and
/// then reports an unknown state (raw `u32::MAX`), which maps to `None`; a
/// caller that suspects the domain is gone should look it up.
pub fn exit_for_domain_state(
    state: DomainStateEnum,
    reason: DomainStateReasonEnum,
    stop_requested: bool,
    forced: bool,
) -> Option<ExitOutcome> {
    exit_for_state(
        state.to_raw(),
        raw_state_reason(reason),
        stop_requested,
        forced,
    )
}

/// The raw reason code behind virt's typed state reason.
pub fn raw_state_reason(reason: DomainStateReasonEnum) -> i32 {
    // The reasons are small enumerations; the casts cannot truncate.
    match reason {
        Enum::Known(known) => match known {
            DomainStateReason::NoState(r) => r.to_raw() as i32,
            DomainStateReason::Running(r) => r.to_raw() as i32,
            DomainStateReason::Blocked(r) => r.to_raw() as i32,
            DomainStateReason::Paused(r) => r.to_raw() as i32,
            DomainStateReason::Shutdown(r) => r.to_raw() as i32,
            DomainStateReason::Shutoff(r) => r.to_raw() as i32,
            DomainStateReason::Crashed(r) => r.to_raw() as i32,
            DomainStateReason::PMSuspended(r) => r.to_raw() as i32,
        },
        Enum::Unknown(raw) => raw,
    }
}

/// The exit result a lifecycle event implies by itself: `Some` only for
/// `Stopped`. Everything else keeps the task running; for the events where
/// [`DomainEvent::needs_reconcile`] is true the caller checks the state.
pub fn exit_for_event(
    event: DomainEvent,
    stop_requested: bool,
    forced: bool,
) -> Option<ExitOutcome> {
    match event {
        DomainEvent::Stopped(reason) => Some(exit_for_stop(reason, stop_requested, forced)),
        _ => None,
    }
}

/// A short human description of a raw lifecycle event, for logs and task
/// events (e.g. "suspended (I/O error)").
pub fn describe_event(event: i32, detail: i32) -> String {
    let (what, details): (&str, &[&str]) = match event {
        EVENT_DEFINED => ("defined", &["added", "updated", "renamed", "from snapshot"]),
        EVENT_UNDEFINED => ("undefined", &["removed", "renamed"]),
        EVENT_STARTED => (
            "started",
            &[
                "booted",
                "migrated",
                "restored",
                "from snapshot",
                "woken up",
                "recreated",
            ],
        ),
        EVENT_SUSPENDED => (
            "suspended",
            &[
                "paused",
                "migrated",
                "I/O error",
                "watchdog",
                "restored",
                "from snapshot",
                "API error",
                "post-copy",
                "post-copy failed",
                "guest shutdown",
            ],
        ),
        EVENT_RESUMED => (
            "resumed",
            &[
                "unpaused",
                "migrated",
                "from snapshot",
                "post-copy",
                "post-copy failed",
            ],
        ),
        EVENT_STOPPED => (
            "stopped",
            &[
                "shutdown",
                "destroyed",
                "crashed",
                "migrated",
                "saved",
                "failed",
                "from snapshot",
                "recreated",
            ],
        ),
        EVENT_SHUTDOWN => ("shutdown", &["finished", "by guest", "by host"]),
        EVENT_PMSUSPENDED => ("pm-suspended", &["memory", "disk"]),
        EVENT_CRASHED => ("crashed", &["panicked", "crashloaded"]),
        _ => return format!("event {event} (detail {detail})"),
    };
    match usize::try_from(detail).ok().and_then(|d| details.get(d)) {
        Some(detail_text) => format!("{what} ({detail_text})"),
        None => format!("{what} (detail {detail})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virt::domain::{DomainPausedReason, DomainRunningReason, DomainShutoffReason, DomainState};

    #[test]
    fn libvirt_event_numbers_are_the_documented_ones() {
        // Guard against a bindings change silently reshuffling the table.
        assert_eq!(
            [
                EVENT_DEFINED,
                EVENT_UNDEFINED,
                EVENT_STARTED,
                EVENT_SUSPENDED,
                EVENT_RESUMED,
                EVENT_STOPPED,
                EVENT_SHUTDOWN,
                EVENT_PMSUSPENDED,
                EVENT_CRASHED
            ],
            [0, 1, 2, 3, 4, 5, 6, 7, 8]
        );
        assert_eq!(
            [
                STOPPED_SHUTDOWN,
                STOPPED_DESTROYED,
                STOPPED_CRASHED,
                STOPPED_MIGRATED,
                STOPPED_SAVED,
                STOPPED_FAILED,
                STOPPED_FROM_SNAPSHOT
            ],
            [0, 1, 2, 3, 4, 5, 6]
        );
        assert_eq!(
            [
                SHUTOFF_SHUTDOWN,
                SHUTOFF_DESTROYED,
                SHUTOFF_CRASHED,
                SHUTOFF_MIGRATED,
                SHUTOFF_SAVED,
                SHUTOFF_FAILED,
                SHUTOFF_FROM_SNAPSHOT
            ],
            [1, 2, 3, 4, 5, 6, 7]
        );
    }

    #[test]
    fn every_event_maps() {
        let table = [
            (0, 0, DomainEvent::Defined),
            (1, 0, DomainEvent::Undefined),
            (2, 0, DomainEvent::Started),
            (3, 2, DomainEvent::Suspended),
            (4, 0, DomainEvent::Resumed),
            (5, 0, DomainEvent::Stopped(StopReason::Shutdown)),
            (5, 1, DomainEvent::Stopped(StopReason::Destroyed)),
            (5, 2, DomainEvent::Stopped(StopReason::Crashed)),
            (5, 3, DomainEvent::Stopped(StopReason::Migrated)),
            (5, 4, DomainEvent::Stopped(StopReason::Saved)),
            (5, 5, DomainEvent::Stopped(StopReason::Failed)),
            (5, 6, DomainEvent::Stopped(StopReason::FromSnapshot)),
            (5, 7, DomainEvent::Stopped(StopReason::Other(7))),
            (5, -1, DomainEvent::Stopped(StopReason::Other(-1))),
            (6, 2, DomainEvent::Shutdown),
            (7, 0, DomainEvent::PmSuspended),
            (8, 0, DomainEvent::Crashed),
            (9, 0, DomainEvent::Other(9)),
            (-3, 0, DomainEvent::Other(-3)),
        ];
        for (event, detail, expected) in table {
            assert_eq!(
                DomainEvent::from_raw(event, detail),
                expected,
                "({event}, {detail})"
            );
        }
    }

    #[test]
    fn shutoff_reasons_map_with_their_own_numbering() {
        let table = [
            (0, StopReason::Other(0)),
            (1, StopReason::Shutdown),
            (2, StopReason::Destroyed),
            (3, StopReason::Crashed),
            (4, StopReason::Migrated),
            (5, StopReason::Saved),
            (6, StopReason::Failed),
            (7, StopReason::FromSnapshot),
            (8, StopReason::Other(8)),
        ];
        for (reason, expected) in table {
            assert_eq!(StopReason::from_shutoff_reason(reason), expected);
        }
    }

    #[test]
    fn only_ambiguous_events_need_reconciling() {
        assert!(DomainEvent::Undefined.needs_reconcile());
        assert!(DomainEvent::Crashed.needs_reconcile());
        assert!(DomainEvent::Other(42).needs_reconcile());
        for event in [
            DomainEvent::Defined,
            DomainEvent::Started,
            DomainEvent::Suspended,
            DomainEvent::Resumed,
            DomainEvent::Stopped(StopReason::Shutdown),
            DomainEvent::Shutdown,
            DomainEvent::PmSuspended,
        ] {
            assert!(!event.needs_reconcile(), "{event:?}");
        }
    }

    fn outcome(exit_code: i32, signal: i32, error: Option<&str>) -> ExitOutcome {
        ExitOutcome {
            exit_code,
            signal,
            error: error.map(str::to_string),
        }
    }

    #[test]
    fn guest_shutdown_is_a_clean_exit_in_every_case() {
        for (requested, forced) in [(false, false), (true, false), (true, true), (false, true)] {
            assert_eq!(
                exit_for_stop(StopReason::Shutdown, requested, forced),
                outcome(0, 0, None)
            );
        }
    }

    #[test]
    fn destroy_depends_on_who_did_it() {
        assert_eq!(
            exit_for_stop(StopReason::Destroyed, true, true),
            outcome(0, 9, Some("killed after the stop timeout"))
        );
        assert_eq!(
            exit_for_stop(StopReason::Destroyed, true, false),
            outcome(0, 9, None)
        );
        assert_eq!(
            exit_for_stop(StopReason::Destroyed, false, false),
            outcome(1, 0, Some("domain was destroyed outside Nomad"))
        );
        // forced implies we destroyed it, whatever the other flag says
        assert_eq!(
            exit_for_stop(StopReason::Destroyed, false, true),
            outcome(0, 9, Some("killed after the stop timeout"))
        );
    }

    #[test]
    fn crashes_and_failures_always_fail() {
        for (requested, forced) in [(false, false), (true, false), (true, true)] {
            let crashed = exit_for_stop(StopReason::Crashed, requested, forced);
            assert_eq!((crashed.exit_code, crashed.signal), (1, 0));
            assert!(crashed
                .error
                .as_deref()
                .is_some_and(|e| e.contains("crashed")));
            let failed = exit_for_stop(StopReason::Failed, requested, forced);
            assert_eq!((failed.exit_code, failed.signal), (1, 0));
            assert!(failed
                .error
                .as_deref()
                .is_some_and(|e| e.contains("hypervisor process failed")));
        }
    }

    #[test]
    fn other_stops_fail_only_when_unrequested() {
        let cases = [
            (StopReason::Migrated, "migrated"),
            (StopReason::Saved, "saved"),
            (StopReason::FromSnapshot, "snapshot"),
            (StopReason::Other(8), "8"),
        ];
        for (reason, needle) in cases {
            let unrequested = exit_for_stop(reason, false, false);
            assert_eq!(unrequested.exit_code, 1, "{reason:?}");
            assert_eq!(unrequested.signal, 0);
            assert!(
                unrequested
                    .error
                    .as_deref()
                    .is_some_and(|e| e.contains(needle)),
                "{reason:?}: {unrequested:?}"
            );
            assert_eq!(exit_for_stop(reason, true, false), outcome(0, 0, None));
            assert_eq!(
                exit_for_stop(reason, true, true),
                outcome(0, 9, Some("killed after the stop timeout"))
            );
        }
    }

    #[test]
    fn vanished_domain_fails() {
        let vanished = exit_for_vanished();
        assert_eq!((vanished.exit_code, vanished.signal), (1, 0));
        assert!(vanished
            .error
            .as_deref()
            .is_some_and(|e| e.contains("disappeared")));
    }

    #[test]
    fn live_states_do_not_end_the_task() {
        use sys::*;
        let live = [
            (VIR_DOMAIN_NOSTATE, 0),
            (VIR_DOMAIN_RUNNING, VIR_DOMAIN_RUNNING_BOOTED as i32),
            (VIR_DOMAIN_RUNNING, VIR_DOMAIN_RUNNING_UNPAUSED as i32),
            (VIR_DOMAIN_BLOCKED, 0),
            (VIR_DOMAIN_PAUSED, VIR_DOMAIN_PAUSED_IOERROR as i32),
            (VIR_DOMAIN_PAUSED, VIR_DOMAIN_PAUSED_USER as i32),
            (VIR_DOMAIN_PAUSED, VIR_DOMAIN_PAUSED_CRASHED as i32),
            (VIR_DOMAIN_SHUTDOWN, VIR_DOMAIN_SHUTDOWN_USER as i32),
            (VIR_DOMAIN_PMSUSPENDED, 0),
            (99, 0),
            (u32::MAX, -1),
        ];
        for (state, reason) in live {
            for (requested, forced) in [(false, false), (true, false), (true, true)] {
                assert_eq!(
                    exit_for_state(state, reason, requested, forced),
                    None,
                    "state {state} reason {reason}"
                );
            }
        }
    }

    #[test]
    fn shutoff_state_maps_through_the_stop_table() {
        use sys::*;
        let cases = [
            (VIR_DOMAIN_SHUTOFF_SHUTDOWN, StopReason::Shutdown),
            (VIR_DOMAIN_SHUTOFF_DESTROYED, StopReason::Destroyed),
            (VIR_DOMAIN_SHUTOFF_CRASHED, StopReason::Crashed),
            (VIR_DOMAIN_SHUTOFF_MIGRATED, StopReason::Migrated),
            (VIR_DOMAIN_SHUTOFF_SAVED, StopReason::Saved),
            (VIR_DOMAIN_SHUTOFF_FAILED, StopReason::Failed),
            (VIR_DOMAIN_SHUTOFF_FROM_SNAPSHOT, StopReason::FromSnapshot),
            (VIR_DOMAIN_SHUTOFF_UNKNOWN, StopReason::Other(0)),
            (VIR_DOMAIN_SHUTOFF_DAEMON, StopReason::Other(8)),
        ];
        for (reason, stop) in cases {
            for (requested, forced) in [(false, false), (true, false), (true, true)] {
                assert_eq!(
                    exit_for_state(VIR_DOMAIN_SHUTOFF, reason as i32, requested, forced),
                    Some(exit_for_stop(stop, requested, forced))
                );
            }
        }
    }

    #[test]
    fn crashed_state_fails() {
        let crashed = exit_for_state(sys::VIR_DOMAIN_CRASHED, 1, false, false);
        assert!(crashed.is_some_and(|o| o.exit_code == 1 && o.error.is_some()));
        let crashed_while_stopping = exit_for_state(sys::VIR_DOMAIN_CRASHED, 0, true, true);
        assert!(crashed_while_stopping.is_some_and(|o| o.exit_code == 1));
    }

    #[test]
    fn typed_state_matches_raw_state() {
        let paused = exit_for_domain_state(
            Enum::Known(DomainState::Paused),
            Enum::Known(DomainStateReason::Paused(Enum::Known(
                DomainPausedReason::IOError,
            ))),
            false,
            false,
        );
        assert_eq!(paused, None);
        let running = exit_for_domain_state(
            Enum::Known(DomainState::Running),
            Enum::Known(DomainStateReason::Running(Enum::Known(
                DomainRunningReason::Booted,
            ))),
            false,
            false,
        );
        assert_eq!(running, None);
        let destroyed = exit_for_domain_state(
            Enum::Known(DomainState::Shutoff),
            Enum::Known(DomainStateReason::Shutoff(Enum::Known(
                DomainShutoffReason::Destroyed,
            ))),
            false,
            false,
        );
        assert_eq!(
            destroyed,
            Some(outcome(1, 0, Some("domain was destroyed outside Nomad")))
        );
        // what virt reports when virDomainGetState failed
        let failed_call =
            exit_for_domain_state(Enum::Unknown(u32::MAX), Enum::Unknown(-1), false, false);
        assert_eq!(failed_call, None);
        assert_eq!(
            raw_state_reason(Enum::Known(DomainStateReason::Shutoff(Enum::Unknown(42)))),
            42
        );
    }

    #[test]
    fn only_stopped_events_end_a_task() {
        assert_eq!(
            exit_for_event(DomainEvent::Stopped(StopReason::Shutdown), false, false),
            Some(outcome(0, 0, None))
        );
        assert_eq!(
            exit_for_event(DomainEvent::Stopped(StopReason::Destroyed), true, true),
            Some(outcome(0, 9, Some("killed after the stop timeout")))
        );
        for event in [
            DomainEvent::Defined,
            DomainEvent::Undefined,
            DomainEvent::Started,
            DomainEvent::Suspended,
            DomainEvent::Resumed,
            DomainEvent::Shutdown,
            DomainEvent::PmSuspended,
            DomainEvent::Crashed,
            DomainEvent::Other(77),
        ] {
            assert_eq!(exit_for_event(event, false, false), None, "{event:?}");
        }
    }

    #[test]
    fn descriptions_name_event_and_detail() {
        assert_eq!(describe_event(3, 2), "suspended (I/O error)");
        assert_eq!(describe_event(5, 1), "stopped (destroyed)");
        assert_eq!(describe_event(2, 0), "started (booted)");
        assert_eq!(describe_event(6, 2), "shutdown (by host)");
        assert_eq!(describe_event(5, 42), "stopped (detail 42)");
        assert_eq!(describe_event(5, -1), "stopped (detail -1)");
        assert_eq!(describe_event(40, 1), "event 40 (detail 1)");
    }
}
