//! Random workloads: ragged batches over a paged cache with permuted pages, for the CLI, the
//! demo and the tests. Values are drawn uniformly from `[-1, 1]`, never zeros.

use rand::seq::SliceRandom;
use rand::Rng;

use crate::kv::{Batch, Element, KvLayout, KvShape, PageTable};

/// The shape of a random workload.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadSpec {
    /// `(q_len, kv_len)` per request.
    pub lens: Vec<(usize, usize)>,
    pub qo_heads: usize,
    pub kv_heads: usize,
    pub head_dim_qk: usize,
    pub head_dim_vo: usize,
    pub page_size: usize,
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
    pub qo_indptr: Vec<i32>,
    pub pages: PageTable,
    pub kv: KvShape,
    pub qo_heads: usize,
    pub q: Vec<T>,
    pub k: Vec<T>,
    /// Empty when the cache is interleaved (`k` holds both).
    pub v: Vec<T>,
}

impl<T: Element> Workload<T> {
    pub fn random(spec: &WorkloadSpec, rng: &mut impl Rng) -> Self {
        let kv_lens: Vec<usize> = spec.lens.iter().map(|l| l.1).collect();
        let needed: usize = kv_lens.iter().map(|l| l.div_ceil(spec.page_size)).sum();
        let num_pages = needed + spec.spare_pages;
        let mut order: Vec<usize> = (0..num_pages).collect();
        if spec.permute {
            order.shuffle(rng);
        }
        let pages = PageTable::from_lens(&kv_lens, spec.page_size, &mut order.into_iter());
        let mut qo_indptr = vec![0i32];
        for &(q, _) in &spec.lens {
            qo_indptr.push(qo_indptr.last().copied().unwrap_or(0) + q as i32);
        }
        let kv = KvShape {
            layout: spec.layout,
            interleaved: spec.interleaved,
            num_pages,
            page_size: spec.page_size,
            kv_heads: spec.kv_heads,
            head_dim_qk: spec.head_dim_qk,
            head_dim_vo: spec.head_dim_vo,
        };
        let total_q = *qo_indptr.last().unwrap_or(&0) as usize;
        let mut fill = |n: usize| -> Vec<T> { (0..n).map(|_| T::from_f32(rng.random_range(-1.0..1.0))).collect() };
        let q = fill(total_q * spec.qo_heads * spec.head_dim_qk);
        let k = fill(kv.k_len());
        let v = if spec.interleaved { Vec::new() } else { fill(kv.v_len()) };
        Workload { qo_indptr, pages, kv, qo_heads: spec.qo_heads, q, k, v }
    }

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
