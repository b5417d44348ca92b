//! One model ready to serve: its processor and weights, chosen by the checkpoint's
//! architecture, and single-sequence generation (prefill, then one token at a time
//! over the KV cache).

use std::path::Path;

use iris_image::ImageLimits;
use iris_models::config::{read_json, token_ids};
use iris_models::registry::{Checkpoint, Family, Parts};
use iris_models::vlm::VisionLanguageModel;
use iris_tensor::{DType, Device, Tensor};

use crate::processor::{PreparedPrompt, Processor, PromptStyle};
use crate::{Error, Result};
use iris_tensor::sample::{Draw, Sampler, SamplingParams};

#[derive(Debug, Clone, Default)]
pub struct PipelineOptions {
    /// Overrides the checkpoint's dtype.
    pub dtype: Option<DType>,
    pub limits: ImageLimits,
    /// Where the weights, activations and KV cache live.
    pub device: Device,
    /// The language model's dense linear weights quantized to this as they load.
    pub quantize: Option<iris_tensor::quant::QuantType>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-sequence token was produced.
    Eos,
    /// A stop token or stop string was produced.
    Stop,
    /// `max_new_tokens` were produced.
    Length,
    /// The client cancelled the request.
    Cancelled,
    /// The request's constraint allowed no token before its output was whole (an
    /// unsatisfiable schema or grammar, or its matcher failed).
    Constraint,
}

/// What ends a generation besides the model's EOS and the length limit.
#[derive(Debug, Clone, Default)]
pub struct StopRules {
    pub token_ids: Vec<u32>,
    /// The text is cut before the first occurrence of any of these.
    pub strings: Vec<String>,
    /// Decode past the model's EOS tokens, to the length limit (vLLM's `ignore_eos`,
    /// for benchmarks: every request decodes the same number of steps).
    pub ignore_eos: bool,
}

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: StopRules,
    /// Also report the `top_logprobs` most likely tokens at each step.
    pub top_logprobs: usize,
    /// Structured outputs: what the output must match (the engine's requests only).
    pub constraint: Option<crate::constrain::Constraint>,
    /// OpenAI's `logit_bias`: (token, bias) added to the logits before each draw.
    pub logit_bias: Vec<(u32, f32)>,
}

impl GenerateOptions {
    pub fn validate(&self) -> Result<()> {
        self.sampling.validate().map_err(Error::Input)?;
        if let Some((t, b)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(-100.0..=100.0).contains(b))
        {
            return Err(Error::Input(format!(
                "logit_bias of token {t}: {b} is not in [-100, 100]"
            )));
        }
        if self.max_new_tokens == 0 {
            return Err(Error::Input("max_new_tokens must be at least 1".into()));
        }
        if self.stop.strings.iter().any(String::is_empty) {
            return Err(Error::Input("stop strings must not be empty".into()));
        }
        Ok(())
    }

    pub fn new(max_new_tokens: usize, sampling: SamplingParams) -> GenerateOptions {
        GenerateOptions {
            max_new_tokens,
            sampling,
            stop: StopRules::default(),
            top_logprobs: 0,
            constraint: None,
            logit_bias: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Generation {
    pub prompt_token_ids: Vec<u32>,
    pub token_ids: Vec<u32>,
    pub text: String,
    /// Log-softmax of each chosen token under the model's logits at its step.
    pub logprobs: Vec<f32>,
    /// With `top_logprobs` > 0: the most likely tokens at each step and their logprobs.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    pub finish_reason: FinishReason,
}

/// What serving a model folder needs besides its weights: its processor (tokenizer,
/// image processor, placeholder expansion), stop ids and context length, read from the
/// config files alone (the gateway tokenizes and validates with it).
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub family: Family,
    pub processor: Processor,
    pub eos_token_ids: Vec<u32>,
    /// Positions the language model has (prompt plus output).
    pub context_length: usize,
}

impl ModelSpec {
    pub fn read(dir: &Path, limits: ImageLimits) -> Result<ModelSpec> {
        if iris_models::registry::is_gguf(dir) {
            let config = iris_models::gguf::read(dir)?.llama()?.config;
            return ModelSpec::from_config(dir, &config, limits);
        }
        ModelSpec::from_config(dir, &read_json(&dir.join("config.json"))?, limits)
    }

    /// The spec of the model folder `dir` whose `config.json` is `cfg` (already read).
    pub fn from_config(
        dir: &Path,
        cfg: &serde_json::Value,
        limits: ImageLimits,
    ) -> Result<ModelSpec> {
        use iris_models::config::{
            Blip2Config, BlipConfig, IdeficsConfig, ImageTokens, LlavaConfig,
        };
        let family = Family::of(cfg)?;
        let mut sep_eos = None;
        // (style, placeholder id, visual tokens per image, model eos, context)
        let (style, placeholder, per_image, model_eos, context) = match family {
            Family::Llava => {
                let c = LlavaConfig::from_value(cfg)?;
                let per = c.image_tokens()?;
                let ctx = c.text.max_position_embeddings;
                (
                    PromptStyle::Inline,
                    Some(c.image_token_id),
                    per,
                    c.text.eos_token_ids,
                    ctx,
                )
            }
            Family::Blip2 => {
                let c = Blip2Config::from_value(cfg)?;
                let ctx = c.text.context_length();
                let (id, per) = (c.image_token_id, ImageTokens::Fixed(c.num_query_tokens));
                (
                    PromptStyle::Prefix,
                    Some(id),
                    per,
                    c.text.eos_token_ids(),
                    ctx,
                )
            }
            Family::Idefics => {
                let c = IdeficsConfig::from_value(cfg)?;
                let ctx = c.text.max_position_embeddings;
                let none = ImageTokens::None;
                (
                    PromptStyle::Interleaved,
                    None,
                    none,
                    c.text.eos_token_ids,
                    ctx,
                )
            }
            Family::BlipCaption => {
                let c = BlipConfig::from_value(cfg)?;
                // HF's BLIP generate stops at [SEP], whatever generation_config says.
                sep_eos = Some(vec![c.sep_token_id]);
                let style = PromptStyle::Decoder {
                    bos: c.bos_token_id,
                };
                (
                    style,
                    None,
                    ImageTokens::None,
                    vec![],
                    c.max_position_embeddings,
                )
            }
            Family::Llama => {
                let c = iris_models::config::LlamaConfig::from_value(cfg, false)?;
                let ctx = c.max_position_embeddings;
                (
                    PromptStyle::Plain,
                    None,
                    ImageTokens::None,
                    c.eos_token_ids,
                    ctx,
                )
            }
            Family::BlipRetrieval | Family::Blip2Retrieval => {
                return Err(Error::Input(format!(
                    "{} is a retrieval model (embed and match), not a generation model",
                    dir.display()
                )))
            }
        };
        let processor = Processor::load(dir, style, placeholder, per_image, limits)?;
        // HF's generate stops at generation_config's eos ids, else the model config's.
        let gen_path = dir.join("generation_config.json");
        let from_gen = if gen_path.exists() {
            token_ids(read_json(&gen_path)?.get("eos_token_id"))
        } else {
            vec![]
        };
        let mut eos_token_ids = match sep_eos {
            Some(sep) => sep,
            None if from_gen.is_empty() => model_eos,
            None => from_gen,
        };
        if eos_token_ids.is_empty() {
            eos_token_ids.extend(processor.tokenizer().token_to_id("</s>"));
        }
        Ok(ModelSpec {
            family,
            processor,
            eos_token_ids,
            context_length: context,
        })
    }
}

#[derive(Debug)]
pub struct Pipeline {
    pub processor: Processor,
    /// The parts loaded here: calling into another part is an error, not a panic.
    pub model: Box<dyn VisionLanguageModel>,
    pub parts: Parts,
    eos_token_ids: Vec<u32>,
    /// Positions the language model has (prompt plus output).
    context_length: usize,
    /// Names of the checkpoint tensors the parts read, in order.
    tensors_read: Vec<String>,
    /// Bytes those tensors take in the checkpoint.
    bytes_read: usize,
    device: Device,
    /// Rank 0 of a tensor-parallel group: whether the group can still serve.
    group: Option<std::sync::Arc<crate::tp::GroupHealth>>,
}

impl Pipeline {
    /// Loads every part of the model folder `dir`, whatever architecture Iris serves.
    pub fn load(dir: &Path, opts: &PipelineOptions) -> Result<Pipeline> {
        Pipeline::load_parts(dir, opts, Parts::ALL)
    }

    /// Loads `parts` of `dir` (plus its processor and configs, which every part
    /// needs); each part reads only its own tensors from the memory-mapped checkpoint.
    pub fn load_parts(dir: &Path, opts: &PipelineOptions, parts: Parts) -> Result<Pipeline> {
        Pipeline::load_tp(dir, opts, parts, iris_comm::single())
    }

    /// Where the model runs (its KV arena goes there too).
    pub fn device(&self) -> Device {
        self.device
    }

    /// Rank `comm.rank()` of a tensor-parallel group over `dir` (a group of one: the
    /// whole model, as `load_parts`): rank 0 loads `parts`
    /// (the language model as its shard) behind a [`crate::tp::TpLeader`] that announces
    /// each language-model call to the other ranks; the other ranks load their shard of
    /// the language model only, for [`crate::tp::follow`].
    pub fn load_tp(
        dir: &Path,
        opts: &PipelineOptions,
        parts: Parts,
        comm: std::sync::Arc<dyn iris_comm::Communicator>,
    ) -> Result<Pipeline> {
        let leader = comm.rank() == 0;
        let parts = if leader { parts } else { Parts::LANGUAGE };
        let ck = Checkpoint::open_on(dir, opts.dtype, opts.device, opts.quantize)?;
        let spec = ModelSpec::from_config(dir, &ck.config, opts.limits)?;
        let shard = ck.load_vlm_tp(dir, parts, comm.clone())?;
        let mut group = None;
        let model: Box<dyn VisionLanguageModel> = if leader && comm.world_size() > 1 {
            let l = crate::tp::TpLeader::new(shard, comm);
            group = Some(l.health());
            Box::new(l)
        } else {
            shard
        };
        let tensors_read = ck.weights.tensors_read();
        Ok(Pipeline {
            processor: spec.processor,
            model,
            parts,
            eos_token_ids: spec.eos_token_ids,
            context_length: spec.context_length,
            tensors_read,
            bytes_read: ck.weights.bytes_read() as usize,
            device: opts.device,
            group,
        })
    }

    /// Rank 0 of a tensor-parallel group: the group's health (a caller that learns a
    /// rank is gone breaks it).
    pub fn group(&self) -> Option<&std::sync::Arc<crate::tp::GroupHealth>> {
        self.group.as_ref()
    }

    /// Positions the language model has (prompt plus output).
    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// The checkpoint tensors this pipeline's parts read (each once per read).
    pub fn tensors_read(&self) -> &[String] {
        &self.tensors_read
    }

    /// Checkpoint bytes of the tensors read.
    pub fn bytes_read(&self) -> usize {
        self.bytes_read
    }

    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// Visual tokens of each image of a prepared prompt.
    pub fn encode_images(&self, prepared: &PreparedPrompt) -> Result<Vec<Tensor>> {
        Ok(prepared
            .pixel_values
            .iter()
            .zip(&prepared.image_sizes)
            .map(|(pv, &size)| self.model.encode_image(pv, size))
            .collect::<iris_models::Result<_>>()?)
    }

    pub fn generate(
        &self,
        prompt: &str,
        images: &[Vec<u8>],
        max_new_tokens: usize,
        sampling: SamplingParams,
    ) -> Result<Generation> {
        self.generate_with(
            prompt,
            images,
            &GenerateOptions::new(max_new_tokens, sampling),
        )
    }

    pub fn generate_with(
        &self,
        prompt: &str,
        images: &[Vec<u8>],
        opts: &GenerateOptions,
    ) -> Result<Generation> {
        opts.sampling.validate().map_err(Error::Input)?;
        if opts.constraint.is_some() {
            return Err(Error::Input(
                "structured outputs are decoded by the engine, not Pipeline::generate".into(),
            ));
        }
        let prepared = self.processor.prepare(prompt, images)?;
        let visual = self.encode_images(&prepared)?;
        self.generate_from(&prepared, &visual, opts)
    }

    /// Generation from a prepared prompt and its images' visual tokens, so several
    /// samples of one prompt encode its images once.
    pub fn generate_from(
        &self,
        prepared: &PreparedPrompt,
        visual: &[Tensor],
        opts: &GenerateOptions,
    ) -> Result<Generation> {
        opts.validate()?;
        let lm = self.model.language_model()?;
        let embeds = self.model.input_embeds(&prepared.input_ids, visual)?;
        let mut cache = lm.new_cache();
        self.model
            .condition(&mut cache, &prepared.input_ids, visual)?;
        let sampler = Sampler::new(opts.sampling);
        let decoder = self.model.decoder_prompt(&prepared.input_ids);
        let mut hidden = lm.forward(&embeds, &mut cache)?;
        let mut token_ids = Vec::new();
        let mut logprobs = Vec::new();
        let mut top = Vec::new();
        let mut finish_reason = FinishReason::Length;
        let mut text = None;
        while token_ids.len() < opts.max_new_tokens {
            let last = hidden.narrow_rows(hidden.rows() - 1, 1)?;
            let logits = lm.logits(&last)?;
            let draw = Draw {
                sampler: &sampler,
                position: decoder.len() + token_ids.len(),
                prompt: &decoder,
                output: &token_ids,
                top_logprobs: opts.top_logprobs,
                allowed: None,
                bias: &opts.logit_bias,
            };
            let drawn = logits.sample_rows(&[draw])?.remove(0);
            let next = drawn.id;
            logprobs.push(drawn.logprob);
            if opts.top_logprobs > 0 {
                top.push(drawn.top_logprobs);
            }
            token_ids.push(next);
            if !opts.stop.ignore_eos && self.eos_token_ids.contains(&next) {
                finish_reason = FinishReason::Eos;
                break;
            }
            if opts.stop.token_ids.contains(&next) {
                finish_reason = FinishReason::Stop;
                break;
            }
            if !opts.stop.strings.is_empty() {
                let so_far = self.processor.decode(&token_ids)?;
                if let Some(cut) = opts
                    .stop
                    .strings
                    .iter()
                    .filter_map(|s| so_far.find(s.as_str()))
                    .min()
                {
                    text = Some(so_far[..cut].to_string());
                    finish_reason = FinishReason::Stop;
                    break;
                }
            }
            if token_ids.len() == opts.max_new_tokens {
                break;
            }
            hidden = lm.forward(&lm.embed(&[next])?, &mut cache)?;
        }
        Ok(Generation {
            text: match text {
                Some(t) => t,
                None => self.processor.decode(&token_ids)?,
            },
            prompt_token_ids: prepared.input_ids.clone(),
            token_ids,
            logprobs,
            top_logprobs: top,
            finish_reason,
        })
    }
}
