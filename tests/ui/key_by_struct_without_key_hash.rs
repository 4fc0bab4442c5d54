// A struct is a key only once it says how to hash itself stably.
use strom_core::StreamExecutionEnvironment;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Customer {
    id: u64,
}

fn main() {
    let env = StreamExecutionEnvironment::new();
    env.from_collection(vec![1u64, 2])
        .key_by(|id: &u64| Customer { id: *id })
        .reduce(|first, second| first + second);
}
