// RMSNorm and rotary embedding of the batch-invariant mode in fp32 on CPU, forward and backward,
// each a single pass over its rows (torch's forms are 5 - 10 element-wise passes each way, a
// tenth of the trainer's step in that mode). A row's result is a fixed function of that row:
//
//   rms_norm(x [N, D], w [D], eps) -> (y [N, D], r [N])
//     r = 1 / sqrt(sum(x^2) / D + eps), the sum lane-wise multiply-adds over D in order then the
//     lanes' sum (a fixed tree); y = w * (x * r), rounded in that order.
//   rms_norm_backward(g, x, w, r) -> (dx [N, D], dw [D])
//   rope(x [N, H, D], cos [N, D], sin [N, D], R) -> [N, H, D]
//     out[d] = fma(x[d], cos[d], x[partner(d)] * sin[d]), the rotary half-split layout of
//     `glm4_moe.apply_rope`: channel d < R/2 pairs with d + R/2, channels d >= R are passed through
//     (their sin is 0, cos 1).
//   rope_backward(g, cos, sin, R) -> dx
//   swiglu(gate [R, I], up [R, I]) -> h [R, I]
//     h = gate / (1 + exp(-gate)) * up, exp in vector-width blocks (every element the same code);
//     gate and up may be views with any row stride (the halves of the experts' [R, 2I] product).
//   swiglu_backward(dh, gate, up) -> (dgate, dup)
//   combine(y [R, D], rows [N * K], w [N, K]) -> [N, D]
//     the experts' outputs of each token, sum over k of w[n, k] * y[rows[n * K + k]], one
//     multiply-add chain in k order (top-k order: every path of the experts, sparse or dense).
//   combine_backward(g, y, rows, w) -> (dy [R, D] (rows no pair names: 0), dw [N, K])
// Rows contiguous (else copied), but for swiglu's inputs.
#include "common.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

using rlfoundry::kernels::check_fp32;
using rlfoundry::kernels::kLanes;
using rlfoundry::kernels::lane_sum;
using rlfoundry::kernels::Vec;

// sum of x[d]^2: lane-wise multiply-adds in d order, then the lanes' sum
inline float sum_squares(const float* x, int64_t D) {
  Vec acc(0.f);
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    const Vec v = Vec::loadu(x + d);
    acc = at::vec::fmadd(v, v, acc);
  }
  if (d < D) {
    const Vec v = Vec::loadu(x + d, D - d);
    acc = at::vec::fmadd(v, v, acc);
  }
  return lane_sum(acc);
}

std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x_in, const at::Tensor& w_in, double eps) {
  check_fp32(x_in, "rms_norm", "x");
  check_fp32(w_in, "rms_norm", "w");
  TORCH_CHECK(x_in.dim() == 2 && w_in.dim() == 1 && w_in.size(0) == x_in.size(1),
              "rlfoundry_kernels::rms_norm: x [N, D] and w [D]");
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  const int64_t N = x.size(0), D = x.size(1);
  at::Tensor y = at::empty({N, D}, x.options()), r = at::empty({N}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float *yp = y.data_ptr<float>(), *rp = r.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, N, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, D)), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float* xr = xp + n * D;
      float* yr = yp + n * D;
      const float rs = 1.f / std::sqrt(sum_squares(xr, D) / static_cast<float>(D) + e);
      rp[n] = rs;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) yr[d] = wp[d] * (xr[d] * rs);
    }
  });
  return {y, r};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& g_in, const at::Tensor& x_in,
                                                     const at::Tensor& w_in, const at::Tensor& r_in) {
  for (auto [t, name] : {std::pair{&g_in, "g"}, {&x_in, "x"}, {&w_in, "w"}, {&r_in, "r"}})
    check_fp32(*t, "rms_norm_backward", name);
  TORCH_CHECK(g_in.sizes() == x_in.sizes() && x_in.dim() == 2 && w_in.numel() == x_in.size(1) &&
                  r_in.numel() == x_in.size(0),
              "rlfoundry_kernels::rms_norm_backward: g, x [N, D], w [D], r [N]");
  const at::Tensor g = g_in.contiguous(), x = x_in.contiguous(), w = w_in.contiguous(), r = r_in.contiguous();
  const int64_t N = x.size(0), D = x.size(1);
  at::Tensor dx = at::empty({N, D}, x.options());
  const float *gp = g.data_ptr<float>(), *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>(),
              *rp = r.data_ptr<float>();
  float* dxp = dx.data_ptr<float>();
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N / 64));
  std::vector<float> dw_parts(chunks * D, 0.f);  // each chunk of rows its own dw, summed after
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      float* dw = dw_parts.data() + c * D;
      for (int64_t n = N * c / chunks; n < N * (c + 1) / chunks; ++n) {
        const float *gr = gp + n * D, *xr = xp + n * D;
        const float rs = rp[n];
        float dot = 0.f;  // sum of (g w) . (x r)
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) {
          const float nd = xr[d] * rs;
          dw[d] += gr[d] * nd;
          dot += gr[d] * wp[d] * nd;
        }
        const float c_ = dot / static_cast<float>(D);
        float* dxr = dxp + n * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) dxr[d] = rs * (gr[d] * wp[d] - xr[d] * rs * c_);
      }
    }
  });
  at::Tensor dw = at::zeros({D}, x.options());
  float* dwp = dw.data_ptr<float>();
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t d = 0; d < D; ++d) dwp[d] += dw_parts[c * D + d];
  return {dx, dw.view(w_in.sizes())};
}

void check_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t R, const char* op) {
  check_fp32(x, op, "x");
  check_fp32(cos, op, "cos");
  check_fp32(sin, op, "sin");
  TORCH_CHECK(x.dim() == 3 && cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) == x.size(0) &&
                  cos.size(1) == x.size(2) && R >= 0 && R % 2 == 0 && R <= x.size(2),
              "rlfoundry_kernels::", op, ": x [N, H, D], cos and sin [N, D], R even and at most D");
}

// out = fma(a, cos, partner(a) * sin) over one head's D channels, partner swapping the two rotary
// halves; the backward is the same with the partner's sin (the fused multiply-add explicit: the
// compiler's own contraction could differ between a loop's vector body and its remainder)
template <bool kBackward>
inline void rotate(const float* a, const float* c, const float* s, int64_t R, int64_t D, float* out) {
  const int64_t h = R / 2;
  for (int64_t d = 0; d < h; ++d) out[d] = std::fma(a[d], c[d], a[d + h] * s[kBackward ? d + h : d]);
  for (int64_t d = h; d < R; ++d) out[d] = std::fma(a[d], c[d], a[d - h] * s[kBackward ? d - h : d]);
  for (int64_t d = R; d < D; ++d) out[d] = std::fma(a[d], c[d], a[d] * s[d]);
}

template <bool kBackward>
at::Tensor rope_impl(const at::Tensor& x_in, const at::Tensor& cos_in, const at::Tensor& sin_in, int64_t R) {
  const char* op = kBackward ? "rope_backward" : "rope";
  check_rope(x_in, cos_in, sin_in, R, op);
  const at::Tensor x = x_in.contiguous(), cs = cos_in.contiguous(), sn = sin_in.contiguous();
  const int64_t N = x.size(0), H = x.size(1), D = x.size(2);
  at::Tensor out = at::empty({N, H, D}, x.options());
  const float *xp = x.data_ptr<float>(), *cp = cs.data_ptr<float>(), *sp = sn.data_ptr<float>();
  float* op_ = out.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, H * D)), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t h = 0; h < H; ++h)
        rotate<kBackward>(xp + (n * H + h) * D, cp + n * D, sp + n * D, R, D, op_ + (n * H + h) * D);
  });
  return out;
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t R) {
  return rope_impl<false>(x, cos, sin, R);
}

at::Tensor rope_backward(const at::Tensor& g, const at::Tensor& cos, const at::Tensor& sin, int64_t R) {
  return rope_impl<true>(g, cos, sin, R);
}

void check_rows(const at::Tensor& t, const char* op, const char* name) {
  check_fp32(t, op, name);
  TORCH_CHECK(t.dim() == 2 && (t.stride(1) == 1 || t.size(1) <= 1), "rlfoundry_kernels::", op, ": ", name,
              " must be [R, I] with its last dim contiguous");
}

// e = exp(-x) for a block of lanes
inline Vec neg_exp(const Vec& x) { return (Vec(0.f) - x).exp(); }

at::Tensor swiglu(const at::Tensor& gate_in, const at::Tensor& up_in) {
  check_rows(gate_in, "swiglu", "gate");
  check_rows(up_in, "swiglu", "up");
  TORCH_CHECK(gate_in.sizes() == up_in.sizes(), "rlfoundry_kernels::swiglu: gate and up of one shape");
  const int64_t R = gate_in.size(0), I = gate_in.size(1), sg = gate_in.stride(0), su = up_in.stride(0);
  at::Tensor h = at::empty({R, I}, gate_in.options());
  const float *gp = gate_in.data_ptr<float>(), *up = up_in.data_ptr<float>();
  float* hp = h.data_ptr<float>();
  at::parallel_for(0, R, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, I)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t i = 0; i < I; i += kLanes) {
        const int64_t n = std::min(kLanes, I - i);
        const Vec g = Vec::loadu(gp + r * sg + i, n);
        (g / (Vec(1.f) + neg_exp(g)) * Vec::loadu(up + r * su + i, n)).store(hp + r * I + i, n);
      }
  });
  return h;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward(const at::Tensor& dh_in, const at::Tensor& gate_in,
                                                   const at::Tensor& up_in) {
  check_rows(gate_in, "swiglu_backward", "gate");
  check_rows(up_in, "swiglu_backward", "up");
  check_fp32(dh_in, "swiglu_backward", "dh");
  TORCH_CHECK(gate_in.sizes() == up_in.sizes() && dh_in.sizes() == gate_in.sizes(),
              "rlfoundry_kernels::swiglu_backward: dh, gate and up of one shape");
  const at::Tensor dh = dh_in.contiguous();
  const int64_t R = gate_in.size(0), I = gate_in.size(1), sg = gate_in.stride(0), su = up_in.stride(0);
  at::Tensor dg = at::empty({R, I}, dh.options()), du = at::empty({R, I}, dh.options());
  const float *gp = gate_in.data_ptr<float>(), *up = up_in.data_ptr<float>(), *dhp = dh.data_ptr<float>();
  float *dgp = dg.data_ptr<float>(), *dup = du.data_ptr<float>();
  at::parallel_for(0, R, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, I)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t i = 0; i < I; i += kLanes) {
        const int64_t n = std::min(kLanes, I - i);
        const Vec g = Vec::loadu(gp + r * sg + i, n), u = Vec::loadu(up + r * su + i, n);
        const Vec d = Vec::loadu(dhp + r * I + i, n);
        const Vec s = Vec(1.f) / (Vec(1.f) + neg_exp(g));  // sigmoid(g)
        (d * g * s).store(dup + r * I + i, n);             // dh * silu(g)
        (d * u * s * (Vec(1.f) + g * (Vec(1.f) - s))).store(dgp + r * I + i, n);
      }
  });
  return {dg, du};
}

void check_combine(const at::Tensor& y, const at::Tensor& rows, const at::Tensor& w, const char* op) {
  check_fp32(y, op, "y");
  check_fp32(w, op, "w");
  TORCH_CHECK(y.dim() == 2 && w.dim() == 2 && rows.dim() == 1 && rows.scalar_type() == at::kLong &&
                  rows.numel() == w.numel(),
              "rlfoundry_kernels::", op, ": y [R, D], rows [N * K] int64, w [N, K]");
}

at::Tensor combine(const at::Tensor& y_in, const at::Tensor& rows_in, const at::Tensor& w_in) {
  check_combine(y_in, rows_in, w_in, "combine");
  const at::Tensor y = y_in.contiguous(), rows = rows_in.contiguous(), w = w_in.contiguous();
  const int64_t R = y.size(0), D = y.size(1), N = w.size(0), K = w.size(1);
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t j = 0; j < N * K; ++j)
    TORCH_CHECK(rp[j] >= 0 && rp[j] < R, "rlfoundry_kernels::combine: rows[", j, "] = ", rp[j], " not a row of y");
  at::Tensor out = at::empty({N, D}, y.options());
  const float *yp = y.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, 2048 / std::max<int64_t>(1, D * K)), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t d = 0; d < D; d += kLanes) {
        const int64_t c = std::min(kLanes, D - d);
        Vec acc(0.f);
        for (int64_t k = 0; k < K; ++k)
          acc = at::vec::fmadd(Vec::loadu(yp + rp[n * K + k] * D + d, c), Vec(wp[n * K + k]), acc);
        acc.store(op + n * D + d, c);
      }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> combine_backward(const at::Tensor& g_in, const at::Tensor& y_in,
                                                    const at::Tensor& rows_in, const at::Tensor& w_in) {
  check_combine(y_in, rows_in, w_in, "combine_backward");
  check_fp32(g_in, "combine_backward", "g");
  const at::Tensor g = g_in.contiguous(), y = y_in.contiguous(), rows = rows_in.contiguous(), w = w_in.contiguous();
  const int64_t R = y.size(0), D = y.size(1), N = w.size(0), K = w.size(1);
  TORCH_CHECK(g.dim() == 2 && g.size(0) == N && g.size(1) == D, "rlfoundry_kernels::combine_backward: g [N, D]");
  at::Tensor dy = at::zeros({R, D}, y.options()), dw = at::empty({N, K}, y.options());
  const int64_t* rp = rows.data_ptr<int64_t>();
  const float *gp = g.data_ptr<float>(), *yp = y.data_ptr<float>(), *wp = w.data_ptr<float>();
  float *dyp = dy.data_ptr<float>(), *dwp = dw.data_ptr<float>();
  for (int64_t j = 0; j < N * K; ++j)
    TORCH_CHECK(rp[j] >= 0 && rp[j] < R, "rlfoundry_kernels::combine_backward: rows[", j, "] = ", rp[j],
                " not a row of y");
  // (a row of y belongs to one pair: no two pairs write the same dy row)
  at::parallel_for(0, N, std::max<int64_t>(1, 2048 / std::max<int64_t>(1, D * K)), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t k = 0; k < K; ++k) {
        const int64_t row = rp[n * K + k];
        const float wk = wp[n * K + k];
        float dot = 0.f;
        const float *gr = gp + n * D, *yr = yp + row * D;
        float* dyr = dyp + row * D;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) {
          dyr[d] = gr[d] * wk;
          dot += gr[d] * yr[d];
        }
        dwp[n * K + k] = dot;
      }
  });
  return {dy, dw};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rlfoundry_kernels, m) {
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_backward(Tensor g, Tensor x, Tensor w, Tensor r) -> (Tensor, Tensor)");
  m.def("rope(Tensor x, Tensor cos, Tensor sin, int R) -> Tensor");
  m.def("rope_backward(Tensor g, Tensor cos, Tensor sin, int R) -> Tensor");
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_backward(Tensor dh, Tensor gate, Tensor up) -> (Tensor, Tensor)");
  m.def("combine(Tensor y, Tensor rows, Tensor w) -> Tensor");
  m.def("combine_backward(Tensor g, Tensor y, Tensor rows, Tensor w) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rlfoundry_kernels, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("rms_norm_backward", &rms_norm_backward);
  m.impl("rope", &rope);
  m.impl("rope_backward", &rope_backward);
  m.impl("swiglu", &swiglu);
  m.impl("swiglu_backward", &swiglu_backward);
  m.impl("combine", &combine);
  m.impl("combine_backward", &combine_backward);
}
