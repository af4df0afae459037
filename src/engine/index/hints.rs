//! A set-associative table of the map's one-block extents (8 sectors starting on a 4 KiB
//! boundary, dirty or clean): the fast path of a 4 KiB lookup.
//!
//! The map finds an extent through a chain of dependent loads (bucket, directory, starts,
//! entry), each a cache miss once the data copies of other requests have evicted it. A
//! block's set here is found from its LBA alone, so a lookup is one cache line whose
//! address is known before anything is read: a host can prefetch it for a request several
//! requests ahead, with no load to wait for. The table is a cache of the map, never an
//! authority: every change to a one-block extent updates or forgets its entry, a block
//! evicted for lack of room is simply looked up in the map, and an entry is never stale.

use super::{Extent, State, MAX_HEAT};

/// Entries per set: a set is one 64-byte cache line of 16-byte entries.
const WAYS: usize = 4;

/// The table grows (doubling) while the map holds more extents than it has entries
/// ([`Hints::fit`]), up to this many sets (64 MiB); beyond, blocks compete for entries and
/// the losers use the map.
const MAX_SETS: usize = 1 << 20;

/// Sets of a new table.
const MIN_SETS: usize = 16;

/// `tag` bits 0..39: the block number plus one (0: an empty entry; blocks past 2^39, 2 PiB
/// of backing device, are looked up in the map).
const KEY_BITS: u32 = 39;
const KEY_MASK: u64 = (1 << KEY_BITS) - 1;
/// `tag` bits 39..41: the extent's heat (read hits, GC's second chance). A read hit the
/// hints answer counts here, in the line it already loaded; the map's copy of the extent
/// may not have it, so GC asks both ([`Hints::heat`]).
const HEAT_SHIFT: u32 = 39;
const HEAT_MASK: u64 = 3 << HEAT_SHIFT;
/// `tag` bit 41: the extent has a data CRC (then `aux` is that CRC, else the epoch).
const CRC_BIT: u64 = 1 << 41;
/// `tag` bit 42: dirty (else clean).
const DIRTY_BIT: u64 = 1 << 42;
/// `tag` bits 43..64: the cache sector's bits above the low 32 (kept in `low`).
const POS_HI_SHIFT: u32 = 43;
/// Cache sectors an entry can hold: 2^53 (4 EiB of cache).
const POS_LIMIT: u64 = 1 << (32 + 64 - POS_HI_SHIFT);

/// One block's extent, packed into 16 bytes.
#[derive(Clone, Copy, Default)]
struct Entry {
    tag: u64,
    /// Bits 0..32: the cache sector's low 32 bits; 32..64: the extent's `aux` word.
    low: u64,
}

#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
struct Set([Entry; WAYS]);

#[derive(Debug)]
pub(super) struct Hints {
    sets: Vec<Set>,
    /// The table grows no further ([`MAX_SETS`] but in tests).
    max_sets: usize,
}

impl std::fmt::Debug for Set {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Set")
    }
}

impl Default for Hints {
    fn default() -> Self {
        Hints {
            sets: vec![Set::default(); MIN_SETS],
            max_sets: MAX_SETS,
        }
    }
}

/// The key of the block starting at `lba`, if it starts on a 4 KiB boundary and fits.
#[inline]
fn key_of(lba: u64) -> Option<u64> {
    let key = (lba >> 3) + 1;
    (lba & 7 == 0 && key <= KEY_MASK).then_some(key)
}

#[inline]
fn heat_of(tag: u64) -> u8 {
    ((tag & HEAT_MASK) >> HEAT_SHIFT) as u8
}

/// Whether `e`, starting at `lba`, is an extent the table holds.
#[inline]
fn holds(lba: u64, e: &Extent) -> bool {
    lba & 7 == 0 && e.len() == 8 && e.is_data()
}

impl Hints {
    #[inline]
    fn set_of(&self, key: u64) -> usize {
        // Multiplicative hashing: the top bits of the product, so neighbouring blocks
        // spread over the table. `sets.len()` is a power of two, at least 2.
        let bits = self.sets.len().trailing_zeros();
        (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - bits)) as usize
    }

    /// The extent of the block starting at `lba`, if the table holds it.
    #[inline]
    pub fn get(&self, lba: u64) -> Option<Extent> {
        let key = key_of(lba)?;
        let set = &self.sets[self.set_of(key)];
        let e = set.0.iter().find(|e| e.tag & KEY_MASK == key)?;
        let pos = (e.tag >> POS_HI_SHIFT) << 32 | (e.low & 0xffff_ffff);
        let state = if e.tag & DIRTY_BIT != 0 {
            State::Dirty
        } else {
            State::Clean
        };
        let aux = (e.low >> 32) as u32;
        let crc = (e.tag & CRC_BIT != 0).then_some(aux);
        Some(Extent::new(pos, 8, state, crc, aux).with_heat(heat_of(e.tag)))
    }

    /// Counts a read hit in the heat of the block starting at `lba`, if the table holds it
    /// (the line a lookup just read: no other line is touched). False: not held.
    #[inline]
    pub fn touch(&mut self, lba: u64) -> bool {
        let Some(key) = key_of(lba) else {
            return false;
        };
        let s = self.set_of(key);
        match self.sets[s].0.iter_mut().find(|e| e.tag & KEY_MASK == key) {
            Some(e) => {
                let heat = heat_of(e.tag);
                if heat < MAX_HEAT {
                    e.tag = (e.tag & !HEAT_MASK) | u64::from(heat + 1) << HEAT_SHIFT;
                }
                true
            }
            None => false,
        }
    }

    /// The heat of the block starting at `lba` in the table (0 if not held).
    pub fn heat(&self, lba: u64) -> u8 {
        let Some(key) = key_of(lba) else {
            return 0;
        };
        self.sets[self.set_of(key)]
            .0
            .iter()
            .find(|e| e.tag & KEY_MASK == key)
            .map_or(0, |e| heat_of(e.tag))
    }

    /// The cache line a lookup of the block at `lba` reads (for prefetching).
    #[inline]
    pub fn addr(&self, lba: u64) -> *const u8 {
        let set = self.set_of((lba >> 3) + 1);
        self.sets.as_ptr().wrapping_add(set).cast()
    }

    /// The first word of the line a lookup of the block at `lba` reads: a load of that
    /// line and nothing else (see [`super::ExtentMap::warm`]).
    #[inline]
    pub fn line_word(&self, lba: u64) -> u64 {
        self.sets[self.set_of((lba >> 3) + 1)].0[0].tag
    }

    /// The map now has `e` starting at `lba`, replacing whatever started there: its entry
    /// follows (set, or forgotten if the table does not hold such extents).
    pub fn note(&mut self, lba: u64, e: &Extent) {
        let Some(key) = key_of(lba) else { return };
        if !holds(lba, e) || e.pos >= POS_LIMIT {
            return self.remove(key);
        }
        let entry = Entry {
            tag: key
                | (e.pos >> 32) << POS_HI_SHIFT
                | if e.state() == State::Dirty {
                    DIRTY_BIT
                } else {
                    0
                }
                | if e.has_crc() { CRC_BIT } else { 0 }
                | u64::from(e.heat()) << HEAT_SHIFT,
            low: (e.pos & 0xffff_ffff) | u64::from(e.aux) << 32,
        };
        let s = self.set_of(key);
        let set = &mut self.sets[s].0;
        if let Some(slot) = set.iter_mut().find(|x| x.tag & KEY_MASK == key) {
            *slot = entry;
            return;
        }
        if let Some(slot) = set.iter_mut().find(|x| x.tag == 0) {
            *slot = entry;
            return;
        }
        // A full set: the block takes the entry of one without heat, the first from a way
        // chosen by its own bits (spreading evictions over the ways). Where all have heat
        // it is left to the map: the heat of a hit counted here is in no other place, and
        // GC would drop that block as never read.
        let first = (key >> 20) as usize % WAYS;
        if let Some(w) = (0..WAYS)
            .map(|i| (first + i) % WAYS)
            .find(|&w| heat_of(set[w].tag) == 0)
        {
            set[w] = entry;
        }
    }

    /// The map's extent `e` starting at `lba` went or changed: its entry, if it had one,
    /// goes (until [`Hints::note`] of what replaced it).
    #[inline]
    pub fn forget(&mut self, lba: u64, e: &Extent) {
        if let Some(key) = key_of(lba).filter(|_| holds(lba, e)) {
            self.remove(key);
        }
    }

    fn remove(&mut self, key: u64) {
        let s = self.set_of(key);
        if let Some(slot) = self.sets[s].0.iter_mut().find(|x| x.tag & KEY_MASK == key) {
            *slot = Entry::default();
        }
    }

    /// Grows the table (doubling) until it has an entry for each of the map's `extents`:
    /// 16 to 32 bytes per extent, so that with the map's own ~30 the index stays within
    /// 64 bytes per cached extent. Entries compete for the ways of a set as the table
    /// fills: random blocks find their set full and are looked up in the map, 4 % of them
    /// at two entries per extent, a fifth at one.
    pub fn fit(&mut self, extents: usize) {
        while extents > self.sets.len() * WAYS && self.sets.len() < self.max_sets {
            self.grow();
        }
    }

    /// Twice the sets, every entry moved to its new set.
    fn grow(&mut self) {
        let twice = vec![Set::default(); self.sets.len() * 2];
        let old = std::mem::replace(&mut self.sets, twice);
        for e in old.iter().flat_map(|s| s.0.iter()).filter(|e| e.tag != 0) {
            let s = self.set_of(e.tag & KEY_MASK);
            // Each new set takes entries of one old set only, so it has room.
            if let Some(slot) = self.sets[s].0.iter_mut().find(|x| x.tag == 0) {
                *slot = *e;
            }
        }
    }

    /// Whether the block at `lba` has its entry in the line [`Hints::addr`] names (for
    /// tests).
    #[cfg(test)]
    pub fn holds_in_line(&self, lba: u64) -> bool {
        let line = self.addr(lba).cast::<Set>();
        let key = (lba >> 3) + 1;
        self.sets
            .iter()
            .any(|s| std::ptr::eq(s, line) && s.0.iter().any(|e| e.tag & KEY_MASK == key))
    }

    /// Every entry held, as (LBA, extent) (for tests).
    #[cfg(test)]
    pub fn entries(&self) -> Vec<(u64, Extent)> {
        let mut v = Vec::new();
        for e in self
            .sets
            .iter()
            .flat_map(|s| s.0.iter())
            .filter(|e| e.tag != 0)
        {
            let lba = ((e.tag & KEY_MASK) - 1) << 3;
            v.extend(self.get(lba).map(|x| (lba, x)));
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(pos: u64, state: State, epoch: u32) -> Extent {
        Extent::new(pos, 8, state, None, epoch)
    }

    #[test]
    fn holds_one_block_data_extents_only() {
        let mut h = Hints::default();
        h.note(8, &block(100, State::Dirty, 5));
        h.note(16, &block(200, State::Clean, 6));
        h.note(24, &Extent::new(300, 8, State::Dirty, Some(0xabcd), 0));
        assert_eq!(h.get(8), Some(block(100, State::Dirty, 5)));
        assert_eq!(h.get(16), Some(block(200, State::Clean, 6)));
        assert_eq!(h.get(24).and_then(|e| e.crc()), Some(0xabcd));
        // Not one aligned block of data: nothing held, and a held block noted so goes.
        h.note(33, &block(400, State::Dirty, 0));
        h.note(40, &Extent::new(500, 16, State::Dirty, None, 0));
        h.note(48, &Extent::new(0, 8, State::Zeroes, None, 0));
        h.note(8, &Extent::new(7, 8, State::Placeholder, None, 0));
        assert_eq!(
            (h.get(32), h.get(40), h.get(48), h.get(8)),
            (None, None, None, None)
        );
        // Forgetting checks the extent the map had, not just the block.
        h.forget(16, &Extent::new(200, 16, State::Clean, None, 0));
        assert!(h.get(16).is_some());
        h.forget(16, &block(200, State::Clean, 6));
        assert_eq!(h.get(16), None);
        assert_eq!(h.entries().len(), 1);
    }

    #[test]
    fn touch_counts_heat_of_a_held_block_only() {
        let mut h = Hints::default();
        h.note(8, &block(100, State::Clean, 5));
        assert!(h.heat(8) == 0 && h.get(8).unwrap().heat() == 0);
        assert!(h.touch(8));
        assert!(h.heat(8) == 1 && h.get(8).unwrap().heat() == 1);
        // Heat saturates.
        for _ in 0..5 {
            h.touch(8);
        }
        assert_eq!(h.heat(8), MAX_HEAT);
        // It is a hint: the entry is still the same extent.
        assert_eq!(h.get(8), Some(block(100, State::Clean, 5)));
        assert!(!h.touch(16) && h.heat(16) == 0);
        // Noting a new extent there takes its heat.
        h.note(8, &block(200, State::Clean, 5));
        assert_eq!(h.heat(8), 0);
        h.note(8, &block(300, State::Dirty, 5).with_heat(2));
        assert_eq!(h.heat(8), 2);
        assert_eq!(h.get(8).unwrap().state(), State::Dirty);
    }

    #[test]
    fn a_full_set_keeps_the_blocks_whose_hits_it_counted() {
        let mut h = Hints {
            max_sets: MIN_SETS,
            ..Hints::default()
        };
        // Five blocks of one set: the fifth finds it full.
        let set = h.set_of(1);
        let same: Vec<u64> = (0..)
            .map(|b: u64| b * 8)
            .filter(|&lba| h.set_of((lba >> 3) + 1) == set)
            .take(WAYS + 1)
            .collect();
        for &lba in &same[..WAYS] {
            h.note(lba, &block(lba, State::Clean, 0));
        }
        // One of them read: the newcomer takes a cold one's entry, never the hot one's.
        assert!(h.touch(same[0]));
        h.note(same[WAYS], &block(7, State::Clean, 0));
        assert_eq!(h.heat(same[0]), 1);
        assert_eq!(h.get(same[WAYS]), Some(block(7, State::Clean, 0)));
        // All it holds read: a newcomer (the block it let go) is left to the map, and every
        // heat stays.
        for &lba in &same {
            h.touch(lba);
        }
        let newcomer = same[1..]
            .iter()
            .copied()
            .find(|&lba| h.get(lba).is_none())
            .expect("one block was evicted");
        h.note(newcomer, &block(9, State::Clean, 0));
        assert_eq!(h.get(newcomer), None);
        assert_eq!(h.entries().len(), WAYS);
        assert!(h.entries().iter().all(|(lba, _)| h.heat(*lba) > 0));
    }

    #[test]
    fn cache_positions_keep_every_bit_and_large_ones_are_not_held() {
        let mut h = Hints::default();
        let pos = (1 << 52) + (1 << 32) + 0x1234_5678;
        h.note(0, &block(pos, State::Dirty, u32::MAX));
        assert_eq!(h.get(0), Some(block(pos, State::Dirty, u32::MAX)));
        h.note(0, &block(POS_LIMIT, State::Dirty, 0));
        assert_eq!(h.get(0), None);
        // A block number past the key's bits is never held.
        h.note(KEY_MASK << 3, &block(1, State::Dirty, 0));
        assert_eq!(h.get(KEY_MASK << 3), None);
    }

    #[test]
    fn growing_keeps_every_entry_and_a_full_table_evicts_without_losing_truth() {
        let mut h = Hints::default();
        for b in 0..5000u64 {
            h.note(b * 8, &block(b * 100, State::Dirty, b as u32));
            // As the map does after each extent it adds.
            h.fit(b as usize + 1);
        }
        // An entry for each extent, at most twice as many (the DRAM budget).
        let entries = h.sets.len() * WAYS;
        assert!((5000..10_000).contains(&entries), "{entries} entries");
        // Blocks noted while their set was full were left to the map; what the table
        // holds is right, and in the line a lookup reads.
        let held = h.entries();
        assert!(
            held.len() * 10 >= 5000 * 9,
            "only {} of 5000 held",
            held.len()
        );
        for &(lba, e) in &held {
            let b = lba / 8;
            assert_eq!(e, block(b * 100, State::Dirty, b as u32), "{b}");
            assert!(h.holds_in_line(lba));
        }
        // Growing moves every entry.
        h.fit(entries + 1);
        assert_eq!(h.sets.len() * WAYS, 2 * entries);
        assert_eq!(h.entries().len(), held.len());
        for &(lba, e) in &held {
            assert_eq!(h.get(lba), Some(e));
            assert!(h.holds_in_line(lba));
        }
        // At its largest the table evicts: what it still holds is still right.
        let mut small = Hints {
            max_sets: MIN_SETS,
            ..Hints::default()
        };
        for b in 0..1000u64 {
            small.note(b * 8, &block(b, State::Clean, 0));
        }
        assert_eq!(small.sets.len(), MIN_SETS);
        let held: Vec<_> = small.entries();
        assert_eq!(held.len(), MIN_SETS * WAYS);
        for (lba, e) in held {
            assert_eq!(e, block(lba / 8, State::Clean, 0));
        }
    }
}
