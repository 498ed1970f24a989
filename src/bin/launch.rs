//! `launch train|eval|export` — see `launch --help` and configs/README.md.

fn main() -> std::process::ExitCode {
    launcher::cli::main()
}
