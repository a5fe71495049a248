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
  const Normalizer<scalar_t, A, kResidual> norm(in, output);
  for_each_item(
      l,
      [&](const SpanItem& it) {
        norm.span_item(l, it, k.mean[it.channel], k.scale[it.channel], k.shift[it.channel]);
      },
      [&](int64_t r0, int64_t r1) {
        const int64_t C = l.channels;
        const opmath_t* __restrict__ mean = k.mean.data();
        const opmath_t* __restrict__ scale = k.scale.data();
        const opmath_t* __restrict__ shift = k.shift.data();
        for (int64_t r = r0; r < r1; ++r) {
          store_converted(norm.y + r * C, C, [&](int64_t c) { return norm.value(r * C + c, mean[c], scale[c], shift[c]); });
        }
      });
}

}  // namespace

void normalize(const NormInputs& in, at::Tensor& output) {
  dispatch_norm_kernel(in, [&]<typename scalar_t, Activation A, bool kResidual>() {
    normalize_typed<scalar_t, A, kResidual>(in, output);
  });
}

}  // namespace fusedbn::cpu
