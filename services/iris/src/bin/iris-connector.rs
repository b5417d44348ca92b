//! `iris-connector`: the connector as its own process (same flags as `iris connector`).
fn main() -> std::process::ExitCode {
    iris_server::roles::main_with(iris_server::roles::connector)
}
