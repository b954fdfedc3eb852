//! Hopper (sm_90a) primitives of the sm90 prefill main loop (issue 14), each against the CPU.

use attnforge::kv::DType;
use attnforge::testing::hopper::run_wgmma_probe;
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One warpgroup's four m64n64k16 MMAs from 128-byte-swizzled shared tiles
/// (`templates/common/wgmma.cuh`): C = A · Bᵀ over K = 64 against an f64 product of the same
/// rounded inputs, for f16 and bf16 — the descriptor encoding, the swizzle, the K-step advance
/// and the accumulator fragment layout all have to be right for every element to match.
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
        let c = run_wgmma_probe(&e, dtype, &a, &b).unwrap();
        let mut worst = (0.0f64, 0usize);
        for i in 0..64 {
            for j in 0..64 {
                let want: f64 = (0..64).map(|k| af[i * 64 + k] * bf[j * 64 + k]).sum();
                let err = (f64::from(c[i * 64 + j]) - want).abs();
                if err > worst.0 {
                    worst = (err, i * 64 + j);
                }
            }
        }
        eprintln!("wgmma probe {}: max |Δ| {:.2e} at row {} col {}", dtype.name(), worst.0, worst.1 / 64, worst.1 % 64);
        // f32 accumulation of 64 products of magnitude <= 4: a wrong layout is off by O(1).
        assert!(worst.0 < 1e-3, "{}: C[{}][{}] = {} off by {}", dtype.name(), worst.1 / 64, worst.1 % 64, c[worst.1], worst.0);
    }
}
