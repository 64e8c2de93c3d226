//! Reading GPT-2 checkpoints into named, shape-checked tensors.
//!
//! The published DialoGPT and DialogRPT checkpoints, and everything
//! `save_pretrained` writes, name the same tensors in several ways: with or
//! without the `transformer.` prefix, with the causal-mask buffers
//! (`attn.bias`, `attn.masked_bias`) or without, with the tied head as
//! `lm_head.weight`, as the original `.pkl` files' `lm_head.decoder.weight`,
//! or not at all. [`TensorStore`] folds all of them into one canonical naming
//! (that of `GPT2Model`'s state dict) and hands tensors out with their shapes
//! checked, so that a bad file fails with the file and tensor named.
//!
//! Formats: safetensors (one file or shards), PyTorch's zip format (what
//! `torch.save` writes since 1.6, read by candle) and its legacy format
//! (before 1.6, as the original DialoGPT `.pkl` files are: [`legacy`], read
//! as data with only the globals a state dict needs allowed).

pub mod legacy;

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::{Gpt2Config, ModelError};

/// The file formats a checkpoint folder may hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightsFile {
    /// One `model.safetensors`.
    Safetensors(PathBuf),
    /// `model.safetensors.index.json` and its shards.
    ShardedSafetensors { index: PathBuf, shards: Vec<PathBuf> },
    /// A `torch.save` file: `pytorch_model.bin`, or a `.pkl`/`.pt`/`.pth`
    /// file, in the zip format (torch 1.6 and later) or the legacy one
    /// (told apart by their first bytes).
    PyTorch(PathBuf),
}

/// File extensions of weights files other than `pytorch_model.bin`.
const TORCH_EXTENSIONS: &[&str] = &["pkl", "pt", "pth"];

/// Whether a path names a weights file (by its extension): `.safetensors`,
/// `.bin`, `.pkl`, `.pt` or `.pth`.
pub fn is_weights_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e == "safetensors" || e == "bin" || TORCH_EXTENSIONS.contains(&e))
}

impl WeightsFile {
    /// Finds the weights in a checkpoint folder, preferring safetensors,
    /// then `pytorch_model.bin`, then the folder's one `.pkl`, `.pt` or
    /// `.pth` file (several are an error naming them).
    pub fn find(dir: &Path) -> Result<Self, ModelError> {
        let single = dir.join("model.safetensors");
        if single.is_file() {
            return Ok(Self::Safetensors(single));
        }
        let index = dir.join("model.safetensors.index.json");
        if index.is_file() {
            let shards = read_shard_index(&index)?;
            return Ok(Self::ShardedSafetensors { index, shards });
        }
        let bin = dir.join("pytorch_model.bin");
        if bin.is_file() {
            return Ok(Self::PyTorch(bin));
        }
        let mut others: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| ModelError::File { path: dir.to_path_buf(), message: format!("cannot list: {e}") })?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().and_then(|e| e.to_str()).is_some_and(|e| TORCH_EXTENSIONS.contains(&e)))
            .collect();
        others.sort();
        match others.len() {
            0 => Err(ModelError::NoWeights(dir.to_path_buf())),
            1 => Ok(Self::PyTorch(others.remove(0))),
            _ => {
                let names: Vec<String> = others.iter().filter_map(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()).collect();
                Err(ModelError::File {
                    path: dir.to_path_buf(),
                    message: format!("holds several PyTorch weight files ({}): keep one, or pass the file itself", names.join(", ")),
                })
            }
        }
    }

    /// A weights file named directly: safetensors by its extension,
    /// anything else read as a `torch.save` file.
    pub fn at(path: &Path) -> Self {
        if path.extension().is_some_and(|e| e == "safetensors") {
            Self::Safetensors(path.to_path_buf())
        } else {
            Self::PyTorch(path.to_path_buf())
        }
    }

    /// Every file that holds tensors (the shards, not the index).
    pub fn files(&self) -> &[PathBuf] {
        match self {
            Self::Safetensors(p) | Self::PyTorch(p) => std::slice::from_ref(p),
            Self::ShardedSafetensors { shards, .. } => shards,
        }
    }

    /// The file named in errors.
    pub fn display_path(&self) -> &Path {
        match self {
            Self::Safetensors(p) | Self::PyTorch(p) => p,
            Self::ShardedSafetensors { index, .. } => index,
        }
    }
}

/// What a Git LFS pointer file starts with (a repository cloned without
/// git-lfs holds these small text files instead of the weights).
const LFS_POINTER: &[u8] = b"version https://git-lfs.github.com/spec/";

/// Refuses a weights file that is a Git LFS pointer, naming git-lfs and
/// what to run, before any format reads its header as sizes.
///
/// # Errors
/// [`ModelError::LfsPointer`]; a file that cannot be opened is left to the
/// format's reader (it says so).
pub fn refuse_lfs_pointer(path: &Path) -> Result<(), ModelError> {
    use std::io::Read as _;
    let Ok(file) = std::fs::File::open(path) else { return Ok(()) };
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut head = Vec::with_capacity(LFS_POINTER.len());
    // Pointers are ~130 bytes; a real weights file is far larger.
    if size > 1024 || file.take(LFS_POINTER.len() as u64).read_to_end(&mut head).is_err() || head != LFS_POINTER {
        return Ok(());
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    Err(ModelError::LfsPointer { path: path.to_path_buf(), dir, size })
}

fn read_shard_index(index: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let file_err = |message: String| ModelError::File { path: index.to_path_buf(), message };
    let text = std::fs::read_to_string(index).map_err(|e| file_err(e.to_string()))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| file_err(format!("not JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| file_err("no `weight_map` object".into()))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut shards: Vec<PathBuf> = Vec::new();
    for value in map.values() {
        let name = value.as_str().ok_or_else(|| file_err("a `weight_map` value is not a file name".into()))?;
        if name.contains('/') || name.contains("..") {
            return Err(file_err(format!("shard name `{name}` leaves the model folder")));
        }
        let path = dir.join(name);
        if !shards.contains(&path) {
            shards.push(path);
        }
    }
    Ok(shards)
}

/// The canonical name of a checkpoint tensor, or `None` for tensors that are
/// buffers rather than weights.
pub fn canonical_name(raw: &str) -> Option<String> {
    let mut name = raw;
    for prefix in ["module.", "model."] {
        if let Some(rest) = name.strip_prefix(prefix) {
            name = rest;
        }
    }
    if let Some(rest) = name.strip_prefix("transformer.") {
        name = rest;
    }
    if name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias") {
        return None;
    }
    if name == "lm_head.decoder.weight" {
        return Some("lm_head.weight".to_string());
    }
    Some(name.to_string())
}

/// A checkpoint's tensors, by canonical name, on one device and dtype.
///
/// Safetensors files are indexed when the store opens (header, dtypes,
/// shapes and byte ranges checked) and each tensor is read only when it is
/// taken, so loading holds the tensors taken so far plus one, and a model
/// that converts what it takes (8-bit weights) never holds the whole
/// checkpoint in f32.
pub struct TensorStore {
    file: PathBuf,
    tensors: HashMap<String, Entry>,
    dtype: DType,
    device: Device,
}

/// A tensor in memory, or where to read it from.
enum Entry {
    Ready(Tensor),
    OnDisk(DiskTensor),
}

/// One tensor's place in a safetensors or legacy PyTorch file, checked
/// against the file.
struct DiskTensor {
    path: PathBuf,
    raw_name: String,
    dtype: DType,
    shape: Vec<usize>,
    /// Absolute byte offset of the first element.
    offset: u64,
    /// Bytes to read from `offset`: the tensor, or the span a strided view
    /// covers.
    n_bytes: usize,
    /// Element strides of a view that is not row-major (a transposed
    /// tensor in a PyTorch file); `None` when the bytes are in order.
    strides: Option<Vec<usize>>,
}

impl DiskTensor {
    fn read(&self) -> Result<Tensor, ModelError> {
        use std::io::{Read, Seek, SeekFrom};
        let err = |message: String| ModelError::Tensor { file: self.path.clone(), tensor: self.raw_name.clone(), message };
        let mut file = std::fs::File::open(&self.path).map_err(|e| err(format!("cannot open: {e}")))?;
        file.seek(SeekFrom::Start(self.offset)).map_err(|e| err(e.to_string()))?;
        let numel = self.n_bytes / self.dtype.size_in_bytes();
        if let Some(strides) = &self.strides {
            let mut span = vec![0u8; self.n_bytes];
            file.read_exact(&mut span).map_err(|e| err(format!("cannot read: {e}")))?;
            let bytes = legacy::gather(&span, &self.shape, strides, self.dtype.size_in_bytes());
            Tensor::from_raw_buffer(&bytes, self.dtype, &self.shape, &Device::Cpu)
        } else if self.dtype == DType::F32 && cfg!(target_endian = "little") {
            // Read straight into the tensor's own buffer.
            let mut values = vec![0f32; numel];
            file.read_exact(bytemuck::cast_slice_mut(&mut values)).map_err(|e| err(format!("cannot read: {e}")))?;
            Tensor::from_vec(values, self.shape.clone(), &Device::Cpu)
        } else {
            let mut bytes = vec![0u8; self.n_bytes];
            file.read_exact(&mut bytes).map_err(|e| err(format!("cannot read: {e}")))?;
            Tensor::from_raw_buffer(&bytes, self.dtype, &self.shape, &Device::Cpu)
        }
        .map_err(|e| err(root_message(&e)))
    }
}

impl TensorStore {
    /// Opens a checkpoint whose tensors are handed out converted to
    /// `dtype` on `device`. Safetensors and legacy PyTorch files are indexed
    /// now and read as taken; zip-format PyTorch files are read whole.
    pub fn load(weights: &WeightsFile, dtype: DType, device: &Device) -> Result<Self, ModelError> {
        let file = weights.display_path().to_path_buf();
        for path in weights.files() {
            refuse_lfs_pointer(path)?;
        }
        let mut tensors = HashMap::new();
        match weights {
            WeightsFile::Safetensors(path) => index_safetensors(std::slice::from_ref(path), &mut tensors)?,
            WeightsFile::ShardedSafetensors { shards, .. } => index_safetensors(shards, &mut tensors)?,
            WeightsFile::PyTorch(path) if legacy::is_legacy(path)? => {
                for tensor in legacy::index(path)? {
                    if let Some(name) = canonical_name(&tensor.raw_name) {
                        tensors.insert(name, Entry::OnDisk(tensor));
                    }
                }
            }
            WeightsFile::PyTorch(path) => {
                for (raw_name, tensor) in read_pytorch(path)? {
                    let Some(name) = canonical_name(&raw_name) else { continue };
                    let tensor = convert(tensor, dtype, device)
                        .map_err(|e| ModelError::Tensor { file: file.clone(), tensor: raw_name.clone(), message: e.to_string() })?;
                    tensors.insert(name, Entry::Ready(tensor));
                }
            }
        }
        Ok(Self { file, tensors, dtype, device: device.clone() })
    }

    /// A store over tensors already in memory (tests and synthetic models).
    pub fn from_tensors(file: impl Into<PathBuf>, tensors: HashMap<String, Tensor>) -> Self {
        let tensors: HashMap<String, Entry> = tensors
            .into_iter()
            .filter_map(|(name, t)| canonical_name(&name).map(|n| (n, Entry::Ready(t))))
            .collect();
        let (dtype, device) = match tensors.values().next() {
            Some(Entry::Ready(t)) => (t.dtype(), t.device().clone()),
            _ => (DType::F32, Device::Cpu),
        };
        Self { file: file.into(), tensors, dtype, device }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|s| s.as_str())
    }

    /// A tensor's shape, without reading it.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|entry| match entry {
            Entry::Ready(t) => t.dims(),
            Entry::OnDisk(d) => &d.shape[..],
        })
    }

    /// The GPT-2 configuration a checkpoint's shapes imply, for weights
    /// files that come without a `config.json` (the original DialoGPT
    /// `.pkl` files): vocabulary, context, width, depth and MLP width from
    /// the tensors, `n_head = n_embd / 64` (the head width of every
    /// published GPT-2 and DialoGPT size), everything else at transformers'
    /// defaults. Errors name what is missing; a width that is not a
    /// multiple of 64 needs a `config.json`.
    pub fn infer_gpt2_config(&self) -> Result<Gpt2Config, ModelError> {
        let need = |name: &str| self.shape(name).ok_or_else(|| self.error(name, "missing, so the model's shape cannot be inferred (put a config.json beside the weights)"));
        let &[vocab_size, n_embd] = need("wte.weight")? else { return Err(self.error("wte.weight", "is not a matrix")) };
        let &[n_positions, _] = need("wpe.weight")? else { return Err(self.error("wpe.weight", "is not a matrix")) };
        let n_layer = (0..).take_while(|i| self.contains(&format!("h.{i}.ln_1.weight"))).count();
        let inner = need("h.0.mlp.c_fc.weight")?.get(1).copied().unwrap_or(0);
        if !n_embd.is_multiple_of(64) {
            return Err(ModelError::File {
                path: self.file.clone(),
                message: format!("a width of {n_embd} is not a multiple of 64, so the head count cannot be inferred: put the model's config.json beside the weights"),
            });
        }
        let mut config = Gpt2Config::with_shape(n_embd, n_layer, n_embd / 64);
        config.vocab_size = vocab_size;
        config.n_positions = n_positions;
        config.n_inner = (inner != 4 * n_embd).then_some(inner);
        config.validate()?;
        Ok(config)
    }

    /// Takes a tensor out of the store, checking its shape and that its
    /// values are finite.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        let tensor = match self.remove_shaped(name, shape)? {
            Entry::Ready(t) => t,
            Entry::OnDisk(d) => convert(d.read()?, self.dtype, &self.device).map_err(|e| self.error(name, &e.to_string()))?,
        };
        if !all_finite(&tensor).map_err(|e| self.error(name, &e.to_string()))? {
            return Err(self.error(name, "holds NaN or infinite values (corrupt checkpoint?)"));
        }
        Ok(tensor)
    }

    /// Takes a tensor out without its values (only its shape is checked):
    /// for copies the model does not use, such as a stored tied head. A
    /// tensor still on disk is never read.
    pub fn discard(&mut self, name: &str, shape: &[usize]) -> Result<(), ModelError> {
        self.remove_shaped(name, shape).map(drop)
    }

    /// Removes an entry, checking that it is there and has `shape`.
    fn remove_shaped(&mut self, name: &str, shape: &[usize]) -> Result<Entry, ModelError> {
        let entry = self.tensors.remove(name).ok_or_else(|| self.error(name, "missing from the checkpoint"))?;
        let dims = match &entry {
            Entry::Ready(t) => t.dims(),
            Entry::OnDisk(d) => &d.shape[..],
        };
        if dims != shape {
            return Err(self.error(name, &format!("has shape {:?}, expected {:?}", dims, shape)));
        }
        Ok(entry)
    }

    /// Names left after the model took what it needs.
    pub fn leftover(&self) -> Vec<String> {
        let mut names: Vec<String> = self.tensors.keys().cloned().collect();
        names.sort();
        names
    }

    pub fn error(&self, tensor: &str, message: &str) -> ModelError {
        ModelError::Tensor { file: self.file.clone(), tensor: tensor.to_string(), message: message.to_string() }
    }
}

/// Values checked per chunk in [`all_finite`].
const FINITE_CHUNK: usize = 1 << 20;

/// Whether every value is finite, checked a chunk at a time: a whole-tensor
/// `abs` would hold a second copy of the largest tensor (the 154 MB token
/// embedding of DialoGPT-small) at the peak of loading. A chunk's sum of
/// magnitudes is NaN or infinite when any value is (a max would skip NaN);
/// summing in f32 keeps half-precision chunks from overflowing.
fn all_finite(tensor: &Tensor) -> candle_core::Result<bool> {
    let flat = tensor.flatten_all()?;
    let n = flat.elem_count();
    let mut start = 0;
    while start < n {
        let len = FINITE_CHUNK.min(n - start);
        let sum = flat.narrow(0, start, len)?.to_dtype(DType::F32)?.abs()?.sum_all()?.to_scalar::<f32>()?;
        if !sum.is_finite() {
            return Ok(false);
        }
        start += len;
    }
    Ok(true)
}

/// Every tensor of a checkpoint under its name in the file (no GPT-2
/// renaming), converted to `dtype` on `device`: for models other than
/// GPT-2 (the safety classifier). Errors name the file and tensor.
pub fn read_all(weights: &WeightsFile, dtype: DType, device: &Device) -> Result<HashMap<String, Tensor>, ModelError> {
    let file = weights.display_path().to_path_buf();
    let on_disk = match weights {
        WeightsFile::Safetensors(path) => index_safetensors_file(path)?,
        WeightsFile::ShardedSafetensors { shards, .. } => {
            let mut all = Vec::new();
            for shard in shards {
                all.extend(index_safetensors_file(shard)?);
            }
            all
        }
        WeightsFile::PyTorch(path) if legacy::is_legacy(path)? => legacy::index(path)?,
        WeightsFile::PyTorch(path) => {
            let mut out = HashMap::new();
            for (name, tensor) in read_pytorch(path)? {
                let tensor = convert(tensor, dtype, device)
                    .map_err(|e| ModelError::Tensor { file: file.clone(), tensor: name.clone(), message: e.to_string() })?;
                out.insert(name, tensor);
            }
            return Ok(out);
        }
    };
    let mut out = HashMap::new();
    for tensor in on_disk {
        let value = convert(tensor.read()?, dtype, device)
            .map_err(|e| ModelError::Tensor { file: file.clone(), tensor: tensor.raw_name.clone(), message: e.to_string() })?;
        out.insert(tensor.raw_name, value);
    }
    Ok(out)
}

fn convert(tensor: Tensor, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
    tensor.to_device(device)?.to_dtype(dtype)
}

fn index_safetensors(paths: &[PathBuf], into: &mut HashMap<String, Entry>) -> Result<(), ModelError> {
    for path in paths {
        for tensor in index_safetensors_file(path)? {
            if let Some(name) = canonical_name(&tensor.raw_name) {
                into.insert(name, Entry::OnDisk(tensor));
            }
        }
    }
    Ok(())
}

/// Reads a safetensors file's header and checks every tensor's entry
/// against the file (dtype known, byte range matching the shape and inside
/// the file); the data is read later, a tensor at a time.
fn index_safetensors_file(path: &Path) -> Result<Vec<DiskTensor>, ModelError> {
    use std::io::Read;
    let file_err = |message: String| ModelError::File { path: path.to_path_buf(), message };
    let mut file = std::fs::File::open(path).map_err(|e| file_err(format!("cannot open: {e}")))?;
    let file_len = file.metadata().map_err(|e| file_err(e.to_string()))?.len();
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes)
        .map_err(|_| file_err("not a safetensors file: shorter than its 8-byte header length".into()))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > 100 << 20 || 8 + header_len > file_len {
        return Err(file_err(format!(
            "not a safetensors file (or truncated): header of {header_len} bytes in a file of {file_len}"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(|e| file_err(format!("cannot read header: {e}")))?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| file_err(format!("safetensors header is not valid JSON: {e}")))?;
    let data_start = 8 + header_len;
    let mut out = Vec::with_capacity(header.len());
    for (name, info) in &header {
        if name == "__metadata__" {
            continue;
        }
        let tensor_err = |message: String| ModelError::Tensor { file: path.to_path_buf(), tensor: name.clone(), message };
        let dtype_name = info.get("dtype").and_then(|d| d.as_str()).ok_or_else(|| tensor_err("no dtype".into()))?;
        let dtype = match dtype_name {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "F64" => DType::F64,
            "I64" => DType::I64,
            "U32" => DType::U32,
            "U8" => DType::U8,
            other => return Err(tensor_err(format!("unsupported dtype {other}"))),
        };
        let shape: Vec<usize> = info
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|dims| dims.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
            .ok_or_else(|| tensor_err("no shape".into()))?;
        let offsets: Vec<u64> = info
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .and_then(|o| o.iter().map(|v| v.as_u64()).collect())
            .ok_or_else(|| tensor_err("no data_offsets".into()))?;
        let [begin, end] = offsets[..] else { return Err(tensor_err("data_offsets is not [begin, end]".into())) };
        let numel = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).ok_or_else(|| tensor_err("shape overflows".into()))?;
        let n_bytes = numel.checked_mul(dtype.size_in_bytes()).ok_or_else(|| tensor_err("shape overflows".into()))?;
        if begin > end || end - begin != n_bytes as u64 {
            return Err(tensor_err(format!("data_offsets {begin}..{end} do not hold {numel} {dtype_name} values")));
        }
        if data_start + end > file_len {
            return Err(tensor_err(format!(
                "data ends at byte {} but the file has {file_len} (truncated?)",
                data_start + end
            )));
        }
        out.push(DiskTensor {
            path: path.to_path_buf(),
            raw_name: name.clone(),
            dtype,
            shape,
            offset: data_start + begin,
            n_bytes,
            strides: None,
        });
    }
    if out.is_empty() {
        return Err(file_err("holds no tensors".into()));
    }
    Ok(out)
}

fn read_pytorch(path: &Path) -> Result<Vec<(String, Tensor)>, ModelError> {
    let file_err = |message: String| ModelError::File { path: path.to_path_buf(), message };
    // The pickle reader is not hardened against every hostile byte sequence;
    // a panic in it must become an error naming the file, not a crash.
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| candle_core::pickle::read_all(path)));
    match result {
        Ok(Ok(tensors)) if tensors.is_empty() => Err(file_err("holds no tensors".into())),
        Ok(Ok(tensors)) => Ok(tensors),
        Ok(Err(e)) => Err(file_err(format!(
            "not a readable PyTorch checkpoint ({})",
            root_message(&e)
        ))),
        Err(_) => Err(file_err("the PyTorch checkpoint is malformed (its reader failed)".into())),
    }
}

/// candle errors carry backtraces and context wrappers; users need the cause.
fn root_message(e: &candle_core::Error) -> String {
    let text = e.to_string();
    text.lines().next().unwrap_or("").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lfs_pointers_are_refused_and_small_real_files_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let pointer = dir.path().join("model.safetensors");
        std::fs::write(&pointer, "version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 12\n").unwrap();
        let err = refuse_lfs_pointer(&pointer).unwrap_err();
        assert!(matches!(&err, ModelError::LfsPointer { dir: d, .. } if d == dir.path()), "{err}");
        std::fs::write(&pointer, b"\x10\x00\x00\x00\x00\x00\x00\x00{}").unwrap();
        refuse_lfs_pointer(&pointer).unwrap();
        refuse_lfs_pointer(&dir.path().join("missing.bin")).unwrap();
    }

    #[test]
    fn canonical_names_fold_every_variant() {
        assert_eq!(canonical_name("transformer.h.0.ln_1.weight").unwrap(), "h.0.ln_1.weight");
        assert_eq!(canonical_name("h.0.ln_1.weight").unwrap(), "h.0.ln_1.weight");
        assert_eq!(canonical_name("module.transformer.wte.weight").unwrap(), "wte.weight");
        assert_eq!(canonical_name("lm_head.decoder.weight").unwrap(), "lm_head.weight");
        assert_eq!(canonical_name("score.weight").unwrap(), "score.weight");
        assert!(canonical_name("transformer.h.3.attn.bias").is_none());
        assert!(canonical_name("h.3.attn.masked_bias").is_none());
        // The projection bias is a weight, not the mask buffer.
        assert_eq!(canonical_name("h.3.attn.c_proj.bias").unwrap(), "h.3.attn.c_proj.bias");
    }

    #[test]
    fn take_checks_presence_shape_and_values() {
        let dev = Device::Cpu;
        let mut map = HashMap::new();
        map.insert("transformer.a".to_string(), Tensor::zeros((2, 3), DType::F32, &dev).unwrap());
        map.insert("b".to_string(), Tensor::new(&[1f32, f32::NAN], &dev).unwrap());
        let mut store = TensorStore::from_tensors("x.safetensors", map);
        let err = store.take("a", &[3, 2]).unwrap_err().to_string();
        assert!(err.contains("x.safetensors") && err.contains("`a`") && err.contains("[2, 3]"), "{err}");
        let err = store.take("b", &[2]).unwrap_err().to_string();
        assert!(err.contains("NaN"), "{err}");
        let err = store.take("c", &[1]).unwrap_err().to_string();
        assert!(err.contains("missing"), "{err}");
    }

    #[test]
    fn safetensors_values_are_read_when_taken() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let mut map = HashMap::new();
        map.insert("transformer.wte.weight".to_string(), Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap());
        map.insert("lm_head.weight".to_string(), Tensor::new(&[[f32::NAN, 0.0], [0.0, 0.0]], &Device::Cpu).unwrap());
        candle_core::safetensors::save(&map, &path).unwrap();
        let mut store = TensorStore::load(&WeightsFile::Safetensors(path.clone()), DType::F16, &Device::Cpu).unwrap();
        // Converted as asked, on the way out.
        let wte = store.take("wte.weight", &[2, 2]).unwrap();
        assert_eq!(wte.dtype(), DType::F16);
        assert_eq!(wte.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap(), [[1.0, 2.0], [3.0, 4.0]]);
        // A discarded tensor's values are never read (its NaN goes unseen);
        // its shape is still checked.
        let err = store.discard("lm_head.weight", &[4]).unwrap_err().to_string();
        assert!(err.contains("[2, 2]"), "{err}");
        let mut store = TensorStore::load(&WeightsFile::Safetensors(path.clone()), DType::F32, &Device::Cpu).unwrap();
        store.discard("lm_head.weight", &[2, 2]).unwrap();
        assert_eq!(store.leftover(), ["wte.weight"]);
        let mut store = TensorStore::load(&WeightsFile::Safetensors(path), DType::F32, &Device::Cpu).unwrap();
        let err = store.take("lm_head.weight", &[2, 2]).unwrap_err().to_string();
        assert!(err.contains("NaN"), "{err}");
    }

    #[test]
    fn a_config_is_inferred_from_the_shapes() {
        use crate::model::synthetic::{default_init, synthetic_tensors};
        // One 64-wide head (DialoGPT's head width), a short context.
        let mut cfg = Gpt2Config::with_shape(64, 3, 1);
        cfg.n_positions = 32;
        let tensors = synthetic_tensors(&cfg, 1, &default_init()).unwrap().into_iter().collect();
        let store = TensorStore::from_tensors("x.pkl", tensors);
        assert_eq!(store.infer_gpt2_config().unwrap(), cfg);
        let narrow = Gpt2Config::with_shape(8, 1, 2);
        let tensors = synthetic_tensors(&narrow, 1, &default_init()).unwrap().into_iter().collect();
        let err = TensorStore::from_tensors("x.pkl", tensors).infer_gpt2_config().unwrap_err().to_string();
        assert!(err.contains("config.json"), "{err}");
        let err = TensorStore::from_tensors("x.pkl", HashMap::new()).infer_gpt2_config().unwrap_err().to_string();
        assert!(err.contains("wte.weight") && err.contains("missing"), "{err}");
    }

    #[test]
    fn a_bad_value_in_any_chunk_is_found() {
        let rows = 2 * FINITE_CHUNK / 8 + 3;
        let n = rows * 8;
        assert!(all_finite(&Tensor::zeros((rows, 8), DType::F32, &Device::Cpu).unwrap()).unwrap());
        for (at, bad) in [(0, f32::NAN), (FINITE_CHUNK + 3, f32::INFINITY), (n - 1, f32::NAN)] {
            let mut values = vec![0.5f32; n];
            values[at] = bad;
            let t = Tensor::from_vec(values, (rows, 8), &Device::Cpu).unwrap();
            assert!(!all_finite(&t).unwrap(), "{bad} at {at} not found");
            let half = t.to_dtype(DType::F16).unwrap();
            assert!(!all_finite(&half).unwrap(), "{bad} at {at} not found in f16");
        }
    }
}
