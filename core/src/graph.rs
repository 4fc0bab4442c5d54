//! The StreamGraph (one node per operator) and the JobGraph (one vertex per
//! chain of operators), with validation, chaining and the instantiation of a
//! task from its vertex.
//!
//! Chaining rule (as Flink's): an edge `a -> b` is chained, so that `a` calls
//! `b` directly inside one task, when
//! 1. its partitioning is forward (explicit, or by default because both have
//!    the same parallelism), or it is a `key_by` between two operators of
//!    parallelism 1: its one receiver gets every record, as over a forward
//!    edge, and a keyed operator finds each record's key itself (Flink
//!    does not chain there, and pays a serialization per record for it),
//! 2. `b` is a one-input operator and this is its only input, or a
//!    two-input operator both of whose inputs are chained to one task
//!    (Flink's multiple-input chaining, for one chain split in two and
//!    joined again): the two inputs meet in a `Junction`, which combines
//!    their watermarks as a task combines its channels',
//! 3. both are in the same slot sharing group,
//! 4. neither opted out (`disable_chaining`) and `b` does not start a new
//!    chain (`start_new_chain`).

use std::any::{Any, TypeId};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::marker::PhantomData;
use std::rc::Rc;
use std::sync::Arc;

use crate::accumulator::Accumulators;
use crate::error::GraphError;
use crate::key::{KeyGroupRange, DEFAULT_MAX_PARALLELISM, MAX_PARALLELISM_UPPER_BOUND};
use crate::operator::{
    ChannelSelector, Discard, FanOut, OperatorContext, Output, OutputQueue, RecordWriter,
    SourceHead, SplitOutputs, TaskHead,
};
use crate::record::Record;
use crate::snapshot::{Committable, TaskRestore};
use crate::time::WatermarkAlignment;

pub type NodeId = usize;

/// The slot sharing group of operators that name none and have no input.
pub const DEFAULT_SLOT_SHARING_GROUP: &str = "default";

/// A `Box<dyn Output<T>>` whose `T` is known only to the node that made it.
pub(crate) type ErasedOutput = Box<dyn Any>;
pub(crate) type ChainFactory =
    Arc<dyn Fn(&OperatorContext, ErasedOutput) -> ErasedOutput + Send + Sync>;
/// A chained two-input operator's two inputs: `Box<dyn Output<I1>>`,
/// `Box<dyn Output<I2>>`.
pub(crate) type TwoInputChainFactory =
    Arc<dyn Fn(&OperatorContext, ErasedOutput) -> [ErasedOutput; 2] + Send + Sync>;
pub(crate) type HeadFactory =
    Arc<dyn Fn(&OperatorContext, ErasedOutput) -> Box<dyn TaskHead> + Send + Sync>;
pub(crate) type SourceFactory =
    Arc<dyn Fn(&OperatorContext, ErasedOutput) -> Box<dyn SourceHead> + Send + Sync>;

pub(crate) fn erase<T: 'static>(output: Box<dyn Output<T>>) -> ErasedOutput {
    Box::new(output)
}

pub(crate) fn unerase<T: 'static>(output: ErasedOutput) -> Box<dyn Output<T>> {
    *output.downcast::<Box<dyn Output<T>>>().unwrap_or_else(|_| {
        panic!(
            "output of the wrong record type: expected {}",
            std::any::type_name::<T>()
        )
    })
}

/// How an operator's records are spread over the next operator's subtasks.
#[derive(Clone)]
pub enum Partitioning {
    /// Subtask `i` to subtask `i` (equal parallelism); chainable.
    Forward,
    /// Round robin over all consumer subtasks.
    Rebalance,
    /// Every consumer subtask gets every record.
    Broadcast,
    /// By key group of the record's key (`key_by`).
    Hash(Arc<dyn Any + Send + Sync>),
}

impl Partitioning {
    pub fn name(&self) -> &'static str {
        match self {
            Partitioning::Forward => "FORWARD",
            Partitioning::Rebalance => "REBALANCE",
            Partitioning::Broadcast => "BROADCAST",
            Partitioning::Hash(_) => "HASH",
        }
    }
}

impl fmt::Debug for Partitioning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The record type of a stream, with what the graph needs to do with it
/// without knowing it statically.
pub(crate) trait StreamType: Send + Sync {
    fn record_type_id(&self) -> TypeId;
    fn type_name(&self) -> &'static str;
    fn fan_out(&self, outputs: Vec<ErasedOutput>) -> ErasedOutput;
    fn writer(
        &self,
        partitioning: &Partitioning,
        channel_base: usize,
        channel_count: usize,
        max_parallelism: u32,
        queue: OutputQueue,
    ) -> ErasedOutput;
}

pub(crate) struct TypedStream<T>(PhantomData<fn() -> T>);

impl<T: Record> TypedStream<T> {
    pub(crate) fn shared() -> Arc<dyn StreamType> {
        Arc::new(TypedStream::<T>(PhantomData))
    }
}

impl<T: Record> StreamType for TypedStream<T> {
    fn record_type_id(&self) -> TypeId {
        TypeId::of::<T>()
    }

    fn type_name(&self) -> &'static str {
        std::any::type_name::<T>()
    }

    fn fan_out(&self, outputs: Vec<ErasedOutput>) -> ErasedOutput {
        let mut outputs: Vec<Box<dyn Output<T>>> = outputs.into_iter().map(unerase::<T>).collect();
        match outputs.len() {
            0 => erase::<T>(Box::new(Discard)),
            1 => erase(outputs.pop().expect("one output")),
            _ => erase::<T>(Box::new(FanOut {
                outputs,
                copy: Vec::new(),
            })),
        }
    }

    fn writer(
        &self,
        partitioning: &Partitioning,
        channel_base: usize,
        channel_count: usize,
        max_parallelism: u32,
        queue: OutputQueue,
    ) -> ErasedOutput {
        let selector = match partitioning {
            Partitioning::Forward => ChannelSelector::Forward,
            Partitioning::Rebalance => ChannelSelector::Rebalance { next: 0 },
            Partitioning::Broadcast => ChannelSelector::Broadcast,
            Partitioning::Hash(key_hash) => ChannelSelector::hash(
                key_hash
                    .clone()
                    .downcast::<crate::key::RecordKeyHash<T>>()
                    .map(|boxed| (*boxed).clone())
                    .unwrap_or_else(|_| panic!("key selector of the wrong record type")),
                max_parallelism,
                channel_count,
            ),
        };
        erase::<T>(Box::new(RecordWriter::new(
            selector,
            channel_base,
            channel_count,
            queue,
        )))
    }
}

pub(crate) enum NodeKind {
    Source(SourceFactory),
    OneInput {
        chained: ChainFactory,
        head: HeadFactory,
    },
    TwoInput {
        chained: TwoInputChainFactory,
        head: HeadFactory,
    },
    Union(HeadFactory),
    /// The side output of the operator it is chained to (its one input): a
    /// stream of its own, fed by that operator's second output, with no
    /// operator of its own (`DataStream::split`).
    SideOutput,
}

impl NodeKind {
    fn input_count(&self) -> Option<usize> {
        match self {
            NodeKind::Source(_) => Some(0),
            NodeKind::OneInput { .. } | NodeKind::SideOutput => Some(1),
            NodeKind::TwoInput { .. } => Some(2),
            NodeKind::Union(_) => None,
        }
    }
}

/// Whether an operator may share a task with its neighbours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainingStrategy {
    Always,
    /// Starts a new chain but lets later operators chain to it.
    Head,
    /// Chains with nothing.
    Never,
}

/// One operator of the StreamGraph.
pub struct StreamNode {
    pub id: NodeId,
    pub name: String,
    pub parallelism: Option<u32>,
    /// `None`: the group of its inputs when they all share one, otherwise
    /// "default" (as in Flink). Resolved when the graph is built.
    pub slot_sharing_group: Option<String>,
    pub chaining: ChainingStrategy,
    pub(crate) kind: NodeKind,
    pub(crate) output_type: Arc<dyn StreamType>,
    /// The record type expected on each input (one for a union: all alike).
    pub(crate) input_types: Vec<(TypeId, &'static str)>,
}

/// An edge of the StreamGraph.
#[derive(Clone)]
pub struct StreamEdge {
    pub source: NodeId,
    pub target: NodeId,
    /// Which input of the target (0 or 1 for a two-input operator).
    pub input: usize,
    /// `None`: forward when the parallelism matches, otherwise rebalance.
    pub partitioning: Option<Partitioning>,
}

/// The graph the DataStream API builds, one node per operator.
pub struct StreamGraph {
    pub job_name: String,
    pub default_parallelism: u32,
    pub max_parallelism: u32,
    pub nodes: Vec<StreamNode>,
    pub edges: Vec<StreamEdge>,
    /// Errors found while building, reported when the job is submitted.
    pub errors: Vec<GraphError>,
    /// The local phase of each two-phase window aggregate, by its global
    /// phase: naming the aggregate names both ("NAME (local)").
    pub(crate) local_phases: Vec<(NodeId, NodeId)>,
    /// The sources that declared watermark alignment, with its group and
    /// drift.
    pub(crate) source_alignment: Vec<(NodeId, WatermarkAlignment)>,
}

impl StreamGraph {
    pub fn new() -> Self {
        StreamGraph {
            job_name: "strom job".to_string(),
            default_parallelism: 1,
            max_parallelism: DEFAULT_MAX_PARALLELISM,
            nodes: Vec::new(),
            edges: Vec::new(),
            errors: Vec::new(),
            local_phases: Vec::new(),
            source_alignment: Vec::new(),
        }
    }

    pub(crate) fn add_node(
        &mut self,
        name: &str,
        kind: NodeKind,
        output_type: Arc<dyn StreamType>,
        input_types: Vec<(TypeId, &'static str)>,
    ) -> NodeId {
        let id = self.nodes.len();
        self.nodes.push(StreamNode {
            id,
            name: name.to_string(),
            parallelism: None,
            slot_sharing_group: None,
            chaining: ChainingStrategy::Always,
            kind,
            output_type,
            input_types,
        });
        id
    }

    /// Adds an edge between two existing operators. The DataStream API does
    /// this for you; used directly, it is checked like any other edge when
    /// the job is built (types, input counts, cycles).
    pub fn add_edge(
        &mut self,
        source: NodeId,
        target: NodeId,
        input: usize,
        partitioning: Option<Partitioning>,
    ) {
        self.edges.push(StreamEdge {
            source,
            target,
            input,
            partitioning,
        });
    }

    fn parallelism_of(&self, node: NodeId) -> u32 {
        self.nodes[node]
            .parallelism
            .unwrap_or(self.default_parallelism)
    }

    fn resolved_partitioning(&self, edge: &StreamEdge) -> Partitioning {
        match &edge.partitioning {
            Some(partitioning) => partitioning.clone(),
            None if self.parallelism_of(edge.source) == self.parallelism_of(edge.target) => {
                Partitioning::Forward
            }
            None => Partitioning::Rebalance,
        }
    }

    /// Each side output with the operator it is the side output of, as
    /// (operator, side output).
    pub(crate) fn side_outputs(&self) -> impl Iterator<Item = (NodeId, NodeId)> + '_ {
        self.edges
            .iter()
            .filter(|edge| {
                edge.source < self.nodes.len()
                    && edge.target < self.nodes.len()
                    && matches!(self.nodes[edge.target].kind, NodeKind::SideOutput)
            })
            .map(|edge| (edge.source, edge.target))
    }

    /// Checks the graph and fuses it into a JobGraph.
    pub fn build(mut self) -> Result<JobGraph, GraphError> {
        if let Some(error) = self.errors.first() {
            return Err(error.clone());
        }
        // A side output runs with its operator, at its parallelism.
        let sides: Vec<(NodeId, NodeId)> = self.side_outputs().collect();
        for &(operator, side) in &sides {
            if self.nodes[side].parallelism.is_none() {
                self.nodes[side].parallelism = self.nodes[operator].parallelism;
            }
        }
        if self.max_parallelism == 0 || self.max_parallelism > MAX_PARALLELISM_UPPER_BOUND {
            return Err(GraphError::MaxParallelism {
                max_parallelism: self.max_parallelism,
            });
        }
        for node in &self.nodes {
            let parallelism = self.parallelism_of(node.id);
            if parallelism == 0 || parallelism > self.max_parallelism {
                return Err(GraphError::Parallelism {
                    operator: node.name.clone(),
                    parallelism,
                    max_parallelism: self.max_parallelism,
                });
            }
        }
        for edge in &self.edges {
            for node in [edge.source, edge.target] {
                if node >= self.nodes.len() {
                    return Err(GraphError::UnknownNode { node });
                }
            }
            let source = &self.nodes[edge.source];
            let target = &self.nodes[edge.target];
            // A union's inputs are all input 0; other operators have one
            // declared type per input, and no input beyond them.
            let expected = match target.kind {
                NodeKind::Union(_) if edge.input == 0 => target.input_types.first(),
                NodeKind::Union(_) => None,
                _ => target.input_types.get(edge.input),
            };
            if expected.is_none() && !target.input_types.is_empty() {
                return Err(GraphError::Invalid {
                    operator: target.name.clone(),
                    reason: format!(
                        "an edge from '{}' goes to input {}, which the operator does not have",
                        source.name, edge.input
                    ),
                });
            }
            match expected {
                Some((type_id, type_name)) if *type_id != source.output_type.record_type_id() => {
                    return Err(GraphError::TypeMismatch {
                        from: source.name.clone(),
                        to: target.name.clone(),
                        produced: source.output_type.type_name(),
                        expected: type_name,
                    });
                }
                Some(_) => {}
                None => {
                    return Err(GraphError::Inputs {
                        operator: target.name.clone(),
                        expected: 0,
                        found: 1,
                    });
                }
            }
        }
        for node in &self.nodes {
            let inputs: Vec<&StreamEdge> = self
                .edges
                .iter()
                .filter(|edge| edge.target == node.id)
                .collect();
            match node.kind.input_count() {
                Some(2) => {
                    let left = inputs.iter().filter(|edge| edge.input == 0).count();
                    let right = inputs.iter().filter(|edge| edge.input == 1).count();
                    if left != 1 || right != 1 || inputs.len() != 2 {
                        return Err(GraphError::Inputs {
                            operator: node.name.clone(),
                            expected: 2,
                            found: inputs.len(),
                        });
                    }
                }
                Some(expected) if inputs.len() != expected => {
                    return Err(GraphError::Inputs {
                        operator: node.name.clone(),
                        expected,
                        found: inputs.len(),
                    });
                }
                None if inputs.is_empty() => {
                    return Err(GraphError::Inputs {
                        operator: node.name.clone(),
                        expected: 1,
                        found: 0,
                    });
                }
                _ => {}
            }
        }
        if !self
            .nodes
            .iter()
            .any(|node| matches!(node.kind, NodeKind::Source(_)))
        {
            return Err(GraphError::NoSource);
        }
        let order = self.topological_order()?;
        let mut graph = self;
        graph.resolve_slot_sharing_groups(&order);
        // Resolved (a side output without a group has its operator's), a
        // side output must run where its operator does.
        for &(operator, side) in &sides {
            let (operator_node, side_node) = (&graph.nodes[operator], &graph.nodes[side]);
            if graph.parallelism_of(operator) != graph.parallelism_of(side)
                || side_node.slot_sharing_group != operator_node.slot_sharing_group
            {
                return Err(GraphError::Invalid {
                    operator: side_node.name.clone(),
                    reason: format!(
                        "a side output runs in the tasks of its operator '{}': set its parallelism and slot sharing group on that operator",
                        operator_node.name
                    ),
                });
            }
        }
        let stream = graph;
        for edge in &stream.edges {
            if let Partitioning::Forward = stream.resolved_partitioning(edge) {
                let (from, to) = (
                    stream.parallelism_of(edge.source),
                    stream.parallelism_of(edge.target),
                );
                if from != to {
                    return Err(GraphError::ForwardParallelism {
                        from: stream.nodes[edge.source].name.clone(),
                        to: stream.nodes[edge.target].name.clone(),
                        from_parallelism: from,
                        to_parallelism: to,
                    });
                }
            }
        }
        Ok(JobGraph::fuse(stream, order))
    }

    /// Gives every operator without a slot sharing group of its own the
    /// group of its inputs when they agree, else "default".
    fn resolve_slot_sharing_groups(&mut self, order: &[NodeId]) {
        for node in order {
            if self.nodes[*node].slot_sharing_group.is_some() {
                continue;
            }
            let mut groups = self
                .edges
                .iter()
                .filter(|edge| edge.target == *node)
                .map(|edge| self.nodes[edge.source].slot_sharing_group.clone());
            let first = groups.next().flatten();
            let inherited = match first {
                Some(group) if groups.all(|other| other.as_deref() == Some(group.as_str())) => {
                    group
                }
                _ => DEFAULT_SLOT_SHARING_GROUP.to_string(),
            };
            self.nodes[*node].slot_sharing_group = Some(inherited);
        }
    }

    /// Kahn's algorithm; what remains unsorted lies on or behind a cycle.
    fn topological_order(&self) -> Result<Vec<NodeId>, GraphError> {
        let mut in_degree = vec![0usize; self.nodes.len()];
        for edge in &self.edges {
            in_degree[edge.target] += 1;
        }
        let mut ready: VecDeque<NodeId> = (0..self.nodes.len())
            .filter(|node| in_degree[*node] == 0)
            .collect();
        let mut order = Vec::with_capacity(self.nodes.len());
        while let Some(node) = ready.pop_front() {
            order.push(node);
            for edge in self.edges.iter().filter(|edge| edge.source == node) {
                in_degree[edge.target] -= 1;
                if in_degree[edge.target] == 0 {
                    ready.push_back(edge.target);
                }
            }
        }
        if order.len() == self.nodes.len() {
            return Ok(order);
        }
        // Walk back along unsorted inputs until a node repeats: that is a cycle.
        let start = (0..self.nodes.len())
            .find(|node| in_degree[*node] > 0)
            .expect("an unsorted node");
        let mut path = vec![start];
        loop {
            let current = *path.last().expect("non-empty path");
            let previous = self
                .edges
                .iter()
                .find(|edge| edge.target == current && in_degree[edge.source] > 0)
                .map(|edge| edge.source)
                .expect("an unsorted node has an unsorted input");
            if let Some(position) = path.iter().position(|node| *node == previous) {
                let mut cycle: Vec<String> = path[position..]
                    .iter()
                    .rev()
                    .map(|node| self.nodes[*node].name.clone())
                    .collect();
                cycle.push(cycle[0].clone());
                return Err(GraphError::Cycle { operators: cycle });
            }
            path.push(previous);
        }
    }
}

/// One task of the JobGraph: a chain of operators.
#[derive(Clone, Debug)]
pub struct JobVertex {
    pub id: usize,
    pub name: String,
    /// The chained operators, head first.
    pub operators: Vec<NodeId>,
    pub parallelism: u32,
    pub slot_sharing_group: String,
    pub is_source: bool,
    pub input_edges: Vec<usize>,
    pub output_edges: Vec<usize>,
}

/// An edge between two tasks: it carries records over channels.
#[derive(Clone, Debug)]
pub struct JobEdge {
    pub id: usize,
    pub source: usize,
    pub target: usize,
    pub source_node: NodeId,
    pub target_node: NodeId,
    pub input: usize,
    pub partitioning: Partitioning,
    /// The StreamGraph edge this job edge carries.
    pub stream_edge: usize,
}

/// One channel of a task: which edge, and the subtask at its other end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelEnd {
    pub edge: usize,
    pub subtask: u32,
}

/// The logical graph of tasks that the JobManager schedules.
pub struct JobGraph {
    pub name: String,
    pub max_parallelism: u32,
    pub vertices: Vec<JobVertex>,
    pub edges: Vec<JobEdge>,
    stream: StreamGraph,
    vertex_of_node: Vec<usize>,
}

impl JobGraph {
    fn fuse(stream: StreamGraph, order: Vec<NodeId>) -> JobGraph {
        // Whether `edge` may be a direct call inside one task, whatever
        // the operator's other inputs.
        let chainable = |edge: &StreamEdge| -> bool {
            let mut source = &stream.nodes[edge.source];
            // A side output chains as its operator does.
            if let Some((operator, _)) = stream.side_outputs().find(|&(_, side)| side == source.id)
            {
                source = &stream.nodes[operator];
            }
            let target = &stream.nodes[edge.target];
            let pointwise = match stream.resolved_partitioning(edge) {
                Partitioning::Forward => true,
                Partitioning::Hash(_) => {
                    stream.parallelism_of(edge.source) == 1
                        && stream.parallelism_of(edge.target) == 1
                }
                Partitioning::Rebalance | Partitioning::Broadcast => false,
            };
            pointwise
                && source.slot_sharing_group == target.slot_sharing_group
                && source.chaining != ChainingStrategy::Never
                && target.chaining == ChainingStrategy::Always
        };
        let mut vertex_of_node = vec![usize::MAX; stream.nodes.len()];
        let mut vertices: Vec<JobVertex> = Vec::new();
        for node in order {
            let inputs: Vec<&StreamEdge> = stream
                .edges
                .iter()
                .filter(|edge| edge.target == node)
                .collect();
            // A one-input operator chains to its one input; a two-input
            // operator to both, when both come from one chain.
            let chained_to = match (&stream.nodes[node].kind, inputs.as_slice()) {
                (NodeKind::OneInput { .. }, [input]) if chainable(input) => {
                    Some(vertex_of_node[input.source])
                }
                // Always in its operator's chain: it is that operator's
                // second output.
                (NodeKind::SideOutput, [input]) => Some(vertex_of_node[input.source]),
                (NodeKind::TwoInput { .. }, [first, second])
                    if chainable(first)
                        && chainable(second)
                        && vertex_of_node[first.source] == vertex_of_node[second.source] =>
                {
                    Some(vertex_of_node[first.source])
                }
                _ => None,
            };
            match chained_to {
                Some(vertex) => {
                    vertex_of_node[node] = vertex;
                    vertices[vertex].operators.push(node);
                }
                None => {
                    let id = vertices.len();
                    vertex_of_node[node] = id;
                    vertices.push(JobVertex {
                        id,
                        name: String::new(),
                        operators: vec![node],
                        parallelism: stream.parallelism_of(node),
                        slot_sharing_group: stream.nodes[node]
                            .slot_sharing_group
                            .clone()
                            .unwrap_or_else(|| DEFAULT_SLOT_SHARING_GROUP.to_string()),
                        is_source: matches!(stream.nodes[node].kind, NodeKind::Source(_)),
                        input_edges: Vec::new(),
                        output_edges: Vec::new(),
                    });
                }
            }
        }
        let mut edges = Vec::new();
        for (stream_edge, edge) in stream.edges.iter().enumerate() {
            let (source, target) = (vertex_of_node[edge.source], vertex_of_node[edge.target]);
            if source == target {
                continue;
            }
            let id = edges.len();
            vertices[source].output_edges.push(id);
            vertices[target].input_edges.push(id);
            edges.push(JobEdge {
                id,
                source,
                target,
                source_node: edge.source,
                target_node: edge.target,
                input: edge.input,
                partitioning: stream.resolved_partitioning(edge),
                stream_edge,
            });
        }
        for vertex in &mut vertices {
            let names: Vec<&str> = vertex
                .operators
                .iter()
                .map(|node| stream.nodes[*node].name.as_str())
                .collect();
            vertex.name = names.join(" -> ");
        }
        JobGraph {
            name: stream.job_name.clone(),
            max_parallelism: stream.max_parallelism,
            vertices,
            edges,
            stream,
            vertex_of_node,
        }
    }

    /// The stable id that names an operator's state in checkpoints: its
    /// position in the program's build order and its name, the same in
    /// every process and at every parallelism.
    pub fn operator_id(&self, node: NodeId) -> String {
        format!("{}:{}", node, self.stream.nodes[node].name)
    }

    /// Every operator: its id, name and vertex.
    pub fn operators(&self) -> Vec<(String, String, usize)> {
        (0..self.stream.nodes.len())
            .map(|node| {
                (
                    self.operator_id(node),
                    self.stream.nodes[node].name.clone(),
                    self.vertex_of_node[node],
                )
            })
            .collect()
    }

    pub fn operator_name(&self, node: NodeId) -> &str {
        &self.stream.nodes[node].name
    }

    pub fn vertex_of(&self, node: NodeId) -> usize {
        self.vertex_of_node[node]
    }

    /// Slots needed with slot sharing: per group, its largest parallelism.
    pub fn slots_required(&self) -> u32 {
        let mut groups: BTreeMap<&str, u32> = BTreeMap::new();
        for vertex in &self.vertices {
            let entry = groups
                .entry(vertex.slot_sharing_group.as_str())
                .or_insert(0);
            *entry = (*entry).max(vertex.parallelism);
        }
        groups.values().sum()
    }

    /// The slot of each subtask: subtask `i` of every vertex of a slot
    /// sharing group goes to the group's `i`-th slot.
    pub fn slot_of(&self, vertex: usize, subtask: u32) -> u32 {
        let mut groups: Vec<(&str, u32)> = Vec::new();
        for candidate in &self.vertices {
            match groups
                .iter_mut()
                .find(|(name, _)| *name == candidate.slot_sharing_group)
            {
                Some((_, width)) => *width = (*width).max(candidate.parallelism),
                None => groups.push((candidate.slot_sharing_group.as_str(), candidate.parallelism)),
            }
        }
        let group = &self.vertices[vertex].slot_sharing_group;
        let offset: u32 = groups
            .iter()
            .take_while(|(name, _)| name != group)
            .map(|(_, width)| width)
            .sum();
        offset + subtask
    }

    /// The largest watermark drift, in milliseconds, between the input
    /// channels of `vertex`'s tasks: set when every source upstream of it
    /// declared watermark alignment in one group (the smallest drift any
    /// of them declared); `None` otherwise. See
    /// [`WatermarkStrategy::with_watermark_alignment`](crate::time::WatermarkStrategy::with_watermark_alignment).
    pub fn watermark_alignment(&self, vertex: usize) -> Option<i64> {
        let mut known = vec![None; self.vertices.len()];
        self.upstream_alignment(vertex, &mut known)
            .map(|(_, drift)| drift)
    }

    /// The alignment group and drift of every source upstream of `vertex`
    /// (of `vertex` itself when it is a source), if they share one; each
    /// vertex's answer is worked out once, in `known`.
    fn upstream_alignment<'a>(
        &'a self,
        vertex: usize,
        known: &mut Vec<Option<Option<(&'a str, i64)>>>,
    ) -> Option<(&'a str, i64)> {
        if let Some(alignment) = known[vertex] {
            return alignment;
        }
        let job_vertex = &self.vertices[vertex];
        let alignment = if job_vertex.is_source {
            let source = job_vertex.operators[0];
            self.stream
                .source_alignment
                .iter()
                .find(|(node, _)| *node == source)
                .map(|(_, alignment)| (alignment.group.as_str(), alignment.max_drift_ms))
        } else {
            let mut shared: Option<(&str, i64)> = None;
            let mut aligned = !job_vertex.input_edges.is_empty();
            for edge in &job_vertex.input_edges {
                match (
                    self.upstream_alignment(self.edges[*edge].source, known),
                    shared,
                ) {
                    (None, _) => aligned = false,
                    (Some(upstream), None) => shared = Some(upstream),
                    (Some((group, drift)), Some((shared_group, shared_drift))) => {
                        if group != shared_group {
                            aligned = false;
                        }
                        shared = Some((shared_group, drift.min(shared_drift)));
                    }
                }
            }
            shared.filter(|_| aligned)
        };
        known[vertex] = Some(alignment);
        alignment
    }

    /// The channels of an edge from one producer subtask: forward edges
    /// have one, the others one per consumer subtask.
    pub fn consumers_of(&self, edge: usize, producer: u32) -> Vec<u32> {
        let edge = &self.edges[edge];
        match edge.partitioning {
            Partitioning::Forward => vec![producer],
            _ => (0..self.vertices[edge.target].parallelism).collect(),
        }
    }

    /// A subtask's output channels, in the order its writers index them.
    pub fn output_channels(&self, vertex: usize, subtask: u32) -> Vec<ChannelEnd> {
        let mut channels = Vec::new();
        for edge in &self.vertices[vertex].output_edges {
            for consumer in self.consumers_of(*edge, subtask) {
                channels.push(ChannelEnd {
                    edge: *edge,
                    subtask: consumer,
                });
            }
        }
        channels
    }

    /// A subtask's input channels (with the logical input of each).
    pub fn input_channels(&self, vertex: usize, subtask: u32) -> Vec<(ChannelEnd, usize)> {
        let mut channels = Vec::new();
        for edge_id in &self.vertices[vertex].input_edges {
            let edge = &self.edges[*edge_id];
            for producer in 0..self.vertices[edge.source].parallelism {
                if self.consumers_of(*edge_id, producer).contains(&subtask) {
                    channels.push((
                        ChannelEnd {
                            edge: *edge_id,
                            subtask: producer,
                        },
                        edge.input,
                    ));
                }
            }
        }
        channels
    }

    /// Builds the operators of one subtask. Its writers queue into `queue`,
    /// indexing channels as [`JobGraph::output_channels`] lists them.
    pub fn instantiate(&self, vertex_id: usize, subtask: u32, setup: &TaskSetup) -> TaskInstance {
        let vertex = &self.vertices[vertex_id];
        let mut channel_bases: BTreeMap<usize, usize> = BTreeMap::new();
        let mut next_base = 0;
        for edge in &vertex.output_edges {
            channel_bases.insert(*edge, next_base);
            next_base += self.consumers_of(*edge, subtask).len();
        }
        // The inputs of the chained operators built so far, by operator and
        // input (a two-input operator's two are both in the chain).
        let mut built: BTreeMap<(NodeId, usize), ErasedOutput> = BTreeMap::new();
        for (position, node_id) in vertex.operators.iter().enumerate().rev() {
            let node = &self.stream.nodes[*node_id];
            let mut outputs = Vec::new();
            // The consumers of its side output, if it splits its stream (a
            // side output node is always chained behind its operator).
            let mut side = None;
            for (edge_index, edge) in self
                .stream
                .edges
                .iter()
                .enumerate()
                .filter(|(_, edge)| edge.source == *node_id)
            {
                if matches!(self.stream.nodes[edge.target].kind, NodeKind::SideOutput) {
                    side = built.remove(&(edge.target, 0));
                    continue;
                }
                if let Some(input) = built
                    .remove(&(edge.target, edge.input))
                    .filter(|_| vertex.operators.contains(&edge.target))
                {
                    outputs.push(input);
                    continue;
                }
                let job_edge = self
                    .edges
                    .iter()
                    .find(|job_edge| job_edge.stream_edge == edge_index)
                    .expect("every edge leaving a chain is a job edge");
                outputs.push(node.output_type.writer(
                    &job_edge.partitioning,
                    channel_bases[&job_edge.id],
                    self.consumers_of(job_edge.id, subtask).len(),
                    self.max_parallelism,
                    setup.queue.clone(),
                ));
            }
            let mut downstream = node.output_type.fan_out(outputs);
            if let Some(side) = side {
                downstream = Box::new(SplitOutputs {
                    main: downstream,
                    side,
                });
            }
            let context = OperatorContext {
                operator_name: node.name.clone(),
                subtask_index: subtask,
                parallelism: vertex.parallelism,
                max_parallelism: self.max_parallelism,
                key_groups: KeyGroupRange::for_subtask(
                    self.max_parallelism,
                    vertex.parallelism,
                    subtask,
                ),
                accumulators: setup.accumulators.clone(),
                chain_position: position,
                tracker: setup.tracker.clone(),
                operator_id: self.operator_id(*node_id),
                restore: setup.restore.clone(),
                committables: setup.committables.clone(),
            };
            if position == 0 {
                return match &node.kind {
                    NodeKind::Source(factory) => {
                        TaskInstance::Source(factory(&context, downstream))
                    }
                    NodeKind::OneInput { head, .. } => {
                        TaskInstance::Input(head(&context, downstream))
                    }
                    NodeKind::TwoInput { head, .. } | NodeKind::Union(head) => {
                        TaskInstance::Input(head(&context, downstream))
                    }
                    NodeKind::SideOutput => {
                        unreachable!("a side output is chained behind its operator")
                    }
                };
            }
            match &node.kind {
                NodeKind::OneInput { chained, .. } => {
                    built.insert((*node_id, 0), chained(&context, downstream));
                }
                NodeKind::TwoInput { chained, .. } => {
                    let [first, second] = chained(&context, downstream);
                    built.insert((*node_id, 0), first);
                    built.insert((*node_id, 1), second);
                }
                // Its consumers, for its operator to feed.
                NodeKind::SideOutput => {
                    built.insert((*node_id, 0), downstream);
                }
                NodeKind::Source(_) | NodeKind::Union(_) => {
                    unreachable!("sources and unions are not chained behind a head")
                }
            }
        }
        unreachable!("a vertex has at least one operator")
    }
}

/// What a task needs to be instantiated.
pub struct TaskSetup {
    pub queue: OutputQueue,
    pub accumulators: Rc<RefCell<Accumulators>>,
    /// Which operator of the chain runs (see [`JobGraph::instantiate`]).
    pub tracker: Rc<Cell<usize>>,
    /// The state the task's operators start from (empty on a fresh start).
    pub restore: Rc<RefCell<TaskRestore>>,
    /// What the task's sinks leave to commit when the job has finished.
    pub committables: Rc<RefCell<Vec<Committable>>>,
}

impl TaskSetup {
    pub fn new(restore: TaskRestore) -> Self {
        TaskSetup {
            queue: Rc::default(),
            accumulators: Rc::new(RefCell::new(Accumulators::default())),
            tracker: Rc::new(Cell::new(0)),
            restore: Rc::new(RefCell::new(restore)),
            committables: Rc::default(),
        }
    }
}

/// The operators of one subtask, ready to be driven.
pub enum TaskInstance {
    Source(Box<dyn SourceHead>),
    Input(Box<dyn TaskHead>),
}

impl fmt::Display for JobGraph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "JobGraph '{}': {} vertices, max parallelism {}, {} slots with slot sharing",
            self.name,
            self.vertices.len(),
            self.max_parallelism,
            self.slots_required()
        )?;
        // Each vertex's alignment is worked out once for all of them.
        let mut known = vec![None; self.vertices.len()];
        for vertex in &self.vertices {
            writeln!(
                f,
                "  vertex {}: {} (parallelism {}, slot sharing group '{}')",
                vertex.id, vertex.name, vertex.parallelism, vertex.slot_sharing_group
            )?;
            for (position, node) in vertex.operators.iter().enumerate() {
                let role = if position == 0 { "head" } else { "chained" };
                writeln!(f, "    {role}: {}", self.stream.nodes[*node].name)?;
            }
            if let Some((group, drift)) = self.upstream_alignment(vertex.id, &mut known) {
                if vertex.is_source {
                    writeln!(
                        f,
                        "    watermark alignment: group '{group}', max drift {drift} ms"
                    )?;
                } else {
                    writeln!(
                        f,
                        "    watermark alignment: holds input channels more than {drift} ms ahead of the slowest (group '{group}')"
                    )?;
                }
            }
        }
        for edge in &self.edges {
            writeln!(
                f,
                "  edge: vertex {} ({}) -> vertex {} ({}) input {}: {}",
                edge.source,
                self.stream.nodes[edge.source_node].name,
                edge.target,
                self.stream.nodes[edge.target_node].name,
                edge.input,
                edge.partitioning.name()
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::error::GraphError;
    use crate::function::{Collector, KeyedContext};
    use crate::{KeyedCoProcessFunction, StreamExecutionEnvironment};

    #[derive(Clone)]
    struct Ignore;

    impl KeyedCoProcessFunction<u64, u64, String, u64> for Ignore {
        fn process_element1(
            &mut self,
            _: u64,
            _: &mut KeyedContext<'_, u64>,
            _: &mut dyn Collector<u64>,
        ) {
        }
        fn process_element2(
            &mut self,
            _: String,
            _: &mut KeyedContext<'_, u64>,
            _: &mut dyn Collector<u64>,
        ) {
        }
    }

    #[test]
    fn an_edge_to_an_input_the_operator_lacks_is_refused() {
        let env = StreamExecutionEnvironment::new();
        let numbers = env.from_collection(vec![1u64, 2]);
        let words = env.from_collection(vec!["a".to_string()]);
        let joined = numbers
            .clone()
            .key_by(|number| *number)
            .connect(words.key_by(|word| word.len() as u64))
            .process(Ignore);
        env.add_edge(numbers.node_id(), joined.node_id(), 2);
        match env.build() {
            Err(GraphError::Invalid { reason, .. }) => {
                assert!(reason.contains("input 2"), "{reason}")
            }
            Err(other) => panic!("refused for another reason: {other}"),
            Ok(_) => panic!("a third input of a two-input operator was accepted"),
        }
    }
}
