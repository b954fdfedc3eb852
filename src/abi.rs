//! The host–device ABI: `#[repr(C)]` mirrors of the structs the kernels take
//! (`templates/abi.cu.tera`, rendered from [`layouts`]).
//!
//! The C++ declarations are rendered from Rust's layout, with every member's size and each
//! struct's size `static_assert`ed, which proves the offsets too (see [`StructLayout`]): a layout
//! drift fails at compile time, not as garbage on the GPU. Device pointers are `u64`
//! (`CUdeviceptr`).

use crate::spec::params::ParamValue;

pub use crate::spec::params::{param_layout, ParamField, PARAM_WORDS};

/// A variant's runtime parameters, laid out as the rendered `Params` struct.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ParamBlob(pub [u64; PARAM_WORDS]);

/// `sizeof(Params)` in C for this layout (an empty struct has size 1).
pub fn params_size(layout: &[ParamField]) -> usize {
    let align = layout.iter().map(|f| f.size).max().unwrap_or(1);
    layout.last().map_or(1, |f| (f.offset + f.size).div_ceil(align) * align)
}

impl ParamBlob {
    /// Fills the blob: scalar values in place, arrays as the device pointers in `array_ptrs`
    /// (one per array parameter and two per `bits` parameter, in declaration order).
    pub fn pack<'a>(layout: &[ParamField], values: impl Iterator<Item = &'a ParamValue>, array_ptrs: &[u64]) -> ParamBlob {
        let mut bytes = [0u8; PARAM_WORDS * 8];
        let mut arrays = array_ptrs.iter();
        let mut fields = layout.iter();
        for v in values {
            let n = if matches!(v, ParamValue::Bits { .. }) { 2 } else { 1 };
            for _ in 0..n {
                let Some(f) = fields.next() else { break };
                let raw: [u8; 8] = match v {
                    ParamValue::I32(x) => u64::from(*x as u32).to_le_bytes(),
                    ParamValue::F32(x) => u64::from(x.to_bits()).to_le_bytes(),
                    _ => arrays.next().copied().unwrap_or(0).to_le_bytes(),
                };
                bytes[f.offset..f.offset + f.size].copy_from_slice(&raw[..f.size]);
            }
        }
        let mut words = [0u64; PARAM_WORDS];
        for (w, chunk) in words.iter_mut().zip(bytes.chunks_exact(8)) {
            *w = u64::from_le_bytes(chunk.try_into().unwrap_or_default());
        }
        ParamBlob(words)
    }
}

/// Mirrors `DecodeWork` in `templates/abi.cu.tera`, rendered from [`layouts`]: one request's KV chunk.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DecodeWork {
    /// Request index in the batch, or -1 for a padding item (does nothing).
    pub req: i32,
    /// First KV position of the chunk.
    pub kv_begin: i32,
    /// One past the last KV position of the chunk.
    pub kv_end: i32,
    /// Partial slot, or -1 to write the final output.
    pub partial: i32,
}

/// Mirrors `PrefillWork` in `templates/abi.cu.tera`, rendered from [`layouts`]: a block of query rows over a KV chunk.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PrefillWork {
    /// Request index in the batch.
    pub req: i32,
    /// First query row (token × group + head) of the block.
    pub row_start: i32,
    /// First KV position of the chunk.
    pub kv_begin: i32,
    /// One past the last KV position of the chunk.
    pub kv_end: i32,
    /// Partial slot of the block's first token for this KV chunk, or -1 to write the output.
    pub partial: i32,
    /// Slots between consecutive tokens of the block (its number of chunks).
    pub stride: i32,
}

/// Mirrors `MergeWork` in `templates/abi.cu.tera`, rendered from [`layouts`]: the partial states of one query token.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MergeWork {
    /// Request index in the batch.
    pub req: i32,
    /// First of the token's consecutive partial slots.
    pub first: i32,
    /// Number of partial slots to merge.
    pub count: i32,
    /// Query token index in the batch (its row in the output).
    pub token: i32,
}

/// Mirrors `AttnArgs<Q, KV, O, Work>` in `templates/abi.cu.tera`, rendered from [`layouts`]: the argument of every
/// attention kernel (decode and prefill; only the work items' type differs, behind a pointer).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct AttnArgs {
    /// Queries, `[tokens, qo_heads, head_dim_qk]`.
    pub q: u64,
    /// The paged K cache.
    pub k: u64,
    /// The paged V cache (offset to V's first element when K and V are interleaved).
    pub v: u64,
    /// Output, `[tokens, qo_heads, head_dim_vo]`.
    pub o: u64,
    /// Output log-sum-exp (f32), `[tokens, qo_heads]`.
    pub lse: u64,
    /// Partial outputs in the workspace (f32), `[slots, qo_heads, head_dim_vo]`.
    pub part_o: u64,
    /// Partial log-sum-exps in the workspace (f32), `[slots, qo_heads]`, after `part_o`.
    pub part_lse: u64,
    /// Each request's first query token, `[batch + 1]`.
    pub qo_indptr: u64,
    /// Each request's first entry in `kv_indices`, `[batch + 1]`.
    pub kv_indptr: u64,
    /// Page numbers of every request's KV, in order.
    pub kv_indices: u64,
    /// Tokens in each request's last page, `[batch]`.
    pub last_page_len: u64,
    /// The plan's work list (right after its header).
    pub work: u64,
    /// The plan's header `[num_work, num_merge, stride, 0]`.
    pub num_work: u64,
    /// Elements between consecutive pages of K.
    pub k_page_stride: i64,
    /// Elements between consecutive pages of V.
    pub v_page_stride: i64,
    /// Elements between consecutive token slots of a K page.
    pub k_slot_stride: i32,
    /// Elements between consecutive KV heads of K.
    pub k_head_stride: i32,
    /// Elements between consecutive token slots of a V page.
    pub v_slot_stride: i32,
    /// Elements between consecutive KV heads of V.
    pub v_head_stride: i32,
    /// Tokens per KV page.
    pub page_size: i32,
    /// Query (and output) heads per token.
    pub num_qo_heads: i32,
    /// Softmax scale applied to the scores.
    pub sm_scale: f32,
    /// log2(page_size) when it is a power of two, else -1.
    pub page_shift: i32,
}

/// Mirrors `MergeArgs<O>` in `templates/abi.cu.tera`, rendered from [`layouts`].
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct MergeArgs {
    /// Output, `[tokens, qo_heads, head_dim_vo]`.
    pub o: u64,
    /// Output log-sum-exp (f32), `[tokens, qo_heads]`.
    pub lse: u64,
    /// Partial outputs to merge (f32), `[slots, qo_heads, head_dim_vo]`.
    pub part_o: u64,
    /// Partial log-sum-exps to merge (f32), `[slots, qo_heads]`.
    pub part_lse: u64,
    /// The plan's merge list.
    pub work: u64,
    /// The number of merge items (word 1 of the plan's header, `num_merge`).
    pub num_work: u64,
    /// Each request's first query token, `[batch + 1]`.
    pub qo_indptr: u64,
    /// Each request's first entry in the page list, `[batch + 1]`.
    pub kv_indptr: u64,
    /// Tokens in each request's last page, `[batch]`.
    pub last_page_len: u64,
    /// Query (and output) heads per token.
    pub num_qo_heads: i32,
    /// Query heads per KV head (the GQA group).
    pub group: i32,
    /// Tokens per KV page.
    pub page_size: i32,
    /// Softmax scale (read by the sink hook).
    pub sm_scale: f32,
}

/// Mirrors `StateMergeArgs` in `templates/abi.cu.tera`, rendered from [`layouts`]: the argument
/// of the public merge of attention states (`templates/merge_states.cu.tera`,
/// [`crate::engine::Engine::merge_states`]). Strides are in elements, any sign; the head
/// dimension is contiguous. With `v1 == 0` the `states` inputs lie along `v0`'s state stride;
/// otherwise there are two, `v0` and `v1`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateMergeArgs {
    /// First input's outputs (`[tokens, states, heads, head_dim]` by the strides).
    pub v0: u64,
    /// First input's log-sum-exps (f32, natural log).
    pub s0: u64,
    /// Second input's outputs, or 0.
    pub v1: u64,
    /// Second input's log-sum-exps, or 0.
    pub s1: u64,
    /// Merged outputs (may be `v0`: rows are read before they are written).
    pub vo: u64,
    /// Merged log-sum-exps, or 0 to skip them.
    pub so: u64,
    /// One byte per token, or 0: a token whose byte is 0 is left as it is.
    pub mask: u64,
    /// `v0` stride between tokens.
    pub v0_tok: i64,
    /// `v0` stride between states.
    pub v0_state: i64,
    /// `v0` stride between heads.
    pub v0_head: i64,
    /// `s0` stride between tokens.
    pub s0_tok: i64,
    /// `s0` stride between states.
    pub s0_state: i64,
    /// `s0` stride between heads.
    pub s0_head: i64,
    /// `v1` stride between tokens.
    pub v1_tok: i64,
    /// `v1` stride between heads.
    pub v1_head: i64,
    /// `s1` stride between tokens.
    pub s1_tok: i64,
    /// `s1` stride between heads.
    pub s1_head: i64,
    /// `vo` stride between tokens.
    pub vo_tok: i64,
    /// `vo` stride between heads.
    pub vo_head: i64,
    /// `so` stride between tokens.
    pub so_tok: i64,
    /// `so` stride between heads.
    pub so_head: i64,
    /// Tokens (rows of `heads` each).
    pub tokens: i64,
    /// Heads per token.
    pub heads: i64,
    /// States per row (2 with `v1`).
    pub states: i32,
    /// Head dimension.
    pub head_dim: i32,
}

// SAFETY: plain-old-data `#[repr(C)]` structs of integers and floats, passed by value as kernel
// arguments; their C layouts are asserted in the rendered source.
unsafe impl cudarc::driver::DeviceRepr for ParamBlob {}
unsafe impl cudarc::driver::DeviceRepr for AttnArgs {}
unsafe impl cudarc::driver::DeviceRepr for MergeArgs {}
unsafe impl cudarc::driver::DeviceRepr for StateMergeArgs {}
unsafe impl cudarc::driver::DeviceRepr for DecodeWork {}
unsafe impl cudarc::driver::DeviceRepr for MergeWork {}

/// One field of an ABI struct, from Rust's `#[repr(C)]` layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldLayout {
    /// The Rust (and C++) name.
    pub name: &'static str,
    /// Its C++ type in the rendered declaration.
    pub ctype: &'static str,
    /// `offset_of!`.
    pub offset: usize,
    /// `size_of` of the Rust field.
    pub size: usize,
}

/// One member of a rendered ABI declaration: a field, or explicit padding where Rust's
/// `#[repr(C)]` layout has a gap (none of today's structs has one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The field's name, or `_pad<offset>` for padding.
    pub name: String,
    /// The C++ type (`unsigned char` for padding, declared as an array of `size`).
    pub ctype: &'static str,
    /// Its offset in Rust's layout.
    pub offset: usize,
    /// Its size in bytes.
    pub size: usize,
    /// Padding rather than a field.
    pub pad: bool,
}

/// One ABI struct as the rendered source declares it: its C++ declaration (rendered from this
/// table, so Rust and CUDA cannot disagree on fields, types or order), its size and its fields'
/// offsets and sizes.
///
/// **How the offsets are proven at compile time** (NVRTC has no `offsetof`): the declaration is
/// [`StructLayout::members`], Rust's fields in offset order with explicit padding in every gap,
/// so the members' sizes add up to exactly [`StructLayout::size`]. The rendered source asserts
/// each member's `sizeof` and the struct's `sizeof`. C++ lays members out in declaration order
/// without overlap, so a struct whose size is the sum of its members' sizes has no padding, and
/// every member's offset is the sum of the sizes before it — which is Rust's offset. A drift in
/// a field's type, order or padding fails the compile. A tier-2 test also reads the offsets back
/// from the device ([`crate::engine::Engine::check_abi`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StructLayout {
    /// The Rust (and C++) name.
    pub name: &'static str,
    /// `template <…>` before the declaration, or empty.
    pub template: &'static str,
    /// The C++ type an instance has in a rendered kernel (for the size assertion).
    pub instance: &'static str,
    /// A concrete C++ type of it, for the device probe of its offsets.
    pub probe: &'static str,
    /// `size_of`.
    pub size: usize,
    /// The fields in declaration order.
    pub fields: Vec<FieldLayout>,
}

impl StructLayout {
    /// The members to declare: the fields in offset order, with explicit padding in every gap
    /// and at the end, covering `[0, size)` exactly. An error if two fields overlap or one
    /// runs past the end (a table that does not describe a `#[repr(C)]` struct).
    pub fn members(&self) -> Result<Vec<Member>, String> {
        declare(self.name, self.fields.iter().map(|f| (f.name.to_string(), f.ctype, f.offset, f.size)), self.size)
    }
}

/// The members that declare a struct of `size` bytes whose fields are `(name, C++ type, offset,
/// size)`: in offset order, with explicit `unsigned char` padding in every gap and at the end,
/// so the members' sizes add up to `size` and the compiler has no padding to add (the layout
/// proof of [`StructLayout`]). An error if two fields overlap or one runs past `size`.
pub fn declare(what: &str, fields: impl Iterator<Item = (String, &'static str, usize, usize)>, size: usize) -> Result<Vec<Member>, String> {
    let mut fields: Vec<_> = fields.collect();
    fields.sort_by_key(|f| f.2);
    let pad = |offset: usize, size: usize| Member { name: format!("_pad{offset}"), ctype: "unsigned char", offset, size, pad: true };
    let mut out = Vec::with_capacity(fields.len());
    let mut end = 0;
    for (name, ctype, offset, n) in fields {
        if offset < end {
            return Err(format!("{what}::{name} at offset {offset} overlaps the field before it (which ends at {end})"));
        }
        if offset > end {
            out.push(pad(end, offset - end));
        }
        out.push(Member { name, ctype, offset, size: n, pad: false });
        end = offset + n;
    }
    if end > size {
        return Err(format!("{what}'s fields end at {end}, past its size {size}"));
    }
    if end < size && end > 0 {
        out.push(pad(end, size - end));
    }
    Ok(out)
}

/// `size_of` of the field a projection returns (for [`layouts`]).
fn field_size<S, F>(_: impl Fn(&S) -> &F) -> usize {
    std::mem::size_of::<F>()
}

macro_rules! layout {
    ($t:ty, $template:expr, $instance:expr, $probe:expr, [$($f:ident: $c:expr),* $(,)?]) => {
        StructLayout {
            name: stringify!($t),
            template: $template,
            instance: $instance,
            probe: $probe,
            size: std::mem::size_of::<$t>(),
            fields: vec![$(FieldLayout {
                name: stringify!($f),
                ctype: $c,
                offset: std::mem::offset_of!($t, $f),
                size: field_size(|s: &$t| &s.$f),
            }),*],
        }
    };
}

/// The ABI structs every kernel declares, in declaration order: the work items, the attention
/// kernels' argument (`Tr::Args` in a rendered source), merge_states' argument and the public
/// state merge's.
pub fn layouts() -> Vec<StructLayout> {
    vec![
        layout!(DecodeWork, "", "DecodeWork", "DecodeWork", [req: "int", kv_begin: "int", kv_end: "int", partial: "int"]),
        layout!(PrefillWork, "", "PrefillWork", "PrefillWork", [req: "int", row_start: "int", kv_begin: "int", kv_end: "int", partial: "int", stride: "int"]),
        layout!(MergeWork, "", "MergeWork", "MergeWork", [req: "int", first: "int", count: "int", token: "int"]),
        layout!(AttnArgs, "template <typename Q, typename KV, typename O, typename Work>", "Tr::Args", "AttnArgs<__half, __nv_bfloat16, __half, PrefillWork>", [
            q: "const Q*", k: "const KV*", v: "const KV*", o: "O*", lse: "float*", part_o: "float*", part_lse: "float*",
            qo_indptr: "const int*", kv_indptr: "const int*", kv_indices: "const int*", last_page_len: "const int*",
            work: "const Work*", num_work: "const int*", k_page_stride: "long long", v_page_stride: "long long",
            k_slot_stride: "int", k_head_stride: "int", v_slot_stride: "int", v_head_stride: "int",
            page_size: "int", num_qo_heads: "int", sm_scale: "float", page_shift: "int",
        ]),
        layout!(MergeArgs, "template <typename O>", "MergeArgs<Shape::DTypeO>", "MergeArgs<__nv_bfloat16>", [
            o: "O*", lse: "float*", part_o: "const float*", part_lse: "const float*", work: "const MergeWork*", num_work: "const int*",
            qo_indptr: "const int*", kv_indptr: "const int*", last_page_len: "const int*", num_qo_heads: "int", group: "int", page_size: "int", sm_scale: "float",
        ]),
        layout!(StateMergeArgs, "", "StateMergeArgs", "StateMergeArgs", [
            v0: "unsigned long long", s0: "unsigned long long", v1: "unsigned long long", s1: "unsigned long long",
            vo: "unsigned long long", so: "unsigned long long", mask: "unsigned long long",
            v0_tok: "long long", v0_state: "long long", v0_head: "long long", s0_tok: "long long", s0_state: "long long", s0_head: "long long",
            v1_tok: "long long", v1_head: "long long", s1_tok: "long long", s1_head: "long long",
            vo_tok: "long long", vo_head: "long long", so_tok: "long long", so_head: "long long",
            tokens: "long long", heads: "long long", states: "int", head_dim: "int",
        ]),
    ]
}
