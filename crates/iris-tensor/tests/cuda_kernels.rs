//! Every CUDA kernel source compiles with NVRTC to PTX for the architectures Iris
//! serves on (A100: sm_80, H100/H200: sm_90), and the PTX holds every kernel the
//! backend launches. Runs without a GPU: CI points `LD_LIBRARY_PATH` at NVRTC from
//! PyPI (`scripts/cuda-tools.sh nvrtc`); with `IRIS_REQUIRE_NVRTC=1` a missing NVRTC fails. With
//! `IRIS_PTXAS` (`scripts/cuda-tools.sh ptxas`) the PTX is also assembled for each architecture, as
//! a GPU's driver does when it loads the module, and each kernel's registers and spills
//! are printed.
#![cfg(feature = "cuda")]

use iris_tensor::cuda::{compile, compile_source, nvrtc_present as present, KERNELS, SOURCE};

fn nvrtc_present() -> bool {
    let present = present();
    if !present {
        assert!(
            std::env::var_os("IRIS_REQUIRE_NVRTC").is_none(),
            "IRIS_REQUIRE_NVRTC is set but libnvrtc is not on the library path"
        );
        eprintln!("note: no libnvrtc on the library path: the kernels were not compiled");
    }
    present
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    if !nvrtc_present() {
        return;
    }
    for arch in ["sm_80", "sm_90"] {
        let ptx = compile(arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
        assert!(
            ptx.contains(&format!(".target {arch}")),
            "{arch}: no target line"
        );
        if let Some(ptxas) = std::env::var_os("IRIS_PTXAS") {
            assemble(&ptxas, arch, &ptx);
        }
        for name in KERNELS {
            assert!(
                ptx.contains(&format!(".entry {name}(")),
                "{arch}: kernel {name} missing from the PTX"
            );
            assert!(
                SOURCE.contains(&format!("void {name}(")),
                "kernel {name} is not in the source"
            );
        }
    }
}

#[test]
fn a_broken_source_is_an_error_with_the_compiler_log() {
    if !nvrtc_present() {
        return;
    }
    let err = compile_source("extern \"C\" __global__ void k() { nope; }", "sm_80")
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope"), "{err}");
}

/// `ptxas -arch=<arch> -v` on the PTX: it must assemble, and no kernel may spill.
fn assemble(ptxas: &std::ffi::OsStr, arch: &str, ptx: &str) {
    let dir = std::env::temp_dir().join(format!("iris-ptx-{}-{arch}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("kernels.ptx");
    std::fs::write(&src, ptx).unwrap();
    let out = std::process::Command::new(ptxas)
        .arg(format!("-arch={arch}"))
        .arg("-v")
        .arg(&src)
        .arg("-o")
        .arg(dir.join("kernels.cubin"))
        .output()
        .expect("run ptxas");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{arch}: ptxas failed:\n{log}");
    for line in log
        .lines()
        .filter(|l| l.contains("registers") || l.contains("spill"))
    {
        eprintln!("{arch}: {}", line.trim());
    }
    for line in log.lines().filter(|l| l.contains("bytes spill")) {
        assert!(
            line.contains(" 0 bytes spill stores") && line.contains(" 0 bytes spill loads"),
            "{arch}: a kernel spills registers: {line}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}
