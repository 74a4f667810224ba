// Products of a few rows with small fp32 weights on CPU: the linear layers and the routed experts
// of the engine's decode steps and speculative cycles compiled ahead of time (see aot.py), through
// the ops `rlfoundry_kernels::small_linear` and `rlfoundry_kernels::gathered_linear`.
//
// Why a kernel of our own: at a handful of rows a product is a few matrix-vector products. MKL's
// sgemm packs the weights before each one; inductor's reduction kernels (`glm4_moe.small_linear`)
// reduce every output on its own, one vector of products and a horizontal sum at a time, and read
// the weights again for each row. Here each pass over the weights computes 4 outputs for up to 4
// rows at once (16 accumulators in registers, every weight vector loaded once for all the rows)
// with fused multiply-adds: 5 - 6x inductor's kernel at 1 and 4 rows on this machine's CPU.
//
// Every output is the same function of its row and weight row whatever the batch: the products of
// 16-wide slices of the input dimension accumulate in one vector in order (a masked slice last),
// then its lanes are summed. So a row's result does not depend on the other rows, on their count
// or on which block computes it — a speculative cycle's verification of 4 rows gives the plain
// decode step's values for each, bit for bit.
//
//   small_linear(x [..., K], w [N, K]) -> [..., N]                      y = x w^T
//   gathered_linear(x [T, K] or [T, P, K], w [E, N, K], ids [T, P]) -> [T, P, N]
//                                  y[t, p] = w[ids[t, p]] x[t] (or x[t, p]): the chosen experts
//
// Each op also has a C entry point in AOTInductor's shim convention (aoti_torch_cpu_<op>), which
// the libraries compiled ahead of time call directly instead of through the dispatcher.
#include "common.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace {

using rlfoundry::kernels::check_fp32;
using rlfoundry::kernels::kLanes;
using rlfoundry::kernels::lane_sum;
using rlfoundry::kernels::Vec;
constexpr int64_t kOuts = 4;  // outputs a block computes together

#ifdef CPU_CAPABILITY_AVX512
// The lane sums of 16 vectors at once, each by `lane_sum`'s tree (lanes i + i+8, then + i+4, + i+2,
// + i+1), so each sum is the same bits: a level adds two vectors' halves for both at once, where
// `lane_sum` spends a shuffle and an add of a whole vector on each half of one. Returns the sums of
// v[4t + c] in lane 4c + t. 30 shuffles and 15 adds for what takes `lane_sum` 64 and 64: at 128 input
// channels `lane_sum` took as long as the tile's multiply-adds. Measured (Xeon, AVX-512, one thread):
// 64 rows x 128 x 128 23 against 27 us, the routed experts of 64 tokens 96 against 112 us; the
// compiled engine's batch-64 decode ~10% more tokens/s (34K against 30.6K, processes alternating).
inline __m512 sums16(const __m512* v) {
  __m512 w[8], x[4], y[2];
  for (int p = 0; p < 8; ++p)  // lanes i + i+8: chunks [v2p, v2p, v2p+1, v2p+1]
    w[p] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int q = 0; q < 4; ++q)  // + i+4: chunks [v4q, v4q+1, v4q+2, v4q+3]
    x[q] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * q], w[2 * q + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(w[2 * q], w[2 * q + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  for (int s = 0; s < 2; ++s)  // + i+2: chunk c [v(8s+c) twice, v(8s+4+c) twice]
    y[s] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * s], x[2 * s + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(x[2 * s], x[2 * s + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // + i+1: chunk c [vc, v4+c, v8+c, v12+c]
  return _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_ps(y[0], y[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// The same for 4 vectors: the sum of v[c] in lane 4c (10 shuffles and 5 adds against 16 and 16).
inline __m512 sums4(const __m512* v) {
  const __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(v[0], v[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(v[0], v[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(v[2], v[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(v[2], v[3], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 x = _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_f32x4(w0, w1, _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 y = _mm512_add_ps(_mm512_shuffle_ps(x, x, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(x, x, _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_ps(y, y, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_ps(y, y, _MM_SHUFFLE(3, 1, 3, 1)));
}
#endif

// y[r][n + j] = the lane sum of acc[r][j], each by `lane_sum`'s tree: with AVX-512, tiles of 4
// outputs for 2 - 4 rows at once (`sums16`, missing rows as zeros: lanes of different vectors never
// mix) or for one row (`sums4`), else one at a time.
template <int R, int J>
inline void store_sums(const Vec (&acc)[R][J], int64_t n, float* const* y) {
#ifdef CPU_CAPABILITY_AVX512
  if constexpr (J == 4 && R >= 2) {
    __m512 v[16];
    for (int j = 0; j < 4; ++j)
      for (int r = 0; r < 4; ++r) v[4 * j + r] = r < R ? static_cast<__m512>(acc[r][j]) : _mm512_setzero_ps();
    const __m512 z = sums16(v);  // lane 4r + j: the sum of v[4j + r] = acc[r][j]
    alignas(64) float out[16];
    _mm512_store_ps(out, z);
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 4; ++j) y[r][n + j] = out[4 * r + j];
    return;
  }
  if constexpr (J == 4 && R == 1) {
    const __m512 v[4] = {acc[0][0], acc[0][1], acc[0][2], acc[0][3]};
    alignas(64) float out[16];
    _mm512_store_ps(out, sums4(v));
    for (int j = 0; j < 4; ++j) y[0][n + j] = out[4 * j];
    return;
  }
#endif
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) y[r][n + j] = lane_sum(acc[r][j]);
}

// Rows x[r][k] (r < R) times the J weight rows w[(n + j) * K + k]: y[r][n + j].
template <int R, int J>
inline void product_tile(const float* const* x, const float* w, int64_t K, int64_t n, float* const* y) {
  const int64_t full = K / kLanes * kLanes, tail = K - full;
  Vec acc[R][J];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) acc[r][j] = Vec(0.f);
  const float* wn = w + n * K;
  for (int64_t k = 0; k < full; k += kLanes) {
    Vec wv[J];
    for (int j = 0; j < J; ++j) wv[j] = Vec::loadu(wn + j * K + k);
    for (int r = 0; r < R; ++r) {
      const Vec xv = Vec::loadu(x[r] + k);
      for (int j = 0; j < J; ++j) acc[r][j] = at::vec::fmadd(xv, wv[j], acc[r][j]);
    }
  }
  if (tail) {  // a masked slice last
    Vec wv[J];
    for (int j = 0; j < J; ++j) wv[j] = Vec::loadu(wn + j * K + full, tail);
    for (int r = 0; r < R; ++r) {
      const Vec xv = Vec::loadu(x[r] + full, tail);
      for (int j = 0; j < J; ++j) acc[r][j] = at::vec::fmadd(xv, wv[j], acc[r][j]);
    }
  }
  store_sums<R, J>(acc, n, y);
}

// Rows x[r][k] (r < R) times weight rows w[n * K + k] for n in [n0, n1): y[r][n], 4 outputs a
// tile, the last ones one at a time (the same sums in the same order).
template <int R>
void product_block(const float* const* x, const float* w, int64_t K, int64_t n0, int64_t n1, float* const* y) {
  int64_t n = n0;
  for (; n + kOuts <= n1; n += kOuts) product_tile<R, kOuts>(x, w, K, n, y);
  for (; n < n1; ++n) product_tile<R, 1>(x, w, K, n, y);
}

// Rows [0, R) in blocks of 4, then the last 3, 2 or 1 together.
void product_rows(const float* const* x, int64_t R, const float* w, int64_t K, int64_t n0, int64_t n1,
                  float* const* y) {
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) product_block<4>(x + r, w, K, n0, n1, y + r);
  switch (R - r) {
    case 3: product_block<3>(x + r, w, K, n0, n1, y + r); break;
    case 2: product_block<2>(x + r, w, K, n0, n1, y + r); break;
    case 1: product_block<1>(x + r, w, K, n0, n1, y + r); break;
    default: break;
  }
}

// Work (multiply-adds) below which a product stays on the calling thread: waking a second one
// costs about what ~64K multiply-adds take here.
constexpr int64_t kSerialWork = 1 << 16;

at::Tensor small_linear(const at::Tensor& x_in, const at::Tensor& w_in) {
  check_fp32(x_in, "small_linear", "x");
  check_fp32(w_in, "small_linear", "w");
  TORCH_CHECK(x_in.dim() >= 1 && w_in.dim() == 2 && x_in.size(-1) == w_in.size(1),
              "rlfoundry_kernels::small_linear: x [..., K] and w [N, K]");
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  const int64_t K = w.size(1), N = w.size(0), R = K ? x.numel() / K : 0;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor y = at::empty(shape, x.options());
  if (y.numel() == 0) return y;
  if (K == 0) return y.zero_();
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  std::vector<const float*> xr(R);
  std::vector<float*> yr(R);
  for (int64_t r = 0; r < R; ++r) xr[r] = xp + r * K, yr[r] = yp + r * N;
  const int64_t blocks = (N + kOuts - 1) / kOuts;
  const int64_t grain = std::max<int64_t>(1, kSerialWork / std::max<int64_t>(1, R * K * kOuts));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    product_rows(xr.data(), R, wp, K, b0 * kOuts, std::min(N, b1 * kOuts), yr.data());
  });
  return y;
}

at::Tensor gathered_linear(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& ids_in) {
  check_fp32(x_in, "gathered_linear", "x");
  check_fp32(w_in, "gathered_linear", "w");
  TORCH_CHECK(ids_in.scalar_type() == at::kLong && ids_in.dim() == 2, "rlfoundry_kernels::gathered_linear: ids [T, P] int64");
  TORCH_CHECK(w_in.dim() == 3 && (x_in.dim() == 2 || x_in.dim() == 3) && x_in.size(0) == ids_in.size(0) &&
                  x_in.size(-1) == w_in.size(2) && (x_in.dim() == 2 || x_in.size(1) == ids_in.size(1)),
              "rlfoundry_kernels::gathered_linear: x [T, K] or [T, P, K], w [E, N, K], ids [T, P]");
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous(), ids = ids_in.contiguous();
  const int64_t T = ids.size(0), P = ids.size(1), E = w.size(0), N = w.size(1), K = w.size(2);
  at::Tensor y = at::empty({T, P, N}, x.options());
  if (y.numel() == 0) return y;
  if (K == 0) return y.zero_();
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  const int64_t* ip = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < T * P; ++i)
    TORCH_CHECK(ip[i] >= 0 && ip[i] < E, "rlfoundry_kernels::gathered_linear: expert id ", ip[i], " out of range [0, ", E, ")");
  float* yp = y.data_ptr<float>();
  const bool per_pair = x.dim() == 3;
  // the pairs grouped by expert (a counting sort, stable), so that the pairs of one expert — a
  // speculative cycle's consecutive tokens often choose the same ones — share its weights' reads
  const int64_t M = T * P;
  std::vector<int64_t> start(E + 1, 0), order(M);
  for (int64_t i = 0; i < M; ++i) ++start[ip[i] + 1];
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t i = 0; i < M; ++i) order[fill[ip[i]]++] = i;
  std::vector<const float*> xr(M);
  std::vector<float*> yr(M);
  for (int64_t j = 0; j < M; ++j) {
    const int64_t i = order[j];
    xr[j] = xp + (per_pair ? i : i / P) * K, yr[j] = yp + i * N;
  }
  // work items: up to 4 pairs of one expert
  std::vector<std::pair<int64_t, int64_t>> items;  // (first pair in `order`, count)
  for (int64_t e = 0; e < E; ++e)
    for (int64_t j = start[e]; j < start[e + 1]; j += 4) items.emplace_back(j, std::min<int64_t>(4, start[e + 1] - j));
  const int64_t grain = std::max<int64_t>(1, kSerialWork / std::max<int64_t>(1, 2 * N * K));
  at::parallel_for(0, static_cast<int64_t>(items.size()), grain, [&](int64_t a, int64_t b) {
    for (int64_t it = a; it < b; ++it) {
      const auto [j, m] = items[it];
      product_rows(xr.data() + j, m, wp + ip[order[j]] * N * K, K, 0, N, yr.data() + j);
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rlfoundry_kernels, m) {
  m.def("small_linear(Tensor x, Tensor w) -> Tensor");
  m.def("gathered_linear(Tensor x, Tensor w, Tensor ids) -> Tensor");
}

TORCH_LIBRARY_IMPL(rlfoundry_kernels, CPU, m) {
  m.impl("small_linear", &small_linear);
  m.impl("gathered_linear", &gathered_linear);
}

// AOTInductor's C shims (their declarations are aot.py's `_c_shims`)
extern "C" {

AOTITorchError aoti_torch_cpu_small_linear(AtenTensorHandle x, AtenTensorHandle w, AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    *ret0 = torch::aot_inductor::new_tensor_handle(
        small_linear(*torch::aot_inductor::tensor_handle_to_tensor_pointer(x),
                     *torch::aot_inductor::tensor_handle_to_tensor_pointer(w)));
  });
}

AOTITorchError aoti_torch_cpu_gathered_linear(AtenTensorHandle x, AtenTensorHandle w, AtenTensorHandle ids,
                                              AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    *ret0 = torch::aot_inductor::new_tensor_handle(
        gathered_linear(*torch::aot_inductor::tensor_handle_to_tensor_pointer(x),
                        *torch::aot_inductor::tensor_handle_to_tensor_pointer(w),
                        *torch::aot_inductor::tensor_handle_to_tensor_pointer(ids)));
  });
}

}  // extern "C"
