// Dual-sparse linear on CPUs: y = sparsify(x, tau) @ W^T (+ bias), W in the layout of
// kernels/cpu_layout.py (read its docstring first).
//
// Layout recap: output rows are cut into panels of panel_rows; inside a panel every input channel
// owns one contiguous run of 64-row blocks, [64-bit bitmap (4 uint16 words)][kept 16-bit values
// in row order], and the channels' runs follow each other. Runs are cut into segments of
// panel_rows / S rows: offsets[(p * K + k) * S + s] is the first word of segment s of panel p's
// run for channel k (offsets[n_panel * K * S] is the end). A nearly dense weight is stored
// without bitmaps: each block is then the values of its 64 rows, zeros included.
//
// Paths:
//   decode  (M < prefill_min_tokens(isa)): threshold inside the kernel, union of active channels.
//           Threads split the active channels (one token: each reads whole runs, one panel
//           after another, skipping inactive channels' runs; several tokens: one segment of the
//           runs at a time), expand 16-bit values to fp32 in registers, accumulate a panel (a
//           segment) in a cache-resident buffer and sum their partial outputs at the end. Only
//           active channels' bytes are read, and a software prefetcher reads ahead of the pass:
//           one cursor over those bytes in read order (RunPrefetcher), or one stream per run
//           read side by side (StreamPrefetcher), whichever the CPU was measured to read faster
//           (Reads).
//   prefill (M >= prefill_min_tokens(isa)): one row slice at a time, threads decompress its
//           channels into a row-major fp32 tile, then one GEMM (oneDNN through PyTorch, else
//           at::addmm) multiplies all tokens with it: never a dense copy of the layer.
// ISA: the file is compiled for the generic target (its cache may be shared across machines);
// the AVX2 and AVX-512 regions below carry #pragma GCC target and are picked at run time with
// __builtin_cpu_supports.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#define DUOGPT_X86 1
#include <immintrin.h>
#endif

namespace duogpt_cpu {

constexpr int kBF16 = 0;
constexpr int kFP16 = 1;
constexpr int64_t kBlockRows = 64;
enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
const char* const kIsaNames[] = {"scalar", "avx2", "avx512"};

// Active channels per decode slice below which threads stop splitting them.
constexpr int64_t kMinSliceChannels = 16;
// Channels decoded together. Each run's next block address waits on a load and a popcount of
// the current block's bitmap; four independent runs hide that chain (AVX-512, per 16 rows:
// 1.0 ns with one channel, 0.76 ns with four). Several tokens share each group's expanded blocks
// in registers. One token over runs without bitmaps has no such chain and, with cursor reads
// (the default on AMD Zen 5, where this was measured; see Reads), reads one run at a time: one
// stream rather than four (4096-row panels, W0/X50 on the LLaMA-7B shapes, one thread, two
// builds run alternately twice: 0.75-0.76 / 1.83-2.00 / 1.89-2.02 ms against
// 0.82-0.85 / 2.11 / 2.20-2.23 ms with four, 1.59-1.89x dense16 against 1.47-1.68x). Eight runs
// with bitmaps, as fast as four in L2, were 6-15% slower from memory at W50/X50 (one thread, two
// alternated runs, by hand): GCC spills their pointers to the stack.
constexpr int kGroup = 4;
// Runs without bitmaps one token decodes side by side when decode reads streams (Reads below),
// and how far ahead of its reads each stream is prefetched (StreamPrefetcher). On the Intel Xeon
// (2 GHz, KVM) where streams were measured, reading 8 KiB chunks with this software prefetch and
// no arithmetic gave one thread 12-14 GB/s as one stream at any distance (2 to 32 KiB, into L1
// or L2), 18-22 GB/s as 4 to 16 streams 768 to 4096 bytes ahead, and two threads 22 against
// 35-40 (by hand). In the kernel, 8 streams without bitmaps against 1 took W0/X50 on the
// LLaMA-7B shapes from 1.1-1.2x to 1.8-1.9x dense16 on two threads; with bitmaps, 8 streams were
// no faster from memory than 4 and slower in L2 (the pointers spill), so they keep kGroup; 768
// or 3072 bytes ahead instead of 1536 were within the noise (benchmarks/cpu_kernels.py on two
// shapes, alternated builds, by hand).
constexpr int kStreams = 8;
constexpr int64_t kStreamAheadBytes = 1536;
// Channels a decode pass of MT tokens (0: several) over a layout with or without bitmaps (BM)
// decodes together, where `several` is what the ISA's registers hold for several tokens: both
// ISAs' decode_pass follow this one rule.
constexpr int decode_group(int MT, bool BM, int several, bool streams) {
  return MT == 1 ? (BM ? kGroup : streams ? kStreams : 1) : several;
}
// Several tokens, AVX-512: six channels' expanded blocks (24 of the 32 zmm registers) next to one
// token's 4 sums and its broadcast activation, so each token's sums are loaded and stored once
// per six channels. The model of benchmarks/vllm_cpu_decode.py, its four linear shapes at 8
// tokens, 50% / 50%, one thread, out of cache: 71.0 ms for 16 layers against 78.9 with four
// channels (77.7, 72.9, 80.6 with five, seven, eight); 2 to 16 tokens 5-14% faster, 64 equal.
constexpr int kGroupSeveralAvx512 = 6;
// Decode reads this far ahead of itself into L1 (RunPrefetcher). One thread, 2048 x 2048 at 50%
// weight sparsity, all channels active, weights out of cache: 7.7 GB/s with only the hardware
// prefetcher, 17.7 / 21.9 / 20.5 GB/s at 4 / 16 / 64 KiB ahead (22.2 GB/s with the weights in
// cache), on 2048-row panels and 4 KiB pages. Retuned on 4096-row panels and huge pages, the
// LLaMA-7B shapes, each distance timed against 16 KiB call after call in one process (by hand):
// W50/X50 at 6 / 10 KiB 1.4-1.9x slower, at 20 to 48 KiB 5-9% faster on one thread and 2-8% on
// two (24 and 32 KiB the best); at 32 KiB fp16 W50/X50 5-10% and 3-5% faster, W50/X0 2-3% on
// both, W70/X50 and 8 tokens within 5% either way.
constexpr int64_t kPrefetchAheadBytes = 32 * 1024;
// Runs staged into L2 (below) go into L1 only this far ahead. Against 32 KiB, two threads took
// 3-9% less time at W0/X50 (bf16; fp16 2-6%; W0/X25 too), one thread 0-3% more (medians per
// shape, builds alternated, two or three runs each, by hand); at 8 KiB 4-5% more than at 16, at
// 12 and 20 within 3%; AVX2 within 4% either way. In the tables (benchmarks/cpu_kernels.py, six
// runs alternated with 32 KiB) the two-thread gain showed in the machine's slow spells only
// (W0/X50 median 1.48x to 1.55x dense16; 1.54x either way in fast ones), one thread 1-6% less
// time. A guess at why: 32 KiB ahead plus a pass's 16 KiB of accumulators fill this CPU's 48 KiB
// L1.
constexpr int64_t kStagedAheadBytes = 16 * 1024;
// Runs without bitmaps are also staged into L2 this far ahead (RunPrefetcher) when a sixteenth
// of the channels or more are skipped. Their decode does little per byte, and with L1 prefetches
// alone it waited on memory: a second cursor, prefetching into L2, keeps more lines in flight.
// By hand, both versions behind a switch and timed call after call in one process, LLaMA-7B
// shapes: W0/X50 bf16 took 20-25% less time on one thread and 0-20% less on two (fp16 20-22%
// and 10%), W0/X25 13-26% and 8-17%, W0/X10 6-11% and 1-9%; with every channel active it cost
// 2-8% on one thread (the runs are then one stream the hardware prefetcher follows), and with
// bitmaps, whose decode does more per byte, the extra prefetches cost more than they saved
// (W50/X50 13-17% slower on one thread, W70/X50 and 8 tokens slower on both).
constexpr int64_t kL2AheadBytes = 64 * 1024;
// Blocks a decode pass reads between two reports of its reads to its prefetcher, with and
// without bitmaps (BM). One thread, LLaMA-7B shapes, weights out of cache, by hand (builds run in
// alternating processes): with bitmaps every 4th block (W50/X50 0.99-1.05 ms on the two large
// shapes) against every 2nd (1.01-1.07) and every block (1.48-1.49); without, every block
// (W0/X50 1.54-1.62 ms) against every 4th (1.79-2.00 with the same cursor).
constexpr int64_t report_blocks(bool BM) { return BM ? 4 : 1; }
// Prefill multiplies slices of this many rows (all K channels decompressed: 256 x K fp32, 2 MiB
// at K = 2048), and threads decompress at least kPrefillChannelGrain channels each.
constexpr int64_t kPrefillSliceRows = 256;
constexpr int64_t kPrefillChannelGrain = 64;

int detect_isa() {
#ifdef DUOGPT_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c") && __builtin_cpu_supports("popcnt") &&
                    __builtin_cpu_supports("bmi2");
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi2")) {
    return kAvx512;
  }
  if (avx2) return kAvx2;
#endif
  return kScalar;
}

// Tests lower these to exercise every path on one machine.
std::atomic<int> g_max_isa{kAvx512};
std::atomic<int64_t> g_prefill_min_tokens{-1};  // -1: the measured default of the ISA

int active_isa() {
  static const int detected = detect_isa();
  return std::min(detected, g_max_isa.load());
}

// Token count from which decompress + GEMM beats the decode path. Measured at 6144 x 2048 and
// 2048 x 5632, 50% / 50% (AMD EPYC with AVX-512, oneDNN GEMMs, row-major prefill tiles): the
// AVX-512 decode shares each expanded block between tokens; on one thread it wins or ties at 64
// tokens (7.7 and 11.3 ms vs 10.8 and 11.3), splits at 96 (11.7 vs 14.7, 17.4 vs 15.2) and
// loses at 128 (23.5-23.7 vs 18.4-19.0); on two threads it loses from 64 tokens on (6.0-6.5 vs
// 5.4-5.7). The AVX2 decode, same shapes, wins at 16 tokens (6.5 and 5.9 ms vs 7.9 and 6.4 on
// one thread, 4.9 vs 6.5 and 5.3 on two) and loses at 32 (17.9 and 11.3 vs 9.3 and 8.5 on one,
// 9.0-9.1 vs 6.5-8.1 on two): the AVX2 decompress costs about 5-6 ms a product here, so short
// prefills stay on the decode path.
int64_t prefill_min_tokens(int isa) {
  const int64_t forced = g_prefill_min_tokens.load();
  if (forced >= 0) return forced;
  return isa == kAvx512 ? 128 : 32;
}

// A run is a segment after another, a segment a block after another; a block is 4 bitmap words
// and the kept values or, in a layout without bitmaps (nearly dense weights), the values of all
// its 64 rows.
struct Layout {
  const uint16_t* data;
  const int64_t* offsets;  // [n_panel * K * n_seg + 1]
  int64_t N, K, panel_rows, n_panel;
  int64_t n_seg, seg_blocks;  // segments per panel, blocks per segment
  int kind;
  bool bitmaps;

  // segment s of panel p's run for channel k; s = n_seg is where the run ends (the next
  // channel's run, or the next panel's first)
  const uint16_t* segment(int64_t p, int64_t k, int64_t s) const {
    return data + offsets[(p * K + k) * n_seg + s];
  }
  const uint16_t* run(int64_t p, int64_t k) const { return segment(p, k, 0); }
  int64_t first_row(int64_t p) const { return p * panel_rows; }
  int64_t rows(int64_t p) const { return std::min(panel_rows, N - first_row(p)); }
  int64_t blocks(int64_t p) const { return (rows(p) + kBlockRows - 1) / kBlockRows; }
};

// Channels with any token's thresholded activation nonzero (NaN counts as nonzero, like the
// reference), and their thresholded activations, token-minor: xs[i * M + m].
struct ActiveSet {
  std::vector<int32_t> idx;
  std::vector<float> xs;
};

// One activation after the threshold: zero when |v| < tau, else v (NaN kept, as in the reference).
// Masks the bits rather than branching: half of the activations fall on each side, and the branch
// GCC chose mispredicted on every other one (a 64 x 5632 product of 8 tokens, mostly thresholding:
// 234 us a call with the branch, 110-113 us with the mask).
inline float sparsify(float v, float tau) {
  const uint32_t keep = 0u - static_cast<uint32_t>(!(std::fabs(v) < tau));
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  bits &= keep;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// Which channels any token keeps comes first, in one pass over each token's row (the compiler
// vectorises it), then the kept channels' activations are gathered. A single loop writing each
// activation to the slot of a channel not yet known to be kept made every store wait on the
// previous channel's count (the same 64 x 5632 product of 8 tokens: 110-113 us, 81-83 this way).
void collect_active(const float* x, int64_t M, int64_t K, float tau, ActiveSet& a) {
  std::vector<uint8_t> kept(K, 0);
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * K;
    for (int64_t k = 0; k < K; ++k) kept[k] |= sparsify(row[k], tau) != 0.f;
  }
  a.idx.resize(K);
  int64_t n = 0;
  for (int64_t k = 0; k < K; ++k) {
    a.idx[n] = static_cast<int32_t>(k);
    n += kept[k];
  }
  a.idx.resize(n);
  a.xs.resize(n * M);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t m = 0; m < M; ++m) a.xs[i * M + m] = sparsify(x[m * K + a.idx[i]], tau);
  }
}

// One decode unit: segments [s0, s1) of panel p, which hold its blocks [b0, b1), and active
// channels [i0, i1); acc is [M][acc_stride(blocks())], zeroed.
struct Pass {
  int64_t p, s0, s1, i0, i1, b0, b1;
  Pass(const Layout& L, int64_t p_, int64_t s0_, int64_t s1_, int64_t i0_, int64_t i1_)
      : p(p_), s0(s0_), s1(s1_), i0(i0_), i1(i1_), b0(s0_ * L.seg_blocks),
        b1(std::min(L.blocks(p_), s1_ * L.seg_blocks)) {}
  int64_t blocks() const { return b1 - b0; }
};

// One prefill unit's rows: blocks [b0, b1) of panel p.
struct Slice {
  int64_t p, b0, b1;
  int64_t rows() const { return (b1 - b0) * kBlockRows; }
};

inline float to_float(uint16_t bits, int kind) {
  if (kind == kBF16) return static_cast<float>(c10::BFloat16(bits, c10::BFloat16::from_bits()));
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

// Floats between two tokens' accumulators of a pass of `blocks` blocks. The 16-float pad keeps
// them out of the same L1 sets: with a stride that is a multiple of 4 KiB, more than 8 tokens
// thrash an 8-way L1 (measured 10x slower at 12 tokens).
inline int64_t acc_stride(int64_t blocks) { return blocks * kBlockRows + 16; }

// A decode pass's accumulators, zeroed, on a 64-byte boundary (acc_stride keeps every token's
// row there too): from a plain vector every 64-byte vector load and store of the passes straddled
// two cache lines.
class AccBuffer {
 public:
  float* zeroed(int64_t n) {
    buf_.assign(n + kLineFloats, 0.f);
    const uintptr_t at = reinterpret_cast<uintptr_t>(buf_.data());
    return reinterpret_cast<float*>((at + 63) & ~uintptr_t{63});
  }

 private:
  static constexpr int64_t kLineFloats = 16;
  std::vector<float> buf_;
};

inline uint64_t load_bitmap(const uint16_t* p) {
  uint64_t w;
  std::memcpy(&w, p, 8);
  return w;
}

// The kept rows of the block at p, with p moved to its first value: the block's bitmap, or every
// row in a layout without bitmaps.
inline uint64_t take_bitmap(bool bitmaps, const uint16_t*& p) {
  if (!bitmaps) return ~uint64_t{0};
  const uint64_t w = load_bitmap(p);
  p += 4;
  return w;
}

// Walks the bytes of a decode pass's active runs in the order the pass reads them, prefetching
// each line it passes with the given locality (3: into L1, 2: into L2). Its position is three
// addresses, compared and moved inline; only a step into the next run reads the layout.
template <int Locality>
class RunCursor {
 public:
  RunCursor(const Layout& L, const ActiveSet& a, const Pass& ps)
      : L_(L), a_(a), ps_(ps), j_(ps.i0) {
    if (j_ < ps_.i1) {
      start_run(0);
    } else {
      stop();
    }
  }
  // Prefetch `bytes` more.
  inline void advance(int64_t bytes) {
    until_ += bytes;
    if (__builtin_expect(until_ > end_, 0)) cross_runs();
    prefetch_below(until_);
  }

 private:
  // The lines from line_ up to `limit`.
  inline void prefetch_below(uintptr_t limit) {
    for (; line_ < limit; line_ += 64) {
      __builtin_prefetch(reinterpret_cast<const void*>(line_), 0, Locality);
    }
  }
  // Past the end of the current run: its remaining lines, then the next runs'.
  inline void cross_runs() {
    while (until_ > end_) {
      prefetch_below(end_);
      if (++j_ >= ps_.i1) return stop();
      start_run(until_ - end_);
    }
  }
  // Run j_, `carry` bytes into it.
  inline void start_run(uintptr_t carry) {
    const int64_t k = a_.idx[j_];
    const uintptr_t begin = reinterpret_cast<uintptr_t>(L_.segment(ps_.p, k, ps_.s0));
    end_ = reinterpret_cast<uintptr_t>(L_.segment(ps_.p, k, ps_.s1));
    until_ = begin + carry;
    line_ = std::max(line_, begin & ~uintptr_t{63});
  }
  // Every run prefetched: nothing is below line_ from now on.
  inline void stop() { line_ = end_ = UINTPTR_MAX; }

  const Layout& L_;
  const ActiveSet& a_;
  const Pass& ps_;
  int64_t j_;
  uintptr_t line_ = 0;   // the first line not yet prefetched
  uintptr_t until_ = 0;  // prefetch the lines below this address of run j_
  uintptr_t end_ = 0;    // where run j_ ends
};

// Reads ahead of a decode pass: prefetches the bytes of the active runs the pass will read, in the
// order it reads them, kPrefetchAheadBytes ahead of its reads into L1 or, for runs without bitmaps
// when a sixteenth of the channels or more are skipped, kStagedAheadBytes into L1 and kL2AheadBytes
// into L2. The pass reports its read positions every report_blocks() blocks and after its last. The
// hardware prefetcher cannot do this: it stops at every skipped run, and even with all runs active
// it left the pass waiting on memory. Its bookkeeping, not its prefetch instructions, was what it
// cost: in L2 (one thread, 4096 x 192 and 2048 x 384, by hand) a W50 block took 2.3-2.4 ns with it,
// 1.7 without it, the same 2.3 with only the prefetch instructions taken out. The cursors are plain
// numbers now, advanced between the decode loop's report points rather than tested in every block
// (W50 blocks 2.0-2.1 ns in L2).
class RunPrefetcher {
 public:
  RunPrefetcher(const Layout& L, const ActiveSet& a, const Pass& ps)
      : l1_(L, a, ps),
        l2_(L, a, ps),
        staged_(!L.bitmaps && 16 * static_cast<int64_t>(a.idx.size()) <= 15 * L.K) {
    l1_.advance(staged_ ? kStagedAheadBytes : kPrefetchAheadBytes);
    if (staged_) l2_.advance(kL2AheadBytes);
  }
  // The pass starts decoding a group of runs whose read positions are p.
  template <int G>
  inline void start_group(const uint16_t* const (&p)[G], int64_t) {
    reported_ = read_position(p);
  }
  // The group's read positions are now p: prefetch as many bytes as it has read since the last
  // report.
  template <int G>
  inline void report(const uint16_t* const (&p)[G]) {
    const uintptr_t now = read_position(p);
    const int64_t bytes = static_cast<int64_t>(now - reported_);
    l1_.advance(bytes);
    if (staged_) l2_.advance(bytes);
    reported_ = now;
  }

 private:
  template <int G>
  static uintptr_t read_position(const uint16_t* const (&p)[G]) {
    uintptr_t sum = 0;
    for (int g = 0; g < G; ++g) sum += reinterpret_cast<uintptr_t>(p[g]);
    return sum;
  }
  RunCursor<3> l1_;
  RunCursor<2> l2_;
  const bool staged_;
  uintptr_t reported_ = 0;  // the group's read positions, summed, when last reported
};

// Reads ahead of a decode pass as streams: each of the G runs a group decodes side by side is
// prefetched kStreamAheadBytes ahead of its own reads and, past its end, into the run the same
// stream reads next (the same place in the next group), as far as that run goes. Where the
// memory serves several streams faster than one (see kStreams), this keeps the pass reading G.
class StreamPrefetcher {
 public:
  StreamPrefetcher(const Layout& L, const ActiveSet& a, const Pass& ps) : L_(L), a_(a), ps_(ps) {}
  // The pass starts decoding runs [i, i + G), whose read positions are p.
  template <int G>
  inline void start_group(const uint16_t* const (&p)[G], int64_t i) {
    static_assert(G <= kStreams, "more runs than streams");
    for (int g = 0; g < G; ++g) {
      pos_[g] = reinterpret_cast<uintptr_t>(p[g]);
      end_[g] = address(i + g, ps_.s1);
      const int64_t j = i + G + g;
      next_[g] = j < ps_.i1 ? address(j, ps_.s0) : 0;
      next_end_[g] = j < ps_.i1 ? address(j, ps_.s1) : 0;
      // a run no earlier stream ran into: its first bytes
      if (i + g >= headed_) prefetch(g, pos_[g] & ~uintptr_t{63}, pos_[g] + kStreamAheadBytes);
    }
    headed_ = std::max(headed_, i + 2 * G);
  }
  // The group's read positions are now p.
  template <int G>
  inline void report(const uint16_t* const (&p)[G]) {
    for (int g = 0; g < G; ++g) {
      const uintptr_t now = reinterpret_cast<uintptr_t>(p[g]);
      prefetch(g, pos_[g] + kStreamAheadBytes, now + kStreamAheadBytes);
      pos_[g] = now;
    }
  }

 private:
  uintptr_t address(int64_t i, int64_t s) const {
    return reinterpret_cast<uintptr_t>(L_.segment(ps_.p, a_.idx[i], s));
  }
  // Stream g's lines from lo to hi, as addresses of its current run continued into its next.
  inline void prefetch(int g, uintptr_t lo, uintptr_t hi) {
    for (uintptr_t at = (lo + 63) & ~uintptr_t{63}; at < hi; at += 64) {
      if (at < end_[g]) {
        __builtin_prefetch(reinterpret_cast<const void*>(at), 0, 3);
      } else if (next_[g] + (at - end_[g]) < next_end_[g]) {
        __builtin_prefetch(reinterpret_cast<const void*>(next_[g] + (at - end_[g])), 0, 3);
      }
    }
  }
  const Layout& L_;
  const ActiveSet& a_;
  const Pass& ps_;
  int64_t headed_ = 0;  // runs from here on: no stream has prefetched their first bytes
  uintptr_t pos_[kStreams], end_[kStreams], next_[kStreams], next_end_[kStreams];
};

// The CPU make the decode's tunings below were measured on: Intel (a Xeon) or another (AMD Zen 5).
bool intel_cpu() {
#ifdef DUOGPT_X86
  __builtin_cpu_init();
  return __builtin_cpu_is("intel");
#else
  return false;
#endif
}

// One of two ways of running, by default the one measured faster on this CPU's make (looked up
// once, when the library loads); tests and benchmarks force either through cpu_kernel_config.
class MakeChoice {
 public:
  MakeChoice(const char* what, const char* way0, const char* way1, int on_intel, int elsewhere)
      : what_(what), names_{way0, way1}, by_cpu_(intel_cpu() ? on_intel : elsewhere) {}
  int active() const {
    const int forced = forced_.load();
    return forced >= 0 ? forced : by_cpu_;
  }
  const char* active_name() const { return names_[active()]; }
  // cpu_kernel_config's argument: -2 restores the default, -1 leaves the choice alone, else the
  // way of that number.
  void set(int64_t value) {
    TORCH_CHECK(value >= -2 && value < 2, "cpu_kernel_config: ", what_, " ", value,
                " is not -2, -1, 0 (", names_[0], ") or 1 (", names_[1], ")");
    if (value != -1) forced_.store(value == -2 ? -1 : static_cast<int>(value));
  }

 private:
  const char* what_;
  const char* names_[2];
  int by_cpu_;
  std::atomic<int> forced_{-1};  // -1: by_cpu_
};

// How decode reads its runs: kCursorReads (RunPrefetcher; runs without bitmaps one at a time) or
// kStreamReads (StreamPrefetcher; kStreams of them side by side). Measured: streams on an Intel
// Xeon (kStreams), the cursor on AMD Zen 5, where one run at a time was faster (kGroup) and
// every distance above was tuned; other CPUs get the cursor, the older of the two.
enum Reads : int { kCursorReads = 0, kStreamReads = 1 };
MakeChoice g_reads("reads", "cursor", "streams", kStreamReads, kCursorReads);

// How the AVX-512 paths make fp32 of 16-bit values (UnpackWidening and ShiftWidening in that
// region), named after their bf16 step: on Intel, where it was measured faster, bf16 is shifted
// and masked and fp16 expanded as 16-bit words before converting; elsewhere the older way, bf16
// interleaved with zeros and fp16 converted before four float expands (on AMD Zen 5, where
// every other distance here was tuned, an earlier by-hand try found shifts slower, and the fp16
// order was measured). Both give the same floats.
enum Widening : int { kUnpackWidening = 0, kShiftWidening = 1 };
MakeChoice g_widening("widening", "unpack", "shift", kShiftWidening, kUnpackWidening);

// ---------------------------------------------------------------- portable paths

void decode_pass_scalar(const Layout& L, const ActiveSet& a, int64_t M, const Pass& ps,
                        float* acc) {
  const int64_t stride = acc_stride(ps.blocks());
  for (int64_t i = ps.i0; i < ps.i1; ++i) {
    const uint16_t* p = L.segment(ps.p, a.idx[i], ps.s0);
    const float* xs = &a.xs[i * M];
    for (int64_t b = 0; b < ps.blocks(); ++b) {
      const uint16_t* v = p;
      for (uint64_t w = take_bitmap(L.bitmaps, v); w; w &= w - 1) {
        const float wv = to_float(*v++, L.kind);
        const int64_t r = b * kBlockRows + __builtin_ctzll(w);
        for (int64_t m = 0; m < M; ++m) acc[m * stride + r] += wv * xs[m];
      }
      p = v;
    }
  }
}

// The prefill tile is row-major, tile[r * K + k] = W[first row of sl + r, k]: oneDNN multiplies a
// [rows, K] weight as fast as a dense layer's, while the channel-major [K, rows] tile of earlier
// versions cost about 14% more GEMM time at 512 tokens. decompress writes its columns [k0, k1);
// at[k] points at block sl.b0 of channel k's run in panel sl.p and is left at block sl.b1.
void decompress_scalar(const Layout& L, const Slice& sl, int64_t k0, int64_t k1,
                       const uint16_t** at, float* tile) {
  for (int64_t r = 0; r < sl.rows(); ++r) std::fill(tile + r * L.K + k0, tile + r * L.K + k1, 0.f);
  for (int64_t k = k0; k < k1; ++k) {
    const uint16_t*& p = at[k];
    for (int64_t b = 0; b < sl.b1 - sl.b0; ++b) {
      const uint16_t* v = p;
      for (uint64_t w = take_bitmap(L.bitmaps, v); w; w &= w - 1) {
        tile[(b * kBlockRows + __builtin_ctzll(w)) * L.K + k] = to_float(*v++, L.kind);
      }
      p = v;
    }
  }
}

// Channels the vector decompressors stage at a time. Each tile row then receives 128 contiguous
// floats per visit: 16 (one 64-byte line) per visit wrote a 256 x 2048 tile at 8-11 GB/s, 128 at
// 104 GB/s (the rows are 8 KiB apart, and a line per row at a time defeats the caches).
constexpr int kStageChannels = 128;

// Channels [full, n) of a staged block (block[c][r], row order), rows [r0, r0 + nrows), to the
// row-major tile at `out` (row 0, first channel; rows ld floats apart): the channels after the
// last whole vector group.
inline void copy_tail_channels(const float (*block)[kBlockRows], int full, int n, int64_t r0,
                               int nrows, float* out, int64_t ld) {
  for (int i = 0; i < nrows; ++i) {
    for (int c = full; c < n; ++c) out[(r0 + i) * ld + c] = block[c][r0 + i];
  }
}

}  // namespace duogpt_cpu

#ifdef DUOGPT_X86
// ---------------------------------------------------------------- AVX2 (+FMA, F16C)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,popcnt,bmi,bmi2")
namespace duogpt_cpu::avx2 {

// pshufb controls, one per bitmap byte (8 rows): bf16 places the value's two bytes in the high
// half of an fp32 lane (that is the bf16 -> fp32 conversion); fp16 expands to 16-bit lanes for
// vcvtph2ps. 0x80 writes a zero byte.
struct Luts {
  alignas(32) uint8_t bf16[256][32];
  alignas(16) uint8_t fp16[256][16];
  Luts() {
    for (int b = 0; b < 256; ++b) {
      int rank = 0;
      for (int r = 0; r < 8; ++r) {
        const bool kept = (b >> r) & 1;
        // rows 0-3 sit in the low 128-bit lane, 4-7 in the high one; both lanes hold a copy
        // of the same 16 source bytes (vbroadcasti128), so ranks index them directly.
        uint8_t* lane = &bf16[b][4 * r];
        lane[0] = lane[1] = 0x80;
        lane[2] = kept ? static_cast<uint8_t>(2 * rank) : 0x80;
        lane[3] = kept ? static_cast<uint8_t>(2 * rank + 1) : 0x80;
        fp16[b][2 * r] = kept ? static_cast<uint8_t>(2 * rank) : 0x80;
        fp16[b][2 * r + 1] = kept ? static_cast<uint8_t>(2 * rank + 1) : 0x80;
        rank += kept;
      }
    }
  }
};
const Luts kLuts;

// 8 rows: the kept values starting at v, expanded to fp32 lanes with zeros for pruned rows.
// Loads 16 bytes whatever the popcount; `data` ends with padding for that.
template <int KIND, bool BM>
inline __m256 expand8(const uint16_t* v, uint32_t byte) {
  if constexpr (!BM) {  // all 8 rows stored (no bitmaps): plain widening, no shuffle
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(v));
    return KIND == kBF16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16))
                         : _mm256_cvtph_ps(raw);
  } else if constexpr (KIND == kBF16) {
    const __m256i ctrl = _mm256_load_si256(reinterpret_cast<const __m256i*>(kLuts.bf16[byte]));
    // vbroadcastf128 from memory: a load alone. Broadcasting a loaded register took a shuffle too
    // (vperm2i128), and bf16 W50/X50 ran 1.21-1.24x as long (LLaMA-7B shapes, one thread).
    const __m256i both =
        _mm256_castps_si256(_mm256_broadcast_ps(reinterpret_cast<const __m128*>(v)));
    return _mm256_castsi256_ps(_mm256_shuffle_epi8(both, ctrl));
  } else {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(v));
    const __m128i ctrl = _mm_load_si128(reinterpret_cast<const __m128i*>(kLuts.fp16[byte]));
    return _mm256_cvtph_ps(_mm_shuffle_epi8(raw, ctrl));
  }
}

// The 64 rows of the block at p as 8 fp32 vectors; returns the next block. Every group's start
// is an independent popcount of the 64-bit bitmap, so the only serial step between blocks is
// one load, one popcount and one add. BM: the layout has bitmaps (else all rows are stored).
template <int KIND, bool BM>
inline const uint16_t* expand_block(const uint16_t* p, __m256 w[8]) {
  const uint16_t* v = p;
  const uint64_t bits = take_bitmap(BM, v);
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) {
    const uint64_t below = j == 0 ? 0 : _mm_popcnt_u64(bits & ((uint64_t{1} << (8 * j)) - 1));
    w[j] = expand8<KIND, BM>(v + below, static_cast<uint32_t>(bits >> (8 * j)) & 0xFF);
  }
  return v + _mm_popcnt_u64(bits);
}

// G active channels [i, i + G) of pass ps, every block: acc += w * x for each token. One token
// keeps a block's 8 sums in registers across the G channels; more tokens go through memory
// (16 ymm registers do not hold G expanded blocks).
template <int KIND, int MT, int G, bool BM, class Ahead>
inline void decode_channels(const Layout& L, const ActiveSet& a, int64_t M, const Pass& ps,
                            int64_t i, float* acc, Ahead& ahead) {
  const int64_t blocks = ps.blocks(), stride = acc_stride(blocks);
  const uint16_t* p[G];
  for (int g = 0; g < G; ++g) p[g] = L.segment(ps.p, a.idx[i + g], ps.s0);
  const float* xs = &a.xs[i * M];
  ahead.start_group(p, i);
  for (int64_t b = 0; b < blocks;) {
    for (const int64_t stop = std::min(b + report_blocks(BM), blocks); b < stop; ++b) {
      float* out = acc + b * kBlockRows;
      if constexpr (MT == 1) {
        __m256 s[8];
        for (int j = 0; j < 8; ++j) s[j] = _mm256_loadu_ps(out + 8 * j);
        for (int g = 0; g < G; ++g) {
          __m256 w[8];
          p[g] = expand_block<KIND, BM>(p[g], w);
          const __m256 x = _mm256_set1_ps(xs[g]);
          for (int j = 0; j < 8; ++j) s[j] = _mm256_fmadd_ps(w[j], x, s[j]);
        }
        for (int j = 0; j < 8; ++j) _mm256_storeu_ps(out + 8 * j, s[j]);
      } else {
        for (int g = 0; g < G; ++g) {
          __m256 w[8];
          p[g] = expand_block<KIND, BM>(p[g], w);
          for (int64_t m = 0; m < M; ++m) {
            float* o = out + m * stride;
            const __m256 x = _mm256_set1_ps(xs[g * M + m]);
            for (int j = 0; j < 8; ++j) {
              _mm256_storeu_ps(o + 8 * j, _mm256_fmadd_ps(w[j], x, _mm256_loadu_ps(o + 8 * j)));
            }
          }
        }
      }
    }
    ahead.report(p);
  }
}

// MT: the token count when known at compile time (1), else 0 and M at run time.
template <int KIND, int MT, bool BM, class Ahead>
void decode_runs(const Layout& L, const ActiveSet& a, int64_t M, const Pass& ps, float* acc) {
  Ahead ahead(L, a, ps);
  int64_t i = ps.i0;
  constexpr int G = decode_group(MT, BM, kGroup, std::is_same_v<Ahead, StreamPrefetcher>);
  for (; i + G <= ps.i1; i += G) {
    decode_channels<KIND, MT, G, BM>(L, a, M, ps, i, acc, ahead);
  }
  for (; i < ps.i1; ++i) decode_channels<KIND, MT, 1, BM>(L, a, M, ps, i, acc, ahead);
}

template <int KIND, int MT, bool BM>
void decode_pass(const Layout& L, const ActiveSet& a, int64_t M_, const Pass& ps, float* acc) {
  const int64_t M = MT ? MT : M_;
  if (g_reads.active() == kStreamReads) {
    decode_runs<KIND, MT, BM, StreamPrefetcher>(L, a, M, ps, acc);
  } else {
    decode_runs<KIND, MT, BM, RunPrefetcher>(L, a, M, ps, acc);
  }
}

// Transposes 8 channels x 8 rows (in[c] holds rows r..r+7 of channel c) into 8 tile rows of 8
// channels each, stored one row every ld floats from `out`.
inline void store_transposed8(const __m256 in[8], float* out, int64_t ld) {
  __m256 a[8], b[8];
  for (int i = 0; i < 4; ++i) {
    a[2 * i] = _mm256_unpacklo_ps(in[2 * i], in[2 * i + 1]);
    a[2 * i + 1] = _mm256_unpackhi_ps(in[2 * i], in[2 * i + 1]);
  }
  // b[4 * i + m], lane l: row 4 * l + m of channels 4i..4i+3
  for (int i = 0; i < 2; ++i) {
    b[4 * i] = _mm256_shuffle_ps(a[4 * i], a[4 * i + 2], 0x44);
    b[4 * i + 1] = _mm256_shuffle_ps(a[4 * i], a[4 * i + 2], 0xEE);
    b[4 * i + 2] = _mm256_shuffle_ps(a[4 * i + 1], a[4 * i + 3], 0x44);
    b[4 * i + 3] = _mm256_shuffle_ps(a[4 * i + 1], a[4 * i + 3], 0xEE);
  }
  for (int m = 0; m < 4; ++m) {
    _mm256_storeu_ps(out + m * ld, _mm256_permute2f128_ps(b[m], b[4 + m], 0x20));
    _mm256_storeu_ps(out + (m + 4) * ld, _mm256_permute2f128_ps(b[m], b[4 + m], 0x31));
  }
}

// kStageChannels channels at a time: each block's channels are expanded into `block` and
// transposed in registers, 8 x 8 at a time, into `stage`, whose rows go to the tile; each
// channel's next block is prefetched (see the AVX-512 decompress).
template <int KIND, bool BM>
void decompress(const Layout& L, const Slice& sl, int64_t k0, int64_t k1, const uint16_t** at,
                float* tile) {
  alignas(32) float block[kStageChannels][kBlockRows];
  alignas(32) float stage[8 * kStageChannels];
  for (int64_t kg = k0; kg < k1; kg += kStageChannels) {
    const int n = static_cast<int>(std::min<int64_t>(kStageChannels, k1 - kg));
    const int full = n / 8 * 8;
    for (int64_t b = sl.b0; b < sl.b1; ++b) {
      for (int c = 0; c < n; ++c) {
        __m256 w[8];
        at[kg + c] = expand_block<KIND, BM>(at[kg + c], w);
        __builtin_prefetch(at[kg + c] + 64);
        for (int j = 0; j < 8; ++j) _mm256_store_ps(block[c] + 8 * j, w[j]);
      }
      float* out = tile + (b - sl.b0) * kBlockRows * L.K + kg;
      for (int j = 0; j < 8; ++j) {
        for (int s = 0; s < full; s += 8) {
          __m256 in[8];
          for (int c = 0; c < 8; ++c) in[c] = _mm256_load_ps(block[s + c] + 8 * j);
          store_transposed8(in, stage + s, kStageChannels);
        }
        for (int i = 0; i < 8; ++i) {
          float* row = out + (8 * j + i) * L.K;
          for (int c = 0; c < full; c += 8) {
            _mm256_storeu_ps(row + c, _mm256_load_ps(stage + i * kStageChannels + c));
          }
        }
        copy_tail_channels(block, full, n, 8 * j, 8, out, L.K);
      }
    }
  }
}

}  // namespace duogpt_cpu::avx2
#pragma GCC pop_options

// ---------------------------------------------------------------- AVX-512 (BW, VL, VBMI2)
// decode_pass and decompress follow the AVX2 ones with other vectors: a target pragma covers the
// functions defined inside its region only, and a template shared across regions could not
// inline the intrinsics.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,avx2,fma,f16c,popcnt,bmi,bmi2")
namespace duogpt_cpu::avx512 {

// The expands below zero their destination register first. vpexpandw and vexpandps with zero
// masking still wait for that register's previous value on this CPU (AMD Zen 5), and GCC may give
// every expand of a block loop the same register: a chain. With the activations' broadcasts out of
// the loop, GCC did so, and a W50 block took 2.8-3.1 ns in L2 instead of 2.0 (one thread, 4096 x
// 96 to 2048 x 384, by hand). vpxord of a register with itself does not wait on it. It also frees
// the block loop to keep the broadcasts in registers: 1.85-1.98 ns per block in L2 (the same
// runs; 1.9-2.1 with the zeroing alone).
inline __m512i expand_epi16_zeroed(__mmask32 bits, __m512i v) {
  __m512i r;
  asm("vpxord %0, %0, %0\n\tvpexpandw %1, %0%{%2%}%{z%}" : "=&v"(r) : "v"(v), "Yk"(bits));
  return r;
}
inline __m512 expand_ps_zeroed(__mmask16 bits, __m512 v) {
  __m512 r;
  asm("vpxord %0, %0, %0\n\tvexpandps %1, %0%{%2%}%{z%}" : "=&v"(r) : "v"(v), "Yk"(bits));
  return r;
}

// A quarter block of fp16 values (16 rows), in row order: the kept values are converted first,
// then vexpandps spreads them over their rows (UnpackWidening). On AMD Zen 5, expanding the
// 16-bit words and converting after (as bf16 does) ran 6.6-6.8 ns per block of one channel at 8
// tokens in cache against 5.5-5.7 this way (by hand, a standalone copy of the loop): vcvtph2ps
// is the costly step there, and this way it converts only the kept values. For bf16 the same
// order is slower (5.6 against 4.8 ns).
inline __m512 expand16_fp16(const uint16_t* v, uint32_t bits) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v));
  asm("" : "+v"(raw));
  return expand_ps_zeroed(bits, _mm512_cvtph_ps(raw));
}

// How a block's 16-bit values become fp32 lanes; the Widening setting picks one of the two
// below. Widening bf16 puts each value in the high half of a 32-bit lane: vpexpandw leaves 32
// rows as 16 lanes of two rows each (row 2j in the low half of lane j, row 2j + 1 in the high
// half), a widening makes two fp32 vectors of them, `lo` and `hi`, in an order of its own
// (halves), and natural_order() puts the accumulators back in row order once per pass. fp16 is
// converted (fp16_block), in row order.
// Interleaving bf16 with zeros orders the lanes by 128-bit lane (rows 0-3, 8-11, 16-19, 24-27 in
// `lo`, the others in `hi`). Both interleaves run on the expands' port on Intel.
struct UnpackWidening {
  static void halves(__m512i r, __m512& lo, __m512& hi) {
    lo = _mm512_castsi512_ps(_mm512_unpacklo_epi16(_mm512_setzero_si512(), r));
    hi = _mm512_castsi512_ps(_mm512_unpackhi_epi16(_mm512_setzero_si512(), r));
  }
  // row n < 16 is lo lane 4 * (n / 8) + n % 8 when n % 8 < 4, else hi lane 4 * (n / 8) + n % 8
  // - 4 (index + 16 in a two-source permute); rows 16-31 are the same plus 8
  static __m512i first_rows() {
    return _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  }
  static uint32_t high_bits(uint64_t bits) { return static_cast<uint32_t>(bits >> 32); }
  // A block of fp16 values with bitmap `bits` at v, in row order.
  static void fp16_block(const uint16_t* v, uint64_t bits, __m512 w[4]) {
    for (int j = 0; j < 4; ++j) {
      const uint32_t rows = static_cast<uint32_t>(bits >> (16 * j)) & 0xFFFF;
      w[j] = expand16_fp16(v, rows);
      v += _mm_popcnt_u32(rows);
    }
  }
};
// Shifting bf16 left by 16 bits widens the even rows (`lo`), clearing the low halves the odd
// ones (`hi`), off the expands' port. The bitmap's high half is shifted in a general register too:
// GCC otherwise moves all 64 bits into a mask register and shifts it there, one more instruction
// on that port. Intel Xeon, one thread, the W50 block loop in L2 (4096 x 192 and 2048 x 384, all
// channels active, builds alternated three times, by hand): 4.7-5.2 ns a block against 6.0-8.1
// with the interleaves.
struct ShiftWidening {
  static void halves(__m512i r, __m512& lo, __m512& hi) {
    lo = _mm512_castsi512_ps(_mm512_slli_epi32(r, 16));
    hi = _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  // row n is lo lane n / 2 when even, else hi lane n / 2 (index + 16); rows 16-31 plus 8
  static __m512i first_rows() {
    return _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  }
  static uint32_t high_bits(uint64_t bits) {
    uint32_t high = static_cast<uint32_t>(bits >> 32);
    asm("" : "+r"(high));
    return high;
  }
  // fp16 the same way round: the 16-bit words of 32 rows expanded at once, then each half
  // converted, rather than four float expands of kept values converted first. Intel Xeon, one
  // thread (by hand, the two ways switched call after call in one process, three rounds): a W50
  // block in L2 5.3-5.7 ns against 6.9-7.3 (4096 x 192 and 2048 x 384).
  static void fp16_block(const uint16_t* v, uint64_t bits, __m512 w[4]) {
    for (int h = 0; h < 2; ++h) {
      const uint32_t rows = h ? high_bits(bits) : static_cast<uint32_t>(bits);
      const __m512i r = expand_epi16_zeroed(rows, _mm512_loadu_si512(v));
      w[2 * h] = _mm512_cvtph_ps(_mm512_castsi512_si256(r));
      w[2 * h + 1] = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(r, 1));
      v += _mm_popcnt_u32(rows);
    }
  }
};

// Half a block of bf16 values (32 rows), expanded and widened by W. The load stays a load of its
// own (the expand takes a register): vpexpandw's memory form is slower on Zen (one thread, 2048 x
// 4096 at 50% / 0%, in cache: 22.8 GB/s folded, 27.7 GB/s apart).
template <class W>
inline void expand32_bf16(const uint16_t* v, uint32_t bits, __m512& lo, __m512& hi) {
  W::halves(expand_epi16_zeroed(bits, _mm512_loadu_si512(v)), lo, hi);
}

// The 64 values of a block without bitmap as 4 fp32 vectors, in expand_block's order: the
// widening alone. Skipping the expands (identities here) took bf16 W0/X50 on the LLaMA-7B
// shapes 0-5% less time on two threads (three runs) and 5% less on one (one run), by hand: both
// versions behind a switch, timed call after call in one process.
template <int KIND, class W>
inline void widen_block(const uint16_t* v, __m512 w[4]) {
  if constexpr (KIND == kBF16) {
    for (int h = 0; h < 2; ++h) W::halves(_mm512_loadu_si512(v + 32 * h), w[2 * h], w[2 * h + 1]);
  } else {
    for (int j = 0; j < 4; ++j) {
      w[j] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 16 * j)));
    }
  }
}

// The 64 rows of the block at p as 4 fp32 vectors (bf16: in W's order, fp16: row order);
// returns the next block. BM: the layout has bitmaps (else all rows are stored).
template <int KIND, bool BM, class W>
inline const uint16_t* expand_block(const uint16_t* p, __m512 w[4]) {
  if constexpr (!BM) {
    widen_block<KIND, W>(p, w);
    return p + kBlockRows;
  }
  const uint16_t* v = p;
  const uint64_t bits = take_bitmap(BM, v);
  if constexpr (KIND == kBF16) {
    const uint32_t low = static_cast<uint32_t>(bits);
    expand32_bf16<W>(v, low, w[0], w[1]);
    expand32_bf16<W>(v + _mm_popcnt_u32(low), W::high_bits(bits), w[2], w[3]);
  } else {
    W::fp16_block(v, bits, w);
  }
  return v + _mm_popcnt_u64(bits);
}

// Rewrites 32 accumulators from W's lane order into row order.
template <int KIND, class W>
inline void natural_order(float* acc) {
  if constexpr (KIND == kBF16) {
    const __m512i first = W::first_rows();
    const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
    const __m512 lo = _mm512_loadu_ps(acc), hi = _mm512_loadu_ps(acc + 16);
    _mm512_storeu_ps(acc, _mm512_permutex2var_ps(lo, first, hi));
    _mm512_storeu_ps(acc + 16, _mm512_permutex2var_ps(lo, second, hi));
  }
}

// G active channels [i, i + G) of pass ps, every block: acc += w * x for each token. The
// expanded blocks of the G channels stay in registers while every token uses them.
template <int KIND, int MT, int G, bool BM, class W, class Ahead>
inline void decode_channels(const Layout& L, const ActiveSet& a, int64_t M, const Pass& ps,
                            int64_t i, float* acc, Ahead& ahead) {
  const int64_t blocks = ps.blocks(), stride = acc_stride(blocks);
  const uint16_t* p[G];
  for (int g = 0; g < G; ++g) p[g] = L.segment(ps.p, a.idx[i + g], ps.s0);
  const float* xs = &a.xs[i * M];
  __m512 x1[G];  // one token: the activations, broadcast once
  for (int g = 0; g < G; ++g) x1[g] = _mm512_set1_ps(xs[g * M]);
  ahead.start_group(p, i);
  for (int64_t b = 0; b < blocks;) {
    for (const int64_t stop = std::min(b + report_blocks(BM), blocks); b < stop; ++b) {
      float* out = acc + b * kBlockRows;
      if constexpr (MT == 1) {
        __m512 s[4];
        for (int q = 0; q < 4; ++q) s[q] = _mm512_loadu_ps(out + 16 * q);
        for (int g = 0; g < G; ++g) {
          __m512 w[4];
          p[g] = expand_block<KIND, BM, W>(p[g], w);
          for (int q = 0; q < 4; ++q) s[q] = _mm512_fmadd_ps(w[q], x1[g], s[q]);
        }
        for (int q = 0; q < 4; ++q) _mm512_storeu_ps(out + 16 * q, s[q]);
      } else {
        __m512 w[G][4];
        for (int g = 0; g < G; ++g) p[g] = expand_block<KIND, BM, W>(p[g], w[g]);
        for (int64_t m = 0; m < M; ++m, out += stride) {
          __m512 s[4];
          for (int q = 0; q < 4; ++q) s[q] = _mm512_loadu_ps(out + 16 * q);
          for (int g = 0; g < G; ++g) {
            const __m512 x = _mm512_set1_ps(xs[g * M + m]);
            for (int q = 0; q < 4; ++q) s[q] = _mm512_fmadd_ps(w[g][q], x, s[q]);
          }
          for (int q = 0; q < 4; ++q) _mm512_storeu_ps(out + 16 * q, s[q]);
        }
      }
    }
    ahead.report(p);
  }
}

// MT: the token count when known at compile time (1), else 0 and M at run time; W: the widening
// (Widening).
template <int KIND, int MT, bool BM, class W, class Ahead>
void decode_runs(const Layout& L, const ActiveSet& a, int64_t M, const Pass& ps, float* acc) {
  Ahead ahead(L, a, ps);
  int64_t i = ps.i0;
  constexpr int G =
      decode_group(MT, BM, kGroupSeveralAvx512, std::is_same_v<Ahead, StreamPrefetcher>);
  for (; i + G <= ps.i1; i += G) {
    decode_channels<KIND, MT, G, BM, W>(L, a, M, ps, i, acc, ahead);
  }
  for (; i < ps.i1; ++i) decode_channels<KIND, MT, 1, BM, W>(L, a, M, ps, i, acc, ahead);
}

template <int KIND, int MT, bool BM, class W>
void decode_widened(const Layout& L, const ActiveSet& a, int64_t M, const Pass& ps, float* acc) {
  if (g_reads.active() == kStreamReads) {
    decode_runs<KIND, MT, BM, W, StreamPrefetcher>(L, a, M, ps, acc);
  } else {
    decode_runs<KIND, MT, BM, W, RunPrefetcher>(L, a, M, ps, acc);
  }
  const int64_t stride = acc_stride(ps.blocks()), rows = ps.blocks() * kBlockRows;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t r = 0; r < rows; r += 32) natural_order<KIND, W>(acc + m * stride + r);
  }
}

template <int KIND, int MT, bool BM>
void decode_pass(const Layout& L, const ActiveSet& a, int64_t M_, const Pass& ps, float* acc) {
  const int64_t M = MT ? MT : M_;
  if (g_widening.active() == kShiftWidening) {
    decode_widened<KIND, MT, BM, ShiftWidening>(L, a, M, ps, acc);
  } else {
    decode_widened<KIND, MT, BM, UnpackWidening>(L, a, M, ps, acc);
  }
}

// Transposes 16 channels x 16 rows (in[c] holds rows r..r+15 of channel c) into 16 tile rows of
// 16 channels each, stored one row every ld floats from `out`.
inline void store_transposed16(const __m512 in[16], float* out, int64_t ld) {
  __m512 a[16], b[16];
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = _mm512_unpacklo_ps(in[2 * i], in[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_ps(in[2 * i], in[2 * i + 1]);
  }
  // b[4 * i + m], 128-bit lane l: row 4 * l + m of channels 4i..4i+3
  for (int i = 0; i < 4; ++i) {
    b[4 * i] = _mm512_shuffle_ps(a[4 * i], a[4 * i + 2], 0x44);
    b[4 * i + 1] = _mm512_shuffle_ps(a[4 * i], a[4 * i + 2], 0xEE);
    b[4 * i + 2] = _mm512_shuffle_ps(a[4 * i + 1], a[4 * i + 3], 0x44);
    b[4 * i + 3] = _mm512_shuffle_ps(a[4 * i + 1], a[4 * i + 3], 0xEE);
  }
  for (int m = 0; m < 4; ++m) {
    const __m512 s0 = _mm512_shuffle_f32x4(b[m], b[4 + m], 0x44);
    const __m512 s1 = _mm512_shuffle_f32x4(b[m], b[4 + m], 0xEE);
    const __m512 s2 = _mm512_shuffle_f32x4(b[8 + m], b[12 + m], 0x44);
    const __m512 s3 = _mm512_shuffle_f32x4(b[8 + m], b[12 + m], 0xEE);
    _mm512_storeu_ps(out + m * ld, _mm512_shuffle_f32x4(s0, s2, 0x88));
    _mm512_storeu_ps(out + (4 + m) * ld, _mm512_shuffle_f32x4(s0, s2, 0xDD));
    _mm512_storeu_ps(out + (8 + m) * ld, _mm512_shuffle_f32x4(s1, s3, 0x88));
    _mm512_storeu_ps(out + (12 + m) * ld, _mm512_shuffle_f32x4(s1, s3, 0xDD));
  }
}

// kStageChannels channels at a time: each block's channels are expanded into `block`, put in row
// order, and transposed in registers, 16 x 16 at a time, into `stage`, whose rows go to the tile.
// A channel's next block is read only after the other 127 channels' blocks: it is prefetched
// (without that, decompressing 6144 x 2048 took 6.1 instead of 3.3 ms, one thread).
template <int KIND, bool BM, class W>
void decompress_widened(const Layout& L, const Slice& sl, int64_t k0, int64_t k1,
                        const uint16_t** at, float* tile) {
  alignas(64) float block[kStageChannels][kBlockRows];
  alignas(64) float stage[16 * kStageChannels];
  for (int64_t kg = k0; kg < k1; kg += kStageChannels) {
    const int n = static_cast<int>(std::min<int64_t>(kStageChannels, k1 - kg));
    const int full = n / 16 * 16;
    for (int64_t b = sl.b0; b < sl.b1; ++b) {
      for (int c = 0; c < n; ++c) {
        __m512 w[4];
        at[kg + c] = expand_block<KIND, BM, W>(at[kg + c], w);
        __builtin_prefetch(at[kg + c] + 64);
        for (int q = 0; q < 4; ++q) _mm512_store_ps(block[c] + 16 * q, w[q]);
        natural_order<KIND, W>(block[c]);
        natural_order<KIND, W>(block[c] + 32);
      }
      float* out = tile + (b - sl.b0) * kBlockRows * L.K + kg;
      for (int q = 0; q < 4; ++q) {
        for (int s = 0; s < full; s += 16) {
          __m512 in[16];
          for (int c = 0; c < 16; ++c) in[c] = _mm512_load_ps(block[s + c] + 16 * q);
          store_transposed16(in, stage + s, kStageChannels);
        }
        for (int i = 0; i < 16; ++i) {
          float* row = out + (16 * q + i) * L.K;
          for (int c = 0; c < full; c += 16) {
            _mm512_storeu_ps(row + c, _mm512_load_ps(stage + i * kStageChannels + c));
          }
        }
        copy_tail_channels(block, full, n, 16 * q, 16, out, L.K);
      }
    }
  }
}

template <int KIND, bool BM>
void decompress(const Layout& L, const Slice& sl, int64_t k0, int64_t k1, const uint16_t** at,
                float* tile) {
  if (g_widening.active() == kShiftWidening) {
    decompress_widened<KIND, BM, ShiftWidening>(L, sl, k0, k1, at, tile);
  } else {
    decompress_widened<KIND, BM, UnpackWidening>(L, sl, k0, k1, at, tile);
  }
}

}  // namespace duogpt_cpu::avx512
#pragma GCC pop_options
#endif  // DUOGPT_X86

namespace duogpt_cpu {

// ---------------------------------------------------------------- dispatch

using DecodeFn = void (*)(const Layout&, const ActiveSet&, int64_t, const Pass&, float*);
using DecompressFn = void (*)(const Layout&, const Slice&, int64_t, int64_t, const uint16_t**,
                              float*);

#ifdef DUOGPT_X86
// Each ISA's instantiations, indexed [value kind][has bitmaps][one token].
const DecodeFn kAvx512Decode[2][2][2] = {
    {{avx512::decode_pass<kBF16, 0, false>, avx512::decode_pass<kBF16, 1, false>},
     {avx512::decode_pass<kBF16, 0, true>, avx512::decode_pass<kBF16, 1, true>}},
    {{avx512::decode_pass<kFP16, 0, false>, avx512::decode_pass<kFP16, 1, false>},
     {avx512::decode_pass<kFP16, 0, true>, avx512::decode_pass<kFP16, 1, true>}}};
const DecodeFn kAvx2Decode[2][2][2] = {
    {{avx2::decode_pass<kBF16, 0, false>, avx2::decode_pass<kBF16, 1, false>},
     {avx2::decode_pass<kBF16, 0, true>, avx2::decode_pass<kBF16, 1, true>}},
    {{avx2::decode_pass<kFP16, 0, false>, avx2::decode_pass<kFP16, 1, false>},
     {avx2::decode_pass<kFP16, 0, true>, avx2::decode_pass<kFP16, 1, true>}}};
// [value kind][has bitmaps]
const DecompressFn kAvx512Decompress[2][2] = {
    {avx512::decompress<kBF16, false>, avx512::decompress<kBF16, true>},
    {avx512::decompress<kFP16, false>, avx512::decompress<kFP16, true>}};
const DecompressFn kAvx2Decompress[2][2] = {
    {avx2::decompress<kBF16, false>, avx2::decompress<kBF16, true>},
    {avx2::decompress<kFP16, false>, avx2::decompress<kFP16, true>}};
#endif

void decode_pass(int isa, const Layout& L, const ActiveSet& a, int64_t M, const Pass& ps,
                 float* acc) {
#ifdef DUOGPT_X86
  if (isa == kAvx512) return kAvx512Decode[L.kind][L.bitmaps][M == 1](L, a, M, ps, acc);
  if (isa == kAvx2) return kAvx2Decode[L.kind][L.bitmaps][M == 1](L, a, M, ps, acc);
#endif
  decode_pass_scalar(L, a, M, ps, acc);
}

void decompress(int isa, const Layout& L, const Slice& sl, int64_t k0, int64_t k1,
                const uint16_t** at, float* tile) {
#ifdef DUOGPT_X86
  if (isa == kAvx512) return kAvx512Decompress[L.kind][L.bitmaps](L, sl, k0, k1, at, tile);
  if (isa == kAvx2) return kAvx2Decompress[L.kind][L.bitmaps](L, sl, k0, k1, at, tile);
#endif
  decompress_scalar(L, sl, k0, k1, at, tile);
}

// Few tokens. Splitting the active channels (not the rows) between threads keeps every read a
// whole run: runs cut into row ranges leave regular gaps that the hardware prefetcher fills with
// unused lines (a 2.5x slowdown measured). Slices are slice-major, so with one slice per thread
// each thread owns one slice over all panels: equal work whatever the panel sizes. One token
// reads whole runs (the longer the runs, the faster skipping reads); several tokens read one
// segment of each at a time, so that the M accumulators of a pass stay in cache.
void decode(int isa, const Layout& L, const ActiveSet& a, int64_t M, const float* bias,
            float* y) {
  const int64_t nact = a.idx.size();
  const int64_t n_slice =
      std::clamp<int64_t>(nact / kMinSliceChannels, 1, at::get_num_threads());
  at::Tensor partial;  // [n_slice, M, N] when slices must be summed
  float* part = nullptr;
  if (n_slice > 1) {
    partial = at::empty({n_slice, M, L.N}, at::kFloat);
    part = partial.data_ptr<float>();
  }
  const int64_t seg_per_pass = M == 1 ? L.n_seg : 1;
  const int64_t passes_per_panel = L.n_seg / seg_per_pass;
  const int64_t per_slice = L.n_panel * passes_per_panel;
  at::parallel_for(0, n_slice * per_slice, 1, [&](int64_t u0, int64_t u1) {
    AccBuffer buffer;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t s = u / per_slice, p = u % per_slice / passes_per_panel;
      const int64_t s0 = u % passes_per_panel * seg_per_pass;
      const Pass ps(L, p, s0, s0 + seg_per_pass, nact * s / n_slice, nact * (s + 1) / n_slice);
      if (ps.blocks() <= 0) continue;  // segments past the last panel's rows
      const int64_t stride = acc_stride(ps.blocks());
      const int64_t r0 = L.first_row(p) + ps.b0 * kBlockRows;
      const int64_t rows = std::min(L.N - r0, ps.blocks() * kBlockRows);
      float* acc = buffer.zeroed(M * stride);
      decode_pass(isa, L, a, M, ps, acc);
      for (int64_t m = 0; m < M; ++m) {
        const float* src = acc + m * stride;
        if (part) {
          std::copy(src, src + rows, part + (s * M + m) * L.N + r0);
        } else {
          for (int64_t r = 0; r < rows; ++r) {
            y[m * L.N + r0 + r] = src[r] + (bias ? bias[r0 + r] : 0.f);
          }
        }
      }
    }
  });
  if (!part) return;
  at::parallel_for(0, M * L.N, 4096, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      float sum = bias ? bias[j % L.N] : 0.f;
      for (int64_t s = 0; s < n_slice; ++s) sum += part[s * M * L.N + j];
      y[j] = sum;
    }
  });
}

// The product of many tokens with one decompressed row-major tile, plus its rows' bias:
// [M, K] x [R, K]^T + bias -> [M, R]. oneDNN's matmul (PyTorch's mkldnn::_linear_pointwise) where
// this PyTorch has it, else at::addmm (MKL, whose GEMMs run slower code on AMD CPUs: 512 tokens x
// 6144 x 2048 in fp32, one thread, 54 vs 120 ms in results/cpu_kernels_prefill.txt).
at::Tensor tile_product(const at::Tensor& xs, const at::Tensor& tile,
                        const std::optional<at::Tensor>& bias) {
  static const std::optional<c10::OperatorHandle> onednn =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  if (!onednn) return bias ? at::addmm(*bias, xs, tile.t()) : at::mm(xs, tile.t());
  static const auto linear =
      onednn->typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                               const std::optional<at::Tensor>&, c10::string_view,
                               c10::List<std::optional<at::Scalar>>,
                               std::optional<c10::string_view>)>();
  return linear.call(xs, tile, bias, "none", c10::List<std::optional<at::Scalar>>(),
                     std::nullopt);
}

// Many tokens: the union of active channels is nearly all of them (method.md section 8), so
// only weight sparsity helps. A slice of kPrefillSliceRows rows at a time, every channel of it is
// decompressed into a row-major fp32 tile (threads split the channels; a cursor per channel walks
// its run) and multiplied in one GEMM whose result fills the slice's outputs: never a dense copy
// of the layer.
void prefill(int isa, const Layout& L, const at::Tensor& xs, const std::optional<at::Tensor>& bias,
             const at::Tensor& y) {
  constexpr int64_t slice_blocks = kPrefillSliceRows / kBlockRows;
  at::Tensor buf = at::empty({kPrefillSliceRows * L.K}, xs.options());
  std::vector<const uint16_t*> cursor(L.K);
  for (int64_t p = 0; p < L.n_panel; ++p) {
    for (int64_t k = 0; k < L.K; ++k) cursor[k] = L.run(p, k);
    for (int64_t b0 = 0; b0 < L.blocks(p); b0 += slice_blocks) {
      const Slice sl{p, b0, std::min(b0 + slice_blocks, L.blocks(p))};
      float* tile = buf.data_ptr<float>();
      at::parallel_for(0, L.K, kPrefillChannelGrain, [&](int64_t k0, int64_t k1) {
        decompress(isa, L, sl, k0, k1, cursor.data(), tile);
      });
      const int64_t r0 = L.first_row(p) + b0 * kBlockRows;
      const int64_t rows = std::min(sl.rows(), L.N - r0);
      const std::optional<at::Tensor> slice_bias =
          bias ? std::optional<at::Tensor>(bias->narrow(0, r0, rows)) : std::nullopt;
      y.narrow(1, r0, rows)
          .copy_(tile_product(xs, buf.narrow(0, 0, rows * L.K).view({rows, L.K}), slice_bias));
    }
  }
}

// x after the threshold (sparsify), for the prefill GEMM. A loop: at::where(x.abs() < tau, 0, x)
// took 23 ms for 512 x 5632 on one thread, a third of the product.
at::Tensor thresholded(const at::Tensor& x, float tau) {
  at::Tensor xs = at::empty_like(x);
  const float* src = x.data_ptr<float>();
  float* dst = xs.data_ptr<float>();
  at::parallel_for(0, x.numel(), 1 << 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) dst[i] = sparsify(src[i], tau);
  });
  return xs;
}

// The bias of an op with N outputs: nullptr when there is none, else its data after checking
// that it is a contiguous float32 [N].
const float* checked_bias(const std::optional<at::Tensor>& bias, int64_t N) {
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == at::kFloat &&
                  bias->is_contiguous(),
              "bias must be contiguous float32 [", N, "]");
  return bias->data_ptr<float>();
}

// x: [M, K] fp32; data: [L] int16; offsets: [n_panel * K * S + 1] int64 (S segments a panel);
// bitmaps: whether blocks carry bitmaps (else every row is stored); bias: [N] fp32 or None
// out: [M, N] fp32
at::Tensor cpu_dual_sparse_linear(const at::Tensor& x, const at::Tensor& data,
                                  const at::Tensor& offsets, int64_t out_features,
                                  int64_t panel_rows, int64_t value_kind, bool bitmaps,
                                  double threshold, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x must be a contiguous [M, K] float32 tensor, got ", x.sizes(), " ", x.dtype());
  TORCH_CHECK(data.dim() == 1 && data.scalar_type() == at::kShort && data.is_contiguous(),
              "data must be contiguous 1-D int16");
  TORCH_CHECK(panel_rows > 0 && panel_rows % kBlockRows == 0,
              "panel_rows must be a positive multiple of 64, got ", panel_rows);
  TORCH_CHECK(value_kind == kBF16 || value_kind == kFP16,
              "value_kind must be 0 (bf16) or 1 (fp16), got ", value_kind);
  const int64_t M = x.size(0), K = x.size(1), N = out_features;
  const int64_t n_panel = (N + panel_rows - 1) / panel_rows, runs = n_panel * K;
  TORCH_CHECK(offsets.dim() == 1 && offsets.scalar_type() == at::kLong &&
                  offsets.is_contiguous() && offsets.size(0) >= 1 &&
                  (offsets.size(0) - 1) % std::max<int64_t>(runs, 1) == 0,
              "offsets must be contiguous int64 [n_panel * K * segments + 1] with n_panel * K = ",
              runs, ", got ", offsets.sizes());
  const int64_t n_seg = runs ? (offsets.size(0) - 1) / runs : 1;
  TORCH_CHECK(n_seg >= 1 && panel_rows % (n_seg * kBlockRows) == 0,
              "offsets hold ", n_seg, " segments a panel; panel_rows=", panel_rows,
              " is not a multiple of ", n_seg, " x 64");
  const float* bias_ptr = checked_bias(bias, N);
  const Layout L{reinterpret_cast<const uint16_t*>(data.data_ptr<int16_t>()),
                 offsets.data_ptr<int64_t>(),
                 N,
                 K,
                 panel_rows,
                 n_panel,
                 n_seg,
                 panel_rows / n_seg / kBlockRows,
                 static_cast<int>(value_kind),
                 bitmaps};
  const int isa = active_isa();
  const float tau = static_cast<float>(threshold);

  if (M >= prefill_min_tokens(isa)) {
    if (M == 0 || K == 0 || N == 0) {
      return bias_ptr ? bias->unsqueeze(0).expand({M, N}).contiguous()
                      : at::zeros({M, N}, x.options());
    }
    at::Tensor xs = thresholded(x, tau);
    at::Tensor y = at::empty({M, N}, x.options());
    prefill(isa, L, xs, bias, y);
    return y;
  }
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  ActiveSet active;
  collect_active(x.data_ptr<float>(), M, K, tau, active);
  decode(isa, L, active, M, bias_ptr, y.data_ptr<float>());
  return y;
}

// ---------------------------------------------------------------- dense 16-bit linear
// A dense [N, K] weight of 16-bit values (the benchmark's dense 16-bit baseline, and the
// lm_head of a 16-bit checkpoint), streamed at memory speed: with AVX-512 once whatever the
// token count, with AVX2 once per token.

// Each row is prefetched this many values ahead of its reads (past its end: the same row of the
// next group). Without it, four rows read side by side left one thread at 20-27 GB/s on the
// LLaMA-7B shapes (two threads: 33-42); 256 / 512 / 768 / 1024 / 1536 values ahead gave 26-27 /
// 30-31 / 32-33 / 31-32 / 29-30 GB/s on one thread, and 768 gave 38-43 on two; the AVX2 loop
// gained alike (one thread 18-22 -> 30-32 GB/s). By hand: the variants behind a switch, timed
// call after call in one process.
constexpr int64_t kDense16AheadValues = 768;

// Prefetches, for column k of the R rows starting at `rows` (a [*, K] weight), the line
// kDense16AheadValues ahead in each row (past a row's end: the same row of the next R). Called
// once per 32 columns: one prefetch per 64-byte line of each row.
inline void prefetch_rows_ahead(const uint16_t* rows, int R, int64_t K, int64_t k) {
  const int64_t ahead = k + kDense16AheadValues;
  for (int r = 0; r < R; ++r) {
    __builtin_prefetch(ahead < K ? rows + r * K + ahead : rows + (R + r) * K + ahead - K, 0, 3);
  }
}

#ifdef DUOGPT_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
template <int KIND>
inline __m256 load8_as_float(const uint16_t* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (KIND == kBF16) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  } else {
    return _mm256_cvtph_ps(raw);
  }
}

inline float hsum(__m256 v) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  float s = 0.f;
  for (float l : lanes) s += l;
  return s;
}

// y[n] = W[n, :] . x for rows [n0, n1), one token. Four rows at a time share each load of x
// (x of a long row does not fit L1), two sums per row hide FMA latency.
template <int KIND>
void dense16_rows(const uint16_t* W, const float* x, float* y, int64_t K, int64_t n0, int64_t n1) {
  const int64_t k16 = K - K % 16;
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const uint16_t* row = W + n * K;
    __m256 s[4][2];
    for (int r = 0; r < 4; ++r) s[r][0] = s[r][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < k16; k += 16) {
      if ((k & 31) == 0) prefetch_rows_ahead(row, 4, K, k);
      const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
      for (int r = 0; r < 4; ++r) {
        s[r][0] = _mm256_fmadd_ps(load8_as_float<KIND>(row + r * K + k), x0, s[r][0]);
        s[r][1] = _mm256_fmadd_ps(load8_as_float<KIND>(row + r * K + k + 8), x1, s[r][1]);
      }
    }
    for (int r = 0; r < 4; ++r) {
      float t = hsum(_mm256_add_ps(s[r][0], s[r][1]));
      for (int64_t k = k16; k < K; ++k) t += to_float(row[r * K + k], KIND) * x[k];
      y[n + r] = t;
    }
  }
  for (; n < n1; ++n) {
    float t = 0.f;
    for (int64_t k = 0; k < K; ++k) t += to_float(W[n * K + k], KIND) * x[k];
    y[n] = t;
  }
}
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace avx512 {
template <int KIND>
inline __m512 load16_as_float(const uint16_t* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  if constexpr (KIND == kBF16) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  } else {
    return _mm512_cvtph_ps(raw);
  }
}

// Y[m, n] = W[n, :] . X[m, :] for rows [n0, n0 + R) and tokens [m0, m0 + T): each weight vector
// loaded once serves T tokens; R x T accumulators (16 at most) stay in registers.
template <int KIND, int R, int T>
inline void dense16_tile(const uint16_t* W, const float* X, float* Y, int64_t K, int64_t N,
                         int64_t n0, int64_t m0) {
  const int64_t k16 = K - K % 16;
  __m512 s[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) s[r][t] = _mm512_setzero_ps();
  for (int64_t k = 0; k < k16; k += 16) {
    __m512 w[R];
    if ((k & 31) == 0) prefetch_rows_ahead(W + n0 * K, R, K, k);
    for (int r = 0; r < R; ++r) w[r] = load16_as_float<KIND>(W + (n0 + r) * K + k);
    for (int t = 0; t < T; ++t) {
      const __m512 x = _mm512_loadu_ps(X + (m0 + t) * K + k);
      for (int r = 0; r < R; ++r) s[r][t] = _mm512_fmadd_ps(w[r], x, s[r][t]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int t = 0; t < T; ++t) {
      float v = _mm512_reduce_add_ps(s[r][t]);
      for (int64_t k = k16; k < K; ++k) {
        v += to_float(W[(n0 + r) * K + k], KIND) * X[(m0 + t) * K + k];
      }
      Y[(m0 + t) * N + n0 + r] = v;
    }
  }
}

// Rows [n0, n1) for all M tokens: groups of 4 rows (16 KiB of weights at K = 2048, read from
// memory once and from L1 for every further token tile), tokens 4 at a time.
template <int KIND>
void dense16_rows(const uint16_t* W, const float* X, float* Y, int64_t M, int64_t K, int64_t N,
                  int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) dense16_tile<KIND, 4, 4>(W, X, Y, K, N, n, m);
    for (; m < M; ++m) dense16_tile<KIND, 4, 1>(W, X, Y, K, N, n, m);
  }
  for (; n < n1; ++n) {
    for (int64_t m = 0; m < M; ++m) dense16_tile<KIND, 1, 1>(W, X, Y, K, N, n, m);
  }
}
}  // namespace avx512
#pragma GCC pop_options
#endif

// w: [N, K] bf16 or fp16; x: [M, K] fp32
// out: [M, N] fp32
at::Tensor cpu_dense16_linear(const at::Tensor& x, const at::Tensor& w,
                              const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() &&
                  (w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kHalf),
              "w must be a contiguous [N, K] bf16/fp16 tensor, got ", w.sizes(), " ", w.dtype());
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.size(1) && x.scalar_type() == at::kFloat &&
                  x.is_contiguous(),
              "x must be a contiguous [M, ", w.size(1), "] float32 tensor, got ", x.sizes(), " ",
              x.dtype());
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  checked_bias(bias, N);
  const int kind = w.scalar_type() == at::kBFloat16 ? kBF16 : kFP16;
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  const float* xp = x.data_ptr<float>();
  at::Tensor y = at::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  const int isa = active_isa();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
#ifdef DUOGPT_X86
    if (isa == kAvx512) {
      return kind == kBF16 ? avx512::dense16_rows<kBF16>(wp, xp, yp, M, K, N, n0, n1)
                           : avx512::dense16_rows<kFP16>(wp, xp, yp, M, K, N, n0, n1);
    }
    if (isa == kAvx2) {
      for (int64_t m = 0; m < M; ++m) {
        kind == kBF16 ? avx2::dense16_rows<kBF16>(wp, xp + m * K, yp + m * N, K, n0, n1)
                      : avx2::dense16_rows<kFP16>(wp, xp + m * K, yp + m * N, K, n0, n1);
      }
      return;
    }
#endif
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t n = n0; n < n1; ++n) {
        float s = 0.f;
        for (int64_t k = 0; k < K; ++k) s += to_float(wp[n * K + k], kind) * xp[m * K + k];
        yp[m * N + n] = s;
      }
    }
  });
  if (bias.has_value()) y.add_(*bias);
  return y;
}

// Caps the ISA (tests run every path on one machine), forces the token count from which the
// prefill path runs, how decode reads its runs (Reads) and how 16-bit values are widened
// (Widening); -2 restores a setting's default, -1 leaves it alone.
std::string cpu_kernel_config(int64_t max_isa, int64_t prefill_min_tokens_, int64_t reads,
                              int64_t widening) {
  if (max_isa >= 0) g_max_isa.store(static_cast<int>(std::min<int64_t>(max_isa, kAvx512)));
  if (prefill_min_tokens_ >= 0 || prefill_min_tokens_ == -2) {
    g_prefill_min_tokens.store(prefill_min_tokens_ == -2 ? -1 : prefill_min_tokens_);
  }
  g_reads.set(reads);
  g_widening.set(widening);
  const int isa = active_isa();
  return std::string("isa=") + kIsaNames[isa] + " detected=" + kIsaNames[detect_isa()] +
         " prefill_min_tokens=" + std::to_string(prefill_min_tokens(isa)) +
         " reads=" + g_reads.active_name() + " widening=" + g_widening.active_name();
}

}  // namespace duogpt_cpu

TORCH_LIBRARY_FRAGMENT(duogpt, m) {
  m.def(
      "cpu_dual_sparse_linear(Tensor x, Tensor data, Tensor offsets, int out_features, "
      "int panel_rows, int value_kind, bool bitmaps, float threshold, Tensor? bias) -> Tensor");
  m.def("cpu_dense16_linear(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("cpu_kernel_config(int max_isa, int prefill_min_tokens, int reads, int widening) -> str",
        &duogpt_cpu::cpu_kernel_config);
}

TORCH_LIBRARY_IMPL(duogpt, CPU, m) {
  m.impl("cpu_dual_sparse_linear", &duogpt_cpu::cpu_dual_sparse_linear);
  m.impl("cpu_dense16_linear", &duogpt_cpu::cpu_dense16_linear);
}
