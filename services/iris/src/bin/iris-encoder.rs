//! `iris-encoder`: the encoder as its own process (same flags as `iris encoder`).
fn main() -> std::process::ExitCode {
    iris_cli::main_with(iris_cli::roles::encoder)
}
