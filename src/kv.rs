//! The KV abstraction: one paged cache layout and one CSR page table for every kernel.
//!
//! A cache holds `num_pages` pages of `page_size` token slots. Keys and values either share one
//! buffer (`[num_pages, 2, page_size, kv_heads, head_dim]` in NHD, or
//! `[num_pages, 2, kv_heads, page_size, head_dim]` in HND) or live in two buffers of the same
//! layout without the `2` (needed when the key and value head dims differ, e.g. 192/128). A
//! request owns the pages `indices[indptr[b]..indptr[b+1]]`, in order; its last page holds
//! `last_page_len[b]` tokens. Queries are ragged: request `b` owns query tokens
//! `qo_indptr[b]..qo_indptr[b+1]`, and its query `i` sits at position `kv_len - q_len + i`.
//!
//! **Invariant:** nothing reaches a kernel or the reference before [`validate`] accepted it.

use half::{bf16, f16};

/// Token-major (`[page, slot, head, dim]`) or head-major (`[page, head, slot, dim]`) pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvLayout {
    /// `[page, slot, head, dim]`: a token's heads side by side.
    Nhd,
    /// `[page, head, slot, dim]`: a head's tokens side by side.
    Hnd,
}

impl KvLayout {
    /// "nhd" or "hnd".
    pub fn name(self) -> &'static str {
        match self {
            KvLayout::Nhd => "nhd",
            KvLayout::Hnd => "hnd",
        }
    }
}

impl std::str::FromStr for KvLayout {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "nhd" => Ok(KvLayout::Nhd),
            "hnd" => Ok(KvLayout::Hnd),
            _ => Err(format!("unknown KV layout `{s}` (expected nhd or hnd)")),
        }
    }
}

/// Element types of queries, keys, values and outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
    /// f32 (the reference and tests; no kernel takes it).
    F32,
}

impl DType {
    /// "f16", "bf16" or "f32".
    pub fn name(self) -> &'static str {
        match self {
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
            DType::F32 => "f32",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            _ => 2,
        }
    }

    /// The C++ type the kernels use.
    pub fn cuda_type(self) -> &'static str {
        match self {
            DType::F16 => "__half",
            DType::Bf16 => "__nv_bfloat16",
            DType::F32 => "float",
        }
    }
}

impl std::str::FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f16" | "fp16" | "half" => Ok(DType::F16),
            "bf16" => Ok(DType::Bf16),
            "f32" | "fp32" => Ok(DType::F32),
            _ => Err(format!("unknown dtype `{s}` (expected f16 or bf16)")),
        }
    }
}

/// A storage element: `f16`, `bf16` or `f32`.
pub trait Element: Copy + Send + Sync + Default + std::fmt::Debug + 'static {
    /// Its [`DType`].
    const DTYPE: DType;
    /// The value, widened.
    fn to_f64(self) -> f64;
    /// The nearest value (round to nearest even).
    fn from_f32(x: f32) -> Self;
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    fn to_f64(self) -> f64 {
        f64::from(self.to_f32())
    }
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::Bf16;
    fn to_f64(self) -> f64 {
        f64::from(self.to_f32())
    }
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    fn from_f32(x: f32) -> Self {
        x
    }
}

/// The geometry of a paged KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KvShape {
    /// Token- or head-major pages.
    pub layout: KvLayout,
    /// Keys and values share one buffer, `[num_pages, 2, …]`; needs `head_dim_qk == head_dim_vo`.
    pub interleaved: bool,
    /// Pages in the cache.
    pub num_pages: usize,
    /// Token slots per page.
    pub page_size: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// Key (and query) head dim.
    pub head_dim_qk: usize,
    /// Value (and output) head dim.
    pub head_dim_vo: usize,
}

/// The largest stride, page size or head count the kernels take: they index within a page
/// and across heads in `i32` (and across pages and tokens in 64 bits).
pub const MAX_KERNEL_INDEX: usize = i32::MAX as usize;

/// The most elements a buffer of the cache, the queries or the outputs may have, so that its
/// size in bytes (elements of at most 4 bytes) fits an allocation.
pub const MAX_ELEMS: usize = isize::MAX as usize / 4;

/// The sizes of a shape, computed once with checked arithmetic by [`KvShape::sizes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvSizes {
    /// Elements of the K buffer (the whole buffer when interleaved).
    pub k_len: usize,
    /// Elements of the V buffer (the whole buffer when interleaved).
    pub v_len: usize,
    /// Elements between consecutive pages of K.
    pub k_page_stride: usize,
    /// Elements between consecutive pages of V.
    pub v_page_stride: usize,
    /// `(slot stride, head stride)` of K, in elements.
    pub k_strides: (usize, usize),
    /// `(slot stride, head stride)` of V, in elements.
    pub v_strides: (usize, usize),
}

impl KvShape {
    /// Every size and stride of the shape, with checked arithmetic: an error names the size that
    /// overflows or exceeds what the kernels can index ([`MAX_KERNEL_INDEX`], [`MAX_ELEMS`]).
    /// The accessors below compute the same values (saturating), and are exact once this
    /// accepted the shape.
    pub fn sizes(&self) -> Result<KvSizes, LayoutError> {
        for (what, v) in [("page_size", self.page_size), ("kv_heads", self.kv_heads), ("head_dim_qk", self.head_dim_qk), ("head_dim_vo", self.head_dim_vo)] {
            if v == 0 {
                return Err(LayoutError::Zero { what });
            }
            if v > MAX_KERNEL_INDEX {
                return Err(LayoutError::TooLarge { what, value: v as u128, limit: "2^31 - 1, the kernels' i32 index" });
            }
        }
        let too_large = |what: &'static str, value: Option<usize>, limit: usize, name: &'static str| match value {
            Some(v) if v <= limit => Ok(v),
            v => Err(LayoutError::TooLarge { what, value: v.map_or(u128::MAX, |v| v as u128), limit: name }),
        };
        let side = |dim: usize, page: &'static str, slot: &'static str, head: &'static str| -> Result<(usize, (usize, usize)), LayoutError> {
            let elems = self.page_size.checked_mul(self.kv_heads).and_then(|x| x.checked_mul(dim));
            let stride = elems.and_then(|e| if self.interleaved { e.checked_mul(2) } else { Some(e) });
            let stride = too_large(page, stride, MAX_ELEMS, "2^61 elements")?;
            let (s, h) = match self.layout {
                KvLayout::Nhd => (self.kv_heads.checked_mul(dim), Some(dim)),
                KvLayout::Hnd => (Some(dim), self.page_size.checked_mul(dim)),
            };
            let limit = "2^31 - 1 elements, the kernels' i32 index";
            Ok((stride, (too_large(slot, s, MAX_KERNEL_INDEX, limit)?, too_large(head, h, MAX_KERNEL_INDEX, limit)?)))
        };
        let (k_page_stride, k_strides) = side(self.head_dim_qk, "K page stride (page_size × kv_heads × head_dim_qk)", "K slot stride", "K head stride")?;
        let (v_page_stride, v_strides) = side(self.head_dim_vo, "V page stride (page_size × kv_heads × head_dim_vo)", "V slot stride", "V head stride")?;
        let k_len = too_large("K buffer (num_pages × page stride)", self.num_pages.checked_mul(k_page_stride), MAX_ELEMS, "2^61 elements")?;
        let v_len = too_large("V buffer (num_pages × page stride)", self.num_pages.checked_mul(v_page_stride), MAX_ELEMS, "2^61 elements")?;
        Ok(KvSizes { k_len, v_len, k_page_stride, v_page_stride, k_strides, v_strides })
    }

    fn page_elems(&self, dim: usize) -> usize {
        self.page_size.saturating_mul(self.kv_heads).saturating_mul(dim)
    }

    /// Elements between consecutive pages in the K (or V) buffer.
    pub fn page_stride(&self, dim: usize) -> usize {
        if self.interleaved {
            self.page_elems(dim).saturating_mul(2)
        } else {
            self.page_elems(dim)
        }
    }

    /// `(slot stride, head stride)` inside a page, in elements.
    pub fn strides(&self, dim: usize) -> (usize, usize) {
        match self.layout {
            KvLayout::Nhd => (self.kv_heads.saturating_mul(dim), dim),
            KvLayout::Hnd => (dim, self.page_size.saturating_mul(dim)),
        }
    }

    /// Offset of V inside the buffer when interleaved (0 for a separate V buffer).
    pub fn v_base(&self) -> usize {
        if self.interleaved {
            self.page_elems(self.head_dim_vo)
        } else {
            0
        }
    }

    /// Required length of the K buffer (the whole shared buffer when interleaved); saturates
    /// where [`KvShape::sizes`] reports an overflow, so it never equals a real buffer's length.
    pub fn k_len(&self) -> usize {
        self.num_pages.saturating_mul(self.page_stride(self.head_dim_qk))
    }

    /// Required length of the V buffer (the whole shared buffer when interleaved); saturating,
    /// as [`KvShape::k_len`].
    pub fn v_len(&self) -> usize {
        self.num_pages.saturating_mul(self.page_stride(self.head_dim_vo))
    }

    /// Start of the key vector of (`page`, `slot`, `head`) in the K buffer.
    pub fn k_index(&self, page: usize, slot: usize, head: usize) -> usize {
        let (s, h) = self.strides(self.head_dim_qk);
        page * self.page_stride(self.head_dim_qk) + slot * s + head * h
    }

    /// Start of the value vector of (`page`, `slot`, `head`) in the V buffer.
    pub fn v_index(&self, page: usize, slot: usize, head: usize) -> usize {
        let (s, h) = self.strides(self.head_dim_vo);
        self.v_base() + page * self.page_stride(self.head_dim_vo) + slot * s + head * h
    }
}

/// A CSR page table: request `b` owns pages `indices[indptr[b]..indptr[b+1]]`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PageTable {
    /// `[batch + 1]`: request `b` owns `indices[indptr[b]..indptr[b + 1]]`.
    pub indptr: Vec<i32>,
    /// Page indices, request after request.
    pub indices: Vec<i32>,
    /// `[batch]`: tokens in each request's last page (1..=page_size; 0 without pages).
    pub last_page_len: Vec<i32>,
}

impl PageTable {
    /// Requests in the table.
    pub fn batch_size(&self) -> usize {
        self.indptr.len().saturating_sub(1)
    }

    /// Pages of request `b` (valid only after validation).
    pub fn pages(&self, b: usize) -> &[i32] {
        &self.indices[self.indptr[b] as usize..self.indptr[b + 1] as usize]
    }

    /// Tokens of request `b` (valid only after validation).
    pub fn kv_len(&self, b: usize, page_size: usize) -> usize {
        let n = self.pages(b).len();
        if n == 0 {
            0
        } else {
            (n - 1) * page_size + self.last_page_len[b] as usize
        }
    }

    /// Ragged contiguous K/V (`[total_kv, kv_heads, head_dim]` with request `b` owning tokens
    /// `kv_indptr[b]..kv_indptr[b+1]`) as a table over pages of one token: page `t` is token `t`.
    /// Use it with a `KvShape` of `page_size: 1`, `num_pages: total_kv`, NHD, separate K and V.
    pub fn contiguous(kv_indptr: &[i32]) -> PageTable {
        let total = kv_indptr.last().copied().unwrap_or(0).max(0);
        PageTable {
            indptr: kv_indptr.to_vec(),
            indices: (0..total).collect(),
            last_page_len: kv_indptr.windows(2).map(|w| i32::from(w[1] > w[0])).collect(),
        }
    }

    /// Builds the table for requests of the given lengths, taking pages in the order `pages`
    /// yields them (pass a permutation to scatter requests over the cache). Errors on a zero
    /// page size, a table or page index beyond i32, or a page iterator that runs out.
    pub fn from_lens(lens: &[usize], page_size: usize, pages: &mut impl Iterator<Item = usize>) -> Result<PageTable, LayoutError> {
        if page_size == 0 {
            return Err(LayoutError::Zero { what: "page_size" });
        }
        let limit = "2^31 - 1 (i32 indices)";
        let mut t = PageTable { indptr: vec![0], ..Default::default() };
        for &len in lens {
            let n = len.div_ceil(page_size);
            let total = t.indices.len().checked_add(n).filter(|&x| x <= MAX_KERNEL_INDEX);
            let total = total.ok_or(LayoutError::TooLarge { what: "total pages of the table", value: (t.indices.len() as u128) + n as u128, limit })?;
            for p in pages.by_ref().take(n) {
                t.indices.push(i32::try_from(p).map_err(|_| LayoutError::TooLarge { what: "page index", value: p as u128, limit })?);
            }
            if t.indices.len() != total {
                return Err(LayoutError::Mismatch { what: "pages yielded by the page iterator", expected: total, got: t.indices.len() });
            }
            t.indptr.push(total as i32);
            // 1..=page_size, and page_size fits i32 when n > 0 means len >= 1 (checked above
            // only for the count): compute in usize, convert checked.
            let last = if n == 0 { 0 } else { len - (n - 1) * page_size };
            t.last_page_len.push(i32::try_from(last).map_err(|_| LayoutError::TooLarge { what: "last_page_len", value: last as u128, limit })?);
        }
        Ok(t)
    }
}

/// Why a batch description was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LayoutError {
    /// A device buffer whose address the kernels cannot use.
    #[error("{what} is at {address:#x}, not a multiple of {align} bytes, which the kernels need")]
    Misaligned {
        /// Which buffer.
        what: &'static str,
        /// Its address.
        address: u64,
        /// The alignment needed.
        align: u64,
    },
    /// A cascade (`crate::cascade`) that does not decompose its batch.
    #[error("cascade level {level}, group {group}: {message}")]
    Cascade {
        /// The level (the number of levels for a request the levels do not cover).
        level: usize,
        /// The group within the level.
        group: usize,
        /// What is wrong.
        message: String,
    },
    /// A request longer than [`MAX_TOKENS`] query or KV tokens.
    #[error("request {req}: {len} {what} tokens; at most 2^30 are supported")]
    TooLong {
        /// The request.
        req: usize,
        /// "query" or "KV".
        what: &'static str,
        /// Its length.
        len: u64,
    },
    /// An index array without its leading 0.
    #[error("{what} is empty; it needs batch_size + 1 entries, starting with 0")]
    EmptyIndptr {
        /// Which array.
        what: &'static str,
    },
    /// An index array that does not start at 0.
    #[error("{what}[0] is {first}; it must be 0")]
    IndptrStart {
        /// Which array.
        what: &'static str,
        /// Its first entry.
        first: i32,
    },
    /// An index array that decreases.
    #[error("{what} is not monotone: {what}[{at}] = {next} < {what}[{}] = {prev}", at - 1)]
    NonMonotone {
        /// Which array.
        what: &'static str,
        /// The index of the entry smaller than its predecessor.
        at: usize,
        /// The predecessor.
        prev: i32,
        /// The entry.
        next: i32,
    },
    /// An index array whose last entry is not the length of what it indexes.
    #[error("{what} ends at {last}, but {len} entries were given")]
    IndptrEnd {
        /// Which array.
        what: &'static str,
        /// Its last entry.
        last: i32,
        /// The length of the array it indexes.
        len: usize,
    },
    /// A page index outside the cache.
    #[error("request {req}: page index {index} (at indices[{pos}]) is outside 0..{num_pages}")]
    PageIndex {
        /// The request.
        req: usize,
        /// Where in `indices`.
        pos: usize,
        /// The index.
        index: i32,
        /// Pages in the cache.
        num_pages: usize,
    },
    /// A `last_page_len` outside `1..=page_size` (or not 0 for a request without pages).
    #[error("request {req}: last_page_len is {value}; {}", if *empty { "a request with no pages must have 0".to_string() } else { format!("it must be in 1..={page_size}") })]
    LastPageLen {
        /// The request.
        req: usize,
        /// Its `last_page_len`.
        value: i32,
        /// The page size.
        page_size: usize,
        /// Whether the request has no pages.
        empty: bool,
    },
    /// A length that does not match the batch.
    #[error("{what}: expected {expected}, got {got}")]
    Mismatch {
        /// What was measured.
        what: &'static str,
        /// What the batch needs.
        expected: usize,
        /// What was given.
        got: usize,
    },
    /// Query heads not a multiple of KV heads.
    #[error("qo_heads ({qo_heads}) is not a multiple of kv_heads ({kv_heads})")]
    HeadsNotDivisible {
        /// Query heads.
        qo_heads: usize,
        /// KV heads.
        kv_heads: usize,
    },
    /// A size that must be at least 1.
    #[error("{what} must be at least 1")]
    Zero {
        /// Which size.
        what: &'static str,
    },
    /// An interleaved cache with different key and value head dims.
    #[error("an interleaved K/V buffer needs equal head dims, got qk {qk} and vo {vo}; use separate K and V buffers")]
    InterleavedDims {
        /// The key head dim.
        qk: usize,
        /// The value head dim.
        vo: usize,
    },
    /// A size, stride or count beyond what the kernels can index, or one that overflows.
    #[error("{what} is {}; the limit is {limit}", if *value == u128::MAX { "beyond 2^64 (it overflows)".to_string() } else { value.to_string() })]
    TooLarge {
        /// Which size.
        what: &'static str,
        /// Its value (`u128::MAX`: it overflowed).
        value: u128,
        /// The limit, in words.
        limit: &'static str,
    },
}


/// The longest request, in query or KV tokens, that a batch may hold: positions and lengths
/// then stay far from i32 overflow in the kernels, and spec arithmetic on them can be proven
/// wrap-free (`spec::implied`).
pub const MAX_TOKENS: usize = 1 << 30;

/// A batch of attention problems: ragged queries over one paged cache.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    /// `[batch + 1]`: request `b` owns query tokens `qo_indptr[b]..qo_indptr[b + 1]`.
    pub qo_indptr: &'a [i32],
    /// The page table.
    pub pages: &'a PageTable,
    /// The cache's geometry.
    pub kv: KvShape,
    /// Query heads.
    pub qo_heads: usize,
}

impl<'a> Batch<'a> {
    /// Requests in the batch.
    pub fn batch_size(&self) -> usize {
        self.pages.batch_size()
    }

    /// Query tokens in the batch.
    pub fn total_q(&self) -> usize {
        self.qo_indptr.last().map_or(0, |&x| x.max(0) as usize)
    }

    /// Query tokens of request `b` (valid after validation).
    pub fn q_len(&self, b: usize) -> usize {
        (self.qo_indptr[b + 1] - self.qo_indptr[b]) as usize
    }

    /// KV tokens of request `b` (valid after validation).
    pub fn kv_len(&self, b: usize) -> usize {
        self.pages.kv_len(b, self.kv.page_size)
    }

    /// Query heads per KV head (the GQA group).
    pub fn group(&self) -> usize {
        self.qo_heads / self.kv.kv_heads
    }

    /// Elements of the query buffer `[total_q, qo_heads, head_dim_qk]` (saturating: exact once
    /// [`validate`] accepted the batch).
    pub fn q_elems(&self) -> usize {
        self.total_q().saturating_mul(self.qo_heads).saturating_mul(self.kv.head_dim_qk)
    }

    /// Elements of the output buffer `[total_q, qo_heads, head_dim_vo]` (saturating, as
    /// [`Batch::q_elems`]).
    pub fn o_elems(&self) -> usize {
        self.total_q().saturating_mul(self.qo_heads).saturating_mul(self.kv.head_dim_vo)
    }

    /// Checks every index and size; see [`validate`].
    pub fn validate(&self, q_len: usize, k_len: usize, v_len: usize) -> Result<(), LayoutError> {
        validate(self, q_len, k_len, v_len)
    }

    /// Validates the page table, the query indptr and the shape once, giving the
    /// [`ValidBatch`] that planners take; buffer lengths are checked later, in O(1).
    pub fn validated(&self) -> Result<ValidBatch<'a>, LayoutError> {
        validated(self)
    }
}

fn check_indptr(what: &'static str, indptr: &[i32], len: usize) -> Result<(), LayoutError> {
    let first = *indptr.first().ok_or(LayoutError::EmptyIndptr { what })?;
    if first != 0 {
        return Err(LayoutError::IndptrStart { what, first });
    }
    for (at, w) in indptr.windows(2).enumerate() {
        if w[1] < w[0] {
            return Err(LayoutError::NonMonotone { what, at: at + 1, prev: w[0], next: w[1] });
        }
    }
    let last = *indptr.last().unwrap_or(&0);
    if last as usize != len {
        return Err(LayoutError::IndptrEnd { what, last, len });
    }
    Ok(())
}

/// Validates a batch's page table, query indptr and shape (every malformed table is an error
/// here, so kernels and the reference can index without checks), once: the result is a
/// [`ValidBatch`], which planners take and which checks buffer lengths in O(1).
fn validated<'a>(b: &Batch<'a>) -> Result<ValidBatch<'a>, LayoutError> {
    let kv = &b.kv;
    let sizes = kv.sizes()?;
    if b.qo_heads == 0 {
        return Err(LayoutError::Zero { what: "qo_heads" });
    }
    if b.qo_heads > MAX_KERNEL_INDEX {
        return Err(LayoutError::TooLarge { what: "qo_heads", value: b.qo_heads as u128, limit: "2^31 - 1, the kernels' i32 index" });
    }
    if b.qo_heads % kv.kv_heads != 0 {
        return Err(LayoutError::HeadsNotDivisible { qo_heads: b.qo_heads, kv_heads: kv.kv_heads });
    }
    if kv.interleaved && kv.head_dim_qk != kv.head_dim_vo {
        return Err(LayoutError::InterleavedDims { qk: kv.head_dim_qk, vo: kv.head_dim_vo });
    }
    let t = b.pages;
    check_indptr("indptr", &t.indptr, t.indices.len())?;
    let batch = t.batch_size();
    if t.last_page_len.len() != batch {
        return Err(LayoutError::Mismatch { what: "last_page_len length (batch size)", expected: batch, got: t.last_page_len.len() });
    }
    if b.qo_indptr.len() != batch + 1 {
        return Err(LayoutError::Mismatch { what: "qo_indptr length (batch size + 1)", expected: batch + 1, got: b.qo_indptr.len() });
    }
    let total_q = b.qo_indptr.last().copied().unwrap_or(0).max(0) as usize;
    check_indptr("qo_indptr", b.qo_indptr, total_q)?;
    // One branch-free pass over all indices (it vectorises: planning a B = 256 decode batch
    // validates ~40K indices); only on failure do we walk the requests to name the culprit.
    // In u32: a negative index is >= 2^31, and every page count from 2^31 up admits exactly the
    // non-negative indices, so clamping the count to 2^31 keeps the test exact.
    let n = kv.num_pages.min(1 << 31) as u32;
    if !t.indices.is_empty() && max_index_u32(&t.indices) >= n {
        for req in 0..batch {
            for pos in t.indptr[req] as usize..t.indptr[req + 1] as usize {
                let index = t.indices[pos];
                if index < 0 || index as usize >= kv.num_pages {
                    return Err(LayoutError::PageIndex { req, pos, index, num_pages: kv.num_pages });
                }
            }
        }
    }
    // What a plan depends on, hashed as the loop goes: requests' page counts, fill and query
    // counts, and the shape (so a plan made for another batch is caught before launch).
    let mut fp = Fingerprint::new();
    fp.add(kv.page_size as u64);
    fp.add(b.qo_heads as u64);
    fp.add(kv.kv_heads as u64);
    fp.add(batch as u64);
    for req in 0..batch {
        fp.add(t.indptr[req + 1] as u64);
        fp.add(t.last_page_len[req] as u64);
        fp.add(b.qo_indptr[req + 1] as u64);
        let pages = (t.indptr[req + 1] - t.indptr[req]) as u64;
        let kv_len = pages.saturating_sub(1).saturating_mul(kv.page_size as u64).saturating_add(t.last_page_len[req].max(0) as u64);
        let q_len = (b.qo_indptr[req + 1] - b.qo_indptr[req]) as u64;
        for (what, len) in [("KV", kv_len), ("query", q_len)] {
            if len > MAX_TOKENS as u64 {
                return Err(LayoutError::TooLong { req, what, len });
            }
        }
        let value = t.last_page_len[req];
        let empty = t.indptr[req] == t.indptr[req + 1];
        let ok = if empty { value == 0 } else { value >= 1 && value as usize <= kv.page_size };
        if !ok {
            return Err(LayoutError::LastPageLen { req, value, page_size: kv.page_size, empty });
        }
    }
    let elems = |dim: usize| b.total_q().checked_mul(b.qo_heads).and_then(|x| x.checked_mul(dim)).filter(|&x| x <= MAX_ELEMS);
    let q_elems = elems(kv.head_dim_qk).ok_or(LayoutError::TooLarge { what: "query buffer [total_q, qo_heads, head_dim_qk]", value: u128::MAX, limit: "2^61 elements" })?;
    let o_elems = elems(kv.head_dim_vo).ok_or(LayoutError::TooLarge { what: "output buffer [total_q, qo_heads, head_dim_vo]", value: u128::MAX, limit: "2^61 elements" })?;
    Ok(ValidBatch { batch: *b, sizes, q_elems, o_elems, fingerprint: fp.finish() })
}

/// The largest page index as u32 (a negative index is 2^31 or more): the one pass over every
/// index that validation makes. With AVX2 (detected at run time) it takes 8 lanes and 4
/// accumulators; elsewhere the portable loop, which the compiler vectorises for the baseline
/// target (criterion, B = 256, 40K indices, development machine: validation 2.3 µs with AVX2,
/// 6.7 µs with the baseline, which has no unsigned max and emulates it).
fn max_index_u32(indices: &[i32]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above), the only requirement of the function.
        return unsafe { max_index_u32_avx2(indices) };
    }
    max_index_u32_portable(indices)
}

#[inline(always)]
fn max_index_u32_portable(indices: &[i32]) -> u32 {
    // Four independent accumulators over 64-index blocks, so the reduction is not one chain.
    let mut acc = [0u32; 64];
    let mut blocks = indices.chunks_exact(64);
    for b in &mut blocks {
        for (a, &i) in acc.iter_mut().zip(b) {
            *a = (*a).max(i as u32);
        }
    }
    let tail = blocks.remainder().iter().fold(0u32, |m, &i| m.max(i as u32));
    acc.iter().fold(tail, |m, &a| m.max(a))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn max_index_u32_avx2(indices: &[i32]) -> u32 {
    max_index_u32_portable(indices)
}

/// Validates a batch (see [`Batch::validated`]) and its buffers' lengths, in elements.
pub fn validate(b: &Batch<'_>, q_len: usize, k_len: usize, v_len: usize) -> Result<(), LayoutError> {
    b.validated()?.check_buffers(q_len, k_len, v_len)
}

/// A 64-bit hash of a batch's shape and per-request lengths (not a cryptographic one: it tells
/// a plan's batch from another by accident, not against an adversary — every index is still
/// validated).
struct Fingerprint(u64);

impl Fingerprint {
    fn new() -> Fingerprint {
        Fingerprint(0xcbf2_9ce4_8422_2325)
    }
    fn add(&mut self, x: u64) {
        self.0 = (self.0 ^ x).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(29);
    }
    fn finish(self) -> u64 {
        self.0
    }
}

/// A batch that [`Batch::validated`] accepted: its page table and query indptr are well formed
/// for its shape, and every size fits. Planners take it, so a step validates once.
#[derive(Debug, Clone, Copy)]
pub struct ValidBatch<'a> {
    batch: Batch<'a>,
    sizes: KvSizes,
    q_elems: usize,
    o_elems: usize,
    fingerprint: u64,
}

impl<'a> ValidBatch<'a> {
    /// A batch validated earlier (a device table's host copy), with what validation found.
    pub(crate) fn trusted(batch: Batch<'a>, sizes: KvSizes, q_elems: usize, o_elems: usize, fingerprint: u64) -> ValidBatch<'a> {
        ValidBatch { batch, sizes, q_elems, o_elems, fingerprint }
    }

    /// The batch.
    pub fn batch(&self) -> &Batch<'a> {
        &self.batch
    }

    /// The cache's sizes and strides, checked.
    pub fn sizes(&self) -> &KvSizes {
        &self.sizes
    }

    /// Elements of the query buffer `[total_q, qo_heads, head_dim_qk]`.
    pub fn q_elems(&self) -> usize {
        self.q_elems
    }

    /// Elements of the output buffer `[total_q, qo_heads, head_dim_vo]`.
    pub fn o_elems(&self) -> usize {
        self.o_elems
    }

    /// A hash of what a plan depends on (shape, per-request page counts, fills and query
    /// counts): a plan records its batch's, and a launch refuses a plan made for another batch.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// Checks buffer lengths (in elements) against the batch: the query buffer, and the K and V
    /// buffers (the whole shared buffer for both when interleaved).
    pub fn check_buffers(&self, q_len: usize, k_len: usize, v_len: usize) -> Result<(), LayoutError> {
        for (what, expected, got) in [
            ("query buffer length [total_q, qo_heads, head_dim_qk]", self.q_elems, q_len),
            ("K buffer length", self.sizes.k_len, k_len),
            ("V buffer length", self.sizes.v_len, v_len),
        ] {
            if expected != got {
                return Err(LayoutError::Mismatch { what, expected, got });
            }
        }
        Ok(())
    }
}

impl<'a> std::ops::Deref for ValidBatch<'a> {
    type Target = Batch<'a>;
    fn deref(&self) -> &Batch<'a> {
        &self.batch
    }
}

/// A batch that owns its index arrays (a [`Batch`] borrows them), for state kept across calls:
/// device tables and the two-call wrappers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedBatch {
    /// Query token offsets per request, `[batch + 1]`.
    pub qo_indptr: Vec<i32>,
    /// The page table.
    pub pages: PageTable,
    /// The cache's geometry.
    pub kv: KvShape,
    /// Query heads.
    pub qo_heads: usize,
}

impl OwnedBatch {
    /// A copy of `b`'s arrays.
    pub fn from_batch(b: &Batch<'_>) -> OwnedBatch {
        OwnedBatch { qo_indptr: b.qo_indptr.to_vec(), pages: b.pages.clone(), kv: b.kv, qo_heads: b.qo_heads }
    }

    /// The borrowed view.
    pub fn batch(&self) -> Batch<'_> {
        Batch { qo_indptr: &self.qo_indptr, pages: &self.pages, kv: self.kv, qo_heads: self.qo_heads }
    }
}
