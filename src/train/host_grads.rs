//! Parameter gradients of a run, on the backend (one f32 buffer per tensor) or, with
//! `memory.grads = "host"`, summed in host memory ([`HostGrads`]): then the backend holds only
//! the gradient buffers of the group the backward is working on (one decoder layer, the head,
//! or the embedding; see [`crate::model::grad_sink`]).
//!
//! A host sum is brought back into the group's backend buffers before its backward
//! accumulates into them and read back when the group is final (a zero sum, the first
//! micro-batch's, is a zero fill instead of an upload). The ops then accumulate into exactly
//! the values they find in a resident buffer, so the sums are bit-identical to the device
//! placement on every backend. Adding a separate per-micro-batch gradient on the host would not
//! be: the ops' accumulation is not one f32 addition after the op (a GEMM with beta = 1 adds
//! its product block by block over the inner dimension, the bias gradient adds row by row).
//! The cost is one upload per group and micro-batch after the first, besides the download.
//!
//! The host buffers are ordinary pageable allocations and every copy is synchronous.

use std::borrow::Cow;

use crate::backend::Backend;
use crate::model::grad_sink::OpenGroups;
use crate::model::{GradSink, Model};
use crate::Result;

/// f32 gradient sums in host memory, one per parameter tensor in layout order.
pub struct HostGrads<B: Backend> {
    numel: Vec<usize>,
    /// The sums (a tensor still marked `zero` may hold stale values).
    host: Vec<Vec<f32>>,
    /// Whether tensor i's sum is zero since the last [`HostGrads::zero`].
    zero: Vec<bool>,
    /// Groups open in the current backward: (first tensor, backend buffers).
    open: OpenGroups<B::F>,
}

impl<B: Backend> HostGrads<B> {
    /// Zero sums for every parameter of `model` (host memory checked first).
    pub fn new(model: &Model<B>) -> Result<Self> {
        let numel: Vec<usize> = model.layout.specs.iter().map(|s| s.numel()).collect();
        let total = numel
            .iter()
            .try_fold(0u64, |a, &n| a.checked_add((n as u64).checked_mul(4)?));
        crate::safefs::check_host_memory(total, "the host-resident gradients")?;
        Ok(HostGrads {
            host: numel.iter().map(|_| Vec::new()).collect(),
            zero: vec![true; numel.len()],
            numel,
            open: OpenGroups::default(),
        })
    }

    /// Set every sum to zero (before a mini-batch's first micro-batch).
    pub fn zero(&mut self) {
        self.zero.iter_mut().for_each(|z| *z = true);
        self.open.clear();
    }

    /// Tensor `i`'s gradient sum.
    pub fn tensor(&self, i: usize) -> Cow<'_, [f32]> {
        if self.zero[i] {
            Cow::Owned(vec![0.0; self.numel[i]])
        } else {
            Cow::Borrowed(&self.host[i])
        }
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.numel.len()
    }

    pub fn is_empty(&self) -> bool {
        self.numel.is_empty()
    }
}

impl<B: Backend> GradSink<B> for HostGrads<B> {
    fn tensors(&self) -> usize {
        self.numel.len()
    }

    fn open(&mut self, b: &B, first: usize, n: usize) -> Result<&mut [B::F]> {
        let (zero, host, numel) = (&self.zero, &self.host, &self.numel);
        self.open.open(first, n, numel.len(), |range| {
            range
                .map(|i| {
                    if zero[i] {
                        b.zeros_f32(numel[i])
                    } else {
                        b.upload_f32(&host[i])
                    }
                })
                .collect()
        })
    }

    fn close(&mut self, b: &B, first: usize, n: usize) -> Result<()> {
        let bufs = self.open.close(first, n)?;
        for (i, buf) in (first..first + n).zip(&bufs) {
            self.host[i] = b.download_f32(buf, self.numel[i])?;
            self.zero[i] = false;
        }
        Ok(())
    }
}

/// A run's gradients: one backend buffer per tensor, or sums in host memory.
pub enum Grads<B: Backend> {
    Device(Vec<B::F>),
    Host(HostGrads<B>),
}

impl<B: Backend> Grads<B> {
    /// Zeroed gradients for `model`, in host memory when `host`.
    pub fn new(b: &B, model: &Model<B>, host: bool) -> Result<Self> {
        Ok(if host {
            Grads::Host(HostGrads::new(model)?)
        } else {
            Grads::Device(model.zero_grads(b)?)
        })
    }

    /// Whether the sums live in host memory.
    pub fn on_host(&self) -> bool {
        matches!(self, Grads::Host(_))
    }

    /// Set every gradient to zero.
    pub fn zero(&mut self, b: &B, model: &Model<B>) -> Result<()> {
        match self {
            Grads::Device(g) => crate::train::optim::zero_grads(b, model, g),
            Grads::Host(h) => {
                h.zero();
                Ok(())
            }
        }
    }
}

impl<B: Backend> GradSink<B> for Grads<B> {
    fn tensors(&self) -> usize {
        match self {
            Grads::Device(g) => g.len(),
            Grads::Host(h) => h.len(),
        }
    }
    fn open(&mut self, b: &B, first: usize, n: usize) -> Result<&mut [B::F]> {
        match self {
            Grads::Device(g) => g.open(b, first, n),
            Grads::Host(h) => h.open(b, first, n),
        }
    }
    fn close(&mut self, b: &B, first: usize, n: usize) -> Result<()> {
        match self {
            Grads::Device(g) => GradSink::<B>::close(g, b, first, n),
            Grads::Host(h) => h.close(b, first, n),
        }
    }
}
