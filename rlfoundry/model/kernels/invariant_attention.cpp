// Batch-invariant attention in fp32 on CPU, forward and backward: softmax(q k^T * scale) v where
// query t of row b sees a prefix of its sequence's keys, key places 0..pos[b, t], and its result
// is a fixed function of the query and those keys alone — the same bits whatever else is in the
// batch, however many keys the row holds past them, whichever thread computes it — so that an
// engine decoding one token against its KV cache and a trainer computing whole sequences agree
// bit for bit (the model's batch-invariant mode, `glm4_moe.invariant_attention`).
//
// Per query: the scores s_j = (q * scale) . k_j, each a fixed tree (lane-wise multiply-adds over
// the head dim, then the lanes' sum); their maximum m; e_j = exp(s_j - m), in blocks of the vector
// width (so every key takes the same code, whatever its place in the block); l = the sum of the
// e_j in key order; out = (sum of e_j v_j, one multiply-add chain a channel in key order) / l.
// Keys a query does not see are never read.
//
// Why a kernel of our own: the same function from matrix products (scores over every key, the
// hidden ones masked to exp(-inf) = 0, then [V | 1]'s product) computed and stored every key of
// every query, unpacked the trainer's packed rows into sequences first, and its backward went
// through autograd's dozen ops: the trainer's attention cost 3x its flash-attention time.
//
//   invariant_attention(q [B, H, T, D], k [B, G, S, D], v [B, G, S, Dv >= D], pos [B, T] int64,
//                       seq [B, T] int64 | empty, keys [Q, L] int64 | empty, scale)
//       -> (out [B, H, T, D], stats [B, H, T, 2])
//     Query head h reads key/value head h / (H / G); pos[b, t] < 0: a padding query (out 0).
//     keys given (the trainer's rows that pack a shared prompt and its responses): query (b, t)
//     belongs to sequence seq[b, t], whose key place j is k[b, :, keys[seq, j]]; else place j is
//     k[b, :, j] (a KV cache's slot, a causal sequence). stats: each query's (m, l).
//   invariant_attention_backward(dout, q, k, v, out, stats, pos, seq, keys, scale) -> (dq, dk, dv)
//     The gradients, dq [B, H, T, D], dk [B, G, S, D], dv shaped as v (zero past D). Not
//     batch-invariant (nothing needs it to be); the rows of one b run in order on one thread.
// q, k, v: any strides with the head dim contiguous (else copied).
#include "common.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace {

using rlfoundry::kernels::check_fp32;
using rlfoundry::kernels::kLanes;
using rlfoundry::kernels::lane_sum;
using rlfoundry::kernels::Vec;

// The head dim: NC vectors (D = NC * kLanes) known at compile time, or NC = 0: D at run time.
template <int NC>
struct Head {
  int64_t D;
  static constexpr bool fixed = NC > 0;
  int64_t dim() const { return fixed ? NC * kLanes : D; }
};

// sum_d a[d] * b[d]: lane-wise multiply-adds in d order, then the lanes' sum (a fixed tree)
template <int NC>
inline float dot(const float* a, const float* b, Head<NC> h) {
  Vec acc(0.f);
  if constexpr (NC > 0) {
    for (int c = 0; c < NC; ++c) acc = at::vec::fmadd(Vec::loadu(a + c * kLanes), Vec::loadu(b + c * kLanes), acc);
  } else {
    int64_t d = 0;
    for (; d + kLanes <= h.D; d += kLanes) acc = at::vec::fmadd(Vec::loadu(a + d), Vec::loadu(b + d), acc);
    if (d < h.D) acc = at::vec::fmadd(Vec::loadu(a + d, h.D - d), Vec::loadu(b + d, h.D - d), acc);
  }
  return lane_sum(acc);
}

// y[d] = fma(w, x[d], y[d]): one multiply-add a channel
template <int NC>
inline void axpy(float w, const float* x, float* y, Head<NC> h) {
  const Vec wv(w);
  if constexpr (NC > 0) {
    for (int c = 0; c < NC; ++c)
      at::vec::fmadd(wv, Vec::loadu(x + c * kLanes), Vec::loadu(y + c * kLanes)).store(y + c * kLanes);
  } else {
    int64_t d = 0;
    for (; d + kLanes <= h.D; d += kLanes) at::vec::fmadd(wv, Vec::loadu(x + d), Vec::loadu(y + d)).store(y + d);
    if (d < h.D) {
      const int64_t n = h.D - d;
      at::vec::fmadd(wv, Vec::loadu(x + d, n), Vec::loadu(y + d, n)).store(y + d, n);
    }
  }
}

struct Args {
  const float *q, *k, *v;
  int64_t qB, qH, qT, kB, kG, kS, vB, vG, vS;
  const int64_t *pos, *seq, *keys;  // seq, keys null: key place j is slot j
  int64_t pB, pT, sB, sT, keysQ, keysL;
  int64_t H, G, T, L;  // L: the most keys a query may see (the scratch's length)
  float scale;
};

struct Query {  // one query row's view of its inputs
  const float *q, *k, *v;
  const int64_t* keys;  // null: place j is slot j
  int64_t n;            // the keys it sees
  int64_t kS, keysL;
  const float* key(int64_t j) const { return k + (keys ? keys[j * keysL] : j) * kS; }
  const float* value(int64_t j, int64_t vS) const { return v + (keys ? keys[j * keysL] : j) * vS; }
};

inline Query query(const Args& a, int64_t b, int64_t h, int64_t t) {
  const int64_t g = h / (a.H / a.G);
  Query r{a.q + b * a.qB + h * a.qH + t * a.qT, a.k + b * a.kB + g * a.kG, a.v + b * a.vB + g * a.vG, nullptr,
          a.pos[b * a.pB + t * a.pT] + 1, a.kS, a.keysL};
  if (a.keys) r.keys = a.keys + a.seq[b * a.sB + t * a.sT] * a.keysQ;
  return r;
}

// The query's softmax weights before normalising, e_j = exp(s_j - m), into e[0..n) (e holds n
// rounded up to the vector width); returns m. qs: the query times scale.
template <int NC>
inline float weights(const Query& r, const float* qs, float* e, Head<NC> h) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < r.n; ++j) {
    e[j] = dot(qs, r.key(j), h);
    m = std::max(m, e[j]);
  }
  for (int64_t j = r.n; j < (r.n + kLanes - 1) / kLanes * kLanes; ++j) e[j] = m;  // (lanes past n: exp(0))
  const Vec mv(m);
  for (int64_t j = 0; j < r.n; j += kLanes) (Vec::loadu(e + j) - mv).exp().store(e + j);
  return m;
}

template <int NC>
inline void scaled(const float* q, float scale, float* qs, Head<NC> h) {
  const int64_t D = h.dim();
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) (Vec::loadu(q + d) * Vec(scale)).store(qs + d);
  if (d < D) (Vec::loadu(q + d, D - d) * Vec(scale)).store(qs + d, D - d);
}

template <int NC>
void forward_rows(const Args& a, int64_t begin, int64_t end, float* out, float* stats, Head<NC> h) {
  const int64_t D = h.dim();
  std::vector<float> e((a.L + kLanes - 1) / kLanes * kLanes + kLanes), qs(D), acc(D);
  for (int64_t i = begin; i < end; ++i) {  // i = (b * H + h) * T + t
    const int64_t t = i % a.T, bh = i / a.T, b = bh / a.H, hh = bh % a.H;
    float* o = out + i * D;
    const Query r = query(a, b, hh, t);
    if (r.n <= 0) {
      std::fill(o, o + D, 0.f);
      stats[2 * i] = 0.f;
      stats[2 * i + 1] = 1.f;
      continue;
    }
    scaled(r.q, a.scale, qs.data(), h);
    const float m = weights(r, qs.data(), e.data(), h);
    float l = 0.f;
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t j = 0; j < r.n; ++j) {
      l += e[j];
      axpy(e[j], r.value(j, a.vS), acc.data(), h);
    }
    for (int64_t d = 0; d < D; ++d) o[d] = acc[d] / l;
    stats[2 * i] = m;
    stats[2 * i + 1] = l;
  }
}

// The rows of batch entry b, in order: dq of each, dk and dv accumulated over them.
template <int NC>
void backward_b(const Args& a, int64_t b, const float* dout, const float* out, const float* stats, float* dq,
                float* dk, float* dv, int64_t dkS, int64_t dvS, int64_t dkG, int64_t dvG, Head<NC> h) {
  const int64_t D = h.dim();
  std::vector<float> e((a.L + kLanes - 1) / kLanes * kLanes + kLanes), qs(D);
  for (int64_t hh = 0; hh < a.H; ++hh) {
    const int64_t g = hh / (a.H / a.G);
    float* dkg = dk + (b * a.G + g) * dkG;
    float* dvg = dv + (b * a.G + g) * dvG;
    for (int64_t t = 0; t < a.T; ++t) {
      const int64_t i = (b * a.H + hh) * a.T + t;
      const Query r = query(a, b, hh, t);
      if (r.n <= 0) continue;
      scaled(r.q, a.scale, qs.data(), h);
      weights(r, qs.data(), e.data(), h);  // (the forward's m, recomputed the same way)
      const float inv_l = 1.f / stats[2 * i + 1];
      const float* go = dout + i * D;
      const float drow = dot(go, out + i * D, h);
      float* gq = dq + i * D;
      for (int64_t j = 0; j < r.n; ++j) {
        const int64_t slot = r.keys ? r.keys[j * r.keysL] : j;
        const float p = e[j] * inv_l;
        const float* vj = r.value(j, a.vS);
        const float ds = p * (dot(go, vj, h) - drow);
        axpy(p, go, dvg + slot * dvS, h);
        axpy(ds, r.key(j), gq, h);
        axpy(ds, qs.data(), dkg + slot * dkS, h);
      }
      for (int64_t d = 0; d < D; ++d) gq[d] *= a.scale;
    }
  }
}

at::Tensor dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 || t.size(-1) <= 1 ? t : t.contiguous(); }

struct Prepared {
  at::Tensor q, k, v, pos, seq, keys;
  Args a;
  int64_t B, D;
};

Prepared prepare(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& pos_in,
                 const at::Tensor& seq_in, const at::Tensor& keys_in, double scale) {
  check_fp32(q_in, "invariant_attention", "q");
  check_fp32(k_in, "invariant_attention", "k");
  check_fp32(v_in, "invariant_attention", "v");
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4 && pos_in.dim() == 2,
              "rlfoundry_kernels::invariant_attention: q [B, H, T, D], k, v [B, G, S, D], pos [B, T]");
  const int64_t B = q_in.size(0), H = q_in.size(1), T = q_in.size(2), D = q_in.size(3);
  const int64_t G = k_in.size(1), S = k_in.size(2);
  TORCH_CHECK(G > 0 && H % G == 0 && k_in.size(0) == B && v_in.size(0) == B && v_in.size(1) == G &&
                  v_in.size(2) == S && k_in.size(3) == D && v_in.size(3) >= D && pos_in.size(0) == B &&
                  pos_in.size(1) == T,
              "rlfoundry_kernels::invariant_attention: mismatched shapes");
  const bool packed = keys_in.numel() > 0;
  TORCH_CHECK(pos_in.scalar_type() == at::kLong && (!packed || (seq_in.scalar_type() == at::kLong &&
                                                                 keys_in.scalar_type() == at::kLong)),
              "rlfoundry_kernels::invariant_attention: pos, seq and keys must be int64");
  TORCH_CHECK(!packed || (keys_in.dim() == 2 && seq_in.dim() == 2 && seq_in.size(0) == B && seq_in.size(1) == T),
              "rlfoundry_kernels::invariant_attention: seq [B, T] and keys [Q, L] (or both empty)");
  Prepared p{dim_contiguous(q_in), dim_contiguous(k_in), dim_contiguous(v_in), pos_in.contiguous(),
             packed ? seq_in.contiguous() : seq_in, packed ? keys_in.contiguous() : keys_in, {}, B, D};
  const int64_t L = packed ? p.keys.size(1) : S;
  // every key place a query may see must exist: pos < L, seq < Q, keys < S (checked here once,
  // so that the loops read no memory they should not)
  const int64_t* pp = p.pos.data_ptr<int64_t>();
  for (int64_t n = 0; n < B * T; ++n)
    TORCH_CHECK(pp[n] < L, "rlfoundry_kernels::invariant_attention: pos[", n / T, ", ", n % T, "] = ", pp[n],
                " past the ", L, " key places");
  if (packed) {
    const int64_t* sp = p.seq.data_ptr<int64_t>();
    for (int64_t n = 0; n < B * T; ++n)
      TORCH_CHECK(pp[n] < 0 || (sp[n] >= 0 && sp[n] < p.keys.size(0)),
                  "rlfoundry_kernels::invariant_attention: seq[", n / T, ", ", n % T, "] = ", sp[n], " out of range");
    const int64_t* kp = p.keys.data_ptr<int64_t>();
    for (int64_t n = 0; n < p.keys.numel(); ++n)
      TORCH_CHECK(kp[n] >= 0 && kp[n] < S, "rlfoundry_kernels::invariant_attention: keys holds ", kp[n],
                  ", not a key slot (0 to ", S - 1, ")");
  }
  p.a = Args{p.q.data_ptr<float>(), p.k.data_ptr<float>(), p.v.data_ptr<float>(),
             p.q.stride(0), p.q.stride(1), p.q.stride(2), p.k.stride(0), p.k.stride(1), p.k.stride(2),
             p.v.stride(0), p.v.stride(1), p.v.stride(2),
             pp, packed ? p.seq.data_ptr<int64_t>() : nullptr, packed ? p.keys.data_ptr<int64_t>() : nullptr,
             p.pos.stride(0), p.pos.stride(1), packed ? p.seq.stride(0) : 0, packed ? p.seq.stride(1) : 0,
             packed ? p.keys.stride(0) : 0, packed ? p.keys.stride(1) : 0, H, G, T, L, static_cast<float>(scale)};
  return p;
}

template <typename F>
void by_head_dim(int64_t D, F&& f) {
  switch (D / kLanes * (D % kLanes == 0)) {
    case 1: f(Head<1>{D}); break;
    case 2: f(Head<2>{D}); break;
    case 4: f(Head<4>{D}); break;
    case 8: f(Head<8>{D}); break;
    default: f(Head<0>{D});
  }
}

std::tuple<at::Tensor, at::Tensor> invariant_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                       const at::Tensor& pos, const at::Tensor& seq,
                                                       const at::Tensor& keys, double scale) {
  Prepared p = prepare(q, k, v, pos, seq, keys, scale);
  const int64_t H = p.a.H, T = p.a.T;
  at::Tensor out = at::empty({p.B, H, T, p.D}, p.q.options());
  at::Tensor stats = at::empty({p.B, H, T, 2}, p.q.options());
  const int64_t rows = p.B * H * T;
  if (rows == 0) return {out, stats};
  float *op = out.data_ptr<float>(), *sp = stats.data_ptr<float>();
  by_head_dim(p.D, [&](auto h) {
    const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, p.a.L * p.D));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) { forward_rows(p.a, begin, end, op, sp, h); });
  });
  return {out, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> invariant_attention_backward(
    const at::Tensor& dout_in, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out_in,
    const at::Tensor& stats_in, const at::Tensor& pos, const at::Tensor& seq, const at::Tensor& keys, double scale) {
  Prepared p = prepare(q, k, v, pos, seq, keys, scale);
  check_fp32(dout_in, "invariant_attention_backward", "dout");
  check_fp32(out_in, "invariant_attention_backward", "out");
  check_fp32(stats_in, "invariant_attention_backward", "stats");
  const int64_t H = p.a.H, T = p.a.T, G = p.a.G, S = p.k.size(2);
  TORCH_CHECK(dout_in.sizes() == out_in.sizes() && out_in.sizes() == p.q.sizes() && stats_in.dim() == 4 &&
                  stats_in.size(3) == 2 && stats_in.numel() == p.B * H * T * 2,
              "rlfoundry_kernels::invariant_attention_backward: dout and out shaped as q, stats [B, H, T, 2]");
  const at::Tensor dout = dout_in.contiguous(), out = out_in.contiguous(), stats = stats_in.contiguous();
  at::Tensor dq = at::zeros({p.B, H, T, p.D}, p.q.options());
  at::Tensor dk = at::zeros({p.B, G, S, p.D}, p.q.options());
  at::Tensor dv = at::zeros(p.v.sizes(), p.q.options());
  if (p.B * H * T == 0) return {dq, dk, dv};
  const float *gp = dout.data_ptr<float>(), *op = out.data_ptr<float>(), *sp = stats.data_ptr<float>();
  float *dqp = dq.data_ptr<float>(), *dkp = dk.data_ptr<float>(), *dvp = dv.data_ptr<float>();
  const int64_t Dv = p.v.size(3);
  by_head_dim(p.D, [&](auto h) {
    at::parallel_for(0, p.B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        backward_b(p.a, b, gp, op, sp, dqp, dkp, dvp, p.D, Dv, S * p.D, S * Dv, h);
    });
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rlfoundry_kernels, m) {
  m.def("invariant_attention(Tensor q, Tensor k, Tensor v, Tensor pos, Tensor seq, Tensor keys, float scale) -> "
        "(Tensor, Tensor)");
  m.def("invariant_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor stats, "
        "Tensor pos, Tensor seq, Tensor keys, float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rlfoundry_kernels, CPU, m) {
  m.impl("invariant_attention", &invariant_attention);
  m.impl("invariant_attention_backward", &invariant_attention_backward);
}
