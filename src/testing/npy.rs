//! A minimal `.npy` (format 1.0) writer, so `attnforge run --dump` output opens in NumPy or any
//! other tool. Only what the dumps need: little-endian f32 and i32 arrays.

use std::io::Write;
use std::path::Path;

/// Element types that can be written.
pub trait NpyElem: Copy {
    /// Its `.npy` dtype descriptor.
    const DESCR: &'static str;
    /// Its little-endian bytes.
    fn le_bytes(self) -> [u8; 4];
}

impl NpyElem for f32 {
    const DESCR: &'static str = "<f4";
    fn le_bytes(self) -> [u8; 4] {
        self.to_le_bytes()
    }
}

impl NpyElem for i32 {
    const DESCR: &'static str = "<i4";
    fn le_bytes(self) -> [u8; 4] {
        self.to_le_bytes()
    }
}

/// Writes `data` with the given shape (the product of `shape` must equal `data.len()`).
pub fn write<T: NpyElem>(path: &Path, shape: &[usize], data: &[T]) -> std::io::Result<()> {
    let count: usize = shape.iter().product();
    if count != data.len() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{}: shape {shape:?} holds {count} elements, got {}", path.display(), data.len())));
    }
    let dims = match shape {
        [n] => format!("({n},)"),
        _ => format!("({})", shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let mut header = format!("{{'descr': '{}', 'fortran_order': False, 'shape': {dims}, }}", T::DESCR);
    // Magic (6) + version (2) + length (2) + header + '\n' is a multiple of 64.
    let pad = 64 - (10 + header.len() + 1) % 64;
    header.push_str(&" ".repeat(pad % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + 4 * data.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for x in data {
        out.extend_from_slice(&x.le_bytes());
    }
    std::fs::File::create(path)?.write_all(&out)
}
