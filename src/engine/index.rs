//! Per-shard ordered extent map: backing LBA → where the data is.
//!
//! Extents never intersect. Inserting a newer extent trims, splits or replaces the older
//! ones it overlaps. A `Placeholder` marks a read miss whose backing data is being filled
//! into the cache; anything newer that lands on it wins, so a fill can only commit where
//! its placeholder survived.

use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    /// Cached data not yet on the backing device.
    Dirty,
    /// Cached data equal to the backing device.
    Clean,
    /// Reads as zeros; dirty until written back as WRITE_ZEROES.
    Zeroes,
    /// Reads as zeros; dirty until written back as UNMAP.
    Unmapped,
    /// A read-miss fill in flight; `pos` holds the fill id. Reads treat it as a miss.
    Placeholder,
}

/// 16 bytes; the map's key (8 bytes) is the start LBA. Length, state and the CRC flag
/// share one word, and the CRC shares another with the epoch (in-place overwrite, the only
/// user of the epoch, is off when data CRCs are on), keeping the index under 64 bytes of
/// DRAM per extent.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Cache-device sector of the first data sector (fill id for placeholders).
    pub pos: u64,
    /// Bits 0..24: length in sectors; 24..28: state; 28: has CRC.
    len_flags: u32,
    /// The data CRC32C of the whole extent if it has one, else the low 32 bits of the
    /// flush epoch that wrote it.
    aux: u32,
}

const LEN_MASK: u32 = (1 << 24) - 1;
const CRC_FLAG: u32 = 1 << 28;
/// Longest extent: 8 GiB, far above any stripe.
pub const MAX_EXTENT_SECTORS: u32 = LEN_MASK;

impl std::fmt::Debug for Extent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Extent")
            .field("pos", &self.pos)
            .field("len", &self.len())
            .field("state", &self.state())
            .field("crc", &self.crc())
            .field("epoch", &self.epoch())
            .finish()
    }
}

impl Extent {
    /// `epoch` is kept only when there is no CRC.
    pub fn new(pos: u64, len: u32, state: State, crc: Option<u32>, epoch: u32) -> Self {
        debug_assert!(len > 0 && len <= LEN_MASK);
        let state_bits = (state as u32) << 24;
        match crc {
            Some(c) => Extent {
                pos,
                len_flags: len | state_bits | CRC_FLAG,
                aux: c,
            },
            None => Extent {
                pos,
                len_flags: len | state_bits,
                aux: epoch,
            },
        }
    }
    #[allow(clippy::len_without_is_empty)] // an extent is never empty
    pub fn len(&self) -> u32 {
        self.len_flags & LEN_MASK
    }
    pub fn state(&self) -> State {
        match (self.len_flags >> 24) & 0xf {
            0 => State::Dirty,
            1 => State::Clean,
            2 => State::Zeroes,
            3 => State::Unmapped,
            _ => State::Placeholder,
        }
    }
    pub fn crc(&self) -> Option<u32> {
        (self.len_flags & CRC_FLAG != 0).then_some(self.aux)
    }
    pub fn has_crc(&self) -> bool {
        self.len_flags & CRC_FLAG != 0
    }
    /// Low 32 bits of the writing epoch, when known (not for extents with a CRC).
    pub fn epoch(&self) -> Option<u32> {
        (!self.has_crc()).then_some(self.aux)
    }
    pub fn is_data(&self) -> bool {
        matches!(self.state(), State::Dirty | State::Clean)
    }
    pub fn is_dirty(&self) -> bool {
        matches!(self.state(), State::Dirty | State::Zeroes | State::Unmapped)
    }

    /// The part of this extent (starting at `start`) from `at` for `len` sectors. A part
    /// loses the CRC, which covers the whole extent only.
    fn slice(&self, start: u64, at: u64, len: u32) -> Extent {
        if at == start && len == self.len() {
            return *self;
        }
        let state = self.state();
        let pos = match state {
            State::Dirty | State::Clean => self.pos + (at - start),
            _ => self.pos,
        };
        Extent::new(pos, len, state, None, self.epoch().unwrap_or(0))
    }
}

/// One piece of a lookup: a mapped extent or a gap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub lba: u64,
    pub len: u32,
    /// `None` for a gap. For extents, the slice covering exactly this piece; `whole` tells
    /// whether the piece is the entire extent (so its CRC can be verified).
    pub extent: Option<Extent>,
    pub whole: bool,
}

#[derive(Debug, Default)]
pub struct ExtentMap {
    map: BTreeMap<u64, Extent>,
}

impl ExtentMap {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, &Extent)> {
        self.map.iter().map(|(k, v)| (*k, v))
    }

    pub fn get(&self, lba: u64) -> Option<&Extent> {
        self.map.get(&lba)
    }

    /// Removes every mapping in [lba, lba+len), trimming extents that stick out.
    pub fn punch(&mut self, lba: u64, len: u32) {
        let end = lba + u64::from(len);
        // An extent starting before `lba` that reaches into the range.
        if let Some((&s, &e)) = self.map.range(..lba).next_back() {
            let e_end = s + u64::from(e.len());
            if e_end > lba {
                self.map.insert(s, e.slice(s, s, (lba - s) as u32));
                if e_end > end {
                    self.map.insert(end, e.slice(s, end, (e_end - end) as u32));
                }
            }
        }
        // Extents starting inside the range.
        while let Some((&s, &e)) = self.map.range(lba..end).next() {
            self.map.remove(&s);
            let e_end = s + u64::from(e.len());
            if e_end > end {
                self.map.insert(end, e.slice(s, end, (e_end - end) as u32));
            }
        }
    }

    /// Maps [lba, lba+ext.len) to `ext`, replacing whatever was there.
    pub fn insert(&mut self, lba: u64, ext: Extent) {
        // Same start and length: nothing else can overlap, so replace in one descent.
        if let Some(e) = self.map.get_mut(&lba) {
            if e.len() == ext.len() {
                *e = ext;
                return;
            }
        }
        self.punch(lba, ext.len());
        self.map.insert(lba, ext);
    }

    /// Removes placeholders in the range (a newer key is about to be logged there).
    pub fn punch_placeholders(&mut self, lba: u64, len: u32) {
        let mut doomed = Vec::new();
        self.for_each_overlap(lba, len, |s, e| {
            if e.state() == State::Placeholder {
                doomed.push(s);
            }
        });
        for s in doomed {
            let e = self.map[&s];
            let (ps, pl) = clip(s, e.len(), lba, len);
            self.punch(ps, pl);
        }
    }

    /// Where the placeholder of fill `id` survives inside [lba, lba+len).
    pub fn placeholder_pieces(&self, id: u64, lba: u64, len: u32) -> Vec<(u64, u32)> {
        let mut out = Vec::new();
        self.for_each_overlap(lba, len, |s, e| {
            if e.state() == State::Placeholder && e.pos == id {
                out.push(clip(s, e.len(), lba, len));
            }
        });
        out
    }

    /// Turns the surviving placeholder of fill `id` into clean data at `pos` (the cache
    /// sector of `lba`).
    /// `crc` covers the whole fill; it is kept only if the placeholder survived whole.
    pub fn commit_fill(
        &mut self,
        id: u64,
        lba: u64,
        len: u32,
        pos: u64,
        epoch: u32,
        crc: Option<u32>,
    ) {
        for (s, l) in self.placeholder_pieces(id, lba, len) {
            let whole = s == lba && l == len;
            self.insert(
                s,
                Extent::new(
                    pos + (s - lba),
                    l,
                    State::Clean,
                    crc.filter(|_| whole),
                    epoch,
                ),
            );
        }
    }

    /// Drops the surviving placeholder of fill `id`.
    pub fn abort_fill(&mut self, id: u64, lba: u64, len: u32) {
        for (s, l) in self.placeholder_pieces(id, lba, len) {
            self.punch(s, l);
        }
    }

    fn for_each_overlap(&self, lba: u64, len: u32, mut f: impl FnMut(u64, &Extent)) {
        let end = lba + u64::from(len);
        if let Some((&s, e)) = self.map.range(..lba).next_back() {
            if s + u64::from(e.len()) > lba {
                f(s, e);
            }
        }
        for (&s, e) in self.map.range(lba..end) {
            f(s, e);
        }
    }

    /// Splits [lba, lba+len) into mapped pieces and gaps, in LBA order. Walks the map
    /// backwards from the end of the range: one tree descent, however many pieces.
    pub fn lookup(&self, lba: u64, len: u32, out: &mut Vec<Piece>) {
        out.clear();
        let end = lba + u64::from(len);
        let mut cur = end;
        for (&s, e) in self.map.range(..end).rev() {
            let e_end = s + u64::from(e.len());
            if e_end <= lba {
                break;
            }
            let a = s.max(lba);
            let b = e_end.min(end);
            if b < cur {
                out.push(Piece {
                    lba: b,
                    len: (cur - b) as u32,
                    extent: None,
                    whole: false,
                });
            }
            let piece_len = (b - a) as u32;
            out.push(Piece {
                lba: a,
                len: piece_len,
                extent: Some(e.slice(s, a, piece_len)),
                whole: a == s && piece_len == e.len(),
            });
            cur = a;
            if s <= lba {
                break;
            }
        }
        if cur > lba {
            out.push(Piece {
                lba,
                len: (cur - lba) as u32,
                extent: None,
                whole: false,
            });
        }
        out.reverse();
    }

    /// Marks clean the parts of [lba, lba+len) that still hold the data written back from
    /// cache sector `pos` (a newer write elsewhere keeps its own extent dirty).
    pub fn mark_clean(&mut self, lba: u64, len: u32, pos: u64) {
        let mut pieces = Vec::new();
        self.lookup(lba, len, &mut pieces);
        for p in pieces {
            let Some(e) = p.extent else { continue };
            if e.state() == State::Dirty && e.pos == pos + (p.lba - lba) {
                let crc = if p.whole { e.crc() } else { None };
                self.insert(p.lba, Extent::new(e.pos, p.len, State::Clean, crc, 0));
            }
        }
    }

    /// Removes the parts of [lba, lba+len) still in `state` from epoch `epoch` (a zeroing
    /// key written back). A newer zeroing key over the same range stays: its own writeback
    /// has not happened yet, and older data may still reach the backing device before it.
    pub fn punch_state(&mut self, lba: u64, len: u32, state: State, epoch: u32) {
        let mut pieces = Vec::new();
        self.lookup(lba, len, &mut pieces);
        for p in pieces {
            if p.extent
                .is_some_and(|e| e.state() == state && e.epoch() == Some(epoch))
            {
                self.punch(p.lba, p.len);
            }
        }
    }

    /// Drops every clean data extent stored in cache sectors [lo, hi) (a segment being
    /// reclaimed). Returns how many dirty extents were found there and kept (none, if the
    /// caller only reclaims written-back segments).
    pub fn drop_segment(&mut self, lo: u64, hi: u64) -> usize {
        let mut doomed = Vec::new();
        let mut dirty = 0;
        for (&s, e) in &self.map {
            if e.is_data() && e.pos >= lo && e.pos < hi {
                if e.state() == State::Clean {
                    doomed.push(s);
                } else {
                    dirty += 1;
                }
            }
        }
        for s in doomed {
            self.map.remove(&s);
        }
        dirty
    }

    /// Drops the extent at `lba` if it is still exactly `ext` (used after a CRC mismatch).
    pub fn remove_if_same(&mut self, lba: u64, ext: &Extent) -> bool {
        if self.map.get(&lba) == Some(ext) {
            self.map.remove(&lba);
            return true;
        }
        false
    }

    /// Counts (dirty sectors, clean sectors, extents).
    pub fn usage(&self) -> (u64, u64, usize) {
        let mut dirty = 0;
        let mut clean = 0;
        for e in self.map.values() {
            match e.state() {
                State::Dirty | State::Zeroes | State::Unmapped => dirty += u64::from(e.len()),
                State::Clean => clean += u64::from(e.len()),
                State::Placeholder => {}
            }
        }
        (dirty, clean, self.map.len())
    }
}

/// The intersection of [s, s+l) and [lba, lba+len) (assumed to overlap).
fn clip(s: u64, l: u32, lba: u64, len: u32) -> (u64, u32) {
    let a = s.max(lba);
    let b = (s + u64::from(l)).min(lba + u64::from(len));
    (a, (b - a) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(pos: u64, len: u32) -> Extent {
        Extent::new(pos, len, State::Dirty, Some(7), 0)
    }

    fn flat(m: &ExtentMap) -> Vec<(u64, u64, u32)> {
        m.iter().map(|(s, e)| (s, e.pos, e.len())).collect()
    }

    #[test]
    fn newer_extent_splits_an_older_one_in_three() {
        let mut m = ExtentMap::new();
        m.insert(10, data(1000, 10));
        m.insert(13, data(5000, 2));
        assert_eq!(flat(&m), vec![(10, 1000, 3), (13, 5000, 2), (15, 1005, 5)]);
        assert!(
            !m.get(10).unwrap().has_crc(),
            "a trimmed extent loses its CRC"
        );
        assert!(m.get(13).unwrap().has_crc());
    }

    #[test]
    fn newer_extent_replaces_several() {
        let mut m = ExtentMap::new();
        m.insert(0, data(100, 4));
        m.insert(4, data(200, 4));
        m.insert(8, data(300, 4));
        m.insert(2, data(900, 8));
        assert_eq!(flat(&m), vec![(0, 100, 2), (2, 900, 8), (10, 302, 2)]);
    }

    #[test]
    fn lookup_reports_gaps_and_slices() {
        let mut m = ExtentMap::new();
        m.insert(4, data(100, 4));
        let mut out = Vec::new();
        m.lookup(2, 8, &mut out);
        assert_eq!(out.len(), 3);
        assert_eq!((out[0].lba, out[0].len, out[0].extent), (2, 2, None));
        assert_eq!(out[1].extent.unwrap().pos, 100);
        assert!(out[1].whole);
        assert_eq!((out[2].lba, out[2].len, out[2].extent), (8, 2, None));
        m.lookup(5, 2, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].extent.unwrap().pos, 101);
        assert!(!out[0].whole);
    }

    #[test]
    fn a_write_landing_on_a_placeholder_keeps_the_fill_from_committing_there() {
        let mut m = ExtentMap::new();
        let ph = Extent::new(42, 8, State::Placeholder, None, 0);
        m.insert(0, ph);
        m.punch_placeholders(2, 2);
        m.insert(2, data(500, 2));
        m.commit_fill(42, 0, 8, 9000, 0, None);
        let v = flat(&m);
        assert_eq!(v, vec![(0, 9000, 2), (2, 500, 2), (4, 9004, 4)]);
        assert_eq!(m.get(0).unwrap().state(), State::Clean);
    }
}
