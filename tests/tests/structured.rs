//! Structured outputs through the engine: on a tiny random model (whose free output is
//! noise) every constrained request returns text of its language — JSON that parses
//! and has its schema's shape, a regex's match, a Lark grammar's sentence — batched
//! with free requests whose tokens stay what they are alone; the masks of decoding
//! requests are computed beside the forward pass (counted); a schema that does not
//! compile is the caller's error.

use std::sync::Arc;

use iris_e2e::{fixture, fixtures};
use iris_engine::{
    Constraint, Engine, EngineConfig, EngineRequest, ErrorKind, FinishReason, GenerateOptions,
    Pipeline, PipelineOptions, SamplingParams, TokenEvent, TokenStream,
};
use serde_json::{json, Value};

fn drain(rx: TokenStream) -> (Vec<u32>, String, FinishReason) {
    let mut ids = Vec::new();
    let mut streamed = String::new();
    for ev in rx {
        match ev {
            TokenEvent::Admitted { .. } => {}
            TokenEvent::Token { id, text, .. } => {
                ids.push(id);
                streamed.push_str(&text);
            }
            TokenEvent::Finished { reason, text, .. } => {
                assert_eq!(streamed, text, "the streamed deltas make the text");
                return (ids, text, reason);
            }
            TokenEvent::Error(e) => panic!("request failed: {e}"),
        }
    }
    panic!("stream ended without a finish event")
}

fn request(seed: u64, max: usize, constraint: Option<Constraint>) -> EngineRequest {
    let image = std::fs::read(fixtures().join("images").join("scene.png")).unwrap();
    let mut options = GenerateOptions::new(
        max,
        SamplingParams {
            temperature: 1.0,
            seed,
            ..Default::default()
        },
    );
    options.constraint = constraint;
    EngineRequest::new(
        "<image> Question: describe the picture as JSON. Answer:",
        vec![image],
        options,
    )
}

fn schemas() -> Vec<Value> {
    vec![
        json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 8},
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
                "kind": {"enum": ["cat", "dog", "bird"]},
            },
            "required": ["name", "age", "kind"],
            "additionalProperties": false,
        }),
        json!({
            "type": "object",
            "properties": {
                "objects": {
                    "type": "array",
                    "items": {"type": "string", "maxLength": 5},
                    "minItems": 1,
                    "maxItems": 3,
                },
                "box": {
                    "type": "object",
                    "properties": {
                        "x": {"type": "integer", "minimum": 0, "maximum": 9},
                        "ok": {"type": "boolean"},
                    },
                    "required": ["x", "ok"],
                    "additionalProperties": false,
                },
            },
            "required": ["objects", "box"],
            "additionalProperties": false,
        }),
    ]
}

/// The shape the schemas above ask for (their whole content, checked by hand).
fn conforms(schema: usize, v: &Value) -> bool {
    let o = v.as_object().expect("an object");
    match schema {
        0 => {
            o.len() == 3
                && o["name"].as_str().is_some_and(|s| s.chars().count() <= 8)
                && o["age"].as_u64().is_some_and(|a| a <= 120)
                && ["cat", "dog", "bird"].contains(&o["kind"].as_str().unwrap_or(""))
        }
        _ => {
            let items = o["objects"].as_array().unwrap();
            let b = o["box"].as_object().unwrap();
            o.len() == 2
                && (1..=3).contains(&items.len())
                && items
                    .iter()
                    .all(|s| s.as_str().is_some_and(|s| s.chars().count() <= 5))
                && b.len() == 2
                && b["x"].as_u64().is_some_and(|x| x <= 9)
                && b["ok"].is_boolean()
        }
    }
}

#[test]
fn constrained_requests_decode_their_language_beside_free_ones() {
    let p = Arc::new(
        Pipeline::load(&fixture("blip2-tiny-opt-f32"), &PipelineOptions::default()).unwrap(),
    );
    let engine = Engine::start(
        p.clone(),
        EngineConfig {
            max_batch: 16,
            queue: 64,
            ..Default::default()
        },
    );
    let free: Vec<EngineRequest> = (0..4).map(|i| request(100 + i, 12, None)).collect();
    let alone: Vec<Vec<u32>> = free
        .iter()
        .map(|r| drain(engine.submit(r.clone()).unwrap()).0)
        .collect();
    let constraints: Vec<Constraint> = (0..12)
        .map(|i| match i % 6 {
            0 | 1 => Constraint::JsonSchema(schemas()[i % 2].clone()),
            2 | 3 => Constraint::JsonSchema(schemas()[(i + 1) % 2].clone()),
            4 => Constraint::Regex(r"(yes|no), [0-9]{2,4}!".into()),
            _ => Constraint::Lark("start: \"a\" mid \"z\"\nmid: (\"b\" | \"c\")+".into()),
        })
        .collect();
    // Free and constrained requests in one batch.
    let mut rxs = Vec::new();
    for (i, c) in constraints.iter().enumerate() {
        rxs.push(
            engine
                .submit(request(i as u64, 160, Some(c.clone())))
                .unwrap(),
        );
        if i % 3 == 0 {
            rxs.push(engine.submit(free[i / 3].clone()).unwrap());
        }
    }
    let mut outs = rxs.into_iter().map(drain);
    for (i, c) in constraints.iter().enumerate() {
        let (_, text, reason) = outs.next().unwrap();
        assert_ne!(
            reason,
            FinishReason::Length,
            "request {i} ran out: {text:?}"
        );
        assert_ne!(reason, FinishReason::Constraint, "request {i}: {text:?}");
        match c {
            Constraint::JsonSchema(_) => {
                let v: Value = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("request {i}: {e}: {text:?}"));
                let schema = if i % 6 < 2 { i % 2 } else { (i + 1) % 2 };
                assert!(conforms(schema, &v), "request {i}: {text}");
            }
            Constraint::Regex(_) => {
                let (word, rest) = text.split_once(", ").expect("a comma");
                assert!(["yes", "no"].contains(&word), "{text:?}");
                let digits = rest.strip_suffix('!').expect("an exclamation mark");
                assert!((2..=4).contains(&digits.len()), "{text:?}");
                assert!(digits.bytes().all(|b| b.is_ascii_digit()), "{text:?}");
            }
            Constraint::Lark(_) => {
                let mid = text
                    .strip_prefix('a')
                    .and_then(|t| t.strip_suffix('z'))
                    .unwrap_or_else(|| panic!("{text:?}"));
                assert!(!mid.is_empty() && mid.bytes().all(|b| b == b'b' || b == b'c'));
            }
            Constraint::JsonObject => unreachable!(),
        }
        if i % 3 == 0 {
            let (ids, _, _) = outs.next().unwrap();
            assert_eq!(
                ids,
                alone[i / 3],
                "a free request batched with constrained ones"
            );
        }
    }
    let stats = engine.stats();
    assert!(
        stats.masks_overlapped > stats.masks_inline,
        "most masks are computed beside the forward pass: {stats:?}"
    );
    assert!(stats.masks_inline >= 12, "{stats:?}");
}

#[test]
fn a_constraint_that_does_not_compile_is_the_callers_error() {
    let p = Arc::new(
        Pipeline::load(&fixture("blip2-tiny-opt-f32"), &PipelineOptions::default()).unwrap(),
    );
    let engine = Engine::start(p, EngineConfig::default());
    for bad in [
        Constraint::JsonSchema(json!({"type": "integer", "minimum": 5, "maximum": 3})),
        Constraint::JsonSchema(json!({"type": "no-such-type"})),
        Constraint::Regex("(unclosed".into()),
        Constraint::Lark("start: missing_rule".into()),
    ] {
        let e = engine
            .submit(request(0, 8, Some(bad.clone())))
            .err()
            .unwrap_or_else(|| panic!("{bad:?} compiled"));
        assert_eq!(e.kind(), ErrorKind::BadInput, "{bad:?}: {e}");
        assert!(e.to_string().contains("does not compile"), "{e}");
    }
    // A JSON object with the model's own length: it ends by its grammar or its length,
    // never stuck.
    let (_, text, reason) = drain(
        engine
            .submit(request(3, 200, Some(Constraint::JsonObject)))
            .unwrap(),
    );
    assert!(matches!(
        reason,
        FinishReason::Stop | FinishReason::Eos | FinishReason::Length
    ));
    if reason != FinishReason::Length {
        assert!(serde_json::from_str::<Value>(&text).unwrap().is_object());
    }
}

/// A constraint the model's vocabulary cannot spell (the tiny LLaVA's 300 tokens have
/// no `{`): the request ends at once with `FinishReason::Constraint`, never hangs or
/// runs to its length; the engine serves the next request as usual.
#[test]
fn an_unsatisfiable_constraint_ends_with_its_reason() {
    let p = Arc::new(
        Pipeline::load(&fixture("llava-tiny-hub-f32"), &PipelineOptions::default()).unwrap(),
    );
    let engine = Engine::start(p, EngineConfig::default());
    let image = std::fs::read(fixtures().join("images").join("scene.png")).unwrap();
    let request = |constraint| {
        let mut options = GenerateOptions::new(16, SamplingParams::default());
        options.constraint = constraint;
        EngineRequest::new(
            "USER: <image>\nJSON? ASSISTANT:",
            vec![image.clone()],
            options,
        )
    };
    let (ids, text, reason) = drain(
        engine
            .submit(request(Some(Constraint::JsonObject)))
            .unwrap(),
    );
    assert_eq!(reason, FinishReason::Constraint);
    assert!(ids.is_empty() && text.is_empty(), "{ids:?} {text:?}");
    let (ids, _, reason) = drain(engine.submit(request(None)).unwrap());
    assert_eq!((ids.len(), reason), (16, FinishReason::Length));
}

/// A model whose tokenizer llguidance cannot read (BLIP's WordPiece): a constrained
/// request is the caller's error, saying so; free requests are served as before.
#[test]
fn structured_outputs_on_an_unsupported_tokenizer_are_refused() {
    let p = Arc::new(
        Pipeline::load(
            &fixture("blip-tiny-caption-f32"),
            &PipelineOptions::default(),
        )
        .unwrap(),
    );
    let engine = Engine::start(p, EngineConfig::default());
    let image = std::fs::read(fixtures().join("images").join("scene.png")).unwrap();
    let request = |constraint| {
        let mut options = GenerateOptions::new(4, SamplingParams::default());
        options.constraint = constraint;
        EngineRequest::new("a picture of", vec![image.clone()], options)
    };
    for _ in 0..2 {
        let e = engine
            .submit(request(Some(Constraint::JsonObject)))
            .err()
            .expect("refused");
        assert_eq!(e.kind(), ErrorKind::BadInput, "{e}");
        assert!(e.to_string().contains("structured outputs"), "{e}");
    }
    let (ids, _, _) = drain(engine.submit(request(None)).unwrap());
    assert!(!ids.is_empty());
}
