//! Records and their encoding between tasks.
//!
//! Records are plain Rust types that derive rkyv's `Archive`, `Serialize` and
//! `Deserialize`. Inside a chain they are passed by value; between tasks a
//! writer gathers up to a batch of `(timestamp, record)` pairs per channel and
//! archives them as one rkyv buffer, which the consumer validates and reads in
//! place. Buffers are validated even within one process: the check is cheap
//! next to the work per record, and the same code then serves bytes that came
//! from a socket or a file. Between two tasks of one slot (one thread), the
//! writer hands its records over as they are ([`LocalRecords`]).

use rkyv::api::high::{HighDeserializer, HighSerializer, HighValidator};
use rkyv::bytecheck::CheckBytes;
use rkyv::rancor::Error as RkyvError;
use rkyv::ser::allocator::ArenaHandle;
use rkyv::util::AlignedVec;
use rkyv::vec::ArchivedVec;
use rkyv::{Archive, Deserialize, Serialize};

use crate::snapshot::{CheckpointBarrier, StateReader, StateWriter};
use crate::time::Timestamp;

/// A record with its event timestamp, as it travels between tasks.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct StreamRecord<T> {
    pub timestamp: i64,
    pub value: T,
}

/// One element of a channel between two tasks: a buffer of records or an
/// in-band event, in the order the producer emitted them.
#[derive(Debug)]
pub enum StreamElement {
    /// An rkyv-archived `Vec<StreamRecord<T>>`.
    Records(AlignedVec),
    /// Records from a task of the same slot, handed over as they are: no
    /// other core reads them, so they are not archived.
    Local(LocalRecords),
    /// Event time progress: no later record on this channel is older.
    Watermark(Timestamp),
    /// The channel turned idle (`true`) or active again (`false`).
    Idle(bool),
    /// A checkpoint barrier: every record before it belongs to the
    /// checkpoint, every record after it to the next.
    Barrier(CheckpointBarrier),
    /// The producer will send nothing more.
    EndOfInput,
}

/// What the engine needs of a record type. Implemented for every `Clone +
/// Send + 'static` type that derives rkyv's traits; users never implement it.
pub trait Record: Clone + Send + 'static {
    /// Archives `records` into `into`, an empty buffer (one with room
    /// enough, such as a spare buffer or one with the capacity of the
    /// channel's previous buffer, is written without growing). (A `Vec`, not
    /// a slice: the archived root is an `ArchivedVec`.)
    #[allow(clippy::ptr_arg)]
    fn encode(records: &Vec<StreamRecord<Self>>, into: AlignedVec) -> Result<AlignedVec, String>;
    /// Validates `bytes` and hands every record, deserialized, to `each`
    /// (compiled into the loop over the records: a call through a `dyn
    /// FnMut` per record cost the join of q8 at parallelism 2 about 5% of
    /// its time).
    fn decode(bytes: &[u8], each: impl FnMut(Self, Timestamp)) -> Result<(), String>;
    /// Appends one value to a snapshot: its archived length (u32), then its
    /// archived bytes.
    fn write_value(&self, writer: &mut StateWriter) -> Result<(), String>;
    /// Reads back one value that [`Record::write_value`] wrote, validating
    /// its archived bytes before deserializing them.
    fn read_value(reader: &mut StateReader<'_>) -> Result<Self, String>;
}

impl<T> Record for T
where
    T: Clone + Send + 'static + Archive,
    T: for<'a> Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, RkyvError>>,
    T::Archived: for<'a> CheckBytes<HighValidator<'a, RkyvError>>,
    T::Archived: Deserialize<T, HighDeserializer<RkyvError>>,
{
    #[allow(clippy::ptr_arg)]
    fn encode(records: &Vec<StreamRecord<Self>>, into: AlignedVec) -> Result<AlignedVec, String> {
        debug_assert!(into.is_empty());
        rkyv::api::high::to_bytes_in::<_, RkyvError>(records, into)
            .map_err(|error| error.to_string())
    }

    #[inline]
    fn decode(bytes: &[u8], mut each: impl FnMut(Self, Timestamp)) -> Result<(), String> {
        let archived = rkyv::access::<ArchivedVec<ArchivedStreamRecord<T>>, RkyvError>(bytes)
            .map_err(|error| error.to_string())?;
        for record in archived.iter() {
            let value = rkyv::deserialize::<T, RkyvError>(&record.value)
                .map_err(|error| error.to_string())?;
            each(value, record.timestamp.to_native());
        }
        Ok(())
    }

    fn write_value(&self, writer: &mut StateWriter) -> Result<(), String> {
        // Snapshots write many small values: one scratch buffer per thread
        // (and rkyv's per-thread arena) instead of two allocations each.
        thread_local! {
            static SCRATCH: std::cell::Cell<AlignedVec> = std::cell::Cell::new(AlignedVec::new());
        }
        let mut scratch = SCRATCH.take();
        scratch.clear();
        let result = rkyv::api::high::to_bytes_in::<_, RkyvError>(self, scratch);
        match result {
            Ok(bytes) => {
                writer.put_bytes(&bytes);
                SCRATCH.set(bytes);
                Ok(())
            }
            Err(error) => Err(error.to_string()),
        }
    }

    fn read_value(reader: &mut StateReader<'_>) -> Result<Self, String> {
        let bytes = reader.bytes()?;
        // Archived values must be read from aligned memory.
        let mut aligned = AlignedVec::<16>::with_capacity(bytes.len());
        aligned.extend_from_slice(bytes);
        rkyv::from_bytes::<Self, RkyvError>(&aligned).map_err(|error| error.to_string())
    }
}

/// A `Vec<StreamRecord<T>>` handed from one task to another of the same
/// slot (one thread): [`StreamElement::Local`]. The consumer reads the
/// values the producer made, not their archived copies, so a type whose
/// archive leaves out or changes fields (rkyv's `with` wrappers such as
/// `Skip`) reads differently within a slot than across slots; record types
/// should archive whole, as the Nexmark types do. Between tasks of one slot
/// a buffer was encoded, validated and decoded again for nothing: about a
/// fifth of q8's time at parallelism 2, where half of each shuffle stays
/// in its slot. The consumer takes the records and gives the emptied
/// vector back through the channel, so it is allocated once.
pub struct LocalRecords {
    records: Box<dyn std::any::Any + Send>,
    count: usize,
}

impl LocalRecords {
    /// Takes the records of `batch`, leaving it empty with the capacity of
    /// `spare` (a vector given back earlier, or a new one).
    #[allow(clippy::box_collection)] // the box is what goes round
    pub fn take<T: Record>(
        batch: &mut Vec<StreamRecord<T>>,
        spare: Box<Vec<StreamRecord<T>>>,
    ) -> LocalRecords {
        let mut records = spare;
        records.clear();
        std::mem::swap(&mut *records, batch);
        LocalRecords {
            count: records.len(),
            records,
        }
    }

    /// How many records it holds.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The records, for a consumer of `T`; an error names both types if
    /// they are another type's (a job graph whose edge types disagree).
    pub fn records_mut<T: Record>(&mut self) -> Result<&mut Vec<StreamRecord<T>>, String> {
        match self.records.downcast_mut::<Vec<StreamRecord<T>>>() {
            Some(records) => Ok(records),
            None => Err(format!(
                "records handed over within the slot are not of the type {} the consumer reads",
                std::any::type_name::<T>()
            )),
        }
    }

    /// The vector, to give back to the producer once read.
    pub fn into_spare(self) -> Box<dyn std::any::Any + Send> {
        self.records
    }
}

impl std::fmt::Debug for LocalRecords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LocalRecords({} records)", self.count)
    }
}

/// How many records a [`StreamElement::Records`] buffer holds, read from
/// its archived root without validating or touching the records: the root
/// of rkyv's default format is the buffer's last 8 bytes, an `ArchivedVec`
/// (a 32-bit relative pointer, then the 32-bit length, little-endian). For
/// counting (metrics); a buffer too short to hold a root counts 0.
pub fn buffer_record_count(bytes: &[u8]) -> u64 {
    const _: () = assert!(std::mem::size_of::<ArchivedVec<u8>>() == 8);
    match bytes
        .len()
        .checked_sub(4)
        .and_then(|start| bytes.get(start..))
    {
        Some(length) => u64::from(u32::from_le_bytes(length.try_into().expect("four bytes"))),
        None => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq)]
    struct Sample {
        id: u64,
        name: String,
    }

    #[test]
    fn a_buffer_tells_how_many_records_it_holds() {
        for count in [0u64, 1, 7, 1000] {
            let records: Vec<StreamRecord<Sample>> = (0..count)
                .map(|id| StreamRecord {
                    timestamp: id as i64,
                    value: Sample {
                        id,
                        name: "x".repeat(id as usize % 5),
                    },
                })
                .collect();
            let bytes = Sample::encode(&records, AlignedVec::new()).expect("encodes");
            assert_eq!(buffer_record_count(&bytes), count);
            let numbers: Vec<StreamRecord<u64>> = (0..count)
                .map(|value| StreamRecord {
                    timestamp: 0,
                    value,
                })
                .collect();
            assert_eq!(
                buffer_record_count(&u64::encode(&numbers, AlignedVec::new()).expect("encodes")),
                count
            );
        }
        assert_eq!(buffer_record_count(&[1, 2]), 0);
    }

    #[test]
    fn records_round_trip_through_a_buffer() {
        let records: Vec<StreamRecord<Sample>> = (0..100)
            .map(|id| StreamRecord {
                timestamp: id as i64 * 3,
                value: Sample {
                    id,
                    name: format!("n{id}"),
                },
            })
            .collect();
        let bytes = Sample::encode(&records, AlignedVec::new()).unwrap();
        let mut decoded = Vec::new();
        Sample::decode(&bytes, &mut |value, timestamp| {
            decoded.push(StreamRecord { timestamp, value })
        })
        .unwrap();
        assert_eq!(decoded, records);
    }

    #[test]
    fn a_damaged_buffer_is_refused() {
        let records = vec![StreamRecord {
            timestamp: 1,
            value: Sample {
                id: 1,
                name: "x".into(),
            },
        }];
        let bytes = Sample::encode(&records, AlignedVec::new()).unwrap();
        let truncated = &bytes[..bytes.len() / 2];
        let mut aligned = AlignedVec::<16>::new();
        aligned.extend_from_slice(truncated);
        assert!(Sample::decode(&aligned, &mut |_, _| {}).is_err());
    }
}
