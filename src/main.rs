//! The `dialogd` binary: everything happens in [`dialogd::cli`].

fn main() -> std::process::ExitCode {
    dialogd::cli::main()
}
