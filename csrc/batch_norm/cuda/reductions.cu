// Per-channel reductions on the GPU: batch moments (Welford per thread, Chan merge across the warp by shuffles,
// across warps through shared memory, and across blocks in a second kernel) and the backward sums.
// One kernel per layout: NCHW reads each channel's spans; channels_last gives each thread VEC consecutive
// channels and puts consecutive groups across a warp, so that every load is coalesced. 16-byte loads where the
// spans (NCHW) or rows (channels_last) and the pointers allow.
#include <algorithm>

#include "common.cuh"
#include "kernels.h"

namespace fusedbn::cuda {
namespace {

constexpr int kUnroll = 4;  // vector loads each thread issues before it uses the first

// x → Welford moments. An Element loads VEC consecutive elements of one position (load) and adds element k of
// them to a thread's state (add), so that a thread can keep kUnroll loads in flight.
template <typename scalar_t>
struct MomentsElement {
  using A = acc_t<scalar_t>;
  using Op = MomentsOp<A>;
  using scalar_type = scalar_t;
  template <int VEC>
  struct Loaded {
    Packed<scalar_t, VEC> x;
  };
  const scalar_t* x;
  struct Channel {};
  __device__ Channel channel(int64_t) const { return {}; }
  template <int VEC>
  __device__ Loaded<VEC> load(int64_t i) const {
    return {load_packed<scalar_t, VEC>(x + i)};
  }
  template <int VEC>
  __device__ void add(typename Op::State& s, const Loaded<VEC>& v, int k, Channel) const {
    welford_add(s, static_cast<A>(v.x.v[k]));
  }
};

// (dy, x [, z]) → (Σg, Σg·(x − mean)) with g = dy·act'(pre) recomputed from x.
template <typename scalar_t, Activation Act, bool kResidual>
struct GradSumsElement {
  using A = acc_t<scalar_t>;
  using Op = SumPairOp<A>;
  using scalar_type = scalar_t;
  static constexpr bool kReadZ = kResidual && Act != Activation::Identity;
  template <int VEC>
  struct Loaded {
    Packed<scalar_t, VEC> dy, x, z;
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
  template <int VEC>
  __device__ Loaded<VEC> load(int64_t i) const {
    Loaded<VEC> r;
    r.dy = load_packed<scalar_t, VEC>(dy + i);
    r.x = load_packed<scalar_t, VEC>(x + i);
    if constexpr (kReadZ) r.z = load_packed<scalar_t, VEC>(z + i);
    return r;
  }
  template <int VEC>
  __device__ void add(typename Op::State& s, const Loaded<VEC>& v, int k, const Channel& ch) const {
    const A xmu = static_cast<A>(v.x.v[k]) - ch.mean;
    const A residual = kReadZ ? static_cast<A>(v.z.v[k]) : A(0);
    const A g = masked_grad<Act, kResidual>(static_cast<A>(v.dy.v[k]), xmu, ch.scale, ch.shift, residual, slope);
    s.sum_dy += g;
    s.sum_dy_xmu += g * xmu;
  }
};

// The reductions split their work into items of (channel or channel block, piece) whose partials go to
// partial[channel · pieces + piece]. Each block takes items blockIdx.x, blockIdx.x + gridDim.x, …, and the grid
// is as many blocks as fit on the GPU at once (launch_partials): more blocks than that would run in two or more
// waves, the last one partly empty.

// NCHW item: vectors [begin, end) of channel c's outer·inner / VEC vectors; vector k starts at element
// (k / span)·C·inner + c·inner + (k % span)·VEC, with span = inner / VEC. Each thread tracks its k % span and that
// address across steps of blockDim.x vectors, with no division in the loop.
template <typename Element, int VEC>
__device__ typename Element::Op::State reduce_span_piece(const Element& f, const Layout& l, int64_t c,
                                                         int64_t begin, int64_t end) {
  using Op = typename Element::Op;
  const int64_t span = l.inner / VEC, plane = l.channels * l.inner;
  const int64_t step_j = blockDim.x % span, step_address = blockDim.x / span * plane + step_j * VEC;
  const auto ch = f.channel(c);
  typename Op::State s = Op::identity();
  int64_t k = begin + threadIdx.x, j = k % span, address = k / span * plane + c * l.inner + j * VEC;
  while (k < end) {
    typename Element::template Loaded<VEC> v[kUnroll];
    bool ok[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      ok[u] = k < end;
      if (ok[u]) v[u] = f.template load<VEC>(address);
      k += blockDim.x;
      address += step_address;
      j += step_j;
      if (j >= span) {  // into the next outer index
        j -= span;
        address += plane - l.inner;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (!ok[u]) continue;
#pragma unroll
      for (int e = 0; e < VEC; ++e) f.add(s, v[u], e, ch);
    }
  }
  return s;
}

template <typename Element, int VEC>
__global__ void reduce_planar_kernel(Element f, Layout l, int64_t pieces, int64_t chunk,
                                     typename Element::Op::State* partial) {
  using Op = typename Element::Op;
  __shared__ typename Op::State shared[kThreads / kWarpSize];
  const int64_t total = l.outer * (l.inner / VEC);
  for (int64_t item = blockIdx.x; item < l.channels * pieces; item += gridDim.x) {
    const int64_t c = item / pieces, begin = (item - c * pieces) * chunk;
    auto s = reduce_span_piece<Element, VEC>(f, l, c, begin, begin + chunk < total ? begin + chunk : total);
    s = block_reduce<Op>(s, shared);
    if (threadIdx.x == 0) partial[item] = s;
    __syncthreads();  // the next item's block_reduce reuses `shared`
  }
}

// channels_last item (channel block cb, piece): thread (x, y) reduces channels c0 = (cb·blockDim.x + x)·VEC …
// c0 + VEC − 1 over rows begin + y, begin + y + blockDim.y, … < end (16-byte loads, coalesced across x); the
// blockDim.y row partials are then merged through shared memory in row order.
template <typename Element, int VEC>
__global__ void reduce_rows_kernel(Element f, Layout l, int64_t channel_blocks, int64_t pieces,
                                   int64_t rows_per_piece, typename Element::Op::State* partial) {
  using Op = typename Element::Op;
  using State = typename Op::State;
  __shared__ State shared[kThreads * VEC];
  const int thread = threadIdx.y * blockDim.x + threadIdx.x;
  for (int64_t item = blockIdx.x; item < channel_blocks * pieces; item += gridDim.x) {
    const int64_t block = item / pieces, piece = item - block * pieces;
    const int64_t c0 = (block * blockDim.x + threadIdx.x) * VEC, begin = piece * rows_per_piece;
    const int64_t end = begin + rows_per_piece < l.outer ? begin + rows_per_piece : l.outer;
    State s[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) s[e] = Op::identity();
    if (c0 < l.channels) {  // C need not be a multiple of the block's channels (apex issue 1768)
      typename Element::Channel ch[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) ch[e] = f.channel(c0 + e);
      for (int64_t r = begin + threadIdx.y; r < end; r += kUnroll * static_cast<int64_t>(blockDim.y)) {
        typename Element::template Loaded<VEC> v[kUnroll];
        bool ok[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t row = r + u * static_cast<int64_t>(blockDim.y);
          ok[u] = row < end;
          if (ok[u]) v[u] = f.template load<VEC>(row * l.channels + c0);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (!ok[u]) continue;
#pragma unroll
          for (int e = 0; e < VEC; ++e) f.add(s[e], v[u], e, ch[e]);
        }
      }
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) shared[thread * VEC + e] = s[e];
    __syncthreads();
    if (threadIdx.y == 0 && c0 < l.channels) {
      for (int y = 1; y < blockDim.y; ++y) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) s[e] = Op::merge(s[e], shared[(y * blockDim.x + threadIdx.x) * VEC + e]);
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) partial[(c0 + e) * pieces + piece] = s[e];
    }
    __syncthreads();  // the next item overwrites `shared`
  }
}

// One warp per channel (blockDim = 32 × kMergeWarps): each lane merges every 32nd of the channel's per-block
// partials, then the warp merges its lanes in a fixed tree (deterministic), and lane 0 stores the result.
constexpr int kMergeWarps = 8;

template <typename Op, typename Store>
__global__ void merge_partials_kernel(const typename Op::State* partial, int64_t channels, int64_t blocks,
                                      Store store) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kMergeWarps + threadIdx.y;
  if (c >= channels) return;  // the whole warp
  typename Op::State s = Op::identity();
  for (int64_t b = threadIdx.x; b < blocks; b += kWarpSize) s = Op::merge(s, partial[c * blocks + b]);
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) s = Op::merge(s, Op::shfl(s, offset));
  if (threadIdx.x == 0) store(c, s);
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

// The batch moments as StoreMoments, and from them the normalisation statistics as batch_norm_stats: the
// training forward's statistics without a kernel of their own.
template <typename A>
struct StoreMomentsAndNormStats {
  StoreMoments<A> moments;
  double count;
  const A* prior_mean;  // both null when prior_count is 0
  const A* prior_var;
  double prior_count, eps;
  A* mean;
  A* invstd;
  __device__ void operator()(int64_t c, const Moments<A>& s) const {
    moments(c, s);
    const NormStats n = norm_stats(count, static_cast<double>(moments.mean[c]), static_cast<double>(moments.m2[c]),
                                   prior_mean ? static_cast<double>(prior_mean[c]) : 0.0,
                                   prior_var ? static_cast<double>(prior_var[c]) : 0.0, prior_count, eps);
    mean[c] = static_cast<A>(n.mean);
    invstd[c] = static_cast<A>(n.invstd);
  }
};

// The backward sums, and the weight gradient Σg·(x − mean)·invstd where grad_weight is not null.
template <typename A>
struct StoreSums {
  A* sum_dy;
  A* sum_dy_xmu;
  const A* invstd;
  A* grad_weight;
  __device__ void operator()(int64_t c, const SumPair<A>& s) const {
    sum_dy[c] = s.sum_dy;
    sum_dy_xmu[c] = s.sum_dy_xmu;
    if (grad_weight != nullptr) grad_weight[c] = weight_gradient(s.sum_dy_xmu, invstd[c]);
  }
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks of `threads` threads of `kernel` that fit on the GPU at once (registers, shared memory, threads),
// queried once per kernel.
template <auto Kernel>
int64_t resident_blocks(int threads, int device) {
  static const int per_multiprocessor = [&] {
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, Kernel, threads, 0));
    return std::max(blocks, 1);
  }();
  return static_cast<int64_t>(per_multiprocessor) * multiprocessor_count(device);
}

// Launches the reduction of `f` over the layout in vectors of VEC elements: each channel (NCHW) or block of
// channels (channels_last) in as many pieces as the resident blocks allow, but no piece shorter than one step
// of every thread; returns the number of pieces (partials per channel).
template <int VEC, typename Element>
int64_t launch_partials(const Element& f, const at::Tensor& input, const Layout& l, at::Tensor& workspace,
                        cudaStream_t stream) {
  using State = typename Element::Op::State;
  const int device = input.get_device();
  auto allocate = [&](int64_t pieces) {
    workspace = input.new_empty({l.channels * pieces * static_cast<int64_t>(sizeof(State))},
                                input.options().dtype(at::kByte));
    return reinterpret_cast<State*>(workspace.mutable_data_ptr());
  };
  if (l.inner > 1) {
    constexpr auto kernel = reduce_planar_kernel<Element, VEC>;
    const int64_t resident = resident_blocks<kernel>(kThreads, device);
    const int64_t total = l.outer * (l.inner / VEC);
    const int64_t pieces = std::max<int64_t>(1, std::min(resident / l.channels, ceil_div(total, kThreads * kUnroll)));
    State* partial = allocate(pieces);
    const int64_t grid = std::min(l.channels * pieces, resident);
    kernel<<<grid, kThreads, 0, stream>>>(f, l, pieces, ceil_div(total, pieces), partial);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return pieces;
  }
  const int64_t groups = ceil_div(l.channels, VEC);
  int64_t tx = 1;
  while (tx < kWarpSize && tx < groups) tx *= 2;
  const int64_t ty = kThreads / tx, channel_blocks = ceil_div(groups, tx);
  constexpr auto kernel = reduce_rows_kernel<Element, VEC>;
  const int64_t resident = resident_blocks<kernel>(kThreads, device);
  const int64_t pieces =
      std::max<int64_t>(1, std::min(resident / channel_blocks, ceil_div(l.outer, ty * kUnroll)));
  State* partial = allocate(pieces);
  const int64_t grid = std::min(channel_blocks * pieces, resident);
  const dim3 block(static_cast<unsigned>(tx), static_cast<unsigned>(ty));
  kernel<<<grid, block, 0, stream>>>(f, l, channel_blocks, pieces, ceil_div(l.outer, pieces), partial);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return pieces;
}

// Runs the reduction of `f` over the layout (16-byte loads where the layout and `pointers` allow), then the
// per-channel merge of the partials.
template <typename Element, typename Store>
void reduce_per_channel(const at::Tensor& input, const Layout& l, const Element& f, const Store& store,
                        std::initializer_list<const void*> pointers) {
  using scalar_t = typename Element::scalar_type;
  using State = typename Element::Op::State;
  constexpr int kVec = 16 / sizeof(scalar_t);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(input.get_device());
  at::Tensor workspace;
  const int64_t blocks = vector_width<scalar_t>(l, pointers) == kVec
                             ? launch_partials<kVec>(f, input, l, workspace, stream)
                             : launch_partials<1>(f, input, l, workspace, stream);
  const dim3 block(kWarpSize, kMergeWarps);
  merge_partials_kernel<typename Element::Op><<<ceil_div(l.channels, kMergeWarps), block, 0, stream>>>(
      reinterpret_cast<const State*>(workspace.const_data_ptr()), l.channels, blocks, store);
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
                       StoreMoments<A>{mean.mutable_data_ptr<A>(), m2.mutable_data_ptr<A>()},
                       {input.const_data_ptr()});
  });
}

bool forward_train_fused(const NormInputs& in, const at::Tensor& prior_mean, const at::Tensor& prior_var,
                         double prior_count, double eps, at::Tensor& batch_mean, at::Tensor& batch_m2,
                         at::Tensor& output) {
  const Layout l = in.layout;
  if (l.numel() == 0) return false;
  const c10::cuda::CUDAGuard guard(in.input.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.input.scalar_type(), "fusedbn_cuda_forward_train", [&] {
    using A = acc_t<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<A>::value;
    // The prior (running statistics, float or the input's dtype) in A: exact, since A holds every value of it.
    const bool blend = prior_count > 0;
    const at::Tensor pm = blend ? dense_as(prior_mean, acc) : at::Tensor();
    const at::Tensor pv = blend ? dense_as(prior_var, acc) : at::Tensor();
    const StoreMomentsAndNormStats<A> store{
        {batch_mean.mutable_data_ptr<A>(), batch_m2.mutable_data_ptr<A>()}, static_cast<double>(l.count_per_channel()),
        ptr_or_null<A>(pm), ptr_or_null<A>(pv), prior_count, eps, in.mean.mutable_data_ptr<A>(),
        in.invstd.mutable_data_ptr<A>()};
    reduce_per_channel(in.input, l, MomentsElement<scalar_t>{in.input.const_data_ptr<scalar_t>()}, store,
                       {in.input.const_data_ptr()});
  });
  normalize(in, output);
  return true;
}

void backward_reduce(const NormInputs& in, const at::Tensor& grad_output, GradSums& sums) {
  if (in.layout.channels == 0) return;
  const c10::cuda::CUDAGuard guard(in.input.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.input.scalar_type(), "fusedbn_cuda_backward_reduce", [&] {
    using A = acc_t<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<A>::value;
    const at::Tensor mean = dense_as(in.mean, acc), invstd = dense_as(in.invstd, acc);
    const at::Tensor weight = dense_as(in.weight, acc), bias = dense_as(in.bias, acc);
    if (in.layout.numel() == 0) {
      sums.sum_dy.zero_();
      sums.sum_dy_xmu.zero_();
      if (sums.grad_weight.defined()) sums.grad_weight.zero_();
      return;
    }
    const StoreSums<A> store{sums.sum_dy.mutable_data_ptr<A>(), sums.sum_dy_xmu.mutable_data_ptr<A>(),
                             invstd.const_data_ptr<A>(),
                             sums.grad_weight.defined() ? sums.grad_weight.mutable_data_ptr<A>() : nullptr};
    dispatch_activation(in.activation, [&](auto act) {
      constexpr Activation Act = decltype(act)::value;
      auto run = [&](auto residual) {
        constexpr bool kResidual = decltype(residual)::value;
        const GradSumsElement<scalar_t, Act, kResidual> f{
            grad_output.const_data_ptr<scalar_t>(), in.input.const_data_ptr<scalar_t>(),
            kResidual ? in.residual.const_data_ptr<scalar_t>() : nullptr, mean.const_data_ptr<A>(),
            invstd.const_data_ptr<A>(), ptr_or_null<A>(weight), ptr_or_null<A>(bias),
            static_cast<A>(in.negative_slope)};
        reduce_per_channel(in.input, in.layout, f, store,
                           {grad_output.const_data_ptr(), in.input.const_data_ptr(),
                            kResidual ? in.residual.const_data_ptr() : nullptr});
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
