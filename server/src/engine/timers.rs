//! When the engine wakes up next: the tidy deadline, the debounced re-check of families a change
//! notification named, the retry of a failed apply (with backoff), and the periodic check (safety
//! check with notifications, polling without).
//! Time comes from a [`Clock`], so the deadlines are tested by advancing a fake clock, not by
//! sleeping.

use kilo_egress_api::egress::Family;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// How long after the last switch the rules it shadowed are removed. Deleting costs the kernel
/// far more than adding (~15 ms on nft), so back-to-back switches never wait for it; a burst of
/// switches costs one tidy at its end. Traffic never reaches shadowed rules.
pub const TIDY_DELAY: Duration = Duration::from_millis(100);

/// The longest a tidy waits for switches to pause.
pub const TIDY_MAX_DELAY: Duration = Duration::from_secs(1);

/// A tidy runs at once when it would delete this many shadowed rules.
pub const MAX_SHADOWED_RULES: usize = 16;

/// The first retry of a failed apply or repair comes this soon; each failure doubles the wait.
pub const RETRY_INITIAL: Duration = Duration::from_millis(100);

/// The longest wait between two retries.
pub const RETRY_MAX: Duration = Duration::from_secs(5);

/// The source of the current time.
pub trait Clock: Send {
    /// Now.
    fn now(&self) -> Instant;
}

/// The monotonic clock of the operating system.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// How drift is found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriftDetection {
    /// nftables change notifications, plus a slow safety check.
    Notifications,
    /// Polling, for the reason given (legacy backend, notifications turned off or lost).
    Polling(String),
}

/// What is due, most urgent first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Due {
    /// Remove the rules the last switches shadowed.
    Tidy,
    /// Re-read these families: a change notification named them.
    Recheck(BTreeSet<Family>),
    /// Apply the accepted state again: the last attempt failed.
    Retry,
    /// Re-read every managed family (safety check or poll); call [`Timers::checked`] after it.
    Check,
}

/// The engine's deadlines.
pub struct Timers {
    clock: Box<dyn Clock>,
    resync_interval: Duration,
    safety_check_interval: Duration,
    detection: DriftDetection,
    next_check: Instant,
    /// Families a change notification named, and when to re-check them (debounced).
    recheck: Option<(Instant, BTreeSet<Family>)>,
    /// When to tidy: [`TIDY_DELAY`] after the last switch that queued one, bounded.
    tidy_at: Option<Instant>,
    /// When the oldest pending tidy was queued.
    tidy_since: Option<Instant>,
    /// When to retry a failed apply, and the wait after the next failure.
    retry_at: Option<Instant>,
    retry_backoff: Duration,
}

impl Timers {
    /// Deadlines on `clock`; the first periodic check is one interval away.
    pub fn new(
        clock: Box<dyn Clock>,
        resync_interval: Duration,
        safety_check_interval: Duration,
        detection: DriftDetection,
    ) -> Timers {
        let mut timers = Timers {
            next_check: clock.now(),
            clock,
            resync_interval,
            safety_check_interval,
            detection,
            recheck: None,
            tidy_at: None,
            tidy_since: None,
            retry_at: None,
            retry_backoff: RETRY_INITIAL,
        };
        timers.checked();
        timers
    }

    /// How drift is found, in words (GetRules).
    pub fn describe_detection(&self) -> String {
        match &self.detection {
            DriftDetection::Notifications => format!(
                "nftables change notifications, safety check every {}",
                humantime::format_duration(self.safety_check_interval)
            ),
            DriftDetection::Polling(why) => format!("polling ({why})"),
        }
    }

    /// Whether drift is found by polling (no change notifications).
    pub fn is_polling(&self) -> bool {
        matches!(self.detection, DriftDetection::Polling(_))
    }

    /// Notifications stopped: poll from the next periodic check on.
    pub fn notifications_lost(&mut self, why: &str) {
        self.detection = DriftDetection::Polling(format!("notifications stopped: {why}"));
    }

    /// How often every family is re-read: rarely when notifications report changes, else at
    /// the polling interval.
    pub fn check_interval(&self) -> Duration {
        match self.detection {
            DriftDetection::Notifications => self.safety_check_interval,
            DriftDetection::Polling(_) => self.resync_interval,
        }
    }

    /// Now, on the timers' clock.
    pub fn now(&self) -> Instant {
        self.clock.now()
    }

    /// The most urgent thing that is due, if any. A re-check is handed out (and forgotten)
    /// here; a tidy stays due until [`Timers::tidied`], a check until [`Timers::checked`].
    pub fn due(&mut self) -> Option<Due> {
        let now = self.now();
        if self.tidy_at.is_some_and(|at| at <= now) {
            return Some(Due::Tidy);
        }
        if self.recheck.as_ref().is_some_and(|(at, _)| *at <= now) {
            let (_, families) = self.recheck.take().expect("checked above");
            return Some(Due::Recheck(families));
        }
        if self.retry_at.is_some_and(|at| at <= now) {
            self.retry_at = None;
            return Some(Due::Retry);
        }
        (self.next_check <= now).then_some(Due::Check)
    }

    /// How long until something is due.
    pub fn until_next(&self) -> Duration {
        let next = [
            Some(self.next_check),
            self.recheck.as_ref().map(|(at, _)| *at),
            self.tidy_at,
            self.retry_at,
        ]
        .into_iter()
        .flatten()
        .min()
        .expect("next_check is always set");
        next.saturating_duration_since(self.now())
    }

    /// A periodic check has just run: the next one is an interval away.
    pub fn checked(&mut self) {
        self.next_check = self.now() + self.check_interval();
    }

    /// Re-check `families` after `delay` (or earlier, if one is already due sooner).
    pub fn recheck(&mut self, families: impl IntoIterator<Item = Family>, delay: Duration) {
        let at = self.now() + delay;
        let (when, pending) = self.recheck.get_or_insert_with(|| (at, BTreeSet::new()));
        *when = (*when).min(at);
        pending.extend(families);
    }

    /// A switch queued a tidy; `shadowed` rules now wait for one. It runs [`TIDY_DELAY`] after
    /// this switch, but never later than [`TIDY_MAX_DELAY`] after the first switch it waits
    /// for, and at once when [`MAX_SHADOWED_RULES`] wait: a steady stream of switches must not
    /// grow the chain without bound.
    pub fn tidy_queued(&mut self, shadowed: usize) {
        let now = self.now();
        let since = *self.tidy_since.get_or_insert(now);
        self.tidy_at = Some(if shadowed >= MAX_SHADOWED_RULES {
            now
        } else {
            (now + TIDY_DELAY).min(since + TIDY_MAX_DELAY)
        });
    }

    /// An apply of the accepted state failed: retry after the current backoff, which doubles
    /// (up to [`RETRY_MAX`]) for the next failure.
    pub fn apply_failed(&mut self) {
        self.retry_at = Some(self.now() + self.retry_backoff);
        self.retry_backoff = (self.retry_backoff * 2).min(RETRY_MAX);
    }

    /// An apply of the accepted state succeeded: no retry, and the next failure retries soon.
    pub fn apply_succeeded(&mut self) {
        self.retry_at = None;
        self.retry_backoff = RETRY_INITIAL;
    }

    /// The pending tidies ran (at their deadline, or early for a reader).
    pub fn tidied(&mut self) {
        self.tidy_at = None;
        self.tidy_since = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A clock that moves only when told to.
    #[derive(Clone)]
    struct FakeClock(Arc<Mutex<Instant>>);

    impl FakeClock {
        fn advance(&self, by: Duration) {
            *self.0.lock().unwrap() += by;
        }
    }

    impl Clock for FakeClock {
        fn now(&self) -> Instant {
            *self.0.lock().unwrap()
        }
    }

    fn timers(detection: DriftDetection) -> (FakeClock, Timers) {
        let clock = FakeClock(Arc::new(Mutex::new(Instant::now())));
        let timers = Timers::new(
            Box::new(clock.clone()),
            Duration::from_secs(1),
            Duration::from_secs(30),
            detection,
        );
        (clock, timers)
    }

    #[test]
    fn the_check_interval_follows_how_drift_is_found() {
        let (clock, mut timers) = timers(DriftDetection::Notifications);
        assert_eq!(timers.until_next(), Duration::from_secs(30));
        clock.advance(Duration::from_secs(29));
        assert_eq!(timers.due(), None);
        clock.advance(Duration::from_secs(1));
        assert_eq!(timers.due(), Some(Due::Check));
        timers.notifications_lost("ENOBUFS");
        timers.checked();
        assert_eq!(timers.until_next(), Duration::from_secs(1));
        assert!(timers.is_polling());
        assert!(timers.describe_detection().starts_with("polling ("));
    }

    #[test]
    fn a_tidy_waits_for_switches_to_pause_but_not_for_ever() {
        let (clock, mut timers) = timers(DriftDetection::Notifications);
        timers.tidy_queued(1);
        assert_eq!(timers.until_next(), TIDY_DELAY);
        // A switch every 90 ms keeps pushing the tidy back, until a second has passed.
        for _ in 0..10 {
            clock.advance(Duration::from_millis(90));
            assert_eq!(timers.due(), None);
            timers.tidy_queued(1);
        }
        assert_eq!(timers.until_next(), Duration::from_millis(100));
        clock.advance(Duration::from_millis(100));
        assert_eq!(timers.due(), Some(Due::Tidy));
        timers.tidied();
        assert_ne!(timers.due(), Some(Due::Tidy));
    }

    #[test]
    fn a_tidy_runs_at_once_when_many_rules_are_shadowed() {
        let (_clock, mut timers) = timers(DriftDetection::Notifications);
        timers.tidy_queued(MAX_SHADOWED_RULES);
        assert_eq!(timers.due(), Some(Due::Tidy));
    }

    #[test]
    fn failed_applies_are_retried_with_a_doubling_bounded_backoff() {
        let (clock, mut timers) = timers(DriftDetection::Notifications);
        let mut waits = Vec::new();
        for _ in 0..8 {
            timers.apply_failed();
            let wait = timers.until_next();
            waits.push(wait.as_millis());
            clock.advance(wait);
            assert_eq!(timers.due(), Some(Due::Retry));
        }
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        timers.apply_succeeded();
        timers.apply_failed();
        assert_eq!(timers.until_next(), RETRY_INITIAL);
        timers.apply_succeeded();
        assert!(timers.until_next() > RETRY_MAX, "no retry pending");
    }

    #[test]
    fn rechecks_are_debounced_and_merged() {
        let (clock, mut timers) = timers(DriftDetection::Notifications);
        timers.recheck([Family::Ipv4], Duration::from_millis(5));
        clock.advance(Duration::from_millis(3));
        timers.recheck([Family::Ipv6], Duration::from_millis(5));
        assert_eq!(timers.until_next(), Duration::from_millis(2));
        clock.advance(Duration::from_millis(2));
        assert_eq!(
            timers.due(),
            Some(Due::Recheck(Family::ALL.into_iter().collect()))
        );
        assert_eq!(timers.due(), None, "a re-check is handed out once");
    }
}
