//! Legacy `torch.save` files (PyTorch before 1.6, or
//! `_use_new_zipfile_serialization=False`), read as data: no class is looked
//! up and nothing in the file is run.
//!
//! The format (`_legacy_save` in `torch/serialization.py`) is five things
//! back to back:
//!
//! 1. a pickle of the magic number `0x1950a86a20f9469cfc6c`;
//! 2. a pickle of the format version, 1001;
//! 3. a pickle of the writer's system info (`little_endian`, type sizes);
//! 4. the pickled object, here a state dict: its tensors are
//!    `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, …)`
//!    calls and its storages persistent ids `('storage', torch.FloatStorage,
//!    key, location, numel, view)`, where `view` is `None` or `(view_key,
//!    offset, numel)`, a slice of the root storage (torch before 1.0);
//! 5. a pickle of the list of root storage keys, then each storage in that
//!    order: its element count (little-endian i64) and its bytes.
//!
//! The pickles are read by a small interpreter of our own that knows the
//! opcodes `torch.save` writes (protocols 2 to 5) and only the globals a
//! state dict names (see [`resolve_global`]): any other global (`os.system`,
//! a model class, …) is an error naming it, raised as soon as the global is
//! read. Nothing is ever called: a `REDUCE` of an allowed global is
//! interpreted here. candle's `pickle::Stack` reads any global as data and
//! leaves the checking to its caller, copies a memoised value on every
//! `BINGET` (a few bytes can then ask for exponential memory), panics in
//! debug builds on the magic number's 10-byte integer and knows no
//! protocol-4 opcodes, so it is not reused. Hostile input is bounded: strings
//! and storages cannot claim more bytes than the file has, containers nest
//! at most [`MAX_DEPTH`] deep, and memoised values are shared, not copied.
//!
//! Tensors are indexed, not read: each becomes a [`DiskTensor`] (byte
//! offset, shape, strides) that the [`TensorStore`](super::TensorStore)
//! reads when it is taken, as it does safetensors entries; tensors sharing a
//! storage (a tied head) point at the same bytes.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;
use std::rc::Rc;

use candle_core::DType;

use super::{canonical_name, DiskTensor};
use crate::model::ModelError;

/// The magic number, as the little-endian bytes of its pickled integer.
const MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
/// The only legacy format version torch ever wrote.
const FORMAT_VERSION: i64 = 1001;
/// How deep containers may nest; a state dict needs 4.
const MAX_DEPTH: usize = 32;
/// The largest pickle read (the object pickle of DialoGPT-large is ~100 KB).
const MAX_PICKLE_BYTES: u64 = 64 << 20;

/// Whether a file's first bytes are a legacy `torch.save` header: the magic
/// number's pickle, with or without a protocol-4 frame before it.
pub(super) fn is_legacy(path: &Path) -> Result<bool, ModelError> {
    let mut head = [0u8; 32];
    let mut file = File::open(path).map_err(|e| file_error(path, format!("cannot open: {e}")))?;
    let mut n = 0;
    while n < head.len() {
        match file.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(file_error(path, format!("cannot read: {e}"))),
        }
    }
    let mut long = vec![0x8a, MAGIC.len() as u8];
    long.extend_from_slice(&MAGIC);
    Ok(head[..n].starts_with(&[0x80]) && head[..n.min(24)].windows(long.len()).any(|w| w == long))
}

/// Indexes the tensors of a legacy file: every check of the header, the
/// pickled state dict and the storages' sizes happens here; the values are
/// read when taken. Tensors whose canonical name is `None` (buffers) are
/// left out.
pub(super) fn index(path: &Path) -> Result<Vec<DiskTensor>, ModelError> {
    let file = File::open(path).map_err(|e| file_error(path, format!("cannot open: {e}")))?;
    let len = file.metadata().map_err(|e| file_error(path, e.to_string()))?.len();
    let mut input = Input { reader: BufReader::new(file), pos: 0, len };
    read_index(path, &mut input).map_err(|message| file_error(path, format!("legacy PyTorch file: {message}")))
}

fn file_error(path: &Path, message: String) -> ModelError {
    ModelError::File { path: path.to_path_buf(), message }
}

fn read_index(path: &Path, input: &mut Input) -> Result<Vec<DiskTensor>, String> {
    match Unpickler::run(input)? {
        Value::BigInt(bytes) if bytes[..] == MAGIC => {}
        _ => return Err("bad magic number (not a torch.save file, or corrupt)".into()),
    }
    match Unpickler::run(input)? {
        Value::Int(FORMAT_VERSION) => {}
        other => return Err(format!("format version {} (only {FORMAT_VERSION} exists)", other.describe())),
    }
    check_sys_info(&Unpickler::run(input)?)?;
    let object_start = input.pos;
    let object = Unpickler::run(input)?;
    let Value::Dict(dict) = object else {
        return Err(format!("holds a {}, not a state dict", object.describe()));
    };
    let mut tensors = Vec::new();
    for (key, value) in dict.items.borrow().iter() {
        let name = key.text().ok_or_else(|| format!("a state dict key is a {}, not a string", key.describe()))?;
        match value {
            Value::Tensor(t) => tensors.push((name.to_string(), Rc::clone(t))),
            other => {
                return Err(format!(
                    "entry `{}` is a {}, not a tensor (save the state dict itself, not a checkpoint that wraps it)",
                    name.escape_debug(),
                    other.describe()
                ))
            }
        }
    }
    if tensors.is_empty() {
        return Err("the state dict holds no tensors".into());
    }
    if input.pos - object_start > MAX_PICKLE_BYTES {
        return Err(format!("the pickled object is larger than {MAX_PICKLE_BYTES} bytes"));
    }
    let storages = read_storages(input, &tensors)?;
    let mut out = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        if canonical_name(&name).is_none() {
            continue;
        }
        let at = &storages[&tensor.storage.root_key];
        out.push(disk_tensor(path, &name, &tensor, at, input.len).map_err(|e| format!("tensor `{}`: {e}", name.escape_debug()))?);
    }
    Ok(out)
}

/// `{'protocol_version': 1001, 'little_endian': True, 'type_sizes': {…}}`.
fn check_sys_info(info: &Value) -> Result<(), String> {
    let Value::Dict(dict) = info else { return Err(format!("system info is a {}, not a dict", info.describe())) };
    let little = dict.items.borrow().iter().find(|(k, _)| k.text() == Some("little_endian")).map(|(_, v)| v.clone());
    match little {
        Some(Value::Bool(true)) => Ok(()),
        Some(Value::Bool(false)) => Err("written on a big-endian machine; only little-endian files are read (load and re-save it on a little-endian one)".into()),
        _ => Err("system info does not say the byte order".into()),
    }
}

/// Where a root storage's bytes are.
struct StorageData {
    /// Absolute byte offset of element 0.
    offset: u64,
    numel: u64,
}

/// Reads the storage key list and walks the storages that follow it,
/// checking each against what the tensors declared.
fn read_storages(input: &mut Input, tensors: &[(String, Rc<TensorRef>)]) -> Result<HashMap<String, StorageData>, String> {
    // What the pickle said of each root storage: its kind and length.
    let mut declared: HashMap<&str, (StorageKind, u64)> = HashMap::new();
    for (name, t) in tensors {
        let s = &t.storage;
        match declared.get(s.root_key.as_str()) {
            Some(&(kind, numel)) if kind != s.kind || numel != s.root_numel => {
                return Err(format!(
                    "tensor `{}`: storage {} is declared twice, differently ({} of {numel}, then {} of {})",
                    name.escape_debug(),
                    s.root_key.escape_debug(),
                    kind.name,
                    s.kind.name,
                    s.root_numel
                ))
            }
            Some(_) => {}
            None => {
                declared.insert(&s.root_key, (s.kind, s.root_numel));
            }
        }
    }
    let keys = Unpickler::run(input)?;
    let Value::List(keys) = keys else { return Err(format!("the storage key list is a {}", keys.describe())) };
    let mut out = HashMap::new();
    for key in keys.items.borrow().iter() {
        let key = key.text().ok_or_else(|| format!("a storage key is a {}", key.describe()))?.to_string();
        let &(kind, numel) =
            declared.get(key.as_str()).ok_or_else(|| format!("storage {} is in the file but no tensor uses it", key.escape_debug()))?;
        let stored = input.array::<8>().map(i64::from_le_bytes)?;
        if stored != numel as i64 {
            return Err(format!("storage {} holds {stored} elements but its tensors say {numel}", key.escape_debug()));
        }
        let offset = input.pos;
        let n_bytes = numel.checked_mul(kind.elem_size as u64).ok_or("a storage size overflows")?;
        input.skip(n_bytes).map_err(|_| {
            format!("storage {} ends at byte {} but the file has {} (truncated?)", key.escape_debug(), offset + n_bytes, input.len)
        })?;
        if out.insert(key.clone(), StorageData { offset, numel }).is_some() {
            return Err(format!("storage {} is listed twice", key.escape_debug()));
        }
    }
    if let Some(missing) = declared.keys().find(|k| !out.contains_key(**k)) {
        return Err(format!("storage {} is used but not in the file", missing.escape_debug()));
    }
    Ok(out)
}

/// A tensor's place in the file, its view checked against its storage.
fn disk_tensor(path: &Path, name: &str, t: &TensorRef, data: &StorageData, file_len: u64) -> Result<DiskTensor, String> {
    let kind = t.storage.kind;
    let dtype = kind.dtype.ok_or_else(|| format!("torch.{} tensors are not supported", kind.name))?;
    // The elements this tensor may address: the whole root storage, or the
    // slice an old-style storage view names.
    let (base, limit) = match t.storage.view {
        None => (0, data.numel),
        Some((offset, numel)) => {
            if offset.checked_add(numel).is_none_or(|end| end > data.numel) {
                return Err(format!("storage view {offset}+{numel} lies outside its storage of {}", data.numel));
            }
            (offset, numel)
        }
    };
    let numel = t.shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64)).ok_or("shape overflows")?;
    let mut last = t.offset as u64;
    for (&dim, &stride) in t.shape.iter().zip(&t.strides) {
        if dim > 0 {
            last = (dim as u64 - 1).checked_mul(stride as u64).and_then(|s| s.checked_add(last)).ok_or("strides overflow")?;
        }
    }
    if numel > 0 && last >= limit {
        return Err(format!(
            "shape {:?}, strides {:?} at offset {} reach element {last} of a storage of {limit}",
            t.shape, t.strides, t.offset
        ));
    }
    let elem = kind.elem_size as u64;
    let first = data.offset + (base + t.offset as u64) * elem;
    let contiguous = {
        let mut expected = 1usize;
        let mut ok = true;
        for (&dim, &stride) in t.shape.iter().zip(&t.strides).rev() {
            ok &= dim <= 1 || stride == expected;
            expected *= dim;
        }
        ok
    };
    let (strides, n_bytes) = if contiguous || numel == 0 {
        (None, numel * elem)
    } else {
        // A view that materialises more than the file holds is an expand
        // (stride 0), which no weight is.
        if numel * elem > file_len {
            return Err(format!("a view of {numel} elements is larger than the file"));
        }
        (Some(t.strides.clone()), (last - t.offset as u64 + 1) * elem)
    };
    Ok(DiskTensor {
        path: path.to_path_buf(),
        raw_name: name.to_string(),
        dtype,
        shape: t.shape.clone(),
        offset: first,
        n_bytes: usize::try_from(n_bytes).map_err(|_| "too large for this machine")?,
        strides,
    })
}

/// Copies a strided view's elements into row-major order. `span` starts at
/// the view's first element; strides are in elements.
pub(super) fn gather(span: &[u8], shape: &[usize], strides: &[usize], elem_size: usize) -> Vec<u8> {
    let numel: usize = shape.iter().product();
    let mut out = Vec::with_capacity(numel * elem_size);
    let mut index = vec![0usize; shape.len()];
    for _ in 0..numel {
        let at: usize = index.iter().zip(strides).map(|(i, s)| i * s).sum::<usize>() * elem_size;
        out.extend_from_slice(&span[at..at + elem_size]);
        for d in (0..shape.len()).rev() {
            index[d] += 1;
            if index[d] < shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
    out
}

// ---- the file, read forward with its position known ----

struct Input {
    reader: BufReader<File>,
    /// Bytes consumed so far.
    pos: u64,
    len: u64,
}

impl Input {
    fn left(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut out = [0u8; N];
        if self.left() < N as u64 {
            return Err(format!("the file ends at byte {} inside a pickle (truncated?)", self.len));
        }
        self.reader.read_exact(&mut out).map_err(|e| format!("cannot read: {e}"))?;
        self.pos += N as u64;
        Ok(out)
    }

    fn byte(&mut self) -> Result<u8, String> {
        self.array::<1>().map(|[b]| b)
    }

    /// `n` bytes, refused before allocating when the file has fewer left.
    fn bytes(&mut self, n: u64) -> Result<Vec<u8>, String> {
        if n > self.left() {
            return Err(format!("byte {}: a string of {n} bytes runs past the end of the file", self.pos));
        }
        let mut out = vec![0u8; n as usize];
        self.reader.read_exact(&mut out).map_err(|e| format!("cannot read: {e}"))?;
        self.pos += n;
        Ok(out)
    }

    /// A newline-terminated argument (`GLOBAL`'s module and name).
    fn line(&mut self) -> Result<String, String> {
        let mut out = Vec::new();
        loop {
            match self.byte()? {
                b'\n' => return Ok(String::from_utf8_lossy(&out).into_owned()),
                _ if out.len() >= 256 => return Err(format!("byte {}: a global's name is longer than 256 bytes", self.pos)),
                b => out.push(b),
            }
        }
    }

    fn skip(&mut self, n: u64) -> Result<(), ()> {
        if n > self.left() {
            return Err(());
        }
        let n = i64::try_from(n).map_err(|_| ())?;
        self.reader.seek_relative(n).map_err(|_| ())?;
        self.pos += n as u64;
        Ok(())
    }
}

// ---- values ----

/// What a pickle builds. Lists and dicts are shared through the memo, as in
/// Python; tuples are immutable.
#[derive(Clone)]
enum Value {
    Mark,
    None,
    Bool(bool),
    Int(i64),
    /// An integer wider than 64 bits: little-endian two's complement bytes.
    BigInt(Rc<[u8]>),
    /// A float (read, never used: no weight is a pickled float).
    Float,
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Rc<Tuple>),
    List(Rc<Container<Value>>),
    Dict(Rc<Container<(Value, Value)>>),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
}

struct Tuple {
    items: Vec<Value>,
    depth: usize,
}

/// A list or dict. Once it is placed inside another value it is sealed: a
/// pickler finishes a container before using it, so a later change is not a
/// state dict (and would let nesting grow past what was checked).
struct Container<T> {
    items: RefCell<Vec<T>>,
    depth: Cell<usize>,
    sealed: Cell<bool>,
}

impl<T> Container<T> {
    fn new() -> Rc<Self> {
        Rc::new(Self { items: RefCell::new(Vec::new()), depth: Cell::new(1), sealed: Cell::new(false) })
    }

    fn extend(&self, items: impl IntoIterator<Item = T>, depth: usize) -> Result<(), String> {
        if self.sealed.get() {
            return Err("a list or dict changes after it was used (not a state dict)".into());
        }
        self.depth.set(self.depth.get().max(depth));
        self.items.borrow_mut().extend(items);
        Ok(())
    }
}

impl Value {
    fn depth(&self) -> usize {
        match self {
            Value::Tuple(t) => t.depth,
            Value::List(c) => c.depth.get(),
            Value::Dict(c) => c.depth.get(),
            Value::Storage(_) => 2,
            Value::Tensor(_) => 3,
            _ => 0,
        }
    }

    /// Marks a list or dict as used.
    fn seal(&self) {
        match self {
            Value::List(c) => c.sealed.set(true),
            Value::Dict(c) => c.sealed.set(true),
            _ => {}
        }
    }

    fn text(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            Value::Bytes(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    fn int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// A non-negative integer as a size.
    fn size(&self) -> Option<usize> {
        self.int().and_then(|i| usize::try_from(i).ok())
    }

    /// What the value is, for errors.
    fn describe(&self) -> String {
        match self {
            Value::Mark => "mark".into(),
            Value::None => "None".into(),
            Value::Bool(b) => format!("bool {b}"),
            Value::Int(i) => format!("integer {i}"),
            Value::BigInt(_) => "big integer".into(),
            Value::Float => "float".into(),
            Value::Str(_) => "string".into(),
            Value::Bytes(_) => "bytes".into(),
            Value::Tuple(_) => "tuple".into(),
            Value::List(_) => "list".into(),
            Value::Dict(_) => "dict".into(),
            Value::Global(g) => format!("reference to {}", g.name()),
            Value::Storage(_) => "storage".into(),
            Value::Tensor(_) => "tensor".into(),
        }
    }
}

/// The depth of a container of `items`, which are sealed by being put in it.
fn nest<'a>(items: impl IntoIterator<Item = &'a Value>) -> Result<usize, String> {
    let mut depth = 1;
    for item in items {
        if matches!(item, Value::Mark) {
            return Err("a mark inside a container".into());
        }
        item.seal();
        depth = depth.max(item.depth() + 1);
    }
    if depth > MAX_DEPTH {
        return Err(format!("values nest deeper than {MAX_DEPTH} levels"));
    }
    Ok(depth)
}

/// A storage type: `torch.FloatStorage` and the like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StorageKind {
    name: &'static str,
    elem_size: usize,
    /// `None`: allowed in a file (as a buffer we skip) but not loadable.
    dtype: Option<DType>,
}

const STORAGE_KINDS: &[StorageKind] = &[
    StorageKind { name: "FloatStorage", elem_size: 4, dtype: Some(DType::F32) },
    StorageKind { name: "HalfStorage", elem_size: 2, dtype: Some(DType::F16) },
    StorageKind { name: "BFloat16Storage", elem_size: 2, dtype: Some(DType::BF16) },
    StorageKind { name: "DoubleStorage", elem_size: 8, dtype: Some(DType::F64) },
    StorageKind { name: "LongStorage", elem_size: 8, dtype: Some(DType::I64) },
    StorageKind { name: "ByteStorage", elem_size: 1, dtype: Some(DType::U8) },
    StorageKind { name: "BoolStorage", elem_size: 1, dtype: Some(DType::U8) },
    StorageKind { name: "CharStorage", elem_size: 1, dtype: None },
    StorageKind { name: "ShortStorage", elem_size: 2, dtype: None },
    StorageKind { name: "IntStorage", elem_size: 4, dtype: None },
];

/// The globals a state dict may name; nothing else is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Global {
    OrderedDict,
    /// `torch._utils._rebuild_tensor_v2` (or `_rebuild_tensor`, torch < 0.4).
    RebuildTensor { v2: bool },
    Storage(StorageKind),
}

impl Global {
    fn name(&self) -> String {
        match self {
            Global::OrderedDict => "collections.OrderedDict".into(),
            Global::RebuildTensor { v2: true } => "torch._utils._rebuild_tensor_v2".into(),
            Global::RebuildTensor { v2: false } => "torch._utils._rebuild_tensor".into(),
            Global::Storage(kind) => format!("torch.{}", kind.name),
        }
    }
}

/// Looks a global up in the allow-list; anything else is refused by name.
fn resolve_global(module: &str, name: &str) -> Result<Global, String> {
    let found = match (module, name) {
        ("collections", "OrderedDict") => Some(Global::OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2") => Some(Global::RebuildTensor { v2: true }),
        ("torch._utils", "_rebuild_tensor") => Some(Global::RebuildTensor { v2: false }),
        ("torch", storage) => STORAGE_KINDS.iter().find(|k| k.name == storage).copied().map(Global::Storage),
        _ => None,
    };
    found.ok_or_else(|| {
        format!(
            "refused: the pickle asks for `{}.{}`, which a state dict does not need (allowed: collections.OrderedDict, \
             torch._utils._rebuild_tensor_v2 and torch storage types); nothing in the file was run",
            module.escape_debug(),
            name.escape_debug()
        )
    })
}

/// A persistent id `('storage', kind, key, location, numel, view)`.
struct StorageRef {
    kind: StorageKind,
    root_key: String,
    root_numel: u64,
    /// `(offset, numel)` within the root storage.
    view: Option<(u64, u64)>,
}

/// `_rebuild_tensor_v2(storage, offset, size, stride, …)`: a view of a storage.
struct TensorRef {
    storage: Rc<StorageRef>,
    offset: usize,
    shape: Vec<usize>,
    strides: Vec<usize>,
}

// ---- the interpreter ----

mod op {
    pub const PROTO: u8 = 0x80;
    pub const FRAME: u8 = 0x95;
    pub const STOP: u8 = b'.';
    pub const MARK: u8 = b'(';
    pub const NONE: u8 = b'N';
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const BININT2: u8 = b'M';
    pub const LONG1: u8 = 0x8a;
    pub const BINFLOAT: u8 = b'G';
    pub const BINUNICODE: u8 = b'X';
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE8: u8 = 0x8d;
    pub const BINSTRING: u8 = b'T';
    pub const SHORT_BINSTRING: u8 = b'U';
    pub const BINBYTES: u8 = b'B';
    pub const SHORT_BINBYTES: u8 = b'C';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const TUPLE: u8 = b't';
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const EMPTY_LIST: u8 = b']';
    pub const APPEND: u8 = b'a';
    pub const APPENDS: u8 = b'e';
    pub const EMPTY_DICT: u8 = b'}';
    pub const SETITEM: u8 = b's';
    pub const SETITEMS: u8 = b'u';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const MEMOIZE: u8 = 0x94;
    pub const BINGET: u8 = b'h';
    pub const LONG_BINGET: u8 = b'j';
    pub const GLOBAL: u8 = b'c';
    pub const STACK_GLOBAL: u8 = 0x93;
    pub const REDUCE: u8 = b'R';
    pub const BUILD: u8 = b'b';
    pub const BINPERSID: u8 = b'Q';
}

struct Unpickler {
    stack: Vec<Value>,
    memo: HashMap<u64, Value>,
}

impl Unpickler {
    /// Reads one pickle, up to and including its STOP, and returns its value.
    fn run(input: &mut Input) -> Result<Value, String> {
        let mut state = Self { stack: Vec::new(), memo: HashMap::new() };
        let start = input.pos;
        loop {
            let at = input.pos;
            if at - start > MAX_PICKLE_BYTES {
                return Err(format!("a pickle is longer than {MAX_PICKLE_BYTES} bytes"));
            }
            let code = input.byte()?;
            if code == op::STOP {
                let value = state.pop()?;
                if matches!(value, Value::Mark) {
                    return Err(format!("byte {at}: a pickle ends on a mark"));
                }
                return Ok(value);
            }
            state.step(code, input).map_err(|e| format!("byte {at}: {e}"))?;
        }
    }

    fn pop(&mut self) -> Result<Value, String> {
        self.stack.pop().ok_or_else(|| "the pickle pops an empty stack".to_string())
    }

    fn top(&self) -> Result<&Value, String> {
        self.stack.last().ok_or_else(|| "the pickle reads an empty stack".to_string())
    }

    /// The values above the topmost mark, which is removed.
    fn pop_mark(&mut self) -> Result<Vec<Value>, String> {
        let at = self.stack.iter().rposition(|v| matches!(v, Value::Mark)).ok_or("no mark to pop to")?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }

    fn push_tuple(&mut self, items: Vec<Value>) -> Result<(), String> {
        let depth = nest(&items)?;
        self.stack.push(Value::Tuple(Rc::new(Tuple { items, depth })));
        Ok(())
    }

    fn memo_put(&mut self, key: u64) -> Result<(), String> {
        let value = self.top()?.clone();
        self.memo.insert(key, value);
        Ok(())
    }

    fn memo_get(&mut self, key: u64) -> Result<(), String> {
        let value = self.memo.get(&key).cloned().ok_or_else(|| format!("memo {key} was never stored"))?;
        self.stack.push(value);
        Ok(())
    }

    fn append(&mut self, items: Vec<Value>) -> Result<(), String> {
        let depth = nest(&items)? + 1;
        match self.top()? {
            Value::List(list) => list.extend(items, depth),
            other => Err(format!("appends to a {}", other.describe())),
        }
    }

    fn set_items(&mut self, items: Vec<Value>) -> Result<(), String> {
        if !items.len().is_multiple_of(2) {
            return Err("a dict update with a key and no value".into());
        }
        let depth = nest(&items)? + 1;
        let mut pairs = Vec::with_capacity(items.len() / 2);
        let mut iter = items.into_iter();
        while let (Some(key), Some(value)) = (iter.next(), iter.next()) {
            pairs.push((key, value));
        }
        match self.top()? {
            Value::Dict(dict) => dict.extend(pairs, depth),
            other => Err(format!("sets items of a {}", other.describe())),
        }
    }

    fn step(&mut self, code: u8, input: &mut Input) -> Result<(), String> {
        let value = match code {
            op::PROTO => {
                let version = input.byte()?;
                if !(2..=5).contains(&version) {
                    return Err(format!("pickle protocol {version} (torch.save writes 2 to 5)"));
                }
                return Ok(());
            }
            op::FRAME => {
                input.array::<8>()?;
                return Ok(());
            }
            op::MARK => Value::Mark,
            op::NONE => Value::None,
            op::NEWTRUE => Value::Bool(true),
            op::NEWFALSE => Value::Bool(false),
            op::BININT => Value::Int(i32::from_le_bytes(input.array()?) as i64),
            op::BININT1 => Value::Int(input.byte()? as i64),
            op::BININT2 => Value::Int(u16::from_le_bytes(input.array()?) as i64),
            op::LONG1 => {
                let n = input.byte()? as u64;
                let bytes = input.bytes(n)?;
                if bytes.len() <= 8 {
                    // Little-endian two's complement, sign-extended.
                    let fill = if bytes.last().is_some_and(|b| b & 0x80 != 0) { 0xff } else { 0 };
                    let mut wide = [fill; 8];
                    wide[..bytes.len()].copy_from_slice(&bytes);
                    Value::Int(i64::from_le_bytes(wide))
                } else {
                    Value::BigInt(bytes.into())
                }
            }
            op::BINFLOAT => {
                input.array::<8>()?;
                Value::Float
            }
            op::BINUNICODE | op::SHORT_BINUNICODE | op::BINUNICODE8 => {
                let n = match code {
                    op::SHORT_BINUNICODE => input.byte()? as u64,
                    op::BINUNICODE => u32::from_le_bytes(input.array()?) as u64,
                    _ => u64::from_le_bytes(input.array()?),
                };
                let text = String::from_utf8(input.bytes(n)?).map_err(|_| "a string is not UTF-8".to_string())?;
                Value::Str(text.into())
            }
            // Python 2 strings, decoded as torch.load does (UTF-8).
            op::BINSTRING | op::SHORT_BINSTRING => {
                let n = if code == op::SHORT_BINSTRING {
                    input.byte()? as u64
                } else {
                    u64::try_from(i32::from_le_bytes(input.array()?)).map_err(|_| "a negative string length")?
                };
                Value::Str(String::from_utf8_lossy(&input.bytes(n)?).into())
            }
            op::BINBYTES | op::SHORT_BINBYTES => {
                let n = if code == op::SHORT_BINBYTES { input.byte()? as u64 } else { u32::from_le_bytes(input.array()?) as u64 };
                Value::Bytes(input.bytes(n)?.into())
            }
            op::EMPTY_TUPLE => return self.push_tuple(Vec::new()),
            op::TUPLE => {
                let items = self.pop_mark()?;
                return self.push_tuple(items);
            }
            op::TUPLE1 | op::TUPLE2 | op::TUPLE3 => {
                let n = (code - op::TUPLE1 + 1) as usize;
                if self.stack.len() < n {
                    return Err("a tuple of more values than the stack holds".into());
                }
                let items = self.stack.split_off(self.stack.len() - n);
                return self.push_tuple(items);
            }
            op::EMPTY_LIST => Value::List(Container::new()),
            op::APPEND => {
                let item = self.pop()?;
                return self.append(vec![item]);
            }
            op::APPENDS => {
                let items = self.pop_mark()?;
                return self.append(items);
            }
            op::EMPTY_DICT => Value::Dict(Container::new()),
            op::SETITEM => {
                let value = self.pop()?;
                let key = self.pop()?;
                return self.set_items(vec![key, value]);
            }
            op::SETITEMS => {
                let items = self.pop_mark()?;
                return self.set_items(items);
            }
            op::BINPUT => return self.memo_put(input.byte()? as u64),
            op::LONG_BINPUT => return self.memo_put(u32::from_le_bytes(input.array()?) as u64),
            op::MEMOIZE => return self.memo_put(self.memo.len() as u64),
            op::BINGET => return self.memo_get(input.byte()? as u64),
            op::LONG_BINGET => return self.memo_get(u32::from_le_bytes(input.array()?) as u64),
            op::GLOBAL => {
                let module = input.line()?;
                let name = input.line()?;
                Value::Global(resolve_global(&module, &name)?)
            }
            op::STACK_GLOBAL => {
                let name = self.pop()?;
                let module = self.pop()?;
                match (module.text(), name.text()) {
                    (Some(module), Some(name)) => Value::Global(resolve_global(module, name)?),
                    _ => return Err("STACK_GLOBAL without two strings".into()),
                }
            }
            op::REDUCE => {
                let args = self.pop()?;
                let callable = self.pop()?;
                reduce(callable, args)?
            }
            op::BUILD => {
                // An OrderedDict's attributes (`_metadata`): not weights.
                let state = self.pop()?;
                state.seal();
                match self.top()? {
                    Value::Dict(_) => return Ok(()),
                    other => return Err(format!("sets the state of a {}", other.describe())),
                }
            }
            op::BINPERSID => {
                let pid = self.pop()?;
                persistent(pid)?
            }
            other => {
                return Err(format!("pickle opcode 0x{other:02x} is not one torch.save writes for a state dict"));
            }
        };
        self.stack.push(value);
        Ok(())
    }
}

/// A call the pickle asks for, interpreted without calling anything.
fn reduce(callable: Value, args: Value) -> Result<Value, String> {
    let Value::Global(global) = callable else {
        return Err(format!("calls a {}", callable.describe()));
    };
    let Value::Tuple(args) = args else {
        return Err(format!("calls {} with a {}", global.name(), args.describe()));
    };
    let args = &args.items;
    match global {
        Global::OrderedDict if args.is_empty() => Ok(Value::Dict(Container::new())),
        Global::OrderedDict => Err("collections.OrderedDict called with arguments".into()),
        Global::Storage(kind) => Err(format!("torch.{} called directly (storages are persistent ids)", kind.name)),
        Global::RebuildTensor { v2 } => {
            let arity_ok = if v2 { matches!(args.len(), 6 | 7) } else { args.len() == 4 };
            if !arity_ok {
                return Err(format!("{} called with {} arguments", global.name(), args.len()));
            }
            let Value::Storage(storage) = &args[0] else {
                return Err(format!("{} of a {}, not a storage", global.name(), args[0].describe()));
            };
            let offset = args[1].size().ok_or("a tensor's storage offset is not a non-negative integer")?;
            let sizes = |v: &Value, what: &str| -> Result<Vec<usize>, String> {
                match v {
                    Value::Tuple(t) => t.items.iter().map(|d| d.size().ok_or(format!("a tensor's {what} holds a {}", d.describe()))).collect(),
                    other => Err(format!("a tensor's {what} is a {}", other.describe())),
                }
            };
            let shape = sizes(&args[2], "size")?;
            let strides = sizes(&args[3], "stride")?;
            if shape.len() != strides.len() {
                return Err(format!("a tensor of {} dimensions with {} strides", shape.len(), strides.len()));
            }
            Ok(Value::Tensor(Rc::new(TensorRef { storage: Rc::clone(storage), offset, shape, strides })))
        }
    }
}

/// `('storage', kind, key, location, numel, view)`.
fn persistent(pid: Value) -> Result<Value, String> {
    let Value::Tuple(pid) = pid else { return Err(format!("a persistent id is a {}", pid.describe())) };
    let items = &pid.items;
    match items.first().and_then(Value::text) {
        Some("storage") if items.len() == 6 => {}
        Some("module") => return Err("the file saves a module's source (torch.save(model)); save model.state_dict() instead".into()),
        _ => return Err("a persistent id that is not a storage".into()),
    }
    let Value::Global(Global::Storage(kind)) = items[1] else {
        return Err(format!("a storage whose type is a {}", items[1].describe()));
    };
    let root_key = items[2].text().ok_or("a storage key is not a string")?.to_string();
    items[3].text().ok_or("a storage location is not a string")?;
    let root_numel = items[4].size().ok_or("a storage size is not a non-negative integer")? as u64;
    let view = match &items[5] {
        Value::None => None,
        Value::Tuple(view) if view.items.len() == 3 => {
            let offset = view.items[1].size().ok_or("a storage view's offset is not a non-negative integer")?;
            let numel = view.items[2].size().ok_or("a storage view's size is not a non-negative integer")?;
            Some((offset as u64, numel as u64))
        }
        other => return Err(format!("a storage view is a {}", other.describe())),
    };
    Ok(Value::Storage(Rc::new(StorageRef { kind, root_key, root_numel, view })))
}

#[cfg(test)]
mod tests {
    //! Hand-built files: what a hostile or broken pickle gets.
    use super::*;

    /// A pickle writer for the tests: protocol 2, the opcodes torch uses.
    #[derive(Default)]
    struct P(Vec<u8>);

    impl P {
        fn new() -> Self {
            Self(vec![op::PROTO, 2])
        }
        fn raw(mut self, bytes: &[u8]) -> Self {
            self.0.extend_from_slice(bytes);
            self
        }
        fn str(self, s: &str) -> Self {
            let mut b = vec![op::BINUNICODE];
            b.extend_from_slice(&(s.len() as u32).to_le_bytes());
            b.extend_from_slice(s.as_bytes());
            self.raw(&b)
        }
        fn int(self, i: u8) -> Self {
            self.raw(&[op::BININT1, i])
        }
        fn global(self, module: &str, name: &str) -> Self {
            self.raw(&[op::GLOBAL]).raw(module.as_bytes()).raw(b"\n").raw(name.as_bytes()).raw(b"\n")
        }
        /// `_rebuild_tensor_v2(storage(key, numel), offset, (n,), (1,), False, OrderedDict())`.
        fn tensor(self, key: &str, kind: &str, numel: u8, offset: u8, n: u8) -> Self {
            self.global("torch._utils", "_rebuild_tensor_v2")
                .raw(&[op::MARK, op::MARK])
                .str("storage")
                .global("torch", kind)
                .str(key)
                .str("cpu")
                .int(numel)
                .raw(&[op::NONE, op::TUPLE, op::BINPERSID])
                .int(offset)
                .int(n)
                .raw(&[op::TUPLE1])
                .int(1)
                .raw(&[op::TUPLE1, op::NEWFALSE])
                .global("collections", "OrderedDict")
                .raw(&[op::EMPTY_TUPLE, op::REDUCE, op::TUPLE, op::REDUCE])
        }
        fn stop(self) -> Vec<u8> {
            self.raw(&[op::STOP]).0
        }
    }

    fn header(little_endian: bool) -> Vec<u8> {
        let mut out = P::new().raw(&[op::LONG1, 10]).raw(&MAGIC).stop();
        out.extend(P::new().raw(&[op::BININT2]).raw(&1001u16.to_le_bytes()).stop());
        out.extend(
            P::new()
                .raw(&[op::EMPTY_DICT, op::MARK])
                .str("protocol_version")
                .raw(&[op::BININT2])
                .raw(&1001u16.to_le_bytes())
                .str("little_endian")
                .raw(&[if little_endian { op::NEWTRUE } else { op::NEWFALSE }, op::SETITEMS])
                .stop(),
        );
        out
    }

    fn key_list(keys: &[&str]) -> Vec<u8> {
        let mut p = P::new().raw(&[op::EMPTY_LIST, op::MARK]);
        for k in keys {
            p = p.str(k);
        }
        p.raw(&[op::APPENDS]).stop()
    }

    fn storage(values: &[f32]) -> Vec<u8> {
        let mut out = (values.len() as i64).to_le_bytes().to_vec();
        for v in values {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    fn write(bytes: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.pkl");
        std::fs::write(&path, bytes).unwrap();
        (dir, path)
    }

    fn index_err(bytes: &[u8]) -> String {
        let (_dir, path) = write(bytes);
        match index(&path) {
            Ok(t) => panic!("accepted: {} tensors", t.len()),
            Err(e) => e.to_string(),
        }
    }

    /// A good file: `a` is the whole storage, `b` the last two values of it.
    fn good() -> Vec<u8> {
        let mut file = header(true);
        file.extend(
            P::new()
                .global("collections", "OrderedDict")
                .raw(&[op::EMPTY_TUPLE, op::REDUCE, op::MARK])
                .str("a")
                .tensor("k0", "FloatStorage", 4, 0, 4)
                .str("b")
                .tensor("k0", "FloatStorage", 4, 2, 2)
                .raw(&[op::SETITEMS])
                .stop(),
        );
        file.extend(key_list(&["k0"]));
        file.extend(storage(&[1.0, 2.0, 3.0, 4.0]));
        file
    }

    #[test]
    fn a_hand_built_file_is_indexed_with_shared_storage() {
        let bytes = good();
        let (_dir, path) = write(&bytes);
        assert!(is_legacy(&path).unwrap());
        let mut tensors = index(&path).unwrap();
        tensors.sort_by(|x, y| x.raw_name.cmp(&y.raw_name));
        let values: Vec<Vec<f32>> = tensors.iter().map(|t| t.read().unwrap().to_vec1().unwrap()).collect();
        assert_eq!(values, [vec![1.0, 2.0, 3.0, 4.0], vec![3.0, 4.0]]);
        assert_eq!(tensors[1].offset, tensors[0].offset + 8, "b points into a's bytes");
    }

    #[test]
    fn globals_outside_the_allow_list_are_refused_by_name() {
        for (module, name) in [("os", "system"), ("posix", "system"), ("builtins", "eval"), ("torch.nn.modules.linear", "Linear")] {
            let mut file = header(true);
            file.extend(P::new().global(module, name).str("echo hi").raw(&[op::TUPLE1, op::REDUCE]).stop());
            let err = index_err(&file);
            assert!(err.contains(&format!("`{module}.{name}`")) && err.contains("nothing in the file was run"), "{err}");
        }
        // STACK_GLOBAL (protocol 4) is checked the same way.
        let mut file = header(true);
        file.extend(P::new().str("os").str("system").raw(&[op::STACK_GLOBAL]).stop());
        assert!(index_err(&file).contains("`os.system`"));
    }

    #[test]
    fn malformed_files_are_clear_errors() {
        // Not the magic number.
        let mut file = P::new().raw(&[op::LONG1, 10]).raw(&[0; 10]).stop();
        file.extend(good()[15..].iter());
        assert!(index_err(&file).contains("magic"));
        // Big-endian writer.
        let mut file = header(false);
        file.extend(good()[header(true).len()..].iter());
        assert!(index_err(&file).contains("big-endian"));
        // Truncated storage data.
        let file = good();
        let err = index_err(&file[..file.len() - 3]);
        assert!(err.contains("truncated"), "{err}");
        // A tensor reaching past its storage.
        let mut file = header(true);
        file.extend(P::new().raw(&[op::EMPTY_DICT]).str("a").tensor("k0", "FloatStorage", 4, 3, 2).raw(&[op::SETITEM]).stop());
        file.extend(key_list(&["k0"]));
        file.extend(storage(&[1.0, 2.0, 3.0, 4.0]));
        let err = index_err(&file);
        assert!(err.contains("`a`") && err.contains("reach element 4"), "{err}");
        // The stored element count disagrees with the pickle.
        let mut file = good();
        let at = file.len() - 16 - 8;
        file[at] = 5;
        assert!(index_err(&file).contains("holds 5 elements"));
        // An opcode torch never writes (INST) and a string longer than the file.
        let mut file = header(true);
        file.extend(P::new().raw(b"ios\nsystem\n").stop());
        assert!(index_err(&file).contains("opcode 0x69"));
        let mut file = header(true);
        file.extend(P::new().raw(&[op::BINUNICODE, 0xff, 0xff, 0xff, 0x7f]).stop());
        assert!(index_err(&file).contains("past the end"));
        // Nesting bombs stop early, and a container changed after use is refused.
        let mut file = header(true);
        file.extend(P::new().raw(&[op::EMPTY_TUPLE]).raw(&[op::TUPLE1; 100]).stop());
        assert!(index_err(&file).contains("nest deeper"));
        let mut file = header(true);
        file.extend(P::new().raw(&[op::EMPTY_DICT, op::BINPUT, 0, op::TUPLE1, op::BINGET, 0]).str("k").int(1).raw(&[op::SETITEM]).stop());
        assert!(index_err(&file).contains("changes after"));
        // A whole pickled model, not a state dict.
        let mut file = header(true);
        file.extend(P::new().str("module").raw(&[op::TUPLE1, op::BINPERSID]).stop());
        assert!(index_err(&file).contains("state_dict()"));
    }

    #[test]
    fn memo_references_are_shared_not_copied() {
        // A wide fan-out of one memoised list costs a reference each.
        let mut p = P::new().raw(&[op::EMPTY_LIST, op::BINPUT, 0, op::MARK]);
        for _ in 0..10_000 {
            p = p.raw(&[op::BINGET, 0]);
        }
        let mut file = header(true);
        file.extend(p.raw(&[op::TUPLE]).stop());
        assert!(index_err(&file).contains("holds a tuple, not a state dict"));
        // Each step doubles the value's logical size: 2^60 nodes if BINGET
        // copied; shared, it is 60 small tuples, and nesting stops it at
        // MAX_DEPTH.
        let mut p = P::new().raw(&[op::EMPTY_TUPLE, op::BINPUT, 0]);
        for i in 0..60u8 {
            p = p.raw(&[op::BINGET, i, op::BINGET, i, op::TUPLE2, op::BINPUT, i + 1]);
        }
        let mut file = header(true);
        file.extend(p.stop());
        assert!(index_err(&file).contains("nest deeper"));
    }

    #[test]
    fn strided_views_gather_in_row_major_order() {
        // A 2×3 row-major block read as its transpose (strides (1, 3)).
        let span: Vec<u8> = (0u8..6).collect();
        assert_eq!(gather(&span, &[3, 2], &[1, 3], 1), [0, 3, 1, 4, 2, 5]);
        // Two-byte elements and an offset row stride.
        let span: Vec<u8> = (0u8..12).collect();
        assert_eq!(gather(&span, &[2, 2], &[3, 1], 2), [0, 1, 2, 3, 6, 7, 8, 9]);
    }
}
