//! Per-shard ordered extent map: backing LBA → where the data is.
//!
//! Extents never intersect. Inserting a newer extent trims, splits or replaces the older
//! ones it overlaps. A `Placeholder` marks a read miss whose backing data is being filled
//! into the cache; anything newer that lands on it wins, so a fill can only commit where
//! its placeholder survived.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;

mod hints;
mod segments;

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
    /// Dirty data that failed its CRC when writeback read it: never written back, reads
    /// fail until a write replaces it (the backing device keeps its older contents).
    Poisoned,
}

/// 16 bytes; the map's key (8 bytes) is the start LBA. Length, state, the CRC flag and the
/// heat share one word, and the CRC shares another with the epoch (in-place
/// overwrite, the only user of the epoch, is off when data CRCs are on), keeping the map
/// near 20 bytes of DRAM per extent (the hints add 32-64 bytes per one-block extent).
///
/// The heat (how often it was read lately: GC's second chance) is a hint, not part of what
/// the extent is: equality ignores it.
#[derive(Clone, Copy)]
pub struct Extent {
    /// Cache-device sector of the first data sector (fill id for placeholders; for zeroes
    /// and unmapped ranges the kset sequence of their key, which names it for writeback,
    /// kept whole in every piece cut from it).
    pub pos: u64,
    /// Bits 0..24: length in sectors; 24..28: state; 28: has CRC; 29..31: its heat; 31:
    /// a probe of GC's second chance (see [`SecondChance`]).
    len_flags: u32,
    /// The data CRC32C of the whole extent if it has one, else the low 32 bits of the
    /// flush epoch that wrote it.
    aux: u32,
}

const LEN_MASK: u32 = (1 << 24) - 1;
const CRC_FLAG: u32 = 1 << 28;
const HEAT_SHIFT: u32 = 29;
const HEAT_MASK: u32 = 3 << HEAT_SHIFT;
const PROBE_FLAG: u32 = 1 << 31;
/// What GC keeps about an extent beside what it is: ignored by equality.
const HINT_BITS: u32 = HEAT_MASK | PROBE_FLAG;
/// The most heat an extent holds: reads past it are not counted.
pub const MAX_HEAT: u8 = 3;

impl PartialEq for Extent {
    fn eq(&self, o: &Self) -> bool {
        self.pos == o.pos
            && (self.len_flags & !HINT_BITS) == (o.len_flags & !HINT_BITS)
            && self.aux == o.aux
    }
}

impl Eq for Extent {}
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
            .field("heat", &self.heat())
            .field("probe", &self.probing())
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
            4 => State::Placeholder,
            _ => State::Poisoned,
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
    /// Its heat: read hits since it was logged, up to [`MAX_HEAT`], less one for each
    /// second chance GC gave it since.
    pub fn heat(&self) -> u8 {
        ((self.len_flags & HEAT_MASK) >> HEAT_SHIFT) as u8
    }
    /// Read since it was logged or last given a second chance.
    pub fn accessed(&self) -> bool {
        self.heat() > 0
    }
    /// The same extent with heat `h` (at most [`MAX_HEAT`]).
    pub fn with_heat(mut self, h: u8) -> Self {
        self.len_flags = (self.len_flags & !HEAT_MASK) | (u32::from(h.min(MAX_HEAT)) << HEAT_SHIFT);
        self
    }
    /// Kept by GC's second chance at a heat of one, to learn whether it is read again
    /// before its next reclaim ([`SecondChance`]).
    pub fn probing(&self) -> bool {
        self.len_flags & PROBE_FLAG != 0
    }
    /// The same extent, a probe or not.
    pub fn with_probe(mut self, on: bool) -> Self {
        self.len_flags = (self.len_flags & !PROBE_FLAG) | if on { PROBE_FLAG } else { 0 };
        self
    }
    /// The same extent after one more read hit.
    pub fn heated(self) -> Self {
        self.with_heat(self.heat().saturating_add(1))
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
        Extent::new(pos, len, state, None, self.epoch().unwrap_or(0)).with_heat(self.heat())
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

/// Sectors per bucket by default (1 MiB, the default stripe).
pub const DEFAULT_BUCKET_SECTORS: u64 = 2048;

/// A multiplicative hash for bucket numbers: one multiply, and consecutive buckets spread.
#[derive(Default, Clone, Copy)]
pub struct BucketHasher(u64);

impl std::hash::Hasher for BucketHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// Extents of one bucket in LBA order: starts as 16-bit offsets from the bucket's first
/// sector, apart from the extents themselves, so finding an extent scans a few contiguous
/// cache lines (256 extents: 512 bytes) instead of chasing a binary search through 24-byte
/// entries, one cache miss per probe.
///
/// A directory of [`DIR`] chunks narrows the scan to one chunk's starts, so a lookup reads
/// the same few lines however full the bucket is (256 extents: one line of the 512).
#[derive(Debug, Default)]
struct Bucket {
    starts: Vec<u16>,
    exts: Vec<Extent>,
    /// `dir[c]`: how many extents start before chunk `c` (offset `c << shift`, the map's
    /// chunk shift), kept up to date by every change to `starts`.
    dir: [u16; DIR],
}

/// Chunks in a bucket's directory.
const DIR: usize = 32;

/// Buckets whose occupancy the map keeps at most ([`ExtentMap::may_hold`]; 16 MiB of
/// words): lookups beyond, on a backing device of more buckets, probe the table.
const OCC_MAX: u64 = 1 << 22;

/// Up to this many extents a bucket is searched by counting (independent loads the CPU
/// overlaps and vectorizes); beyond, by binary search.
const LINEAR_MAX: usize = 512;

/// The largest bucket: offsets within it must fit the 16-bit starts.
const MAX_BUCKET_SECTORS: u64 = 1 << 16;

impl Bucket {
    fn len(&self) -> usize {
        self.starts.len()
    }

    /// Whether an extent overlaps directory chunk `c`: one starts in it, or the last one
    /// starting before it reaches into it (extents never overlap, so no earlier one can).
    fn chunk_busy(&self, c: usize, shift: u32) -> bool {
        let lo = usize::from(self.dir[c]);
        let hi = self
            .dir
            .get(c + 1)
            .map_or(self.starts.len(), |&h| usize::from(h));
        hi > lo
            || (lo > 0
                && u32::from(self.starts[lo - 1]) + self.exts[lo - 1].len() > (c as u32) << shift)
    }

    /// The chunks among `mask` that an extent overlaps ([`Bucket::chunk_busy`]), as bits:
    /// the bucket's occupancy word there.
    fn occupancy(&self, mask: u32, shift: u32) -> u32 {
        (0..DIR)
            .filter(|&c| mask & (1 << c) != 0 && self.chunk_busy(c, shift))
            .fold(0, |w, c| w | 1 << c)
    }

    /// How many extents start before `off`: the index of the first one at or after it.
    /// `shift`: the map's chunk shift.
    #[inline]
    fn rank(&self, off: u16, shift: u32) -> usize {
        let c = usize::from(off >> shift).min(DIR - 1);
        let lo = usize::from(self.dir[c]);
        let hi = self
            .dir
            .get(c + 1)
            .map_or(self.starts.len(), |&h| usize::from(h));
        let part = &self.starts[lo..hi];
        lo + if part.len() <= LINEAR_MAX {
            // A 16-bit count (LINEAR_MAX fits) keeps eight lanes per 128-bit compare.
            let mut n: u16 = 0;
            for &s in part {
                n += u16::from(s < off);
            }
            usize::from(n)
        } else {
            part.partition_point(|&s| s < off)
        }
    }

    fn insert(&mut self, i: usize, off: u16, e: Extent, shift: u32) {
        self.starts.insert(i, off);
        self.exts.insert(i, e);
        for d in self.dir.iter_mut().skip(usize::from(off >> shift) + 1) {
            *d += 1;
        }
    }

    /// Removes extent `i`: the directory counts one fewer past its chunk (a recount, as
    /// `remove_range` does, cost GC's reclaim a third of its time).
    fn remove(&mut self, i: usize, shift: u32) {
        let off = self.starts.remove(i);
        self.exts.remove(i);
        for d in self.dir.iter_mut().skip(usize::from(off >> shift) + 1) {
            *d -= 1;
        }
    }

    fn remove_range(&mut self, a: usize, b: usize, shift: u32) {
        if a < b {
            self.starts.drain(a..b);
            self.exts.drain(a..b);
            self.rebuild_dir(shift);
        }
    }

    /// Recounts the directory after starts moved or went.
    fn rebuild_dir(&mut self, shift: u32) {
        let mut i = 0;
        for (c, d) in self.dir.iter_mut().enumerate() {
            let lim = (c as u32) << shift;
            while i < self.starts.len() && u32::from(self.starts[i]) < lim {
                i += 1;
            }
            // At most one bucket's sectors (2^16) start before the last chunk.
            *d = i as u16;
        }
    }
}

type Buckets = HashMap<u64, Bucket, BuildHasherDefault<BucketHasher>>;

/// Extents bucketed by LBA range (a stripe by default): a hash lookup finds the bucket,
/// a scan of its start offsets the extent. Requests never cross a stripe, so extents stay
/// inside one bucket; an extent that would cross a bucket edge is stored as one piece per
/// bucket. Point lookups cost about three cache misses however large the map, where a
/// B-tree costs one per level; a lookup inside one 4 KiB block that is one extent costs
/// one, in the hints, at an address the LBA alone gives.
#[derive(Debug)]
pub struct ExtentMap {
    bucket: u64,
    /// log2 of the directory chunk: the least with `bucket <= DIR << shift`.
    shift: u32,
    buckets: Buckets,
    len: usize,
    /// The one-block extents again, found in one cache line (a 4 KiB lookup's fast path).
    hints: hints::Hints,
    /// What each cache segment was given, for GC (None: a reclaim walks the map).
    segments: Option<segments::Segments>,
    /// Whether copying extents read once in their lap pays (GC's second chance).
    chance: SecondChance,
    /// Lookup results of the per-block calls that change the map as they go (writeback's
    /// `mark_clean`, GC's move commits), kept so that they allocate nothing.
    scratch: Vec<Piece>,
    /// A reclaim's extents found in its segment, and those reaching into it from before,
    /// kept so that reclaims allocate nothing.
    found: Vec<(u64, Extent)>,
    from_before: Vec<segments::Logged>,
    /// Per bucket (by key, below [`OCC_MAX`]), bit `c`: some extent overlaps chunk `c` of
    /// the bucket's directory; a word past the end is zero (nothing was ever put there).
    /// A lookup whose chunks are clear finds nothing without probing the table, where a
    /// read miss or a write to an uncached block would wait on a chain of cache misses
    /// (slot, directory, starts, entry) to learn it. Recomputed from the bucket for the
    /// chunks of every change to its extents (`refresh_occ`).
    occ: Vec<u32>,
    /// Buckets that get a word: one per four blocks of the cache it maps (a byte per
    /// cached 4 KiB at most, inside the index's DRAM budget however large the backing
    /// device; see [`ExtentMap::with_segments`]).
    occ_max: u64,
}

impl Default for ExtentMap {
    fn default() -> Self {
        Self::with_bucket(DEFAULT_BUCKET_SECTORS)
    }
}

impl ExtentMap {
    pub fn new() -> Self {
        Self::default()
    }

    /// `bucket_sectors`: the stripe, so no extent is ever split for the index (stripes
    /// over 32 MiB use 32 MiB buckets).
    pub fn with_bucket(bucket_sectors: u64) -> Self {
        let bucket = bucket_sectors.clamp(8, MAX_BUCKET_SECTORS);
        ExtentMap {
            bucket,
            shift: bucket
                .div_ceil(DIR as u64)
                .next_power_of_two()
                .trailing_zeros(),
            buckets: Buckets::default(),
            len: 0,
            hints: hints::Hints::default(),
            segments: None,
            chance: SecondChance::default(),
            scratch: Vec::new(),
            found: Vec::new(),
            from_before: Vec::new(),
            occ: Vec::new(),
            occ_max: OCC_MAX,
        }
    }

    /// The directory chunks that bucket offsets [lo, hi) fall in, as bits (lo's alone if
    /// the range is empty).
    #[inline]
    fn chunk_mask(&self, lo: u16, hi: u32) -> u32 {
        let first = usize::from(lo >> self.shift).min(DIR - 1);
        let last = ((hi.max(u32::from(lo) + 1) - 1) >> self.shift).min(DIR as u32 - 1) as usize;
        (u32::MAX >> (DIR - 1 - (last - first))) << first
    }

    /// Whether an extent may overlap the `len` sectors at bucket `key`'s offset `off` (as
    /// [`ExtentMap::locate`] gives them; inside the bucket). False: none does.
    #[inline]
    fn may_hold(&self, (key, off): (u64, u16), len: u32) -> bool {
        if key >= self.occ_max {
            return true;
        }
        let word = self.occ.get(key as usize).copied().unwrap_or(0);
        word & self.chunk_mask(off, u32::from(off) + len) != 0
    }

    /// Recomputes the occupancy of bucket `key`'s chunks that offsets [lo, hi) fall in,
    /// after a change to its extents there (all of them if the bucket went).
    fn refresh_occ(&mut self, key: u64, lo: u16, hi: u32) {
        if key >= self.occ_max {
            return;
        }
        let k = key as usize;
        let Some(b) = self.buckets.get(&key) else {
            if let Some(w) = self.occ.get_mut(k) {
                *w = 0;
            }
            return;
        };
        if k >= self.occ.len() {
            self.occ.resize(k + 1, 0);
        }
        let mask = self.chunk_mask(lo, hi);
        self.occ[k] = (self.occ[k] & !mask) | b.occupancy(mask, self.shift);
    }

    /// [`ExtentMap::with_bucket`] for a shard's log: remembers which extents each of the
    /// cache's `count` segments of `sectors` (the first at cache sector `first`) was
    /// given, so reclaiming one visits only those.
    pub fn with_segments(bucket_sectors: u64, first: u64, sectors: u64, count: u32) -> Self {
        ExtentMap {
            segments: Some(segments::Segments::new(first, sectors, count)),
            occ_max: (sectors * u64::from(count) / 32).clamp(64, OCC_MAX),
            ..Self::with_bucket(bucket_sectors)
        }
    }

    /// The map of one of `shards` shards sharing the cache: its occupancy words are its
    /// share of the cache's (each shard's map spans every bucket key, so the cache's words
    /// are split between them rather than repeated).
    pub fn shared_by(mut self, shards: u32) -> Self {
        self.occ_max = (self.occ_max / u64::from(shards.max(1))).max(64);
        self
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bucket number of `lba` and its offset inside it.
    #[inline]
    fn locate(&self, lba: u64) -> (u64, u16) {
        let key = super::geometry::div(lba, self.bucket);
        // Below `bucket` <= 2^16 by construction.
        (key, (lba - key * self.bucket) as u16)
    }

    /// Every extent, in LBA order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &Extent)> {
        let mut keys: Vec<u64> = self.buckets.keys().copied().collect();
        keys.sort_unstable();
        let size = self.bucket;
        keys.into_iter()
            .filter_map(move |k| self.buckets.get(&k).map(|b| (k * size, b)))
            .flat_map(|(base, b)| {
                b.starts
                    .iter()
                    .zip(&b.exts)
                    .map(move |(&o, e)| (base + u64::from(o), e))
            })
    }

    /// The extent starting exactly at `lba`.
    #[inline]
    pub fn get(&self, lba: u64) -> Option<Extent> {
        match self.hints.get(lba) {
            Some(e) => {
                debug_assert_eq!(Some(e), self.find(lba), "stale hint at {lba}");
                Some(e)
            }
            None => self.find(lba),
        }
    }

    /// [`ExtentMap::get`] in the buckets alone.
    fn find(&self, lba: u64) -> Option<Extent> {
        let (key, off) = self.locate(lba);
        if !self.may_hold((key, off), 1) {
            return None;
        }
        let b = self.buckets.get(&key)?;
        let i = b.rank(off, self.shift);
        (b.starts.get(i) == Some(&off)).then(|| b.exts[i])
    }

    /// The one extent covering all of [lba, lba+len), as the slice of it that does (as a
    /// lookup's single piece would be), or None.
    #[inline]
    pub fn covering(&self, lba: u64, len: u32) -> Option<Extent> {
        if in_one_block(lba, len) {
            let block = lba & !7;
            if let Some(e) = self.hints.get(block) {
                debug_assert_eq!(Some(e), self.find(block), "stale hint at {block}");
                return Some(e.slice(block, lba, len));
            }
        }
        let (key, off) = self.locate(lba);
        if u64::from(off) + u64::from(len) > self.bucket || !self.may_hold((key, off), len) {
            return None;
        }
        let b = self.buckets.get(&key)?;
        let mut i = b.rank(off, self.shift);
        if b.starts.get(i) != Some(&off) {
            i = i.checked_sub(1)?;
        }
        let (s, e) = (u64::from(b.starts[i]), &b.exts[i]);
        (s + u64::from(e.len()) >= u64::from(off) + u64::from(len))
            .then(|| e.slice(s, u64::from(off), len))
    }

    /// [`ExtentMap::covering`] for a read hit: also counts it in the heat of the data extent
    /// found, where the lookup found it (the hints' line, or the bucket's entry), so the
    /// hit costs one store to a line already loaded.
    #[inline]
    pub fn covering_touch(&mut self, lba: u64, len: u32) -> Option<Extent> {
        if in_one_block(lba, len) {
            let block = lba & !7;
            if let Some(e) = self.hints.get(block) {
                debug_assert_eq!(Some(e), self.find(block), "stale hint at {block}");
                if e.heat() < MAX_HEAT {
                    self.hints.touch(block);
                }
                return Some(e.slice(block, lba, len));
            }
        }
        let (key, off) = self.locate(lba);
        if u64::from(off) + u64::from(len) > self.bucket || !self.may_hold((key, off), len) {
            return None;
        }
        let shift = self.shift;
        let b = self.buckets.get_mut(&key)?;
        let mut i = b.rank(off, shift);
        if b.starts.get(i) != Some(&off) {
            i = i.checked_sub(1)?;
        }
        let s = u64::from(b.starts[i]);
        let e = &mut b.exts[i];
        if s + u64::from(e.len()) < u64::from(off) + u64::from(len) {
            return None;
        }
        if e.is_data() && e.heat() < MAX_HEAT {
            *e = e.heated();
        }
        Some(e.slice(s, u64::from(off), len))
    }

    /// Whether any extent (of any state: data, zeroes, a fill's placeholder) overlaps
    /// [lba, lba+len).
    pub fn overlaps(&self, lba: u64, len: u32) -> bool {
        let mut any = false;
        self.for_each_overlap(lba, len, |_, _| any = true);
        any
    }

    /// Counts a read hit in the heat of every data extent overlapping [lba, lba+len) (a
    /// read that hit them through a lookup), in the map's entries.
    pub fn touch(&mut self, lba: u64, len: u32) {
        let shift = self.shift;
        for (a, l) in bucket_pieces(self.bucket, lba, len) {
            let (key, off) = self.locate(a);
            let Some(b) = self.buckets.get_mut(&key) else {
                continue;
            };
            let end = u32::from(off) + l;
            let mut i = b.rank(off, shift);
            if i > 0 && u32::from(b.starts[i - 1]) + b.exts[i - 1].len() > u32::from(off) {
                i -= 1;
            }
            while i < b.len() && u32::from(b.starts[i]) < end {
                let e = &mut b.exts[i];
                if e.is_data() && e.heat() < MAX_HEAT {
                    *e = e.heated();
                }
                i += 1;
            }
        }
    }

    /// The heat of extent `e` of the map, starting at `lba`: the more of its heat in the
    /// map and in the hints (a hit the hints answered counts there only).
    #[inline]
    fn heat_at(hints: &hints::Hints, lba: u64, e: &Extent) -> u8 {
        let hinted = if lba & 7 == 0 && e.len() == 8 && e.is_data() {
            hints.heat(lba)
        } else {
            0
        };
        e.heat().max(hinted)
    }

    /// The line a lookup of [lba, lba+len) reads first, for a host to prefetch before the
    /// lookup (null: none). Inside one 4 KiB block that is the hints' line, known without
    /// reading anything; else where the lookup's bucket starts are counted, found by
    /// reading the bucket's directory.
    #[inline]
    pub fn first_line(&self, lba: u64, len: u32) -> *const u8 {
        if in_one_block(lba, len) {
            return self.hints.addr(lba);
        }
        let (key, off) = self.locate(lba);
        let Some(b) = self.buckets.get(&key) else {
            return std::ptr::null();
        };
        let c = usize::from(off >> self.shift).min(DIR - 1);
        b.starts.as_ptr().wrapping_add(usize::from(b.dir[c])).cast()
    }

    /// Loads the lines a lookup of the extent starting at `lba` reads (the table's slot, the
    /// bucket's directory, the chunk's first start and entry, the hint), and returns a
    /// value made of them, for `black_box`. A loop of these runs the lookups' chains of
    /// dependent cache misses side by side, where a loop that also acts on each result
    /// waits for every chain in turn; the engine has no prefetch instruction (no `unsafe`),
    /// so plain loads bring the lines in.
    #[inline]
    fn warm(&self, lba: u64) -> u64 {
        let (key, off) = self.locate(lba);
        let mut sum = self.hints.line_word(lba);
        if let Some(b) = self.buckets.get(&key) {
            let i = usize::from(b.dir[usize::from(off >> self.shift).min(DIR - 1)]);
            sum = sum.wrapping_add(b.starts.get(i).map_or(0, |&s| u64::from(s)));
            sum = sum.wrapping_add(b.exts.get(i).map_or(0, |e| e.pos));
        }
        sum
    }

    /// [`ExtentMap::warm`] for the extents starting at each of `lbas`, before a pass that
    /// changes them.
    pub fn warm_all(&self, lbas: impl Iterator<Item = u64>) {
        std::hint::black_box(lbas.fold(0u64, |acc, lba| acc.wrapping_add(self.warm(lba))));
    }

    /// The line it reads next, once [`ExtentMap::first_line`] is loaded (null: none): the
    /// entry the starts rank. A host that prefetches a batch's first lines, then their
    /// second ones, overlaps the lookups' cache misses instead of stalling on each in turn.
    #[inline]
    pub fn second_line(&self, lba: u64, len: u32) -> *const u8 {
        if in_one_block(lba, len) {
            return std::ptr::null();
        }
        let (key, off) = self.locate(lba);
        let Some(b) = self.buckets.get(&key) else {
            return std::ptr::null();
        };
        let i = b.rank(off, self.shift).min(b.exts.len().saturating_sub(1));
        b.exts.as_ptr().wrapping_add(i).cast()
    }

    /// Removes every mapping in [lba, lba+len), trimming extents that stick out.
    pub fn punch(&mut self, lba: u64, len: u32) {
        for (a, l) in bucket_pieces(self.bucket, lba, len) {
            self.punch_in_bucket(a, l);
        }
    }

    /// `punch` for a range inside one bucket.
    fn punch_in_bucket(&mut self, lba: u64, len: u32) {
        self.punch_extents(lba, len);
        // Only the range's chunks can change: what is trimmed off extents sticking out
        // lies inside it.
        let (key, off) = self.locate(lba);
        self.refresh_occ(key, off, u32::from(off) + len);
    }

    /// [`ExtentMap::punch_in_bucket`] of the extents (the occupancy aside).
    fn punch_extents(&mut self, lba: u64, len: u32) {
        let shift = self.shift;
        let (key, off) = self.locate(lba);
        let base = key * self.bucket;
        let Some(b) = self.buckets.get_mut(&key) else {
            return;
        };
        let end = lba + u64::from(len);
        let before = b.len();
        let mut i = b.rank(off, self.shift);
        // An extent starting before `lba` that reaches into the range.
        if i > 0 {
            let s = base + u64::from(b.starts[i - 1]);
            let e = b.exts[i - 1];
            let e_end = s + u64::from(e.len());
            if e_end > lba {
                b.exts[i - 1] = e.slice(s, s, (lba - s) as u32);
                self.hints.forget(s, &e);
                if e_end > end {
                    let tail = e.slice(s, end, (e_end - end) as u32);
                    b.insert(i, (end - base) as u16, tail, shift);
                    self.hints.note(end, &tail);
                    self.len += b.len() - before;
                    return;
                }
            }
        }
        // Extents starting inside the range: whole ones go, the last may stick out.
        let first = i;
        let mut moved = false;
        while i < b.len() {
            let s = base + u64::from(b.starts[i]);
            if s >= end {
                break;
            }
            let e = b.exts[i];
            self.hints.forget(s, &e);
            let e_end = s + u64::from(e.len());
            if e_end > end {
                b.starts[i] = (end - base) as u16;
                b.exts[i] = e.slice(s, end, (e_end - end) as u32);
                self.hints.note(end, &b.exts[i]);
                moved = true;
                break;
            }
            i += 1;
        }
        b.remove_range(first, i, shift);
        if moved && first == i {
            b.rebuild_dir(shift);
        }
        let after = b.len();
        if after == 0 {
            self.buckets.remove(&key);
        }
        self.len = self.len + after - before;
    }

    /// [`ExtentMap::insert`] of a write's new data: where it replaces a data extent of the
    /// same start and length (a rewrite of the block), it takes that extent's heat. Heat
    /// follows the block, not one version of its data.
    pub fn insert_rewrite(&mut self, lba: u64, ext: Extent) {
        self.put(lba, ext, true);
    }

    /// Maps [lba, lba+ext.len) to `ext`, replacing whatever was there.
    pub fn insert(&mut self, lba: u64, ext: Extent) {
        self.put(lba, ext, false);
    }

    /// [`ExtentMap::insert`]; with `rewrite`, an extent of the same start and length that
    /// it replaces passes its heat on (found in the same lookup that replaces it).
    fn put(&mut self, lba: u64, ext: Extent, rewrite: bool) {
        let shift = self.shift;
        let end = lba + u64::from(ext.len());
        if self.locate(lba).0 != self.locate(end - 1).0 {
            // Crosses a bucket edge (never for stripe-sized buckets): one piece per bucket.
            for (a, l) in bucket_pieces(self.bucket, lba, ext.len()) {
                self.put(a, ext.slice(lba, a, l), rewrite);
            }
            return;
        }
        let (key, off) = self.locate(lba);
        if let Some(b) = self.buckets.get_mut(&key) {
            let i = b.rank(off, self.shift);
            // Same start and length: nothing else can overlap, so replace in place.
            if b.starts.get(i) == Some(&off) && b.exts[i].len() == ext.len() {
                let old = b.exts[i];
                let ext = if rewrite && old.is_data() {
                    ext.with_heat(Self::heat_at(&self.hints, lba, &old))
                } else {
                    ext
                };
                b.exts[i] = ext;
                self.hints.note(lba, &ext);
                self.note_segment(lba, &ext);
                return;
            }
        }
        // The punch and the insert change the same range's chunks: refreshed once, after.
        self.punch_extents(lba, ext.len());
        let b = self.buckets.entry(key).or_default();
        let i = b.rank(off, shift);
        b.insert(i, off, ext, shift);
        self.refresh_occ(key, off, u32::from(off) + ext.len());
        self.hints.note(lba, &ext);
        self.note_segment(lba, &ext);
        self.len += 1;
        self.hints.fit(self.len);
    }

    /// Lists a data extent just put in the segment holding it.
    #[inline]
    fn note_segment(&mut self, lba: u64, ext: &Extent) {
        if let Some(s) = self.segments.as_mut() {
            if ext.is_data() && !s.note(lba, ext.len(), ext.pos) {
                // Beyond what the lists can hold: reclaims walk the map from now on.
                self.segments = None;
            }
        }
    }

    /// Removes placeholders in the range (a newer key is about to be logged there).
    pub fn punch_placeholders(&mut self, lba: u64, len: u32) {
        // A block the hints hold is one data extent whole: nothing else overlaps it (the
        // usual write, to a cached block, decided from one line instead of a bucket walk).
        if in_one_block(lba, len) && self.hints.get(lba & !7).is_some() {
            return;
        }
        let mut doomed = Vec::new();
        self.for_each_overlap(lba, len, |s, e| {
            if e.state() == State::Placeholder {
                doomed.push(clip(s, e.len(), lba, len));
            }
        });
        for (ps, pl) in doomed {
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
    /// sector of `lba`). `crc` covers the whole fill; it is kept only if the placeholder
    /// survived whole.
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
        for (a, l) in bucket_pieces(self.bucket, lba, len) {
            let (key, off) = self.locate(a);
            if !self.may_hold((key, off), l) {
                continue;
            }
            let Some(b) = self.buckets.get(&key) else {
                continue;
            };
            let base = key * self.bucket;
            let end = a + u64::from(l);
            let mut i = b.rank(off, self.shift);
            if i > 0 && base + u64::from(b.starts[i - 1]) + u64::from(b.exts[i - 1].len()) > a {
                i -= 1;
            }
            while i < b.len() {
                let s = base + u64::from(b.starts[i]);
                if s >= end {
                    break;
                }
                f(s, &b.exts[i]);
                i += 1;
            }
        }
    }

    /// Splits [lba, lba+len) into mapped pieces and gaps, in LBA order.
    pub fn lookup(&self, lba: u64, len: u32, out: &mut Vec<Piece>) {
        out.clear();
        let end = lba + u64::from(len);
        let mut cur = lba;
        self.for_each_overlap(lba, len, |s, e| {
            let a = s.max(lba);
            if a > cur {
                out.push(Piece {
                    lba: cur,
                    len: (a - cur) as u32,
                    extent: None,
                    whole: false,
                });
            }
            let b = (s + u64::from(e.len())).min(end);
            let piece_len = (b - a) as u32;
            out.push(Piece {
                lba: a,
                len: piece_len,
                extent: Some(e.slice(s, a, piece_len)),
                whole: a == s && piece_len == e.len(),
            });
            cur = b;
        });
        if cur < end {
            out.push(Piece {
                lba: cur,
                len: (end - cur) as u32,
                extent: None,
                whole: false,
            });
        }
    }

    /// Marks clean the parts of [lba, lba+len) that still hold the data written back from
    /// cache sector `pos` (a newer write elsewhere keeps its own extent dirty).
    ///
    /// The heat stays, but for a heat of one: a block read again and again while dirty
    /// stays hot (it only becomes evictable here), while one read-back of data just
    /// written (a verify pass) earns no copy, or GC would copy nearly everything such a
    /// workload writes.
    pub fn mark_clean(&mut self, lba: u64, len: u32, pos: u64) {
        self.for_each_mapped(lba, len, |m, p, e| {
            if e.state() == State::Dirty && e.pos == pos + (p.lba - lba) {
                let crc = if p.whole { e.crc() } else { None };
                let heat = match Self::heat_at(&m.hints, p.lba, &e) {
                    1 => 0,
                    h => h,
                };
                m.insert(
                    p.lba,
                    Extent::new(e.pos, p.len, State::Clean, crc, 0).with_heat(heat),
                );
            }
        });
    }

    /// Calls `f` with each mapped piece of [lba, lba+len) and its extent, as a lookup finds
    /// them before `f` changes the map; the lookup goes in the map's scratch vector, so the
    /// per-block callers (writeback, GC) allocate nothing (a nested call would allocate).
    fn for_each_mapped(&mut self, lba: u64, len: u32, mut f: impl FnMut(&mut Self, Piece, Extent)) {
        // The usual case, one extent exactly the range (a block written back, moved or
        // dropped whole): the one piece a lookup would find, from one `get` (for a block,
        // the hints' line) instead of a walk of the bucket.
        if let Some(e) = self.get(lba).filter(|e| e.len() == len) {
            let whole = Piece {
                lba,
                len,
                extent: Some(e),
                whole: true,
            };
            f(self, whole, e);
            return;
        }
        let mut pieces = std::mem::take(&mut self.scratch);
        self.lookup(lba, len, &mut pieces);
        for p in pieces.drain(..) {
            if let Some(e) = p.extent {
                f(self, p, e);
            }
        }
        self.scratch = pieces;
    }

    /// Poisons the parts of [lba, lba+len) that still hold the dirty data at cache sector
    /// `pos` (whose CRC failed when writeback read it); returns the ranges poisoned.
    pub fn poison(&mut self, lba: u64, len: u32, pos: u64) -> Vec<(u64, u32)> {
        let mut out = Vec::new();
        self.for_each_mapped(lba, len, |m, p, e| {
            if e.state() == State::Dirty && e.pos == pos + (p.lba - lba) {
                m.insert(p.lba, Extent::new(0, p.len, State::Poisoned, None, 0));
                out.push((p.lba, p.len));
            }
        });
        out
    }

    /// Poisons the parts of [lba, lba+len) that hold no dirty key (replay: the range was
    /// poisoned when the dirty tail moved past it; keys after the dirty tail are newer).
    /// Returns the ranges poisoned.
    pub fn poison_unless_dirty(&mut self, lba: u64, len: u32) -> Vec<(u64, u32)> {
        let mut pieces = Vec::new();
        self.lookup(lba, len, &mut pieces);
        let mut out = Vec::new();
        for p in pieces {
            if !p.extent.is_some_and(|e| e.is_dirty()) {
                self.insert(p.lba, Extent::new(0, p.len, State::Poisoned, None, 0));
                out.push((p.lba, p.len));
            }
        }
        out
    }

    /// Removes the parts of [lba, lba+len) that are still the zeroing key (`state`) of epoch
    /// `epoch` logged in kset `seq`, now written back. A newer zeroing key over the same
    /// range stays, of the same epoch too: its own writeback has not happened yet, and
    /// older data of its epoch may still reach the backing device before it (a later
    /// group's copy of a write logged between the two keys), which reads would then see.
    pub fn punch_state(&mut self, lba: u64, len: u32, state: State, epoch: u32, seq: u64) {
        self.for_each_mapped(lba, len, |m, p, e| {
            if e.state() == state && e.epoch() == Some(epoch) && e.pos == seq {
                m.punch(p.lba, p.len);
            }
        });
    }

    /// Drops every clean data extent stored in cache sectors [lo, hi) (a segment being
    /// reclaimed). Returns how many dirty extents were found there and kept (none, if the
    /// caller only reclaims written-back segments).
    pub fn drop_segment(&mut self, lo: u64, hi: u64) -> usize {
        let mut none = Vec::new();
        self.reclaim_segment(lo, hi, &mut Rescue::none(), &mut none)
    }

    /// [`ExtentMap::drop_segment`] with a second chance: a clean extent read since it was
    /// logged or last kept (its heat) is kept, while `rescue` has room for it, with its
    /// heat less one, and listed in `moves`: the caller copies its data to the log head and
    /// commits the copy with [`ExtentMap::commit_move`] (or drops it with
    /// [`ExtentMap::drop_clean_at`]). Until then it stays readable where it is. When the
    /// room does not hold every read extent, the hottest go first. The others are dropped.
    pub fn reclaim_segment(
        &mut self,
        lo: u64,
        hi: u64,
        rescue: &mut Rescue,
        moves: &mut Vec<Move>,
    ) -> usize {
        match self.reclaim_begin(lo, hi) {
            Some(mut r) => {
                while !self.reclaim_step(&mut r, rescue, moves, usize::MAX) {}
                r.dirty
            }
            None => self.reclaim_walk(lo, hi, rescue, moves),
        }
    }

    /// Starts [`ExtentMap::reclaim_segment`] of cache sectors [lo, hi) in steps
    /// ([`ExtentMap::reclaim_step`]), if it is a segment whose extents are listed (else the
    /// reclaim walks the map, in one call). Its list is taken, sorted by LBA, and its
    /// overlapping ranges merged (a block written twice there is listed twice), so that
    /// each extent lies in one range and one step visits it. The reclaim must be stepped
    /// to its end: the list comes back only then.
    pub fn reclaim_begin(&mut self, lo: u64, hi: u64) -> Option<Reclaim> {
        let segs = self.segments.as_mut()?;
        let seg = segs.exactly(lo, hi)?;
        let mut listed = segs.take(seg);
        listed.sort_unstable_by_key(|l| l.lba());
        let mut whole = false;
        let mut n: usize = 0;
        for i in 0..listed.len() {
            let l = listed[i];
            if let Some(p) = n.checked_sub(1).map(|j| listed[j]) {
                let p_end = p.lba() + u64::from(p.len());
                if l.lba() < p_end {
                    let end = p_end.max(l.lba() + u64::from(l.len()));
                    match u32::try_from(end - p.lba())
                        .ok()
                        .and_then(|len| segments::Logged::new(p.lba(), len))
                    {
                        Some(m) => {
                            listed[n - 1] = m;
                            continue;
                        }
                        // Too long to list as one: the ranges stay as they are, and one
                        // step visits all of them (dropping duplicates).
                        None => whole = true,
                    }
                }
            }
            listed[n] = l;
            n += 1;
        }
        listed.truncate(n);
        Some(Reclaim {
            seg,
            lo,
            hi,
            listed,
            next: 0,
            stay: Vec::new(),
            dirty: 0,
            whole,
        })
    }

    /// Visits up to `max` more of reclaim `r`'s listed ranges (see
    /// [`ExtentMap::reclaim_segment`]); true once it has visited them all and given the
    /// segment back the list of what stays. Between steps the map changes as it always
    /// does, and the reclaim needs nothing of it: no data is logged in a segment being
    /// reclaimed, so its extents only shrink, within the ranges they were listed with,
    /// each visited by the step that looks them up. Each step chooses what to keep among
    /// its own extents, hottest first, while `rescue` has room.
    pub fn reclaim_step(
        &mut self,
        r: &mut Reclaim,
        rescue: &mut Rescue,
        moves: &mut Vec<Move>,
        max: usize,
    ) -> bool {
        let left = r.listed.len() - r.next;
        let n = if r.whole { left } else { max.min(left) };
        let (lo, hi) = (r.lo, r.hi);
        // What still lies in the segment, each extent once, and what reaches into it from
        // before (never in a log) listed again as it is.
        let mut found = std::mem::take(&mut self.found);
        let mut from_before = std::mem::take(&mut self.from_before);
        found.clear();
        from_before.clear();
        let ranges = &r.listed[r.next..r.next + n];
        // The segment was logged a lap ago: its extents' lines are cold.
        self.warm_all(ranges.iter().map(|l| l.lba()));
        for l in ranges {
            let (lba, len) = (l.lba(), l.len());
            self.for_each_overlap(lba, len, |s, e| {
                if !e.is_data() || e.pos >= hi {
                    return;
                }
                if e.pos >= lo {
                    found.push((s, *e));
                } else if e.pos + u64::from(e.len()) > lo {
                    from_before.extend(segments::Logged::new(s, e.len()));
                }
            });
        }
        r.next += n;
        found.sort_unstable_by_key(|&(s, _)| s);
        found.dedup_by_key(|&mut (s, _)| s);
        let by_heat =
            Self::sectors_by_heat(&self.hints, rescue, found.iter().map(|(s, e)| (*s, e)));
        let mut cut = rescue.cut(&by_heat);
        r.stay.append(&mut from_before);
        for (lba, e) in found.drain(..) {
            match Self::fate(
                &self.hints,
                &mut self.chance,
                lba,
                e,
                &mut cut,
                rescue,
                moves,
            ) {
                Fate::Dirty => r.dirty += 1,
                Fate::Kept(kept) => self.replace_heat(lba, kept),
                Fate::Dropped => {
                    self.remove_if_same(lba, &e);
                    continue;
                }
            }
            // Still in the segment: listed again (it was listed, so it packs).
            r.stay.extend(segments::Logged::new(lba, e.len()));
        }
        self.found = found;
        self.from_before = from_before;
        if r.next < r.listed.len() {
            return false;
        }
        if let Some(segments) = self.segments.as_mut() {
            // With whatever was listed there meanwhile (pieces of kept extents).
            let mut stay = std::mem::take(&mut r.stay);
            stay.append(&mut segments.take(r.seg));
            segments.put_back(r.seg, stay);
        }
        true
    }

    /// Sectors of the clean extents among `inside` (a segment's data extents, with their
    /// start) that `rescue` may keep, at each heat: what [`Rescue::cut`] chooses from.
    fn sectors_by_heat<'a>(
        hints: &hints::Hints,
        rescue: &Rescue,
        inside: impl Iterator<Item = (u64, &'a Extent)>,
    ) -> [u64; MAX_HEAT as usize + 1] {
        let mut by_heat = [0u64; MAX_HEAT as usize + 1];
        if rescue.budget > 0 {
            for (lba, e) in inside {
                if e.state() == State::Clean && rescue.may_take(e) {
                    by_heat[usize::from(Self::heat_at(hints, lba, e))] += u64::from(e.len());
                }
            }
        }
        by_heat
    }

    /// [`ExtentMap::reclaim_segment`] by a walk over every extent.
    fn reclaim_walk(
        &mut self,
        lo: u64,
        hi: u64,
        rescue: &mut Rescue,
        moves: &mut Vec<Move>,
    ) -> usize {
        let (shift, size) = (self.shift, self.bucket);
        let inside = |e: &Extent| e.is_data() && e.pos >= lo && e.pos < hi;
        // Sectors the segment holds at each heat, to know the coolest heat kept.
        let segment = self.buckets.iter().flat_map(|(&key, b)| {
            b.starts
                .iter()
                .zip(&b.exts)
                .filter(|(_, e)| inside(e))
                .map(move |(&o, e)| (key * size + u64::from(o), e))
        });
        let by_heat = Self::sectors_by_heat(&self.hints, rescue, segment);
        let mut cut = rescue.cut(&by_heat);
        let hints = &mut self.hints;
        let chance = &mut self.chance;
        let (occ, occ_max) = (&mut self.occ, self.occ_max);
        let mut dirty = 0;
        let mut removed = 0;
        self.buckets.retain(|&key, b| {
            let mut keep = 0;
            for i in 0..b.len() {
                let mut e = b.exts[i];
                if inside(&e) {
                    let lba = key * size + u64::from(b.starts[i]);
                    match Self::fate(hints, chance, lba, e, &mut cut, rescue, moves) {
                        Fate::Dirty => dirty += 1,
                        Fate::Kept(kept) => {
                            hints.note(lba, &kept);
                            e = kept;
                        }
                        Fate::Dropped => {
                            hints.forget(lba, &e);
                            removed += 1;
                            continue;
                        }
                    }
                }
                b.starts[keep] = b.starts[i];
                b.exts[keep] = e;
                keep += 1;
            }
            if keep < b.len() {
                // Kept entries change only their heat: the directory stands unless some
                // left (most buckets hold nothing of the segment).
                b.starts.truncate(keep);
                b.exts.truncate(keep);
                b.rebuild_dir(shift);
                if let Some(w) = occ.get_mut(key as usize).filter(|_| key < occ_max) {
                    *w = if keep > 0 {
                        b.occupancy(u32::MAX, shift)
                    } else {
                        0
                    };
                }
            }
            keep > 0
        });
        self.len -= removed;
        dirty
    }

    /// What a reclaim does with data extent `e` at `lba`, which lies in the segment: dirty
    /// data stays; clean data with heat is kept (its move listed in `moves`, its heat less
    /// one) while `cut` and `rescue` admit it; the rest is dropped.
    fn fate(
        hints: &hints::Hints,
        chance: &mut SecondChance,
        lba: u64,
        e: Extent,
        cut: &mut HeatCut,
        rescue: &mut Rescue,
        moves: &mut Vec<Move>,
    ) -> Fate {
        if e.state() != State::Clean {
            return Fate::Dirty;
        }
        let heat = Self::heat_at(hints, lba, &e);
        if e.probing() {
            chance.observe(heat);
        }
        let wanted = match heat {
            0 => false,
            // Asked only where a copy could be made: an extent the budget drops anyway (a
            // reclaim that may keep nothing while writes wait, or a cut above heat one) is
            // neither skipped nor sampled.
            1 => {
                rescue.could_take(&e) && cut.would_admit(heat, e.len()) && chance.copies_once_read()
            }
            _ => true,
        };
        if wanted && cut.admits(heat, e.len()) && rescue.take(&e) {
            let probe = heat == 1;
            moves.push(Move {
                lba,
                len: e.len(),
                src: e.pos,
                crc: e.crc(),
                probe,
            });
            Fate::Kept(e.with_heat(heat - 1).with_probe(probe))
        } else {
            Fate::Dropped
        }
    }

    /// What GC's second chance has learnt so far.
    pub fn second_chance(&self) -> &SecondChance {
        &self.chance
    }

    /// Every extent read since GC's last pass gets a copy, whatever the probes say (for
    /// tests that model the reclaim).
    #[cfg(test)]
    fn copy_everything_read(&mut self) {
        self.chance.min_probes = u32::MAX;
    }

    /// Sets the extent starting at `lba` to `ext`, the same extent with another heat.
    fn replace_heat(&mut self, lba: u64, ext: Extent) {
        let (key, off) = self.locate(lba);
        let Some(b) = self.buckets.get_mut(&key) else {
            return;
        };
        let i = b.rank(off, self.shift);
        if b.starts.get(i) == Some(&off) {
            b.exts[i] = ext;
            self.hints.note(lba, &ext);
        }
    }

    /// Drops the extent at `lba` if it is still exactly `ext` (used after a CRC mismatch).
    pub fn remove_if_same(&mut self, lba: u64, ext: &Extent) -> bool {
        let shift = self.shift;
        let (key, off) = self.locate(lba);
        let Some(b) = self.buckets.get_mut(&key) else {
            return false;
        };
        let i = b.rank(off, self.shift);
        if b.starts.get(i) == Some(&off) && b.exts[i] == *ext {
            b.remove(i, shift);
            self.hints.forget(lba, ext);
            if b.len() == 0 {
                self.buckets.remove(&key);
            }
            self.refresh_occ(key, off, u32::from(off) + ext.len());
            self.len -= 1;
            return true;
        }
        false
    }

    /// Whether [lba, lba+len) is still exactly the clean extent at cache sector `src` (a
    /// move of it may be logged: nothing newer landed there).
    pub fn holds_clean(&self, lba: u64, len: u32, src: u64) -> bool {
        self.get(lba)
            .is_some_and(|e| e.state() == State::Clean && e.len() == len && e.pos == src)
    }

    /// Whether piece `e` at `at` of the range starting at `lba` is still the clean data a
    /// move copies from cache sector `src` (the extent maybe trimmed or split by writes
    /// since).
    fn still_clean_at(e: &Extent, at: u64, lba: u64, src: u64) -> bool {
        e.state() == State::Clean && e.pos == src + (at - lba)
    }

    /// A move of the clean extent [lba, lba+len) from `src` to `pos` is durable: what is
    /// still that extent now lives at `pos` (the whole extent keeps `crc`). Its heat
    /// (reads while it moved) comes along; `probe`: it was kept at a heat of one
    /// ([`SecondChance`]).
    pub fn commit_move(
        &mut self,
        lba: u64,
        len: u32,
        src: u64,
        pos: u64,
        crc: Option<u32>,
        probe: bool,
    ) {
        self.for_each_mapped(lba, len, |m, p, e| {
            if !Self::still_clean_at(&e, p.lba, lba, src) {
                return;
            }
            let whole = p.lba == lba && p.len == len;
            let heat = Self::heat_at(&m.hints, p.lba, &e);
            m.insert(
                p.lba,
                Extent::new(
                    pos + (p.lba - lba),
                    p.len,
                    State::Clean,
                    crc.filter(|_| whole),
                    0,
                )
                .with_heat(heat)
                .with_probe(probe),
            );
        });
    }

    /// Drops what is still the clean extent [lba, lba+len) at `src` (its move was given up
    /// and its segment is going), trimmed or split as it may be.
    pub fn drop_clean_at(&mut self, lba: u64, len: u32, src: u64) {
        self.for_each_mapped(lba, len, |m, p, e| {
            if Self::still_clean_at(&e, p.lba, lba, src) {
                m.punch(p.lba, p.len);
            }
        });
    }

    /// Every block the hints hold is that extent in the buckets (for tests).
    #[cfg(test)]
    fn hints_consistent(&self) -> bool {
        self.hints
            .entries()
            .iter()
            .all(|&(lba, e)| self.find(lba) == Some(e))
    }

    /// Every bucket's occupancy word is what its extents make it, and no word is set
    /// where no bucket is (for tests).
    #[cfg(test)]
    fn occ_consistent(&self) -> bool {
        let shift = self.shift;
        self.occ.iter().enumerate().all(|(k, &w)| {
            let fresh = self.buckets.get(&(k as u64));
            w == fresh.map_or(0, |b| b.occupancy(u32::MAX, shift))
        }) && self
            .buckets
            .keys()
            .all(|&k| k >= self.occ_max || (k as usize) < self.occ.len())
    }

    /// Every bucket's directory matches its starts (for tests).
    #[cfg(test)]
    fn dirs_consistent(&self) -> bool {
        self.buckets.values().all(|b| {
            let mut fresh = Bucket {
                starts: b.starts.clone(),
                exts: Vec::new(),
                dir: [0; DIR],
            };
            fresh.rebuild_dir(self.shift);
            fresh.dir == b.dir
        })
    }

    /// Counts (dirty sectors, clean sectors, extents).
    pub fn usage(&self) -> (u64, u64, usize) {
        let mut dirty = 0;
        let mut clean = 0;
        for b in self.buckets.values() {
            for e in &b.exts {
                match e.state() {
                    State::Dirty | State::Zeroes | State::Unmapped => dirty += u64::from(e.len()),
                    State::Clean => clean += u64::from(e.len()),
                    State::Placeholder | State::Poisoned => {}
                }
            }
        }
        (dirty, clean, self.len)
    }
}

/// How much of a reclaimed segment GC may keep (see [`ExtentMap::reclaim_segment`]).
#[derive(Debug, Clone, Copy)]
pub struct Rescue {
    /// Sectors it may still keep.
    pub budget: u64,
    /// Keep only extents with a data CRC (a cache with data CRCs logs the moved copy with
    /// the extent's own CRC, which covers the whole extent only).
    pub need_crc: bool,
}

impl Rescue {
    /// Keeps nothing.
    pub fn none() -> Self {
        Rescue {
            budget: 0,
            need_crc: false,
        }
    }

    /// Whether `e` is an extent it may keep (room aside).
    fn may_take(&self, e: &Extent) -> bool {
        !self.need_crc || e.has_crc()
    }

    /// Whether it has room for `e` and may keep it.
    fn could_take(&self, e: &Extent) -> bool {
        u64::from(e.len()) <= self.budget && self.may_take(e)
    }

    fn take(&mut self, e: &Extent) -> bool {
        if !self.could_take(e) {
            return false;
        }
        let n = u64::from(e.len());
        self.budget -= n;
        true
    }

    /// Which heats the budget keeps, given the sectors a segment holds at each heat: all
    /// of every heat above the cut, and first come first kept at the cut.
    fn cut(&self, by_heat: &[u64]) -> HeatCut {
        let mut above = 0;
        for heat in (1..by_heat.len()).rev() {
            if above + by_heat[heat] > self.budget {
                return HeatCut {
                    heat: heat as u8,
                    room: self.budget - above,
                };
            }
            above += by_heat[heat];
        }
        HeatCut {
            heat: 1,
            room: by_heat.get(1).copied().unwrap_or(0),
        }
    }
}

/// A reclaim of one segment in progress ([`ExtentMap::reclaim_begin`]), visited a step
/// at a time ([`ExtentMap::reclaim_step`]) so that no one call holds the host's thread
/// for a whole segment.
#[derive(Debug)]
pub struct Reclaim {
    seg: usize,
    lo: u64,
    hi: u64,
    /// The segment's listed ranges, sorted and disjoint (unless `whole`).
    listed: Vec<segments::Logged>,
    /// The first range not yet visited.
    next: usize,
    /// What stays listed: extents still in the segment (dirty, or kept until their move
    /// commits) and what reaches into it from before.
    stay: Vec<segments::Logged>,
    /// Dirty extents found in the segment so far.
    dirty: usize,
    /// The ranges could not all be merged: one step visits them all.
    whole: bool,
}

impl Reclaim {
    /// Dirty extents found in the segment so far (all of them once the reclaim is done).
    pub fn dirty(&self) -> usize {
        self.dirty
    }
}

/// What a reclaim does with one extent of its segment ([`ExtentMap::fate`]).
enum Fate {
    /// Not clean: stays, and the segment with it.
    Dirty,
    /// Clean and hot: stays (as this, with less heat) until its move commits.
    Kept(Extent),
    /// Leaves the cache.
    Dropped,
}

/// The coolest heat a reclaim keeps, and the sectors it may keep at that heat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HeatCut {
    heat: u8,
    room: u64,
}

impl HeatCut {
    /// Whether it would keep `len` sectors at `heat` (nothing taken).
    fn would_admit(&self, heat: u8, len: u32) -> bool {
        heat > self.heat || (heat == self.heat && u64::from(len) <= self.room)
    }

    fn admits(&mut self, heat: u8, len: u32) -> bool {
        if !self.would_admit(heat, len) {
            return false;
        }
        if heat == self.heat {
            self.room -= u64::from(len);
        }
        true
    }
}

/// A clean extent GC keeps: its data, [lba, lba+len) at cache sector `src`, moves to the
/// log head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    pub lba: u64,
    pub len: u32,
    pub src: u64,
    pub crc: Option<u32>,
    /// Kept at a heat of one: a probe of whether such copies pay ([`SecondChance`]).
    pub probe: bool,
}

/// Probes back at a reclaim over which [`SecondChance`] judges (older ones count half,
/// then a quarter...).
const CHANCE_WINDOW: u32 = 1024;
/// Probes needed before copies of extents read once are judged not to pay.
const CHANCE_MIN_PROBES: u32 = 64;
/// While they do not pay, one in this many extents read once is still copied, as a probe.
const CHANCE_SAMPLE: u32 = 8;

/// Whether GC's second chance pays for extents read only once in their lap of the log.
///
/// A copy costs a cache read and write (and a key). Dropping instead costs a miss if the
/// extent is read again (and a fill: about a copy), nothing if it is not. An extent read
/// twice or more in its lap is always copied. One read once was copied too until
/// write-heavy zipfian workloads showed that, with writes driving the log round in a
/// fraction of a second, fewer than half of such copies were read again before GC reached
/// them next (θ 0.8 randrw: 40 %; they were a fifth of GC's copies), while a hot set read
/// once every half lap is read again every time. So GC learns which: extents copied at a heat of one are
/// marked (probes), and their heat when GC reaches them again tells whether they were
/// read meanwhile. While fewer than half were, such extents are dropped, but for one in
/// [`CHANCE_SAMPLE`], which keeps the measure going.
#[derive(Debug, Clone, Copy)]
pub struct SecondChance {
    /// Probes needed for a verdict ([`CHANCE_MIN_PROBES`]; tests that model the reclaim
    /// without it raise it out of reach).
    min_probes: u32,
    /// Probes back at a reclaim and those read again, recent ones weighing most.
    window_probes: u32,
    window_read: u32,
    /// Extents read once that were not copied while copies did not pay (for sampling).
    passed: u32,
    /// Probes back at a reclaim, in all.
    pub probes: u64,
    /// Those read again since their copy.
    pub probes_read: u64,
    /// Extents read once dropped because copies of such did not pay.
    pub skipped: u64,
}

impl Default for SecondChance {
    fn default() -> Self {
        SecondChance {
            min_probes: CHANCE_MIN_PROBES,
            window_probes: 0,
            window_read: 0,
            passed: 0,
            probes: 0,
            probes_read: 0,
            skipped: 0,
        }
    }
}

impl SecondChance {
    /// Whether copies of extents read once pay: at least half are read again, or too few
    /// probes came back to tell.
    pub fn pays(&self) -> bool {
        self.window_probes < self.min_probes || 2 * self.window_read >= self.window_probes
    }

    /// A probe back at a reclaim with `heat` (the read hits since its copy).
    fn observe(&mut self, heat: u8) {
        let read = u32::from(heat > 0);
        self.probes += 1;
        self.probes_read += u64::from(read);
        self.window_probes += 1;
        self.window_read += read;
        if self.window_probes >= CHANCE_WINDOW {
            self.window_probes /= 2;
            self.window_read /= 2;
        }
    }

    /// Whether to copy an extent read once in its lap.
    fn copies_once_read(&mut self) -> bool {
        if self.pays() {
            return true;
        }
        self.passed = self.passed.wrapping_add(1);
        if self.passed % CHANCE_SAMPLE == 0 {
            return true;
        }
        self.skipped += 1;
        false
    }
}

/// Whether [lba, lba+len) lies inside one 4 KiB block: a lookup the hints may answer.
#[inline]
fn in_one_block(lba: u64, len: u32) -> bool {
    (lba & 7) + u64::from(len) <= 8
}

/// The intersection of [s, s+l) and [lba, lba+len) (assumed to overlap).
fn clip(s: u64, l: u32, lba: u64, len: u32) -> (u64, u32) {
    let a = s.max(lba);
    let b = (s + u64::from(l)).min(lba + u64::from(len));
    (a, (b - a) as u32)
}

/// [lba, lba+len) cut at the edges of buckets of `bucket` sectors: (start, length) each.
fn bucket_pieces(bucket: u64, lba: u64, len: u32) -> impl Iterator<Item = (u64, u32)> {
    let end = lba + u64::from(len);
    let mut at = lba;
    std::iter::from_fn(move || {
        (at < end).then(|| {
            let b_end = (super::geometry::div(at, bucket) + 1) * bucket;
            let e = b_end.min(end);
            let piece = (at, (e - at) as u32);
            at = e;
            piece
        })
    })
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
    fn prefetch_hints_name_the_lines_a_lookup_reads() {
        let mut m = ExtentMap::new();
        for i in 0..600u64 {
            m.insert(i * 16, data(i * 16, 16));
        }
        for lba in [0u64, 16, 1008, 2048, 2064, 4784] {
            let (key, off) = m.locate(lba);
            let b = &m.buckets[&key];
            let i = b.starts.iter().position(|&s| s == off).unwrap();
            // The entry a lookup at an extent's start ends on is that extent.
            assert_eq!(m.second_line(lba, 16), (&b.exts[i] as *const Extent).cast());
            // The starts counted to find it begin at or before its own, in its chunk (at
            // most one 2-byte start per sector of the chunk).
            let (s, own) = (
                m.first_line(lba, 16) as usize,
                &b.starts[i] as *const u16 as usize,
            );
            assert!(s <= own && own - s < 2 << m.shift, "{lba}");
        }
        assert!(m.first_line(1 << 30, 16).is_null() && m.second_line(1 << 30, 16).is_null());
        // Inside one 4 KiB block, a lookup reads the hints' line and nothing after it.
        m.insert(9600, data(77, 8));
        for (lba, len) in [(9600, 8), (9601, 3), (9607, 1)] {
            assert_eq!(m.first_line(lba, len), m.hints.addr(9600));
            assert!(m.second_line(lba, len).is_null());
            assert_eq!(m.covering(lba, len).map(|e| e.pos), Some(77 + lba - 9600));
        }
        assert!(m.hints.holds_in_line(9600));
    }

    #[test]
    fn occupancy_answers_misses_without_the_table_and_follows_every_change() {
        let clean = |pos, len| Extent::new(pos, len, State::Clean, None, 0);
        // 1 MiB buckets: chunks of 64 sectors.
        let mut m = ExtentMap::with_bucket(2048);
        assert_eq!(m.shift, 6);
        m.insert(0, clean(0, 8));
        // A long extent over chunks 2..=5 (sectors 128..384), and one block in chunk 7.
        m.insert(130, clean(1000, 250));
        m.insert(448, clean(2000, 8));
        assert!(m.occ_consistent());
        assert_eq!(m.occ[0], 1 | 0b11_1100 | 1 << 7);
        // Nothing overlaps chunk 6: a miss there is answered from the word alone.
        assert!(!m.may_hold(m.locate(400), 8) && m.get(400).is_none() && !m.overlaps(384, 64));
        // Chunk 5 is busy only through the long extent that started in chunk 2.
        assert!(m.may_hold(m.locate(330), 8) && m.covering(330, 8).is_some());
        // Trimming its tail frees chunks 4 and 5; punching the block empties chunk 7.
        m.punch(250, 150);
        m.punch(448, 8);
        assert!(m.occ_consistent());
        assert_eq!(m.occ[0], 1 | 0b1100);
        assert!(m.get(330).is_none() && m.covering(130, 8).is_some());
        // GC dropping the rest empties the bucket, and its word.
        m.drop_segment(0, 4000);
        assert!(m.occ_consistent() && m.occ[0] == 0 && m.is_empty());
        // A bucket past the words kept is looked up in the table as before.
        let far = OCC_MAX * 2048;
        m.insert(far, data(3000, 8));
        assert!(m.may_hold(m.locate(far + 8), 8) && m.get(far).is_some() && m.occ_consistent());
        // A map keeps a word per four blocks of the cache, 64 at least (a 1 MiB cache
        // here), shared out between shards.
        let mut s = ExtentMap::with_segments(2048, 0, 2048, 1);
        assert_eq!(s.occ_max, 64);
        assert_eq!(ExtentMap::with_segments(2048, 0, 2048, 64).occ_max, 4096);
        assert_eq!(
            ExtentMap::with_segments(2048, 0, 2048, 64)
                .shared_by(4)
                .occ_max,
            1024
        );
        s.insert(64 * 2048, clean(0, 8));
        assert!(s.occ.len() <= 64 && s.may_hold(s.locate(64 * 2048), 8) && s.occ_consistent());
    }

    #[test]
    fn heat_costs_no_dram_and_is_not_part_of_equality() {
        // The map's entry (plus a 2-byte start) and the hints' entry keep their sizes.
        assert_eq!(std::mem::size_of::<Extent>(), 16);
        let e = Extent::new(100, 8, State::Clean, None, 3);
        let hot = e.heated();
        assert!(hot.accessed() && !e.accessed());
        assert_eq!(hot.heated().heated().heated().heat(), MAX_HEAT);
        assert_eq!(e, hot);
        assert_eq!(hot.len(), 8);
        assert_eq!(hot.state(), State::Clean);
        assert_eq!(hot.epoch(), Some(3));
        // A slice keeps it.
        assert!(hot.slice(0, 2, 4).accessed());
    }

    #[test]
    fn a_short_copy_budget_keeps_the_hottest_extents() {
        let mut m = ExtentMap::new();
        // Eight one-block clean extents in one segment; block i read i times (hint heat
        // saturates at 3), and a two-block extent read twice (the map's heat).
        for i in 0..8u64 {
            m.insert(i * 8, Extent::new(1000 + i * 8, 8, State::Clean, None, 0));
            for _ in 0..i {
                m.covering_touch(i * 8, 8).unwrap();
            }
        }
        m.insert(100, Extent::new(1100, 16, State::Clean, None, 0));
        m.covering_touch(100, 16).unwrap();
        m.covering_touch(104, 4).unwrap();
        assert_eq!(m.get(100).unwrap().heat(), 2);
        // Room for six blocks: the five at heat 3 (blocks 3..8) and one of heat 2 (block
        // 2 or the two-block extent, which does not fit).
        let mut rescue = Rescue {
            budget: 48,
            need_crc: false,
        };
        let mut moves = Vec::new();
        m.reclaim_segment(1000, 1200, &mut rescue, &mut moves);
        let mut kept: Vec<u64> = moves.iter().map(|m| m.lba).collect();
        kept.sort();
        assert_eq!(kept, vec![16, 24, 32, 40, 48, 56]);
        assert_eq!(rescue.budget, 0);
        // Each kept extent's heat drops by one; the rest left the map.
        assert_eq!(m.get(56).unwrap().heat(), MAX_HEAT - 1);
        assert_eq!(m.get(16).unwrap().heat(), 1);
        assert!(m.get(0).is_none() && m.get(8).is_none() && m.get(100).is_none());
        assert!(m.hints_consistent());
    }

    /// `n` one-block clean extents from block `first` on, at cache sectors from `pos`, each
    /// read once.
    fn read_once(m: &mut ExtentMap, first: u64, n: u64, pos: u64) {
        for i in 0..n {
            let lba = (first + i) * 8;
            m.insert(lba, Extent::new(pos + i * 8, 8, State::Clean, None, 0));
            m.covering_touch(lba, 8).unwrap();
        }
    }

    /// Reclaims [lo, hi) with room for everything and commits every move from `to` on, as
    /// GC does: the moves' blocks, in order.
    fn reclaim_and_move(m: &mut ExtentMap, lo: u64, hi: u64, to: u64) -> Vec<u64> {
        let mut rescue = Rescue {
            budget: hi - lo,
            need_crc: false,
        };
        let mut moves = Vec::new();
        m.reclaim_segment(lo, hi, &mut rescue, &mut moves);
        for (i, mv) in moves.iter().enumerate() {
            m.commit_move(mv.lba, mv.len, mv.src, to + i as u64 * 8, mv.crc, mv.probe);
        }
        moves.iter().map(|mv| mv.lba / 8).collect()
    }

    #[test]
    fn blocks_read_once_are_copied_while_most_such_copies_are_read_again() {
        let mut m = ExtentMap::new();
        read_once(&mut m, 0, 128, 10_000);
        // Nothing learnt yet: every block read once is copied, as a probe.
        let kept = reclaim_and_move(&mut m, 10_000, 11_024, 20_000);
        assert_eq!(kept.len(), 128);
        assert!(m.find(0).unwrap().probing());
        // Each read again before GC comes back: copies pay, and go on.
        for b in 0..128 {
            m.covering_touch(b * 8, 8).unwrap();
        }
        let kept = reclaim_and_move(&mut m, 20_000, 21_024, 30_000);
        assert_eq!(kept.len(), 128);
        let c = m.second_chance();
        assert_eq!((c.probes, c.probes_read, c.skipped), (128, 128, 0));
        assert!(c.pays());
        assert!(m.hints_consistent());
    }

    #[test]
    fn blocks_read_once_are_dropped_while_few_such_copies_are_read_again() {
        let mut m = ExtentMap::new();
        read_once(&mut m, 0, 128, 10_000);
        assert_eq!(reclaim_and_move(&mut m, 10_000, 11_024, 20_000).len(), 128);
        // A quarter read again before GC comes back (those are copied again).
        for b in (0..128).step_by(4) {
            m.covering_touch(b * 8, 8).unwrap();
        }
        let kept = reclaim_and_move(&mut m, 20_000, 21_024, 30_000);
        let c = *m.second_chance();
        assert_eq!((c.probes, c.probes_read), (128, 32));
        assert!(!c.pays());
        // Only the blocks read again were kept (before the verdict) or, after it, one in
        // eight of them as probes; the unread ones left the cache.
        assert!(
            kept.iter().all(|b| b % 4 == 0) && kept.len() < 32,
            "{kept:?}"
        );
        assert!(m.get(8).is_none());
        // New blocks read once: one in eight is copied, the rest dropped.
        read_once(&mut m, 1000, 128, 40_000);
        let kept = reclaim_and_move(&mut m, 40_000, 41_024, 50_000);
        assert_eq!(kept.len(), 16);
        assert!(m.second_chance().skipped >= 112);
        // Blocks read twice are still copied, and are no probes.
        for b in 2000..2004u64 {
            m.insert(
                b * 8,
                Extent::new(60_000 + (b - 2000) * 8, 8, State::Clean, None, 0),
            );
            m.covering_touch(b * 8, 8).unwrap();
            m.covering_touch(b * 8, 8).unwrap();
        }
        assert_eq!(reclaim_and_move(&mut m, 60_000, 60_032, 70_000).len(), 4);
        assert!(!m.find(2000 * 8).unwrap().probing());
        // A reclaim that may keep nothing (writes wait for space) skips nothing either.
        let skipped = m.second_chance().skipped;
        read_once(&mut m, 3000, 16, 80_000);
        m.drop_segment(80_000, 80_128);
        assert!(m.get(3000 * 8).is_none());
        assert_eq!(m.second_chance().skipped, skipped);
        // Nor does one whose budget the hotter extents (after them in LBA order) take whole.
        read_once(&mut m, 4000, 12, 90_000);
        for b in 4008..4012u64 {
            m.covering_touch(b * 8, 8).unwrap();
        }
        let mut rescue = Rescue {
            budget: 32,
            need_crc: false,
        };
        let mut moves = Vec::new();
        m.reclaim_segment(90_000, 90_096, &mut rescue, &mut moves);
        assert_eq!(moves.len(), 4);
        assert_eq!(m.second_chance().skipped, skipped);
        assert!(m.hints_consistent());
    }

    #[test]
    fn copies_of_blocks_read_once_resume_once_their_probes_are_read_again() {
        let mut m = ExtentMap::new();
        read_once(&mut m, 0, 128, 10_000);
        reclaim_and_move(&mut m, 10_000, 11_024, 20_000);
        reclaim_and_move(&mut m, 20_000, 21_024, 30_000); // none read again
        assert!(!m.second_chance().pays());
        // The workload turns: the probes still sampled are all read again, until they
        // outweigh the old verdict.
        let mut pos = 100_000;
        let mut first = 1000;
        for _ in 0..400 {
            if m.second_chance().pays() {
                break;
            }
            read_once(&mut m, first, 64, pos);
            let kept = reclaim_and_move(&mut m, pos, pos + 512, pos + 1000);
            for &b in &kept {
                m.covering_touch(b * 8, 8).unwrap();
            }
            reclaim_and_move(&mut m, pos + 1000, pos + 1512, pos + 2000);
            first += 64;
            pos += 10_000;
        }
        assert!(m.second_chance().pays(), "{:?}", m.second_chance());
    }

    #[test]
    fn mark_clean_cleans_only_what_still_holds_the_data_written_back() {
        let mut m = ExtentMap::new();
        // Whole and unchanged: clean, its CRC kept.
        m.insert(0, Extent::new(1000, 8, State::Dirty, Some(7), 0));
        m.mark_clean(0, 8, 1000);
        assert_eq!(
            m.get(0),
            Some(Extent::new(1000, 8, State::Clean, Some(7), 0))
        );
        // Half rewritten since: the other half is clean (without the whole extent's CRC),
        // the rewrite stays dirty.
        m.insert(32, Extent::new(2000, 16, State::Dirty, Some(9), 0));
        m.insert(40, Extent::new(3000, 8, State::Dirty, None, 0));
        m.mark_clean(32, 16, 2000);
        assert_eq!(m.get(32), Some(Extent::new(2000, 8, State::Clean, None, 0)));
        assert_eq!(m.get(40), Some(Extent::new(3000, 8, State::Dirty, None, 0)));
        // Rewritten elsewhere since: nothing changes.
        m.insert(64, Extent::new(4000, 8, State::Dirty, None, 0));
        m.mark_clean(64, 8, 3500);
        assert_eq!(m.get(64).map(|e| e.state()), Some(State::Dirty));
        assert!(m.hints_consistent());
    }

    #[test]
    fn read_hits_set_the_access_bit_where_the_lookup_found_the_extent() {
        let mut m = ExtentMap::new();
        m.insert(0, Extent::new(1000, 8, State::Clean, None, 0)); // one block: in the hints
        m.insert(16, Extent::new(2000, 16, State::Clean, None, 0)); // two: the map only
        assert!(!m.get(0).unwrap().accessed());
        m.covering_touch(0, 8).unwrap();
        assert!(m.get(0).unwrap().accessed(), "set in the hint");
        assert!(
            !m.find(0).unwrap().accessed(),
            "the map's copy is not touched"
        );
        m.covering_touch(20, 4).unwrap();
        assert!(m.get(16).unwrap().accessed());
        m.insert(40, Extent::new(3000, 8, State::Clean, None, 0));
        m.touch(36, 8);
        assert!(m.find(40).unwrap().accessed());
        // Heat follows the block: a rewrite keeps it, and so does writeback turning dirty
        // data clean, but for one read-back of data just written (a verify pass).
        m.insert(64, Extent::new(4000, 8, State::Dirty, None, 0));
        m.covering_touch(64, 8).unwrap();
        m.mark_clean(64, 8, 4000);
        assert!(m.get(64).unwrap().heat() == 0 && m.get(64).unwrap().state() == State::Clean);
        m.covering_touch(64, 8).unwrap();
        m.covering_touch(64, 8).unwrap();
        m.insert_rewrite(64, Extent::new(4008, 8, State::Dirty, None, 0));
        assert_eq!(m.get(64).unwrap().heat(), 2);
        m.mark_clean(64, 8, 4008);
        assert_eq!(m.get(64).unwrap().heat(), 2);
        m.insert(64, Extent::new(4016, 8, State::Dirty, None, 0));
        assert_eq!(m.get(64).unwrap().heat(), 0, "a plain insert takes no heat");
        m.mark_clean(64, 8, 4016);
        m.insert(80, Extent::new(1100, 8, State::Clean, None, 0)); // not read
        let mut rescue = Rescue {
            budget: 24,
            need_crc: false,
        };
        let mut moves = Vec::new();
        assert_eq!(m.reclaim_segment(1000, 1200, &mut rescue, &mut moves), 0);
        moves.sort_by_key(|m| m.lba);
        assert_eq!(
            moves
                .iter()
                .map(|m| (m.lba, m.len, m.src))
                .collect::<Vec<_>>(),
            vec![(0, 8, 1000)]
        );
        // Kept readable where it is, with the bit cleared: one chance a pass.
        assert_eq!(m.get(0), Some(Extent::new(1000, 8, State::Clean, None, 0)));
        assert!(!m.get(0).unwrap().accessed());
        assert!(m.holds_clean(0, 8, 1000) && !m.holds_clean(0, 8, 1001));
        assert!(m.get(80).is_none(), "not read: dropped");
        // Read while it moved: the bit comes along to the new place.
        m.covering_touch(0, 8).unwrap();
        m.commit_move(0, 8, 1000, 5000, None, false);
        assert_eq!(m.get(0), Some(Extent::new(5000, 8, State::Clean, None, 0)));
        assert!(m.get(0).unwrap().accessed());
        // A move of an extent replaced meanwhile commits nothing; a dropped move removes
        // the extent only if it is still the one it was moving.
        m.commit_move(0, 8, 1000, 6000, None, false);
        assert_eq!(m.get(0).unwrap().pos, 5000);
        m.drop_clean_at(0, 8, 1000);
        assert!(m.get(0).is_some());
        m.drop_clean_at(0, 8, 5000);
        assert!(m.get(0).is_none());
        // Trimmed or split by writes while it moved: the rest moves, or goes.
        m.insert(200, Extent::new(7000, 24, State::Clean, Some(5), 0));
        m.insert(208, Extent::new(9000, 8, State::Dirty, None, 0));
        m.commit_move(200, 24, 7000, 8000, Some(5), false);
        assert_eq!(
            m.get(200),
            Some(Extent::new(8000, 8, State::Clean, None, 0))
        );
        assert_eq!(m.get(208).unwrap().state(), State::Dirty);
        assert_eq!(
            m.get(216),
            Some(Extent::new(8016, 8, State::Clean, None, 0))
        );
        m.insert(300, Extent::new(7100, 24, State::Clean, None, 0));
        m.insert(300, Extent::new(9100, 8, State::Dirty, None, 0));
        m.drop_clean_at(300, 24, 7100);
        assert_eq!(m.get(300).unwrap().pos, 9100);
        assert!(m.get(308).is_none(), "the rest of a dropped move goes");
        let mut left = Vec::new();
        m.lookup(300, 24, &mut left);
        assert_eq!(left.iter().filter(|p| p.extent.is_some()).count(), 1);
        // A budget too small for an extent drops it; with data CRCs only whole extents move.
        m.covering_touch(16, 16).unwrap();
        let mut small = Rescue {
            budget: 8,
            need_crc: false,
        };
        m.reclaim_segment(2000, 2100, &mut small, &mut moves);
        assert!(m.get(16).is_none());
        assert!(m.hints_consistent() && m.dirs_consistent() && m.occ_consistent());
    }

    #[test]
    fn a_zeroing_key_written_back_drops_only_itself() {
        let mut m = ExtentMap::new();
        // Unmapped by the key of kset 5, then again (same epoch) by that of kset 9.
        m.insert(8, Extent::new(5, 8, State::Unmapped, None, 4));
        m.insert(8, Extent::new(9, 8, State::Unmapped, None, 4));
        m.punch_state(8, 8, State::Unmapped, 4, 5);
        assert_eq!(m.get(8), Some(Extent::new(9, 8, State::Unmapped, None, 4)));
        // Cut in two by a write: both pieces still name kset 9, and go with it.
        m.insert(10, Extent::new(3000, 2, State::Dirty, None, 4));
        m.punch_state(8, 8, State::Unmapped, 3, 9);
        assert!(m.get(8).is_some(), "another epoch's key stays");
        m.punch_state(8, 8, State::Unmapped, 4, 9);
        assert!(m.get(8).is_none() && m.get(12).is_none());
        assert_eq!(m.get(10).map(|e| e.pos), Some(3000));
        assert!(m.hints_consistent() && m.dirs_consistent() && m.occ_consistent());
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

    /// A block the hints hold is one data extent: punching placeholders there changes
    /// nothing, while a block holding a fill's placeholder (never hinted) loses it.
    #[test]
    fn punching_placeholders_leaves_a_hinted_block_and_punches_a_fill() {
        let mut m = ExtentMap::new();
        m.insert(0, data(500, 8));
        assert!(m.hints.get(0).is_some());
        m.insert(8, Extent::new(42, 8, State::Placeholder, None, 0));
        assert!(m.hints.get(8).is_none());
        m.punch_placeholders(0, 8);
        m.punch_placeholders(10, 4);
        assert_eq!(flat(&m), vec![(0, 500, 8), (8, 42, 2), (14, 42, 2)]);
        assert!(m.hints_consistent() && m.dirs_consistent() && m.occ_consistent());
    }

    #[test]
    fn an_extent_crossing_a_bucket_edge_reads_back_whole_and_punches_cleanly() {
        let mut m = ExtentMap::with_bucket(8);
        m.insert(4, data(1000, 8));
        assert_eq!(flat(&m), vec![(4, 1000, 4), (8, 1004, 4)]);
        let mut out = Vec::new();
        m.lookup(0, 16, &mut out);
        let got: Vec<_> = out
            .iter()
            .map(|p| (p.lba, p.len, p.extent.map(|e| e.pos)))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, 4, None),
                (4, 4, Some(1000)),
                (8, 4, Some(1004)),
                (12, 4, None)
            ]
        );
        m.punch(6, 4);
        assert_eq!(flat(&m), vec![(4, 1000, 2), (10, 1006, 2)]);
        assert_eq!(m.len(), 2);
        m.punch(0, 16);
        assert!(m.is_empty());
    }

    #[test]
    fn bucket_rank_counts_and_searches_alike() {
        for n in [0usize, 1, 7, LINEAR_MAX, LINEAR_MAX + 1, 3000] {
            // Shifts whose last chunk is short of the starts (a long tail to scan) or not.
            for shift in [0, 6, 11] {
                let mut b = Bucket {
                    starts: (0..n).map(|i| (i * 13 + 5) as u16).collect(),
                    exts: vec![data(0, 1); n],
                    dir: [0; DIR],
                };
                b.rebuild_dir(shift);
                for off in (0..(n * 13 + 20).min(65535)).step_by(3) {
                    let off = off as u16;
                    let want = b.starts.partition_point(|&s| s < off);
                    assert_eq!(b.rank(off, shift), want, "n {n} shift {shift} off {off}");
                }
            }
        }
    }

    /// Random inserts, punches and lookups against a map of single sectors, with buckets
    /// small enough that extents cross their edges and large enough for binary search.
    mod against_sectors {
        use super::super::*;
        use proptest::prelude::*;
        use std::collections::BTreeMap;

        #[derive(Debug, Clone)]
        enum Op {
            Insert(u64, u32),
            Punch(u64, u32),
            /// One 4 KiB block at block number .0, clean or dirty: what the hints hold.
            Block(u64, bool),
            /// `drop_segment` over cache positions [.0, .0 + .1) past the first written.
            Drop(u64, u64),
            /// `remove_if_same` of the extent starting at block .0, if any.
            RemoveSame(u64),
            /// A read hit on block .0 (heat).
            Touch(u64),
            /// `reclaim_segment` of segment .0 (of [`SEG`] sectors past the first written),
            /// keeping every hot clean extent (.1) or none.
            Reclaim(u64, bool),
            /// The segmented map drops segment .0 in steps of .1 ranges, with inserts
            /// (true) and punches of .2 applied between steps, as the engine's requests
            /// change the map between polls; the other map drops it at once after them.
            SteppedDrop(u64, usize, Vec<(bool, u64, u32)>),
        }

        /// Sectors per segment of the segmented map.
        const SEG: u64 = 256;

        /// The clean extents of `m` stored in cache sectors [lo, hi), as (start, length).
        fn clean_in(m: &ExtentMap, lo: u64, hi: u64) -> Vec<(u64, u32)> {
            m.iter()
                .filter(|(_, e)| e.state() == State::Clean && e.pos >= lo && e.pos < hi)
                .map(|(s, e)| (s, e.len()))
                .collect()
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                3 => (0u64..4000, 1u32..40).prop_map(|(l, n)| Op::Insert(l, n)),
                1 => (0u64..4000, 1u32..200).prop_map(|(l, n)| Op::Punch(l, n)),
                3 => (0u64..500, any::<bool>()).prop_map(|(b, c)| Op::Block(b, c)),
                1 => (0u64..20_000, 1u64..2000).prop_map(|(a, w)| Op::Drop(a, w)),
                1 => (0u64..500).prop_map(Op::RemoveSame),
                2 => (0u64..500).prop_map(Op::Touch),
                1 => (0u64..100, any::<bool>()).prop_map(|(k, keep)| Op::Reclaim(k, keep)),
                1 => (
                    0u64..100,
                    1usize..6,
                    proptest::collection::vec((any::<bool>(), 0u64..4000, 1u32..40), 0..12),
                )
                    .prop_map(|(k, step, between)| Op::SteppedDrop(k, step, between)),
            ]
        }

        proptest! {
            #[test]
            fn extent_map_matches_a_sector_map(
                bucket in prop_oneof![Just(8u64), Just(64), Just(4096)],
                ops in proptest::collection::vec(op(), 1..600),
            ) {
                let mut m = ExtentMap::with_bucket(bucket);
                // The same map with segment lists: its reclaims visit only those, and must
                // do what the walk does.
                let mut ms = ExtentMap::with_segments(bucket, 1_000_000, SEG, 100);
                // The model keeps every extent with heat: no verdict on probes.
                m.copy_everything_read();
                ms.copy_everything_read();
                // sector -> cache position of that sector
                let mut r: BTreeMap<u64, u64> = BTreeMap::new();
                let mut pos = 1_000_000u64;
                for o in &ops {
                    match *o {
                        Op::Insert(l, n) => {
                            m.insert(l, Extent::new(pos, n, State::Dirty, None, 0));
                            ms.insert(l, Extent::new(pos, n, State::Dirty, None, 0));
                            for k in 0..u64::from(n) {
                                r.insert(l + k, pos + k);
                            }
                            pos += u64::from(n);
                        }
                        Op::Punch(l, n) => {
                            m.punch(l, n);
                            ms.punch(l, n);
                            for k in 0..u64::from(n) {
                                r.remove(&(l + k));
                            }
                        }
                        Op::Block(b, clean) => {
                            let state = if clean { State::Clean } else { State::Dirty };
                            m.insert(b * 8, Extent::new(pos, 8, state, None, 3));
                            ms.insert(b * 8, Extent::new(pos, 8, state, None, 3));
                            for k in 0..8 {
                                r.insert(b * 8 + k, pos + k);
                            }
                            pos += 8;
                        }
                        Op::Drop(a, w) => {
                            let (lo, hi) = (1_000_000 + a, 1_000_000 + a + w);
                            let gone = clean_in(&m, lo, hi);
                            m.drop_segment(lo, hi);
                            ms.drop_segment(lo, hi);
                            for (s, n) in gone {
                                for k in 0..u64::from(n) {
                                    r.remove(&(s + k));
                                }
                            }
                        }
                        Op::RemoveSame(b) => {
                            if let Some(e) = m.get(b * 8) {
                                prop_assert!(m.remove_if_same(b * 8, &e));
                                prop_assert!(ms.remove_if_same(b * 8, &e));
                                for k in 0..u64::from(e.len()) {
                                    r.remove(&(b * 8 + k));
                                }
                            }
                        }
                        Op::Touch(b) => {
                            prop_assert_eq!(m.covering_touch(b * 8, 8), ms.covering_touch(b * 8, 8));
                        }
                        Op::Reclaim(k, keep) => {
                            let lo = 1_000_000 + k * SEG;
                            let hi = lo + SEG;
                            let gone: Vec<(u64, u32)> = m
                                .iter()
                                .filter(|(s, e)| {
                                    e.state() == State::Clean
                                        && e.pos >= lo
                                        && e.pos < hi
                                        && (!keep || ExtentMap::heat_at(&m.hints, *s, e) == 0)
                                })
                                .map(|(s, e)| (s, e.len()))
                                .collect();
                            let rescue = Rescue {
                                budget: if keep { u64::MAX } else { 0 },
                                need_crc: false,
                            };
                            let (mut r1, mut r2) = (rescue, rescue);
                            let (mut v1, mut v2) = (Vec::new(), Vec::new());
                            let d1 = m.reclaim_segment(lo, hi, &mut r1, &mut v1);
                            let d2 = ms.reclaim_segment(lo, hi, &mut r2, &mut v2);
                            prop_assert_eq!(d1, d2, "dirty extents found");
                            v1.sort_by_key(|v| v.lba);
                            v2.sort_by_key(|v| v.lba);
                            prop_assert_eq!(v1, v2, "moves");
                            for (s, n) in gone {
                                for k in 0..u64::from(n) {
                                    r.remove(&(s + k));
                                }
                            }
                        }
                        // Below, where it may change `pos`.
                        Op::SteppedDrop(..) => {}
                    }
                    if let Op::SteppedDrop(k, step, ref between) = *o {
                        let lo = 1_000_000 + k * SEG;
                        let hi = lo + SEG;
                        // Only a segment already written (the engine logs nothing in one
                        // being reclaimed) and with no extent crossing its ends (a log never
                        // crosses one): here one that did, trimmed between steps, may be
                        // dropped before its trim left the segment, which at once keeps it.
                        let crossing = m.iter().any(|(_, e)| {
                            let end = e.pos + u64::from(e.len());
                            (e.pos < lo && end > lo) || (e.pos < hi && end > hi)
                        });
                        let begun = if hi <= pos && !crossing {
                            ms.reclaim_begin(lo, hi)
                        } else {
                            None
                        };
                        if let Some(mut rc) = begun {
                            let mut between = between.iter();
                            let mut v = Vec::new();
                            while !ms.reclaim_step(&mut rc, &mut Rescue::none(), &mut v, step) {
                                let Some(&(insert, l, n)) = between.next() else {
                                    continue;
                                };
                                if insert {
                                    m.insert(l, Extent::new(pos, n, State::Clean, None, 0));
                                    ms.insert(l, Extent::new(pos, n, State::Clean, None, 0));
                                    for k in 0..u64::from(n) {
                                        r.insert(l + k, pos + k);
                                    }
                                    pos += u64::from(n);
                                } else {
                                    m.punch(l, n);
                                    ms.punch(l, n);
                                    for k in 0..u64::from(n) {
                                        r.remove(&(l + k));
                                    }
                                }
                            }
                            prop_assert!(v.is_empty(), "nothing kept without room");
                            let gone = clean_in(&m, lo, hi);
                            let dirty = m.drop_segment(lo, hi);
                            // A dirty extent split after its step counts once there, and one
                            // punched away after it still counts: never fewer found.
                            prop_assert!(rc.dirty() > 0 || dirty == 0, "dirty extents missed");
                            for (s, n) in gone {
                                for k in 0..u64::from(n) {
                                    r.remove(&(s + k));
                                }
                            }
                            // Nothing clean is left in the segment, and what stays is listed:
                            // a second reclaim finds the dirty extents the other map has and
                            // drops nothing.
                            let before = ms.len();
                            prop_assert_eq!(ms.drop_segment(lo, hi), dirty, "dirty extents listed");
                            prop_assert_eq!(ms.len(), before);
                        }
                    }
                    prop_assert!(m.dirs_consistent(), "a bucket directory is stale after {:?}", o);
                    prop_assert!(m.hints_consistent(), "a hint is stale after {:?}", o);
                    prop_assert!(m.occ_consistent(), "an occupancy word is stale after {:?}", o);
                    prop_assert!(ms.dirs_consistent(), "a bucket directory is stale after {:?}", o);
                    prop_assert!(ms.occ_consistent(), "an occupancy word is stale after {:?}", o);
                    prop_assert!(ms.hints_consistent(), "a hint is stale after {:?}", o);
                    let heats = |x: &ExtentMap| -> Vec<(u64, u64, u32, u8)> {
                        x.iter()
                            .map(|(s, e)| (s, e.pos, e.len(), ExtentMap::heat_at(&x.hints, s, e)))
                            .collect()
                    };
                    prop_assert_eq!(heats(&m), heats(&ms), "the segmented map differs after {:?}", o);
                    prop_assert_eq!(m.len(), ms.len());
                }
                let mut got = BTreeMap::new();
                let mut last_end = 0;
                for (s, e) in m.iter() {
                    prop_assert!(s >= last_end, "extents overlap or are out of order");
                    last_end = s + u64::from(e.len());
                    prop_assert_eq!(m.get(s), Some(*e));
                    for k in 0..u64::from(e.len()) {
                        got.insert(s + k, e.pos + k);
                    }
                }
                prop_assert_eq!(&got, &r);
                prop_assert_eq!(m.len(), m.iter().count());
                let mut pieces = Vec::new();
                m.lookup(100, 3000, &mut pieces);
                let mut at = 100;
                for p in &pieces {
                    prop_assert_eq!(p.lba, at);
                    for k in 0..u64::from(p.len) {
                        let want = r.get(&(p.lba + k)).copied();
                        prop_assert_eq!(p.extent.map(|e| e.pos + k), want);
                    }
                    at += u64::from(p.len);
                }
                prop_assert_eq!(at, 3100);
                // `covering` is a lookup that found exactly one mapped piece.
                for o in &ops {
                    let (l, n) = match *o {
                        Op::Insert(l, n) | Op::Punch(l, n) => (l, n),
                        Op::Block(b, _) | Op::RemoveSame(b) => (b * 8, 8),
                        Op::Drop(..) | Op::Touch(_) | Op::Reclaim(..) | Op::SteppedDrop(..) => continue,
                    };
                    for (l, n) in [(l, n), (l + 1, n.min(8)), (l.saturating_sub(3), 4)] {
                        m.lookup(l, n, &mut pieces);
                        let want = match pieces.as_slice() {
                            [p] => p.extent,
                            _ => None,
                        };
                        prop_assert_eq!(m.covering(l, n), want, "covering {}+{}", l, n);
                    }
                }
            }
        }
    }
}
