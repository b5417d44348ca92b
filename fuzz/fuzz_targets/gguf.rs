//! GGUF headers: any bytes parse to a header whose every tensor lies inside the file,
//! or fail with an error — never a panic, and no allocation a count alone asks for.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = iris_models::gguf::parse(data) {
        for t in &h.tensors {
            assert!(h.data_start + t.offset + t.bytes <= data.len() as u64);
            assert_eq!(t.offset % h.alignment, 0);
        }
    }
});
