//! The public merge of attention states, over the caller's device buffers: for users who compose
//! their own formats (FlashInfer's `merge_state`, `merge_state_in_place`, `merge_states`).
//!
//! A state is `(o, lse)`: `o` `[tokens, heads, head_dim]` in the output dtype and its log-sum-exp
//! `[tokens, heads]` in f32, natural log — what the attention kernels write. Merging states over
//! disjoint key sets gives the state over their union: `lse = log Σ e^lse_i`,
//! `o = Σ e^(lse_i − lse) o_i`, exactly the reference's [`crate::reference::merge_state`] for
//! softmax variants. A state with `lse = −inf` (no visible key) contributes nothing and its `o`
//! is not read; a row whose every state is `−inf` becomes `o = 0, lse = −inf`; a NaN `lse` makes
//! the row NaN. (States of a `normalize: none` variant simply add.)
//!
//! One kernel per output dtype (`templates/merge_states.cu.tera`), compiled on first use through
//! the JIT's cache. Any strides (in elements) are accepted by [`Engine::merge_states_raw`]; the
//! typed calls take dense buffers. No allocation: the calls may be captured in a CUDA graph.

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DeviceRepr};

use super::Engine;
use crate::abi::StateMergeArgs;
use crate::kv::{DType, Element, LayoutError};
use crate::{Error, Result};

/// Largest head dim the merge kernel takes (32 lanes × 16 accumulators).
pub const MAX_MERGE_HEAD_DIM: usize = 512;

/// The shape of a set of attention states: `tokens` rows of `heads` heads of `head_dim`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateShape {
    /// Query tokens.
    pub tokens: usize,
    /// Heads per token.
    pub heads: usize,
    /// The output head dim.
    pub head_dim: usize,
}

/// Dense states on the device: `o` `[tokens, (states,) heads, head_dim]`, `lse`
/// `[tokens, (states,) heads]` (f32, natural log).
#[derive(Debug, Clone, Copy)]
pub struct States<'a, T> {
    /// The outputs.
    pub o: &'a CudaSlice<T>,
    /// Their log-sum-exps.
    pub lse: &'a CudaSlice<f32>,
}

/// Dense states the merge writes.
#[derive(Debug)]
pub struct StatesMut<'a, T> {
    /// The outputs.
    pub o: &'a mut CudaSlice<T>,
    /// Their log-sum-exps.
    pub lse: &'a mut CudaSlice<f32>,
}

/// Elements of `dims` multiplied, or a [`LayoutError::TooLarge`].
fn count(what: &'static str, dims: &[usize]) -> Result<usize> {
    dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).filter(|&n| n <= i64::MAX as usize).ok_or(Error::InvalidBatch(LayoutError::TooLarge { what, value: u128::MAX, limit: "2^63 elements" }))
}

fn at_least<T>(what: &'static str, buf: &CudaSlice<T>, n: usize) -> Result<()> {
    if buf.len() < n {
        return Err(Error::InvalidBatch(LayoutError::Mismatch { what, expected: n, got: buf.len() }));
    }
    Ok(())
}

/// Errors unless the merge kernel takes `head_dim` (its accumulators per lane bound it).
fn check_head_dim(head_dim: i64) -> Result<()> {
    if head_dim <= 0 || head_dim as usize > MAX_MERGE_HEAD_DIM {
        return Err(Error::UnsupportedConfig(format!("merge_states: head_dim {head_dim} (the merge takes 1..={MAX_MERGE_HEAD_DIM})")));
    }
    Ok(())
}

impl StateShape {
    /// Checks the sizes the kernel can take.
    fn check(&self) -> Result<()> {
        check_head_dim(self.head_dim.min(i64::MAX as usize) as i64)?;
        count("merge_states: tokens × heads × head_dim", &[self.tokens, self.heads, self.head_dim]).map(|_| ())
    }

    /// Dense strides `(token, head)` of `o` with `states` states per token.
    fn o_strides(&self, states: usize) -> (i64, i64) {
        ((states * self.heads * self.head_dim) as i64, self.head_dim as i64)
    }

    /// Errors unless `o` and `lse` hold one dense state of this shape (`what`: "merge_state: a").
    fn check_state<T>(&self, what: [&'static str; 2], o: &CudaSlice<T>, lse: &CudaSlice<f32>) -> Result<()> {
        at_least(what[0], o, self.tokens * self.heads * self.head_dim)?;
        at_least(what[1], lse, self.tokens * self.heads)
    }

    /// The arguments of a two-input merge whose inputs and output are dense states of this
    /// shape, pointers left to fill.
    fn pair_args(&self) -> StateMergeArgs {
        let (ot, oh) = self.o_strides(1);
        let (lt, lh) = (self.heads as i64, 1);
        StateMergeArgs {
            v0_tok: ot,
            v0_head: oh,
            s0_tok: lt,
            s0_head: lh,
            v1_tok: ot,
            v1_head: oh,
            s1_tok: lt,
            s1_head: lh,
            vo_tok: ot,
            vo_head: oh,
            so_tok: lt,
            so_head: lh,
            tokens: self.tokens as i64,
            heads: self.heads as i64,
            states: 2,
            head_dim: self.head_dim as i32,
            ..StateMergeArgs::default()
        }
    }
}

impl Engine {
    /// `out = merge(a, b)`: two states of `shape` over disjoint key sets. `out` may be `a` or
    /// `b` only through [`Engine::merge_state_into`] (Rust's borrows keep them apart here).
    pub fn merge_state<T: Element + DeviceRepr>(&self, a: States<'_, T>, b: States<'_, T>, out: StatesMut<'_, T>, shape: StateShape) -> Result<()> {
        shape.check()?;
        shape.check_state(["merge_state: a.o", "merge_state: a.lse"], a.o, a.lse)?;
        shape.check_state(["merge_state: b.o", "merge_state: b.lse"], b.o, b.lse)?;
        shape.check_state(["merge_state: out.o", "merge_state: out.lse"], out.o, out.lse)?;
        let st = &self.stream;
        let args = StateMergeArgs {
            v0: a.o.device_ptr(st).0,
            s0: a.lse.device_ptr(st).0,
            v1: b.o.device_ptr(st).0,
            s1: b.lse.device_ptr(st).0,
            vo: out.o.device_ptr(st).0,
            so: out.lse.device_ptr(st).0,
            mask: 0,
            ..shape.pair_args()
        };
        // SAFETY: every pointer is a live buffer of at least the dense size of `shape` (checked
        // above), which is all the strides reach.
        unsafe { self.merge_states_raw(st, T::DTYPE, &args) }
    }

    /// `state = merge(state, other)` in place, for the tokens whose `mask` byte is non-zero (every
    /// token without a mask); the rest are left as they are.
    pub fn merge_state_into<T: Element + DeviceRepr>(&self, state: StatesMut<'_, T>, other: States<'_, T>, mask: Option<&CudaSlice<u8>>, shape: StateShape) -> Result<()> {
        shape.check()?;
        shape.check_state(["merge_state_into: state.o", "merge_state_into: state.lse"], state.o, state.lse)?;
        shape.check_state(["merge_state_into: other.o", "merge_state_into: other.lse"], other.o, other.lse)?;
        if let Some(m) = mask {
            at_least("merge_state_into: mask", m, shape.tokens)?;
        }
        let st = &self.stream;
        let (v, s) = (state.o.device_ptr(st).0, state.lse.device_ptr(st).0);
        let args = StateMergeArgs {
            v0: v,
            s0: s,
            v1: other.o.device_ptr(st).0,
            s1: other.lse.device_ptr(st).0,
            vo: v,
            so: s,
            mask: mask.map_or(0, |m| m.device_ptr(st).0),
            ..shape.pair_args()
        };
        // SAFETY: as in `merge_state`; the output is the first input, which the kernel reads in
        // full for a row before it writes that row.
        unsafe { self.merge_states_raw(st, T::DTYPE, &args) }
    }

    /// `out = merge of the n states of each row`: `states.o` `[tokens, n, heads, head_dim]`,
    /// `states.lse` `[tokens, n, heads]` (FlashInfer's `merge_states` layout). `n = 0` gives
    /// `o = 0, lse = −inf`.
    pub fn merge_states<T: Element + DeviceRepr>(&self, states: States<'_, T>, n: usize, out: StatesMut<'_, T>, shape: StateShape) -> Result<()> {
        shape.check()?;
        if n > i32::MAX as usize {
            return Err(Error::InvalidBatch(LayoutError::TooLarge { what: "merge_states: states per row", value: n as u128, limit: "2^31 - 1" }));
        }
        at_least("merge_states: states.o", states.o, count("merge_states: states.o", &[shape.tokens, n, shape.heads, shape.head_dim])?)?;
        at_least("merge_states: states.lse", states.lse, count("merge_states: states.lse", &[shape.tokens, n, shape.heads])?)?;
        shape.check_state(["merge_states: out.o", "merge_states: out.lse"], out.o, out.lse)?;
        let st = &self.stream;
        let (vt, vh) = shape.o_strides(n);
        let (ot, oh) = shape.o_strides(1);
        let h = shape.heads as i64;
        let args = StateMergeArgs {
            v0: states.o.device_ptr(st).0,
            s0: states.lse.device_ptr(st).0,
            vo: out.o.device_ptr(st).0,
            so: out.lse.device_ptr(st).0,
            v0_tok: vt,
            v0_state: h * shape.head_dim as i64,
            v0_head: vh,
            s0_tok: n as i64 * h,
            s0_state: h,
            s0_head: 1,
            vo_tok: ot,
            vo_head: oh,
            so_tok: h,
            so_head: 1,
            tokens: shape.tokens as i64,
            heads: h,
            states: n as i32,
            head_dim: shape.head_dim as i32,
            ..StateMergeArgs::default()
        };
        // SAFETY: as in `merge_state`, with the dense `[tokens, n, heads, …]` input layout.
        unsafe { self.merge_states_raw(st, T::DTYPE, &args) }
    }

    /// The merge of `args` (any strides) on `stream`, for outputs of `dtype`. Checks what the
    /// kernel needs of the sizes; compiles the kernel on first use.
    ///
    /// # Safety
    /// Every pointer of `args` must be a live device allocation of `stream`'s context covering
    /// every element its strides reach for `tokens × heads` rows (`states` of them for the
    /// inputs), of type `dtype` for the outputs and f32 for the LSEs; `vo`/`so` may equal
    /// `v0`/`s0` (with the same strides) but must not otherwise overlap an input.
    pub unsafe fn merge_states_raw(&self, stream: &CudaStream, dtype: DType, args: &StateMergeArgs) -> Result<()> {
        check_head_dim(i64::from(args.head_dim))?;
        if args.tokens < 0 || args.heads < 0 || args.states < 0 {
            return Err(Error::InvalidBatch(LayoutError::TooLarge { what: "merge_states: a negative size", value: u128::MAX, limit: "0..2^63" }));
        }
        if args.v1 != 0 && args.states != 2 {
            return Err(Error::UnsupportedConfig(format!("merge_states: two input buffers hold 2 states, not {}", args.states)));
        }
        let rows = args.tokens.checked_mul(args.heads).ok_or(Error::InvalidBatch(LayoutError::TooLarge { what: "merge_states: tokens × heads", value: u128::MAX, limit: "2^63" }))?;
        if rows == 0 {
            return Ok(());
        }
        let ctas = (rows as u64).div_ceil(4);
        if ctas > i32::MAX as u64 {
            return Err(Error::InvalidBatch(LayoutError::TooLarge { what: "merge_states: tokens × heads", value: rows as u128, limit: "2^33 rows" }));
        }
        let func = self.merge_function(dtype)?;
        // SAFETY: the caller's contract covers every pointer and stride; the grid is 4 rows per
        // CTA, and the kernel returns for rows past tokens × heads.
        unsafe { self.launch_state_merge(stream, &func, args, ctas as u32) }
    }
}
