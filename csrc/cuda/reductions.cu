// Per-channel reductions on the GPU: batch moments (Welford per thread, Chan merge across the warp by shuffles,
// across warps through shared memory, and across blocks in a second kernel) and the backward sums.
// One kernel per layout: NCHW reads each channel's spans; channels_last puts 32 consecutive channels across a
// warp so that every load is coalesced.
#include <algorithm>

#include "common.cuh"
#include "kernels.h"

namespace fusedbn::cuda {
namespace {

constexpr int kRowsPerBlockY = 8;  // channels_last blocks: 32 channels × 8 rows of threads

// x → Welford moments.
template <typename scalar_t>
struct MomentsElement {
  using A = acc_t<scalar_t>;
  using Op = MomentsOp<A>;
  const scalar_t* x;
  struct Channel {};
  __device__ Channel channel(int64_t) const { return {}; }
  __device__ void add(typename Op::State& s, int64_t i, Channel) const { welford_add(s, static_cast<A>(x[i])); }
};

// (dy, x [, z]) → (Σg, Σg·(x − mean)) with g = dy·act'(pre) recomputed from x.
template <typename scalar_t, Activation Act, bool kResidual>
struct GradSumsElement {
  using A = acc_t<scalar_t>;
  using Op = SumPairOp<A>;
  const scalar_t* dy;
  const scalar_t* x;
  const scalar_t* z;
  const A* mean;
  const A* invstd;
  const A* weight;
  const A* bias;
  A slope;
  struct Channel {
    A mean, scale, shift;
  };
  __device__ Channel channel(int64_t c) const {
    return {mean[c], invstd[c] * (weight ? weight[c] : A(1)), bias ? bias[c] : A(0)};
  }
  __device__ void add(typename Op::State& s, int64_t i, const Channel& ch) const {
    const A xmu = static_cast<A>(x[i]) - ch.mean;
    A g = static_cast<A>(dy[i]);
    if constexpr (Act != Activation::Identity) {
      A pre = xmu * ch.scale + ch.shift;
      if constexpr (kResidual) pre += static_cast<A>(z[i]);
      g *= activation_grad<Act>(pre, slope);
    }
    s.sum_dy += g;
    s.sum_dy_xmu += g * xmu;
  }
};

template <typename Element>
__global__ void reduce_planar_kernel(Element f, Layout l, int64_t chunk, typename Element::Op::State* partial) {
  using Op = typename Element::Op;
  __shared__ typename Op::State shared[kThreads / kWarpSize];
  const int64_t c = blockIdx.y;
  const int64_t total = l.outer * l.inner;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * chunk;
  const int64_t end = begin + chunk < total ? begin + chunk : total;
  const auto ch = f.channel(c);
  typename Op::State s = Op::identity();
  for (int64_t k = begin + threadIdx.x; k < end; k += blockDim.x) {
    const int64_t o = k / l.inner;
    f.add(s, (o * l.channels + c) * l.inner + (k - o * l.inner), ch);
  }
  s = block_reduce<Op>(s, shared);
  if (threadIdx.x == 0) partial[c * gridDim.x + blockIdx.x] = s;
}

template <typename Element>
__global__ void reduce_rows_kernel(Element f, Layout l, int64_t rows_per_block,
                                   typename Element::Op::State* partial) {
  using Op = typename Element::Op;
  __shared__ typename Op::State shared[kRowsPerBlockY][kWarpSize];
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kWarpSize + threadIdx.x;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t end = begin + rows_per_block < l.outer ? begin + rows_per_block : l.outer;
  typename Op::State s = Op::identity();
  if (c < l.channels) {  // C need not be a multiple of 32 (apex issue 1768)
    const auto ch = f.channel(c);
    for (int64_t r = begin + threadIdx.y; r < end; r += blockDim.y) f.add(s, r * l.channels + c, ch);
  }
  shared[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < l.channels) {
    for (int y = 1; y < blockDim.y; ++y) s = Op::merge(s, shared[y][threadIdx.x]);
    partial[c * gridDim.x + blockIdx.x] = s;
  }
}

// Merges each channel's per-block partials in block order (deterministic) and stores them.
template <typename Op, typename Store>
__global__ void merge_partials_kernel(const typename Op::State* partial, int64_t channels, int64_t blocks,
                                      Store store) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  typename Op::State s = Op::identity();
  for (int64_t b = 0; b < blocks; ++b) s = Op::merge(s, partial[c * blocks + b]);
  store(c, s);
}

template <typename A>
struct StoreMoments {
  A* mean;
  A* m2;
  __device__ void operator()(int64_t c, const Moments<A>& s) const {
    mean[c] = s.mean;
    m2[c] = s.m2 > A(0) ? s.m2 : A(0);
  }
};

template <typename A>
struct StoreSums {
  A* sum_dy;
  A* sum_dy_xmu;
  __device__ void operator()(int64_t c, const SumPair<A>& s) const {
    sum_dy[c] = s.sum_dy;
    sum_dy_xmu[c] = s.sum_dy_xmu;
  }
};

// Runs the reduction of `f` over the layout: enough blocks per channel to fill the GPU (a grid-level merge
// when one channel spans many blocks), then the per-channel merge.
template <typename Element, typename Store>
void reduce_per_channel(const at::Tensor& input, const Layout& l, const Element& f, const Store& store) {
  using State = typename Element::Op::State;
  const int device = input.get_device();
  const auto stream = c10::cuda::getCurrentCUDAStream(device);
  const int64_t fill = 4 * static_cast<int64_t>(multiprocessor_count(device));
  int64_t blocks;
  at::Tensor workspace;
  if (l.inner > 1) {
    const int64_t total = l.outer * l.inner;
    blocks = std::max<int64_t>(1, std::min((total + kThreads * 16 - 1) / (kThreads * 16), (fill + l.channels - 1) / l.channels));
    const int64_t chunk = (total + blocks - 1) / blocks;
    workspace = input.new_empty({l.channels * blocks * static_cast<int64_t>(sizeof(State))}, input.options().dtype(at::kByte));
    const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(l.channels));
    reduce_planar_kernel<<<grid, kThreads, 0, stream>>>(f, l, chunk, reinterpret_cast<State*>(workspace.data_ptr()));
  } else {
    const int64_t channel_blocks = (l.channels + kWarpSize - 1) / kWarpSize;
    blocks = std::max<int64_t>(1, std::min((l.outer + kRowsPerBlockY * 16 - 1) / (kRowsPerBlockY * 16),
                                           (fill + channel_blocks - 1) / channel_blocks));
    const int64_t rows = (l.outer + blocks - 1) / blocks;
    workspace = input.new_empty({l.channels * blocks * static_cast<int64_t>(sizeof(State))}, input.options().dtype(at::kByte));
    const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(channel_blocks));
    const dim3 block(kWarpSize, kRowsPerBlockY);
    reduce_rows_kernel<<<grid, block, 0, stream>>>(f, l, rows, reinterpret_cast<State*>(workspace.data_ptr()));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t merge_blocks = (l.channels + kThreads - 1) / kThreads;
  merge_partials_kernel<typename Element::Op><<<merge_blocks, kThreads, 0, stream>>>(
      reinterpret_cast<const State*>(workspace.data_ptr()), l.channels, blocks, store);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void batch_moments(const at::Tensor& input, Layout layout, at::Tensor& mean, at::Tensor& m2) {
  if (layout.channels == 0) return;
  const c10::cuda::CUDAGuard guard(input.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fusedbn_cuda_batch_moments", [&] {
    using A = acc_t<scalar_t>;
    if (layout.numel() == 0) {
      mean.zero_();
      m2.zero_();
      return;
    }
    reduce_per_channel(input, layout, MomentsElement<scalar_t>{input.const_data_ptr<scalar_t>()},
                       StoreMoments<A>{mean.mutable_data_ptr<A>(), m2.mutable_data_ptr<A>()});
  });
}

void backward_reduce(const NormInputs& in, const at::Tensor& grad_output, GradSums& sums) {
  if (in.layout.channels == 0) return;
  const c10::cuda::CUDAGuard guard(in.input.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.input.scalar_type(), "fusedbn_cuda_backward_reduce", [&] {
    using A = acc_t<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<A>::value;
    const at::Tensor mean = as_acc(in.mean, acc), invstd = as_acc(in.invstd, acc);
    const at::Tensor weight = as_acc(in.weight, acc), bias = as_acc(in.bias, acc);
    if (in.layout.numel() == 0) {
      sums.sum_dy.zero_();
      sums.sum_dy_xmu.zero_();
      return;
    }
    const StoreSums<A> store{sums.sum_dy.mutable_data_ptr<A>(), sums.sum_dy_xmu.mutable_data_ptr<A>()};
    dispatch_activation(in.activation, [&](auto act) {
      constexpr Activation Act = decltype(act)::value;
      auto run = [&](auto residual) {
        constexpr bool kResidual = decltype(residual)::value;
        const GradSumsElement<scalar_t, Act, kResidual> f{
            grad_output.const_data_ptr<scalar_t>(), in.input.const_data_ptr<scalar_t>(),
            kResidual ? in.residual.const_data_ptr<scalar_t>() : nullptr, mean.const_data_ptr<A>(),
            invstd.const_data_ptr<A>(), ptr_or_null<A>(weight), ptr_or_null<A>(bias),
            static_cast<A>(in.negative_slope)};
        reduce_per_channel(in.input, in.layout, f, store);
      };
      if (in.residual.defined()) {
        run(std::true_type{});
      } else {
        run(std::false_type{});
      }
    });
  });
}

}  // namespace fusedbn::cuda
