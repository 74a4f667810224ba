// Batch-invariant fp32 matrix products on CPU: every output is one chain of fused multiply-adds
// over the input dimension in order, y = fma(x[k], w[k], y) for k = 0, 1, ..., K-1 from y = 0, so
// a row's result is the same bits whatever rows, how many, which threads or which tile computed
// it. The batch-invariant mode of the model (`glm4_moe.set_batch_invariant`: linear layers, the
// experts, attention's two products) computes its forward products here, the engine decoding a
// token of many sequences and the trainer recomputing whole ones alike.
//
// Why a kernel of our own: MKL picks other kernels, with other summation orders, by the product's
// shape and the CPU — on one AMD EPYC rows 1 - 3 and 5 - 11 rounded differently from 4, 8 and 12
// or more; on one Xeon rows 2 - 5 from 6 or more, and with 384 input channels 2 - 15 from 16 or
// more — so padding rows to what one CPU's MKL treats alike was a property of that CPU, not of
// the code. Here the order is the code's.
//
//   invariant_matmul(x [Bt, M, K], w [Bt, N, K] or [N, K]) -> [Bt, M, N]     y = x w^T
//   invariant_grouped_matmul(x [R, K], w [E, N, K], offsets [E]) -> [R, N]  rows offsets[e-1] to
//                                      offsets[e] (cumulative ends, int32 or int64) times w[e]^T,
//                                      rows past offsets[E-1] zero
//
// x's rows have K contiguous (else copied), any other strides (a batch stride of 0 shares rows);
// w any strides (a transposed view too): each work item takes 32 outputs' weights as a [K, 32]
// panel (read in place where w's outputs are contiguous, else packed), then runs 6 rows at a time
// over it (12 accumulators: 6 rows x 2 vectors of 16 outputs, the input broadcast), so no lane
// sums are needed. ~120 GFLOP/s on one Xeon core at the trainer's shapes, 1.2 - 1.4x MKL's time.
#include "common.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

using rlfoundry::kernels::check_fp32;
using rlfoundry::kernels::kLanes;
using rlfoundry::kernels::Vec;
constexpr int64_t kCols = 2 * kLanes;  // the outputs of a panel
constexpr int kRows = 6;               // the rows of a tile
constexpr int64_t kDirectRows = 12;    // at most this many rows read contiguous outputs' weights in place
constexpr int64_t kBlockRows = 192;    // the rows of a work item (their inputs stay in cache across panels)

// p[k * kCols + j] = w[(n0 + j) * sN + k * sK], zeros past N
void pack(const float* w, int64_t sN, int64_t sK, int64_t n0, int64_t N, int64_t K, float* p) {
  const int64_t cols = std::min(kCols, N - n0);
  for (int64_t j = 0; j < cols; ++j) {
    const float* wj = w + (n0 + j) * sN;
    for (int64_t k = 0; k < K; ++k) p[k * kCols + j] = wj[k * sK];
  }
  for (int64_t j = cols; j < kCols; ++j)
    for (int64_t k = 0; k < K; ++k) p[k * kCols + j] = 0.f;
}

// Rows x + r * sM (r < R) times the panel: y + r * ldy, the first `cols` outputs.
#ifdef CPU_CAPABILITY_AVX512
// (raw AVX-512: with at::vec's class, or with masked loads in the loop, the compiler kept the
// accumulators in memory, 12 stores a multiply-add step, at half the speed; a partial panel is
// packed with zeros instead, and only the stores mask)
template <int R, int J, bool kMasked = false>
inline void tile_of(const float* x, int64_t sM, const float* p, int64_t ldp, int64_t K, float* y, int64_t ldy,
                    int64_t cols) {
  static_assert(kLanes == 16);
  __mmask16 lm[J];  // (masked loads: a partial panel read in place)
  for (int j = 0; j < J; ++j) {
    const int64_t c = std::min<int64_t>(kLanes, cols - j * kLanes);
    lm[j] = c >= kLanes ? 0xffff : static_cast<__mmask16>((1u << c) - 1);
  }
  __m512 acc[R][J];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 w[J];
    for (int j = 0; j < J; ++j)
      w[j] = kMasked ? _mm512_maskz_loadu_ps(lm[j], p + k * ldp + j * kLanes) : _mm512_loadu_ps(p + k * ldp + j * kLanes);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * sM + k]);
      for (int j = 0; j < J; ++j) acc[r][j] = _mm512_fmadd_ps(xv, w[j], acc[r][j]);
    }
  }
  for (int j = 0; j < J; ++j) {
    const int64_t c = std::min<int64_t>(kLanes, cols - j * kLanes);
    const __mmask16 m = c >= kLanes ? 0xffff : static_cast<__mmask16>((1u << c) - 1);
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y + r * ldy + j * kLanes, m, acc[r][j]);
  }
}
#else
template <int R, int J, bool kMasked = false>
inline void tile_of(const float* x, int64_t sM, const float* p, int64_t ldp, int64_t K, float* y, int64_t ldy,
                    int64_t cols) {
  Vec acc[R][J];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) acc[r][j] = Vec(0.f);
  for (int64_t k = 0; k < K; ++k) {
    Vec w[J];
    for (int j = 0; j < J; ++j) {
      const int64_t c = std::min<int64_t>(kLanes, cols - j * kLanes);
      w[j] = kMasked && c < kLanes ? Vec::loadu(p + k * ldp + j * kLanes, c) : Vec::loadu(p + k * ldp + j * kLanes);
    }
    for (int r = 0; r < R; ++r) {
      const Vec xv(x[r * sM + k]);
      for (int j = 0; j < J; ++j) acc[r][j] = at::vec::fmadd(xv, w[j], acc[r][j]);
    }
  }
  for (int j = 0; j < J; ++j) {
    const int c = static_cast<int>(std::min<int64_t>(kLanes, cols - j * kLanes));
    for (int r = 0; r < R; ++r) {
      const Vec a = acc[r][j];
      a.store(y + r * ldy + j * kLanes, c);
    }
  }
}
#endif

// A tile over the panel's first 16 outputs only where no more are wanted (the same multiply-adds
// for those: each output's chain is its own); `masked`: a partial panel read in place.
template <int R>
inline void tile(const float* x, int64_t sM, const float* p, int64_t ldp, int64_t K, float* y, int64_t ldy,
                 int64_t cols, bool masked) {
  if (cols == kCols)
    tile_of<R, 2>(x, sM, p, ldp, K, y, ldy, cols);
  else if (!masked)
    cols > kLanes ? tile_of<R, 2>(x, sM, p, ldp, K, y, ldy, cols) : tile_of<R, 1>(x, sM, p, ldp, K, y, ldy, cols);
  else
    cols > kLanes ? tile_of<R, 2, true>(x, sM, p, ldp, K, y, ldy, cols)
                  : tile_of<R, 1, true>(x, sM, p, ldp, K, y, ldy, cols);
}

// M rows (x + m * sM) times the panel (output j of input k at p[k * ldp + j]), 6 at a time, the
// last 1 - 5 together.
void rows_times_panel(const float* x, int64_t sM, int64_t M, const float* p, int64_t ldp, int64_t K, float* y,
                      int64_t ldy, int64_t cols, bool masked) {
  int64_t m = 0;
  for (; m + kRows <= M; m += kRows) tile<kRows>(x + m * sM, sM, p, ldp, K, y + m * ldy, ldy, cols, masked);
  switch (M - m) {
    case 5: tile<5>(x + m * sM, sM, p, ldp, K, y + m * ldy, ldy, cols, masked); break;
    case 4: tile<4>(x + m * sM, sM, p, ldp, K, y + m * ldy, ldy, cols, masked); break;
    case 3: tile<3>(x + m * sM, sM, p, ldp, K, y + m * ldy, ldy, cols, masked); break;
    case 2: tile<2>(x + m * sM, sM, p, ldp, K, y + m * ldy, ldy, cols, masked); break;
    case 1: tile<1>(x + m * sM, sM, p, ldp, K, y + m * ldy, ldy, cols, masked); break;
    default: break;
  }
}

struct Item {  // rows [m0, m0 + M) of x (stride sM from x) times panel n0 of weight matrix w
  const float* x;
  int64_t sM, M;
  const float* w;
  int64_t n0;
  float* y;
};

// Every item's product. Weights whose outputs are contiguous (sN == 1: a [K, N] matrix seen
// transposed, as attention's values, or the keys of a cache that stores them [D, S]) are read in
// place by a few rows (a decode step's queries of a sequence); otherwise a thread packs each of
// its items' panel into its own buffer first, zeros past N. Either way
// the same values meet the same multiply-adds.
void run(const std::vector<Item>& items, int64_t N, int64_t K, int64_t sN, int64_t sK) {
  int64_t work = 0;
  for (const Item& it : items) work += it.M;
  const int64_t per_item = std::max<int64_t>(1, work / std::max<size_t>(1, items.size())) * K * kCols;
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, per_item));
  at::parallel_for(0, static_cast<int64_t>(items.size()), grain, [&](int64_t a, int64_t b) {
    std::vector<float> panel(K * kCols);
    for (int64_t i = a; i < b; ++i) {
      const Item& it = items[i];
      if (it.M == 0) continue;
      const int64_t cols = std::min(kCols, N - it.n0);
      if (sN == 1 && it.M <= kDirectRows) {
        rows_times_panel(it.x, it.sM, it.M, it.w + it.n0, sK, K, it.y + it.n0, N, cols, true);
      } else {
        pack(it.w, sN, sK, it.n0, N, K, panel.data());
        rows_times_panel(it.x, it.sM, it.M, panel.data(), kCols, K, it.y + it.n0, N, cols, false);
      }
    }
  });
}

at::Tensor invariant_matmul(const at::Tensor& x_in, const at::Tensor& w) {
  check_fp32(x_in, "invariant_matmul", "x");
  check_fp32(w, "invariant_matmul", "w");
  TORCH_CHECK(x_in.dim() == 3 && (w.dim() == 2 || (w.dim() == 3 && w.size(0) == x_in.size(0))) &&
                  x_in.size(2) == w.size(-1),
              "rlfoundry_kernels::invariant_matmul: x [Bt, M, K] and w [N, K] or [Bt, N, K]");
  const at::Tensor x = x_in.stride(2) == 1 || x_in.size(2) <= 1 ? x_in : x_in.contiguous();
  const int64_t Bt = x.size(0), M = x.size(1), K = x.size(2), N = w.size(-2);
  at::Tensor y = at::empty({Bt, M, N}, x.options());
  if (y.numel() == 0) return y;
  if (K == 0) return y.zero_();
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t sB = w.dim() == 3 ? w.stride(0) : 0;
  std::vector<Item> items;
  for (int64_t b = 0; b < Bt; ++b)
    for (int64_t m0 = 0; m0 < M; m0 += kBlockRows)
      for (int64_t n0 = 0; n0 < N; n0 += kCols)
        items.push_back({xp + b * x.stride(0) + m0 * x.stride(1), x.stride(1), std::min(kBlockRows, M - m0),
                         wp + b * sB, n0, yp + (b * M + m0) * N});
  run(items, N, K, w.stride(-2), w.stride(-1));
  return y;
}

at::Tensor invariant_grouped_matmul(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& offsets_in) {
  check_fp32(x_in, "invariant_grouped_matmul", "x");
  check_fp32(w, "invariant_grouped_matmul", "w");
  TORCH_CHECK(x_in.dim() == 2 && w.dim() == 3 && x_in.size(1) == w.size(2) && offsets_in.dim() == 1 &&
                  offsets_in.size(0) == w.size(0) &&
                  (offsets_in.scalar_type() == at::kInt || offsets_in.scalar_type() == at::kLong),
              "rlfoundry_kernels::invariant_grouped_matmul: x [R, K], w [E, N, K], offsets [E] int32/int64");
  const at::Tensor x = x_in.stride(1) == 1 || x_in.size(1) <= 1 ? x_in : x_in.contiguous();
  const at::Tensor offsets = offsets_in.to(at::kLong).contiguous();
  const int64_t R = x.size(0), K = x.size(1), E = w.size(0), N = w.size(1);
  const int64_t* op = offsets.data_ptr<int64_t>();
  for (int64_t e = 0; e < E; ++e)
    TORCH_CHECK(op[e] >= (e ? op[e - 1] : 0) && op[e] <= R, "rlfoundry_kernels::invariant_grouped_matmul: offsets must ",
                "rise from 0 to at most ", R, " (offsets[", e, "] = ", op[e], ")");
  at::Tensor y = at::empty({R, N}, x.options());
  if (y.numel() == 0) return y;
  if (K == 0) return y.zero_();
  const int64_t used = E ? op[E - 1] : 0;
  if (used < R) y.narrow(0, used, R - used).zero_();  // rows past the last expert's: no product
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  std::vector<Item> items;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t m0 = e ? op[e - 1] : 0, M = op[e] - m0;
    for (int64_t r0 = m0; r0 < m0 + M; r0 += kBlockRows)
      for (int64_t n0 = 0; n0 < N; n0 += kCols)
        items.push_back({xp + r0 * x.stride(0), x.stride(0), std::min(kBlockRows, m0 + M - r0), wp + e * w.stride(0),
                         n0, yp + r0 * N});
  }
  run(items, N, K, w.stride(1), w.stride(2));
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rlfoundry_kernels, m) {
  m.def("invariant_matmul(Tensor x, Tensor w) -> Tensor");
  m.def("invariant_grouped_matmul(Tensor x, Tensor w, Tensor offsets) -> Tensor");
}

TORCH_LIBRARY_IMPL(rlfoundry_kernels, CPU, m) {
  m.impl("invariant_matmul", &invariant_matmul);
  m.impl("invariant_grouped_matmul", &invariant_grouped_matmul);
}
