//! The `strom` command line with the built-in job programs.

fn main() -> std::process::ExitCode {
    strom_tools::main_with_programs(strom_tools::builtin_programs())
}
