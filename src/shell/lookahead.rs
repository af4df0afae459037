//! How far ahead a batch of requests served by their submitting thread (`io::served`)
//! prefetches the index lookups of the requests behind the one being served.
//!
//! A lookup has two stages ([`ExtentMap::first_line`](crate::engine::index::ExtentMap::first_line),
//! then `second_line`, which the first leads to). Each request's first stage is started
//! [`FIRST_AHEAD`] requests before it is served, its second [`SECOND_AHEAD`] before.

use std::ops::Range;

/// Distances, in requests, at which a batch loads the lines of the next lookups' two
/// stages. A request served copies its 4 KiB, which pushes out of L1 what was loaded too
/// early. For the map's chain these measured best (bdevperf, 1 core QD32, against loading
/// the whole batch's lines up front: +3% reads, +2.5% writes); a 4 KiB lookup is one line
/// of the index's hints, for which distances 1 to 8 measured alike.
pub(crate) const FIRST_AHEAD: usize = 5;
pub(crate) const SECOND_AHEAD: usize = 2;

/// The requests of a batch of `n` whose first stages, then second stages, start before the
/// first request is served (none for a lone request: nothing to overlap with).
#[inline(always)]
pub(crate) fn warm_up(n: usize) -> (Range<usize>, Range<usize>) {
    if n > 1 {
        (0..FIRST_AHEAD.min(n), 0..SECOND_AHEAD.min(n))
    } else {
        (0..0, 0..0)
    }
}

/// While request `k` of a batch of `n` is served: the request whose first stage starts,
/// and the one whose second stage starts.
#[inline(always)]
pub(crate) fn while_serving(k: usize, n: usize) -> (Option<usize>, Option<usize>) {
    (
        (k + FIRST_AHEAD < n).then_some(k + FIRST_AHEAD),
        (k + SECOND_AHEAD < n).then_some(k + SECOND_AHEAD),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The order in which a batch of `n` starts stages and serves requests.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Ev {
        First(usize),
        Second(usize),
        Serve(usize),
    }

    fn schedule(n: usize) -> Vec<Ev> {
        let (f, s) = warm_up(n);
        let mut out: Vec<Ev> = f.map(Ev::First).chain(s.map(Ev::Second)).collect();
        for k in 0..n {
            let (f, s) = while_serving(k, n);
            out.extend(f.map(Ev::First));
            out.extend(s.map(Ev::Second));
            out.push(Ev::Serve(k));
        }
        out
    }

    #[test]
    fn a_lone_request_prefetches_nothing() {
        assert_eq!(schedule(1), vec![Ev::Serve(0)]);
        assert_eq!(schedule(0), vec![]);
    }

    #[test]
    fn every_request_of_a_batch_loads_both_stages_once_and_in_order_before_it_is_served() {
        for n in 2..40 {
            let s = schedule(n);
            for k in 0..n {
                let at = |e: Ev| {
                    let hits: Vec<_> = s.iter().positions(e);
                    assert_eq!(hits.len(), 1, "n {n}: {e:?} once");
                    hits[0]
                };
                assert!(at(Ev::First(k)) < at(Ev::Second(k)), "n {n} k {k}");
                assert!(at(Ev::Second(k)) < at(Ev::Serve(k)), "n {n} k {k}");
            }
        }
    }

    #[test]
    fn stages_start_at_their_distance_once_the_batch_runs() {
        let s = schedule(20);
        let pos = |e: Ev| s.iter().position(|x| *x == e).unwrap_or(usize::MAX);
        // Request 10's first stage starts while request 5 is served, its second while 8 is.
        assert!(pos(Ev::Serve(4)) < pos(Ev::First(10)) && pos(Ev::First(10)) < pos(Ev::Serve(5)));
        assert!(pos(Ev::Serve(7)) < pos(Ev::Second(10)) && pos(Ev::Second(10)) < pos(Ev::Serve(8)));
    }

    trait Positions {
        fn positions(self, e: Ev) -> Vec<usize>;
    }
    impl<'a, I: Iterator<Item = &'a Ev>> Positions for I {
        fn positions(self, e: Ev) -> Vec<usize> {
            self.enumerate()
                .filter(|(_, x)| **x == e)
                .map(|(i, _)| i)
                .collect()
        }
    }
}
