// The forward elementwise pass: y = act((x − mean)·scale + shift [+ residual]), one read of x (and residual),
// one write of y. For float32 and float64 inputs (x − mean)·scale rather than x·scale + (shift − mean·scale):
// the latter loses about 0.06 at |x| ≈ 1e4 in float32. For float16/bfloat16 inputs, whose loops are bound by
// instructions rather than memory, it is one fused multiply-add, fma(x, scale, shift − mean·scale): its error,
// about 2^-24·|mean|·scale, matters only where |mean|/σ > 2^15, and a 16-bit input stopped resolving its own
// deviations from the mean long before (|mean|/σ > 2^8 for bfloat16, 2^11 for float16).
//
// bfloat16 without a residual, with identity, ReLU or LeakyReLU, is normalised 16 values at a time in AVX2 registers
// (`tiles`); other 16-bit cases, and every output written with streaming stores, pass through
// store_converted_blocks' float buffer.
#pragma once

#include <ATen/OpMathType.h>

#include <cmath>
#include <type_traits>
#include <utility>

#include "../kernel_args.h"
#include "channel_coefs.h"
#include "streaming_stores.h"
#include "work_items.h"

namespace fusedbn::cpu {

template <typename scalar_t, Activation A, bool kResidual>
struct Normalizer {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict__ x;
  const scalar_t* __restrict__ z;
  scalar_t* __restrict__ y;
  opmath_t slope;
  bool streaming;  // y written with streaming stores (streaming_stores.h): x [, z] and y exceed the cache
  // Float and double outputs stored in blocks of vectors where y lies just above x (or z) modulo 4 KiB
  // (blocked_stores.h) and the activation is cheap enough for the pass to be bound by memory.
  bool in_blocks;

  Normalizer(const NormInputs& in, at::Tensor& output)
      : x(in.input.const_data_ptr<scalar_t>()),
        z(kResidual ? in.residual.const_data_ptr<scalar_t>() : nullptr),
        y(output.mutable_data_ptr<scalar_t>()),
        slope(static_cast<opmath_t>(in.negative_slope)),
        streaming(streams_output(in.input.numel() * static_cast<int64_t>(sizeof(scalar_t)) * (kResidual ? 3 : 2))),
        in_blocks(is_piecewise_polynomial(A) &&
                  (stores_alias_loads(x, y) || (kResidual && stores_alias_loads(z, y)))) {}

  static constexpr bool kFusedMultiplyAdd = sizeof(scalar_t) == 2;
  opmath_t value(int64_t i, opmath_t mean, opmath_t scale, opmath_t shift) const {
    if constexpr (kFusedMultiplyAdd) {
      return value_fma(i, scale, fma_offset(mean, scale, shift));
    } else {
      return finish(i, pre_activation(to_opmath(x[i]), mean, scale, shift));
    }
  }

  // The 16-bit form: pre-activation fma(x, scale, offset) with offset = fma_offset(mean, scale, shift).
  static opmath_t fma_offset(opmath_t mean, opmath_t scale, opmath_t shift) { return shift - mean * scale; }
  opmath_t value_fma(int64_t i, opmath_t scale, opmath_t offset) const {
    return finish(i, std::fma(to_opmath(x[i]), scale, offset));
  }

  // The float and double form: (x − mean)·scale + shift.
  static opmath_t pre_activation(opmath_t x, opmath_t mean, opmath_t scale, opmath_t shift) {
    return (x - mean) * scale + shift;
  }

  opmath_t finish(int64_t i, opmath_t pre) const {
    return output_of(pre, kResidual ? to_opmath(z[i]) : opmath_t(0), slope);
  }

  static opmath_t output_of(opmath_t pre, opmath_t residual, opmath_t slope) {
    if constexpr (kResidual) pre += residual;
    return activate<A>(pre, slope);
  }

#if defined(__AVX2__)
  static constexpr bool kTiles = std::is_same_v<scalar_t, c10::BFloat16> && !kResidual &&
                                 (A == Activation::Identity || A == Activation::ReLU || A == Activation::LeakyReLU);

  // activate<A> on 8 values: max(0, v) returns v where v is NaN or −0, as v < 0 ? 0 : v does.
  __m256 activate8(__m256 v) const {
    if constexpr (A == Activation::ReLU) {
      return _mm256_max_ps(_mm256_setzero_ps(), v);
    } else if constexpr (A == Activation::LeakyReLU) {
      const __m256 negative = _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_LT_OQ);
      return _mm256_blendv_ps(v, _mm256_mul_ps(v, _mm256_set1_ps(slope)), negative);
    } else {
      return v;
    }
  }

  // y[begin + j] = act(fma(x[begin + j], scale, offset)) for j in [0, len): 16 values per step in registers, where
  // the float buffer costs two more stores and loads per value; the last len % 16 values one by one. coefs(j)
  // returns the (scale, offset) vectors of values j to j + 7. Bitwise value_fma's results.
  template <typename Coefs, typename ScalarCoefs>
  void tiles(int64_t begin, int64_t len, const Coefs& coefs, const ScalarCoefs& scalar_coefs) const {
    int64_t j = 0;
    for (; j + 16 <= len; j += 16) {
      __m256 lo, hi;
      load_bf16x16(x + begin + j, lo, hi);
      const auto [scale0, offset0] = coefs(j);
      const auto [scale1, offset1] = coefs(j + 8);
      store_bf16x16(y + begin + j, activate8(_mm256_fmadd_ps(lo, scale0, offset0)),
                    activate8(_mm256_fmadd_ps(hi, scale1, offset1)));
    }
    for (; j < len; ++j) {
      const auto [scale, offset] = scalar_coefs(j);
      y[begin + j] = from_opmath<scalar_t>(value_fma(begin + j, scale, offset));
    }
  }

  // A span of one channel's values.
  void span_tiles(int64_t begin, int64_t len, opmath_t scale, opmath_t offset) const {
    const __m256 s = _mm256_set1_ps(scale), o = _mm256_set1_ps(offset);
    tiles(begin, len, [s, o](int64_t) { return std::pair(s, o); }, [=](int64_t) { return std::pair(scale, offset); });
  }

  // An interleaved row of C channels, with per-channel coefficients.
  void row_tiles(int64_t begin, int64_t C, const opmath_t* scale, const opmath_t* offset) const {
    tiles(
        begin, C, [=](int64_t c) { return std::pair(_mm256_loadu_ps(scale + c), _mm256_loadu_ps(offset + c)); },
        [=](int64_t c) { return std::pair(scale[c], offset[c]); });
  }
#else
  static constexpr bool kTiles = false;
#endif

  // Interleaved rows [r0, r1) of C channels of a float or double input, with per-channel coefficients, written
  // directly. The formula reads x (and z) through pointers local to the loop: capturing the whole Normalizer
  // measured up to 13 % slower with x coming from memory (HISTORY.md, session 19).
  void rows(int64_t r0, int64_t r1, int64_t C, const opmath_t* __restrict__ mean, const opmath_t* __restrict__ scale,
            const opmath_t* __restrict__ shift) const {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* __restrict__ xr = x + r * C;
      const scalar_t* __restrict__ zr = kResidual ? z + r * C : nullptr;
      const auto output = [xr, zr, s = slope, mean, scale, shift](int64_t c) {
        return output_of(pre_activation(to_opmath(xr[c]), mean[c], scale[c], shift[c]),
                         kResidual ? to_opmath(zr[c]) : opmath_t(0), s);
      };
      store_elements(y + r * C, C, output, in_blocks);
    }
  }

  // The output of element begin + j as a function of j, for one channel's coefficients.
  auto channel_fn(int64_t begin, opmath_t mean, opmath_t scale, opmath_t shift) const {
    return [*this, begin, mean, scale, shift](int64_t j) { return value(begin + j, mean, scale, shift); };
  }

  // The spans of one planar work item, all of channel it.channel (C·inner elements apart), for the channel-at-a-time
  // forward, which reads x from L1 or L2. Stored by the plain loop: in blocks of vectors, its training forward of
  // (1, 64, 112, 112) float32 took 7-10 % longer (bench_cpu's shuffled rounds, both variants in one process).
  void span_item(const Layout& l, const SpanItem& it, opmath_t mean, opmath_t scale, opmath_t shift) const {
    const int64_t len = it.inner_end - it.inner_begin;
    for (int64_t o = it.outer_begin; o < it.outer_end; ++o) {
      const int64_t begin = span_offset(l, o, it.channel, it.inner_begin);
      if constexpr (kTiles) {
        if (len >= 16 && !streaming) {
          span_tiles(begin, len, scale, fma_offset(mean, scale, shift));
          continue;
        }
      }
      store_converted_blocks(
          y + begin, 1, len, [&](int64_t) { return channel_fn(begin, mean, scale, shift); }, false, streaming);
    }
  }

  // The contiguous spans of a run of channels, with per-channel coefficients.
  void span_run(const Layout& l, const SpanRun& run, const opmath_t* mean, const opmath_t* scale,
                const opmath_t* shift) const {
    const int64_t len = run.inner_end - run.inner_begin;
    const int64_t begin = span_offset(l, run.outer, run.channel_begin, run.inner_begin);
    if constexpr (kTiles) {
      if (len >= 16 && !streaming) {
        for (int64_t c = run.channel_begin; c < run.channel_end; ++c) {
          span_tiles(begin + (c - run.channel_begin) * len, len, scale[c], fma_offset(mean[c], scale[c], shift[c]));
        }
        return;
      }
    }
    store_converted_blocks(
        y + begin, run.channel_end - run.channel_begin, len,
        [&](int64_t b) {
          const int64_t c = run.channel_begin + b;
          return channel_fn(begin + b * len, mean[c], scale[c], shift[c]);
        },
        in_blocks, streaming);
  }
};

}  // namespace fusedbn::cpu
