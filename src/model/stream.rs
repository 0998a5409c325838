//! Decoder-layer weights kept in host memory and streamed to the backend one layer at a time
//! (the frozen reference model of GRPO with `memory.reference = "host"`).
//!
//! The host copy holds each layer's tensors in the backend's own values: bf16 bytes when every
//! weight is exactly a bf16 value (always on the CUDA backend, whose weights are bf16), else
//! f32 bytes. An upload is then exact ([`Backend::upload_raw`] copies bf16 bytes bit for bit
//! to a bf16 device and widens them exactly to f32 on the CPU), so a streamed pass runs the
//! same kernels on the same values as the resident model and gives the same bits.
//!
//! Each layer's bytes live in [`Backend::host_buffer`] memory: page-locked (pinned) on the CUDA
//! backend when the driver grants it, ordinary pageable memory otherwise and on the CPU backend
//! ([`HostLayers::pinned`] says which). During a pass two layers are on the device: the one
//! computing and the next one, whose upload ([`Backend::upload_raw_async`]) is issued before
//! the current layer's kernels are queued ([`crate::model::Model`]'s layer loop). On CUDA, from
//! pinned bf16 bytes, it runs on a copy stream beside those kernels (after the work queued
//! before it, which last read the buffer it reuses), and the next layer's kernels wait for it;
//! from pageable memory the upload is synchronous.

use crate::backend::{Backend, DType, HostMem, PendingUpload};
use crate::model::ParamLayout;
use crate::{Error, Result};

/// The decoder layers of one model in host memory, in layout order.
pub struct HostLayers {
    dtype: DType,
    /// Per layer: its twelve tensors' bytes, one after the other in layout order.
    layers: Vec<Box<dyn HostMem>>,
    /// Element counts of a layer's tensors, in layout order (every layer has the same).
    numel: Vec<usize>,
}

impl HostLayers {
    /// Copy every decoder layer of `params` (laid out by `layout`) to host memory.
    pub fn from_device<B: Backend>(b: &B, layout: &ParamLayout, params: &[B::T]) -> Result<Self> {
        let Some(first) = layout.layers.first() else {
            return Ok(HostLayers {
                dtype: DType::BF16,
                layers: Vec::new(),
                numel: Vec::new(),
            });
        };
        let numel: Vec<usize> = first
            .all()
            .iter()
            .map(|&i| layout.specs[i].numel())
            .collect();
        let per_layer: u64 = numel.iter().map(|&n| n as u64).sum();
        let total = per_layer.checked_mul(layout.layers.len() as u64);
        // bf16 bytes are the common case (a bf16 device, a bf16 checkpoint); f32 weights take
        // twice as much, which the check below does not foresee.
        crate::safefs::check_host_memory(
            total.and_then(|t| t.checked_mul(2)),
            "the host-resident reference model",
        )?;
        let mut dtype = DType::BF16;
        let mut layers: Vec<Vec<u8>> = Vec::with_capacity(layout.layers.len());
        for lp in &layout.layers {
            let mut v = Vec::with_capacity(per_layer as usize);
            for (&i, &n) in lp.all().iter().zip(&numel) {
                v.extend(b.download(&params[i], n)?);
            }
            let exact = v.iter().all(|x| x.to_bits() & 0xffff == 0);
            if dtype == DType::BF16 && !exact {
                // A weight that is not a bf16 value: every layer is kept as f32.
                dtype = DType::F32;
                for l in &mut layers {
                    *l = crate::backend::bytes_to_f32(DType::BF16, l)
                        .iter()
                        .flat_map(|x| x.to_le_bytes())
                        .collect();
                }
            }
            layers.push(match dtype {
                DType::BF16 => v
                    .iter()
                    .flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes())
                    .collect(),
                _ => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            });
        }
        let layers = layers
            .into_iter()
            .map(|l| b.host_buffer(l))
            .collect::<Result<Vec<_>>>()?;
        Ok(HostLayers {
            dtype,
            layers,
            numel,
        })
    }

    /// Whether every layer is in page-locked (pinned) host memory.
    pub fn pinned(&self) -> bool {
        !self.layers.is_empty() && self.layers.iter().all(|l| l.pinned())
    }

    /// Number of layers held.
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// Host bytes held.
    pub fn host_bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.bytes().len() as u64).sum()
    }

    /// Whether the host copy holds bf16 bytes (else f32).
    pub fn is_bf16(&self) -> bool {
        self.dtype == DType::BF16
    }

    /// Layer `l`'s twelve tensors (layout order) as f32 host vectors.
    pub fn layer_f32(&self, l: usize) -> Result<Vec<Vec<f32>>> {
        let bytes = self.layer(l)?;
        let size = self.dtype.size();
        let mut at = 0;
        let mut out = Vec::with_capacity(self.numel.len());
        for &n in &self.numel {
            out.push(crate::backend::bytes_to_f32(
                self.dtype,
                &bytes[at..at + n * size],
            ));
            at += n * size;
        }
        Ok(out)
    }

    fn layer(&self, l: usize) -> Result<&[u8]> {
        self.layers.get(l).map(|v| v.bytes()).ok_or_else(|| {
            Error::Invalid(format!(
                "streamed layer {l} requested, the model has {} layers",
                self.layers.len()
            ))
        })
    }

    /// Start uploading layer `l`'s twelve tensors (layout order) to the backend; the tensors
    /// may be used by work queued after the returned uploads are waited for.
    pub fn upload<B: Backend>(&self, b: &B, l: usize) -> Result<(Vec<B::T>, Vec<PendingUpload>)> {
        let src = self.layers.get(l).ok_or_else(|| {
            Error::Invalid(format!(
                "streamed layer {l} requested, the model has {} layers",
                self.layers.len()
            ))
        })?;
        let size = self.dtype.size();
        let mut at = 0;
        let mut out = Vec::with_capacity(self.numel.len());
        let mut pending = Vec::with_capacity(self.numel.len());
        for &n in &self.numel {
            let (t, p) = b.upload_raw_async(self.dtype, src.as_ref(), at..at + n * size, n)?;
            out.push(t);
            pending.push(p);
            at += n * size;
        }
        Ok((out, pending))
    }
}
