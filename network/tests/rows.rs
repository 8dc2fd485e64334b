//! The row-restricted forward (`log_probs_rows`: the last block's queries, attention output,
//! FFN, final norm and output layer only at the requested positions) against the rows of the
//! full forward, on random weights: time-conditioned, time-free, class-conditional, with an
//! embedding projection, odd lengths and head counts, f64, f32 and bf16 products; bad row
//! requests are errors.

use maskdiff_network::dfdx::prelude::*;
use maskdiff_network::{with_precision, Kernels, Md4Transformer, NetworkConfig, Precision};
use maskdiff_process::DenoiseBatch;
use rand::{rngs::StdRng, Rng, SeedableRng};

fn randomise<E: maskdiff_network::Elem>(m: &mut Md4Transformer<E, Cpu>, seed: u64, sigma: f64)
where
    Cpu: Kernels<E>,
{
    let mut rng = StdRng::seed_from_u64(seed);
    for p in m.params_mut() {
        let dev = p.value.device().clone();
        let vals: Vec<E> = (0..p.numel())
            .map(|_| E::c(sigma * (rng.gen::<f64>() * 2.0 - 1.0) * 1.7))
            .collect();
        p.value = dev.tensor_from_vec(vals, (p.numel(),));
    }
}

/// Row requests covering the edge cases: no row, one row, every row, scattered rows.
fn requests(rng: &mut StdRng, b: usize, n: usize) -> Vec<Vec<usize>> {
    (0..b)
        .map(|i| match i % 4 {
            0 => vec![],
            1 => vec![n - 1],
            2 => (0..n).collect(),
            _ => (0..n).filter(|_| rng.gen::<f64>() < 0.3).collect(),
        })
        .collect()
}

/// Largest |row-restricted − full| / (1 + |full|) over the requested rows, after checking the
/// layout.
fn max_diff<E: maskdiff_network::Elem>(
    m: &Md4Transformer<E, Cpu>,
    batch: &DenoiseBatch<'_>,
    rows: &[Vec<usize>],
) -> f64
where
    Cpu: Kernels<E>,
{
    let full = m.log_probs(batch).unwrap();
    let got = m.log_probs_rows(batch, rows).unwrap();
    assert_eq!(got.batch(), batch.batch);
    assert_eq!(got.positions, rows.concat());
    assert_eq!(got.data.len(), got.positions.len() * full.vocab);
    let mut worst = 0.0f64;
    let mut spread = 0.0f64;
    for (b, r) in rows.iter().enumerate() {
        for &n in r {
            for (x, y) in got.find(b, n).unwrap().iter().zip(full.row(b, n)) {
                worst = worst.max(f64::from((x - y).abs()) / (1.0 + f64::from(y.abs())));
                spread = spread.max(f64::from(y.abs()));
            }
        }
    }
    assert!(
        rows.iter().all(Vec::is_empty) || spread > 0.3,
        "outputs not spread: {spread}"
    );
    worst
}

fn config(f: impl FnOnce(&mut NetworkConfig)) -> NetworkConfig {
    let mut c = NetworkConfig::preset("tiny", 7).unwrap();
    f(&mut c);
    c
}

#[test]
fn row_forward_equals_the_full_forward_rows() {
    let dev = Cpu::default();
    let cases: Vec<(&str, NetworkConfig, usize, usize)> = vec![
        ("time-conditioned", config(|_| {}), 4, 12),
        (
            "time-free, odd length",
            config(|c| c.time_conditioning = false),
            5,
            7,
        ),
        (
            "class-conditional, embedding projection",
            config(|c| {
                c.num_classes = 3;
                c.embed_dim = Some(5);
            }),
            4,
            9,
        ),
        (
            "three heads, three layers, time-free",
            config(|c| {
                c.time_conditioning = false;
                c.dim = 24;
                c.n_heads = 3;
                c.n_layers = 3;
            }),
            4,
            13,
        ),
    ];
    for (k, (name, cfg, b, n)) in cases.into_iter().enumerate() {
        let mut rng = StdRng::seed_from_u64(k as u64);
        let ids: Vec<u32> = (0..b * n).map(|_| rng.gen_range(0..=7u32)).collect();
        let t: Vec<f64> = (0..b).map(|i| (i as f64 + 0.5) / b as f64).collect();
        let labels: Vec<u32> = (0..b as u32).map(|i| i % 3).collect();
        let batch = DenoiseBatch {
            ids: &ids,
            batch: b,
            len: n,
            t: &t,
            labels: (cfg.num_classes > 0).then_some(&labels[..]),
        };
        let rows = requests(&mut rng, b, n);
        let mut m32 = cfg.init::<f32, Cpu>(&dev, 1).unwrap();
        randomise(&mut m32, 10 + k as u64, 0.5);
        let d = max_diff(&m32, &batch, &rows);
        assert!(d <= 1e-6, "{name}, f32: {d}");
        let d = with_precision(Precision::Bf16, || max_diff(&m32, &batch, &rows));
        assert!(d <= 1e-5, "{name}, bf16 products: {d}");
        let mut m64 = cfg.init::<f64, Cpu>(&dev, 1).unwrap();
        randomise(&mut m64, 10 + k as u64, 0.5);
        // f64: the same function to rounding (the output is narrowed to f32 at the end)
        let d = max_diff(&m64, &batch, &rows);
        assert!(d <= 1e-7, "{name}, f64: {d}");
        // only empty requests: no rows, no forward
        let none = vec![Vec::new(); b];
        let got = m32.log_probs_rows(&batch, &none).unwrap();
        assert!(got.data.is_empty() && got.offsets == vec![0; b + 1]);
    }
}

#[test]
fn block_diffusion_models_select_from_the_full_forward() {
    let dev = Cpu::default();
    let cfg = config(|c| c.block_size = Some(4));
    let mut m = cfg.init::<f32, Cpu>(&dev, 1).unwrap();
    randomise(&mut m, 5, 0.5);
    let mut rng = StdRng::seed_from_u64(5);
    let (b, n) = (2, 8);
    // x_t (may hold masks) then x_0 (no mask)
    let ids: Vec<u32> = (0..b)
        .flat_map(|_| {
            let xt: Vec<u32> = (0..n).map(|_| rng.gen_range(0..=7u32)).collect();
            let x0: Vec<u32> = (0..n).map(|_| rng.gen_range(0..7u32)).collect();
            [xt, x0].concat()
        })
        .collect();
    let batch = DenoiseBatch {
        ids: &ids,
        batch: b,
        len: 2 * n,
        t: &[0.3, 0.8],
        labels: None,
    };
    let full = m.log_probs(&batch).unwrap();
    let rows = vec![vec![1, 6], vec![0, 2, 3]];
    let got = m.log_probs_rows(&batch, &rows).unwrap();
    for (bi, r) in rows.iter().enumerate() {
        for &p in r {
            assert_eq!(got.find(bi, p).unwrap(), full.row(bi, p));
        }
    }
}

#[test]
fn bad_row_requests_are_errors() {
    let dev = Cpu::default();
    let m = config(|_| {}).init::<f32, Cpu>(&dev, 1).unwrap();
    let ids = vec![7u32; 2 * 6];
    let batch = DenoiseBatch {
        ids: &ids,
        batch: 2,
        len: 6,
        t: &[0.5, 0.5],
        labels: None,
    };
    for rows in [
        vec![vec![0]],            // one list for two sequences
        vec![vec![2, 1], vec![]], // not increasing
        vec![vec![1, 1], vec![]], // repeated
        vec![vec![], vec![6]],    // beyond the length
    ] {
        assert!(m.log_probs_rows(&batch, &rows).is_err(), "{rows:?}");
    }
}

/// `log_probs` (inference: embedding and, time-free, block 0's q/k/v projections computed per
/// token id and gathered) equals the log-softmax of `forward`'s logits (computed per position)
/// on random weights, time-free and conditioned, with and without an embedding projection.
#[test]
fn token_table_forward_equals_the_per_position_forward() {
    let dev = Cpu::default();
    let cases = [
        config(|c| c.time_conditioning = false),
        config(|c| {
            c.time_conditioning = false;
            c.embed_dim = Some(6);
        }),
        config(|c| {
            c.time_conditioning = false;
            c.n_layers = 1;
        }),
        config(|c| c.embed_dim = Some(6)),
    ];
    for (k, cfg) in cases.into_iter().enumerate() {
        let mut rng = StdRng::seed_from_u64(20 + k as u64);
        let (b, n) = (3, 11);
        let ids: Vec<u32> = (0..b * n).map(|_| rng.gen_range(0..=7u32)).collect();
        let batch = DenoiseBatch {
            ids: &ids,
            batch: b,
            len: n,
            t: &[0.1, 0.5, 0.9],
            labels: None,
        };
        let mut m = cfg.init::<f32, Cpu>(&dev, 1).unwrap();
        randomise(&mut m, 30 + k as u64, 0.5);
        let want = m.forward(&batch, NoneTape, None).unwrap().as_vec();
        let got = m.log_probs(&batch).unwrap();
        for (row, g) in want.chunks(7).zip(got.data.chunks(7)) {
            let mx = row
                .iter()
                .fold(f64::NEG_INFINITY, |a, &x| a.max(f64::from(x)));
            let lse = mx
                + row
                    .iter()
                    .map(|&x| (f64::from(x) - mx).exp())
                    .sum::<f64>()
                    .ln();
            for (&x, &y) in row.iter().zip(g) {
                let w = f64::from(x) - lse;
                assert!(
                    (f64::from(y) - w).abs() <= 1e-6 * (1.0 + w.abs()),
                    "case {k}: {y} vs {w}"
                );
            }
        }
        // and the row-restricted forward on top of it (block 0 from the table, last block rows)
        let rows = vec![vec![0, 5], vec![], vec![10]];
        let r = m.log_probs_rows(&batch, &rows).unwrap();
        for (bi, ps) in rows.iter().enumerate() {
            for &p in ps {
                assert_eq!(r.find(bi, p).unwrap(), got.row(bi, p), "case {k}");
            }
        }
    }
}
