//! Hand-written single-threaded baselines: each query as a plain loop over
//! the generator, no engine in between.
//!
//! They serve twice. They are an independent implementation of the query
//! semantics of `NEXMARK.md`, checked against `answers.txt`, so the engine's
//! answers can be checked against them for any `(events, seed)`; and they are
//! the speed the engine is measured against, so they are written for speed:
//! state in std hash maps with a cheap hasher for integer ids, buffers reused
//! from window to window, no allocation per event in steady state.
//!
//! The generator's event time never decreases with the index, so the
//! baselines treat each event's time as the watermark and close a window as
//! soon as an event lands past its end, keeping only the open windows in
//! memory. At the end of the input every remaining window closes, as the spec
//! says. Debug builds assert the order they rely on.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use super::answer::{Answer, Query};
use super::generator::{BidFields, EventKind, GeneratorConfig};
use super::model::{
    tumbling_window_start, Auction, Bid, Event, Person, Q1Row, Q2Row, Q3Row, Q5Row, Q7Row, Q8Row,
    Q5_WINDOW_SIZE_MS, Q5_WINDOW_SLIDE_MS, Q7_WINDOW_SIZE_MS, Q8_WINDOW_SIZE_MS,
};

/// Computes `query`'s answer over the events of `config` in one thread.
pub fn run_baseline(query: Query, config: GeneratorConfig) -> Answer {
    match query {
        Query::Q0 => passthrough(config),
        Query::Q1 => currency_conversion(config),
        Query::Q2 => selection(config),
        Query::Q3 => local_item_suggestion(config),
        Query::Q5 => hot_items(config),
        Query::Q7 => highest_bid(config),
        Query::Q8 => new_users(config),
    }
}

/// Feeds the events of `config` that `query` reads, in index order, to
/// `on_event`, with only the bid fields it reads computed: a hand-written
/// program generates no more than it uses (the engine's source is told the
/// same, [`Query::event_kinds`] and [`Query::bid_fields`]).
#[inline]
fn for_each_event(config: GeneratorConfig, query: Query, mut on_event: impl FnMut(Event)) {
    let generator = config.generator();
    let (kinds, fields) = (query.event_kinds(), query.bid_fields());
    let auction_details = query.auction_details();
    for (kind, run) in kinds.taken_runs(0..config.events) {
        match kind {
            EventKind::Person => {
                run.for_each(|index| on_event(Event::Person(generator.person(index))))
            }
            EventKind::Auction => run.for_each(|index| {
                on_event(Event::Auction(
                    generator.auction_with(index, auction_details),
                ))
            }),
            EventKind::Bid => {
                run.for_each(|index| on_event(Event::Bid(generator.bid_with(index, fields))))
            }
        }
    }
}

/// Feeds the bids of `config`, in index order, to `on_bid`, with the fields
/// `query` reads.
#[inline]
fn for_each_bid(config: GeneratorConfig, query: Query, mut on_bid: impl FnMut(&Bid)) {
    for_each_event(config, query, |event| {
        if let Event::Bid(bid) = event {
            on_bid(&bid);
        }
    });
}

/// FxHash's multiply-rotate hasher. Keys here are person and auction ids,
/// small dense integers from a trusted generator, so SipHash's resistance to
/// chosen keys buys nothing and would cost a good part of each lookup.
/// Multiplying by an odd constant keeps consecutive ids in distinct buckets.
#[derive(Clone, Copy, Default)]
struct IdHasher {
    hash: u64,
}

const ID_HASHER_MULTIPLIER: u64 = 0x517c_c1b7_2722_0a95;

impl Hasher for IdHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.write_u64(u64::from(byte));
        }
    }

    #[inline]
    fn write_u64(&mut self, value: u64) {
        self.hash = (self.hash.rotate_left(5) ^ value).wrapping_mul(ID_HASHER_MULTIPLIER);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.hash
    }
}

type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

/// A join of persons and auctions (q3, q8).
trait PersonAuctionJoin {
    fn on_person(&mut self, person: &Person);
    fn on_auction(&mut self, auction: &Auction);
}

/// Feeds the persons and auctions of `config`, in index order, to `join`,
/// each kind's run of indices in a loop of its own (as [`for_each_event`],
/// without an `Event` between the generator and the join).
#[inline(always)]
fn join_persons_and_auctions(
    config: GeneratorConfig,
    query: Query,
    join: &mut impl PersonAuctionJoin,
) {
    let generator = config.generator();
    let auction_details = query.auction_details();
    for (kind, run) in query.event_kinds().taken_runs(0..config.events) {
        match kind {
            EventKind::Person => run.for_each(|index| join.on_person(&generator.person(index))),
            EventKind::Auction => run
                .for_each(|index| join.on_auction(&generator.auction_with(index, auction_details))),
            EventKind::Bid => {}
        }
    }
}

/// q0: every bid.
fn passthrough(config: GeneratorConfig) -> Answer {
    let mut answer = Answer::default();
    for_each_bid(config, Query::Q0, |bid| answer.add_row(bid));
    answer
}

/// q1: every bid, price in euro.
fn currency_conversion(config: GeneratorConfig) -> Answer {
    let mut answer = Answer::default();
    for_each_bid(config, Query::Q1, |bid| {
        answer.add_row(&Q1Row::from_bid(bid))
    });
    answer
}

/// q2: bids on auctions whose id is a multiple of 123.
/// Each bid is tested on its auction before the rest of it is made, as
/// the engine's source does (`NexmarkSource::bids_where`).
fn selection(config: GeneratorConfig) -> Answer {
    let mut answer = Answer::default();
    let generator = config.generator();
    let fields = Query::Q2.bid_fields();
    for (kind, run) in Query::Q2.event_kinds().taken_runs(0..config.events) {
        if kind == EventKind::Bid {
            for index in run {
                let head = generator.bid_with(index, BidFields::NONE);
                if Bid::is_q2_auction(head.auction) {
                    answer.add_row(&Q2Row::from_bid(&generator.bid_with(index, fields)));
                }
            }
        }
    }
    answer
}

/// Marks the end of a chain in [`LocalItemSuggestion::pending`].
const CHAIN_END: usize = usize::MAX;

/// q3's state: a symmetric hash join without windows. Both sides are kept
/// forever, as an unwindowed join must; each pair is emitted once, by
/// whichever of its two events arrives second.
#[derive(Default)]
struct LocalItemSuggestion {
    /// Selected persons by id: first name, last name, city, state.
    persons: IdMap<[u8; 4]>,
    /// Selected auctions whose seller has not been seen among the selected
    /// persons, as chains through `pending` keyed by seller: the head's index.
    pending_heads: IdMap<usize>,
    /// Chain links: an auction id and the index of the next link. Links are
    /// never freed (an unwindowed join's state only grows), so one growing
    /// vector replaces a vector per seller and its allocations.
    pending: Vec<(u64, usize)>,
    answer: Answer,
}

impl PersonAuctionJoin for LocalItemSuggestion {
    #[inline(always)]
    fn on_person(&mut self, person: &Person) {
        if !person.is_q3_selected() {
            return;
        }
        let fields = [
            person.first_name,
            person.last_name,
            person.city,
            person.state,
        ];
        if !self.pending_heads.is_empty() {
            if let Some(mut link) = self.pending_heads.remove(&person.id) {
                while link != CHAIN_END {
                    let (auction, next) = self.pending[link];
                    self.emit(fields, auction);
                    link = next;
                }
            }
        }
        self.persons.insert(person.id, fields);
    }

    #[inline(always)]
    fn on_auction(&mut self, auction: &Auction) {
        if !auction.is_q3_selected() {
            return;
        }
        if let Some(&fields) = self.persons.get(&auction.seller) {
            self.emit(fields, auction.id);
        } else {
            let head = self
                .pending_heads
                .entry(auction.seller)
                .or_insert(CHAIN_END);
            self.pending.push((auction.id, *head));
            *head = self.pending.len() - 1;
        }
    }
}

impl LocalItemSuggestion {
    #[inline]
    fn emit(&mut self, [first_name, last_name, city, state]: [u8; 4], auction: u64) {
        self.answer.add_row(&Q3Row {
            first_name,
            last_name,
            city,
            state,
            auction,
        });
    }
}

/// q3: auctions in category 10 joined with their sellers living in OR, ID or CA.
fn local_item_suggestion(config: GeneratorConfig) -> Answer {
    let mut state = LocalItemSuggestion::default();
    join_persons_and_auctions(config, Query::Q3, &mut state);
    state.answer
}

/// Bid counts per auction over one slide of event time.
struct Pane {
    start: u64,
    counts: IdMap<u64>,
}

/// q5's state. Each sliding window is the union of `size / slide` panes, so a
/// bid is counted once, in its pane, instead of once per window holding it;
/// a window's counts are summed from its panes when it closes.
#[derive(Default)]
struct HotItems {
    /// Panes that an open window still needs, in ascending start order.
    panes: VecDeque<Pane>,
    /// Count maps of dropped panes, kept for their capacity.
    spare_counts: Vec<IdMap<u64>>,
    /// The counts of the window being closed; reused.
    window_counts: IdMap<u64>,
    /// Every window ending before this has been closed.
    next_window_end: u64,
    answer: Answer,
}

impl HotItems {
    const SIZE: u64 = Q5_WINDOW_SIZE_MS;
    const SLIDE: u64 = Q5_WINDOW_SLIDE_MS;

    #[inline]
    fn on_bid(&mut self, bid: &Bid) {
        let pane_start = tumbling_window_start(bid.date_time, Self::SLIDE);
        let current = self.panes.back().map(|pane| pane.start);
        if current != Some(pane_start) {
            debug_assert!(current < Some(pane_start), "bids out of event time order");
            // No later bid falls before this pane, so every window ending
            // at or before its start is complete.
            self.close_windows_through(pane_start);
            let counts = self.spare_counts.pop().unwrap_or_default();
            self.panes.push_back(Pane {
                start: pane_start,
                counts,
            });
        }
        let pane = self.panes.back_mut().expect("a pane was just ensured");
        *pane.counts.entry(bid.auction).or_insert(0) += 1;
    }

    /// Closes every window that holds a bid and ends at or before `watermark`.
    fn close_windows_through(&mut self, watermark: u64) {
        while let Some(oldest) = self.panes.front() {
            // The first window holding the oldest pane ends one slide after it
            // starts; windows before that hold no bids and produce no rows.
            let window_end = self.next_window_end.max(oldest.start + Self::SLIDE);
            if window_end > watermark {
                break;
            }
            self.close_window(window_end);
            self.next_window_end = window_end + Self::SLIDE;
            let next_window_start = self.next_window_end.saturating_sub(Self::SIZE);
            while self
                .panes
                .front()
                .is_some_and(|pane| pane.start < next_window_start)
            {
                let mut pane = self.panes.pop_front().expect("front was just seen");
                pane.counts.clear();
                self.spare_counts.push(pane.counts);
            }
        }
    }

    fn close_window(&mut self, window_end: u64) {
        let window_start = window_end.saturating_sub(Self::SIZE);
        self.window_counts.clear();
        for pane in &self.panes {
            if pane.start >= window_start && pane.start < window_end {
                for (&auction, &count) in &pane.counts {
                    *self.window_counts.entry(auction).or_insert(0) += count;
                }
            }
        }
        let Some(&count_max) = self.window_counts.values().max() else {
            return;
        };
        for (&auction, &count) in &self.window_counts {
            if count == count_max {
                self.answer.add_row(&Q5Row {
                    window_end,
                    auction,
                    count,
                });
            }
        }
    }
}

/// q5: per sliding window, the auctions with the most bids.
fn hot_items(config: GeneratorConfig) -> Answer {
    let mut state = HotItems::default();
    for_each_bid(config, Query::Q5, |bid| state.on_bid(bid));
    state.close_windows_through(u64::MAX);
    state.answer
}

/// q7's state: the open tumbling window's highest price and its bids.
#[derive(Default)]
struct HighestBid {
    window_start: Option<u64>,
    price_max: u64,
    /// Auction and bidder of every bid at `price_max` in the open window.
    winners: Vec<(u64, u64)>,
    answer: Answer,
}

impl HighestBid {
    const SIZE: u64 = Q7_WINDOW_SIZE_MS;

    #[inline]
    fn on_bid(&mut self, bid: &Bid) {
        let window_start = tumbling_window_start(bid.date_time, Self::SIZE);
        if self.window_start != Some(window_start) {
            debug_assert!(
                self.window_start < Some(window_start),
                "bids out of event time order"
            );
            self.close_window();
            self.window_start = Some(window_start);
        }
        if self.winners.is_empty() || bid.price > self.price_max {
            self.price_max = bid.price;
            self.winners.clear();
            self.winners.push((bid.auction, bid.bidder));
        } else if bid.price == self.price_max {
            self.winners.push((bid.auction, bid.bidder));
        }
    }

    fn close_window(&mut self) {
        let Some(window_start) = self.window_start else {
            return;
        };
        for &(auction, bidder) in &self.winners {
            self.answer.add_row(&Q7Row {
                window_end: window_start + Self::SIZE,
                auction,
                bidder,
                price: self.price_max,
            });
        }
        self.winners.clear();
    }
}

/// q7: per tumbling window, the bids at the highest price.
fn highest_bid(config: GeneratorConfig) -> Answer {
    let mut state = HighestBid::default();
    for_each_bid(config, Query::Q7, |bid| state.on_bid(bid));
    state.close_window();
    state.answer
}

/// q8's state: the persons and auctions of the open tumbling window, joined
/// when it closes, so the order of a person and their auction inside the
/// window does not matter.
#[derive(Default)]
struct NewUsers {
    window_start: Option<u64>,
    /// Persons of the open window by id: first name, last name.
    persons: IdMap<[u8; 2]>,
    /// Auctions of the open window: seller, auction id.
    auctions: Vec<(u64, u64)>,
    answer: Answer,
}

impl NewUsers {
    const SIZE: u64 = Q8_WINDOW_SIZE_MS;

    /// Closes the open window if `date_time` is past it.
    #[inline]
    fn advance_to(&mut self, date_time: u64) {
        let window_start = tumbling_window_start(date_time, Self::SIZE);
        if self.window_start != Some(window_start) {
            debug_assert!(
                self.window_start < Some(window_start),
                "events out of event time order"
            );
            self.close_window();
            self.window_start = Some(window_start);
        }
    }

    fn close_window(&mut self) {
        let Some(window_start) = self.window_start else {
            return;
        };
        let window_end = window_start + Self::SIZE;
        for &(seller, auction) in &self.auctions {
            if let Some(&[first_name, last_name]) = self.persons.get(&seller) {
                self.answer.add_row(&Q8Row {
                    person_id: seller,
                    first_name,
                    last_name,
                    auction,
                    window_end,
                });
            }
        }
        self.persons.clear();
        self.auctions.clear();
    }
}

impl PersonAuctionJoin for NewUsers {
    #[inline(always)]
    fn on_person(&mut self, person: &Person) {
        self.advance_to(person.date_time);
        self.persons
            .insert(person.id, [person.first_name, person.last_name]);
    }

    #[inline(always)]
    fn on_auction(&mut self, auction: &Auction) {
        self.advance_to(auction.date_time);
        self.auctions.push((auction.seller, auction.id));
    }
}

/// q8: persons who opened an auction in the tumbling window they joined in.
fn new_users(config: GeneratorConfig) -> Answer {
    let mut state = NewUsers::default();
    join_persons_and_auctions(config, Query::Q8, &mut state);
    state.close_window();
    state.answer
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nexmark::answers_file::reference_answers;

    /// Every query's answer for every case in `answers.txt`, up to the
    /// 1,000,000-event case (well under a second even in the dev profile).
    #[test]
    fn baselines_match_reference_answers() {
        let cases = reference_answers().unwrap();
        assert!(!cases.is_empty());
        for case in &cases {
            for &(query, expected) in &case.answers {
                let actual = run_baseline(query, case.config());
                assert_eq!(
                    actual.line(query),
                    expected.line(query),
                    "events={} seed={}",
                    case.events,
                    case.seed
                );
            }
        }
    }

    #[test]
    fn empty_input_has_empty_answers() {
        let config = GeneratorConfig {
            events: 0,
            seed: 42,
        };
        for query in Query::ALL {
            assert_eq!(run_baseline(query, config), Answer::default(), "{query}");
        }
    }

    #[test]
    fn q5_windows_overlapping_the_first_bids_each_report() {
        // 10 bids in the first millisecond: every auction has one bid, so
        // all tie. The five sliding windows holding that millisecond each
        // emit every auction bid on.
        let config = GeneratorConfig {
            events: 10,
            seed: 42,
        };
        let generator = config.generator();
        let mut auctions: Vec<u64> = Vec::new();
        for index in 0..10 {
            if let Event::Bid(bid) = generator.event(index) {
                auctions.push(bid.auction);
            }
        }
        let mut counts: HashMap<u64, u64> = HashMap::new();
        for auction in &auctions {
            *counts.entry(*auction).or_default() += 1;
        }
        let count_max = *counts.values().max().unwrap();
        let mut expected = Answer::default();
        for window in 0..5 {
            let window_end = 1_700_000_000_000 + 2_000 * (window + 1);
            for (&auction, &count) in &counts {
                if count == count_max {
                    expected.add_row(&Q5Row {
                        window_end,
                        auction,
                        count,
                    });
                }
            }
        }
        assert_eq!(run_baseline(Query::Q5, config), expected);
    }
}
