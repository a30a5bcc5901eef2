//! libvirt domain lifecycle events delivered to a channel, so the driver
//! learns of stops, crashes and pauses as they happen instead of polling.
//!
//! virt 0.5 has no safe wrapper for `virConnectDomainEventRegisterAny`;
//! the raw calls and the C callbacks live in [`super::ffi`].
//!
//! libvirt invokes the callback on the thread running its default event loop
//! (started by [`crate::libvirt::conn::init_process`], which must run before
//! the connection is opened), one event at a time.

use std::ffi::c_int;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::Sender;

use virt::connect::Connect;
use virt::error::Error;

use super::ffi;

use super::lifecycle::DomainEvent;

/// One lifecycle event as libvirt delivered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleEvent {
    pub domain_name: String,
    /// Empty if libvirt could not format it (never seen in practice).
    pub domain_uuid: String,
    /// Raw `VIR_DOMAIN_EVENT_*` code.
    pub event: i32,
    /// Raw detail code; its meaning depends on `event`.
    pub detail: i32,
}

impl LifecycleEvent {
    /// The typed view of `event` and `detail`.
    pub fn kind(&self) -> DomainEvent {
        DomainEvent::from_raw(self.event, self.detail)
    }

    /// A short human description, e.g. "stopped (destroyed)".
    pub fn describe(&self) -> String {
        super::lifecycle::describe_event(self.event, self.detail)
    }
}

/// A live lifecycle-event registration. Deregisters on drop; libvirt then
/// drops the sink, so the receiver sees the channel disconnect.
#[derive(Debug)]
pub struct EventRegistration {
    callback_id: c_int,
    /// Keeps the connection open as long as the registration; `None` once
    /// deregistered.
    conn: Option<Connect>,
}

impl EventRegistration {
    /// libvirt's id for this callback.
    pub fn callback_id(&self) -> i32 {
        self.callback_id
    }

    /// Stops delivery. libvirt frees the sink once no callback is running
    /// (possibly a moment later, on the event-loop thread).
    pub fn deregister(mut self) -> Result<(), Error> {
        self.deregister_inner()
    }

    fn deregister_inner(&mut self) -> Result<(), Error> {
        let Some(conn) = self.conn.take() else {
            return Ok(());
        };
        // `conn` was still `Some`, so this id was not deregistered yet.
        let result = ffi::deregister_domain_events(&conn, self.callback_id);
        drop_connection_quietly(conn);
        result
    }
}

impl Drop for EventRegistration {
    fn drop(&mut self) {
        if let Err(error) = self.deregister_inner() {
            tracing::debug!(error = %error.message(), "deregistering libvirt lifecycle events failed");
        }
    }
}

/// virt's `Connect` panics in Drop when closing fails (a dead connection);
/// that must not escape a Drop of ours.
fn drop_connection_quietly(conn: Connect) {
    if catch_unwind(AssertUnwindSafe(move || drop(conn))).is_err() {
        tracing::debug!("releasing a dead libvirt connection reported an error");
    }
}

/// Subscribes `sink` to lifecycle events of every domain on `conn`.
///
/// Events are hints: a lost connection loses events, so the driver
/// reconciles with `dom.state()` after a reconnect.
pub fn register_lifecycle_events(
    conn: &Connect,
    sink: Sender<LifecycleEvent>,
) -> Result<EventRegistration, Error> {
    let callback_id = ffi::register_domain_lifecycle(conn, sink)?;
    Ok(EventRegistration {
        callback_id,
        conn: Some(conn.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::libvirt::lifecycle::StopReason;
    use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
    use std::time::{Duration, Instant};

    const WAIT: Duration = Duration::from_secs(10);

    /// A private test-driver connection (test:///default is process-wide).
    fn private_connection() -> (tempfile::TempDir, Connect) {
        crate::libvirt::conn::init_process();
        let dir = tempfile::tempdir().expect("tempdir");
        let node = dir.path().join("node.xml");
        std::fs::write(&node, "<node></node>\n").expect("write node xml");
        let uri = format!("test://{}", node.display());
        let conn = Connect::open(Some(&uri)).expect("open test driver");
        (dir, conn)
    }

    fn domain_xml(name: &str) -> String {
        format!(
            "<domain type='test'><name>{name}</name><memory>65536</memory>\
             <os><type>hvm</type></os></domain>"
        )
    }

    /// Collects events for `name` until `done` matches one, or the wait ends.
    fn collect_until(
        rx: &Receiver<LifecycleEvent>,
        name: &str,
        done: impl Fn(&LifecycleEvent) -> bool,
    ) -> Vec<LifecycleEvent> {
        let deadline = Instant::now() + WAIT;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(event) if event.domain_name == name => {
                    let finished = done(&event);
                    seen.push(event);
                    if finished {
                        break;
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        seen
    }

    fn wait_for_disconnect(rx: &Receiver<LifecycleEvent>) -> Vec<LifecycleEvent> {
        let deadline = Instant::now() + WAIT;
        let mut stray = Vec::new();
        loop {
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_default();
            match rx.recv_timeout(left) {
                Ok(event) => stray.push(event),
                Err(RecvTimeoutError::Disconnected) => return stray,
                Err(RecvTimeoutError::Timeout) => {
                    panic!("sink was not freed after deregistration; got {stray:?}")
                }
            }
        }
    }

    #[test]
    fn lifecycle_sequence_arrives_in_order() {
        let (_dir, conn) = private_connection();
        let (tx, rx) = channel();
        let registration = register_lifecycle_events(&conn, tx).expect("register");
        assert!(registration.callback_id() >= 0);

        let dom = conn
            .define_domain_xml(&domain_xml("events-seq"))
            .expect("define");
        dom.create().expect("start");
        dom.destroy().expect("destroy");
        dom.undefine().expect("undefine");

        let seen = collect_until(&rx, "events-seq", |e| e.kind() == DomainEvent::Undefined);
        let kinds: Vec<DomainEvent> = seen.iter().map(LifecycleEvent::kind).collect();
        let wanted = [
            DomainEvent::Defined,
            DomainEvent::Started,
            DomainEvent::Stopped(StopReason::Destroyed),
            DomainEvent::Undefined,
        ];
        let mut rest = kinds.iter();
        for want in wanted {
            assert!(
                rest.any(|k| *k == want),
                "missing {want:?} in order; got {seen:?}"
            );
        }
        let uuid = dom.uuid_string().expect("uuid");
        assert!(seen.iter().all(|e| e.domain_uuid == uuid), "{seen:?}");
        eprintln!(
            "test driver sequence: {:?}",
            seen.iter()
                .map(|e| (e.event, e.detail, e.describe()))
                .collect::<Vec<_>>()
        );
        registration.deregister().expect("deregister");
    }

    #[test]
    fn pause_resume_and_guest_shutdown_arrive_typed() {
        let (_dir, conn) = private_connection();
        let (tx, rx) = channel();
        let _registration = register_lifecycle_events(&conn, tx).expect("register");
        let dom = conn
            .define_domain_xml(&domain_xml("events-pause"))
            .expect("define");
        dom.create().expect("start");
        dom.suspend().expect("suspend");
        dom.resume().expect("resume");
        dom.shutdown().expect("shutdown");
        let seen = collect_until(&rx, "events-pause", |e| {
            matches!(e.kind(), DomainEvent::Stopped(_))
        });
        eprintln!(
            "test driver sequence: {:?}",
            seen.iter()
                .map(|e| (e.event, e.detail, e.describe()))
                .collect::<Vec<_>>()
        );
        let kinds: Vec<DomainEvent> = seen.iter().map(LifecycleEvent::kind).collect();
        let mut rest = kinds.iter();
        for want in [
            DomainEvent::Started,
            DomainEvent::Suspended,
            DomainEvent::Resumed,
            DomainEvent::Stopped(StopReason::Shutdown),
        ] {
            assert!(rest.any(|k| *k == want), "missing {want:?}; got {seen:?}");
        }
        dom.undefine().expect("undefine");
    }

    #[test]
    fn nothing_arrives_after_deregistration_and_the_sink_is_freed() {
        let (_dir, conn) = private_connection();
        let (tx, rx) = channel();
        let registration = register_lifecycle_events(&conn, tx).expect("register");
        let dom = conn
            .define_domain_xml(&domain_xml("events-before"))
            .expect("define");
        let seen = collect_until(&rx, "events-before", |e| e.kind() == DomainEvent::Defined);
        assert_eq!(seen.len(), 1, "{seen:?}");

        registration.deregister().expect("deregister");
        let after = conn
            .define_domain_xml(&domain_xml("events-after"))
            .expect("define");
        after.create().expect("start");
        after.destroy().expect("destroy");
        dom.undefine().expect("undefine");

        let stray = wait_for_disconnect(&rx);
        assert!(stray.is_empty(), "events after deregistration: {stray:?}");
    }

    #[test]
    fn dropping_the_registration_and_connection_frees_the_sink() {
        let (_dir, conn) = private_connection();
        let (tx, rx) = channel();
        let registration = register_lifecycle_events(&conn, tx).expect("register");
        drop(registration);
        drop(conn);
        assert!(wait_for_disconnect(&rx).is_empty());
    }

    #[test]
    fn registration_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<EventRegistration>();
    }

    #[test]
    fn a_second_registration_on_one_connection_is_refused_and_its_sink_freed() {
        // libvirt refuses the same callback twice for one connection and
        // event id ("event callback already tracked"): one registration per
        // connection, fanned out by the caller.
        let (_dir, conn) = private_connection();
        let (tx1, rx1) = channel();
        let (tx2, rx2) = channel();
        let first = register_lifecycle_events(&conn, tx1).expect("register");
        let refused = register_lifecycle_events(&conn, tx2);
        assert!(refused.is_err(), "second registration accepted");
        // The failed registration's sink was freed by us, not leaked.
        assert_eq!(
            rx2.try_recv(),
            Err(std::sync::mpsc::TryRecvError::Disconnected)
        );
        // The first one still works.
        conn.define_domain_xml(&domain_xml("events-two"))
            .expect("define")
            .undefine()
            .expect("undefine");
        let seen = collect_until(&rx1, "events-two", |e| e.kind() == DomainEvent::Undefined);
        assert_eq!(
            seen.iter().map(LifecycleEvent::kind).collect::<Vec<_>>(),
            vec![DomainEvent::Defined, DomainEvent::Undefined]
        );
        drop(first);
        assert!(wait_for_disconnect(&rx1).is_empty());
    }

    #[test]
    fn separate_connections_register_independently() {
        let (_dir, conn) = private_connection();
        let other = Connect::open(Some(&conn.uri().expect("uri"))).expect("open again");
        let (tx1, rx1) = channel();
        let (tx2, rx2) = channel();
        let first = register_lifecycle_events(&conn, tx1).expect("register");
        let second = register_lifecycle_events(&other, tx2).expect("register");
        drop(first);
        assert!(wait_for_disconnect(&rx1).is_empty());
        second.deregister().expect("deregister");
        assert!(wait_for_disconnect(&rx2).is_empty());
    }
}
