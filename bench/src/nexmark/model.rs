//! Nexmark events and the result rows of each query.
//!
//! Fields that the spec draws from a fixed table (names, cities, states,
//! channels) are stored as a `u8` index into that table, and fields the spec
//! derives from a number (an auction's item name, a bid's url) are stored as
//! that number. Events stay small and fixed-size, which matters because every
//! one of them crosses a ring or a socket in the engine; the accessors render
//! the spec's exact strings only when a row is printed or hashed.
//!
//! Every type derives rkyv's traits so that the engine can ship it as is.

use std::fmt;

use super::answer::write_decimal;

/// First names, indexed by `Person::first_name`.
pub const FIRST_NAMES: [&str; 8] = [
    "Peter", "Paul", "Luke", "John", "Saul", "Vicky", "Kate", "Julie",
];

/// Last names, indexed by `Person::last_name`.
pub const LAST_NAMES: [&str; 8] = [
    "Shultz", "Abrams", "Spencer", "White", "Bartels", "Walton", "Smith", "Jones",
];

/// Cities, indexed by `Person::city`. The spec writes two of them with an
/// underscore so that no name contains a space.
pub const CITIES: [&str; 8] = [
    "Phoenix",
    "Los_Angeles",
    "San_Francisco",
    "Boise",
    "Portland",
    "Bend",
    "Redmond",
    "Seattle",
];

/// States, indexed by `Person::state`.
pub const STATES: [&str; 8] = ["AZ", "CA", "ID", "OR", "WA", "WY", "NV", "UT"];

/// Bid channels, indexed by `Bid::channel`.
pub const CHANNELS: [&str; 4] = ["Google", "Facebook", "Baidu", "Apple"];

/// A bid's url is this prefix followed by its `url_id` in decimal.
pub const URL_PREFIX: &str = "https://nexmark.example/item?ch=";

/// An auction's item name is this prefix followed by its id in decimal.
pub const ITEM_NAME_PREFIX: &str = "item-";

/// q1 converts prices to euro by multiplying with this numerator...
pub const Q1_EURO_RATE_NUMERATOR: u64 = 908;
/// ...and dividing by this denominator (integer division, as the spec says).
pub const Q1_EURO_RATE_DENOMINATOR: u64 = 1000;

/// q2 selects the bids on auctions whose id is a multiple of this.
pub const Q2_AUCTION_DIVISOR: u64 = 123;

/// q3 joins only the auctions of this category...
pub const Q3_CATEGORY: u64 = 10;
/// ...with only the persons living in one of these states.
pub const Q3_STATES: [&str; 3] = ["OR", "ID", "CA"];

/// q5 counts bids in sliding windows of this size...
pub const Q5_WINDOW_SIZE_MS: u64 = 10_000;
/// ...starting at every multiple of this slide.
pub const Q5_WINDOW_SLIDE_MS: u64 = 2_000;

/// q7 looks for the highest bid in tumbling windows of this size.
pub const Q7_WINDOW_SIZE_MS: u64 = 10_000;

/// q8 joins new persons with their auctions in tumbling windows of this size.
pub const Q8_WINDOW_SIZE_MS: u64 = 10_000;

/// Position of `name` in `table`; evaluated at compile time so that a typo in
/// a query parameter fails the build instead of silently matching nothing.
const fn table_index(table: &[&str], name: &str) -> usize {
    let mut index = 0;
    while index < table.len() {
        let candidate = table[index].as_bytes();
        let wanted = name.as_bytes();
        if candidate.len() == wanted.len() {
            let mut byte_index = 0;
            while byte_index < wanted.len() && candidate[byte_index] == wanted[byte_index] {
                byte_index += 1;
            }
            if byte_index == wanted.len() {
                return index;
            }
        }
        index += 1;
    }
    panic!("name is not in the table");
}

/// Bit `s` is set when `STATES[s]` is one of `Q3_STATES`, so the q3 filter is
/// one shift and mask instead of string comparisons.
const Q3_STATE_MASK: u8 = {
    let mut mask = 0u8;
    let mut index = 0;
    while index < Q3_STATES.len() {
        mask |= 1 << table_index(&STATES, Q3_STATES[index]);
        index += 1;
    }
    mask
};

/// Start of the tumbling window of `size` holding event time `date_time`.
#[inline]
pub const fn tumbling_window_start(date_time: u64, size: u64) -> u64 {
    date_time - date_time % size
}

/// Writes a person's name as the spec prints it: first name, one space, last
/// name. Rows carry the two table indexes, not a string, so this is shared by
/// persons and by the q3 and q8 rows.
#[inline]
pub fn write_name<W: fmt::Write>(out: &mut W, first_name: u8, last_name: u8) -> fmt::Result {
    out.write_str(FIRST_NAMES[usize::from(first_name)])?;
    out.write_char(' ')?;
    out.write_str(LAST_NAMES[usize::from(last_name)])
}

/// A new user of the auction site.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Person {
    pub id: u64,
    /// Index into [`FIRST_NAMES`].
    pub first_name: u8,
    /// Index into [`LAST_NAMES`].
    pub last_name: u8,
    /// Index into [`CITIES`].
    pub city: u8,
    /// Index into [`STATES`].
    pub state: u8,
    pub date_time: u64,
}

impl Person {
    #[inline]
    pub fn first_name_str(&self) -> &'static str {
        FIRST_NAMES[usize::from(self.first_name)]
    }

    #[inline]
    pub fn last_name_str(&self) -> &'static str {
        LAST_NAMES[usize::from(self.last_name)]
    }

    #[inline]
    pub fn city_str(&self) -> &'static str {
        CITIES[usize::from(self.city)]
    }

    #[inline]
    pub fn state_str(&self) -> &'static str {
        STATES[usize::from(self.state)]
    }

    /// Writes the full name, `FIRST LAST`.
    #[inline]
    pub fn write_name<W: fmt::Write>(&self, out: &mut W) -> fmt::Result {
        write_name(out, self.first_name, self.last_name)
    }

    /// Whether q3 keeps this person: one living in OR, ID or CA.
    #[inline]
    pub fn is_q3_selected(&self) -> bool {
        self.state < 8 && Q3_STATE_MASK & (1 << self.state) != 0
    }
}

/// An item put up for auction by a seller.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Auction {
    pub id: u64,
    pub seller: u64,
    pub category: u64,
    pub initial_bid: u64,
    pub reserve: u64,
    pub expires: u64,
    pub date_time: u64,
}

impl Auction {
    /// Writes the item name, `item-<id>`, which the spec derives from the id.
    #[inline]
    pub fn write_item_name<W: fmt::Write>(&self, out: &mut W) -> fmt::Result {
        out.write_str(ITEM_NAME_PREFIX)?;
        write_decimal(out, self.id)
    }

    /// Whether q3 keeps this auction: one in category 10.
    #[inline]
    pub fn is_q3_selected(&self) -> bool {
        self.category == Q3_CATEGORY
    }
}

/// A bid on an auction. Also the row of q0, which passes every bid through.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Bid {
    pub auction: u64,
    pub bidder: u64,
    pub price: u64,
    /// Index into [`CHANNELS`].
    pub channel: u8,
    /// The number at the end of the url; see [`Bid::write_url`].
    pub url_id: u16,
    pub date_time: u64,
}

impl Bid {
    #[inline]
    pub fn channel_str(&self) -> &'static str {
        CHANNELS[usize::from(self.channel)]
    }

    /// Writes the url, `https://nexmark.example/item?ch=<url_id>`.
    #[inline]
    pub fn write_url<W: fmt::Write>(&self, out: &mut W) -> fmt::Result {
        out.write_str(URL_PREFIX)?;
        write_decimal(out, u64::from(self.url_id))
    }

    /// Whether q2 keeps this bid: one on an auction whose id is a multiple of 123.
    #[inline]
    pub fn is_q2_selected(&self) -> bool {
        Bid::is_q2_auction(self.auction)
    }

    /// Whether q2 keeps the bids on auction `auction`: the test on the
    /// auction alone, for a source that tests a bid before making it whole.
    #[inline]
    pub fn is_q2_auction(auction: u64) -> bool {
        auction.is_multiple_of(Q2_AUCTION_DIVISOR)
    }
}

/// One event of the Nexmark stream.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Event {
    Person(Person),
    Auction(Auction),
    Bid(Bid),
}

impl Event {
    /// Event time in milliseconds.
    #[inline]
    pub fn date_time(&self) -> u64 {
        match self {
            Event::Person(person) => person.date_time,
            Event::Auction(auction) => auction.date_time,
            Event::Bid(bid) => bid.date_time,
        }
    }
}

/// q1: a bid with its price converted to euro.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Q1Row {
    pub auction: u64,
    pub bidder: u64,
    /// Already converted: `price * 908 / 1000`.
    pub price: u64,
    pub date_time: u64,
}

impl Q1Row {
    #[inline]
    pub fn from_bid(bid: &Bid) -> Q1Row {
        Q1Row {
            auction: bid.auction,
            bidder: bid.bidder,
            price: bid.price * Q1_EURO_RATE_NUMERATOR / Q1_EURO_RATE_DENOMINATOR,
            date_time: bid.date_time,
        }
    }
}

/// q2: a selected bid's auction and price.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Q2Row {
    pub auction: u64,
    pub price: u64,
}

impl Q2Row {
    #[inline]
    pub fn from_bid(bid: &Bid) -> Q2Row {
        Q2Row {
            auction: bid.auction,
            price: bid.price,
        }
    }
}

/// q3: a selected seller's name and place with one of their selected auctions.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Q3Row {
    /// Index into [`FIRST_NAMES`].
    pub first_name: u8,
    /// Index into [`LAST_NAMES`].
    pub last_name: u8,
    /// Index into [`CITIES`].
    pub city: u8,
    /// Index into [`STATES`].
    pub state: u8,
    pub auction: u64,
}

impl Q3Row {
    #[inline]
    pub fn write_name<W: fmt::Write>(&self, out: &mut W) -> fmt::Result {
        write_name(out, self.first_name, self.last_name)
    }

    #[inline]
    pub fn city_str(&self) -> &'static str {
        CITIES[usize::from(self.city)]
    }

    #[inline]
    pub fn state_str(&self) -> &'static str {
        STATES[usize::from(self.state)]
    }
}

/// q5: an auction with the most bids in a sliding window, and that count.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Q5Row {
    pub window_end: u64,
    pub auction: u64,
    pub count: u64,
}

/// q7: a bid with the highest price in its tumbling window.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Q7Row {
    pub window_end: u64,
    pub auction: u64,
    pub bidder: u64,
    pub price: u64,
}

/// q8: a person who opened an auction in the same tumbling window as they
/// joined.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Q8Row {
    pub person_id: u64,
    /// Index into [`FIRST_NAMES`].
    pub first_name: u8,
    /// Index into [`LAST_NAMES`].
    pub last_name: u8,
    pub auction: u64,
    pub window_end: u64,
}

impl Q8Row {
    #[inline]
    pub fn write_name<W: fmt::Write>(&self, out: &mut W) -> fmt::Result {
        write_name(out, self.first_name, self.last_name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q3_state_mask_selects_exactly_the_q3_states() {
        for state in 0..STATES.len() as u8 {
            let person = Person {
                id: 1000,
                first_name: 0,
                last_name: 0,
                city: 0,
                state,
                date_time: 0,
            };
            let expected = Q3_STATES.contains(&person.state_str());
            assert_eq!(
                person.is_q3_selected(),
                expected,
                "state {}",
                person.state_str()
            );
        }
    }

    #[test]
    fn derived_strings_render_as_the_spec_says() {
        let mut text = String::new();
        write_name(&mut text, 5, 7).unwrap();
        assert_eq!(text, "Vicky Jones");

        let bid = Bid {
            auction: 1,
            bidder: 2,
            price: 3,
            channel: 1,
            url_id: 42,
            date_time: 4,
        };
        text.clear();
        bid.write_url(&mut text).unwrap();
        assert_eq!(text, "https://nexmark.example/item?ch=42");
        assert_eq!(bid.channel_str(), "Facebook");

        let auction = Auction {
            id: 1007,
            seller: 1000,
            category: 10,
            initial_bid: 100,
            reserve: 100,
            expires: 0,
            date_time: 0,
        };
        text.clear();
        auction.write_item_name(&mut text).unwrap();
        assert_eq!(text, "item-1007");
    }

    #[test]
    fn events_round_trip_through_rkyv() {
        let event = Event::Bid(Bid {
            auction: 1003,
            bidder: 1000,
            price: 55_000,
            channel: 3,
            url_id: 999,
            date_time: 1_700_000_000_000,
        });
        let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&event).unwrap();
        let back = rkyv::from_bytes::<Event, rkyv::rancor::Error>(&bytes).unwrap();
        assert_eq!(back, event);
    }
}
