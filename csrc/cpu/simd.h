// Small numeric helpers for the CPU kernels: vectorised reductions, and per-channel vectors read from
// tensors of any floating dtype.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <utility>
#include <vector>

#include "convert.h"

namespace fusedbn::cpu {

// Σ f(i) for i in [0, n), in acc_t, vectorised (`omp simd` lets the compiler reassociate the sum across
// vector lanes; the order is fixed at compile time, so results are reproducible).
template <typename acc_t, typename F>
inline acc_t simd_sum(int64_t n, const F& f) {
  acc_t total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < n; ++i) total += f(i);
  return total;
}

// (Σ f(i).first, Σ f(i).second) for i in [0, n), in acc_t, vectorised.
template <typename acc_t, typename F>
inline std::pair<acc_t, acc_t> simd_sum2(int64_t n, const F& f) {
  acc_t t1 = 0, t2 = 0;
#pragma omp simd reduction(+ : t1, t2)
  for (int64_t i = 0; i < n; ++i) {
    const auto v = f(i);
    t1 += v.first;
    t2 += v.second;
  }
  return {t1, t2};
}

// The C values of a 1-D tensor of any floating dtype as T, or C copies of `fill` if it is undefined.
template <typename T>
std::vector<T> channel_vector(const at::Tensor& t, int64_t channels, T fill) {
  std::vector<T> out(channels, fill);
  if (!t.defined()) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "fusedbn_channel_vector", [&] {
    const auto a = t.accessor<scalar_t, 1>();
    for (int64_t c = 0; c < channels; ++c) out[c] = static_cast<T>(a[c]);
  });
  return out;
}

// Writes values into a 1-D tensor of any floating dtype.
template <typename T>
void store_channel_vector(at::Tensor& t, const std::vector<T>& values) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "fusedbn_store_channel_vector", [&] {
    auto a = t.accessor<scalar_t, 1>();
    for (size_t c = 0; c < values.size(); ++c) a[c] = static_cast<scalar_t>(values[c]);
  });
}

}  // namespace fusedbn::cpu
