//! Key-group redistribution: restoring keyed state at another parallelism.
//!
//! Key groups are the unit of keyed state, and their number (the max
//! parallelism) never changes for a job. Subtask `i` of `p` owns the key
//! groups `[ceil(i*m/p), ceil((i+1)*m/p))`. When a job is restored at
//! parallelism `p'`, each new subtask reads, from every old subtask whose
//! range overlaps its own, exactly the overlapping key groups:
//!
//! 1. compute the new subtask's range at `p'`;
//! 2. for every old subtask at `p`, intersect the old range with it;
//! 3. every non-empty intersection is one piece to read.
//!
//! Invariant: over all new subtasks, the pieces cover every key group
//! exactly once, so no state is lost or read twice.

use strom_core::key::KeyGroupRange;

/// A run of key groups that a new subtask takes from an old one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyGroupPiece {
    pub old_subtask: u32,
    pub key_groups: KeyGroupRange,
}

/// The pieces of old state that new subtask `new_subtask` of
/// `new_parallelism` restores, when the state was written at
/// `old_parallelism`.
pub fn pieces_for_subtask(
    max_parallelism: u32,
    old_parallelism: u32,
    new_parallelism: u32,
    new_subtask: u32,
) -> Vec<KeyGroupPiece> {
    let wanted = KeyGroupRange::for_subtask(max_parallelism, new_parallelism, new_subtask);
    (0..old_parallelism)
        .filter_map(|old_subtask| {
            let held = KeyGroupRange::for_subtask(max_parallelism, old_parallelism, old_subtask);
            let start = held.start.max(wanted.start);
            let end = held.end.min(wanted.end);
            (start < end).then_some(KeyGroupPiece {
                old_subtask,
                key_groups: KeyGroupRange { start, end },
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_group_is_restored_exactly_once_at_any_parallelism() {
        for max_parallelism in [1u32, 3, 128, 200] {
            for old in 1..=max_parallelism.min(9) {
                for new in 1..=max_parallelism.min(9) {
                    let mut restored = vec![0u32; max_parallelism as usize];
                    for new_subtask in 0..new {
                        for piece in pieces_for_subtask(max_parallelism, old, new, new_subtask) {
                            let held =
                                KeyGroupRange::for_subtask(max_parallelism, old, piece.old_subtask);
                            assert!(
                                held.start <= piece.key_groups.start
                                    && piece.key_groups.end <= held.end
                            );
                            for key_group in piece.key_groups.start..piece.key_groups.end {
                                restored[key_group as usize] += 1;
                            }
                        }
                    }
                    assert!(
                        restored.iter().all(|count| *count == 1),
                        "m={max_parallelism} {old}->{new}: {restored:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn scaling_from_two_to_three_splits_the_middle_subtask() {
        let pieces = pieces_for_subtask(128, 2, 3, 1);
        assert_eq!(
            pieces,
            vec![
                KeyGroupPiece {
                    old_subtask: 0,
                    key_groups: KeyGroupRange { start: 43, end: 64 }
                },
                KeyGroupPiece {
                    old_subtask: 1,
                    key_groups: KeyGroupRange { start: 64, end: 86 }
                },
            ]
        );
    }
}
