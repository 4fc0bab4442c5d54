//! The client commands (in progress).

pub fn commands() -> Vec<clap::Command> {
    Vec::new()
}

pub fn run(_name: &str, _matches: &clap::ArgMatches) -> std::process::ExitCode {
    std::process::ExitCode::from(2)
}
