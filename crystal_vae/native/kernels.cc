// CPU kernels of the model as XLA FFI custom calls, channels-last, float32
// (crystal_vae/native/kernels.py compiles this file on first use and registers the handlers):
//
//   CrystalVaeCorrelate:      x (B, D, H, W, C), k (KD, KH, KW, C, O) -> y (B, Do, Ho, Wo, O)
//                             y[b, p, o] = sum_{t, c} x[b, s * p + t - low, c] k[t, c, o], x read
//                             as 0 outside its sides (implicit padding: `low` before, whatever
//                             the output sides need after); at stride s = 1 the input gradient is
//                             this call on the cotangent with the flipped, transposed kernel
//   CrystalVaeKernelGradient: x (B, D, H, W, C), g (B, Do, Ho, Wo, O) -> dk (KD, KH, KW, C, O)
//                             dk[t, c, o] = sum_{b, p} x[b, s * p + t - low, c] g[b, p, o]
//   CrystalVaeStridedInputGradient: g (B, Do, Ho, Wo, O), k as (KD, KH, KW, O, C) -> dx (B, Dp,
//                             Hp, Wp, C), the input gradient at stride s > 1 (C % 8 = 0)
//   CrystalVaeMaxPool2:       x (B, D, H, W, C) -> y (B, D', H', W', C), the maxima over 2x2x2
//                             windows at stride 2 (D' = ceil(D / 2): SAME), and (u8, same shape)
//                             which of the window's 8 voxels held it (the first, in (d, h, w) order)
//   CrystalVaeMaxPool2Transpose: g (y's shape), that index -> dx (x's shape), g at the maxima
//   CrystalVaeChannelSums:    a (N, C), b (N, C), shift (C) -> (2, C): sum_n a[n, c] and
//                             sum_n a[n, c] * (b[n, c] - shift[c]) (batch normalisation's sums)
//   CrystalVaeUpsample2:      x (B, D, H, W, C) -> (B, 2D, 2H, 2W, C), trilinear with half-pixel
//                             centres and clamped edges (jax.image.resize's "trilinear" at x2)
//   CrystalVaeUpsample2Transpose: its adjoint, (B, 2D, 2H, 2W, C) -> (B, D, H, W, C)
//   CrystalVaeClassMax:       x (N, C) -> the maximum of each row (N) and (s32) the index of
//                             its first occurrence (jnp.max and jnp.argmax over the classes)
//   CrystalVaeAdam:           optax.adam's step on many arrays (parameters, gradients, moments)
//                             in one pass over each, in place where XLA aliases them; also the
//                             sum of the squared gradients
//   CrystalVaeSumOfSquares:   arrays -> the sum of the squares of all their elements
// The first three take an attribute `stride` (s, the same along all three axes), the first two
// `low` (the padding before each spatial axis; the third's input is padded). O must be 1 or a
// multiple of 8 (the caller pads the channels). Each output row keeps its partial sums in vector
// registers over all kernel taps, so memory sees each output once; the work is split over
// (batch, depth) into one part per CPU the process may run on, the parts run by XLA's own
// thread pool (each handler takes it from the call's context).

#include <sched.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using Array5 = ffi::Buffer<ffi::F32, 5>;  // names without a comma, for the macros below
using Array2 = ffi::Buffer<ffi::F32, 2>;
using Array1 = ffi::Buffer<ffi::F32, 1>;
using Labels1 = ffi::Buffer<ffi::S32, 1>;

namespace {

typedef float v8f __attribute__((vector_size(32)));
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef double v8d __attribute__((vector_size(64)));
typedef int v16i __attribute__((vector_size(64)));

inline v8f Load(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void Store(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }
inline v8f Splat(float a) { return v8f{a, a, a, a, a, a, a, a}; }  // not v8f{} + a: an add
inline v16f Load16(const float* p) {
  v16f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void Store16(float* p, v16f v) { std::memcpy(p, &v, sizeof v); }
// {p[0], p[1], p[0], p[1], ...}: one 64-bit broadcast.
inline v16f SplatPair(const float* p) {
  double pair;
  std::memcpy(&pair, p, sizeof pair);
  const v8d pairs = {pair, pair, pair, pair, pair, pair, pair, pair};
  v16f v;
  std::memcpy(&v, &pairs, sizeof v);
  return v;
}

int CpuCount() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

// The thread pool of the XLA call this thread serves (set by each handler for its duration).
thread_local ffi::ThreadPool* tls_pool = nullptr;
struct PoolScope {
  explicit PoolScope(ffi::ThreadPool& pool) : previous(tls_pool) { tls_pool = &pool; }
  ~PoolScope() { tls_pool = previous; }
  ffi::ThreadPool* previous;
};

inline void CpuRelax() {
#if defined(__x86_64__)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

// body(thread, first, last) over [0, n) in contiguous parts, `threads` of them: the first on this
// thread, the others handed to the thread pool of the XLA call being served (`PoolScope`); a part
// the pool has not started when this thread is done with its own is done here. The pool's
// threads are XLA's own, awake between its operations: starting a thread per call cost ~46 us
// and oversubscribed the cores while XLA ran other work (the `cpu` step 96.7 -> 90.8 ms).
template <typename Body>
void ParallelFor(int64_t n, int64_t threads, Body body) {
  auto run = [&](int64_t t) { body(t, n * t / threads, n * (t + 1) / threads); };
  if (threads <= 1 || tls_pool == nullptr) {
    for (int64_t t = 0; t < threads; ++t) run(t);
    return;
  }
  // Per part: 0 waiting, 1 claimed (by the pool or this thread), 2 done by the pool. A pool task
  // that starts late finds its part claimed and returns without touching `run`.
  auto states = std::make_shared<std::vector<std::atomic<int>>>(threads);
  for (auto& state : *states) state.store(0);
  for (int64_t t = 1; t < threads; ++t) {
    tls_pool->Schedule([states, t, &run] {
      int waiting = 0;
      if ((*states)[t].compare_exchange_strong(waiting, 1)) {
        run(t);
        (*states)[t].store(2, std::memory_order_release);
      }
    });
  }
  run(0);
  for (int64_t t = 1; t < threads; ++t) {
    int waiting = 0;
    if ((*states)[t].compare_exchange_strong(waiting, 1)) {
      run(t);
    } else {
      while ((*states)[t].load(std::memory_order_acquire) != 2) CpuRelax();
    }
  }
}

// body(item) for each item of [0, items), the items split between the threads.
template <typename Body>
void ForEachItem(int64_t items, Body body) {
  ParallelFor(items, std::min<int64_t>(CpuCount(), items), [&](int64_t, int64_t first,
                                                               int64_t last) {
    for (int64_t item = first; item < last; ++item) body(item);
  });
}

struct Shape {  // of a correlation: input sides, taps, channels, padding before, output sides
  int64_t batch, depth, height, width, in, taps_d, taps_h, taps_w, out, stride;
  int64_t low_d, low_h, low_w, out_d, out_h, out_w;
  // Floats between neighbouring outputs of y along the width, height, depth and batch: dense
  // (WithDenseOutput), or every stride-th place of a bigger grid (StridedInputGradient).
  int64_t y_w, y_h, y_d, y_b;
  int64_t step() const { return stride * in; }  // input floats between neighbouring outputs
  int64_t tap_size() const { return in * out; }  // kernel floats per tap
};

Shape WithDenseOutput(Shape s) {
  s.y_w = s.out;
  s.y_h = s.out_w * s.y_w;
  s.y_d = s.out_h * s.y_h;
  s.y_b = s.out_d * s.y_d;
  return s;
}

// The outputs p < count whose input p * stride + offset lies in [0, size): [first, last).
struct Range {
  int64_t first, last;
  int64_t size() const { return std::max<int64_t>(last - first, 0); }
};
Range Inside(int64_t offset, int64_t size, int64_t stride, int64_t count) {
  const int64_t first = offset >= 0 ? 0 : (stride - 1 - offset) / stride;
  const int64_t last = size - 1 - offset < 0 ? 0 : (size - 1 - offset) / stride + 1;
  return {first, std::min(last, count)};
}

// The taps of one output row that read inside the input: `ni` x `nj` x taps_w of them from tap
// (i0, j0, 0) on, tap number first_tap, where the row's first output reads `x` (input floats
// `plane` apart along the depth, `row` along the height).
struct Window {
  int64_t plane, row, ni, nj, first_tap;
};

// WB outputs of one row, 8 * OV output channels from `o0`, summed over all taps and channels.
template <int WB, int OV>
void RowBlock(const Shape& s, const Window& win, const float* x, const float* k, float* y,
              int64_t o0, bool accumulate) {
  v8f acc[WB][OV];
  for (int w = 0; w < WB; ++w)
    for (int v = 0; v < OV; ++v) acc[w][v] = accumulate ? Load(y + w * s.y_w + o0 + 8 * v) : Splat(0.f);
  const int64_t span = s.taps_w * s.in;  // a row of taps: (tap, channel) runs on in x and k
  for (int64_t i = 0; i < win.ni; ++i)
    for (int64_t j = 0; j < win.nj; ++j) {
      const float* kt =
          k + (win.first_tap + (i * s.taps_h + j) * s.taps_w) * s.tap_size() + o0;
      const float* xt = x + i * win.plane + j * win.row;
      for (int64_t c = 0; c < span; ++c) {
        v8f kv[OV];
        for (int v = 0; v < OV; ++v) kv[v] = Load(kt + c * s.out + 8 * v);
        for (int w = 0; w < WB; ++w) {
          const v8f xv = Splat(xt[w * s.step() + c]);
          for (int v = 0; v < OV; ++v) acc[w][v] += xv * kv[v];
        }
      }
    }
  for (int w = 0; w < WB; ++w)
    for (int v = 0; v < OV; ++v) Store(y + w * s.y_w + o0 + 8 * v, acc[w][v]);
}

// Writes (or with `accumulate` adds) the sums of a pairs block: each register's even and odd
// lanes (the two input-channel parities) added, 8 output channels per register.
template <int WB, int OV>
void StorePairSums(const Shape& s, const v16f (&acc)[WB][OV], float* y, int64_t o0,
                   bool accumulate) {
  const v16i even = {0, 2, 4, 6, 8, 10, 12, 14, 0, 2, 4, 6, 8, 10, 12, 14};
  for (int w = 0; w < WB; ++w)
    for (int v = 0; v < OV; ++v) {
      v16f sum = __builtin_shuffle(acc[w][v], even) + __builtin_shuffle(acc[w][v], even + 1);
      float* target = y + w * s.y_w + o0 + 8 * v;
      if (accumulate) {
        const v8f before = Load(target);
        for (int lane = 0; lane < 8; ++lane) sum[lane] += before[lane];
      }
      std::memcpy(target, &sum, 8 * sizeof(float));
    }
}

// RowBlock for an even number of input channels, with lanes (output channel, input channel
// parity): one broadcast of an input-channel pair feeds 16 products instead of 8. `pairs` is the
// kernel of output channels o0 .. o0 + 8 * OV as (tap, channel pair, output channel, parity),
// contiguous (built in Correlate).
template <int WB, int OV>
void RowBlockPairs(const Shape& s, const Window& win, const float* x, const float* pairs,
                   float* y, int64_t o0, bool accumulate) {
  constexpr int64_t kWidth = 8 * OV;  // output channels
  v16f acc[WB][OV];
  for (int w = 0; w < WB; ++w)
    for (int v = 0; v < OV; ++v) acc[w][v] = v16f{};
  const int64_t span = s.taps_w * s.in;  // a row of taps: (tap, channel) runs on in x and k
  for (int64_t i = 0; i < win.ni; ++i)
    for (int64_t j = 0; j < win.nj; ++j) {
      const float* kt = pairs + (win.first_tap + (i * s.taps_h + j) * s.taps_w) * s.in * kWidth;
      const float* xt = x + i * win.plane + j * win.row;
      for (int64_t c = 0; c < span; c += 2) {
        v16f kv[OV];
        for (int v = 0; v < OV; ++v) kv[v] = Load16(kt + c * kWidth + 16 * v);
        for (int w = 0; w < WB; ++w) {
          const v16f xv = SplatPair(xt + w * s.step() + c);
          for (int v = 0; v < OV; ++v) acc[w][v] += xv * kv[v];
        }
      }
    }
  StorePairSums<WB, OV>(s, acc, y, o0, accumulate);
}

// RowBlockPairs<WB, 1> at stride 1 for a kernel TW taps wide: each broadcast of an input pair
// feeds every output of the block that reads it (up to TW of them, one kernel tap each).
template <int WB, int TW>
void RowBlockPairsShared(const Shape& s, const Window& win, const float* x, const float* pairs,
                         float* y, int64_t o0, bool accumulate) {
  v16f acc[WB][1];
  for (int w = 0; w < WB; ++w) acc[w][0] = v16f{};
  for (int64_t i = 0; i < win.ni; ++i)
    for (int64_t j = 0; j < win.nj; ++j) {
      const float* kt = pairs + (win.first_tap + (i * s.taps_h + j) * TW) * s.in * 8;
      const float* xt = x + i * win.plane + j * win.row;
      for (int64_t c = 0; c < s.in; c += 2) {
        v16f kv[TW];
        for (int t = 0; t < TW; ++t) kv[t] = Load16(kt + (t * s.in + c) * 8);
        for (int col = 0; col < WB + TW - 1; ++col) {
          const v16f xv = SplatPair(xt + col * s.in + c);
          for (int t = 0; t < TW; ++t) {
            const int w = col - t;
            if (w >= 0 && w < WB) acc[w][0] += xv * kv[t];
          }
        }
      }
    }
  StorePairSums<WB, 1>(s, acc, y, o0, accumulate);
}

// RowBlockPairs, or for 8 output channels at stride 1 RowBlockPairsShared (with one vector of
// outputs a broadcast feeds a single product otherwise; with two it is slower: 2-3x, spilling).
template <int WB, int OV>
void RowBlockPairsBest(const Shape& s, const Window& win, const float* x, const float* pairs,
                       float* y, int64_t o0, bool accumulate) {
  if constexpr (OV == 1) {
    if (s.stride == 1 && s.taps_w == 3) {
      return RowBlockPairsShared<WB, 3>(s, win, x, pairs, y, o0, accumulate);
    }
    if (s.stride == 1 && s.taps_w == 4) {
      return RowBlockPairsShared<WB, 4>(s, win, x, pairs, y, o0, accumulate);
    }
    if (s.stride == 1 && s.taps_w == 5) {
      return RowBlockPairsShared<WB, 5>(s, win, x, pairs, y, o0, accumulate);
    }
  }
  RowBlockPairs<WB, OV>(s, win, x, pairs, y, o0, accumulate);
}

// Output channels [o0, o1) of a block of WB outputs, 16 (then 8) at a time; `pairs` (where
// not null) is the paired kernel of these channels.
template <int WB>
void RowBlockChannels(const Shape& s, const Window& win, const float* x, const float* k,
                      float* y, const float* pairs, int64_t o0, int64_t o1, bool accumulate) {
  if (pairs != nullptr) {
    const int64_t taps = s.taps_d * s.taps_h * s.taps_w;
    for (; o0 + 16 <= o1; o0 += 16, pairs += taps * s.in * 16) {
      RowBlockPairsBest<WB, 2>(s, win, x, pairs, y, o0, accumulate);
    }
    for (; o0 < o1; o0 += 8, pairs += taps * s.in * 8) {
      RowBlockPairsBest<WB, 1>(s, win, x, pairs, y, o0, accumulate);
    }
    return;
  }
  for (; o0 + 16 <= o1; o0 += 16) RowBlock<WB, 2>(s, win, x, k, y, o0, accumulate);
  for (; o0 < o1; o0 += 8) RowBlock<WB, 1>(s, win, x, k, y, o0, accumulate);
}

constexpr int64_t kMaxBlock = 12;  // outputs per block: 12 x 2 accumulators + 3 of 32 registers

// `count` (<= kMaxBlock) outputs of a row, in one block.
void RowBlockOf(int64_t count, const Shape& s, const Window& win, const float* x, const float* k,
                float* y, const float* pairs, int64_t o0, int64_t o1, bool accumulate) {
  switch (count) {
#define CRYSTAL_VAE_BLOCK(n) \
  case n: return RowBlockChannels<n>(s, win, x, k, y, pairs, o0, o1, accumulate);
    CRYSTAL_VAE_BLOCK(1) CRYSTAL_VAE_BLOCK(2) CRYSTAL_VAE_BLOCK(3) CRYSTAL_VAE_BLOCK(4)
    CRYSTAL_VAE_BLOCK(5) CRYSTAL_VAE_BLOCK(6) CRYSTAL_VAE_BLOCK(7) CRYSTAL_VAE_BLOCK(8)
    CRYSTAL_VAE_BLOCK(9) CRYSTAL_VAE_BLOCK(10) CRYSTAL_VAE_BLOCK(11)
#undef CRYSTAL_VAE_BLOCK
    default: return RowBlockChannels<kMaxBlock>(s, win, x, k, y, pairs, o0, o1, accumulate);
  }
}

// One output channel: WB outputs of a row, each a dot product over taps and input channels, with
// the input channels in the lanes (one horizontal sum per output).
template <int WB>
void SingleOutBlock(const Shape& s, const Window& win, const float* x, const float* k, float* y) {
  const int64_t span = s.taps_w * s.in, vectors = span / 8 * 8;  // (tap, channel) runs on
  v8f acc[WB];
  float rest[WB];
  for (int w = 0; w < WB; ++w) {
    acc[w] = Splat(0.f);
    rest[w] = 0.f;
  }
  for (int64_t i = 0; i < win.ni; ++i)
    for (int64_t j = 0; j < win.nj; ++j) {
      const float* kt = k + (win.first_tap + (i * s.taps_h + j) * s.taps_w) * s.in;
      const float* xt = x + i * win.plane + j * win.row;
      for (int64_t c = 0; c < vectors; c += 8) {
        const v8f kv = Load(kt + c);
        for (int w = 0; w < WB; ++w) acc[w] += Load(xt + w * s.step() + c) * kv;
      }
      for (int64_t c = vectors; c < span; ++c)
        for (int w = 0; w < WB; ++w) rest[w] += xt[w * s.step() + c] * kt[c];
    }
  for (int w = 0; w < WB; ++w) {
    for (int lane = 0; lane < 8; ++lane) rest[w] += acc[w][lane];
    y[w * s.y_w] = rest[w];
  }
}

void RowSingleOut(const Shape& s, const Window& win, const float* x, const float* k, float* y) {
  int64_t w = 0;
  for (; w + 8 <= s.out_w; w += 8) SingleOutBlock<8>(s, win, x + w * s.step(), k, y + w * s.y_w);
  for (; w < s.out_w; ++w) SingleOutBlock<1>(s, win, x + w * s.step(), k, y + w * s.y_w);
}

// block(first, count) over `outputs` in blocks of at most `max_block`, as even as they allow
// (20 = 10 + 10, not 12 + 8: every block keeps enough independent sums in flight).
template <typename Block>
void EvenBlocks(int64_t outputs, int64_t max_block, Block block) {
  const int64_t blocks = (outputs + max_block - 1) / max_block;
  for (int64_t b = 0, first = 0; b < blocks; ++b) {
    const int64_t count = (outputs - first + blocks - b - 1) / (blocks - b);
    block(first, count);
    first += count;
  }
}

// Output channels [o0, o1) of one row (added to y if `accumulate`), in EvenBlocks of at most
// kMaxBlock outputs.
void Row(const Shape& s, const Window& win, const float* x, const float* k, float* y,
         const float* pairs, int64_t o0, int64_t o1, bool accumulate) {
  EvenBlocks(s.out_w, kMaxBlock, [&](int64_t w, int64_t count) {
    RowBlockOf(count, s, win, x + w * s.step(), k, y + w * s.y_w, pairs, o0, o1, accumulate);
  });
}

// RowBlockPairs<WB, 4> for 32 output channels from o0: the paired kernels of two groups of 16
// (`pairs`, then `group` floats on). Each broadcast feeds four products (two with 16 channels):
// fewer loads per product.
template <int WB>
void RowBlockPairs32(const Shape& s, const Window& win, const float* x, const float* pairs,
                     int64_t group, float* y, int64_t o0, bool accumulate) {
  v16f acc[WB][4];
  for (int w = 0; w < WB; ++w)
    for (int v = 0; v < 4; ++v) acc[w][v] = v16f{};
  const int64_t span = s.taps_w * s.in;
  for (int64_t i = 0; i < win.ni; ++i)
    for (int64_t j = 0; j < win.nj; ++j) {
      const float* kt = pairs + (win.first_tap + (i * s.taps_h + j) * s.taps_w) * s.in * 16;
      const float* xt = x + i * win.plane + j * win.row;
      for (int64_t c = 0; c < span; c += 2) {
        const v16f k0 = Load16(kt + c * 16), k1 = Load16(kt + c * 16 + 16);
        const v16f k2 = Load16(kt + group + c * 16), k3 = Load16(kt + group + c * 16 + 16);
        for (int w = 0; w < WB; ++w) {
          const v16f xv = SplatPair(xt + w * s.step() + c);
          acc[w][0] += xv * k0;
          acc[w][1] += xv * k1;
          acc[w][2] += xv * k2;
          acc[w][3] += xv * k3;
        }
      }
    }
  StorePairSums<WB, 4>(s, acc, y, o0, accumulate);
}

constexpr int64_t kMaxBlock32 = 6;  // 6 x 4 accumulators + 4 kernel vectors + 1 broadcast

// Row for 32 output channels from o0, in EvenBlocks of at most kMaxBlock32 outputs.
void Row32(const Shape& s, const Window& win, const float* x, const float* pairs, int64_t group,
           float* y, int64_t o0, bool accumulate) {
  EvenBlocks(s.out_w, kMaxBlock32, [&](int64_t w, int64_t count) {
    const float* xb = x + w * s.step();
    float* yb = y + w * s.y_w;
    switch (count) {
      case 1: return RowBlockPairs32<1>(s, win, xb, pairs, group, yb, o0, accumulate);
      case 2: return RowBlockPairs32<2>(s, win, xb, pairs, group, yb, o0, accumulate);
      case 3: return RowBlockPairs32<3>(s, win, xb, pairs, group, yb, o0, accumulate);
      case 4: return RowBlockPairs32<4>(s, win, xb, pairs, group, yb, o0, accumulate);
      case 5: return RowBlockPairs32<5>(s, win, xb, pairs, group, yb, o0, accumulate);
      default: return RowBlockPairs32<6>(s, win, xb, pairs, group, yb, o0, accumulate);
    }
  });
}

// The depth and height padding is skipped (the taps that read it are left out of each row's
// window); the width padding is made of zeros: each thread copies the input planes its items read
// into a buffer with zero columns on both sides (each plane once per batch item, just before
// its first use), unless the width needs no padding.
void Correlate(const Shape& s, const float* x, const float* k, float* y) {
  const int64_t high_w = (s.out_w - 1) * s.stride + s.taps_w - s.low_w - s.width;
  const bool pad_w = s.low_w > 0 || high_w > 0;
  const int64_t padded_w = s.width + (pad_w ? s.low_w + std::max<int64_t>(high_w, 0) : 0);
  const int64_t row = padded_w * s.in, plane = s.height * row;
  // The kernel for RowBlockPairs, where it applies: per 16 output channels (then 8), contiguous
  // (read in order, each cache line whole) and 64-byte aligned.
  const int64_t taps = s.taps_d * s.taps_h * s.taps_w;
  std::vector<float> paired;
  float* pairs = nullptr;
  if (s.in % 2 == 0 && s.out > 1) {
    paired.resize(taps * s.in * s.out + 16);
    pairs = paired.data() + (16 - reinterpret_cast<uintptr_t>(paired.data()) / 4 % 16) % 16;
    for (int64_t o0 = 0; o0 < s.out; o0 += 16) {
      const int64_t width = std::min<int64_t>(16, s.out - o0);
      float* chunk = pairs + o0 * taps * s.in;
      for (int64_t tap = 0; tap < taps; ++tap)
        for (int64_t c = 0; c < s.in; ++c)
          for (int64_t o = 0; o < width; ++o) {
            chunk[(tap * s.in + c - c % 2) * width + 2 * o + c % 2] =
                k[(tap * s.in + c) * s.out + o0 + o];
          }
    }
  }
  // Kernel depth planes per group: 16 output channels of a group's taps fit in kSliceBytes.
  constexpr int64_t kSliceBytes = 256 << 10;
  const int64_t group = std::clamp<int64_t>(
      kSliceBytes / (s.taps_h * s.taps_w * s.in * 16 * sizeof(float)), 1, s.taps_d);
  // Whether output channels o0 .. o0 + 32 go through Row32: where its blocks hold at least 5
  // outputs, 1-17% faster than two 16s; blocks of 4 (rows of 8) are 10-25% slower.
  const bool wide_rows = s.out_w / ((s.out_w + kMaxBlock32 - 1) / kMaxBlock32) >= 5;
  auto wide = [&](int64_t o0) { return wide_rows && pairs != nullptr && o0 + 32 <= s.out; };
  const int64_t items = s.batch * s.out_d;
  ParallelFor(items, std::min<int64_t>(CpuCount(), items), [&](int64_t, int64_t first,
                                                               int64_t last) {
    std::vector<float> buffer(pad_w ? s.depth * plane : 0, 0.f);
    int64_t copied_b = -1, copied_to = 0;  // the buffer holds planes [.., copied_to) of item copied_b
    for (int64_t item = first; item < last; ++item) {
      const int64_t b = item / s.out_d, d = item % s.out_d;
      const Range taps_d = Inside(d * s.stride - s.low_d, s.depth, 1, s.taps_d);
      float* yi = y + b * s.y_b + d * s.y_d;
      if (taps_d.size() == 0) {
        for (int64_t h = 0; h < s.out_h; ++h)
          for (int64_t w = 0; w < s.out_w; ++w) {
            float* yw = yi + h * s.y_h + w * s.y_w;
            std::fill(yw, yw + s.out, 0.f);
          }
        continue;
      }
      // The input plane under tap taps_d.first, then the next ones.
      const int64_t q0 = d * s.stride - s.low_d + taps_d.first, q1 = q0 + taps_d.size();
      const float* planes = x + (b * s.depth + q0) * s.height * s.width * s.in;
      if (pad_w) {
        if (b != copied_b) copied_b = b, copied_to = 0;
        for (int64_t q = std::max(q0, copied_to); q < q1; ++q)
          for (int64_t r = 0; r < s.height; ++r) {
            std::memcpy(buffer.data() + q * plane + r * row + s.low_w * s.in,
                        x + ((b * s.depth + q) * s.height + r) * s.width * s.in,
                        s.width * s.in * sizeof(float));
          }
        copied_to = std::max(copied_to, q1);
        planes = buffer.data() + q0 * plane;
      }
      if (s.out == 1) {
        for (int64_t h = 0; h < s.out_h; ++h) {
          const Range taps_h = Inside(h * s.stride - s.low_h, s.height, 1, s.taps_h);
          float* yr = yi + h * s.y_h;
          if (taps_h.size() == 0) {
            for (int64_t w = 0; w < s.out_w; ++w) yr[w * s.y_w] = 0.f;
            continue;
          }
          const Window win{plane, row, taps_d.size(), taps_h.size(),
                           (taps_d.first * s.taps_h + taps_h.first) * s.taps_w};
          RowSingleOut(s, win, planes + (h * s.stride - s.low_h + taps_h.first) * row, k, yr);
        }
        continue;
      }
      // 32 (else 16) output channels at a time over all rows, their kernel taps in groups of depth
      // planes that stay in cache (partial sums added up in y between groups).
      for (int64_t o0 = 0; o0 < s.out; o0 += wide(o0) ? 32 : 16) {
        const int64_t o1 = std::min(s.out, o0 + (wide(o0) ? 32 : 16));
        for (int64_t i0 = taps_d.first; i0 < taps_d.last; i0 += group) {
          const int64_t i1 = std::min(taps_d.last, i0 + group);
          for (int64_t h = 0; h < s.out_h; ++h) {
            const Range taps_h = Inside(h * s.stride - s.low_h, s.height, 1, s.taps_h);
            float* yr = yi + h * s.y_h;
            if (taps_h.size() == 0) {
              if (i0 == taps_d.first) {
                for (int64_t w = 0; w < s.out_w; ++w) std::fill(yr + w * s.y_w + o0, yr + w * s.y_w + o1, 0.f);
              }
              continue;
            }
            const Window win{plane, row, i1 - i0, taps_h.size(),
                             (i0 * s.taps_h + taps_h.first) * s.taps_w};
            const float* xr = planes + (i0 - taps_d.first) * plane + (h * s.stride - s.low_h + taps_h.first) * row;
            if (wide(o0)) {
              Row32(s, win, xr, pairs + o0 * taps * s.in, taps * s.in * 16, yr, o0, i0 > taps_d.first);
            } else {
              Row(s, win, xr, k, yr, pairs == nullptr ? nullptr : pairs + o0 * taps * s.in, o0, o1,
                  i0 > taps_d.first);
            }
          }
        }
      }
    }
  });
}

// One (batch, depth) plane's outputs that read inside the input at one tap: `rows` x `cols` of
// them from `g`, reading from `x` on (input floats stride * width * in apart between rows).
struct PlaneSpan {
  const float* x;
  const float* g;
  int64_t rows, cols;
};

// Adds to dk[tap, c0:c0+CB, o0:o0+8] the sums over one plane of x * g, with the output channels
// in the vector lanes (one broadcast of x per 8 products).
template <int CB>
void PlaneTapByOut(const Shape& s, const PlaneSpan& p, float* dk, int64_t c0, int64_t o0) {
  constexpr int CH = CB >= 4 ? 1 : 4 / CB;  // independent chains: at least 4 sums in flight
  const int64_t sh = s.stride * s.width * s.in, step = s.step();
  v8f acc[CH][CB];
  for (int u = 0; u < CH; ++u)
    for (int c = 0; c < CB; ++c) acc[u][c] = Splat(0.f);
  for (int64_t h = 0; h < p.rows; ++h) {
    const float* xr = p.x + h * sh + c0;
    const float* gr = p.g + h * s.out_w * s.out + o0;
    int64_t w = 0;
    for (; w + CH <= p.cols; w += CH)
      for (int u = 0; u < CH; ++u) {
        const v8f gv = Load(gr + (w + u) * s.out);
        for (int c = 0; c < CB; ++c) acc[u][c] += Splat(xr[(w + u) * step + c]) * gv;
      }
    for (; w < p.cols; ++w) {
      const v8f gv = Load(gr + w * s.out);
      for (int c = 0; c < CB; ++c) acc[0][c] += Splat(xr[w * step + c]) * gv;
    }
  }
  for (int c = 0; c < CB; ++c) {
    v8f sum = acc[0][c];
    for (int u = 1; u < CH; ++u) sum += acc[u][c];
    float* target = dk + (c0 + c) * s.out + o0;
    Store(target, Load(target) + sum);
  }
}

// The same for dk[tap, c0:c0+8*CV, o0:o0+8] with the input channels in the lanes (one broadcast
// of g per 8 * CV products): fewer loads where there are more input than output channels.
template <int CV>
void PlaneTapByIn(const Shape& s, const PlaneSpan& p, float* dk, int64_t c0, int64_t o0) {
  const int64_t sh = s.stride * s.width * s.in;
  v8f acc[8][CV];
  for (int o = 0; o < 8; ++o)
    for (int v = 0; v < CV; ++v) acc[o][v] = Splat(0.f);
  for (int64_t h = 0; h < p.rows; ++h) {
    const float* xr = p.x + h * sh + c0;
    const float* gr = p.g + h * s.out_w * s.out + o0;
    for (int64_t w = 0; w < p.cols; ++w) {
      v8f xv[CV];
      for (int v = 0; v < CV; ++v) xv[v] = Load(xr + w * s.step() + 8 * v);
      for (int o = 0; o < 8; ++o) {
        const v8f gb = Splat(gr[w * s.out + o]);
        for (int v = 0; v < CV; ++v) acc[o][v] += gb * xv[v];
      }
    }
  }
  for (int o = 0; o < 8; ++o)
    for (int v = 0; v < CV; ++v) {
      float* target = dk + (o0 + o) * s.in + c0 + 8 * v;  // dk is (tap, out, in) here
      Store(target, Load(target) + acc[o][v]);
    }
}

// Whether the kernel gradient puts the input channels in the vector lanes (PlaneTapByIn, partial
// sums laid out (tap, out, in)): more than 8 of them, in whole vectors.
bool InputChannelLanes(const Shape& s) { return s.out > 1 && s.in > 8 && s.in % 8 == 0; }

// dk[tap, :, 0] += one plane's sums for one output channel, the input channels in the lanes.
void PlaneTapSingleOut(const Shape& s, const PlaneSpan& p, float* dk) {
  const int64_t sh = s.stride * s.width * s.in, step = s.step();
  for (int64_t c0 = 0; c0 < s.in; c0 += 8) {
    if (c0 + 8 <= s.in) {
      v8f a0 = Splat(0.f), a1 = a0, a2 = a0, a3 = a0;  // four chains in flight
      for (int64_t h = 0; h < p.rows; ++h) {
        const float* gr = p.g + h * s.out_w;
        const float* xr = p.x + h * sh + c0;
        int64_t w = 0;
        for (; w + 4 <= p.cols; w += 4) {
          a0 += Splat(gr[w]) * Load(xr + w * step);
          a1 += Splat(gr[w + 1]) * Load(xr + (w + 1) * step);
          a2 += Splat(gr[w + 2]) * Load(xr + (w + 2) * step);
          a3 += Splat(gr[w + 3]) * Load(xr + (w + 3) * step);
        }
        for (; w < p.cols; ++w) a0 += Splat(gr[w]) * Load(xr + w * step);
      }
      Store(dk + c0, Load(dk + c0) + (a0 + a1) + (a2 + a3));
      continue;
    }
    for (int64_t c = c0; c < s.in; ++c) {
      float acc = 0.f;
      for (int64_t h = 0; h < p.rows; ++h)
        for (int64_t w = 0; w < p.cols; ++w) acc += p.g[h * s.out_w + w] * p.x[h * sh + w * step + c];
      dk[c] += acc;
    }
  }
}

// dk[tap, :, o0:o0+8] += one plane's sums, by whichever lane layout needs fewer loads.
void PlaneTap(const Shape& s, const PlaneSpan& p, float* dk, int64_t o0) {
  int64_t c0 = 0;
  if (InputChannelLanes(s)) {
    for (; c0 + 16 <= s.in; c0 += 16) PlaneTapByIn<2>(s, p, dk, c0, o0);
    for (; c0 < s.in; c0 += 8) PlaneTapByIn<1>(s, p, dk, c0, o0);
    return;
  }
  for (; c0 + 16 <= s.in; c0 += 16) PlaneTapByOut<16>(s, p, dk, c0, o0);
  for (; c0 + 8 <= s.in; c0 += 8) PlaneTapByOut<8>(s, p, dk, c0, o0);
  for (; c0 + 4 <= s.in; c0 += 4) PlaneTapByOut<4>(s, p, dk, c0, o0);
  for (; c0 < s.in; ++c0) PlaneTapByOut<1>(s, p, dk, c0, o0);
}

// Each tap sums over the outputs that read inside the input (the padding adds nothing).
void KernelGradient(const Shape& s, const float* x, const float* g, float* dk) {
  const int64_t sh = s.width * s.in, sd = s.height * sh;
  const int64_t taps = s.taps_d * s.taps_h * s.taps_w, size = taps * s.tap_size();
  const int64_t items = s.batch * s.out_d;
  const int64_t threads = std::min<int64_t>(CpuCount(), items);
  std::vector<std::vector<float>> partial(threads, std::vector<float>(size, 0.f));
  ParallelFor(items, threads, [&](int64_t thread, int64_t first, int64_t last) {
    float* local = partial[thread].data();
    for (int64_t item = first; item < last; ++item) {
      const int64_t b = item / s.out_d, d = item % s.out_d;
      const float* gp = g + item * s.out_h * s.out_w * s.out;
      for (int64_t i = 0; i < s.taps_d; ++i) {
        const int64_t q = d * s.stride + i - s.low_d;
        if (q < 0 || q >= s.depth) continue;
        for (int64_t j = 0; j < s.taps_h; ++j) {
          const Range rows = Inside(j - s.low_h, s.height, s.stride, s.out_h);
          for (int64_t t = 0; t < s.taps_w; ++t) {
            const Range cols = Inside(t - s.low_w, s.width, s.stride, s.out_w);
            if (rows.size() == 0 || cols.size() == 0) continue;
            const PlaneSpan p{
                x + b * s.depth * sd + q * sd + (rows.first * s.stride + j - s.low_h) * sh +
                    (cols.first * s.stride + t - s.low_w) * s.in,
                gp + (rows.first * s.out_w + cols.first) * s.out, rows.size(), cols.size()};
            float* tap = local + ((i * s.taps_h + j) * s.taps_w + t) * s.tap_size();
            if (s.out == 1) {
              PlaneTapSingleOut(s, p, tap);
              continue;
            }
            for (int64_t o0 = 0; o0 < s.out; o0 += 8) PlaneTap(s, p, tap, o0);
          }
        }
      }
    }
  });
  std::vector<float>& sum = partial[0];
  for (size_t part = 1; part < partial.size(); ++part)
    for (int64_t n = 0; n < size; ++n) sum[n] += partial[part][n];
  if (!InputChannelLanes(s)) {
    std::copy(sum.begin(), sum.end(), dk);
    return;
  }
  for (int64_t tap = 0; tap < taps; ++tap)  // the sums are (tap, out, in): transposed once
    for (int64_t o = 0; o < s.out; ++o)
      for (int64_t c = 0; c < s.in; ++c)
        dk[(tap * s.in + c) * s.out + o] = sum[(tap * s.out + o) * s.in + c];
}

// The window of output (p, q, r) is x[2p + a, 2q + b, 2r + c], a, b, c in {0, 1}, inside x;
// its index is 4a + 2b + c.
struct PoolShape {
  int64_t batch, depth, height, width, channels, out_d, out_h, out_w;
};

void MaxPool2(const PoolShape& s, const float* x, float* y, uint8_t* which) {
  const int64_t sh = s.width * s.channels, sd = s.height * sh;
  ForEachItem(s.batch * s.out_d, [&](int64_t item) {
    const int64_t b = item / s.out_d, p = item % s.out_d;
    for (int64_t q = 0; q < s.out_h; ++q)
      for (int64_t r = 0; r < s.out_w; ++r) {
        float* best = y + ((item * s.out_h + q) * s.out_w + r) * s.channels;
        uint8_t* index = which + (best - y);
        bool started = false;
        for (int a = 0; a < 2 && 2 * p + a < s.depth; ++a)
          for (int e = 0; e < 2 && 2 * q + e < s.height; ++e)
            for (int f = 0; f < 2 && 2 * r + f < s.width; ++f) {
              const float* v =
                  x + (b * s.depth + 2 * p + a) * sd + (2 * q + e) * sh + (2 * r + f) * s.channels;
              const uint8_t here = static_cast<uint8_t>(4 * a + 2 * e + f);
              if (!started) {
                std::memcpy(best, v, s.channels * sizeof(float));
                std::fill(index, index + s.channels, here);
                started = true;
                continue;
              }
              for (int64_t c = 0; c < s.channels; ++c) {
                const bool larger = v[c] > best[c];  // ties keep the first
                best[c] = larger ? v[c] : best[c];
                index[c] = larger ? here : index[c];
              }
            }
      }
  });
}

void MaxPool2Transpose(const PoolShape& s, const float* g, const uint8_t* which, float* dx) {
  const int64_t sh = s.width * s.channels, sd = s.height * sh;
  ForEachItem(s.batch * s.out_d, [&](int64_t item) {
    const int64_t b = item / s.out_d, p = item % s.out_d;
    for (int64_t a = 0; a < 2 && 2 * p + a < s.depth; ++a) {
      float* plane = dx + (b * s.depth + 2 * p + a) * sd;
      std::fill(plane, plane + sd, 0.f);
    }
    for (int64_t q = 0; q < s.out_h; ++q)
      for (int64_t r = 0; r < s.out_w; ++r) {
        const int64_t out = ((item * s.out_h + q) * s.out_w + r) * s.channels;
        for (int64_t c = 0; c < s.channels; ++c) {
          const int index = which[out + c], a = index / 4, e = index / 2 % 2, f = index % 2;
          dx[(b * s.depth + 2 * p + a) * sd + (2 * q + e) * sh + (2 * r + f) * s.channels + c] =
              g[out + c];
        }
      }
  });
}

// Rows are summed in float over blocks of 256, the blocks in double: one pass, float32 accuracy.
void ChannelSums(int64_t rows, int64_t channels, const float* a, const float* b,
                 const float* shift, float* sums) {
  // Few channels are summed as wider rows (a whole number of channel rows, at least 64 values:
  // whole vectors) and folded back at the end; what is left of the last wide row is summed here.
  const int64_t width = channels * ((64 + channels - 1) / channels);
  const int64_t wide_rows = rows * channels / width, done = wide_rows * width;
  std::vector<float> wide_shift(width);
  for (int64_t j = 0; j < width; ++j) wide_shift[j] = shift[j % channels];
  constexpr int64_t kBlock = 64;  // rows summed in float32 before a double: ~1e-7 relative error
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(CpuCount(), wide_rows / kBlock));
  std::vector<std::vector<double>> partial(threads, std::vector<double>(2 * width, 0.0));
  ParallelFor(wide_rows, threads, [&](int64_t thread, int64_t first, int64_t last) {
    std::vector<float> block(2 * width);
    double* total = partial[thread].data();
    for (int64_t r0 = first; r0 < last; r0 += kBlock) {
      std::fill(block.begin(), block.end(), 0.f);
      float* plain = block.data();
      float* products = plain + width;
      for (int64_t r = r0; r < std::min(last, r0 + kBlock); ++r) {
        const float* ar = a + r * width;
        const float* br = b + r * width;
        for (int64_t j = 0; j < width; ++j) {
          plain[j] += ar[j];
          products[j] += ar[j] * (br[j] - wide_shift[j]);
        }
      }
      for (int64_t j = 0; j < 2 * width; ++j) total[j] += block[j];
    }
  });
  std::vector<double> folded(2 * channels, 0.0);
  for (const auto& part : partial)
    for (int64_t j = 0; j < width; ++j) {
      folded[j % channels] += part[j];
      folded[channels + j % channels] += part[width + j];
    }
  for (int64_t n = done; n < rows * channels; ++n) {
    folded[n % channels] += a[n];
    folded[channels + n % channels] += static_cast<double>(a[n]) * (b[n] - shift[n % channels]);
  }
  for (int64_t c = 0; c < 2 * channels; ++c) sums[c] = static_cast<float>(folded[c]);
}

// Per output index j along an axis of n inputs: y[j] = 0.75 x[j / 2] + 0.25 x[its neighbour on
// j's side], the neighbour clamped to [0, n).
struct Taps1D {
  std::vector<int64_t> near, far;
};
Taps1D UpsampleTaps(int64_t n) {
  Taps1D taps;
  for (int64_t j = 0; j < 2 * n; ++j) {
    const int64_t i = j / 2;
    taps.near.push_back(i);
    taps.far.push_back(std::clamp<int64_t>(j % 2 == 0 ? i - 1 : i + 1, 0, n - 1));
  }
  return taps;
}

void Upsample2(int64_t batch, int64_t depth, int64_t height, int64_t width, int64_t channels,
               const float* x, float* y) {
  const Taps1D td = UpsampleTaps(depth), th = UpsampleTaps(height), tw = UpsampleTaps(width);
  const int64_t sh = width * channels, sd = height * sh, sb = depth * sd;
  const int64_t items = batch * 2 * depth;
  ParallelFor(items, std::min<int64_t>(CpuCount(), items), [&](int64_t, int64_t first,
                                                               int64_t last) {
    // Separably: an output row is the (depth, height) blend of four input rows, at the input's
    // width, then widened (half the products of blending per output).
    std::vector<float> blend(sh);
    for (int64_t item = first; item < last; ++item) {
      const int64_t b = item / (2 * depth), d = item % (2 * depth);
      for (int64_t h = 0; h < 2 * height; ++h) {
        const float* rows[4];
        float weights[4];
        for (int r = 0; r < 4; ++r) {
          const int64_t i = r / 2 == 0 ? td.near[d] : td.far[d];
          const int64_t j = r % 2 == 0 ? th.near[h] : th.far[h];
          rows[r] = x + b * sb + i * sd + j * sh;
          weights[r] = (r / 2 == 0 ? 0.75f : 0.25f) * (r % 2 == 0 ? 0.75f : 0.25f);
        }
        for (int64_t n = 0; n < sh; ++n) {
          blend[n] = weights[0] * rows[0][n] + weights[1] * rows[1][n] + weights[2] * rows[2][n] +
                     weights[3] * rows[3][n];
        }
        float* out = y + (item * 2 * height + h) * 2 * width * channels;
        for (int64_t w = 0; w < 2 * width; ++w, out += channels) {
          const float* near = blend.data() + tw.near[w] * channels;
          const float* far = blend.data() + tw.far[w] * channels;
          for (int64_t c = 0; c < channels; ++c) out[c] = 0.75f * near[c] + 0.25f * far[c];
        }
      }
    }
  });
}

// The adjoint: each input gathers the outputs that read it, with the same weights.
void Upsample2Transpose(int64_t batch, int64_t depth, int64_t height, int64_t width,
                        int64_t channels, const float* g, float* dx) {
  // readers(n)[i]: the (output index, weight) pairs that read input i along an axis of n.
  auto readers = [](int64_t n) {
    const Taps1D taps = UpsampleTaps(n);
    std::vector<std::vector<std::pair<int64_t, float>>> by_input(n);
    for (int64_t j = 0; j < 2 * n; ++j) {
      by_input[taps.near[j]].emplace_back(j, 0.75f);
      by_input[taps.far[j]].emplace_back(j, 0.25f);
    }
    return by_input;
  };
  const auto rd = readers(depth), rh = readers(height), rw = readers(width);
  const int64_t sh = 2 * width * channels, sd = 2 * height * sh, sb = 2 * depth * sd;
  const int64_t items = batch * depth;
  ParallelFor(items, std::min<int64_t>(CpuCount(), items), [&](int64_t, int64_t first,
                                                               int64_t last) {
    std::vector<const float*> rows;  // the (depth, height) output rows an input row reads
    std::vector<float> row_weights, blend(sh);
    for (int64_t item = first; item < last; ++item) {
      const int64_t b = item / depth, d = item % depth;
      for (int64_t h = 0; h < height; ++h) {
        rows.clear();
        row_weights.clear();
        for (const auto& [jd, wd] : rd[d])
          for (const auto& [jh, wh] : rh[h]) {
            rows.push_back(g + b * sb + jd * sd + jh * sh);
            row_weights.push_back(wd * wh);
          }
        // Separably: the output rows' blend at the output's width, then narrowed.
        for (int64_t n = 0; n < sh; ++n) blend[n] = row_weights[0] * rows[0][n];
        for (size_t r = 1; r < rows.size(); ++r) {
          const float weight = row_weights[r], *row = rows[r];
          for (int64_t n = 0; n < sh; ++n) blend[n] += weight * row[n];
        }
        float* out = dx + (item * height + h) * width * channels;
        for (int64_t w = 0; w < width; ++w, out += channels) {
          std::fill(out, out + channels, 0.f);
          for (const auto& [jw, ww] : rw[w]) {
            const float* column = blend.data() + jw * channels;
            for (int64_t c = 0; c < channels; ++c) out[c] += ww * column[c];
          }
        }
      }
    }
  });
}

// The input gradient of a strided correlation (for stride 1 the caller correlates instead):
// dx (padded sides, as s.depth etc.) of a correlation at stride s.stride with kernel `kt` (taps,
// O, C), g its output gradient. The places q = stride * a + r of one class r (per axis) read
// taps r + stride * m only: dx[stride * a + r] = sum_m g[a - m] kt[r + stride * m], a stride-1
// correlation of g (fully padded) with that class's taps reversed, written every stride-th place.
void StridedInputGradient(const Shape& s, const float* g, const float* kt, float* dx) {
  const int64_t st = s.stride, row = s.width * s.in, plane = s.height * row;
  for (int64_t rd = 0; rd < st; ++rd)
    for (int64_t rh = 0; rh < st; ++rh)
      for (int64_t rw = 0; rw < st; ++rw) {
        // Taps of the class per axis (none where the stride exceeds the kernel), places per axis.
        auto taps = [&](int64_t r, int64_t side) { return r < side ? (side - 1 - r) / st + 1 : 0; };
        auto places = [&](int64_t r, int64_t side) { return (side - r + st - 1) / st; };
        const int64_t nd = taps(rd, s.taps_d), nh = taps(rh, s.taps_h), nw = taps(rw, s.taps_w);
        Shape c = s;
        c.depth = s.out_d, c.height = s.out_h, c.width = s.out_w, c.in = s.out, c.out = s.in;
        c.taps_d = nd, c.taps_h = nh, c.taps_w = nw, c.stride = 1;
        c.low_d = nd - 1, c.low_h = nh - 1, c.low_w = nw - 1;
        c.out_d = places(rd, s.depth), c.out_h = places(rh, s.height), c.out_w = places(rw, s.width);
        c.y_w = st * s.in, c.y_h = st * row, c.y_d = st * plane, c.y_b = s.depth * plane;
        float* y = dx + (rd * s.height + rh) * row + rw * s.in;
        if (nd == 0 || nh == 0 || nw == 0) {
          for (int64_t b = 0; b < c.batch; ++b)
            for (int64_t d = 0; d < c.out_d; ++d)
              for (int64_t h = 0; h < c.out_h; ++h)
                for (int64_t w = 0; w < c.out_w; ++w) {
                  float* place = y + b * c.y_b + d * c.y_d + h * c.y_h + w * c.y_w;
                  std::fill(place, place + s.in, 0.f);
                }
          continue;
        }
        std::vector<float> kernel(nd * nh * nw * c.tap_size());
        for (int64_t i = 0; i < nd; ++i)
          for (int64_t j = 0; j < nh; ++j)
            for (int64_t t = 0; t < nw; ++t) {
              const int64_t tap = ((rd + st * (nd - 1 - i)) * s.taps_h + rh + st * (nh - 1 - j)) *
                                      s.taps_w + rw + st * (nw - 1 - t);
              std::copy_n(kt + tap * c.tap_size(), c.tap_size(),
                          kernel.data() + ((i * nh + j) * nw + t) * c.tap_size());
            }
        Correlate(c, g, kernel.data(), y);
      }
}

// Each row's maximum (vectors of 8 classes, then the rest) and the first class holding it; a row
// with a NaN gives NaN and the first NaN's class, as jnp.max and jnp.argmax do.
void ClassMax(int64_t rows, int64_t classes, const float* x, float* maxima, int32_t* indices) {
  constexpr int64_t kPerThread = 1024;
  const int64_t threads = std::clamp<int64_t>(rows / kPerThread, 1, CpuCount());
  const int64_t vectors = classes / 8 * 8;
  ParallelFor(rows, threads, [&](int64_t, int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const float* row = x + r * classes;
      float best = row[0];
      bool nan = false;
      if (vectors > 0) {
        v8f top = Load(row);
        v8i unordered = top != top;
        for (int64_t c = 8; c < vectors; c += 8) {
          const v8f next = Load(row + c);
          top = next > top ? next : top;
          unordered |= next != next;
        }
        for (int lane = 0; lane < 8; ++lane) {
          best = std::max(best, top[lane]);
          nan = nan || unordered[lane];
        }
      }
      for (int64_t c = vectors; c < classes; ++c) {
        best = std::max(best, row[c]);
        nan = nan || std::isnan(row[c]);
      }
      int64_t index = 0;
      while (nan ? !std::isnan(row[index]) : row[index] != best) ++index;
      maxima[r] = row[index];
      indices[r] = static_cast<int32_t>(index);
    }
  });
}

inline v16f Sqrt16(v16f x) {
#if defined(__AVX512F__)
  return reinterpret_cast<v16f>(_mm512_sqrt_ps(reinterpret_cast<__m512>(x)));
#else
  for (int lane = 0; lane < 16; ++lane) x[lane] = std::sqrt(x[lane]);
  return x;
#endif
}

// One array of the optimiser: parameters, gradient and Adam's two moments read, the parameters
// and moments written (in place where XLA aliases them), and its step (-learning rate x its
// multiplier).
struct AdamArray {
  const float *p, *g, *m, *v;
  float *p_out, *m_out, *v_out;
  int64_t size;
  float step;
};

// The elements of arrays of `sizes`, as one range, in one contiguous part per thread (at least
// 256Ki elements each); body(k, begin, end) -> double on each array's piece of a part, in blocks of
// at most 4096 elements; returns the sum of what body returned.
template <typename Body>
double SumOverBlocks(const std::vector<int64_t>& sizes, Body body) {
  std::vector<int64_t> offsets{0};
  for (int64_t size : sizes) offsets.push_back(offsets.back() + size);
  constexpr int64_t kBlock = 4096;
  const int64_t threads = std::clamp<int64_t>(offsets.back() / (64 * kBlock), 1, CpuCount());
  std::vector<double> sums(threads, 0.0);
  ParallelFor(offsets.back(), threads, [&](int64_t thread, int64_t first, int64_t last) {
    for (size_t k = 0; k < sizes.size(); ++k) {
      const int64_t end = std::min(last, offsets[k + 1]) - offsets[k];
      for (int64_t i = std::max(first, offsets[k]) - offsets[k]; i < end; i += kBlock) {
        sums[thread] += body(k, i, std::min(end, i + kBlock));
      }
    }
  });
  double sum = 0.0;
  for (double part : sums) sum += part;
  return sum;
}

float LaneSum(v16f v) {
  float sum = 0.f;
  for (int lane = 0; lane < 16; ++lane) sum += v[lane];
  return sum;
}

// The sum of the squares of the arrays' elements (float32 within blocks, blocks in double).
double SumOfSquares(const std::vector<const float*>& arrays, const std::vector<int64_t>& sizes) {
  return SumOverBlocks(sizes, [&](size_t k, int64_t begin, int64_t end) {
    const float* a = arrays[k];
    const int64_t vector_end = begin + (end - begin) / 16 * 16;
    v16f squares{};
    for (int64_t i = begin; i < vector_end; i += 16) squares += Load16(a + i) * Load16(a + i);
    float sum = LaneSum(squares);
    for (int64_t i = vector_end; i < end; ++i) sum += a[i] * a[i];
    return static_cast<double>(sum);
  });
}

// optax.adam's arithmetic (its scale_by_adam, scale_by_learning_rate, apply_updates) on each
// array in one pass: g = g / divisor * factor (optax.clip_by_global_norm's scaling; 1, 1 keep g),
// m = (1 - b1) g + b1 m, v = (1 - b2) g^2 + b2 v, p += step (m / c1) / (sqrt(v / c2) + eps),
// c1 and c2 the bias corrections. Returns the sum of the squared gradients as given.
double Adam(const std::vector<AdamArray>& arrays, double b1, double b2, float eps, float c1,
            float c2, float divisor, float factor) {
  std::vector<int64_t> sizes;
  for (const auto& a : arrays) sizes.push_back(a.size);
  const float a1 = static_cast<float>(1.0 - b1), a2 = static_cast<float>(1.0 - b2);
  const float d1 = static_cast<float>(b1), d2 = static_cast<float>(b2);
  return SumOverBlocks(sizes, [&](size_t k, int64_t begin, int64_t end) {
    const AdamArray& a = arrays[k];
    const int64_t vector_end = begin + (end - begin) / 16 * 16;
    v16f squares{};
    for (int64_t i = begin; i < vector_end; i += 16) {
      const v16f raw = Load16(a.g + i);
      squares += raw * raw;
      const v16f g = raw / divisor * factor;
      const v16f m = a1 * g + d1 * Load16(a.m + i);
      const v16f v = a2 * (g * g) + d2 * Load16(a.v + i);
      Store16(a.m_out + i, m);
      Store16(a.v_out + i, v);
      Store16(a.p_out + i, Load16(a.p + i) + a.step * ((m / c1) / (Sqrt16(v / c2) + eps)));
    }
    float sum = LaneSum(squares);
    for (int64_t i = vector_end; i < end; ++i) {
      const float raw = a.g[i], g = raw / divisor * factor;
      sum += raw * raw;
      const float m = a1 * g + d1 * a.m[i], v = a2 * (g * g) + d2 * a.v[i];
      a.m_out[i] = m;
      a.v_out[i] = v;
      a.p_out[i] = a.p[i] + a.step * ((m / c1) / (std::sqrt(v / c2) + eps));
    }
    return static_cast<double>(sum);
  });
}

// The correlation's shape from its input, kernel (taps, C, O) and output (batch, sides, O) dims.
template <typename Dims>
Shape ShapeOf(const Dims& xd, const Dims& kd, const Dims& yd, int64_t stride,
              ffi::Span<const int64_t> low) {
  return WithDenseOutput(Shape{xd[0], xd[1], xd[2], xd[3], xd[4], kd[0], kd[1], kd[2], kd[4],
                               stride, low[0], low[1], low[2], yd[1], yd[2], yd[3]});
}

ffi::Error CheckShape(const Shape& s, int64_t kernel_in, int64_t out_batch, int64_t out_channels) {
  if (s.stride < 1 || s.low_d < 0 || s.low_h < 0 || s.low_w < 0 || s.out_d < 1 || s.out_h < 1 ||
      s.out_w < 1 || kernel_in != s.in || out_batch != s.batch || out_channels != s.out) {
    return ffi::Error::InvalidArgument("crystal_vae conv3d: shapes, stride or padding do not fit");
  }
  if (s.out != 1 && s.out % 8 != 0) {
    return ffi::Error::InvalidArgument("crystal_vae conv3d: output channels must be 1 or a multiple of 8");
  }
  return ffi::Error::Success();
}

ffi::Error CorrelateImpl(Array5 x, Array5 k, ffi::ResultBuffer<ffi::F32, 5> y, int64_t stride,
                         ffi::Span<const int64_t> low, ffi::ThreadPool pool) {
  PoolScope scope(pool);
  const auto xd = x.dimensions(), kd = k.dimensions(), yd = y->dimensions();
  if (low.size() != 3) return ffi::Error::InvalidArgument("crystal_vae conv3d: 3 low pads");
  const Shape s = ShapeOf(xd, kd, yd, stride, low);
  if (auto error = CheckShape(s, kd[3], yd[0], yd[4]); error.failure()) return error;
  Correlate(s, x.typed_data(), k.typed_data(), y->typed_data());
  return ffi::Error::Success();
}

ffi::Error KernelGradientImpl(Array5 x, Array5 g, ffi::ResultBuffer<ffi::F32, 5> dk,
                              int64_t stride, ffi::Span<const int64_t> low, ffi::ThreadPool pool) {
  PoolScope scope(pool);
  const auto xd = x.dimensions(), gd = g.dimensions(), kd = dk->dimensions();
  if (low.size() != 3) return ffi::Error::InvalidArgument("crystal_vae conv3d: 3 low pads");
  const Shape s = ShapeOf(xd, kd, gd, stride, low);
  if (auto error = CheckShape(s, kd[3], gd[0], gd[4]); error.failure()) return error;
  KernelGradient(s, x.typed_data(), g.typed_data(), dk->typed_data());
  return ffi::Error::Success();
}

ffi::Error StridedInputGradientImpl(Array5 g, Array5 kt, ffi::ResultBuffer<ffi::F32, 5> dx,
                                    int64_t stride, ffi::ThreadPool pool) {
  PoolScope scope(pool);
  const auto gd = g.dimensions(), kd = kt.dimensions(), xd = dx->dimensions();
  const Shape s{xd[0], xd[1], xd[2], xd[3], xd[4], kd[0], kd[1], kd[2], kd[3], stride,
                0, 0, 0, gd[1], gd[2], gd[3]};
  if (stride < 1 || gd[0] != s.batch || gd[4] != s.out || kd[4] != s.in || s.in % 8 != 0 ||
      s.out_d != (s.depth - s.taps_d) / stride + 1 || s.out_h != (s.height - s.taps_h) / stride + 1 ||
      s.out_w != (s.width - s.taps_w) / stride + 1) {
    return ffi::Error::InvalidArgument(
        "crystal_vae conv3d: strided input gradient shapes do not match (or C % 8 != 0)");
  }
  StridedInputGradient(s, g.typed_data(), kt.typed_data(), dx->typed_data());
  return ffi::Error::Success();
}

ffi::Error ClassMaxImpl(Array2 x, ffi::ResultBuffer<ffi::F32, 1> maxima,
                        ffi::ResultBuffer<ffi::S32, 1> indices, ffi::ThreadPool pool) {
  PoolScope scope(pool);
  const auto xd = x.dimensions();
  if (xd[1] < 1 || maxima->dimensions()[0] != xd[0] || indices->dimensions()[0] != xd[0]) {
    return ffi::Error::InvalidArgument("crystal_vae class max: shapes do not match");
  }
  ClassMax(xd[0], xd[1], x.typed_data(), maxima->typed_data(), indices->typed_data());
  return ffi::Error::Success();
}

// args: scalars (c1, c2, divisor, factor), steps (one per array), then the arrays' parameters,
// gradients, first and second moments (n each); rets: the sum of squared gradients (1), then the
// parameters and the two moments (n each).
ffi::Error AdamImpl(Array1 scalars, Array1 steps, ffi::RemainingArgs args,
                    ffi::ResultBuffer<ffi::F32, 1> sum_of_squares, ffi::RemainingRets rets,
                    double b1, double b2, float eps, ffi::ThreadPool pool) {
  PoolScope scope(pool);
  const int64_t n = steps.element_count();
  if (scalars.element_count() != 4 || args.size() != 4 * static_cast<size_t>(n) ||
      rets.size() != 3 * static_cast<size_t>(n) || sum_of_squares->element_count() != 1) {
    return ffi::Error::InvalidArgument("crystal_vae adam: 4 scalars, 4 arrays in and 3 out per step");
  }
  std::vector<AdamArray> arrays(n);
  for (int64_t k = 0; k < n; ++k) {
    const float* in[4];
    float* out[3];
    int64_t size = -1;
    // Each buffer float32 and of the step's size (the first one's).
    auto check = [&](const ffi::AnyBuffer& buffer) {
      if (size < 0) size = static_cast<int64_t>(buffer.element_count());
      return buffer.element_type() == ffi::F32 &&
             static_cast<int64_t>(buffer.element_count()) == size;
    };
    for (int j = 0; j < 4; ++j) {
      auto buffer = args.get<ffi::AnyBuffer>(j * n + k);
      if (buffer.has_error()) return buffer.error();
      if (!check(*buffer)) {
        return ffi::Error::InvalidArgument("crystal_vae adam: float32 arrays of one size per step");
      }
      in[j] = static_cast<const float*>(buffer->untyped_data());
    }
    for (int j = 0; j < 3; ++j) {
      auto buffer = rets.get<ffi::AnyBuffer>(j * n + k);
      if (buffer.has_error()) return buffer.error();
      if (!check(**buffer)) {
        return ffi::Error::InvalidArgument("crystal_vae adam: outputs must match the inputs");
      }
      out[j] = static_cast<float*>((*buffer)->untyped_data());
    }
    arrays[k] = {in[0], in[1], in[2], in[3], out[0], out[1], out[2], size, steps.typed_data()[k]};
  }
  const float* s = scalars.typed_data();
  sum_of_squares->typed_data()[0] = static_cast<float>(Adam(arrays, b1, b2, eps, s[0], s[1], s[2], s[3]));
  return ffi::Error::Success();
}

ffi::Error SumOfSquaresImpl(ffi::RemainingArgs args, ffi::ResultBuffer<ffi::F32, 1> sum, ffi::ThreadPool pool) {
  PoolScope scope(pool);
  std::vector<const float*> arrays;
  std::vector<int64_t> sizes;
  for (size_t k = 0; k < args.size(); ++k) {
    auto buffer = args.get<ffi::AnyBuffer>(k);
    if (buffer.has_error()) return buffer.error();
    if (buffer->element_type() != ffi::F32) {
      return ffi::Error::InvalidArgument("crystal_vae sum of squares: float32 arrays");
    }
    arrays.push_back(static_cast<const float*>(buffer->untyped_data()));
    sizes.push_back(static_cast<int64_t>(buffer->element_count()));
  }
  if (sum->element_count() != 1) {
    return ffi::Error::InvalidArgument("crystal_vae sum of squares: one output value");
  }
  sum->typed_data()[0] = static_cast<float>(SumOfSquares(arrays, sizes));
  return ffi::Error::Success();
}

using Indices5 = ffi::Buffer<ffi::U8, 5>;

ffi::Error CheckPool(const PoolShape& s) {
  if (s.out_d != (s.depth + 1) / 2 || s.out_h != (s.height + 1) / 2 ||
      s.out_w != (s.width + 1) / 2) {
    return ffi::Error::InvalidArgument("crystal_vae max pool: output sides must be ceil(side / 2)");
  }
  return ffi::Error::Success();
}

ffi::Error MaxPool2Impl(Array5 x, ffi::ResultBuffer<ffi::F32, 5> y,
                        ffi::ResultBuffer<ffi::U8, 5> which, ffi::ThreadPool pool) {
  PoolScope scope(pool);
  const auto xd = x.dimensions(), yd = y->dimensions();
  const PoolShape s{xd[0], xd[1], xd[2], xd[3], xd[4], yd[1], yd[2], yd[3]};
  if (auto error = CheckPool(s); error.failure()) return error;
  MaxPool2(s, x.typed_data(), y->typed_data(), which->typed_data());
  return ffi::Error::Success();
}

ffi::Error MaxPool2TransposeImpl(Array5 g, Indices5 which, ffi::ResultBuffer<ffi::F32, 5> dx, ffi::ThreadPool pool) {
  PoolScope scope(pool);
  const auto gd = g.dimensions(), xd = dx->dimensions();
  const PoolShape s{xd[0], xd[1], xd[2], xd[3], xd[4], gd[1], gd[2], gd[3]};
  if (auto error = CheckPool(s); error.failure()) return error;
  MaxPool2Transpose(s, g.typed_data(), which.typed_data(), dx->typed_data());
  return ffi::Error::Success();
}

ffi::Error ChannelSumsImpl(Array2 a, Array2 b, Array1 shift, ffi::ResultBuffer<ffi::F32, 2> sums, ffi::ThreadPool pool) {
  PoolScope scope(pool);
  const auto ad = a.dimensions(), bd = b.dimensions(), sd = sums->dimensions();
  if (bd[0] != ad[0] || bd[1] != ad[1] || shift.dimensions()[0] != ad[1] || sd[0] != 2 ||
      sd[1] != ad[1]) {
    return ffi::Error::InvalidArgument("crystal_vae channel sums: shapes do not match");
  }
  ChannelSums(ad[0], ad[1], a.typed_data(), b.typed_data(), shift.typed_data(),
              sums->typed_data());
  return ffi::Error::Success();
}

// Whether the large array's sides are twice the small one's.
template <typename Dims>
ffi::Error CheckDoubled(const Dims& small, const Dims& large) {
  for (int axis = 1; axis < 4; ++axis) {
    if (large[axis] != 2 * small[axis]) {
      return ffi::Error::InvalidArgument("crystal_vae upsample2: output sides must be twice");
    }
  }
  return ffi::Error::Success();
}

ffi::Error Upsample2Impl(Array5 x, ffi::ResultBuffer<ffi::F32, 5> y, ffi::ThreadPool pool) {
  PoolScope scope(pool);
  const auto xd = x.dimensions();
  if (auto error = CheckDoubled(xd, y->dimensions()); error.failure()) return error;
  Upsample2(xd[0], xd[1], xd[2], xd[3], xd[4], x.typed_data(), y->typed_data());
  return ffi::Error::Success();
}

ffi::Error Upsample2TransposeImpl(Array5 g, ffi::ResultBuffer<ffi::F32, 5> dx, ffi::ThreadPool pool) {
  PoolScope scope(pool);
  const auto xd = dx->dimensions();
  if (auto error = CheckDoubled(xd, g.dimensions()); error.failure()) return error;
  Upsample2Transpose(xd[0], xd[1], xd[2], xd[3], xd[4], g.typed_data(), dx->typed_data());
  return ffi::Error::Success();
}

// The binding of the three convolution handlers: two arrays in, one out, the stride.
auto TwoArraysAndStride() {
  return ffi::Ffi::Bind().Arg<Array5>().Arg<Array5>().Ret<Array5>().Attr<int64_t>("stride");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrystalVaeMaxPool2, MaxPool2Impl,
                              ffi::Ffi::Bind().Arg<Array5>().Ret<Array5>().Ret<Indices5>().Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrystalVaeMaxPool2Transpose, MaxPool2TransposeImpl,
                              ffi::Ffi::Bind().Arg<Array5>().Arg<Indices5>().Ret<Array5>().Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrystalVaeChannelSums, ChannelSumsImpl,
                              ffi::Ffi::Bind().Arg<Array2>().Arg<Array2>().Arg<Array1>().Ret<Array2>().Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrystalVaeUpsample2, Upsample2Impl,
                              ffi::Ffi::Bind().Arg<Array5>().Ret<Array5>().Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrystalVaeUpsample2Transpose, Upsample2TransposeImpl,
                              ffi::Ffi::Bind().Arg<Array5>().Ret<Array5>().Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrystalVaeCorrelate, CorrelateImpl,
                              TwoArraysAndStride().Attr<ffi::Span<const int64_t>>("low").Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrystalVaeKernelGradient, KernelGradientImpl,
                              TwoArraysAndStride().Attr<ffi::Span<const int64_t>>("low").Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrystalVaeStridedInputGradient, StridedInputGradientImpl,
                              TwoArraysAndStride().Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrystalVaeClassMax, ClassMaxImpl,
                              ffi::Ffi::Bind()
                                  .Arg<Array2>()
                                  .Ret<Array1>()
                                  .Ret<Labels1>().Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrystalVaeAdam, AdamImpl,
                              ffi::Ffi::Bind()
                                  .Arg<Array1>()
                                  .Arg<Array1>()
                                  .RemainingArgs()
                                  .Ret<Array1>()
                                  .RemainingRets()
                                  .Attr<double>("b1")
                                  .Attr<double>("b2")
                                  .Attr<float>("eps").Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrystalVaeSumOfSquares, SumOfSquaresImpl,
                              ffi::Ffi::Bind().RemainingArgs().Ret<Array1>().Ctx<ffi::ThreadPool>());
