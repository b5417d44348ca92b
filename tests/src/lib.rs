//! Helpers shared by the end-to-end tests: fixture paths, goldens, error metrics.

use std::path::PathBuf;

use iris_engine::PipelineOptions;
use iris_models::weights::Weights;
use iris_tensor::{DType, Device, Tensor};

/// The device `IRIS_TEST_DEVICE` names (`cpu` by default): `tools/gpu-check.sh` runs the
/// goldens on CUDA with it.
pub fn test_device() -> Device {
    let name = std::env::var("IRIS_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    Device::parse(&name).unwrap_or_else(|e| panic!("IRIS_TEST_DEVICE={name}: {e}"))
}

/// Pipeline options of the goldens: everything default, on [`test_device`].
pub fn options() -> PipelineOptions {
    PipelineOptions {
        device: test_device(),
        ..Default::default()
    }
}

/// The fixtures folder: `IRIS_FIXTURES` when set (a test binary run on another
/// machine, as `tools/gpu-check.sh` does), else this crate's `fixtures/`.
pub fn fixtures() -> PathBuf {
    match std::env::var_os("IRIS_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures"),
    }
}

pub fn fixture(name: &str) -> PathBuf {
    fixtures().join(name)
}

/// SmolLM2-135M-Instruct's GGUF (`scripts/models.sh` fetches it and the test script
/// sets `IRIS_SMOLLM2_GGUF`); `None` (the test skips) when it is not set, unless
/// `IRIS_REQUIRE_MODELS` says it must be.
pub fn smollm2_gguf() -> Option<PathBuf> {
    let Some(path) = std::env::var_os("IRIS_SMOLLM2_GGUF") else {
        assert!(
            std::env::var_os("IRIS_REQUIRE_MODELS").is_none(),
            "IRIS_SMOLLM2_GGUF is not set (scripts/models.sh prints the path)"
        );
        eprintln!("skipped: IRIS_SMOLLM2_GGUF is not set (scripts/models.sh fetches the file)");
        return None;
    };
    Some(path.into())
}

/// The golden JSON and tensors HF produced for a fixture (see tools/gen_llava_fixtures.py).
pub struct Golden {
    pub json: serde_json::Value,
    tensors: Weights,
}

impl Golden {
    pub fn load(name: &str) -> Golden {
        let dir = fixture(name);
        let json = serde_json::from_str(
            &std::fs::read_to_string(dir.join("golden.json")).expect("golden.json"),
        )
        .expect("golden.json parses");
        let tensors = Weights::open_files(&[dir.join("golden.safetensors")], DType::F32)
            .expect("golden tensors");
        Golden { json, tensors }
    }

    pub fn tensor(&self, name: &str) -> Tensor {
        let shape = self.shape(name);
        self.tensors
            .get(name, &shape)
            .expect("golden tensor present")
    }

    fn shape(&self, name: &str) -> Vec<usize> {
        self.tensors
            .shape(name)
            .unwrap_or_else(|| panic!("golden tensor {name} missing"))
    }

    pub fn ids(&self, key: &str) -> Vec<u32> {
        self.json[key]
            .as_array()
            .expect("id list")
            .iter()
            .map(|x| x.as_u64().expect("id") as u32)
            .collect()
    }

    /// An id list under `json[case][key]`.
    pub fn ids_at(&self, case: &str, key: &str) -> Vec<u32> {
        self.json[case][key]
            .as_array()
            .expect("id list")
            .iter()
            .map(|x| x.as_u64().expect("id") as u32)
            .collect()
    }

    pub fn floats(&self, key: &str) -> Vec<f32> {
        self.json[key]
            .as_array()
            .expect("float list")
            .iter()
            .map(|x| x.as_f64().expect("float") as f32)
            .collect()
    }

    pub fn image_paths(&self) -> Vec<PathBuf> {
        self.json["images"]
            .as_array()
            .expect("images")
            .iter()
            .map(|x| fixtures().join("images").join(x.as_str().expect("name")))
            .collect()
    }
}

/// ‖a − b‖ / ‖b‖ and max |a − b|.
pub fn errors(a: &[f32], b: &[f32]) -> (f64, f64) {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let (mut num, mut den, mut max) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let d = (*x as f64 - *y as f64).abs();
        num += d * d;
        den += (*y as f64) * (*y as f64);
        max = max.max(d);
    }
    ((num / den.max(1e-30)).sqrt(), max)
}

/// Asserts `got` within `tol` relative error of `want` (printing both errors), for the
/// stage `what` of fixture `name`.
pub fn assert_close(name: &str, what: &str, tol: f64, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{name}: {what}: element count");
    let (rel, max) = errors(got, want);
    eprintln!("{name}: {what}: rel {rel:.2e} max abs {max:.2e}");
    assert!(
        rel <= tol,
        "{name}: {what}: rel error {rel:.3e} > {tol:.0e} (max abs {max:.3e})"
    );
}
