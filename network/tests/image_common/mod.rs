//! Helpers shared by the image networks' tests (`tests/unet.rs`, `tests/uvit.rs`).

use maskdiff_network::dfdx::prelude::*;
use maskdiff_network::{Elem, Kernels, Network, NetworkConfig, NetworkDenoiser};
use maskdiff_process::{DenoiseBatch, Denoiser};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// The `preset` network with V levels on h × w × c images.
pub fn image_config(preset: &str, v: usize, (h, w, c): (usize, usize, usize)) -> NetworkConfig {
    let mut cfg = NetworkConfig::preset(preset, v).unwrap();
    cfg.set_image(h, w, c).unwrap();
    cfg
}

/// n token ids uniform over the V levels and the mask token V.
pub fn random_ids(rng: &mut StdRng, n: usize, v: usize) -> Vec<u32> {
    (0..n).map(|_| rng.gen_range(0..=v as u32)).collect()
}

/// Replace every parameter value, in parameter order, by `draw(rng)`.
pub fn randomize<E: Elem>(
    m: &mut Network<E, Cpu>,
    rng: &mut StdRng,
    mut draw: impl FnMut(&mut StdRng) -> E,
) where
    Cpu: Kernels<E>,
{
    let dev = Cpu::default();
    for p in m.params_mut() {
        let vals: Vec<E> = (0..p.numel()).map(|_| draw(rng)).collect();
        p.value = dev.tensor_from_vec(vals, (p.numel(),));
    }
}

/// Builds the network of `cfg` (f64, V = 4, batch 2 of n = h·w·c tokens, random parameters),
/// and checks the tape gradient of a random linear functional of the logits against central
/// finite differences at two random entries of every parameter tensor; returns how many
/// entries it checked.
pub fn gradients_match_central_differences(cfg: NetworkConfig, n: usize, classes: usize) -> usize {
    let dev = Cpu::default();
    let mut m = Network::<f64, Cpu>::new(cfg, &dev, 3).unwrap();
    let mut rng = StdRng::seed_from_u64(11);
    randomize(&mut m, &mut rng, |r| 0.6 * (r.gen::<f64>() * 2.0 - 1.0));
    let (b, v) = (2, 4);
    let ids = random_ids(&mut rng, b * n, v);
    let r: Vec<f64> = (0..b * n * v).map(|_| rng.gen::<f64>() - 0.5).collect();
    let labels = [1u32, 0];
    let batch = DenoiseBatch {
        ids: &ids,
        batch: b,
        len: n,
        t: &[0.3, 0.8],
        labels: (classes > 0).then_some(&labels[..]),
    };
    let rt = dev.tensor_from_vec(r.clone(), (b, n, v));
    let f = |m: &Network<f64, Cpu>| -> f64 {
        let l = m.forward(&batch, NoneTape, None).unwrap().as_vec();
        l.iter().zip(&r).map(|(a, b)| a * b).sum()
    };
    let logits = m.forward(&batch, m.tape(), None).unwrap();
    let grads = (logits * rt).sum::<Rank0, _>().backward();
    let h = 1e-5;
    let mut checked = 0;
    let np = m.params().len();
    for pi in 0..np {
        let g = grads.get(&m.params()[pi].value).as_vec();
        let base = m.params()[pi].value.as_vec();
        for _ in 0..2 {
            let j = rng.gen_range(0..base.len());
            let eval = |delta: f64| {
                let mut mm = m.clone();
                let mut vals = base.clone();
                vals[j] += delta;
                mm.params_mut()[pi].value = dev.tensor_from_vec(vals, (base.len(),));
                f(&mm)
            };
            let fd = (eval(h) - eval(-h)) / (2.0 * h);
            let err = (fd - g[j]).abs();
            assert!(
                err <= 1e-6 * (1.0 + fd.abs()),
                "{} [{j}]: tape {} vs fd {fd}",
                m.params()[pi].name,
                g[j]
            );
            checked += 1;
        }
    }
    checked
}

/// A fresh network of `cfg` (V = 7, n tokens a sequence, built with time conditioning and
/// `classes` as given) outputs all-zero logits, hence exactly uniform log-probabilities, and
/// its denoiser reports its conditioning.
pub fn fresh_predicts_uniform_exactly(
    cfg: NetworkConfig,
    n: usize,
    (time, classes): (bool, usize),
) {
    let dev = Cpu::default();
    let m = Network::<f32, Cpu>::new(cfg, &dev, 7).unwrap();
    let mut rng = StdRng::seed_from_u64(1);
    let ids = random_ids(&mut rng, 3 * n, 7);
    let labels = [0u32, 1, 1];
    let batch = DenoiseBatch {
        ids: &ids,
        batch: 3,
        len: n,
        t: &[0.1, 0.5, 0.99],
        labels: (classes > 0).then_some(&labels[..]),
    };
    let logits = m.forward(&batch, NoneTape, None).unwrap();
    assert_eq!(*logits.shape(), (3, n, 7));
    assert!(logits.as_vec().iter().all(|&x| x == 0.0));
    let mut den = NetworkDenoiser::new(m);
    let lp = den.log_probs(&batch).unwrap();
    let target = -(7f32).ln();
    assert!(lp.data.iter().all(|&x| (x - target).abs() < 1e-6));
    assert_eq!(den.is_time_conditioned(), time);
    assert_eq!(den.num_classes(), classes);
}

/// A 2 × 2 × 1 image network with V = 5 (mask id 5), unconditional: a batch of the wrong token
/// count or an id above the mask is an input error, t outside [0, 1] and stray labels too; a
/// well-formed batch runs.
pub fn bad_inputs_are_errors(cfg: NetworkConfig) {
    use maskdiff_network::NetworkError;
    let m = Network::<f32, Cpu>::new(cfg, &Cpu::default(), 0).unwrap();
    let batch = |ids: &'static [u32], t: &'static [f64], labels| DenoiseBatch {
        ids,
        batch: 1,
        len: ids.len(),
        t,
        labels,
    };
    let run = |ids, t, labels| {
        m.forward(&batch(ids, t, labels), NoneTape, None)
            .map(|_| ())
    };
    assert!(matches!(
        run(&[0, 1, 2], &[0.5], None),
        Err(NetworkError::Input(_))
    ));
    assert!(matches!(
        run(&[0, 1, 2, 6], &[0.5], None),
        Err(NetworkError::Process(_))
    ));
    assert!(matches!(
        run(&[0, 1, 2, 5], &[1.5], None),
        Err(NetworkError::Input(_))
    ));
    assert!(matches!(
        run(&[0, 1, 2, 5], &[0.5], Some(&[0])),
        Err(NetworkError::Input(_))
    ));
    assert!(run(&[0, 1, 2, 5], &[0.5], None).is_ok());
}
