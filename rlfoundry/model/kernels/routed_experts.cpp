// The routed experts of an MoE block for a few tokens, in fp32 on CPU: the engine's compiled
// decode steps call it through `rlfoundry_kernels::routed_experts` (see kernels/__init__.py).
//
//   x [N, D], ids [N, K] (int64 expert ids), weights [N, K] (fp32 gate weights),
//   gate_up [E, 2I, D] (gate rows first), down [E, D, I]   ->   y [N, D]
//   y[n] = sum_k weights[n, k] * down[e] (silu(gate[e] x[n]) * (up[e] x[n])),  e = ids[n, k]
//
// Why a kernel of our own: decoding, each expert serves a handful of tokens. Computed a pair
// (token, expert) at a time (inductor's fused kernel for `Experts._forward_gathered`), every pair
// reads its expert's weights again — 16x the weight traffic at 64 tokens of the tiny model —
// and every output is a dot product ending in a horizontal sum. Here the pairs are grouped by
// expert, and an expert's weights are read once for up to kTokens of its tokens: the tokens are
// the vector lanes (their inputs transposed into [D, kTokens]), and each weight is broadcast and
// multiplied into kRows independent accumulators of all the tokens at once.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kTokens = 16;  // tokens a block: the lanes of each accumulator
#ifdef __AVX512F__
constexpr int64_t kRows = 8;  // output rows accumulated at once (independent chains)
#else
constexpr int64_t kRows = 4;  // (two 8-lane registers an accumulator: fewer fit)
#endif

// exp(x) to about 1 ulp for x in [-87, 88] (clamped): as decode_attention.cpp's, both signs.
inline float exp_clamped(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
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

// out[j][:] = sum_c w[j * ldw + c] * in[c][:] for j < rows, c < cols: `in` [cols, kTokens],
// `out` [rows, kTokens], `w` row-major with leading dimension ldw.
void rows_times_tokens(const float* w, int64_t ldw, int64_t rows, int64_t cols, const float* in, float* out) {
  int64_t j0 = 0;
  for (; j0 + kRows <= rows; j0 += kRows) {
    float acc[kRows][kTokens] = {};
    for (int64_t c = 0; c < cols; ++c) {
      const float* x = in + c * kTokens;
      for (int64_t jj = 0; jj < kRows; ++jj) {
        const float wj = w[(j0 + jj) * ldw + c];
#pragma omp simd
        for (int64_t t = 0; t < kTokens; ++t) acc[jj][t] += wj * x[t];
      }
    }
    std::memcpy(out + j0 * kTokens, acc, sizeof acc);
  }
  for (; j0 < rows; ++j0) {
    float acc[kTokens] = {};
    for (int64_t c = 0; c < cols; ++c) {
      const float wj = w[j0 * ldw + c];
      const float* x = in + c * kTokens;
#pragma omp simd
      for (int64_t t = 0; t < kTokens; ++t) acc[t] += wj * x[t];
    }
    std::memcpy(out + j0 * kTokens, acc, sizeof acc);
  }
}

at::Tensor routed_experts(const at::Tensor& x_in, const at::Tensor& ids_in, const at::Tensor& weights_in,
                          const at::Tensor& gate_up_in, const at::Tensor& down_in) {
  TORCH_CHECK(x_in.device().is_cpu(), "rlfoundry_kernels::routed_experts: CPU tensors only");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && weights_in.scalar_type() == at::kFloat &&
                  gate_up_in.scalar_type() == at::kFloat && down_in.scalar_type() == at::kFloat,
              "rlfoundry_kernels::routed_experts: fp32 only");
  TORCH_CHECK(ids_in.scalar_type() == at::kLong, "rlfoundry_kernels::routed_experts: expert ids must be int64");
  TORCH_CHECK(x_in.dim() == 2 && ids_in.dim() == 2 && weights_in.dim() == 2 && gate_up_in.dim() == 3 &&
                  down_in.dim() == 3, "rlfoundry_kernels::routed_experts: x [N, D], ids and weights [N, K], "
                  "gate_up [E, 2I, D], down [E, D, I]");
  const int64_t N = x_in.size(0), D = x_in.size(1), K = ids_in.size(1);
  const int64_t E = gate_up_in.size(0), I = down_in.size(2);
  TORCH_CHECK(ids_in.size(0) == N && weights_in.size(0) == N && weights_in.size(1) == K &&
                  gate_up_in.size(1) == 2 * I && gate_up_in.size(2) == D && down_in.size(0) == E &&
                  down_in.size(1) == D, "rlfoundry_kernels::routed_experts: mismatched shapes");
  const at::Tensor x = x_in.contiguous(), ids = ids_in.contiguous(), wts = weights_in.contiguous();
  const at::Tensor gate_up = gate_up_in.contiguous(), down = down_in.contiguous();
  at::Tensor y = at::empty({N, D}, x.options());
  if (N == 0) return y;
  const float* xp = x.data_ptr<float>();
  const int64_t* idp = ids.data_ptr<int64_t>();
  const float* wp = wts.data_ptr<float>();
  const float* gup = gate_up.data_ptr<float>();
  const float* dnp = down.data_ptr<float>();

  // the pairs n * K + k grouped by expert (in pair order within an expert), then cut into
  // blocks of at most kTokens pairs of one expert
  std::vector<int64_t> start(E + 1, 0), order(N * K);
  for (int64_t p = 0; p < N * K; ++p) {
    const int64_t e = idp[p];
    TORCH_CHECK(e >= 0 && e < E, "rlfoundry_kernels::routed_experts: expert id ", e, " out of range");
    ++start[e + 1];
  }
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t p = 0; p < N * K; ++p) order[fill[idp[p]]++] = p;
  }
  std::vector<int64_t> block_first, block_expert;
  for (int64_t e = 0; e < E; ++e)
    for (int64_t b = start[e]; b < start[e + 1]; b += kTokens) {
      block_first.push_back(b);
      block_expert.push_back(e);
    }

  // each pair's expert output, then each token's weighted sum over its K pairs in k order
  std::vector<float> pair_out(N * K * D);
  const int64_t blocks = static_cast<int64_t>(block_first.size());
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xt(D * kTokens), h(2 * I * kTokens), yt(D * kTokens);
    for (int64_t bi = begin; bi < end; ++bi) {
      const int64_t e = block_expert[bi], first = block_first[bi];
      const int64_t nt = std::min(kTokens, start[e + 1] - first);
      std::fill(xt.begin(), xt.end(), 0.f);
      for (int64_t t = 0; t < nt; ++t) {
        const float* xr = xp + (order[first + t] / K) * D;
        for (int64_t d = 0; d < D; ++d) xt[d * kTokens + t] = xr[d];
      }
      rows_times_tokens(gup + e * 2 * I * D, D, 2 * I, D, xt.data(), h.data());
      for (int64_t i = 0; i < I; ++i) {  // h[i] = silu(gate_i) * up_i
        float* g = h.data() + i * kTokens;
        const float* u = h.data() + (I + i) * kTokens;
#pragma omp simd
        for (int64_t t = 0; t < kTokens; ++t) g[t] = g[t] / (1.0f + exp_clamped(-g[t])) * u[t];
      }
      rows_times_tokens(dnp + e * D * I, I, D, I, h.data(), yt.data());
      for (int64_t t = 0; t < nt; ++t) {
        float* out = pair_out.data() + order[first + t] * D;
        for (int64_t d = 0; d < D; ++d) out[d] = yt[d * kTokens + t];
      }
    }
  });
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, 4096 / (K * D)), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      float* out = yp + n * D;
      std::fill(out, out + D, 0.f);
      for (int64_t k = 0; k < K; ++k) {
        const float w = wp[n * K + k];
        const float* src = pair_out.data() + (n * K + k) * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) out[d] += w * src[d];
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rlfoundry_kernels, m) {
  m.def("routed_experts(Tensor x, Tensor ids, Tensor weights, Tensor gate_up, Tensor down) -> Tensor");
}

TORCH_LIBRARY_IMPL(rlfoundry_kernels, CPU, m) { m.impl("routed_experts", &routed_experts); }
