//! Reads chosen tensors from a directory of `*.safetensors` files without loading
//! the rest: the `router` role skips every expert FFN and an `expert` shard reads
//! only the experts it serves.
//!
//! A safetensors file is an 8-byte little-endian header length, a JSON header
//! (`name -> {dtype, shape, data_offsets}`), then the tensor bytes; each tensor is
//! read with one seek and one read.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

#[derive(Debug, Deserialize)]
struct Entry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

#[derive(Debug, Clone)]
struct Located {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    start: u64,
    len: u64,
}

/// The files in `dir` whose extension is `ext`, sorted by path.
pub fn files_with_extension(dir: &Path, ext: &str) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    files.sort();
    Ok(files)
}

/// The tensor index of a checkpoint directory.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    files: Vec<PathBuf>,
    tensors: HashMap<String, Located>,
}

fn dtype_of(name: &str) -> Option<DType> {
    Some(match name {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F64" => DType::F64,
        "U8" => DType::U8,
        "U32" => DType::U32,
        "I64" => DType::I64,
        _ => return None,
    })
}

impl Checkpoint {
    /// Reads the headers of every `*.safetensors` file in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let files = files_with_extension(dir, "safetensors")?;
        if files.is_empty() {
            return Err(Error::Unsupported(format!(
                "no *.safetensors files in {}",
                dir.display()
            )));
        }
        let mut tensors = HashMap::new();
        for (i, path) in files.iter().enumerate() {
            let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            let mut len = [0u8; 8];
            f.read_exact(&mut len).map_err(|e| Error::io(path, e))?;
            let len = u64::from_le_bytes(len);
            if len > 100 << 20 {
                return Err(Error::Checkpoint {
                    path: path.clone(),
                    message: format!("safetensors header of {len} bytes is implausible"),
                });
            }
            let mut header = vec![0u8; len as usize];
            f.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
            let raw: HashMap<String, serde_json::Value> =
                serde_json::from_slice(&header).map_err(|e| Error::Json {
                    path: path.clone(),
                    source: e,
                })?;
            for (name, v) in raw {
                if name == "__metadata__" {
                    continue;
                }
                let entry: Entry = serde_json::from_value(v).map_err(|e| Error::Json {
                    path: path.clone(),
                    source: e,
                })?;
                let dtype = dtype_of(&entry.dtype).ok_or_else(|| {
                    Error::Unsupported(format!("tensor {name} has dtype {}", entry.dtype))
                })?;
                let (b, e) = entry.data_offsets;
                tensors.insert(
                    name,
                    Located {
                        file: i,
                        dtype,
                        shape: entry.shape,
                        start: 8 + len + b,
                        len: e.saturating_sub(b),
                    },
                );
            }
        }
        Ok(Self { files, tensors })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Loads every tensor whose name satisfies `keep`, in its stored dtype.
    pub fn load_where(&self, keep: impl Fn(&str) -> bool) -> Result<HashMap<String, Tensor>> {
        let mut names: Vec<&String> = self.tensors.keys().filter(|n| keep(n)).collect();
        names.sort_by_key(|n| (self.tensors[*n].file, self.tensors[*n].start));
        let mut out = HashMap::with_capacity(names.len());
        let mut open: Option<(usize, std::fs::File)> = None;
        for name in names {
            let t = &self.tensors[name];
            let path = &self.files[t.file];
            if open.as_ref().is_none_or(|(i, _)| *i != t.file) {
                open = Some((
                    t.file,
                    std::fs::File::open(path).map_err(|e| Error::io(path, e))?,
                ));
            }
            let (_, f) = open.as_mut().expect("just opened");
            f.seek(SeekFrom::Start(t.start))
                .map_err(|e| Error::io(path, e))?;
            let mut buf = vec![0u8; t.len as usize];
            f.read_exact(&mut buf).map_err(|e| Error::io(path, e))?;
            let tensor = Tensor::from_raw_buffer(&buf, t.dtype, &t.shape, &Device::Cpu)?;
            out.insert(name.clone(), tensor);
        }
        Ok(out)
    }
}
