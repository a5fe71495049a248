// The activations fused after batch norm, as compile-time tags, shared by the CPU and CUDA kernels.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <bit>
#include <string>
#include <type_traits>

namespace fusedbn {

enum class Activation { Identity, ReLU, LeakyReLU, SiLU };

inline Activation parse_activation(const std::string& name) {
  if (name == "identity") return Activation::Identity;
  if (name == "relu") return Activation::ReLU;
  if (name == "leaky_relu") return Activation::LeakyReLU;
  if (name == "silu") return Activation::SiLU;
  TORCH_CHECK_VALUE(false, "fusedbn: activation must be one of 'identity', 'relu', 'leaky_relu', 'silu', got '",
                    name, "'");
}

// exp for the activations. float on the host: a branch-free Cody–Waite reduction and a degree-6 polynomial
// (Cephes expf, ≤ 2 ulp), which vectorises inside `omp simd` loops where std::exp stays scalar (with
// -fno-trapping-math, see setup.py).
template <typename T>
C10_HOST_DEVICE inline T exp_of(T v) {
#if defined(__CUDA_ARCH__)
  return ::exp(v);
#else
  if constexpr (std::is_same_v<T, float>) {
    v = v < -87.3f ? -87.3f : v;
    v = v > 88.7f ? 88.7f : v;
    const float n = std::floor(v * 1.44269504088896341f + 0.5f);  // v = n·ln2 + r, |r| ≤ ln2/2
    float r = v - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
    return p * std::bit_cast<float>(bits);
  } else {
    return std::exp(v);
  }
#endif
}

template <Activation A, typename T>
C10_HOST_DEVICE inline T activate(T v, T negative_slope) {
  // Written so that NaN passes through, as in torch.relu and F.leaky_relu (a comparison with NaN is false); each
  // is one compare and one select (or max), which vectorise.
  if constexpr (A == Activation::ReLU) {
    return v < T(0) ? T(0) : v;
  } else if constexpr (A == Activation::LeakyReLU) {
    return v < T(0) ? v * negative_slope : v;
  } else if constexpr (A == Activation::SiLU) {
    return v / (T(1) + exp_of(-v));
  } else {
    return v;
  }
}

// d act(v) / dv, evaluated at the pre-activation v (recomputed in backward, never stored).
// ReLU and LeakyReLU take the derivative at 0 from the left, as torch does.
template <Activation A, typename T>
C10_HOST_DEVICE inline T activation_grad(T v, T negative_slope) {
  if constexpr (A == Activation::ReLU) {
    return T(v > T(0));
  } else if constexpr (A == Activation::LeakyReLU) {
    return negative_slope + (T(1) - negative_slope) * T(v > T(0));
  } else if constexpr (A == Activation::SiLU) {
    const T s = T(1) / (T(1) + exp_of(-v));  // silu'(v) = σ(v)·(1 + v·(1 − σ(v)))
    return s * (T(1) + v * (T(1) - s));
  } else {
    return T(1);
  }
}

// Calls f(std::integral_constant<Activation, A>{}) for the runtime value `act`.
template <typename F>
inline auto dispatch_activation(Activation act, F&& f) {
  switch (act) {
    case Activation::ReLU: return f(std::integral_constant<Activation, Activation::ReLU>{});
    case Activation::LeakyReLU: return f(std::integral_constant<Activation, Activation::LeakyReLU>{});
    case Activation::SiLU: return f(std::integral_constant<Activation, Activation::SiLU>{});
    default: return f(std::integral_constant<Activation, Activation::Identity>{});
  }
}

}  // namespace fusedbn
