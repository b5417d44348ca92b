//! The one table from a checkpoint's declared architecture (`architectures[0]`, else
//! `model_type`, as HF's `AutoConfig` reads it) to what Iris serves it as: the model
//! family, its task (generation or retrieval) and the parts it is made of. Every
//! other place that needs to know what a model is asks here.
//!
//! A model is loaded as parts (`Parts`): a vision tier loads the vision tower, a
//! connector tier the projector / Q-Former / Perceiver Resampler, a decoder the
//! language model; each part reads only its own tensors from the memory-mapped
//! checkpoint, and `Weights::tensors_read` tells which those were.

use std::path::Path;
use std::sync::Arc;

use iris_tensor::DType;
use serde_json::Value;

use crate::config::{architecture, checkpoint_dtype, read_json};
use crate::vlm::{ImageTextRetrieval, VisionLanguageModel};
use crate::weights::Weights;
use crate::{Error, Result};

/// Whether `path` names a GGUF file (rather than a model folder).
pub fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        && path.is_file()
}

/// One part of a vision-language model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    /// The vision tower (ViT) and its feature selection.
    Vision,
    /// LLaVA's projector, BLIP-2's Q-Former + language projection, IDEFICS' Perceiver
    /// Resampler (BLIP's captioner has none: its decoder reads the features).
    Connector,
    /// The language model (with IDEFICS' gated cross-attention layers).
    Language,
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Part::Vision => "vision encoder",
            Part::Connector => "connector",
            Part::Language => "language model",
        })
    }
}

/// A set of parts to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Parts {
    pub vision: bool,
    pub connector: bool,
    pub language: bool,
}

impl Parts {
    pub const NONE: Parts = Parts {
        vision: false,
        connector: false,
        language: false,
    };
    pub const ALL: Parts = Parts {
        vision: true,
        connector: true,
        language: true,
    };
    pub const VISION: Parts = Parts {
        vision: true,
        ..Parts::NONE
    };
    pub const CONNECTOR: Parts = Parts {
        connector: true,
        ..Parts::NONE
    };
    pub const LANGUAGE: Parts = Parts {
        language: true,
        ..Parts::NONE
    };

    pub fn has(self, part: Part) -> bool {
        match part {
            Part::Vision => self.vision,
            Part::Connector => self.connector,
            Part::Language => self.language,
        }
    }
}

/// A loaded part, or the error that says it is not loaded in this process.
pub(crate) fn part<T>(slot: &Option<T>, which: Part) -> Result<&T> {
    slot.as_ref().ok_or(Error::PartNotLoaded(which))
}

/// `Some(load())` when `which` is wanted.
pub(crate) fn load_if<T>(
    parts: Parts,
    which: Part,
    load: impl FnOnce() -> Result<T>,
) -> Result<Option<T>> {
    parts.has(which).then(load).transpose()
}

/// The model families Iris serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    Llava,
    Blip2,
    Idefics,
    BlipCaption,
    BlipRetrieval,
    Blip2Retrieval,
    /// A language model alone (a LLaMA; a LLaMA GGUF file).
    Llama,
}

/// What a family is served for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Text from images and a prompt (the tiers and the engine).
    Generation,
    /// ITC embeddings and ITM scores (served by the gateway itself).
    Retrieval,
}

/// Architecture names (HF class names and `model_type`s) → family.
const TABLE: &[(&str, Family)] = &[
    (crate::llava::ARCHITECTURE, Family::Llava),
    ("llava", Family::Llava),
    (crate::llava::NEXT_ARCHITECTURE, Family::Llava),
    ("llava_next", Family::Llava),
    (crate::blip2::ARCHITECTURE, Family::Blip2),
    ("blip-2", Family::Blip2),
    (crate::idefics::ARCHITECTURE, Family::Idefics),
    ("idefics", Family::Idefics),
    (crate::blip::CAPTION_ARCHITECTURE, Family::BlipCaption),
    (crate::blip::RETRIEVAL_ARCHITECTURE, Family::BlipRetrieval),
    (crate::blip2_retrieval::ARCHITECTURE, Family::Blip2Retrieval),
    (crate::text::ARCHITECTURE, Family::Llama),
    ("llama", Family::Llama),
];

impl Family {
    /// The family of a parsed `config.json`.
    pub fn of(config: &Value) -> Result<Family> {
        let arch = architecture(config).unwrap_or_else(|| "<none>".into());
        TABLE
            .iter()
            .find(|(name, _)| *name == arch)
            .map(|(_, f)| *f)
            .ok_or(Error::UnknownArchitecture(arch))
    }

    /// The family of the model folder `dir` (a `.gguf` file: a LLaMA).
    pub fn of_dir(dir: &Path) -> Result<Family> {
        if is_gguf(dir) {
            return Ok(Family::Llama);
        }
        Family::of(&read_json(&dir.join("config.json"))?)
    }

    pub fn task(self) -> Task {
        match self {
            Family::BlipRetrieval | Family::Blip2Retrieval => Task::Retrieval,
            _ => Task::Generation,
        }
    }

    /// The parts a model of this family has (BLIP's captioner has no connector).
    pub fn parts(self) -> Parts {
        match self {
            Family::BlipCaption => Parts {
                connector: false,
                ..Parts::ALL
            },
            Family::Llama => Parts::LANGUAGE,
            _ => Parts::ALL,
        }
    }
}

/// The `.gguf` file of a LLaVA folder, which holds its language model (the vision tower
/// and projector stay in the safetensors): none, or one — several are an error.
fn language_model_gguf(dir: &Path) -> Result<Option<std::path::PathBuf>> {
    let mut found: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .map_err(crate::error::io_err(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_gguf(p))
        .collect();
    found.sort();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(Error::Config(format!(
            "{}: {} .gguf files ({}); a LLaVA folder takes one, its language model",
            dir.display(),
            found.len(),
            found
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// A GGUF language model's shape against the LLaVA config's `text_config`: each
/// dimension the two state must agree.
fn check_text_config(path: &Path, gguf: &Value, text: Option<&Value>) -> Result<()> {
    let Some(text) = text else {
        return Err(Error::Config(format!(
            "{}: the LLaVA config has no text_config to check it against",
            path.display()
        )));
    };
    for key in [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
    ] {
        let want = text.get(key).and_then(Value::as_u64);
        let got = gguf.get(key).and_then(Value::as_u64);
        // A text_config may leave num_key_value_heads out: then it equals the heads.
        let want = want.or_else(|| {
            (key == "num_key_value_heads")
                .then(|| text.get("num_attention_heads").and_then(Value::as_u64))
                .flatten()
        });
        if want.is_some() && want != got {
            return Err(Error::Config(format!(
                "{}: {key} {}, but the LLaVA config's text_config says {}",
                path.display(),
                got.map_or("absent".into(), |v| v.to_string()),
                want.map_or("absent".into(), |v| v.to_string())
            )));
        }
    }
    Ok(())
}

/// A model folder opened for loading: its config, the dtype its tensors are served in,
/// and the memory-mapped checkpoint (nothing is read until a part asks for a tensor).
#[derive(Debug)]
pub struct Checkpoint {
    pub family: Family,
    /// The name the config declares (`architectures[0]`, else `model_type`).
    pub architecture: String,
    pub config: Value,
    pub dtype: DType,
    pub weights: Arc<Weights>,
}

impl Checkpoint {
    /// Opens `dir` (a model folder, or a LLaMA `.gguf` file); `dtype` overrides the
    /// checkpoint's (default f32).
    pub fn open(dir: &Path, dtype: Option<DType>) -> Result<Checkpoint> {
        Checkpoint::open_on(dir, dtype, iris_tensor::Device::Cpu, None)
    }

    /// [`Checkpoint::open`] whose tensors are read onto `device`, the language model's
    /// dense linear weights quantized to `quantize` as they load.
    pub fn open_on(
        dir: &Path,
        dtype: Option<DType>,
        device: iris_tensor::Device,
        quantize: Option<iris_tensor::quant::QuantType>,
    ) -> Result<Checkpoint> {
        let quantized = |w: Weights| match quantize {
            Some(ty) => w.quantize_linear(ty),
            None => w,
        };
        if is_gguf(dir) {
            let dtype = dtype.unwrap_or(DType::F32);
            let (weights, config) = Weights::open_gguf(dir, dtype)?;
            return Ok(Checkpoint {
                family: Family::Llama,
                architecture: crate::text::ARCHITECTURE.into(),
                config,
                dtype,
                weights: Arc::new(quantized(weights.on(device))),
            });
        }
        let config = read_json(&dir.join("config.json"))?;
        let family = Family::of(&config)?;
        let architecture = architecture(&config).unwrap_or_default();
        // LLaVA checkpoints may declare their dtype in `text_config` only.
        let text_dtype = || match family {
            Family::Llava => config.get("text_config").and_then(checkpoint_dtype),
            _ => None,
        };
        let dtype = dtype
            .or_else(|| checkpoint_dtype(&config))
            .or_else(text_dtype)
            .unwrap_or(DType::F32);
        let mut weights = Weights::open(dir, dtype)?;
        if family == Family::Llava {
            if let Some(path) = language_model_gguf(dir)? {
                let (lm, lm_config) = Weights::open_gguf(&path, dtype)?;
                check_text_config(&path, &lm_config, config.get("text_config"))?;
                weights.attach(lm, |name| format!("language_model.{name}"), &path)?;
            }
        }
        let weights = Arc::new(quantized(weights.on(device)));
        Ok(Checkpoint {
            family,
            architecture,
            config,
            dtype,
            weights,
        })
    }

    /// Errors unless the checkpoint is of `family`.
    pub(crate) fn expect(&self, family: Family) -> Result<()> {
        match self.family == family {
            true => Ok(()),
            false => Err(Error::UnknownArchitecture(self.architecture.clone())),
        }
    }

    /// The generation model's `parts` (the others are not read).
    pub fn load_vlm(&self, dir: &Path, parts: Parts) -> Result<Box<dyn VisionLanguageModel>> {
        self.load_vlm_tp(dir, parts, iris_comm::single())
    }

    /// [`Checkpoint::load_vlm`] with the language model's shard of rank `comm`.
    pub fn load_vlm_tp(
        &self,
        dir: &Path,
        parts: Parts,
        comm: Arc<dyn iris_comm::Communicator>,
    ) -> Result<Box<dyn VisionLanguageModel>> {
        use crate::{blip::BlipCaptioner, blip2::Blip2, idefics::Idefics, llava::Llava};
        Ok(match self.family {
            Family::Llava => Box::new(Llava::from_checkpoint(self, parts, comm)?),
            Family::Blip2 => Box::new(Blip2::from_checkpoint_tp(self, parts, comm)?),
            Family::Idefics => Box::new(Idefics::from_checkpoint_tp(self, dir, parts, comm)?),
            Family::BlipCaption if comm.world_size() > 1 => {
                return Err(Error::Config(
                    "BLIP's BERT text decoder does not split over ranks".into(),
                ))
            }
            Family::BlipCaption => Box::new(BlipCaptioner::from_checkpoint(self, parts)?),
            Family::Llama => Box::new(crate::text::TextModel::from_checkpoint(self, parts, comm)?),
            Family::BlipRetrieval | Family::Blip2Retrieval => {
                return Err(Error::Config(format!(
                    "`{}` is a retrieval model: it embeds and matches, it does not generate",
                    self.architecture
                )))
            }
        })
    }

    /// The retrieval model (every part: the gateway serves it whole).
    pub fn load_retrieval(&self) -> Result<Box<dyn ImageTextRetrieval>> {
        use crate::{blip::BlipRetrieval, blip2_retrieval::Blip2Retrieval};
        Ok(match self.family {
            Family::BlipRetrieval => Box::new(BlipRetrieval::from_checkpoint(self)?),
            Family::Blip2Retrieval => Box::new(Blip2Retrieval::from_checkpoint(self)?),
            _ => {
                return Err(Error::Config(format!(
                    "`{}` generates text; it is not a retrieval model (embed, match)",
                    self.architecture
                )))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn families_by_class_name_and_model_type() {
        let f = |v: Value| Family::of(&v).unwrap();
        assert_eq!(
            f(json!({"architectures": ["LlavaForConditionalGeneration"]})),
            Family::Llava
        );
        assert_eq!(f(json!({"model_type": "blip-2"})), Family::Blip2);
        assert_eq!(
            f(json!({"architectures": ["BlipForImageTextRetrieval"]})).task(),
            Task::Retrieval
        );
        assert!(!Family::BlipCaption.parts().connector);
        let e = Family::of(&json!({"architectures": ["GPT2LMHeadModel"]})).unwrap_err();
        assert!(matches!(e, Error::UnknownArchitecture(a) if a == "GPT2LMHeadModel"));
        assert!(matches!(
            Family::of(&json!({})),
            Err(Error::UnknownArchitecture(a)) if a == "<none>"
        ));
    }
}
