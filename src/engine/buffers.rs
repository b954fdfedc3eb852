//! Device buffers the engine fills and launches read: the plan and its workspace, the page
//! table, the parameters, and the caller's K/V, query and output buffers.
//!
//! Index arrays reach a kernel only from a [`DeviceTable`] (or a two-call wrapper, which owns
//! one): the engine uploaded it from host arrays it validated, and nothing else can write it, so
//! the launch knows what the kernels will index with — not only how long the arrays are.

use cudarc::driver::{CudaEvent, CudaSlice, DevicePtr, PinnedHostSlice};

use super::{cuda, Engine};
use crate::abi::{ParamBlob, ParamField};
use crate::error::PlanError;
use crate::kv::{Batch, KvSizes, LayoutError, OwnedBatch, ValidBatch};
use crate::plan::Plan;
use crate::spec::params::{ParamDecl, ParamValue, ParamValues};
use crate::{Error, Result};

/// A device buffer of i32 filled from pinned host memory with one copy. Grows on demand, unless
/// it is fixed (CUDA-graph capture: a captured pointer must not move), when a larger upload is an
/// error.
pub(crate) struct Staged {
    pub(crate) dev: CudaSlice<i32>,
    pinned: PinnedHostSlice<i32>,
    fixed: bool,
    /// Recorded after the last copy from `pinned`: the host waits for it before writing the
    /// pinned memory again (or freeing it), so a copy still queued behind earlier work never
    /// reads the next step's data.
    copied: Option<CudaEvent>,
}

impl Staged {
    pub(crate) fn new(e: &Engine, len: usize, fixed: bool) -> Result<Staged> {
        // SAFETY: pinned host memory of `len` i32s, written before any copy reads it.
        let pinned = unsafe { e.ctx.alloc_pinned::<i32>(len.max(1)) }.map_err(cuda("pinned alloc"))?;
        Ok(Staged { dev: e.alloc::<i32>(pinned.len())?, pinned, fixed, copied: None })
    }

    /// Copies the parts, back to back, to the device in one copy; returns each part's offset.
    /// A buffer too small grows, unless it is fixed: then it is `CapturedBuffersTooSmall`.
    pub(crate) fn write(&mut self, e: &Engine, parts: &[&[i32]]) -> Result<Vec<usize>> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        if self.pinned.len() < total && self.fixed {
            return Err(PlanError::CapturedBuffersTooSmall.into());
        }
        if let Some(ev) = self.copied.take() {
            ev.synchronize().map_err(cuda("wait for the previous upload"))?;
        }
        if self.pinned.len() < total {
            *self = Staged::new(e, total, false)?;
        }
        let host = self.pinned.as_mut_slice().map_err(cuda("pinned access"))?;
        let mut offsets = Vec::with_capacity(parts.len());
        let mut at = 0;
        for p in parts {
            offsets.push(at);
            host[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        // One copy of the whole pinned buffer; a tail left from a longer upload is never read
        // (the kernels read the counts first, and launches pass this upload's offsets).
        e.stream.memcpy_htod(&self.pinned, &mut self.dev).map_err(cuda("upload"))?;
        let flags = cudarc::driver::sys::CUevent_flags::CU_EVENT_DISABLE_TIMING;
        self.copied = Some(e.stream.record_event(Some(flags)).map_err(cuda("record upload"))?);
        Ok(offsets)
    }

    /// Capacity in i32 words.
    pub(crate) fn capacity(&self) -> usize {
        self.pinned.len()
    }

    pub(crate) fn ptr(&self, e: &Engine) -> u64 {
        self.dev.device_ptr(&e.stream).0
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        // The pinned memory must outlive a copy still queued from it.
        if let Some(ev) = self.copied.take() {
            let _ = ev.synchronize();
        }
    }
}

/// Device buffers of a plan: the packed work list and the f32 workspace for partial states.
pub struct PlanBuffers {
    pub(crate) plan: Staged,
    pub(crate) workspace: CudaSlice<f32>,
    /// The plan uploaded last: a launch must run that plan.
    pub(crate) uploaded: Option<u64>,
}

impl PlanBuffers {
    /// Bytes of f32 workspace.
    pub fn workspace_bytes(&self) -> usize {
        self.workspace.len() * 4
    }
}

/// A plan's identity for the check that a launch runs the plan uploaded last.
pub(crate) fn plan_id(plan: &impl Plan) -> u64 {
    plan.batch_fingerprint() ^ (plan.packed_len() as u64).rotate_left(17) ^ (plan.grid() as u64).rotate_left(41)
}

impl Engine {
    /// Uploads a plan into `bufs` with one host→device copy from pinned memory, allocating or
    /// growing the buffers as needed. A fixed-grid plan never reallocates buffers that a graph
    /// may have captured: it must fit them.
    pub fn upload_plan(&self, plan: &impl Plan, bufs: &mut Option<PlanBuffers>) -> Result<()> {
        let packed = plan.packed();
        let ws_floats = plan.workspace_bytes() / 4;
        if let Some(b) = bufs.as_ref() {
            if b.plan.fixed && (b.plan.capacity() < packed.len() || b.workspace.len() < ws_floats) {
                return Err(PlanError::CapturedBuffersTooSmall.into());
            }
        }
        let b = match bufs {
            Some(b) => b,
            None => bufs.insert(PlanBuffers { plan: Staged::new(self, packed.len(), plan.fixed())?, workspace: self.alloc::<f32>(ws_floats)?, uploaded: None }),
        };
        if b.workspace.len() < ws_floats {
            b.workspace = self.alloc::<f32>(ws_floats)?;
        }
        b.uploaded = None;
        b.plan.write(self, &[&packed])?;
        b.uploaded = Some(plan_id(plan));
        Ok(())
    }
}

/// A validated batch's index arrays on the device — query offsets, page table — with the host
/// copy they were uploaded from. Only the engine writes it ([`Engine::upload_table`]), so a
/// launch that reads it knows every index the kernels will follow is in range.
pub struct DeviceTable {
    host: OwnedBatch,
    sizes: KvSizes,
    q_elems: usize,
    o_elems: usize,
    fingerprint: u64,
    mem: Staged,
    /// Offsets of qo_indptr, kv_indptr, kv_indices, last_page_len in `mem`.
    offsets: [usize; 4],
    /// Capacities of a fixed table (CUDA graphs): requests, query tokens, pages.
    capacity: Option<Capacity>,
}

/// What a fixed (CUDA-graph) table, or a wrapper in graph mode, holds at most. A captured launch
/// replays on any batch within it, so its query and output buffers are sized for `max_tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Requests.
    pub max_batch: usize,
    /// Query tokens.
    pub max_tokens: usize,
    /// Pages of the page table.
    pub max_pages: usize,
}

/// The four index arrays of a batch, padded to a table's capacity, for one upload.
pub(crate) fn table_parts(b: &Batch<'_>, capacity: Option<Capacity>) -> Result<[Vec<i32>; 4]> {
    let n = b.batch_size();
    let c = capacity.unwrap_or(Capacity { max_batch: n, max_tokens: b.total_q(), max_pages: b.pages.indices.len() });
    let (cap_b, cap_p) = (c.max_batch, c.max_pages);
    if n > cap_b || b.pages.indices.len() > cap_p || b.total_q() > c.max_tokens {
        return Err(PlanError::Invalid(format!(
            "the batch has {n} requests, {} query tokens and {} pages; the fixed table holds {cap_b}, {} and {cap_p}",
            b.total_q(),
            b.pages.indices.len(),
            c.max_tokens
        ))
        .into());
    }
    // Padding requests are empty (no pages, no queries), so the kernels never see them.
    let pad = |v: &[i32], len: usize| {
        let mut out = v.to_vec();
        out.resize(len, v.last().copied().unwrap_or(0));
        out
    };
    let mut last = b.pages.last_page_len.clone();
    last.resize(cap_b, 0);
    let mut indices = b.pages.indices.clone();
    indices.resize(cap_p.max(1), 0);
    Ok([pad(b.qo_indptr, cap_b + 1), pad(&b.pages.indptr, cap_b + 1), indices, last])
}

impl DeviceTable {
    /// The batch it holds, validated when it was uploaded.
    pub fn batch(&self) -> ValidBatch<'_> {
        ValidBatch::trusted(self.host.batch(), self.sizes, self.q_elems, self.o_elems, self.fingerprint)
    }

    /// Its capacity when it is fixed for CUDA graphs.
    pub fn capacity(&self) -> Option<Capacity> {
        self.capacity
    }

    /// Device pointers of qo_indptr, kv_indptr, kv_indices, last_page_len.
    pub(crate) fn pointers(&self, e: &Engine) -> [u64; 4] {
        let base = self.mem.ptr(e);
        self.offsets.map(|o| base + 4 * o as u64)
    }

    /// Writes `batch` (validated) into this table's memory and takes it as the table's batch.
    fn write(&mut self, e: &Engine, batch: &ValidBatch<'_>) -> Result<()> {
        let parts = table_parts(batch.batch(), self.capacity)?;
        let o = self.mem.write(e, &[&parts[0], &parts[1], &parts[2], &parts[3]])?;
        self.offsets = [o[0], o[1], o[2], o[3]];
        self.host = OwnedBatch::from_batch(batch.batch());
        (self.sizes, self.q_elems, self.o_elems, self.fingerprint) = (*batch.sizes(), batch.q_elems(), batch.o_elems(), batch.fingerprint());
        Ok(())
    }

    fn empty(mem: Staged, batch: &ValidBatch<'_>, capacity: Option<Capacity>) -> DeviceTable {
        DeviceTable {
            host: OwnedBatch::from_batch(batch.batch()),
            sizes: *batch.sizes(),
            q_elems: batch.q_elems(),
            o_elems: batch.o_elems(),
            fingerprint: batch.fingerprint(),
            mem,
            offsets: [0; 4],
            capacity,
        }
    }
}

impl Engine {
    /// Uploads a validated batch's index arrays (one copy from pinned memory) into `table`,
    /// allocating it or reusing its memory. A table made by [`Engine::fixed_table`] keeps its
    /// device pointers (CUDA graphs) and pads the arrays to its capacity; on an error it keeps
    /// its previous batch.
    pub fn upload_table(&self, batch: &ValidBatch<'_>, table: &mut Option<DeviceTable>) -> Result<()> {
        match table {
            Some(t) => t.write(self, batch),
            None => {
                let len = 2 * (batch.batch_size() + 1) + batch.batch_size() + batch.pages.indices.len();
                let mut t = DeviceTable::empty(Staged::new(self, len, false)?, batch, None);
                t.write(self, batch)?;
                *table = Some(t);
                Ok(())
            }
        }
    }

    /// A table of fixed capacity holding `batch`, for CUDA-graph capture: every later
    /// [`Engine::upload_table`] into it keeps its device pointers, a batch beyond the capacity
    /// is an error, and launches with it need query and output buffers of `max_tokens` rows.
    pub fn fixed_table(&self, batch: &ValidBatch<'_>, capacity: Capacity) -> Result<DeviceTable> {
        let mem = Staged::new(self, 2 * (capacity.max_batch + 1) + capacity.max_batch + capacity.max_pages.max(1), true)?;
        let mut t = DeviceTable::empty(mem, batch, Some(capacity));
        t.write(self, batch)?;
        Ok(t)
    }
}

/// The caller's K/V cache: one interleaved buffer `[pages, 2, …]`, or separate K and V buffers.
#[derive(Clone, Copy)]
pub enum KvCache<'a, T> {
    /// K and V in one buffer (equal head dims).
    Interleaved(&'a CudaSlice<T>),
    /// Separate K and V buffers of the same layout.
    Separate {
        /// The K buffer.
        k: &'a CudaSlice<T>,
        /// The V buffer.
        v: &'a CudaSlice<T>,
    },
}

impl<'a, T> KvCache<'a, T> {
    /// The K buffer and the V buffer (the same one when interleaved).
    pub fn buffers(&self) -> (&'a CudaSlice<T>, &'a CudaSlice<T>) {
        match *self {
            KvCache::Interleaved(kv) => (kv, kv),
            KvCache::Separate { k, v } => (k, v),
        }
    }
}

/// Caller-owned device inputs of one launch: queries and the K/V cache.
pub struct DeviceBatch<'a, T> {
    /// Queries `[total_q, qo_heads, head_dim_qk]`.
    pub q: &'a CudaSlice<T>,
    /// The K/V cache.
    pub kv: KvCache<'a, T>,
}

/// Caller-owned device outputs: `[total_q, qo_heads, head_dim_vo]` and the LSE per row.
pub struct DeviceOutput<'a, T> {
    /// The output.
    pub o: &'a mut CudaSlice<T>,
    /// The LSE (natural log), f32.
    pub lse: &'a mut CudaSlice<f32>,
}

/// A variant's parameters on the device: the blob passed by value, and the arrays it points to.
pub struct DeviceParams {
    /// The blob the kernels take by value.
    pub blob: ParamBlob,
    /// The host values, to check `bits` matrices against each batch before a launch.
    values: ParamValues,
    _arrays: Vec<CudaSlice<u8>>,
}

impl DeviceParams {
    /// Errors unless every `bits` matrix covers every request of `batch` (the kernels read them
    /// without bounds checks).
    pub fn check_bits(&self, decls: &[ParamDecl], batch: &Batch<'_>) -> Result<()> {
        self.values.check_bits(decls, |b| (batch.q_len(b), batch.kv_len(b))).map_err(Error::Param)
    }

    /// The host values these were uploaded from.
    pub fn values(&self) -> &ParamValues {
        &self.values
    }
}

impl Engine {
    /// Uploads a variant's parameter values (arrays go to device memory).
    pub fn upload_params(&self, layout: &[ParamField], values: &ParamValues) -> Result<DeviceParams> {
        let mut arrays: Vec<CudaSlice<u8>> = Vec::new();
        for v in values.values() {
            match v {
                ParamValue::I32s(xs) => arrays.push(self.upload(&xs.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())?),
                ParamValue::F32s(xs) => arrays.push(self.upload(&xs.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())?),
                ParamValue::Bits { data, offsets } => {
                    arrays.push(self.upload(data)?);
                    arrays.push(self.upload(&offsets.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())?);
                }
                _ => {}
            }
        }
        let ptrs: Vec<u64> = arrays.iter().map(|a| a.device_ptr(&self.stream).0).collect();
        Ok(DeviceParams { blob: ParamBlob::pack(layout, values.values(), &ptrs), values: values.clone(), _arrays: arrays })
    }
}

/// Checks that `len` device elements are what `batch` needs.
pub(crate) fn check_len(what: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(Error::InvalidBatch(LayoutError::Mismatch { what, expected, got }))
    }
}
