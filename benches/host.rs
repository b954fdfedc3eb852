//! Criterion benches of host paths: spec parsing and evaluation, rendering, cache keys and
//! cache hits. GPU kernels are measured by `attnforge bench`, not here.

use attnforge::jit::{kernel_key, render::render, Arch, Jit, KernelConfig};
use attnforge::kv::DType;
use attnforge::spec::eval::{eval, Env};
use attnforge::spec::params::{sample, Dims};
use attnforge::spec::shipped::{self, SHIPPED};
use attnforge_cache::{KeyBuilder, Store};
use criterion::{black_box, criterion_group, criterion_main, Criterion};

fn spec(c: &mut Criterion) {
    let (_, gemma2) = SHIPPED.iter().find(|(n, _)| *n == "gemma2").copied().unwrap_or(SHIPPED[0]);
    c.bench_function("spec/load gemma2", |b| b.iter(|| attnforge::spec::load("gemma2", black_box(gemma2)).unwrap()));
    let v = shipped::resolve("gemma2").unwrap();
    let p = sample(&v.params, Dims { qo_heads: 8, kv_heads: 2, batch: 1 }, &[], |lo, _| lo);
    let env = Env { score: 1.5f64, sm_scale: 0.1, q_pos: 100, kv_pos: 90, qo_head: 1, kv_head: 0, req: 0, q_len: 1, kv_len: 101, params: &p };
    c.bench_function("spec/eval gemma2 logits", |b| b.iter(|| eval(black_box(&v.logits.typed), black_box(&env))));
}

fn jit(c: &mut Criterion) {
    let v = shipped::resolve("gemma2").unwrap();
    let cfg = KernelConfig::decode(128, 128, DType::Bf16, 4).unwrap();
    let arch: Arch = "sm_90a".parse().unwrap();
    c.bench_function("jit/render gemma2 decode", |b| b.iter(|| render(black_box(&v), black_box(&cfg)).unwrap()));
    let src = render(&v, &cfg).unwrap();
    let opts = vec!["-std=c++17".to_string()];
    c.bench_function("jit/key of rendered source", |b| b.iter(|| kernel_key(black_box(&src.code), &opts, &arch, (13, 0))));

    let dir = std::env::temp_dir().join(format!("attnforge-bench-{}", std::process::id()));
    let store = Store::open(&dir).unwrap();
    let key = KeyBuilder::new().field("bench", b"x").finish();
    let payload = vec![7u8; 72 * 1024];
    store.put(&key, "bench", "", &payload).unwrap();
    c.bench_function("cache/disk hit 72 KB (read + verify)", |b| b.iter(|| store.get(black_box(&key), "bench")));
    // The full in-process hit (render + key + map lookup) needs NVRTC to construct a Jit.
    if let Ok(j) = Jit::with_store_dir(&dir) {
        j.get(&v, &cfg, &arch).unwrap();
        c.bench_function("jit/get memory hit (render + key + lookup)", |b| b.iter(|| j.get(black_box(&v), &cfg, &arch).unwrap()));
    }
    let _ = std::fs::remove_dir_all(dir);
}

fn plan(c: &mut Criterion) {
    use attnforge::kv::{Batch, KvLayout, KvShape, PageTable};
    use attnforge::plan::{plan_decode, PlanMode, PlanTarget};
    use attnforge::spec::params::ParamInput;
    // The last case is skewed (one request of 100 000 positions), so it is balanced and its
    // causal spans are evaluated.
    for (variant, b, skew) in [("default", 1usize, false), ("default", 256, false), ("gemma2", 256, false), ("causal", 256, true)] {
        let v = shipped::resolve(variant).unwrap();
        let mut lens: Vec<usize> = (0..b).map(|i| 1000 + (i * 37) % 3000).collect();
        if skew {
            lens[0] = 100_000;
        }
        let pages = PageTable::from_lens(&lens, 16, &mut (0..).map(|i| i as usize)).unwrap();
        let qo: Vec<i32> = (0..=b as i32).collect();
        let kv = KvShape { layout: KvLayout::Nhd, interleaved: true, num_pages: pages.indices.len(), page_size: 16, kv_heads: 8, head_dim_qk: 128, head_dim_vo: 128 };
        let batch = Batch { qo_indptr: &qo, pages: &pages, kv, qo_heads: 32 };
        let given = [("window".to_string(), ParamInput::Scalar(1024.0))].into_iter().filter(|_| variant == "gemma2").collect();
        let p = v.bind(&given, Dims { qo_heads: 32, kv_heads: 8, batch: b }).unwrap();
        // As the engine sets it for the tensor-core decode kernel on an H100: split to 132 SMs,
        // balance bigger batches over 2 resident CTAs per SM.
        let target = PlanTarget { ctas: 132, kv_tile: 64, resident: 132 * 2, always_balance: false };
        let name = format!("plan/decode {variant} B={b}{}", if skew { " skewed" } else { "" });
        assert_eq!(plan_decode(&v, &p, &batch.validated().unwrap(), target, PlanMode::Default).unwrap().per_cta > 1, skew);
        // A step's host work: validating the batch once, then planning it.
        c.bench_function(&name, |bch| bch.iter(|| plan_decode(&v, &p, &black_box(&batch).validated().unwrap(), target, PlanMode::Default).unwrap()));
        if b > 1 && variant == "default" {
            // The two halves of a step's host work apart: validation, and the plan of a batch
            // validated before.
            c.bench_function(&format!("{name} (validation only)"), |bch| bch.iter(|| black_box(&batch).validated().unwrap()));
            let valid = batch.validated().unwrap();
            c.bench_function(&format!("{name} (plan only)"), |bch| bch.iter(|| plan_decode(&v, &p, black_box(&valid), target, PlanMode::Default).unwrap()));
        }
    }
    // Prefill: ANCHORS.md's plan() workloads (FlashInfer: 951 µs for B 64 × q 8, 4326 µs for
    // B 1024 × q 4), plus a case that splits (B 2 × q 8 over 20 000 keys) and one whose
    // kv_range bound is not provably monotone (chunked: every token is evaluated).
    for (variant, b, q, kv_len) in [("causal", 64usize, 8usize, 4096usize), ("causal", 1024, 4, 2048), ("causal", 2, 8, 20000), ("chunked", 2, 8, 20000)] {
        let v = shipped::resolve(variant).unwrap();
        let lens = vec![kv_len; b];
        let pages = PageTable::from_lens(&lens, 16, &mut (0..).map(|i| i as usize)).unwrap();
        let qo: Vec<i32> = (0..=b as i32).map(|i| i * q as i32).collect();
        let kv = KvShape { layout: KvLayout::Nhd, interleaved: true, num_pages: pages.indices.len(), page_size: 16, kv_heads: 8, head_dim_qk: 128, head_dim_vo: 128 };
        let batch = Batch { qo_indptr: &qo, pages: &pages, kv, qo_heads: 32 };
        let p = v.bind(&Default::default(), Dims { qo_heads: 32, kv_heads: 8, batch: b }).unwrap();
        // The 32-row tile at 5 CTAs per SM, as the engine picks for short appends.
        let target = PlanTarget { ctas: 132 * 5, kv_tile: 32, resident: 0, always_balance: false };
        c.bench_function(&format!("plan/prefill {variant} B={b} q={q} kv={kv_len}"), |bch| {
            bch.iter(|| attnforge::plan::plan_prefill(&v, &p, &black_box(&batch).validated().unwrap(), 32, target, PlanMode::Default).unwrap())
        });
    }
}

/// Shared-prefix detection (`cascade::detect`): a batch with no shared prefix must cost almost
/// nothing (issue 15: < 5 µs at B = 256), and one where every request shares a 32K prefix.
fn cascade(c: &mut Criterion) {
    use attnforge::cascade::{detect, Policy};
    use attnforge::kv::{Batch, KvLayout, KvShape, PageTable};
    let b = 256usize;
    let lens: Vec<usize> = (0..b).map(|i| 1000 + (i * 37) % 3000).collect();
    let lone = PageTable::from_lens(&lens, 16, &mut (0..).map(|i| i as usize)).unwrap();
    // Every request: the same 2048 pages (32768 tokens), then 16 of its own.
    let shared_pages = 2048i32;
    let mut indptr = vec![0i32];
    let mut indices = Vec::new();
    for r in 0..b as i32 {
        indices.extend(0..shared_pages);
        indices.extend((0..16).map(|j| shared_pages + r * 16 + j));
        indptr.push(indices.len() as i32);
    }
    let shared = PageTable { indptr, indices, last_page_len: vec![16; b] };
    let qo: Vec<i32> = (0..=b as i32).collect();
    for (name, pages) in [("no shared prefix", &lone), ("all share 32K", &shared)] {
        let kv = KvShape { layout: KvLayout::Nhd, interleaved: true, num_pages: pages.indices.iter().copied().max().unwrap() as usize + 1, page_size: 16, kv_heads: 8, head_dim_qk: 128, head_dim_vo: 128 };
        let batch = Batch { qo_indptr: &qo, pages, kv, qo_heads: 32 };
        let valid = batch.validated().unwrap();
        c.bench_function(&format!("cascade/detect B=256 {name}"), |bch| bch.iter(|| detect(black_box(&valid), &Policy::default())));
    }
    // The GPU plan of the shared batch: validation of the detected cascade, then plan_cascade.
    let kv = KvShape { layout: KvLayout::Nhd, interleaved: true, num_pages: shared.indices.iter().copied().max().unwrap() as usize + 1, page_size: 16, kv_heads: 8, head_dim_qk: 128, head_dim_vo: 128 };
    let batch = Batch { qo_indptr: &qo, pages: &shared, kv, qo_heads: 32 };
    let valid = batch.validated().unwrap();
    let cascade = detect(&valid, &Policy::default()).unwrap();
    let v = attnforge::spec::shipped::resolve("causal").unwrap();
    let params = v.bind(&std::collections::HashMap::new(), attnforge::spec::params::Dims { qo_heads: 32, kv_heads: 8, batch: b }).unwrap();
    let target = attnforge::plan::PlanTarget { ctas: 132, kv_tile: 64, resident: 0, always_balance: false };
    c.bench_function("cascade/validate B=256 all share 32K", |bch| bch.iter(|| black_box(&cascade).validate(&batch).unwrap()));
    c.bench_function("cascade/plan_cascade B=256 all share 32K", |bch| {
        bch.iter(|| attnforge::plan::plan_cascade(&v, &params, black_box(&valid), &cascade, 128, target, attnforge::plan::PlanMode::Default).unwrap())
    });
    // The decode cascade of the same batch (the decode wrapper's path: detection, then the
    // plan; the shared level on the 128-row prefill tile, the suffixes on the decode kernel).
    let ptarget = attnforge::plan::PlanTarget { ctas: 132 * 2, kv_tile: 64, resident: 0, always_balance: false };
    let dtarget = attnforge::plan::PlanTarget { ctas: 132, kv_tile: 64, resident: 132 * 2, always_balance: false };
    c.bench_function("cascade/detect + plan_decode_cascade B=256 all share 32K", |bch| {
        bch.iter(|| {
            let cascade = detect(black_box(&valid), &Policy::default()).unwrap();
            attnforge::plan::plan_decode_cascade(&v, &params, &valid, &cascade, 128, ptarget, dtarget, attnforge::plan::PlanMode::Default).unwrap()
        })
    });
}

criterion_group!(benches, spec, jit, plan, cascade);
criterion_main!(benches);
