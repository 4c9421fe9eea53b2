//! The binary router <-> expert shard message (`POST /v1/experts/forward`, content
//! type `application/x-tidal-experts`). Every integer and float is little-endian.
//!
//! Request, one per shard per MoE layer of a forward pass:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `TDXQ` |
//! | 4 | 2 | version (`1`) |
//! | 6 | 1 | dtype of the hidden states: `0` f32, `1` bf16, `2` f16 |
//! | 7 | 1 | `k`: route slots per token |
//! | 8 | 4 | layer (0-based) |
//! | 12 | 4 | `n`: tokens |
//! | 16 | 4 | `hidden` |
//! | 20 | `n·k·2` | expert id per slot, u16 (`0xFFFF`: empty slot) |
//! | … | `n·k·4` | routing weight per slot, f32 |
//! | … | `n·hidden·size(dtype)` | hidden states, row-major |
//!
//! Response (200): the per-token weighted sum of the listed experts' outputs.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `TDXR` |
//! | 4 | 2 | version (`1`) |
//! | 6 | 1 | dtype |
//! | 7 | 1 | `0` |
//! | 8 | 4 | `n` |
//! | 12 | 4 | `hidden` |
//! | 16 | `n·hidden·size(dtype)` | output rows, row-major |
//!
//! Errors come back as a non-200 status with a plain-text body: 400 for a
//! malformed message, 503 while the shard is loading its experts, 500 when the
//! computation failed (the router retries 5xx and connection errors on another
//! replica; 4xx are not retried).

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};

pub const CONTENT_TYPE: &str = "application/x-tidal-experts";
pub const PATH: &str = "/v1/experts/forward";
const REQ_MAGIC: &[u8; 4] = b"TDXQ";
const RESP_MAGIC: &[u8; 4] = b"TDXR";
const VERSION: u16 = 1;
pub const REQ_HEADER: usize = 20;
pub const RESP_HEADER: usize = 16;
pub const EMPTY_SLOT: u16 = u16::MAX;

fn dtype_code(d: DType) -> Result<u8> {
    match d {
        DType::F32 => Ok(0),
        DType::BF16 => Ok(1),
        DType::F16 => Ok(2),
        other => Err(Error::Unsupported(format!(
            "dtype {other:?} on the expert wire"
        ))),
    }
}

fn dtype_from(c: u8) -> Result<DType> {
    match c {
        0 => Ok(DType::F32),
        1 => Ok(DType::BF16),
        2 => Ok(DType::F16),
        other => Err(Error::Wire(format!("unknown dtype code {other}"))),
    }
}

/// A decoded request.
#[derive(Debug)]
pub struct ExpertRequest {
    pub layer: usize,
    /// `(n, hidden)`.
    pub xs: Tensor,
    /// Per token, its `(expert, weight)` pairs for this shard.
    pub routes: Vec<Vec<(usize, f32)>>,
}

/// Appends `t`'s elements as little-endian bytes.
pub fn put_tensor(out: &mut Vec<u8>, t: &Tensor) -> Result<()> {
    let flat = t.flatten_all()?;
    match t.dtype() {
        DType::F32 => {
            for v in flat.to_vec1::<f32>()? {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        DType::BF16 => {
            for v in flat.to_vec1::<half::bf16>()? {
                out.extend_from_slice(&v.to_bits().to_le_bytes());
            }
        }
        DType::F16 => {
            for v in flat.to_vec1::<half::f16>()? {
                out.extend_from_slice(&v.to_bits().to_le_bytes());
            }
        }
        other => {
            return Err(Error::Unsupported(format!(
                "dtype {other:?} on the expert wire"
            )));
        }
    }
    Ok(())
}

fn tensor_from(bytes: &[u8], dtype: DType, n: usize, hidden: usize) -> Result<Tensor> {
    // from_raw_buffer reads native-endian values; convert explicitly so that the
    // format stays little-endian on any host.
    let t = match dtype {
        DType::F32 => {
            let v: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Tensor::from_vec(v, (n, hidden), &Device::Cpu)?
        }
        DType::BF16 => {
            let v: Vec<half::bf16> = bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                .collect();
            Tensor::from_vec(v, (n, hidden), &Device::Cpu)?
        }
        DType::F16 => {
            let v: Vec<half::f16> = bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                .collect();
            Tensor::from_vec(v, (n, hidden), &Device::Cpu)?
        }
        other => return Err(Error::Unsupported(format!("dtype {other:?}"))),
    };
    Ok(t)
}

/// Encodes a request for `xs` (`(n, hidden)`) and its per-token routes.
pub fn encode_request(layer: usize, xs: &Tensor, routes: &[Vec<(usize, f32)>]) -> Result<Vec<u8>> {
    let (n, hidden) = xs.dims2()?;
    if routes.len() != n {
        return Err(Error::Wire(format!(
            "{} route lists for {n} tokens",
            routes.len()
        )));
    }
    let k = routes.iter().map(Vec::len).max().unwrap_or(0);
    if k > u8::MAX as usize {
        return Err(Error::Wire(format!("{k} experts per token")));
    }
    let size = xs.dtype().size_in_bytes();
    let mut out = Vec::with_capacity(REQ_HEADER + n * k * 6 + n * hidden * size);
    out.extend_from_slice(REQ_MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.push(dtype_code(xs.dtype())?);
    out.push(k as u8);
    out.extend_from_slice(&(layer as u32).to_le_bytes());
    out.extend_from_slice(&(n as u32).to_le_bytes());
    out.extend_from_slice(&(hidden as u32).to_le_bytes());
    for r in routes {
        for slot in 0..k {
            let id = match r.get(slot) {
                Some(&(e, _)) if e < EMPTY_SLOT as usize => e as u16,
                Some(&(e, _)) => return Err(Error::Wire(format!("expert id {e} too large"))),
                None => EMPTY_SLOT,
            };
            out.extend_from_slice(&id.to_le_bytes());
        }
    }
    for r in routes {
        for slot in 0..k {
            let w = r.get(slot).map_or(0.0, |&(_, w)| w);
            out.extend_from_slice(&w.to_le_bytes());
        }
    }
    put_tensor(&mut out, xs)?;
    Ok(out)
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> usize {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize
}

pub fn decode_request(b: &[u8]) -> Result<ExpertRequest> {
    if b.len() < REQ_HEADER || &b[..4] != REQ_MAGIC {
        return Err(Error::Wire("not an expert request (bad magic)".into()));
    }
    if u16_at(b, 4) != VERSION {
        return Err(Error::Wire(format!(
            "expert wire version {} (this shard speaks {VERSION})",
            u16_at(b, 4)
        )));
    }
    let dtype = dtype_from(b[6])?;
    let k = b[7] as usize;
    let (layer, n, hidden) = (u32_at(b, 8), u32_at(b, 12), u32_at(b, 16));
    let size = dtype.size_in_bytes();
    let want = n
        .checked_mul(k * 6)
        .and_then(|r| n.checked_mul(hidden)?.checked_mul(size)?.checked_add(r))
        .and_then(|x| x.checked_add(REQ_HEADER));
    if want != Some(b.len()) {
        return Err(Error::Wire(format!(
            "expert request of {} bytes does not match its header (n={n}, k={k}, hidden={hidden})",
            b.len()
        )));
    }
    let ids_at = REQ_HEADER;
    let w_at = ids_at + n * k * 2;
    let xs_at = w_at + n * k * 4;
    let routes = (0..n)
        .map(|t| {
            (0..k)
                .filter_map(|s| {
                    let i = t * k + s;
                    let id = u16_at(b, ids_at + 2 * i);
                    let at = w_at + 4 * i;
                    let w = f32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
                    (id != EMPTY_SLOT).then_some((id as usize, w))
                })
                .collect()
        })
        .collect();
    Ok(ExpertRequest {
        layer,
        xs: tensor_from(&b[xs_at..], dtype, n, hidden)?,
        routes,
    })
}

pub fn encode_response(ys: &Tensor) -> Result<Vec<u8>> {
    let (n, hidden) = ys.dims2()?;
    let mut out = Vec::with_capacity(RESP_HEADER + n * hidden * ys.dtype().size_in_bytes());
    out.extend_from_slice(RESP_MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.push(dtype_code(ys.dtype())?);
    out.push(0);
    out.extend_from_slice(&(n as u32).to_le_bytes());
    out.extend_from_slice(&(hidden as u32).to_le_bytes());
    put_tensor(&mut out, ys)?;
    Ok(out)
}

/// Decodes a response and checks it has the expected shape and dtype.
pub fn decode_response(b: &[u8], n: usize, hidden: usize, dtype: DType) -> Result<Tensor> {
    if b.len() < RESP_HEADER || &b[..4] != RESP_MAGIC || u16_at(b, 4) != VERSION {
        return Err(Error::Wire("malformed expert response header".into()));
    }
    let got = (dtype_from(b[6])?, u32_at(b, 8), u32_at(b, 12));
    if got != (dtype, n, hidden) || b.len() != RESP_HEADER + n * hidden * dtype.size_in_bytes() {
        return Err(Error::Wire(format!(
            "expert response ({:?}, {} x {}, {} bytes) does not match the request ({dtype:?}, {n} x {hidden})",
            got.0,
            got.1,
            got.2,
            b.len()
        )));
    }
    tensor_from(&b[RESP_HEADER..], dtype, n, hidden)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_and_response_round_trip_bitwise() {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let xs = Tensor::arange(0f32, 24., &Device::Cpu)
                .unwrap()
                .affine(0.37, -3.1)
                .unwrap()
                .reshape((3, 8))
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let routes = vec![vec![(1, 0.25), (7, 0.75)], vec![(3, 1.0)], vec![]];
            let msg = encode_request(5, &xs, &routes).unwrap();
            assert_eq!(
                msg.len(),
                REQ_HEADER + 3 * 2 * 6 + 24 * dtype.size_in_bytes()
            );
            let req = decode_request(&msg).unwrap();
            assert_eq!(req.layer, 5);
            assert_eq!(req.routes, routes);
            let flat = |t: &Tensor| {
                t.to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            assert_eq!(flat(&req.xs), flat(&xs));
            let resp = encode_response(&xs).unwrap();
            let back = decode_response(&resp, 3, 8, dtype).unwrap();
            assert_eq!(flat(&back), flat(&xs));
            assert!(decode_response(&resp, 2, 8, dtype).is_err());
            assert!(decode_request(&msg[..msg.len() - 1]).is_err());
        }
    }
}
