//! The orchestrator against libvirt's `test:///` driver (a private node
//! per test, no root): start, rollback at every step, stop, recover,
//! destroy. A wrapper injects the faults the test driver cannot produce.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

use super::contract::{Resources, StartRequest};
use super::error::TaskError;
use super::journal::Journal;
use super::Tasks;
use crate::config::plugin::{DirectoryPool, Settings};
use crate::config::task::{DiskConfig, TaskConfig, TaskSpec};
use crate::hypervisor::libvirt::LibvirtHypervisor;
use crate::hypervisor::{
    CreatedDisk, DomainCounters, DomainState, HostFacts, Hypervisor, HypervisorError,
    SourceVolumeFacts, VolumeContent,
};
use crate::libvirt::domain_xml::DomainSpec;
use crate::libvirt::events::LifecycleEvent;
use crate::libvirt::host::OsDefaults;
use crate::libvirt::{Libvirt, LibvirtError};
use crate::net::iptables::Iptables;
use crate::net::libvirt::LibvirtNet;
use crate::net::{
    AllocatedPort, Attachment, Net, NetError, NetIntent, VmStartedBuildRequest,
    VmStartedBuildResponse, VmTerminatedTeardownRequest, VmTerminatedTeardownResponse,
};
use crate::nomad::driver_state::CreatedVolume;

const POOL: &str = "ndvtest-orchestrator";

/// A private test-driver node: one libvirt network with a bridge, no
/// domains, no pools (the start defines its pool).
struct TestNode {
    _dir: tempfile::TempDir,
    uri: String,
    pool_path: PathBuf,
}

fn test_node() -> TestNode {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = dir.path().join("node.xml");
    std::fs::write(
        &node,
        "<node>\n  <network>\n    <name>ndvtest-net</name>\n    \
         <bridge name='ndvtestbr0'/>\n    \
         <ip address='192.168.250.1' netmask='255.255.255.0'/>\n  </network>\n  \
         <network>\n    <name>ndvtest-net2</name>\n    \
         <bridge name='ndvtestbr1'/>\n    \
         <ip address='192.168.251.1' netmask='255.255.255.0'/>\n  </network>\n</node>\n",
    )
    .expect("write node.xml");
    TestNode {
        uri: format!("test://{}", node.display()),
        pool_path: dir.path().join("pool"),
        _dir: dir,
    }
}

impl TestNode {
    fn journal(&self) -> Journal {
        Journal::open(self._dir.path().join("journal")).expect("journal")
    }
}

fn settings(node: &TestNode) -> Arc<Settings> {
    Arc::new(Settings {
        libvirt_uri: node.uri.clone(),
        pools: vec![DirectoryPool {
            name: POOL.into(),
            path: node.pool_path.clone(),
        }],
        default_pool: POOL.into(),
        dhcp_timeout: Duration::from_millis(100),
        ..Settings::default()
    })
}

fn request(node: &TestNode, id: &str, with_network: bool) -> StartRequest {
    let config = TaskConfig {
        disk: Some(vec![
            DiskConfig {
                size: Some(crate::config::units::ByteSize(1 << 20)),
                primary: Some(true),
                ..DiskConfig::default()
            },
            DiskConfig {
                size: Some(crate::config::units::ByteSize(2 << 20)),
                format: Some("raw".into()),
                ..DiskConfig::default()
            },
        ]),
        network_interface: with_network.then(|| {
            serde_json::from_value(serde_json::json!([{ "bridge": { "name": "ndvtestbr0" } }]))
                .expect("network_interface")
        }),
        default_user_password: Some("s3cret-Passw0rd".into()),
        user_data: Some("#cloud-config\nruncmd: [echo token=ab12cd34]\n".into()),
        ..TaskConfig::default()
    };
    StartRequest {
        task_id: format!("alloc/web/{id}"),
        task_name: "web".into(),
        alloc_id: "alloc".into(),
        alloc_dir: node.pool_path.parent().expect("parent").join("alloc"),
        env: BTreeMap::from([("GREETING".to_string(), "hello".to_string())]),
        mounts: Vec::new(),
        resources: Resources {
            memory_mb: 128,
            ..Resources::default()
        },
        stdout_path: PathBuf::new(),
        config: TaskSpec::try_from(&config).expect("a valid config"),
    }
}

/// Which operation a fault hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// The n-th mutating hypervisor call (0-based) fails.
    HypervisorCall(usize),
    /// The network build after boot fails.
    NetworkBuild,
    /// libvirt answers that it has no `clean-traffic` filter, as a real
    /// libvirt without its nwfilter driver does (the test driver has
    /// network filters neither way).
    NoCleanTraffic,
    /// Just before an image is copied, the image file (the same inode the
    /// start checked) is truncated to 64 MiB, as a sibling task that can
    /// write it might.
    GrowImageBeforeCopy,
}

/// The real libvirt hypervisor on the test driver, plus what the test
/// driver cannot do: stream uploads (the seed) become empty volumes of the
/// same size, and an optional fault.
struct TestHypervisor {
    inner: LibvirtHypervisor,
    fault: Option<Fault>,
    mutating_calls: AtomicUsize,
    /// The shares of every domain defined, in order.
    defined_shares: Arc<std::sync::Mutex<Vec<Vec<crate::libvirt::domain_xml::ShareSpec>>>>,
}

impl TestHypervisor {
    fn new(libvirt: Libvirt, fault: Option<Fault>) -> Self {
        Self {
            inner: LibvirtHypervisor::new(libvirt),
            fault,
            mutating_calls: AtomicUsize::new(0),
            defined_shares: Arc::default(),
        }
    }

    /// Counts a mutating call and fails it when it is the chosen one.
    fn step(&self, operation: &str) -> Result<(), HypervisorError> {
        let call = self.mutating_calls.fetch_add(1, Ordering::SeqCst);
        if self.fault == Some(Fault::HypervisorCall(call)) {
            return Err(LibvirtError::Worker(format!(
                "injected fault in {operation} (call {call})"
            ))
            .into());
        }
        Ok(())
    }
}

impl Hypervisor for TestHypervisor {
    fn ping(&self) -> Result<(), HypervisorError> {
        self.inner.ping()
    }
    fn host_facts(&self) -> Result<HostFacts, HypervisorError> {
        self.inner.host_facts()
    }
    fn share_support(
        &self,
        domain_type: crate::libvirt::domain_xml::DomainType,
        arch: &str,
        machine: &str,
    ) -> Result<crate::libvirt::shares::ShareSupport, HypervisorError> {
        self.inner.share_support(domain_type, arch, machine)
    }
    fn prepare_pool(&self, pool: &DirectoryPool) -> Result<(), HypervisorError> {
        self.step("prepare_pool")?;
        self.inner.prepare_pool(pool)
    }
    fn prepare_ceph_pool(
        &self,
        pool: &crate::config::plugin::CephPool,
    ) -> Result<crate::libvirt::storage::rbd::RbdAccess, HypervisorError> {
        self.step("prepare_ceph_pool")?;
        self.inner.prepare_ceph_pool(pool)
    }
    fn rbd_source_volume(
        &self,
        pool: &crate::config::plugin::CephPool,
        name: &str,
    ) -> Result<u64, HypervisorError> {
        self.inner.rbd_source_volume(pool, name)
    }
    fn create_rbd_volume(
        &self,
        pool: &crate::config::plugin::CephPool,
        name: &str,
        content: crate::hypervisor::RbdContent<'_>,
    ) -> Result<crate::hypervisor::RbdMade, HypervisorError> {
        self.step("create_rbd_volume")?;
        self.inner.create_rbd_volume(pool, name, content)
    }
    fn pool_available(&self, pool: &str) -> Result<u64, HypervisorError> {
        self.inner.pool_available(pool)
    }
    fn nwfilter_exists(&self, name: &str) -> Result<Option<bool>, HypervisorError> {
        let answer = self.inner.nwfilter_exists(name)?;
        Ok(match self.fault {
            Some(Fault::NoCleanTraffic) => Some(false),
            _ => answer,
        })
    }
    fn create_volume(
        &self,
        pool: &str,
        name: &str,
        content: VolumeContent<'_>,
    ) -> Result<CreatedDisk, HypervisorError> {
        if let (Some(Fault::GrowImageBeforeCopy), VolumeContent::Copy { image, .. }) =
            (self.fault, &content)
        {
            use std::os::fd::AsRawFd;
            let path = format!("/proc/self/fd/{}", image.file().as_raw_fd());
            std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .and_then(|file| file.set_len(64 << 20))
                .expect("the sibling's write");
        }
        // A fault here hits after the volume exists, the nastier case.
        let content = match content {
            VolumeContent::Bytes { data, format } => VolumeContent::Empty {
                format,
                size: data.len() as u64,
                sparse: true,
            },
            other => other,
        };
        let path = self.inner.create_volume(pool, name, content)?;
        self.step("create_volume")?;
        Ok(path)
    }
    fn source_volume(&self, pool: &str, name: &str) -> Result<SourceVolumeFacts, HypervisorError> {
        self.inner.source_volume(pool, name)
    }
    fn os_defaults(
        &self,
        arch: Option<&str>,
        machine: Option<&str>,
        virt_type: &str,
    ) -> Result<Result<OsDefaults, String>, HypervisorError> {
        self.inner.os_defaults(arch, machine, virt_type)
    }
    fn delete_volume(&self, volume: &CreatedVolume) -> Result<(), HypervisorError> {
        self.inner.delete_volume(volume)
    }
    fn prune_unused_parents(
        &self,
        pools: &[String],
        idle: Duration,
    ) -> Result<Vec<String>, HypervisorError> {
        self.inner.prune_unused_parents(pools, idle)
    }
    fn domain_owner(&self, name: &str) -> Result<Option<String>, HypervisorError> {
        self.inner.domain_owner(name)
    }
    fn define_domain(&self, spec: &DomainSpec) -> Result<(), HypervisorError> {
        if let Ok(mut defined) = self.defined_shares.lock() {
            defined.push(spec.shares.clone());
        }
        self.inner.define_domain(spec)?;
        self.step("define_domain")
    }
    fn start_domain(&self, name: &str) -> Result<(), HypervisorError> {
        self.step("start_domain")?;
        self.inner.start_domain(name)
    }
    fn domain_state(&self, name: &str) -> Result<Option<DomainState>, HypervisorError> {
        self.inner.domain_state(name)
    }
    fn request_shutdown(&self, name: &str) -> Result<(), HypervisorError> {
        self.inner.request_shutdown(name)
    }
    fn power_off(&self, name: &str) -> Result<(), HypervisorError> {
        self.inner.power_off(name)
    }
    fn remove_domain(&self, name: &str) -> Result<(), HypervisorError> {
        self.inner.remove_domain(name)
    }
    fn domain_pool_volumes(
        &self,
        name: &str,
    ) -> Result<Option<Vec<CreatedVolume>>, HypervisorError> {
        self.inner.domain_pool_volumes(name)
    }
    fn counters(&self, name: &str) -> Result<Option<DomainCounters>, HypervisorError> {
        self.inner.counters(name)
    }
    fn guest_agent(&self, name: &str) -> Option<crate::guest_agent::GuestAgent> {
        self.inner.guest_agent(name)
    }
    fn subscribe_events(&self, sink: Sender<LifecycleEvent>) {
        self.inner.subscribe_events(sink);
    }
    fn connection_generation(&self) -> u64 {
        self.inner.connection_generation()
    }
}

/// The real `LibvirtNet` for attachments; the post-boot build (which needs
/// a DHCP server the test driver does not run) either fails on purpose or
/// reports no address.
/// Says "begun" on the first channel, then waits on the second.
type HeldBuild = std::sync::Mutex<Option<(Sender<()>, std::sync::mpsc::Receiver<()>)>>;

struct TestNet {
    inner: LibvirtNet,
    fail_build: bool,
    /// When set, the network build says it has begun on the first channel
    /// and waits for the second (a start held in its lease wait).
    hold_build: HeldBuild,
    builds: AtomicUsize,
    removed_intents: std::sync::Mutex<Vec<NetIntent>>,
}

impl Net for TestNet {
    fn init(&self) -> Result<(), NetError> {
        Ok(())
    }
    fn fingerprint(&self) -> BTreeMap<String, String> {
        self.inner.fingerprint()
    }
    fn attachments(
        &self,
        net_config: &[crate::net::config::NetworkInterface],
        ports: &[AllocatedPort],
        hwaddrs: &[String],
    ) -> Result<Vec<Attachment>, NetError> {
        self.inner.attachments(net_config, ports, hwaddrs)
    }
    fn vm_started_build(
        &self,
        request: &VmStartedBuildRequest,
        progress: &(dyn Fn(&str) + Sync),
    ) -> Result<VmStartedBuildResponse, NetError> {
        self.builds.fetch_add(1, Ordering::SeqCst);
        progress("Waiting for a DHCP lease (test)");
        let hold = self.hold_build.lock().ok().and_then(|mut hold| hold.take());
        if let Some((begun, release)) = hold {
            let _ = begun.send(());
            let _ = release.recv();
        }
        if self.fail_build {
            return Err(NetError::Invalid(
                "injected fault in the network build".into(),
            ));
        }
        Ok(VmStartedBuildResponse {
            driver_network: None,
            teardown_spec: crate::net::TeardownSpec {
                task_tag: request.task_tag.clone(),
                ..Default::default()
            },
        })
    }
    fn vm_terminated_teardown(
        &self,
        _request: &VmTerminatedTeardownRequest,
    ) -> Result<VmTerminatedTeardownResponse, NetError> {
        Ok(VmTerminatedTeardownResponse {})
    }
    fn remove_unfinished(&self, intent: &NetIntent) -> Result<(), NetError> {
        if let Ok(mut removed) = self.removed_intents.lock() {
            removed.push(intent.clone());
        }
        Ok(())
    }
}

struct Harness {
    node: TestNode,
    libvirt: Libvirt,
    observer: LibvirtHypervisor,
    net: Arc<TestNet>,
    tasks: Arc<Tasks>,
    /// [`TestHypervisor`]'s record of defined domains' shares.
    defined_shares: Arc<std::sync::Mutex<Vec<Vec<crate::libvirt::domain_xml::ShareSpec>>>>,
}

fn harness(fault: Option<Fault>) -> Harness {
    let node = test_node();
    let libvirt = Libvirt::new(node.uri.clone(), None);
    let net = Arc::new(TestNet {
        inner: LibvirtNet::new(libvirt.clone(), Iptables::host()),
        fail_build: fault == Some(Fault::NetworkBuild),
        hold_build: std::sync::Mutex::new(None),
        builds: AtomicUsize::new(0),
        removed_intents: std::sync::Mutex::new(Vec::new()),
    });
    let hypervisor = TestHypervisor::new(libvirt.clone(), fault);
    let defined_shares = hypervisor.defined_shares.clone();
    let tasks = Tasks::new(Arc::new(hypervisor), net.clone(), node.journal());
    Harness {
        defined_shares,
        observer: LibvirtHypervisor::new(libvirt.clone()),
        node,
        libvirt,
        net,
        tasks,
    }
}

impl Harness {
    fn domains(&self) -> Vec<String> {
        self.observer.domain_names().expect("list domains")
    }

    /// Volumes in the task pool; none when the pool was never made.
    fn volumes(&self) -> Vec<String> {
        self.observer.volume_names(POOL).unwrap_or_default()
    }

    fn running(&self, domain: &str) -> bool {
        matches!(
            self.observer.domain_state(domain),
            Ok(Some(DomainState { state, .. })) if state == virt_running()
        )
    }
}

/// `VIR_DOMAIN_RUNNING`.
fn virt_running() -> u32 {
    1
}

fn assert_nothing_left(harness: &Harness, context: &str) {
    assert_eq!(
        harness.domains(),
        Vec::<String>::new(),
        "{context}: domains left"
    );
    assert_eq!(
        harness.volumes(),
        Vec::<String>::new(),
        "{context}: volumes left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_boots_and_destroy_removes_everything_twice_over() {
    let harness = harness(None);
    let settings = settings(&harness.node);
    let started = harness
        .tasks
        .start(request(&harness.node, "aaaa1111", true), settings)
        .await
        .expect("start");
    let domain = started.state.domain_name.clone();
    assert_eq!(domain, "web-aaaa1111");
    assert!(harness.running(&domain), "domain runs after start");
    assert_eq!(
        started.state.volumes.len(),
        3,
        "two disks and the seed: {:?}",
        started.state.volumes
    );
    let mut volumes = harness.volumes();
    volumes.sort();
    let mut recorded: Vec<String> = started
        .state
        .volumes
        .iter()
        .map(|v| v.name.clone())
        .collect();
    recorded.sort();
    assert_eq!(volumes, recorded, "the handle records exactly what exists");
    assert_eq!(harness.net.builds.load(Ordering::SeqCst), 1);
    assert_eq!(
        started.state.net.as_ref().map(|spec| spec.task_tag.clone()),
        Some(crate::net::iptables::task_tag("alloc/web/aaaa1111"))
    );

    let status = harness
        .tasks
        .inspect("alloc/web/aaaa1111")
        .expect("inspect");
    assert!(status.exit.is_none(), "running: {status:?}");
    assert_eq!(status.domain_name, domain);

    let again = harness
        .tasks
        .start(
            request(&harness.node, "aaaa1111", true),
            self::settings(&harness.node),
        )
        .await
        .expect_err("a second start of the same task");
    assert!(matches!(again, TaskError::Conflict(_)), "{again}");

    let running = harness.tasks.destroy("alloc/web/aaaa1111", false).await;
    assert!(
        matches!(running, Err(TaskError::Conflict(_))),
        "destroying a running task needs force"
    );
    harness
        .tasks
        .destroy("alloc/web/aaaa1111", true)
        .await
        .expect("destroy");
    assert_nothing_left(&harness, "after destroy");
    harness
        .tasks
        .destroy("alloc/web/aaaa1111", true)
        .await
        .expect("destroy is idempotent");
    assert!(matches!(
        harness.tasks.inspect("alloc/web/aaaa1111"),
        Err(TaskError::NotFound(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_at_every_step_of_start_leaves_nothing_behind() {
    // Mutating calls of one start: prepare the pool, two disks, the seed,
    // define, start. One more index proves the list is complete.
    let mut failed_steps = 0;
    for step in 0..7 {
        let harness = harness(Some(Fault::HypervisorCall(step)));
        let result = harness
            .tasks
            .start(
                request(&harness.node, "bbbb2222", false),
                settings(&harness.node),
            )
            .await;
        match result {
            Err(error) => {
                failed_steps += 1;
                assert!(
                    error.recoverable(),
                    "step {step}: a host fault is worth retrying: {error}"
                );
                assert!(
                    error.to_string().contains("injected fault"),
                    "step {step}: {error}"
                );
                assert_nothing_left(&harness, &format!("fault at step {step}"));
                assert!(matches!(
                    harness.tasks.inspect("alloc/web/bbbb2222"),
                    Err(TaskError::NotFound(_))
                ));
            }
            Ok(started) => {
                assert_eq!(
                    step, 6,
                    "only a fault past the last step lets the start succeed"
                );
                assert!(harness.running(&started.state.domain_name));
                harness
                    .tasks
                    .destroy("alloc/web/bbbb2222", true)
                    .await
                    .expect("destroy");
                assert_nothing_left(&harness, "after the successful start");
            }
        }
    }
    assert_eq!(failed_steps, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_network_build_rolls_the_vm_back() {
    let harness = harness(Some(Fault::NetworkBuild));
    let error = harness
        .tasks
        .start(
            request(&harness.node, "cccc3333", true),
            settings(&harness.node),
        )
        .await
        .expect_err("network build fails");
    assert!(error.to_string().contains("network build"), "{error}");
    assert!(
        !error.recoverable(),
        "an invalid network config is not retried"
    );
    assert_eq!(harness.net.builds.load(Ordering::SeqCst), 1);
    // What the journal's intent names goes too (a lease that came after
    // the wait, a reservation whose removal failed), as a successor would.
    let intents = harness.net.removed_intents.lock().expect("lock").clone();
    let task_id = "alloc/web/cccc3333";
    assert_eq!(intents.len(), 1, "{intents:?}");
    assert_eq!(intents[0].task_tag, crate::net::iptables::task_tag(task_id));
    assert_eq!(
        intents[0]
            .interfaces
            .iter()
            .map(|(_, mac)| mac.clone())
            .collect::<Vec<_>>(),
        vec![crate::net::mac_for(task_id, 0)]
    );
    assert_nothing_left(&harness, "after the network fault");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_before_anything_is_created() {
    let harness = harness(None);
    let mut no_disks = request(&harness.node, "dddd4444", false);
    no_disks.config.disks.clear();
    let error = harness
        .tasks
        .start(no_disks, settings(&harness.node))
        .await
        .expect_err("no disk");
    assert!(error.to_string().starts_with("disk:"), "{error}");
    let mut unknown_pool = request(&harness.node, "dddd4444", false);
    unknown_pool.config.disks[1].pool =
        Some(crate::config::names::ObjectName::parse("elsewhere").expect("name"));
    let error = harness
        .tasks
        .start(unknown_pool, settings(&harness.node))
        .await
        .expect_err("unknown pool");
    assert!(error.to_string().contains("disk[1].pool"), "{error}");
    assert!(!error.recoverable());
    assert_nothing_left(&harness, "after refused starts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_ends_the_task_and_wait_reports_how() {
    let harness = harness(None);
    harness
        .tasks
        .start(
            request(&harness.node, "eeee5555", false),
            settings(&harness.node),
        )
        .await
        .expect("start");
    harness
        .tasks
        .stop("alloc/web/eeee5555", Duration::from_secs(2), "SIGTERM")
        .await
        .expect("stop");
    let exit = tokio::time::timeout(
        Duration::from_secs(15),
        harness.tasks.wait("alloc/web/eeee5555"),
    )
    .await
    .expect("wait answers after a stop")
    .expect("known task");
    // The test driver powers off on ACPI at once: a clean exit.
    assert_eq!((exit.exit_code, exit.signal), (0, 0), "{exit:?}");
    assert!(!harness.running("web-eeee5555"));
    harness
        .tasks
        .stop("alloc/web/eeee5555", Duration::from_secs(1), "SIGTERM")
        .await
        .expect("stopping a stopped task is fine");
    harness
        .tasks
        .destroy("alloc/web/eeee5555", false)
        .await
        .expect("destroy after stop");
    assert_nothing_left(&harness, "after stop and destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_powers_off_without_asking_the_guest() {
    let harness = harness(None);
    harness
        .tasks
        .start(
            request(&harness.node, "ffff6666", false),
            settings(&harness.node),
        )
        .await
        .expect("start");
    harness
        .tasks
        .stop("alloc/web/ffff6666", Duration::from_secs(30), "SIGKILL")
        .await
        .expect("stop");
    let exit = harness
        .tasks
        .wait("alloc/web/ffff6666")
        .await
        .expect("wait");
    assert_eq!((exit.exit_code, exit.signal), (0, 9), "{exit:?}");
    harness
        .tasks
        .destroy("alloc/web/ffff6666", false)
        .await
        .expect("destroy");
    assert_nothing_left(&harness, "after kill and destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_plugin_recovers_the_task_and_sees_it_end() {
    let harness = harness(None);
    let started = harness
        .tasks
        .start(
            request(&harness.node, "abab7777", false),
            settings(&harness.node),
        )
        .await
        .expect("start");
    let state = crate::nomad::driver_state::DriverState::decode(&started.state.encode())
        .expect("the handle round-trips");

    // A second orchestrator on the same node stands in for the restarted plugin.
    let restarted = Tasks::new(
        Arc::new(LibvirtHypervisor::new(harness.libvirt.clone())),
        harness.net.clone(),
        harness.node.journal(),
    );
    restarted.recover(state.clone()).await.expect("recover");
    restarted
        .recover(state)
        .await
        .expect("recovering twice is fine");
    let status = restarted.inspect("alloc/web/abab7777").expect("inspect");
    assert!(status.exit.is_none(), "still running: {status:?}");

    // Powered off behind Nomad's back: the recovered task sees it.
    harness
        .observer
        .power_off("web-abab7777")
        .expect("power off");
    let exit = tokio::time::timeout(
        Duration::from_secs(15),
        restarted.wait("alloc/web/abab7777"),
    )
    .await
    .expect("the event reaches the recovered task")
    .expect("known task");
    assert_eq!(exit.exit_code, 1, "{exit:?}");
    assert!(
        exit.error
            .as_deref()
            .unwrap_or_default()
            .contains("outside Nomad"),
        "{exit:?}"
    );
    restarted
        .destroy("alloc/web/abab7777", false)
        .await
        .expect("destroy");
    assert_nothing_left(&harness, "after recover and destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovering_a_vanished_domain_reports_an_exit() {
    let harness = harness(None);
    let started = harness
        .tasks
        .start(
            request(&harness.node, "cdcd8888", false),
            settings(&harness.node),
        )
        .await
        .expect("start");
    harness
        .observer
        .remove_domain(&started.state.domain_name)
        .expect("remove");
    let restarted = Tasks::new(
        Arc::new(LibvirtHypervisor::new(harness.libvirt.clone())),
        harness.net.clone(),
        harness.node.journal(),
    );
    restarted.recover(started.state).await.expect("recover");
    let exit = restarted.wait("alloc/web/cdcd8888").await.expect("wait");
    assert_eq!(exit.exit_code, 1);
    assert!(
        exit.error
            .as_deref()
            .unwrap_or_default()
            .contains("disappeared"),
        "{exit:?}"
    );
    restarted
        .destroy("alloc/web/cdcd8888", false)
        .await
        .expect("destroy removes the volumes");
    assert_nothing_left(&harness, "after destroy of a vanished domain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_sample_a_running_task() {
    let harness = harness(None);
    harness
        .tasks
        .start(
            request(&harness.node, "efef9999", false),
            settings(&harness.node),
        )
        .await
        .expect("start");
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    let mut samples = harness
        .tasks
        .stats("alloc/web/efef9999", Duration::from_millis(50), stopped)
        .expect("stats");
    let first = samples.recv().await.expect("a sample");
    assert!(first.cpu_percent.is_finite() && first.cpu_percent >= 0.0);
    assert_eq!(first.memory_max_usage_bytes, 128 << 20, "{first:?}");
    harness
        .tasks
        .destroy("alloc/web/efef9999", true)
        .await
        .expect("destroy");
    assert!(
        tokio::time::timeout(Duration::from_secs(5), async {
            while samples.recv().await.is_some() {}
        })
        .await
        .is_ok(),
        "the stream ends with the task"
    );
    assert!(harness
        .tasks
        .stats(
            "alloc/web/efef9999",
            Duration::ZERO,
            tokio::sync::watch::channel(false).1
        )
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_starts_of_one_task_id_let_exactly_one_through() {
    for round in 0..5 {
        let harness = harness(None);
        let id = format!("aced{round:04}");
        let task_id = format!("alloc/web/{id}");
        let (first, second) = tokio::join!(
            harness
                .tasks
                .start(request(&harness.node, &id, false), settings(&harness.node)),
            harness
                .tasks
                .start(request(&harness.node, &id, false), settings(&harness.node)),
        );
        let (winner, loser) = match (first, second) {
            (Ok(won), Err(lost)) | (Err(lost), Ok(won)) => (won, lost),
            (first, second) => {
                panic!("round {round}: expected one success: {first:?} / {second:?}")
            }
        };
        assert!(matches!(loser, TaskError::Conflict(_)), "{loser}");
        assert!(loser.to_string().contains("being started"), "{loser}");
        // The loser removed nothing of the winner's.
        assert!(harness.running(&winner.state.domain_name), "round {round}");
        let mut volumes = harness.volumes();
        volumes.sort();
        let mut recorded: Vec<String> = winner
            .state
            .volumes
            .iter()
            .map(|v| v.name.clone())
            .collect();
        recorded.sort();
        assert_eq!(volumes, recorded, "round {round}");
        harness
            .tasks
            .destroy(&task_id, true)
            .await
            .expect("destroy");
        assert_nothing_left(&harness, "after the race");
    }
}

/// A domain as the Go driver leaves it: disks backed by pool volumes named
/// `<domain>_<dev>.img`, plus (as an operator might attach by hand) one
/// volume that is not the task's.
fn define_go_domain(harness: &Harness, domain: &str, volumes: &[&str]) {
    let disks: String = volumes
        .iter()
        .enumerate()
        .map(|(index, volume)| {
            format!(
                "<disk type='volume' device='disk'><driver name='qemu' type='raw'/>\
                 <source pool='{POOL}' volume='{volume}'/>\
                 <target dev='vd{}' bus='virtio'/></disk>",
                char::from(b'a' + index as u8)
            )
        })
        .collect();
    let xml = format!(
        "<domain type='test'><name>{domain}</name><memory unit='MiB'>128</memory>\
         <os><type>hvm</type></os><devices>{disks}</devices></domain>"
    );
    harness
        .libvirt
        .call_blocking(move |conn| {
            crate::libvirt::domain::define_domain(conn, domain, &xml)?;
            crate::libvirt::domain::start_domain(conn, domain)
        })
        .expect("Go-style domain runs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_go_domain_is_destroyed_with_only_its_own_volumes() {
    let harness = harness(None);
    harness
        .observer
        .prepare_pool(&DirectoryPool {
            name: POOL.into(),
            path: harness.node.pool_path.clone(),
        })
        .expect("pool");
    let empty = VolumeContent::Empty {
        format: crate::storage::images::ImageFormat::Raw,
        size: 1 << 20,
        sparse: true,
    };
    for name in [
        "web-1234abcd_vda.img",
        "web-1234abcd_sda.img",
        "operator-data.img",
        "other-5678_vda.img",
    ] {
        harness
            .observer
            .create_volume(POOL, name, empty)
            .expect("volume");
    }
    define_go_domain(
        &harness,
        "web-1234abcd",
        &[
            "web-1234abcd_vda.img",
            "operator-data.img",
            "web-1234abcd_sda.img",
        ],
    );
    assert_eq!(
        harness
            .observer
            .domain_pool_volumes("web-1234abcd")
            .expect("xml")
            .expect("domain exists")
            .len(),
        3
    );
    // What `go_handle::decode` makes of a Go handle: no volumes listed.
    let state = crate::nomad::driver_state::DriverState {
        version: crate::nomad::driver_state::DRIVER_STATE_VERSION,
        task_id: "alloc/web/1234abcd".into(),
        task_name: "web".into(),
        alloc_id: "alloc".into(),
        domain_name: crate::nomad::go_handle::go_domain_name("alloc/web/1234abcd"),
        started_at_unix_nanos: 0,
        volumes: Vec::new(),
        console_log: None,
        stdout_path: String::new(),
        net: None,
        guest_ip: None,
        origin: crate::nomad::driver_state::StateOrigin::GoDriver,
        guest_agent: false,
        signal_commands: Default::default(),
    };
    harness.tasks.recover(state).await.expect("recover");
    let status = harness
        .tasks
        .inspect("alloc/web/1234abcd")
        .expect("inspect");
    assert!(
        status.exit.is_none(),
        "adopted VM keeps running: {status:?}"
    );
    assert!(harness.running("web-1234abcd"));

    harness
        .tasks
        .destroy("alloc/web/1234abcd", true)
        .await
        .expect("destroy");
    assert_eq!(harness.domains(), Vec::<String>::new());
    let mut left = harness.volumes();
    left.sort();
    assert_eq!(left, ["operator-data.img", "other-5678_vda.img"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_plugin_removes_what_an_unfinished_task_left_and_only_that() {
    let harness = harness(None);
    let started = harness
        .tasks
        .start(
            request(&harness.node, "dead0001", true),
            settings(&harness.node),
        )
        .await
        .expect("start");
    // Another task's domain, defined by someone else under a name of ours.
    let foreign = harness
        .tasks
        .start(
            request(&harness.node, "a11e0002", false),
            settings(&harness.node),
        )
        .await
        .expect("second start");

    // The plugin dies; its successor is never told about "dead0001" (Nomad
    // lost it, or the start never returned) but recovers the other one.
    let successor = Tasks::new(
        Arc::new(LibvirtHypervisor::new(harness.libvirt.clone())),
        harness.net.clone(),
        harness.node.journal(),
    );
    successor
        .recover(foreign.state.clone())
        .await
        .expect("recover");
    // The dead plugin's records are not its own while it "lives": with
    // this test's process as the owner they are, as after a real restart.
    let removed = successor.remove_unfinished().await;
    assert_eq!(removed, vec!["alloc/web/dead0001".to_string()]);
    assert!(harness
        .observer
        .domain_state(&started.state.domain_name)
        .expect("state")
        .is_none());
    let left = harness.volumes();
    for volume in &started.state.volumes {
        assert!(!left.contains(&volume.name), "{} left", volume.name);
    }
    let intents = harness.net.removed_intents.lock().expect("lock").clone();
    assert_eq!(intents.len(), 1, "{intents:?}");
    assert_eq!(
        intents[0].task_tag,
        crate::net::iptables::task_tag("alloc/web/dead0001")
    );
    assert_eq!(
        intents[0].interfaces,
        vec![(
            "ndvtestbr0".to_string(),
            crate::net::mac_for("alloc/web/dead0001", 0)
        )]
    );
    assert!(
        harness.running(&foreign.state.domain_name),
        "the recovered task is untouched"
    );
    assert!(
        successor.remove_unfinished().await.is_empty(),
        "nothing more to do"
    );

    successor
        .destroy("alloc/web/a11e0002", true)
        .await
        .expect("destroy");
    assert_nothing_left(&harness, "after cleanup and destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_whose_metadata_names_another_task_is_never_removed() {
    let harness = harness(None);
    let started = harness
        .tasks
        .start(
            request(&harness.node, "0we00003", false),
            settings(&harness.node),
        )
        .await
        .expect("start");
    // A forged record claims that domain for another task id.
    let journal = harness.node.journal();
    let forged = journal
        .begin("alloc/other/0we00003", &started.state.domain_name)
        .expect("begin");
    forged
        .update(|record| record.domain_defined = true)
        .expect("update");
    let successor = Tasks::new(
        Arc::new(LibvirtHypervisor::new(harness.libvirt.clone())),
        harness.net.clone(),
        journal,
    );
    successor
        .recover(started.state.clone())
        .await
        .expect("recover");
    assert_eq!(
        successor.remove_unfinished().await,
        vec!["alloc/other/0we00003".to_string()]
    );
    assert!(
        harness.running(&started.state.domain_name),
        "not that record's domain"
    );
    successor
        .destroy("alloc/web/0we00003", true)
        .await
        .expect("destroy");
    assert_nothing_left(&harness, "after destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starting_again_over_an_unfinished_start_removes_its_leftovers_first() {
    let harness = harness(None);
    let first = harness
        .tasks
        .start(
            request(&harness.node, "fee10004", false),
            settings(&harness.node),
        )
        .await
        .expect("start");
    // The plugin died with the start unanswered; Nomad starts the same id again.
    let successor = Tasks::new(
        Arc::new(TestHypervisor::new(harness.libvirt.clone(), None)),
        harness.net.clone(),
        harness.node.journal(),
    );
    let second = successor
        .start(
            request(&harness.node, "fee10004", false),
            settings(&harness.node),
        )
        .await
        .expect("the retried start succeeds over the leftovers");
    assert_eq!(first.state.domain_name, second.state.domain_name);
    assert!(harness.running(&second.state.domain_name));
    assert_eq!(
        harness.volumes().len(),
        second.state.volumes.len(),
        "no leftover volumes"
    );
    successor
        .destroy("alloc/web/fee10004", true)
        .await
        .expect("destroy");
    assert_nothing_left(&harness, "after the retried start");
}

/// Exec and mapped signals fail fast, naming cause and fix, without an
/// agent (test:/// has none to answer); unmapped signals name
/// `signal_commands`; SIGKILL without an entry powers off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_and_signals_without_an_agent_fail_fast_and_say_why() {
    let harness = harness(None);
    let mut without = request(&harness.node, "abab1212", false);
    without.config.guest_agent = false;
    without.config.signal_commands =
        BTreeMap::from([("SIGHUP".to_string(), "touch /run/hup".to_string())]);
    harness
        .tasks
        .start(without, settings(&harness.node))
        .await
        .expect("start");
    let started = std::time::Instant::now();
    let error = harness
        .tasks
        .exec(
            "alloc/web/abab1212",
            vec!["true".into()],
            Duration::from_secs(5),
        )
        .await
        .expect_err("no agent");
    assert!(
        matches!(error, TaskError::AgentDisabled { .. }),
        "{error:?}"
    );
    assert!(
        error.to_string().contains("set guest_agent = true"),
        "{error}"
    );
    let error = harness
        .tasks
        .signal("alloc/web/abab1212", "SIGHUP")
        .await
        .expect_err("no agent");
    assert!(
        matches!(error, TaskError::AgentDisabled { .. }),
        "{error:?}"
    );
    let error = harness
        .tasks
        .signal("alloc/web/abab1212", "SIGUSR2")
        .await
        .expect_err("unmapped");
    assert!(error.to_string().contains("signal_commands"), "{error}");

    let with = request(&harness.node, "cdcd3434", false);
    assert!(with.config.guest_agent, "guest_agent defaults to true");
    harness
        .tasks
        .start(with, settings(&harness.node))
        .await
        .expect("start");
    let error = harness
        .tasks
        .exec(
            "alloc/web/cdcd3434",
            vec!["true".into()],
            Duration::from_secs(5),
        )
        .await
        .expect_err("the test driver has no agent");
    assert!(
        error
            .to_string()
            .contains("install and start qemu-guest-agent in the image"),
        "{error}"
    );
    assert!(started.elapsed() < Duration::from_secs(10), "fails fast");

    harness
        .tasks
        .signal("alloc/web/abab1212", "SIGKILL")
        .await
        .expect("SIGKILL powers off");
    let exit = tokio::time::timeout(
        Duration::from_secs(15),
        harness.tasks.wait("alloc/web/abab1212"),
    )
    .await
    .expect("exits")
    .expect("known");
    assert_eq!(exit.signal, 9, "{exit:?}");
    for id in ["alloc/web/abab1212", "alloc/web/cdcd3434"] {
        harness.tasks.destroy(id, true).await.expect("destroy");
    }
    assert_nothing_left(&harness, "after the agent checks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_data_file_over_the_limit_is_refused_before_anything_is_made() {
    let harness = harness(None);
    let mut request = request(&harness.node, "b16da7a0", false);
    let task_dir = request.alloc_dir.join(&request.task_name);
    std::fs::create_dir_all(&task_dir).expect("task dir");
    let big = task_dir.join("user-data.yaml");
    std::fs::write(
        &big,
        "#".repeat(crate::config::task::MAX_USER_DATA_BYTES + 1),
    )
    .expect("write");
    request.config.user_data = Some("user-data.yaml".into());
    let error = harness
        .tasks
        .start(request, settings(&harness.node))
        .await
        .expect_err("too big");
    let message = error.to_string();
    assert!(
        message.starts_with("user_data:") && message.contains("larger than"),
        "{message}"
    );
    assert!(
        !message.contains(&task_dir.display().to_string()),
        "no host path: {message}"
    );
    assert_nothing_left(&harness, "after the refused user_data");
}

/// Settings with an operator policy changed by `change`.
fn settings_with(
    node: &TestNode,
    change: impl FnOnce(&mut crate::config::plugin::Policy),
) -> Arc<Settings> {
    let mut settings = (*settings(node)).clone();
    change(&mut settings.policy);
    Arc::new(settings)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_settings_refuse_before_anything_is_created() {
    let harness = harness(None);
    let refused = |request: StartRequest, settings: Arc<Settings>| {
        let tasks = harness.tasks.clone();
        async move {
            let error = tasks.start(request, settings).await.expect_err("refused");
            assert!(!error.recoverable(), "{error}");
            error.to_string()
        }
    };

    // A libvirt network the operator did not list.
    let message = refused(
        request(&harness.node, "0a0a0001", true),
        settings_with(&harness.node, |policy| {
            policy.networks = Some(vec!["default".into()]);
        }),
    )
    .await;
    for part in [
        "network_interface[0].bridge.name:",
        "\"ndvtestbr0\"",
        "adding \"ndvtest-net\" to the plugin setting allow_networks would allow it",
    ] {
        assert!(message.contains(part), "{part} missing: {message}");
    }

    // A disk over max_disk_size (disk[1] is 2 MiB).
    let message = refused(
        request(&harness.node, "0a0a0002", false),
        settings_with(&harness.node, |policy| policy.max_disk_size = Some(1 << 20)),
    )
    .await;
    assert!(
        message.contains("disk[1].size: 2097152 bytes (2MiB)")
            && message.contains("max_disk_size = \"2MiB\" would allow it"),
        "{message}"
    );

    // A pool the operator keeps from jobs.
    let message = refused(
        request(&harness.node, "0a0a0003", false),
        settings_with(&harness.node, |policy| {
            policy.storage_pools = Some(Vec::new());
        }),
    )
    .await;
    assert!(
        message.contains(
            "disk[0].pool (unset: the default pool): storage pool \"ndvtest-orchestrator\""
        ) && message.contains("allow_storage_pools"),
        "{message}"
    );

    // macvtap passthrough, off by default.
    let mut passthrough = request(&harness.node, "0a0a0004", false);
    passthrough.config.network_interfaces =
        vec![crate::config::network::NetworkInterface::Macvtap(
            crate::config::network::MacvtapInterface {
                device: crate::config::names::InterfaceName::parse("ndvtest0").expect("name"),
                mode: crate::config::network::MacvtapMode::Passthrough,
            },
        )];
    let message = refused(
        passthrough,
        settings_with(&harness.node, |policy| {
            policy.macvtap_devices = Some(vec!["ndvtest0".into()]);
        }),
    )
    .await;
    assert!(
        message.contains("network_interface[0].macvtap.mode: \"passthrough\" is not allowed")
            && message.contains("allow_macvtap_modes"),
        "{message}"
    );

    assert_eq!(harness.net.builds.load(Ordering::SeqCst), 0);
    assert_nothing_left(&harness, "after refused starts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_larger_than_the_pools_free_space_is_refused_up_front() {
    let harness = harness(None);
    let mut huge = request(&harness.node, "f5eef5ee", false);
    // Far beyond what test:///'s pool reports free.
    huge.config.disks[1].size = Some(crate::config::units::ByteSize(1 << 60));
    let error = harness
        .tasks
        .start(huge, settings(&harness.node))
        .await
        .expect_err("too big for the pool");
    let message = error.to_string();
    assert!(
        message.starts_with("disk[1].size: 1152921504606846976 bytes")
            && message.contains("more than storage pool \"ndvtest-orchestrator\" has free"),
        "{message}"
    );
    assert!(!error.recoverable());
    assert_nothing_left(&harness, "after the refused disk");
}

/// Issue 9.8: disks that each fit their pool but together do not are
/// refused up front, naming every disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disks_that_together_overfill_their_pool_are_refused_up_front() {
    let harness = harness(None);
    harness
        .observer
        .prepare_pool(&DirectoryPool {
            name: POOL.into(),
            path: harness.node.pool_path.clone(),
        })
        .expect("pool");
    let available = harness.observer.pool_available(POOL).expect("free space");
    let half = available / 2 + 1;
    let mut request = request(&harness.node, "5a5a0001", false);
    for disk in &mut request.config.disks {
        disk.size = Some(crate::config::units::ByteSize(half));
    }
    let error = harness
        .tasks
        .start(request, settings(&harness.node))
        .await
        .expect_err("too big together");
    let message = error.to_string();
    assert!(
        message.starts_with("disk[0].size + disk[1].size together:")
            && message.contains("-byte cloud-init seed")
            && message.contains("more than storage pool \"ndvtest-orchestrator\" has free"),
        "{message}"
    );
    assert!(!error.recoverable());
    assert_nothing_left(&harness, "after the refused disks");
}

/// Issue 9.8: an image a sibling rewrites bigger between the start's size
/// check and the copy is refused at the copy, and the start leaves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_grown_between_check_and_copy_is_refused_and_leaves_nothing() {
    use crate::config::task::DiskSource;
    let harness = harness(Some(Fault::GrowImageBeforeCopy));
    let mut request = request(&harness.node, "6a0e0001", false);
    request.config.disks[1].source = Some(DiskSource::Image {
        path: "base.img".into(),
        format: None,
    });
    request.config.disks[1].size = None;
    let task_dir = request.alloc_dir.join("web");
    std::fs::create_dir_all(&task_dir).expect("task dir");
    std::fs::write(task_dir.join("base.img"), vec![1u8; 1 << 20]).expect("image");
    let error = harness
        .tasks
        .start(
            request,
            settings_with(&harness.node, |policy| policy.max_disk_size = Some(4 << 20)),
        )
        .await
        .expect_err("grown after the check");
    let message = error.to_string();
    assert!(
        message.starts_with("disk[1].source.image: image base.img grew after its size was checked")
            && message.contains("67108864 bytes, more than the 1048576 bytes checked"),
        "{message}"
    );
    assert!(!error.recoverable());
    assert_nothing_left(&harness, "after the grown image");
}

/// Issue 9.8: a disk on a Nomad volume (a loop device here) is the
/// volume: allow_storage_pools does not apply to it (only the seed goes to
/// the default pool, which the operator cannot forbid). Needs root and
/// losetup; skipped without them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_on_a_nomad_volume_is_not_held_to_storage_pools() {
    use std::process::Command;
    let harness = harness(None);
    let backing = harness.node.pool_path.with_file_name("ndvtest-volume.img");
    std::fs::write(&backing, vec![0u8; 1 << 20]).expect("backing file");
    let Some(device) = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&backing)
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
    else {
        // tests/ci.sh runs as root with host tests mandatory: no skip there.
        assert!(
            std::env::var_os("NOMAD_DRIVER_VIRT_HOST_TESTS").is_none(),
            "NOMAD_DRIVER_VIRT_HOST_TESTS is set, but `losetup --find --show` failed (run as root)"
        );
        eprintln!("skipped: losetup (root) is not available");
        return;
    };
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").args(["-d", &self.0]).output();
        }
    }
    let _detach = Detach(device.clone());
    let mut request = request(&harness.node, "0b0b0001", false);
    request.config.disks = TaskSpec::try_from(&TaskConfig {
        disk: Some(vec![DiskConfig {
            volume: Some("/dev/vdb".into()),
            ..DiskConfig::default()
        }]),
        ..TaskConfig::default()
    })
    .expect("valid")
    .disks;
    request.mounts = vec![crate::task::contract::Mount {
        host_path: device.clone().into(),
        task_path: "/dev/vdb".into(),
        read_only: false,
    }];
    let started = harness
        .tasks
        .start(
            request,
            settings_with(&harness.node, |policy| {
                policy.storage_pools = Some(Vec::new());
            }),
        )
        .await
        .expect("a disk on a Nomad volume uses no pool");
    let domain = started.state.domain_name.clone();
    let xml = harness
        .libvirt
        .call_blocking(|conn| crate::libvirt::domain::domain_xml(conn, &domain))
        .expect("domain xml")
        .expect("domain exists");
    assert!(
        xml.contains(&format!("dev=\"{device}\"")) || xml.contains(&format!("dev='{device}'")),
        "{xml}"
    );
    harness
        .tasks
        .destroy(&started.state.task_id, true)
        .await
        .expect("destroy");
    assert_nothing_left(&harness, "after destroy");
}

/// The clean-up of unfinished starts (run after a delay from plugin start,
/// and whenever it is asked again) never takes a start of this process that
/// is still running, e.g. one waiting for a slow guest's lease: before, a
/// start longer than the delay lost its VM under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_under_way_is_not_an_unfinished_start() {
    let harness = harness(None);
    let (begun_tx, begun_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel();
    *harness.net.hold_build.lock().expect("lock") = Some((begun_tx, release_rx));
    let tasks = harness.tasks.clone();
    let settings = settings(&harness.node);
    let request = request(&harness.node, "510w0001", true);
    let task_id = request.task_id.clone();
    let start = tokio::spawn(async move { tasks.start(request, settings).await });
    let begun = tokio::task::spawn_blocking(move || begun_rx.recv_timeout(Duration::from_secs(60)))
        .await
        .expect("join");
    if begun.is_err() {
        panic!(
            "the start never reached its network build: {:?}",
            start.await
        );
    }
    assert!(
        harness.node.journal().record(&task_id).is_some(),
        "the start has its record"
    );

    let removed = harness.tasks.remove_unfinished().await;
    assert!(removed.is_empty(), "removed a live start: {removed:?}");
    assert_eq!(harness.domains().len(), 1, "the VM being started stays");

    release_tx.send(()).expect("release");
    let started = start.await.expect("join").expect("the start finishes");
    assert!(harness.running(&started.state.domain_name));
    assert!(harness.tasks.remove_unfinished().await.is_empty());
    harness
        .tasks
        .destroy(&task_id, true)
        .await
        .expect("destroy");
    assert_nothing_left(&harness, "after destroy");
}

/// Issue 9.8: a disk cloned from `source.volume` is as big as the volume,
/// so the volume's capacity is held to max_disk_size (and the pool).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_volume_larger_than_max_disk_size_is_refused() {
    use crate::config::names::ObjectName;
    use crate::config::task::DiskSource;
    let harness = harness(None);
    harness
        .observer
        .prepare_pool(&DirectoryPool {
            name: POOL.into(),
            path: harness.node.pool_path.clone(),
        })
        .expect("pool");
    harness
        .observer
        .create_volume(
            POOL,
            "big-base.img",
            VolumeContent::Empty {
                format: crate::storage::images::ImageFormat::Raw,
                size: 8 << 20,
                sparse: true,
            },
        )
        .expect("the operator's volume");
    // The test driver keeps no files; the plain file a real pool holds.
    std::fs::create_dir_all(&harness.node.pool_path).expect("pool dir");
    std::fs::write(harness.node.pool_path.join("big-base.img"), [0u8; 4096]).expect("file");
    let mut request = request(&harness.node, "5a5a0002", false);
    request.config.disks[1].source = Some(DiskSource::Volume {
        name: ObjectName::parse("big-base.img").expect("name"),
        format: None,
    });
    request.config.disks[1].size = None;
    let error = harness
        .tasks
        .start(
            request,
            settings_with(&harness.node, |policy| policy.max_disk_size = Some(4 << 20)),
        )
        .await
        .expect_err("the clone would be 8 MiB");
    let message = error.to_string();
    assert!(
        message.starts_with("disk[1].source.volume (the volume's capacity): 8388608 bytes (8MiB)")
            && message.contains("max_disk_size = \"8MiB\" would allow it"),
        "{message}"
    );
    assert_eq!(harness.volumes(), vec!["big-base.img".to_string()]);
    assert!(harness.domains().is_empty());
}

/// Issue 9.9: without the clean-traffic filter a start on a libvirt
/// network is refused up front, naming the setting and the fix; macvtap-
/// or network-less starts and clean_traffic = false are not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_on_a_network_is_refused_when_libvirt_lacks_clean_traffic() {
    let harness = harness(Some(Fault::NoCleanTraffic));
    let error = harness
        .tasks
        .start(
            request(&harness.node, "c1ea0a01", true),
            settings(&harness.node),
        )
        .await
        .expect_err("no filter");
    let message = error.to_string();
    for part in [
        "network_interface[0].bridge:",
        "clean_traffic is on",
        "no network filter \"clean-traffic\"",
        "libvirt-daemon-driver-nwfilter",
        "clean_traffic = false",
    ] {
        assert!(message.contains(part), "{part} missing: {message}");
    }
    assert!(!error.recoverable());
    assert_nothing_left(&harness, "after the refusal");

    let started = harness
        .tasks
        .start(
            request(&harness.node, "c1ea0a02", true),
            settings_with(&harness.node, |policy| policy.clean_traffic = false),
        )
        .await
        .expect("clean_traffic = false starts");
    harness
        .tasks
        .destroy(&started.state.task_id, true)
        .await
        .expect("destroy");
    assert_nothing_left(&harness, "after destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_on_a_libvirt_network_get_clean_traffic_unless_turned_off() {
    let harness = harness(None);
    let filterref_of = |domain: String| {
        let xml = harness
            .libvirt
            .call_blocking(move |conn| crate::libvirt::domain::domain_xml(conn, &domain))
            .expect("libvirt")
            .expect("domain exists");
        let root = crate::libvirt::xml::parse(&xml).expect("parses");
        let interface = root
            .child("devices")
            .and_then(|devices| devices.child("interface"))
            .expect("an interface")
            .clone();
        interface.child("filterref").map(|filter| {
            let parameters: Vec<(String, String)> = filter
                .children_named("parameter")
                .filter_map(|p| Some((p.attr("name")?.into(), p.attr("value")?.into())))
                .collect();
            (
                filter.attr("filter").unwrap_or_default().to_string(),
                parameters,
            )
        })
    };

    let started = harness
        .tasks
        .start(
            request(&harness.node, "c1ea0001", true),
            settings(&harness.node),
        )
        .await
        .expect("start");
    assert_eq!(
        filterref_of(started.state.domain_name.clone()),
        Some(("clean-traffic".to_string(), Vec::new())),
        "the test network has no <dhcp>: libvirt's default address learning"
    );
    harness
        .tasks
        .destroy("alloc/web/c1ea0001", true)
        .await
        .expect("destroy");

    let started = harness
        .tasks
        .start(
            request(&harness.node, "c1ea0002", true),
            settings_with(&harness.node, |policy| policy.clean_traffic = false),
        )
        .await
        .expect("start");
    assert_eq!(filterref_of(started.state.domain_name.clone()), None);
    harness
        .tasks
        .destroy("alloc/web/c1ea0002", true)
        .await
        .expect("destroy");
    assert_nothing_left(&harness, "after destroy");
}

/// On the test driver (no domain capabilities, so no virtiofs) shares use
/// 9p under `auto`, and a forced `virtiofs` is refused before anything is
/// created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shares_fall_back_to_9p_and_forced_virtiofs_is_refused_up_front() {
    let harness = harness(None);
    let with_shares = |id: &str, driver| {
        let mut request = request(&harness.node, id, false);
        std::fs::create_dir_all(request.alloc_dir.join("web/local")).expect("mkdir");
        request.config.shared_dirs_driver = driver;
        request
    };
    use crate::config::task::SharedDirsDriver;
    let error = harness
        .tasks
        .start(
            with_shares("eeee5555", SharedDirsDriver::Virtiofs),
            settings(&harness.node),
        )
        .await
        .expect_err("no virtiofs on the test driver");
    assert!(
        error
            .to_string()
            .starts_with("shared_dirs_driver = \"virtiofs\": this host offers no virtiofs"),
        "{error}"
    );
    assert!(!error.recoverable());
    assert_nothing_left(&harness, "after the refused start");
    harness
        .tasks
        .start(
            with_shares("eeee5555", SharedDirsDriver::Auto),
            settings(&harness.node),
        )
        .await
        .expect("auto falls back to 9p");
    let defined = harness.defined_shares.lock().expect("record").clone();
    let shares = defined.last().expect("a domain was defined");
    assert!(!shares.is_empty(), "the task's dirs are shared");
    for share in shares {
        assert_eq!(
            share.driver,
            crate::libvirt::domain_xml::ShareDriver::NineP,
            "{share:?}"
        );
    }
    harness
        .tasks
        .destroy("alloc/web/eeee5555", true)
        .await
        .expect("destroy");
    assert_nothing_left(&harness, "after destroy");
}

/// Issues 9.6/9.7/11.1/11.2: bad disk sources are refused before any
/// volume or domain exists, each naming the field and the fix; an
/// operator's volume named like a task disk is never a source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_disk_sources_are_refused_before_anything_is_created() {
    use crate::config::names::ObjectName;
    use crate::config::task::DiskSource;
    let harness = harness(None);
    let refused = |request: StartRequest| {
        let tasks = harness.tasks.clone();
        let settings = settings(&harness.node);
        async move {
            tasks
                .start(request, settings)
                .await
                .expect_err("refused")
                .to_string()
        }
    };
    let on_volume = |request: &mut StartRequest, name: &str| {
        request.config.disks[1].source = Some(DiskSource::Volume {
            name: ObjectName::parse(name).expect("name"),
            format: None,
        });
        request.config.disks[1].size = None;
    };

    let mut unknown = request(&harness.node, "5eed0001", false);
    on_volume(&mut unknown, "no-such-base.img");
    let message = refused(unknown).await;
    assert!(
        message.starts_with("disk[1].source.volume:") && message.contains("does not exist"),
        "{message}"
    );
    assert_nothing_left(&harness, "after an unknown source volume");

    // Another task's disk, made before this start.
    harness
        .observer
        .create_volume(
            POOL,
            "db-0011aabb_vda.img",
            VolumeContent::Empty {
                format: crate::storage::images::ImageFormat::Raw,
                size: 1 << 20,
                sparse: true,
            },
        )
        .expect("another task's disk");
    let mut driver_owned = request(&harness.node, "5eed0002", false);
    on_volume(&mut driver_owned, "db-0011aabb_vda.img");
    let message = refused(driver_owned).await;
    assert!(
        message.starts_with("disk[1].source.volume:") && message.contains("name another volume"),
        "{message}"
    );
    assert_eq!(harness.volumes(), vec!["db-0011aabb_vda.img".to_string()]);
    assert!(harness.domains().is_empty());

    // A disk on a Nomad volume no volume_mount provides.
    let mut unmatched = request(&harness.node, "5eed0003", false);
    unmatched.config.disks[1] = TaskSpec::try_from(&TaskConfig {
        disk: Some(vec![DiskConfig {
            volume: Some("/dev/vdb".into()),
            ..DiskConfig::default()
        }]),
        ..TaskConfig::default()
    })
    .expect("valid")
    .disks[0]
        .clone();
    let message = refused(unmatched.clone()).await;
    assert!(
        message.starts_with("disk[1].volume:") && message.contains("destination = \"/dev/vdb\""),
        "{message}"
    );
    // Matched, but to a directory.
    let dir = tempfile::tempdir().expect("dir");
    unmatched.mounts = vec![crate::task::contract::Mount {
        host_path: dir.path().to_path_buf(),
        task_path: "/dev/vdb".into(),
        read_only: false,
    }];
    let message = refused(unmatched.clone()).await;
    assert!(
        message.starts_with("disk[1].volume:") && message.contains("not a block device"),
        "{message}"
    );
    // A read_only mount cannot be passed through as a SCSI lun.
    unmatched.mounts[0].read_only = true;
    let mut lun = unmatched.clone();
    lun.config.disks[1].kind = crate::config::task::DiskKind::Lun;
    let message = refused(lun).await;
    assert!(
        message.starts_with("disk[1].kind:") && message.contains("read_only"),
        "{message}"
    );
    // A read_only mount cannot be written from an image.
    unmatched.config.disks[1].source = Some(DiskSource::Image {
        path: "base.img".into(),
        format: None,
    });
    let task_dir = unmatched.alloc_dir.join("web");
    std::fs::create_dir_all(&task_dir).expect("task dir");
    std::fs::write(task_dir.join("base.img"), [0u8; 512]).expect("image");
    let message = refused(unmatched).await;
    assert!(
        message.starts_with("disk[1].source.image:") && message.contains("read_only"),
        "{message}"
    );
    assert_eq!(harness.volumes(), vec!["db-0011aabb_vda.img".to_string()]);
    assert!(harness.domains().is_empty());
}

/// Issue 11.1 on the test driver: a `source.volume` disk becomes a clone
/// in the task's own volume; the domain uses the clone, never the source,
/// and destroying the task leaves the source where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_volume_is_cloned_and_the_clone_attached() {
    use crate::config::names::ObjectName;
    use crate::config::task::DiskSource;
    let harness = harness(None);
    harness
        .observer
        .prepare_pool(&DirectoryPool {
            name: POOL.into(),
            path: harness.node.pool_path.clone(),
        })
        .expect("pool");
    harness
        .observer
        .create_volume(
            POOL,
            "golden-base.img",
            VolumeContent::Empty {
                format: crate::storage::images::ImageFormat::Raw,
                size: 4 << 20,
                sparse: true,
            },
        )
        .expect("the operator's volume");
    // The test driver keeps no files; the source check reads one.
    std::fs::create_dir_all(&harness.node.pool_path).expect("pool dir");
    std::fs::write(harness.node.pool_path.join("golden-base.img"), [0u8; 4096]).expect("file");
    let mut request = request(&harness.node, "c10e0001", false);
    request.config.disks[1].source = Some(DiskSource::Volume {
        name: ObjectName::parse("golden-base.img").expect("name"),
        format: None,
    });
    // The test driver cannot resize: the clone keeps the source's size
    // (growing is covered on a real pool in tests/libvirt_storage.rs).
    request.config.disks[1].size = None;
    let started = harness
        .tasks
        .start(request, settings(&harness.node))
        .await
        .expect("start");
    let domain = started.state.domain_name.clone();
    let xml = harness
        .libvirt
        .call_blocking(|conn| crate::libvirt::domain::domain_xml(conn, &domain))
        .expect("domain xml")
        .expect("domain exists");
    assert!(!xml.contains("golden-base.img"), "{xml}");
    assert!(xml.contains("web-c10e0001_vdb.img"), "{xml}");
    // The clone's format is pinned, so a qcow2 header written into a raw
    // source is never opened as one.
    let root = crate::libvirt::xml::parse(&xml).expect("xml");
    let clone = root
        .child("devices")
        .expect("devices")
        .children_named("disk")
        .find(|disk| {
            disk.child("source")
                .and_then(|source| source.attr("file"))
                .is_some_and(|file| file.ends_with("web-c10e0001_vdb.img"))
        })
        .expect("the clone's disk");
    assert_eq!(
        clone.child("driver").and_then(|driver| driver.attr("type")),
        Some("raw"),
        "{xml}"
    );
    assert!(
        started
            .state
            .volumes
            .iter()
            .all(|v| v.name != "golden-base.img"),
        "the source is not the task's to delete: {:?}",
        started.state.volumes
    );
    harness
        .tasks
        .destroy("alloc/web/c10e0001", true)
        .await
        .expect("destroy");
    assert_eq!(harness.volumes(), vec!["golden-base.img".to_string()]);
    assert!(harness.domains().is_empty());
}

/// Issue 9.6: a volume is refused as a source, whatever its name, when a
/// domain uses it, a start journal records it, or its path is a link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_volumes_in_use_recorded_or_linked_are_refused() {
    use crate::config::names::ObjectName;
    use crate::config::task::DiskSource;
    let harness = harness(None);
    harness
        .observer
        .prepare_pool(&DirectoryPool {
            name: POOL.into(),
            path: harness.node.pool_path.clone(),
        })
        .expect("pool");
    std::fs::create_dir_all(&harness.node.pool_path).expect("pool dir");
    let make = |name: &str| {
        harness
            .observer
            .create_volume(
                POOL,
                name,
                VolumeContent::Empty {
                    format: crate::storage::images::ImageFormat::Raw,
                    size: 4 << 20,
                    sparse: true,
                },
            )
            .expect("volume");
    };
    let refused = |id: &str, volume: &str| {
        let tasks = harness.tasks.clone();
        let settings = settings(&harness.node);
        let mut request = request(&harness.node, id, false);
        request.config.disks[1].source = Some(DiskSource::Volume {
            name: ObjectName::parse(volume).expect("name"),
            format: None,
        });
        request.config.disks[1].size = None;
        async move {
            tasks
                .start(request, settings)
                .await
                .expect_err("refused")
                .to_string()
        }
    };

    // Used by a domain, under a name that is not ours.
    make("golden-used.img");
    std::fs::write(harness.node.pool_path.join("golden-used.img"), [0u8; 4096]).expect("file");
    define_go_domain(&harness, "ndvtest-other", &["golden-used.img"]);
    let message = refused("5eed0101", "golden-used.img").await;
    assert!(
        message.starts_with("disk[1].source.volume:") && message.contains("\"ndvtest-other\""),
        "{message}"
    );

    // Recorded by another task's start, not (yet) in any domain.
    make("golden-recorded.img");
    std::fs::write(
        harness.node.pool_path.join("golden-recorded.img"),
        [0u8; 4096],
    )
    .expect("file");
    let other = harness
        .node
        .journal()
        .begin("other-task-id", "ndvtest-other2")
        .expect("record");
    other
        .update(|record| {
            record.volumes.push(CreatedVolume {
                pool: POOL.into(),
                name: "golden-recorded.img".into(),
            });
        })
        .expect("update");
    let message = refused("5eed0102", "golden-recorded.img").await;
    assert!(
        message.starts_with("disk[1].source.volume:") && message.contains("\"other-task-id\""),
        "{message}"
    );
    harness.node.journal().forget("other-task-id");

    // A size smaller than the source (Go refuses it too).
    make("golden-big.img");
    std::fs::write(harness.node.pool_path.join("golden-big.img"), [0u8; 4096]).expect("file");
    let tasks = harness.tasks.clone();
    let mut small = request(&harness.node, "5eed0104", false);
    small.config.disks[1].source = Some(DiskSource::Volume {
        name: ObjectName::parse("golden-big.img").expect("name"),
        format: None,
    });
    small.config.disks[1].size = Some(crate::config::units::ByteSize(1 << 20));
    let message = tasks
        .start(small, settings(&harness.node))
        .await
        .expect_err("refused")
        .to_string();
    assert!(
        message.starts_with("disk[1].size:")
            && message.contains("1048576 bytes")
            && message.contains(&(4u64 << 20).to_string()),
        "{message}"
    );

    // A link in the pool directory to a host file.
    make("golden-link.img");
    let host_file = harness.node.pool_path.with_file_name("host-secret");
    std::fs::write(&host_file, b"secret").expect("host file");
    std::os::unix::fs::symlink(&host_file, harness.node.pool_path.join("golden-link.img"))
        .expect("link");
    let message = refused("5eed0103", "golden-link.img").await;
    assert!(
        message.starts_with("disk[1].source.volume:") && message.contains("not a regular file"),
        "{message}"
    );
    assert!(harness.domains().iter().all(|d| d == "ndvtest-other"));
    let _ = harness
        .libvirt
        .call_blocking(|conn| crate::libvirt::domain::remove_domain(conn, "ndvtest-other"));
}

/// Several `network_interface` blocks become one NIC each, in order, with
/// their own MACs; the journal names every bridge interface, so a later
/// plugin removes all their reservations and leases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_interfaces_become_nics_in_order_and_all_are_journaled() {
    let interfaces = || -> crate::config::network::NetworkInterfacesConfig {
        serde_json::from_value(serde_json::json!([
            { "bridge": { "name": "ndvtestbr0" } },
            { "macvtap": { "device": "lo" } },
            { "bridge": { "name": "ndvtestbr1" } },
        ]))
        .expect("network_interface")
    };
    let with_interfaces = |node: &TestNode, id: &str| {
        let mut request = request(node, id, false);
        request.config.network_interfaces =
            crate::config::network::check(&interfaces(), &mut Default::default());
        request
    };
    let allow_lo = |node: &TestNode| {
        settings_with(node, |policy| {
            policy.macvtap_devices = Some(vec!["lo".to_string()]);
        })
    };
    let harness = harness(None);
    let started = harness
        .tasks
        .start(
            with_interfaces(&harness.node, "ee100001"),
            allow_lo(&harness.node),
        )
        .await
        .expect("start");
    let domain = started.state.domain_name.clone();
    let xml = harness
        .libvirt
        .call_blocking(move |conn| crate::libvirt::domain::domain_xml(conn, &domain))
        .expect("libvirt")
        .expect("domain exists");
    let root = crate::libvirt::xml::parse(&xml).expect("parses");
    let nics: Vec<(String, String, String)> = root
        .child("devices")
        .expect("devices")
        .children_named("interface")
        .map(|interface| {
            let source = interface.child("source");
            (
                interface.attr("type").unwrap_or_default().to_string(),
                source
                    .and_then(|s| s.attr("network").or_else(|| s.attr("dev")))
                    .unwrap_or_default()
                    .to_string(),
                interface
                    .child("mac")
                    .and_then(|mac| mac.attr("address"))
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    let task_id = "alloc/web/ee100001";
    assert_eq!(
        nics,
        vec![
            (
                "network".to_string(),
                "ndvtest-net".to_string(),
                crate::net::mac_for(task_id, 0)
            ),
            (
                "direct".to_string(),
                "lo".to_string(),
                crate::net::mac_for(task_id, 1)
            ),
            (
                "network".to_string(),
                "ndvtest-net2".to_string(),
                crate::net::mac_for(task_id, 2)
            ),
        ],
        "{xml}"
    );
    // The plugin dies and its successor never hears of the task: the
    // journal names every bridge interface (not the macvtap one), so
    // their reservations and leases go too.
    let successor = Tasks::new(
        Arc::new(LibvirtHypervisor::new(harness.libvirt.clone())),
        harness.net.clone(),
        harness.node.journal(),
    );
    let removed = successor.remove_unfinished().await;
    assert_eq!(removed, vec![task_id.to_string()]);
    let intents = harness.net.removed_intents.lock().expect("lock").clone();
    assert_eq!(intents.len(), 1, "{intents:?}");
    assert_eq!(
        intents[0].interfaces,
        vec![
            ("ndvtestbr0".to_string(), crate::net::mac_for(task_id, 0)),
            ("ndvtestbr1".to_string(), crate::net::mac_for(task_id, 2)),
        ]
    );
    assert_nothing_left(&harness, "after the successor's cleanup");
}

/// A Ceph pool whose monitor does not answer: a task naming it fails at
/// once with an error naming the disk's field and the pool, nothing is
/// made (not even the libvirt secret or pool), and a task on the directory
/// pool still starts. The operator's allow_storage_pools covers Ceph pools.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_ceph_pool_fails_its_tasks_clearly_and_directory_pools_still_work() {
    use crate::config::plugin::{CephHost, CephKey, CephPool};
    let harness = harness(None);
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let mut with_ceph = (*settings(&harness.node)).clone();
    with_ceph.ceph_pools = vec![CephPool {
        name: "ndvtest-ceph".into(),
        pool: "rbd".into(),
        hosts: vec![CephHost {
            name: "127.0.0.1".into(),
            port: Some(closed),
        }],
        username: "nomad".into(),
        key: CephKey::new("AQD8bvtpvFsSHxAAetpPOmzr4VBwu1zk7YQB+w=="),
    }];
    let with_ceph = Arc::new(with_ceph);
    let mut on_ceph = request(&harness.node, "ce9bce9b", false);
    on_ceph.config.disks[1].pool =
        Some(crate::config::names::ObjectName::parse("ndvtest-ceph").expect("name"));
    let error = harness
        .tasks
        .start(on_ceph.clone(), with_ceph.clone())
        .await
        .expect_err("the cluster does not answer");
    let message = error.to_string();
    for part in [
        "disk[1].pool: Ceph storage pool \"ndvtest-ceph\"",
        "no Ceph monitor answers",
        &format!("127.0.0.1:{closed}"),
        "storage_pools.ceph.ndvtest-ceph.hosts",
    ] {
        assert!(message.contains(part), "{part} missing: {message}");
    }
    assert!(!message.contains("AQD8"), "{message}");
    assert!(error.recoverable(), "the cluster may come back: {error}");
    assert_nothing_left(&harness, "after the Ceph pool failed");
    let pool_missing = harness
        .libvirt
        .call_blocking(|conn| Ok(conn.lookup_storage_pool_by_name("ndvtest-ceph").is_err()))
        .expect("libvirt");
    assert!(pool_missing, "no rbd pool is defined for a silent cluster");

    // The operator's allow_storage_pools holds for Ceph pools too.
    let mut kept_out = (*with_ceph).clone();
    kept_out.policy.storage_pools = Some(vec![POOL.into()]);
    let message = harness
        .tasks
        .start(on_ceph, Arc::new(kept_out))
        .await
        .expect_err("not allowed")
        .to_string();
    assert!(
        message.contains("disk[1].pool") && message.contains("allow_storage_pools"),
        "{message}"
    );

    // The directory pool still works under the same settings.
    let plain = request(&harness.node, "ce9bd1e0", false);
    harness
        .tasks
        .start(plain.clone(), with_ceph)
        .await
        .expect("a directory-pool task starts");
    harness
        .tasks
        .destroy(&plain.task_id, true)
        .await
        .expect("destroy");
    assert_nothing_left(&harness, "after the directory-pool task");
}
