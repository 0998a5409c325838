// rope.cu: rotary position embedding, half-split layout (HF rotate_half), in place.
//
// x viewed as [n_tok, n_heads, head_dim] bf16; token t at position pos[t] (u32).
// inv_freq[i] = theta^(-2i/head_dim), i < head_dim/2, is a table computed on the host by the
// CPU backend's own function (f32, as HF computes it), so the angle (float)pos * inv_freq[i]
// is bit-identical to the CPU backend's; computing theta^x with powf on the device would
// differ from the host's powf in the last bits, and at positions near 32k an error of one ulp
// in inv_freq (about 6e-8 relative) moves the angle by up to 2e-3 rad.
// For i < head_dim/2:
//   forward (sign = +1): (a, b) <- (a cos - b sin, b cos + a sin)
//   backward (sign = -1, the inverse rotation applied to the gradient):
//                        (a, b) <- (a cos + b sin, b cos - a sin)
// with a = x[.., i], b = x[.., i + head_dim/2]. Angles and rotation in f32 (sincosf, full range
// reduction, so large positions stay accurate).
// Launch: grid (n_tok * n_heads), block 64; one block per (token, head).
#include "common.cuh"

__device__ __forceinline__ void rope_rotate(bf16_t* x, const u32* pos, int n_tok, int n_heads,
                                            int head_dim, const float* inv_freq, float sign) {
    const int th = blockIdx.x;
    if (th >= n_tok * n_heads) return;
    const int t = th / n_heads;
    const int half = head_dim / 2;
    const float p = (float)pos[t];
    bf16_t* base = x + (size_t)th * head_dim;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float s, c;
        sincosf(p * inv_freq[i], &s, &c);
        s *= sign;
        const float a = bf2f(base[i]);
        const float b = bf2f(base[i + half]);
        base[i] = f2bf(a * c - b * s);
        base[i + half] = f2bf(b * c + a * s);
    }
}

extern "C" __global__ void rope_fwd(bf16_t* x, const u32* __restrict__ pos, int n_tok, int n_heads,
                                    int head_dim, const float* __restrict__ inv_freq) {
    rope_rotate(x, pos, n_tok, n_heads, head_dim, inv_freq, 1.0f);
}

extern "C" __global__ void rope_bwd(bf16_t* dx, const u32* __restrict__ pos, int n_tok, int n_heads,
                                    int head_dim, const float* __restrict__ inv_freq) {
    rope_rotate(dx, pos, n_tok, n_heads, head_dim, inv_freq, -1.0f);
}
