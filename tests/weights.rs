//! safetensors load/save: round trips (single file and sharded, f32 exact, bf16 rounding),
//! atomic replacement, and errors that name the tensor or file at fault.

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tooln1::backend::DType;
use tooln1::model::init::{random_params, tiny_config};
use tooln1::model::weights::{save_params, Checkpoint, SaveOptions, INDEX_FILE, SINGLE_FILE};
use tooln1::model::{ParamLayout, Qwen2Config};

fn clock_seed() -> u64 {
    let s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    println!("seed = {s}");
    s
}

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

/// Odd sizes: head_dim 6, 3 heads sharing 1 kv head, vocab 37.
fn odd_cfg(tied: bool) -> Qwen2Config {
    tiny_config(18, 2, 3, 1, 29, 37, tied)
}

/// Random params with a wide value range (so bf16 rounding is visible).
fn params(cfg: &Qwen2Config, seed: u64) -> Vec<Vec<f32>> {
    let mut p = random_params(cfg, seed);
    for (i, t) in p.iter_mut().enumerate() {
        for (j, x) in t.iter_mut().enumerate() {
            *x = *x * 37.3 + ((i * 7 + j) % 5) as f32 * 1e-3;
        }
    }
    p
}

fn f32_opts() -> SaveOptions {
    SaveOptions {
        dtype: DType::F32,
        ..Default::default()
    }
}

fn err_of<T>(r: tooln1::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn f32_round_trip_is_exact_single_and_sharded() {
    let seed = clock_seed();
    for tied in [true, false] {
        let cfg = odd_cfg(tied);
        let p = params(&cfg, seed);
        let dir = tempfile::tempdir().unwrap();
        let single = dir.path().join("single");
        save_params(&single, &cfg, &p, &f32_opts()).unwrap();
        assert!(single.join(SINGLE_FILE).is_file());
        assert!(!single.join(INDEX_FILE).exists());
        let ck = Checkpoint::open(&single).unwrap();
        assert_eq!(ck.cfg.tie_word_embeddings, tied);
        assert_eq!(ck.load_host().unwrap(), p, "tied={tied}");
        assert_eq!(ck.tensor_names().contains(&"lm_head.weight"), !tied);

        // Shards of at most 3 KB: every tensor boundary respected, index lists all.
        let sharded = dir.path().join("sharded");
        let opts = SaveOptions {
            max_shard_bytes: 3000,
            ..f32_opts()
        };
        save_params(&sharded, &cfg, &p, &opts).unwrap();
        assert!(!sharded.join(SINGLE_FILE).exists());
        let index: Value =
            serde_json::from_str(&std::fs::read_to_string(sharded.join(INDEX_FILE)).unwrap())
                .unwrap();
        let map = index["weight_map"].as_object().unwrap();
        let layout = ParamLayout::new(&cfg);
        assert_eq!(map.len(), layout.specs.len());
        let mut shards: Vec<&str> = map.values().map(|v| v.as_str().unwrap()).collect();
        shards.sort();
        shards.dedup();
        assert!(shards.len() > 3, "{shards:?}");
        let n = shards.len();
        for s in &shards {
            assert!(s.ends_with(&format!("-of-{n:05}.safetensors")), "{s}");
            let size = std::fs::metadata(sharded.join(s)).unwrap().len();
            // One tensor larger than the limit gets a shard of its own.
            let (_, meta) =
                SafeTensors::read_metadata(&std::fs::read(sharded.join(s)).unwrap()).unwrap();
            assert!(
                size <= 3000 + 1024 || meta.tensors().len() == 1,
                "{s}: {size} bytes"
            );
        }
        let total: u64 = layout.specs.iter().map(|s| s.numel() as u64 * 4).sum();
        assert_eq!(index["metadata"]["total_size"], json!(total));
        assert_eq!(
            Checkpoint::open(&sharded).unwrap().load_host().unwrap(),
            p,
            "sharded tied={tied}"
        );
    }
}

#[test]
fn bf16_save_rounds_to_nearest_even() {
    let seed = clock_seed();
    let cfg = odd_cfg(false);
    let p = params(&cfg, seed);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m");
    save_params(&out, &cfg, &p, &SaveOptions::default()).unwrap();
    let ck = Checkpoint::open(&out).unwrap();
    assert_eq!(ck.cfg.torch_dtype, "bfloat16");
    let t = ck.tensor("model.embed_tokens.weight").unwrap();
    assert_eq!(t.dtype, DType::BF16);
    let back = ck.load_host().unwrap();
    for (a, b) in p.iter().zip(&back) {
        for (&x, &y) in a.iter().zip(b) {
            assert_eq!(y, half::bf16::from_f32(x).to_f32());
            assert!((x - y).abs() <= x.abs() * (1.0 / 256.0), "{x} -> {y}");
        }
    }
    // Ties go to even: 1 + 2^-8 lies halfway between two bf16 values.
    let mut q = p.clone();
    q[0][0] = 1.0 + 1.0 / 256.0;
    q[0][1] = 1.0 + 3.0 / 256.0;
    let over = SaveOptions {
        overwrite: true,
        ..SaveOptions::default()
    };
    save_params(&out, &cfg, &q, &over).unwrap();
    let back = Checkpoint::open(&out).unwrap().load_host().unwrap();
    assert_eq!(back[0][0], 1.0);
    assert_eq!(back[0][1], 1.0 + 4.0 / 256.0);
}

#[test]
fn replaces_only_its_own_kind_of_folder_and_copies_tokenizer_and_config_fields() {
    let seed = clock_seed();
    let cfg = odd_cfg(true);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("tokenizer.json"), b"{\"tok\": 1}").unwrap();
    std::fs::write(src.join("tokenizer_config.json"), b"{\"cfg\": 2}").unwrap();
    let mut base = cfg.to_json(None);
    base["sliding_window"] = json!(131072);
    base["transformers_version"] = json!("4.43.1");
    std::fs::write(src.join("config.json"), base.to_string()).unwrap();

    let out = dir.path().join("ckpt");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("stale.txt"), b"old").unwrap();
    let p = params(&cfg, seed);
    let mut opts = SaveOptions {
        source_dir: Some(src.clone()),
        ..f32_opts()
    };
    // A non-empty folder is refused; with `overwrite`, still refused while it holds a file
    // that is not part of a model folder (it would be deleted).
    let e = err_of(save_params(&out, &cfg, &p, &opts));
    assert!(e.contains("not empty"), "{e}");
    opts.overwrite = true;
    let e = err_of(save_params(&out, &cfg, &p, &opts));
    assert!(e.contains("stale.txt"), "{e}");
    assert_eq!(std::fs::read(out.join("stale.txt")).unwrap(), b"old");
    std::fs::remove_file(out.join("stale.txt")).unwrap();
    save_params(&out, &cfg, &p, &opts).unwrap();
    assert_eq!(
        std::fs::read(out.join("tokenizer.json")).unwrap(),
        b"{\"tok\": 1}"
    );
    assert!(out.join("tokenizer_config.json").is_file());
    let saved: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(saved["sliding_window"], json!(131072));
    assert_eq!(saved["transformers_version"], json!("4.43.1"));
    assert_eq!(saved["torch_dtype"], json!("float32"));
    // No temporary or old folders left beside the target.
    let leftovers: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // A second save over it works too.
    let p2 = params(&cfg, seed ^ 1);
    save_params(&out, &cfg, &p2, &opts).unwrap();
    assert_eq!(Checkpoint::open(&out).unwrap().load_host().unwrap(), p2);
    // Wrong number of tensors is refused before anything is written.
    // What a killed save leaves: its temporary (deleted) and, killed between its two renames,
    // the old folder moved aside with the target missing (put back).
    let dead = "4000000000-17";
    std::fs::create_dir(dir.path().join(format!(".ckpt.tmp-{dead}"))).unwrap();
    std::fs::rename(&out, dir.path().join(format!(".ckpt.old-{dead}"))).unwrap();
    let e = err_of(save_params(&out, &cfg, &p2, &SaveOptions::default()));
    assert!(e.contains("not empty"), "{e}");
    assert_eq!(Checkpoint::open(&out).unwrap().load_host().unwrap(), p2);
    let leftovers: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let e = err_of(save_params(&dir.path().join("bad"), &cfg, &p2[1..], &opts));
    assert!(e.contains("parameter tensors"), "{e}");
    assert!(!dir.path().join("bad").exists());
}

/// Save a model, then rewrite its single file with `edit` applied to the tensor list.
fn rewrite(
    dir: &Path,
    edit: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>),
) -> PathBuf {
    let file = dir.join(SINGLE_FILE);
    let bytes = std::fs::read(&file).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut tensors);
    let views: HashMap<String, TensorView> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(&views, None, &file).unwrap();
    file
}

fn saved(cfg: &Qwen2Config, seed: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    save_params(&dir.path().join("m"), cfg, &params(cfg, seed), &f32_opts()).unwrap();
    dir
}

#[test]
fn truncated_and_corrupt_files_are_errors_naming_the_file() {
    let seed = clock_seed();
    let cfg = odd_cfg(false);
    let dir = saved(&cfg, seed);
    let m = dir.path().join("m");
    let file = m.join(SINGLE_FILE);
    let good = std::fs::read(&file).unwrap();

    std::fs::write(&file, &good[..good.len() - 7]).unwrap();
    let e = err_of(Checkpoint::open(&m));
    assert!(
        e.contains("model.safetensors") && e.contains("truncated"),
        "{e}"
    );

    std::fs::write(&file, &good[..5]).unwrap();
    let e = err_of(Checkpoint::open(&m));
    assert!(e.contains("model.safetensors"), "{e}");

    // Flip bytes inside the JSON header.
    let mut bad = good.clone();
    for b in &mut bad[8..20] {
        *b ^= 0x5a;
    }
    std::fs::write(&file, &bad).unwrap();
    let e = err_of(Checkpoint::open(&m));
    assert!(e.contains("model.safetensors"), "{e}");

    // A header length pointing past the end.
    let mut bad = good.clone();
    bad[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    std::fs::write(&file, &bad).unwrap();
    let e = err_of(Checkpoint::open(&m));
    assert!(e.contains("model.safetensors"), "{e}");

    std::fs::write(&file, &good).unwrap();
    assert!(Checkpoint::open(&m).unwrap().load_host().is_ok());
}

#[test]
fn missing_or_misshaped_tensors_are_named() {
    let seed = clock_seed();
    let cfg = odd_cfg(false);
    let dir = saved(&cfg, seed);
    let m = dir.path().join("m");
    rewrite(&m, |t| {
        t.retain(|x| x.0 != "model.layers.1.mlp.up_proj.weight")
    });
    let e = err_of(Checkpoint::open(&m).unwrap().load_host());
    assert!(
        e.contains("model.layers.1.mlp.up_proj.weight") && e.contains("missing"),
        "{e}"
    );

    let dir = saved(&cfg, seed);
    let m = dir.path().join("m");
    rewrite(&m, |t| {
        let x = t
            .iter_mut()
            .find(|x| x.0 == "model.layers.0.self_attn.k_proj.weight")
            .unwrap();
        let (a, b) = (x.2[0], x.2[1]);
        x.2 = vec![b, a];
    });
    let e = err_of(Checkpoint::open(&m).unwrap().load_host());
    assert!(
        e.contains("model.layers.0.self_attn.k_proj.weight")
            && e.contains("model.safetensors")
            && e.contains("[18, 6]")
            && e.contains("[6, 18]"),
        "{e}"
    );

    // Untied without lm_head: an error naming it.
    let dir = saved(&cfg, seed);
    let m = dir.path().join("m");
    rewrite(&m, |t| t.retain(|x| x.0 != "lm_head.weight"));
    let e = err_of(Checkpoint::open(&m).unwrap().load_host());
    assert!(e.contains("lm_head.weight"), "{e}");

    // Unsupported dtype.
    let dir = saved(&cfg, seed);
    let m = dir.path().join("m");
    rewrite(&m, |t| {
        let x = t.iter_mut().find(|x| x.0 == "model.norm.weight").unwrap();
        x.1 = Dtype::I32;
    });
    let e = err_of(Checkpoint::open(&m).unwrap().load_host());
    assert!(e.contains("model.norm.weight") && e.contains("I32"), "{e}");
}

#[test]
fn tied_model_may_carry_lm_head() {
    let seed = clock_seed();
    let cfg = odd_cfg(true);
    let dir = saved(&cfg, seed);
    let m = dir.path().join("m");
    let before = Checkpoint::open(&m).unwrap().load_host().unwrap();
    rewrite(&m, |t| {
        let emb = t
            .iter()
            .find(|x| x.0 == "model.embed_tokens.weight")
            .unwrap()
            .clone();
        t.push(("lm_head.weight".into(), emb.1, emb.2, emb.3));
    });
    let ck = Checkpoint::open(&m).unwrap();
    assert!(ck.tensor_names().contains(&"lm_head.weight"));
    assert_eq!(ck.load_host().unwrap(), before);
}

#[test]
fn bad_index_and_missing_shards() {
    let seed = clock_seed();
    let cfg = odd_cfg(false);
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    let opts = SaveOptions {
        max_shard_bytes: 4000,
        ..f32_opts()
    };
    save_params(&m, &cfg, &params(&cfg, seed), &opts).unwrap();
    let idx = m.join(INDEX_FILE);
    let good = std::fs::read_to_string(&idx).unwrap();

    std::fs::write(&idx, "{\"weight_map\": ").unwrap();
    let e = err_of(Checkpoint::open(&m));
    assert!(
        e.contains(INDEX_FILE) && e.contains("not valid JSON"),
        "{e}"
    );

    std::fs::write(&idx, "{\"metadata\": {}}").unwrap();
    let e = err_of(Checkpoint::open(&m));
    assert!(e.contains(INDEX_FILE) && e.contains("weight_map"), "{e}");

    let mut v: Value = serde_json::from_str(&good).unwrap();
    v["weight_map"]["model.norm.weight"] = json!("model-00099-of-00099.safetensors");
    std::fs::write(&idx, v.to_string()).unwrap();
    let e = err_of(Checkpoint::open(&m));
    assert!(
        e.contains("model-00099-of-00099.safetensors") && e.contains("model.norm.weight"),
        "{e}"
    );

    let mut v: Value = serde_json::from_str(&good).unwrap();
    v["weight_map"]["model.norm.weight"] = json!("../escape.safetensors");
    std::fs::write(&idx, v.to_string()).unwrap();
    let e = err_of(Checkpoint::open(&m));
    assert!(e.contains("not a plain file name"), "{e}");

    // The index points a tensor at a shard that does not hold it.
    let mut v: Value = serde_json::from_str(&good).unwrap();
    let other = v["weight_map"]["model.embed_tokens.weight"].clone();
    let norm_shard = v["weight_map"]["model.norm.weight"].clone();
    assert_ne!(other, norm_shard);
    v["weight_map"]["model.norm.weight"] = other;
    std::fs::write(&idx, v.to_string()).unwrap();
    let e = err_of(Checkpoint::open(&m));
    assert!(
        e.contains("model.norm.weight") && e.contains("missing"),
        "{e}"
    );

    std::fs::write(&idx, &good).unwrap();
    assert!(Checkpoint::open(&m).unwrap().load_host().is_ok());

    let e = err_of(Checkpoint::open(&dir.path().join("nope")));
    assert!(e.contains("nope"), "{e}");
    std::fs::create_dir(dir.path().join("empty")).unwrap();
    let e = err_of(Checkpoint::open(&dir.path().join("empty")));
    assert!(e.contains("config.json"), "{e}");
}

#[test]
fn fixture_models_have_every_layout_tensor() {
    for name in ["tied", "untied"] {
        let ck = Checkpoint::open(&fixture(&format!("golden/{name}"))).unwrap();
        let layout = ParamLayout::new(&ck.cfg);
        let stored: u64 = ck
            .tensor_names()
            .iter()
            .map(|n| ck.tensor(n).unwrap().numel() as u64)
            .sum();
        assert_eq!(layout.num_params(), stored, "{name}");
        let host = ck.load_host().unwrap();
        assert_eq!(host.len(), layout.specs.len());
        assert!(host.iter().flatten().all(|x| x.is_finite()));
    }
}

#[test]
fn save_model_and_load_model_through_the_cpu_backend() {
    use tooln1::backend::cpu::Cpu;
    use tooln1::model::weights::{load_model, save_model};
    use tooln1::model::Model;
    let seed = clock_seed();
    for tied in [false, true] {
        let cfg = odd_cfg(tied);
        let p = params(&cfg, seed);
        let model = Model::from_host(&Cpu, cfg.clone(), &p).unwrap();
        let dir = tempfile::tempdir().unwrap();
        for (dtype, shard) in [
            (DType::F32, u64::MAX),
            (DType::BF16, 2500),
            (DType::F16, 1 << 30),
        ] {
            let out = dir.path().join(format!("{dtype:?}"));
            let opts = SaveOptions {
                dtype,
                max_shard_bytes: shard,
                ..Default::default()
            };
            save_model(&out, &model, &Cpu, &opts).unwrap();
            let back = load_model(&out, &Cpu).unwrap();
            assert_eq!(back.cfg.tie_word_embeddings, tied);
            let host = back.to_host(&Cpu).unwrap();
            for (a, b) in p.iter().zip(&host) {
                for (&x, &y) in a.iter().zip(b) {
                    let want = match dtype {
                        DType::F32 => x,
                        DType::BF16 => half::bf16::from_f32(x).to_f32(),
                        DType::F16 => half::f16::from_f32(x).to_f32(),
                    };
                    assert_eq!(y, want, "{dtype:?} tied={tied}");
                }
            }
        }
    }
    // Errors from load_model name the tensor too.
    let cfg = odd_cfg(false);
    let dir = saved(&cfg, seed);
    let m = dir.path().join("m");
    rewrite(&m, |t| {
        t.retain(|x| x.0 != "model.layers.0.self_attn.q_proj.bias")
    });
    let e = err_of(load_model(&m, &Cpu));
    assert!(e.contains("model.layers.0.self_attn.q_proj.bias"), "{e}");
}

#[test]
fn init_tiny_model_loads_and_runs_on_a_chat_render() {
    use tooln1::backend::cpu::Cpu;
    use tooln1::cli::model_cmds::builtin_tiny_vocab;
    use tooln1::model::init::{write_tiny_model, TinyOptions};
    use tooln1::model::weights::load_model;
    use tooln1::model::PackedBatch;
    use tooln1::tokenizer::{ChatTemplate, Tokenizer};
    let seed = clock_seed();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tiny");
    let o = TinyOptions {
        seed,
        hidden: 48,
        heads: 6,
        kv_heads: 3,
        layers: 2,
        intermediate: 72,
        ..Default::default()
    };
    write_tiny_model(&out, &o, &builtin_tiny_vocab().unwrap()).unwrap();
    let model = load_model(&out, &Cpu).unwrap();
    let tok = Tokenizer::from_dir(&out).unwrap();
    assert!(tok.vocab_size() <= model.cfg.vocab_size);
    let tpl = ChatTemplate::from_tokenizer_config(&out.join("tokenizer_config.json")).unwrap();
    let text = tpl
        .render_json(
            &[json!({"role": "user", "content": "Weather in Paris?"})],
            None,
            true,
        )
        .unwrap();
    let ids = tok.encode(&text).unwrap();
    let batch = PackedBatch::from_sequences(std::slice::from_ref(&ids)).unwrap();
    let db = model.upload_batch(&Cpu, &batch).unwrap();
    let (logp, _) = model.logprobs(&Cpu, &db, false).unwrap();
    assert_eq!(logp.len(), ids.len() - 1);
    assert!(logp.iter().all(|x| x.is_finite() && *x < 0.0));
}
