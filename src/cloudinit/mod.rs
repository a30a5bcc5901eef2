//! cloud-init NoCloud seed for a VM: task settings → three YAML documents →
//! an ISO 9660 image labelled `cidata`.
//!
//! The core ([`docs::render`], [`password::sha512_crypt`]) is pure and
//! deterministic (the salt is passed in); randomness ([`password::random_salt`])
//! and the ISO encoding ([`iso::build_seed_iso`]) sit at the edges.

pub mod docs;
pub mod iso;
pub mod password;

pub use docs::{render, skipped_env_names, CloudInitInput, SeedFiles};
pub use iso::build_seed_iso;
pub use password::{random_salt, sha512_crypt};

/// Errors while building a cloud-init seed. Each names the offending task
/// setting and what would fix it; messages never repeat their `source`.
#[derive(Debug, thiserror::Error)]
pub enum CloudInitError {
    /// The instance id is what cloud-init keys its once-per-instance state on.
    #[error("cloud-init instance-id is empty: pass a unique, non-empty id such as the VM name")]
    EmptyInstanceId,

    /// cloud-init uses the instance id as a directory name under
    /// /var/lib/cloud/instances, so path-like or control characters break it.
    #[error("cloud-init instance-id {instance_id:?} is invalid: {reason}")]
    InvalidInstanceId {
        instance_id: String,
        reason: &'static str,
    },

    #[error(
        "hostname {hostname:?} is not a valid RFC 1123 label: use 1 to 63 ASCII letters, digits \
         and '-', not starting or ending with '-'"
    )]
    InvalidHostname { hostname: String },

    #[error(
        "timezone {timezone:?} is invalid: use an IANA zone name such as \"UTC\" or \
         \"Europe/Berlin\" (letters, digits, '/', '_', '-', '+'; no '..')"
    )]
    InvalidTimezone { timezone: String },

    /// An empty password would let anyone log in as the default user.
    #[error("default_user_password is set but empty: remove it or set a non-empty password")]
    EmptyPassword,

    #[error("hashing default_user_password with SHA-512 crypt failed")]
    Hash(#[source] sha_crypt::password_hash::Error),

    #[error("reading random bytes for the password salt from the operating system failed")]
    Random(#[source] getrandom::Error),

    #[error("building the cloud-init seed ISO (volume label \"cidata\") failed")]
    Iso(#[source] hadris_iso::write::IsoCreationError),
}
