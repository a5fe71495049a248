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

  __device__ A scale(int64_t c) const { return invstd[c] * (weight ? weight[c] : A(1)); }
  __device__ A shift(int64_t c) const { return bias ? bias[c] : A(0); }
};

// Channel of element k of a vector starting at flat index i (c0 = channel of i).
__device__ __forceinline__ int64_t channel_at(const Layout& l, int64_t c0, int k) {
  return l.inner > 1 ? c0 : c0 + k;
}

__device__ __forceinline__ int64_t first_channel(const Layout& l, int64_t i) {
  return l.inner > 1 ? (i / l.inner) % l.channels : i % l.channels;
}

template <typename scalar_t, Activation Act, bool kResidual, int VEC>
__global__ void normalize_kernel(const scalar_t* x, const scalar_t* z, scalar_t* y, Layout l,
                                 ChannelParams<acc_t<scalar_t>> p) {
  using A = acc_t<scalar_t>;
  const int64_t vectors = l.numel() / VEC;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < vectors;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = v * VEC, c0 = first_channel(l, i);
    const auto xv = load_packed<scalar_t, VEC>(x + i);
    Packed<scalar_t, VEC> zv;
    if constexpr (kResidual) zv = load_packed<scalar_t, VEC>(z + i);
    Packed<scalar_t, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int64_t c = channel_at(l, c0, k);
      A pre = (static_cast<A>(xv.v[k]) - p.mean[c]) * p.scale(c) + p.shift(c);
      if constexpr (kResidual) pre += static_cast<A>(zv.v[k]);
      out.v[k] = static_cast<scalar_t>(activate<Act>(pre, p.slope));
    }
    store_packed<scalar_t, VEC>(y + i, out);
  }
}

template <typename scalar_t, Activation Act, bool kResidual, int VEC>
__global__ void backward_elemt_kernel(const scalar_t* dy, const scalar_t* x, const scalar_t* z, scalar_t* dx,
                                      scalar_t* dz, Layout l, ChannelParams<acc_t<scalar_t>> p) {
  using A = acc_t<scalar_t>;
  constexpr bool kWriteDz = kResidual && Act != Activation::Identity;
  const int64_t vectors = l.numel() / VEC;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < vectors;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = v * VEC, c0 = first_channel(l, i);
    const auto xv = load_packed<scalar_t, VEC>(x + i);
    const auto dyv = load_packed<scalar_t, VEC>(dy + i);
    Packed<scalar_t, VEC> zv;
    if constexpr (kResidual && Act != Activation::Identity) zv = load_packed<scalar_t, VEC>(z + i);
    Packed<scalar_t, VEC> dxv, dzv;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int64_t c = channel_at(l, c0, k);
      const A scale = p.scale(c), xmu = static_cast<A>(xv.v[k]) - p.mean[c];
      A g = static_cast<A>(dyv.v[k]);
      if constexpr (Act != Activation::Identity) {
        A pre = xmu * scale + p.shift(c);
        if constexpr (kResidual) pre += static_cast<A>(zv.v[k]);
        g *= activation_grad<Act>(pre, p.slope);
      }
      A grad = g * scale;
      if (p.sum_dy != nullptr) {
        const A invstd = p.invstd[c];
        grad -= scale * p.sum_dy[c] * p.inv_count + xmu * scale * invstd * invstd * p.sum_dy_xmu[c] * p.inv_count;
      }
      dxv.v[k] = static_cast<scalar_t>(grad);
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
      : mean(as_acc(in.mean, acc)), invstd(as_acc(in.invstd, acc)), weight(as_acc(in.weight, acc)),
        bias(as_acc(in.bias, acc)), sum_dy(as_acc(sums.sum_dy, acc)), sum_dy_xmu(as_acc(sums.sum_dy_xmu, acc)) {}
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
    const int64_t blocks = grid_size(in.layout.numel() / VEC, device);
    normalize_kernel<scalar_t, decltype(act)::value, decltype(residual)::value, VEC><<<blocks, kThreads, 0, stream>>>(
        in.input.const_data_ptr<scalar_t>(),
        decltype(residual)::value ? in.residual.const_data_ptr<scalar_t>() : nullptr,
        output.mutable_data_ptr<scalar_t>(), in.layout, params.view(1.0, in.negative_slope));
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
    const int64_t blocks = grid_size(in.layout.numel() / VEC, device);
    backward_elemt_kernel<scalar_t, decltype(act)::value, kResidual, VEC><<<blocks, kThreads, 0, stream>>>(
        grad_output.const_data_ptr<scalar_t>(), in.input.const_data_ptr<scalar_t>(),
        kResidual ? in.residual.const_data_ptr<scalar_t>() : nullptr, grad_input.mutable_data_ptr<scalar_t>(),
        kWriteDz ? grad_residual.mutable_data_ptr<scalar_t>() : nullptr, in.layout,
        params.view(count, in.negative_slope));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fusedbn::cuda
