// embedding.cu: token embedding lookup and its backward, and the scatter-add of activation rows.
//
// embedding_fwd: out[t, :] = table[ids[t], :]   (bf16 -> bf16, an exact copy)
//   table [vocab, dim] bf16, ids [n_tok] u32, out [n_tok, dim] bf16.
//   Launch: grid (n_tok), block 256; each block copies one row.
//   An id >= vocab sets ERR_EMBED_ID and writes NaN into that row.
// embedding_bwd: dtable[ids[t], :] += dout[t, :]   (f32 gradient; rows may repeat)
//   dout [n_tok, dim] bf16, dtable [vocab, dim] f32.
//   Launch: grid ceil(dim/256), block 256; one thread per column adds the tokens in order, so
//   the sums are deterministic (parallel over columns only: fine for one call per backward).
#include "common.cuh"

extern "C" __global__ void embedding_fwd(const u32* __restrict__ ids, const bf16_t* __restrict__ table,
                                         bf16_t* __restrict__ out, int n_tok, int dim, u32 vocab,
                                         u32* err) {
    const int t = blockIdx.x;
    if (t >= n_tok) return;
    const u32 id = ids[t];
    bf16_t* o = out + (size_t)t * dim;
    if (id >= vocab) {
        if (threadIdx.x == 0) atomicOr(err, ERR_EMBED_ID);
        for (int j = threadIdx.x; j < dim; j += blockDim.x) o[j] = BF16_NAN;
        return;
    }
    const bf16_t* row = table + (size_t)id * dim;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) o[j] = row[j];
}

extern "C" __global__ void embedding_bwd(const u32* __restrict__ ids, const bf16_t* __restrict__ dout,
                                         float* __restrict__ dtable, int n_tok, int dim, u32 vocab,
                                         u32* err) {
    // One thread per column walks the tokens in increasing order, so a repeated id sums its
    // rows in a fixed order (deterministic, no atomics on the table).
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= dim) return;
    for (int t = 0; t < n_tok; ++t) {
        const u32 id = ids[t];
        if (id >= vocab) {
            if (j == 0) atomicOr(err, ERR_EMBED_ID);
            continue;
        }
        dtable[(size_t)id * dim + j] += bf2f(dout[(size_t)t * dim + j]);
    }
}

// scatter_add_rows: dst[ids[t], :] += src[t, :] for t < n (bf16 activations, each sum in f32
//   then rounded), the backward of a row gather. One thread per column walks t in increasing
//   order, so a repeated id sums its rows in a fixed order (deterministic, no atomics).
//   src [n, dim] bf16, dst [dst_rows, dim] bf16. Launch: grid (ceil(dim/256)), block 256.
//   An id >= dst_rows sets ERR_EMBED_ID and is skipped.
extern "C" __global__ void scatter_add_rows(const u32* __restrict__ ids, const bf16_t* __restrict__ src,
                                            bf16_t* __restrict__ dst, int n, int dim, u32 dst_rows,
                                            u32* err) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= dim) return;
    for (int t = 0; t < n; ++t) {
        const u32 id = ids[t];
        if (id >= dst_rows) {
            if (j == 0) atomicOr(err, ERR_EMBED_ID);
            continue;
        }
        bf16_t* d = dst + (size_t)id * dim + j;
        *d = f2bf(bf2f(*d) + bf2f(src[(size_t)t * dim + j]));
    }
}
