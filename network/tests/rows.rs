//! The row-restricted forward (`log_probs_rows`: the last block's queries, attention output,
//! FFN, final norm and output layer only at the requested positions) against the rows of the
//! full forward, on random weights: time-conditioned, time-free, class-conditional, with an
//! embedding projection, odd lengths and head counts, f64, f32 and bf16 products; bad row
//! requests are errors. The training forward at selected rows (`forward_at`: every query
//! attends, the last block's output projection, FFN, final norm and output layer run at the
//! rows a loss reads) against the full forward, logits and every parameter's gradient, with
//! dropout; and the tabled forward (embedding and block 0's attention input per token id, or
//! per sequence and token id) against the per-position one, logits and gradients.

use maskdiff_network::dfdx::prelude::*;
use maskdiff_network::{
    with_precision, Elem, Kernels, Md4Transformer, Network, NetworkConfig, NetworkError, Precision,
};
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

/// `log_probs` (inference: embedding and block 0's q/k/v projections computed per token id, or
/// per sequence and token id, and gathered) equals the log-softmax of `forward_per_position`'s
/// logits on random weights, time-free and conditioned, with and without an embedding
/// projection.
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
        let want = m
            .forward_per_position(&batch, NoneTape, None)
            .unwrap()
            .as_vec();
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

/// Largest relative difference |a − b| / (1 + |b|) over two equally long lists.
fn rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
        .fold(0.0, f64::max)
}

/// A loss Σ R ⊙ logits of one forward pass (`run`, dropout drawn from one fixed seed): the
/// logits and every parameter's gradient, as f64.
type Run<'a, E> =
    &'a dyn Fn(OwnedTape<E, Cpu>, &mut StdRng) -> Tensor<(usize, usize), E, Cpu, OwnedTape<E, Cpu>>;

fn logits_and_grads<E: Elem>(
    m: &Md4Transformer<E, Cpu>,
    run: Run<'_, E>,
    r: &[f64],
) -> (Vec<f64>, Vec<Vec<f64>>)
where
    Cpu: Kernels<E>,
{
    let host = |t: Vec<E>| {
        t.into_iter()
            .map(|x| x.to_f64().unwrap())
            .collect::<Vec<f64>>()
    };
    let l = run(m.tape(), &mut StdRng::seed_from_u64(7));
    let vals = host(l.retaped::<NoneTape>().as_vec());
    let r = Cpu::default().tensor_from_vec(r.iter().map(|&x| E::c(x)).collect(), *l.shape());
    let g = (l * r).sum::<Rank0, _>().backward();
    let grads = m
        .params()
        .iter()
        .map(|p| host(g.get(&p.value).as_vec()))
        .collect();
    (vals, grads)
}

/// (logit difference, gradient difference, largest |gradient|) of two runs' results.
fn differences(a: (Vec<f64>, Vec<Vec<f64>>), b: (Vec<f64>, Vec<Vec<f64>>)) -> [f64; 3] {
    let gmax = b.1.iter().flatten().fold(0.0f64, |acc, x| acc.max(x.abs()));
    let gd =
        a.1.iter()
            .zip(&b.1)
            .map(|(x, y)| rel(x, y))
            .fold(0.0, f64::max);
    [rel(&a.0, &b.0), gd, gmax]
}

/// `forward_at(rows)` against the full forward's rows, for the loss Σ_rows R ⊙ logits.
fn compare<E: Elem>(
    m: &Md4Transformer<E, Cpu>,
    batch: &DenoiseBatch<'_>,
    rows: &[usize],
) -> [f64; 3]
where
    Cpu: Kernels<E>,
{
    let v = m.config().vocab_size;
    let mut rng = StdRng::seed_from_u64(99);
    let r: Vec<f64> = (0..rows.len() * v)
        .map(|_| rng.gen::<f64>() - 0.5)
        .collect();
    let full = |tape: OwnedTape<E, Cpu>, d: &mut StdRng| {
        let l = m.forward(batch, tape, Some(d)).unwrap();
        let (b, n, v) = *l.shape();
        let ids = Cpu::default().tensor_from_vec(rows.to_vec(), (rows.len(),));
        l.reshape_like(&(b * n, v)).gather(ids)
    };
    let at =
        |tape: OwnedTape<E, Cpu>, d: &mut StdRng| m.forward_at(batch, tape, Some(d), rows).unwrap();
    differences(logits_and_grads(m, &at, &r), logits_and_grads(m, &full, &r))
}

#[test]
fn forward_at_rows_equals_the_full_forward_with_gradients() {
    let dev = Cpu::default();
    let cases: Vec<(&str, NetworkConfig, usize, usize)> = vec![
        (
            "time-conditioned, dropout",
            config(|c| c.dropout = 0.3),
            4,
            12,
        ),
        (
            "time-free, dropout, odd length",
            config(|c| {
                c.time_conditioning = false;
                c.dropout = 0.3;
            }),
            3,
            9,
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
            3,
            10,
        ),
        ("one layer", config(|c| c.n_layers = 1), 2, 8),
        ("block diffusion", config(|c| c.block_size = Some(4)), 2, 16),
    ];
    for (k, (name, cfg, b, n)) in cases.into_iter().enumerate() {
        let mut rng = StdRng::seed_from_u64(k as u64);
        let block = cfg.block_size.is_some();
        let n_out = if block { n / 2 } else { n };
        let ids: Vec<u32> = (0..b)
            .flat_map(|_| {
                let xt: Vec<u32> = (0..n_out).map(|_| rng.gen_range(0..=7u32)).collect();
                let x0: Vec<u32> = (0..n - n_out).map(|_| rng.gen_range(0..7u32)).collect();
                [xt, x0].concat()
            })
            .collect();
        let t: Vec<f64> = (0..b).map(|i| (i as f64 + 0.5) / b as f64).collect();
        let labels: Vec<u32> = (0..b as u32).map(|i| i % 3).collect();
        let batch = DenoiseBatch {
            ids: &ids,
            batch: b,
            len: n,
            t: &t,
            labels: (cfg.num_classes > 0).then_some(&labels[..]),
        };
        // scattered rows, a sequence with none, the last row of the batch
        let mut rows: Vec<usize> = (0..b * n_out)
            .filter(|r| r / n_out != 1 && rng.gen::<f64>() < 0.4)
            .collect();
        if rows.last() != Some(&(b * n_out - 1)) {
            rows.push(b * n_out - 1);
        }
        let mut m64 = cfg.init::<f64, Cpu>(&dev, 1).unwrap();
        randomise(&mut m64, 10 + k as u64, 0.5);
        let [dl, dg, gmax] = compare(&m64, &batch, &rows);
        assert!(
            gmax > 0.05,
            "{name}: gradients too small to compare: {gmax}"
        );
        assert!(
            dl <= 1e-12 && dg <= 1e-12,
            "{name}, f64: logits {dl}, gradients {dg}"
        );
        let mut m32 = cfg.init::<f32, Cpu>(&dev, 1).unwrap();
        randomise(&mut m32, 10 + k as u64, 0.5);
        let [dl, dg, _] = compare(&m32, &batch, &rows);
        assert!(
            dl <= 1e-5 && dg <= 1e-4,
            "{name}, f32: logits {dl}, gradients {dg}"
        );
        // the enum the trainer holds takes the same path
        let net: Network<f32, Cpu> = m32.clone().into();
        let a = net
            .forward_at(&batch, NoneTape, None, &rows)
            .unwrap()
            .as_vec();
        let b2 = m32
            .forward_at(&batch, NoneTape, None, &rows)
            .unwrap()
            .as_vec();
        assert_eq!(a, b2, "{name}");
    }
}

#[test]
fn bad_rows_are_errors() {
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
    for rows in [vec![], vec![3, 2], vec![1, 1], vec![0, 12]] {
        let r = m.forward_at(&batch, NoneTape, None, &rows);
        assert!(matches!(r, Err(NetworkError::Input(_))), "{rows:?}");
    }
}

/// The tabled `forward` (embedding and block 0's attention input per token id, or per
/// sequence and token id) against `forward_per_position`, for the loss Σ R ⊙ logits.
fn compare_tables<E: Elem>(m: &Md4Transformer<E, Cpu>, batch: &DenoiseBatch<'_>) -> [f64; 3]
where
    Cpu: Kernels<E>,
{
    let rows = batch.batch * batch.len;
    let v = m.config().vocab_size;
    let mut rng = StdRng::seed_from_u64(98);
    let r: Vec<f64> = (0..rows * v).map(|_| rng.gen::<f64>() - 0.5).collect();
    let tabled = |tape: OwnedTape<E, Cpu>, d: &mut StdRng| {
        let l = m.forward(batch, tape, Some(d)).unwrap();
        l.reshape_like(&(rows, v))
    };
    let per_position = |tape: OwnedTape<E, Cpu>, d: &mut StdRng| {
        let l = m.forward_per_position(batch, tape, Some(d)).unwrap();
        l.reshape_like(&(rows, v))
    };
    differences(
        logits_and_grads(m, &tabled, &r),
        logits_and_grads(m, &per_position, &r),
    )
}

#[test]
fn tabled_forward_equals_the_per_position_forward_with_gradients() {
    let dev = Cpu::default();
    let cases: Vec<(&str, NetworkConfig, usize, usize)> = vec![
        (
            "time-conditioned, per-sequence table",
            config(|c| c.dropout = 0.3),
            3,
            12,
        ),
        (
            "class-conditional, embedding projection",
            config(|c| {
                c.num_classes = 3;
                c.embed_dim = Some(5);
            }),
            3,
            11,
        ),
        (
            "time-free, dropout",
            config(|c| {
                c.time_conditioning = false;
                c.dropout = 0.3;
            }),
            3,
            9,
        ),
        ("conditioned, shorter than the table", config(|_| {}), 4, 6),
        ("conditioned, one layer", config(|c| c.n_layers = 1), 2, 10),
    ];
    for (k, (name, cfg, b, n)) in cases.into_iter().enumerate() {
        let mut rng = StdRng::seed_from_u64(40 + k as u64);
        let ids: Vec<u32> = (0..b * n).map(|_| rng.gen_range(0..=7u32)).collect();
        let t: Vec<f64> = (0..b).map(|i| (i as f64 + 0.3) / b as f64).collect();
        let labels: Vec<u32> = (0..b as u32).map(|i| i % 3).collect();
        let batch = DenoiseBatch {
            ids: &ids,
            batch: b,
            len: n,
            t: &t,
            labels: (cfg.num_classes > 0).then_some(&labels[..]),
        };
        let mut m64 = cfg.init::<f64, Cpu>(&dev, 1).unwrap();
        randomise(&mut m64, 50 + k as u64, 0.5);
        let [dl, dg, gmax] = compare_tables(&m64, &batch);
        assert!(
            gmax > 0.05,
            "{name}: gradients too small to compare: {gmax}"
        );
        assert!(
            dl <= 1e-12 && dg <= 1e-12,
            "{name}, f64: logits {dl}, gradients {dg}"
        );
        let mut m32 = cfg.init::<f32, Cpu>(&dev, 1).unwrap();
        randomise(&mut m32, 50 + k as u64, 0.5);
        let [dl, dg, _] = compare_tables(&m32, &batch);
        assert!(
            dl <= 1e-5 && dg <= 1e-4,
            "{name}, f32: logits {dl}, gradients {dg}"
        );
    }
}
