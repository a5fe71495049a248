// Device helpers shared by the CUDA kernels: accumulation types, launch sizes, vector loads, block reductions.
// Lean headers only (no torch/extension.h, no ATen/cuda/CUDAContext.h), so that this compiles against a CPU
// build of torch with -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <numeric>
#include <type_traits>

#include "../kernel_args.h"
#include "../../common/welford.h"

namespace fusedbn::cuda {

// float accumulation for half, bfloat16 and float; double for double.
template <typename scalar_t>
using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

constexpr int kWarpSize = 32;
constexpr int kThreads = 256;

inline int multiprocessor_count(int device) {
  static int cached[64] = {};
  if (device < 64 && cached[device] > 0) return cached[device];
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  if (device < 64) cached[device] = sms;
  return sms;
}

// Blocks for a grid-stride loop over `work` items of kThreads each: enough to fill the GPU a few times over.
inline int64_t grid_size(int64_t work_items, int device) {
  const int64_t blocks = (work_items + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(multiprocessor_count(device)) * 8;
  return blocks < 1 ? 1 : (blocks < cap ? blocks : cap);
}

template <typename T>
__device__ __forceinline__ T shfl_down(T v, int offset) {
  return __shfl_down_sync(0xffffffffu, v, offset);
}

// Moments merged with Chan's formula; sums merged by addition. Both combine in a fixed tree, so results are
// deterministic.
template <typename A>
struct MomentsOp {
  using State = Moments<A>;
  __device__ static State identity() { return {A(0), A(0), A(0)}; }
  __device__ static State merge(const State& a, const State& b) { return chan_merge(a, b); }
  __device__ static State shfl(const State& s, int offset) {
    return {shfl_down(s.count, offset), shfl_down(s.mean, offset), shfl_down(s.m2, offset)};
  }
};

template <typename A>
struct SumPair {
  A sum_dy, sum_dy_xmu;
};

template <typename A>
struct SumPairOp {
  using State = SumPair<A>;
  __device__ static State identity() { return {A(0), A(0)}; }
  __device__ static State merge(const State& a, const State& b) {
    return {a.sum_dy + b.sum_dy, a.sum_dy_xmu + b.sum_dy_xmu};
  }
  __device__ static State shfl(const State& s, int offset) {
    return {shfl_down(s.sum_dy, offset), shfl_down(s.sum_dy_xmu, offset)};
  }
};

// Reduces one State per thread of a 1-D block; the result is valid in thread 0. `shared` holds a State per warp.
template <typename Op>
__device__ typename Op::State block_reduce(typename Op::State s, typename Op::State* shared) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) s = Op::merge(s, Op::shfl(s, offset));
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  if (lane == 0) shared[warp] = s;
  __syncthreads();
  const int warps = (blockDim.x + kWarpSize - 1) / kWarpSize;
  s = lane < warps ? shared[lane] : Op::identity();
  if (warp == 0) {
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) s = Op::merge(s, Op::shfl(s, offset));
  }
  return s;
}

// VEC consecutive elements, loaded and stored with one 16-byte (or smaller) access when aligned.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Packed {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Packed<T, VEC> load_packed(const T* p) {
  return *reinterpret_cast<const Packed<T, VEC>*>(p);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_packed(T* p, const Packed<T, VEC>& value) {
  *reinterpret_cast<Packed<T, VEC>*>(p) = value;
}

// Elements per 16-byte access for this layout and these pointers, or 1 if any is misaligned or a vector would
// straddle two channels (NCHW: inner % VEC; channels_last: channels % VEC).
template <typename scalar_t>
int vector_width(const Layout& l, std::initializer_list<const void*> pointers) {
  const int vec = 16 / static_cast<int>(sizeof(scalar_t));
  const int64_t run = l.inner > 1 ? l.inner : l.channels;
  if (run % vec != 0) return 1;
  for (const void* p : pointers) {
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;
  }
  return vec;
}

// The channel of each vector a grid-stride loop visits, tracked without a division per step. The vectors of
// a span share a channel (NCHW: `inner / VEC` vectors per span; channels_last: a span is one vector of VEC
// channels), and each span moves `channel_step` channels on, wrapping at C.
struct ChannelWalk {
  int64_t span, channels, channel_step;
  int64_t stride_pos, stride_channel;  // what one grid stride adds: stride % span, and the channels of stride / span

  struct Position {
    int64_t pos;  // vector within its span
    int64_t channel;
  };

  // VEC elements per vector; `stride` vectors per grid step (blocks · threads).
  static ChannelWalk make(const Layout& l, int vec, int64_t stride) {
    const bool planar = l.inner > 1;
    const int64_t span = planar ? l.inner / vec : 1, step = planar ? 1 : vec;
    return {span, l.channels, step, stride % span, (stride / span % l.channels) * step % l.channels};
  }
  // Every step lands in the same channel: the stride is a whole number of channel periods.
  __host__ __device__ bool fixed() const { return stride_pos == 0 && stride_channel == 0; }
  __device__ Position start(int64_t v) const { return {v % span, v / span % channels * channel_step % channels}; }
  // stride_channel + channel_step < 2C, so two subtractions bring the channel back into [0, C).
  __device__ void advance(Position& p) const {
    p.pos += stride_pos;
    p.channel += stride_channel;
    if (p.pos >= span) {
      p.pos -= span;
      p.channel += channel_step;
    }
    if (p.channel >= channels) p.channel -= channels;
    if (p.channel >= channels) p.channel -= channels;
  }
};

// Blocks for an elementwise pass over `l` in vectors of `vec` elements: grid_size's, lowered to a whole number
// of channel periods where that leaves at least one, so that every thread stays in one channel.
inline int64_t walk_grid_size(const Layout& l, int vec, int device) {
  const int64_t blocks = grid_size(l.numel() / vec, device);
  // Vectors after which the sequence of channels repeats.
  const int64_t period = l.inner > 1 ? l.inner / vec * l.channels : l.channels / std::gcd<int64_t>(l.channels, vec);
  const int64_t blocks_per_period = period / std::gcd<int64_t>(period, kThreads);
  return blocks_per_period <= blocks ? blocks / blocks_per_period * blocks_per_period : blocks;
}

// t as a contiguous tensor of `dtype`: t itself, without a dispatcher call, when it already is one (the common
// case for per-channel vectors, several of which every kernel launch takes).
inline at::Tensor dense_as(const at::Tensor& t, at::ScalarType dtype) {
  if (!t.defined() || (t.scalar_type() == dtype && t.is_contiguous())) return t;
  return t.to(dtype).contiguous();
}

template <typename A>
inline const A* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<A>() : nullptr;
}

}  // namespace fusedbn::cuda
