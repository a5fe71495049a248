// The activations fused after batch norm, as compile-time tags, shared by the CPU and CUDA kernels.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cmath>
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

template <Activation A, typename T>
C10_HOST_DEVICE inline T activate(T v, T negative_slope) {
  if constexpr (A == Activation::ReLU) {
    return v > T(0) ? v : T(0);
  } else if constexpr (A == Activation::LeakyReLU) {
    return v > T(0) ? v : v * negative_slope;
  } else if constexpr (A == Activation::SiLU) {
    return v / (T(1) + std::exp(-v));
  } else {
    return v;
  }
}

// d act(v) / dv, evaluated at the pre-activation v (recomputed in backward, never stored).
// ReLU and LeakyReLU take the derivative at 0 from the left, as torch does.
template <Activation A, typename T>
C10_HOST_DEVICE inline T activation_grad(T v, T negative_slope) {
  if constexpr (A == Activation::ReLU) {
    return v > T(0) ? T(1) : T(0);
  } else if constexpr (A == Activation::LeakyReLU) {
    return v > T(0) ? T(1) : negative_slope;
  } else if constexpr (A == Activation::SiLU) {
    const T s = T(1) / (T(1) + std::exp(-v));  // silu'(v) = σ(v)·(1 + v·(1 − σ(v)))
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
