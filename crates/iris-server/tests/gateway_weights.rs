//! The gateway holds no weights: loading what it needs of every generation fixture
//! (processor, tokenizer, chat template, configs) reads no checkpoint tensor. Its own
//! test binary, so no other test's loads are counted.

use std::path::PathBuf;

use iris_image::ImageLimits;
use iris_models::weights::tensors_read_in_process;
use iris_server::gateway::GatewayModel;

#[test]
fn the_gateway_reads_no_tensor_of_a_generation_model() {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    for name in [
        "llava-tiny-hub-f32",
        "llava-tiny-gqa-bf16",
        "blip2-tiny-opt-f32",
        "idefics-tiny-f32",
        "blip-tiny-caption-f32",
    ] {
        let m = GatewayModel::load(name, &fixtures.join(name), ImageLimits::default()).unwrap();
        assert_eq!(m.id, name);
    }
    assert_eq!(tensors_read_in_process(), 0);
    // The counter does count: a retrieval model, which the gateway serves itself, reads.
    let dir = fixtures.join("blip-tiny-retrieval-f32");
    GatewayModel::load("r", &dir, ImageLimits::default()).unwrap();
    assert!(tensors_read_in_process() > 0);
}
