//! Q4_1 projections (llama.cpp's 4-bit blocks with a minimum: SmolLM2's GGUF) with an AVX2
//! kernel. candle 0.11 has none for Q4_1 on x86 and takes a scalar loop: 62 % of a SmolLM2
//! decode step in a profile, and why both candle-transformers and the worker ran it at a sixth
//! of llama.cpp's speed.
//!
//! A block holds 32 weights `w_i = d·q_i + m` (`q_i` in 0..16; `d`, `m` f16). Each input row is
//! quantized per 32-block as candle's (and llama.cpp's) Q8_1 does: `x_i ≈ d8·p_i`, `p_i` in
//! -127..=127, `s8 = d8·Σp_i`, both rounded through f16 as candle stores them. Then
//! `Σ w_i·x_i ≈ d·d8·Σ q_i·p_i + m·s8`: the integer sums are candle's exactly and the float
//! operations are candle's in candle's order, so the results are bitwise candle's (a quantized
//! model amplifies any other order: each layer's activations are re-quantized, and a rounding
//! flipped there moves the logits). Each output element depends only on its input row and
//! weight row, so a row's result is the same in any batch.

use crate::error::{Error, Result};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use half::f16;

/// Weights per block.
const QK: usize = 32;
/// Bytes per stored block: d, m (f16 each), 16 bytes of nibbles.
const BLOCK_BYTES: usize = 20;
/// Weight rows stored interleaved and computed together: one activation block is loaded once
/// for all of them, their integer sums are reduced across lanes together, and the float part
/// runs on one vector whose lanes are the rows (each lane's operations those of the scalar
/// loop, so the results stay bitwise).
const GROUP: usize = 8;

/// A Q4_1 weight `(out, in)` unpacked once at load into groups of [`GROUP`] rows (the last
/// padded with zero rows), block by block.
pub struct Q41Matrix {
    out: usize,
    cols: usize,
    /// `group * blocks_per_row + block`.
    blocks: Vec<GroupBlock>,
}

/// One 32-block of each of [`GROUP`] weight rows.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct GroupBlock {
    /// Per row: `d`, as f32.
    d: [f32; GROUP],
    /// Per row: `m`, as f32.
    m: [f32; GROUP],
    /// Per row: byte `j` holds weight `j` (low nibble) and weight `j + 16` (high nibble).
    nibbles: [[u8; 16]; GROUP],
}

const ZERO_BLOCK: GroupBlock = GroupBlock {
    d: [0.0; GROUP],
    m: [0.0; GROUP],
    nibbles: [[0; 16]; GROUP],
};

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
        let per_row = cols / QK;
        if data.len() != out * per_row * BLOCK_BYTES {
            return Err(Error::Unsupported(format!(
                "Q4_1 tensor ({out}, {cols}): {} bytes, expected {}",
                data.len(),
                out * per_row * BLOCK_BYTES
            )));
        }
        let mut blocks = vec![ZERO_BLOCK; out.div_ceil(GROUP) * per_row];
        for (row, bytes) in data.chunks_exact(per_row * BLOCK_BYTES).enumerate() {
            let (g, lane) = (row / GROUP, row % GROUP);
            for (i, b) in bytes.chunks_exact(BLOCK_BYTES).enumerate() {
                let gb = &mut blocks[g * per_row + i];
                gb.d[lane] = f16::from_le_bytes([b[0], b[1]]).to_f32();
                gb.m[lane] = f16::from_le_bytes([b[2], b[3]]).to_f32();
                gb.nibbles[lane].copy_from_slice(&b[4..]);
            }
        }
        Ok(Some(Self { out, cols, blocks }))
    }

    /// `xs · wᵀ` for f32 `xs` of shape `(..., in)`; the result is `(..., out)`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(Self::forward_many(&[self], xs)?
            .pop()
            .expect("one matrix in, one out"))
    }

    /// [`Self::forward`] of several matrices with the same input width on the same `xs` (a
    /// layer's q, k and v; gate and up): the input is quantized once and all their rows are
    /// shared out among the threads in one pass, one synchronisation instead of one each.
    pub fn forward_many(ms: &[&Self], xs: &Tensor) -> Result<Vec<Tensor>> {
        let dims = xs.dims();
        let cols = dims.last().copied().unwrap_or(0);
        if let Some(m) = ms.iter().find(|m| m.cols != cols) {
            return Err(Error::Candle(candle_core::Error::Msg(format!(
                "Q4_1 matmul: input {dims:?}, weight ({}, {})",
                m.out, m.cols
            ))));
        }
        let rows = xs.elem_count() / cols.max(1);
        let x: Vec<f32> = xs.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        Self::matmul_many(ms, &x, rows)
            .into_iter()
            .zip(ms)
            .map(|(y, m)| {
                let mut shape = dims.to_vec();
                *shape.last_mut().expect("checked above") = m.out;
                Ok(Tensor::from_vec(y, shape, &Device::Cpu)?)
            })
            .collect()
    }

    /// `(rows, out)` row-major for `x` `(rows, in)` row-major.
    #[cfg(test)]
    fn matmul(&self, x: &[f32], rows: usize) -> Vec<f32> {
        Self::matmul_many(&[self], x, rows)
            .pop()
            .expect("one matrix")
    }

    /// Each matrix's `(rows, out)` row-major for `x` `(rows, in)` row-major.
    fn matmul_many(ms: &[&Self], x: &[f32], rows: usize) -> Vec<Vec<f32>> {
        let per_row = ms.first().map_or(0, |m| m.cols / QK);
        let kernel = Kernel::detect();
        let acts = kernel.quantize(x);
        // The matrices' row groups numbered one after another.
        let mut first = Vec::with_capacity(ms.len() + 1);
        first.push(0);
        for m in ms {
            first.push(first.last().copied().unwrap_or(0) + m.out.div_ceil(GROUP));
        }
        let groups = first.last().copied().unwrap_or(0);
        let locate = |g: usize| {
            let i = first.partition_point(|&f| f <= g) - 1;
            (i, g - first[i])
        };
        // On candle's own thread pool, which its quantized matmuls (the Q8_0 head, the
        // K-quants) use: a second pool beside it (rayon's) left both spinning for the CPUs
        // between one projection and the next. Equal shares, one per thread (the caller
        // included): a shared cursor let the caller take every share of a small matrix
        // before the others woke. Each share's groups are computed against every input
        // row, so a group's weights stay in cache across them.
        let pool = candle_core::utils::barrier_pool();
        let share = groups.div_ceil(pool.n_workers() + 1);
        let parts = std::sync::Mutex::new(Vec::new());
        pool.execute(|tid| {
            let gs = (tid * share).min(groups)..((tid + 1) * share).min(groups);
            if gs.is_empty() {
                return;
            }
            let mut part = Vec::with_capacity(gs.len() * rows);
            for g in gs.clone() {
                let (i, g) = locate(g);
                let w = &ms[i].blocks[g * per_row..(g + 1) * per_row];
                for r in 0..rows {
                    part.push(kernel.dot(w, &acts[r * per_row..(r + 1) * per_row]));
                }
            }
            parts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((gs.start, part));
        });
        let mut ys: Vec<Vec<f32>> = ms.iter().map(|m| vec![0f32; rows * m.out]).collect();
        for (g0, part) in parts.into_inner().unwrap_or_else(|e| e.into_inner()) {
            // A part holds, per group, one result per input row.
            for (k, per_input) in part.chunks_exact(rows).enumerate() {
                let (i, g) = locate(g0 + k);
                let (out, j0) = (ms[i].out, g * GROUP);
                let n = GROUP.min(out - j0);
                for (r, v) in per_input.iter().enumerate() {
                    ys[i][r * out + j0..r * out + j0 + n].copy_from_slice(&v[..n]);
                }
            }
        }
        ys
    }
}

/// candle's `BlockQ8_1::from_float` for one block: values scaled by the f32 scale's inverse,
/// the scale and the sum then stored as f16.
#[inline(always)]
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

    /// `x` quantized block by block ([`quantize_block`]); compiled for AVX2 where the kernel
    /// is, so that `f32::round` is a few instructions rather than a call to libm's `roundf`
    /// (the same rounding, half away from zero, so the same bits).
    fn quantize(self, x: &[f32]) -> Vec<Q8Block> {
        let run = || x.chunks_exact(QK).map(quantize_block).collect();
        match self {
            Self::Scalar => run(),
            #[cfg(target_arch = "x86_64")]
            Self::Avx2(simd) => simd.vectorize(run),
        }
    }

    /// One activation row against one group of weight rows: a dot product per row.
    fn dot(self, w: &[GroupBlock], acts: &[Q8Block]) -> [f32; GROUP] {
        match self {
            Self::Scalar => dot_scalar(w, acts),
            #[cfg(target_arch = "x86_64")]
            Self::Avx2(simd) => dot_v3(simd, w, acts),
        }
    }
}

fn dot_scalar(w: &[GroupBlock], acts: &[Q8Block]) -> [f32; GROUP] {
    let mut acc = [0f32; GROUP];
    for (g, a) in w.iter().zip(acts) {
        for (lane, acc) in acc.iter_mut().enumerate() {
            let n = &g.nibbles[lane];
            let mut isum = 0i32;
            for (j, b) in n.iter().enumerate() {
                isum += (b & 0x0F) as i32 * a.qs[j] as i32 + (b >> 4) as i32 * a.qs[j + 16] as i32;
            }
            *acc += block_term(isum, g.d[lane], g.m[lane], a);
        }
    }
    acc
}

/// A block's share of the dot product, in candle's order of operations: with the integer sum
/// exact, the result is bitwise candle's (and so candle-transformers' on the same file).
#[inline(always)]
fn block_term(isum: i32, d: f32, m: f32, a: &Q8Block) -> f32 {
    isum as f32 * d * a.d + m * a.s
}

/// The AVX2 dot product: per block and row, the 32 nibble-by-byte products summed in pairs
/// (maddubs) and in fours (madd), exactly, in integers; the eight rows' lane sums reduced
/// together (horizontal adds, a transpose in effect); then [`block_term`] on all eight rows at
/// once, lane by lane the same multiplies and adds (no fused multiply-add), so bitwise
/// [`dot_scalar`].
#[cfg(target_arch = "x86_64")]
fn dot_v3(simd: pulp::x86::V3, w: &[GroupBlock], acts: &[Q8Block]) -> [f32; GROUP] {
    use std::arch::x86_64::{__m128i, __m256, __m256i};
    simd.vectorize(|| {
        let low = simd.sse2._mm_set1_epi8(0x0F);
        let ones = simd.avx._mm256_set1_epi16(1);
        let mut acc = simd.avx._mm256_setzero_ps();
        for (g, a) in w.iter().zip(acts) {
            let x: __m256i = pulp::cast(a.qs);
            let row = |lane: usize| -> __m256i {
                let q: __m128i = pulp::cast(g.nibbles[lane]);
                let lo = simd.sse2._mm_and_si128(q, low);
                let hi = simd
                    .sse2
                    ._mm_and_si128(simd.sse2._mm_srli_epi16::<4>(q), low);
                let w = simd.avx._mm256_set_m128i(hi, lo);
                simd.avx2
                    ._mm256_madd_epi16(simd.avx2._mm256_maddubs_epi16(w, x), ones)
            };
            let h01 = simd.avx2._mm256_hadd_epi32(row(0), row(1));
            let h23 = simd.avx2._mm256_hadd_epi32(row(2), row(3));
            let h45 = simd.avx2._mm256_hadd_epi32(row(4), row(5));
            let h67 = simd.avx2._mm256_hadd_epi32(row(6), row(7));
            // Per 128-bit half: rows 0..4's (resp. 4..8's) sums of that half's four lanes.
            let h0123 = simd.avx2._mm256_hadd_epi32(h01, h23);
            let h4567 = simd.avx2._mm256_hadd_epi32(h45, h67);
            let isum = simd.avx2._mm256_add_epi32(
                simd.avx2._mm256_permute2x128_si256::<0x20>(h0123, h4567),
                simd.avx2._mm256_permute2x128_si256::<0x31>(h0123, h4567),
            );
            let d: __m256 = pulp::cast(g.d);
            let m: __m256 = pulp::cast(g.m);
            let t = simd.avx._mm256_mul_ps(
                simd.avx._mm256_mul_ps(simd.avx._mm256_cvtepi32_ps(isum), d),
                simd.avx._mm256_set1_ps(a.d),
            );
            let term = simd
                .avx
                ._mm256_add_ps(t, simd.avx._mm256_mul_ps(m, simd.avx._mm256_set1_ps(a.s)));
            acc = simd.avx._mm256_add_ps(acc, term);
        }
        pulp::cast(acc)
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

    fn bits(t: &Tensor) -> Vec<u32> {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v.iter().map(|x| x.to_bits()).collect()
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
            assert_eq!(
                bits(&ours.forward(&x).unwrap()),
                bits(&candle.forward(&x).unwrap()),
                "rows {rows}"
            );
        }
    }

    #[test]
    fn matrices_in_one_pass_give_each_its_own_result_and_widths_must_match() {
        let (a, b) = (q41(13, 128), q41(67, 128));
        let (a, b) = (
            Q41Matrix::from_qtensor(&a).unwrap().unwrap(),
            Q41Matrix::from_qtensor(&b).unwrap().unwrap(),
        );
        let x = Tensor::from_vec(values(3 * 128, 2), (3, 128), &Device::Cpu).unwrap();
        let both = Q41Matrix::forward_many(&[&a, &b], &x).unwrap();
        assert_eq!(both[0].dims(), &[3, 13]);
        assert_eq!(both[1].dims(), &[3, 67]);
        assert_eq!(bits(&both[0]), bits(&a.forward(&x).unwrap()));
        assert_eq!(bits(&both[1]), bits(&b.forward(&x).unwrap()));
        let narrow = Q41Matrix::from_qtensor(&q41(8, 64)).unwrap().unwrap();
        let e = Q41Matrix::forward_many(&[&a, &narrow], &x).unwrap_err();
        assert!(e.to_string().contains("(8, 64)"), "{e}");
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
        // Two groups, the second padded: rows 8..13 real, 13..16 zero.
        let m = Q41Matrix::from_qtensor(&q41(13, 128)).unwrap().unwrap();
        let acts: Vec<Q8Block> = values(128, 5)
            .chunks_exact(QK)
            .map(quantize_block)
            .collect();
        for g in 0..2 {
            let w = &m.blocks[g * 4..(g + 1) * 4];
            let (a, b) = (dot_v3(simd, w, &acts), dot_scalar(w, &acts));
            assert_eq!(a.map(f32::to_bits), b.map(f32::to_bits), "group {g}");
            assert!(b.iter().any(|v| *v != 0.0));
        }
    }

    #[test]
    fn other_types_and_ragged_rows_are_left_to_candle() {
        let w = Tensor::from_vec(values(4 * 64, 1), (4, 64), &Device::Cpu).unwrap();
        let q8 = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        assert!(Q41Matrix::from_qtensor(&q8).unwrap().is_none());
    }
}
