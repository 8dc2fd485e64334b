//! The block-diffusion network (`NetworkConfig::block_size`, BD3-LM): input `[x_t ; x_0]`, logits
//! for the N noised positions. In f64: B = N gives exactly the plain model's logits on x_t (the
//! clean copy is invisible to the noised half); for any B, block b's logits depend on x_t only
//! through block b and on x_0 only through the blocks before it (bit-exact invariance under
//! changes elsewhere, and a change where it should depend); bad inputs are errors.

use maskdiff_network::dfdx::prelude::*;
use maskdiff_network::{Md4Transformer, NetworkConfig};
use maskdiff_process::DenoiseBatch;
use rand::{rngs::StdRng, Rng, SeedableRng};

fn model(v: usize, block: Option<usize>, time: bool) -> Md4Transformer<f64, Cpu> {
    let mut cfg = NetworkConfig::preset("tiny", v).unwrap();
    cfg.time_conditioning = time;
    cfg.block_size = block;
    let mut m = cfg.init::<f64, Cpu>(&Cpu::default(), 0).unwrap();
    let mut rng = StdRng::seed_from_u64(5);
    for p in m.params_mut() {
        let vals: Vec<f64> = (0..p.numel())
            .map(|_| 0.5 * (rng.gen::<f64>() * 2.0 - 1.0))
            .collect();
        p.value = Cpu::default().tensor_from_vec(vals, (p.numel(),));
    }
    m
}

fn logits(m: &Md4Transformer<f64, Cpu>, ids: &[u32], b: usize, len: usize) -> Vec<f64> {
    let t = vec![0.4; b];
    let batch = DenoiseBatch {
        ids,
        batch: b,
        len,
        t: &t,
        labels: None,
    };
    m.forward(&batch, NoneTape, None).unwrap().as_vec()
}

fn concat(xt: &[u32], x0: &[u32]) -> Vec<u32> {
    xt.iter().chain(x0).copied().collect()
}

#[test]
fn block_size_n_equals_the_plain_model() {
    let (v, n) = (6, 11);
    let mut rng = StdRng::seed_from_u64(1);
    for time in [true, false] {
        let plain = model(v, None, time);
        let block = model(v, Some(n), time);
        let x0: Vec<u32> = (0..2 * n).map(|_| rng.gen_range(0..v as u32)).collect();
        let xt: Vec<u32> = x0
            .iter()
            .map(|&x| if rng.gen_bool(0.5) { v as u32 } else { x })
            .collect();
        let a = logits(&plain, &xt, 2, n);
        let ids: Vec<u32> = (0..2)
            .flat_map(|s| concat(&xt[s * n..(s + 1) * n], &x0[s * n..(s + 1) * n]))
            .collect();
        let b = logits(&block, &ids, 2, 2 * n);
        assert_eq!(a.len(), b.len());
        let err = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(err < 1e-12, "max |Δ| = {err}");
        assert!(a.iter().any(|x| x.abs() > 1e-3));
    }
}

#[test]
fn block_logits_see_their_noised_block_and_earlier_clean_blocks_only() {
    let (v, n, bs) = (5, 10, 3); // blocks {0,1,2} {3,4,5} {6,7,8} {9}
    let m = model(v, Some(bs), true);
    let mut rng = StdRng::seed_from_u64(2);
    let x0: Vec<u32> = (0..n).map(|_| rng.gen_range(0..v as u32)).collect();
    let xt: Vec<u32> = x0
        .iter()
        .map(|&x| if rng.gen_bool(0.5) { v as u32 } else { x })
        .collect();
    let base = logits(&m, &concat(&xt, &x0), 1, 2 * n);
    let row = |l: &[f64], i: usize| l[i * v..(i + 1) * v].to_vec();
    for j in 0..n {
        // change x_t at j (mask ↔ another token) and x_0 at j
        let mut xt2 = xt.clone();
        xt2[j] = if xt[j] == v as u32 {
            (x0[j] + 1) % v as u32
        } else {
            v as u32
        };
        let mut x02 = x0.clone();
        x02[j] = (x0[j] + 1) % v as u32;
        let a = logits(&m, &concat(&xt2, &x0), 1, 2 * n);
        let c = logits(&m, &concat(&xt, &x02), 1, 2 * n);
        for i in 0..n {
            let same_block = i / bs == j / bs;
            let earlier = j / bs < i / bs;
            assert_eq!(
                row(&a, i) == row(&base, i),
                !same_block,
                "x_t[{j}] vs logits[{i}]"
            );
            assert_eq!(
                row(&c, i) == row(&base, i),
                !earlier,
                "x_0[{j}] vs logits[{i}]"
            );
        }
    }
}

#[test]
fn block_input_errors() {
    let (v, n) = (5, 4);
    let m = model(v, Some(2), true);
    let t = [0.5];
    let run = |ids: &[u32], len: usize| {
        m.forward(
            &DenoiseBatch {
                ids,
                batch: 1,
                len,
                t: &t,
                labels: None,
            },
            NoneTape,
            None,
        )
    };
    // odd length, a mask in the clean half, too long
    assert!(run(&[0, 1, 2], 3).is_err());
    assert!(run(&[5, 5, 5, 5, 0, 1, 5, 2], 2 * n).is_err());
    let long = vec![0u32; 2 * 65];
    assert!(run(&long, 2 * 65).is_err());
    assert_eq!(
        *run(&[5, 5, 5, 5, 0, 1, 2, 3], 2 * n).unwrap().shape(),
        (1, n, v)
    );
}
