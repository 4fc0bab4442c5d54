//! Keyed state in memory, scoped to a key and its key group.
//!
//! Each keyed operator owns one [`KeyedStateStore`]: a list of named state
//! tables, each split into one hash map per key group that its subtask owns,
//! so that a later snapshot can write (and a restore redistribute) state one
//! key group at a time. User functions register state in `open` and get a
//! small typed handle ([`ValueState`], [`ListState`], [`MapState`],
//! [`ReducingState`]) that reads and writes the entry of the current key
//! through the [`KeyedContext`](crate::function::KeyedContext).

use std::any::Any;
use std::collections::BTreeMap;
use std::collections::HashMap as StdHashMap;
use std::hash::Hash;
use std::marker::PhantomData;
use std::rc::Rc;
use std::sync::Arc;

use hashbrown::hash_map::RawEntryMut;
use rustc_hash::{FxBuildHasher, FxHashSet};

use crate::function::KeyedContext;
use crate::key::{key_hash, Key, KeyGroupAssigner, KeyGroupRange};
use crate::record::Record;
use crate::snapshot::{KeyedCapture, StateReader, StateWriter};
use crate::time::Timestamp;

/// The hash maps of keyed state and timers. Keys come from inside the job,
/// and hashing them is the hottest work of a keyed operator, so state uses
/// the fast FxHash rather than the DoS-resistant default.
type HashMap<K, V> = hashbrown::HashMap<K, V, FxBuildHasher>;
type HashSet<K> = FxHashSet<K>;

/// How a table writes and reads its values in a snapshot.
pub struct ValueCodec<V> {
    pub(crate) write: Arc<dyn Fn(&V, &mut StateWriter) -> Result<(), String> + Send + Sync>,
    pub(crate) read: Arc<dyn Fn(&mut StateReader<'_>) -> Result<V, String> + Send + Sync>,
}

impl<V> Clone for ValueCodec<V> {
    fn clone(&self) -> Self {
        ValueCodec {
            write: self.write.clone(),
            read: self.read.clone(),
        }
    }
}

impl<V> ValueCodec<V> {
    pub(crate) fn new(
        write: impl Fn(&V, &mut StateWriter) -> Result<(), String> + Send + Sync + 'static,
        read: impl Fn(&mut StateReader<'_>) -> Result<V, String> + Send + Sync + 'static,
    ) -> Self {
        ValueCodec {
            write: Arc::new(write),
            read: Arc::new(read),
        }
    }
}

impl<V: Record> ValueCodec<V> {
    /// A value that is a record itself.
    pub(crate) fn record() -> Self {
        ValueCodec::new(V::write_value, V::read_value)
    }
}

/// The values of one key's [`ListState`]. Two values are held inline, in
/// the room a `Vec` takes when they are 8 bytes or less: most keys of a
/// list state hold a value or two (q3's auctions waiting for their seller),
/// and a heap allocation per key would cost more than the rest of an
/// `add` (with one value inline, a third of q3's adds grew a list).
pub(crate) type ListValues<V> = smallvec::SmallVec<[V; 2]>;

impl<V: Record, C> ValueCodec<C>
where
    C: std::ops::Deref<Target = [V]> + FromIterator<V> + 'static,
{
    /// A list of records (as a `Vec` or as [`ListValues`]: one layout).
    pub(crate) fn list() -> Self {
        ValueCodec::new(
            |values: &C, writer| {
                writer.put_u32(values.len() as u32);
                values
                    .iter()
                    .try_for_each(|value| value.write_value(writer))
            },
            |reader| {
                let count = reader.u32()?;
                (0..count).map(|_| V::read_value(reader)).collect()
            },
        )
    }
}

impl<V: Record> ValueCodec<Option<V>> {
    /// An optional record.
    pub(crate) fn option() -> Self {
        ValueCodec::new(
            |value: &Option<V>, writer| match value {
                None => {
                    writer.put_u32(0);
                    Ok(())
                }
                Some(value) => {
                    writer.put_u32(1);
                    value.write_value(writer)
                }
            },
            |reader| match reader.u32()? {
                0 => Ok(None),
                1 => Ok(Some(V::read_value(reader)?)),
                other => Err(format!("an optional value has tag {other}")),
            },
        )
    }
}

/// The entries a key group's map has room for when its first key comes.
/// A map grown from nothing doubles its room (and rehashes) at 3, 7, 14,
/// 28 and 56 entries; a job's state is spread over 128 key groups by
/// default, so q3's two tables, of about 15,000 keys each at 2,000,000
/// events, paid for 1,617 rehashes (3% of its instructions). Flink's heap
/// backend likewise starts each key group's map at 128 buckets
/// (`CopyOnWriteStateMap.DEFAULT_CAPACITY`); 56 entries fill 64 buckets.
const GROUP_INITIAL_CAPACITY: usize = 56;

/// One state: per owned key group, the value of every key. Each key group's
/// map is shared copy-on-write with the snapshots taken of it: the first
/// write after a snapshot copies that key group alone.
pub struct StateTable<K, V> {
    groups: Vec<Rc<HashMap<K, V>>>,
    codec: ValueCodec<V>,
}

impl<K: Key, V: Clone + 'static> StateTable<K, V> {
    fn new(key_group_count: usize, codec: ValueCodec<V>) -> Self {
        StateTable {
            groups: (0..key_group_count)
                .map(|_| Rc::new(HashMap::default()))
                .collect(),
            codec,
        }
    }

    /// The key group's map, copied first if a snapshot still shares it.
    #[inline]
    fn group_mut(&mut self, group_index: usize) -> &mut HashMap<K, V> {
        Rc::make_mut(&mut self.groups[group_index])
    }

    /// The key group's map for an insert: as [`StateTable::group_mut`],
    /// and a map that has never held an entry is given room for
    /// [`GROUP_INITIAL_CAPACITY`] at once.
    #[inline]
    fn group_for_insert(&mut self, group_index: usize) -> &mut HashMap<K, V> {
        let group = self.group_mut(group_index);
        if group.capacity() == 0 {
            group.reserve(GROUP_INITIAL_CAPACITY);
        }
        group
    }

    pub fn get(&self, group_index: usize, key: &K) -> Option<&V> {
        self.groups[group_index].get(key)
    }

    pub fn get_mut(&mut self, group_index: usize, key: &K) -> Option<&mut V> {
        self.group_mut(group_index).get_mut(key)
    }

    /// The entry of `key`, created with `default` when absent. The key is
    /// cloned only when the entry is new.
    pub fn get_or_insert_with(
        &mut self,
        group_index: usize,
        key: &K,
        default: impl FnOnce() -> V,
    ) -> &mut V {
        // One hash and one probe whether the key is there or not.
        self.group_for_insert(group_index)
            .raw_entry_mut()
            .from_key(key)
            .or_insert_with(|| (key.clone(), default()))
            .1
    }

    /// Adds `item` to the value of `key` with `add`, or, when it has none,
    /// inserts `make(item)`: one hash and one probe either way. A new
    /// entry is written whole, not made empty and then added to (which
    /// read back what had just been written to a bucket the cache did not
    /// hold: most of q3's `ListState::add`).
    #[inline]
    pub fn add_or_insert<T>(
        &mut self,
        group_index: usize,
        key: &K,
        item: T,
        add: impl FnOnce(&mut V, T),
        make: impl FnOnce(T) -> V,
    ) {
        match self
            .group_for_insert(group_index)
            .raw_entry_mut()
            .from_key(key)
        {
            RawEntryMut::Occupied(mut entry) => add(entry.get_mut(), item),
            RawEntryMut::Vacant(entry) => {
                entry.insert(key.clone(), make(item));
            }
        }
    }

    /// Sets the value of `key`: one hash and one probe whether the key is
    /// there or not; the key is cloned only when the entry is new.
    #[inline]
    pub fn insert(&mut self, group_index: usize, key: &K, value: V) {
        self.add_or_insert(
            group_index,
            key,
            value,
            |old, value| *old = value,
            |value| value,
        );
    }

    #[inline]
    pub fn remove(&mut self, group_index: usize, key: &K) -> Option<V> {
        let group = &mut self.groups[group_index];
        if let Some(map) = Rc::get_mut(group) {
            return map.remove(key);
        }
        // Shared with a snapshot: copied only if there is something to
        // remove.
        if !group.contains_key(key) {
            return None;
        }
        Rc::make_mut(group).remove(key)
    }

    /// How many keys hold an entry, over all key groups.
    pub fn len(&self) -> usize {
        self.groups.iter().map(|group| group.len()).sum()
    }

    /// Visits every key and its value, over all key groups, keeping those
    /// for which `keep` returns true. Each key group is copied first if a
    /// snapshot still shares it, as for any write.
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &mut V) -> bool) {
        for group in &mut self.groups {
            if !group.is_empty() {
                Rc::make_mut(group).retain(|key, value| keep(key, value));
            }
        }
    }

    /// Every key and its value, over all key groups.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.groups.iter().flat_map(|group| group.iter())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A state table with its types erased, as the store keeps it.
trait ErasedTable: Any {
    /// Shares every key group with a snapshot (copy-on-write).
    fn capture(&self) -> Box<dyn TableCapture>;
    /// Reads one key group's entries, as [`TableCapture::write_group`]
    /// wrote them, into the table.
    fn restore_group(
        &mut self,
        group_index: usize,
        reader: &mut StateReader<'_>,
    ) -> Result<(), String>;
}

/// One table's share of a snapshot.
trait TableCapture {
    fn entry_count(&self, group_index: usize) -> usize;
    fn write_group(&self, group_index: usize, writer: &mut StateWriter) -> Result<(), String>;
}

struct CapturedTable<K, V> {
    groups: Vec<Rc<HashMap<K, V>>>,
    codec: ValueCodec<V>,
}

impl<K: Key, V: Clone + 'static> TableCapture for CapturedTable<K, V> {
    fn entry_count(&self, group_index: usize) -> usize {
        self.groups[group_index].len()
    }

    fn write_group(&self, group_index: usize, writer: &mut StateWriter) -> Result<(), String> {
        let group = &self.groups[group_index];
        writer.put_u32(group.len() as u32);
        for (key, value) in group.iter() {
            key.write_value(writer)?;
            (self.codec.write)(value, writer)?;
        }
        Ok(())
    }
}

impl<K: Key, V: Clone + 'static> ErasedTable for StateTable<K, V> {
    fn capture(&self) -> Box<dyn TableCapture> {
        Box::new(CapturedTable {
            groups: self.groups.clone(),
            codec: self.codec.clone(),
        })
    }

    fn restore_group(
        &mut self,
        group_index: usize,
        reader: &mut StateReader<'_>,
    ) -> Result<(), String> {
        let count = reader.u32()?;
        let read = self.codec.read.clone();
        let group = self.group_mut(group_index);
        for _ in 0..count {
            let key = K::read_value(reader)?;
            let value = read(reader)?;
            group.insert(key, value);
        }
        Ok(())
    }
}

/// The keyed state of one operator subtask.
pub struct KeyedStateStore<K> {
    key_groups: KeyGroupRange,
    assigner: KeyGroupAssigner,
    tables: Vec<Box<dyn ErasedTable>>,
    names: Vec<String>,
    _key: PhantomData<fn() -> K>,
}

impl<K: Key> KeyedStateStore<K> {
    pub fn new(key_groups: KeyGroupRange, max_parallelism: u32) -> Self {
        KeyedStateStore {
            key_groups,
            assigner: KeyGroupAssigner::new(max_parallelism),
            tables: Vec::new(),
            names: Vec::new(),
            _key: PhantomData,
        }
    }

    pub fn key_groups(&self) -> KeyGroupRange {
        self.key_groups
    }

    /// The index, within this subtask's key groups, of the group of `key`.
    ///
    /// Panics when the key belongs to another subtask: the key selector is
    /// then not deterministic, and state would silently split.
    pub fn group_index(&self, key: &K) -> usize {
        let key_group = self.assigner.key_group_of_hash(key_hash(key));
        assert!(
            self.key_groups.contains(key_group),
            "key {key:?} is in key group {key_group}, which subtask key groups {:?} do not own: is the key selector deterministic?",
            self.key_groups
        );
        (key_group - self.key_groups.start) as usize
    }

    /// Registers (or finds) the table `name` with values of type `V`.
    pub(crate) fn table_index<V: Clone + 'static>(
        &mut self,
        name: &str,
        codec: ValueCodec<V>,
    ) -> usize {
        if let Some(index) = self.names.iter().position(|existing| existing == name) {
            assert!(
                (&*self.tables[index] as &dyn Any).is::<StateTable<K, V>>(),
                "state '{name}' was registered twice with different types"
            );
            return index;
        }
        self.tables.push(Box::new(StateTable::<K, V>::new(
            self.key_groups.count(),
            codec,
        )));
        self.names.push(name.to_string());
        self.tables.len() - 1
    }

    pub fn table<V: 'static>(&self, index: usize) -> &StateTable<K, V> {
        self.tables
            .get(index)
            .and_then(|table| (&**table as &dyn Any).downcast_ref())
            .expect("state handle used before it was registered in open()")
    }

    pub fn table_mut<V: 'static>(&mut self, index: usize) -> &mut StateTable<K, V> {
        self.tables
            .get_mut(index)
            .and_then(|table| (&mut **table as &mut dyn Any).downcast_mut())
            .expect("state handle used before it was registered in open()")
    }

    pub fn value_state<V: Record>(&mut self, name: &str) -> ValueState<V> {
        ValueState {
            index: self.table_index::<V>(name, ValueCodec::record()),
            _value: PhantomData,
        }
    }

    pub fn list_state<V: Record>(&mut self, name: &str) -> ListState<V> {
        ListState {
            index: self.table_index::<ListValues<V>>(name, ValueCodec::list()),
            _value: PhantomData,
        }
    }

    pub fn map_state<MK: Record + Hash + Eq, MV: Record>(
        &mut self,
        name: &str,
    ) -> MapState<MK, MV> {
        let codec = ValueCodec::new(
            |map: &StdHashMap<MK, MV>, writer| {
                writer.put_u32(map.len() as u32);
                map.iter().try_for_each(|(key, value)| {
                    key.write_value(writer)?;
                    value.write_value(writer)
                })
            },
            |reader| {
                let count = reader.u32()?;
                (0..count)
                    .map(|_| Ok((MK::read_value(reader)?, MV::read_value(reader)?)))
                    .collect()
            },
        );
        MapState {
            // The type its accessors read the table as.
            index: self.table_index::<StdHashMap<MK, MV>>(name, codec),
            _value: PhantomData,
        }
    }

    pub fn reducing_state<V: Record>(
        &mut self,
        name: &str,
        reduce: impl Fn(&V, V) -> V + Send + Sync + 'static,
    ) -> ReducingState<V> {
        ReducingState {
            index: self.table_index::<V>(name, ValueCodec::record()),
            reduce: Some(Arc::new(reduce)),
        }
    }

    /// Captures every table copy-on-write, with the timers' share per key
    /// group already encoded (`timers[group_index]`).
    pub(crate) fn capture(&self, timers: Vec<Vec<u8>>) -> Box<dyn KeyedCapture> {
        Box::new(StoreCapture {
            key_groups: self.key_groups,
            names: self.names.clone(),
            tables: self.tables.iter().map(|table| table.capture()).collect(),
            timers,
        })
    }

    /// Captures every table, for an operator that derives its timers from
    /// its state instead of writing them (windows).
    pub(crate) fn capture_without_timers(&self) -> Box<dyn KeyedCapture> {
        self.capture(no_timers(self.key_groups.count()))
    }

    /// Restores key groups captured by
    /// [`KeyedStateStore::capture_without_timers`].
    pub(crate) fn restore_without_timers(
        &mut self,
        key_groups: &[(u32, Vec<u8>)],
    ) -> Result<(), String> {
        self.restore(key_groups, |_, reader| match reader.u32()? {
            0 => Ok(()),
            count => Err(format!("{count} timers where none were written")),
        })
    }

    /// Restores key groups serialized by a capture. Returns each key
    /// group's timer bytes, for the operator to register.
    pub(crate) fn restore(
        &mut self,
        key_groups: &[(u32, Vec<u8>)],
        mut restore_timers: impl FnMut(usize, &mut StateReader<'_>) -> Result<(), String>,
    ) -> Result<(), String> {
        for (key_group, bytes) in key_groups {
            if !self.key_groups.contains(*key_group) {
                return Err(format!(
                    "the snapshot holds key group {key_group}, which this subtask (key groups {:?}) does not own",
                    self.key_groups
                ));
            }
            let group_index = (key_group - self.key_groups.start) as usize;
            let mut reader = StateReader::new(bytes);
            let table_count = reader.u32()?;
            for _ in 0..table_count {
                let name = reader.string()?;
                let Some(index) = self.names.iter().position(|existing| *existing == name) else {
                    return Err(format!(
                        "the snapshot holds state '{name}', which the operator does not register"
                    ));
                };
                self.tables[index]
                    .restore_group(group_index, &mut reader)
                    .map_err(|error| format!("state '{name}' of key group {key_group}: {error}"))?;
            }
            restore_timers(group_index, &mut reader)
                .map_err(|error| format!("timers of key group {key_group}: {error}"))?;
            if !reader.is_empty() {
                return Err(format!("key group {key_group} has bytes after its state"));
            }
        }
        Ok(())
    }
}

/// A keyed state store's capture.
struct StoreCapture {
    key_groups: KeyGroupRange,
    names: Vec<String>,
    tables: Vec<Box<dyn TableCapture>>,
    timers: Vec<Vec<u8>>,
}

impl KeyedCapture for StoreCapture {
    fn group_count(&self) -> usize {
        self.key_groups.count()
    }

    /// Layout of a key group: the table count (u32); per table its name
    /// and entry count, then every key and value; then the timers, as the
    /// operator encoded them (a count, then per timer its timestamp, key
    /// and namespace).
    fn serialize_group(&self, group_index: usize) -> Result<Option<(u32, Vec<u8>)>, String> {
        let timers = &self.timers[group_index];
        let tables: Vec<usize> = (0..self.tables.len())
            .filter(|table| self.tables[*table].entry_count(group_index) > 0)
            .collect();
        if tables.is_empty() && timers.len() <= 4 {
            return Ok(None);
        }
        let mut writer = StateWriter::default();
        writer.put_u32(tables.len() as u32);
        for table in tables {
            writer.put_str(&self.names[table]);
            self.tables[table].write_group(group_index, &mut writer)?;
        }
        writer.bytes.extend_from_slice(timers);
        Ok(Some((
            self.key_groups.start + group_index as u32,
            writer.bytes,
        )))
    }
}

const UNREGISTERED: usize = usize::MAX;

/// A single value per key.
pub struct ValueState<V> {
    index: usize,
    _value: PhantomData<fn() -> V>,
}

/// A list of values per key.
pub struct ListState<V> {
    index: usize,
    _value: PhantomData<fn() -> V>,
}

/// A map per key.
pub struct MapState<MK, MV> {
    index: usize,
    _value: PhantomData<fn() -> (MK, MV)>,
}

/// A value per key that every `add` folds into with a reduce function.
pub struct ReducingState<V> {
    index: usize,
    reduce: Option<Arc<dyn Fn(&V, V) -> V + Send + Sync>>,
}

macro_rules! handle_impls {
    ($($handle:ident < $($parameter:ident),+ >),*) => {$(
        impl<$($parameter),+> Default for $handle<$($parameter),+> {
            fn default() -> Self {
                $handle { index: UNREGISTERED, _value: PhantomData }
            }
        }
        impl<$($parameter),+> Clone for $handle<$($parameter),+> {
            fn clone(&self) -> Self {
                $handle { index: self.index, _value: PhantomData }
            }
        }
    )*};
}
handle_impls!(ValueState<V>, ListState<V>, MapState<MK, MV>);

impl<V> Default for ReducingState<V> {
    fn default() -> Self {
        ReducingState {
            index: UNREGISTERED,
            reduce: None,
        }
    }
}

impl<V> Clone for ReducingState<V> {
    fn clone(&self) -> Self {
        ReducingState {
            index: self.index,
            reduce: self.reduce.clone(),
        }
    }
}

impl<V: Record> ValueState<V> {
    #[inline]
    pub fn value<'c, K: Key>(&self, context: &'c KeyedContext<'_, K>) -> Option<&'c V> {
        let (store, group, key) = context.state_scope();
        store.table::<V>(self.index).get(group, key)
    }

    pub fn value_mut<'c, K: Key>(&self, context: &'c mut KeyedContext<'_, K>) -> Option<&'c mut V> {
        let (store, group, key) = context.state_scope_mut();
        store.table_mut::<V>(self.index).get_mut(group, key)
    }

    #[inline]
    pub fn update<K: Key>(&self, context: &mut KeyedContext<'_, K>, value: V) {
        let (store, group, key) = context.state_scope_mut();
        store.table_mut::<V>(self.index).insert(group, key, value);
    }

    pub fn clear<K: Key>(&self, context: &mut KeyedContext<'_, K>) -> Option<V> {
        let (store, group, key) = context.state_scope_mut();
        store.table_mut::<V>(self.index).remove(group, key)
    }
}

impl<V: Record> ListState<V> {
    pub fn get<'c, K: Key>(&self, context: &'c KeyedContext<'_, K>) -> &'c [V] {
        let (store, group, key) = context.state_scope();
        store
            .table::<ListValues<V>>(self.index)
            .get(group, key)
            .map(|values| values.as_slice())
            .unwrap_or(&[])
    }

    #[inline]
    pub fn add<K: Key>(&self, context: &mut KeyedContext<'_, K>, value: V) {
        let (store, group, key) = context.state_scope_mut();
        store.table_mut::<ListValues<V>>(self.index).add_or_insert(
            group,
            key,
            value,
            |values, value| values.push(value),
            |value| smallvec::smallvec![value],
        );
    }

    /// Removes the list of the current key and returns its values, in the
    /// order they were added.
    #[inline]
    pub fn take<K: Key>(
        &self,
        context: &mut KeyedContext<'_, K>,
    ) -> impl ExactSizeIterator<Item = V> {
        let (store, group, key) = context.state_scope_mut();
        store
            .table_mut::<ListValues<V>>(self.index)
            .remove(group, key)
            .unwrap_or_default()
            .into_iter()
    }
}

impl<MK: Record + Hash + Eq, MV: Record> MapState<MK, MV> {
    pub fn get<'c, K: Key>(
        &self,
        context: &'c KeyedContext<'_, K>,
        map_key: &MK,
    ) -> Option<&'c MV> {
        let (store, group, key) = context.state_scope();
        store
            .table::<StdHashMap<MK, MV>>(self.index)
            .get(group, key)
            .and_then(|map| map.get(map_key))
    }

    pub fn put<K: Key>(&self, context: &mut KeyedContext<'_, K>, map_key: MK, value: MV) {
        let (store, group, key) = context.state_scope_mut();
        store
            .table_mut::<StdHashMap<MK, MV>>(self.index)
            .get_or_insert_with(group, key, StdHashMap::new)
            .insert(map_key, value);
    }

    pub fn remove<K: Key>(&self, context: &mut KeyedContext<'_, K>, map_key: &MK) -> Option<MV> {
        let (store, group, key) = context.state_scope_mut();
        store
            .table_mut::<StdHashMap<MK, MV>>(self.index)
            .get_mut(group, key)
            .and_then(|map| map.remove(map_key))
    }

    pub fn entries<'c, K: Key>(
        &self,
        context: &'c KeyedContext<'_, K>,
    ) -> impl Iterator<Item = (&'c MK, &'c MV)> {
        let (store, group, key) = context.state_scope();
        store
            .table::<StdHashMap<MK, MV>>(self.index)
            .get(group, key)
            .into_iter()
            .flat_map(|map| map.iter())
    }

    pub fn clear<K: Key>(&self, context: &mut KeyedContext<'_, K>) {
        let (store, group, key) = context.state_scope_mut();
        store
            .table_mut::<StdHashMap<MK, MV>>(self.index)
            .remove(group, key);
    }
}

impl<V: Record> ReducingState<V> {
    pub fn get<'c, K: Key>(&self, context: &'c KeyedContext<'_, K>) -> Option<&'c V> {
        let (store, group, key) = context.state_scope();
        store.table::<V>(self.index).get(group, key)
    }

    pub fn add<K: Key>(&self, context: &mut KeyedContext<'_, K>, value: V) {
        let reduce = self
            .reduce
            .as_ref()
            .expect("state handle used before it was registered in open()");
        let (store, group, key) = context.state_scope_mut();
        let table = store.table_mut::<V>(self.index);
        let reduced = match table.remove(group, key) {
            Some(current) => reduce(&current, value),
            None => value,
        };
        table.insert(group, key, reduced);
    }

    pub fn clear<K: Key>(&self, context: &mut KeyedContext<'_, K>) -> Option<V> {
        let (store, group, key) = context.state_scope_mut();
        store.table_mut::<V>(self.index).remove(group, key)
    }
}

/// Event-time timers of one operator subtask, per key and namespace.
///
/// A timer fires once the watermark reaches its timestamp. With
/// deduplication on (user timers, as in Flink), registering the same
/// `(key, namespace, timestamp)` twice keeps one timer; operators that
/// register each timer once by construction turn it off.
pub struct TimerService<K, N> {
    queue: BTreeMap<Timestamp, Vec<(K, N)>>,
    registered: HashSet<(K, N, Timestamp)>,
    deduplicate: bool,
}

/// The timers part of every key group when an operator derives its timers
/// from its state instead of writing them (a count of 0 per key group).
fn no_timers(group_count: usize) -> Vec<Vec<u8>> {
    vec![0u32.to_le_bytes().to_vec(); group_count]
}

impl<K: Key, N: Hash + Eq + Clone> TimerService<K, N> {
    pub fn new(deduplicate: bool) -> Self {
        TimerService {
            queue: BTreeMap::new(),
            registered: HashSet::default(),
            deduplicate,
        }
    }

    pub fn register(&mut self, key: &K, namespace: &N, timestamp: Timestamp) {
        if self.deduplicate
            && !self
                .registered
                .insert((key.clone(), namespace.clone(), timestamp))
        {
            return;
        }
        self.queue
            .entry(timestamp)
            .or_default()
            .push((key.clone(), namespace.clone()));
    }

    pub fn delete(&mut self, key: &K, namespace: &N, timestamp: Timestamp) {
        if self.deduplicate
            && !self
                .registered
                .remove(&(key.clone(), namespace.clone(), timestamp))
        {
            return;
        }
        if let Some(timers) = self.queue.get_mut(&timestamp) {
            if let Some(position) = timers.iter().position(|(k, n)| k == key && n == namespace) {
                timers.swap_remove(position);
            }
            if timers.is_empty() {
                self.queue.remove(&timestamp);
            }
        }
    }

    /// The next timer at or before `watermark`, removed.
    pub fn pop_ready(&mut self, watermark: Timestamp) -> Option<(Timestamp, K, N)> {
        loop {
            let mut entry = self.queue.first_entry()?;
            let timestamp = *entry.key();
            if timestamp > watermark {
                return None;
            }
            let timers = entry.get_mut();
            let Some((key, namespace)) = timers.pop() else {
                entry.remove();
                continue;
            };
            if timers.is_empty() {
                entry.remove();
            }
            if self.deduplicate {
                self.registered
                    .remove(&(key.clone(), namespace.clone(), timestamp));
            }
            return Some((timestamp, key, namespace));
        }
    }

    pub fn len(&self) -> usize {
        self.queue.values().map(Vec::len).sum()
    }

    /// Every timer, encoded per key group of `store` (index within the
    /// subtask's key groups): a count (u32), then per timer its timestamp,
    /// key and namespace. Copied at the barrier: timers are few next to
    /// the state they belong to.
    pub(crate) fn encode_by_group(&self, store: &KeyedStateStore<K>) -> Result<Vec<Vec<u8>>, String>
    where
        N: Record,
    {
        let mut groups: Vec<Vec<(Timestamp, &K, &N)>> = (0..store.key_groups().count())
            .map(|_| Vec::new())
            .collect();
        for (timestamp, timers) in &self.queue {
            for (key, namespace) in timers {
                groups[store.group_index(key)].push((*timestamp, key, namespace));
            }
        }
        groups
            .into_iter()
            .map(|timers| {
                let mut writer = StateWriter::default();
                writer.put_u32(timers.len() as u32);
                for (timestamp, key, namespace) in timers {
                    writer.put_i64(timestamp);
                    key.write_value(&mut writer)?;
                    namespace.write_value(&mut writer)?;
                }
                Ok(writer.bytes)
            })
            .collect()
    }

    /// Registers the timers of one key group that
    /// [`TimerService::encode_by_group`] wrote.
    pub(crate) fn restore_group(&mut self, reader: &mut StateReader<'_>) -> Result<(), String>
    where
        N: Record,
    {
        let count = reader.u32()?;
        for _ in 0..count {
            let timestamp = reader.i64()?;
            let key = K::read_value(reader)?;
            let namespace = N::read_value(reader)?;
            self.register(&key, &namespace, timestamp);
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timers_fire_in_order_once_and_can_be_deleted() {
        let mut timers = TimerService::<u64, ()>::new(true);
        timers.register(&1, &(), 30);
        timers.register(&2, &(), 10);
        timers.register(&2, &(), 10);
        timers.register(&3, &(), 20);
        timers.delete(&3, &(), 20);
        assert_eq!(timers.pop_ready(25), Some((10, 2, ())));
        assert_eq!(timers.pop_ready(25), None);
        assert_eq!(timers.pop_ready(i64::MAX), Some((30, 1, ())));
        assert!(timers.is_empty());
    }

    #[test]
    fn tables_are_split_by_key_group() {
        let range = KeyGroupRange::for_subtask(128, 1, 0);
        let mut store = KeyedStateStore::<u64>::new(range, 128);
        let index = store.table_index::<u64>("count", ValueCodec::record());
        for key in 0..1000u64 {
            let group = store.group_index(&key);
            *store
                .table_mut::<u64>(index)
                .get_or_insert_with(group, &key, || 0) += key;
        }
        assert_eq!(store.table::<u64>(index).len(), 1000);
        let group = store.group_index(&7);
        assert_eq!(store.table::<u64>(index).get(group, &7), Some(&7));
    }

    #[test]
    #[should_panic(expected = "is the key selector deterministic")]
    fn a_foreign_key_is_refused() {
        let store = KeyedStateStore::<u64>::new(KeyGroupRange { start: 0, end: 1 }, 128);
        for key in 0..1000u64 {
            store.group_index(&key);
        }
    }

    #[test]
    fn a_list_of_two_values_takes_the_room_of_a_vec_and_no_allocation() {
        assert_eq!(
            std::mem::size_of::<ListValues<u64>>(),
            std::mem::size_of::<Vec<u64>>()
        );
        let mut values = ListValues::<u64>::new();
        values.push(1);
        values.push(2);
        assert!(!values.spilled());
        values.push(3);
        assert!(values.spilled());
    }

    #[test]
    fn every_kind_of_state_reads_back_what_it_wrote() {
        let range = KeyGroupRange::for_subtask(128, 1, 0);
        let mut store = KeyedStateStore::<u64>::new(range, 128);
        let value = store.value_state::<u64>("value");
        let list = store.list_state::<u64>("list");
        let map = store.map_state::<u64, String>("map");
        let reducing = store.reducing_state::<u64>("sum", |sum, value| sum + value);
        let mut timers = TimerService::<u64, ()>::new(true);
        let key = 7u64;
        let group_index = store.group_index(&key);
        let mut context = KeyedContext {
            key: &key,
            group_index,
            timestamp: 0,
            watermark: 0,
            store: &mut store,
            timers: &mut timers,
        };
        value.update(&mut context, 1);
        list.add(&mut context, 2);
        list.add(&mut context, 3);
        map.put(&mut context, 4, "four".to_string());
        reducing.add(&mut context, 5);
        reducing.add(&mut context, 6);
        assert_eq!(value.value(&context), Some(&1));
        assert_eq!(list.get(&context), [2, 3]);
        assert_eq!(map.get(&context, &4).map(String::as_str), Some("four"));
        assert_eq!(map.entries(&context).count(), 1);
        assert_eq!(reducing.get(&context), Some(&11));
    }
}
