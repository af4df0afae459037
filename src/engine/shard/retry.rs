//! Retry pacing for failed device I/O: a burst of failures is retried after 10 ms, then
//! 20, 40 ... up to 1 s between attempts, and ends at the first success. The engine has no
//! clock: the host passes the time in (`Shard::set_now`), so the simulator can run bursts
//! and outages in simulated time.

/// First delay after a failure.
pub const RETRY_MIN_MS: u64 = 10;
/// Longest delay between two attempts.
pub const RETRY_MAX_MS: u64 = 1000;

/// One failure burst of one kind of I/O (writeback, or the cache device's metadata).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// When the burst started (None: healthy).
    since: Option<u64>,
    /// The next attempt may start then.
    retry_at: u64,
    delay: u64,
    /// Failures in this burst.
    failures: u64,
}

impl Backoff {
    /// Records a failure at `now`; true if it starts a burst (log it then, once).
    pub fn fail(&mut self, now: u64) -> bool {
        let first = self.since.is_none();
        if first {
            self.since = Some(now);
            self.delay = RETRY_MIN_MS;
        } else if now >= self.retry_at {
            // A failure of an attempt made after the last delay: wait longer.
            self.delay = (self.delay * 2).min(RETRY_MAX_MS);
        }
        self.retry_at = now + self.delay;
        self.failures += 1;
        first
    }

    /// Records a success: the burst (if any) ends. Returns its failure count and start.
    pub fn succeed(&mut self) -> Option<(u64, u64)> {
        let since = self.since.take()?;
        let n = std::mem::take(&mut self.failures);
        Some((n, since))
    }

    /// An attempt may start now.
    pub fn ready(&self, now: u64) -> bool {
        self.since.is_none() || now >= self.retry_at
    }

    /// When the next attempt may start, while waiting for it.
    pub fn due(&self, now: u64) -> Option<u64> {
        (self.since.is_some() && now < self.retry_at).then_some(self.retry_at)
    }

    /// Start of the current burst, if failing.
    pub fn since(&self) -> Option<u64> {
        self.since
    }

    /// Retry now (an operator asked), keeping the burst open until a success.
    pub fn expedite(&mut self) {
        self.retry_at = 0;
        self.delay = RETRY_MIN_MS;
    }

    /// The burst has lasted `limit` ms or more.
    pub fn outlasted(&self, now: u64, limit: u64) -> bool {
        self.since.is_some_and(|s| now.saturating_sub(s) >= limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_a_success_ends_the_burst() {
        let mut b = Backoff::default();
        assert!(b.ready(0));
        assert!(b.fail(100));
        assert!(!b.ready(105));
        assert_eq!(b.due(105), Some(110));
        let mut now = 110;
        let mut delays = vec![];
        for _ in 0..10 {
            assert!(b.ready(now));
            assert!(!b.fail(now));
            let due = b.due(now).unwrap_or(now);
            delays.push(due - now);
            now = due;
        }
        assert_eq!(&delays[..4], &[20, 40, 80, 160]);
        assert_eq!(*delays.last().unwrap_or(&0), RETRY_MAX_MS);
        assert!(b.outlasted(now, now - 100));
        assert_eq!(b.succeed(), Some((11, 100)));
        assert!(b.ready(now));
        assert_eq!(b.since(), None);
    }

    #[test]
    fn failures_of_attempts_made_before_the_delay_do_not_grow_it() {
        let mut b = Backoff::default();
        b.fail(0);
        // Several I/Os in flight fail together: one delay.
        b.fail(1);
        b.fail(2);
        assert_eq!(b.due(2), Some(12));
    }
}
