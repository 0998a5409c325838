//! The paged KV cache of decoding (PagedAttention, Kwon et al., SOSP 2023, arXiv 2309.06180;
//! vLLM's `BlockSpaceManager`): every layer's keys and values live in one pool of fixed-size
//! blocks ([(n_blocks + 1) * block_size, kv_dim] per layer, k and v: the pool's blocks and a
//! scratch block for the padding rows of graph-replayed decode steps), each sequence slot has
//! a block table, blocks are allocated as a sequence grows and returned when it is released,
//! and a block can be shared by several sequences (reference counts): the `n` samples of a prompt
//! read that prompt's blocks, stored once. A shared block is copied before it is written
//! (copy-on-write, [`Backend::copy_rows`]): only the partially filled last prompt block is ever
//! written by a sharer, when its sequence appends its first token there.

use crate::backend::{Backend, RowCopy};
use crate::{Error, Result};

/// Rows per block when none is configured (vLLM's default block size).
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// Reference-counted fixed-size blocks: ids 0..n_blocks, allocated lowest id first.
#[derive(Clone, Debug)]
pub struct BlockPool {
    refs: Vec<u32>,
    /// Free ids, the next one to allocate last.
    free: Vec<u32>,
    peak_used: usize,
}

impl BlockPool {
    pub fn new(n_blocks: usize) -> Self {
        BlockPool {
            refs: vec![0; n_blocks],
            free: (0..n_blocks as u32).rev().collect(),
            peak_used: 0,
        }
    }

    pub fn n_blocks(&self) -> usize {
        self.refs.len()
    }

    /// Blocks not held by any sequence.
    pub fn free(&self) -> usize {
        self.free.len()
    }

    /// Blocks held now.
    pub fn used(&self) -> usize {
        self.refs.len() - self.free.len()
    }

    /// The most blocks held at once so far.
    pub fn peak_used(&self) -> usize {
        self.peak_used
    }

    /// The holders of block `id` (0 when it is free or out of range).
    pub fn refs(&self, id: u32) -> u32 {
        self.refs.get(id as usize).copied().unwrap_or(0)
    }

    /// A free block with one holder; an error when the pool is exhausted.
    pub fn alloc(&mut self) -> Result<u32> {
        let id = self.free.pop().ok_or_else(|| {
            Error::Invalid(format!(
                "KV cache: all {} blocks are in use (the pool is exhausted)",
                self.refs.len()
            ))
        })?;
        self.refs[id as usize] = 1;
        self.peak_used = self.peak_used.max(self.used());
        Ok(id)
    }

    /// One more holder of the held block `id`.
    pub fn share(&mut self, id: u32) -> Result<()> {
        match self.refs.get_mut(id as usize) {
            Some(r) if *r > 0 => {
                *r += 1;
                Ok(())
            }
            _ => Err(Error::Invalid(format!(
                "KV cache: block {id} is not held, so it cannot be shared"
            ))),
        }
    }

    /// One holder fewer of block `id`; the last one returns it to the free list.
    pub fn release(&mut self, id: u32) -> Result<()> {
        match self.refs.get_mut(id as usize) {
            Some(r) if *r > 0 => {
                *r -= 1;
                if *r == 0 {
                    self.free.push(id);
                }
                Ok(())
            }
            _ => Err(Error::Invalid(format!(
                "KV cache: block {id} is not held, so it cannot be released"
            ))),
        }
    }
}

/// The size of a paged KV cache: `slots` block tables of sequences of at most `max_len`
/// positions over a pool of `n_blocks` blocks of `block_size` rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvShape {
    pub slots: usize,
    pub max_len: usize,
    pub block_size: usize,
    pub n_blocks: usize,
}

/// Per-layer keys and values in a [`BlockPool`], and a block table per sequence slot.
pub struct KvCache<B: Backend> {
    /// Per layer, [(n_blocks + 1) * block_size, kv_width]: the pool's blocks and, last, a
    /// scratch block no sequence ever holds ([`KvCache::scratch_block`]), where the padding rows
    /// of a graph-replayed decode step write and read.
    pub k: Vec<B::T>,
    pub v: Vec<B::T>,
    /// Positions cached so far per slot.
    pub lens: Vec<u32>,
    /// Per slot, the blocks holding positions 0, block_size, 2 * block_size, ...
    pub tables: Vec<Vec<u32>>,
    pub pool: BlockPool,
    pub slots: usize,
    /// The most positions one slot can hold.
    pub max_len: usize,
    pub block_size: usize,
    /// Elements per cached position (n_kv * head_dim).
    pub kv_width: usize,
    /// Shared blocks copied before a write (copy-on-write).
    pub cow_copies: usize,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache of `shape` with `layers` layers of `kv_width` elements per row.
    pub fn new(b: &B, shape: KvShape, layers: usize, kv_width: usize) -> Result<Self> {
        let KvShape {
            slots,
            max_len,
            block_size,
            n_blocks,
        } = shape;
        if slots == 0 || max_len == 0 || block_size == 0 || n_blocks == 0 {
            return Err(Error::Invalid(format!(
                "KV cache: slots = {slots}, max_len = {max_len}, block_size = {block_size} and \
                 n_blocks = {n_blocks} must all be positive"
            )));
        }
        if u32::try_from(n_blocks).is_err() || max_len > u32::MAX as usize {
            return Err(Error::Invalid(format!(
                "KV cache: {n_blocks} blocks and max_len = {max_len} must be below 2^32"
            )));
        }
        let n = (n_blocks + 1)
            .checked_mul(block_size)
            .filter(|&r| r <= u32::MAX as usize)
            .and_then(|r| r.checked_mul(kv_width))
            .filter(|&n| n <= isize::MAX as usize / 4);
        // Backends without a master copy keep f32 tensors in host memory (the CPU backend):
        // check that the cache fits before allocating it, since a failed host allocation
        // aborts the process.
        let bytes = n.and_then(|n| (n as u64).checked_mul(8)?.checked_mul(layers as u64));
        if !b.needs_master() || bytes.is_none() {
            crate::safefs::check_host_memory(
                bytes,
                &format!("KV cache of {n_blocks} blocks x {block_size} rows x {layers} layers"),
            )?;
        }
        let n = n.unwrap_or(0);
        let mut k = Vec::with_capacity(layers);
        let mut v = Vec::with_capacity(layers);
        for _ in 0..layers {
            k.push(b.zeros(n)?);
            v.push(b.zeros(n)?);
        }
        Ok(KvCache {
            k,
            v,
            lens: vec![0; slots],
            tables: vec![Vec::new(); slots],
            pool: BlockPool::new(n_blocks),
            slots,
            max_len,
            block_size,
            kv_width,
            cow_copies: 0,
        })
    }

    /// The block after the pool's, never allocated to a sequence: padding rows of a decode step
    /// padded to a batch-size bucket store and attend to its first row only.
    pub fn scratch_block(&self) -> u32 {
        self.pool.n_blocks() as u32
    }

    /// Block-table entries per sequence: ceil(max_len / block_size).
    pub fn max_blocks(&self) -> usize {
        self.max_len.div_ceil(self.block_size)
    }

    /// Blocks `len` positions occupy.
    pub fn blocks_for(&self, len: usize) -> usize {
        len.div_ceil(self.block_size)
    }

    fn slot(&self, op: &str, s: usize) -> Result<()> {
        if s >= self.slots {
            return Err(Error::Invalid(format!(
                "{op}: slot {s} of a cache of {} slots",
                self.slots
            )));
        }
        Ok(())
    }

    /// The cache row of slot `s`'s position `pos` (held by its table).
    pub fn row(&self, s: usize, pos: usize) -> u32 {
        self.tables[s][pos / self.block_size] * self.block_size as u32
            + (pos % self.block_size) as u32
    }

    /// Slot `s` gives back its blocks and holds nothing.
    pub fn release(&mut self, s: usize) -> Result<()> {
        self.slot("release", s)?;
        for id in std::mem::take(&mut self.tables[s]) {
            self.pool.release(id)?;
        }
        self.lens[s] = 0;
        Ok(())
    }

    /// Slot `s` (released first) holds `len` positions in fresh blocks, to be written.
    pub fn alloc_slot(&mut self, s: usize, len: usize) -> Result<()> {
        self.release(s)?;
        let need = self.blocks_for(len);
        if len > self.max_len || need > self.pool.free() {
            return Err(Error::Invalid(format!(
                "KV cache: {len} positions ({need} blocks of {}) for slot {s}, with {} of {} \
                 blocks free and max_len = {}",
                self.block_size,
                self.pool.free(),
                self.pool.n_blocks(),
                self.max_len
            )));
        }
        for _ in 0..need {
            let id = self.pool.alloc()?;
            self.tables[s].push(id);
        }
        self.lens[s] = len as u32;
        Ok(())
    }

    /// Slot `dst` (released first) shares the blocks of the first `len` positions of slot
    /// `src` (no copy; a shared block is copied when either writes it). `len <= lens[src]`.
    pub fn share_slot(&mut self, src: usize, dst: usize, len: usize) -> Result<()> {
        self.slot("share_slot", src)?;
        self.slot("share_slot", dst)?;
        if src == dst || len > self.lens[src] as usize {
            return Err(Error::Invalid(format!(
                "share_slot: slot {src} -> {dst}, {len} positions (expected two distinct slots \
                 and len <= lens[src] = {})",
                self.lens[src]
            )));
        }
        self.release(dst)?;
        let ids: Vec<u32> = self.tables[src][..self.blocks_for(len)].to_vec();
        for &id in &ids {
            self.pool.share(id)?;
        }
        self.tables[dst] = ids;
        self.lens[dst] = len as u32;
        Ok(())
    }

    /// Slot `dst` (released first) takes over slot `src`'s table and length; `src` is left
    /// empty. Nothing is copied.
    pub fn move_slot(&mut self, src: usize, dst: usize) -> Result<()> {
        self.slot("move_slot", src)?;
        self.slot("move_slot", dst)?;
        if src == dst {
            return Ok(());
        }
        self.release(dst)?;
        self.tables[dst] = std::mem::take(&mut self.tables[src]);
        self.lens[dst] = std::mem::replace(&mut self.lens[src], 0);
        Ok(())
    }

    /// Blocks slot `s` needs before it can append a position: a new block when its length is
    /// a whole number of blocks, a private copy when its last block is shared, else none.
    pub fn append_needs(&self, s: usize) -> usize {
        let len = self.lens[s] as usize;
        if len % self.block_size == 0 {
            return 1;
        }
        let last = self.tables[s][len / self.block_size];
        usize::from(self.pool.refs(last) > 1)
    }

    /// Blocks the leading `n` slots need for one decode step.
    pub fn step_needs(&self, n: usize) -> usize {
        (0..n.min(self.slots)).map(|s| self.append_needs(s)).sum()
    }

    /// Make slot `s`'s position lens[s] writable: allocate its block, or copy a shared last
    /// block into a private one (every layer's k and v, [`Backend::copy_rows`]).
    pub fn prepare_append(&mut self, b: &B, s: usize) -> Result<()> {
        let len = self.lens[s] as usize;
        if len >= self.max_len {
            return Err(Error::Invalid(format!(
                "decode: slot {s} is full ({len} of max_len = {} tokens)",
                self.max_len
            )));
        }
        let bs = self.block_size;
        if len % bs == 0 {
            let id = self.pool.alloc()?;
            self.tables[s].push(id);
            return Ok(());
        }
        let last = self.tables[s][len / bs];
        if self.pool.refs(last) > 1 {
            let id = self.pool.alloc()?;
            let c = RowCopy {
                src: last as usize * bs,
                dst: id as usize * bs,
                n: len % bs,
                width: self.kv_width,
            };
            for (k, v) in self.k.iter_mut().zip(self.v.iter_mut()) {
                b.copy_rows(k, c)?;
                b.copy_rows(v, c)?;
            }
            self.pool.release(last)?;
            self.tables[s][len / bs] = id;
            self.cow_copies += 1;
        }
        Ok(())
    }

    /// The block tables of the leading `n` slots, `max_blocks` entries each (unused entries
    /// 0), as [`crate::backend::Cached`] reads them.
    pub fn flat_tables(&self, n: usize) -> Vec<u32> {
        let mb = self.max_blocks();
        let mut t = vec![0u32; n * mb];
        for (s, row) in t.chunks_mut(mb).enumerate() {
            row[..self.tables[s].len()].copy_from_slice(&self.tables[s]);
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Cpu;

    fn cache(n_blocks: usize) -> KvCache<Cpu> {
        let shape = KvShape {
            slots: 3,
            max_len: 20,
            block_size: 4,
            n_blocks,
        };
        KvCache::new(&Cpu, shape, 2, 3).unwrap()
    }

    #[test]
    fn pool_allocates_shares_and_frees() {
        let mut p = BlockPool::new(3);
        let (a, b) = (p.alloc().unwrap(), p.alloc().unwrap());
        assert_eq!((a, b, p.free(), p.used()), (0, 1, 1, 2));
        p.share(a).unwrap();
        assert_eq!(p.refs(a), 2);
        p.release(a).unwrap();
        assert_eq!((p.refs(a), p.free()), (1, 1));
        p.release(a).unwrap();
        assert_eq!((p.refs(a), p.free()), (0, 2));
        assert!(p.release(a).is_err(), "a free block cannot be released");
        assert!(p.share(a).is_err(), "a free block cannot be shared");
        assert!(p.share(7).is_err());
        let c = p.alloc().unwrap();
        p.alloc().unwrap();
        assert_eq!(p.peak_used(), 3);
        let e = p.alloc().unwrap_err().to_string();
        assert!(e.contains("exhausted"), "{e}");
        p.release(c).unwrap();
        assert_eq!(p.alloc().unwrap(), c);
    }

    #[test]
    fn shared_prompt_blocks_copy_on_write() {
        let mut c = cache(6);
        // A 6-position prompt: one full block and a partial one.
        c.alloc_slot(2, 6).unwrap();
        let rows = c.kv_width * c.block_size;
        for (l, k) in c.k.iter_mut().enumerate() {
            for (i, x) in k.iter_mut().enumerate().take(2 * rows) {
                *x = (l * 1000 + i) as f32;
            }
        }
        c.share_slot(2, 0, 6).unwrap();
        c.share_slot(2, 1, 6).unwrap();
        assert_eq!(c.pool.used(), 2, "the prompt is stored once");
        assert_eq!(c.pool.refs(c.tables[2][0]), 3);
        assert_eq!(c.step_needs(2), 2, "both sharers copy the partial block");
        c.prepare_append(&Cpu, 0).unwrap();
        assert_eq!((c.pool.used(), c.cow_copies), (3, 1));
        let (old, new) = (c.tables[2][1] as usize, c.tables[0][1] as usize);
        assert_ne!(old, new);
        assert_eq!(
            c.tables[0][0], c.tables[2][0],
            "the full block stays shared"
        );
        for k in &c.k {
            let w = c.kv_width;
            // The 2 filled rows of the partial block were copied.
            assert_eq!(
                k[new * rows..new * rows + 2 * w],
                k[old * rows..old * rows + 2 * w]
            );
        }
        // Release the prompt: slot 1 is then the last holder of the partial block and writes
        // it in place.
        c.release(2).unwrap();
        assert_eq!(c.append_needs(1), 0);
        c.prepare_append(&Cpu, 1).unwrap();
        assert_eq!(c.cow_copies, 1);
        // A full block: the next position needs a new one.
        c.lens[1] = 8;
        assert_eq!(c.append_needs(1), 1);
        c.release(0).unwrap();
        c.release(1).unwrap();
        assert_eq!(c.pool.used(), 0);
        assert_eq!(c.pool.peak_used(), 3);
    }

    #[test]
    fn exhaustion_is_an_error_and_moves_copy_nothing() {
        let mut c = cache(3);
        c.alloc_slot(0, 8).unwrap();
        let e = c.alloc_slot(1, 5).unwrap_err().to_string();
        assert!(e.contains("1 of 3 blocks free"), "{e}");
        assert_eq!(c.pool.used(), 2, "a refused allocation holds nothing");
        c.alloc_slot(1, 3).unwrap();
        c.lens[1] = 4;
        assert!(
            c.prepare_append(&Cpu, 1).is_err(),
            "no block left to grow into"
        );
        let t = c.tables[0].clone();
        c.move_slot(0, 2).unwrap();
        assert_eq!((c.tables[2].clone(), c.lens[2], c.lens[0]), (t, 8, 0));
        assert!(c.tables[0].is_empty());
        assert_eq!(c.pool.used(), 3);
        assert_eq!(c.flat_tables(3)[10..12], [0, 1]);
        assert!(c.share_slot(2, 2, 1).is_err());
        assert!(c.share_slot(2, 1, 9).is_err());
        assert!(c.release(3).is_err());
        c.lens[2] = 20;
        assert!(c
            .prepare_append(&Cpu, 2)
            .unwrap_err()
            .to_string()
            .contains("full"));
    }
}
