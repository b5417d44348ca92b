//! `iris-connector`: the connector as its own process (same flags as `iris connector`).
fn main() -> std::process::ExitCode {
    iris_cli::main_with(iris_cli::roles::connector)
}
