//! `iris-gateway`: the gateway as its own process (same flags as `iris gateway`).
fn main() -> std::process::ExitCode {
    iris_cli::main_with(iris_cli::roles::gateway)
}
