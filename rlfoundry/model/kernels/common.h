// What the kernels written with ATen's vector type share: the instruction set they are built
// for, the vector of floats and its lane count, the lanes' sum, and the check of their tensor
// arguments. Included first by each such source (before any ATen header, so that at::vec
// compiles for the CPU's widest vectors: AVX-512 where -march=native has it, else AVX2).
#pragma once

#ifdef __AVX512F__
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__)
#define CPU_CAPABILITY_AVX2
#endif
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>

namespace rlfoundry::kernels {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();

// The lanes' sum by a fixed tree of vector adds (lanes i + i + kLanes/2, then the halves' halves,
// ...): the same bits for the same lanes, wherever it is called.
inline float lane_sum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return a + b; }, v);
}

// `t` must be an fp32 CPU tensor: the error names the op and the argument.
inline void check_fp32(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, "rlfoundry_kernels::", op, ": ", name,
              " must be an fp32 CPU tensor");
}

}  // namespace rlfoundry::kernels
