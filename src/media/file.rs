//! A file (or block device node) as a block device: pread/pwrite, fdatasync to persist.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::BlockDevice;
use crate::engine::IoError;

#[derive(Debug)]
pub struct FileDevice {
    file: File,
    sectors: u64,
    /// fdatasync after every write, so a completed write is durable (cache devices).
    sync_writes: bool,
}

impl FileDevice {
    /// Opens an existing file; with `create_bytes`, creates or extends it to that size.
    pub fn open(
        path: &Path,
        create_bytes: Option<u64>,
        sync_writes: bool,
    ) -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create_bytes.is_some())
            .truncate(false)
            .open(path)?;
        if let Some(n) = create_bytes {
            if file.metadata()?.len() < n {
                file.set_len(n)?;
            }
        }
        let len = file.metadata()?.len();
        Ok(FileDevice {
            file,
            sectors: len / 512,
            sync_writes,
        })
    }

    /// Opens read-only (for inspection); writes fail.
    pub fn open_read_only(path: &Path) -> std::io::Result<Self> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        Ok(FileDevice {
            file,
            sectors: len / 512,
            sync_writes: false,
        })
    }
}

impl BlockDevice for FileDevice {
    fn sectors(&self) -> u64 {
        self.sectors
    }

    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.file
            .read_exact_at(buf, sector * 512)
            .map_err(|_| IoError::Device)
    }

    fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), IoError> {
        self.file
            .write_all_at(buf, sector * 512)
            .map_err(|_| IoError::Device)?;
        if self.sync_writes {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), IoError> {
        self.file.sync_data().map_err(|_| IoError::Device)
    }
}
