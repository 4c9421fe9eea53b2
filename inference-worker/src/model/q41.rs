//! Q4_1 projections (llama.cpp's 4-bit blocks with a minimum: SmolLM2's GGUF) with an AVX2
//! kernel. candle 0.11 has none for Q4_1 on x86 and takes a scalar loop: 62 % of a SmolLM2
//! decode step in a profile, and why both candle-transformers and the worker ran it at a sixth
//! of llama.cpp's speed.
//!
//! A block holds 32 weights `w_i = d·q_i + m` (`q_i` in 0..16; `d`, `m` f16). Each input row is
//! quantized per 32-block as candle's (and llama.cpp's) Q8_1 does: `x_i ≈ d8·p_i`, `p_i` in
//! -127..=127, `s8 = d8·Σp_i`, both rounded through f16 as candle stores them. Then
//! `Σ w_i·x_i ≈ d·d8·Σ q_i·p_i + m·s8`: the integer sums are candle's exactly; only the order
//! of the float sums differs. Each output element depends only on its input row and weight row,
//! so a row's result is the same in any batch.

use crate::error::{Error, Result};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use half::f16;
use rayon::prelude::*;

/// Weights per block.
const QK: usize = 32;
/// Bytes per stored block: d, m (f16 each), 16 bytes of nibbles.
const BLOCK_BYTES: usize = 20;
/// Weight rows per parallel task.
const ROWS_PER_TASK: usize = 16;

/// A Q4_1 weight `(out, in)` unpacked once at load: the scales as f32 beside the nibbles.
pub struct Q41Matrix {
    out: usize,
    cols: usize,
    /// Per block: `[d, m]`.
    scales: Vec<[f32; 2]>,
    /// Per block: byte `j` holds weight `j` (low nibble) and weight `j + 16` (high nibble).
    nibbles: Vec<[u8; 16]>,
}

/// One 32-block of an input row, quantized.
#[derive(Clone, Copy)]
struct Q8Block {
    d: f32,
    s: f32,
    qs: [i8; QK],
}

impl Q41Matrix {
    /// `q` unpacked, when it is a Q4_1 matrix on the CPU whose rows are whole blocks.
    pub fn from_qtensor(q: &QTensor) -> Result<Option<Self>> {
        if q.dtype() != GgmlDType::Q4_1 || !q.device().is_cpu() {
            return Ok(None);
        }
        let (out, cols) = q.shape().dims2()?;
        if cols % QK != 0 {
            return Ok(None);
        }
        let data = q.data()?;
        let blocks = out * cols / QK;
        if data.len() != blocks * BLOCK_BYTES {
            return Err(Error::Unsupported(format!(
                "Q4_1 tensor ({out}, {cols}): {} bytes, expected {}",
                data.len(),
                blocks * BLOCK_BYTES
            )));
        }
        let (mut scales, mut nibbles) = (Vec::with_capacity(blocks), Vec::with_capacity(blocks));
        for b in data.chunks_exact(BLOCK_BYTES) {
            let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
            let m = f16::from_le_bytes([b[2], b[3]]).to_f32();
            scales.push([d, m]);
            let mut n = [0u8; 16];
            n.copy_from_slice(&b[4..]);
            nibbles.push(n);
        }
        Ok(Some(Self {
            out,
            cols,
            scales,
            nibbles,
        }))
    }

    /// `xs · wᵀ` for f32 `xs` of shape `(..., in)`; the result is `(..., out)`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dims = xs.dims();
        if dims.last() != Some(&self.cols) {
            return Err(Error::Candle(candle_core::Error::Msg(format!(
                "Q4_1 matmul: input {dims:?}, weight ({}, {})",
                self.out, self.cols
            ))));
        }
        let rows = xs.elem_count() / self.cols;
        let x: Vec<f32> = xs.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let y = self.matmul(&x, rows);
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("checked above") = self.out;
        Ok(Tensor::from_vec(y, shape, &Device::Cpu)?)
    }

    /// `(rows, out)` row-major for `x` `(rows, in)` row-major.
    fn matmul(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let per_row = self.cols / QK;
        let acts: Vec<Q8Block> = x.chunks_exact(QK).map(quantize_block).collect();
        let kernel = Kernel::detect();
        // Each task computes ROWS_PER_TASK weight rows against every input row.
        let parts: Vec<Vec<f32>> = (0..self.out.div_ceil(ROWS_PER_TASK))
            .into_par_iter()
            .map(|t| {
                let js = t * ROWS_PER_TASK..((t + 1) * ROWS_PER_TASK).min(self.out);
                let mut part = Vec::with_capacity(js.len() * rows);
                for j in js {
                    let w = j * per_row..(j + 1) * per_row;
                    let (scales, nibbles) = (&self.scales[w.clone()], &self.nibbles[w]);
                    for r in 0..rows {
                        let a = &acts[r * per_row..(r + 1) * per_row];
                        part.push(kernel.dot(scales, nibbles, a));
                    }
                }
                part
            })
            .collect();
        let mut y = vec![0f32; rows * self.out];
        for (t, part) in parts.iter().enumerate() {
            for (i, v) in part.iter().enumerate() {
                let (j, r) = (t * ROWS_PER_TASK + i / rows, i % rows);
                y[r * self.out + j] = *v;
            }
        }
        y
    }
}

/// candle's `BlockQ8_1::from_float` for one block: values scaled by the f32 scale's inverse,
/// the scale and the sum then stored as f16.
fn quantize_block(x: &[f32]) -> Q8Block {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; QK];
    let mut sum = 0i32;
    for (q, v) in qs.iter_mut().zip(x) {
        *q = (v * id).round() as i8;
        sum += *q as i32;
    }
    let d = f16::from_f32(d);
    Q8Block {
        d: d.to_f32(),
        s: (f16::from_f32(sum as f32) * d).to_f32(),
        qs,
    }
}

/// The dot product this CPU runs: AVX2 + FMA on x86-64 where present, else scalar (Arm, old
/// x86).
#[derive(Clone, Copy)]
enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2(pulp::x86::V3),
}

impl Kernel {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if let Some(simd) = pulp::x86::V3::try_new() {
            return Self::Avx2(simd);
        }
        Self::Scalar
    }

    fn dot(self, scales: &[[f32; 2]], nibbles: &[[u8; 16]], acts: &[Q8Block]) -> f32 {
        match self {
            Self::Scalar => dot_scalar(scales, nibbles, acts),
            #[cfg(target_arch = "x86_64")]
            Self::Avx2(simd) => dot_v3(simd, scales, nibbles, acts),
        }
    }
}

fn dot_scalar(scales: &[[f32; 2]], nibbles: &[[u8; 16]], acts: &[Q8Block]) -> f32 {
    let mut acc = 0f32;
    for ((s, n), a) in scales.iter().zip(nibbles).zip(acts) {
        let mut isum = 0i32;
        for (j, b) in n.iter().enumerate() {
            isum += (b & 0x0F) as i32 * a.qs[j] as i32 + (b >> 4) as i32 * a.qs[j + 16] as i32;
        }
        acc += block_term(isum, s, a);
    }
    acc
}

/// A block's share of the dot product, in candle's order of operations: with the integer sum
/// exact, the result is bitwise candle's (and so candle-transformers' on the same file).
#[inline(always)]
fn block_term(isum: i32, s: &[f32; 2], a: &Q8Block) -> f32 {
    isum as f32 * s[0] * a.d + s[1] * a.s
}

/// The AVX2 dot product: per block, the 32 nibble-by-byte products summed in pairs (maddubs),
/// in fours (madd) and then across the 8 lanes, exactly, in integers; the float part as
/// [`dot_scalar`] does it.
#[cfg(target_arch = "x86_64")]
fn dot_v3(simd: pulp::x86::V3, scales: &[[f32; 2]], nibbles: &[[u8; 16]], acts: &[Q8Block]) -> f32 {
    use std::arch::x86_64::{__m128i, __m256i};
    simd.vectorize(|| {
        let low = simd.sse2._mm_set1_epi8(0x0F);
        let ones = simd.avx._mm256_set1_epi16(1);
        let mut acc = 0f32;
        for ((s, n), a) in scales.iter().zip(nibbles).zip(acts) {
            let q: __m128i = pulp::cast(*n);
            let lo = simd.sse2._mm_and_si128(q, low);
            let hi = simd
                .sse2
                ._mm_and_si128(simd.sse2._mm_srli_epi16::<4>(q), low);
            let w = simd.avx._mm256_set_m128i(hi, lo);
            let x: __m256i = pulp::cast(a.qs);
            let pairs = simd.avx2._mm256_maddubs_epi16(w, x);
            let fours = simd.avx2._mm256_madd_epi16(pairs, ones);
            let halves = simd.sse2._mm_add_epi32(
                simd.avx2._mm256_extracti128_si256::<1>(fours),
                simd.avx._mm256_castsi256_si128(fours),
            );
            let lanes: [i32; 4] = pulp::cast(halves);
            acc += block_term(lanes.iter().sum(), s, a);
        }
        acc
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Module;
    use candle_core::quantized::QMatMul;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        crate::model::layers::tests::values(n, seed)
    }

    fn q41(out: usize, cols: usize) -> QTensor {
        let w = Tensor::from_vec(values(out * cols, 3), (out, cols), &Device::Cpu).unwrap();
        QTensor::quantize(&w, GgmlDType::Q4_1).unwrap()
    }

    #[test]
    fn is_bitwise_candles_q4_1_matmul() {
        let (out, cols) = (67, 128);
        let q = q41(out, cols);
        let ours = Q41Matrix::from_qtensor(&q).unwrap().expect("a Q4_1 matrix");
        let candle = QMatMul::from_qtensor(q).unwrap();
        for rows in [1, 3, 8] {
            let x = Tensor::from_vec(values(rows * cols, 9), (rows, cols), &Device::Cpu).unwrap();
            let a: Vec<f32> = ours
                .forward(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let b: Vec<f32> = candle
                .forward(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (i, (p, q)) in a.iter().zip(&b).enumerate() {
                assert!(
                    (p - q).abs() <= 1e-5 * scale,
                    "rows {rows}, element {i}: {p} vs {q}"
                );
            }
        }
    }

    #[test]
    fn a_row_is_bitwise_the_same_alone_and_in_a_batch() {
        let (out, cols) = (40, 64);
        let m = Q41Matrix::from_qtensor(&q41(out, cols)).unwrap().unwrap();
        let x = values(5 * cols, 4);
        let batch = m.matmul(&x, 5);
        for r in 0..5 {
            let alone = m.matmul(&x[r * cols..(r + 1) * cols], 1);
            assert_eq!(alone, batch[r * out..(r + 1) * out], "row {r}");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_simd_kernel_is_bitwise_the_scalar_one() {
        let Some(simd) = pulp::x86::V3::try_new() else {
            return;
        };
        let m = Q41Matrix::from_qtensor(&q41(8, 128)).unwrap().unwrap();
        let acts: Vec<Q8Block> = values(128, 5)
            .chunks_exact(QK)
            .map(quantize_block)
            .collect();
        for j in 0..8 {
            let w = j * 4..(j + 1) * 4;
            let (s, n) = (&m.scales[w.clone()], &m.nibbles[w]);
            let (a, b) = (dot_v3(simd, s, n, &acts), dot_scalar(s, n, &acts));
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "row {j}: {a} vs {b}"
            );
        }
    }

    #[test]
    fn other_types_and_ragged_rows_are_left_to_candle() {
        let w = Tensor::from_vec(values(4 * 64, 1), (4, 64), &Device::Cpu).unwrap();
        let q8 = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        assert!(Q41Matrix::from_qtensor(&q8).unwrap().is_none());
    }
}
