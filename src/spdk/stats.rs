//! I/O counters.
//!
//! Counting is per channel (one channel per SPDK thread that submits to the bdev): each
//! counter is a plain `Cell` touched only on its channel's thread, so the I/O path takes no
//! lock and issues no atomic. `bdev_pcache_get_stats` visits every channel on its own thread
//! with `spdk_for_each_channel` and sums. A channel that goes away folds its counts into the
//! bdev's [`Retired`] totals (a mutex, taken only on channel destroy and by get_stats).
//! The sum is a snapshot, not a barrier: I/O completing during the walk may or may not be in it.

use std::cell::Cell;
use std::sync::Mutex;

use serde_json::{json, Value};

use super::ffi::spdk_bdev_io_type as t;

/// Counters of one channel. Not `Sync`: used only on the channel's thread.
#[derive(Default)]
pub(crate) struct IoCounters {
    read_ops: Cell<u64>,
    read_bytes: Cell<u64>,
    write_ops: Cell<u64>,
    write_bytes: Cell<u64>,
    flush_ops: Cell<u64>,
    unmap_ops: Cell<u64>,
    write_zeroes_ops: Cell<u64>,
    reset_ops: Cell<u64>,
    failed_ops: Cell<u64>,
}

fn bump(c: &Cell<u64>, by: u64) {
    c.set(c.get().wrapping_add(by));
}

impl IoCounters {
    /// Record one completed request of `io_type` moving `bytes`.
    #[inline]
    pub(crate) fn record(&self, io_type: t::Type, bytes: u64, ok: bool) {
        if !ok {
            bump(&self.failed_ops, 1);
            return;
        }
        match io_type {
            t::SPDK_BDEV_IO_TYPE_READ => {
                bump(&self.read_ops, 1);
                bump(&self.read_bytes, bytes);
            }
            t::SPDK_BDEV_IO_TYPE_WRITE => {
                bump(&self.write_ops, 1);
                bump(&self.write_bytes, bytes);
            }
            t::SPDK_BDEV_IO_TYPE_FLUSH => bump(&self.flush_ops, 1),
            t::SPDK_BDEV_IO_TYPE_UNMAP => bump(&self.unmap_ops, 1),
            t::SPDK_BDEV_IO_TYPE_WRITE_ZEROES => bump(&self.write_zeroes_ops, 1),
            t::SPDK_BDEV_IO_TYPE_RESET => bump(&self.reset_ops, 1),
            _ => {}
        }
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        Snapshot {
            read_ops: self.read_ops.get(),
            read_bytes: self.read_bytes.get(),
            write_ops: self.write_ops.get(),
            write_bytes: self.write_bytes.get(),
            flush_ops: self.flush_ops.get(),
            unmap_ops: self.unmap_ops.get(),
            write_zeroes_ops: self.write_zeroes_ops.get(),
            reset_ops: self.reset_ops.get(),
            failed_ops: self.failed_ops.get(),
        }
    }
}

/// Plain totals.
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Snapshot {
    pub read_ops: u64,
    pub read_bytes: u64,
    pub write_ops: u64,
    pub write_bytes: u64,
    pub flush_ops: u64,
    pub unmap_ops: u64,
    pub write_zeroes_ops: u64,
    pub reset_ops: u64,
    pub failed_ops: u64,
}

impl Snapshot {
    pub(crate) fn add(&mut self, o: &Snapshot) {
        self.read_ops = self.read_ops.wrapping_add(o.read_ops);
        self.read_bytes = self.read_bytes.wrapping_add(o.read_bytes);
        self.write_ops = self.write_ops.wrapping_add(o.write_ops);
        self.write_bytes = self.write_bytes.wrapping_add(o.write_bytes);
        self.flush_ops = self.flush_ops.wrapping_add(o.flush_ops);
        self.unmap_ops = self.unmap_ops.wrapping_add(o.unmap_ops);
        self.write_zeroes_ops = self.write_zeroes_ops.wrapping_add(o.write_zeroes_ops);
        self.reset_ops = self.reset_ops.wrapping_add(o.reset_ops);
        self.failed_ops = self.failed_ops.wrapping_add(o.failed_ops);
    }

    pub(crate) fn to_json(self, name: &str, channels: u64) -> Value {
        json!({
            "name": name,
            "channels": channels,
            "read_ops": self.read_ops,
            "read_bytes": self.read_bytes,
            "write_ops": self.write_ops,
            "write_bytes": self.write_bytes,
            "flush_ops": self.flush_ops,
            "unmap_ops": self.unmap_ops,
            "write_zeroes_ops": self.write_zeroes_ops,
            "reset_ops": self.reset_ops,
            "failed_ops": self.failed_ops,
        })
    }
}

/// Totals of channels that no longer exist.
#[derive(Default)]
pub(crate) struct Retired(Mutex<Snapshot>);

impl Retired {
    pub(crate) fn fold(&self, s: &Snapshot) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).add(s);
    }
    pub(crate) fn get(&self) -> Snapshot {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_sums() {
        let c = IoCounters::default();
        c.record(t::SPDK_BDEV_IO_TYPE_READ, 4096, true);
        c.record(t::SPDK_BDEV_IO_TYPE_WRITE, 512, true);
        c.record(t::SPDK_BDEV_IO_TYPE_WRITE, 512, false);
        c.record(t::SPDK_BDEV_IO_TYPE_FLUSH, 0, true);
        let mut s = c.snapshot();
        s.add(&c.snapshot());
        assert_eq!(
            (
                s.read_ops,
                s.read_bytes,
                s.write_ops,
                s.write_bytes,
                s.failed_ops,
                s.flush_ops
            ),
            (2, 8192, 2, 1024, 2, 2)
        );
        let r = Retired::default();
        r.fold(&s);
        assert_eq!(r.get(), s);
    }
}
