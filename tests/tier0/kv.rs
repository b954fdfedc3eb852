//! Page-table and shape validation: every malformed batch is an error naming what is wrong.

use attnforge::kv::{validate, Batch, KvLayout, KvShape, LayoutError, PageTable};

fn shape() -> KvShape {
    KvShape { layout: KvLayout::Nhd, interleaved: true, num_pages: 6, page_size: 4, kv_heads: 2, head_dim_qk: 16, head_dim_vo: 16 }
}

/// A valid table: request 0 has 2 pages (6 tokens), request 1 is empty, request 2 has 1 page.
fn table() -> PageTable {
    PageTable { indptr: vec![0, 2, 2, 3], indices: vec![5, 0, 3], last_page_len: vec![2, 0, 4] }
}

fn run(t: &PageTable, qo: &[i32], kv: KvShape, qo_heads: usize) -> Result<(), LayoutError> {
    let b = Batch { qo_indptr: qo, pages: t, kv, qo_heads };
    let q_len = b.q_elems();
    validate(&b, q_len, kv.k_len(), kv.v_len())
}

const QO: [i32; 4] = [0, 1, 1, 2];

#[test]
fn a_valid_table_with_an_empty_request_passes() {
    run(&table(), &QO, shape(), 4).unwrap();
    let b = Batch { qo_indptr: &QO, pages: &table(), kv: shape(), qo_heads: 4 };
    assert_eq!((b.kv_len(0), b.kv_len(1), b.kv_len(2)), (6, 0, 4));
}

#[test]
fn every_malformed_table_is_rejected() {
    let cases: Vec<(PageTable, LayoutError)> = vec![
        (PageTable { indptr: vec![], indices: vec![], last_page_len: vec![] }, LayoutError::EmptyIndptr { what: "indptr" }),
        (PageTable { indptr: vec![1, 2, 2, 3], ..table() }, LayoutError::IndptrStart { what: "indptr", first: 1 }),
        (PageTable { indptr: vec![0, 2, 1, 3], ..table() }, LayoutError::NonMonotone { what: "indptr", at: 2, prev: 2, next: 1 }),
        (PageTable { indptr: vec![0, 2, 2, 4], ..table() }, LayoutError::IndptrEnd { what: "indptr", last: 4, len: 3 }),
        (PageTable { indices: vec![5, 6, 3], ..table() }, LayoutError::PageIndex { req: 0, pos: 1, index: 6, num_pages: 6 }),
        (PageTable { indices: vec![5, 0, -1], ..table() }, LayoutError::PageIndex { req: 2, pos: 2, index: -1, num_pages: 6 }),
        (PageTable { last_page_len: vec![0, 0, 4], ..table() }, LayoutError::LastPageLen { req: 0, value: 0, page_size: 4, empty: false }),
        (PageTable { last_page_len: vec![2, 0, 5], ..table() }, LayoutError::LastPageLen { req: 2, value: 5, page_size: 4, empty: false }),
        (PageTable { last_page_len: vec![2, 1, 4], ..table() }, LayoutError::LastPageLen { req: 1, value: 1, page_size: 4, empty: true }),
        (PageTable { last_page_len: vec![2, 0], ..table() }, LayoutError::Mismatch { what: "last_page_len length (batch size)", expected: 3, got: 2 }),
    ];
    for (t, want) in cases {
        assert_eq!(run(&t, &QO, shape(), 4), Err(want.clone()), "{want}");
        assert!(!want.to_string().is_empty());
    }
}

#[test]
fn malformed_query_indptr_is_rejected() {
    let t = table();
    assert_eq!(run(&t, &[0, 1, 2], shape(), 4), Err(LayoutError::Mismatch { what: "qo_indptr length (batch size + 1)", expected: 4, got: 3 }));
    assert_eq!(run(&t, &[0, 2, 1, 3], shape(), 4), Err(LayoutError::NonMonotone { what: "qo_indptr", at: 2, prev: 2, next: 1 }));
    assert_eq!(run(&t, &[1, 1, 2, 3], shape(), 4), Err(LayoutError::IndptrStart { what: "qo_indptr", first: 1 }));
}

#[test]
fn shapes_and_buffers_are_checked() {
    let t = table();
    assert_eq!(run(&t, &QO, shape(), 3), Err(LayoutError::HeadsNotDivisible { qo_heads: 3, kv_heads: 2 }));
    assert_eq!(run(&t, &QO, KvShape { page_size: 0, ..shape() }, 4), Err(LayoutError::Zero { what: "page_size" }));
    assert_eq!(run(&t, &QO, KvShape { kv_heads: 0, ..shape() }, 4), Err(LayoutError::Zero { what: "kv_heads" }));
    assert_eq!(run(&t, &QO, KvShape { head_dim_vo: 8, ..shape() }, 4), Err(LayoutError::InterleavedDims { qk: 16, vo: 8 }));
    let kv = shape();
    let b = Batch { qo_indptr: &QO, pages: &t, kv, qo_heads: 4 };
    let err = validate(&b, b.q_elems() - 1, kv.k_len(), kv.v_len()).unwrap_err();
    assert!(matches!(err, LayoutError::Mismatch { what, .. } if what.starts_with("query buffer")), "{err}");
    let err = validate(&b, b.q_elems(), kv.k_len() + 1, kv.v_len()).unwrap_err();
    assert!(matches!(err, LayoutError::Mismatch { what: "K buffer length", .. }), "{err}");
    assert!(err.to_string().contains("expected 1536, got 1537"), "{err}");
}

#[test]
fn offsets_follow_the_documented_layouts() {
    // [num_pages, 2, page_size, kv_heads, dim] and [num_pages, 2, kv_heads, page_size, dim].
    let nhd = shape();
    // A page of K and V together is 2 * 4 slots * 2 heads * 16 = 256 elements.
    assert_eq!(nhd.k_index(1, 2, 1), 256 + 2 * 32 + 16);
    assert_eq!(nhd.v_index(1, 2, 1), 256 + 128 + 2 * 32 + 16);
    let hnd = KvShape { layout: KvLayout::Hnd, ..shape() };
    assert_eq!(hnd.k_index(1, 2, 1), 256 + 64 + 2 * 16);
    assert_eq!(hnd.v_index(1, 2, 1), 256 + 128 + 64 + 2 * 16);
    // Separate buffers with different head dims (192/128).
    let sep = KvShape { interleaved: false, head_dim_qk: 192, head_dim_vo: 128, ..shape() };
    assert_eq!(sep.k_index(1, 0, 1), 4 * 2 * 192 + 192);
    assert_eq!(sep.v_index(1, 0, 1), 4 * 2 * 128 + 128);
    assert_eq!((sep.k_len(), sep.v_len()), (6 * 4 * 2 * 192, 6 * 4 * 2 * 128));
}

#[test]
fn npy_files_have_a_valid_header() {
    let dir = std::env::temp_dir().join(format!("attnforge-npy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("a.npy");
    attnforge::testing::npy::write(&p, &[2, 3], &[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
    let b = std::fs::read(&p).unwrap();
    assert_eq!(&b[..8], b"\x93NUMPY\x01\x00");
    let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
    assert_eq!((10 + hlen) % 64, 0);
    let header = std::str::from_utf8(&b[10..10 + hlen]).unwrap();
    assert!(header.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"), "{header}");
    assert_eq!(b.len(), 10 + hlen + 24);
    assert_eq!(f32::from_le_bytes(b[10 + hlen + 20..].try_into().unwrap()), 6.0);
    assert!(attnforge::testing::npy::write(&p, &[4], &[1i32, 2]).is_err());
}

#[test]
fn ragged_contiguous_kv_is_a_table_of_one_token_pages() {
    use attnforge::kv::KvLayout;
    let indptr = [0, 3, 3, 8];
    let t = PageTable::contiguous(&indptr);
    assert_eq!(t.indices, (0..8).collect::<Vec<i32>>());
    assert_eq!(t.last_page_len, vec![1, 0, 1]);
    let kv = KvShape { layout: KvLayout::Nhd, interleaved: false, num_pages: 8, page_size: 1, kv_heads: 2, head_dim_qk: 16, head_dim_vo: 16 };
    // Token t of head h starts at (t * kv_heads + h) * head_dim, as in a contiguous [total, heads, dim].
    assert_eq!(kv.k_index(5, 0, 1), (5 * 2 + 1) * 16);
    let b = Batch { qo_indptr: &[0, 1, 1, 2], pages: &t, kv, qo_heads: 2 };
    b.validate(b.q_elems(), kv.k_len(), kv.v_len()).unwrap();
    assert_eq!((b.kv_len(0), b.kv_len(1), b.kv_len(2)), (3, 0, 5));
}

/// Positions must stay far from i32 overflow: a request longer than 2^30 tokens is an error.
#[test]
fn requests_longer_than_2_pow_30_tokens_are_rejected() {
    let page_size = 1 << 20;
    let kv = KvShape { page_size, num_pages: 1, ..shape() };
    // 1025 pages of 2^20 tokens: 2^30 + 2^20 KV tokens (every page may alias page 0).
    let long = PageTable { indptr: vec![0, 1025], indices: vec![0; 1025], last_page_len: vec![page_size as i32] };
    assert_eq!(run(&long, &[0, 1], kv, 4), Err(LayoutError::TooLong { req: 0, what: "KV", len: (1 << 30) + (1 << 20) }));
    // Exactly 2^30 is fine.
    let edge = PageTable { indptr: vec![0, 1024], ..long.clone() };
    let edge = PageTable { indices: vec![0; 1024], ..edge };
    assert_eq!(run(&edge, &[0, 1], kv, 4), Ok(()));
}

/// Regression (hardening audit, item 7): `num_pages = 2^62` made `k_len()` wrap to 0, so an
/// empty buffer validated and the reference indexed out of bounds. Every size is computed with
/// checked arithmetic in `KvShape::sizes`, and the lengths saturate instead of wrapping.
#[test]
fn sizes_that_overflow_are_errors_not_wrapped_lengths() {
    let t = table();
    let kv = KvShape { num_pages: 1 << 62, ..shape() };
    assert_eq!(kv.k_len(), usize::MAX, "saturates, never wraps");
    let b = Batch { qo_indptr: &QO, pages: &t, kv, qo_heads: 4 };
    for len in [0, kv.k_len()] {
        let err = validate(&b, b.q_elems(), len, len).unwrap_err();
        assert!(matches!(err, LayoutError::TooLarge { what, .. } if what.starts_with("K buffer")), "{err}");
        assert!(err.to_string().contains("limit"), "{err}");
    }
}

/// Regression (hardening audit, item 7): 2^40 heads × head dim 2^24 aborted on a 4 TB
/// allocation (the sizes wrapped past validation). Now an error before anything is allocated,
/// in validation and in the reference.
#[test]
fn heads_times_head_dim_that_overflow_are_errors() {
    let t = table();
    let kv = KvShape { kv_heads: 1 << 40, head_dim_qk: 1 << 24, head_dim_vo: 1 << 24, ..shape() };
    let b = Batch { qo_indptr: &QO, pages: &t, kv, qo_heads: 1 << 40 };
    let err = validate(&b, 0, 0, 0).unwrap_err();
    assert!(matches!(err, LayoutError::TooLarge { .. }), "{err}");
    let v = attnforge::spec::shipped::resolve("default").unwrap();
    let p = attnforge::spec::params::ParamValues::default();
    let e = attnforge::reference::attention::<f32>(&v, &p, &b, &[], &[], &[], None).unwrap_err();
    assert!(e.to_string().contains("limit"), "{e}");
}

/// Regression (hardening audit, item 7): an HND cache with page size 2^27, 2 KV heads and d 16
/// passed validation and the planners, and the engine cast the head stride (2^31) to i32,
/// giving −2^31: a GPU fault. Strides beyond the kernels' i32 index are an error naming it.
#[test]
fn a_head_stride_beyond_the_kernels_index_is_an_error_naming_the_limit() {
    let kv = KvShape { layout: KvLayout::Hnd, interleaved: true, num_pages: 1, page_size: 1 << 27, kv_heads: 2, head_dim_qk: 16, head_dim_vo: 16 };
    let t = PageTable { indptr: vec![0, 1], indices: vec![0], last_page_len: vec![5] };
    let qo = [0, 1];
    let b = Batch { qo_indptr: &qo, pages: &t, kv, qo_heads: 2 };
    // The lengths are right (nothing is allocated): only the stride is refused.
    let err = validate(&b, b.q_elems(), kv.k_len(), kv.v_len()).unwrap_err();
    assert_eq!(err, LayoutError::TooLarge { what: "K head stride", value: 1 << 31, limit: "2^31 - 1 elements, the kernels' i32 index" });
    assert!(err.to_string().contains("K head stride is 2147483648; the limit is 2^31 - 1"), "{err}");
    // The same page size in NHD has small strides and a page stride the kernels take in 64 bits.
    let nhd = KvShape { layout: KvLayout::Nhd, ..kv };
    let b = Batch { qo_indptr: &qo, pages: &t, kv: nhd, qo_heads: 2 };
    validate(&b, b.q_elems(), nhd.k_len(), nhd.v_len()).unwrap();
    // A page size beyond i32 is refused on its own.
    let huge = KvShape { page_size: 1 << 31, ..nhd };
    assert!(matches!(huge.sizes(), Err(LayoutError::TooLarge { what: "page_size", .. })));
}

/// Regression (hardening audit, item 10): `PageTable::from_lens(&[5], 0, …)` divided by zero.
#[test]
fn from_lens_rejects_a_zero_page_size_and_a_short_page_supply() {
    assert_eq!(PageTable::from_lens(&[5], 0, &mut (0..)).unwrap_err(), LayoutError::Zero { what: "page_size" });
    let err = PageTable::from_lens(&[40, 40], 16, &mut (0..4)).unwrap_err();
    assert!(matches!(err, LayoutError::Mismatch { what: "pages yielded by the page iterator", expected: 6, got: 4 }), "{err}");
    let t = PageTable::from_lens(&[0, 17, 16], 16, &mut (0..)).unwrap();
    assert_eq!((t.indptr, t.last_page_len), (vec![0, 0, 2, 3], vec![0, 1, 16]));
    let err = PageTable::from_lens(&[5], 1, &mut [1usize << 40].into_iter()).unwrap_err();
    assert!(matches!(err, LayoutError::TooLarge { what: "page index", .. }), "{err}");
}

/// A batch is validated once (`Batch::validated`), which also fingerprints what a plan depends
/// on; buffers are then checked in O(1). A plan records the fingerprint and a launch refuses a
/// plan made for another batch.
#[test]
fn a_validated_batch_checks_buffers_and_tells_batches_apart() {
    let t = table();
    let b = Batch { qo_indptr: &QO, pages: &t, kv: shape(), qo_heads: 4 };
    let v = b.validated().unwrap();
    let kv = shape();
    v.check_buffers(v.q_elems(), kv.k_len(), kv.v_len()).unwrap();
    assert!(v.check_buffers(v.q_elems() + 1, kv.k_len(), kv.v_len()).is_err());
    assert_eq!(v.o_elems(), 2 * 4 * 16);
    // The same lengths in other pages: the same plan applies. Another fill: it does not.
    let moved = PageTable { indices: vec![1, 2, 4], ..table() };
    let same = Batch { qo_indptr: &QO, pages: &moved, kv: shape(), qo_heads: 4 };
    assert_eq!(same.validated().unwrap().fingerprint(), v.fingerprint());
    let refilled = PageTable { last_page_len: vec![3, 0, 4], ..table() };
    let other = Batch { qo_indptr: &QO, pages: &refilled, kv: shape(), qo_heads: 4 };
    assert_ne!(other.validated().unwrap().fingerprint(), v.fingerprint());
    let more_q = [0, 1, 1, 3];
    assert_ne!(Batch { qo_indptr: &more_q, pages: &t, kv: shape(), qo_heads: 4 }.validated().unwrap().fingerprint(), v.fingerprint());
    assert_ne!(Batch { qo_indptr: &QO, pages: &t, kv: shape(), qo_heads: 2 }.validated().unwrap().fingerprint(), v.fingerprint());
}

/// The one-pass index check (8-lane blocks of 64 indices with a scalar tail) finds a bad index
/// wherever it sits — in a block, in the tail, first or last — whether it is negative, just past
/// the cache or far past it, and names its request and position.
#[test]
fn a_bad_page_index_is_found_at_every_position_of_long_tables() {
    for total in [1usize, 63, 64, 65, 130, 1000] {
        let pages = 2000usize;
        // One request per 7 pages (the last one shorter).
        let mut indptr = vec![0i32];
        while (*indptr.last().unwrap() as usize) < total {
            indptr.push((*indptr.last().unwrap() as usize + 7).min(total) as i32);
        }
        let batch = indptr.len() - 1;
        let kv = KvShape { num_pages: pages, ..shape() };
        let qo: Vec<i32> = (0..=batch as i32).collect();
        for pos in [0, total / 2, total.saturating_sub(2), total - 1] {
            for bad in [-1, i32::MIN, pages as i32, i32::MAX] {
                let mut indices: Vec<i32> = (0..total as i32).map(|i| (i * 13) % pages as i32).collect();
                indices[pos] = bad;
                let t = PageTable { indptr: indptr.clone(), indices, last_page_len: vec![4; batch] };
                let req = indptr.iter().rposition(|&p| p as usize <= pos).unwrap();
                assert_eq!(run(&t, &qo, kv, 4), Err(LayoutError::PageIndex { req, pos, index: bad, num_pages: pages }), "total {total} pos {pos} bad {bad}");
            }
        }
        let good = PageTable { indptr: indptr.clone(), indices: (0..total as i32).map(|i| (i * 13) % pages as i32).collect(), last_page_len: vec![4; batch] };
        run(&good, &qo, kv, 4).unwrap();
    }
}
