//! Conversions between Iris types and the wire (`iris.v1`) messages (errors map to
//! statuses in `error.rs`).

use half::bf16;
use iris_engine::{
    Constraint, FinishReason, GenerateOptions, SamplingParams, StopRules, TokenEvent,
};
use iris_proto::v1 as pb;
use iris_tensor::{DType, Tensor};
use tonic::Status;

use crate::error::ServeError;

/// Largest message any Iris service or client takes (LLaVA's 576×4096 visual tokens
/// are 4.5 MB in bf16, 9 MB in f32; gRPC's default is 4 MB).
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;

pub fn tensor_to_wire(t: &Tensor) -> Result<pb::Tensor, ServeError> {
    let dtype = if t.dtype() == DType::BF16 {
        DType::BF16
    } else {
        DType::F32
    };
    Ok(pb::Tensor {
        dtype: dtype.to_string(),
        shape: t.shape().iter().map(|&d| d as u64).collect(),
        data: t.to_dtype(dtype)?.to_le_bytes()?,
    })
}

/// A wire tensor as f32 (what the models compute in); bad dtypes or sizes are the
/// caller's error.
pub fn tensor_from_wire(t: &pb::Tensor) -> Result<Tensor, ServeError> {
    let dtype = DType::parse(&t.dtype)
        .ok_or_else(|| ServeError::bad_input(format!("unknown tensor dtype `{}`", t.dtype)))?;
    let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
    let want = shape
        .iter()
        .try_fold(dtype.size_in_bytes(), |a, &d| a.checked_mul(d));
    if want != Some(t.data.len()) {
        return Err(ServeError::bad_input(format!(
            "tensor of shape {shape:?} {dtype} needs {want:?} bytes, got {}",
            t.data.len()
        )));
    }
    let x = Tensor::from_le_bytes(&t.data, dtype, &shape)
        .map_err(|e| ServeError::bad_input(e.to_string()))?;
    x.to_dtype(DType::F32)
        .map_err(|e| ServeError::bad_input(e.to_string()))
}

/// `tensor_to_wire`, in bf16 when that loses nothing (a bf16 model's visual tokens,
/// half the bytes).
pub fn tensor_to_wire_compact(t: &Tensor) -> Result<pb::Tensor, ServeError> {
    if t.dtype() == DType::F32 {
        let v = t.host_f32()?;
        if v.iter()
            .all(|&x| bf16::from_f32(x).to_f32().to_bits() == x.to_bits())
        {
            let b: Vec<bf16> = v.into_iter().map(bf16::from_f32).collect();
            return tensor_to_wire(&Tensor::from_bf16(b, t.shape())?);
        }
    }
    tensor_to_wire(t)
}

pub fn sampling_from_wire(s: Option<&pb::SamplingParams>) -> SamplingParams {
    let Some(s) = s else {
        return SamplingParams::default();
    };
    let one_if_zero = |v: f32| if v == 0.0 { 1.0 } else { v };
    SamplingParams {
        temperature: s.temperature,
        top_p: one_if_zero(s.top_p),
        top_k: s.top_k as usize,
        min_p: s.min_p,
        repetition_penalty: one_if_zero(s.repetition_penalty),
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        seed: s.seed,
    }
}

pub fn sampling_to_wire(s: &SamplingParams) -> pb::SamplingParams {
    pb::SamplingParams {
        temperature: s.temperature,
        top_p: s.top_p,
        top_k: s.top_k as u32,
        min_p: s.min_p,
        repetition_penalty: s.repetition_penalty,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        seed: s.seed,
    }
}

/// A constraint on the wire; `None` when unset. A JSON schema that is not JSON is the
/// caller's error.
pub fn constraint_from_wire(c: Option<&pb::Constraint>) -> Result<Option<Constraint>, Status> {
    use pb::constraint::Kind;
    Ok(match c.and_then(|c| c.kind.as_ref()) {
        None | Some(Kind::JsonObject(false)) => None,
        Some(Kind::JsonObject(true)) => Some(Constraint::JsonObject),
        Some(Kind::JsonSchema(s)) => Some(Constraint::JsonSchema(
            serde_json::from_str(s)
                .map_err(|e| Status::invalid_argument(format!("json_schema is not JSON: {e}")))?,
        )),
        Some(Kind::Regex(r)) => Some(Constraint::Regex(r.clone())),
        Some(Kind::Lark(g)) => Some(Constraint::Lark(g.clone())),
    })
}

pub fn constraint_to_wire(c: Option<&Constraint>) -> Option<pb::Constraint> {
    use pb::constraint::Kind;
    c.map(|c| pb::Constraint {
        kind: Some(match c {
            Constraint::JsonObject => Kind::JsonObject(true),
            Constraint::JsonSchema(s) => Kind::JsonSchema(s.to_string()),
            Constraint::Regex(r) => Kind::Regex(r.clone()),
            Constraint::Lark(g) => Kind::Lark(g.clone()),
        }),
    })
}

pub fn options(
    sampling: Option<&pb::SamplingParams>,
    max_tokens: u32,
    stop: &[String],
    stop_token_ids: &[u32],
    top_logprobs: u32,
    constraint: Option<&pb::Constraint>,
    logit_bias: &std::collections::HashMap<u32, f32>,
) -> Result<GenerateOptions, Status> {
    let mut logit_bias: Vec<(u32, f32)> = logit_bias.iter().map(|(&t, &b)| (t, b)).collect();
    logit_bias.sort_by_key(|&(t, _)| t);
    Ok(GenerateOptions {
        max_new_tokens: max_tokens as usize,
        sampling: sampling_from_wire(sampling),
        stop: StopRules {
            token_ids: stop_token_ids.to_vec(),
            strings: stop.to_vec(),
            ignore_eos: false,
        },
        top_logprobs: top_logprobs as usize,
        constraint: constraint_from_wire(constraint)?,
        logit_bias,
    })
}

pub fn finish_reason(r: FinishReason) -> pb::FinishReason {
    match r {
        FinishReason::Eos => pb::FinishReason::Eos,
        FinishReason::Stop => pb::FinishReason::Stop,
        FinishReason::Length => pb::FinishReason::Length,
        FinishReason::Cancelled => pb::FinishReason::Cancelled,
        FinishReason::Constraint => pb::FinishReason::Constraint,
    }
}

/// An engine event on the wire; an error event becomes the stream's status, and an
/// admission has none (the decoder's trace marks it).
pub fn event_to_wire(
    ev: TokenEvent,
    completion_tokens: u32,
) -> Option<Result<pb::GenerateEvent, Status>> {
    use pb::generate_event::Event;
    Some(Ok(pb::GenerateEvent {
        event: Some(match ev {
            TokenEvent::Token {
                id,
                logprob,
                top_logprobs,
                text,
            } => Event::Token(pb::Token {
                id,
                logprob,
                top_logprobs: top_logprobs
                    .into_iter()
                    .map(|(token_id, logprob)| pb::TopLogprob { token_id, logprob })
                    .collect(),
                text,
            }),
            TokenEvent::Finished {
                reason,
                text,
                prompt_token_ids,
                cached_tokens,
            } => Event::Finished(pb::Finished {
                reason: finish_reason(reason) as i32,
                text,
                prompt_tokens: prompt_token_ids.len() as u32,
                completion_tokens,
                cached_tokens: cached_tokens as u32,
            }),
            TokenEvent::Error(e) => return Some(Err(ServeError::new(e.kind, e.message).into())),
            TokenEvent::Admitted { .. } => return None,
        }),
    }))
}
