//! Token choice: greedy at temperature 0, else temperature + nucleus (top-p, Holtzman
//! et al., 2019). Each draw derives from (seed, position) alone, so a request gives the
//! same tokens batched or alone, and resumed from any point.

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
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
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
}

/// SplitMix64: a well-mixed u64 from any u64.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Sampler {
        Sampler { params }
    }

    /// Picks the next token from `logits`; `position` is the index of the token being
    /// chosen in the sequence.
    pub fn sample(&self, logits: &[f32], position: usize) -> u32 {
        if self.params.temperature == 0.0 {
            return argmax(logits);
        }
        let t = self.params.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, (((l - max) / t) as f64).exp()))
            .collect();
        let total: f64 = probs.iter().map(|p| p.1).sum();
        probs.iter_mut().for_each(|p| p.1 /= total);
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        // Keep the smallest prefix whose mass reaches top_p (at least one token).
        let mut mass = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            mass += p.1;
            if mass >= self.params.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        let probs = &probs[..keep];
        let kept: f64 = probs.iter().map(|p| p.1).sum();
        let r = splitmix64(self.params.seed ^ splitmix64(position as u64));
        let u = (r >> 11) as f64 / (1u64 << 53) as f64 * kept;
        let mut acc = 0.0;
        for p in probs {
            acc += p.1;
            if u < acc {
                return p.0;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_top_p_and_determinism() {
        let logits = [0.1, 3.0, 2.9, -1.0];
        assert_eq!(
            Sampler::new(SamplingParams::default()).sample(&logits, 5),
            1
        );
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.01,
            seed: 9,
        };
        assert_eq!(
            Sampler::new(p).sample(&logits, 5),
            1,
            "top_p keeps only the best"
        );
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            seed: 9,
        };
        let s = Sampler::new(p);
        let draws: Vec<u32> = (0..64).map(|pos| s.sample(&logits, pos)).collect();
        let again: Vec<u32> = (0..64).map(|pos| s.sample(&logits, pos)).collect();
        assert_eq!(draws, again);
        assert!(draws.contains(&1) && draws.contains(&2), "{draws:?}");
        assert!(SamplingParams {
            temperature: -1.0,
            ..p
        }
        .validate()
        .is_err());
        assert!(SamplingParams { top_p: 0.0, ..p }.validate().is_err());
    }
}
