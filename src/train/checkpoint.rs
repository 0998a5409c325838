//! Checkpoints: an HF-layout model folder (loadable by transformers) plus the trainer state —
//! AdamW moments and master copy (`optimizer.safetensors`, f32, streamed tensor by tensor),
//! step, optimizer update count, sampling-stream offset and data position (`trainer.json`).
//!
//! A checkpoint is assembled in a hidden temporary folder and renamed into place, so a crash
//! never leaves a half-written `step-*` folder. The model is saved in f32 where the backend
//! holds f32 parameters (bit-exact resume) and in bf16 otherwise (the f32 master copy in the
//! optimizer state keeps the exact values).

use crate::backend::{Backend, DType};
use crate::dist::Collective;
use crate::model::weights::{bytes_to_f32, load_model, save_params, SaveOptions};
use crate::model::{Model, ParamLayout};
use crate::train::optim::AdamW;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Counters that make a resumed run continue exactly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Format version of this file.
    pub version: u32,
    /// "grpo" or "sft".
    pub kind: String,
    /// Completed steps.
    pub step: u64,
    /// Completed optimizer updates (AdamW bias-correction step).
    pub updates: u64,
    /// Next offset into the rollout sampling stream.
    pub sample_offset: u64,
    /// Next position in the endless (epoch-shuffled) stream of data items.
    pub data_pos: u64,
    pub seed: u64,
    /// Items in the data set the position refers to (checked on resume).
    pub data_len: usize,
    /// Folder of the frozen reference model (the starting weights), when known.
    pub reference: Option<PathBuf>,
    /// The resolved configuration of the run.
    pub config: serde_json::Value,
}

/// Write `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    if let Err(e) = written {
        // A failed write (e.g. a full disk) leaves no temporary behind.
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(&tmp, e));
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

/// Name of the folder of the checkpoint after `step` steps.
pub fn step_dir(out: &Path, step: u64) -> PathBuf {
    out.join("checkpoints").join(format!("step-{step:08}"))
}

/// The most recent `step-*` checkpoint under `<out>/checkpoints`, if any.
pub fn latest(out: &Path) -> Option<PathBuf> {
    let dir = out.join("checkpoints");
    let mut best: Option<(u64, PathBuf)> = None;
    for e in std::fs::read_dir(&dir).ok()?.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(n) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<u64>().ok())
        {
            if e.path().join("trainer.json").exists() && best.as_ref().is_none_or(|b| n > b.0) {
                best = Some((n, e.path()));
            }
        }
    }
    best.map(|b| b.1)
}

/// Resolve what `--resume` names: a checkpoint folder, or a run folder (its latest checkpoint).
pub fn resolve_resume(path: &Path) -> Result<PathBuf> {
    if path.join("trainer.json").exists() {
        return Ok(path.to_path_buf());
    }
    latest(path).ok_or_else(|| {
        Error::msg(format!(
            "{}: no checkpoint here (expected trainer.json, or checkpoints/step-*/trainer.json)",
            path.display()
        ))
    })
}

/// The run folder a checkpoint folder belongs to: `RUN` for `RUN/checkpoints/step-N`.
pub fn run_dir_of(ckpt: &Path) -> Option<PathBuf> {
    let parent = ckpt.parent()?;
    if parent.file_name()? != "checkpoints" {
        return None;
    }
    let run = parent.parent()?;
    Some(if run.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        run.to_path_buf()
    })
}

/// Step numbers and folders of the `step-*` checkpoints under `<out>/checkpoints`, sorted.
fn step_dirs(out: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(out.join("checkpoints")) else {
        return Vec::new();
    };
    let mut v: Vec<(u64, PathBuf)> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            name.strip_prefix("step-")
                .and_then(|s| s.parse::<u64>().ok())
                .map(|n| (n, e.path()))
        })
        .collect();
    v.sort();
    v
}

/// Whether `name` is a temporary this module writes beside a checkpoint (`.step-N.tmp`,
/// `.step-N.old`) or beside a file (`.NAME.tmp`).
fn is_own_temp(name: &str) -> bool {
    let Some(rest) = name.strip_prefix(".step-") else {
        return false;
    };
    let digits = rest
        .strip_suffix(".tmp")
        .or_else(|| rest.strip_suffix(".old"));
    digits.is_some_and(|d| !d.is_empty() && d.bytes().all(|c| c.is_ascii_digit()))
}

/// Claim `out` for a run that continues after `step` completed steps (0 for a new run) and
/// will write `checkpoints/step-*` and `metrics.jsonl` there:
/// - takes the folder's lock (see [`crate::safefs::RunLock`]), so two runs never write one
///   folder;
/// - removes temporaries of checkpoints that an earlier run of this tool left when it was
///   killed or ran out of disk (`checkpoints/.step-N.tmp`, `.step-N.old`, `.metrics.jsonl.tmp`);
/// - refuses when the folder already holds checkpoints after `step` (from a later point of the
///   same run, or from another run), since continuing would overwrite them; with
///   `discard_later` they are deleted first instead.
pub fn claim_run_dir(out: &Path, step: u64, discard_later: bool) -> Result<crate::safefs::RunLock> {
    let lock = crate::safefs::RunLock::acquire(out)?;
    let ck = out.join("checkpoints");
    if let Ok(rd) = std::fs::read_dir(&ck) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if is_own_temp(&name) && e.path().is_dir() {
                let p = e.path();
                eprintln!(
                    "note: removing {}, left by an interrupted checkpoint",
                    p.display()
                );
                std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
            }
        }
    }
    let mtmp = tmp_path(&out.join("metrics.jsonl"));
    if mtmp.is_file() {
        std::fs::remove_file(&mtmp).map_err(|e| Error::io(&mtmp, e))?;
    }
    let later: Vec<(u64, PathBuf)> = step_dirs(out)
        .into_iter()
        .filter(|(n, _)| *n > step)
        .collect();
    if let (Some(first), Some(last)) = (later.first(), later.last()) {
        if !discard_later {
            return Err(Error::msg(format!(
                "{}: already holds {} checkpoint(s) after step {step} ({} to {}); continuing \
                 here would overwrite them. Resume from the latest one (--resume {}), write to \
                 another folder (--out), or pass --discard-later-checkpoints to delete them",
                out.display(),
                later.len(),
                first.1.display(),
                last.1.display(),
                out.display()
            )));
        }
        for (_, p) in &later {
            eprintln!(
                "note: deleting later checkpoint {} (--discard-later-checkpoints)",
                p.display()
            );
            std::fs::remove_dir_all(p).map_err(|e| Error::io(p, e))?;
        }
    }
    Ok(lock)
}

/// Remove all but the newest `keep` step checkpoints (0 = keep all).
pub fn prune(out: &Path, keep: usize) -> Result<()> {
    if keep == 0 {
        return Ok(());
    }
    let steps = step_dirs(out);
    let n = steps.len();
    for (_, p) in steps.into_iter().take(n.saturating_sub(keep)) {
        std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
    }
    Ok(())
}

/// Save model + optimizer + state into `dir` atomically. `source_dir` supplies tokenizer files
/// and extra config fields for the model folder.
pub fn save<B: Backend>(
    dir: &Path,
    b: &B,
    model: &Model<B>,
    opt: &AdamW<B>,
    state: &TrainerState,
    source_dir: Option<&Path>,
) -> Result<()> {
    save_in(dir, b, model, opt, state, source_dir, None)
}

/// [`save`] by every rank of a data-parallel group (`comm`; None: a single process). The
/// folder is the one a single process writes: rank 0 writes the (replicated) model and the
/// optimizer state gathered tensor by tensor from every rank's shards, the other ranks take
/// part in the gathers; so a run resumes on any number of ranks (each keeps its shard of the
/// whole tensors it reads). Every rank returns the same outcome.
pub fn save_in<B: Backend>(
    dir: &Path,
    b: &B,
    model: &Model<B>,
    opt: &AdamW<B>,
    state: &TrainerState,
    source_dir: Option<&Path>,
    comm: Option<&dyn Collective<B>>,
) -> Result<()> {
    let Some(c) = comm else {
        return save_one(dir, b, model, opt, state, source_dir, None);
    };
    if c.rank() == 0 {
        let r = save_one(dir, b, model, opt, state, source_dir, comm);
        if let Err(e) = &r {
            c.abort(&format!("saving {}: {e}", dir.display()));
            return r;
        }
    } else {
        // The same gathers as rank 0's optimizer file, in the same order.
        for (group, i, s) in state_tensors(opt, &model.layout) {
            opt.gather_state(b, comm, group, i, s.numel())?;
        }
    }
    // Every rank leaves once rank 0 has written (an abort above reaches the others here).
    c.all_reduce_host(&mut [0.0])
}

fn save_one<B: Backend>(
    dir: &Path,
    b: &B,
    model: &Model<B>,
    opt: &AdamW<B>,
    state: &TrainerState,
    source_dir: Option<&Path>,
    comm: Option<&dyn Collective<B>>,
) -> Result<()> {
    let parent = dir
        .parent()
        .ok_or_else(|| Error::msg(format!("{}: checkpoint path has no parent", dir.display())))?;
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    if dir.exists() && !dir.join("trainer.json").is_file() {
        return Err(Error::msg(format!(
            "{}: exists and is not a checkpoint of this tool; refusing to replace it",
            dir.display()
        )));
    }
    // Non-finite values are refused before anything is written, so a diverged run never
    // produces a checkpoint and the last good one stays the latest.
    let host = model.to_host(b)?;
    for (s, v) in model.layout.specs.iter().zip(&host) {
        if let Some(j) = v.iter().position(|x| !x.is_finite()) {
            return Err(Error::Tensor {
                file: dir.display().to_string(),
                tensor: s.name.clone(),
                msg: format!(
                    "element {j} is {}; refusing to save a diverged model (lower optim.lr or \
                     check optim.weight_decay)",
                    v[j]
                ),
            });
        }
    }
    let tmp = tmp_path(dir);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let parts = Parts {
        model,
        host: &host,
        opt,
        state,
        source_dir,
        comm,
    };
    let result = write_checkpoint(&tmp, b, &parts).and_then(|()| replace_dir(&tmp, dir));
    if result.is_err() {
        // A failed write (e.g. a full disk) leaves no partial folder behind.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// What a checkpoint folder holds, and the group its optimizer state is gathered over.
struct Parts<'a, B: Backend> {
    model: &'a Model<B>,
    /// The model's weights on the host (f32).
    host: &'a [Vec<f32>],
    opt: &'a AdamW<B>,
    state: &'a TrainerState,
    source_dir: Option<&'a Path>,
    comm: Option<&'a dyn Collective<B>>,
}

/// Write the model (host copy `parts.host`), the optimizer and the state into the folder `tmp`.
fn write_checkpoint<B: Backend>(tmp: &Path, b: &B, parts: &Parts<'_, B>) -> Result<()> {
    let Parts {
        model,
        host,
        opt,
        state,
        source_dir,
        comm,
    } = *parts;
    let opts = SaveOptions {
        dtype: if b.needs_master() {
            DType::BF16
        } else {
            DType::F32
        },
        source_dir: source_dir.map(|p| p.to_path_buf()),
        ..SaveOptions::default()
    };
    save_params(&tmp.join("model"), &model.cfg, host, &opts)?;
    save_optimizer(
        &tmp.join("optimizer.safetensors"),
        b,
        &model.layout,
        opt,
        comm,
    )?;
    let json = serde_json::to_vec_pretty(state).map_err(|e| Error::msg(e.to_string()))?;
    write_atomic(&tmp.join("trainer.json"), &json)
}

/// Put the complete checkpoint folder `tmp` in place as `dir`, replacing an older one.
fn replace_dir(tmp: &Path, dir: &Path) -> Result<()> {
    if dir.exists() {
        // Move the old checkpoint of this step aside, put the new one in place, then delete the
        // old one: at every moment one complete checkpoint exists under some name.
        let old = old_path(dir);
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
        }
        std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
        if let Err(e) = std::fs::rename(tmp, dir) {
            let _ = std::fs::rename(&old, dir);
            return Err(Error::io(dir, e));
        }
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))
    } else {
        std::fs::rename(tmp, dir).map_err(|e| Error::io(dir, e))
    }
}

fn old_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.old"))
}

/// Read `trainer.json` of a checkpoint.
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let p = dir.join("trainer.json");
    let text = crate::safefs::read_to_string(&p)?;
    serde_json::from_str(&text).map_err(|e| Error::Line {
        file: p.display().to_string(),
        line: e.line(),
        msg: format!("not a trainer state: {e}"),
    })
}

/// Load the policy and optimizer of a checkpoint into backend `b` (the optimizer state on the
/// backend).
pub fn load<B: Backend>(
    dir: &Path,
    b: &B,
    optim_cfg: crate::train::config::OptimConfig,
) -> Result<(Model<B>, AdamW<B>, TrainerState)> {
    load_placed(dir, b, optim_cfg, false)
}

/// [`load`] with the optimizer state on the backend (`host_optimizer` false) or in host
/// memory (true). The file is the same either way, so a run may resume with the other
/// placement.
pub fn load_placed<B: Backend>(
    dir: &Path,
    b: &B,
    optim_cfg: crate::train::config::OptimConfig,
    host_optimizer: bool,
) -> Result<(Model<B>, AdamW<B>, TrainerState)> {
    load_with(dir, b, |m| AdamW::placed(b, m, optim_cfg, host_optimizer))
}

/// [`load`] with the optimizer state made by `make` for the loaded model (for example rank r's
/// shards, [`AdamW::sharded`]) and then filled from the file (each sharded rank keeps its part
/// of every whole tensor, so the file of any rank count resumes on any other).
pub fn load_with<B: Backend>(
    dir: &Path,
    b: &B,
    make: impl FnOnce(&Model<B>) -> Result<AdamW<B>>,
) -> Result<(Model<B>, AdamW<B>, TrainerState)> {
    let state = read_state(dir)?;
    let model = load_model(&dir.join("model"), b)?;
    let mut opt = make(&model)?;
    load_optimizer(
        &dir.join("optimizer.safetensors"),
        b,
        &model.layout,
        &mut opt,
    )?;
    opt.set_updates(state.updates);
    Ok((model, opt, state))
}

/// The optimizer tensors of a checkpoint in file order: (group, layout index, spec). Rank 0's
/// writer and the other ranks' gathers walk this one order.
fn state_tensors<'a, B: Backend>(
    opt: &AdamW<B>,
    layout: &'a ParamLayout,
) -> impl Iterator<Item = (&'static str, usize, &'a crate::model::ParamSpec)> {
    opt.groups()
        .into_iter()
        .flat_map(move |g| layout.specs.iter().enumerate().map(move |(i, s)| (g, i, s)))
}

/// Stream the optimizer tensors into a safetensors file (f32), one tensor in host memory at a
/// time.
fn save_optimizer<B: Backend>(
    path: &Path,
    b: &B,
    layout: &ParamLayout,
    opt: &AdamW<B>,
    comm: Option<&dyn Collective<B>>,
) -> Result<()> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (prefix, _, s) in state_tensors(opt, layout) {
        let n = s.numel() * 4;
        header.insert(
            format!("{prefix}.{}", s.name),
            serde_json::json!({"dtype": "F32", "shape": s.shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    let mut meta = serde_json::Map::new();
    meta.insert("format".into(), "tooln1-adamw".into());
    header.insert("__metadata__".into(), serde_json::Value::Object(meta));
    let mut hbytes = serde_json::to_vec(&header).map_err(|e| Error::msg(e.to_string()))?;
    while hbytes.len() % 8 != 0 {
        hbytes.push(b' ');
    }
    let tmp = tmp_path(path);
    let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut w = std::io::BufWriter::new(file);
    let io = |e| Error::io(&tmp, e);
    w.write_all(&(hbytes.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&hbytes).map_err(io)?;
    for (prefix, i, s) in state_tensors(opt, layout) {
        let host = opt.gather_state(b, comm, prefix, i, s.numel())?;
        if let Some(j) = host.iter().position(|x| !x.is_finite()) {
            drop(w);
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::Tensor {
                file: path.display().to_string(),
                tensor: format!("{prefix}.{}", s.name),
                msg: format!(
                    "element {j} of the optimizer state is {}; refusing to save a diverged \
                     run (lower optim.lr, raise optim.eps, or check the data)",
                    host[j]
                ),
            });
        }
        w.write_all(bytemuck::cast_slice(&host)).map_err(io)?;
    }
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn load_optimizer<B: Backend>(
    path: &Path,
    b: &B,
    layout: &ParamLayout,
    opt: &mut AdamW<B>,
) -> Result<()> {
    crate::safefs::regular_file(path)?;
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the file is only read while mapped; checkpoints are not modified in place.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&map).map_err(|e| Error::Tensor {
        file: path.display().to_string(),
        tensor: "(header)".into(),
        msg: e.to_string(),
    })?;
    let has_master = opt.has_master();
    for prefix in opt.groups() {
        for (i, s) in layout.specs.iter().enumerate() {
            let name = format!("{prefix}.{}", s.name);
            if prefix == "master" && !st.names().iter().any(|n| *n == name) {
                // Written by a backend without a master copy: keep the one derived from the
                // loaded (f32-saved) parameters.
                continue;
            }
            let view = st.tensor(&name).map_err(|e| Error::Tensor {
                file: path.display().to_string(),
                tensor: name.clone(),
                msg: format!("missing from the optimizer state: {e}"),
            })?;
            if view.dtype() != safetensors::Dtype::F32 || view.shape() != s.shape.as_slice() {
                return Err(Error::Tensor {
                    file: path.display().to_string(),
                    tensor: name,
                    msg: format!(
                        "expected F32 {:?}, found {:?} {:?}",
                        s.shape,
                        view.dtype(),
                        view.shape()
                    ),
                });
            }
            let host = bytes_to_f32(DType::F32, view.data());
            opt.set_state(b, prefix, i, host)?;
        }
    }
    if !has_master && st.names().iter().any(|n| n.starts_with("master.")) {
        return Err(Error::msg(format!(
            "{}: this optimizer state was written by a backend with bf16 parameters; resume it \
             on the same backend",
            path.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_folders_and_own_temporaries() {
        assert_eq!(
            run_dir_of(Path::new("runs/a/checkpoints/step-00000003")),
            Some(PathBuf::from("runs/a"))
        );
        assert_eq!(
            run_dir_of(Path::new("checkpoints/step-00000003")),
            Some(PathBuf::from("."))
        );
        assert_eq!(run_dir_of(Path::new("elsewhere/step-00000003")), None);
        assert!(is_own_temp(".step-00000003.tmp"));
        assert!(is_own_temp(".step-00000003.old"));
        assert!(!is_own_temp(".step-.tmp"));
        assert!(!is_own_temp("step-00000003"));
        assert!(!is_own_temp(".notes.tmp"));
    }
}
