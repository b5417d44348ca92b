//! What the examples share.
use std::time::Instant;

/// The fastest of `reps` runs (after one to warm up): on a shared machine the minimum
/// is the stable figure.
pub fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}
