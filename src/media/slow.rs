//! A device with a cost per command, standing in for a slow backing device (NVMe behind
//! a cache) in benchmarks: each command takes `latency` plus its bytes at `bandwidth`.
//! The host here is synchronous, so the cost is spent by spinning on the clock.

use std::time::{Duration, Instant};

use super::BlockDevice;
use crate::engine::IoError;

pub struct SlowDevice<D: BlockDevice> {
    inner: D,
    latency: Duration,
    bytes_per_sec: u64,
    /// Time spent in commands so far.
    pub busy: Duration,
}

impl<D: BlockDevice> SlowDevice<D> {
    pub fn new(inner: D, latency: Duration, bytes_per_sec: u64) -> Self {
        SlowDevice {
            inner,
            latency,
            bytes_per_sec: bytes_per_sec.max(1),
            busy: Duration::ZERO,
        }
    }

    pub fn inner(&self) -> &D {
        &self.inner
    }

    fn spend(&mut self, bytes: u64) {
        let t = self.latency + Duration::from_nanos(bytes * 1_000_000_000 / self.bytes_per_sec);
        let start = Instant::now();
        while start.elapsed() < t {
            std::hint::spin_loop();
        }
        self.busy += t;
    }
}

impl<D: BlockDevice> BlockDevice for SlowDevice<D> {
    fn sectors(&self) -> u64 {
        self.inner.sectors()
    }
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.spend(buf.len() as u64);
        self.inner.read(sector, buf)
    }
    fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), IoError> {
        self.spend(buf.len() as u64);
        self.inner.write(sector, buf)
    }
    fn flush(&mut self) -> Result<(), IoError> {
        self.spend(0);
        self.inner.flush()
    }
    fn write_zeroes(&mut self, sector: u64, sectors: u64) -> Result<(), IoError> {
        self.spend(0);
        self.inner.write_zeroes(sector, sectors)
    }
}
