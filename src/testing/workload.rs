//! Random workloads: ragged batches over a paged cache with permuted pages, for the CLI, the
//! demo and the tests. Values are drawn uniformly from `[-1, 1]`, never zeros.

use rand::seq::SliceRandom;
use rand::Rng;

use crate::kv::{Batch, Element, KvLayout, KvShape, LayoutError, PageTable, MAX_KERNEL_INDEX, MAX_TOKENS};
use crate::{Error, Result};

/// The shape of a random workload.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadSpec {
    /// `(q_len, kv_len)` per request.
    pub lens: Vec<(usize, usize)>,
    /// Query heads.
    pub qo_heads: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// Query and key head dim.
    pub head_dim_qk: usize,
    /// Value head dim.
    pub head_dim_vo: usize,
    /// Token slots per page.
    pub page_size: usize,
    /// Token- or head-major pages.
    pub layout: KvLayout,
    /// Use one `[num_pages, 2, …]` buffer (needs equal head dims).
    pub interleaved: bool,
    /// Scatter pages randomly over the cache instead of in order.
    pub permute: bool,
    /// Unused pages in the cache beyond those the table needs.
    pub spare_pages: usize,
}

/// A generated batch with its buffers.
#[derive(Debug, Clone)]
pub struct Workload<T> {
    /// Query token offsets.
    pub qo_indptr: Vec<i32>,
    /// The page table.
    pub pages: PageTable,
    /// The cache's geometry.
    pub kv: KvShape,
    /// Query heads.
    pub qo_heads: usize,
    /// Queries.
    pub q: Vec<T>,
    /// The K buffer (the whole cache when interleaved).
    pub k: Vec<T>,
    /// Empty when the cache is interleaved (`k` holds both).
    pub v: Vec<T>,
}

impl WorkloadSpec {
    /// The cache's shape and the query count, checked before anything is allocated: request
    /// lengths within [`MAX_TOKENS`], page and token counts within the i32 indices, every buffer
    /// size without overflow ([`KvShape::sizes`]).
    pub fn shape(&self) -> Result<(KvShape, usize)> {
        let limit = "2^31 - 1 (i32 indices)";
        let (mut pages, mut total_q) = (0usize, 0usize);
        if self.page_size == 0 {
            return Err(LayoutError::Zero { what: "page_size" }.into());
        }
        for (req, &(q, kv)) in self.lens.iter().enumerate() {
            for (what, len) in [("query", q), ("KV", kv)] {
                if len > MAX_TOKENS {
                    return Err(LayoutError::TooLong { req, what, len: len as u64 }.into());
                }
            }
            pages = pages.checked_add(kv.div_ceil(self.page_size)).filter(|&p| p <= MAX_KERNEL_INDEX).ok_or(LayoutError::TooLarge { what: "pages in the cache", value: u128::MAX, limit })?;
            total_q = total_q.checked_add(q).filter(|&t| t <= MAX_KERNEL_INDEX).ok_or(LayoutError::TooLarge { what: "query tokens in the batch", value: u128::MAX, limit })?;
        }
        let num_pages = pages.checked_add(self.spare_pages).filter(|&p| p <= MAX_KERNEL_INDEX).ok_or(LayoutError::TooLarge { what: "pages in the cache", value: u128::MAX, limit })?;
        let kv = KvShape {
            layout: self.layout,
            interleaved: self.interleaved,
            num_pages,
            page_size: self.page_size,
            kv_heads: self.kv_heads,
            head_dim_qk: self.head_dim_qk,
            head_dim_vo: self.head_dim_vo,
        };
        kv.sizes()?;
        if self.qo_heads == 0 {
            return Err(LayoutError::Zero { what: "qo_heads" }.into());
        }
        if self.qo_heads > MAX_KERNEL_INDEX {
            return Err(LayoutError::TooLarge { what: "qo_heads", value: self.qo_heads as u128, limit: "2^31 - 1, the kernels' i32 index" }.into());
        }
        if self.qo_heads % self.kv_heads != 0 {
            return Err(LayoutError::HeadsNotDivisible { qo_heads: self.qo_heads, kv_heads: self.kv_heads }.into());
        }
        Ok((kv, total_q))
    }
}

/// Room for `n` elements, or an error (never an abort) when it cannot be allocated.
fn reserved<T>(what: &str, n: usize) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| Error::UnsupportedConfig(format!("cannot allocate the {what}: {n} elements of {} bytes", std::mem::size_of::<T>())))?;
    Ok(v)
}

impl<T: Element> Workload<T> {
    /// Makes every request start with request 0's pages for the first `n` tokens (whole pages
    /// only, at most each request's full pages): one shared prefix, as a prefix cache gives.
    pub fn share_prefix(&mut self, n: usize) {
        if self.pages.batch_size() == 0 {
            return;
        }
        let ps = self.kv.page_size.max(1);
        let full0 = self.pages.kv_len(0, ps) / ps;
        let first: Vec<i32> = self.pages.pages(0)[..(n / ps).min(full0)].to_vec();
        for b in 1..self.pages.batch_size() {
            let k = first.len().min(self.pages.kv_len(b, ps) / ps);
            let at = self.pages.indptr[b] as usize;
            self.pages.indices[at..at + k].copy_from_slice(&first[..k]);
        }
    }

    /// Random shared prefixes, nested like a trie's: each request after the first may take a
    /// random number of leading full pages from a random earlier request (which may have taken
    /// its own from another). Only full pages of both are shared.
    pub fn share_random_prefixes(&mut self, rng: &mut impl Rng) {
        let ps = self.kv.page_size.max(1);
        for b in 1..self.pages.batch_size() {
            if rng.random_bool(0.2) {
                continue;
            }
            let a = rng.random_range(0..b);
            let most = (self.pages.kv_len(a, ps) / ps).min(self.pages.kv_len(b, ps) / ps);
            if most == 0 {
                continue;
            }
            let k = if rng.random_bool(0.5) { most } else { rng.random_range(1..=most) };
            let src: Vec<i32> = self.pages.pages(a)[..k].to_vec();
            let at = self.pages.indptr[b] as usize;
            self.pages.indices[at..at + k].copy_from_slice(&src);
        }
    }

    /// A random workload of this shape; a shape that overflows, or whose buffers cannot be
    /// allocated, is an error before anything large is allocated.
    pub fn random(spec: &WorkloadSpec, rng: &mut impl Rng) -> Result<Self> {
        let (kv, total_q) = spec.shape()?;
        let kv_lens: Vec<usize> = spec.lens.iter().map(|l| l.1).collect();
        let q_elems = total_q.checked_mul(spec.qo_heads).and_then(|x| x.checked_mul(spec.head_dim_qk));
        let q_elems = q_elems.ok_or(LayoutError::TooLarge { what: "query buffer", value: u128::MAX, limit: "2^64 elements" })?;
        // Everything is reserved before anything is drawn; values are drawn in a fixed order
        // (pages, then q, k, v), so a seed always gives the same workload.
        let (mut q, mut k) = (reserved::<T>("query buffer", q_elems)?, reserved::<T>(if spec.interleaved { "KV cache" } else { "K cache" }, kv.k_len())?);
        let mut v = reserved::<T>("V cache", if spec.interleaved { 0 } else { kv.v_len() })?;
        let mut order = reserved::<usize>("page order", kv.num_pages)?;
        order.extend(0..kv.num_pages);
        if spec.permute {
            order.shuffle(rng);
        }
        let mut fill = |buf: &mut Vec<T>, n: usize| buf.extend((0..n).map(|_| T::from_f32(rng.random_range(-1.0..1.0))));
        fill(&mut q, q_elems);
        fill(&mut k, kv.k_len());
        if !spec.interleaved {
            fill(&mut v, kv.v_len());
        }
        let pages = PageTable::from_lens(&kv_lens, spec.page_size, &mut order.into_iter())?;
        let mut qo_indptr = vec![0i32];
        for &(q, _) in &spec.lens {
            // Fits: total_q <= i32::MAX was checked.
            qo_indptr.push(qo_indptr.last().copied().unwrap_or(0) + q as i32);
        }
        Ok(Workload { qo_indptr, pages, kv, qo_heads: spec.qo_heads, q, k, v })
    }

    /// The batch description.
    pub fn batch(&self) -> Batch<'_> {
        Batch { qo_indptr: &self.qo_indptr, pages: &self.pages, kv: self.kv, qo_heads: self.qo_heads }
    }

    /// The V buffer (the shared buffer when interleaved).
    pub fn v(&self) -> &[T] {
        if self.kv.interleaved {
            &self.k
        } else {
            &self.v
        }
    }
}
