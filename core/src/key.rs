//! Keys and key groups.
//!
//! Keyed state is partitioned into key groups: `key_group = hash(key) %
//! max_parallelism`, and subtask `i` of `p` owns key groups
//! `[ceil(i*m/p), ceil((i+1)*m/p))`, so key group `g` goes to subtask
//! `g * p / m`. The hash must be the same in every process and every release,
//! because key groups name state in checkpoints and route records between
//! machines. It is therefore our own, unseeded, and defined here:
//!
//! 1. a key writes its canonical bytes into a [`KeyHasher`]: integers as
//!    little-endian fixed-width bytes, strings as their UTF-8 bytes followed
//!    by `0xFF`, sequences as their length (u64) then their elements;
//! 2. the hasher folds the bytes with FNV-1a 64 taken a 64-bit word at a
//!    time: each full little-endian word of the written bytes, then the
//!    remaining bytes zero-padded into one last word, is XORed into the
//!    state, which is then multiplied by the FNV prime (one multiply per
//!    word, not per byte, since this runs twice for every keyed record);
//! 3. the result is finished with murmur3's 64-bit finalizer (`fmix64`) so
//!    that small integer keys spread over the key groups.
//!
//! Rust's `Hash` is not used for this: its output depends on the hasher's
//! seed and is not promised to stay the same across releases.

/// The largest max parallelism a job may declare, as in Flink (2^15).
pub const MAX_PARALLELISM_UPPER_BOUND: u32 = 1 << 15;
/// The max parallelism of a job that does not set one.
pub const DEFAULT_MAX_PARALLELISM: u32 = 128;

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Folds a key's canonical bytes into the fixed key hash.
#[derive(Clone, Debug)]
pub struct KeyHasher {
    state: u64,
}

impl Default for KeyHasher {
    fn default() -> Self {
        KeyHasher {
            state: FNV_OFFSET_BASIS,
        }
    }
}

impl KeyHasher {
    pub fn write_bytes(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for word in &mut words {
            self.write_word(u64::from_le_bytes(
                word.try_into().expect("an 8-byte chunk"),
            ));
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let mut padded = [0u8; 8];
            padded[..rest.len()].copy_from_slice(rest);
            self.write_word(u64::from_le_bytes(padded));
        }
    }

    #[inline]
    fn write_word(&mut self, word: u64) {
        self.state = (self.state ^ word).wrapping_mul(FNV_PRIME);
    }

    #[inline]
    pub fn write_u64(&mut self, value: u64) {
        self.write_word(value);
    }

    pub fn finish(&self) -> u64 {
        fmix64(self.state)
    }
}

/// murmur3's 64-bit finalizer.
fn fmix64(mut value: u64) -> u64 {
    value ^= value >> 33;
    value = value.wrapping_mul(0xff51_afd7_ed55_8ccd);
    value ^= value >> 33;
    value = value.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    value ^= value >> 33;
    value
}

/// A type whose values have a stable key hash (see the module docs).
///
/// Implemented for integers, `bool`, `char`, strings, byte vectors, options,
/// tuples and arrays of keys. A struct key implements it by hashing its
/// fields in order.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be used as a key: it has no stable key hash",
    label = "the key selector returns `{Self}`",
    note = "a key needs `strom_core::KeyHash` so that every process puts it in the same key group; floats, pointers and hash maps have none. Implement `KeyHash` for your key type by hashing its fields in order."
)]
pub trait KeyHash {
    fn hash_key(&self, hasher: &mut KeyHasher);
}

/// Everything a key must be: hashable in a stable way, comparable, cheap
/// enough to clone into state tables, and a [`Record`](crate::Record) so that
/// checkpoints can write it.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be used as a key",
    label = "the key selector returns `{Self}`",
    note = "a key must implement `strom_core::KeyHash` (a stable hash), `Hash`, `Eq`, `Clone`, `Send` and rkyv's `Archive`, `Serialize` and `Deserialize`; floats, pointers and hash maps cannot be keys"
)]
pub trait Key: crate::record::Record + KeyHash + std::hash::Hash + Eq + std::fmt::Debug {}

impl<T> Key for T where T: crate::record::Record + KeyHash + std::hash::Hash + Eq + std::fmt::Debug {}

macro_rules! integer_key {
    ($($integer:ty),*) => {$(
        impl KeyHash for $integer {
            #[inline]
            fn hash_key(&self, hasher: &mut KeyHasher) {
                hasher.write_bytes(&self.to_le_bytes());
            }
        }
    )*};
}
integer_key!(u8, u16, u32, u128, i8, i16, i32, i128);

impl KeyHash for u64 {
    #[inline]
    fn hash_key(&self, hasher: &mut KeyHasher) {
        hasher.write_u64(*self);
    }
}

impl KeyHash for i64 {
    #[inline]
    fn hash_key(&self, hasher: &mut KeyHasher) {
        hasher.write_u64(*self as u64);
    }
}

impl KeyHash for bool {
    fn hash_key(&self, hasher: &mut KeyHasher) {
        hasher.write_bytes(&[u8::from(*self)]);
    }
}

impl KeyHash for char {
    fn hash_key(&self, hasher: &mut KeyHasher) {
        hasher.write_bytes(&u32::from(*self).to_le_bytes());
    }
}

impl KeyHash for str {
    fn hash_key(&self, hasher: &mut KeyHasher) {
        hasher.write_bytes(self.as_bytes());
        hasher.write_bytes(&[0xFF]);
    }
}

impl KeyHash for String {
    fn hash_key(&self, hasher: &mut KeyHasher) {
        self.as_str().hash_key(hasher);
    }
}

impl KeyHash for () {
    fn hash_key(&self, _hasher: &mut KeyHasher) {}
}

impl<T: KeyHash + ?Sized> KeyHash for &T {
    fn hash_key(&self, hasher: &mut KeyHasher) {
        (**self).hash_key(hasher);
    }
}

impl<T: KeyHash + ?Sized> KeyHash for Box<T> {
    fn hash_key(&self, hasher: &mut KeyHasher) {
        (**self).hash_key(hasher);
    }
}

impl<T: KeyHash> KeyHash for Option<T> {
    fn hash_key(&self, hasher: &mut KeyHasher) {
        match self {
            None => hasher.write_bytes(&[0]),
            Some(value) => {
                hasher.write_bytes(&[1]);
                value.hash_key(hasher);
            }
        }
    }
}

impl<T: KeyHash> KeyHash for Vec<T> {
    fn hash_key(&self, hasher: &mut KeyHasher) {
        self.as_slice().hash_key(hasher);
    }
}

impl<T: KeyHash> KeyHash for [T] {
    fn hash_key(&self, hasher: &mut KeyHasher) {
        hasher.write_u64(self.len() as u64);
        for element in self {
            element.hash_key(hasher);
        }
    }
}

impl<T: KeyHash, const N: usize> KeyHash for [T; N] {
    fn hash_key(&self, hasher: &mut KeyHasher) {
        self.as_slice().hash_key(hasher);
    }
}

macro_rules! tuple_key {
    ($(($($name:ident $index:tt),+)),*) => {$(
        impl<$($name: KeyHash),+> KeyHash for ($($name,)+) {
            fn hash_key(&self, hasher: &mut KeyHasher) {
                $(self.$index.hash_key(hasher);)+
            }
        }
    )*};
}
tuple_key!((A 0), (A 0, B 1), (A 0, B 1, C 2), (A 0, B 1, C 2, D 3));

/// The fixed, unseeded hash of a key.
pub fn key_hash<K: KeyHash + ?Sized>(key: &K) -> u64 {
    let mut hasher = KeyHasher::default();
    key.hash_key(&mut hasher);
    hasher.finish()
}

/// The key hash of a record (its key selector's key, hashed), for one
/// record or for a batch. The batch form is made where the selector's type
/// is known (`key_by`), so that the selector and the hash are inlined into
/// its loop: one dynamic call per batch rather than one per record.
pub(crate) struct RecordKeyHash<T> {
    one: std::sync::Arc<dyn Fn(&T) -> u64 + Send + Sync>,
    batch: std::sync::Arc<dyn Fn(&[crate::record::StreamRecord<T>], &mut Vec<u64>) + Send + Sync>,
}

impl<T> Clone for RecordKeyHash<T> {
    fn clone(&self) -> Self {
        RecordKeyHash {
            one: self.one.clone(),
            batch: self.batch.clone(),
        }
    }
}

impl<T: 'static> RecordKeyHash<T> {
    /// The hash of the key `key_selector` selects.
    pub(crate) fn new<K: KeyHash>(key_selector: impl Fn(&T) -> K + Send + Sync + 'static) -> Self {
        let one = std::sync::Arc::new(move |record: &T| key_hash(&key_selector(record)));
        let of_batch = one.clone();
        RecordKeyHash {
            one,
            batch: std::sync::Arc::new(move |records, hashes| {
                hashes.extend(records.iter().map(|record| of_batch(&record.value)));
            }),
        }
    }
}

impl<T> RecordKeyHash<T> {
    /// The key hash of `record`.
    #[inline]
    pub(crate) fn of(&self, record: &T) -> u64 {
        (self.one)(record)
    }

    /// Appends the key hash of each of `records` to `hashes`.
    #[inline]
    pub(crate) fn of_batch(
        &self,
        records: &[crate::record::StreamRecord<T>],
        hashes: &mut Vec<u64>,
    ) {
        (self.batch)(records, hashes)
    }
}

/// The key group of a key hash.
pub fn key_group_of_hash(hash: u64, max_parallelism: u32) -> u32 {
    (hash % u64::from(max_parallelism)) as u32
}

/// Computes key groups fast: a 64-bit `%` costs tens of cycles, twice per
/// keyed record (sender and receiver), so a power-of-two max parallelism
/// (the default 128) uses a mask, which gives the same result.
#[derive(Clone, Copy, Debug)]
pub struct KeyGroupAssigner {
    max_parallelism: u32,
    mask: Option<u64>,
}

impl KeyGroupAssigner {
    pub fn new(max_parallelism: u32) -> Self {
        assert!(max_parallelism >= 1);
        let mask = max_parallelism
            .is_power_of_two()
            .then(|| u64::from(max_parallelism) - 1);
        KeyGroupAssigner {
            max_parallelism,
            mask,
        }
    }

    #[inline]
    pub fn key_group_of_hash(&self, hash: u64) -> u32 {
        match self.mask {
            Some(mask) => (hash & mask) as u32,
            None => key_group_of_hash(hash, self.max_parallelism),
        }
    }

    pub fn max_parallelism(&self) -> u32 {
        self.max_parallelism
    }
}

/// The key group of a key.
pub fn key_group_of<K: KeyHash + ?Sized>(key: &K, max_parallelism: u32) -> u32 {
    key_group_of_hash(key_hash(key), max_parallelism)
}

/// The subtask that owns a key group.
pub fn subtask_for_key_group(key_group: u32, max_parallelism: u32, parallelism: u32) -> u32 {
    (u64::from(key_group) * u64::from(parallelism) / u64::from(max_parallelism)) as u32
}

/// The contiguous key groups `[start, end)` that one subtask owns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyGroupRange {
    pub start: u32,
    pub end: u32,
}

impl KeyGroupRange {
    pub fn for_subtask(max_parallelism: u32, parallelism: u32, subtask: u32) -> KeyGroupRange {
        assert!(parallelism >= 1 && parallelism <= max_parallelism);
        assert!(subtask < parallelism);
        let ceil_div = |numerator: u64, denominator: u64| numerator.div_ceil(denominator);
        let m = u64::from(max_parallelism);
        let p = u64::from(parallelism);
        KeyGroupRange {
            start: ceil_div(u64::from(subtask) * m, p) as u32,
            end: ceil_div((u64::from(subtask) + 1) * m, p) as u32,
        }
    }

    pub fn contains(&self, key_group: u32) -> bool {
        key_group >= self.start && key_group < self.end
    }

    pub fn count(&self) -> usize {
        (self.end - self.start) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_hash_is_fixed_across_releases() {
        // These values are part of the checkpoint and wire format: if this
        // test fails, state written by an earlier release lands in the wrong
        // key groups.
        assert_eq!(
            key_hash(&0u64),
            fmix64(FNV_OFFSET_BASIS.wrapping_mul(FNV_PRIME))
        );
        assert_eq!(
            key_hash(&7u64),
            fmix64((FNV_OFFSET_BASIS ^ 7).wrapping_mul(FNV_PRIME))
        );
        assert_eq!(key_hash(&7u64), key_hash(&7i64));
        let mut padded = KeyHasher::default();
        padded.write_u64(u64::from_le_bytes(*b"abc\0\0\0\0\0"));
        padded.write_u64(0xFF);
        assert_eq!(key_hash("abc"), padded.finish());
        assert_eq!(key_hash("a"), key_hash(&"a".to_string()));
        assert_ne!(key_hash(&(1u64, 2u64)), key_hash(&(2u64, 1u64)));
        assert_ne!(key_hash(&("ab", "c")), key_hash(&("a", "bc")));
    }

    #[test]
    fn key_group_ranges_agree_with_the_owner_formula() {
        for max_parallelism in [1u32, 7, 128, 1000] {
            for parallelism in 1..=max_parallelism.min(40) {
                let mut next = 0;
                for subtask in 0..parallelism {
                    let range = KeyGroupRange::for_subtask(max_parallelism, parallelism, subtask);
                    assert_eq!(range.start, next);
                    next = range.end;
                    for key_group in range.start..range.end {
                        assert_eq!(
                            subtask_for_key_group(key_group, max_parallelism, parallelism),
                            subtask
                        );
                    }
                }
                assert_eq!(next, max_parallelism);
            }
        }
    }

    #[test]
    fn the_fast_key_group_agrees_with_the_definition() {
        for max_parallelism in [1u32, 2, 7, 128, 1000, 1 << 15] {
            let assigner = KeyGroupAssigner::new(max_parallelism);
            for key in 0u64..2000 {
                let hash = key_hash(&key);
                assert_eq!(
                    assigner.key_group_of_hash(hash),
                    key_group_of_hash(hash, max_parallelism)
                );
            }
        }
    }

    #[test]
    fn small_integer_keys_spread_over_key_groups() {
        let mut counts = [0u32; 128];
        for key in 0u64..12_800 {
            counts[key_group_of(&key, 128) as usize] += 1;
        }
        assert!(
            counts.iter().all(|count| (50..150).contains(count)),
            "{counts:?}"
        );
    }
}
