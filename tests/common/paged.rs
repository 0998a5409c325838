//! Paged against contiguous decode attention, on any backend: the same sequences stored in a
//! contiguous cache (one block of `max_len` rows per sequence, the table 0, 1, ..) and in a
//! paged cache (blocks of `block_size` rows in a shuffled order, the spare blocks NaN), each
//! through `kv_store` then `attention_decode`.

use super::Rng;
use tooln1::backend::{Backend, Cached, Heads, KvRows};

/// The inputs of one case: per sequence its query (the last token's) and its keys/values.
pub struct DecodeCase {
    pub heads: Heads,
    pub lens: Vec<u32>,
    /// [n_seq, n_heads * head_dim]
    pub q: Vec<f32>,
    /// Per sequence [len, n_kv * head_dim].
    pub k: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

impl DecodeCase {
    pub fn random(r: &mut Rng, heads: Heads, lens: &[u32]) -> DecodeCase {
        let kvd = heads.n_kv * heads.head_dim;
        DecodeCase {
            heads,
            lens: lens.to_vec(),
            q: r.vec(lens.len() * heads.n_heads * heads.head_dim, 1.5),
            k: lens.iter().map(|&l| r.vec(l as usize * kvd, 1.5)).collect(),
            v: lens.iter().map(|&l| r.vec(l as usize * kvd, 1.0)).collect(),
        }
    }

    /// Decode through a cache of `n_blocks` blocks of `block_size` rows, sequence b's block j
    /// being `table[b * max_blocks + j]`; returns the output rows.
    pub fn decode<B: Backend>(
        &self,
        b: &B,
        block_size: usize,
        max_blocks: usize,
        table: &[u32],
        n_blocks: usize,
    ) -> Vec<f32> {
        let Heads {
            n_heads,
            n_kv,
            head_dim,
        } = self.heads;
        let (kvd, n_seq) = (n_kv * head_dim, self.lens.len());
        let nan = vec![f32::NAN; n_blocks * block_size * kvd];
        let (mut kc, mut vc) = (b.upload(&nan).unwrap(), b.upload(&nan).unwrap());
        for (s, &l) in self.lens.iter().enumerate() {
            let l = l as usize;
            let dst: Vec<u32> = (0..l)
                .map(|p| {
                    table[s * max_blocks + p / block_size] * block_size as u32
                        + (p % block_size) as u32
                })
                .collect();
            b.kv_store(
                &b.upload(&self.k[s]).unwrap(),
                &b.upload(&self.v[s]).unwrap(),
                &b.upload_u32(&dst).unwrap(),
                &mut kc,
                &mut vc,
                KvRows {
                    n_tok: l,
                    kv_dim: kvd,
                },
            )
            .unwrap();
        }
        let q = b.upload(&self.q).unwrap();
        let mut out = b.upload(&vec![f32::NAN; self.q.len()]).unwrap();
        b.attention_decode(
            &q,
            &kc,
            &vc,
            &Cached {
                lens: &b.upload_u32(&self.lens).unwrap(),
                table: &b.upload_u32(table).unwrap(),
                n_seq,
                max_blocks,
                block_size,
            },
            &mut out,
            self.heads,
        )
        .unwrap();
        b.download(&out, n_seq * n_heads * head_dim).unwrap()
    }

    /// The contiguous layout: sequence b in block b of `max_len` rows.
    pub fn contiguous<B: Backend>(&self, b: &B) -> Vec<f32> {
        let max_len = *self.lens.iter().max().unwrap() as usize;
        let n = self.lens.len();
        let table: Vec<u32> = (0..n as u32).collect();
        self.decode(b, max_len, 1, &table, n)
    }

    /// A paged layout of `block_size`-row blocks: the blocks the sequences need plus 3
    /// spare ones, handed out in a random order; the table entries past a sequence's length
    /// hold u32::MAX (never read).
    pub fn paged<B: Backend>(&self, b: &B, r: &mut Rng, block_size: usize) -> Vec<f32> {
        let max_len = *self.lens.iter().max().unwrap() as usize;
        let max_blocks = max_len.div_ceil(block_size);
        let used: usize = self
            .lens
            .iter()
            .map(|&l| (l as usize).div_ceil(block_size))
            .sum();
        let n_blocks = used + 3;
        let mut ids: Vec<u32> = (0..n_blocks as u32).collect();
        for i in (1..ids.len()).rev() {
            ids.swap(i, r.below(i + 1));
        }
        let mut next = ids.into_iter();
        let mut table = vec![0u32; self.lens.len() * max_blocks];
        for (s, &l) in self.lens.iter().enumerate() {
            for j in 0..max_blocks {
                table[s * max_blocks + j] = if j < (l as usize).div_ceil(block_size) {
                    next.next().unwrap()
                } else {
                    u32::MAX
                };
            }
        }
        self.decode(b, block_size, max_blocks, &table, n_blocks)
    }
}

/// Bit-for-bit equality, naming the first differing element.
pub fn same_bits(name: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{name}: lengths");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        panic!(
            "{name}: element {i} is {} where {} is expected",
            got[i], want[i]
        );
    }
}
