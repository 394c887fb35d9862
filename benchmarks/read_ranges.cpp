// Reads lists of byte ranges and does nothing else: the time any kernel needs just to bring
// those bytes in from memory. Each thread reads its own ranges the way the CPU decode kernel
// (kernels/csrc/dual_sparse_cpu.cpp) reads its runs, with its software prefetch:
// - cursor reads (RunPrefetcher): in order, every 64-byte line of the ranges ahead prefetched in
//   read order a fixed number of bytes ahead of the reads into L1 and, where the kernel stages
//   runs into L2 too, by a second cursor further ahead into L2;
// - stream reads (StreamPrefetcher): G ranges side by side, line by line, each prefetched a
//   fixed number of bytes ahead of its own reads and past its end into the range G further on;
//   ranges left over after the last full group one at a time.
// One 8-byte load per line is enough to bring the line in; the sum keeps the loads. Driven by
// read_ceiling.py.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

const char* line_of(uintptr_t address) {
  return reinterpret_cast<const char*>(address & ~uintptr_t{63});
}

uint64_t load_line(const char* line) {
  uint64_t word;
  std::memcpy(&word, line, 8);
  return word;
}

// Walks ranges [range, last) line by line, prefetching with the given locality (3: into L1,
// 2: into L2).
template <int Locality>
struct Cursor {
  const int64_t* starts;
  const int64_t* ends;
  int64_t range, last;
  const char* line;
  Cursor(const int64_t* s, const int64_t* e, int64_t first, int64_t last_)
      : starts(s), ends(e), range(first), last(last_),
        line(first < last_ ? line_of(s[first]) : nullptr) {}
  // Prefetch one more line, if any is left.
  bool step() {
    if (range >= last) return false;
    __builtin_prefetch(line, 0, Locality);
    line += 64;
    if (line >= reinterpret_cast<const char*>(ends[range]) && ++range < last) {
      line = std::max(line, line_of(starts[range]));
    }
    return true;
  }
};

// Ranges [first, last) of starts / ends (byte addresses), prefetched ahead bytes into L1 and,
// when l2_ahead > 0, l2_ahead bytes into L2.
uint64_t read_in_order(const int64_t* starts, const int64_t* ends, int64_t first, int64_t last,
                       int64_t ahead, int64_t l2_ahead) {
  uint64_t sum = 0;
  Cursor<3> l1(starts, ends, first, last);
  Cursor<2> l2(starts, ends, first, last);
  int64_t lead = 0, l2_lead = 0;  // bytes prefetched minus bytes read
  for (int64_t r = first; r < last; ++r) {
    const char* end = reinterpret_cast<const char*>(ends[r]);
    for (const char* line = line_of(starts[r]); line < end; line += 64) {
      sum += load_line(line);
      lead -= 64;
      while (lead < ahead && l1.step()) lead += 64;
      l2_lead -= 64;
      while (l2_lead < l2_ahead && l2.step()) l2_lead += 64;
    }
  }
  return sum;
}

// Ranges [first, last) of starts / ends read as streams: `streams` side by side, each
// prefetched `ahead` bytes ahead into L1.
uint64_t read_as_streams(const int64_t* starts, const int64_t* ends, int64_t first, int64_t last,
                         int64_t streams, int64_t ahead) {
  uint64_t sum = 0;
  int64_t headed = first;  // ranges from here on: no stream has prefetched their first bytes
  for (int64_t r = first; r < last;) {
    const int64_t g = last - r >= streams ? streams : 1;
    // the line `at` bytes into range q's stream: in q, else as far into range q + g
    auto prefetch = [&](int64_t q, uintptr_t at) {
      const uintptr_t end = ends[q];
      if (at < end) return __builtin_prefetch(reinterpret_cast<const char*>(at), 0, 3);
      const int64_t next = q + g;
      if (next < last && starts[next] + (at - end) < static_cast<uintptr_t>(ends[next])) {
        __builtin_prefetch(reinterpret_cast<const char*>(starts[next] + (at - end)), 0, 3);
      }
    };
    int64_t longest = 0;
    for (int64_t q = r; q < r + g; ++q) {
      const uintptr_t first_line = reinterpret_cast<uintptr_t>(line_of(starts[q]));
      longest = std::max<int64_t>(longest, ends[q] - first_line);
      if (q < headed) continue;
      for (uintptr_t at = first_line; at < static_cast<uintptr_t>(starts[q] + ahead); at += 64) {
        prefetch(q, at);
      }
    }
    headed = std::max(headed, r + 2 * g);
    for (int64_t offset = 0; offset < longest; offset += 64) {
      for (int64_t q = r; q < r + g; ++q) {
        const char* line = line_of(starts[q]) + offset;
        if (line >= reinterpret_cast<const char*>(ends[q])) continue;
        sum += load_line(line);
        prefetch(q, reinterpret_cast<uintptr_t>(line) + ahead);
      }
    }
    r += g;
  }
  return sum;
}

// starts, ends: [n] int64 byte addresses; thread_first: [T + 1] int64, thread t reads ranges
// [thread_first[t], thread_first[t + 1]); ahead, l2_ahead: prefetch distances in bytes (0: no
// L2 stage); streams: 0 for cursor reads, else the ranges read side by side (l2_ahead unused).
// Returns the sum of the words read.
int64_t read_ranges(const at::Tensor& starts, const at::Tensor& ends,
                    const at::Tensor& thread_first, int64_t ahead, int64_t l2_ahead,
                    int64_t streams) {
  TORCH_CHECK(starts.dtype() == at::kLong && ends.dtype() == at::kLong &&
                  thread_first.dtype() == at::kLong,
              "read_ranges: int64 tensors expected");
  TORCH_CHECK(starts.is_contiguous() && ends.is_contiguous() && thread_first.is_contiguous() &&
                  starts.numel() == ends.numel(),
              "read_ranges: contiguous starts and ends of one length expected");
  const int64_t* s = starts.data_ptr<int64_t>();
  const int64_t* e = ends.data_ptr<int64_t>();
  const int64_t* tf = thread_first.data_ptr<int64_t>();
  const int64_t threads = thread_first.numel() - 1;
  TORCH_CHECK(threads >= 1 && threads <= at::get_num_threads() && tf[threads] <= starts.numel(),
              "read_ranges: 1 to get_num_threads() thread slices within the ranges expected");
  std::vector<uint64_t> sums(threads, 0);
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      sums[t] = streams > 0 ? read_as_streams(s, e, tf[t], tf[t + 1], streams, ahead)
                            : read_in_order(s, e, tf[t], tf[t + 1], ahead, l2_ahead);
    }
  });
  uint64_t total = 0;
  for (uint64_t v : sums) total += v;
  return static_cast<int64_t>(total);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("read_ranges", &read_ranges); }
