// Forward elementwise pass over all channels (see normalize.h).
#include "kernels.h"

#include "channel_coefs.h"
#include "normalize.h"
#include "work_items.h"

namespace fusedbn::cpu {
namespace {

template <typename scalar_t, Activation A, bool kResidual>
void normalize_typed(const NormInputs& in, at::Tensor& output) {
  using opmath_t = at::opmath_type<scalar_t>;
  const Layout l = in.layout;
  const NormCoefs<opmath_t> k(in);
  using Norm = Normalizer<scalar_t, A, kResidual>;
  const Norm norm(in, output);
  // Interleaved rows of 16-bit values take the offset of each channel from here rather than per element.
  std::vector<opmath_t> fma_offsets;
  if (Norm::kFusedMultiplyAdd && l.inner == 1) {
    for (int64_t c = 0; c < l.channels; ++c) fma_offsets.push_back(Norm::fma_offset(k.mean[c], k.scale[c], k.shift[c]));
  }
  for_each_item(
      l,
      [&](const SpanRun& run) { norm.span_run(l, run, k.mean.data(), k.scale.data(), k.shift.data()); },
      [&](int64_t r0, int64_t r1) {
        const int64_t C = l.channels;
        const opmath_t* __restrict__ mean = k.mean.data();
        const opmath_t* __restrict__ scale = k.scale.data();
        const opmath_t* __restrict__ shift = k.shift.data();
        const opmath_t* __restrict__ offset = fma_offsets.data();
        if constexpr (Norm::kTiles) {
          if (C >= 16 && !norm.streaming) {
            for (int64_t r = r0; r < r1; ++r) norm.row_tiles(r * C, C, scale, offset);
            return;
          }
        }
        // Float rows are written directly, one at a time; 16-bit rows pass through the conversion buffer many at a
        // time (a 64-channel row is short), as do streamed rows (one fence per call). Float rows through the buffer
        // or a functor per row measured up to 20 % slower.
        if constexpr (!Norm::kFusedMultiplyAdd) {
          if (!norm.streaming) {
            norm.rows(r0, r1, C, mean, scale, shift);
            return;
          }
        }
        store_converted_blocks(
            norm.y + r0 * C, r1 - r0, C,
            [&](int64_t b) {
              const int64_t row = (r0 + b) * C;
              return [norm, row, mean, scale, shift, offset](int64_t c) {
                if constexpr (Norm::kFusedMultiplyAdd) {
                  return norm.value_fma(row + c, scale[c], offset[c]);
                } else {
                  return norm.value(row + c, mean[c], scale[c], shift[c]);
                }
              };
            },
            norm.in_blocks, norm.streaming);
      });
}

}  // namespace

void normalize(const NormInputs& in, at::Tensor& output) {
  dispatch_norm_kernel(in, [&]<typename scalar_t, Activation A, bool kResidual>() {
    normalize_typed<scalar_t, A, kResidual>(in, output);
  });
}

}  // namespace fusedbn::cpu
