//! A query's answer: its row count and the wrapping sum of the FNV-1a-64
//! hashes of its rows, each row printed exactly as `NEXMARK.md` prints it.
//!
//! A sum commutes, so the answer does not depend on the order rows arrive in,
//! nor on how many subtasks produced them: each sink keeps its own [`Answer`]
//! and the harness merges them. Rows are hashed as they are printed, through
//! [`Fnv1a64Writer`], so checking an answer never allocates a line.

use std::fmt;
use std::str::FromStr;

use super::generator::{BidFields, EventKinds};
use super::model::{Bid, Q1Row, Q2Row, Q3Row, Q5Row, Q7Row, Q8Row};

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The Nexmark queries this project runs. q4 and q6 are left out, as in the
/// spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Query {
    Q0,
    Q1,
    Q2,
    Q3,
    Q5,
    Q7,
    Q8,
}

impl Query {
    pub const ALL: [Query; 7] = [
        Query::Q0,
        Query::Q1,
        Query::Q2,
        Query::Q3,
        Query::Q5,
        Query::Q7,
        Query::Q8,
    ];

    /// The kinds of event the query reads: a program (the engine's, or a
    /// baseline) generates only these, as a consumer of only some topics.
    pub const fn event_kinds(self) -> EventKinds {
        match self {
            Query::Q3 | Query::Q8 => EventKinds::PERSONS_AND_AUCTIONS,
            _ => EventKinds::BIDS,
        }
    }

    /// The fields of each bid the query reads besides the auction and the
    /// time: a program computes only these (projection push-down).
    pub const fn bid_fields(self) -> BidFields {
        match self {
            Query::Q0 | Query::Q3 | Query::Q8 => BidFields::ALL,
            Query::Q1 | Query::Q7 => BidFields {
                bidder: true,
                price: true,
                channel: false,
                url: false,
            },
            Query::Q2 => BidFields {
                price: true,
                ..BidFields::NONE
            },
            Query::Q5 => BidFields::NONE,
        }
    }

    /// Whether the query reads an auction's initial bid, reserve and
    /// expiry: none does (q3 and q8 join on the id and seller), so no
    /// program computes them.
    pub const fn auction_details(self) -> bool {
        false
    }

    /// The name used on command lines and in answer lines: `q0`, `q1`, ...
    pub const fn name(self) -> &'static str {
        match self {
            Query::Q0 => "q0",
            Query::Q1 => "q1",
            Query::Q2 => "q2",
            Query::Q3 => "q3",
            Query::Q5 => "q5",
            Query::Q7 => "q7",
            Query::Q8 => "q8",
        }
    }
}

impl fmt::Display for Query {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

/// A query name that is not one of [`Query::ALL`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseQueryError {
    pub given: String,
}

impl fmt::Display for ParseQueryError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "unknown query {:?}; valid queries are",
            self.given
        )?;
        for (index, query) in Query::ALL.iter().enumerate() {
            let separator = if index == 0 { " " } else { ", " };
            write!(formatter, "{separator}{}", query.name())?;
        }
        Ok(())
    }
}

impl std::error::Error for ParseQueryError {}

impl FromStr for Query {
    type Err = ParseQueryError;

    fn from_str(text: &str) -> Result<Query, ParseQueryError> {
        Query::ALL
            .into_iter()
            .find(|query| query.name() == text)
            .ok_or_else(|| ParseQueryError {
                given: text.to_owned(),
            })
    }
}

/// FNV-1a-64 of `bytes`, as the spec defines it.
#[inline]
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut writer = Fnv1a64Writer::new();
    writer.write_bytes(bytes);
    writer.finish()
}

/// A `fmt::Write` sink that hashes with FNV-1a-64 whatever is written to it,
/// so a row is hashed while it is printed, without a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fnv1a64Writer {
    hash: u64,
}

impl Fnv1a64Writer {
    #[inline]
    pub fn new() -> Fnv1a64Writer {
        Fnv1a64Writer {
            hash: FNV_OFFSET_BASIS,
        }
    }

    #[inline]
    pub fn write_bytes(&mut self, bytes: &[u8]) {
        let mut hash = self.hash;
        for &byte in bytes {
            hash = (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME);
        }
        self.hash = hash;
    }

    /// The hash of everything written so far.
    #[inline]
    pub fn finish(&self) -> u64 {
        self.hash
    }
}

impl Default for Fnv1a64Writer {
    fn default() -> Fnv1a64Writer {
        Fnv1a64Writer::new()
    }
}

impl fmt::Write for Fnv1a64Writer {
    #[inline]
    fn write_str(&mut self, text: &str) -> fmt::Result {
        self.write_bytes(text.as_bytes());
        Ok(())
    }

    #[inline]
    fn write_char(&mut self, character: char) -> fmt::Result {
        // Rows only hold ASCII separators; skip the UTF-8 encoder for them.
        if character.is_ascii() {
            self.write_bytes(&[character as u8]);
        } else {
            self.write_bytes(character.encode_utf8(&mut [0; 4]).as_bytes());
        }
        Ok(())
    }
}

/// Writes `value` in decimal. Faster than `write!(out, "{value}")`, which goes
/// through the formatting machinery; this runs once per field of every row.
#[inline]
pub fn write_decimal<W: fmt::Write>(out: &mut W, mut value: u64) -> fmt::Result {
    // u64::MAX has 20 decimal digits.
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    match std::str::from_utf8(&digits[start..]) {
        Ok(text) => out.write_str(text),
        Err(_) => unreachable!("decimal digits are ASCII"),
    }
}

/// A result row that prints itself as its line in `NEXMARK.md`: fields joined
/// by `,`, no spaces, no quoting, no newline.
pub trait AnswerRow {
    fn write_row<W: fmt::Write>(&self, out: &mut W) -> fmt::Result;
}

/// q0: `auction,bidder,price,channel,url,date_time`.
impl AnswerRow for Bid {
    #[inline]
    fn write_row<W: fmt::Write>(&self, out: &mut W) -> fmt::Result {
        write_decimal(out, self.auction)?;
        out.write_char(',')?;
        write_decimal(out, self.bidder)?;
        out.write_char(',')?;
        write_decimal(out, self.price)?;
        out.write_char(',')?;
        out.write_str(self.channel_str())?;
        out.write_char(',')?;
        self.write_url(out)?;
        out.write_char(',')?;
        write_decimal(out, self.date_time)
    }
}

/// q1: `auction,bidder,price*908/1000,date_time`.
impl AnswerRow for Q1Row {
    #[inline]
    fn write_row<W: fmt::Write>(&self, out: &mut W) -> fmt::Result {
        write_decimal(out, self.auction)?;
        out.write_char(',')?;
        write_decimal(out, self.bidder)?;
        out.write_char(',')?;
        write_decimal(out, self.price)?;
        out.write_char(',')?;
        write_decimal(out, self.date_time)
    }
}

/// q2: `auction,price`.
impl AnswerRow for Q2Row {
    #[inline]
    fn write_row<W: fmt::Write>(&self, out: &mut W) -> fmt::Result {
        write_decimal(out, self.auction)?;
        out.write_char(',')?;
        write_decimal(out, self.price)
    }
}

/// q3: `name,city,state,auction_id`.
impl AnswerRow for Q3Row {
    #[inline]
    fn write_row<W: fmt::Write>(&self, out: &mut W) -> fmt::Result {
        self.write_name(out)?;
        out.write_char(',')?;
        out.write_str(self.city_str())?;
        out.write_char(',')?;
        out.write_str(self.state_str())?;
        out.write_char(',')?;
        write_decimal(out, self.auction)
    }
}

/// q5: `window_end,auction,count`.
impl AnswerRow for Q5Row {
    #[inline]
    fn write_row<W: fmt::Write>(&self, out: &mut W) -> fmt::Result {
        write_decimal(out, self.window_end)?;
        out.write_char(',')?;
        write_decimal(out, self.auction)?;
        out.write_char(',')?;
        write_decimal(out, self.count)
    }
}

/// q7: `window_end,auction,bidder,price`.
impl AnswerRow for Q7Row {
    #[inline]
    fn write_row<W: fmt::Write>(&self, out: &mut W) -> fmt::Result {
        write_decimal(out, self.window_end)?;
        out.write_char(',')?;
        write_decimal(out, self.auction)?;
        out.write_char(',')?;
        write_decimal(out, self.bidder)?;
        out.write_char(',')?;
        write_decimal(out, self.price)
    }
}

/// q8: `person_id,name,auction_id,window_end`.
impl AnswerRow for Q8Row {
    #[inline]
    fn write_row<W: fmt::Write>(&self, out: &mut W) -> fmt::Result {
        write_decimal(out, self.person_id)?;
        out.write_char(',')?;
        self.write_name(out)?;
        out.write_char(',')?;
        write_decimal(out, self.auction)?;
        out.write_char(',')?;
        write_decimal(out, self.window_end)
    }
}

/// A query's answer: how many rows, and the wrapping sum of their hashes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Answer {
    pub rows: u64,
    pub checksum: u64,
}

impl Answer {
    /// FNV-1a-64 of the row's line.
    #[inline]
    pub fn row_hash(row: &impl AnswerRow) -> u64 {
        let mut writer = Fnv1a64Writer::new();
        match row.write_row(&mut writer) {
            Ok(()) => writer.finish(),
            Err(_) => unreachable!("Fnv1a64Writer never fails"),
        }
    }

    #[inline]
    pub fn add_row(&mut self, row: &impl AnswerRow) {
        self.rows += 1;
        self.checksum = self.checksum.wrapping_add(Answer::row_hash(row));
    }

    /// Adds the rows of another part of the same answer, for example another
    /// sink subtask's.
    #[inline]
    pub fn merge(&mut self, other: Answer) {
        self.rows = self.rows.wrapping_add(other.rows);
        self.checksum = self.checksum.wrapping_add(other.checksum);
    }

    /// The answer line as the spec prints it: `q5 rows=R checksum=C`.
    pub fn line(&self, query: Query) -> String {
        format!(
            "{} rows={} checksum={}",
            query.name(),
            self.rows,
            self.checksum
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line_of(row: &impl AnswerRow) -> String {
        let mut line = String::new();
        row.write_row(&mut line).unwrap();
        line
    }

    #[test]
    fn fnv1a64_matches_published_vectors() {
        // From the FNV reference test suite.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn writer_hash_equals_hash_of_printed_line() {
        let bid = Bid {
            auction: 1234,
            bidder: 1001,
            price: 99_999,
            channel: 2,
            url_id: 7,
            date_time: 1_700_000_000_123,
        };
        let line = line_of(&bid);
        assert_eq!(
            line,
            "1234,1001,99999,Baidu,https://nexmark.example/item?ch=7,1700000000123"
        );
        assert_eq!(Answer::row_hash(&bid), fnv1a64(line.as_bytes()));
    }

    #[test]
    fn rows_print_as_the_spec_says() {
        let q1 = Q1Row {
            auction: 1,
            bidder: 2,
            price: 3,
            date_time: 4,
        };
        assert_eq!(line_of(&q1), "1,2,3,4");
        let q2 = Q2Row {
            auction: 1230,
            price: 0,
        };
        assert_eq!(line_of(&q2), "1230,0");
        let q3 = Q3Row {
            first_name: 0,
            last_name: 1,
            city: 1,
            state: 1,
            auction: 1005,
        };
        assert_eq!(line_of(&q3), "Peter Abrams,Los_Angeles,CA,1005");
        let q5 = Q5Row {
            window_end: 10,
            auction: 11,
            count: 12,
        };
        assert_eq!(line_of(&q5), "10,11,12");
        let q7 = Q7Row {
            window_end: 10,
            auction: 11,
            bidder: 12,
            price: 13,
        };
        assert_eq!(line_of(&q7), "10,11,12,13");
        let q8 = Q8Row {
            person_id: 1000,
            first_name: 7,
            last_name: 0,
            auction: 1001,
            window_end: 1_700_000_010_000,
        };
        assert_eq!(line_of(&q8), "1000,Julie Shultz,1001,1700000010000");
    }

    #[test]
    fn write_decimal_handles_the_extremes() {
        for value in [0, 9, 10, 1_000_000, u64::MAX] {
            let mut text = String::new();
            write_decimal(&mut text, value).unwrap();
            assert_eq!(text, value.to_string());
        }
    }

    #[test]
    fn answer_sums_and_prints() {
        let mut first = Answer::default();
        first.add_row(&Q2Row {
            auction: 123,
            price: 1,
        });
        let mut second = Answer::default();
        second.add_row(&Q2Row {
            auction: 246,
            price: 2,
        });
        let mut merged = first;
        merged.merge(second);
        assert_eq!(merged.rows, 2);
        assert_eq!(
            merged.checksum,
            fnv1a64(b"123,1").wrapping_add(fnv1a64(b"246,2"))
        );
        let answer = Answer {
            rows: 9,
            checksum: 12_585_502_244_741_595_627,
        };
        assert_eq!(
            answer.line(Query::Q5),
            "q5 rows=9 checksum=12585502244741595627"
        );
    }

    #[test]
    fn query_names_parse_and_others_are_rejected() {
        for query in Query::ALL {
            assert_eq!(query.name().parse::<Query>(), Ok(query));
        }
        for bad in ["q4", "q6", "Q1", "", " q1", "q10"] {
            let error = bad.parse::<Query>().unwrap_err();
            assert_eq!(error.given, bad);
            let message = error.to_string();
            assert!(
                message.ends_with("valid queries are q0, q1, q2, q3, q5, q7, q8"),
                "{message}"
            );
        }
    }
}
