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
    //! Reading the ISO back with `isoinfo` and `blkid` is tested in
    //! tests/cloudinit_host_tools.rs; this checks the header without tools.

    use super::*;

    #[test]
    fn primary_volume_descriptor_carries_the_label() {
        let files = SeedFiles {
            meta_data: "instance-id: \"i-1\"\n".into(),
            user_data: String::new(),
            vendor_data: String::new(),
        };
        let iso = build_seed_iso(&files).unwrap();
        // ECMA-119: the primary volume descriptor is sector 16; type 1,
        // "CD001", and the volume identifier at bytes 40..72, space padded.
        let pvd = &iso[16 * 2048..17 * 2048];
        assert_eq!(pvd[0], 1);
        assert_eq!(&pvd[1..6], b"CD001");
        assert_eq!(&pvd[40..72], format!("{VOLUME_LABEL:<32}").as_bytes());
    }
}
