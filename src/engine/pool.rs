//! The global pool of free segments. Owned by one thread; shards ask for segments and give
//! them back by message, so no segment is ever shared.

use std::collections::VecDeque;

/// A segment handed to a shard, with the generation it must stamp on its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub seg: u32,
    pub gen: u32,
}

/// Messages from a shard to the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToPool {
    /// The shard wants one more segment.
    Need { shard: u32 },
    /// The shard no longer uses this segment.
    Release { seg: u32 },
}

#[derive(Debug)]
pub struct SegmentPool {
    free: VecDeque<u32>,
    /// Generations are unique across the cache: every grant takes a new one, so a stale
    /// kset or key naming an older generation never matches again.
    next_gen: u32,
    waiting: VecDeque<u32>,
    total: u32,
}

impl SegmentPool {
    pub fn new(free: impl IntoIterator<Item = u32>, next_gen: u32, total: u32) -> Self {
        SegmentPool {
            free: free.into_iter().collect(),
            next_gen,
            waiting: VecDeque::new(),
            total,
        }
    }

    /// Handles a message; returns the grants to deliver, as (shard, grant).
    pub fn handle(&mut self, msg: ToPool) -> Vec<(u32, Grant)> {
        match msg {
            ToPool::Need { shard } => self.waiting.push_back(shard),
            ToPool::Release { seg } => self.free.push_back(seg),
        }
        let mut out = Vec::new();
        while !self.waiting.is_empty() && !self.free.is_empty() {
            if let (Some(shard), Some(seg)) = (self.waiting.pop_front(), self.free.pop_front()) {
                let gen = self.next_gen;
                self.next_gen = self.next_gen.wrapping_add(1).max(1);
                out.push((shard, Grant { seg, gen }));
            }
        }
        out
    }

    pub fn free_count(&self) -> u32 {
        self.free.len() as u32
    }

    pub fn total(&self) -> u32 {
        self.total
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }
}
