//! A safetensors file's header and offsets: any bytes open as a checkpoint whose every
//! tensor reads, or fail with an error.
#![no_main]

use iris_models::weights::Weights;
use iris_tensor::DType;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("iris-fuzz-{}.safetensors", std::process::id()));
    std::fs::write(&path, data).unwrap();
    if let Ok(w) = Weights::open_files(&[path], DType::F32) {
        for name in w.names() {
            let shape = w.shape(&name).unwrap();
            let _ = w.get(&name, &shape);
        }
    }
});
