// How the CPU kernels split a dense [outer, C, inner] array (see Layout) into work items.
//
// Reductions are computed per item and merged per channel in item order. Items have a fixed size that
// depends only on the shape, never on the number of threads, so every result is bitwise the same for any
// thread count. Items are also small enough (kItemElems) to stay in L1 between the passes that one item
// makes over its data.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../kernel_args.h"
#include "prefetch.h"

namespace fusedbn::cpu {

constexpr int64_t kItemElems = 4096;     // planar items: elements of one channel
constexpr int64_t kRowItemElems = 65536; // interleaved items: rows × channels (fewer, larger items mean fewer
                                         // per-channel merges, which dominated small channels_last tensors)
constexpr int64_t kGrainElems = 131072;  // elements below which a loop is not worth a thread

// Planar layouts (inner > 1): an item is a run of whole spans of one channel, or a piece of one span.
// A span is the `inner` contiguous values of channel c in outer index o.
struct SpanItem {
  int64_t channel;
  int64_t outer_begin, outer_end;  // spans [outer_begin, outer_end)
  int64_t inner_begin, inner_end;  // positions within each span
};

// The spans (or pieces of one span) of consecutive channels at one outer index o, from position inner_begin to
// inner_end of each: contiguous in memory, since either the run has one channel or its spans are whole.
struct SpanRun {
  int64_t outer;
  int64_t channel_begin, channel_end;
  int64_t inner_begin, inner_end;
};

// Offset of the first element of span (o, c) from position `inner_begin`.
inline int64_t span_offset(const Layout& l, int64_t o, int64_t c, int64_t inner_begin) {
  return (o * l.channels + c) * l.inner + inner_begin;
}

struct PlanarItems {
  Layout layout;
  int64_t pieces_per_span;  // > 1 when one span is longer than an item
  int64_t spans_per_item;   // > 1 when several spans fit in one item
  int64_t per_channel;      // items per channel
  int64_t piece_len;        // positions per piece (the last piece of a span may be shorter)

  explicit PlanarItems(Layout l) : layout(l) {
    pieces_per_span = std::max<int64_t>(1, (l.inner + kItemElems - 1) / kItemElems);
    if (pieces_per_span > 1) {
      spans_per_item = 1;
      per_channel = l.outer * pieces_per_span;
    } else {
      // As many spans as fit in kItemElems, spread evenly over the items: reductions hand out items in memory
      // order (item k of every channel, then item k + 1), so items of unequal size would load one thread more.
      const int64_t most = std::max<int64_t>(1, kItemElems / std::max<int64_t>(l.inner, 1));
      per_channel = (l.outer + most - 1) / most;
      spans_per_item = (l.outer + per_channel - 1) / per_channel;
      per_channel = (l.outer + spans_per_item - 1) / spans_per_item;
    }
    piece_len = (l.inner + pieces_per_span - 1) / pieces_per_span;
  }

  SpanItem item(int64_t channel, int64_t k) const {
    if (pieces_per_span > 1) return piece(k / pieces_per_span, channel, k % pieces_per_span);
    const int64_t o = k * spans_per_item;
    return {channel, o, std::min(layout.outer, o + spans_per_item), 0, layout.inner};
  }

  // Piece p of span (o, c); the whole span when pieces_per_span == 1.
  SpanItem piece(int64_t o, int64_t channel, int64_t p) const {
    return {channel, o, o + 1, p * piece_len, std::min(layout.inner, (p + 1) * piece_len)};
  }

  int64_t item_elems() const { return pieces_per_span > 1 ? piece_len : spans_per_item * layout.inner; }

  // In a channel-at-a-time pass, the offset of the first value of the item read after item k of channel c (item
  // k + 1, or the next channel's first), for the reductions to prefetch; −1 where there is none or where it
  // follows item k in memory (the next piece of a span).
  int64_t next_item_offset(int64_t channel, int64_t k) const {
    const SpanItem it = item(channel, k);
    const bool last = k + 1 == per_channel;
    if (last && channel + 1 == layout.channels) return -1;
    const SpanItem next = last ? item(channel + 1, 0) : item(channel, k + 1);
    const int64_t begin = span_offset(layout, next.outer_begin, next.channel, next.inner_begin);
    const int64_t end = span_offset(layout, it.outer_end - 1, it.channel, it.inner_end);
    return begin == end ? -1 : begin;
  }
};

// Interleaved layouts (inner == 1): an item is a block of rows holding every channel, at most kRowItemElems
// values, with the rows spread evenly over the items. Blocks of the full size and a short last one split
// (8, 512, 7, 7) into items of 128, 128, 128 and 8 rows, and two threads into 256 and 136 rows.
inline int64_t rows_per_item(const Layout& l) {
  const int64_t most = std::max<int64_t>(1, kRowItemElems / std::max<int64_t>(l.channels, 1));
  const int64_t items = (l.outer + most - 1) / most;
  return items > 0 ? (l.outer + items - 1) / items : most;
}

inline int64_t grain_items(int64_t item_elems) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(item_elems, 1));
}

// Whether to run a pass one channel at a time (NCHW only), which reads the data from memory once instead of
// twice. `tensors` is how many tensors of the input's size the pass reads (x; or x and dy). Worth it when
//  - the channel's data fits in L2, so that the second read comes from there;
//  - its spans are at least a page long: a channel of short spans lies scattered over C·inner-element strides, and
//    reading it span by span from L3 or memory is latency-bound (at (32, 256, 14, 14), 784-byte spans, the two
//    memory-order passes are faster);
//  - the data (every tensor the pass reads) is at least half the 32 MB L3 of this project's machine. Below that, the
//    second of two memory-order passes reads from L3 and they are faster: in bench_cpu's shuffled rounds the float32
//    BN+ReLU steps of (8, 512, 7, 7) and (1, 64, 112, 112) took 2-10 % less time, bfloat16 (32, 64, 56, 56)'s
//    training forward 27 % less. Above it, float32 (32, 64, 56, 56), 26 MB a tensor, one channel at a time is 12 %
//    faster (HISTORY.md, session 21).
// Results do not depend on it: both paths use the same items and merge order.
inline bool channel_at_a_time(const Layout& l, int64_t element_bytes, int64_t tensors) {
  constexpr int64_t kPageBytes = 4096, kHalfL3Bytes = 16 * 1024 * 1024;
  const int64_t channel_bytes = l.count_per_channel() * element_bytes * tensors;
  if (l.inner <= 1 || l.inner * element_bytes < kPageBytes || channel_bytes > kL2Bytes) return false;
  return channel_bytes * l.channels >= kHalfL3Bytes;
}

// Channels per thread in a channel-at-a-time pass: at least 16 384 values each. These passes do more work per
// value than a single elementwise loop, so they are worth a thread sooner (kGrainElems made 65 536-value tensors
// slower); a grain of one channel woke the thread pool for every tiny tensor (fork and join cost about 2 µs).
inline int64_t channel_grain(const Layout& l) {
  constexpr int64_t kChannelGrainElems = 16384;
  return std::max<int64_t>(1, kChannelGrainElems / std::max<int64_t>(l.count_per_channel(), 1));
}

// Per-channel reduction. span_fn(const SpanItem&) -> Partial for planar layouts;
// rows_fn(row_begin, row_end, Partial* per_channel) for interleaved ones; merge(Partial, Partial) -> Partial.
// Returns one Partial per channel; `zero` is the identity of merge.
template <typename Partial, typename SpanFn, typename RowsFn, typename Merge>
std::vector<Partial> reduce_per_channel(const Layout& l, Partial zero, const SpanFn& span_fn,
                                        const RowsFn& rows_fn, const Merge& merge) {
  const int64_t C = l.channels;
  std::vector<Partial> result(C, zero);
  if (l.numel() == 0) return result;
  std::vector<Partial> partials;
  int64_t per_channel;
  if (l.inner > 1) {
    const PlanarItems items(l);
    per_channel = items.per_channel;
    partials.assign(C * per_channel, zero);
    // In memory order: for each outer index, every channel's item (or each piece of its span in turn). Channel
    // by channel, the reads jumped C·inner elements from one item to the next (statistics of bfloat16
    // (32, 64, 56, 56) 11–18 % slower).
    const int64_t pieces = items.pieces_per_span;
    at::parallel_for(0, C * per_channel, grain_items(items.item_elems()), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t c = (i / pieces) % C, k = i / (C * pieces) * pieces + i % pieces;
        partials[c * per_channel + k] = span_fn(items.item(c, k));
      }
    });
  } else {
    const int64_t rows = rows_per_item(l);
    const int64_t n_items = (l.outer + rows - 1) / rows;
    partials.assign(n_items * C, zero);
    at::parallel_for(0, n_items, grain_items(rows * C), [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        rows_fn(k * rows, std::min(l.outer, (k + 1) * rows), partials.data() + k * C);
      }
    });
    per_channel = n_items;
  }
  // Planar partials are [channel][item], interleaved ones [item][channel]; each channel merges in item order.
  // Interleaved: item by item, each merged into every channel's accumulator in one loop over the channels, which
  // gcc vectorises (a channel's chain of merges, one after another, waited on each merge's division).
  at::parallel_for(0, C, std::max<int64_t>(1, 4096 / per_channel), [&](int64_t begin, int64_t end) {
    Partial* __restrict__ acc = result.data();
    if (l.inner > 1) {
      for (int64_t c = begin; c < end; ++c) {
        for (int64_t k = 0; k < per_channel; ++k) acc[c] = merge(acc[c], partials[c * per_channel + k]);
      }
      return;
    }
    for (int64_t k = 0; k < per_channel; ++k) {
      const Partial* __restrict__ item = partials.data() + k * C;
#pragma omp simd
      for (int64_t c = begin; c < end; ++c) acc[c] = merge(acc[c], item[c]);
    }
  });
  return result;
}

// Elementwise pass. run_fn(const SpanRun&) for planar layouts; rows_fn(row_begin, row_end) for interleaved ones.
// Planar spans are visited in memory order (consecutive channels of one outer index, then the next), not channel
// by channel: a channel's spans lie C·inner elements apart, and walking them in that order costs a TLB miss per
// span when spans are short. Elementwise results do not depend on the order.
template <typename RunFn, typename RowsFn>
void for_each_item(const Layout& l, const RunFn& run_fn, const RowsFn& rows_fn) {
  if (l.numel() == 0) return;
  if (l.inner > 1) {
    const PlanarItems items(l);
    const int64_t pieces = items.pieces_per_span, C = l.channels;
    at::parallel_for(0, l.outer * C * pieces, grain_items(items.piece_len), [&](int64_t begin, int64_t end) {
      if (pieces == 1) {  // whole spans: runs of channels, up to the end of an outer index
        for (int64_t i = begin; i < end;) {
          const int64_t o = i / C, c = i % C, n = std::min(end - i, C - c);
          run_fn(SpanRun{o, c, c + n, 0, l.inner});
          i += n;
        }
      } else {
        for (int64_t i = begin; i < end; ++i) {
          const SpanItem it = items.piece(i / pieces / C, i / pieces % C, i % pieces);
          run_fn(SpanRun{it.outer_begin, it.channel, it.channel + 1, it.inner_begin, it.inner_end});
        }
      }
    });
  } else {
    at::parallel_for(0, l.outer, grain_items(l.channels), [&](int64_t begin, int64_t end) { rows_fn(begin, end); });
  }
}

}  // namespace fusedbn::cpu
