//! HF `config.json` for `Qwen2ForCausalLM`.
//!
//! [`Qwen2Config::from_file`] reads and checks a config; [`Qwen2Config::to_json`] writes one
//! that transformers loads, keeping the fields of an original config this engine does not use
//! (`sliding_window`, `use_cache`, ...) when one is given.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::Path;

/// The fields of a Qwen2 config this engine uses (facts §2.2). `head_dim` is derived
/// (hidden_size / num_attention_heads) unless the file gives it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Qwen2Config {
    pub architectures: Vec<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    /// One or several end-of-sequence ids (HF allows an int or a list).
    pub eos_token_id: Vec<u32>,
    pub torch_dtype: String,
    pub hidden_act: String,
}

/// The architecture name written into saved configs.
pub const ARCHITECTURE: &str = "Qwen2ForCausalLM";
/// The `model_type` written into saved configs.
pub const MODEL_TYPE: &str = "qwen2";

/// Largest parameter count a config may imply (10 trillion: far above any published Qwen2, and
/// small enough that every byte count derived from it fits in 64 bits).
pub const MAX_PARAMS: u64 = 10_000_000_000_000;
/// Most decoder layers a config may have (the largest Qwen2.5 has 80). The tensor list alone
/// takes memory per layer, so this is checked before any list is built.
pub const MAX_LAYERS: usize = 100_000;

/// Field reader over one JSON object that names the file and field in every error.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    label: &'a str,
}

impl Fields<'_> {
    fn err(&self, field: &str, msg: impl Into<String>) -> Error {
        Error::Config {
            file: self.label.to_string(),
            field: field.to_string(),
            msg: msg.into(),
        }
    }

    fn get(&self, field: &str) -> Option<&Value> {
        self.obj.get(field).filter(|v| !v.is_null())
    }

    fn required(&self, field: &str) -> Result<&Value> {
        self.get(field)
            .ok_or_else(|| self.err(field, "missing (required for Qwen2ForCausalLM)"))
    }

    fn as_usize(&self, field: &str, v: &Value) -> Result<usize> {
        v.as_u64()
            .and_then(|x| usize::try_from(x).ok())
            .ok_or_else(|| {
                self.err(
                    field,
                    format!("expected a non-negative integer, found {}", short(v)),
                )
            })
    }

    fn usize_req(&self, field: &str) -> Result<usize> {
        let v = self.required(field)?;
        self.as_usize(field, v)
    }

    fn positive(&self, field: &str) -> Result<usize> {
        let x = self.usize_req(field)?;
        if x == 0 {
            return Err(self.err(field, "must be greater than 0"));
        }
        Ok(x)
    }

    fn f64_or(&self, field: &str, default: f64) -> Result<f64> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.err(field, format!("expected a number, found {}", short(v)))),
        }
    }

    fn bool_or(&self, field: &str, default: bool) -> Result<bool> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| {
                self.err(field, format!("expected true or false, found {}", short(v)))
            }),
        }
    }

    fn string_or(&self, field: &str, default: &str) -> Result<String> {
        match self.get(field) {
            None => Ok(default.to_string()),
            Some(v) => v
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| self.err(field, format!("expected a string, found {}", short(v)))),
        }
    }

    fn token_id(&self, field: &str, v: &Value) -> Result<u32> {
        v.as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .ok_or_else(|| {
                self.err(
                    field,
                    format!("expected a token id (integer), found {}", short(v)),
                )
            })
    }
}

/// A JSON value shortened for an error message.
fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        let head: String = s.chars().take(57).collect();
        format!("{head}...")
    } else {
        s
    }
}

impl Qwen2Config {
    /// Read and check a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::safefs::read_to_string(path)?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// Parse and check config JSON text; `label` (usually the file path) prefixes every error.
    pub fn from_json_str(text: &str, label: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|e| Error::Config {
            file: label.to_string(),
            field: "<json>".into(),
            msg: format!("not valid JSON: {e}"),
        })?;
        Self::from_json_value(&value, label)
    }

    /// Check a parsed config object.
    pub fn from_json_value(value: &Value, label: &str) -> Result<Self> {
        let obj = value.as_object().ok_or_else(|| Error::Config {
            file: label.to_string(),
            field: "<json>".into(),
            msg: format!("expected a JSON object, found {}", short(value)),
        })?;
        let f = Fields { obj, label };

        // Which model this is: `model_type` and/or `architectures` must say Qwen2.
        let model_type = match f.get("model_type") {
            None => None,
            Some(v) => Some(v.as_str().ok_or_else(|| {
                f.err(
                    "model_type",
                    format!("expected a string, found {}", short(v)),
                )
            })?),
        };
        if let Some(mt) = model_type {
            if mt != MODEL_TYPE {
                return Err(f.err(
                    "model_type",
                    format!("unsupported model type {mt:?}; expected \"{MODEL_TYPE}\""),
                ));
            }
        }
        let architectures: Vec<String> = match f.get("architectures") {
            None => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|a| {
                    a.as_str().map(str::to_string).ok_or_else(|| {
                        f.err(
                            "architectures",
                            format!("expected a list of strings, found {}", short(a)),
                        )
                    })
                })
                .collect::<Result<_>>()?,
            Some(v) => {
                return Err(f.err(
                    "architectures",
                    format!("expected a list of strings, found {}", short(v)),
                ))
            }
        };
        if let Some(bad) = architectures.iter().find(|a| a.as_str() != ARCHITECTURE) {
            return Err(f.err(
                "architectures",
                format!("unsupported architecture {bad:?}; expected \"{ARCHITECTURE}\""),
            ));
        }
        if model_type.is_none() && architectures.is_empty() {
            return Err(f.err(
                "model_type",
                format!(
                    "missing (and no `architectures`): cannot tell that this is a \
                     {ARCHITECTURE} config"
                ),
            ));
        }
        let architectures = if architectures.is_empty() {
            vec![ARCHITECTURE.to_string()]
        } else {
            architectures
        };

        let hidden_size = f.positive("hidden_size")?;
        let intermediate_size = f.positive("intermediate_size")?;
        let num_hidden_layers = f.positive("num_hidden_layers")?;
        let num_attention_heads = f.positive("num_attention_heads")?;
        let num_key_value_heads = match f.get("num_key_value_heads") {
            None => num_attention_heads,
            Some(_) => f.positive("num_key_value_heads")?,
        };
        let vocab_size = f.positive("vocab_size")?;

        let head_dim = match f.get("head_dim") {
            Some(_) => f.positive("head_dim")?,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(f.err(
                        "hidden_size",
                        format!(
                            "{hidden_size} is not divisible by num_attention_heads \
                             {num_attention_heads}"
                        ),
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(f.err(
                "num_attention_heads",
                format!(
                    "{num_attention_heads} is not divisible by num_key_value_heads \
                     {num_key_value_heads} (grouped-query attention shares each kv head by a \
                     whole number of query heads)"
                ),
            ));
        }
        if head_dim % 2 != 0 {
            return Err(f.err(
                "head_dim",
                format!("{head_dim} is odd; rotary embeddings split the head in two halves"),
            ));
        }

        let rms_norm_eps = f.f64_or("rms_norm_eps", 1e-6)?;
        if !(rms_norm_eps.is_finite() && rms_norm_eps > 0.0) {
            return Err(f.err(
                "rms_norm_eps",
                format!("must be a positive number, found {rms_norm_eps}"),
            ));
        }
        let rope_theta = match (f.get("rope_theta"), f.get("rope_parameters")) {
            (Some(_), _) | (None, None) => f.f64_or("rope_theta", 10000.0)?,
            // transformers 5 nests it: "rope_parameters": {"rope_theta": .., "rope_type": ..}
            (None, Some(rp)) => {
                let rp_obj = rp.as_object().ok_or_else(|| {
                    f.err(
                        "rope_parameters",
                        format!("expected an object, found {}", short(rp)),
                    )
                })?;
                let inner = Fields { obj: rp_obj, label };
                let t = inner.f64_or("rope_theta", 10000.0).map_err(|_| {
                    f.err(
                        "rope_parameters.rope_theta",
                        "expected a number".to_string(),
                    )
                })?;
                let rope_type = inner.string_or("rope_type", "default").map_err(|_| {
                    f.err("rope_parameters.rope_type", "expected a string".to_string())
                })?;
                if rope_type != "default" {
                    return Err(f.err(
                        "rope_parameters.rope_type",
                        format!("unsupported RoPE type {rope_type:?}; expected \"default\""),
                    ));
                }
                t
            }
        };
        if let Some(rs) = f.get("rope_scaling") {
            let kind = rs
                .get("rope_type")
                .or_else(|| rs.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("?");
            if kind != "default" {
                return Err(f.err(
                    "rope_scaling",
                    format!("RoPE scaling {kind:?} is not supported; expected none"),
                ));
            }
        }
        if !(rope_theta.is_finite() && rope_theta > 0.0) {
            return Err(f.err(
                "rope_theta",
                format!("must be a positive number, found {rope_theta}"),
            ));
        }
        let max_position_embeddings = match f.get("max_position_embeddings") {
            None => 32768,
            Some(_) => f.positive("max_position_embeddings")?,
        };
        let tie_word_embeddings = f.bool_or("tie_word_embeddings", false)?;
        let bos_token_id = match f.get("bos_token_id") {
            None => None,
            Some(v) => Some(f.token_id("bos_token_id", v)?),
        };
        let eos_token_id = match f.get("eos_token_id") {
            None => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| f.token_id("eos_token_id", v))
                .collect::<Result<_>>()?,
            Some(v) => vec![f.token_id("eos_token_id", v)?],
        };
        let torch_dtype = match f.get("torch_dtype") {
            Some(_) => f.string_or("torch_dtype", "float32")?,
            // transformers 5 writes `dtype`.
            None => f.string_or("dtype", "float32")?,
        };
        let hidden_act = f.string_or("hidden_act", "silu")?;
        if hidden_act != "silu" {
            return Err(f.err(
                "hidden_act",
                format!("unsupported activation {hidden_act:?}; expected \"silu\""),
            ));
        }
        if f.bool_or("use_sliding_window", false)? {
            return Err(f.err(
                "use_sliding_window",
                "sliding-window attention is not supported; expected false",
            ));
        }
        let cfg = Qwen2Config {
            architectures,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            rms_norm_eps,
            rope_theta,
            max_position_embeddings,
            tie_word_embeddings,
            bos_token_id,
            eos_token_id,
            torch_dtype,
            hidden_act,
        };
        cfg.validate(label)?;
        Ok(cfg)
    }

    /// Check the invariants the model code relies on (for configs built in code).
    pub fn validate(&self, label: &str) -> Result<()> {
        let err = |field: &str, msg: String| Error::Config {
            file: label.to_string(),
            field: field.to_string(),
            msg,
        };
        for (field, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
        ] {
            if v == 0 {
                return Err(err(field, "must be greater than 0".into()));
            }
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(err(
                "num_attention_heads",
                format!(
                    "{} is not divisible by num_key_value_heads {}",
                    self.num_attention_heads, self.num_key_value_heads
                ),
            ));
        }
        if self.head_dim % 2 != 0 {
            return Err(err(
                "head_dim",
                format!(
                    "{} is odd; rotary embeddings need an even size",
                    self.head_dim
                ),
            ));
        }
        if self.num_hidden_layers > MAX_LAYERS {
            return Err(err(
                "num_hidden_layers",
                format!(
                    "{} is above the supported maximum of {MAX_LAYERS}",
                    self.num_hidden_layers
                ),
            ));
        }
        match self.checked_num_params() {
            Some(n) if n <= MAX_PARAMS => {}
            n => {
                return Err(err(
                    "hidden_size",
                    format!(
                        "the shapes imply {} parameters (hidden {}, intermediate {}, {} layers, \
                         vocab {}), above the supported maximum of {MAX_PARAMS}",
                        n.map(|n| n.to_string())
                            .unwrap_or_else(|| "more than 2^64".into()),
                        self.hidden_size,
                        self.intermediate_size,
                        self.num_hidden_layers,
                        self.vocab_size
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Parameter count implied by the shapes, with overflow-checked arithmetic (`None` when it
    /// does not fit in 64 bits). Same total as `ParamLayout::num_params`, computed without
    /// building the layout.
    pub fn checked_num_params(&self) -> Option<u64> {
        let c = |v: usize| u64::try_from(v).ok();
        let h = c(self.hidden_size)?;
        let i = c(self.intermediate_size)?;
        let q = c(self.num_attention_heads)?.checked_mul(c(self.head_dim)?)?;
        let kv = c(self.num_key_value_heads)?.checked_mul(c(self.head_dim)?)?;
        let vocab = c(self.vocab_size)?;
        // Two norms, q/k/v projections with biases, o projection, gate/up/down.
        let per_layer = [
            2u64.checked_mul(h)?,
            h.checked_mul(q)?.checked_add(q)?,
            2u64.checked_mul(h.checked_mul(kv)?.checked_add(kv)?)?,
            q.checked_mul(h)?,
            3u64.checked_mul(h.checked_mul(i)?)?,
        ]
        .iter()
        .try_fold(0u64, |a, &x| a.checked_add(x))?;
        let layers = c(self.num_hidden_layers)?.checked_mul(per_layer)?;
        let embed = vocab.checked_mul(h)?;
        let heads = if self.tie_word_embeddings { 1 } else { 2 };
        embed
            .checked_mul(heads)?
            .checked_add(layers)?
            .checked_add(h)
    }

    /// The config as a JSON object in the HF layout. Fields of `base` (an original config.json
    /// object, e.g. the one the model was loaded from) that this struct does not model are kept,
    /// in their original order; the fields below overwrite theirs.
    pub fn to_json(&self, base: Option<&Value>) -> Value {
        let mut obj = base.and_then(Value::as_object).cloned().unwrap_or_default();
        // transformers 5 writes `dtype`; keep whichever key the base used, plus torch_dtype.
        let mut set = |k: &str, v: Value| {
            obj.insert(k.to_string(), v);
        };
        set("architectures", serde_json::json!(self.architectures));
        set("model_type", Value::from(MODEL_TYPE));
        set("hidden_size", self.hidden_size.into());
        set("intermediate_size", self.intermediate_size.into());
        set("num_hidden_layers", self.num_hidden_layers.into());
        set("num_attention_heads", self.num_attention_heads.into());
        set("num_key_value_heads", self.num_key_value_heads.into());
        set("head_dim", self.head_dim.into());
        set("vocab_size", self.vocab_size.into());
        set("rms_norm_eps", self.rms_norm_eps.into());
        set("rope_theta", self.rope_theta.into());
        set(
            "max_position_embeddings",
            self.max_position_embeddings.into(),
        );
        set("tie_word_embeddings", self.tie_word_embeddings.into());
        set(
            "bos_token_id",
            self.bos_token_id.map(Value::from).unwrap_or(Value::Null),
        );
        set(
            "eos_token_id",
            match self.eos_token_id.as_slice() {
                [] => Value::Null,
                [one] => Value::from(*one),
                many => serde_json::json!(many),
            },
        );
        set("torch_dtype", Value::from(self.torch_dtype.clone()));
        set("hidden_act", Value::from(self.hidden_act.clone()));
        if !obj.contains_key("use_sliding_window") {
            obj.insert("use_sliding_window".into(), false.into());
        }
        if let Some(Value::Object(rp)) = obj.get_mut("rope_parameters") {
            rp.insert("rope_theta".into(), self.rope_theta.into());
        }
        if obj.contains_key("dtype") {
            obj.insert("dtype".into(), Value::from(self.torch_dtype.clone()));
        }
        Value::Object(obj)
    }

    /// Pretty JSON text of [`Qwen2Config::to_json`], newline-terminated.
    pub fn to_json_string(&self, base: Option<&Value>) -> String {
        let mut s = serde_json::to_string_pretty(&self.to_json(base))
            .unwrap_or_else(|_| String::from("{}"));
        s.push('\n');
        s
    }

    /// Number of query heads sharing one kv head.
    pub fn kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
}
