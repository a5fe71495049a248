// Elementwise passes on the GPU, with 16-byte vector loads and stores where the layout and pointers allow:
//   normalize:       y = act((x − mean)·invstd·w + b [+ z])
//   backward_elemt:  dx = g·scale − c1 − (x − mean)·c2, dz = g, with g = dy·act'(pre) recomputed from x,
//                    scale = w·invstd, c1 = scale·Σg/n, c2 = scale·invstd²·Σg·(x − mean)/n (0 in eval mode).
#include "common.cuh"
#include "kernels.h"

namespace fusedbn::cuda {
namespace {

template <typename A>
struct ChannelParams {
  const A* mean;
  const A* invstd;
  const A* weight;  // may be null (1)
  const A* bias;    // may be null (0)
  const A* sum_dy;  // backward only; null in eval mode
  const A* sum_dy_xmu;
  A inv_count;
  A slope;

  // What one channel's elements need (c1 and c2 only in the backward pass, 0 in eval mode).
  struct Channel {
    A mean, scale, shift, c1, c2;
  };
  template <bool kBackward>
  __device__ Channel channel(int64_t c) const {
    Channel r{mean[c], invstd[c] * (weight ? weight[c] : A(1)), bias ? bias[c] : A(0), A(0), A(0)};
    if (kBackward && sum_dy != nullptr) {
      r.c1 = r.scale * sum_dy[c] * inv_count;
      r.c2 = r.scale * invstd[c] * invstd[c] * sum_dy_xmu[c] * inv_count;
    }
    return r;
  }
  // The channels of the VEC elements of a vector whose first element is in channel c0: all c0 when planar
  // (NCHW), else c0, c0 + 1, … (channels_last).
  template <bool kBackward, int VEC>
  __device__ void load(Channel (&ch)[VEC], int64_t c0, bool planar) const {
    if (planar) {
      const Channel c = channel<kBackward>(c0);
#pragma unroll
      for (int k = 0; k < VEC; ++k) ch[k] = c;
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) ch[k] = channel<kBackward>(c0 + k);
    }
  }
};

// A thread whose channel never changes (walk.fixed(): the grid stride is a whole number of channel periods)
// loads its channels' coefficients once; otherwise once per vector.
template <typename scalar_t, Activation Act, bool kResidual, int VEC>
__global__ void normalize_kernel(const scalar_t* x, const scalar_t* z, scalar_t* y, Layout l, ChannelWalk walk,
                                 ChannelParams<acc_t<scalar_t>> p) {
  using A = acc_t<scalar_t>;
  const int64_t vectors = l.numel() / VEC, first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool planar = l.inner > 1, fixed = walk.fixed();
  auto at = walk.start(first);
  typename ChannelParams<A>::Channel ch[VEC];
  if (fixed && first < vectors) p.template load<false>(ch, at.channel, planar);
  for (int64_t v = first; v < vectors; v += static_cast<int64_t>(gridDim.x) * blockDim.x, walk.advance(at)) {
    if (!fixed) p.template load<false>(ch, at.channel, planar);
    const int64_t i = v * VEC;
    const auto xv = load_packed<scalar_t, VEC>(x + i);
    Packed<scalar_t, VEC> zv;
    if constexpr (kResidual) zv = load_packed<scalar_t, VEC>(z + i);
    Packed<scalar_t, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      A pre = (static_cast<A>(xv.v[k]) - ch[k].mean) * ch[k].scale + ch[k].shift;
      if constexpr (kResidual) pre += static_cast<A>(zv.v[k]);
      out.v[k] = static_cast<scalar_t>(activate<Act>(pre, p.slope));
    }
    store_packed<scalar_t, VEC>(y + i, out);
  }
}

template <typename scalar_t, Activation Act, bool kResidual, int VEC>
__global__ void backward_elemt_kernel(const scalar_t* dy, const scalar_t* x, const scalar_t* z, scalar_t* dx,
                                      scalar_t* dz, Layout l, ChannelWalk walk, ChannelParams<acc_t<scalar_t>> p) {
  using A = acc_t<scalar_t>;
  constexpr bool kWriteDz = kResidual && Act != Activation::Identity;
  const int64_t vectors = l.numel() / VEC, first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool planar = l.inner > 1, fixed = walk.fixed();
  auto at = walk.start(first);
  typename ChannelParams<A>::Channel ch[VEC];
  if (fixed && first < vectors) p.template load<true>(ch, at.channel, planar);
  for (int64_t v = first; v < vectors; v += static_cast<int64_t>(gridDim.x) * blockDim.x, walk.advance(at)) {
    if (!fixed) p.template load<true>(ch, at.channel, planar);
    const int64_t i = v * VEC;
    const auto xv = load_packed<scalar_t, VEC>(x + i);
    const auto dyv = load_packed<scalar_t, VEC>(dy + i);
    Packed<scalar_t, VEC> zv;
    if constexpr (kWriteDz) zv = load_packed<scalar_t, VEC>(z + i);
    Packed<scalar_t, VEC> dxv, dzv;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const A xmu = static_cast<A>(xv.v[k]) - ch[k].mean;
      const A residual = kWriteDz ? static_cast<A>(zv.v[k]) : A(0);
      const A g = masked_grad<Act, kResidual>(static_cast<A>(dyv.v[k]), xmu, ch[k].scale, ch[k].shift, residual,
                                              p.slope);
      dxv.v[k] = static_cast<scalar_t>(g * ch[k].scale - ch[k].c1 - xmu * ch[k].c2);
      if constexpr (kWriteDz) dzv.v[k] = static_cast<scalar_t>(g);
    }
    store_packed<scalar_t, VEC>(dx + i, dxv);
    if constexpr (kWriteDz) store_packed<scalar_t, VEC>(dz + i, dzv);
  }
}

// Calls launch(scalar_t, Act, kResidual, VEC tags) for the input's dtype, the activation, the residual and the
// widest vector the layout and `pointers` allow.
template <typename Launch>
void dispatch_elementwise(const NormInputs& in, std::initializer_list<const void*> pointers, const Launch& launch) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.input.scalar_type(), "fusedbn_cuda_elementwise", [&] {
    const int vec = vector_width<scalar_t>(in.layout, pointers);
    dispatch_activation(in.activation, [&](auto act) {
      auto with_residual = [&](auto residual) {
        constexpr int kVec = 16 / sizeof(scalar_t);
        if (vec == kVec) {
          launch(scalar_t{}, act, residual, std::integral_constant<int, kVec>{});
        } else {
          launch(scalar_t{}, act, residual, std::integral_constant<int, 1>{});
        }
      };
      if (in.residual.defined()) {
        with_residual(std::true_type{});
      } else {
        with_residual(std::false_type{});
      }
    });
  });
}

template <typename A>
struct AccParams {
  at::Tensor mean, invstd, weight, bias, sum_dy, sum_dy_xmu;
  AccParams(const NormInputs& in, const GradSums& sums, at::ScalarType acc)
      : mean(dense_as(in.mean, acc)), invstd(dense_as(in.invstd, acc)), weight(dense_as(in.weight, acc)),
        bias(dense_as(in.bias, acc)), sum_dy(dense_as(sums.sum_dy, acc)), sum_dy_xmu(dense_as(sums.sum_dy_xmu, acc)) {}
  ChannelParams<A> view(double count, double slope) const {
    return {mean.const_data_ptr<A>(), invstd.const_data_ptr<A>(), ptr_or_null<A>(weight), ptr_or_null<A>(bias),
            ptr_or_null<A>(sum_dy), ptr_or_null<A>(sum_dy_xmu), static_cast<A>(1.0 / count), static_cast<A>(slope)};
  }
};

}  // namespace

void normalize(const NormInputs& in, at::Tensor& output) {
  if (in.layout.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(in.input.device());
  const int device = in.input.get_device();
  const auto stream = c10::cuda::getCurrentCUDAStream(device);
  dispatch_elementwise(in, {in.input.const_data_ptr(), in.residual.defined() ? in.residual.const_data_ptr() : nullptr,
                            output.const_data_ptr()},
                       [&](auto scalar, auto act, auto residual, auto vec) {
    using scalar_t = decltype(scalar);
    using A = acc_t<scalar_t>;
    constexpr int VEC = decltype(vec)::value;
    const AccParams<A> params(in, GradSums{}, c10::CppTypeToScalarType<A>::value);
    const int64_t blocks = walk_grid_size(in.layout, VEC, device);
    normalize_kernel<scalar_t, decltype(act)::value, decltype(residual)::value, VEC><<<blocks, kThreads, 0, stream>>>(
        in.input.const_data_ptr<scalar_t>(),
        decltype(residual)::value ? in.residual.const_data_ptr<scalar_t>() : nullptr,
        output.mutable_data_ptr<scalar_t>(), in.layout, ChannelWalk::make(in.layout, VEC, blocks * kThreads),
        params.view(1.0, in.negative_slope));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void backward_elemt(const NormInputs& in, const at::Tensor& grad_output, const GradSums& sums, double count,
                    at::Tensor& grad_input, at::Tensor& grad_residual) {
  if (in.layout.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(in.input.device());
  const int device = in.input.get_device();
  const auto stream = c10::cuda::getCurrentCUDAStream(device);
  dispatch_elementwise(in, {in.input.const_data_ptr(), grad_output.const_data_ptr(), grad_input.const_data_ptr(),
                            in.residual.defined() ? in.residual.const_data_ptr() : nullptr,
                            grad_residual.defined() ? grad_residual.const_data_ptr() : nullptr},
                       [&](auto scalar, auto act, auto residual, auto vec) {
    using scalar_t = decltype(scalar);
    using A = acc_t<scalar_t>;
    constexpr int VEC = decltype(vec)::value;
    constexpr bool kResidual = decltype(residual)::value;
    constexpr bool kWriteDz = kResidual && decltype(act)::value != Activation::Identity;
    const AccParams<A> params(in, sums, c10::CppTypeToScalarType<A>::value);
    const int64_t blocks = walk_grid_size(in.layout, VEC, device);
    backward_elemt_kernel<scalar_t, decltype(act)::value, kResidual, VEC><<<blocks, kThreads, 0, stream>>>(
        grad_output.const_data_ptr<scalar_t>(), in.input.const_data_ptr<scalar_t>(),
        kResidual ? in.residual.const_data_ptr<scalar_t>() : nullptr, grad_input.mutable_data_ptr<scalar_t>(),
        kWriteDz ? grad_residual.mutable_data_ptr<scalar_t>() : nullptr, in.layout,
        ChannelWalk::make(in.layout, VEC, blocks * kThreads), params.view(count, in.negative_slope));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fusedbn::cuda
