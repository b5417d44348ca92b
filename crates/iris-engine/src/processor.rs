//! A model's HF processor: images → `pixel_values` (the image processor), text +
//! images → `input_ids` with image placeholders, in the model's convention:
//! - LLaVA (`processing_llava.py`): each `<image>` marker in the prompt becomes as many
//!   image tokens as the vision tower yields visual tokens; LLaVA-NeXT
//!   (`processing_llava_next.py`): as many as its image's size gives;
//! - BLIP-2 (`processing_blip_2.py`): one image, whose query-token placeholders go before
//!   the tokenized text (before its BOS); a prompt without a marker puts it first;
//! - BLIP (`modeling_blip.py` `generate`): no placeholders (the image enters through
//!   cross-attention); the text's `[CLS]` becomes `[DEC]` and its final `[SEP]` goes;
//! - IDEFICS (`processing_idefics.py`): pieces of text and images interleaved; the text
//!   is the literal BOS, each text piece stripped of spaces, each image
//!   `<fake_token_around_image><image><fake_token_around_image>` (the first fake token
//!   dropped right after another image), tokenized without added special tokens;
//! - plain text (retrieval encoders): the tokenizer's ids as they are.
//!
//! Text is encoded by the model's `tokenizer.json` with its special tokens. A raw prompt
//! keeps its markers and special-token strings; user text of a chat message is only text
//! ([`Escapes`]): `</s>` typed by a user is the characters `<`, `/`, `s`, `>`, never the
//! control token (HF's `apply_chat_template` tokenizes the rendered string whole, so
//! there it would be).

use std::path::Path;

use iris_image::{ImageLimits, ImageProcessor};
use iris_models::config::{ImageSize, ImageTokens};
use iris_tensor::Tensor;
use tokenizers::Tokenizer;

use crate::{Error, Result};

/// Where image placeholders go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptStyle {
    /// At each `<image>` marker (LLaVA).
    Inline,
    /// Before the text, one image only (BLIP-2).
    Prefix,
    /// None in the ids; a caption prefix starting at `bos` (BLIP's decoder).
    Decoder { bos: u32 },
    /// Text and images interleaved, each image a marker token (IDEFICS).
    Interleaved,
    /// Text only.
    Plain,
}

#[derive(Debug, Clone)]
pub struct Processor {
    tokenizer: Tokenizer,
    /// Bytes of the longest token string the vocabulary has (special tokens included).
    max_token_bytes: usize,
    /// None for a text-only model (no image is ever preprocessed).
    image_processor: Option<ImageProcessor>,
    image_token: String,
    /// The literal BOS some processors write into the text (IDEFICS).
    bos_token: String,
    /// The placeholder id, for the styles that use one.
    image_token_id: Option<u32>,
    image_tokens: ImageTokens,
    style: PromptStyle,
    limits: ImageLimits,
    /// The same tokenizer with special-token strings read as text (for user text).
    literal: Tokenizer,
    /// Every added token's string and id, longest first (the tokenizer's own matching
    /// is leftmost-longest).
    added: Vec<(String, u32)>,
    /// The bytes an added token starts with: elsewhere none is looked for.
    added_first: [bool; 256],
}

/// Opens and closes an escaped piece of user text (Unicode private-use characters: a
/// user's own are escaped too, so every one in a rendered prompt is ours).
const OPEN: char = '\u{E000}';
const CLOSE: char = '\u{E001}';

/// User text of chat messages made safe to render into a template: each special-token
/// string (or image marker) in it is replaced by a placeholder the template passes
/// through, and the processor tokenizes the placeholder back as literal text.
#[derive(Debug, Default, Clone)]
pub struct Escapes {
    literals: Vec<String>,
    /// Bytes the placeholders add over the text they stand for.
    overhead: usize,
}

impl Escapes {
    pub fn is_empty(&self) -> bool {
        self.literals.is_empty()
    }

    /// Bytes the escaping added to a rendered prompt (so size checks see the user's text).
    pub fn overhead(&self) -> usize {
        self.overhead
    }

    /// `text` with each placeholder replaced by the literal it stands for.
    fn restore(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(i) = rest.find(OPEN) {
            out.push_str(&rest[..i]);
            let after = &rest[i + OPEN.len_utf8()..];
            match after.find(CLOSE).and_then(|j| {
                let n: usize = after[..j].parse().ok()?;
                Some((self.literals.get(n)?, j))
            }) {
                Some((lit, j)) => {
                    out.push_str(lit);
                    rest = &after[j + CLOSE.len_utf8()..];
                }
                None => {
                    out.push(OPEN);
                    rest = after;
                }
            }
        }
        out.push_str(rest);
        out
    }
}

/// A prompt turned into model inputs.
#[derive(Debug, Clone)]
pub struct PreparedPrompt {
    pub input_ids: Vec<u32>,
    /// `[3, H, W]` (or `[tiles, 3, H, W]`) per image, in prompt order.
    pub pixel_values: Vec<Tensor>,
    /// Each image's size as decoded.
    pub image_sizes: Vec<ImageSize>,
}

fn read_json(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

impl Processor {
    /// `image_token_id` is the model's placeholder (for the Inline and Prefix styles).
    pub fn load(
        dir: &Path,
        style: PromptStyle,
        image_token_id: Option<u32>,
        image_tokens: ImageTokens,
        limits: ImageLimits,
    ) -> Result<Processor> {
        // A GGUF file carries its tokenizer in its metadata.
        let gguf = if iris_models::registry::is_gguf(dir) {
            Some(iris_models::gguf::read(dir)?)
        } else {
            None
        };
        let tokenizer = match &gguf {
            Some(h) => crate::gguf_tokenizer::tokenizer(h)?,
            None => {
                let tok_path = dir.join("tokenizer.json");
                Tokenizer::from_file(&tok_path)
                    .map_err(|e| Error::Tokenizer(format!("{}: {e}", tok_path.display())))?
            }
        };
        let image_token = ["processor_config.json", "tokenizer_config.json"]
            .iter()
            .filter_map(|f| read_json(&dir.join(f)))
            .find_map(|v| {
                v.get("image_token")
                    .and_then(|t| t.as_str())
                    .map(str::to_string)
            })
            .unwrap_or_else(|| "<image>".to_string());
        if let Some(want) = image_token_id {
            match tokenizer.token_to_id(&image_token) {
                Some(id) if id == want => {}
                Some(id) => {
                    return Err(Error::Tokenizer(format!(
                        "`{image_token}` is token {id} but the model expects image token {want}"
                    )))
                }
                None => {
                    return Err(Error::Tokenizer(format!(
                        "the tokenizer has no `{image_token}` token"
                    )))
                }
            }
        }
        let bos_token = read_json(&dir.join("tokenizer_config.json"))
            .and_then(|v| match &v["bos_token"] {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => o
                    .get("content")
                    .and_then(|c| c.as_str())
                    .map(str::to_string),
                _ => None,
            })
            .or_else(|| gguf.as_ref().and_then(crate::gguf_tokenizer::bos_token))
            .unwrap_or_else(|| "<s>".to_string());
        let max_token_bytes = tokenizer
            .get_vocab(true)
            .keys()
            .map(String::len)
            .max()
            .unwrap_or(1)
            .max(1);
        let mut literal = tokenizer.clone();
        literal.set_encode_special_tokens(true);
        let mut added: Vec<(String, u32)> = tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .map(|(id, t)| (t.content, id))
            .filter(|(c, _)| !c.is_empty())
            .collect();
        added.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        let mut added_first = [false; 256];
        for (c, _) in &added {
            added_first[c.as_bytes()[0] as usize] = true;
        }
        Ok(Processor {
            added_first,
            bos_token,
            max_token_bytes,
            literal,
            added,
            tokenizer,
            image_processor: match (style, &gguf) {
                (PromptStyle::Plain, _) | (_, Some(_)) => ImageProcessor::from_model_dir(dir).ok(),
                _ => Some(ImageProcessor::from_model_dir(dir)?),
            },
            image_token,
            image_token_id,
            image_tokens,
            style,
            limits,
        })
    }

    /// The most bytes of text `tokens` tokens can hold: no token covers more than the
    /// longest vocabulary string, times 4 for a normalizer that shrinks what it reads
    /// (UTF-8's widest character to one byte). A prompt over it cannot fit, and is
    /// refused before the tokenizer spends time and memory on it.
    pub fn max_text_bytes(&self, tokens: usize) -> usize {
        tokens.saturating_mul(self.max_token_bytes * 4)
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The limits images are decoded under.
    pub fn limits(&self) -> ImageLimits {
        self.limits
    }

    pub fn image_token(&self) -> &str {
        &self.image_token
    }

    /// Decodes and preprocesses one image file's bytes into `[3, H, W]` (or its tiles
    /// `[tiles, 3, H, W]`), with the size it decoded to.
    pub fn pixel_values(&self, bytes: &[u8]) -> Result<(Tensor, ImageSize)> {
        let processor = self
            .image_processor
            .as_ref()
            .ok_or_else(|| Error::Input("this is a text-only model: it takes no images".into()))?;
        let img = iris_image::decode(bytes, self.limits)?;
        let shape = processor.output_shape(img.width, img.height);
        let size = ImageSize {
            height: img.height,
            width: img.width,
        };
        Ok((Tensor::from_f32(processor.preprocess(&img)?, &shape)?, size))
    }

    /// The size of an image file from its header alone (what the placeholder count of
    /// LLaVA-NeXT depends on), within the limits.
    pub fn image_size(&self, bytes: &[u8]) -> Result<ImageSize> {
        let (w, h) = iris_image::dimensions(bytes, self.limits)?;
        Ok(ImageSize {
            height: h as usize,
            width: w as usize,
        })
    }

    /// How many placeholders an image fills.
    pub fn image_tokens(&self) -> &ImageTokens {
        &self.image_tokens
    }

    /// The added token (longest first) that `text` starts with.
    fn added_at(&self, text: &str) -> Option<&(String, u32)> {
        let first = *text.as_bytes().first()?;
        if !self.added_first[first as usize] {
            return None;
        }
        self.added
            .iter()
            .find(|(c, _)| text.starts_with(c.as_str()))
    }

    /// User text of a chat message, escaped for rendering: its special-token strings,
    /// image markers and private-use brackets become placeholders (see [`Escapes`]).
    pub fn escape(&self, text: &str, esc: &mut Escapes) -> String {
        let mut out = String::with_capacity(text.len());
        let mut i = 0;
        while i < text.len() {
            let rest = &text[i..];
            let c = rest.chars().next().expect("not at the end");
            let lit = match self.added_at(rest) {
                Some((content, _)) => Some(content.as_str()),
                None if c == OPEN || c == CLOSE => Some(&rest[..c.len_utf8()]),
                None => None,
            };
            match lit {
                Some(lit) => {
                    let before = out.len();
                    out.push(OPEN);
                    out.push_str(&esc.literals.len().to_string());
                    out.push(CLOSE);
                    esc.overhead += (out.len() - before).saturating_sub(lit.len());
                    esc.literals.push(lit.to_string());
                    i += lit.len();
                }
                None => {
                    out.push(c);
                    i += c.len_utf8();
                }
            }
        }
        out
    }

    fn encode(&self, text: &str, special: bool, esc: &Escapes) -> Result<Vec<u32>> {
        let tok_err = |e: tokenizers::Error| Error::Tokenizer(e.to_string());
        if esc.is_empty() {
            return Ok(self
                .tokenizer
                .encode(text, special)
                .map_err(tok_err)?
                .get_ids()
                .to_vec());
        }
        // Split where the tokenizer would, at the template's own added tokens (the
        // user's are placeholders now); the text between is encoded with special-token
        // strings as text, placeholders restored. The tokenizer normalizes each piece
        // between added tokens on its own, so ordinary text comes out as it would whole.
        let mut pieces = Vec::new();
        let (mut start, mut i) = (0, 0);
        while i < text.len() {
            match self.added_at(&text[i..]) {
                Some((content, id)) => {
                    if start < i {
                        pieces.push(self.encode_literal(&esc.restore(&text[start..i]))?);
                    }
                    pieces.push(tokenizers::Encoding::from_tokens(
                        vec![tokenizers::Token::new(
                            *id,
                            content.clone(),
                            (i, i + content.len()),
                        )],
                        0,
                    ));
                    i += content.len();
                    start = i;
                }
                None => i += text[i..].chars().next().map_or(1, char::len_utf8),
            }
        }
        if start < text.len() {
            pieces.push(self.encode_literal(&esc.restore(&text[start..]))?);
        }
        let merged = tokenizers::Encoding::merge(pieces, false);
        Ok(self
            .tokenizer
            .post_process(merged, None, special)
            .map_err(tok_err)?
            .get_ids()
            .to_vec())
    }

    fn encode_literal(&self, text: &str) -> Result<tokenizers::Encoding> {
        let enc = self
            .literal
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        match self.image_token_id {
            Some(id) if enc.get_ids().contains(&id) => Err(Error::Tokenizer(format!(
                "the image token `{}` is not a special token: user text could make image slots",
                self.image_token
            ))),
            _ => Ok(enc),
        }
    }

    /// Tokenizes `prompt` with `images` (encoded files, one per marker, in order).
    pub fn prepare(&self, prompt: &str, images: &[Vec<u8>]) -> Result<PreparedPrompt> {
        let (pixel_values, image_sizes): (Vec<Tensor>, Vec<ImageSize>) = images
            .iter()
            .enumerate()
            .map(|(i, b)| {
                self.pixel_values(b).map_err(|e| match e {
                    Error::Image(e) => Error::Input(format!("image {}: {e}", i + 1)),
                    other => other,
                })
            })
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .unzip();
        Ok(PreparedPrompt {
            input_ids: self.tokenize(prompt, &image_sizes)?,
            pixel_values,
            image_sizes,
        })
    }

    /// The prompt's ids with the placeholders of images of `sizes` expanded (no pixels
    /// needed: what the gateway does before any image is encoded).
    pub fn tokenize(&self, prompt: &str, sizes: &[ImageSize]) -> Result<Vec<u32>> {
        self.tokenize_escaped(prompt, sizes, &Escapes::default())
    }

    /// As [`Processor::tokenize`], for a chat prompt rendered from text escaped with
    /// `esc`: markers and special tokens count only where the template put them.
    pub fn tokenize_escaped(
        &self,
        prompt: &str,
        images: &[ImageSize],
        esc: &Escapes,
    ) -> Result<Vec<u32>> {
        let marker = self.image_token.as_str();
        let markers = prompt.matches(marker).count();
        let input_ids = match self.style {
            PromptStyle::Inline => {
                if markers != images.len() {
                    return Err(Error::Input(format!(
                        "the prompt has {markers} `{marker}` marker(s) but {} image(s) were given",
                        images.len()
                    )));
                }
                // Each marker becomes its image's placeholders.
                let mut text = String::with_capacity(prompt.len());
                for (i, piece) in prompt.split(marker).enumerate() {
                    if i > 0 {
                        text.push_str(&marker.repeat(self.image_tokens.count(images[i - 1])));
                    }
                    text.push_str(piece);
                }
                self.encode(&text, true, esc)?
            }
            PromptStyle::Prefix => {
                if images.is_empty() && markers > 0 {
                    return Err(Error::Input(format!(
                        "the prompt has {markers} `{marker}` marker(s) but 0 image(s) were given"
                    )));
                }
                if images.len() > 1 {
                    return Err(Error::Input(format!(
                        "this model takes one image per prompt, {} were given",
                        images.len()
                    )));
                }
                let text = match prompt.strip_prefix(marker) {
                    Some(rest) if images.len() == 1 => rest.trim_start(),
                    _ => prompt,
                };
                if text.contains(marker) {
                    return Err(Error::Input(format!(
                        "this model places its image before the text: `{marker}` may only start the prompt"
                    )));
                }
                let placeholder = self
                    .image_token_id
                    .expect("Prefix style has an image token");
                let per: usize = images.iter().map(|&s| self.image_tokens.count(s)).sum();
                let mut ids = vec![placeholder; per];
                ids.extend(self.encode(text, true, esc)?);
                ids
            }
            PromptStyle::Decoder { bos } => {
                if images.len() != 1 {
                    return Err(Error::Input(format!(
                        "this model captions one image per prompt, {} were given",
                        images.len()
                    )));
                }
                let text = prompt.strip_prefix(marker).unwrap_or(prompt).trim_start();
                let mut ids = self.encode(text, true, esc)?;
                // [CLS] text [SEP] → [DEC] text, as HF's BlipForConditionalGeneration.generate.
                ids.pop();
                match ids.first_mut() {
                    Some(first) => *first = bos,
                    None => ids.push(bos),
                }
                ids
            }
            PromptStyle::Interleaved => {
                if markers != images.len() {
                    return Err(Error::Input(format!(
                        "the prompt has {markers} `{marker}` marker(s) but {} image(s) were given",
                        images.len()
                    )));
                }
                let fake = "<fake_token_around_image>";
                let mut text = self.bos_token.clone();
                let mut last_was_image = false;
                for (i, piece) in prompt.split(marker).enumerate() {
                    if i > 0 {
                        if !last_was_image {
                            text.push_str(fake);
                        }
                        text.push_str(marker);
                        text.push_str(fake);
                        last_was_image = true;
                    }
                    let piece = piece.trim_matches(' ');
                    if !piece.is_empty() {
                        text.push_str(piece);
                        last_was_image = false;
                    }
                }
                self.encode(&text, false, esc)?
            }
            PromptStyle::Plain => {
                if !images.is_empty() {
                    return Err(Error::Input("this model takes text only here".into()));
                }
                self.encode(prompt, true, esc)?
            }
        };
        Ok(input_ids)
    }

    /// How this model places images in the prompt.
    pub fn style(&self) -> PromptStyle {
        self.style
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }
}
