//! Event time: timestamps, watermark strategies and the watermark valve.

use std::sync::Arc;
use std::time::Duration;

/// Event time in milliseconds since the epoch.
pub type Timestamp = i64;
/// The timestamp of a record that has none.
pub const NO_TIMESTAMP: Timestamp = i64::MIN;
/// The watermark before any progress.
pub const MIN_WATERMARK: Timestamp = i64::MIN;
/// The watermark at the end of a finite input: every window closes.
pub const MAX_WATERMARK: Timestamp = i64::MAX;

/// How a source assigns timestamps and watermarks, as Flink's
/// `WatermarkStrategy`.
pub struct WatermarkStrategy<T> {
    pub(crate) timestamp_assigner: Option<Arc<dyn Fn(&T) -> Timestamp + Send + Sync>>,
    pub(crate) out_of_orderness_ms: i64,
    pub(crate) idleness: Option<Duration>,
    pub(crate) generates_watermarks: bool,
    pub(crate) watermark_interval: Duration,
    pub(crate) alignment: Option<WatermarkAlignment>,
}

/// A source's watermark alignment: see
/// [`WatermarkStrategy::with_watermark_alignment`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatermarkAlignment {
    pub group: String,
    pub max_drift_ms: i64,
}

/// How often a busy source emits a watermark (Flink's auto-watermark
/// interval, shorter because our latency budget is). A watermark lags
/// behind its records by the event time of the records read in this
/// interval, and every window it has not yet fired holds its state: at
/// 10 ms, a Nexmark source at 350M events/s (350 s of its event time a
/// second) left 35 of q8's 10 s windows open,
/// 10 MB of join state that no core's cache held; at 1 ms, about 8 (a
/// window's state left the cache before it fired). At 200 µs a window
/// fires soon after its last record, and the shuffling queries at
/// parallelism 2 lose nothing to the partial buffers each watermark ships;
/// 100 µs and 50 µs were no faster for q8 (BENCHMARKS.md, items 50 and 55).
pub const DEFAULT_WATERMARK_INTERVAL: Duration = Duration::from_micros(200);

impl<T> Clone for WatermarkStrategy<T> {
    fn clone(&self) -> Self {
        WatermarkStrategy {
            timestamp_assigner: self.timestamp_assigner.clone(),
            out_of_orderness_ms: self.out_of_orderness_ms,
            idleness: self.idleness,
            generates_watermarks: self.generates_watermarks,
            watermark_interval: self.watermark_interval,
            alignment: self.alignment.clone(),
        }
    }
}

impl<T> WatermarkStrategy<T> {
    /// Timestamps never decrease within a source subtask; the watermark is
    /// the largest timestamp seen minus one.
    pub fn for_monotonous_timestamps() -> Self {
        Self::for_bounded_out_of_orderness(Duration::ZERO)
    }

    /// Records may arrive up to `bound` late; the watermark is the largest
    /// timestamp seen minus `bound` minus one.
    pub fn for_bounded_out_of_orderness(bound: Duration) -> Self {
        WatermarkStrategy {
            timestamp_assigner: None,
            out_of_orderness_ms: bound.as_millis() as i64,
            idleness: None,
            generates_watermarks: true,
            watermark_interval: DEFAULT_WATERMARK_INTERVAL,
            alignment: None,
        }
    }

    /// No watermarks at all (processing-time only pipelines).
    pub fn no_watermarks() -> Self {
        WatermarkStrategy {
            timestamp_assigner: None,
            out_of_orderness_ms: 0,
            idleness: None,
            generates_watermarks: false,
            watermark_interval: DEFAULT_WATERMARK_INTERVAL,
            alignment: None,
        }
    }

    /// Takes each record's event time from the record.
    pub fn with_timestamp_assigner(
        mut self,
        assigner: impl Fn(&T) -> Timestamp + Send + Sync + 'static,
    ) -> Self {
        self.timestamp_assigner = Some(Arc::new(assigner));
        self
    }

    /// How often a source subtask that keeps producing emits a watermark
    /// (default 200 µs, [`DEFAULT_WATERMARK_INTERVAL`]). A subtask whose
    /// reader pauses or ends emits one at once.
    pub fn with_watermark_interval(mut self, interval: Duration) -> Self {
        self.watermark_interval = interval;
        self
    }

    /// Watermark alignment (Flink's `withWatermarkAlignment`): the sources
    /// of `group` do not get ahead of the slowest of them by more than
    /// `max_allowed_drift` of event time, so that an operator they meet at
    /// (a window, a join) does not hold what the fastest read while it
    /// waits for the slowest: at 2 × 10 M events/s a few milliseconds of
    /// difference in speed is minutes of event time in state.
    ///
    /// It is enforced where their streams meet, by backpressure: a task
    /// all of whose input streams come from sources of one group does not
    /// read an input channel whose watermark is ahead of its slowest active
    /// one by more than the drift (the smallest any of those sources
    /// declared), so the producer behind it waits once its buffers are
    /// full. The drift between the sources is then at most the drift plus
    /// what those buffers hold. Idle and finished channels hold nothing
    /// back; a source subtask that produces nothing and is not marked idle
    /// ([`WatermarkStrategy::with_idleness`]) holds the others back, as in
    /// Flink (here to a buffer every 20 ms rather than to a stop). While a
    /// task aligns a checkpoint barrier it reads the held channels too, and
    /// a task that has waited 20 ms for its other channels reads a held
    /// one, so that alignment never stops a job.
    ///
    /// # Panics
    /// If `group` is empty or the drift is zero (or over `i64::MAX` ms).
    pub fn with_watermark_alignment(mut self, group: &str, max_allowed_drift: Duration) -> Self {
        assert!(!group.is_empty(), "watermark alignment needs a group name");
        let max_drift_ms = i64::try_from(max_allowed_drift.as_millis())
            .ok()
            .filter(|drift| *drift > 0)
            .unwrap_or_else(|| {
                panic!(
                    "watermark alignment of group '{group}': the maximum allowed drift must be at least 1 ms and at most i64::MAX ms, not {max_allowed_drift:?}"
                )
            });
        self.alignment = Some(WatermarkAlignment {
            group: group.to_string(),
            max_drift_ms,
        });
        self
    }

    /// Marks a source subtask idle after `timeout` without records, so that
    /// downstream watermarks advance without it.
    pub fn with_idleness(mut self, timeout: Duration) -> Self {
        self.idleness = Some(timeout);
        self
    }
}

/// Tracks the watermarks and idleness of a task's input channels and yields
/// the task's watermark: the minimum over the active channels.
///
/// Protocol:
/// 1. every channel starts active at `MIN_WATERMARK`;
/// 2. a channel's watermark only moves forward (a smaller one is ignored);
/// 3. an idle channel does not hold the minimum back; when every channel is
///    idle the task is idle, and if the channel that went idle last held
///    the minimum back, the largest watermark of any channel is flushed
///    (none will advance any more; as Flink's `StatusWatermarkValve`);
/// 4. the output watermark only moves forward, and is reported once per
///    change.
#[derive(Clone, Debug)]
pub struct WatermarkValve {
    channels: Vec<ChannelWatermark>,
    output: Timestamp,
    output_idle: bool,
}

#[derive(Clone, Copy, Debug)]
struct ChannelWatermark {
    watermark: Timestamp,
    idle: bool,
}

/// What a channel event changed for the task.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ValveOutput {
    pub watermark: Option<Timestamp>,
    pub idle: Option<bool>,
}

/// One change of a valve's output, for its consumer to apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValveChange {
    Watermark(Timestamp),
    Idle(bool),
}

impl ValveOutput {
    /// What changed, in the order to apply it: turning idle, the watermark
    /// the valve flushes goes first, as in Flink, so that what it fires,
    /// and the watermark itself, reach the consumers while the task still
    /// counts as active for them; otherwise a change of idleness goes
    /// first.
    pub fn in_order(self) -> impl Iterator<Item = ValveChange> {
        let watermark = self.watermark.map(ValveChange::Watermark);
        let idle = self.idle.map(ValveChange::Idle);
        let (first, second) = if self.idle == Some(true) {
            (watermark, idle)
        } else {
            (idle, watermark)
        };
        first.into_iter().chain(second)
    }
}

impl WatermarkValve {
    pub fn new(channel_count: usize) -> Self {
        WatermarkValve {
            channels: vec![
                ChannelWatermark {
                    watermark: MIN_WATERMARK,
                    idle: false
                };
                channel_count
            ],
            output: MIN_WATERMARK,
            output_idle: false,
        }
    }

    pub fn watermark(&self) -> Timestamp {
        self.output
    }

    pub fn on_watermark(&mut self, channel: usize, watermark: Timestamp) -> ValveOutput {
        let state = &mut self.channels[channel];
        let mut output = ValveOutput::default();
        if state.idle {
            state.idle = false;
            if self.output_idle {
                self.output_idle = false;
                output.idle = Some(false);
            }
        }
        if watermark > state.watermark {
            state.watermark = watermark;
        }
        output.watermark = self.advance();
        output
    }

    pub fn on_idle(&mut self, channel: usize, idle: bool) -> ValveOutput {
        let turned_idle = idle && !self.channels[channel].idle;
        self.channels[channel].idle = idle;
        let all_idle = self.channels.iter().all(|channel| channel.idle);
        let mut output = ValveOutput::default();
        if all_idle != self.output_idle {
            self.output_idle = all_idle;
            output.idle = Some(all_idle);
        }
        if !all_idle {
            output.watermark = self.advance();
        } else if turned_idle && self.channels[channel].watermark == self.output {
            // The last active channel held the minimum back: without it
            // the others' watermarks would stay unused for as long as the
            // task is idle.
            output.watermark = self.flush_largest();
        }
        output
    }

    /// Which channels are ahead of the slowest by more than `max_drift`
    /// (watermark alignment, see [`WatermarkStrategy::with_watermark_alignment`]):
    /// `held[channel]` is set for each, among the channels that are neither
    /// idle nor `ended`. The slowest such channel is never held; an idle or
    /// ended one does not hold the others back, nor does one at the final
    /// watermark (its end-of-input comes next).
    pub fn ahead_of_slowest(&self, max_drift: i64, ended: &[bool], held: &mut [bool]) {
        let active = |channel: usize| {
            let state = &self.channels[channel];
            !ended[channel] && !state.idle && state.watermark != MAX_WATERMARK
        };
        let slowest = (0..self.channels.len())
            .filter(|&channel| active(channel))
            .map(|channel| self.channels[channel].watermark)
            .min();
        for (channel, held) in held.iter_mut().enumerate() {
            *held = match slowest {
                Some(slowest) => {
                    active(channel)
                        && self.channels[channel].watermark > slowest.saturating_add(max_drift)
                }
                None => false,
            };
        }
    }

    fn flush_largest(&mut self) -> Option<Timestamp> {
        let largest = self
            .channels
            .iter()
            .map(|channel| channel.watermark)
            .max()?;
        if largest > self.output {
            self.output = largest;
            Some(largest)
        } else {
            None
        }
    }

    fn advance(&mut self) -> Option<Timestamp> {
        let minimum = self
            .channels
            .iter()
            .filter(|channel| !channel.idle)
            .map(|channel| channel.watermark)
            .min()?;
        if minimum > self.output {
            self.output = minimum;
            Some(minimum)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watermark_is_the_minimum_over_active_channels() {
        let mut valve = WatermarkValve::new(2);
        assert_eq!(valve.on_watermark(0, 10).watermark, None);
        assert_eq!(valve.on_watermark(1, 5).watermark, Some(5));
        assert_eq!(valve.on_watermark(1, 20).watermark, Some(10));
        assert_eq!(
            valve.on_watermark(0, 8).watermark,
            None,
            "a channel never goes back"
        );
    }

    #[test]
    fn an_idle_channel_does_not_hold_the_watermark_back() {
        let mut valve = WatermarkValve::new(2);
        valve.on_watermark(0, 100);
        let output = valve.on_idle(1, true);
        assert_eq!(output.watermark, Some(100));
        assert_eq!(output.idle, None);
        assert_eq!(valve.on_idle(0, true).idle, Some(true));
        let output = valve.on_watermark(1, 50);
        assert_eq!(output.idle, Some(false));
        assert_eq!(output.watermark, None, "the output never goes back");
    }

    #[test]
    fn alignment_holds_the_channels_ahead_of_the_slowest_active_one() {
        let mut valve = WatermarkValve::new(4);
        let mut held = [false; 4];
        // No watermark yet on channel 3: everything ahead of MIN + drift
        // waits for it.
        valve.on_watermark(0, 100);
        valve.on_watermark(1, 150);
        valve.on_watermark(2, 160);
        valve.ahead_of_slowest(50, &[false; 4], &mut held);
        assert_eq!(held, [true, true, true, false]);
        valve.on_watermark(3, 100);
        valve.ahead_of_slowest(50, &[false; 4], &mut held);
        assert_eq!(held, [false, false, true, false], "150 is within 100 + 50");
        // An ended or idle channel holds nothing back, and is not held.
        valve.ahead_of_slowest(50, &[true, false, false, true], &mut held);
        assert_eq!(held, [false; 4]);
        valve.on_idle(0, true);
        valve.on_idle(3, true);
        valve.on_watermark(1, 300);
        valve.ahead_of_slowest(50, &[false; 4], &mut held);
        assert_eq!(
            held,
            [false, true, false, false],
            "300 is ahead of 160 + 50"
        );
        // Every channel idle or ended: nothing is held.
        valve.ahead_of_slowest(50, &[false, true, true, false], &mut held);
        assert_eq!(held, [false; 4]);
        // A channel at the final watermark is about to end: not held.
        valve.on_watermark(1, MAX_WATERMARK);
        valve.ahead_of_slowest(50, &[false; 4], &mut held);
        assert_eq!(held, [false; 4]);
    }

    #[test]
    fn when_every_channel_turns_idle_the_largest_watermark_is_flushed() {
        // The channel with data turns idle first: the other still holds
        // the minimum at MIN_WATERMARK.
        let mut valve = WatermarkValve::new(2);
        assert_eq!(valve.on_watermark(0, 100).watermark, None);
        assert_eq!(valve.on_idle(0, true), ValveOutput::default());
        let output = valve.on_idle(1, true);
        assert_eq!(output.idle, Some(true));
        assert_eq!(output.watermark, Some(100));
        // Turning idle again changes nothing; a channel that comes back
        // holds the minimum again from where it was.
        assert_eq!(valve.on_idle(1, true), ValveOutput::default());
        let output = valve.on_idle(1, false);
        assert_eq!(
            output,
            ValveOutput {
                watermark: None,
                idle: Some(false)
            }
        );
        assert_eq!(valve.on_watermark(1, 150).watermark, Some(150));

        // The other order: the channel without data turns idle first.
        let mut valve = WatermarkValve::new(2);
        valve.on_watermark(0, 100);
        assert_eq!(valve.on_idle(1, true).watermark, Some(100));
        assert_eq!(
            valve.on_idle(0, true),
            ValveOutput {
                watermark: None,
                idle: Some(true)
            }
        );
    }
}
