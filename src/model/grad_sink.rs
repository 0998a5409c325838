//! Where [`crate::model::Model::backward`] accumulates parameter gradients: a [`GradSink`]
//! hands out the f32 gradient buffers of one group of tensors at a time and is told when the
//! group's gradients are final for the current backward.
//!
//! The backward visits the groups in this order (indices are [`crate::model::ParamLayout`]
//! positions):
//! 1. the head: `lm_head` and the final `norm`. Untied, they are adjacent (`norm`, then
//!    `lm_head`) and form one group `norm..norm + 2`, closed after the head's backward. With
//!    tied embeddings `lm_head` is the embedding (index `embed`): the head opens
//!    `embed..embed + 1` and leaves it open, then opens and closes `norm..norm + 1`;
//! 2. each decoder layer from the last to the first: its twelve tensors
//!    (`LayerParams::all`, contiguous), opened before and closed after the layer's backward;
//! 3. the embedding: `embed..embed + 1` (the same group the tied head left open), closed last.
//!
//! A group opened again before it is closed must come back with the same buffers (the tied
//! embedding). Every buffer is accumulated into (+=), never overwritten. The resident
//! placement is a plain slice of every tensor's buffer (`[B::F]`, `Vec<B::F>`), for which open
//! is a borrow and close does nothing; `train::host_grads::HostGrads` keeps the sums in host
//! memory; a data-parallel sink can start a group's reduction when it is closed.

use std::ops::Range;

use crate::backend::Backend;
use crate::model::ParamLayout;
use crate::{Error, Result};

/// The groups [`crate::model::Model::backward`] closes, in the order it closes them (see the
/// module docs; tests check the backward against it). A data-parallel sink whose rank has no
/// micro-batch left replays this order with zero gradients, so that every rank makes the same
/// collective calls.
pub fn close_order(layout: &ParamLayout) -> Vec<Range<usize>> {
    let (norm, embed) = (layout.norm, layout.embed);
    let mut out = Vec::with_capacity(layout.layers.len() + 2);
    out.push(if layout.lm_head == embed {
        norm..norm + 1
    } else {
        norm..norm + 2
    });
    for lp in layout.layers.iter().rev() {
        out.push(lp.input_norm..lp.input_norm + LAYER_GROUP);
    }
    out.push(embed..embed + 1);
    out
}

/// Tensors of one decoder layer's group.
const LAYER_GROUP: usize = 12;

/// The groups a sink has open, each with the buffers it handed out (for sinks that make their
/// buffers per group: `train::host_grads`, `train::zero`).
pub struct OpenGroups<F> {
    open: Vec<(usize, Vec<F>)>,
}

impl<F> Default for OpenGroups<F> {
    fn default() -> Self {
        OpenGroups { open: Vec::new() }
    }
}

impl<F> OpenGroups<F> {
    /// The buffers of group `first..first + n` of a sink over `len` tensors: the open group's
    /// own when it is open (the tied embedding), else `make(first..first + n)`'s.
    pub fn open(
        &mut self,
        first: usize,
        n: usize,
        len: usize,
        make: impl FnOnce(Range<usize>) -> Result<Vec<F>>,
    ) -> Result<&mut [F]> {
        let end = match first.checked_add(n) {
            Some(end) if end <= len => end,
            _ => return Err(range_error(first, n, len)),
        };
        let at = match self.open.iter().position(|(f, _)| *f == first) {
            Some(at) => at,
            None => {
                let bufs = make(first..end)?;
                crate::ensure!(
                    bufs.len() == n,
                    "gradient group {first}..{end}: {} buffers made for {n} tensors",
                    bufs.len()
                );
                self.open.push((first, bufs));
                self.open.len() - 1
            }
        };
        let bufs = &mut self.open[at].1;
        crate::ensure!(
            bufs.len() == n,
            "gradient group at tensor {first} opened with {n} tensors, it is open with {}",
            bufs.len()
        );
        Ok(bufs)
    }

    /// Takes the buffers of open group `first..first + n` (it is closed).
    pub fn close(&mut self, first: usize, n: usize) -> Result<Vec<F>> {
        let at = self
            .open
            .iter()
            .position(|(f, bufs)| *f == first && bufs.len() == n)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "gradient group {first}..{} closed without being open",
                    first.saturating_add(n)
                ))
            })?;
        Ok(self.open.swap_remove(at).1)
    }

    /// Forgets every open group.
    pub fn clear(&mut self) {
        self.open.clear();
    }
}

/// A destination for the parameter gradients of one backward pass (see the module docs for
/// the order of the groups).
pub trait GradSink<B: Backend> {
    /// Number of parameter tensors the sink covers (the model's tensor count).
    fn tensors(&self) -> usize;
    /// The f32 gradient buffers of tensors `first..first + n` in layout order, each of the
    /// tensor's element count, for the backward to accumulate (+=) into.
    fn open(&mut self, b: &B, first: usize, n: usize) -> Result<&mut [B::F]>;
    /// The gradients of tensors `first..first + n` are final for this backward: nothing later
    /// in it writes them (the group was opened with the same `first` and `n`).
    fn close(&mut self, b: &B, first: usize, n: usize) -> Result<()>;
}

fn range_error(first: usize, n: usize, len: usize) -> Error {
    Error::Invalid(format!(
        "gradient group {first}..{} asked of {len} gradient buffers",
        first.saturating_add(n)
    ))
}

impl<B: Backend> GradSink<B> for [B::F] {
    fn tensors(&self) -> usize {
        self.len()
    }
    fn open(&mut self, _b: &B, first: usize, n: usize) -> Result<&mut [B::F]> {
        let len = self.len();
        match first.checked_add(n) {
            Some(end) if end <= len => Ok(&mut self[first..end]),
            _ => Err(range_error(first, n, len)),
        }
    }
    fn close(&mut self, _b: &B, _first: usize, _n: usize) -> Result<()> {
        Ok(())
    }
}

impl<B: Backend> GradSink<B> for Vec<B::F> {
    fn tensors(&self) -> usize {
        self.len()
    }
    fn open(&mut self, b: &B, first: usize, n: usize) -> Result<&mut [B::F]> {
        self.as_mut_slice().open(b, first, n)
    }
    fn close(&mut self, _b: &B, _first: usize, _n: usize) -> Result<()> {
        Ok(())
    }
}
