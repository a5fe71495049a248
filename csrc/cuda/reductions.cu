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
constexpr int kUnroll = 8;         // loads each thread issues before it uses the first

// x → Welford moments. Each Element splits its work in load(i) (the memory reads of element i) and add(), so
// that a thread can have kUnroll loads in flight.
template <typename scalar_t>
struct MomentsElement {
  using A = acc_t<scalar_t>;
  using Op = MomentsOp<A>;
  using Loaded = A;
  const scalar_t* x;
  struct Channel {};
  __device__ Channel channel(int64_t) const { return {}; }
  __device__ Loaded load(int64_t i) const { return static_cast<A>(x[i]); }
  __device__ void add(typename Op::State& s, const Loaded& v, Channel) const { welford_add(s, v); }
};

// (dy, x [, z]) → (Σg, Σg·(x − mean)) with g = dy·act'(pre) recomputed from x.
template <typename scalar_t, Activation Act, bool kResidual>
struct GradSumsElement {
  using A = acc_t<scalar_t>;
  using Op = SumPairOp<A>;
  static constexpr bool kReadZ = kResidual && Act != Activation::Identity;
  struct Loaded {
    A dy, x, z;
  };
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
  __device__ Loaded load(int64_t i) const {
    return {static_cast<A>(dy[i]), static_cast<A>(x[i]), kReadZ ? static_cast<A>(z[i]) : A(0)};
  }
  __device__ void add(typename Op::State& s, const Loaded& v, const Channel& ch) const {
    const A xmu = v.x - ch.mean;
    A g = v.dy;
    if constexpr (Act != Activation::Identity) {
      A pre = xmu * ch.scale + ch.shift;
      if constexpr (kResidual) pre += v.z;
      g *= activation_grad<Act>(pre, slope);
    }
    s.sum_dy += g;
    s.sum_dy_xmu += g * xmu;
  }
};

// Reads the elements at idx[u] where ok[u] (all loads first, then the adds, so that they overlap in memory).
template <typename Element, typename Channel>
__device__ __forceinline__ void add_unrolled(const Element& f, typename Element::Op::State& s,
                                             const int64_t (&idx)[kUnroll], const bool (&ok)[kUnroll],
                                             const Channel& ch) {
  typename Element::Loaded v[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    if (ok[u]) v[u] = f.load(idx[u]);
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    if (ok[u]) f.add(s, v[u], ch);
  }
}

// NCHW: block (channel c = blockIdx.x, piece blockIdx.y) reduces values [begin, end) of the channel's
// outer·inner values, value k at (k / inner)·C·inner + c·inner + k % inner. Each thread tracks its k % inner
// and that address across steps of blockDim.x values, with no division in the loop.
template <typename Element>
__global__ void reduce_planar_kernel(Element f, Layout l, int64_t chunk, typename Element::Op::State* partial) {
  using Op = typename Element::Op;
  __shared__ typename Op::State shared[kThreads / kWarpSize];
  const int64_t c = blockIdx.x;
  const int64_t total = l.outer * l.inner, plane = l.channels * l.inner;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t end = begin + chunk < total ? begin + chunk : total;
  const int64_t step_j = blockDim.x % l.inner, step_address = blockDim.x / l.inner * plane + step_j;
  const auto ch = f.channel(c);
  typename Op::State s = Op::identity();
  int64_t k = begin + threadIdx.x, j = k % l.inner, address = k / l.inner * plane + c * l.inner + j;
  while (k < end) {
    int64_t idx[kUnroll];
    bool ok[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      ok[u] = k < end;
      idx[u] = address;
      k += blockDim.x;
      address += step_address;
      j += step_j;
      if (j >= l.inner) {  // into the next outer index
        j -= l.inner;
        address += plane - l.inner;
      }
    }
    add_unrolled(f, s, idx, ok, ch);
  }
  s = block_reduce<Op>(s, shared);
  if (threadIdx.x == 0) partial[c * gridDim.y + blockIdx.y] = s;
}

// channels_last: block (rows piece blockIdx.x, channels from 32·blockIdx.y) has 32 channels across each warp
// (coalesced loads) and kRowsPerBlockY rows of threads; partials merged across the rows through shared memory.
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
    for (int64_t r = begin + threadIdx.y; r < end; r += kUnroll * blockDim.y) {
      int64_t idx[kUnroll];
      bool ok[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t row = r + u * static_cast<int64_t>(blockDim.y);
        ok[u] = row < end;
        idx[u] = row * l.channels + c;
      }
      add_unrolled(f, s, idx, ok, ch);
    }
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
    const dim3 grid(static_cast<unsigned>(l.channels), static_cast<unsigned>(blocks));
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
