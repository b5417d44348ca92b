//! Several sequences decoded together in one forward pass give what each gives alone.

use iris_e2e::fixture;
use iris_engine::argmax;
use iris_models::llava::Llava;

#[test]
fn batched_greedy_decode_equals_alone() {
    let m = Llava::load(&fixture("llava-tiny-model-f32"), None, iris_comm::single()).unwrap();
    let lm = m.llama().unwrap();
    let prompts: [&[u32]; 4] = [
        &[1, 5, 9, 40],
        &[1, 77],
        &[1, 3, 3, 3, 3, 3, 200],
        &[1, 120, 5],
    ];
    let steps = 8;
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let mut cache = lm.new_cache();
            let mut h = lm.forward(&lm.embed(p).unwrap(), &mut cache).unwrap();
            (0..steps)
                .map(|_| {
                    let l = lm.logits(&h.narrow_rows(h.rows() - 1, 1).unwrap()).unwrap();
                    let t = argmax(&l.to_f32_vec());
                    h = lm.forward(&lm.embed(&[t]).unwrap(), &mut cache).unwrap();
                    t
                })
                .collect()
        })
        .collect();
    // Together: prefill all prompts in one batch, then decode all in lock-step.
    let mut caches: Vec<_> = prompts.iter().map(|_| lm.new_cache()).collect();
    let embeds: Vec<_> = prompts.iter().map(|p| lm.embed(p).unwrap()).collect();
    let mut refs: Vec<_> = caches.iter_mut().collect();
    let mut hidden = lm
        .forward_batch(&embeds.iter().collect::<Vec<_>>(), &mut refs)
        .unwrap();
    let mut together = vec![Vec::new(); prompts.len()];
    for _ in 0..steps {
        let next: Vec<u32> = hidden
            .iter()
            .map(|h| {
                argmax(
                    &lm.logits(&h.narrow_rows(h.rows() - 1, 1).unwrap())
                        .unwrap()
                        .to_f32_vec(),
                )
            })
            .collect();
        for (out, &t) in together.iter_mut().zip(&next) {
            out.push(t);
        }
        let embeds: Vec<_> = next.iter().map(|&t| lm.embed(&[t]).unwrap()).collect();
        let mut refs: Vec<_> = caches.iter_mut().collect();
        hidden = lm
            .forward_batch(&embeds.iter().collect::<Vec<_>>(), &mut refs)
            .unwrap();
    }
    assert_eq!(together, alone);
}
