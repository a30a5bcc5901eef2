//! Shared directories: which driver each share uses (virtiofs or 9p, as the
//! Go driver chooses, or as the task's `shared_dirs_driver` says), the
//! guest commands that mount them, and the check, before anything is
//! created, that QEMU can open every 9p share.
//!
//! virtiofs shares are served by virtiofsd, which libvirt runs as root;
//! 9p shares are opened by QEMU itself, as libvirt's unprivileged user.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use super::error::TaskError;
use super::plan::{shell_quote, GuestShare};
use crate::config::plugin::Settings;
use crate::config::task::SharedDirsDriver;
use crate::hypervisor::{Hypervisor, HypervisorError};
use crate::libvirt::domain_xml::DomainType;
use crate::libvirt::error::with_sources;
use crate::libvirt::host::readable_version;
use crate::libvirt::shares::{QemuIdentity, ShareSupport, VIRTIOFS_READONLY_VERSION};

/// How one share reaches the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    NineP,
    Virtiofs,
}

/// A share with its transport decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedShare {
    pub share: GuestShare,
    pub transport: Transport,
    /// libvirt makes it read-only (`<readonly/>`). False for a read-only
    /// virtiofs share before libvirt 11, which only the guest's `mount -o
    /// ro` keeps read-only (allowed by `allow_insecure_readonly_mounts`).
    pub host_read_only: bool,
}

/// Which shares may use virtiofs, from the operator's plugin settings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VirtiofsPolicy {
    /// `allow_insecure_readonly_mounts`: read-only shares may use virtiofs
    /// where libvirt cannot make it read-only (the guest's mount only).
    pub insecure_readonly: bool,
    /// `allow_writable_virtiofs`: writable shares may use virtiofs, whose
    /// virtiofsd runs as root (guest root can then create root-owned and
    /// setuid files in the host directory).
    pub writable: bool,
}

impl VirtiofsPolicy {
    pub fn from_settings(settings: &Settings) -> Self {
        VirtiofsPolicy {
            insecure_readonly: settings.insecure_readonly_virtiofs(),
            writable: settings.allow_writable_virtiofs,
        }
    }
}

/// Chooses each share's transport.
///
/// `auto` follows the Go driver for read-only shares: 9p when libvirt
/// cannot make virtiofs read-only (before 11.0.0) and the operator did not
/// set `allow_insecure_readonly_mounts`, else virtiofs when QEMU offers it.
/// Unlike Go, writable shares use 9p unless the operator set
/// `allow_writable_virtiofs`: virtiofsd runs as root, and without an id map
/// guest root would own what it creates on the host. `virtiofs` and `9p`
/// force one transport and refuse what it cannot (or may not) do.
pub fn choose(
    shares: &[GuestShare],
    requested: SharedDirsDriver,
    support: &ShareSupport,
    policy: VirtiofsPolicy,
) -> Result<Vec<PlannedShare>, String> {
    let readonly_virtiofs_ok = support.virtiofs_readonly() || policy.insecure_readonly;
    let mut planned = Vec::with_capacity(shares.len());
    for share in shares {
        let allowed = if share.read_only {
            readonly_virtiofs_ok
        } else {
            policy.writable
        };
        let transport = match requested {
            SharedDirsDriver::NineP => Transport::NineP,
            SharedDirsDriver::Auto => {
                if support.virtiofs && allowed {
                    Transport::Virtiofs
                } else {
                    Transport::NineP
                }
            }
            SharedDirsDriver::Virtiofs => {
                if !support.virtiofs {
                    return Err(
                        "shared_dirs_driver = \"virtiofs\": this host offers no virtiofs \
                         (libvirt's domain capabilities list no virtiofs driver, or no virtiofsd \
                         is installed: Debian 12 has it in qemu-system-common, newer Debian in \
                         the virtiofsd package); use \"9p\" or \"auto\""
                            .into(),
                    );
                }
                if share.read_only && !allowed {
                    return Err(format!(
                        "shared_dirs_driver = \"virtiofs\": {} ({} in the guest) is read-only, and \
                         libvirt {} cannot make a virtiofs share read-only (that needs {}); use \
                         \"auto\" (9p for read-only shares) or \"9p\", or set \
                         allow_insecure_readonly_mounts = true in the plugin's provider.libvirt \
                         block (the guest's mount alone then keeps it read-only)",
                        describe(share),
                        share.guest_path,
                        readable_version(support.libvirt_version),
                        readable_version(VIRTIOFS_READONLY_VERSION),
                    ));
                }
                if !share.read_only && !allowed {
                    return Err(format!(
                        "shared_dirs_driver = \"virtiofs\": {} ({} in the guest) is writable, and \
                         virtiofsd runs as root, so root in the guest could create root-owned or \
                         setuid files on the host; use \"auto\" or \"9p\" (9p files belong to \
                         QEMU's unprivileged user), or set allow_writable_virtiofs = true in the \
                         plugin's provider.libvirt block to accept that",
                        describe(share),
                        share.guest_path,
                    ));
                }
                Transport::Virtiofs
            }
        };
        let host_read_only =
            share.read_only && (transport == Transport::NineP || support.virtiofs_readonly());
        if share.read_only && !host_read_only {
            tracing::warn!(
                share = %share.guest_path,
                "read-only share over virtiofs kept read-only by the guest's mount only (allow_insecure_readonly_mounts)"
            );
        }
        planned.push(PlannedShare {
            share: share.clone(),
            transport,
            host_read_only,
        });
    }
    Ok(planned)
}

/// Decides every share's transport for a domain of this type, arch and
/// machine, and refuses 9p shares QEMU could not open, before anything of
/// the task is created.
pub fn plan(
    hypervisor: &dyn Hypervisor,
    shares: &[GuestShare],
    requested: SharedDirsDriver,
    settings: &Settings,
    domain: (DomainType, &str, &str),
) -> Result<Vec<PlannedShare>, TaskError> {
    if shares.is_empty() {
        return Ok(Vec::new());
    }
    let (domain_type, arch, machine) = domain;
    let support = hypervisor
        .share_support(domain_type, arch, machine)
        .map_err(|error| match error {
            // A machine or arch QEMU lacks: the task's to fix, not a retry.
            HypervisorError::Libvirt(error) if error.is_invalid_host_argument() => {
                TaskError::Invalid(format!(
                    "os.arch {arch:?} / os.machine {machine:?}: {}; use a machine type \
                     `qemu-system-{arch} -machine help` lists, e.g. \"pc\" or \"q35\"",
                    with_sources(&error)
                ))
            }
            other => other.into(),
        })?;
    let policy = VirtiofsPolicy::from_settings(settings);
    let planned = choose(shares, requested, &support, policy).map_err(TaskError::Invalid)?;
    if let Some(identity) = identity_to_check(&support) {
        let user = QemuUser::lookup(identity);
        check_qemu_access(&planned, &user, &support, requested, policy)
            .map_err(TaskError::Invalid)?;
    }
    Ok(planned)
}

/// QEMU's uid/gid when this machine can check its access: libvirt reports
/// one and runs here. A remote host's dirs and accounts are not ours.
pub fn identity_to_check(support: &ShareSupport) -> Option<QemuIdentity> {
    let identity = support.qemu_identity?;
    if !support.local {
        tracing::debug!("remote libvirt: share permissions are not checked here");
        return None;
    }
    Some(identity)
}

/// What the job calls a share: the driver's tags name Nomad's task dirs,
/// `vol<N>` the N-th `volume_mount`.
pub fn describe(share: &GuestShare) -> String {
    match share.tag.as_str() {
        "alloc" => "the alloc dir".into(),
        "local" => "the task's local dir".into(),
        "secrets" => "the task's secrets dir".into(),
        tag => match tag.strip_prefix("vol") {
            Some(index) => format!("volume_mount {index}"),
            None => format!("share {tag:?}"),
        },
    }
}

/// The guest commands (cloud-init bootcmd) that mount each share.
pub fn mount_commands(shares: &[PlannedShare]) -> Vec<String> {
    shares
        .iter()
        .map(|planned| {
            let share = &planned.share;
            let path = shell_quote(&share.guest_path);
            let tag = shell_quote(&share.tag);
            // The guest mounts read-only shares read-only whatever libvirt
            // enforces.
            match (planned.transport, share.read_only) {
                (Transport::NineP, true) => format!(
                    "mkdir -p {path} && mount -t 9p -o trans=virtio,version=9p2000.L,ro {tag} {path}"
                ),
                (Transport::NineP, false) => format!(
                    "mkdir -p {path} && mount -t 9p -o trans=virtio,version=9p2000.L {tag} {path}"
                ),
                (Transport::Virtiofs, true) => {
                    format!("mkdir -p {path} && mount -t virtiofs -o ro {tag} {path}")
                }
                (Transport::Virtiofs, false) => {
                    format!("mkdir -p {path} && mount -t virtiofs {tag} {path}")
                }
            }
        })
        .collect()
}

/// The account QEMU runs as, with the groups the kernel checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuUser {
    pub uid: u32,
    pub gid: u32,
    /// The account's name; `None` for a uid without an entry.
    pub name: Option<String>,
    /// Supplementary groups (libvirt sets the user's groups as initgroups
    /// does).
    pub groups: Vec<u32>,
    /// The name resolves through NSS (getent), so `setpriv --init-groups`
    /// gives the kernel check the groups libvirt gives QEMU.
    pub nss: bool,
}

impl QemuUser {
    /// Resolves libvirt's uid/gid through NSS (`getent passwd`, `id -G`:
    /// LDAP or sssd accounts and groups included), else through the host's
    /// passwd and group files.
    pub fn lookup(identity: QemuIdentity) -> QemuUser {
        if let Some(user) = QemuUser::from_nss(identity) {
            return user;
        }
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
        QemuUser::from_files(identity, &passwd, &group)
    }

    fn from_nss(identity: QemuIdentity) -> Option<QemuUser> {
        let output = std::process::Command::new("getent")
            .args(["passwd", &identity.uid.to_string()])
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output()
            .ok()?;
        if !output.status.success() {
            return None;
        }
        let entry = String::from_utf8(output.stdout).ok()?;
        let fields: Vec<&str> = entry.lines().next()?.split(':').collect();
        if fields.len() < 4 || fields[2].parse() != Ok(identity.uid) {
            return None;
        }
        let name = fields[0].to_string();
        let output = std::process::Command::new("id")
            .args(["-G", "--", &name])
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output()
            .ok()?;
        if !output.status.success() {
            return None;
        }
        let groups = String::from_utf8_lossy(&output.stdout)
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<Vec<u32>, _>>()
            .ok()?;
        Some(QemuUser {
            uid: identity.uid,
            gid: identity.gid,
            name: Some(name),
            groups,
            nss: true,
        })
    }

    /// The files fallback of [`QemuUser::lookup`], on given file contents.
    pub fn from_files(identity: QemuIdentity, passwd: &str, group: &str) -> QemuUser {
        let entry = passwd
            .lines()
            .map(|line| line.split(':').collect::<Vec<_>>())
            .find(|fields| fields.len() >= 4 && fields[2].parse() == Ok(identity.uid));
        let name = entry.as_ref().map(|fields| fields[0].to_string());
        let mut groups: Vec<u32> = entry
            .as_ref()
            .and_then(|fields| fields[3].parse().ok())
            .into_iter()
            .collect();
        if let Some(name) = &name {
            for fields in group
                .lines()
                .map(|line| line.split(':').collect::<Vec<_>>())
            {
                if fields.len() >= 4 && fields[3].split(',').any(|member| member == name) {
                    if let Ok(gid) = fields[2].parse() {
                        groups.push(gid);
                    }
                }
            }
        }
        QemuUser {
            uid: identity.uid,
            gid: identity.gid,
            name,
            groups,
            nss: false,
        }
    }

    fn display(&self) -> String {
        match &self.name {
            Some(name) => format!("{name} (uid {}, gid {})", self.uid, self.gid),
            None => format!("uid {} (gid {})", self.uid, self.gid),
        }
    }

    fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }

    /// The permission class (`rwx` bits) the mode bits give this user.
    fn class(&self, metadata: &std::fs::Metadata) -> u32 {
        let mode = metadata.mode();
        (if metadata.uid() == self.uid {
            mode >> 6
        } else if self.in_group(metadata.gid()) {
            mode >> 3
        } else {
            mode
        }) & 0o7
    }
}

/// The first directory on the way to a share that QEMU's user cannot pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    pub path: PathBuf,
    pub mode: u32,
    pub owner: u32,
    pub group: u32,
    /// The permission it lacks there: `x` (search) above the share, `rx`
    /// on the share itself (QEMU opens it; writes are the guest's business).
    pub needs: &'static str,
}

impl Blocked {
    fn at(path: &Path, needs: &'static str) -> Option<Blocked> {
        let metadata = std::fs::metadata(path).ok()?;
        Some(Blocked {
            path: path.to_path_buf(),
            mode: metadata.mode() & 0o7777,
            owner: metadata.uid(),
            group: metadata.gid(),
            needs,
        })
    }
}

/// The directories from `from` down to the canonical `dir`, each with the
/// permission QEMU's user needs there: search above, read and search on
/// `dir` itself.
fn walk(from: &Path, dir: &Path) -> Vec<(PathBuf, &'static str)> {
    let mut steps: Vec<(PathBuf, &'static str)> = dir
        .ancestors()
        .filter(|path| path.starts_with(from))
        .map(|path| (path.to_path_buf(), "x"))
        .collect();
    steps.reverse();
    if let Some(last) = steps.last_mut() {
        last.1 = "rx";
    }
    steps
}

/// Walks from `from` (`/` for a real check) down to `dir` by mode bits
/// alone. `None` when everything passes or `dir` cannot be resolved (QEMU
/// then reports it itself).
pub fn first_blocked(from: &Path, dir: &Path, user: &QemuUser) -> Option<Blocked> {
    if user.uid == 0 {
        return None;
    }
    let dir = std::fs::canonicalize(dir).ok()?;
    for (path, needs) in walk(from, &dir) {
        let bits = if needs == "x" { 0o1 } else { 0o5 };
        let metadata = std::fs::metadata(&path).ok()?;
        if user.class(&metadata) & bits != bits {
            return Blocked::at(&path, needs);
        }
    }
    None
}

/// Asks the kernel whether QEMU's user passes `test <flags> path` (so ACLs
/// and read-only filesystems count), by running `test` as that user.
/// `None` when the check cannot run (no setpriv, not root, an account
/// `--init-groups` cannot resolve).
fn kernel_test(path: &Path, user: &QemuUser, flags: &[&str]) -> Option<bool> {
    // `path` is canonical, hence absolute: `test` cannot read it as an
    // operator.
    let mut command = std::process::Command::new("setpriv");
    command
        .arg(format!("--reuid={}", user.uid))
        .arg(format!("--regid={}", user.gid));
    if user.nss {
        command.arg("--init-groups");
    } else if user.groups.is_empty() {
        command.arg("--clear-groups");
    } else {
        let groups: Vec<String> = user.groups.iter().map(u32::to_string).collect();
        command.arg(format!("--groups={}", groups.join(",")));
    }
    // Exit 3 is the answer "no", distinct from setpriv's own failure (1)
    // and a missing shell (127).
    command.args(["--", "sh", "-c", "test \"$@\" && exit 0; exit 3", "sh"]);
    for (i, flag) in flags.iter().enumerate() {
        if i > 0 {
            command.arg("-a");
        }
        command.arg(flag).arg(path);
    }
    let status = command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .ok()?;
    match status.code() {
        Some(0) => Some(true),
        Some(3) => Some(false),
        _ => None,
    }
}

/// The first directory from `/` to the canonical `dir` the kernel refuses
/// QEMU's user (search above, read and search on `dir`), so the advice
/// names the directory to fix. `dir` itself when every single step passes
/// (it changed meanwhile).
fn first_refused(dir: &Path, user: &QemuUser) -> Option<Blocked> {
    for (path, needs) in walk(Path::new("/"), dir) {
        let flags: &[&str] = if needs == "x" { &["-x"] } else { &["-r", "-x"] };
        if kernel_test(&path, user, flags) == Some(false) {
            return Blocked::at(&path, needs);
        }
    }
    Blocked::at(dir, "rx")
}

/// Why QEMU's user cannot write into a writable 9p share whose directory
/// it can open, for a warning (guest writes then fail with EACCES or EROFS).
/// Names the mode only when the mode bits are the reason.
pub fn write_warning(dir: &Path, user: &QemuUser, kernel_writable: bool) -> Option<String> {
    if kernel_writable {
        return None;
    }
    let metadata = std::fs::metadata(dir).ok()?;
    Some(if user.class(&metadata) & 0o2 == 0 {
        format!(
            "{} is mode {:04o} owned by {}:{}, which gives {} no write permission",
            dir.display(),
            metadata.mode() & 0o7777,
            metadata.uid(),
            metadata.gid(),
            user.display(),
        )
    } else {
        format!(
            "{} is not writable for {} although its mode allows it (a read-only filesystem, \
             or an ACL)",
            dir.display(),
            user.display(),
        )
    })
}

/// Refuses a start whose 9p shares QEMU cannot open, naming the share as
/// the job sees it, the user QEMU runs as, the directory that stops it and
/// the fix; warns about writable ones it cannot write into. virtiofs
/// shares pass: virtiofsd runs as root.
pub fn check_qemu_access(
    planned: &[PlannedShare],
    user: &QemuUser,
    support: &ShareSupport,
    requested: SharedDirsDriver,
    policy: VirtiofsPolicy,
) -> Result<(), String> {
    if user.uid == 0 {
        return Ok(());
    }
    for planned in planned
        .iter()
        .filter(|planned| planned.transport == Transport::NineP)
    {
        let share = &planned.share;
        // A dir that does not resolve is QEMU's to report.
        let Ok(dir) = std::fs::canonicalize(&share.host_dir) else {
            continue;
        };
        let blocked = match kernel_test(&dir, user, &["-r", "-x"]) {
            Some(true) => {
                if !share.read_only {
                    let writable = kernel_test(&dir, user, &["-w"]).unwrap_or(true);
                    if let Some(why) = write_warning(&dir, user, writable) {
                        tracing::warn!(
                            share = %share.guest_path,
                            "writable share: guest writes will fail, {why}"
                        );
                    }
                }
                continue;
            }
            // Mode bits alone may be wrong (ACLs, groups): let QEMU try.
            None => {
                if let Some(blocked) = first_blocked(Path::new("/"), &dir, user) {
                    tracing::warn!(
                        share = %share.guest_path,
                        path = %blocked.path.display(),
                        mode = format!("{:04o}", blocked.mode),
                        "cannot ask the kernel whether QEMU's user can open this share (setpriv \
                         failed); its mode bits say no, starting anyway"
                    );
                }
                continue;
            }
            Some(false) => first_refused(&dir, user),
        };
        let Some(blocked) = blocked else {
            continue;
        };
        let who = user.name.clone().unwrap_or_else(|| user.uid.to_string());
        let mut fixes = vec![format!(
            "give {who} {} on {} (e.g. `setfacl -m u:{who}:{} {}`)",
            blocked.needs,
            blocked.path.display(),
            blocked.needs,
            shell_quote(&blocked.path.to_string_lossy()),
        )];
        // A forced 9p also has to be lifted for virtiofs to serve it.
        let and_auto = if requested == SharedDirsDriver::NineP {
            " with shared_dirs_driver = \"auto\""
        } else {
            ""
        };
        if support.virtiofs {
            if share.read_only && !support.virtiofs_readonly() && !policy.insecure_readonly {
                fixes.push(format!(
                    "or let virtiofs serve it{and_auto} (virtiofsd runs as root): libvirt {} \
                     cannot make virtiofs read-only, so that needs libvirt {} or \
                     allow_insecure_readonly_mounts = true in the plugin's provider.libvirt block \
                     (the guest's mount alone then keeps it read-only)",
                    readable_version(support.libvirt_version),
                    readable_version(VIRTIOFS_READONLY_VERSION),
                ));
            } else if !share.read_only && !policy.writable {
                fixes.push(format!(
                    "or let virtiofs serve it{and_auto} and allow_writable_virtiofs = true in the \
                     plugin's provider.libvirt block (virtiofsd runs as root: root in the guest \
                     then creates root-owned files on the host)"
                ));
            } else if requested == SharedDirsDriver::NineP {
                fixes.push(
                    "or set shared_dirs_driver = \"auto\" or \"virtiofs\" (virtiofsd runs as root)"
                        .into(),
                );
            }
        }
        return Err(format!(
            "{} ({} in the guest, {} on the host) cannot be shared over 9p: QEMU runs as {} and \
             cannot open it, because {} is mode {:04o} owned by {}:{}; {}",
            describe(share),
            share.guest_path,
            share.host_dir.display(),
            user.display(),
            blocked.path.display(),
            blocked.mode,
            blocked.owner,
            blocked.group,
            fixes.join(", "),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn share(tag: &str, guest_path: &str, read_only: bool) -> GuestShare {
        GuestShare {
            host_dir: PathBuf::from("/srv").join(tag),
            tag: tag.into(),
            guest_path: guest_path.into(),
            read_only,
        }
    }

    fn support(virtiofs: bool, libvirt_version: u32) -> ShareSupport {
        ShareSupport {
            virtiofs,
            libvirt_version,
            qemu_identity: None,
            local: true,
        }
    }

    fn transports(planned: &[PlannedShare]) -> Vec<(Transport, bool)> {
        planned
            .iter()
            .map(|p| (p.transport, p.host_read_only))
            .collect()
    }

    /// Go's rules, plus ours where libvirt can enforce read-only virtiofs.
    #[test]
    fn auto_chooses_like_the_go_driver() {
        use Transport::{NineP, Virtiofs};
        let shares = [
            share("secrets", "/secrets", true),
            share("vol0", "/data", false),
        ];
        let auto = |support: ShareSupport, insecure_readonly, writable| {
            let policy = VirtiofsPolicy {
                insecure_readonly,
                writable,
            };
            transports(&choose(&shares, SharedDirsDriver::Auto, &support, policy).expect("ok"))
        };
        // libvirt 9: read-only shares need 9p; writable ones too unless the
        // operator accepts virtiofsd's root (Go would use virtiofs).
        assert_eq!(
            auto(support(true, 9_000_000), false, false),
            [(NineP, true), (NineP, false)]
        );
        assert_eq!(
            auto(support(true, 9_000_000), false, true),
            [(NineP, true), (Virtiofs, false)]
        );
        // The insecure setting lets read-only shares use virtiofs, with
        // only the guest's mount keeping them read-only.
        assert_eq!(
            auto(support(true, 9_000_000), true, true),
            [(Virtiofs, false), (Virtiofs, false)]
        );
        assert_eq!(
            auto(support(true, 9_000_000), true, false),
            [(Virtiofs, false), (NineP, false)]
        );
        // libvirt 11 enforces read-only virtiofs, insecure setting or not
        // (Go drops <readonly/> whenever the setting is on).
        for insecure in [false, true] {
            assert_eq!(
                auto(support(true, 11_000_000), insecure, true),
                [(Virtiofs, true), (Virtiofs, false)]
            );
            assert_eq!(
                auto(support(true, 11_000_000), insecure, false),
                [(Virtiofs, true), (NineP, false)]
            );
        }
        // No virtiofs in QEMU: everything over 9p.
        assert_eq!(
            auto(support(false, 11_000_000), true, true),
            [(NineP, true), (NineP, false)]
        );
    }

    #[test]
    fn forced_transports_refuse_what_they_cannot_do() {
        let read_only = [share("secrets", "/secrets", true)];
        let writable = [share("vol0", "/data", false)];
        let nine_p = choose(
            &writable,
            SharedDirsDriver::NineP,
            &support(true, 11_000_000),
            VirtiofsPolicy::default(),
        )
        .expect("9p");
        assert_eq!(transports(&nine_p), [(Transport::NineP, false)]);
        let error = choose(
            &writable,
            SharedDirsDriver::Virtiofs,
            &support(false, 11_000_000),
            VirtiofsPolicy::default(),
        )
        .expect_err("no virtiofs");
        assert!(error.contains("offers no virtiofs"), "{error}");
        let error = choose(
            &read_only,
            SharedDirsDriver::Virtiofs,
            &support(true, 9_000_000),
            VirtiofsPolicy::default(),
        )
        .expect_err("no read-only virtiofs");
        for needle in [
            "the task's secrets dir",
            "/secrets",
            "libvirt 9.0.0",
            "11.0.0",
            "allow_insecure_readonly_mounts",
        ] {
            assert!(error.contains(needle), "{needle:?} in {error}");
        }
        let insecure = choose(
            &read_only,
            SharedDirsDriver::Virtiofs,
            &support(true, 9_000_000),
            VirtiofsPolicy {
                insecure_readonly: true,
                writable: false,
            },
        )
        .expect("insecure read-only virtiofs");
        assert_eq!(transports(&insecure), [(Transport::Virtiofs, false)]);
        // Writable virtiofs only with the operator's opt-in, named.
        let error = choose(
            &writable,
            SharedDirsDriver::Virtiofs,
            &support(true, 11_000_000),
            VirtiofsPolicy {
                insecure_readonly: true,
                writable: false,
            },
        )
        .expect_err("writable virtiofs without the opt-in");
        for needle in [
            "volume_mount 0 (/data in the guest)",
            "virtiofsd runs as root",
            "allow_writable_virtiofs = true",
        ] {
            assert!(error.contains(needle), "{needle:?} in {error}");
        }
        let allowed = choose(
            &writable,
            SharedDirsDriver::Virtiofs,
            &support(true, 9_000_000),
            VirtiofsPolicy {
                insecure_readonly: false,
                writable: true,
            },
        )
        .expect("writable virtiofs with the opt-in");
        assert_eq!(transports(&allowed), [(Transport::Virtiofs, false)]);
    }

    #[test]
    fn mount_commands_per_transport_quote_everything() {
        let planned = |transport, read_only, path: &str| PlannedShare {
            share: GuestShare {
                host_dir: "/x".into(),
                tag: "vol0".into(),
                guest_path: path.into(),
                read_only,
            },
            transport,
            host_read_only: false,
        };
        assert_eq!(
            mount_commands(&[
                planned(Transport::NineP, true, "/data/it's"),
                planned(Transport::NineP, false, "/rw"),
                planned(Transport::Virtiofs, true, "/ro"),
                planned(Transport::Virtiofs, false, "/rw"),
            ]),
            [
                "mkdir -p '/data/it'\\''s' && mount -t 9p -o trans=virtio,version=9p2000.L,ro 'vol0' '/data/it'\\''s'",
                "mkdir -p '/rw' && mount -t 9p -o trans=virtio,version=9p2000.L 'vol0' '/rw'",
                "mkdir -p '/ro' && mount -t virtiofs -o ro 'vol0' '/ro'",
                "mkdir -p '/rw' && mount -t virtiofs 'vol0' '/rw'",
            ]
        );
    }

    #[test]
    fn the_qemu_user_comes_from_passwd_and_group() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      libvirt-qemu:x:64055:107:Libvirt Qemu,,,:/var/lib/libvirt:/usr/sbin/nologin\n";
        let group = "kvm:x:107:libvirt-qemu\nlibvirt-qemu:x:64055:libvirt-qemu\nother:x:5:root\n";
        let user = QemuUser::from_files(
            QemuIdentity {
                uid: 64055,
                gid: 64055,
            },
            passwd,
            group,
        );
        assert_eq!(user.name.as_deref(), Some("libvirt-qemu"));
        assert!(user.in_group(107) && user.in_group(64055) && !user.in_group(5));
        let nobody = QemuUser::from_files(
            QemuIdentity {
                uid: 4242,
                gid: 4242,
            },
            passwd,
            group,
        );
        assert_eq!(nobody.name, None);
        assert_eq!(nobody.groups, Vec::<u32>::new());
    }

    /// Mode bits decide; the first directory that stops QEMU's user is named.
    /// The walk starts at the test's own directory, so /tmp's parents do
    /// not matter.
    #[test]
    fn the_walk_names_the_first_closed_directory() {
        let root = tempfile::tempdir().expect("tempdir");
        let top = std::fs::canonicalize(root.path()).expect("path");
        let outer = top.join("outer");
        let share_dir = outer.join("share");
        std::fs::create_dir_all(&share_dir).expect("mkdir");
        let chmod = |path: &Path, mode| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        };
        chmod(&top, 0o755);
        chmod(&outer, 0o755);
        chmod(&share_dir, 0o755);
        // A stranger: neither the owner nor in the owning group.
        let stranger = QemuUser {
            uid: 4_000_001,
            gid: 4_000_001,
            name: Some("qemu".into()),
            groups: Vec::new(),
            nss: false,
        };
        assert_eq!(first_blocked(&top, &share_dir, &stranger), None);
        // Read and search are enough, writable share or not.
        chmod(&share_dir, 0o555);
        assert_eq!(first_blocked(&top, &share_dir, &stranger), None);
        chmod(&share_dir, 0o711);
        let blocked = first_blocked(&top, &share_dir, &stranger).expect("not readable");
        assert_eq!(blocked.path, share_dir);
        assert_eq!((blocked.needs, blocked.mode), ("rx", 0o711));
        chmod(&top, 0o700);
        let blocked = first_blocked(&top, &share_dir, &stranger).expect("not traversable");
        assert_eq!(blocked.path, top);
        assert_eq!(blocked.needs, "x");
        chmod(&top, 0o711);
        chmod(&outer, 0o700);
        let blocked = first_blocked(&top, &share_dir, &stranger).expect("not traversable");
        assert_eq!(blocked.path, outer);
        assert_eq!(blocked.needs, "x");
        // The owning group passes by its group bits.
        chmod(&outer, 0o750);
        chmod(&share_dir, 0o750);
        let owner_group = std::fs::metadata(&outer).expect("stat").gid();
        let member = QemuUser {
            groups: vec![owner_group],
            ..stranger.clone()
        };
        assert_eq!(first_blocked(&top, &share_dir, &member), None);
        assert!(first_blocked(&top, &share_dir, &stranger).is_some());
        // Root passes everything; a missing dir is QEMU's to report.
        let root_user = QemuUser {
            uid: 0,
            ..stranger.clone()
        };
        assert_eq!(first_blocked(&top, &share_dir, &root_user), None);
        assert_eq!(first_blocked(&top, &outer.join("missing"), &stranger), None);
    }

    /// A writable 9p share QEMU cannot write into only warns; the warning
    /// names the mode only when the mode is the reason (not on EROFS).
    #[test]
    fn write_warnings_blame_the_mode_only_when_it_is_the_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stranger = QemuUser {
            uid: 4_000_001,
            gid: 4_000_001,
            name: Some("qemu".into()),
            groups: Vec::new(),
            nss: false,
        };
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        assert_eq!(write_warning(dir.path(), &stranger, true), None);
        let warning = write_warning(dir.path(), &stranger, false).expect("a warning");
        assert!(warning.contains("mode 0755"), "{warning}");
        assert!(warning.contains("no write permission"), "{warning}");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
            .expect("chmod");
        // Mode allows it, the kernel says no: a read-only filesystem.
        let warning = write_warning(dir.path(), &stranger, false).expect("a warning");
        assert!(!warning.contains("mode 0"), "{warning}");
        assert!(warning.contains("read-only filesystem"), "{warning}");
    }

    /// The kernel check, where it can run (root): a 0700 dir inside an
    /// open one is refused and named; its 0711 parent closed instead names
    /// the parent, not the share; ACL-free read and search suffice for a
    /// writable share (only a warning for the missing write).
    #[test]
    fn the_kernel_check_names_the_directory_that_refuses() {
        let root = tempfile::tempdir().expect("tempdir");
        let top = std::fs::canonicalize(root.path()).expect("path");
        let stranger = QemuUser {
            uid: 4_000_001,
            gid: 4_000_001,
            name: None,
            groups: Vec::new(),
            nss: false,
        };
        std::fs::set_permissions(&top, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        // Where setpriv cannot run (not root) there is nothing to check.
        let Some(open) = kernel_test(&top, &stranger, &["-r", "-x"]) else {
            return;
        };
        if !open {
            // /tmp's parents are closed to strangers here: the walk must
            // then name one of them.
            let blocked = first_refused(&top, &stranger).expect("blocked");
            assert!(top.starts_with(&blocked.path), "{blocked:?}");
            return;
        }
        let outer = top.join("outer");
        let share_dir = outer.join("share");
        std::fs::create_dir_all(&share_dir).expect("mkdir");
        let chmod = |path: &Path, mode| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        };
        chmod(&outer, 0o755);
        chmod(&share_dir, 0o700);
        let planned = |read_only| PlannedShare {
            share: GuestShare {
                host_dir: share_dir.clone(),
                tag: "vol0".into(),
                guest_path: "/data".into(),
                read_only,
            },
            transport: Transport::NineP,
            host_read_only: read_only,
        };
        let check = |read_only| {
            check_qemu_access(
                &[planned(read_only)],
                &stranger,
                &support(false, 9_000_000),
                SharedDirsDriver::Auto,
                VirtiofsPolicy::default(),
            )
        };
        let error = check(true).expect_err("0700");
        assert!(
            error.contains(&format!("because {} is mode 0700", share_dir.display())),
            "{error}"
        );
        chmod(&share_dir, 0o755);
        chmod(&outer, 0o700);
        let error = check(true).expect_err("closed parent");
        assert!(
            error.contains(&format!("because {} is mode 0700", outer.display())),
            "{error}"
        );
        assert!(error.contains("give 4000001 x on"), "{error}");
        // Writable, r-x for QEMU's user: started (the guest's writes fail).
        chmod(&outer, 0o755);
        check(false).expect("read and search are enough to open it");
    }

    /// When the kernel check cannot run (here: an account `--init-groups`
    /// cannot resolve; anywhere: not root), mode bits alone refuse nothing.
    #[test]
    fn no_kernel_answer_no_refusal() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        let unresolvable = QemuUser {
            uid: 4_000_001,
            gid: 4_000_001,
            name: Some("ndvtest-nobody".into()),
            groups: Vec::new(),
            nss: true,
        };
        assert!(first_blocked(Path::new("/"), dir.path(), &unresolvable).is_some());
        let planned = PlannedShare {
            share: GuestShare {
                host_dir: dir.path().to_path_buf(),
                tag: "secrets".into(),
                guest_path: "/secrets".into(),
                read_only: true,
            },
            transport: Transport::NineP,
            host_read_only: true,
        };
        check_qemu_access(
            &[planned],
            &unresolvable,
            &support(true, 9_000_000),
            SharedDirsDriver::Auto,
            VirtiofsPolicy::default(),
        )
        .expect("the kernel could not be asked: QEMU gets to try");
    }

    /// Only a local libvirt's QEMU user is checked against this machine.
    #[test]
    fn a_remote_libvirt_is_not_checked_here() {
        let identity = QemuIdentity {
            uid: 64055,
            gid: 64055,
        };
        let with = |local| ShareSupport {
            qemu_identity: Some(identity),
            local,
            ..support(true, 9_000_000)
        };
        assert_eq!(identity_to_check(&with(true)), Some(identity));
        assert_eq!(identity_to_check(&with(false)), None);
        assert_eq!(identity_to_check(&support(true, 9_000_000)), None);
    }

    #[test]
    fn the_qemu_user_resolves_through_nss() {
        let root = QemuUser::lookup(QemuIdentity { uid: 0, gid: 0 });
        assert_eq!(root.name.as_deref(), Some("root"));
        assert!(root.nss, "getent and id are on every host this runs on");
        assert!(root.in_group(0));
        let nobody = QemuUser::lookup(QemuIdentity {
            uid: 4_000_001,
            gid: 4_000_001,
        });
        assert_eq!(nobody.name, None);
        assert!(!nobody.nss);
    }
}
