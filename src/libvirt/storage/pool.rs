//! Directory storage pools: make sure each configured pool exists, is
//! active and matches the config, and refresh it before use.

use std::path::{Path, PathBuf};
use std::time::Duration;

use virt::connect::Connect;
use virt::error::ErrorNumber;
use virt::storage_pool::StoragePool;

use super::{has_code, Pool};
use crate::libvirt::xml::{self, XmlWriter};
use crate::storage::StorageError;

/// Pool types whose volumes are plain files under a target directory.
const DIRECTORY_POOL_TYPES: [&str; 3] = ["dir", "fs", "netfs"];

/// libvirt refuses to refresh a pool while it builds a volume (e.g. runs
/// qemu-img for an overlay); the Go driver retries every second for 30 s.
const BUSY_RETRIES: u32 = 30;
const BUSY_DELAY: Duration = Duration::from_secs(1);

/// Whether a libvirt error means "try again shortly": another job is
/// building a volume in the pool.
pub(crate) fn is_busy(error: &virt::error::Error) -> bool {
    let message = error.message();
    message.contains("asynchronous jobs running") || message.contains("still being allocated")
}

/// Runs `call` until it succeeds, fails for a reason other than
/// [`is_busy`], or the retries run out.
pub(crate) fn retry_busy<T>(
    mut call: impl FnMut() -> Result<T, virt::error::Error>,
) -> Result<T, virt::error::Error> {
    let mut attempt = 0;
    loop {
        match call() {
            Err(error) if is_busy(&error) && attempt < BUSY_RETRIES => {
                attempt += 1;
                std::thread::sleep(BUSY_DELAY);
            }
            other => return other,
        }
    }
}

/// The XML of a persistent directory pool.
pub(crate) fn directory_pool_xml(name: &str, path: &Path) -> String {
    let mut w = XmlWriter::new();
    w.open("pool", &[("type", "dir")]);
    w.text("name", &[], name);
    w.open("target", &[]);
    w.text("path", &[], &path.to_string_lossy());
    w.close("target");
    w.close("pool");
    w.finish(true)
}

/// Looks up pool `name`, defining, building and starting it when needed,
/// and returns it refreshed.
///
/// - Missing: define a persistent `dir` pool at `path`, build it (libvirt
///   creates the directory), start it and mark it autostart. If any step
///   fails the definition is removed again, so the next attempt starts over.
/// - Defined but inactive: build it if the directory is gone, then start it.
/// - Existing with another type or target path: an error naming both, since
///   silently using another directory would put disks where the operator
///   does not expect them.
///
/// Two callers racing to define the same pool both succeed: the loser finds
/// the winner's pool.
pub fn ensure_directory_pool(
    conn: &Connect,
    name: &str,
    path: &Path,
) -> Result<Pool, StorageError> {
    let (pool, defined_here) = match conn.lookup_storage_pool_by_name(name) {
        Ok(pool) => (pool, false),
        Err(error) if has_code(&error, ErrorNumber::NoStoragePool) => {
            match conn.define_storage_pool_xml(&directory_pool_xml(name, path), 0) {
                Ok(pool) => (pool, true),
                // Someone else defined it meanwhile; use theirs.
                Err(define_error) => match conn.lookup_storage_pool_by_name(name) {
                    Ok(pool) => (pool, false),
                    Err(_) => {
                        return Err(StorageError::pool(name, "defining the pool", define_error))
                    }
                },
            }
        }
        Err(error) => return Err(StorageError::pool(name, "looking up the pool", error)),
    };

    if !defined_here {
        check_matches(&pool, name, path)?;
    }
    let started = start_if_inactive(&pool, name, path, defined_here);
    if let Err(error) = started {
        if defined_here {
            // Leave nothing half-made behind; the next start defines afresh.
            if let Err(undefine) = pool.undefine() {
                tracing::warn!(pool = name, error = %undefine, "could not undefine a pool that failed to start");
            }
        }
        return Err(error);
    }
    if defined_here {
        if let Err(error) = pool.set_autostart(true) {
            tracing::warn!(pool = name, error = %error, "could not mark the storage pool autostart");
        }
        tracing::info!(pool = name, path = %path.display(), "defined and started storage pool");
    }

    if let Err(error) = refresh(&pool, name) {
        // libvirt stops a pool whose refresh fails (e.g. its directory was
        // removed); rebuild and start it once before giving up.
        if pool.is_active().unwrap_or(true) {
            return Err(error);
        }
        start_if_inactive(&pool, name, path, false)?;
        refresh(&pool, name)?;
    }
    Ok(Pool::new(pool, name))
}

/// Looks pool `name` up; `Ok(None)` when libvirt has no such pool.
pub fn lookup_pool(conn: &Connect, name: &str) -> Result<Option<Pool>, StorageError> {
    match conn.lookup_storage_pool_by_name(name) {
        Ok(pool) => Ok(Some(Pool::new(pool, name))),
        Err(error) if has_code(&error, ErrorNumber::NoStoragePool) => Ok(None),
        Err(error) => Err(StorageError::pool(name, "looking up the pool", error)),
    }
}

fn start_if_inactive(
    pool: &StoragePool,
    name: &str,
    path: &Path,
    always_build: bool,
) -> Result<(), StorageError> {
    let active = pool
        .is_active()
        .map_err(|e| StorageError::pool(name, "checking whether the pool is active", e))?;
    if active {
        return Ok(());
    }
    // A dir pool cannot start without its directory. Build only when
    // needed so an operator's existing directory keeps its owner and mode.
    if always_build || !path.exists() {
        pool.build(0).map_err(|e| {
            StorageError::pool(
                name,
                format!("building the pool (creating {})", path.display()),
                e,
            )
        })?;
    }
    match pool.create(0) {
        Ok(()) => Ok(()),
        // Another caller started it between our check and our create.
        Err(_) if pool.is_active().unwrap_or(false) => Ok(()),
        Err(error) => Err(StorageError::pool(name, "starting the pool", error)),
    }
}

/// Errors unless the existing pool is a directory pool at `path`.
fn check_matches(pool: &StoragePool, name: &str, path: &Path) -> Result<(), StorageError> {
    let xml = pool
        .xml_desc(0)
        .map_err(|e| StorageError::pool(name, "reading the pool XML", e))?;
    let root = xml::parse(&xml).map_err(|source| StorageError::PoolXml {
        pool: name.to_string(),
        source: Box::new(source),
    })?;
    let pool_type = root.attr("type").unwrap_or_default().to_string();
    if !DIRECTORY_POOL_TYPES.contains(&pool_type.as_str()) {
        return Err(StorageError::PoolType {
            pool: name.to_string(),
            pool_type,
        });
    }
    let existing = PathBuf::from(root.text_at(&["target", "path"]).unwrap_or_default());
    if !same_path(&existing, path) {
        return Err(StorageError::PoolPathMismatch {
            pool: name.to_string(),
            existing,
            wanted: path.to_path_buf(),
        });
    }
    Ok(())
}

/// Equal by components (so a trailing `/` does not matter), or the same
/// directory once symlinks are resolved.
fn same_path(a: &Path, b: &Path) -> bool {
    if a == b {
        return true;
    }
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Refreshes the pool so libvirt's volume list matches the directory,
/// retrying while libvirt reports asynchronous jobs in the pool.
pub fn refresh_pool(pool: &Pool) -> Result<(), StorageError> {
    refresh(&pool.inner, &pool.name)
}

fn refresh(pool: &StoragePool, name: &str) -> Result<(), StorageError> {
    retry_busy(|| pool.refresh(0)).map_err(|e| StorageError::pool(name, "refreshing the pool", e))
}

/// Every pool libvirt knows, as (name, active, type), sorted by name, for
/// the `driver.virt.storage_pool.<name>` fingerprint attributes. Pools that
/// vanish while being listed are left out.
pub fn pool_fingerprint(conn: &Connect) -> Result<Vec<(String, bool, String)>, StorageError> {
    let pools = conn
        .list_all_storage_pools(0)
        .map_err(|e| StorageError::pool("*", "listing storage pools", e))?;
    let mut out: Vec<(String, bool, String)> = pools
        .iter()
        .filter_map(|pool| {
            let name = pool.name().ok()?;
            let active = pool.is_active().ok()?;
            let xml = pool.xml_desc(0).ok()?;
            let pool_type = xml::parse(&xml)
                .ok()?
                .attr("type")
                .unwrap_or_default()
                .to_string();
            Some((name, active, pool_type))
        })
        .collect();
    out.sort();
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A private test-driver connection whose node has one pool "existing"
    /// at `/nonexistent/existing` (the test driver never touches disk).
    pub(crate) struct TestNode {
        pub dir: tempfile::TempDir,
        pub conn: Connect,
    }

    pub(crate) fn test_node() -> TestNode {
        let dir = tempfile::tempdir().expect("tempdir");
        let node = dir.path().join("node.xml");
        std::fs::write(
            &node,
            "<node>\n  <pool type='dir'>\n    <name>existing</name>\n    \
             <target><path>/nonexistent/existing</path></target>\n  </pool>\n\
             <pool type='logical'>\n    <name>lvm</name>\n    \
             <target><path>/dev/vg</path></target>\n  </pool>\n</node>\n",
        )
        .expect("write node.xml");
        let uri = format!("test://{}", node.display());
        let conn = Connect::open(Some(&uri)).expect("open the libvirt test driver");
        TestNode { dir, conn }
    }

    #[test]
    fn pool_xml_is_escaped() {
        let xml = directory_pool_xml("a<b", Path::new("/x/&y"));
        assert!(xml.contains("<name>a&lt;b</name>"), "{xml}");
        assert!(xml.contains("<path>/x/&amp;y</path>"), "{xml}");
        let root = xml::parse(&xml).unwrap();
        assert_eq!(root.attr("type"), Some("dir"));
        assert_eq!(root.text_at(&["name"]).as_deref(), Some("a<b"));
    }

    #[test]
    fn same_path_ignores_trailing_slash() {
        assert!(same_path(Path::new("/a/b/"), Path::new("/a/b")));
        assert!(!same_path(Path::new("/a/bc"), Path::new("/a/b")));
    }

    #[test]
    fn defines_starts_and_is_idempotent() {
        let node = test_node();
        let path = node.dir.path().join("pools/new");
        let pool = ensure_directory_pool(&node.conn, "new", &path).unwrap();
        assert!(pool.inner.is_active().unwrap());
        assert!(pool.inner.is_persistent().unwrap());
        assert!(pool.inner.autostart().unwrap());
        let xml = pool.inner.xml_desc(0).unwrap();
        assert_eq!(
            xml::parse(&xml)
                .unwrap()
                .text_at(&["target", "path"])
                .map(PathBuf::from),
            Some(path.clone())
        );
        // Again: same pool, no error; also with a trailing slash.
        let again = ensure_directory_pool(&node.conn, "new", &path).unwrap();
        assert_eq!(
            again.inner.uuid_string().unwrap(),
            pool.inner.uuid_string().unwrap()
        );
        let slash = PathBuf::from(format!("{}/", path.display()));
        ensure_directory_pool(&node.conn, "new", &slash).unwrap();
    }

    #[test]
    fn uses_a_pool_from_the_node_and_starts_inactive_ones() {
        let node = test_node();
        let existing = Path::new("/nonexistent/existing");
        let pool = ensure_directory_pool(&node.conn, "existing", existing).unwrap();
        assert!(pool.inner.is_active().unwrap());

        // Defined but stopped: started again.
        pool.inner.destroy().unwrap();
        assert!(!pool.inner.is_active().unwrap());
        let pool = ensure_directory_pool(&node.conn, "existing", existing).unwrap();
        assert!(pool.inner.is_active().unwrap());

        // Defined by someone else and never started.
        let path = node.dir.path().join("other");
        node.conn
            .define_storage_pool_xml(&directory_pool_xml("other", &path), 0)
            .unwrap();
        let pool = ensure_directory_pool(&node.conn, "other", &path).unwrap();
        assert!(pool.inner.is_active().unwrap());
    }

    #[test]
    fn mismatched_pools_are_refused() {
        let node = test_node();
        let err =
            ensure_directory_pool(&node.conn, "existing", Path::new("/elsewhere")).unwrap_err();
        assert!(
            matches!(err, StorageError::PoolPathMismatch { .. }),
            "{err}"
        );
        let message = err.to_string();
        assert!(
            message.contains("/nonexistent/existing") && message.contains("/elsewhere"),
            "{message}"
        );
        assert!(
            message.contains("storage_pools.directory.existing.path"),
            "{message}"
        );

        let err = ensure_directory_pool(&node.conn, "lvm", Path::new("/dev/vg")).unwrap_err();
        assert!(matches!(err, StorageError::PoolType { .. }), "{err}");
    }

    #[test]
    fn fingerprint_lists_pools() {
        let node = test_node();
        ensure_directory_pool(&node.conn, "new", &node.dir.path().join("p")).unwrap();
        let pools = pool_fingerprint(&node.conn).unwrap();
        let names: Vec<&str> = pools.iter().map(|(n, _, _)| n.as_str()).collect();
        assert!(
            names.contains(&"existing") && names.contains(&"new") && names.contains(&"lvm"),
            "{pools:?}"
        );
        assert!(
            pools.contains(&("new".to_string(), true, "dir".to_string())),
            "{pools:?}"
        );
        assert!(
            pools.iter().any(|(n, _, t)| n == "lvm" && t == "logical"),
            "{pools:?}"
        );
    }
}
