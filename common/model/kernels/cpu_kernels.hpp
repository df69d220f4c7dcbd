#pragma once
// CPU kernels: float32 activations; weights float32, bfloat16 or float16, widened
// to float32 as they are read; every sum accumulates in float32. Plain loops
// except the products, which stream the weights with AVX-512 (or AVX2) where
// the CPU has it. At the sizes of a tiny model they run on one thread, with no
// dispatch: the op count, not the arithmetic, decided the speed there.
//
// Raw pointers, not tensors, so no file here pays for <torch/torch.h>. W, the
// weights' element type, is float, c10::BFloat16 or c10::Half.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace mdi {

// y (T, n) = add + x (T, in) · w (n, in)ᵀ; add may be null. Rows of w are split over the threads.
template <typename W>
void linear_kernel(const float* x, int64_t T, const W* w, int64_t in, int64_t n, const float* add, float* y);

// out = x / rms(x) * weight, row by row, as llama2.c computes it.
template <typename W>
void rms_norm_kernel(const float* x, int64_t T, int64_t dim, const W* weight, float eps, float* out);

// Half-split RoPE, in place, on `heads` heads of head_dim at row stride `stride`, token t at position pos0 + t.
// cos, sin: (max_seq_len, head_dim / 2)
void rope_kernel(float* x, int64_t T, int64_t stride, int64_t heads, int64_t hd, int64_t pos0, const float* cos, const float* sin);

// Causal attention of T queries (positions pos0 .. pos0 + T - 1) over the cache: for each
// head, softmax(q·kᵀ / sqrt(hd)) · v. q: (T, n_heads, hd) at row stride q_stride;
// keys, values: (n_kv, capacity, hd); out: (T, n_heads * hd). Heads are split over the threads.
void attention_kernel(const float* q, int64_t q_stride, const float* keys, const float* values, int64_t capacity, int64_t T,
                      int64_t pos0, int64_t n_heads, int64_t n_kv, int64_t hd, float* out);

// SwiGLU: gate_up (T, 2 * hidden) → out = silu(gate) * up (T, hidden)
void swiglu_kernel(const float* gate_up, int64_t T, int64_t hidden, float* out);

#if defined(__x86_64__)
// Rows [r0, r1) of linear_kernel's y, in the kernel sets of avx512.cpp and avx2.cpp.
// Only they are compiled for those instruction sets (by target attributes), so the
// rest of the binary runs on any x86-64; plain.cpp calls the one the CPU has.
template <typename W>
void linear_rows_avx512(const float* x, int64_t T, const W* w, int64_t in, int64_t n, const float* add, float* y, int64_t r0,
                        int64_t r1);
template <typename W>
void linear_rows_avx2(const float* x, int64_t T, const W* w, int64_t in, int64_t n, const float* add, float* y, int64_t r0,
                      int64_t r1);
#endif

}  // namespace mdi
