//! Which worker threads a request goes to: stripe `s` belongs to shard `s % shards`, which
//! worker `shard % workers` drives (`Cache::part_of_shard`). A request inside one worker's
//! stripes goes to that worker alone; one spanning several workers' stripes, and a request
//! without a block range (a flush, a reset) or an empty one, to each worker it concerns.

use crate::engine::Cache;

/// How a pcache bdev's requests map to its workers (fixed once the cache is open).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Routing {
    /// Stripe size, sectors.
    pub(crate) stripe: u64,
    pub(crate) shards: u32,
    /// log2(bdev block size / 512).
    pub(crate) shift: u32,
}

/// The workers (indices into the team, lead first) a request goes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Targets {
    One(usize),
    /// Every worker.
    All,
    /// Several, each once, in the order of the request's stripes.
    Some(Vec<usize>),
}

impl Routing {
    /// The targets among `workers` workers of a request of `num` blocks at block `offset`;
    /// `ranged`: a READ, WRITE, UNMAP or WRITE_ZEROES (the types with a block range).
    pub(crate) fn targets(&self, workers: usize, ranged: bool, offset: u64, num: u64) -> Targets {
        if !ranged || num == 0 {
            return Targets::All;
        }
        let n = workers as u64;
        let worker_of =
            |stripe: u64| Cache::part_of_shard((stripe % u64::from(self.shards)) as u32, workers);
        let first = (offset << self.shift) / self.stripe;
        let last = (((offset + num) << self.shift) - 1) / self.stripe;
        let w0 = worker_of(first);
        // Past `n` stripes the shards' workers repeat: checking that many decides.
        if first == last || (first + 1..=last.min(first + n)).all(|s| worker_of(s) == w0) {
            return Targets::One(w0);
        }
        let mut out: Vec<usize> = Vec::new();
        for s in first..=last.min(first + u64::from(self.shards) * n) {
            let w = worker_of(s);
            if !out.contains(&w) {
                out.push(w);
            }
        }
        Targets::Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 64 KiB stripes (128 sectors), 4 shards, 4 KiB blocks (shift 3).
    const R: Routing = Routing {
        stripe: 128,
        shards: 4,
        shift: 3,
    };

    #[test]
    fn unranged_and_empty_requests_go_to_every_worker() {
        assert_eq!(R.targets(2, false, 0, 8), Targets::All);
        assert_eq!(R.targets(2, true, 5, 0), Targets::All);
    }

    #[test]
    fn a_request_inside_one_stripe_goes_to_its_shards_worker() {
        // Blocks 0..16 are stripe 0; blocks 16..32 stripe 1.
        for (offset, want) in [(0, 0), (15, 0), (16, 1), (32, 0), (48, 1), (64, 0)] {
            assert_eq!(
                R.targets(2, true, offset, 1),
                Targets::One(Cache::part_of_shard((offset / 16 % 4) as u32, 2)),
                "offset {offset}"
            );
            assert_eq!(
                R.targets(2, true, offset, 1),
                Targets::One(want),
                "offset {offset}"
            );
        }
    }

    #[test]
    fn a_request_over_stripes_of_one_worker_goes_to_it_alone() {
        // One worker drives every shard.
        assert_eq!(R.targets(1, true, 0, 1000), Targets::One(0));
        // Adjacent stripes belong to different workers of a team.
        assert_eq!(R.targets(4, true, 8, 16), Targets::Some(vec![0, 1]));
    }

    #[test]
    fn a_request_over_many_stripes_names_each_worker_once() {
        // Blocks 0..160: stripes 0..=9, every shard, both workers once.
        assert_eq!(R.targets(2, true, 0, 160), Targets::Some(vec![0, 1]));
        // A huge range stops looking once every shard was seen.
        assert_eq!(
            R.targets(4, true, 0, 1 << 40),
            Targets::Some(vec![0, 1, 2, 3])
        );
    }
}
