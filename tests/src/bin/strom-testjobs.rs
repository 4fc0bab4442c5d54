//! The `strom` command line with the built-in programs and the test
//! programs of `strom_tests::programs`: a user's own binary, as the README
//! describes, used by the end-to-end tests.

fn main() -> std::process::ExitCode {
    let mut programs = strom_tools::builtin_programs();
    programs.extend(strom_tests::programs::test_programs());
    strom_tools::main_with_programs(programs)
}
