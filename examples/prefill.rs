//! One prefill / append step through the two-call API: a prompt of 300 tokens and an append of
//! 5 tokens to a cache of 900, planned together and run.
//!
//! `cargo run --release --example prefill` (needs a GPU; without one it says so and exits 1).

use attnforge::engine::{DeviceOutput, Engine, KvCache, PrefillWrapper};
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
    let variant = attnforge::spec::shipped::resolve("gemma2")?;
    let (qo_heads, kv_heads, d) = (16, 4, 128);
    let cfg = KernelConfig::prefill(d, d, DType::Bf16, qo_heads / kv_heads)?;
    let mut prefill = PrefillWrapper::new(&engine, &variant, &cfg, Default::default())?;

    let kv = KvShape { layout: KvLayout::Nhd, interleaved: true, num_pages: 80, page_size: 16, kv_heads, head_dim_qk: d, head_dim_vo: d };
    let pages = PageTable::from_lens(&[300, 905], 16, &mut (0..80))?;
    let qo_indptr = [0, 300, 305];
    let batch = Batch { qo_indptr: &qo_indptr, pages: &pages, kv, qo_heads };
    let given = [("window".to_string(), attnforge::spec::params::ParamInput::Scalar(256.0))].into();
    let params = variant.bind(&given, Dims { qo_heads, kv_heads, batch: 2 })?;
    prefill.plan(&batch, &params)?;

    let q = engine.upload(&vec![bf16::from_f32(0.1); batch.q_elems()])?;
    let cache = engine.upload(&vec![bf16::from_f32(0.2); kv.k_len()])?;
    let (mut o, mut lse) = (engine.alloc::<bf16>(batch.o_elems())?, engine.alloc::<f32>(305 * qo_heads)?);
    prefill.run(&q, KvCache::Interleaved(&cache), DeviceOutput { o: &mut o, lse: &mut lse })?;
    println!("prefill: {} outputs, lse[0] = {}", o.len(), engine.download(&lse)?[0]);
    Ok(())
}
