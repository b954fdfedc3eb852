//! One decode step through the two-call API: plan a batch of page tables, then run it.
//!
//! `cargo run --release --example decode` (needs a GPU; without one it says so and exits 1).

use attnforge::engine::{DecodeWrapper, DeviceOutput, Engine, KvCache};
use attnforge::jit::KernelConfig;
use attnforge::kv::{Batch, DType, KvLayout, KvShape, PageTable};
use attnforge::spec::params::Dims;
use half::bf16;

fn main() -> std::process::ExitCode {
    match step() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn step() -> Result<(), attnforge::Error> {
    let engine = Engine::new(0)?;
    let variant = attnforge::spec::shipped::resolve("causal")?;
    let (qo_heads, kv_heads, d) = (32, 8, 128);
    let cfg = KernelConfig::decode(d, d, DType::Bf16, qo_heads / kv_heads)?;
    let mut decode = DecodeWrapper::new(&engine, &variant, &cfg, Default::default())?;

    // Two requests of 700 and 33 tokens over a cache of 64 pages of 16 tokens, pages scattered.
    let kv = KvShape { layout: KvLayout::Nhd, interleaved: true, num_pages: 64, page_size: 16, kv_heads, head_dim_qk: d, head_dim_vo: d };
    let pages = PageTable::from_lens(&[700, 33], 16, &mut (0..64).rev())?;
    let qo_indptr = [0, 1, 2];
    let batch = Batch { qo_indptr: &qo_indptr, pages: &pages, kv, qo_heads };
    let params = variant.bind(&Default::default(), Dims { qo_heads, kv_heads, batch: 2 })?;
    decode.plan(&batch, &params)?; // once per step: host arrays, one upload

    let q = engine.upload(&vec![bf16::from_f32(0.1); batch.q_elems()])?;
    let cache = engine.upload(&vec![bf16::from_f32(0.2); kv.k_len()])?;
    let (mut o, mut lse) = (engine.alloc::<bf16>(batch.o_elems())?, engine.alloc::<f32>(2 * qo_heads)?);
    decode.run(&q, KvCache::Interleaved(&cache), DeviceOutput { o: &mut o, lse: &mut lse })?; // once per layer
    println!("decode: {} outputs, lse[0] = {}", o.len(), engine.download(&lse)?[0]);
    Ok(())
}
