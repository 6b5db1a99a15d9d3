//! Stops all action when reclaims come faster than the configured rate: a flood of orphans
//! more likely means a bug or a bad configuration than a real event. Once tripped it stays
//! open until reset, and says so.
use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

const WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub struct Breaker {
    max_per_minute: u32,
    recent: VecDeque<Instant>,
    tripped_at: Option<Instant>,
}

impl Breaker {
    pub fn new(max_per_minute: u32) -> Self {
        Self {
            max_per_minute,
            recent: VecDeque::new(),
            tripped_at: None,
        }
    }

    pub fn is_tripped(&self) -> bool {
        self.tripped_at.is_some()
    }

    /// Asks to act now: true if allowed (and counted), false if tripped or tripping.
    pub fn allow(&mut self, now: Instant) -> bool {
        if self.tripped_at.is_some() {
            return false;
        }
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= WINDOW)
        {
            self.recent.pop_front();
        }
        if self.recent.len() as u32 >= self.max_per_minute {
            self.tripped_at = Some(now);
            tracing::error!(
                max_per_minute = self.max_per_minute,
                "reclaim breaker tripped: too many reclaims in a minute; all action stopped \
                 until reclaimd is restarted (check the ledger for what happened)"
            );
            return false;
        }
        self.recent.push_back(now);
        true
    }

    /// Gives back the last `allow`: nothing was done with it (the ledger could not record
    /// the decision), so a retry does not count twice.
    pub fn refund(&mut self) {
        self.recent.pop_back();
    }

    pub fn reset(&mut self) {
        self.tripped_at = None;
        self.recent.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trips_past_the_rate_and_stays_tripped() {
        let mut b = Breaker::new(3);
        let t0 = Instant::now();
        assert!(b.allow(t0));
        assert!(b.allow(t0));
        assert!(b.allow(t0));
        assert!(!b.allow(t0), "fourth in the same minute");
        assert!(b.is_tripped());
        assert!(!b.allow(t0 + Duration::from_secs(120)), "stays open");
        b.reset();
        assert!(b.allow(t0 + Duration::from_secs(120)));
    }

    #[test]
    fn old_reclaims_leave_the_window() {
        let mut b = Breaker::new(2);
        let t0 = Instant::now();
        assert!(b.allow(t0));
        assert!(b.allow(t0 + Duration::from_secs(30)));
        assert!(b.allow(t0 + Duration::from_secs(61)));
        assert!(!b.is_tripped());
    }
}
