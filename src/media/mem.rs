//! A RAM block device: writes are durable when they complete (like persistent memory).

use super::BlockDevice;
use crate::engine::IoError;

#[derive(Debug, Clone)]
pub struct MemDevice {
    data: Vec<u8>,
}

impl MemDevice {
    pub fn new(bytes: u64) -> Self {
        MemDevice {
            data: vec![0; bytes as usize],
        }
    }

    pub fn from_vec(data: Vec<u8>) -> Self {
        MemDevice { data }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }

    pub fn into_vec(self) -> Vec<u8> {
        self.data
    }

    fn range(&self, sector: u64, len: usize) -> Result<std::ops::Range<usize>, IoError> {
        let start = usize::try_from(sector * 512).map_err(|_| IoError::Device)?;
        let end = start.checked_add(len).ok_or(IoError::Device)?;
        if end > self.data.len() {
            return Err(IoError::Device);
        }
        Ok(start..end)
    }
}

impl BlockDevice for MemDevice {
    fn sectors(&self) -> u64 {
        self.data.len() as u64 / 512
    }

    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let r = self.range(sector, buf.len())?;
        buf.copy_from_slice(&self.data[r]);
        Ok(())
    }

    fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), IoError> {
        let r = self.range(sector, buf.len())?;
        self.data[r].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), IoError> {
        Ok(())
    }

    fn write_zeroes(&mut self, sector: u64, sectors: u64) -> Result<(), IoError> {
        let r = self.range(sector, (sectors * 512) as usize)?;
        self.data[r].fill(0);
        Ok(())
    }
}
