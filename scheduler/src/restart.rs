//! Restart strategies: whether, and after how long, a failed job restarts.
//!
//! As Flink's: `none` fails the job at the first failure; `fixed-delay`
//! restarts up to a number of times with a constant delay; and
//! `exponential-delay` (the default with checkpoints) restarts without end,
//! multiplying the delay after every failure up to a maximum, and starting
//! over from the initial delay once the job has run for `reset_after`
//! without failing. Unlike Flink there is no jitter, so that a failure's
//! timing can be reproduced.

use std::time::{Duration, Instant};

use strom_core::config::RestartStrategy;

pub struct RestartBackoff {
    strategy: RestartStrategy,
    restarts: u32,
    next_delay: Option<Duration>,
    last_failure: Option<Instant>,
}

impl RestartBackoff {
    pub fn new(strategy: RestartStrategy) -> Self {
        RestartBackoff {
            strategy,
            restarts: 0,
            next_delay: None,
            last_failure: None,
        }
    }

    /// How many restarts so far.
    pub fn restarts(&self) -> u32 {
        self.restarts
    }

    /// A task failed at `now`: the delay before the restart, or `None`
    /// when the job must fail.
    pub fn on_failure(&mut self, now: Instant) -> Option<Duration> {
        let delay = match &self.strategy {
            RestartStrategy::None => None,
            RestartStrategy::FixedDelay { attempts, delay } => {
                (self.restarts < *attempts).then_some(*delay)
            }
            RestartStrategy::ExponentialDelay {
                initial,
                max,
                multiplier,
                reset_after,
                attempts,
            } => {
                let quiet_long_enough = self
                    .last_failure
                    .is_some_and(|last| now.duration_since(last) >= *reset_after);
                if quiet_long_enough {
                    self.next_delay = None;
                }
                let delay = self.next_delay.unwrap_or(*initial);
                self.next_delay = Some(delay.mul_f64(*multiplier).min(*max));
                (self.restarts < *attempts).then_some(delay)
            }
        };
        self.last_failure = Some(now);
        if delay.is_some() {
            self.restarts += 1;
        }
        delay
    }

    /// Why the job fails for good after restarts, for its error message;
    /// `None` when it never restarts.
    pub fn describe(&self) -> Option<String> {
        match &self.strategy {
            RestartStrategy::None => None,
            RestartStrategy::FixedDelay { attempts, .. }
            | RestartStrategy::ExponentialDelay { attempts, .. } => Some(format!(
                "all {attempts} restarts the restart strategy allows were used"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_delay_gives_up_after_its_attempts() {
        let now = Instant::now();
        let mut backoff = RestartBackoff::new(RestartStrategy::FixedDelay {
            attempts: 2,
            delay: Duration::from_millis(10),
        });
        assert_eq!(backoff.on_failure(now), Some(Duration::from_millis(10)));
        assert_eq!(backoff.on_failure(now), Some(Duration::from_millis(10)));
        assert_eq!(backoff.on_failure(now), None);
        assert_eq!(backoff.restarts(), 2);
        assert_eq!(
            RestartBackoff::new(RestartStrategy::None).on_failure(now),
            None
        );
    }

    #[test]
    fn exponential_delay_grows_to_its_maximum_and_resets_after_a_quiet_run() {
        let now = Instant::now();
        let mut backoff = RestartBackoff::new(RestartStrategy::ExponentialDelay {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(200),
            multiplier: 1.5,
            reset_after: Duration::from_secs(60),
            attempts: u32::MAX,
        });
        let delays: Vec<_> = (0..4).map(|_| backoff.on_failure(now).unwrap()).collect();
        assert_eq!(
            delays,
            [100, 150, 200, 200].map(Duration::from_millis).to_vec()
        );
        let quiet = now + Duration::from_secs(61);
        assert_eq!(backoff.on_failure(quiet), Some(Duration::from_millis(100)));
    }
}
