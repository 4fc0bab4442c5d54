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
use std::sync::Arc;

use rustc_hash::{FxBuildHasher, FxHashSet};

use crate::function::KeyedContext;
use crate::key::{key_hash, Key, KeyGroupAssigner, KeyGroupRange};
use crate::time::Timestamp;

/// The hash maps of keyed state and timers. Keys come from inside the job,
/// and hashing them is the hottest work of a keyed operator, so state uses
/// the fast FxHash rather than the DoS-resistant default.
type HashMap<K, V> = hashbrown::HashMap<K, V, FxBuildHasher>;
type HashSet<K> = FxHashSet<K>;

/// One state: per owned key group, the value of every key.
pub struct StateTable<K, V> {
    groups: Vec<HashMap<K, V>>,
}

impl<K: Key, V> StateTable<K, V> {
    fn new(key_group_count: usize) -> Self {
        StateTable {
            groups: (0..key_group_count).map(|_| HashMap::default()).collect(),
        }
    }

    pub fn get(&self, group_index: usize, key: &K) -> Option<&V> {
        self.groups[group_index].get(key)
    }

    pub fn get_mut(&mut self, group_index: usize, key: &K) -> Option<&mut V> {
        self.groups[group_index].get_mut(key)
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
        self.groups[group_index]
            .raw_entry_mut()
            .from_key(key)
            .or_insert_with(|| (key.clone(), default()))
            .1
    }

    pub fn insert(&mut self, group_index: usize, key: &K, value: V) {
        match self.groups[group_index].get_mut(key) {
            Some(slot) => *slot = value,
            None => {
                self.groups[group_index].insert(key.clone(), value);
            }
        }
    }

    pub fn remove(&mut self, group_index: usize, key: &K) -> Option<V> {
        self.groups[group_index].remove(key)
    }

    /// How many keys hold an entry, over all key groups.
    pub fn len(&self) -> usize {
        self.groups.iter().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The keyed state of one operator subtask.
pub struct KeyedStateStore<K> {
    key_groups: KeyGroupRange,
    assigner: KeyGroupAssigner,
    tables: Vec<Box<dyn Any>>,
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
    pub fn table_index<V: 'static>(&mut self, name: &str) -> usize {
        if let Some(index) = self.names.iter().position(|existing| existing == name) {
            assert!(
                self.tables[index].is::<StateTable<K, V>>(),
                "state '{name}' was registered twice with different types"
            );
            return index;
        }
        self.tables
            .push(Box::new(StateTable::<K, V>::new(self.key_groups.count())));
        self.names.push(name.to_string());
        self.tables.len() - 1
    }

    pub fn table<V: 'static>(&self, index: usize) -> &StateTable<K, V> {
        self.tables
            .get(index)
            .and_then(|table| table.downcast_ref())
            .expect("state handle used before it was registered in open()")
    }

    pub fn table_mut<V: 'static>(&mut self, index: usize) -> &mut StateTable<K, V> {
        self.tables
            .get_mut(index)
            .and_then(|table| table.downcast_mut())
            .expect("state handle used before it was registered in open()")
    }

    pub fn value_state<V: 'static>(&mut self, name: &str) -> ValueState<V> {
        ValueState {
            index: self.table_index::<V>(name),
            _value: PhantomData,
        }
    }

    pub fn list_state<V: 'static>(&mut self, name: &str) -> ListState<V> {
        ListState {
            index: self.table_index::<Vec<V>>(name),
            _value: PhantomData,
        }
    }

    pub fn map_state<MK: Hash + Eq + 'static, MV: 'static>(
        &mut self,
        name: &str,
    ) -> MapState<MK, MV> {
        MapState {
            // The type its accessors read the table as.
            index: self.table_index::<StdHashMap<MK, MV>>(name),
            _value: PhantomData,
        }
    }

    pub fn reducing_state<V: 'static>(
        &mut self,
        name: &str,
        reduce: impl Fn(&V, V) -> V + Send + Sync + 'static,
    ) -> ReducingState<V> {
        ReducingState {
            index: self.table_index::<V>(name),
            reduce: Some(Arc::new(reduce)),
        }
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

impl<V: 'static> ValueState<V> {
    pub fn value<'c, K: Key>(&self, context: &'c KeyedContext<'_, K>) -> Option<&'c V> {
        let (store, group, key) = context.state_scope();
        store.table::<V>(self.index).get(group, key)
    }

    pub fn value_mut<'c, K: Key>(&self, context: &'c mut KeyedContext<'_, K>) -> Option<&'c mut V> {
        let (store, group, key) = context.state_scope_mut();
        store.table_mut::<V>(self.index).get_mut(group, key)
    }

    pub fn update<K: Key>(&self, context: &mut KeyedContext<'_, K>, value: V) {
        let (store, group, key) = context.state_scope_mut();
        store.table_mut::<V>(self.index).insert(group, key, value);
    }

    pub fn clear<K: Key>(&self, context: &mut KeyedContext<'_, K>) -> Option<V> {
        let (store, group, key) = context.state_scope_mut();
        store.table_mut::<V>(self.index).remove(group, key)
    }
}

impl<V: 'static> ListState<V> {
    pub fn get<'c, K: Key>(&self, context: &'c KeyedContext<'_, K>) -> &'c [V] {
        let (store, group, key) = context.state_scope();
        store
            .table::<Vec<V>>(self.index)
            .get(group, key)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    pub fn add<K: Key>(&self, context: &mut KeyedContext<'_, K>, value: V) {
        let (store, group, key) = context.state_scope_mut();
        store
            .table_mut::<Vec<V>>(self.index)
            .get_or_insert_with(group, key, Vec::new)
            .push(value);
    }

    /// Removes and returns the list of the current key.
    pub fn take<K: Key>(&self, context: &mut KeyedContext<'_, K>) -> Vec<V> {
        let (store, group, key) = context.state_scope_mut();
        store
            .table_mut::<Vec<V>>(self.index)
            .remove(group, key)
            .unwrap_or_default()
    }
}

impl<MK: Hash + Eq + 'static, MV: 'static> MapState<MK, MV> {
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

impl<V: 'static> ReducingState<V> {
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
        let index = store.table_index::<u64>("count");
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
