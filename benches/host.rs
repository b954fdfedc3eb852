//! Criterion benches of host paths: spec parsing and checking, hook evaluation.
//! GPU kernels are measured by `attnforge bench`, not here.

use attnforge::spec::eval::{eval, Env};
use attnforge::spec::params::{sample, Dims};
use attnforge::spec::shipped::{self, SHIPPED};
use criterion::{black_box, criterion_group, criterion_main, Criterion};

fn spec(c: &mut Criterion) {
    let (_, gemma2) = SHIPPED.iter().find(|(n, _)| *n == "gemma2").copied().unwrap_or(SHIPPED[0]);
    c.bench_function("spec/load gemma2", |b| b.iter(|| attnforge::spec::load("gemma2", black_box(gemma2)).unwrap()));
    let v = shipped::resolve("gemma2").unwrap();
    let p = sample(&v.params, Dims { qo_heads: 8, kv_heads: 2, batch: 1 }, |lo, _| lo);
    let env = Env { score: 1.5f64, sm_scale: 0.1, q_pos: 100, kv_pos: 90, qo_head: 1, kv_head: 0, req: 0, q_len: 1, kv_len: 101, params: &p };
    c.bench_function("spec/eval gemma2 logits", |b| b.iter(|| eval(black_box(&v.logits.typed), black_box(&env))));
}

criterion_group!(benches, spec);
criterion_main!(benches);
