//! Where the model code reads its weights from: a safetensors checkpoint (through a
//! candle `VarBuilder`, weights in the serving dtype) or a GGUF file (weights kept
//! quantized, matmuls through candle's `QMatMul`). Both are addressed with Hugging
//! Face names; [`crate::model::gguf::gguf_name`] translates for GGUF.

use crate::error::{Error, Result};
use crate::model::gguf::{GgufFile, GgufRef, gguf_name};
use crate::model::layers::{Proj, QWeight};
use crate::model::q41::Q41Matrix;
use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_nn::{Embedding, Linear, RmsNorm, VarBuilder};
use std::sync::Arc;

#[derive(Clone)]
pub enum Source<'a> {
    Safetensors(VarBuilder<'a>),
    /// Tensors are read on the CPU (experts are sliced out of their stacks there) and
    /// then placed on `device`.
    Gguf {
        file: Arc<GgufFile>,
        prefix: String,
        device: Device,
    },
}

impl<'a> Source<'a> {
    pub fn gguf(file: Arc<GgufFile>) -> Self {
        Self::gguf_on(file, Device::Cpu)
    }

    /// A GGUF file whose weights are placed on `device`.
    pub fn gguf_on(file: Arc<GgufFile>, device: Device) -> Self {
        Self::Gguf {
            file,
            prefix: String::new(),
            device,
        }
    }

    /// The source positioned at `name` below the current prefix.
    pub fn pp(&self, name: impl ToString) -> Self {
        match self {
            Self::Safetensors(vb) => Self::Safetensors(vb.pp(name)),
            Self::Gguf {
                file,
                prefix,
                device,
            } => Self::Gguf {
                file: file.clone(),
                prefix: join(prefix, &name.to_string()),
                device: device.clone(),
            },
        }
    }

    /// The dtype activations and dense weights use (f32 for GGUF: quantized matmuls
    /// take f32 inputs).
    pub fn dtype(&self) -> DType {
        match self {
            Self::Safetensors(vb) => vb.dtype(),
            Self::Gguf { .. } => DType::F32,
        }
    }

    pub fn device(&self) -> Device {
        match self {
            Self::Safetensors(vb) => vb.device().clone(),
            Self::Gguf { device, .. } => device.clone(),
        }
    }

    /// Whether tensor `name` (below the current prefix) exists.
    pub fn contains(&self, name: &str) -> bool {
        match self {
            Self::Safetensors(vb) => vb.contains_tensor(name),
            Self::Gguf { file, prefix, .. } => match gguf_name(&join(prefix, name)) {
                Some(GgufRef::Whole(n)) => file.contains(&n),
                Some(GgufRef::Expert {
                    stacked, legacy, ..
                }) => file.contains(&stacked) || file.contains(&legacy),
                None => false,
            },
        }
    }

    fn read(&self, name: &str) -> Result<(String, QTensor)> {
        let Self::Gguf { file, prefix, .. } = self else {
            unreachable!("read is for GGUF sources");
        };
        let hf = join(prefix, name);
        let r = gguf_name(&hf).ok_or_else(|| Error::Checkpoint {
            path: file.path().to_path_buf(),
            message: format!("no GGUF tensor corresponds to {hf}"),
        })?;
        Ok((hf, file.read(&r)?))
    }

    /// A dense tensor of `shape`, in [`Source::dtype`].
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        match self {
            Self::Safetensors(vb) => Ok(vb.get(shape, name)?),
            Self::Gguf { file, .. } => {
                let (hf, q) = self.read(name)?;
                let t = q.dequantize(&Device::Cpu)?;
                if t.dims() != shape {
                    return Err(Error::Checkpoint {
                        path: file.path().to_path_buf(),
                        message: format!("{hf}: shape {:?}, expected {shape:?}", t.dims()),
                    });
                }
                Ok(t.to_dtype(DType::F32)?.to_device(&self.device())?)
            }
        }
    }

    /// A linear projection `in_dim -> out_dim` (weight `(out_dim, in_dim)`).
    pub fn proj(&self, in_dim: usize, out_dim: usize, bias: bool) -> Result<Proj> {
        match self {
            Self::Safetensors(vb) => {
                let l = if bias {
                    candle_nn::linear(in_dim, out_dim, vb.clone())?
                } else {
                    candle_nn::linear_no_bias(in_dim, out_dim, vb.clone())?
                };
                Ok(Proj::Dense(l))
            }
            Self::Gguf { file, .. } => {
                let (hf, q) = self.read("weight")?;
                // A one-row matrix may be stored as a vector (llama.cpp's
                // `ffn_gate_inp_shexp`, Qwen2-MoE's shared expert gate).
                if out_dim == 1 && !bias && q.shape().dims() == [in_dim] {
                    let w = q.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?;
                    let w = w.reshape((1, in_dim))?.to_device(&self.device())?;
                    return Ok(Proj::Dense(Linear::new(w, None)));
                }
                if q.shape().dims() != [out_dim, in_dim] {
                    return Err(Error::Checkpoint {
                        path: file.path().to_path_buf(),
                        message: format!(
                            "{hf}: shape {:?}, expected {:?}",
                            q.shape().dims(),
                            [out_dim, in_dim]
                        ),
                    });
                }
                let b = if bias {
                    Some(self.tensor("bias", &[out_dim])?)
                } else {
                    None
                };
                Proj::from_qtensor(q, b, &self.device())
            }
        }
    }

    pub fn rms_norm(&self, size: usize, eps: f64) -> Result<RmsNorm> {
        match self {
            Self::Safetensors(vb) => Ok(candle_nn::rms_norm(size, eps, vb.clone())?),
            Self::Gguf { .. } => Ok(RmsNorm::new(self.tensor("weight", &[size])?, eps)),
        }
    }

    pub fn embedding(&self, vocab: usize, hidden: usize) -> Result<Embedding> {
        match self {
            Self::Safetensors(vb) => Ok(candle_nn::embedding(vocab, hidden, vb.clone())?),
            Self::Gguf { .. } => Ok(Embedding::new(
                self.tensor("weight", &[vocab, hidden])?,
                hidden,
            )),
        }
    }

    /// The output head tied to the embedding matrix: for GGUF the stored (often
    /// quantized) `token_embd.weight`, so the head keeps the file's precision.
    pub fn tied_head(&self, embed: &Embedding) -> Result<Proj> {
        match self {
            Self::Safetensors(_) => Ok(Proj::Dense(Linear::new(embed.embeddings().clone(), None))),
            Self::Gguf { file, device, .. } => {
                Proj::from_qtensor(file.tensor("token_embd.weight")?, None, device)
            }
        }
    }
}

impl Proj {
    /// Quantized weights stay quantized; f32/f16/bf16 ones become a dense projection
    /// (its batch-invariant path). `q` is read on the CPU; the projection lives on `device`.
    pub fn from_qtensor(q: QTensor, bias: Option<Tensor>, device: &Device) -> Result<Self> {
        match q.dtype() {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                let w = q.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?;
                Ok(Self::Dense(Linear::new(w.to_device(device)?, bias)))
            }
            _ => {
                let q = qtensor_to(q, device)?;
                let w = match Q41Matrix::from_qtensor(&q)? {
                    Some(m) => QWeight::Q41(m),
                    None => QWeight::Candle(QMatMul::from_arc(Arc::new(q))?),
                };
                Ok(Self::Quant { w, bias })
            }
        }
    }
}

/// `q` with its blocks copied to `device` (itself when that is the CPU).
fn qtensor_to(q: QTensor, device: &Device) -> Result<QTensor> {
    if device.is_cpu() {
        return Ok(q);
    }
    let storage = QStorage::from_data(q.data()?, device, q.dtype())?;
    Ok(QTensor::new(storage, q.shape())?)
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}
