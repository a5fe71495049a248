// Conversions between the storage type and the math type (float for Half and BFloat16) that gcc vectorises.
// c10's own Half/BFloat16 conversions stop the elementwise loops from vectorising (a NaN branch, scalar
// F16C calls), which made the 16-bit kernels compute-bound. Results are bitwise those of c10's conversions
// (round to nearest even; checked for every float input).
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "blocked_stores.h"
#include "streaming_stores.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace fusedbn::cpu {
namespace detail {

inline uint32_t bits_of(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof b);
  return b;
}

inline float float_of(uint32_t b) {
  float v;
  std::memcpy(&v, &b, sizeof v);
  return v;
}

}  // namespace detail

inline float to_opmath(float v) { return v; }
inline double to_opmath(double v) { return v; }
inline float to_opmath(c10::BFloat16 v) { return detail::float_of(static_cast<uint32_t>(v.x) << 16); }

// Half → float without branches (M. Maratos, FP16 library): normal numbers by rescaling the shifted bits,
// subnormals through the float 0.5 magic.
inline float to_opmath(c10::Half v) {
  using detail::bits_of, detail::float_of;
  const uint32_t w = static_cast<uint32_t>(v.x) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normal = float_of((two_w >> 4) + (0xE0u << 23)) * float_of(0x07800000u);  // × 2^-112
  const float subnormal = float_of((two_w >> 17) | (126u << 23)) - 0.5f;
  return float_of(sign | (two_w < (1u << 27) ? bits_of(subnormal) : bits_of(normal)));
}

template <typename scalar_t>
inline scalar_t from_opmath(at::opmath_type<scalar_t> v) {
  return v;
}

// float → bfloat16, round to nearest even; NaN → the canonical quiet NaN.
template <>
inline c10::BFloat16 from_opmath<c10::BFloat16>(float v) {
  const uint32_t bits = detail::bits_of(v);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(v != v ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}

// float → half, round to nearest even, without branches (F. Giesen, float_to_half_fast3_rtne): overflow to
// Inf (NaN stays NaN), subnormals through a float add that rounds at the right bit, normals by rebiasing.
template <>
inline c10::Half from_opmath<c10::Half>(float v) {
  using detail::bits_of, detail::float_of;
  const uint32_t bits = bits_of(v);
  const uint32_t sign = bits & 0x80000000u;
  const uint32_t a = bits ^ sign;
  constexpr uint32_t kSubnormalMagic = ((127 - 15) + (23 - 10) + 1) << 23;
  const uint32_t subnormal = bits_of(float_of(a) + float_of(kSubnormalMagic)) - kSubnormalMagic;
  const uint32_t normal = (a + ((15u - 127u) << 23) + 0xFFFu + ((a >> 13) & 1u)) >> 13;
  const uint32_t overflow = a > (255u << 23) ? 0x7E00u : 0x7C00u;
  const uint32_t h = a >= (143u << 23) ? overflow : (a < (113u << 23) ? subnormal : normal);
  return c10::Half(static_cast<uint16_t>(h | (sign >> 16)), c10::Half::from_bits());
}

#if defined(__AVX2__)
// 16 bfloat16 values as two float vectors (values 0-7, 8-15): each is its 16 bits shifted into the high half.
inline void load_bf16x16(const c10::BFloat16* src, __m256& lo, __m256& hi) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  lo = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(v)), 16));
  hi = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(v, 1)), 16));
}

// Two float vectors stored as 16 bfloat16 values, bitwise from_opmath<BFloat16>, in fewer instructions than gcc's
// vectorisation of it (which masks each value to 16 bits and builds the NaN mask with a second pack): round to
// nearest even, NaN → 0x7FC0, then packus_epi32, which packs within 128-bit lanes, and a permutation of the 64-bit
// quarters back into order.
inline void store_bf16x16(c10::BFloat16* dst, __m256 lo, __m256 hi) {
  const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7FFF), nan = _mm256_set1_epi32(0x7FC0);
  const auto round = [&](__m256 v) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), one);
    const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, bias), lsb), 16);
    return _mm256_blendv_epi8(rounded, nan, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  };
  const __m256i packed = _mm256_packus_epi32(round(lo), round(hi));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_permute4x64_epi64(packed, 0xD8));
}
#endif

// dst[j] = from_opmath<scalar_t>(src[j]) for j in [0, n).
template <typename scalar_t>
inline void convert_from_opmath(const at::opmath_type<scalar_t>* __restrict__ src, scalar_t* __restrict__ dst,
                                int64_t n) {
  int64_t j = 0;
#if defined(__AVX2__)
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    for (; j + 16 <= n; j += 16) store_bf16x16(dst + j, _mm256_loadu_ps(src + j), _mm256_loadu_ps(src + j + 8));
  }
#endif
#pragma omp simd
  for (int64_t i = j; i < n; ++i) dst[i] = from_opmath<scalar_t>(src[i]);
}

// y[b·len + j] = from_opmath<scalar_t>(block_fn(b)(j)) for b in [0, blocks) and j in [0, len), vectorised over j;
// block_fn(b) returns block b's functor, its coefficients captured as values. For 16-bit outputs the float values
// pass through a small buffer in L1, filled from as many blocks as fit and converted in one loop: converting in
// the loop that computes them let gcc move the ReLU's select past the conversion (nearly twice the instructions
// per element), and converting block by block cost a loop prologue and epilogue per short block (49-value
// spans, 64-channel rows). With `streaming`, every output passes through the buffer and is written to y with
// streaming stores (streaming_stores.h). Float and double outputs without streaming are stored directly, in blocks of
// vectors where in_blocks (blocked_stores.h).
template <typename scalar_t, typename F>
inline void store_converted_blocks(scalar_t* __restrict__ y, int64_t blocks, int64_t len, const F& block_fn,
                                   bool in_blocks, bool streaming) {
  using opmath_t = at::opmath_type<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    if (!streaming) {
      for (int64_t b = 0; b < blocks; ++b) store_elements(y + b * len, len, block_fn(b), in_blocks);
      return;
    }
  }
  constexpr int64_t kChunk = 512;
  opmath_t buf[kChunk];
  int64_t filled = 0;
  const auto flush = [&] {
    if (!streaming) {
      convert_from_opmath(buf, y, filled);
    } else if constexpr (std::is_same_v<scalar_t, opmath_t>) {
      stream_copy(buf, y, filled);
    } else {
      scalar_t converted[kChunk];
      convert_from_opmath(buf, converted, filled);
      stream_copy(converted, y, filled);
    }
    y += filled;
    filled = 0;
  };
  for (int64_t b = 0; b < blocks; ++b) {
    const auto f = block_fn(b);
    for (int64_t j0 = 0; j0 < len;) {
      const int64_t m = std::min(kChunk - filled, len - j0);
      opmath_t* __restrict__ dst = buf + filled;
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) dst[j] = f(j0 + j);
      filled += m;
      j0 += m;
      if (filled == kChunk) flush();
    }
  }
  flush();
  if (streaming) streaming_fence();
}

}  // namespace fusedbn::cpu
