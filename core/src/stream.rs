//! The DataStream API, in Flink's spirit.
//!
//! ```text
//! let env = StreamExecutionEnvironment::new();
//! env.from_source(source, WatermarkStrategy::for_monotonous_timestamps().with_timestamp_assigner(...), "events")
//!     .filter(|event| ...)
//!     .key_by(|bid| bid.auction)
//!     .window(WindowAssigner::sliding(size, slide))
//!     .aggregate_with(Count, |auction, window, count, out| out.collect(...))
//!     .add_sink(sink);
//! let job_graph = env.build()?;
//! ```
//!
//! Every call adds an operator to the environment's StreamGraph; nothing
//! runs until the graph is built and submitted. Functions must be `Send +
//! Sync` (every subtask shares them) and records must be [`Record`]s.

use std::any::TypeId;
use std::cell::RefCell;
use std::marker::PhantomData;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use crate::error::GraphError;
use crate::function::{Collector, KeyedCoProcessFunction, KeyedProcessFunction, SinkFunction};
use crate::graph::{
    unerase, ChainFactory, ChainingStrategy, HeadFactory, JobGraph, NodeId, NodeKind, Partitioning,
    SourceFactory, StreamGraph, TwoInputChainFactory, TypedStream,
};
use crate::key::{Key, RecordKeyHash};
use crate::operator::{
    DecodingHead, FilterOperator, FlatMapOperator, Junction, KeyedCoProcessOperator,
    KeyedProcessOperator, KeyedRuntime, MapOperator, Output, SinkOperator, SourceTask,
    SplitOperator, SplitOutputs, Tracked, TwoInputHead, TwoInputOperator,
};
use crate::record::Record;
use crate::source::{CollectionSource, Source};
use crate::state::ValueCodec;
use crate::time::{Timestamp, WatermarkStrategy};
use crate::window::{
    AggregateFunction, LocalWindowAggregate, MergePartials, SlicingWindowOperator, TimeWindow,
    WindowAggregation, WindowAssigner, WindowJoinOperator, WindowOperator, WindowPartial,
};

/// Where a job is built: holds the StreamGraph and the job's defaults.
#[derive(Clone)]
pub struct StreamExecutionEnvironment {
    graph: Rc<RefCell<StreamGraph>>,
}

impl Default for StreamExecutionEnvironment {
    fn default() -> Self {
        Self::new()
    }
}

fn type_of<T: 'static>() -> (TypeId, &'static str) {
    (TypeId::of::<T>(), std::any::type_name::<T>())
}

impl StreamExecutionEnvironment {
    pub fn new() -> Self {
        StreamExecutionEnvironment {
            graph: Rc::new(RefCell::new(StreamGraph::new())),
        }
    }

    pub fn set_job_name(&self, name: &str) -> &Self {
        self.graph.borrow_mut().job_name = name.to_string();
        self
    }

    /// The parallelism of operators that do not set their own.
    pub fn set_parallelism(&self, parallelism: u32) -> &Self {
        self.graph.borrow_mut().default_parallelism = parallelism;
        self
    }

    pub fn parallelism(&self) -> u32 {
        self.graph.borrow().default_parallelism
    }

    /// The number of key groups (default 128): the upper bound of any
    /// operator's parallelism, fixed for the life of the job's state.
    pub fn set_max_parallelism(&self, max_parallelism: u32) -> &Self {
        self.graph.borrow_mut().max_parallelism = max_parallelism;
        self
    }

    pub fn max_parallelism(&self) -> u32 {
        self.graph.borrow().max_parallelism
    }

    /// Adds a source; `strategy` assigns timestamps and watermarks.
    pub fn from_source<T: Record, S: Source<T>>(
        &self,
        source: S,
        strategy: WatermarkStrategy<T>,
        name: &str,
    ) -> DataStream<T> {
        let source = Arc::new(source);
        let alignment = strategy
            .alignment
            .clone()
            .filter(|_| strategy.generates_watermarks);
        let factory: SourceFactory = Arc::new(move |context, output| {
            let reader = match context.take_restored() {
                None => source.create_reader(context.subtask_index, context.parallelism),
                Some(restored) => source
                    .restore_reader(
                        context.subtask_index,
                        context.parallelism,
                        restored.operator_state,
                    )
                    .unwrap_or_else(|error| context.restore_failed(&error)),
            };
            Box::new(SourceTask::new(
                context.clone(),
                reader,
                unerase::<T>(output),
                strategy.clone(),
            ))
        });
        let node = self.graph.borrow_mut().add_node(
            name,
            NodeKind::Source(factory),
            TypedStream::<T>::shared(),
            Vec::new(),
        );
        if let Some(alignment) = alignment {
            self.graph
                .borrow_mut()
                .source_alignment
                .push((node, alignment));
        }
        DataStream::new(self.clone(), node)
    }

    /// A bounded source over `records`, without event time.
    pub fn from_collection<T: Record + Sync>(&self, records: Vec<T>) -> DataStream<T> {
        self.from_source(
            CollectionSource::new(records),
            WatermarkStrategy::no_watermarks(),
            "Collection Source",
        )
    }

    /// Adds an edge between two operators by id: the low-level graph API. It
    /// is checked like any other edge when the job is built.
    pub fn add_edge(&self, source: NodeId, target: NodeId, input: usize) {
        self.graph
            .borrow_mut()
            .add_edge(source, target, input, None);
    }

    /// Validates the graph and fuses chains: the JobGraph to submit.
    pub fn build(&self) -> Result<JobGraph, GraphError> {
        let graph = std::mem::replace(&mut *self.graph.borrow_mut(), StreamGraph::new());
        graph.build()
    }

    fn record_error(&self, error: GraphError) {
        self.graph.borrow_mut().errors.push(error);
    }

    /// Adds a two-input operator fed by `inputs` (input 0, then input 1).
    /// `make` builds its concrete type, the head of its task or, chained,
    /// behind a [`Junction`] whose two inputs are each [`Tracked`].
    fn add_two_input<I1: Record, I2: Record, O: Record, Op: TwoInputOperator<I1, I2> + 'static>(
        &self,
        name: &str,
        inputs: [(NodeId, Option<Partitioning>); 2],
        make: impl Fn(&crate::operator::OperatorContext, Box<dyn Output<O>>) -> Op
            + Send
            + Sync
            + 'static,
    ) -> NodeId {
        let make = Arc::new(make);
        let chained: TwoInputChainFactory = {
            let make = make.clone();
            Arc::new(move |context, output| {
                let (first, second) = Junction::inputs(make(context, unerase::<O>(output)));
                [
                    Tracked::erased(context, first),
                    Tracked::erased(context, second),
                ]
            })
        };
        let head: HeadFactory = Arc::new(move |context, output| {
            Box::new(TwoInputHead::<I1, I2, Op>::new(make(
                context,
                unerase::<O>(output),
            )))
        });
        let mut graph = self.graph.borrow_mut();
        let node = graph.add_node(
            name,
            NodeKind::TwoInput { chained, head },
            TypedStream::<O>::shared(),
            vec![type_of::<I1>(), type_of::<I2>()],
        );
        for (input, (source, partitioning)) in inputs.into_iter().enumerate() {
            graph.add_edge(source, node, input, partitioning);
        }
        node
    }

    /// Adds a one-input operator. `make` builds its concrete type, so that
    /// a chained operator and its panic attribution ([`Tracked`]) are one
    /// value behind one virtual call.
    fn add_one_input<I: Record, O: Record, Op: Output<I> + 'static>(
        &self,
        input: NodeId,
        partitioning: Option<Partitioning>,
        name: &str,
        make: impl Fn(&crate::operator::OperatorContext, Box<dyn Output<O>>) -> Op
            + Send
            + Sync
            + 'static,
    ) -> NodeId {
        let make = Arc::new(make);
        let chained: ChainFactory = {
            let make = make.clone();
            Arc::new(move |context, output| {
                Tracked::<I, Op>::erased(context, make(context, unerase::<O>(output)))
            })
        };
        let head: HeadFactory = Arc::new(move |context, output| {
            Box::new(DecodingHead::<I> {
                batch: Vec::new(),
                next: Box::new(make(context, unerase::<O>(output))),
            })
        });
        let mut graph = self.graph.borrow_mut();
        let node = graph.add_node(
            name,
            NodeKind::OneInput { chained, head },
            TypedStream::<O>::shared(),
            vec![type_of::<I>()],
        );
        graph.add_edge(input, node, 0, partitioning);
        node
    }
}

/// A stream of records of type `T`.
pub struct DataStream<T> {
    env: StreamExecutionEnvironment,
    node: NodeId,
    partitioning: Option<Partitioning>,
    _type: PhantomData<fn() -> T>,
}

impl<T> Clone for DataStream<T> {
    fn clone(&self) -> Self {
        DataStream {
            env: self.env.clone(),
            node: self.node,
            partitioning: self.partitioning.clone(),
            _type: PhantomData,
        }
    }
}

impl<T: Record> DataStream<T> {
    fn new(env: StreamExecutionEnvironment, node: NodeId) -> Self {
        DataStream {
            env,
            node,
            partitioning: None,
            _type: PhantomData,
        }
    }

    /// The id of the operator that produces this stream.
    pub fn node_id(&self) -> NodeId {
        self.node
    }

    pub fn environment(&self) -> &StreamExecutionEnvironment {
        &self.env
    }

    fn modify(self, change: impl FnOnce(&mut crate::graph::StreamNode)) -> Self {
        change(&mut self.env.graph.borrow_mut().nodes[self.node]);
        self
    }

    /// Names the operator that produces this stream (and, for a window
    /// aggregate in two phases, its local phase "NAME (local)").
    pub fn name(self, name: &str) -> Self {
        {
            let mut graph = self.env.graph.borrow_mut();
            let local = graph
                .local_phases
                .iter()
                .find(|(global, _)| *global == self.node)
                .map(|(_, local)| *local);
            if let Some(local) = local {
                graph.nodes[local].name = format!("{name} (local)");
            }
        }
        self.modify(|node| node.name = name.to_string())
    }

    /// The operator's parallelism (and its side output's, see [`Self::split`]).
    pub fn set_parallelism(self, parallelism: u32) -> Self {
        {
            let mut graph = self.env.graph.borrow_mut();
            let sides: Vec<NodeId> = graph
                .side_outputs()
                .filter(|&(operator, _)| operator == self.node)
                .map(|(_, side)| side)
                .collect();
            for side in sides {
                graph.nodes[side].parallelism = Some(parallelism);
            }
        }
        self.modify(|node| node.parallelism = Some(parallelism))
    }

    /// The operator runs in a task of its own.
    pub fn disable_chaining(self) -> Self {
        self.modify(|node| node.chaining = ChainingStrategy::Never)
    }

    /// The operator starts a new chain; later operators may chain to it.
    pub fn start_new_chain(self) -> Self {
        self.modify(|node| node.chaining = ChainingStrategy::Head)
    }

    /// Puts the operator in the named slot sharing group: its subtasks take
    /// slots apart from other groups'. Operators after it that name no group
    /// inherit it, as in Flink.
    pub fn slot_sharing_group(self, group: &str) -> Self {
        self.modify(|node| node.slot_sharing_group = Some(group.to_string()))
    }

    fn with_partitioning(mut self, partitioning: Partitioning) -> Self {
        self.partitioning = Some(partitioning);
        self
    }

    /// Sends subtask `i`'s records to subtask `i` of the next operator.
    pub fn forward(self) -> Self {
        self.with_partitioning(Partitioning::Forward)
    }

    /// Spreads records round robin over the next operator's subtasks.
    pub fn rebalance(self) -> Self {
        self.with_partitioning(Partitioning::Rebalance)
    }

    /// Sends every record to every subtask of the next operator.
    pub fn broadcast(self) -> Self {
        self.with_partitioning(Partitioning::Broadcast)
    }

    pub fn map<O: Record>(
        self,
        function: impl Fn(T) -> O + Send + Sync + 'static,
    ) -> DataStream<O> {
        let function = Arc::new(function);
        let node = self.env.add_one_input::<T, O, _>(
            self.node,
            self.partitioning.clone(),
            "Map",
            move |_, next| MapOperator::new(function.clone(), next),
        );
        DataStream::new(self.env, node)
    }

    pub fn filter(self, predicate: impl Fn(&T) -> bool + Send + Sync + 'static) -> DataStream<T> {
        let function = Arc::new(predicate);
        let node = self.env.add_one_input::<T, T, _>(
            self.node,
            self.partitioning.clone(),
            "Filter",
            move |_, next| FilterOperator {
                function: function.clone(),
                next,
            },
        );
        DataStream::new(self.env, node)
    }

    pub fn flat_map<O: Record>(
        self,
        function: impl Fn(T, &mut dyn Collector<O>) + Send + Sync + 'static,
    ) -> DataStream<O> {
        let function = Arc::new(function);
        let node = self.env.add_one_input::<T, O, _>(
            self.node,
            self.partitioning.clone(),
            "Flat Map",
            move |_, next| FlatMapOperator::new(function.clone(), next),
        );
        DataStream::new(self.env, node)
    }

    /// Splits the stream in two in one pass: `function` emits what it makes
    /// of each record to the main output (the first stream returned) or to
    /// the side output (the second), as Flink's side outputs do (a
    /// `ProcessFunction` calling `ctx.output(tag, value)`, and
    /// `getSideOutput(tag)`). Where two flat maps over one stream would
    /// each read every record, this reads each once. The side output runs
    /// in its operator's tasks: its parallelism and slot sharing group are
    /// the operator's.
    pub fn split<A: Record, B: Record>(
        self,
        function: impl Fn(T, &mut dyn Collector<A>, &mut dyn Collector<B>) + Send + Sync + 'static,
    ) -> (DataStream<A>, DataStream<B>) {
        let function = Arc::new(function);
        let make = move |outputs: crate::graph::ErasedOutput| {
            let outputs = outputs
                .downcast::<SplitOutputs>()
                .unwrap_or_else(|_| panic!("a split operator is built with its two outputs"));
            SplitOperator {
                function: function.clone(),
                main: unerase::<A>(outputs.main),
                side: unerase::<B>(outputs.side),
                main_collected: Vec::new(),
                side_collected: Vec::new(),
                _input: PhantomData::<fn(T)>,
            }
        };
        let make = Arc::new(make);
        let chained: ChainFactory = {
            let make = make.clone();
            Arc::new(move |context, outputs| Tracked::<T, _>::erased(context, make(outputs)))
        };
        let head: HeadFactory = Arc::new(move |_, outputs| {
            Box::new(DecodingHead::<T> {
                batch: Vec::new(),
                next: Box::new(make(outputs)),
            })
        });
        let mut graph = self.env.graph.borrow_mut();
        let node = graph.add_node(
            "Split",
            NodeKind::OneInput { chained, head },
            TypedStream::<A>::shared(),
            vec![type_of::<T>()],
        );
        graph.add_edge(self.node, node, 0, self.partitioning.clone());
        let side = graph.add_node(
            "Split (side output)",
            NodeKind::SideOutput,
            TypedStream::<B>::shared(),
            vec![type_of::<A>()],
        );
        graph.add_edge(node, side, 0, None);
        drop(graph);
        (
            DataStream::new(self.env.clone(), node),
            DataStream::new(self.env, side),
        )
    }

    /// Partitions the stream by key: records with equal keys go to the same
    /// subtask, by key group.
    ///
    /// The stream keeps the selector's own type (`S`), so that the local
    /// phase of a window aggregate, the keyed co-process operator, the
    /// window join and the shuffle's key hash call it inlined into their
    /// loops rather than through a `dyn Fn` per record. The one-phase
    /// window operator and the keyed process operator still take it as a
    /// `dyn Fn`.
    pub fn key_by<K: Key, S: Fn(&T) -> K + Send + Sync + 'static>(
        self,
        key_selector: S,
    ) -> KeyedStream<K, T, S> {
        let key_selector = Arc::new(key_selector);
        let hash_selector = key_selector.clone();
        let key_hash_of = RecordKeyHash::new(move |record: &T| hash_selector(record));
        let unkeyed_partitioning = self.partitioning.clone();
        KeyedStream {
            stream: self.with_partitioning(Partitioning::Hash(Arc::new(key_hash_of))),
            key_selector,
            unkeyed_partitioning,
            _key: PhantomData,
        }
    }

    /// Merges streams of the same type into one.
    pub fn union(self, others: Vec<DataStream<T>>) -> DataStream<T> {
        let head: HeadFactory = Arc::new(|_, output| {
            Box::new(DecodingHead::<T> {
                batch: Vec::new(),
                next: unerase::<T>(output),
            })
        });
        let node = self.env.graph.borrow_mut().add_node(
            "Union",
            NodeKind::Union(head),
            TypedStream::<T>::shared(),
            vec![type_of::<T>()],
        );
        for stream in std::iter::once(&self).chain(others.iter()) {
            self.env
                .graph
                .borrow_mut()
                .add_edge(stream.node, node, 0, stream.partitioning.clone());
        }
        DataStream::new(self.env, node)
    }

    /// Joins this stream with another within windows (Flink's window join).
    pub fn join<R: Record>(self, other: DataStream<R>) -> JoinedStreams<T, R> {
        JoinedStreams {
            left: self,
            right: other,
        }
    }

    /// Ends the stream in a sink.
    pub fn add_sink(self, sink: impl SinkFunction<T>) -> DataStream<()> {
        let node = self.env.add_one_input::<T, (), _>(
            self.node,
            self.partitioning.clone(),
            "Sink",
            move |context, _| {
                let mut sink = sink.clone();
                sink.open(context);
                let restored = context.take_restored().unwrap_or_default();
                sink.restore_state(restored.operator_state)
                    .unwrap_or_else(|error| context.restore_failed(&error));
                SinkOperator {
                    sink,
                    context: context.clone(),
                    _input: PhantomData,
                }
            },
        );
        DataStream::new(self.env, node)
    }

    /// Prints every record to standard output (`subtask> record`).
    pub fn print(self) -> DataStream<()>
    where
        T: std::fmt::Debug,
    {
        self.add_sink(PrintSink { subtask: 0 })
            .name("Print to Std. Out")
    }
}

#[derive(Clone)]
struct PrintSink {
    subtask: u32,
}

impl<T: std::fmt::Debug> SinkFunction<T> for PrintSink {
    fn open(&mut self, context: &crate::operator::OperatorContext) {
        self.subtask = context.subtask_index;
    }

    fn invoke(&mut self, value: T, _timestamp: Timestamp) {
        println!("{}> {value:?}", self.subtask + 1);
    }
}

/// What selects a record's key: a function a task can call from its slot.
/// Keyed streams keep their selector's own type (not a `dyn Fn`), so that
/// the operators after them can be compiled with it inlined (see
/// [`DataStream::key_by`]).
pub trait KeySelector<T, K>: Fn(&T) -> K + Send + Sync + 'static {}

impl<T, K, F: Fn(&T) -> K + Send + Sync + 'static> KeySelector<T, K> for F {}

/// A stream partitioned by key, by the key selector `S`.
pub struct KeyedStream<K, T, S> {
    stream: DataStream<T>,
    key_selector: Arc<S>,
    /// How the stream was partitioned before `key_by` (for an operator
    /// chained before the shuffle, as a local aggregation is).
    unkeyed_partitioning: Option<Partitioning>,
    _key: PhantomData<fn() -> K>,
}

impl<K: Key, T: Record, S: KeySelector<T, K>> KeyedStream<K, T, S> {
    /// Applies a keyed process function (keyed state, event-time timers).
    pub fn process<O: Record>(self, function: impl KeyedProcessFunction<K, T, O>) -> DataStream<O> {
        let selector: Arc<dyn Fn(&T) -> K + Send + Sync> = self.key_selector.clone();
        let env = self.stream.env.clone();
        let node = env.add_one_input::<T, O, _>(
            self.stream.node,
            self.stream.partitioning.clone(),
            "KeyedProcess",
            move |context, next| {
                KeyedProcessOperator::new(selector.clone(), function.clone(), context, next)
            },
        );
        DataStream::new(env, node)
    }

    /// A rolling reduce: emits the running reduction per key.
    pub fn reduce(self, reduce: impl Fn(&T, T) -> T + Send + Sync + 'static) -> DataStream<T> {
        self.process(RollingReduce {
            reduce: Arc::new(reduce),
            state: Default::default(),
        })
        .name("Keyed Reduce")
    }

    /// Groups each key's records into event-time windows.
    pub fn window(self, assigner: WindowAssigner) -> WindowedStream<K, T, S> {
        WindowedStream {
            keyed: self,
            assigner,
            allowed_lateness: 0,
            local_aggregation: true,
        }
    }

    /// Connects two keyed streams for a keyed co-process function.
    pub fn connect<T2: Record, S2: KeySelector<T2, K>>(
        self,
        other: KeyedStream<K, T2, S2>,
    ) -> ConnectedStreams<K, T, T2, S, S2> {
        ConnectedStreams {
            left: self,
            right: other,
        }
    }
}

struct RollingReduce<T> {
    reduce: Arc<dyn Fn(&T, T) -> T + Send + Sync>,
    state: crate::state::ValueState<T>,
}

impl<T> Clone for RollingReduce<T> {
    fn clone(&self) -> Self {
        RollingReduce {
            reduce: self.reduce.clone(),
            state: self.state.clone(),
        }
    }
}

impl<K: Key, T: Record> KeyedProcessFunction<K, T, T> for RollingReduce<T> {
    fn open(&mut self, state: &mut crate::state::KeyedStateStore<K>) {
        self.state = state.value_state("reduce");
    }

    fn process_element(
        &mut self,
        value: T,
        context: &mut crate::function::KeyedContext<'_, K>,
        out: &mut dyn Collector<T>,
    ) {
        let reduced = match self.state.clear(context) {
            Some(current) => (self.reduce)(&current, value),
            None => value,
        };
        self.state.update(context, reduced.clone());
        out.collect(reduced);
    }
}

/// A keyed stream grouped into windows.
pub struct WindowedStream<K, T, S> {
    keyed: KeyedStream<K, T, S>,
    assigner: WindowAssigner,
    allowed_lateness: i64,
    local_aggregation: bool,
}

impl<K: Key, T: Record, S: KeySelector<T, K>> WindowedStream<K, T, S> {
    /// Keeps windows this long after they fired; records for them fire the
    /// window again. 0 (the default) drops late records.
    pub fn allowed_lateness(mut self, lateness: Duration) -> Self {
        self.allowed_lateness = lateness.as_millis() as i64;
        self
    }

    /// Aggregates in one phase, after the shuffle: every record crosses
    /// to its key's subtask (see [`WindowedStream::aggregate_with`]).
    pub fn without_local_aggregation(mut self) -> Self {
        self.local_aggregation = false;
        self
    }

    /// Aggregates each window and hands the result, with key and window, to
    /// `window_function`.
    ///
    /// For tumbling windows, and sliding windows whose size is a multiple
    /// of their slide, this runs in two phases, as Flink SQL's local-global
    /// window aggregation: a local phase chained before the shuffle adds
    /// each record to its key's accumulator of one pane (a slide) and ships
    /// one partial accumulator per key and pane when the watermark passes
    /// the pane; the global phase merges the partials into each window with
    /// the aggregate's `merge`, keeping its state per pane rather than per
    /// window (see `SlicingWindowOperator`). The result is the same when
    /// `merge` is consistent with `add` (merging two accumulators equals
    /// adding both inputs' records to one), which every aggregate must be;
    /// [`WindowedStream::without_local_aggregation`] turns it off. With
    /// allowed lateness it is off: each late record must fire its window
    /// again.
    pub fn aggregate_with<A, R, O, F, W>(self, aggregate: F, window_function: W) -> DataStream<O>
    where
        A: Record,
        R: 'static,
        O: Record,
        F: AggregateFunction<T, A, R>,
        W: Fn(&K, &TimeWindow, R, &mut dyn Collector<O>) + Send + Sync + 'static,
        WindowPartial<K, A>: Record,
    {
        match self.assigner.panes() {
            // With allowed lateness, each late record fires its window
            // again; a partial would fire it once for several.
            Some(panes) if self.local_aggregation && self.allowed_lateness == 0 => {
                self.two_phase(aggregate, window_function, panes)
            }
            _ => self.window_operator(aggregate, window_function, ValueCodec::record()),
        }
    }

    /// The local phase, chained before the shuffle, then the shuffle of
    /// partials by key, then the global window operator merging them.
    fn two_phase<A, R, O, F, W>(
        self,
        aggregate: F,
        window_function: W,
        panes: (i64, i64),
    ) -> DataStream<O>
    where
        A: Record,
        R: 'static,
        O: Record,
        F: AggregateFunction<T, A, R>,
        W: Fn(&K, &TimeWindow, R, &mut dyn Collector<O>) + Send + Sync + 'static,
        WindowPartial<K, A>: Record,
    {
        let WindowedStream {
            keyed,
            assigner,
            allowed_lateness: _,
            local_aggregation: _,
        } = self;
        let env = keyed.stream.env.clone();
        let selector = keyed.key_selector.clone();
        let local_aggregate = aggregate.clone();
        let local = env.add_one_input::<T, WindowPartial<K, A>, _>(
            keyed.stream.node,
            keyed.unkeyed_partitioning.clone(),
            "Local Window Aggregate",
            move |context, next| {
                LocalWindowAggregate::new(
                    selector.clone(),
                    local_aggregate.clone(),
                    panes,
                    context.operator_name.clone(),
                    next,
                )
            },
        );
        {
            // The local phase runs beside its input, at its parallelism.
            let mut graph = env.graph.borrow_mut();
            graph.nodes[local].parallelism = graph.nodes[keyed.stream.node].parallelism;
        }
        let partials: DataStream<WindowPartial<K, A>> = DataStream::new(env, local);
        let keyed_partials = partials.key_by(|partial: &WindowPartial<K, A>| partial.key.clone());
        let window_function = Arc::new(window_function);
        let size = assigner.window_size();
        let env = keyed_partials.stream.env.clone();
        let node = env.add_one_input::<WindowPartial<K, A>, O, _>(
            keyed_partials.stream.node,
            keyed_partials.stream.partitioning.clone(),
            "Window",
            move |context, next| {
                SlicingWindowOperator::new(
                    size,
                    panes,
                    WindowAggregation {
                        aggregate: MergePartials {
                            aggregate: aggregate.clone(),
                            _input: PhantomData,
                        },
                        window_function: window_function.clone(),
                        _types: PhantomData,
                    },
                    ValueCodec::record(),
                    context,
                    next,
                )
            },
        );
        env.graph.borrow_mut().local_phases.push((node, local));
        DataStream::new(env, node)
    }

    /// The window operator, with the codec that writes its accumulators
    /// into checkpoints.
    fn window_operator<A, R, O, F, W>(
        self,
        aggregate: F,
        window_function: W,
        codec: ValueCodec<A>,
    ) -> DataStream<O>
    where
        A: Clone + 'static,
        R: 'static,
        O: Record,
        F: AggregateFunction<T, A, R>,
        W: Fn(&K, &TimeWindow, R, &mut dyn Collector<O>) + Send + Sync + 'static,
    {
        let WindowedStream {
            keyed,
            assigner,
            allowed_lateness,
            local_aggregation: _,
        } = self;
        let selector: Arc<dyn Fn(&T) -> K + Send + Sync> = keyed.key_selector.clone();
        let env = keyed.stream.env.clone();
        let window_function = Arc::new(window_function);
        let node = env.add_one_input::<T, O, _>(
            keyed.stream.node,
            keyed.stream.partitioning.clone(),
            "Window",
            move |context, next| {
                let aggregation = WindowAggregation {
                    aggregate: aggregate.clone(),
                    window_function: window_function.clone(),
                    _types: PhantomData,
                };
                WindowOperator::new(
                    selector.clone(),
                    assigner,
                    allowed_lateness,
                    aggregation,
                    codec.clone(),
                    context,
                    next,
                )
            },
        );
        DataStream::new(env, node)
    }

    /// Aggregates each window; emits the aggregate's result.
    pub fn aggregate<A, R, F>(self, aggregate: F) -> DataStream<R>
    where
        A: Record,
        R: Record,
        F: AggregateFunction<T, A, R>,
        WindowPartial<K, A>: Record,
    {
        self.aggregate_with(
            aggregate,
            |_: &K, _: &TimeWindow, result: R, out: &mut dyn Collector<R>| out.collect(result),
        )
    }

    /// Reduces each window's records to one.
    pub fn reduce(self, reduce: impl Fn(T, T) -> T + Send + Sync + 'static) -> DataStream<T> {
        self.window_operator(
            ReduceAggregate {
                reduce: Arc::new(reduce),
            },
            |_: &K, _: &TimeWindow, result: T, out: &mut dyn Collector<T>| out.collect(result),
            ValueCodec::option(),
        )
    }

    /// Hands all of a window's records, with key and window, to `function`
    /// (Flink's `ProcessWindowFunction`).
    pub fn process<O: Record>(
        self,
        function: impl Fn(&K, &TimeWindow, Vec<T>, &mut dyn Collector<O>) + Send + Sync + 'static,
    ) -> DataStream<O> {
        self.window_operator(CollectAggregate, function, ValueCodec::list())
    }
}

struct ReduceAggregate<T> {
    reduce: Arc<dyn Fn(T, T) -> T + Send + Sync>,
}

impl<T> Clone for ReduceAggregate<T> {
    fn clone(&self) -> Self {
        ReduceAggregate {
            reduce: self.reduce.clone(),
        }
    }
}

impl<T: Clone + 'static> AggregateFunction<T, Option<T>, T> for ReduceAggregate<T> {
    fn create_accumulator(&self) -> Option<T> {
        None
    }
    fn add(&self, value: T, accumulator: &mut Option<T>) {
        *accumulator = Some(match accumulator.take() {
            Some(current) => (self.reduce)(current, value),
            None => value,
        });
    }
    fn get_result(&self, accumulator: Option<T>) -> T {
        accumulator.expect("a window fires only once it holds a record")
    }
    fn merge(&self, first: Option<T>, second: Option<T>) -> Option<T> {
        match (first, second) {
            (Some(first), Some(second)) => Some((self.reduce)(first, second)),
            (first, second) => first.or(second),
        }
    }
}

#[derive(Clone)]
struct CollectAggregate;

impl<T: Clone + 'static> AggregateFunction<T, Vec<T>, Vec<T>> for CollectAggregate {
    fn create_accumulator(&self) -> Vec<T> {
        Vec::new()
    }
    fn add(&self, value: T, accumulator: &mut Vec<T>) {
        accumulator.push(value);
    }
    fn get_result(&self, accumulator: Vec<T>) -> Vec<T> {
        accumulator
    }
    fn merge(&self, mut first: Vec<T>, second: Vec<T>) -> Vec<T> {
        first.extend(second);
        first
    }
}

/// Two keyed streams with one keyed state.
pub struct ConnectedStreams<K, T1, T2, S1, S2> {
    left: KeyedStream<K, T1, S1>,
    right: KeyedStream<K, T2, S2>,
}

impl<K, T1, T2, S1, S2> ConnectedStreams<K, T1, T2, S1, S2>
where
    K: Key,
    T1: Record,
    T2: Record,
    S1: KeySelector<T1, K>,
    S2: KeySelector<T2, K>,
{
    pub fn process<O: Record>(
        self,
        function: impl KeyedCoProcessFunction<K, T1, T2, O>,
    ) -> DataStream<O> {
        let env = self.left.stream.env.clone();
        let (selector1, selector2) = (
            self.left.key_selector.clone(),
            self.right.key_selector.clone(),
        );
        let node = env.add_two_input(
            "KeyedCoProcess",
            [
                (self.left.stream.node, self.left.stream.partitioning.clone()),
                (
                    self.right.stream.node,
                    self.right.stream.partitioning.clone(),
                ),
            ],
            move |context, next| {
                let mut function = function.clone();
                let runtime = KeyedRuntime::new(context, |store| function.open(store));
                KeyedCoProcessOperator {
                    context: context.clone(),
                    key_selector1: selector1.clone(),
                    key_selector2: selector2.clone(),
                    _inputs: PhantomData,
                    function,
                    runtime,
                    next,
                }
            },
        );
        DataStream::new(env, node)
    }
}

/// `left.join(right)`: choose the keys next.
pub struct JoinedStreams<L, R> {
    left: DataStream<L>,
    right: DataStream<R>,
}

impl<L: Record, R: Record> JoinedStreams<L, R> {
    /// The left side's key. The join keeps each selector's own type, so
    /// that it calls them inlined rather than through a `dyn Fn`.
    pub fn where_key<K: Key, SL: Fn(&L) -> K + Send + Sync + 'static>(
        self,
        left_key: SL,
    ) -> JoinWhere<K, L, R, SL> {
        JoinWhere {
            joined: self,
            left_key: Arc::new(left_key),
            _key: PhantomData,
        }
    }
}

/// `left.join(right).where_key(...)`: the right key next.
pub struct JoinWhere<K, L, R, SL> {
    joined: JoinedStreams<L, R>,
    left_key: Arc<SL>,
    _key: PhantomData<fn() -> K>,
}

impl<K: Key, L: Record, R: Record, SL: KeySelector<L, K>> JoinWhere<K, L, R, SL> {
    pub fn equal_to<SR: Fn(&R) -> K + Send + Sync + 'static>(
        self,
        right_key: SR,
    ) -> JoinEqual<K, L, R, SL, SR> {
        JoinEqual {
            joined: self.joined,
            left_key: self.left_key,
            right_key: Arc::new(right_key),
            _key: PhantomData,
        }
    }
}

/// `left.join(right).where_key(...).equal_to(...)`: the window next.
pub struct JoinEqual<K, L, R, SL, SR> {
    joined: JoinedStreams<L, R>,
    left_key: Arc<SL>,
    right_key: Arc<SR>,
    _key: PhantomData<fn() -> K>,
}

impl<K, L, R, SL, SR> JoinEqual<K, L, R, SL, SR> {
    pub fn window(self, assigner: WindowAssigner) -> WindowedJoin<K, L, R, SL, SR> {
        WindowedJoin {
            join: self,
            assigner,
        }
    }
}

/// A window join ready for its join function.
pub struct WindowedJoin<K, L, R, SL, SR> {
    join: JoinEqual<K, L, R, SL, SR>,
    assigner: WindowAssigner,
}

impl<K, L, R, SL, SR> WindowedJoin<K, L, R, SL, SR>
where
    K: Key,
    L: Record,
    R: Record,
    SL: KeySelector<L, K>,
    SR: KeySelector<R, K>,
{
    /// Emits `function(left, right)` for every pair with equal keys in the
    /// same window, when the window fires.
    pub fn apply<O: Record>(
        self,
        function: impl Fn(L, R) -> O + Send + Sync + 'static,
    ) -> DataStream<O> {
        let JoinEqual {
            joined,
            left_key,
            right_key,
            _key,
        } = self.join;
        let env = joined.left.env.clone();
        let assigner = self.assigner;
        if assigner.is_merging() {
            env.record_error(GraphError::Invalid {
                operator: "Window Join".to_string(),
                reason: "session windows cannot be used in a window join; use tumbling or sliding windows".to_string(),
            });
        }
        let function = Arc::new(function);
        let hash_left = left_key.clone();
        let hash_right = right_key.clone();
        let left_hash = RecordKeyHash::new(move |record: &L| hash_left(record));
        let right_hash = RecordKeyHash::new(move |record: &R| hash_right(record));
        let node = env.add_two_input(
            "Window Join",
            [
                (
                    joined.left.node,
                    Some(Partitioning::Hash(Arc::new(left_hash))),
                ),
                (
                    joined.right.node,
                    Some(Partitioning::Hash(Arc::new(right_hash))),
                ),
            ],
            move |context, next| {
                WindowJoinOperator::new(
                    left_key.clone(),
                    right_key.clone(),
                    assigner,
                    function.clone(),
                    context,
                    next,
                )
            },
        );
        DataStream::new(env, node)
    }
}
