//! Rendering: (Variant, KernelConfig) → one CUDA translation unit, through Tera.
//!
//! Templates are embedded with `include_str!`. Tera runs with autoescape off and fails on any
//! undefined variable. The variant's hooks enter only as C++ emitted from the typed tree.
//! Rendering is a pure function: the same inputs give byte-identical source.
//!
//! **Invariant:** render never touches the disk or the GPU.

use std::sync::OnceLock;

use serde_json::json;
use tera::{Context, Tera};

use super::{KernelConfig, KernelSource, Op};
use crate::abi::{self, param_layout, PARAM_WORDS};
use crate::spec::{cuda::emit, factor::factor_logits, HookExpr, Normalize, Variant};
use crate::{Error, Result};

const TEMPLATES: [(&str, &str); 22] = [
    ("abi_probe.cu.tera", include_str!("../../templates/abi_probe.cu.tera")),
    ("common/prelude.cuh", include_str!("../../templates/common/prelude.cuh")),
    ("abi_sizes.cu.tera", include_str!("../../templates/abi_sizes.cu.tera")),
    ("common/traits.cuh", include_str!("../../templates/common/traits.cuh")),
    ("common/softmax.cuh", include_str!("../../templates/common/softmax.cuh")),
    ("common/kv_ring.cuh", include_str!("../../templates/common/kv_ring.cuh")),
    ("common/scheduler.cuh", include_str!("../../templates/common/scheduler.cuh")),
    ("common/epilogue.cuh", include_str!("../../templates/common/epilogue.cuh")),
    ("common/mma.cuh", include_str!("../../templates/common/mma.cuh")),
    ("common/decode_simt.cuh", include_str!("../../templates/common/decode_simt.cuh")),
    ("common/decode_mma.cuh", include_str!("../../templates/common/decode_mma.cuh")),
    ("common/prefill_rows.cuh", include_str!("../../templates/common/prefill_rows.cuh")),
    ("common/prefill_sm80.cuh", include_str!("../../templates/common/prefill_sm80.cuh")),
    ("common/prefill_sm90.cuh", include_str!("../../templates/common/prefill_sm90.cuh")),
    ("common/wgmma.cuh", include_str!("../../templates/common/wgmma.cuh")),
    ("common/pipeline.cuh", include_str!("../../templates/common/pipeline.cuh")),
    ("common/merge.cuh", include_str!("../../templates/common/merge.cuh")),
    ("variant.cuh.tera", include_str!("../../templates/variant.cuh.tera")),
    ("abi.cu.tera", include_str!("../../templates/abi.cu.tera")),
    ("decode.cu.tera", include_str!("../../templates/decode.cu.tera")),
    ("prefill.cu.tera", include_str!("../../templates/prefill.cu.tera")),
    ("merge_states.cu.tera", include_str!("../../templates/merge_states.cu.tera")),
];

fn tera() -> Result<&'static Tera> {
    static TERA: OnceLock<std::result::Result<Tera, String>> = OnceLock::new();
    TERA.get_or_init(|| {
        let mut t = Tera::default();
        t.autoescape_on(vec![]);
        // `.cuh` files are plain CUDA (inline PTX is full of `{%0, %1}`): Tera must not parse them.
        let templates: Vec<(&str, String)> = TEMPLATES
            .iter()
            .map(|(name, text)| (*name, if name.ends_with(".cuh") { format!("{{% raw %}}{text}{{% endraw %}}") } else { text.to_string() }))
            .collect();
        t.add_raw_templates(templates).map_err(|e| format!("{e:?}"))?;
        Ok(t)
    })
    .as_ref()
    .map_err(|e| Error::Render(format!("templates do not parse: {e}")))
}

/// The names that reach the rendered source (parameter fields) or file names (the variant's
/// name, in the kernel's and the cache entry's names) must be plain identifiers. `spec::load`
/// enforces this; a `Variant` built by hand is checked again here.
fn check_names(variant: &Variant) -> Result<()> {
    use crate::spec::{is_plain_identifier, shown, MAX_NAME_LEN};
    let bad = |what: &str, name: &str| {
        Error::Render(format!("{what} `{}` is not a plain identifier of at most {MAX_NAME_LEN} characters ([A-Za-z_][A-Za-z0-9_]*)", shown(name)))
    };
    if !is_plain_identifier(&variant.name) {
        return Err(bad("variant name", &variant.name));
    }
    match variant.params.iter().find(|p| !is_plain_identifier(&p.name)) {
        Some(p) => Err(bad("parameter name", &p.name)),
        None => Ok(()),
    }
}

/// The ABI structs for the templates (`abi.cu.tera`, `abi_sizes.cu.tera`, `abi_probe.cu.tera`).
fn abi_context(layouts: &[abi::StructLayout]) -> Result<Vec<serde_json::Value>> {
    layouts
        .iter()
        .map(|l| {
            let members = l.members().map_err(|e| Error::Render(format!("ABI table (src/abi.rs): {e}")))?;
            let members: Vec<_> = members.iter().map(|m| json!({ "name": m.name, "ctype": m.ctype, "offset": m.offset, "size": m.size, "pad": m.pad })).collect();
            let fields: Vec<_> = l.fields.iter().map(|f| json!({ "name": f.name })).collect();
            Ok(json!({ "name": l.name, "template": l.template, "instance": l.instance, "probe": l.probe, "size": l.size, "members": members, "fields": fields }))
        })
        .collect()
}

/// A translation unit whose kernel `attnforge_abi_probe(unsigned long long* out)` writes, from
/// the device, the size and then every field offset of each ABI struct in [`abi::layouts`]
/// order, for [`crate::engine::Engine::check_abi`]. The compile itself already proves the
/// layout (see [`abi::StructLayout`]); the probe checks it on the device as well.
pub fn abi_probe_source() -> Result<KernelSource> {
    abi_probe_source_for(&abi::layouts())
}

/// [`abi_probe_source`] for another ABI table: a table that does not match what the C++ types
/// make of it fails to compile (how the tests show the layout proof can fail).
pub fn abi_probe_source_for(layouts: &[abi::StructLayout]) -> Result<KernelSource> {
    let mut ctx = Context::new();
    ctx.insert("abi", &abi_context(layouts)?);
    let code = tera()?.render("abi_probe.cu.tera", &ctx).map_err(|e| Error::Render(e.to_string()))?;
    Ok(KernelSource { name: "abi_probe".into(), code, hook_lines: Vec::new() })
}

/// The public merge of attention states for outputs of `dtype`
/// (`templates/merge_states.cu.tera`, kernel `attnforge_merge_states(StateMergeArgs)`): no
/// variant enters it, so one translation unit per dtype. Pure, like [`render`].
pub fn merge_states_source(dtype: crate::kv::DType) -> Result<KernelSource> {
    let mut ctx = Context::new();
    ctx.insert("dtype", dtype.cuda_type());
    ctx.insert("abi", &abi_context(&abi::layouts())?);
    let code = tera()?.render("merge_states.cu.tera", &ctx).map_err(|e| Error::Render(e.to_string()))?;
    Ok(KernelSource { name: format!("merge_states.{}", dtype.name()), code, hook_lines: Vec::new() })
}

/// Renders the translation unit of `variant` and `cfg`: pure (no disk, no GPU), deterministic.
pub fn render(variant: &Variant, cfg: &KernelConfig) -> Result<KernelSource> {
    let layout = param_layout(&variant.params).map_err(Error::UnsupportedConfig)?;
    let hook = |h: Option<&HookExpr>| h.map_or(String::new(), |h| emit(&h.typed, &variant.params));
    let range = variant.kv_range.as_ref();
    let hooks = json!({
        "logits": hook(Some(&variant.logits)),
        "mask": hook(variant.mask.as_ref()),
        "kv_lo": hook(range.and_then(|r| r.lo.as_ref())),
        "kv_hi": hook(range.and_then(|r| r.hi.as_ref())),
        "sink": hook(variant.sink.as_ref()),
    });
    check_names(variant)?;
    let name = cfg.entry_name(&variant.name);
    let mut ctx = Context::new();
    // Only the config's part of the name: the source (and so the cache key) must not depend on
    // what the user called the variant.
    ctx.insert("name", &cfg.config_name());
    ctx.insert(
        "params",
        &abi::declare("Params", layout.iter().map(|f| (f.field.clone(), f.ctype, f.offset, f.size)), abi::params_size(&layout))
            .map_err(Error::Render)?
            .iter()
            .map(|m| json!({ "field": m.name, "ctype": m.ctype, "offset": m.offset, "size": m.size, "pad": m.pad }))
            .collect::<Vec<_>>(),
    );
    ctx.insert("params_words", &PARAM_WORDS);
    ctx.insert("params_size", &abi::params_size(&layout));
    ctx.insert("hooks", &hooks);
    ctx.insert("mask_implied", &crate::spec::implied::mask_implied_by_range(variant));
    // The prefill loops fold a factored logits hook's unit into the exponent (softmax only:
    // without normalisation the logits themselves are the weights). Decode evaluates it whole.
    let factored = (variant.normalize == Normalize::Softmax && cfg.op == Op::Prefill)
        .then(|| factor_logits(&variant.logits.typed, &variant.params))
        .flatten()
        .map(|f| {
            // The bounds as f32 literals (finite: raw_bounds keeps them within 2^64; rounded to
            // nearest, which their widening covers; the kernels use them only to keep weights in
            // range, src/spec/factor.rs).
            let lit = |x: f64| format!("{:e}f", x as f32);
            let (lo, hi) = f.raw_bounds.map_or((None, None), |(lo, hi)| (Some(lit(lo)), Some(lit(hi))));
            json!({ "unit": emit(&f.unit, &variant.params), "raw": emit(&f.raw, &variant.params), "raw_lo": lo, "raw_hi": hi })
        });
    ctx.insert("factored", &factored);
    ctx.insert("normalize_softmax", &(variant.normalize == Normalize::Softmax));
    ctx.insert("dtype_q", cfg.dtype_q.cuda_type());
    ctx.insert("dtype_kv", cfg.dtype_kv.cuda_type());
    ctx.insert("dtype_o", cfg.dtype_o.cuda_type());
    ctx.insert("head_dim_qk", &cfg.head_dim_qk);
    ctx.insert("head_dim_vo", &cfg.head_dim_vo);
    ctx.insert("group", &cfg.group);
    ctx.insert("abi", &abi_context(&abi::layouts())?);
    let template = match cfg.op {
        Op::Decode => {
            let t = cfg.decode_tile();
            ctx.insert("bdx", &t.bdx);
            ctx.insert("bdz", &t.bdz);
            ctx.insert("tile_per_z", &t.tile_per_z);
            ctx.insert("stages", &t.stages);
            ctx.insert("nv", &t.nv);
            ctx.insert("min_ctas", &t.min_ctas);
            ctx.insert("mma", &t.mma);
            ctx.insert("warps", &t.warps);
            ctx.insert("kv_swizzle", &cfg.kv_swizzle());
            "decode.cu.tera"
        }
        Op::Prefill => {
            let t = cfg.prefill_tile();
            ctx.insert("warps", &t.warps);
            ctx.insert("mtiles", &t.mtiles);
            ctx.insert("kv_tile", &t.kv_tile);
            ctx.insert("stages", &t.stages);
            ctx.insert("min_ctas", &t.min_ctas);
            ctx.insert("sm90", &t.sm90);
            "prefill.cu.tera"
        }
    };
    let code = tera()?.render(template, &ctx).map_err(|e| {
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(&format!(": {s}"));
            src = s.source();
        }
        Error::Render(msg)
    })?;
    let hook_lines = code
        .lines()
        .enumerate()
        .filter_map(|(i, l)| l.trim().strip_prefix("// @hook ").map(|h| (i + 2, h.to_string())))
        .collect();
    Ok(KernelSource { name, code, hook_lines })
}
