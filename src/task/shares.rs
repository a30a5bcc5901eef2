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
use crate::hypervisor::Hypervisor;
use crate::libvirt::domain_xml::DomainType;
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

/// Chooses each share's transport.
///
/// `auto` follows the Go driver: a read-only share uses 9p when libvirt
/// cannot make virtiofs read-only (before 11.0.0) and the operator did not
/// set `allow_insecure_readonly_mounts`; any other share uses virtiofs when
/// QEMU offers it, else 9p. `virtiofs` and `9p` force one transport and
/// refuse what it cannot do.
pub fn choose(
    shares: &[GuestShare],
    requested: SharedDirsDriver,
    support: &ShareSupport,
    allow_insecure_readonly: bool,
) -> Result<Vec<PlannedShare>, String> {
    let readonly_virtiofs_ok = support.virtiofs_readonly() || allow_insecure_readonly;
    let mut planned = Vec::with_capacity(shares.len());
    for share in shares {
        let transport = match requested {
            SharedDirsDriver::NineP => Transport::NineP,
            SharedDirsDriver::Auto => {
                if (share.read_only && !readonly_virtiofs_ok) || !support.virtiofs {
                    Transport::NineP
                } else {
                    Transport::Virtiofs
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
                if share.read_only && !readonly_virtiofs_ok {
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
    let support = hypervisor.share_support(domain_type, arch, machine)?;
    let insecure = settings.insecure_readonly_virtiofs();
    let planned = choose(shares, requested, &support, insecure).map_err(TaskError::Invalid)?;
    if let Some(identity) = support.qemu_identity {
        let user = QemuUser::lookup(identity);
        check_qemu_access(&planned, &user, &support, requested, insecure)
            .map_err(TaskError::Invalid)?;
    }
    Ok(planned)
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
    /// From /etc/passwd; `None` for a uid without an entry.
    pub name: Option<String>,
    /// Supplementary groups (libvirt sets the user's groups from
    /// /etc/group, as initgroups does).
    pub groups: Vec<u32>,
}

impl QemuUser {
    /// Resolves libvirt's uid/gid through the host's passwd and group files.
    pub fn lookup(identity: QemuIdentity) -> QemuUser {
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
        QemuUser::from_files(identity, &passwd, &group)
    }

    /// [`QemuUser::lookup`] on given file contents.
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
}

/// The first directory on the way to a share that QEMU's user cannot pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    pub path: PathBuf,
    pub mode: u32,
    pub owner: u32,
    pub group: u32,
    /// The permission it lacks there: `x` (search) above the share, `rx`
    /// or `rwx` on the share itself.
    pub needs: &'static str,
}

/// Walks from `/` to `dir` by mode bits: every directory above needs
/// search permission, `dir` itself read and search (and write when the
/// share is writable). `None` when everything passes or `dir` cannot be
/// resolved (QEMU then reports it itself).
pub fn first_blocked(dir: &Path, user: &QemuUser, writable: bool) -> Option<Blocked> {
    if user.uid == 0 {
        return None;
    }
    let dir = std::fs::canonicalize(dir).ok()?;
    let ancestors: Vec<&Path> = dir.ancestors().collect();
    for (depth, path) in ancestors.iter().rev().enumerate() {
        let is_share = depth + 1 == ancestors.len();
        let (bits, needs) = match (is_share, writable) {
            (false, _) => (0o1, "x"),
            (true, false) => (0o5, "rx"),
            (true, true) => (0o7, "rwx"),
        };
        let metadata = std::fs::metadata(path).ok()?;
        let mode = metadata.mode() & 0o7777;
        let class = if metadata.uid() == user.uid {
            mode >> 6
        } else if user.in_group(metadata.gid()) {
            mode >> 3
        } else {
            mode
        } & 0o7;
        if class & bits != bits {
            return Some(Blocked {
                path: path.to_path_buf(),
                mode,
                owner: metadata.uid(),
                group: metadata.gid(),
                needs,
            });
        }
    }
    None
}

/// Asks the kernel whether QEMU's user can use `dir`, by running `test` as
/// that user (so ACLs count). `None` when the check cannot run.
fn kernel_allows(dir: &Path, user: &QemuUser, writable: bool) -> Option<bool> {
    // Absolute, so `test` cannot read the path as an operator.
    let dir = std::fs::canonicalize(dir).ok()?;
    let dir = dir.as_path();
    let mut command = std::process::Command::new("setpriv");
    command
        .arg(format!("--reuid={}", user.uid))
        .arg(format!("--regid={}", user.gid));
    if user.name.is_some() {
        command.arg("--init-groups");
    } else {
        command.arg("--clear-groups");
    }
    command
        .args(["--", "test", "-r"])
        .arg(dir)
        .args(["-a", "-x"])
        .arg(dir);
    if writable {
        command.args(["-a", "-w"]).arg(dir);
    }
    let status = command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .ok()?;
    match status.code() {
        Some(0) => Some(true),
        Some(1) => Some(false),
        _ => None,
    }
}

/// Refuses a start whose 9p shares QEMU cannot open, naming the share as
/// the job sees it, the user QEMU runs as, and the fix. virtiofs shares
/// pass: virtiofsd runs as root.
pub fn check_qemu_access(
    planned: &[PlannedShare],
    user: &QemuUser,
    support: &ShareSupport,
    requested: SharedDirsDriver,
    allow_insecure_readonly: bool,
) -> Result<(), String> {
    for planned in planned
        .iter()
        .filter(|planned| planned.transport == Transport::NineP)
    {
        let share = &planned.share;
        let writable = !share.read_only;
        let Some(blocked) = first_blocked(&share.host_dir, user, writable) else {
            continue;
        };
        // Mode bits say no; an ACL may still say yes.
        if kernel_allows(&share.host_dir, user, writable) == Some(true) {
            continue;
        }
        let who = user.name.clone().unwrap_or_else(|| user.uid.to_string());
        let mut fixes = vec![format!(
            "give {who} {} on {} (e.g. `setfacl -m u:{who}:{} {}`)",
            blocked.needs,
            blocked.path.display(),
            blocked.needs,
            shell_quote(&blocked.path.to_string_lossy()),
        )];
        if support.virtiofs {
            if share.read_only && !support.virtiofs_readonly() && !allow_insecure_readonly {
                fixes.push(format!(
                    "or let virtiofs serve it (virtiofsd runs as root): libvirt {} cannot make \
                     virtiofs read-only, so that needs libvirt {} or allow_insecure_readonly_mounts \
                     = true in the plugin's provider.libvirt block (the guest's mount alone then \
                     keeps it read-only)",
                    readable_version(support.libvirt_version),
                    readable_version(VIRTIOFS_READONLY_VERSION),
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
             cannot {} it, because {} is mode {:04o} owned by {}:{}; {}",
            describe(share),
            share.guest_path,
            share.host_dir.display(),
            user.display(),
            if writable { "read and write" } else { "read" },
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
        let auto = |support: ShareSupport, insecure| {
            transports(&choose(&shares, SharedDirsDriver::Auto, &support, insecure).expect("ok"))
        };
        // libvirt 9: read-only shares need 9p, writable ones get virtiofs.
        assert_eq!(
            auto(support(true, 9_000_000), false),
            [(NineP, true), (Virtiofs, false)]
        );
        // The insecure setting lets read-only shares use virtiofs, with
        // only the guest's mount keeping them read-only.
        assert_eq!(
            auto(support(true, 9_000_000), true),
            [(Virtiofs, false), (Virtiofs, false)]
        );
        // libvirt 11 enforces read-only virtiofs, insecure setting or not
        // (Go drops <readonly/> whenever the setting is on).
        for insecure in [false, true] {
            assert_eq!(
                auto(support(true, 11_000_000), insecure),
                [(Virtiofs, true), (Virtiofs, false)]
            );
        }
        // No virtiofs in QEMU: everything over 9p.
        assert_eq!(
            auto(support(false, 11_000_000), true),
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
            false,
        )
        .expect("9p");
        assert_eq!(transports(&nine_p), [(Transport::NineP, false)]);
        let error = choose(
            &writable,
            SharedDirsDriver::Virtiofs,
            &support(false, 11_000_000),
            false,
        )
        .expect_err("no virtiofs");
        assert!(error.contains("offers no virtiofs"), "{error}");
        let error = choose(
            &read_only,
            SharedDirsDriver::Virtiofs,
            &support(true, 9_000_000),
            false,
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
            true,
        )
        .expect("insecure read-only virtiofs");
        assert_eq!(transports(&insecure), [(Transport::Virtiofs, false)]);
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
    #[test]
    fn the_walk_names_the_first_closed_directory() {
        let root = tempfile::tempdir().expect("tempdir");
        let outer = root.path().join("outer");
        let share_dir = outer.join("share");
        std::fs::create_dir_all(&share_dir).expect("mkdir");
        let chmod = |path: &Path, mode| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        };
        chmod(root.path(), 0o755);
        chmod(&outer, 0o755);
        chmod(&share_dir, 0o755);
        // A stranger: neither the owner nor in the owning group.
        let stranger = QemuUser {
            uid: 4_000_001,
            gid: 4_000_001,
            name: Some("qemu".into()),
            groups: Vec::new(),
        };
        // /tmp and above may be anything on a test machine; start from a
        // state where the tempdir's parents pass.
        if first_blocked(root.path(), &stranger, false).is_some() {
            return;
        }
        assert_eq!(first_blocked(&share_dir, &stranger, false), None);
        let blocked = first_blocked(&share_dir, &stranger, true).expect("not writable");
        assert_eq!((blocked.needs, blocked.mode), ("rwx", 0o755));
        chmod(&share_dir, 0o711);
        let blocked = first_blocked(&share_dir, &stranger, false).expect("not readable");
        assert_eq!(
            blocked.path,
            std::fs::canonicalize(&share_dir).expect("path")
        );
        assert_eq!(blocked.needs, "rx");
        chmod(&outer, 0o700);
        let blocked = first_blocked(&share_dir, &stranger, false).expect("not traversable");
        assert_eq!(blocked.path, std::fs::canonicalize(&outer).expect("path"));
        assert_eq!(blocked.needs, "x");
        // The owning group passes by its group bits.
        chmod(&outer, 0o750);
        chmod(&share_dir, 0o750);
        let owner_group = std::fs::metadata(&outer).expect("stat").gid();
        let member = QemuUser {
            groups: vec![owner_group],
            ..stranger.clone()
        };
        assert_eq!(first_blocked(&share_dir, &member, false), None);
        assert!(first_blocked(&share_dir, &stranger, false).is_some());
        // Root passes everything; a missing dir is QEMU's to report.
        let root_user = QemuUser {
            uid: 0,
            ..stranger.clone()
        };
        assert_eq!(first_blocked(&share_dir, &root_user, true), None);
        assert_eq!(
            first_blocked(&outer.join("missing"), &stranger, false),
            None
        );
    }
}
