//! How parameters, gradients and optimizer state are cut into per-rank shards (ZeRO stage 2,
//! Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models",
//! SC 2020): every tensor is split along its flat (row-major) index into `world` equal shards,
//! rank r owning elements `r * shard .. (r + 1) * shard`; the tensor is padded with zeros to
//! `world * shard` elements so that a reduce-scatter or all-gather moves one contiguous buffer.
//! The shard length is rounded up to [`SHARD_ALIGN`] elements, so every shard starts on a
//! 64-byte boundary of an f32 buffer (and 32 bytes of a bf16 one).
//!
//! Tensors are grouped into buckets, the unit of communication: the embedding, then one bucket
//! per decoder layer (its twelve tensors), then the final norm with the lm_head. A layer's
//! bucket is complete as soon as that layer's backward has run.

use std::ops::Range;

use crate::model::layout::ParamLayout;
use crate::{Error, Result};

/// Shard lengths are multiples of this many elements.
pub const SHARD_ALIGN: usize = 16;

/// One tensor's shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorShards {
    /// Elements of the tensor.
    pub numel: usize,
    /// Elements per rank (a multiple of [`SHARD_ALIGN`]); world * shard >= numel.
    pub shard: usize,
}

impl TensorShards {
    /// world * shard: the padded length of the tensor's gradient and gather buffers.
    pub fn padded(&self, world: usize) -> usize {
        self.shard * world
    }
    /// The elements of the tensor rank `rank` owns (may be empty for a small tensor and a late
    /// rank, or shorter than `shard` for the last owning rank).
    pub fn owned(&self, rank: usize) -> Range<usize> {
        let lo = (rank * self.shard).min(self.numel);
        let hi = ((rank + 1) * self.shard).min(self.numel);
        lo..hi
    }
}

/// The shards of every tensor of a layout and its buckets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardPlan {
    pub world: usize,
    /// By layout index.
    pub tensors: Vec<TensorShards>,
    /// Layout-index ranges, in order, covering every tensor once.
    pub buckets: Vec<Range<usize>>,
}

impl ShardPlan {
    /// The plan for `layout` over `world` ranks. Errors (never panics) when a size overflows.
    pub fn new(layout: &ParamLayout, world: usize) -> Result<ShardPlan> {
        crate::ensure!(world >= 1, "a shard plan needs at least one rank (got 0)");
        let mut tensors = Vec::with_capacity(layout.specs.len());
        for s in &layout.specs {
            let numel = s
                .shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| Error::Invalid(format!("tensor {}: size overflows", s.name)))?;
            let shard = numel
                .div_ceil(world)
                .checked_next_multiple_of(SHARD_ALIGN)
                .filter(|sh| sh.checked_mul(world).is_some())
                .ok_or_else(|| {
                    Error::Invalid(format!("tensor {}: shard size overflows", s.name))
                })?;
            tensors.push(TensorShards { numel, shard });
        }
        let mut buckets = Vec::with_capacity(layout.layers.len() + 2);
        let mut next = 0;
        for l in &layout.layers {
            let idx = l.all();
            let (lo, hi) = (
                *idx.iter().min().unwrap_or(&next),
                *idx.iter().max().unwrap_or(&next) + 1,
            );
            crate::ensure!(
                hi - lo == idx.len(),
                "shard plan: a layer's tensors are not contiguous in the layout"
            );
            if lo > next {
                buckets.push(next..lo);
            }
            buckets.push(lo..hi);
            next = hi;
        }
        if next < tensors.len() {
            buckets.push(next..tensors.len());
        }
        Ok(ShardPlan {
            world,
            tensors,
            buckets,
        })
    }

    /// Elements one rank holds of every shard together (the length of one f32 state vector).
    pub fn shard_elems(&self) -> usize {
        self.tensors.iter().map(|t| t.shard).sum()
    }

    /// The bucket holding tensor `i`.
    pub fn bucket_of(&self, i: usize) -> Option<usize> {
        self.buckets.iter().position(|b| b.contains(&i))
    }
}
