//! Packs the seed files into a NoCloud ISO 9660 image, in memory.

use std::io::Cursor;
use std::sync::Arc;

use hadris_iso::read::PathSeparator;
use hadris_iso::write::options::{CreationFeatures, IsoFormatOptions};
use hadris_iso::write::{File, InputFiles, IsoImageWriter};

use super::docs::SeedFiles;
use super::CloudInitError;

/// NoCloud finds its seed by this filesystem label; cloud-init also accepts
/// `CIDATA`, but lowercase is what every tool writes.
pub const VOLUME_LABEL: &str = "cidata";

/// Builds the seed ISO: volume label `cidata`, `meta-data`, `user-data` and
/// `vendor-data` at the root, with Rock Ridge and Joliet so the guest sees
/// those exact lowercase, hyphenated names (plain ISO 9660 would turn them
/// into `META_DAT;1`).
pub fn build_seed_iso(files: &SeedFiles) -> Result<Vec<u8>, CloudInitError> {
    let file = |name: &str, contents: &str| File::File {
        name: Arc::new(name.to_owned()),
        contents: contents.as_bytes().to_vec(),
    };
    let input = InputFiles {
        path_separator: PathSeparator::ForwardSlash,
        files: vec![
            file("meta-data", &files.meta_data),
            file("user-data", &files.user_data),
            file("vendor-data", &files.vendor_data),
        ],
    };
    let options = IsoFormatOptions {
        volume_name: VOLUME_LABEL.to_owned(),
        system_id: None,
        volume_set_id: None,
        publisher_id: None,
        preparer_id: None,
        application_id: None,
        sector_size: 2048,
        features: CreationFeatures::extensions(),
        path_separator: PathSeparator::ForwardSlash,
        // Keep the label lowercase; strict mode would upper-case it.
        strict_charset: false,
    };
    let mut out = Cursor::new(Vec::new());
    IsoImageWriter::create(&mut out, input, options).map_err(CloudInitError::Iso)?;
    Ok(out.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::process::{Command, Output};

    fn run(tool: &str, package: &str, args: &[&str]) -> Output {
        let out = Command::new(tool).args(args).output().unwrap_or_else(|e| {
            panic!("cannot run {tool} ({e}): install it with `apt-get install -y {package}`")
        });
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn isoinfo(args: &[&str]) -> Output {
        run("isoinfo", "genisoimage", args)
    }

    fn seed() -> SeedFiles {
        SeedFiles {
            meta_data: "instance-id: \"i-1\"\nlocal-hostname: \"web-1\"\n".into(),
            user_data: "#cloud-config\n# caf\u{e9} \u{1f680}\nruncmd: [\"echo hi\"]\n".into(),
            // Bigger than one 2048-byte sector, to cover multi-sector files.
            vendor_data: format!("#cloud-config\nruncmd:\n{}", "  - \"x\"\n".repeat(600)),
        }
    }

    fn write_iso(dir: &Path, files: &SeedFiles) -> String {
        let path = dir.join("seed.iso");
        std::fs::write(&path, build_seed_iso(files).unwrap()).unwrap();
        path.to_str().unwrap().to_owned()
    }

    #[test]
    fn volume_label_and_extensions() {
        let dir = tempfile::tempdir().unwrap();
        let iso = write_iso(dir.path(), &seed());
        let info = String::from_utf8(isoinfo(&["-d", "-i", &iso]).stdout).unwrap();
        assert!(info.contains("Volume id: cidata\n"), "{info}");
        assert!(info.contains("Rock Ridge signatures"), "{info}");
        assert!(info.contains("Joliet with UCS level 3 found"), "{info}");
    }

    #[test]
    fn files_round_trip_byte_exact_via_rock_ridge_and_joliet() {
        let dir = tempfile::tempdir().unwrap();
        let files = seed();
        let iso = write_iso(dir.path(), &files);
        for flag in ["-R", "-J"] {
            let listing = String::from_utf8(isoinfo(&[flag, "-f", "-i", &iso]).stdout).unwrap();
            let mut names: Vec<&str> = listing.lines().collect();
            names.sort_unstable();
            assert_eq!(
                names,
                ["/meta-data", "/user-data", "/vendor-data"],
                "{flag}"
            );

            for (name, content) in [
                ("/meta-data", &files.meta_data),
                ("/user-data", &files.user_data),
                ("/vendor-data", &files.vendor_data),
            ] {
                let got = isoinfo(&[flag, "-x", name, "-i", &iso]).stdout;
                assert_eq!(got, content.as_bytes(), "{flag} {name}");
            }
        }
    }

    #[test]
    fn rendered_seed_survives_the_iso() {
        let input = crate::cloudinit::CloudInitInput {
            instance_id: "i-2".into(),
            hostname: "db".into(),
            default_user_password: Some("pw".into()),
            cmds: vec!["echo \"a\nb\"".into()],
            env: [("K".to_owned(), "v'1".to_owned())].into(),
            ..Default::default()
        };
        let files = crate::cloudinit::render(&input, [9; 12]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let iso = write_iso(dir.path(), &files);
        let got = isoinfo(&["-R", "-x", "/vendor-data", "-i", &iso]).stdout;
        assert_eq!(got, files.vendor_data.as_bytes());
    }

    #[test]
    fn blkid_sees_cidata_label() {
        let dir = tempfile::tempdir().unwrap();
        let iso = write_iso(dir.path(), &seed());
        // -p probes the file directly, bypassing blkid's cache.
        let out = run("blkid", "util-linux", &["-p", "-o", "export", &iso]);
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.lines().any(|l| l == "LABEL=cidata"), "{text}");
        assert!(text.lines().any(|l| l == "TYPE=iso9660"), "{text}");
    }

    #[test]
    fn empty_files_are_fine() {
        let dir = tempfile::tempdir().unwrap();
        let files = SeedFiles {
            meta_data: String::new(),
            user_data: String::new(),
            vendor_data: String::new(),
        };
        let iso = write_iso(dir.path(), &files);
        assert!(isoinfo(&["-R", "-x", "/user-data", "-i", &iso])
            .stdout
            .is_empty());
    }
}
