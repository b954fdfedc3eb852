//! Hopper (sm_90a) primitives of the sm90 prefill main loop (issue 14), each against the CPU.

use attnforge::kv::DType;
use attnforge::testing::hopper::{run_wgmma_probe, Probe};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One warpgroup's four m64n64k16 MMAs (`templates/common/wgmma.cuh`) against an f64 product
/// of the same rounded inputs, for f16 and bf16: C = A · Bᵀ from two K-major swizzled shared
/// tiles (Q · Kᵀ), and C = A · B with A from registers and B MN-major in shared memory (P · V)
/// — the descriptor encodings, the swizzle, the K-step advance, the register fragments and the
/// accumulator layout all have to be right for every element to match.
pub(crate) fn the_wgmma_probe_matches_a_cpu_matmul() {
    let e = super::engine();
    let mut rng = StdRng::seed_from_u64(14);
    for dtype in [DType::Bf16, DType::F16] {
        let draw = |rng: &mut StdRng| -> (Vec<u16>, Vec<f64>) {
            (0..64 * 64)
                .map(|_| {
                    let x: f32 = rng.random_range(-2.0..2.0);
                    match dtype {
                        DType::Bf16 => {
                            let h = bf16::from_f32(x);
                            (h.to_bits(), f64::from(h.to_f32()))
                        }
                        _ => {
                            let h = f16::from_f32(x);
                            (h.to_bits(), f64::from(h.to_f32()))
                        }
                    }
                })
                .unzip()
        };
        let (a, af) = draw(&mut rng);
        let (b, bf) = draw(&mut rng);
        // The worst |Δ| of a probe's C against A · Bᵀ (`transposed`) or A · B, and where.
        let worst = |c: &[f32], transposed: bool| {
            let mut worst = (0.0f64, 0usize);
            for i in 0..64 {
                for j in 0..64 {
                    let want: f64 = (0..64).map(|k| af[i * 64 + k] * if transposed { bf[j * 64 + k] } else { bf[k * 64 + j] }).sum();
                    let err = (f64::from(c[i * 64 + j]) - want).abs();
                    if err > worst.0 || err.is_nan() {
                        worst = (if err.is_nan() { f64::INFINITY } else { err }, i * 64 + j);
                    }
                }
            }
            worst
        };
        // f32 accumulation of 64 products of magnitude <= 4: a wrong layout is off by O(1).
        let c = run_wgmma_probe(&e, Probe::QkT, dtype, &a, &b).unwrap();
        let (err, at) = worst(&c, true);
        eprintln!("wgmma Q·Kᵀ probe {}: max |Δ| {err:.2e} at row {} col {}", dtype.name(), at / 64, at % 64);
        assert!(err < 1e-3, "Q·Kᵀ {}: C[{}][{}] = {} off by {err}", dtype.name(), at / 64, at % 64, c[at]);
        let (b128, bf128) = {
            let (x, y): (Vec<u16>, Vec<f64>) = (0..2).map(|_| draw(&mut rng)).fold((Vec::new(), Vec::new()), |(mut x, mut y), (a, b)| {
                x.extend(a);
                y.extend(b);
                (x, y)
            });
            (x, y)
        };
        let c = run_wgmma_probe(&e, Probe::QkT128, dtype, &a, &b128).unwrap();
        let mut worst128 = (0.0f64, 0usize);
        for i in 0..64 {
            for j in 0..128 {
                let want: f64 = (0..64).map(|k| af[i * 64 + k] * bf128[j * 64 + k]).sum();
                let err = (f64::from(c[i * 128 + j]) - want).abs();
                if err > worst128.0 || err.is_nan() {
                    worst128 = (if err.is_nan() { f64::INFINITY } else { err }, i * 128 + j);
                }
            }
        }
        eprintln!("wgmma Q·Kᵀ n128 probe {}: max |Δ| {:.2e}", dtype.name(), worst128.0);
        assert!(worst128.0 < 1e-3, "Q·Kᵀ n128 {}: C[{}][{}] off by {}", dtype.name(), worst128.1 / 128, worst128.1 % 128, worst128.0);
        // P · V: V's tile is one 64-element panel, so its 8-row groups are 1024 bytes apart (the
        // stride-dimension offset); on a mismatch, say whether the swapped encoding would do.
        let pv = |lbo, sbo| run_wgmma_probe(&e, Probe::Pv { lbo, sbo }, dtype, &a, &b).unwrap();
        let c = pv(8192, 1024);
        let (err, at) = worst(&c, false);
        eprintln!("wgmma P·V probe {}: max |Δ| {err:.2e} at row {} col {}", dtype.name(), at / 64, at % 64);
        if err >= 1e-3 {
            let swapped = worst(&pv(1024, 8192), false).0;
            panic!("P·V {}: C[{}][{}] = {} off by {err} (with lbo and sbo swapped: max |Δ| {swapped:.2e})", dtype.name(), at / 64, at % 64, c[at]);
        }
    }
}

/// The warp-specialised ring of `templates/common/pipeline.cuh` (one producer thread's bulk
/// copies on `full` barriers, two consumer warpgroups releasing `empty` ones, setmaxnreg on
/// both sides) delivers every byte, in order, for chunk counts below, at and past the ring's
/// depth, odd and even (the consumers alternate).
pub(crate) fn the_bulk_copy_ring_delivers_every_chunk() {
    use attnforge::testing::hopper::{run_pipeline_probe, PIPE_CHUNK};
    let e = super::engine();
    let mut rng = StdRng::seed_from_u64(91);
    for chunks in [1usize, 3, 4, 5, 64, 257] {
        let src: Vec<u8> = (0..chunks * PIPE_CHUNK).map(|_| rng.random()).collect();
        let got = run_pipeline_probe(&e, &src).unwrap_or_else(|err| panic!("{chunks} chunks: {err}"));
        let bad = (0..chunks).filter(|&c| got[c * PIPE_CHUNK..(c + 1) * PIPE_CHUNK] != src[c * PIPE_CHUNK..(c + 1) * PIPE_CHUNK]).collect::<Vec<_>>();
        assert!(bad.is_empty(), "{chunks} chunks: chunks {bad:?} differ");
    }
    eprintln!("bulk-copy ring: 1-257 chunks of {PIPE_CHUNK} bytes delivered");
}

/// One 64-query × 64-key attention tile (d 64 and 128) on the warpgroup MMAs, softmax on the S fragment and P
/// handed to P · V in registers, against an f64 softmax of the same rounded Q, K, V: the
/// composition of both MMA forms the sm90 main loop's inner step is made of. P is rounded to
/// the operand type before P · V, so the output's tolerance is that rounding's (≈ 2⁻⁸ relative
/// for bf16, 2⁻¹¹ for f16, of values ≤ 1).
pub(crate) fn the_attention_tile_probe_matches_an_f64_softmax() {
    use attnforge::testing::hopper::run_attention_tile_probe;
    let e = super::engine();
    let mut rng = StdRng::seed_from_u64(1414);
    let scale = 0.125f32;
    for (dtype, hd) in [(DType::Bf16, 64usize), (DType::F16, 64), (DType::Bf16, 128), (DType::F16, 128)] {
        let mut draw = |amp: f32| -> (Vec<u16>, Vec<f64>) {
            (0..64 * hd)
                .map(|_| {
                    let x: f32 = rng.random_range(-amp..amp);
                    match dtype {
                        DType::Bf16 => (bf16::from_f32(x).to_bits(), f64::from(bf16::from_f32(x).to_f32())),
                        _ => (f16::from_f32(x).to_bits(), f64::from(f16::from_f32(x).to_f32())),
                    }
                })
                .unzip()
        };
        // Logits up to |s| ≈ d × 3 × 3 / 8 (a typical |s| of a few units): rows with a sharp
        // maximum and flat ones.
        let (q, qf) = draw(if hd == 64 { 3.0 } else { 2.0 });
        let (k, kf) = draw(if hd == 64 { 3.0 } else { 2.0 });
        let (v, vf) = draw(1.0);
        let (o, lse) = run_attention_tile_probe(&e, dtype, hd, &q, &k, &v, scale).unwrap();
        let (mut worst_o, mut worst_l) = (0.0f64, 0.0f64);
        for i in 0..64 {
            let s: Vec<f64> = (0..64).map(|j| (0..hd).map(|d| qf[i * hd + d] * kf[j * hd + d]).sum::<f64>() * f64::from(scale)).collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let p: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = p.iter().sum();
            worst_l = worst_l.max((f64::from(lse[i]) - (m + z.ln())).abs());
            for d in 0..hd {
                let want: f64 = (0..64).map(|j| p[j] * vf[j * hd + d]).sum::<f64>() / z;
                let got = f64::from(o[i * hd + d]);
                worst_o = worst_o.max(if got.is_nan() { f64::INFINITY } else { (got - want).abs() });
            }
        }
        eprintln!("attention tile probe {} d{hd}: max |Δo| {worst_o:.2e}, max |Δlse| {worst_l:.2e}", dtype.name());
        let tol_o = if dtype == DType::Bf16 { 1.5e-2 } else { 2e-3 };
        assert!(worst_o < tol_o && worst_l < 1e-3, "{} d{hd}: max |Δo| {worst_o} (tolerance {tol_o}), max |Δlse| {worst_l}", dtype.name());
    }
}

/// The producer of the sm90 main loop over a paged cache: 16-byte `cp.async` gathers of K rows
/// through a permuted page table into a 2-stage ring of swizzled tiles, completing on `full`
/// barriers by `cp.async.mbarrier.arrive.noinc`, consumed by two warpgroups that fence the async
/// proxy and run S = Q · Kᵀ on the warpgroup MMA — against an f64 product of the same rounded
/// values, for page sizes 1, 5 (not a power of two) and 16, lengths inside one tile, at tile
/// boundaries and over many ring rounds (odd and even tile counts, so both consumers wrap), keys
/// past the length zero.
pub(crate) fn the_paged_gather_ring_feeds_the_warpgroup_mma() {
    use attnforge::testing::hopper::{run_gather_probe, GATHER_TILE};
    let e = super::engine();
    let mut rng = StdRng::seed_from_u64(1490);
    for dtype in [DType::Bf16, DType::F16] {
        for (page_size, kv_len) in [(16usize, 1usize), (1, 63), (5, 64), (16, 65), (1, 300), (5, 1000), (16, 1031)] {
            let draw = |rng: &mut StdRng, n: usize| -> (Vec<u16>, Vec<f64>) {
                (0..n)
                    .map(|_| {
                        let x: f32 = rng.random_range(-2.0..2.0);
                        match dtype {
                            DType::Bf16 => (bf16::from_f32(x).to_bits(), f64::from(bf16::from_f32(x).to_f32())),
                            _ => (f16::from_f32(x).to_bits(), f64::from(f16::from_f32(x).to_f32())),
                        }
                    })
                    .unzip()
            };
            let used = kv_len.div_ceil(page_size);
            let num_pages = used + 3;
            let (q, qf) = draw(&mut rng, 64 * 64);
            let (k, kf) = draw(&mut rng, num_pages * page_size * 64);
            // A permutation of the cache's pages; the request uses the first `used`.
            let mut pages: Vec<i32> = (0..num_pages as i32).collect();
            for i in (1..pages.len()).rev() {
                pages.swap(i, rng.random_range(0..=i));
            }
            let s = run_gather_probe(&e, dtype, &q, &k, page_size, &pages[..used], kv_len).unwrap_or_else(|err| panic!("page {page_size} len {kv_len}: {err}"));
            let tiles = kv_len.div_ceil(GATHER_TILE);
            assert_eq!(s.len(), tiles * 64 * 64);
            let mut worst = 0.0f64;
            for pos in 0..tiles * GATHER_TILE {
                let (t, j) = (pos / GATHER_TILE, pos % GATHER_TILE);
                let row = (pos < kv_len).then(|| (pages[pos / page_size] as usize * page_size + pos % page_size) * 64);
                for i in 0..64 {
                    let want = row.map_or(0.0, |r| (0..64).map(|d| qf[i * 64 + d] * kf[r + d]).sum::<f64>());
                    let got = f64::from(s[(t * 64 + i) * 64 + j]);
                    worst = worst.max(if got.is_nan() { f64::INFINITY } else { (got - want).abs() });
                }
            }
            eprintln!("paged gather ring {} page {page_size} len {kv_len}: max |Δs| {worst:.2e}", dtype.name());
            assert!(worst < 1e-3, "{} page {page_size} len {kv_len}: max |Δs| {worst}", dtype.name());
        }
    }
}

/// `af_exp2_fma` (softmax.cuh: 2^x on the FMA pipe, which the sm90 loop uses for half the
/// exponentials of a MUFU-heavy logits hook) against f64 over the range the lazy softmax feeds
/// it (x ≤ AF_MAX_SLACK; every f32 step near the integers, where the floor changes) and its edges:
/// relative error ≤ 1.2e-4 where 2^x is a normal f32, 0 below 2^-126 (as MUFU.EX2 flushes), 0 for
/// -inf, NaN for NaN — and the MUFU's exp2f alongside, so the two forms agree on every edge.
pub(crate) fn the_fma_exp2_matches_f64_and_the_mufu_on_every_edge() {
    use attnforge::testing::hopper::run_exp2_probe;
    let e = super::engine();
    let mut rng = StdRng::seed_from_u64(2);
    let mut x: Vec<f32> = (0..200_000).map(|_| rng.random_range(-140.0f32..9.0)).collect();
    for k in -130i32..=9 {
        let c = k as f32;
        let mut lo = c;
        let mut hi = c;
        for _ in 0..8 {
            x.push(lo);
            x.push(hi);
            lo = f32::from_bits(if lo == 0.0 { 0x8000_0001 } else if lo > 0.0 { lo.to_bits() - 1 } else { lo.to_bits() + 1 });
            hi = f32::from_bits(if hi == 0.0 { 1 } else if hi > 0.0 { hi.to_bits() + 1 } else { hi.to_bits() - 1 });
        }
    }
    x.extend([f32::NEG_INFINITY, f32::NAN, -0.0, 0.0, -126.0, -126.5, -127.0, -127.5, 8.0, 8.5, f32::MIN]);
    let (y, z) = run_exp2_probe(&e, &x).unwrap_or_else(|err| panic!("{err}"));
    let mut worst = (0.0f64, 0.0f32);
    for (i, &xi) in x.iter().enumerate() {
        let (got, mufu) = (y[i], z[i]);
        if xi.is_nan() {
            assert!(got.is_nan(), "af_exp2_fma(NaN) = {got}, want NaN");
            continue;
        }
        let want = f64::from(xi).exp2();
        if want < 2f64.powi(-126) {
            assert!(got == 0.0 || (f64::from(got) - want).abs() <= 2f64.powi(-126), "af_exp2_fma({xi}) = {got:e}, want 0 or {want:e}");
            assert!(xi >= -127.0 || got == 0.0, "af_exp2_fma({xi}) = {got:e}, want 0");
            continue;
        }
        let rel = (f64::from(got) - want).abs() / want;
        if rel > worst.0 {
            worst = (rel, xi);
        }
        // The MUFU form is no reference (≈ 2 ulp); it only has to agree with the polynomial.
        assert!((f64::from(mufu) - want).abs() / want < 1e-5, "exp2f({xi}) = {mufu:e}, want {want:e}");
    }
    assert!(worst.0 <= 1.2e-4, "af_exp2_fma: worst relative error {:.3e} at x = {}", worst.0, worst.1);
    eprintln!("af_exp2_fma: worst relative error {:.3e} (at {}) over {} values", worst.0, worst.1, x.len());
}
