//! Chat templates with hostile messages: whatever a user writes (special-token strings,
//! markers, private-use characters), the ids hold exactly the added tokens the template
//! itself makes — the same as for the same conversation with every text empty.
#![no_main]

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use iris_engine::{Escapes, ModelSpec, PromptStyle};
use iris_models::config::ImageSize;
use iris_server::gateway::{render_chat, GatewayModel, Message, Part};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Turn {
    role: u8,
    image: bool,
    text: String,
}

#[derive(Arbitrary, Debug)]
struct Input {
    model: u8,
    turns: Vec<Turn>,
}

const MODELS: [&str; 3] = [
    "llava-tiny-hub-f32",
    "blip2-tiny-opt-f32",
    "idefics-tiny-f32",
];

fn models() -> &'static Vec<GatewayModel> {
    static M: OnceLock<Vec<GatewayModel>> = OnceLock::new();
    M.get_or_init(|| {
        MODELS
            .iter()
            .map(|m| GatewayModel::load(m, &iris_fuzz::fixture(m), iris_fuzz::limits()).unwrap())
            .collect()
    })
}

fn spec(m: &GatewayModel) -> &ModelSpec {
    match &m.kind {
        iris_server::gateway::ModelKind::Generate(s) => s,
        _ => unreachable!("generation fixtures"),
    }
}

/// The conversation's ids with its texts as given, or emptied.
fn ids(m: &GatewayModel, turns: &[Turn], empty: bool) -> Option<Vec<u32>> {
    let s = spec(m);
    let p = &s.processor;
    let mut esc = Escapes::default();
    let roles = ["system", "user", "assistant", "developer"];
    let mut images = 0;
    let messages: Vec<Message> = turns
        .iter()
        .map(|t| {
            let mut content = Vec::new();
            if t.image {
                images += 1;
                content.push(Part::Image);
            }
            let text = if empty { "" } else { t.text.as_str() };
            content.push(Part::Text(p.escape(text, &mut esc)));
            Message {
                role: roles[t.role as usize % roles.len()].to_string(),
                content,
            }
        })
        .collect();
    let prompt = render_chat(&m.chat_template, &messages, p.image_token(), "<s>", "</s>").ok()?;
    // The fixture's count is fixed: no image size needed.
    let sizes = vec![ImageSize::default(); images];
    p.tokenize_escaped(&prompt, &sizes, &esc).ok()
}

fuzz_target!(|input: Input| {
    if input.turns.len() > 8 || input.turns.iter().map(|t| t.text.len()).sum::<usize>() > 4096 {
        return;
    }
    let m = &models()[input.model as usize % MODELS.len()];
    let p = &spec(m).processor;
    let (Some(real), Some(empty)) = (ids(m, &input.turns, false), ids(m, &input.turns, true))
    else {
        return;
    };
    // Every added token but the unknown one (which ordinary text the vocabulary
    // lacks turns into).
    let unk = ["<unk>", "[UNK]"].map(|t| p.tokenizer().token_to_id(t));
    let added: Vec<u32> = p
        .tokenizer()
        .get_added_tokens_decoder()
        .keys()
        .copied()
        .filter(|id| !unk.contains(&Some(*id)))
        .collect();
    for id in added {
        let n = |v: &[u32]| v.iter().filter(|&&t| t == id).count();
        // BLIP's decoder rewrites its first and last ids; compare the rest there.
        let trim = |v: &[u32]| match p.style() {
            PromptStyle::Decoder { .. } => v.get(1..).unwrap_or_default().to_vec(),
            _ => v.to_vec(),
        };
        assert_eq!(
            n(&trim(&real)),
            n(&trim(&empty)),
            "{:?}: token {id} came from user text",
            p.tokenizer().id_to_token(id)
        );
    }
});
