// A float has no stable key hash (NaN != NaN, and 0.0 == -0.0 hash apart),
// so keying by it must not compile.
use strom_core::StreamExecutionEnvironment;

fn main() {
    let env = StreamExecutionEnvironment::new();
    env.from_collection(vec![1.5f64, 2.5])
        .key_by(|value: &f64| *value)
        .reduce(|first, second| first + second);
}
