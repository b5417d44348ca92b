//! Token choice per request, as a tensor operation over a step's logits
//! ([`Tensor::sample_rows`]: only token ids and their log-probabilities leave the
//! device): repetition / presence / frequency penalties, then greedy at
//! temperature 0, else temperature, top-k, top-p (nucleus, Holtzman et al., 2019) and
//! min-p, in vLLM's order. Each draw derives from (seed, position) alone, so a request
//! gives the same tokens batched or alone, and resumed from any point.

use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
    /// Keep the k most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Drop tokens below `min_p` times the most likely one's probability; 0 keeps all.
    pub min_p: f32,
    /// HF / vLLM repetition penalty over prompt and output tokens; 1 is off.
    pub repetition_penalty: f32,
    /// OpenAI presence penalty over output tokens; 0 is off.
    pub presence_penalty: f32,
    /// OpenAI frequency penalty over output tokens; 0 is off.
    pub frequency_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!("temperature must be ≥ 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(format!("{name} must be in [-2, 2], got {v}"));
            }
        }
        Ok(())
    }

    fn penalized(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
    }
}

#[derive(Debug, Clone)]
pub struct Sampler {
    pub(crate) params: SamplingParams,
}

/// SplitMix64: a well-mixed u64 from any u64.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The seed of sample `i` of a request with `n` > 1 (OpenAI's `n`): sample 0 keeps the
/// request's seed, so `n` = 1 is the request alone; the others draw from streams
/// unrelated to it and to each other (a seed + i would replay sample 0's draws one
/// position later).
pub fn seed_stream(seed: u64, i: usize) -> u64 {
    if i == 0 {
        seed
    } else {
        splitmix64(seed ^ splitmix64(0x5eed_0000_0000_0000 | i as u64))
    }
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Sampler {
        Sampler { params }
    }

    /// Logits after the penalties (a copy only when a penalty is on).
    pub fn penalize<'a>(
        &self,
        logits: &'a [f32],
        prompt: &[u32],
        output: &[u32],
    ) -> std::borrow::Cow<'a, [f32]> {
        let p = &self.params;
        if !p.penalized() {
            return std::borrow::Cow::Borrowed(logits);
        }
        let mut l = logits.to_vec();
        if p.repetition_penalty != 1.0 {
            let mut seen: Vec<u32> = prompt.iter().chain(output).copied().collect();
            seen.sort_unstable();
            seen.dedup();
            for t in seen {
                if let Some(x) = l.get_mut(t as usize) {
                    *x = if *x > 0.0 {
                        *x / p.repetition_penalty
                    } else {
                        *x * p.repetition_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            let mut counts: HashMap<u32, usize> = HashMap::new();
            for &t in output {
                *counts.entry(t).or_default() += 1;
            }
            for (t, c) in counts {
                if let Some(x) = l.get_mut(t as usize) {
                    *x -= p.frequency_penalty * c as f32 + p.presence_penalty;
                }
            }
        }
        std::borrow::Cow::Owned(l)
    }

    /// Picks the next token from `logits`; `position` is the index of the token being
    /// chosen in the sequence; `prompt` and `output` feed the penalties.
    pub fn sample(&self, logits: &[f32], position: usize, prompt: &[u32], output: &[u32]) -> u32 {
        let logits = self.penalize(logits, prompt, output);
        let p = &self.params;
        if p.temperature == 0.0 {
            return argmax(&logits);
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, (((l - max) / p.temperature) as f64).exp()))
            .collect();
        let total: f64 = probs.iter().map(|p| p.1).sum();
        probs.iter_mut().for_each(|p| p.1 /= total);
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut keep = probs.len();
        if p.top_k > 0 {
            keep = keep.min(p.top_k);
        }
        // Smallest prefix whose mass reaches top_p (at least one token).
        let mut mass = 0.0;
        for (i, q) in probs[..keep].iter().enumerate() {
            mass += q.1;
            if mass >= p.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        if p.min_p > 0.0 {
            let floor = probs[0].1 * p.min_p as f64;
            keep = probs[..keep]
                .iter()
                .take_while(|q| q.1 >= floor)
                .count()
                .max(1);
        }
        let probs = &probs[..keep];
        let kept: f64 = probs.iter().map(|p| p.1).sum();
        let r = splitmix64(p.seed ^ splitmix64(position as u64));
        let u = (r >> 11) as f64 / (1u64 << 53) as f64 * kept;
        let mut acc = 0.0;
        for q in probs {
            acc += q.1;
            if u < acc {
                return q.0;
            }
        }
        probs[keep - 1].0
    }
}

/// Index of the largest logit; the first on ties, as torch.argmax.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// The `n` most likely tokens and their log-probabilities, most likely first.
pub fn top_logprobs(logprobs: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<u32> = (0..logprobs.len() as u32).collect();
    let n = n.min(idx.len());
    if n == 0 {
        return vec![];
    }
    idx.select_nth_unstable_by(n - 1, |&a, &b| {
        logprobs[b as usize]
            .total_cmp(&logprobs[a as usize])
            .then(a.cmp(&b))
    });
    let mut top: Vec<(u32, f32)> = idx[..n]
        .iter()
        .map(|&i| (i, logprobs[i as usize]))
        .collect();
    top.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    top
}

/// One row's draw: its sampler, the position of the token being chosen, the tokens
/// the penalties see, and how many top log-probabilities to report.
#[derive(Debug, Clone, Copy)]
pub struct Draw<'a> {
    pub sampler: &'a Sampler,
    pub position: usize,
    pub prompt: &'a [u32],
    pub output: &'a [u32],
    pub top_logprobs: usize,
    /// Structured outputs: the tokens the draw may pick, as bits (bit `t % 32` of word
    /// `t / 32`; tokens past the words are not allowed). `None`: any token.
    pub allowed: Option<&'a [u32]>,
    /// OpenAI's `logit_bias`: added to these tokens' logits before the draw.
    pub bias: &'a [(u32, f32)],
}

/// A drawn token with its log-probability (of the unpenalized logits, as vLLM and
/// OpenAI report) and the most likely tokens', most likely first.
#[derive(Debug, Clone, PartialEq)]
pub struct Drawn {
    pub id: u32,
    pub logprob: f32,
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Log-softmax of a row (f64 accumulation), for reporting logprobs.
pub fn log_softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = row
        .iter()
        .map(|&x| ((x - max) as f64).exp())
        .sum::<f64>()
        .ln() as f32
        + max;
    row.iter().map(|&x| x - lse).collect()
}

/// `row` with every token outside `allowed` at −∞.
fn masked(row: &[f32], allowed: &[u32]) -> Vec<f32> {
    row.iter()
        .enumerate()
        .map(|(t, &x)| {
            let on = allowed.get(t / 32).is_some_and(|w| w >> (t % 32) & 1 == 1);
            if on {
                x
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect()
}

/// One row's draw on the host: its logits biased, and among the allowed tokens when a
/// constraint says which (the log-probabilities reported stay those of the model's own
/// distribution, as OpenAI's).
fn draw_host(row: &[f32], d: &Draw<'_>) -> Drawn {
    let biased;
    let logits = if d.bias.is_empty() {
        row
    } else {
        let mut b = row.to_vec();
        for &(t, x) in d.bias {
            if let Some(l) = b.get_mut(t as usize) {
                *l += x;
            }
        }
        biased = b;
        &biased[..]
    };
    let id = match d.allowed {
        Some(allowed) => d
            .sampler
            .sample(&masked(logits, allowed), d.position, d.prompt, d.output),
        None => d.sampler.sample(logits, d.position, d.prompt, d.output),
    };
    let lp = log_softmax(row);
    Drawn {
        id,
        logprob: lp[id as usize],
        top_logprobs: if d.top_logprobs > 0 {
            top_logprobs(&lp, d.top_logprobs)
        } else {
            Vec::new()
        },
    }
}

impl crate::Tensor {
    /// Draws one token from each row of `[rows, vocab]` logits (`draws[i]` for row `i`).
    pub fn sample_rows(&self, draws: &[Draw<'_>]) -> crate::Result<Vec<Drawn>> {
        let v = self.last_dim();
        if draws.len() != self.rows() || v == 0 {
            return crate::error::shape_err(
                "sample_rows",
                format!("{} draws from logits {:?}", draws.len(), self.shape()),
            );
        }
        #[cfg(feature = "cuda")]
        if let crate::Device::Cuda(_) = self.device() {
            return self.sample_rows_on_gpu(draws);
        }
        let all = self.f32_host()?;
        Ok(all
            .chunks_exact(v)
            .zip(draws)
            .map(|(row, d)| draw_host(row, d))
            .collect())
    }

    /// [`Tensor::sample_rows`] of logits on a GPU: greedy rows without penalties or top
    /// log-probabilities by the argmax kernel, other unpenalized rows by the sampling
    /// kernel (the host sampler's rules, on the device); only ids and log-probabilities
    /// come back. Rows with penalties, and rows whose nucleus reaches past the kernel's
    /// candidates, copy their logits back and draw on the host.
    #[cfg(feature = "cuda")]
    fn sample_rows_on_gpu(&self, draws: &[Draw<'_>]) -> crate::Result<Vec<Drawn>> {
        let plain_greedy = draws.iter().all(|d| {
            d.sampler.params.temperature == 0.0
                && !d.sampler.params.penalized()
                && d.top_logprobs == 0
                && d.allowed.is_none()
                && d.bias.is_empty()
        });
        if plain_greedy {
            let (ids, lps) = crate::cuda::argmax_rows(self)?;
            return Ok(ids
                .into_iter()
                .zip(lps)
                .map(|(id, logprob)| Drawn {
                    id,
                    logprob,
                    top_logprobs: Vec::new(),
                })
                .collect());
        }
        let on_device = crate::cuda::sample_rows(self, draws)?;
        on_device
            .into_iter()
            .zip(draws)
            .enumerate()
            .map(|(r, (drawn, d))| match drawn {
                Some(drawn)
                    if !d.sampler.params.penalized()
                        && d.allowed.is_none()
                        && d.bias.is_empty() =>
                {
                    Ok(drawn)
                }
                _ => {
                    let row = self.narrow_rows(r, 1)?.host_f32()?;
                    Ok(draw_host(&row, d))
                }
            })
            .collect()
    }

    /// The index of each row's largest value (greedy decoding, benchmarks).
    pub fn argmax_rows(&self) -> crate::Result<Vec<u32>> {
        let v = self.last_dim().max(1);
        Ok(self.f32_host()?.chunks_exact(v).map(argmax).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> SamplingParams {
        SamplingParams {
            temperature: 1.0,
            seed: 9,
            ..Default::default()
        }
    }

    #[test]
    fn greedy_top_p_and_determinism() {
        let logits = [0.1, 3.0, 2.9, -1.0];
        assert_eq!(
            Sampler::new(SamplingParams::default()).sample(&logits, 5, &[], &[]),
            1
        );
        let narrow = SamplingParams { top_p: 0.01, ..p() };
        assert_eq!(
            Sampler::new(narrow).sample(&logits, 5, &[], &[]),
            1,
            "top_p keeps only the best"
        );
        let s = Sampler::new(p());
        let draws: Vec<u32> = (0..64)
            .map(|pos| s.sample(&logits, pos, &[], &[]))
            .collect();
        let again: Vec<u32> = (0..64)
            .map(|pos| s.sample(&logits, pos, &[], &[]))
            .collect();
        assert_eq!(draws, again);
        assert!(draws.contains(&1) && draws.contains(&2), "{draws:?}");
        assert!(SamplingParams {
            temperature: -1.0,
            ..p()
        }
        .validate()
        .is_err());
        assert!(SamplingParams { top_p: 0.0, ..p() }.validate().is_err());
        assert!(SamplingParams { min_p: 2.0, ..p() }.validate().is_err());
        assert!(SamplingParams {
            repetition_penalty: 0.0,
            ..p()
        }
        .validate()
        .is_err());
    }

    #[test]
    fn top_k_and_min_p_restrict_the_candidates() {
        let logits = [2.0, 1.9, 1.8, 0.0, -5.0];
        let k1 = Sampler::new(SamplingParams { top_k: 1, ..p() });
        assert!((0..50).all(|pos| k1.sample(&logits, pos, &[], &[]) == 0));
        let k2 = Sampler::new(SamplingParams { top_k: 2, ..p() });
        assert!((0..200).all(|pos| k2.sample(&logits, pos, &[], &[]) <= 1));
        // min_p 0.5: tokens 0, 1, 2 have ≥ half the best's probability; 3 and 4 do not.
        let mp = Sampler::new(SamplingParams { min_p: 0.5, ..p() });
        let draws: Vec<u32> = (0..300)
            .map(|pos| mp.sample(&logits, pos, &[], &[]))
            .collect();
        assert!(draws.iter().all(|&t| t <= 2) && draws.contains(&2));
    }

    #[test]
    fn penalties_follow_hf_and_openai() {
        let logits = [2.0, -1.0, 1.5];
        let rep = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        });
        assert_eq!(&*rep.penalize(&logits, &[0], &[1]), &[1.0, -2.0, 1.5]);
        assert_eq!(
            rep.sample(&logits, 0, &[0], &[]),
            2,
            "the repeated best drops below 1.5"
        );
        let freq = Sampler::new(SamplingParams {
            frequency_penalty: 0.5,
            presence_penalty: 0.25,
            ..Default::default()
        });
        assert_eq!(
            &*freq.penalize(&logits, &[2], &[0, 0]),
            &[0.75, -1.0, 1.5],
            "output only, prompt ignored"
        );
    }

    #[test]
    fn top_logprobs_are_sorted() {
        let lp = [-3.0, -0.5, -2.0, -0.5];
        assert_eq!(top_logprobs(&lp, 3), vec![(1, -0.5), (3, -0.5), (2, -2.0)]);
        assert!(top_logprobs(&lp, 0).is_empty());
        assert_eq!(top_logprobs(&lp, 10).len(), 4);
    }
}
