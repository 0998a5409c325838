//! Memory planner of a training run on one GPU: where the f32 optimizer state (master copy and
//! AdamW moments), the f32 gradients and the frozen reference model live (device or host
//! memory; a host optimizer state and its staging buffers page-locked on CUDA
//! (`train::optim::HostState`), host gradients ordinary pageable memory, the streamed
//! reference's layers page-locked on CUDA),
//! and how many rollout slots, paged KV-cache blocks and tokens per micro-batch fit beside
//! them.
//!
//! The figures come from [`MemoryEstimate`](crate::model::memory::MemoryEstimate) (bf16 weights and activations, f32 gradients and
//! optimizer state: the CUDA backend's numerics). The planner tries the placements in order of
//! their cost to the step (everything on the device; the optimizer on the host; the reference
//! on the host, streamed layer by layer; the gradients on the host; and their combinations),
//! keeps the explicit choices of the config, and takes the first placement whose device and
//! host totals fit with at least one rollout slot and the smallest micro-batch the run can form
//! (one whole GRPO group, or one SFT sequence). It then lowers the rollout slots and the
//! micro-batch token budget, never raising them, until the rollout and training peaks fit,
//! and gives the rollout's paged KV cache the device memory left at those slots (at most what
//! the slots can use).
//! Every size is a saturating product or sum: a size that does not fit in 64 bits reads as
//! "too large" and fails every fit check instead of wrapping to a small number.

use crate::backend::cuda::size_class;
use crate::model::memory::{
    add, human_bytes, layer_saved_buffers, layer_work_per_token, mul, to64, MemoryInputs,
};
use crate::model::{ParamLayout, Qwen2Config};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Where one part of the run's state lives, as the config asks for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Place {
    /// The planner decides.
    #[default]
    Auto,
    Device,
    Host,
}

/// Where one part of the run's state lives, as the plan decided it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Where {
    Device,
    Host,
}

impl Where {
    fn allowed_by(self, p: Place) -> bool {
        matches!(
            (p, self),
            (Place::Auto, _) | (Place::Device, Where::Device) | (Place::Host, Where::Host)
        )
    }
}

impl fmt::Display for Where {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Where::Device => "device",
            Where::Host => "host",
        })
    }
}

/// The placement choices of a run: `memory = "auto"` (the default) or a `[memory]` table with
/// any of `optimizer`, `grads`, `reference` set to `"auto"`, `"device"` or `"host"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PlacementTable {
    pub optimizer: Place,
    pub grads: Place,
    pub reference: Place,
}

/// The placement choices of a run (see [`PlacementTable`] for the config syntax).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Placement {
    /// f32 master weights and the AdamW moments m and v (they move together: the update reads
    /// and writes all three).
    pub optimizer: Place,
    /// f32 parameter gradients.
    pub grads: Place,
    /// The frozen reference model of GRPO (bf16; on the host it is streamed per layer).
    pub reference: Place,
}

impl Placement {
    /// Whether every part is left to the planner.
    pub fn is_auto(&self) -> bool {
        *self == Placement::default()
    }
}

impl Serialize for Placement {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        if self.is_auto() {
            s.serialize_str("auto")
        } else {
            PlacementTable {
                optimizer: self.optimizer,
                grads: self.grads,
                reference: self.reference,
            }
            .serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for Placement {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Placement;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "\"auto\" or a table with optimizer, grads, reference each \"auto\", \
                     \"device\" or \"host\"",
                )
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Placement, E> {
                if v == "auto" {
                    Ok(Placement::default())
                } else {
                    Err(E::invalid_value(serde::de::Unexpected::Str(v), &self))
                }
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> std::result::Result<Placement, A::Error> {
                let t =
                    PlacementTable::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(Placement {
                    optimizer: t.optimizer,
                    grads: t.grads,
                    reference: t.reference,
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// Which host placements the engine can run. The planner never picks a placement outside
/// this set; `inspect` also shows the plans with every placement of the design.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    pub host_optimizer: bool,
    pub host_grads: bool,
    pub host_reference: bool,
}

impl Caps {
    /// What this build runs: every placement of the design (the host-resident optimizer,
    /// host gradients, the streamed reference).
    pub const ENGINE: Caps = Caps::ALL;
    /// Every placement of the design.
    pub const ALL: Caps = Caps {
        host_optimizer: true,
        host_grads: true,
        host_reference: true,
    };
}

/// The run settings the plan is made for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunShape {
    /// GRPO (rollouts and a reference model) or SFT (neither).
    pub grpo: bool,
    /// Configured upper bound of the sequences decoded at once (`rollout.max_slots`, at most
    /// the sequences of one step).
    pub max_slots: u64,
    /// Longest prompt (`rollout.max_prompt_tokens`; for SFT 0).
    pub max_prompt: u64,
    /// Longest prompt + response a KV-cache slot holds (SFT: the longest sequence).
    pub max_len: u64,
    /// Rows per block of the paged KV cache (`rollout.kv_block_size`).
    pub kv_block_size: u64,
    /// Configured token budget of one micro-batch.
    pub micro_batch_tokens: u64,
    /// The smallest micro-batch the run can form: one whole GRPO group (micro-batches never
    /// split a group) or one SFT sequence. The activation estimate uses at least this many
    /// tokens, whatever the budget.
    pub min_micro_batch_tokens: u64,
    pub recompute: bool,
    /// Host bytes of one step's sequences, logprobs and advantages.
    pub host_extra: u64,
    /// Data-parallel ranks (GPUs of the machine; 1 = one GPU). The plan is then each GPU's:
    /// weights and reference replicated, the f32 master, AdamW moments and gradient sums
    /// sharded (1/ranks each, `dist::shard`), the full-size f32 gradients only of the backward
    /// group being reduced (`train::zero::ShardSink`); the host placements of the optimizer
    /// and gradients are one-GPU only.
    pub ranks: u64,
}

/// The memory the plan may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// Free device bytes (cuMemGetInfo), before the run allocates anything.
    pub device_free: u64,
    /// Available host bytes (`MemAvailable`), when known.
    pub host_available: Option<u64>,
}

/// Device bytes kept free of the plan: the cuBLAS workspace, the kernel modules and the
/// caching allocator's rounding.
pub const DEVICE_RESERVE: u64 = 1 << 30;

/// One line of the plan's table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub item: String,
    pub bytes: u64,
    pub place: Where,
}

/// A placement and the rollout and micro-batch sizes that fit with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub optimizer: Where,
    pub grads: Where,
    pub reference: Where,
    /// Rollout slots (sequences decoded at once).
    pub slots: u64,
    /// Blocks of the rollout's paged KV-cache pool: what is left of the device beside the
    /// resident state and the rollout's other working sets at `slots`, at most the room for
    /// `slots + 1` sequences at their longest (what the rollout takes unconstrained), at
    /// least one sequence and its prompt's last block. 0 for SFT.
    pub kv_blocks: u64,
    /// Token budget of one micro-batch.
    pub micro_batch_tokens: u64,
    /// Items held all run, then the rollout and training working sets at the chosen sizes.
    pub rows: Vec<Row>,
    /// Device bytes held all run.
    pub device_resident: u64,
    /// Peak device bytes during rollout and during a training micro-batch.
    pub rollout_peak: u64,
    pub train_peak: u64,
    /// Host bytes the plan needs (host-placed items plus one step's sequences).
    pub host_total: u64,
    pub budget: Budget,
    /// None when the plan fits; else why not.
    pub refusal: Option<String>,
}

/// Sizes of the model that do not depend on the run.
struct ModelSizes {
    params: u64,
    /// Device bytes of one buffer per parameter tensor of 2 (bf16) and 4 (f32) bytes per
    /// element, as the CUDA caching pool rounds each allocation ([`size_class`]).
    pooled_bf16: u64,
    pooled_f32: u64,
    /// Parameters of one decoder layer.
    layer_params: u64,
    /// Parameters outside the decoder layers (embedding, final norm, untied lm_head).
    outer_params: u64,
    /// Elements of the largest parameter tensor.
    largest: u64,
    /// Device bytes of the f32 gradient buffers held at once with host gradients, at the
    /// pool's size classes: the largest group of the backward (`model::grad_sink`), plus the
    /// embedding, which stays open through the layers when it is tied to the lm_head.
    grad_groups: u64,
    /// Device bytes of the largest single group's f32 gradients at the pool's size classes:
    /// what one data-parallel group still being reduced holds beside the open ones.
    group_f32: u64,
    /// Elements of the largest group of the backward (`model::grad_sink::close_order`), the
    /// unit of the host optimizer's pipeline.
    largest_group: u64,
    /// Device bytes of the largest group's bf16 weights at the pool's size classes.
    group_bf16: u64,
    /// bf16 KV-cache bytes of one token, all layers.
    kv_per_token: u64,
    vocab: u64,
    /// Elements of every parameter tensor, in layout order.
    numels: Vec<u64>,
}

fn model_sizes(cfg: &Qwen2Config) -> ModelSizes {
    let layout = ParamLayout::new(cfg);
    let params = layout.num_params();
    let numel = |ix: usize| to64(layout.specs[ix].numel());
    let layer_params = layout
        .layers
        .first()
        .map(|l| {
            add(&[
                numel(l.input_norm),
                numel(l.wq),
                numel(l.bq),
                numel(l.wk),
                numel(l.bk),
                numel(l.wv),
                numel(l.bv),
                numel(l.wo),
                numel(l.post_norm),
                numel(l.w_gate),
                numel(l.w_up),
                numel(l.w_down),
            ])
        })
        .unwrap_or(0);
    let layers = to64(cfg.num_hidden_layers);
    let kv = mul(&[to64(cfg.num_key_value_heads), to64(cfg.head_dim)]);
    let pooled = |elem: u64| {
        add(&layout
            .specs
            .iter()
            .map(|s| {
                let bytes = mul(&[to64(s.numel()), elem]);
                usize::try_from(bytes)
                    .ok()
                    .filter(|&b| b <= usize::MAX / 2)
                    .map_or(u64::MAX, |b| to64(size_class(b)))
            })
            .collect::<Vec<_>>())
    };
    let groups = crate::model::grad_sink::close_order(&layout);
    let group_sum = |elem: u64, pooled: bool| {
        groups
            .iter()
            .map(|g| {
                add(&g
                    .clone()
                    .map(|i| {
                        let bytes = mul(&[numel(i), elem]);
                        if !pooled {
                            return bytes;
                        }
                        usize::try_from(bytes)
                            .ok()
                            .filter(|&b| b <= usize::MAX / 2)
                            .map_or(u64::MAX, |b| to64(size_class(b)))
                    })
                    .collect::<Vec<_>>())
            })
            .max()
            .unwrap_or(0)
    };
    // The backward's groups (model::grad_sink): each decoder layer, the final norm (with the
    // lm_head when it is not tied) and the embedding, f32 at the pool's size classes. A tied
    // embedding stays open through the layers, so it is held beside the largest other group.
    let f32_of = |ix: &[usize]| {
        add(&ix
            .iter()
            .map(|&i| self::pooled(mul(&[numel(i), 4])))
            .collect::<Vec<_>>())
    };
    let layer = layout.layers.first().map_or(0, |l| f32_of(&l.all()));
    let embed = f32_of(&[layout.embed]);
    let (grad_groups, group_f32) = if layout.lm_head == layout.embed {
        let other = layer.max(f32_of(&[layout.norm]));
        (add(&[embed, other]), other.max(embed))
    } else {
        let g = f32_of(&[layout.norm, layout.lm_head]).max(layer).max(embed);
        (g, g)
    };
    ModelSizes {
        params,
        largest_group: group_sum(1, false),
        group_bf16: group_sum(2, true),
        pooled_bf16: pooled(2),
        pooled_f32: pooled(4),
        layer_params,
        outer_params: params.saturating_sub(mul(&[layers, layer_params])),
        largest: layout
            .specs
            .iter()
            .map(|s| to64(s.numel()))
            .max()
            .unwrap_or(0),
        grad_groups,
        group_f32,
        kv_per_token: mul(&[layers, 2, kv, 2]),
        vocab: to64(cfg.vocab_size),
        numels: layout.specs.iter().map(|s| to64(s.numel())).collect(),
    }
}

impl ModelSizes {
    /// Device bytes of one buffer per tensor holding one rank's shard of `ranks` (elements of
    /// `elem` bytes), at the pool's size classes.
    fn pooled_shards(&self, ranks: u64, elem: u64) -> u64 {
        add(&self
            .numels
            .iter()
            .map(|&n| {
                let bytes = mul(&[shard_len(n, ranks), elem]);
                usize::try_from(bytes)
                    .ok()
                    .filter(|&b| b <= usize::MAX / 2)
                    .map_or(u64::MAX, |b| to64(size_class(b)))
            })
            .collect::<Vec<_>>())
    }

    /// Elements of the largest tensor padded to whole shards of `ranks`.
    fn largest_padded(&self, ranks: u64) -> u64 {
        mul(&[shard_len(self.largest, ranks), ranks])
    }
}

/// Elements of one rank's shard of a tensor of `numel` elements over `ranks` ranks:
/// ceil(numel / ranks) rounded up to 16 (as `dist::ShardPlan` cuts them). Saturating.
pub fn shard_len(numel: u64, ranks: u64) -> u64 {
    let per = numel.div_ceil(ranks.max(1));
    per.checked_next_multiple_of(16).unwrap_or(u64::MAX)
}

/// Blocks of the paged KV cache one sequence of `max_len` tokens takes.
fn blocks_per_seq(shape: &RunShape) -> u64 {
    shape.max_len.div_ceil(shape.kv_block_size.max(1))
}

/// bf16 bytes of one KV-cache block, all layers.
fn block_bytes(m: &ModelSizes, shape: &RunShape) -> u64 {
    mul(&[shape.kv_block_size.max(1), m.kv_per_token])
}

/// The device working set of rollout at `slots` sequences: the smallest paged KV cache that
/// runs (one sequence at its longest and its prompt's last block, plus the cache's scratch
/// block for the padding rows of graph-replayed decode steps; the pool is then given what is
/// left, [`kv_pool`]), the f32 logits of one decode step, and the prefill of every slot's
/// prompt at once (one layer's working set, as in a training forward without a tape).
fn rollout_work(cfg: &Qwen2Config, m: &ModelSizes, shape: &RunShape, slots: u64) -> [u64; 3] {
    if !shape.grpo || slots == 0 {
        return [0, 0, 0];
    }
    let kv = mul(&[add(&[blocks_per_seq(shape), 2]), block_bytes(m, shape)]);
    let logits = mul(&[slots, m.vocab, 4]);
    let prefill = mul(&[slots, shape.max_prompt, layer_work_per_token(cfg)]);
    [kv, logits, prefill]
}

/// Blocks of the paged KV-cache pool at `slots` sequences beside `other` device bytes: what
/// `usable` leaves, at most the rollout's unconstrained pool ((slots + 1) sequences at their
/// longest), at least the smallest that runs. The cache holds one scratch block beyond these
/// (`model::kv_cache`), which `usable` must leave room for too.
fn kv_pool(m: &ModelSizes, shape: &RunShape, slots: u64, usable: u64, other: u64) -> u64 {
    if !shape.grpo || slots == 0 {
        return 0;
    }
    let per = blocks_per_seq(shape);
    let block = block_bytes(m, shape).max(1);
    let fit = usable.saturating_sub(other).saturating_sub(block) / block;
    fit.min(mul(&[add(&[slots, 1]), per])).max(add(&[per, 1]))
}

/// Device bytes the caching pool takes for one buffer of `bytes` ([`size_class`]); saturating.
fn pooled(bytes: u64) -> u64 {
    usize::try_from(bytes)
        .ok()
        .filter(|&b| b <= usize::MAX / 2)
        .map_or(u64::MAX, |b| to64(size_class(b)))
}

/// Activations and fused vocabulary buffers of a micro-batch of `tokens` tokens: the terms of
/// [`MemoryEstimate`](crate::model::memory::MemoryEstimate)'s activations and vocabulary buffers, each buffer (tokens x its width)
/// counted at the pool's size class, as the device holds it.
fn train_work(cfg: &Qwen2Config, shape: &RunShape, tokens: u64) -> [u64; 2] {
    let t = tokens.max(shape.min_micro_batch_tokens);
    let buf = |width: u64, elem: u64| pooled(mul(&[t, width, elem]));
    let h = to64(cfg.hidden_size);
    let (bf16s, f32s) = layer_saved_buffers(cfg);
    let per_layer = add(&bf16s
        .iter()
        .map(|&w| buf(w, 2))
        .chain(f32s.iter().map(|&w| buf(w, 4)))
        .collect::<Vec<_>>());
    // Gradient buffers of the residual stream and of one layer's intermediates while its
    // backward runs.
    let backward_work = add(&[per_layer, mul(&[2, buf(h, 2)])]);
    let layers = to64(cfg.num_hidden_layers);
    let act = if shape.recompute {
        add(&[mul(&[layers, buf(h, 2)]), per_layer, backward_work])
    } else {
        add(&[mul(&[layers, per_layer]), backward_work])
    };
    // One f32 logits tile, per-token logp, lse, entropy and dlogp, and the final hidden
    // states in and out of the final norm.
    let tile = MemoryInputs::default().vocab_tile_rows.min(t.max(1));
    let vocab = add(&[
        pooled(mul(&[tile, to64(cfg.vocab_size), 4])),
        mul(&[4, buf(1, 4)]),
        mul(&[2, buf(h, 2)]),
    ]);
    [act, vocab]
}

/// Largest x in [lo, hi] with fits(x), given fits is monotone (true then false); None when
/// fits(lo) is false.
fn largest_fitting(lo: u64, hi: u64, fits: impl Fn(u64) -> bool) -> Option<u64> {
    if lo > hi || !fits(lo) {
        return None;
    }
    let (mut a, mut b) = (lo, hi);
    while a < b {
        let mid = a + (b - a).div_ceil(2);
        if fits(mid) {
            a = mid;
        } else {
            b = mid - 1;
        }
    }
    Some(a)
}

/// The candidate placements (optimizer, grads, reference) in order of cost to the step.
fn candidates(shape: &RunShape, choice: &Placement, caps: &Caps) -> Vec<(Where, Where, Where)> {
    use Where::{Device as D, Host as H};
    let mut out = Vec::new();
    for bits in 0u32..8 {
        let opt = if bits & 1 != 0 { H } else { D };
        let reference = if bits & 2 != 0 { H } else { D };
        let grads = if bits & 4 != 0 { H } else { D };
        let capable = (opt == D || caps.host_optimizer)
            && (grads == D || caps.host_grads)
            && (reference == D || caps.host_reference);
        let chosen = opt.allowed_by(choice.optimizer)
            && grads.allowed_by(choice.grads)
            && reference.allowed_by(choice.reference);
        // SFT has no reference: only the device variant, which costs nothing. Several ranks
        // keep the optimizer and gradients on the device (sharded).
        let ranks_ok = shape.ranks <= 1 || (opt == D && grads == D);
        if capable && chosen && ranks_ok && (shape.grpo || reference == D) {
            out.push((opt, grads, reference));
        }
    }
    out
}

/// Plan `cfg` under `shape` within `budget`, keeping `choice` and using only placements in
/// `caps`. Always returns a plan: when nothing fits, the cheapest placement allowed, at one
/// rollout slot and the smallest micro-batch, with `refusal` saying what does not fit.
pub fn plan(
    cfg: &Qwen2Config,
    shape: &RunShape,
    budget: &Budget,
    choice: &Placement,
    caps: &Caps,
) -> std::result::Result<Plan, String> {
    let cands = candidates(shape, choice, caps);
    let Some(&first) = cands.first() else {
        return Err(format!(
            "no placement satisfies memory = {choice:?} with what this build runs (host \
             optimizer: {}, host gradients: {}, streamed reference: {})",
            caps.host_optimizer, caps.host_grads, caps.host_reference
        ));
    };
    let m = model_sizes(cfg);
    for &c in &cands {
        let p = build(cfg, &m, shape, budget, c);
        if p.refusal.is_none() {
            return Ok(p);
        }
    }
    // Nothing fits: report the placement that offloads the most (the last candidate), the
    // closest to fitting.
    Ok(build(
        cfg,
        &m,
        shape,
        budget,
        *cands.last().unwrap_or(&first),
    ))
}

fn build(
    cfg: &Qwen2Config,
    m: &ModelSizes,
    shape: &RunShape,
    budget: &Budget,
    (opt, grads, reference): (Where, Where, Where),
) -> Plan {
    let p = m.params;
    let mut rows = Vec::new();
    let mut row = |item: &str, bytes: u64, place: Where| {
        rows.push(Row {
            item: item.to_string(),
            bytes,
            place,
        })
    };
    // Device-resident parameter-shaped state is counted as the caching pool allocates it (one
    // buffer per tensor, rounded to its size class); host-resident state is exact.
    let (b16, b32) = (m.pooled_bf16, m.pooled_f32);
    let on = |w: Where, device: u64, host: u64| if w == Where::Device { device } else { host };
    row("policy weights (bf16)", b16, Where::Device);
    let ranks = shape.ranks.max(1);
    if ranks > 1 {
        // One rank's shards (dist::shard: ceil(numel / ranks) rounded up to 16 elements per
        // tensor), at the pool's size classes; every buffer of a rank's shard state is one
        // per tensor.
        let w = ranks;
        let sh32 = m.pooled_shards(w, 4);
        let sh16 = m.pooled_shards(w, 2);
        row(
            &format!("gradient shards (f32, 1/{w})"),
            sh32,
            Where::Device,
        );
        row(
            "gradients of the open backward group (f32, full size)",
            m.grad_groups,
            Where::Device,
        );
        // A closed group's buffers live on until its reduce-scatter, queued on the
        // communication stream beside the next group's backward, has run. Counted at the
        // largest group (an upper bound: the groups next to each other in the close order are
        // usually a layer and a smaller neighbour).
        row(
            &format!(
                "gradients still being reduced (at most {} closed group, f32, full size)",
                crate::dist::REDUCE_GROUPS_IN_FLIGHT
            ),
            mul(&[m.group_f32, to64(crate::dist::REDUCE_GROUPS_IN_FLIGHT)]),
            Where::Device,
        );
        row(&format!("master weights (f32, 1/{w})"), sh32, Where::Device);
        row(
            &format!("AdamW m + v (f32, 1/{w})"),
            mul(&[2, sh32]),
            Where::Device,
        );
        row(
            &format!("updated weight shards (bf16, 1/{w})"),
            sh16,
            Where::Device,
        );
        row(
            "all-gather and zero-gradient buffers (largest tensor, bf16 + f32)",
            mul(&[m.largest_padded(w), 6]),
            Where::Device,
        );
    } else {
        row("gradients (f32)", on(grads, b32, mul(&[p, 4])), grads);
        row("master weights (f32)", on(opt, b32, mul(&[p, 4])), opt);
        row(
            "AdamW m + v (f32)",
            on(opt, mul(&[2, b32]), mul(&[p, 8])),
            opt,
        );
    }
    if opt == Where::Host {
        // The host update uploads a group's new bf16 weights into fresh buffers before the
        // group's old ones are freed: the largest group's bf16 bytes on top.
        row(
            "optimizer upload buffers (largest group, bf16)",
            m.group_bf16,
            Where::Device,
        );
        // Its pipeline's staging: two gradient downloads and two weight uploads in flight.
        row(
            &format!(
                "optimizer staging ({} x largest group, f32, page-locked)",
                crate::train::optim::HOST_STAGES
            ),
            mul(&[m.largest_group, 4, to64(crate::train::optim::HOST_STAGES)]),
            Where::Host,
        );
    }
    if grads == Where::Host {
        row(
            "gradient staging (largest backward group, f32)",
            m.grad_groups,
            Where::Device,
        );
    }
    if shape.grpo {
        let label = if ranks > 1 && reference == Where::Host {
            format!("reference model (bf16; in host memory once per GPU, x{ranks})")
        } else {
            "reference model (bf16)".to_string()
        };
        row(&label, on(reference, b16, mul(&[p, 2])), reference);
        if reference == Where::Host {
            row(
                "streamed reference's embeddings, final norm, lm_head (bf16)",
                mul(&[m.outer_params, 2]),
                Where::Device,
            );
        }
    }
    let sum = |rows: &[Row], w: Where| {
        add(&rows
            .iter()
            .filter(|r| r.place == w)
            .map(|r| r.bytes)
            .collect::<Vec<_>>())
    };
    let device_resident = sum(&rows, Where::Device);
    // Each rank keeps its own host-placed state (a streamed reference copy per GPU).
    let host_total = add(&[mul(&[sum(&rows, Where::Host), ranks]), shape.host_extra]);
    let usable = budget.device_free.saturating_sub(DEVICE_RESERVE);
    let rollout_at = |s: u64| add(&[device_resident, add(&rollout_work(cfg, m, shape, s))]);
    // A streamed reference holds two decoder layers on the device only during its forward
    // pass, which keeps no tape: one layer's working set instead of the activations.
    let stream = if shape.grpo && reference == Where::Host {
        mul(&[2, m.layer_params, 2])
    } else {
        0
    };
    let train_at = |t: u64| {
        let [act, vocab] = train_work(cfg, shape, t);
        let ref_pass = if stream > 0 {
            add(&[
                stream,
                mul(&[
                    t.max(shape.min_micro_batch_tokens),
                    layer_work_per_token(cfg),
                ]),
            ])
        } else {
            0
        };
        add(&[device_resident, act.max(ref_pass), vocab])
    };
    let min_slots = u64::from(shape.grpo);
    let max_slots = if shape.grpo {
        shape.max_slots.max(1)
    } else {
        0
    };
    let min_tokens = shape
        .micro_batch_tokens
        .min(shape.min_micro_batch_tokens.max(1));
    let slots = largest_fitting(min_slots, max_slots, |s| rollout_at(s) <= usable);
    let tokens = largest_fitting(min_tokens, shape.micro_batch_tokens.max(1), |t| {
        train_at(t) <= usable
    });
    let mut refusal = Vec::new();
    if device_resident > usable {
        refusal.push(format!(
            "the device-resident state needs {} and {} of the device are usable ({} free less a \
             {} reserve)",
            human_bytes(device_resident),
            human_bytes(usable),
            human_bytes(budget.device_free),
            human_bytes(DEVICE_RESERVE)
        ));
    } else {
        if slots.is_none() {
            refusal.push(format!(
                "one rollout slot needs {} of the device (KV cache of {} tokens, decode logits, \
                 prefill) and {} are usable",
                human_bytes(rollout_at(min_slots)),
                shape.max_len,
                human_bytes(usable)
            ));
        }
        if tokens.is_none() {
            refusal.push(format!(
                "the smallest micro-batch ({} tokens) needs {} of the device and {} are usable",
                shape.min_micro_batch_tokens.max(min_tokens),
                human_bytes(train_at(min_tokens)),
                human_bytes(usable)
            ));
        }
    }
    if let Some(avail) = budget.host_available {
        if host_total > avail {
            refusal.push(format!(
                "the host part needs {} and {} of host memory are available",
                human_bytes(host_total),
                human_bytes(avail)
            ));
        }
    }
    let slots = slots.unwrap_or(min_slots);
    let tokens = tokens.unwrap_or(min_tokens);
    let [_, logits, prefill] = rollout_work(cfg, m, shape, slots);
    let kv_blocks = kv_pool(
        m,
        shape,
        slots,
        usable,
        add(&[device_resident, logits, prefill]),
    );
    // The pool's blocks and the cache's scratch block.
    let kv_bytes = if kv_blocks == 0 {
        0
    } else {
        mul(&[add(&[kv_blocks, 1]), block_bytes(m, shape)])
    };
    if shape.grpo {
        row_push(
            &mut rows,
            &format!(
                "KV cache ({kv_blocks} blocks + 1 scratch x {} tokens, bf16; {slots} sequences \
                 of {} tokens take at most {})",
                shape.kv_block_size,
                shape.max_len,
                mul(&[slots, blocks_per_seq(shape)])
            ),
            kv_bytes,
        );
        row_push(&mut rows, "decode logits (f32)", logits);
        row_push(
            &mut rows,
            &format!(
                "prefill working set ({slots} x {} tokens)",
                shape.max_prompt
            ),
            prefill,
        );
    }
    let [act, vocab] = train_work(cfg, shape, tokens);
    let eff = tokens.max(shape.min_micro_batch_tokens);
    let act_label = if shape.recompute {
        format!("activations ({eff} tokens, per-layer recomputation)")
    } else {
        format!("activations ({eff} tokens, all layers saved)")
    };
    if stream > 0 {
        row_push(
            &mut rows,
            "reference stream buffers (2 layers, bf16, during its pass)",
            stream,
        );
    }
    row_push(&mut rows, &act_label, act);
    row_push(&mut rows, "fused vocab logprob buffers", vocab);
    Plan {
        optimizer: opt,
        grads,
        reference,
        slots,
        kv_blocks,
        micro_batch_tokens: tokens,
        rows,
        device_resident,
        rollout_peak: add(&[device_resident, kv_bytes, logits, prefill]),
        train_peak: train_at(tokens),
        host_total,
        budget: *budget,
        refusal: if refusal.is_empty() {
            None
        } else {
            Some(refusal.join("; "))
        },
    }
}

fn row_push(rows: &mut Vec<Row>, item: &str, bytes: u64) {
    rows.push(Row {
        item: item.to_string(),
        bytes,
        place: Where::Device,
    });
}

impl Plan {
    /// Peak device bytes (the larger of the rollout and training peaks).
    pub fn device_peak(&self) -> u64 {
        self.rollout_peak.max(self.train_peak)
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "  {:<62} {:>12}  where", "item", "size")?;
        for r in &self.rows {
            writeln!(
                f,
                "  {:<62} {:>12}  {}",
                r.item,
                human_bytes(r.bytes),
                r.place
            )?;
        }
        let usable = self.budget.device_free.saturating_sub(DEVICE_RESERVE);
        writeln!(
            f,
            "  device: {} resident, rollout peak {}, training peak {}; {} free, {} usable \
             (less a {} reserve)",
            human_bytes(self.device_resident),
            human_bytes(self.rollout_peak),
            human_bytes(self.train_peak),
            human_bytes(self.budget.device_free),
            human_bytes(usable),
            human_bytes(DEVICE_RESERVE)
        )?;
        writeln!(
            f,
            "  KV-cache and activation budget: {} beside the resident state",
            human_bytes(usable.saturating_sub(self.device_resident))
        )?;
        let host_avail = match self.budget.host_available {
            Some(a) => format!("{} available", human_bytes(a)),
            None => "availability unknown".to_string(),
        };
        writeln!(
            f,
            "  host: {} needed (host-placed state and one step's sequences), {host_avail}",
            human_bytes(self.host_total)
        )?;
        writeln!(
            f,
            "  rollout slots {}, KV-cache blocks {}, micro-batch tokens {}",
            self.slots, self.kv_blocks, self.micro_batch_tokens
        )?;
        match &self.refusal {
            None => writeln!(
                f,
                "  fits, {} to spare at the device peak",
                human_bytes(usable.saturating_sub(self.device_peak()))
            ),
            Some(why) => writeln!(f, "  does not fit: {why}"),
        }
    }
}
