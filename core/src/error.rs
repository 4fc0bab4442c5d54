//! Errors of job construction and of task execution.

use std::fmt;

/// Why a job was refused before it ran.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GraphError {
    /// The graph has no source.
    NoSource,
    /// The operators form a cycle; names the operators on it.
    Cycle { operators: Vec<String> },
    /// An operator's parallelism is 0 or above the job's max parallelism.
    Parallelism {
        operator: String,
        parallelism: u32,
        max_parallelism: u32,
    },
    /// The max parallelism is 0 or above the supported bound.
    MaxParallelism { max_parallelism: u32 },
    /// A forward edge joins operators of different parallelism.
    ForwardParallelism {
        from: String,
        to: String,
        from_parallelism: u32,
        to_parallelism: u32,
    },
    /// An edge connects an output to an input of another record type.
    TypeMismatch {
        from: String,
        to: String,
        produced: &'static str,
        expected: &'static str,
    },
    /// An operator was given the wrong number of inputs.
    Inputs {
        operator: String,
        expected: usize,
        found: usize,
    },
    /// A node id that the graph does not hold.
    UnknownNode { node: usize },
    /// Anything else the builder refused, with its reason.
    Invalid { operator: String, reason: String },
}

impl fmt::Display for GraphError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GraphError::NoSource => write!(f, "invalid job: it has no source"),
            GraphError::Cycle { operators } => {
                write!(f, "invalid job: the operators form a cycle: {}", operators.join(" -> "))
            }
            GraphError::Parallelism { operator, parallelism, max_parallelism } => write!(
                f,
                "invalid job: operator '{operator}' has parallelism {parallelism}, which must be between 1 and the max parallelism {max_parallelism}"
            ),
            GraphError::MaxParallelism { max_parallelism } => write!(
                f,
                "invalid job: max parallelism {max_parallelism} must be between 1 and {}",
                crate::key::MAX_PARALLELISM_UPPER_BOUND
            ),
            GraphError::ForwardParallelism { from, to, from_parallelism, to_parallelism } => write!(
                f,
                "invalid job: forward partitioning from '{from}' (parallelism {from_parallelism}) to '{to}' (parallelism {to_parallelism}) needs equal parallelism; use rebalance() instead"
            ),
            GraphError::TypeMismatch { from, to, produced, expected } => write!(
                f,
                "invalid job: '{from}' produces {produced} but '{to}' expects {expected}"
            ),
            GraphError::Inputs { operator, expected, found } => write!(
                f,
                "invalid job: operator '{operator}' needs {expected} input(s) but has {found}"
            ),
            GraphError::UnknownNode { node } => write!(f, "invalid job: no operator with id {node}"),
            GraphError::Invalid { operator, reason } => {
                write!(f, "invalid job: operator '{operator}': {reason}")
            }
        }
    }
}

impl std::error::Error for GraphError {}

/// Why a running task stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskError {
    /// User code panicked; names the operator and subtask (`2/4`).
    Panic {
        operator: String,
        subtask: String,
        message: String,
    },
    /// A buffer from an input channel could not be decoded.
    Decode {
        operator: String,
        subtask: String,
        message: String,
    },
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TaskError::Panic {
                operator,
                subtask,
                message,
            } => {
                write!(
                    f,
                    "operator '{operator}' (subtask {subtask}) panicked: {message}"
                )
            }
            TaskError::Decode {
                operator,
                subtask,
                message,
            } => {
                write!(f, "operator '{operator}' (subtask {subtask}) received an undecodable buffer: {message}")
            }
        }
    }
}

impl std::error::Error for TaskError {}

/// The message of a caught panic (its `&str` or `String` payload).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|message| message.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}
