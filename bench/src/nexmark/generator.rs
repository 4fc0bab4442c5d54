//! The Nexmark event generator, bit for bit as `NEXMARK.md` specifies it.
//!
//! Event `i` is a pure function of `(seed, i)`: three random words
//! `r(i, k) = splitmix64(splitmix64(seed) + 4*i + k)` and the position of `i`
//! in its block of 50 (one person, three auctions, 46 bids). There is no
//! generator state to carry from one event to the next, so parallel source
//! subtasks make disjoint index sets ([`subtask_indices`]) without talking to
//! each other, and a restored source resumes from an index alone.
//!
//! Event time is `BASE_TIME_MS + i / EVENTS_PER_MILLISECOND`, non-decreasing
//! in `i`. Striding the indices across subtasks keeps every subtask's event
//! time within a millisecond of the others', so watermarks advance together.

use std::iter::StepBy;
use std::ops::Range;

use super::model::{Auction, Bid, Event, Person};

/// Event time of event 0, in milliseconds.
pub const BASE_TIME_MS: u64 = 1_700_000_000_000;

/// Events per millisecond of event time.
pub const EVENTS_PER_MILLISECOND: u64 = 10;

/// Events per block: slot 0 is a person, slots 1 to 3 auctions, the rest bids.
pub const BLOCK_SIZE: u64 = 50;

/// Auctions per block.
pub const AUCTIONS_PER_BLOCK: u64 = 3;

/// Ids of persons and auctions start here.
pub const FIRST_ID: u64 = 1000;

/// The spec's seed when none is given.
pub const DEFAULT_SEED: u64 = 42;

/// SplitMix64's output function, with wrapping arithmetic.
#[inline]
pub const fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Event time of event `index`.
#[inline]
pub const fn timestamp(index: u64) -> u64 {
    BASE_TIME_MS + index / EVENTS_PER_MILLISECOND
}

/// The kind of an event, from its index's place in its block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Person,
    Auction,
    Bid,
}

/// Which kinds of event a reader of the stream takes: as a consumer
/// subscribes to some of the person, auction and bid topics. A kind left
/// out is never generated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventKinds {
    pub persons: bool,
    pub auctions: bool,
    pub bids: bool,
}

impl EventKinds {
    pub const ALL: EventKinds = EventKinds {
        persons: true,
        auctions: true,
        bids: true,
    };
    pub const BIDS: EventKinds = EventKinds {
        persons: false,
        auctions: false,
        bids: true,
    };
    pub const PERSONS_AND_AUCTIONS: EventKinds = EventKinds {
        persons: true,
        auctions: true,
        bids: false,
    };
    pub const PERSONS: EventKinds = EventKinds {
        persons: true,
        auctions: false,
        bids: false,
    };
    pub const AUCTIONS: EventKinds = EventKinds {
        persons: false,
        auctions: true,
        bids: false,
    };

    /// Whether event `index` is of a kind taken.
    #[inline]
    pub fn includes(&self, index: u64) -> bool {
        match index % BLOCK_SIZE {
            0 => self.persons,
            1..=3 => self.auctions,
            _ => self.bids,
        }
    }

    /// Events of the kinds taken in each block of [`BLOCK_SIZE`].
    pub fn per_block(&self) -> u64 {
        u64::from(self.persons)
            + AUCTIONS_PER_BLOCK * u64::from(self.auctions)
            + (BLOCK_SIZE - 1 - AUCTIONS_PER_BLOCK) * u64::from(self.bids)
    }

    /// The runs of consecutive indices in `range` whose events are of a
    /// kind taken, each with its kind, in order: a reader generates a run's
    /// events without asking of each index what it is.
    #[inline]
    pub fn taken_runs(&self, range: Range<u64>) -> TakenRuns {
        TakenRuns {
            kinds: *self,
            next: range.start,
            end: range.end,
        }
    }
}

/// The runs of one kind of event that a reader takes, in a range of
/// indices ([`EventKinds::taken_runs`]).
#[derive(Clone, Debug)]
pub struct TakenRuns {
    kinds: EventKinds,
    next: u64,
    end: u64,
}

impl Iterator for TakenRuns {
    type Item = (EventKind, Range<u64>);

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        while self.next < self.end {
            // The run of one kind holding `next`, up to the end.
            let index = self.next;
            let slot = index % BLOCK_SIZE;
            let (kind, kind_end, taken) = match slot {
                0 => (EventKind::Person, 1, self.kinds.persons),
                1..=3 => (
                    EventKind::Auction,
                    1 + AUCTIONS_PER_BLOCK,
                    self.kinds.auctions,
                ),
                _ => (EventKind::Bid, BLOCK_SIZE, self.kinds.bids),
            };
            self.next = (index - slot + kind_end).min(self.end);
            if taken {
                return Some((kind, index..self.next));
            }
        }
        None
    }
}

/// Which fields of a bid a reader needs besides the auction and the time
/// (Flink SQL's projection push-down): the generator never computes the
/// others, and leaves them zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BidFields {
    pub bidder: bool,
    pub price: bool,
    pub channel: bool,
    pub url: bool,
}

impl BidFields {
    pub const ALL: BidFields = BidFields {
        bidder: true,
        price: true,
        channel: true,
        url: true,
    };
    /// The auction and the time only.
    pub const NONE: BidFields = BidFields {
        bidder: false,
        price: false,
        channel: false,
        url: false,
    };

    /// The fields as bits (bidder 1, price 2, channel 4, url 8), for code
    /// compiled once per set of fields ([`BidFields::from_bits`]).
    pub const fn bits(self) -> u8 {
        self.bidder as u8
            | (self.price as u8) << 1
            | (self.channel as u8) << 2
            | (self.url as u8) << 3
    }

    pub const fn from_bits(bits: u8) -> BidFields {
        BidFields {
            bidder: bits & 1 != 0,
            price: bits & 2 != 0,
            channel: bits & 4 != 0,
            url: bits & 8 != 0,
        }
    }
}

/// How many events a run makes, and from which seed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GeneratorConfig {
    pub events: u64,
    pub seed: u64,
}

impl GeneratorConfig {
    pub fn generator(&self) -> Generator {
        Generator::new(self.seed)
    }

    /// The indices source subtask `subtask` of `parallelism` generates.
    pub fn subtask_indices(&self, subtask: u64, parallelism: u64) -> StepBy<Range<u64>> {
        subtask_indices(self.events, subtask, parallelism)
    }
}

/// The event indices of source subtask `subtask` out of `parallelism`:
/// `subtask, subtask + parallelism, ...` below `events`. Round-robin rather
/// than contiguous ranges, so that all subtasks move through event time at
/// the same pace and watermarks stay aligned.
pub fn subtask_indices(events: u64, subtask: u64, parallelism: u64) -> StepBy<Range<u64>> {
    assert!(parallelism > 0, "parallelism must be at least 1");
    assert!(
        subtask < parallelism,
        "subtask {subtask} out of range for parallelism {parallelism}"
    );
    let step = usize::try_from(parallelism).expect("parallelism fits in usize");
    (subtask.min(events)..events).step_by(step)
}

/// Makes event `i` of the stream for one seed. Cheap to copy; holds only the
/// hashed seed, precomputed because every random word needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Generator {
    seed_hash: u64,
}

impl Generator {
    pub const fn new(seed: u64) -> Generator {
        Generator {
            seed_hash: splitmix64(seed),
        }
    }

    /// The random word `r(index, k)`.
    #[inline(always)]
    fn random(&self, index: u64, k: u64) -> u64 {
        splitmix64(
            self.seed_hash
                .wrapping_add(index.wrapping_mul(4))
                .wrapping_add(k),
        )
    }

    /// Event `index`. Each kind computes only the random words it uses.
    #[inline]
    pub fn event(&self, index: u64) -> Event {
        self.event_with(index, BidFields::ALL)
    }

    /// Event `index`, which must be a person (`index % 50 == 0`).
    #[inline]
    pub fn person(&self, index: u64) -> Person {
        debug_assert_eq!(index % BLOCK_SIZE, 0, "event {index} is not a person");
        let block = index / BLOCK_SIZE;
        let r0 = self.random(index, 0);
        let r1 = self.random(index, 1);
        Person {
            id: FIRST_ID + block,
            first_name: (r0 % 8) as u8,
            last_name: ((r0 >> 8) % 8) as u8,
            city: (r1 % 8) as u8,
            state: ((r1 >> 8) % 8) as u8,
            date_time: timestamp(index),
        }
    }

    /// Event `index`, which must be an auction (`index % 50` in 1 to 3).
    #[inline]
    pub fn auction(&self, index: u64) -> Auction {
        self.auction_with(index, true)
    }

    /// Auction `index` with its initial bid, reserve and expiry computed
    /// only if `details` (zero otherwise: no query reads them, and they
    /// take two of its three random words).
    #[inline(always)]
    pub fn auction_with(&self, index: u64, details: bool) -> Auction {
        let slot = index % BLOCK_SIZE;
        debug_assert!((1..=3).contains(&slot), "event {index} is not an auction");
        let block = index / BLOCK_SIZE;
        let r0 = self.random(index, 0);
        let date_time = timestamp(index);
        let mut auction = Auction {
            id: FIRST_ID + AUCTIONS_PER_BLOCK * block + (slot - 1),
            seller: FIRST_ID + r0 % (block + 1),
            category: 10 + (r0 >> 32) % 5,
            initial_bid: 0,
            reserve: 0,
            expires: 0,
            date_time,
        };
        if details {
            let r1 = self.random(index, 1);
            let r2 = self.random(index, 2);
            auction.initial_bid = 100 + r1 % 1000;
            auction.reserve = auction.initial_bid + (r1 >> 16) % 1000;
            auction.expires = date_time + 10_000 + r2 % 20_000;
        }
        auction
    }

    /// Event `index`, which must be a bid (`index % 50 >= 4`).
    #[inline]
    pub fn bid(&self, index: u64) -> Bid {
        self.bid_with(index, BidFields::ALL)
    }

    /// Event `index` with only the bid fields `fields` computed.
    #[inline(always)]
    pub fn event_with(&self, index: u64, fields: BidFields) -> Event {
        let kind = match index % BLOCK_SIZE {
            0 => EventKind::Person,
            1..=3 => EventKind::Auction,
            _ => EventKind::Bid,
        };
        self.event_of(kind, index, fields, true)
    }

    /// Event `index`, of kind `kind`, with the bid fields `fields`, and an
    /// auction's details if `auction_details`.
    #[inline(always)]
    pub fn event_of(
        &self,
        kind: EventKind,
        index: u64,
        fields: BidFields,
        auction_details: bool,
    ) -> Event {
        match kind {
            EventKind::Person => Event::Person(self.person(index)),
            EventKind::Auction => Event::Auction(self.auction_with(index, auction_details)),
            EventKind::Bid => Event::Bid(self.bid_with(index, fields)),
        }
    }

    /// Bid `index` with only the fields `fields` computed (the auction and
    /// the time always are); the others are zero.
    #[inline(always)]
    pub fn bid_with(&self, index: u64, fields: BidFields) -> Bid {
        debug_assert!(index % BLOCK_SIZE >= 4, "event {index} is not a bid");
        let block = index / BLOCK_SIZE;
        let r0 = self.random(index, 0);
        // Auctions made so far, this block's included.
        let auctions = AUCTIONS_PER_BLOCK * block + AUCTIONS_PER_BLOCK;
        // 60% of bids go to the 10 newest auctions, the rest to the 1000 newest.
        // Hinted to be branch-free (a conditional move): a branch on a
        // random word is mispredicted about half the time (seen costing the
        // generator a third of its speed where the compiler chose one).
        let recent = std::hint::select_unpredictable(r0 % 100 < 60, 10, 1000);
        let mut bid = Bid {
            auction: FIRST_ID + auctions - 1 - (r0 >> 8) % auctions.min(recent),
            bidder: 0,
            price: 0,
            channel: 0,
            url_id: 0,
            date_time: timestamp(index),
        };
        if fields.bidder || fields.price {
            let r1 = self.random(index, 1);
            if fields.bidder {
                bid.bidder = FIRST_ID + r1 % (block + 1);
            }
            if fields.price {
                bid.price = 100 + (r1 >> 32) % 100_000;
            }
        }
        if fields.channel || fields.url {
            let r2 = self.random(index, 2);
            if fields.channel {
                bid.channel = (r2 % 4) as u8;
            }
            if fields.url {
                bid.url_id = ((r2 >> 8) % 1000) as u16;
            }
        }
        bid
    }

    /// Events `range`, in index order.
    pub fn events(&self, range: Range<u64>) -> impl Iterator<Item = Event> + '_ {
        range.map(move |index| self.event(index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_projected_bid_has_the_full_bids_fields_it_asks_for_and_zero_elsewhere() {
        let generator = Generator::new(42);
        for index in (0..100_000u64).filter(|index| index % BLOCK_SIZE >= 4) {
            let full = generator.bid(index);
            let only_price = generator.bid_with(
                index,
                BidFields {
                    price: true,
                    ..BidFields::NONE
                },
            );
            assert_eq!(
                only_price,
                Bid {
                    auction: full.auction,
                    price: full.price,
                    date_time: full.date_time,
                    bidder: 0,
                    channel: 0,
                    url_id: 0,
                }
            );
            let no_url = generator.bid_with(
                index,
                BidFields {
                    url: false,
                    ..BidFields::ALL
                },
            );
            assert_eq!(
                no_url,
                Bid {
                    url_id: 0,
                    ..full.clone()
                }
            );
            assert_eq!(
                generator.event_with(index, BidFields::ALL),
                Event::Bid(full)
            );
        }
    }

    #[test]
    fn bid_fields_round_trip_through_bits() {
        for bits in 0..16 {
            assert_eq!(BidFields::from_bits(bits).bits(), bits);
        }
        assert_eq!(BidFields::ALL.bits(), 15);
        assert_eq!(BidFields::from_bits(0), BidFields::NONE);
    }

    #[test]
    fn taken_runs_are_the_indices_of_the_kinds_taken_grouped_by_kind() {
        let every_kind = [
            EventKinds::ALL,
            EventKinds::BIDS,
            EventKinds::PERSONS_AND_AUCTIONS,
            EventKinds::PERSONS,
            EventKinds::AUCTIONS,
            EventKinds {
                persons: true,
                auctions: false,
                bids: true,
            },
            EventKinds {
                persons: false,
                auctions: false,
                bids: false,
            },
        ];
        let kind_of = |index: u64| match index % BLOCK_SIZE {
            0 => EventKind::Person,
            1..=3 => EventKind::Auction,
            _ => EventKind::Bid,
        };
        for kinds in every_kind {
            for (start, end) in [(0, 3 * BLOCK_SIZE), (3, 4), (7, 130), (49, 51), (60, 60)] {
                let runs: Vec<(EventKind, Range<u64>)> = kinds.taken_runs(start..end).collect();
                let expected: Vec<u64> = (start..end).filter(|&i| kinds.includes(i)).collect();
                let read: Vec<u64> = runs.iter().flat_map(|(_, run)| run.clone()).collect();
                assert_eq!(read, expected, "{kinds:?} over {start}..{end}");
                for (kind, run) in &runs {
                    assert!(!run.is_empty(), "{kinds:?}: an empty run");
                    assert!(
                        run.clone().all(|index| kind_of(index) == *kind),
                        "{kinds:?}: run {run:?} is not all {kind:?}"
                    );
                }
                // Neighbouring runs are of different kinds or not adjacent:
                // each run is as long as it can be.
                for pair in runs.windows(2) {
                    assert!(
                        pair[0].0 != pair[1].0 || pair[0].1.end != pair[1].1.start,
                        "{kinds:?}: {pair:?} could be one run"
                    );
                }
            }
            assert_eq!(
                kinds.per_block(),
                (0..BLOCK_SIZE).filter(|&i| kinds.includes(i)).count() as u64
            );
        }
    }

    #[test]
    fn splitmix64_matches_the_reference_sequence() {
        // The reference SplitMix64 generator seeded with 0 adds the golden
        // gamma before each output, so its outputs are splitmix64(n * gamma).
        const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
        assert_eq!(splitmix64(GAMMA), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(splitmix64(GAMMA.wrapping_mul(2)), 0x06C4_5D18_8009_454F);
    }

    #[test]
    fn first_events_for_seed_42_match_hand_computation() {
        // Expected values computed independently, outside Rust (a few lines
        // of Python with explicit 64-bit masking), from the formulas in
        // NEXMARK.md.
        let generator = Generator::new(42);
        assert_eq!(
            generator.event(0),
            Event::Person(Person {
                id: 1000,
                first_name: 4,
                last_name: 2,
                city: 2,
                state: 5,
                date_time: 1_700_000_000_000,
            })
        );
        assert_eq!(
            generator.event(1),
            Event::Auction(Auction {
                id: 1000,
                seller: 1000,
                category: 14,
                initial_bid: 210,
                reserve: 542,
                expires: 1_700_000_015_579,
                date_time: 1_700_000_000_000,
            })
        );
        assert_eq!(
            generator.event(4),
            Event::Bid(Bid {
                auction: 1000,
                bidder: 1000,
                price: 251,
                channel: 3,
                url_id: 401,
                date_time: 1_700_000_000_000,
            })
        );
        assert_eq!(
            generator.event(1234),
            Event::Bid(Bid {
                auction: 1054,
                bidder: 1018,
                price: 75_062,
                channel: 2,
                url_id: 744,
                date_time: 1_700_000_000_123,
            })
        );
    }

    #[test]
    fn event_time_is_non_decreasing_and_ten_per_millisecond() {
        let generator = Generator::new(DEFAULT_SEED);
        assert_eq!(generator.event(9).date_time(), BASE_TIME_MS);
        assert_eq!(generator.event(10).date_time(), BASE_TIME_MS + 1);
        let mut previous = 0;
        for event in generator.events(0..10_000) {
            assert!(event.date_time() >= previous);
            previous = event.date_time();
        }
    }

    #[test]
    fn block_layout_is_one_person_three_auctions_then_bids() {
        let generator = Generator::new(7);
        for index in 0..200 {
            let event = generator.event(index);
            match index % 50 {
                0 => assert!(
                    matches!(event, Event::Person(ref person) if person.id == 1000 + index / 50)
                ),
                1..=3 => assert!(matches!(event, Event::Auction(_))),
                _ => assert!(matches!(event, Event::Bid(_))),
            }
        }
    }

    #[test]
    fn bids_refer_to_existing_auctions_and_persons() {
        let generator = Generator::new(DEFAULT_SEED);
        for index in 0..100_000 {
            if let Event::Bid(bid) = generator.event(index) {
                let block = index / 50;
                assert!(bid.auction >= 1000 && bid.auction < 1000 + 3 * block + 3);
                assert!(bid.bidder >= 1000 && bid.bidder <= 1000 + block);
            }
        }
    }

    #[test]
    fn subtask_indices_partition_the_events() {
        for parallelism in 1..5 {
            let mut seen: Vec<u64> = (0..parallelism)
                .flat_map(|subtask| subtask_indices(103, subtask, parallelism))
                .collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..103).collect::<Vec<_>>());
        }
        assert_eq!(subtask_indices(2, 3, 4).count(), 0);
        let config = GeneratorConfig {
            events: 10,
            seed: 1,
        };
        assert_eq!(
            config.subtask_indices(1, 3).collect::<Vec<_>>(),
            vec![1, 4, 7]
        );
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn subtask_beyond_parallelism_is_rejected() {
        let _ = subtask_indices(10, 2, 2);
    }
}
