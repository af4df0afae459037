//! Which extents each cache segment was given: GC reclaiming a segment visits the extents
//! logged there, not the whole map (a walk of every extent per reclaim cost 7 % of a core
//! under zipfian writes, and grows with the cache while a segment does not).
//!
//! An entry is the range an extent covered when it was put, 12 bytes. Entries go stale
//! (the range was written again, trimmed, moved): a reclaim checks each against the map,
//! which stays the only truth. A segment's list empties when it is reclaimed, keeping what
//! is still there (dirty data; kept extents until their move commits), so it holds at most
//! the keys logged in the segment since.

/// A range [lba, lba + len) some data extent covered when it was put.
#[derive(Debug, Clone, Copy)]
#[repr(C, packed(4))]
pub(super) struct Logged {
    pub(super) lba: u64,
    pub(super) len: u32,
}

const _: () = assert!(std::mem::size_of::<Logged>() == 12);

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
    /// holding it (in each, should it cross into the next: a log never does that).
    #[inline]
    pub(super) fn note(&mut self, lba: u64, len: u32, pos: u64) {
        let Some(first) = self.of(pos) else {
            return;
        };
        let last = self
            .of(pos + u64::from(len.max(1)) - 1)
            .unwrap_or(self.lists.len() - 1);
        for s in first..=last {
            self.lists[s].push(Logged { lba, len });
        }
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
