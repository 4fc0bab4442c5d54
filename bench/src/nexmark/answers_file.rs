//! Reads the reference answers in `shared/bench/answers.txt`.
//!
//! The file is a list of cases. A case opens with `events=N seed=S` and
//! continues with one answer line per query, `q5 rows=R checksum=C`, exactly
//! as [`Answer::line`] prints it. Blank lines and lines starting with `#` are
//! skipped. Both the baseline tests here and the end-to-end tests of the
//! engine check themselves against these cases.

use std::path::Path;

use anyhow::{anyhow, bail, Context};

use super::answer::{Answer, Query};
use super::generator::GeneratorConfig;

/// Where the reference answers live: `shared/` sits beside the repository
/// checkout, both locally and in CI.
pub const REFERENCE_ANSWERS_PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/bench/answers.txt"
);

/// The reference answers for one `(events, seed)` run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReferenceCase {
    pub events: u64,
    pub seed: u64,
    /// In file order, one per query listed for the case.
    pub answers: Vec<(Query, Answer)>,
}

impl ReferenceCase {
    pub fn config(&self) -> GeneratorConfig {
        GeneratorConfig {
            events: self.events,
            seed: self.seed,
        }
    }

    /// The reference answer of `query`, if the case lists one.
    pub fn answer(&self, query: Query) -> Option<Answer> {
        self.answers
            .iter()
            .find(|(listed, _)| *listed == query)
            .map(|(_, answer)| *answer)
    }
}

/// Reads and parses [`REFERENCE_ANSWERS_PATH`].
pub fn reference_answers() -> anyhow::Result<Vec<ReferenceCase>> {
    let path = Path::new(REFERENCE_ANSWERS_PATH);
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "reading the Nexmark reference answers at {} (shared/ must sit beside the repository)",
            path.display()
        )
    })?;
    parse_reference_answers(&text).with_context(|| {
        format!(
            "parsing the Nexmark reference answers at {}",
            path.display()
        )
    })
}

/// Parses the text of an answers file.
pub fn parse_reference_answers(text: &str) -> anyhow::Result<Vec<ReferenceCase>> {
    let mut cases: Vec<ReferenceCase> = Vec::new();
    for (line_index, line) in text.lines().enumerate() {
        let line_number = line_index + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let parsed = if line.starts_with("events=") {
            parse_case_header(line).map(|(events, seed)| {
                cases.push(ReferenceCase {
                    events,
                    seed,
                    answers: Vec::new(),
                })
            })
        } else {
            parse_answer_line(line).and_then(|(query, answer)| {
                let case = cases
                    .last_mut()
                    .ok_or_else(|| anyhow!("answer line before any `events=N seed=S` line"))?;
                if case.answer(query).is_some() {
                    bail!("{query} is listed twice for this case");
                }
                case.answers.push((query, answer));
                Ok(())
            })
        };
        parsed.with_context(|| format!("line {line_number}: {line:?}"))?;
    }
    if let Some(empty) = cases.iter().find(|case| case.answers.is_empty()) {
        bail!(
            "the case events={} seed={} lists no answers",
            empty.events,
            empty.seed
        );
    }
    Ok(cases)
}

/// Parses `events=N seed=S`.
fn parse_case_header(line: &str) -> anyhow::Result<(u64, u64)> {
    let mut fields = line.split_whitespace();
    let events = parse_field(fields.next(), "events")?;
    let seed = parse_field(fields.next(), "seed")?;
    if let Some(extra) = fields.next() {
        bail!("unexpected {extra:?} after the seed");
    }
    Ok((events, seed))
}

/// Parses `q5 rows=R checksum=C`.
fn parse_answer_line(line: &str) -> anyhow::Result<(Query, Answer)> {
    let mut fields = line.split_whitespace();
    let query: Query = fields
        .next()
        .ok_or_else(|| anyhow!("empty line"))?
        .parse()?;
    let rows = parse_field(fields.next(), "rows")?;
    let checksum = parse_field(fields.next(), "checksum")?;
    if let Some(extra) = fields.next() {
        bail!("unexpected {extra:?} after the checksum");
    }
    Ok((query, Answer { rows, checksum }))
}

/// Parses `name=<decimal u64>`.
fn parse_field(field: Option<&str>, name: &str) -> anyhow::Result<u64> {
    let field = field.ok_or_else(|| anyhow!("missing `{name}=`"))?;
    let value = field
        .strip_prefix(name)
        .and_then(|rest| rest.strip_prefix('='))
        .ok_or_else(|| anyhow!("expected `{name}=`, found {field:?}"))?;
    value
        .parse()
        .with_context(|| format!("`{name}` is not a decimal u64: {value:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cases_and_skips_comments() {
        let text = "# comment\n\nevents=10 seed=3\nq0 rows=1 checksum=2\nq8 rows=0 checksum=0\nevents=20 seed=4\nq5 rows=7 checksum=18446744073709551615\n";
        let cases = parse_reference_answers(text).unwrap();
        assert_eq!(cases.len(), 2);
        assert_eq!(
            cases[0].config(),
            GeneratorConfig {
                events: 10,
                seed: 3
            }
        );
        assert_eq!(
            cases[0].answer(Query::Q0),
            Some(Answer {
                rows: 1,
                checksum: 2
            })
        );
        assert_eq!(cases[0].answer(Query::Q5), None);
        assert_eq!(
            cases[1].answers,
            vec![(
                Query::Q5,
                Answer {
                    rows: 7,
                    checksum: u64::MAX
                }
            )]
        );
    }

    #[test]
    fn malformed_files_are_rejected_with_the_line() {
        for (text, expected) in [
            ("q0 rows=1 checksum=2\n", "line 1"),
            ("events=1 seed=2\nq4 rows=1 checksum=2\n", "line 2"),
            ("events=1 seed=2\nq0 rows=x checksum=2\n", "line 2"),
            ("events=1 seed=2\nq0 checksum=2 rows=1\n", "line 2"),
            ("events=1\nq0 rows=1 checksum=2\n", "line 1"),
            ("events=1 seed=2\n", "lists no answers"),
        ] {
            let error = format!("{:#}", parse_reference_answers(text).unwrap_err());
            assert!(error.contains(expected), "{text:?}: {error}");
        }
    }

    #[test]
    fn the_shared_file_is_found_and_complete() {
        let cases = reference_answers().unwrap();
        assert!(!cases.is_empty());
        for case in &cases {
            for query in Query::ALL {
                assert!(
                    case.answer(query).is_some(),
                    "events={} seed={} lacks {query}",
                    case.events,
                    case.seed
                );
            }
        }
    }
}
