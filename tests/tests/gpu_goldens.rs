//! Every golden test in one binary, for `tools/gpu-check.sh` to run on a GPU machine
//! (`IRIS_TEST_DEVICE=cuda`, `IRIS_FIXTURES` pointing at the fixtures there): built
//! only with the `cuda` feature, so the CPU suite runs each golden once.
#![cfg(feature = "cuda")]

#[path = "golden.rs"]
mod golden;
#[path = "golden_blip.rs"]
mod golden_blip;
#[path = "golden_blip2.rs"]
mod golden_blip2;
#[path = "golden_blip2_retrieval.rs"]
mod golden_blip2_retrieval;
#[path = "golden_idefics.rs"]
mod golden_idefics;
