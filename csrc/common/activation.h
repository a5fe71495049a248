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

enum class Activation { Identity, ReLU, LeakyReLU, SiLU, ReLU6, Hardswish, GELU };

inline Activation parse_activation(const std::string& name) {
  if (name == "identity") return Activation::Identity;
  if (name == "relu") return Activation::ReLU;
  if (name == "leaky_relu") return Activation::LeakyReLU;
  if (name == "silu") return Activation::SiLU;
  if (name == "relu6") return Activation::ReLU6;
  if (name == "hardswish") return Activation::Hardswish;
  if (name == "gelu") return Activation::GELU;
  TORCH_CHECK_VALUE(false, "fusedbn: activation must be one of 'identity', 'relu', 'leaky_relu', 'silu', 'relu6', ",
                    "'hardswish', 'gelu', got '", name, "'");
}

template <typename T>
C10_HOST_DEVICE inline T erf_of(T v) {
#if defined(__CUDA_ARCH__)
  return ::erf(v);
#else
  return std::erf(v);
#endif
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
  } else if constexpr (A == Activation::ReLU6) {  // F.relu6 = hardtanh(v, 0, 6)
    return v < T(0) ? T(0) : (v > T(6) ? T(6) : v);
  } else if constexpr (A == Activation::Hardswish) {  // v·clamp(v + 3, 0, 6)/6, in torch's order
    T r = v + T(3);
    r = r < T(0) ? T(0) : (r > T(6) ? T(6) : r);
    return v * r / T(6);
  } else if constexpr (A == Activation::GELU) {  // exact (erf) GELU: v·Φ(v) = v·½·(1 + erf(v/√2))
    return v * T(0.5) * (T(1) + erf_of(v * T(0.70710678118654752440)));
  } else {
    return v;
  }
}

// Whether act and act' are a few compares, selects and arithmetic (straight-line code that vectorises anywhere),
// rather than an exp or erf.
constexpr bool is_piecewise_polynomial(Activation A) { return A != Activation::SiLU && A != Activation::GELU; }

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
  } else if constexpr (A == Activation::ReLU6) {  // 1 strictly inside (0, 6), as hardtanh's backward
    return T(v > T(0) && v < T(6));
  } else if constexpr (A == Activation::Hardswish) {  // 0 below −3, v/3 + ½ up to 3, then 1 (torch's kinks)
    return v < T(-3) ? T(0) : (v <= T(3) ? v / T(3) + T(0.5) : T(1));
  } else if constexpr (A == Activation::GELU) {  // Φ(v) + v·φ(v), φ(v) = exp(−v²/2)/√(2π)
    const T cdf = T(0.5) * (T(1) + erf_of(v * T(0.70710678118654752440)));
    return cdf + v * T(0.39894228040143267794) * exp_of(v * v * T(-0.5));
  } else {
    return T(1);
  }
}

// The activation-masked gradient every backward kernel starts from: g = dy·act'(pre), where the pre-activation
// pre = (x − mean)·scale + shift [+ z] is recomputed exactly as the forward's normalisation formed it (scale and
// shift the per-channel coefficients, z the residual where kResidual).
template <Activation A, bool kResidual, typename T>
C10_HOST_DEVICE inline T masked_grad(T dy, T xmu, T scale, T shift, T z, T negative_slope) {
  if constexpr (A == Activation::Identity) {
    return dy;
  } else {
    T pre = xmu * scale + shift;
    if constexpr (kResidual) pre += z;
    return dy * activation_grad<A>(pre, negative_slope);
  }
}

// Calls f(std::integral_constant<Activation, A>{}) for the runtime value `act`.
template <typename F>
inline auto dispatch_activation(Activation act, F&& f) {
  switch (act) {
    case Activation::ReLU: return f(std::integral_constant<Activation, Activation::ReLU>{});
    case Activation::LeakyReLU: return f(std::integral_constant<Activation, Activation::LeakyReLU>{});
    case Activation::SiLU: return f(std::integral_constant<Activation, Activation::SiLU>{});
    case Activation::ReLU6: return f(std::integral_constant<Activation, Activation::ReLU6>{});
    case Activation::Hardswish: return f(std::integral_constant<Activation, Activation::Hardswish>{});
    case Activation::GELU: return f(std::integral_constant<Activation, Activation::GELU>{});
    default: return f(std::integral_constant<Activation, Activation::Identity>{});
  }
}

}  // namespace fusedbn
