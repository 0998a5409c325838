//! safetensors I/O: memory-mapped loading (single file or sharded with an index) and saving in
//! the HF layout with write-then-rename.
//!
//! Loading never reads a whole file into memory: each file is memory-mapped, its header is
//! checked (offsets inside the file, sizes matching dtype × shape), and each tensor's bytes are
//! handed to [`Backend::upload_raw`] straight from the map.

use crate::backend::{Backend, DType};
use crate::model::{Model, ParamLayout, Qwen2Config};
use crate::{Error, Result};
use memmap2::Mmap;
use safetensors::tensor::Metadata;
use safetensors::{Dtype, SafeTensors};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// File name of an unsharded checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// File name of the shard index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Tokenizer files copied from a source folder when saving.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
];

/// One memory-mapped safetensors file and its checked header.
struct MappedFile {
    path: PathBuf,
    map: Mmap,
    header_len: usize,
    meta: Metadata,
}

impl MappedFile {
    fn open(path: &Path) -> Result<Self> {
        // A FIFO or device would block the open or never end; refuse it first.
        crate::safefs::regular_file(path)?;
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len < 8 {
            return Err(Error::Tensor {
                file: path.display().to_string(),
                tensor: "<header>".into(),
                msg: format!("file is {len} bytes, too short for a safetensors header"),
            });
        }
        // SAFETY: the map is only read. A file changed by another process while it is mapped
        // may show changed bytes, but every offset used below was checked against the map's
        // length, so reads stay inside the mapping.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (header_len, meta) = SafeTensors::read_metadata(&map).map_err(|e| Error::Tensor {
            file: path.display().to_string(),
            tensor: "<header>".into(),
            msg: format!(
                "not a valid safetensors file ({e}); the file may be truncated or corrupt"
            ),
        })?;
        Ok(MappedFile {
            path: path.to_path_buf(),
            map,
            header_len,
            meta,
        })
    }

    fn names(&self) -> Vec<String> {
        self.meta.tensors().into_keys().collect()
    }
}

/// A tensor inside a [`Checkpoint`]: its dtype, shape and raw little-endian bytes.
pub struct TensorRef<'a> {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: &'a [u8],
    /// The file the tensor lives in.
    pub file: &'a Path,
}

impl TensorRef<'_> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The values converted to f32.
    pub fn to_f32(&self) -> Vec<f32> {
        bytes_to_f32(self.dtype, self.bytes)
    }
}

pub use crate::backend::bytes_to_f32;

/// A model folder opened for reading: its config and memory-mapped tensor files.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub cfg: Qwen2Config,
    /// The original config.json object (unknown fields kept for saving).
    pub config_json: Value,
    files: Vec<MappedFile>,
    /// tensor name -> index into `files`.
    location: HashMap<String, usize>,
}

impl Checkpoint {
    /// Open `dir`: read config.json, then `model.safetensors.index.json` (sharded) or
    /// `model.safetensors`, memory-mapping every file and checking its header.
    pub fn open(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        if !dir.is_dir() {
            return Err(Error::msg(format!(
                "{}: not a model folder (expected a folder with config.json and \
                 {SINGLE_FILE} or {INDEX_FILE})",
                dir.display()
            )));
        }
        let text = crate::safefs::read_to_string(&config_path)?;
        let label = config_path.display().to_string();
        let config_json: Value = serde_json::from_str(&text).map_err(|e| Error::Config {
            file: label.clone(),
            field: "<json>".into(),
            msg: format!("not valid JSON: {e}"),
        })?;
        let cfg = Qwen2Config::from_json_value(&config_json, &label)?;

        let index_path = dir.join(INDEX_FILE);
        let single_path = dir.join(SINGLE_FILE);
        let mut files = Vec::new();
        let mut location = HashMap::new();
        if index_path.exists() {
            let shards = read_index(&index_path)?;
            let mut file_of: HashMap<String, usize> = HashMap::new();
            for (tensor, shard) in &shards {
                let fi = match file_of.get(shard) {
                    Some(&i) => i,
                    None => {
                        let path = dir.join(shard);
                        if !path.is_file() {
                            return Err(Error::Tensor {
                                file: index_path.display().to_string(),
                                tensor: tensor.clone(),
                                msg: format!(
                                    "the index maps it to shard {shard:?}, which does not exist \
                                     in {}",
                                    dir.display()
                                ),
                            });
                        }
                        files.push(MappedFile::open(&path)?);
                        file_of.insert(shard.clone(), files.len() - 1);
                        files.len() - 1
                    }
                };
                location.insert(tensor.clone(), fi);
            }
            // Every tensor the index names must be in its shard.
            for (tensor, &fi) in &location {
                if files[fi].meta.info(tensor).is_none() {
                    return Err(Error::Tensor {
                        file: files[fi].path.display().to_string(),
                        tensor: tensor.clone(),
                        msg: format!("listed in {INDEX_FILE} but missing from this shard"),
                    });
                }
            }
        } else if single_path.exists() {
            let f = MappedFile::open(&single_path)?;
            for name in f.names() {
                location.insert(name, 0);
            }
            files.push(f);
        } else {
            return Err(Error::msg(format!(
                "{}: no weights found (expected {SINGLE_FILE} or {INDEX_FILE})",
                dir.display()
            )));
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            cfg,
            config_json,
            files,
            location,
        })
    }

    /// Names of every tensor stored in the checkpoint.
    pub fn tensor_names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.location.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// Look a tensor up by HF name; errors name the tensor and the folder or file.
    pub fn tensor(&self, name: &str) -> Result<TensorRef<'_>> {
        let &fi = self.location.get(name).ok_or_else(|| Error::Tensor {
            file: self.describe_files(),
            tensor: name.to_string(),
            msg: "missing from the checkpoint".into(),
        })?;
        let f = &self.files[fi];
        let info = f.meta.info(name).ok_or_else(|| Error::Tensor {
            file: f.path.display().to_string(),
            tensor: name.to_string(),
            msg: "missing from this file".into(),
        })?;
        let dtype = match info.dtype {
            Dtype::F32 => DType::F32,
            Dtype::BF16 => DType::BF16,
            Dtype::F16 => DType::F16,
            other => {
                return Err(Error::Tensor {
                    file: f.path.display().to_string(),
                    tensor: name.to_string(),
                    msg: format!("dtype {other:?} is not supported (expected BF16, F16 or F32)"),
                })
            }
        };
        let (s, e) = info.data_offsets;
        let start = 8 + f.header_len + s;
        let end = 8 + f.header_len + e;
        let bytes = f.map.get(start..end).ok_or_else(|| Error::Tensor {
            file: f.path.display().to_string(),
            tensor: name.to_string(),
            msg: format!(
                "data bytes {start}..{end} lie outside the file ({} bytes)",
                f.map.len()
            ),
        })?;
        Ok(TensorRef {
            dtype,
            shape: info.shape.clone(),
            bytes,
            file: &f.path,
        })
    }

    /// Look up a tensor expected by the layout and check its shape.
    pub fn expect(&self, name: &str, shape: &[usize]) -> Result<TensorRef<'_>> {
        let t = self.tensor(name)?;
        if t.shape != shape {
            return Err(Error::Tensor {
                file: t.file.display().to_string(),
                tensor: name.to_string(),
                msg: format!(
                    "shape {:?} does not match the config, which implies {:?}",
                    t.shape, shape
                ),
            });
        }
        Ok(t)
    }

    /// Every parameter of the config's layout as host f32 vectors, in layout order.
    pub fn load_host(&self) -> Result<Vec<Vec<f32>>> {
        let layout = ParamLayout::new(&self.cfg);
        layout
            .specs
            .iter()
            .map(|s| Ok(self.expect(&s.name, &s.shape)?.to_f32()))
            .collect()
    }

    fn describe_files(&self) -> String {
        if self.files.len() == 1 {
            self.files[0].path.display().to_string()
        } else {
            self.dir.join(INDEX_FILE).display().to_string()
        }
    }
}

/// Read `weight_map` from a shard index: tensor name -> shard file name (sorted by tensor).
fn read_index(path: &Path) -> Result<BTreeMap<String, String>> {
    let label = path.display().to_string();
    let text = crate::safefs::read_to_string(path)?;
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::Config {
        file: label.clone(),
        field: "<json>".into(),
        msg: format!("not valid JSON: {e}"),
    })?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::Config {
            file: label.clone(),
            field: "weight_map".into(),
            msg: "missing or not an object of tensor name -> shard file".into(),
        })?;
    let mut out = BTreeMap::new();
    for (tensor, shard) in map {
        let shard = shard.as_str().ok_or_else(|| Error::Config {
            file: label.clone(),
            field: format!("weight_map.{tensor}"),
            msg: format!("expected a shard file name, found {shard}"),
        })?;
        let p = Path::new(shard);
        if shard.is_empty()
            || p.components().count() != 1
            || p.file_name().is_none()
            || p.is_absolute()
        {
            return Err(Error::Config {
                file: label.clone(),
                field: format!("weight_map.{tensor}"),
                msg: format!("shard {shard:?} is not a plain file name in the model folder"),
            });
        }
        out.insert(tensor.clone(), shard.to_string());
    }
    Ok(out)
}

/// Load a model folder (config.json + safetensors) into backend `b`. Every tensor of the
/// config's [`ParamLayout`] must be present with its shape; tied models may carry an
/// `lm_head.weight` (ignored).
pub fn load_model<B: Backend>(dir: &Path, b: &B) -> Result<Model<B>> {
    let ck = Checkpoint::open(dir)?;
    let layout = ParamLayout::new(&ck.cfg);
    let mut params = Vec::with_capacity(layout.specs.len());
    for spec in &layout.specs {
        let t = ck.expect(&spec.name, &spec.shape)?;
        let p = b
            .upload_raw(t.dtype, t.bytes, t.numel())
            .map_err(|e| Error::Tensor {
                file: t.file.display().to_string(),
                tensor: spec.name.clone(),
                msg: format!("upload failed: {e}"),
            })?;
        params.push(p);
    }
    Model::new(ck.cfg, params)
}

/// How [`save_model`] writes a checkpoint.
#[derive(Clone, Debug)]
pub struct SaveOptions {
    /// Storage dtype of the tensors (BF16 by default, F32 for exact copies).
    pub dtype: DType,
    /// Largest shard in bytes; a model above it is split into `model-0000i-of-0000n.safetensors`
    /// files with an index.
    pub max_shard_bytes: u64,
    /// A folder whose tokenizer files (tokenizer.json, tokenizer_config.json, ...) are copied,
    /// and whose config.json supplies the fields the engine does not model.
    pub source_dir: Option<PathBuf>,
    /// More files written into the folder: (file name, bytes), e.g. a generated tokenizer.
    pub extra_files: Vec<(String, Vec<u8>)>,
    /// Replace an existing non-empty folder. Even then only a folder holding nothing but
    /// model-folder files (config, safetensors, index, tokenizer files, `extra_files`) is
    /// replaced; any other file in it makes the save an error, so nothing the save did not
    /// write is ever deleted. Without it, a non-empty folder is refused.
    pub overwrite: bool,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions {
            dtype: DType::BF16,
            max_shard_bytes: 5_000_000_000,
            source_dir: None,
            extra_files: Vec::new(),
            overwrite: false,
        }
    }
}

/// Save `model` into `dir` in the HF layout (see [`save_params`]).
pub fn save_model<B: Backend>(
    dir: &Path,
    model: &Model<B>,
    b: &B,
    opts: &SaveOptions,
) -> Result<()> {
    let host = model.to_host(b)?;
    save_params(dir, &model.cfg, &host, opts)
}

/// Save host parameters (layout order) into `dir`: config.json, `model.safetensors` or shards
/// plus an index, and tokenizer files from `opts.source_dir`. Everything is written into a
/// temporary folder beside `dir`, then renamed into place. A missing or empty `dir` is simply
/// written; a non-empty one only with `opts.overwrite` and only when it holds nothing but
/// model-folder files (see [`SaveOptions::overwrite`]): it is renamed away first and deleted
/// after the new one is in place.
pub fn save_params(
    dir: &Path,
    cfg: &Qwen2Config,
    host: &[Vec<f32>],
    opts: &SaveOptions,
) -> Result<()> {
    let layout = ParamLayout::new(cfg);
    if host.len() != layout.specs.len() {
        return Err(Error::Invalid(format!(
            "save {}: {} parameter tensors given, the config's layout has {}",
            dir.display(),
            host.len(),
            layout.specs.len()
        )));
    }
    for (s, p) in layout.specs.iter().zip(host) {
        if p.len() != s.numel() {
            return Err(Error::Tensor {
                file: dir.display().to_string(),
                tensor: s.name.clone(),
                msg: format!(
                    "{} values given, shape {:?} needs {}",
                    p.len(),
                    s.shape,
                    s.numel()
                ),
            });
        }
    }
    if opts.max_shard_bytes == 0 {
        return Err(Error::Invalid("save: max_shard_bytes must be > 0".into()));
    }
    let base_config = match &opts.source_dir {
        Some(src) => {
            let p = src.join("config.json");
            if p.is_file() {
                let text = crate::safefs::read_to_string(&p)?;
                Some(
                    serde_json::from_str::<Value>(&text).map_err(|e| Error::Config {
                        file: p.display().to_string(),
                        field: "<json>".into(),
                        msg: format!("not valid JSON: {e}"),
                    })?,
                )
            } else {
                None
            }
        }
        None => None,
    };

    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = dir
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("save: {} has no folder name", dir.display())))?
        .to_string_lossy()
        .to_string();
    recover_stale(dir, &parent, &name)?;
    check_target(dir, opts)?;
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let stamp = unique_stamp();
    let tmp = parent.join(format!(".{name}.tmp-{stamp}"));
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let result = write_folder(&tmp, cfg, &layout, host, opts, base_config.as_ref())
        .and_then(|()| swap_into_place(&tmp, dir, &parent, &name, &stamp));
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Clean up after an earlier save of `dir` whose process was killed: its temporary folders
/// (`.NAME.tmp-PID-NANOS`) are deleted, and a folder it had moved aside
/// (`.NAME.old-PID-NANOS`) is put back when `dir` is missing (the kill fell between the two
/// renames), else deleted (the new folder was already in place). Only names of this form whose
/// process no longer exists are touched.
fn recover_stale(dir: &Path, parent: &Path, name: &str) -> Result<()> {
    let Ok(rd) = std::fs::read_dir(parent) else {
        return Ok(());
    };
    let stale_pid = |rest: &str| -> bool {
        let mut it = rest.splitn(2, '-');
        match (it.next().and_then(|p| p.parse::<u32>().ok()), it.next()) {
            (Some(pid), Some(n)) if !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()) => {
                pid != std::process::id() && !crate::safefs::pid_alive(pid)
            }
            _ => false,
        }
    };
    let (tmp_prefix, old_prefix) = (format!(".{name}.tmp-"), format!(".{name}.old-"));
    for e in rd.flatten() {
        let fname = e.file_name().to_string_lossy().to_string();
        let p = e.path();
        if !p.is_dir() {
            continue;
        }
        if fname.strip_prefix(&tmp_prefix).is_some_and(stale_pid) {
            std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
        } else if fname.strip_prefix(&old_prefix).is_some_and(stale_pid) {
            if dir.exists() {
                std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
            } else {
                eprintln!(
                    "note: restoring {} from {}, left by an interrupted save",
                    dir.display(),
                    p.display()
                );
                std::fs::rename(&p, dir).map_err(|e| Error::io(dir, e))?;
            }
        }
    }
    Ok(())
}

/// Whether `name` is a file that a model-folder save writes (and may therefore replace).
fn is_model_folder_file(name: &str, opts: &SaveOptions) -> bool {
    let shard = name
        .strip_prefix("model-")
        .and_then(|r| r.strip_suffix(".safetensors"))
        .is_some_and(|r| {
            let b = r.as_bytes();
            b.len() == 14
                && &r[5..9] == "-of-"
                && b[..5].iter().chain(&b[9..]).all(u8::is_ascii_digit)
        });
    shard
        || name == "config.json"
        || name == SINGLE_FILE
        || name == INDEX_FILE
        || TOKENIZER_FILES.contains(&name)
        || opts.extra_files.iter().any(|(n, _)| n == name)
}

/// Refuse to save over anything but a missing folder, an empty one, or (with
/// `opts.overwrite`) a folder of model files only.
fn check_target(dir: &Path, opts: &SaveOptions) -> Result<()> {
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    if !meta.is_dir() {
        return Err(Error::msg(format!(
            "{}: exists and is not a folder; refusing to replace it with a model folder",
            dir.display()
        )));
    }
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .map(|e| {
            e.map(|e| e.file_name().to_string_lossy().to_string())
                .map_err(|err| Error::io(dir, err))
        })
        .collect::<Result<_>>()?;
    if names.is_empty() {
        return Ok(());
    }
    names.sort();
    if !opts.overwrite {
        return Err(Error::msg(format!(
            "{}: folder exists and is not empty ({} entries, e.g. {}); choose a new or empty \
             folder, or pass --force to replace a model folder",
            dir.display(),
            names.len(),
            names[0]
        )));
    }
    let foreign: Vec<&String> = names
        .iter()
        .filter(|n| !is_model_folder_file(n, opts))
        .collect();
    if let Some(first) = foreign.first() {
        return Err(Error::msg(format!(
            "{}: holds {} file(s) that are not part of a model folder (e.g. {first}); refusing \
             to replace it, since that would delete them (move them away or choose another \
             folder)",
            dir.display(),
            foreign.len()
        )));
    }
    Ok(())
}

fn unique_stamp() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{}-{nanos}", std::process::id())
}

fn swap_into_place(tmp: &Path, dir: &Path, parent: &Path, name: &str, stamp: &str) -> Result<()> {
    if dir.exists() {
        if !dir.is_dir() {
            return Err(Error::Invalid(format!(
                "save: {} exists and is not a folder",
                dir.display()
            )));
        }
        let old = parent.join(format!(".{name}.old-{stamp}"));
        std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
        if let Err(e) = std::fs::rename(tmp, dir) {
            // Put the old folder back so that nothing is lost.
            let _ = std::fs::rename(&old, dir);
            return Err(Error::io(dir, e));
        }
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    } else {
        std::fs::rename(tmp, dir).map_err(|e| Error::io(dir, e))?;
    }
    Ok(())
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
    }
}

fn torch_dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
    }
}

fn write_folder(
    tmp: &Path,
    cfg: &Qwen2Config,
    layout: &ParamLayout,
    host: &[Vec<f32>],
    opts: &SaveOptions,
    base_config: Option<&Value>,
) -> Result<()> {
    // Group tensors into shards in layout order.
    let esize = opts.dtype.size() as u64;
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut cur = 0u64;
    for (i, s) in layout.specs.iter().enumerate() {
        let bytes = s.numel() as u64 * esize;
        let last = shards.len() - 1;
        if !shards[last].is_empty() && cur + bytes > opts.max_shard_bytes {
            shards.push(Vec::new());
            cur = 0;
        }
        let last = shards.len() - 1;
        shards[last].push(i);
        cur += bytes;
    }
    let n = shards.len();
    let mut weight_map = Map::new();
    let mut total = 0u64;
    for (k, members) in shards.iter().enumerate() {
        let fname = if n == 1 {
            SINGLE_FILE.to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", k + 1, n)
        };
        total += write_safetensors(&tmp.join(&fname), layout, host, members, opts.dtype)?;
        for &i in members {
            weight_map.insert(layout.specs[i].name.clone(), Value::from(fname.clone()));
        }
    }
    if n > 1 {
        let index = serde_json::json!({
            "metadata": {"total_size": total},
            "weight_map": Value::Object(weight_map),
        });
        let text = serde_json::to_string_pretty(&index)
            .map_err(|e| Error::msg(format!("cannot serialise the shard index: {e}")))?;
        write_file(&tmp.join(INDEX_FILE), text.as_bytes())?;
    }

    let mut cfg = cfg.clone();
    cfg.torch_dtype = torch_dtype_name(opts.dtype).to_string();
    write_file(
        &tmp.join("config.json"),
        cfg.to_json_string(base_config).as_bytes(),
    )?;

    for (name, bytes) in &opts.extra_files {
        let p = Path::new(name);
        if p.components().count() != 1 || name.is_empty() {
            return Err(Error::Invalid(format!(
                "save: extra file {name:?} is not a plain file name"
            )));
        }
        write_file(&tmp.join(name), bytes)?;
    }
    if let Some(src) = &opts.source_dir {
        for f in TOKENIZER_FILES {
            let from = src.join(f);
            if from.is_file() {
                let to = tmp.join(f);
                std::fs::copy(&from, &to).map_err(|e| Error::io(&from, e))?;
            }
        }
    }
    Ok(())
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))
}

/// Write one safetensors file holding the tensors `members` (indices into the layout), streaming
/// each tensor's converted bytes. Returns the number of data bytes written.
fn write_safetensors(
    path: &Path,
    layout: &ParamLayout,
    host: &[Vec<f32>],
    members: &[usize],
    dtype: DType,
) -> Result<u64> {
    let esize = dtype.size();
    let mut header = Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut off = 0usize;
    for &i in members {
        let s = &layout.specs[i];
        let len = s.numel() * esize;
        header.insert(
            s.name.clone(),
            serde_json::json!({
                "dtype": dtype_name(dtype),
                "shape": s.shape,
                "data_offsets": [off, off + len],
            }),
        );
        off += len;
    }
    let mut hbytes = serde_json::to_vec(&Value::Object(header))
        .map_err(|e| Error::msg(format!("cannot serialise a safetensors header: {e}")))?;
    while hbytes.len() % 8 != 0 {
        hbytes.push(b' ');
    }
    let file = File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let io = |e| Error::io(path, e);
    w.write_all(&(hbytes.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&hbytes).map_err(io)?;
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 16);
    for &i in members {
        for chunk in host[i].chunks(1 << 14) {
            buf.clear();
            match dtype {
                DType::F32 => {
                    for &x in chunk {
                        buf.extend_from_slice(&x.to_le_bytes());
                    }
                }
                DType::BF16 => {
                    for &x in chunk {
                        buf.extend_from_slice(&half::bf16::from_f32(x).to_bits().to_le_bytes());
                    }
                }
                DType::F16 => {
                    for &x in chunk {
                        buf.extend_from_slice(&half::f16::from_f32(x).to_bits().to_le_bytes());
                    }
                }
            }
            w.write_all(&buf).map_err(io)?;
        }
    }
    let file = w
        .into_inner()
        .map_err(|e| Error::io(path, e.into_error()))?;
    file.sync_all().map_err(io)?;
    Ok(off as u64)
}
