//! Which extents each cache segment was given: GC reclaiming a segment visits the extents
//! logged there, not the whole map (a walk of every extent per reclaim cost 7 % of a core
//! under zipfian writes, and grows with the cache while a segment does not).
//!
//! An entry is the range an extent covered when it was put, 8 bytes. Entries go stale
//! (the range was written again, trimmed, moved): a reclaim checks each against the map,
//! which stays the only truth. A segment's list empties when it is reclaimed, keeping what
//! is still there (dirty data; kept extents until their move commits), so it holds at most
//! the keys logged in the segment since.

/// A range [lba, lba + len) some data extent covered when it was put: the LBA in the high
/// 48 bits, the length less one in the low 16 (an extent never spans more than a bucket,
/// 2^16 sectors).
#[derive(Debug, Clone, Copy)]
pub(super) struct Logged(u64);

/// Ranges at LBAs from here on (128 PiB) are not listed: the map walks instead.
const MAX_LBA: u64 = 1 << 48;

impl Logged {
    /// The range, if it packs.
    pub(super) fn new(lba: u64, len: u32) -> Option<Self> {
        let n = u64::from(len.checked_sub(1)?);
        (lba < MAX_LBA && n < 1 << 16).then_some(Logged((lba << 16) | n))
    }

    pub(super) fn lba(self) -> u64 {
        self.0 >> 16
    }

    pub(super) fn len(self) -> u32 {
        (self.0 & 0xffff) as u32 + 1
    }
}

/// The lists, one per segment of the cache (any shard may be given any segment).
#[derive(Debug)]
pub(super) struct Segments {
    /// Cache sector of segment 0, and sectors per segment.
    first: u64,
    sectors: u64,
    lists: Vec<Vec<Logged>>,
}

impl Segments {
    pub(super) fn new(first: u64, sectors: u64, count: u32) -> Self {
        Segments {
            first,
            sectors: sectors.max(1),
            lists: (0..count).map(|_| Vec::new()).collect(),
        }
    }

    /// The segment holding cache sector `pos`.
    fn of(&self, pos: u64) -> Option<usize> {
        let off = pos.checked_sub(self.first)?;
        usize::try_from(off / self.sectors)
            .ok()
            .filter(|&s| s < self.lists.len())
    }

    /// An extent of [lba, lba + len) was put at cache sector `pos`: listed in the segment
    /// holding it (in each, should it cross into the next: a log never does that). False
    /// if the range does not pack (the lists are then incomplete).
    #[inline]
    #[must_use]
    pub(super) fn note(&mut self, lba: u64, len: u32, pos: u64) -> bool {
        let Some(first) = self.of(pos) else {
            return true;
        };
        let Some(l) = Logged::new(lba, len) else {
            return false;
        };
        let last = self
            .of(pos + u64::from(len) - 1)
            .unwrap_or(self.lists.len() - 1);
        for s in first..=last {
            self.lists[s].push(l);
        }
        true
    }

    /// The segment that is exactly cache sectors [lo, hi), if any.
    pub(super) fn exactly(&self, lo: u64, hi: u64) -> Option<usize> {
        let s = self.of(lo)?;
        (lo == self.first + s as u64 * self.sectors && hi - lo == self.sectors).then_some(s)
    }

    /// Segment `s`'s list, leaving it empty (for the reclaim to refill with what stays).
    pub(super) fn take(&mut self, s: usize) -> Vec<Logged> {
        std::mem::take(&mut self.lists[s])
    }

    /// Gives segment `s` its list back (emptied, or with what a reclaim left there).
    pub(super) fn put_back(&mut self, s: usize, list: Vec<Logged>) {
        self.lists[s] = list;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_pack_up_to_a_bucket_and_128_pib() {
        let l = Logged::new(MAX_LBA - 1, 1 << 16).expect("packs");
        assert_eq!((l.lba(), l.len()), (MAX_LBA - 1, 1 << 16));
        assert!(Logged::new(MAX_LBA, 8).is_none());
        assert!(Logged::new(0, (1 << 16) + 1).is_none());
        assert!(Logged::new(0, 0).is_none());
    }

    #[test]
    fn an_extent_is_listed_in_the_segments_its_data_spans() {
        let mut s = Segments::new(100, 10, 3);
        assert!(s.note(7, 4, 105));
        assert!(s.note(9, 8, 108)); // crosses into segment 1
        assert!(s.note(1, 1, 50)); // before the segments: not listed
        assert_eq!(s.exactly(110, 120), Some(1));
        assert_eq!(s.exactly(111, 121), None);
        let lens = |s: &mut Segments, k| {
            let l = s.take(k);
            let v: Vec<u64> = l.iter().map(|l| l.lba()).collect();
            s.put_back(k, l);
            v
        };
        assert_eq!(lens(&mut s, 0), [7, 9]);
        assert_eq!(lens(&mut s, 1), [9]);
        assert!(!s.note(MAX_LBA, 8, 125));
    }
}
