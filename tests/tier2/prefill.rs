//! Prefill / append on the GPU against the f64 reference: random ragged batches over every
//! shipped variant, page sizes, GQA ratios, head dims and dtypes.

use attnforge::engine::Engine;
use attnforge::harness::{compare, prefill_once};
use attnforge::jit::KernelConfig;
use attnforge::kv::{Element, KvLayout};
use attnforge::plan::PlanMode;
use attnforge::reference::attention;
use attnforge::spec::params::{sample, Dims};
use attnforge::spec::shipped;
use attnforge::workload::{Workload, WorkloadSpec};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn check<T: Element + cudarc::driver::DeviceRepr>(e: &Engine, variant: usize, lens: Vec<(usize, usize)>, kv_heads: usize, group: usize, dims: (usize, usize), page_size: usize, layout: KvLayout, seed: u64) -> String {
    let v = shipped::all().unwrap().swap_remove(variant);
    let mut rng = StdRng::seed_from_u64(seed);
    let spec = WorkloadSpec {
        lens: lens.clone(),
        qo_heads: kv_heads * group,
        kv_heads,
        head_dim_qk: dims.0,
        head_dim_vo: dims.1,
        page_size,
        layout,
        interleaved: dims.0 == dims.1 && rng.random_bool(0.5),
        permute: true,
        spare_pages: rng.random_range(0..3),
    };
    let w = Workload::<T>::random(&spec, &mut rng);
    let p = sample(&v.params, Dims { qo_heads: spec.qo_heads, kv_heads, batch: lens.len() }, &lens, |lo, hi| if lo == hi { lo } else { rng.random_range(lo..=hi) });
    let k = e.prefill_kernel(&v, &KernelConfig::prefill(dims.0, dims.1, T::DTYPE, group).unwrap()).unwrap();
    let (got, plan) = prefill_once(e, &k, &p, &w, PlanMode::Default, None).unwrap();
    let want = attention(&v, &p, &w.batch(), &w.q, &w.k, w.v(), None).unwrap();
    let cmp = compare(&got, &want, T::DTYPE, dims.1);
    let line = format!("{:<15} lens {:?} g{group} d{dims:?} p{page_size} {layout:?} {}: {} blocks → {cmp}", v.name, &lens[..lens.len().min(4)], T::DTYPE.name(), plan.work.len());
    assert!(cmp.ok(), "{line}");
    line
}

#[test]
fn prefill_matches_the_reference_on_random_ragged_batches() {
    let Some(e) = super::engine() else { return };
    let mut rng = StdRng::seed_from_u64(std::env::var("ATTNFORGE_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(99));
    let cases: usize = std::env::var("ATTNFORGE_GPU_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(40);
    for i in 0..cases {
        let n = rng.random_range(1..=6);
        let lens: Vec<(usize, usize)> = (0..n)
            .map(|_| {
                let kv = rng.random_range(0..=1500);
                let q = if rng.random_bool(0.2) { rng.random_range(0..=kv.min(8)) } else { rng.random_range(0..=kv) };
                (q, kv)
            })
            .collect();
        let dims = [(64, 64), (96, 96), (128, 128), (256, 256), (192, 128)][rng.random_range(0..5)];
        let group = [1, 4, 7, 8][rng.random_range(0..4)];
        let page = [1, 16, 64][rng.random_range(0..3)];
        let layout = if rng.random_bool(0.5) { KvLayout::Nhd } else { KvLayout::Hnd };
        let seed = rng.random();
        let kv_heads = rng.random_range(1..=2);
        let line = if rng.random_bool(0.5) {
            check::<bf16>(&e, i % shipped::SHIPPED.len(), lens, kv_heads, group, dims, page, layout, seed)
        } else {
            check::<f16>(&e, i % shipped::SHIPPED.len(), lens, kv_heads, group, dims, page, layout, seed)
        };
        eprintln!("prefill case {i:>3}: {line}");
    }
}

#[test]
fn a_long_causal_prompt_and_short_appends() {
    let Some(e) = super::engine() else { return };
    // One 3000-token prompt (MHA) and speculative-decoding-style appends (q 8 over kv 900).
    eprintln!("{}", check::<bf16>(&e, 1, vec![(3000, 3000)], 2, 1, (128, 128), 16, KvLayout::Nhd, 1));
    eprintln!("{}", check::<bf16>(&e, 4, vec![(8, 900); 5], 2, 4, (128, 128), 16, KvLayout::Nhd, 2));
}
