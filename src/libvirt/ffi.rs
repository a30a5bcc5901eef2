//! The raw libvirt calls the `virt` crate (0.5) has no safe wrapper for,
//! each behind a small safe function. This is the only module of the crate
//! allowed to use `unsafe`.
//!
//! - domain lifecycle events: `virConnectDomainEventRegisterAny` /
//!   `virConnectDomainEventDeregisterAny`, with the C callbacks;
//! - DHCP leases: `virNetworkGetDHCPLeases`, copied into owned values;
//! - sparse uploads: `virStreamSendHole`.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::mpsc::Sender;

use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::Error;
use virt::network::Network;
use virt::stream::Stream;
use virt::sys;

use super::events::LifecycleEvent;

// ---------------------------------------------------------------------------
// Domain lifecycle events
// ---------------------------------------------------------------------------

/// Subscribes `sink` to lifecycle events of every domain on `conn` and
/// returns libvirt's callback id. libvirt owns `sink` from then on and
/// drops it after [`deregister_domain_events`] (or when the connection
/// closes), so the receiver sees the channel disconnect.
pub(crate) fn register_domain_lifecycle(
    conn: &Connect,
    sink: Sender<LifecycleEvent>,
) -> Result<c_int, Error> {
    let opaque = Box::into_raw(Box::new(sink)).cast::<c_void>();
    let callback: sys::virConnectDomainEventCallback = Some(lifecycle_callback);
    // SAFETY: libvirt's registration API takes a "generic" callback type and
    // casts it back to the per-event signature according to the event id
    // (the C API documents this; VIR_DOMAIN_EVENT_CALLBACK does the same
    // cast). For VIR_DOMAIN_EVENT_ID_LIFECYCLE the real signature is
    // `virConnectDomainEventCallback`, which `lifecycle_callback` has. Both
    // are `Option<extern "C" fn>` of the same size.
    let generic = unsafe {
        std::mem::transmute::<
            sys::virConnectDomainEventCallback,
            sys::virConnectDomainEventGenericCallback,
        >(callback)
    };
    // SAFETY: `conn` is a live connection for the duration of the call; a
    // null domain means "all domains"; `opaque` is a valid
    // `Box<Sender<LifecycleEvent>>` that libvirt hands unchanged to
    // `lifecycle_callback` and, exactly once, to `free_sink` after the
    // registration is removed (deregistration or connection teardown).
    let callback_id = unsafe {
        sys::virConnectDomainEventRegisterAny(
            conn.as_ptr(),
            ptr::null_mut(),
            sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE as c_int,
            generic,
            opaque,
            Some(free_sink),
        )
    };
    if callback_id < 0 {
        let error = Error::last_error();
        // SAFETY: on failure libvirt does not keep the opaque and does not
        // call the free callback (its error paths pass doFreeCb = false), so
        // ownership of the box is still ours.
        drop(unsafe { Box::from_raw(opaque.cast::<Sender<LifecycleEvent>>()) });
        return Err(error);
    }
    Ok(callback_id)
}

/// Removes a registration made by [`register_domain_lifecycle`] on the same
/// connection. The caller must call this at most once per callback id (a
/// second call would fail with a libvirt error, not misbehave).
pub(crate) fn deregister_domain_events(conn: &Connect, callback_id: c_int) -> Result<(), Error> {
    // SAFETY: `conn` is a live connection (borrowed for the call); libvirt
    // checks `callback_id` against its own table and fails cleanly for an
    // unknown id. libvirt takes over freeing the opaque via `free_sink`.
    let rc = unsafe { sys::virConnectDomainEventDeregisterAny(conn.as_ptr(), callback_id) };
    if rc < 0 {
        Err(Error::last_error())
    } else {
        Ok(())
    }
}

/// Copies a C string libvirt owns; `None` for a null pointer.
///
/// # Safety
/// `ptr` is null or points to a NUL-terminated string valid for this call.
unsafe fn copy_c_string(ptr: *const c_char) -> Option<String> {
    if ptr.is_null() {
        return None;
    }
    // SAFETY: non-null and NUL-terminated per this function's contract.
    Some(
        unsafe { CStr::from_ptr(ptr) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// Reads the name and UUID of the domain libvirt passes to a callback.
///
/// # Safety
/// `dom` must be null or a valid domain pointer for the duration of the
/// call. The callback does not own a reference to it (libvirt frees it after
/// the callback returns), so this only borrows it: no `Domain` wrapper,
/// which would free it on drop.
unsafe fn domain_identity(dom: sys::virDomainPtr) -> (String, String) {
    if dom.is_null() {
        return (String::new(), String::new());
    }
    // SAFETY: `dom` is valid (caller's contract); the returned name is owned
    // by the domain object and stays valid while it does, and we copy it.
    let name = unsafe { copy_c_string(sys::virDomainGetName(dom)) }.unwrap_or_default();
    let mut buffer = [0 as c_char; sys::VIR_UUID_STRING_BUFLEN as usize];
    // SAFETY: the buffer has VIR_UUID_STRING_BUFLEN bytes, the size the API
    // requires; libvirt writes a NUL-terminated string into it on success.
    let rc = unsafe { sys::virDomainGetUUIDString(dom, buffer.as_mut_ptr()) };
    let uuid = if rc < 0 {
        String::new()
    } else {
        // SAFETY: on success the buffer holds a NUL-terminated string; the
        // buffer was zeroed, so it is terminated even if libvirt misbehaved.
        unsafe { copy_c_string(buffer.as_ptr()) }.unwrap_or_default()
    };
    (name, uuid)
}

/// The C callback for VIR_DOMAIN_EVENT_ID_LIFECYCLE. Never unwinds into C.
unsafe extern "C" fn lifecycle_callback(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: c_int,
    detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    let deliver = AssertUnwindSafe(|| {
        if opaque.is_null() {
            return;
        }
        // SAFETY: `opaque` is the `Box<Sender<LifecycleEvent>>` passed at
        // registration; libvirt frees it only after the registration is gone
        // and no callback runs, so it is valid here. `Sender` is only used
        // through `&` (it is Sync).
        let sink = unsafe { &*opaque.cast::<Sender<LifecycleEvent>>() };
        // SAFETY: libvirt passes a domain valid for the callback's duration.
        let (domain_name, domain_uuid) = unsafe { domain_identity(dom) };
        // A closed receiver means nobody listens any more; dropping is fine.
        let _ = sink.send(LifecycleEvent {
            domain_name,
            domain_uuid,
            event,
            detail,
        });
    });
    // Unwinding across the C frame would be undefined behaviour.
    let _ = catch_unwind(deliver);
    0
}

/// libvirt's free callback for the opaque. Never unwinds into C.
unsafe extern "C" fn free_sink(opaque: *mut c_void) {
    if opaque.is_null() {
        return;
    }
    // SAFETY: `opaque` is the pointer from `Box::into_raw` in
    // `register_domain_lifecycle`; libvirt calls this exactly once, after
    // the last callback using it, so we are its only owner now.
    let sink = unsafe { Box::from_raw(opaque.cast::<Sender<LifecycleEvent>>()) };
    let _ = catch_unwind(AssertUnwindSafe(move || drop(sink)));
}

// ---------------------------------------------------------------------------
// DHCP leases
// ---------------------------------------------------------------------------

/// One lease from `virNetworkGetDHCPLeases`, copied out of libvirt's memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawLease {
    /// Whether libvirt reports an IPv4 address (`VIR_IP_ADDR_TYPE_IPV4`).
    pub ipv4: bool,
    pub mac: Option<String>,
    pub ip: Option<String>,
    pub prefix: u32,
    pub hostname: Option<String>,
    /// Unix seconds; 0 means the lease never expires.
    pub expiry_unix: i64,
    pub iface: Option<String>,
}

/// Owns the array from `virNetworkGetDHCPLeases` and frees every entry and
/// then the array on drop, so no path out of [`network_dhcp_leases`] leaks.
struct LeaseArray {
    ptr: *mut sys::virNetworkDHCPLeasePtr,
    len: usize,
}

impl LeaseArray {
    fn entries(&self) -> impl Iterator<Item = &sys::_virNetworkDHCPLease> + '_ {
        (0..self.len).filter_map(move |i| {
            if self.ptr.is_null() {
                return None;
            }
            // SAFETY: `ptr` is non-null and libvirt gave it `len` slots
            // (the count it returned), so slot `i < len` is in bounds.
            let entry = unsafe { *self.ptr.add(i) };
            // SAFETY: a non-null slot points to a lease libvirt allocated;
            // it stays valid until our Drop frees it, and the returned
            // reference borrows `self`, so it cannot outlive that.
            unsafe { entry.as_ref() }
        })
    }
}

impl Drop for LeaseArray {
    fn drop(&mut self) {
        if self.ptr.is_null() {
            return;
        }
        for i in 0..self.len {
            // SAFETY: in bounds as in `entries`; each non-null entry is
            // freed exactly once, here, with libvirt's own free function.
            unsafe {
                let entry = *self.ptr.add(i);
                if !entry.is_null() {
                    sys::virNetworkDHCPLeaseFree(entry);
                }
            }
        }
        // SAFETY: libvirt allocated the array with the C allocator (it does
        // so even for zero leases) and documents freeing it with free();
        // it is freed once and never touched again.
        unsafe { libc::free(self.ptr.cast()) };
    }
}

/// The leases of `net`, optionally only those of `mac` (a MAC containing a
/// NUL byte matches nothing and yields an empty list).
pub(crate) fn network_dhcp_leases(
    net: &Network,
    mac: Option<&str>,
) -> Result<Vec<RawLease>, Error> {
    // A MAC with a NUL byte matches no lease.
    let Ok(mac) = mac.map(CString::new).transpose() else {
        return Ok(Vec::new());
    };
    let mut ptr: *mut sys::virNetworkDHCPLeasePtr = ptr::null_mut();
    let mac_ptr: *const c_char = mac.as_deref().map_or(ptr::null(), CStr::as_ptr);
    // SAFETY: `net` keeps its virNetworkPtr alive for the call; `mac_ptr` is
    // null or a NUL-terminated string that outlives the call; `ptr` is a
    // valid out-pointer; flags must be 0.
    let count = unsafe { sys::virNetworkGetDHCPLeases(net.as_ptr(), mac_ptr, &mut ptr, 0) };
    // Take ownership first so the array is freed whatever happens next.
    let leases = LeaseArray {
        ptr,
        len: usize::try_from(count).unwrap_or(0),
    };
    if count < 0 {
        // libvirt errors are per thread; read it before any other call.
        return Err(Error::last_error());
    }
    Ok(leases
        .entries()
        .map(|raw| {
            // SAFETY: the string fields of a lease libvirt returned are null
            // or NUL-terminated and live until the array is dropped, after
            // this copy.
            let (mac, ip, hostname, iface) = unsafe {
                (
                    copy_c_string(raw.mac),
                    copy_c_string(raw.ipaddr),
                    copy_c_string(raw.hostname),
                    copy_c_string(raw.iface),
                )
            };
            RawLease {
                ipv4: raw.type_ == sys::VIR_IP_ADDR_TYPE_IPV4 as c_int,
                mac,
                ip,
                prefix: raw.prefix,
                hostname,
                expiry_unix: raw.expirytime,
                iface,
            }
        })
        .collect())
}

// ---------------------------------------------------------------------------
// Streams
// ---------------------------------------------------------------------------

/// `virStreamSendHole`: tells the receiving end of a sparse upload that the
/// next `length` bytes are a hole.
pub(crate) fn stream_send_hole(stream: &Stream, length: i64) -> Result<(), Error> {
    // SAFETY: the stream pointer is valid while `stream` is borrowed;
    // virStreamSendHole takes no ownership and flags must be 0.
    let ret = unsafe { sys::virStreamSendHole(stream.as_ptr(), length, 0) };
    if ret < 0 {
        Err(Error::last_error())
    } else {
        Ok(())
    }
}

/// Owns the array from `virDomainInterfaceAddresses`: frees each interface
/// with libvirt's free function, then the array (virt 0.5's wrapper leaks
/// the interfaces).
struct RawInterfaces {
    ptr: *mut sys::virDomainInterfacePtr,
    len: usize,
}

impl RawInterfaces {
    fn interfaces(&self) -> impl Iterator<Item = &sys::_virDomainInterface> + '_ {
        (0..self.len).filter_map(move |i| {
            if self.ptr.is_null() {
                return None;
            }
            // SAFETY: `ptr` is non-null and libvirt filled `len` slots (the
            // count it returned), so slot `i < len` is in bounds.
            let entry = unsafe { *self.ptr.add(i) };
            // SAFETY: a non-null slot points to an interface libvirt
            // allocated; it lives until our Drop, and the reference borrows
            // `self`.
            unsafe { entry.as_ref() }
        })
    }
}

impl Drop for RawInterfaces {
    fn drop(&mut self) {
        if self.ptr.is_null() {
            return;
        }
        for i in 0..self.len {
            // SAFETY: in bounds as above; each non-null entry is freed once,
            // here, with libvirt's own function.
            unsafe {
                let entry = *self.ptr.add(i);
                if !entry.is_null() {
                    sys::virDomainInterfaceFree(entry);
                }
            }
        }
        // SAFETY: libvirt allocated the array with the C allocator and
        // documents free(); freed once and never used again.
        unsafe { libc::free(self.ptr.cast()) };
    }
}

fn raw_interface_addresses(dom: &Domain) -> Result<RawInterfaces, Error> {
    let mut ptr: *mut sys::virDomainInterfacePtr = ptr::null_mut();
    // SAFETY: `dom` keeps its pointer alive for the call; `ptr` is a valid
    // out-pointer; flags must be 0.
    let count = unsafe {
        sys::virDomainInterfaceAddresses(
            dom.as_ptr(),
            &mut ptr,
            sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT,
            0,
        )
    };
    // Own the array before anything else so it is freed on every path.
    let raw = RawInterfaces {
        ptr,
        len: usize::try_from(count).unwrap_or(0),
    };
    if count < 0 {
        return Err(Error::last_error());
    }
    Ok(raw)
}

/// One guest interface as the agent reports it, copied out of libvirt's
/// memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawInterface {
    pub name: Option<String>,
    pub hwaddr: Option<String>,
    /// (address text, prefix length).
    pub addresses: Vec<(String, u32)>,
}

fn interface_from_raw(raw: &sys::_virDomainInterface) -> RawInterface {
    // SAFETY: libvirt's strings are null or NUL-terminated and live until
    // the interface is freed, after this copy.
    let (name, hwaddr) = unsafe { (copy_c_string(raw.name), copy_c_string(raw.hwaddr)) };
    let count = usize::try_from(raw.naddrs).unwrap_or(0);
    let addresses = (0..count)
        .filter_map(|i| {
            if raw.addrs.is_null() {
                return None;
            }
            // SAFETY: `addrs` holds `naddrs` entries allocated by libvirt.
            let entry = unsafe { &*raw.addrs.add(i) };
            // SAFETY: as for the name above.
            let text = unsafe { copy_c_string(entry.addr) }?;
            Some((text, entry.prefix))
        })
        .collect();
    RawInterface {
        name,
        hwaddr,
        addresses,
    }
}

/// The guest's interfaces and addresses as its agent reports them
/// (`virDomainInterfaceAddresses` with the agent as source), copied into
/// owned values; libvirt's memory is freed before this returns.
pub(crate) fn agent_interface_addresses(dom: &Domain) -> Result<Vec<RawInterface>, Error> {
    let raw = raw_interface_addresses(dom)?;
    Ok(raw.interfaces().map(interface_from_raw).collect())
}
