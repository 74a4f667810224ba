// Attention of a few new queries a row over a key/value cache, in fp32 on CPU: the engine's
// compiled decode steps (one query a row), speculative verification (k + 1) and short prefills
// call it through the `rlfoundry_kernels::decode_attention` op (see kernels/__init__.py).
//
// Why a kernel of our own: at these shapes (a handful of query rows a sequence, head_dim 32 - 128,
// a few hundred cached keys) attention is two tiny matrix products per sequence and head group;
// batched matrix products pay a fixed cost per product that exceeds its arithmetic, and inductor's
// generated reduction kernels run long chains of dependent multiply-adds. Here every query row
// walks its visible keys once: scores, softmax, weighted sum of values, with independent
// accumulators so that the products pipeline.
//
//   q    [B, H, T, D]  (any strides with D contiguous; else copied)
//   k, v [B, G, S, D]  keys with S contiguous (the engine's transposed key cache: read as [D, S],
//                      scores as vertical products) or D contiguous; values with D contiguous
//   pos  [B, T]        int64, each query's position: it sees keys 0..pos (causal over the cache;
//                      keys past a row's position are never read, so a short sequence in a batch
//                      of long ones costs its own length, not the batch's)
//   out  [B, H, T, D]  softmax(q k^T * scale) v over the visible keys, query head h reading
//                      key/value head h / (H / G)
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp(x) for x <= 0 (a score minus the row's maximum), to about 1 ulp: x = n ln2 + r with
// |r| <= ln2 / 2 (ln2 split in two for an exact product), exp(r) by its Taylor polynomial to r^7,
// times 2^n built in the exponent bits. Plain arithmetic, so that the compiler vectorises the loop:
// n rounded by adding and subtracting 1.5 * 2^23 (std::floor ran 3x slower), no branches.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.98412698e-4f;
  p = p * r + 1.38888889e-3f;
  p = p * r + 8.33333333e-3f;
  p = p * r + 4.16666667e-2f;
  p = p * r + 1.66666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
}

struct Args {
  const float *q, *k, *v;
  const int64_t* pos;
  float* out;
  int64_t H, T, G, S, Dr;
  int64_t qB, qH, qT, kB, kG, kS, kD, vB, vG, vS, pB, pT;
  float scale;
  bool keys_by_dim;  // k's S stride is 1
};

// The scores of W consecutive keys (stored [D, S]: key s's channel d at k[d * kD + s]): W
// accumulators held in registers over the whole dot product, each channel a vertical product.
template <int64_t W>
inline void score_block(const float* q, const float* k, int64_t kD, int64_t Dn, float scale, float* out) {
  float acc[W] = {};
  for (int64_t d = 0; d < Dn; ++d) {
    const float qd = q[d] * scale;
    const float* kd = k + d * kD;
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) acc[j] += qd * kd[j];
  }
  std::memcpy(out, acc, sizeof acc);
}

// One query row: out_row = softmax(scores) v. `D` > 0 fixes the head dim at compile time (the
// loops over it unroll into registers); 0 reads it from a.Dr. `scratch` holds S scores.
template <int64_t D>
void attend_row(const Args& a, int64_t b, int64_t h, int64_t t, float* scratch) {
  const int64_t Dn = D > 0 ? D : a.Dr;
  const int64_t g = h / (a.H / a.G);
  const int64_t S = std::min(a.S, a.pos[b * a.pB + t * a.pT] + 1);  // the visible keys
  const float* q = a.q + b * a.qB + h * a.qH + t * a.qT;
  const float* k = a.k + b * a.kB + g * a.kG;
  const float* v = a.v + b * a.vB + g * a.vG;
  float* sc = scratch;
  if (a.keys_by_dim) {
    int64_t s0 = 0;
    for (; s0 + 64 <= S; s0 += 64) score_block<64>(q, k + s0, a.kD, Dn, a.scale, sc + s0);
    for (; s0 + 16 <= S; s0 += 16) score_block<16>(q, k + s0, a.kD, Dn, a.scale, sc + s0);
    for (; s0 + 4 <= S; s0 += 4) score_block<4>(q, k + s0, a.kD, Dn, a.scale, sc + s0);
    for (; s0 < S; ++s0) score_block<1>(q, k + s0, a.kD, Dn, a.scale, sc + s0);
  } else {
    for (int64_t s = 0; s < S; ++s) {
      const float* ks = k + s * a.kS;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < Dn; ++d) dot += q[d] * ks[d];
      sc[s] = dot * a.scale;
    }
  }
  float mx = kNegInf;
#pragma omp simd reduction(max : mx)
  for (int64_t s = 0; s < S; ++s) mx = std::max(mx, sc[s]);
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t s = 0; s < S; ++s) {
    const float e = exp_nonpositive(sc[s] - mx);
    sc[s] = e;
    sum += e;
  }
  // the weighted sum of values, in four partial sums over the keys (independent chains)
  constexpr int64_t Dc = D > 0 ? D : 1;
  std::vector<float> heap;
  float stack[D > 0 ? 4 * Dc : 1];
  float* acc = stack;
  if (D == 0) {
    heap.assign(4 * Dn, 0.f);
    acc = heap.data();
  } else {
#pragma omp simd
    for (int64_t d = 0; d < 4 * Dn; ++d) acc[d] = 0.f;
  }
  const int64_t vS = a.vS;
  int64_t s = 0;
  for (; s + 4 <= S; s += 4) {
    const float w0 = sc[s], w1 = sc[s + 1], w2 = sc[s + 2], w3 = sc[s + 3];
    const float* v0 = v + s * vS;
#pragma omp simd
    for (int64_t d = 0; d < Dn; ++d) {
      acc[d] += w0 * v0[d];
      acc[Dn + d] += w1 * v0[vS + d];
      acc[2 * Dn + d] += w2 * v0[2 * vS + d];
      acc[3 * Dn + d] += w3 * v0[3 * vS + d];
    }
  }
  for (; s < S; ++s) {
    const float w = sc[s];
    const float* vs = v + s * vS;
#pragma omp simd
    for (int64_t d = 0; d < Dn; ++d) acc[d] += w * vs[d];
  }
  float* o = a.out + ((b * a.H + h) * a.T + t) * Dn;
  const float inv = 1.f / sum;
#pragma omp simd
  for (int64_t d = 0; d < Dn; ++d) o[d] = ((acc[d] + acc[Dn + d]) + (acc[2 * Dn + d] + acc[3 * Dn + d])) * inv;
}

template <int64_t D>
void attend(const Args& a, int64_t rows) {
  // rows in output order (b, h, t); a thread takes a run of them once they hold enough work to
  // pay for waking it (a batch-1 decode step stays on the calling thread)
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, a.S * (D > 0 ? D : a.Dr)));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(a.S);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = i % a.T, bh = i / a.T;
      attend_row<D>(a, bh / a.H, bh % a.H, t, scratch.data());
    }
  });
}

at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                            const at::Tensor& pos_in, double scale) {
  TORCH_CHECK(q_in.device().is_cpu(), "rlfoundry_kernels::decode_attention: CPU tensors only");
  TORCH_CHECK(q_in.scalar_type() == at::kFloat && k_in.scalar_type() == at::kFloat &&
                  v_in.scalar_type() == at::kFloat, "rlfoundry_kernels::decode_attention: fp32 only");
  TORCH_CHECK(pos_in.scalar_type() == at::kLong, "rlfoundry_kernels::decode_attention: positions must be int64");
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4 && pos_in.dim() == 2,
              "rlfoundry_kernels::decode_attention: q, k, v [B, H|G, T|S, D] and positions [B, T]");
  const int64_t B = q_in.size(0), H = q_in.size(1), T = q_in.size(2), D = q_in.size(3);
  const int64_t G = k_in.size(1), S = k_in.size(2);
  TORCH_CHECK(G > 0 && H % G == 0 && k_in.size(0) == B && v_in.size(0) == B && v_in.size(1) == G &&
                  v_in.size(2) == S && k_in.size(3) == D && v_in.size(3) == D && pos_in.size(0) == B &&
                  pos_in.size(1) == T,
              "rlfoundry_kernels::decode_attention: mismatched shapes");
  const at::Tensor q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();
  const bool keys_by_dim = k_in.stride(2) == 1 && S > 1;
  const at::Tensor k = keys_by_dim || k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  const at::Tensor v = v_in.stride(3) == 1 ? v_in : v_in.contiguous();
  at::Tensor out = at::empty({B, H, T, D}, q.options());
  if (out.numel() == 0 || S == 0) return out.zero_();
  Args a{q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), pos_in.data_ptr<int64_t>(),
         out.data_ptr<float>(), H, T, G, S, D,
         q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), k.stride(3),
         v.stride(0), v.stride(1), v.stride(2), pos_in.stride(0), pos_in.stride(1),
         static_cast<float>(scale), keys_by_dim};
  const int64_t rows = B * H * T;
  switch (D) {
    case 32: attend<32>(a, rows); break;
    case 64: attend<64>(a, rows); break;
    case 128: attend<128>(a, rows); break;
    default: attend<0>(a, rows);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(rlfoundry_kernels, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor positions, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(rlfoundry_kernels, CPU, m) { m.impl("decode_attention", &decode_attention); }

// AOTInductor's C shim (declared in aot.py's `_c_shims`): the libraries compiled ahead of time
// call the op directly instead of through the dispatcher
extern "C" AOTITorchError aoti_torch_cpu_decode_attention(AtenTensorHandle q, AtenTensorHandle k, AtenTensorHandle v,
                                                          AtenTensorHandle positions, double scale,
                                                          AtenTensorHandle* ret0) {
  using torch::aot_inductor::tensor_handle_to_tensor_pointer;
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    *ret0 = torch::aot_inductor::new_tensor_handle(
        decode_attention(*tensor_handle_to_tensor_pointer(q), *tensor_handle_to_tensor_pointer(k),
                         *tensor_handle_to_tensor_pointer(v), *tensor_handle_to_tensor_pointer(positions), scale));
  });
}
