//! HF `config.json` for `Qwen2ForCausalLM`.
//!
//! [`Qwen2Config::from_file`] reads and checks a config; [`Qwen2Config::to_json`] writes one
//! that transformers loads, keeping the fields of an original config this engine does not use
//! (`sliding_window`, `use_cache`, ...) when one is given.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::Path;

/// The fields of a Qwen2 config this engine uses (those of transformers'
/// `Qwen2Config`, `models/qwen2/configuration_qwen2.py`). `head_dim` is derived
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

impl Qwen2Config {
    /// Whether `other` describes the same model: every field but `torch_dtype`, which only
    /// says how the weights were stored (a bf16 checkpoint of an f32 model is the same model).
    pub fn same_model(&self, other: &Qwen2Config) -> bool {
        let mut o = other.clone();
        o.torch_dtype.clone_from(&self.torch_dtype);
        *self == o
    }
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

/// A field of config.json as serde read it: the value when it has the expected JSON type,
/// else the value as written, so that the check that needs it can name the field and show what
/// it found.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum Field<T> {
    Ok(T),
    Bad(Value),
}

/// What a JSON value of a field type must look like, for the "expected ..." of an error.
trait Expected {
    const WHAT: &'static str;
}
impl Expected for usize {
    const WHAT: &'static str = "a non-negative integer";
}
impl Expected for f64 {
    const WHAT: &'static str = "a number";
}
impl Expected for bool {
    const WHAT: &'static str = "true or false";
}
impl Expected for String {
    const WHAT: &'static str = "a string";
}
/// Token ids.
impl Expected for u32 {
    const WHAT: &'static str = "a token id (integer)";
}

/// `eos_token_id`: one id or a list of them (HF allows both).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    Many(Vec<Field<u32>>),
    One(Field<u32>),
}

/// config.json as serde reads it: the fields this engine uses, each `None` when absent or
/// `null`. Every other field is ignored here and kept by [`Qwen2Config::to_json`].
#[derive(Clone, Debug, Deserialize)]
struct RawConfig {
    model_type: Option<Field<String>>,
    architectures: Option<Field<Vec<Field<String>>>>,
    hidden_size: Option<Field<usize>>,
    intermediate_size: Option<Field<usize>>,
    num_hidden_layers: Option<Field<usize>>,
    num_attention_heads: Option<Field<usize>>,
    num_key_value_heads: Option<Field<usize>>,
    head_dim: Option<Field<usize>>,
    vocab_size: Option<Field<usize>>,
    rms_norm_eps: Option<Field<f64>>,
    rope_theta: Option<Field<f64>>,
    /// transformers 5 nests it: `"rope_parameters": {"rope_theta": .., "rope_type": ..}`.
    rope_parameters: Option<Field<Map<String, Value>>>,
    rope_scaling: Option<Value>,
    max_position_embeddings: Option<Field<usize>>,
    tie_word_embeddings: Option<Field<bool>>,
    bos_token_id: Option<Field<u32>>,
    eos_token_id: Option<OneOrMany>,
    torch_dtype: Option<Field<String>>,
    /// transformers 5 writes `dtype` instead of `torch_dtype`.
    dtype: Option<Field<String>>,
    hidden_act: Option<Field<String>>,
    use_sliding_window: Option<Field<bool>>,
}

/// `rope_parameters` as serde reads it.
#[derive(Clone, Debug, Deserialize)]
struct RawRope {
    rope_theta: Option<Field<f64>>,
    rope_type: Option<Field<String>>,
}

/// The file a config comes from, for errors.
struct Ctx<'a> {
    label: &'a str,
}

impl Ctx<'_> {
    fn err(&self, field: &str, msg: impl Into<String>) -> Error {
        Error::Config {
            file: self.label.to_string(),
            field: field.to_string(),
            msg: msg.into(),
        }
    }

    /// The value of a present field of the expected type.
    fn value<T: Expected + Clone>(&self, field: &str, f: &Field<T>) -> Result<T> {
        match f {
            Field::Ok(v) => Ok(v.clone()),
            Field::Bad(v) => {
                Err(self.err(field, format!("expected {}, found {}", T::WHAT, short(v))))
            }
        }
    }

    /// An optional field's value, or `default` when it is absent.
    fn or<T: Expected + Clone>(&self, field: &str, f: &Option<Field<T>>, default: T) -> Result<T> {
        match f {
            None => Ok(default),
            Some(f) => self.value(field, f),
        }
    }

    /// A required size: present, an integer, greater than 0.
    fn positive(&self, field: &str, f: &Option<Field<usize>>) -> Result<usize> {
        let f = f
            .as_ref()
            .ok_or_else(|| self.err(field, "missing (required for Qwen2ForCausalLM)"))?;
        let x = self.value(field, f)?;
        if x == 0 {
            return Err(self.err(field, "must be greater than 0"));
        }
        Ok(x)
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

/// The shapes of a config: sizes, heads and the head dimension.
struct Shapes {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: usize,
    head_dim: usize,
    vocab_size: usize,
}

impl RawConfig {
    /// Which model this is: `model_type` and/or `architectures` must say Qwen2. Returns the
    /// architectures (the Qwen2 one when the file gives none).
    fn architectures(&self, cx: &Ctx) -> Result<Vec<String>> {
        let model_type = match &self.model_type {
            None => None,
            Some(f) => Some(cx.value("model_type", f)?),
        };
        if let Some(mt) = &model_type {
            if mt != MODEL_TYPE {
                return Err(cx.err(
                    "model_type",
                    format!("unsupported model type {mt:?}; expected \"{MODEL_TYPE}\""),
                ));
            }
        }
        let list_err = |v: &Value| {
            cx.err(
                "architectures",
                format!("expected a list of strings, found {}", short(v)),
            )
        };
        let architectures: Vec<String> = match &self.architectures {
            None => Vec::new(),
            Some(Field::Bad(v)) => return Err(list_err(v)),
            Some(Field::Ok(items)) => items
                .iter()
                .map(|a| match a {
                    Field::Ok(s) => Ok(s.clone()),
                    Field::Bad(v) => Err(list_err(v)),
                })
                .collect::<Result<_>>()?,
        };
        if let Some(bad) = architectures.iter().find(|a| a.as_str() != ARCHITECTURE) {
            return Err(cx.err(
                "architectures",
                format!("unsupported architecture {bad:?}; expected \"{ARCHITECTURE}\""),
            ));
        }
        if model_type.is_none() && architectures.is_empty() {
            return Err(cx.err(
                "model_type",
                format!(
                    "missing (and no `architectures`): cannot tell that this is a \
                     {ARCHITECTURE} config"
                ),
            ));
        }
        Ok(if architectures.is_empty() {
            vec![ARCHITECTURE.to_string()]
        } else {
            architectures
        })
    }

    /// Sizes and heads; `head_dim` is hidden / heads unless the file gives it, and the heads
    /// must split evenly into key/value groups and rotary halves.
    fn shapes(&self, cx: &Ctx) -> Result<Shapes> {
        let hidden_size = cx.positive("hidden_size", &self.hidden_size)?;
        let intermediate_size = cx.positive("intermediate_size", &self.intermediate_size)?;
        let num_hidden_layers = cx.positive("num_hidden_layers", &self.num_hidden_layers)?;
        let num_attention_heads = cx.positive("num_attention_heads", &self.num_attention_heads)?;
        let num_key_value_heads = match &self.num_key_value_heads {
            None => num_attention_heads,
            Some(_) => cx.positive("num_key_value_heads", &self.num_key_value_heads)?,
        };
        let vocab_size = cx.positive("vocab_size", &self.vocab_size)?;
        let head_dim = match &self.head_dim {
            Some(_) => cx.positive("head_dim", &self.head_dim)?,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(cx.err(
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
            return Err(cx.err(
                "num_attention_heads",
                format!(
                    "{num_attention_heads} is not divisible by num_key_value_heads \
                     {num_key_value_heads} (grouped-query attention shares each kv head by a \
                     whole number of query heads)"
                ),
            ));
        }
        if head_dim % 2 != 0 {
            return Err(cx.err(
                "head_dim",
                format!("{head_dim} is odd; rotary embeddings split the head in two halves"),
            ));
        }
        Ok(Shapes {
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
        })
    }

    /// `rms_norm_eps` (default 1e-6), positive.
    fn rms_norm_eps(&self, cx: &Ctx) -> Result<f64> {
        let eps = cx.or("rms_norm_eps", &self.rms_norm_eps, 1e-6)?;
        if !(eps.is_finite() && eps > 0.0) {
            return Err(cx.err(
                "rms_norm_eps",
                format!("must be a positive number, found {eps}"),
            ));
        }
        Ok(eps)
    }

    /// The RoPE base: `rope_theta`, or transformers 5's `rope_parameters.rope_theta` (default
    /// 10000); only the default RoPE type and no scaling are supported.
    fn rope_theta(&self, cx: &Ctx) -> Result<f64> {
        let theta = match (&self.rope_theta, &self.rope_parameters) {
            (Some(_), _) | (None, None) => cx.or("rope_theta", &self.rope_theta, 10000.0)?,
            (None, Some(Field::Bad(rp))) => {
                return Err(cx.err(
                    "rope_parameters",
                    format!("expected an object, found {}", short(rp)),
                ))
            }
            (None, Some(Field::Ok(rp))) => {
                let rope = RawRope::deserialize(Value::Object(rp.clone()))
                    .map_err(|e| cx.err("rope_parameters", format!("cannot be read: {e}")))?;
                let theta = cx
                    .or("rope_theta", &rope.rope_theta, 10000.0)
                    .map_err(|_| cx.err("rope_parameters.rope_theta", "expected a number"))?;
                let rope_type = cx
                    .or("rope_type", &rope.rope_type, "default".to_string())
                    .map_err(|_| cx.err("rope_parameters.rope_type", "expected a string"))?;
                if rope_type != "default" {
                    return Err(cx.err(
                        "rope_parameters.rope_type",
                        format!("unsupported RoPE type {rope_type:?}; expected \"default\""),
                    ));
                }
                theta
            }
        };
        if let Some(rs) = &self.rope_scaling {
            let kind = rs
                .get("rope_type")
                .or_else(|| rs.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("?");
            if kind != "default" {
                return Err(cx.err(
                    "rope_scaling",
                    format!("RoPE scaling {kind:?} is not supported; expected none"),
                ));
            }
        }
        if !(theta.is_finite() && theta > 0.0) {
            return Err(cx.err(
                "rope_theta",
                format!("must be a positive number, found {theta}"),
            ));
        }
        Ok(theta)
    }

    /// `bos_token_id` (optional) and `eos_token_id` (an id or a list, optional).
    fn special_ids(&self, cx: &Ctx) -> Result<(Option<u32>, Vec<u32>)> {
        let bos = match &self.bos_token_id {
            None => None,
            Some(f) => Some(cx.value("bos_token_id", f)?),
        };
        let eos = match &self.eos_token_id {
            None => Vec::new(),
            Some(OneOrMany::Many(items)) => items
                .iter()
                .map(|f| cx.value("eos_token_id", f))
                .collect::<Result<_>>()?,
            Some(OneOrMany::One(f)) => vec![cx.value("eos_token_id", f)?],
        };
        Ok((bos, eos))
    }

    /// The stored dtype (`torch_dtype`, or transformers 5's `dtype`; default float32) and the
    /// activation, which must be SiLU; sliding-window attention is refused.
    fn numerics(&self, cx: &Ctx) -> Result<(String, String)> {
        let torch_dtype = match &self.torch_dtype {
            Some(_) => cx.or("torch_dtype", &self.torch_dtype, "float32".into())?,
            None => cx.or("dtype", &self.dtype, "float32".into())?,
        };
        let hidden_act = cx.or("hidden_act", &self.hidden_act, "silu".into())?;
        if hidden_act != "silu" {
            return Err(cx.err(
                "hidden_act",
                format!("unsupported activation {hidden_act:?}; expected \"silu\""),
            ));
        }
        if cx.or("use_sliding_window", &self.use_sliding_window, false)? {
            return Err(cx.err(
                "use_sliding_window",
                "sliding-window attention is not supported; expected false",
            ));
        }
        Ok((torch_dtype, hidden_act))
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

    /// Check a parsed config object: serde reads the fields, then each phase below checks its
    /// part in the order of the file's sections (model identity, shapes, normalisation, RoPE,
    /// position limit and embeddings, special ids, numerics), and [`Qwen2Config::validate`]
    /// checks the whole.
    pub fn from_json_value(value: &Value, label: &str) -> Result<Self> {
        let cx = Ctx { label };
        if !value.is_object() {
            return Err(cx.err(
                "<json>",
                format!("expected a JSON object, found {}", short(value)),
            ));
        }
        let raw = RawConfig::deserialize(value)
            .map_err(|e| cx.err("<json>", format!("cannot be read: {e}")))?;
        let architectures = raw.architectures(&cx)?;
        let s = raw.shapes(&cx)?;
        let rms_norm_eps = raw.rms_norm_eps(&cx)?;
        let rope_theta = raw.rope_theta(&cx)?;
        let max_position_embeddings = match &raw.max_position_embeddings {
            None => 32768,
            Some(_) => cx.positive("max_position_embeddings", &raw.max_position_embeddings)?,
        };
        let tie_word_embeddings = cx.or("tie_word_embeddings", &raw.tie_word_embeddings, false)?;
        let (bos_token_id, eos_token_id) = raw.special_ids(&cx)?;
        let (torch_dtype, hidden_act) = raw.numerics(&cx)?;
        let cfg = Qwen2Config {
            architectures,
            hidden_size: s.hidden_size,
            intermediate_size: s.intermediate_size,
            num_hidden_layers: s.num_hidden_layers,
            num_attention_heads: s.num_attention_heads,
            num_key_value_heads: s.num_key_value_heads,
            head_dim: s.head_dim,
            vocab_size: s.vocab_size,
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
}
