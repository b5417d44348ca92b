//! The `iris` binary as a user runs it: golden output on the fixtures, and a clear
//! error with a non-zero exit (never a panic) for each kind of bad input.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::tensor::{Dtype, TensorView};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn image(name: &str) -> PathBuf {
    fixtures().join("images").join(name)
}

const PROMPT1: &str = "USER: <image>\nWhat is in the picture? ASSISTANT:";

fn iris(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_iris"))
        .args(args)
        .output()
        .expect("iris runs")
}

fn generate(model: &Path, images: &[PathBuf], prompt: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "generate".to_string(),
        "--model".into(),
        model.display().to_string(),
    ];
    for i in images {
        args.push("--image".into());
        args.push(i.display().to_string());
    }
    args.extend(["--prompt".into(), prompt.into(), "--json".into()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    iris(&refs)
}

/// A JSON list of numbers (`iris generate --json`'s logprobs, a golden's).
fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// The run failed cleanly: non-zero exit, an `error:` line containing `needle`, no panic.
fn assert_clean_failure(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    assert!(stderr.contains("error:"), "no error line: {stderr}");
    assert!(
        stderr.to_lowercase().contains(&needle.to_lowercase()),
        "error does not mention `{needle}`: {stderr}"
    );
}

#[test]
fn generate_json_matches_hf_goldens() {
    for (name, tol) in [
        ("llava-tiny-hub-f32", 1e-4),
        ("llava-tiny-model-f32", 1e-4),
        ("llava-tiny-qwen2-f32", 1e-4),
        ("blip2-tiny-opt-f32", 1e-4),
        ("llava-tiny-gqa-bf16", 3e-2),
        ("llava-next-tiny-f32", 1e-4),
        ("llava-next-tiny-bf16", 3e-2),
        ("blip2-tiny-t5-f32", 5e-4),
        ("blip2-tiny-t5-bf16", 3e-2),
        ("llava-tiny-siglip-qwen2-f32", 1e-4),
        ("llava-tiny-siglip-qwen2-bf16", 3e-2),
    ] {
        let dir = fixtures().join(name);
        let golden: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap())
                .unwrap();
        let images: Vec<PathBuf> = golden["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| image(i.as_str().unwrap()))
            .collect();
        let n = golden["max_new_tokens"].as_u64().unwrap().to_string();
        let out = generate(
            &dir,
            &images,
            golden["prompt"].as_str().unwrap(),
            &["--max-new-tokens", &n],
        );
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
        for key in ["prompt_token_ids", "token_ids", "text"] {
            assert_eq!(got[key], golden[key], "{name}: {key}");
        }
        let (a, b) = (floats(&got["logprobs"]), floats(&golden["logprobs"]));
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= tol, "{name}: logprob {x} vs HF {y}");
        }
    }
}

#[test]
fn sampling_is_seeded() {
    let dir = fixtures().join("llava-tiny-hub-f32");
    let run = |seed: &str| {
        let out = generate(
            &dir,
            &[image("scene.png")],
            PROMPT1,
            &[
                "--max-new-tokens",
                "6",
                "--temperature",
                "1.0",
                "--top-p",
                "0.9",
                "--seed",
                seed,
            ],
        );
        let v = stdout_json(&out);
        v["token_ids"].clone()
    };
    assert_eq!(run("1"), run("1"));
    assert_ne!(
        run("1"),
        run("2"),
        "different seeds should differ on 6 tokens"
    );
}

/// A copy of the f32 hub fixture whose weights are rewritten by `edit`.
fn edited_fixture(
    edit: impl FnOnce(&mut HashMap<String, (Vec<usize>, Vec<u8>)>),
) -> tempfile::TempDir {
    edited("llava-tiny-hub-f32", edit)
}

/// A copy of the model folder `src`, to edit.
fn copied(src: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    dir
}

/// `tensors` (dtype, shape, bytes) as `dir`'s `model.safetensors`.
fn write_safetensors(dir: &Path, tensors: &HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>) {
    let views: HashMap<String, TensorView> = tensors
        .iter()
        .map(|(n, (dt, s, d))| (n.clone(), TensorView::new(*dt, s.clone(), d).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

/// The fixture `name`'s golden request: its images and prompt.
fn golden_request(name: &str) -> (Vec<PathBuf>, String) {
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(name).join("golden.json")).unwrap(),
    )
    .unwrap();
    let images = golden["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| image(i.as_str().unwrap()))
        .collect();
    (images, golden["prompt"].as_str().unwrap().to_string())
}

/// `iris generate --json` on `model`, which must succeed: its one JSON object.
fn generate_json(
    model: &Path,
    images: &[PathBuf],
    prompt: &str,
    extra: &[&str],
) -> serde_json::Value {
    stdout_json(&generate(model, images, prompt, extra))
}

/// The run succeeded and printed one JSON value.
fn stdout_json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON value")
}

/// A copy of the f32 fixture `name` whose weights are rewritten by `edit`.
fn edited(
    name: &str,
    edit: impl FnOnce(&mut HashMap<String, (Vec<usize>, Vec<u8>)>),
) -> tempfile::TempDir {
    let src = fixtures().join(name);
    let dir = copied(&src);
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: HashMap<String, (Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.shape().to_vec(), v.data().to_vec())))
        .collect();
    edit(&mut tensors);
    let typed = tensors
        .into_iter()
        .map(|(n, (s, d))| (n, (Dtype::F32, s, d)))
        .collect();
    write_safetensors(dir.path(), &typed);
    dir
}

#[test]
fn missing_tensor_is_named() {
    let dir = edited_fixture(|t| {
        t.remove("language_model.model.layers.1.mlp.up_proj.weight");
    });
    let out = generate(dir.path(), &[image("scene.png")], PROMPT1, &[]);
    assert_clean_failure(&out, "language_model.model.layers.1.mlp.up_proj.weight");
}

#[test]
fn t5_without_its_relative_attention_bias_is_refused_by_name() {
    let name =
        "language_model.decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight";
    let dir = edited("blip2-tiny-t5-f32", |t| {
        t.remove(name);
    });
    let out = generate(
        dir.path(),
        &[image("scene.png")],
        "Question: what? Answer:",
        &[],
    );
    assert_clean_failure(&out, name);
}

/// LLaVA-NeXT: pinpoints that are not whole tiles refuse the model at load; an image
/// over the pixel limit is refused before any tile is cut.
#[test]
fn llava_next_refuses_bad_pinpoints_and_oversized_images() {
    let src = fixtures().join("llava-next-tiny-f32");
    let dir = copied(&src);
    let cfg = dir.path().join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["image_grid_pinpoints"] = serde_json::json!([[30, 60], [45, 30]]);
    std::fs::write(&cfg, v.to_string()).unwrap();
    let png = [image("scene.png")];
    assert_clean_failure(&generate(dir.path(), &png, PROMPT1, &[]), "[45, 30]");
    assert_clean_failure(
        &generate(&src, &png, PROMPT1, &["--max-image-pixels", "1000"]),
        "pixels",
    );
}

#[test]
fn misshapen_tensor_is_named() {
    let dir = edited_fixture(|t| {
        let (shape, data) = t.get_mut("multi_modal_projector.linear_2.weight").unwrap();
        shape[0] -= 1;
        data.truncate(shape.iter().product::<usize>() * 4);
    });
    let out = generate(dir.path(), &[image("scene.png")], PROMPT1, &[]);
    assert_clean_failure(&out, "multi_modal_projector.linear_2.weight");
}

#[test]
fn truncated_and_corrupt_safetensors() {
    let dir = edited_fixture(|_| {});
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert_clean_failure(
        &generate(dir.path(), &[image("scene.png")], PROMPT1, &[]),
        "safetensors",
    );
    let mut corrupt = bytes.clone();
    corrupt[8..40].copy_from_slice(&[b'#'; 32]);
    std::fs::write(&path, &corrupt).unwrap();
    assert_clean_failure(
        &generate(dir.path(), &[image("scene.png")], PROMPT1, &[]),
        "safetensors",
    );
}

#[test]
fn unknown_architecture() {
    let dir = edited_fixture(|_| {});
    let cfg = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("LlavaForConditionalGeneration", "FancyVisionModel"),
    )
    .unwrap();
    assert_clean_failure(
        &generate(dir.path(), &[image("scene.png")], PROMPT1, &[]),
        "FancyVisionModel",
    );
}

#[test]
fn corrupt_images() {
    let model = fixtures().join("llava-tiny-hub-f32");
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.png");
    std::fs::write(&garbage, b"this is not an image at all").unwrap();
    assert_clean_failure(&generate(&model, &[garbage], PROMPT1, &[]), "unrecognised");
    for name in ["scene.png", "tall.jpg", "scene.webp"] {
        let bytes = std::fs::read(image(name)).unwrap();
        let cut = dir.path().join(format!("cut-{name}"));
        for keep in [bytes.len() / 3, bytes.len() - 100] {
            std::fs::write(&cut, &bytes[..keep]).unwrap();
            assert_clean_failure(
                &generate(&model, std::slice::from_ref(&cut), PROMPT1, &[]),
                "image 1",
            );
        }
    }
    assert_clean_failure(
        &generate(&model, &[dir.path().join("absent.png")], PROMPT1, &[]),
        "absent.png",
    );
}

#[test]
fn oversized_images() {
    let model = fixtures().join("llava-tiny-hub-f32");
    let png = [image("scene.png")];
    assert_clean_failure(
        &generate(&model, &png, PROMPT1, &["--max-image-pixels", "1000"]),
        "pixels",
    );
    assert_clean_failure(
        &generate(&model, &png, PROMPT1, &["--max-image-bytes", "100"]),
        "bytes",
    );
}

#[test]
fn image_markers_must_match_images() {
    let model = fixtures().join("llava-tiny-hub-f32");
    let two = "USER: <image> <image> Compare. ASSISTANT:";
    assert_clean_failure(
        &generate(&model, &[image("scene.png")], two, &[]),
        "2 `<image>` marker(s) but 1 image",
    );
    assert_clean_failure(
        &generate(&model, &[image("scene.png")], "No marker here.", &[]),
        "0 `<image>`",
    );
    assert_clean_failure(
        &generate(&model, &[], PROMPT1, &[]),
        "1 `<image>` marker(s) but 0 image",
    );
}

#[test]
fn webp_and_text_only_prompts_work() {
    let model = fixtures().join("llava-tiny-hub-f32");
    let out = generate(
        &model,
        &[image("scene.webp")],
        PROMPT1,
        &["--max-new-tokens", "3"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Lossless WebP of the same pixels gives the PNG's golden tokens.
    let png = generate(
        &model,
        &[image("scene.png")],
        PROMPT1,
        &["--max-new-tokens", "3"],
    );
    let ids = |o: &Output| {
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["token_ids"].clone()
    };
    assert_eq!(ids(&out), ids(&png));
    let text = generate(
        &model,
        &[],
        "USER: hello there ASSISTANT:",
        &["--max-new-tokens", "3"],
    );
    assert!(
        text.status.success(),
        "{}",
        String::from_utf8_lossy(&text.stderr)
    );
}

#[test]
fn bad_flags() {
    let model = fixtures().join("llava-tiny-hub-f32");
    assert_clean_failure(
        &generate(
            &model,
            &[image("scene.png")],
            PROMPT1,
            &["--temperature=-1"],
        ),
        "temperature",
    );
    assert_clean_failure(
        &generate(
            &model,
            &[image("scene.png")],
            PROMPT1,
            &["--device", "cuda:0"],
        ),
        "CUDA",
    );
    let out = generate(&model, &[image("scene.png")], PROMPT1, &["--dtype", "int4"]);
    assert!(!out.status.success());
    assert_clean_failure(
        &generate(Path::new("/nonexistent/model"), &[], "hi", &[]),
        "/nonexistent/model",
    );
}

fn retrieval() -> PathBuf {
    fixtures().join("blip2-tiny-retrieval-f32")
}

#[test]
fn match_and_embed_agree_with_hf() {
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(retrieval().join("golden.json")).unwrap())
            .unwrap();
    for case in golden["cases"].as_array().unwrap() {
        let img = image(case["image"].as_str().unwrap());
        let text = case["text"].as_str().unwrap();
        let m = retrieval().display().to_string();
        let out = iris(&[
            "match",
            "--model",
            &m,
            "--image",
            img.to_str().unwrap(),
            "--text",
            text,
            "--json",
        ]);
        let got = stdout_json(&out);
        for key in ["itm_probability", "itc_similarity"] {
            let (a, b) = (got[key].as_f64().unwrap(), case[key].as_f64().unwrap());
            assert!((a - b).abs() <= 1e-4, "{key}: {a} vs HF {b}");
        }
        let out = iris(&[
            "embed",
            "--model",
            &m,
            "--image",
            img.to_str().unwrap(),
            "--text",
            text,
            "--json",
        ]);
        let e = stdout_json(&out);
        let embs = e["embeddings"].as_array().unwrap();
        assert_eq!(embs.len(), 2);
        // The ITC similarity is the best query's dot product with the text embedding.
        let t: Vec<f64> = embs[1]["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let norm: f64 = t.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "text embedding is normalised");
        let best = embs[0]["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|q| {
                q.as_array()
                    .unwrap()
                    .iter()
                    .zip(&t)
                    .map(|(a, b)| a.as_f64().unwrap() * b)
                    .sum::<f64>()
            })
            .fold(f64::NEG_INFINITY, f64::max);
        assert!((best - case["itc_similarity"].as_f64().unwrap()).abs() <= 1e-4);
    }
}

#[test]
fn retrieval_bad_input() {
    let m = retrieval().display().to_string();
    let scene = image("scene.png").display().to_string();
    assert_clean_failure(&iris(&["embed", "--model", &m, "--json"]), "at least one");
    assert_clean_failure(
        &iris(&[
            "match", "--model", &m, "--image", &scene, "--text", "  ", "--json",
        ]),
        "empty text",
    );
    let gen = fixtures().join("blip2-tiny-opt-f32").display().to_string();
    assert_clean_failure(
        &iris(&[
            "match", "--model", &gen, "--image", &scene, "--text", "a", "--json",
        ]),
        "Blip2ForConditionalGeneration",
    );
}

#[test]
fn blip_generate_and_match_agree_with_hf() {
    let dir = fixtures().join("blip-tiny-caption-f32");
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    for case in g["cases"].as_array().unwrap() {
        let n = case["token_ids"].as_array().unwrap().len().to_string();
        let out = generate(
            &dir,
            &[image("scene.png")],
            case["prompt"].as_str().unwrap(),
            &["--max-new-tokens", &n],
        );
        let got = stdout_json(&out);
        assert_eq!(got["token_ids"], case["token_ids"]);
    }
    let two = generate(&dir, &[image("scene.png"), image("tall.jpg")], "a", &[]);
    assert_clean_failure(&two, "one image");

    let m = fixtures()
        .join("blip-tiny-retrieval-f32")
        .display()
        .to_string();
    let g: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("blip-tiny-retrieval-f32/golden.json")).unwrap(),
    )
    .unwrap();
    let case = &g["cases"][0];
    let img = image(case["image"].as_str().unwrap()).display().to_string();
    let out = iris(&[
        "match",
        "--model",
        &m,
        "--image",
        &img,
        "--text",
        case["text"].as_str().unwrap(),
        "--json",
    ]);
    let got = stdout_json(&out);
    let (a, b) = (
        got["itm_probability"].as_f64().unwrap(),
        case["itm_probability"].as_f64().unwrap(),
    );
    assert!((a - b).abs() <= 1e-4, "{a} vs {b}");
}

#[test]
fn idefics_generate_agrees_with_hf() {
    let dir = fixtures().join("idefics-tiny-f32");
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    for name in ["one_image", "few_shot", "text_only"] {
        let case = &g[name];
        let mut prompt = Vec::new();
        let mut images = Vec::new();
        for p in case["pieces"].as_array().unwrap() {
            let p = p.as_str().unwrap();
            if p.ends_with(".png") || p.ends_with(".jpg") {
                prompt.push("<image>".to_string());
                images.push(image(p));
            } else {
                prompt.push(p.to_string());
            }
        }
        let n = case["token_ids"].as_array().unwrap().len().to_string();
        let out = generate(&dir, &images, &prompt.join(" "), &["--max-new-tokens", &n]);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(got["prompt_token_ids"], case["input_ids"], "{name}");
        assert_eq!(got["token_ids"], case["token_ids"], "{name}");
        for (a, b) in got["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .zip(case["logprobs"].as_array().unwrap())
        {
            assert!(
                (a.as_f64().unwrap() - b.as_f64().unwrap()).abs() <= 1e-4,
                "{name}: {a} vs {b}"
            );
        }
    }
    let mismatch = generate(&dir, &[image("scene.png")], "<image> and <image>", &[]);
    assert_clean_failure(&mismatch, "2 `<image>` marker(s) but 1 image");
}

#[test]
fn stop_rules_and_top_logprobs() {
    let dir = fixtures().join("llava-tiny-hub-f32");
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let ids: Vec<u64> = golden["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    let run = |extra: &[&str]| -> serde_json::Value {
        let out = generate(&dir, &[image("scene.png")], PROMPT1, extra);
        stdout_json(&out)
    };
    // A stop token ends the output right after it.
    let stop_id = ids[3].to_string();
    let g = run(&["--max-new-tokens", "8", "--stop-token-id", &stop_id]);
    assert_eq!(g["finish_reason"], "stop");
    let got: Vec<u64> = g["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(
        got,
        ids[..ids.iter().position(|&t| t == ids[3]).unwrap() + 1]
    );
    // A stop string cuts the text before it.
    let full = golden["text"].as_str().unwrap();
    let needle: String = full.chars().skip(5).take(4).collect();
    let g = run(&["--max-new-tokens", "8", "--stop", &needle]);
    assert_eq!(g["finish_reason"], "stop");
    assert_eq!(
        g["text"].as_str().unwrap(),
        &full[..full.find(&needle).unwrap()]
    );
    // Top logprobs: greedy picks the first of them.
    let g = run(&["--max-new-tokens", "4", "--top-logprobs", "3"]);
    let top = g["top_logprobs"].as_array().unwrap();
    assert_eq!(top.len(), 4);
    for (i, step) in top.iter().enumerate() {
        let step = step.as_array().unwrap();
        assert_eq!(step.len(), 3);
        assert_eq!(step[0]["token_id"], g["token_ids"][i]);
        assert_eq!(step[0]["logprob"], g["logprobs"][i]);
        assert!(step[1]["logprob"].as_f64().unwrap() <= step[0]["logprob"].as_f64().unwrap());
    }
    assert_clean_failure(
        &generate(&dir, &[image("scene.png")], PROMPT1, &["--min-p", "2"]),
        "min_p",
    );
    assert_clean_failure(
        &generate(&dir, &[image("scene.png")], PROMPT1, &["--stop", ""]),
        "stop strings",
    );
}

/// A KV budget that cannot hold one sequence of the model's whole context is a start-up
/// error that says so; a bad unit is refused by the flag's parser.
#[test]
fn a_kv_budget_below_one_sequence_is_a_startup_error() {
    let m = fixtures().join("llava-tiny-hub-f32").display().to_string();
    for args in [
        vec!["decoder", "--model", &m, "--kv-cache-bytes", "64KiB"],
        vec!["serve", "--model", &m, "--kv-cache-bytes", "64KiB"],
    ] {
        let mut args = args.clone();
        args.extend(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"]);
        assert_clean_failure(&iris(&args), "raise --kv-cache-bytes");
    }
    let out = iris(&["decoder", "--model", &m, "--kv-cache-bytes", "4 parsecs"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown unit"));
}

/// `iris generate --tp N`: rank processes on this machine (shared memory) give the
/// tokens and log-probabilities of one rank, for each family, at TP 2 and 4.
#[test]
fn tensor_parallel_generate_matches_one_rank() {
    for (name, prompt) in [
        (
            "llava-tiny-hub-f32",
            "USER: <image>\nWhat is in the picture? ASSISTANT:",
        ),
        (
            "llava-tiny-model-f32",
            "USER: <image>\nWhat is in the picture? ASSISTANT:",
        ),
        (
            "blip2-tiny-opt-f32",
            "Question: what is in the picture? Answer:",
        ),
        (
            "idefics-tiny-f32",
            "User: What is in the picture? <image> Assistant:",
        ),
    ] {
        let model = fixtures().join(name);
        let run = |tp: &str| {
            let out = generate(
                &model,
                &[image("scene.png")],
                prompt,
                &["--max-new-tokens", "6", "--tp", tp],
            );
            assert!(
                out.status.success(),
                "{name} --tp {tp}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
        };
        let one = run("1");
        for tp in ["2", "4"] {
            let got = run(tp);
            assert_eq!(got["token_ids"], one["token_ids"], "{name} --tp {tp}");
            for (g, w) in floats(&got["logprobs"])
                .iter()
                .zip(floats(&one["logprobs"]))
            {
                assert!((g - w).abs() < 1e-4, "{name} --tp {tp}: logprob {g} vs {w}");
            }
        }
    }
}

/// `--quantize`: the language model's linear layers in ggml's blocks compute what the
/// model computes in f32 on the dequantized weights — the int16 activation blocks round
/// by 2⁻¹⁶ of a block's largest value — so the same greedy tokens and log-probs within
/// 1e-3, for Q8_0 (asked as `int8`), Q4_0 and Q4_1; the vision tower, the projector and
/// the embeddings keep their f32 values (the reference dequantizes only what the flag
/// quantizes). A format the flag does not know is refused by name.
#[test]
fn quantize_flag_computes_what_the_dequantized_model_computes() {
    use iris_tensor::quant::{dequantize_row, quantize_row, QuantType};
    let name = "llava-tiny-hub-f32";
    let (images, prompt) = golden_request(name);
    let prompt = prompt.as_str();
    let plain = generate_json(
        &fixtures().join(name),
        &images,
        prompt,
        &["--max-new-tokens", "8"],
    );
    for (flag, ty) in [
        ("int8", QuantType::Q8_0),
        ("q4_0", QuantType::Q4_0),
        ("q4_1", QuantType::Q4_1),
    ] {
        let mut changed = 0;
        let dequantized = edited(name, |tensors| {
            for (n, (shape, data)) in tensors.iter_mut() {
                let linear = n.starts_with("language_model.")
                    && !n.contains("embed_tokens")
                    && shape.len() == 2
                    && shape[1] % 32 == 0;
                if !linear {
                    continue;
                }
                let values: Vec<f32> = data
                    .chunks(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect();
                let mut out = vec![0f32; values.len()];
                for (row, o) in values.chunks(shape[1]).zip(out.chunks_mut(shape[1])) {
                    dequantize_row(ty, &quantize_row(ty, row), o);
                }
                *data = out.iter().flat_map(|v| v.to_le_bytes()).collect();
                changed += 1;
            }
        });
        assert!(changed >= 8, "{changed} language-model linear weights");
        let want = generate_json(
            dequantized.path(),
            &images,
            prompt,
            &["--max-new-tokens", "8"],
        );
        let got = generate_json(
            &fixtures().join(name),
            &images,
            prompt,
            &["--max-new-tokens", "8", "--quantize", flag],
        );
        assert_eq!(got["prompt_token_ids"], plain["prompt_token_ids"]);
        assert_eq!(got["token_ids"], want["token_ids"], "{flag}: greedy tokens");
        let lps = |v: &serde_json::Value| floats(&v["logprobs"]);
        for (g, w) in lps(&got).iter().zip(lps(&want)) {
            assert!((g - w).abs() <= 1e-3, "{flag}: logprob {g} vs {w}");
        }
        // The quantization is real and larger than the tolerance: an ignored flag
        // would fail the comparison above.
        let moved = lps(&want)
            .iter()
            .zip(lps(&plain))
            .map(|(a, b)| (a - b).abs())
            .fold(0f64, f64::max);
        eprintln!("{flag}: the dequantized weights move a logprob by {moved:.2e}");
        assert!(
            moved > 3e-3,
            "{flag}: quantization moved logprobs by only {moved}"
        );
    }
    let out = generate(
        &fixtures().join(name),
        &images,
        prompt,
        &["--quantize", "q3_k"],
    );
    assert_clean_failure(&out, "q3_k");
}

/// An AWQ (`awq`) or GPTQ (`gptq`, v1 zeros) checkpoint made from the f32 LLaVA
/// fixture: each language-model linear weight quantized per group of 32 inputs and
/// output (asymmetric 4-bit, scales rounded to f16) and packed as AutoAWQ's GEMM packer
/// / AutoGPTQ's packer lay it out; and the same fixture with those weights replaced by
/// their exact dequantized values, `scale · (q − zero)`.
fn int4_checkpoints(method: &str) -> (tempfile::TempDir, tempfile::TempDir) {
    const G: usize = 32;
    let name = "llava-tiny-hub-f32";
    let src = fixtures().join(name);
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut packed: HashMap<String, (Dtype, Vec<usize>, Vec<u8>)> = HashMap::new();
    let mut plain: HashMap<String, (Vec<usize>, Vec<u8>)> = HashMap::new();
    let words = |v: &[u32]| v.iter().flat_map(|w| w.to_le_bytes()).collect::<Vec<u8>>();
    for (n, v) in st.tensors() {
        let shape = v.shape().to_vec();
        let values: Vec<f32> = v
            .data()
            .chunks(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let linear = n.starts_with("language_model.model.layers.") && shape.len() == 2;
        let Some(p) = n.strip_suffix(".weight").filter(|_| linear) else {
            packed.insert(n.clone(), (Dtype::F32, shape.clone(), v.data().to_vec()));
            plain.insert(n, (shape, v.data().to_vec()));
            continue;
        };
        let (out, k) = (shape[0], shape[1]);
        let groups = k / G;
        let mut q = vec![0u32; out * k];
        let mut zeros = vec![0u32; groups * out];
        let mut scales = vec![half::f16::ZERO; groups * out];
        let mut deq = vec![0f32; out * k];
        for o in 0..out {
            for g in 0..groups {
                let w = &values[o * k + g * G..o * k + (g + 1) * G];
                let (lo, hi) = w
                    .iter()
                    .fold((0f32, 0f32), |(a, b), &x| (a.min(x), b.max(x)));
                let s = half::f16::from_f32((hi - lo) / 15.0);
                let sf = s.to_f32();
                let z = (-lo / sf).round().clamp(0.0, 15.0) as u32;
                scales[g * out + o] = s;
                zeros[g * out + o] = z;
                for (j, &x) in w.iter().enumerate() {
                    let qv = ((x / sf).round() + z as f32).clamp(0.0, 15.0) as u32;
                    q[o * k + g * G + j] = qv;
                    deq[o * k + g * G + j] = sf * (qv as f32 - z as f32);
                }
            }
        }
        let sb: Vec<u8> = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
        packed.insert(format!("{p}.scales"), (Dtype::F16, vec![groups, out], sb));
        if method == "awq" {
            // AutoAWQ: word j of input row i, nibble t holds output 8j + ORDER[t].
            const ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];
            let pack = |rows: usize, at: &dyn Fn(usize, usize) -> u32| -> Vec<u32> {
                let mut v = vec![0u32; rows * out / 8];
                for r in 0..rows {
                    for j in 0..out / 8 {
                        for (t, &c) in ORDER.iter().enumerate() {
                            v[r * out / 8 + j] |= at(r, 8 * j + c) << (4 * t);
                        }
                    }
                }
                v
            };
            let qw = pack(k, &|i, o| q[o * k + i]);
            let qz = pack(groups, &|g, o| zeros[g * out + o]);
            packed.insert(
                format!("{p}.qweight"),
                (Dtype::I32, vec![k, out / 8], words(&qw)),
            );
            packed.insert(
                format!("{p}.qzeros"),
                (Dtype::I32, vec![groups, out / 8], words(&qz)),
            );
        } else {
            // AutoGPTQ: nibble t of word (j, o) holds input 8j + t; zeros stored minus one.
            let mut qw = vec![0u32; k / 8 * out];
            for j in 0..k / 8 {
                for o in 0..out {
                    for t in 0..8 {
                        qw[j * out + o] |= q[o * k + 8 * j + t] << (4 * t);
                    }
                }
            }
            let mut qz = vec![0u32; groups * out / 8];
            for g in 0..groups {
                for j in 0..out / 8 {
                    for t in 0..8 {
                        let z = zeros[g * out + 8 * j + t].wrapping_sub(1) & 0xF;
                        qz[g * out / 8 + j] |= z << (4 * t);
                    }
                }
            }
            let g_idx: Vec<u32> = (0..k).map(|i| (i / G) as u32).collect();
            packed.insert(
                format!("{p}.qweight"),
                (Dtype::I32, vec![k / 8, out], words(&qw)),
            );
            packed.insert(
                format!("{p}.qzeros"),
                (Dtype::I32, vec![groups, out / 8], words(&qz)),
            );
            packed.insert(format!("{p}.g_idx"), (Dtype::I32, vec![k], words(&g_idx)));
        }
        plain.insert(
            n,
            (shape, deq.iter().flat_map(|v| v.to_le_bytes()).collect()),
        );
    }
    let write = |tensors: HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>, quant: bool| {
        let dir = copied(&src);
        if quant {
            let path = dir.path().join("config.json");
            let mut config: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            config["quantization_config"] = if method == "awq" {
                serde_json::json!({"quant_method": "awq", "bits": 4, "group_size": G,
                    "zero_point": true, "version": "gemm",
                    "modules_to_not_convert": ["vision_tower", "multi_modal_projector"]})
            } else {
                serde_json::json!({"quant_method": "gptq", "bits": 4, "group_size": G,
                    "desc_act": false, "sym": false, "checkpoint_format": "gptq"})
            };
            std::fs::write(&path, config.to_string()).unwrap();
        }
        write_safetensors(dir.path(), &tensors);
        dir
    };
    let plain = plain
        .into_iter()
        .map(|(n, (s, d))| (n, (Dtype::F32, s, d)))
        .collect();
    (write(packed, true), write(plain, false))
}

/// AWQ and GPTQ checkpoints give the greedy tokens of their dequantized weights, and
/// log-probs within 1e-3 (the int16 activation blocks' error; the quantization itself
/// moves them by more); a group size that does not divide a layer's inputs, or that
/// is not whole 32-input blocks, and act-order GPTQ are refused by name.
#[test]
fn awq_and_gptq_checkpoints_compute_what_their_dequantized_weights_compute() {
    let name = "llava-tiny-hub-f32";
    let (images, prompt) = golden_request(name);
    let prompt = prompt.as_str();
    let run = |dir: &Path| generate_json(dir, &images, prompt, &["--max-new-tokens", "8"]);
    let lps = |v: &serde_json::Value| floats(&v["logprobs"]);
    let plain = run(&fixtures().join(name));
    for method in ["awq", "gptq"] {
        let (quant, dequant) = int4_checkpoints(method);
        let got = run(quant.path());
        let want = run(dequant.path());
        assert_eq!(
            got["token_ids"], want["token_ids"],
            "{method}: greedy tokens"
        );
        for (g, w) in lps(&got).iter().zip(lps(&want)) {
            assert!((g - w).abs() <= 1e-3, "{method}: logprob {g} vs {w}");
        }
        let moved = lps(&want)
            .iter()
            .zip(lps(&plain))
            .map(|(a, b)| (a - b).abs())
            .fold(0f64, f64::max);
        eprintln!("{method}: the dequantized weights move a logprob by {moved:.2e}");
        assert!(
            moved > 3e-3,
            "{method}: quantization moved logprobs by only {moved}"
        );
        // Bad configurations, refused by name.
        let config = quant.path().join("config.json");
        let good = std::fs::read_to_string(&config).unwrap();
        let with = |key: &str, value: serde_json::Value| {
            let mut c: serde_json::Value = serde_json::from_str(&good).unwrap();
            c["quantization_config"][key] = value;
            std::fs::write(&config, c.to_string()).unwrap();
            generate(quant.path(), &images, prompt, &["--max-new-tokens", "2"])
        };
        assert_clean_failure(
            &with("group_size", 96.into()),
            "group size 96 does not divide the input dimension",
        );
        assert_clean_failure(&with("group_size", 48.into()), "group size 48");
        assert_clean_failure(&with("bits", 8.into()), "bits");
        if method == "gptq" {
            assert_clean_failure(&with("desc_act", true.into()), "desc_act");
        }
        std::fs::write(&config, &good).unwrap();
    }
}

/// A LLaVA folder whose language model is a GGUF file (llava-tiny-hub-gguf: the f32
/// fixture's LLaMA written by gguf-py as llama.cpp's converter writes it, linears and
/// head in Q8_0; `tools/gen_llava_gguf_fixture.py`) computes what the f32 folder does
/// with `--quantize q8_0`: the same blocks (gguf-py's quantizer is ggml's), so the same
/// tokens and log-probs. Two .gguf files, or one whose shape is not the config's, are
/// refused by name.
#[test]
fn a_llava_whose_language_model_is_a_gguf_file_runs_from_its_blocks() {
    let (images, prompt) = golden_request("llava-tiny-hub-f32");
    let prompt = prompt.as_str();
    let run = |dir: &Path, extra: &[&str]| {
        let mut args = vec!["--max-new-tokens", "8"];
        args.extend(extra);
        generate_json(dir, &images, prompt, &args)
    };
    let got = run(&fixtures().join("llava-tiny-hub-gguf"), &[]);
    let want = run(
        &fixtures().join("llava-tiny-hub-f32"),
        &["--quantize", "q8_0"],
    );
    assert_eq!(got["prompt_token_ids"], want["prompt_token_ids"]);
    assert_eq!(got["token_ids"], want["token_ids"]);
    for (g, w) in floats(&got["logprobs"])
        .iter()
        .zip(floats(&want["logprobs"]))
    {
        assert!((g - w).abs() <= 1e-6, "logprob {g} vs {w}");
    }
    // Bad folders.
    let copy = || copied(&fixtures().join("llava-tiny-hub-gguf"));
    let two = copy();
    std::fs::copy(
        two.path().join("language_model.gguf"),
        two.path().join("other.gguf"),
    )
    .unwrap();
    let out = generate(two.path(), &images, prompt, &[]);
    assert_clean_failure(&out, "2 .gguf files");
    let wider = copy();
    let path = wider.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["text_config"]["intermediate_size"] = 256.into();
    std::fs::write(&path, config.to_string()).unwrap();
    let out = generate(wider.path(), &images, prompt, &[]);
    assert_clean_failure(
        &out,
        "intermediate_size 128, but the LLaVA config's text_config says 256",
    );
}

/// `iris bench decode --model FILE.gguf` measures a real checkpoint: its shape, its
/// blocks, the bytes its step reads (the file's tensors less the embedding table, plus
/// the table again as the tied head); a model that is not a LLaMA is refused by name.
#[test]
fn bench_decode_measures_a_gguf_file() {
    let Some(path) = std::env::var_os("IRIS_SMOLLM2_GGUF") else {
        assert!(
            std::env::var_os("IRIS_REQUIRE_MODELS").is_none(),
            "IRIS_SMOLLM2_GGUF is not set"
        );
        return;
    };
    let bench = |model: &Path| {
        Command::new(env!("CARGO_BIN_EXE_iris"))
            .args(["bench", "decode", "--tokens", "2", "--json", "--model"])
            .arg(model)
            .output()
            .unwrap()
    };
    let row = stdout_json(&bench(Path::new(&path)));
    assert_eq!(row["dtype"], "SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(row["tokens_per_s"].as_f64().unwrap() > 0.0);
    let file = std::fs::metadata(&path).unwrap().len() as f64;
    let bytes = row["bytes_per_token"].as_f64().unwrap();
    assert!(
        bytes > 0.8 * file && bytes < 1.5 * file,
        "{bytes} bytes a step of a {file}-byte file"
    );
    assert_clean_failure(&bench(&fixtures().join("llava-tiny-hub-f32")), "LLaMA");
}

/// `iris bench bandwidth` runs the decode benchmark's probe alone: its passes' median and
/// best, one JSON row (what tools/bench_vs_llamacpp.py reads around llama.cpp's runs).
#[test]
fn bench_bandwidth_prints_its_passes() {
    let row = stdout_json(&iris(&["bench", "bandwidth", "--passes", "3"]));
    assert_eq!(row["passes"], 3);
    let (median, best) = (
        row["median_bytes_per_s"].as_f64().unwrap(),
        row["best_bytes_per_s"].as_f64().unwrap(),
    );
    assert!(median > 0.0 && best >= median, "{row}");
}
