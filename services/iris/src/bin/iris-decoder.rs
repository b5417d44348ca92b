//! `iris-decoder`: the decoder as its own process (same flags as `iris decoder`).
fn main() -> std::process::ExitCode {
    iris_cli::main_with(iris_cli::roles::decoder)
}
