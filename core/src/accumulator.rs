//! Accumulators: named counters that subtasks add to and the JobManager
//! merges into the job's result, as Flink's `getAccumulatorResult`.

use std::collections::BTreeMap;

/// Named wrapping u64 sums. Merging adds, so the merged value is
/// independent of the order in which subtasks report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Accumulators {
    values: BTreeMap<String, u64>,
}

impl Accumulators {
    pub fn add(&mut self, name: &str, value: u64) {
        match self.values.get_mut(name) {
            Some(sum) => *sum = sum.wrapping_add(value),
            None => {
                self.values.insert(name.to_string(), value);
            }
        }
    }

    pub fn get(&self, name: &str) -> Option<u64> {
        self.values.get(name).copied()
    }

    pub fn merge(&mut self, other: &Accumulators) {
        for (name, value) in &other.values {
            self.add(name, *value);
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.values
            .iter()
            .map(|(name, value)| (name.as_str(), *value))
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}
