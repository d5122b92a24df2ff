//! Writing newc cpio archives (optionally gzip'd), the format Linux unpacks as its initramfs.
//!
//! The kernel unpacks several archives concatenated one after another, compressed or not, so a
//! per-test archive can be appended to a cached base image (see [`concatenate`]).

use crate::{HarnessError, Result};
use cpio::newc::{Builder, ModeFileType};
use flate2::Compression;
use flate2::write::GzEncoder;
use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

/// Builds one cpio archive. Parent directories are added on demand.
pub struct CpioArchive<W: Write> {
    out: Option<W>,
    next_ino: u32,
    dirs: BTreeSet<String>,
}

impl<W: Write> CpioArchive<W> {
    /// Starts an archive written to `out`.
    pub fn new(out: W) -> Self {
        CpioArchive { out: Some(out), next_ino: 1, dirs: BTreeSet::new() }
    }

    fn builder(&mut self, path: &str, mode: u32, kind: ModeFileType) -> Builder {
        self.next_ino += 1;
        Builder::new(path.trim_start_matches('/')).ino(self.next_ino).mode(mode).set_mode_file_type(kind)
    }

    fn write_entry(&mut self, builder: Builder, data: &[u8]) -> Result<()> {
        let size = u32::try_from(data.len()).map_err(|_| HarnessError::Unexpected {
            what: "cpio".into(),
            detail: format!("{} bytes do not fit a newc entry", data.len()),
        })?;
        let out = self.out.take().ok_or_else(|| HarnessError::Unexpected {
            what: "cpio".into(),
            detail: "archive already finished".into(),
        })?;
        let mut writer = builder.write(out, size);
        writer.write_all(data).map_err(HarnessError::io("writing a cpio entry"))?;
        self.out = Some(writer.finish().map_err(HarnessError::io("finishing a cpio entry"))?);
        Ok(())
    }

    /// Adds directory `path` and its parents (once each).
    pub fn dir(&mut self, path: &str) -> Result<()> {
        let path = path.trim_matches('/');
        if path.is_empty() || self.dirs.contains(path) {
            return Ok(());
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent)?;
        }
        self.dirs.insert(path.to_string());
        let b = self.builder(path, 0o755, ModeFileType::Directory);
        self.write_entry(b, &[])
    }

    /// Adds a regular file with `mode` permission bits.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<()> {
        if let Some((parent, _)) = path.trim_start_matches('/').rsplit_once('/') {
            self.dir(parent)?;
        }
        let b = self.builder(path, mode, ModeFileType::Regular);
        self.write_entry(b, data)
    }

    /// Adds a copy of host file `source` at `path`, keeping its permission bits.
    pub fn copy_from_host(&mut self, path: &str, source: &Path) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let data = std::fs::read(source).map_err(HarnessError::io(format!("reading {}", source.display())))?;
        let mode = std::fs::metadata(source).map(|m| m.permissions().mode() & 0o7777).unwrap_or(0o644);
        self.file(path, mode, &data)
    }

    /// Adds a symbolic link at `path` pointing to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        if let Some((parent, _)) = path.trim_start_matches('/').rsplit_once('/') {
            self.dir(parent)?;
        }
        let b = self.builder(path, 0o777, ModeFileType::Symlink);
        self.write_entry(b, target.as_bytes())
    }

    /// Adds a character device node (such as `/dev/console`, 5:1).
    pub fn char_device(&mut self, path: &str, major: u32, minor: u32) -> Result<()> {
        if let Some((parent, _)) = path.trim_start_matches('/').rsplit_once('/') {
            self.dir(parent)?;
        }
        let b = self.builder(path, 0o600, ModeFileType::Char).rdev_major(major).rdev_minor(minor);
        self.write_entry(b, &[])
    }

    /// Writes the trailer and returns the output.
    pub fn finish(mut self) -> Result<W> {
        let out = self.out.take().ok_or_else(|| HarnessError::Unexpected {
            what: "cpio".into(),
            detail: "archive already finished".into(),
        })?;
        cpio::newc::trailer(out).map_err(HarnessError::io("writing the cpio trailer"))
    }
}

/// An archive written gzip'd (fast compression) to a file.
pub type GzCpioFile = CpioArchive<GzEncoder<BufWriter<File>>>;

/// Starts a gzip'd archive at `path`.
pub fn create_gz(path: &Path) -> Result<GzCpioFile> {
    let file = File::create(path).map_err(HarnessError::io(format!("creating {}", path.display())))?;
    Ok(CpioArchive::new(GzEncoder::new(BufWriter::new(file), Compression::fast())))
}

/// Finishes a gzip'd archive started with [`create_gz`].
pub fn finish_gz(archive: GzCpioFile) -> Result<()> {
    let encoder = archive.finish()?;
    let mut writer = encoder.finish().map_err(HarnessError::io("finishing gzip"))?;
    writer.flush().map_err(HarnessError::io("flushing the initramfs"))
}

/// Writes `parts` one after another into `dest`, each padded with zeros to a 4-byte boundary
/// (the kernel looks for each following archive at a 4-byte-aligned offset).
pub fn concatenate(dest: &Path, parts: &[&[u8]]) -> Result<()> {
    let mut out = BufWriter::new(File::create(dest).map_err(HarnessError::io(format!("creating {}", dest.display())))?);
    for part in parts {
        out.write_all(part).map_err(HarnessError::io("writing an initramfs part"))?;
        let pad = (4 - part.len() % 4) % 4;
        out.write_all(&[0u8; 3][..pad]).map_err(HarnessError::io("padding an initramfs part"))?;
    }
    out.flush().map_err(HarnessError::io(format!("writing {}", dest.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_reads_back_with_parents_and_modes() {
        let mut a = CpioArchive::new(Vec::new());
        a.file("/usr/bin/tool", 0o755, b"#!/bin/sh\necho hi\n").unwrap();
        a.symlink("/bin/sh", "busybox").unwrap();
        a.dir("/usr").unwrap();
        let bytes = a.finish().unwrap();

        let mut entries = Vec::new();
        let mut rest = &bytes[..];
        loop {
            let mut reader = cpio::newc::Reader::new(rest).unwrap();
            if reader.entry().is_trailer() {
                break;
            }
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut reader, &mut data).unwrap();
            entries.push((reader.entry().name().to_string(), reader.entry().mode(), data));
            rest = reader.finish().unwrap();
        }
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(names, ["usr", "usr/bin", "usr/bin/tool", "bin", "bin/sh"]);
        assert_eq!(entries[0].1, 0o040755);
        assert_eq!(entries[2].1, 0o100755);
        assert_eq!(entries[2].2, b"#!/bin/sh\necho hi\n");
        assert_eq!(entries[4].1, 0o120777);
        assert_eq!(entries[4].2, b"busybox");
    }

    #[test]
    fn concatenation_pads_to_four_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out");
        concatenate(&dest, &[b"abcde", b"xy"]).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"abcde\0\0\0xy\0\0");
    }
}
