//! Structured outputs: decoding held to a JSON schema, a regular expression or a Lark
//! grammar by `llguidance` (the engine behind vLLM's, SGLang's and mistral.rs'
//! structured outputs). A request's constraint is compiled when it is submitted (a
//! schema that does not compile is the caller's error, with the compiler's message);
//! at each step the compiled matcher gives the set of tokens that keep the output a
//! prefix of some string of the language, the sampler draws only among them, and the
//! drawn token advances the matcher. The masks of a step are computed on another
//! thread while the batched forward pass runs ([`crate::engine`]).

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use tokenizers::Tokenizer;
use toktrie::{SimpleVob, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::{Error, Result};

/// What a request's output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// Any JSON object (OpenAI's `{"type": "json_object"}`).
    JsonObject,
    /// A JSON schema (OpenAI's `{"type": "json_schema", "json_schema": {"schema": …}}`).
    JsonSchema(serde_json::Value),
    /// A regular expression (Rust `regex` syntax) the whole output matches.
    Regex(String),
    /// A grammar in llguidance's Lark dialect.
    Lark(String),
}

impl Constraint {
    /// JSON without optional whitespace (`,` and `:` alone, as vLLM's llguidance
    /// backend writes it): a model cannot pad its output with spaces until its length
    /// runs out. A schema's own `x-guidance` options win.
    fn grammar(&self) -> TopLevelGrammar {
        let compact = |mut schema: serde_json::Value| {
            if let Some(o) = schema.as_object_mut() {
                o.entry("x-guidance")
                    .or_insert_with(|| serde_json::json!({"whitespace_flexible": false}));
            }
            TopLevelGrammar::from_json_schema(schema)
        };
        match self {
            Constraint::JsonObject => compact(serde_json::json!({"type": "object"})),
            Constraint::JsonSchema(s) => compact(s.clone()),
            Constraint::Regex(r) => TopLevelGrammar::from_regex(r),
            Constraint::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
        }
    }
}

/// A model's tokenizer as llguidance sees it: every token's bytes in a trie, and
/// text to tokens for the grammar's literals.
struct TokenizerBytes {
    trie: TokTrie,
    tokenizer: Tokenizer,
}

impl TokenizerEnv for TokenizerBytes {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    /// The tokenizer's tokens for `s` when they spell exactly `s`; else (bytes the
    /// vocabulary lacks, which it would write as its unknown token) the trie's greedy
    /// tokens, which skip such bytes: the grammar then finds no token for them rather
    /// than forcing the unknown one.
    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        let text = String::from_utf8_lossy(s);
        match self.tokenizer.encode(text.as_ref(), false) {
            Ok(e) if self.trie.decode_raw(e.get_ids()) == s => e.get_ids().to_vec(),
            _ => self.trie.greedy_tokenize(s),
        }
    }
}

/// Compiles constraints for one model's tokenizer (built once, shared by requests).
pub struct Grammars {
    factory: ParserFactory,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Grammars({} tokens)",
            self.factory.tok_env().tok_trie().vocab_size()
        )
    }
}

impl Grammars {
    /// From the tokenizer the model loaded (`vocab`: the rows of its logits, which may
    /// exceed the tokenizer's ids; those tokens are never allowed) and its EOS ids.
    pub fn new(tokenizer: &Tokenizer, vocab: usize, eos: &[u32]) -> Result<Grammars> {
        let err = |e: &dyn std::fmt::Display| {
            Error::Tokenizer(format!(
                "structured outputs need the tokenizer's bytes: {e}"
            ))
        };
        let json: serde_json::Value =
            serde_json::from_str(&tokenizer.to_string(false).map_err(|e| err(&e))?)
                .map_err(|e| err(&e))?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| err(&e))?;
        let vocab = vocab.max(words.len()).max(tokenizer.get_vocab_size(true));
        words.resize(vocab, Vec::new());
        let eos_id = *eos
            .first()
            .ok_or_else(|| Error::Tokenizer("structured outputs need an EOS token".into()))?;
        let info = TokRxInfo::new(vocab as u32, eos_id);
        let trie = TokTrie::from(&info, &words);
        // Literals are tokenized without the leading space a SentencePiece tokenizer
        // adds to a text's start (mid-output text has none).
        let mut tokenizer = tokenizer.clone();
        no_prefix_space(&mut tokenizer).map_err(|e| err(&e))?;
        let env: toktrie::TokEnv = Arc::new(TokenizerBytes { trie, tokenizer });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| err(&e))?;
        factory.quiet();
        Ok(Grammars { factory })
    }

    /// A matcher for `c`, at the start of the output; the compiler's message when it
    /// does not compile.
    pub fn compile(&self, c: &Constraint) -> Result<Matcher> {
        // The compiler reads the caller's text: a panic in it is that input's error,
        // not the server's.
        let parser = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.factory.create_parser(c.grammar())
        }))
        .map_err(|_| Error::Input("the constraint does not compile (the compiler failed)".into()))?
        .map_err(|e| Error::Input(format!("the constraint does not compile: {e}")))?;
        Ok(Matcher::new(Ok(parser)))
    }
}

/// Drops a SentencePiece `Metaspace` pre-tokenizer's prefix space and a `Prepend`
/// normalizer (LLaMA's `▁` at the start of a text).
fn no_prefix_space(t: &mut Tokenizer) -> tokenizers::Result<()> {
    use tokenizers::normalizers::{NormalizerWrapper, Sequence};
    use tokenizers::pre_tokenizers::metaspace::PrependScheme;
    use tokenizers::pre_tokenizers::PreTokenizerWrapper;
    fn normalizer(n: NormalizerWrapper) -> Option<NormalizerWrapper> {
        match n {
            NormalizerWrapper::Prepend(_) => None,
            NormalizerWrapper::Sequence(s) => {
                let kept: Vec<_> = s.as_ref().iter().cloned().filter_map(normalizer).collect();
                (!kept.is_empty()).then(|| NormalizerWrapper::Sequence(Sequence::new(kept)))
            }
            n => Some(n),
        }
    }
    fn pre(p: PreTokenizerWrapper) -> PreTokenizerWrapper {
        match p {
            PreTokenizerWrapper::Metaspace(mut m) => {
                m.set_prepend_scheme(PrependScheme::Never);
                PreTokenizerWrapper::Metaspace(m)
            }
            PreTokenizerWrapper::Sequence(s) => {
                PreTokenizerWrapper::Sequence(tokenizers::pre_tokenizers::sequence::Sequence::new(
                    s.as_ref().iter().cloned().map(pre).collect(),
                ))
            }
            p => p,
        }
    }
    if let Some(n) = t.get_normalizer().cloned() {
        t.with_normalizer(normalizer(n))?;
    }
    if let Some(p) = t.get_pre_tokenizer().cloned() {
        t.with_pre_tokenizer(Some(pre(p)));
    }
    Ok(())
}

/// A request's matcher and the mask of its next token.
pub struct Guide {
    matcher: Matcher,
    mask: Option<SimpleVob>,
}

impl std::fmt::Debug for Guide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Guide")
    }
}

/// A word's bits for its first `n` tokens.
fn low_bits(n: usize) -> u32 {
    if n >= 32 {
        u32::MAX
    } else {
        (1u32 << n) - 1
    }
}

/// Why a guided request cannot go on.
#[derive(Debug, Clone, PartialEq)]
pub enum Dead {
    /// The grammar is complete: no token extends it (its output is whole).
    Complete,
    /// No token is allowed and the output is not complete (an unsatisfiable
    /// constraint, or the matcher failed): the message says which.
    Stuck(String),
}

impl Guide {
    pub fn new(matcher: Matcher) -> Guide {
        Guide {
            matcher,
            mask: None,
        }
    }

    /// Advances over tokens already produced (a resumed request's).
    pub fn consume(&mut self, tokens: &[u32]) -> Result<()> {
        self.mask = None;
        self.matcher
            .consume_tokens(tokens)
            .map_err(|e| Error::Input(format!("the output so far breaks the constraint: {e}")))
    }

    /// Whether the next token's mask is computed.
    pub fn has_mask(&self) -> bool {
        self.mask.is_some()
    }

    /// Whether the matcher has stopped (its output is whole, or it failed).
    pub fn is_stopped(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// Computes the next token's mask now (idempotent until the next `consume`).
    pub fn prepare(&mut self) {
        if self.mask.is_none() && !self.matcher.is_stopped() {
            self.mask = self.matcher.compute_mask().ok();
        }
    }

    /// The allowed tokens among the model's first `vocab` as bit words (bit `t % 32` of
    /// word `t / 32`), or why there are none.
    pub fn allowed(&mut self, vocab: usize) -> std::result::Result<&[u32], Dead> {
        if self.matcher.is_stopped() {
            return Err(match self.matcher.get_error() {
                Some(e) => Dead::Stuck(e),
                None => Dead::Complete,
            });
        }
        self.prepare();
        // Tokens past the logits (a tokenizer's added tokens the model has no row for)
        // cannot be drawn.
        let any_below = |m: &SimpleVob| {
            m.as_slice().iter().enumerate().any(|(w, &bits)| {
                let from = w * 32;
                from < vocab && bits & low_bits(vocab - from) != 0
            })
        };
        match &self.mask {
            Some(m) if any_below(m) => Ok(m.as_slice()),
            Some(_) => Err(Dead::Stuck("no token can continue the output".into())),
            None => Err(Dead::Stuck(
                self.matcher
                    .get_error()
                    .unwrap_or_else(|| "the mask could not be computed".into()),
            )),
        }
    }

    /// Takes the drawn token.
    pub fn advance(&mut self, token: u32) -> std::result::Result<(), Dead> {
        self.mask = None;
        self.matcher
            .consume_token(token)
            .map_err(|e| Dead::Stuck(e.to_string()))
    }

    /// Whether the output so far is a whole string of the language.
    pub fn is_accepting(&mut self) -> bool {
        self.matcher.is_stopped() || self.matcher.is_accepting().unwrap_or(false)
    }
}
