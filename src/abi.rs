//! The host–device ABI: `#[repr(C)]` mirrors of the structs the kernels take.
//!
//! Rendering writes each struct's size into the CUDA source as a `static_assert`, so a layout
//! drift between these and `templates/common/*.cuh` fails at compile time, not as garbage on the
//! GPU. Device pointers are `u64` (`CUdeviceptr`).

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

/// Mirrors `DecodeWork` in `templates/common/decode.cuh`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DecodeWork {
    pub req: i32,
    pub kv_begin: i32,
    pub kv_end: i32,
    /// Partial slot, or -1 to write the final output.
    pub partial: i32,
}

/// Mirrors `PrefillWork` in `templates/common/prefill.cuh`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PrefillWork {
    pub req: i32,
    /// First query row (token × group + head) of the block.
    pub row_start: i32,
    pub kv_begin: i32,
    pub kv_end: i32,
    /// Partial slot of the block's first token for this KV chunk, or -1 to write the output.
    pub partial: i32,
    /// Slots between consecutive tokens of the block (its number of chunks).
    pub stride: i32,
}

/// Mirrors `MergeWork` in `templates/common/merge.cuh`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MergeWork {
    pub req: i32,
    pub first: i32,
    pub count: i32,
    pub token: i32,
}

/// Mirrors `DecodeArgs` in `templates/common/decode.cuh`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct DecodeArgs {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub o: u64,
    pub lse: u64,
    pub part_o: u64,
    pub part_lse: u64,
    pub qo_indptr: u64,
    pub kv_indptr: u64,
    pub kv_indices: u64,
    pub last_page_len: u64,
    pub work: u64,
    pub num_work: u64,
    pub k_page_stride: i64,
    pub v_page_stride: i64,
    pub k_slot_stride: i32,
    pub k_head_stride: i32,
    pub v_slot_stride: i32,
    pub v_head_stride: i32,
    pub page_size: i32,
    pub num_qo_heads: i32,
    pub sm_scale: f32,
    /// log2(page_size) when it is a power of two, else -1.
    pub page_shift: i32,
}

/// Mirrors `MergeArgs` in `templates/common/merge.cuh`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct MergeArgs {
    pub o: u64,
    pub lse: u64,
    pub part_o: u64,
    pub part_lse: u64,
    pub work: u64,
    pub num_work: u64,
    pub qo_indptr: u64,
    pub kv_indptr: u64,
    pub last_page_len: u64,
    pub num_qo_heads: i32,
    pub group: i32,
    pub page_size: i32,
    pub sm_scale: f32,
}

// SAFETY: plain-old-data `#[repr(C)]` structs of integers and floats, passed by value as kernel
// arguments; their C layouts are asserted in the rendered source.
unsafe impl cudarc::driver::DeviceRepr for ParamBlob {}
unsafe impl cudarc::driver::DeviceRepr for DecodeArgs {}
unsafe impl cudarc::driver::DeviceRepr for MergeArgs {}
unsafe impl cudarc::driver::DeviceRepr for DecodeWork {}
unsafe impl cudarc::driver::DeviceRepr for MergeWork {}
