//! Which read misses fill the cache: all of them until the cache evicts, then only a
//! range that missed before (admission on a second miss).
//!
//! Once GC drops clean data to make room, a fill evicts something, so a range read once
//! (a scan, the long tail of a skewed workload) should not displace data read again and
//! again. A miss while evicting records the range's fingerprint in a direct-mapped table
//! (two bytes a slot, a slot for every four 4 KiB blocks of the shard's share, rounded up
//! to a power of two, allocated the first time the cache evicts); the range fills the
//! cache when it misses again while its fingerprint is still there. The table forgets by
//! overwriting: a range must miss twice within about a quarter of a cache's worth of
//! other misses. (A table of a cache's worth admitted more of a zipfian workload's long
//! tail: more fills and GC copies for fewer hits, `tests/zipf.rs`.)

use crate::engine::geometry::Geometry;

/// Most slots per shard (8 MiB): past 16M blocks of share the table only covers the most
/// recent misses of a larger cache.
const MAX_SLOTS: usize = 1 << 22;

#[derive(Debug)]
pub(super) struct Admission {
    /// Fingerprints of ranges that missed once while evicting (0: empty).
    slots: Vec<u16>,
    /// log2 of the table's size once allocated.
    bits: u32,
    /// GC drops clean data to make room: fills need a second miss.
    evicting: bool,
}

impl Admission {
    pub(super) fn new(geo: &Geometry) -> Self {
        let share = u64::from(geo.segment_count) * u64::from(geo.segment_sectors)
            / u64::from(geo.shard_count.max(1));
        let slots = ((share / 32).max(64) as usize)
            .next_power_of_two()
            .min(MAX_SLOTS);
        Admission {
            slots: Vec::new(),
            bits: slots.trailing_zeros(),
            evicting: false,
        }
    }

    /// GC had to drop clean data (on), or the log shrank well below GC's threshold (off).
    pub(super) fn set_evicting(&mut self, on: bool) {
        if on && self.slots.is_empty() {
            self.slots = vec![0; 1 << self.bits];
        }
        self.evicting = on;
    }

    pub(super) fn evicting(&self) -> bool {
        self.evicting
    }

    /// Whether a miss of [lba, lba+len) should fill the cache.
    pub(super) fn admit(&mut self, lba: u64, len: u32) -> bool {
        if !self.evicting {
            return true;
        }
        let (i, fp) = self.slot_of(lba, len);
        let Some(slot) = self.slots.get_mut(i) else {
            return true;
        };
        if *slot == fp {
            *slot = 0;
            true
        } else {
            *slot = fp;
            false
        }
    }

    /// What [`Admission::admit`] would answer, without recording the miss.
    pub(super) fn would_admit(&self, lba: u64, len: u32) -> bool {
        if !self.evicting {
            return true;
        }
        let (i, fp) = self.slot_of(lba, len);
        self.slots.get(i).is_none_or(|&slot| slot == fp)
    }

    /// The slot of [lba, lba+len) and its fingerprint there (never 0, which is empty).
    fn slot_of(&self, lba: u64, len: u32) -> (usize, u16) {
        let h = (lba ^ (u64::from(len) << 48)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        ((h >> (64 - self.bits)) as usize, (h as u16) | 1)
    }

    /// DRAM the table holds, in bytes.
    pub(super) fn bytes(&self) -> usize {
        self.slots.len() * 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Admission {
        Admission {
            slots: Vec::new(),
            bits: 10,
            evicting: false,
        }
    }

    #[test]
    fn admits_everything_until_evicting_then_a_second_miss_only() {
        let mut a = table();
        assert!(a.admit(8, 8) && a.admit(8, 8));
        assert_eq!(a.bytes(), 0);
        a.set_evicting(true);
        assert_eq!(a.bytes(), 2 << 10);
        assert!(!a.would_admit(16, 8) && !a.admit(16, 8), "first miss");
        assert!(a.would_admit(16, 8), "asking records nothing");
        assert!(a.admit(16, 8), "second miss");
        assert!(!a.admit(16, 8), "admitted: forgotten");
        // Another length is another range.
        assert!(!a.admit(24, 8) && !a.admit(24, 16) && a.admit(24, 16));
        a.set_evicting(false);
        assert!(a.admit(32, 8));
    }

    #[test]
    fn a_scan_is_never_admitted() {
        let mut a = table();
        a.set_evicting(true);
        let admitted = (0..100_000u64).filter(|b| a.admit(b * 8, 8)).count();
        // Only fingerprint collisions (1 in 2^15 per miss) get through.
        assert!(admitted < 20, "{admitted}");
    }
}
