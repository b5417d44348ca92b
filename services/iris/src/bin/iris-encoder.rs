//! `iris-encoder`: the encoder as its own process (same flags as `iris encoder`).
fn main() -> std::process::ExitCode {
    iris_server::roles::main_with(iris_server::roles::encoder)
}
