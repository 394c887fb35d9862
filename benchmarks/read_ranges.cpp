// Reads lists of byte ranges and does nothing else: the time any kernel needs just to bring
// those bytes in from memory. Each thread walks its own ranges in order with the software
// prefetch of the CPU decode kernel (kernels/csrc/dual_sparse_cpu.cpp, RunPrefetcher): every
// 64-byte line of the ranges ahead, in read order, a fixed number of bytes ahead of the reads.
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

// Ranges [first, last) of starts / ends (byte addresses), ahead bytes of prefetch.
uint64_t read_in_order(const int64_t* starts, const int64_t* ends, int64_t first, int64_t last,
                       int64_t ahead) {
  uint64_t sum = 0;
  int64_t pf_range = first;  // the prefetch cursor: range, and its next line
  const char* pf_line = first < last ? line_of(starts[first]) : nullptr;
  int64_t lead = 0;  // bytes prefetched minus bytes read
  for (int64_t r = first; r < last; ++r) {
    const char* end = reinterpret_cast<const char*>(ends[r]);
    for (const char* line = line_of(starts[r]); line < end; line += 64) {
      uint64_t word;
      std::memcpy(&word, line, 8);
      sum += word;
      lead -= 64;
      while (lead < ahead && pf_range < last) {
        __builtin_prefetch(pf_line, 0, 3);
        lead += 64;
        pf_line += 64;
        if (pf_line >= reinterpret_cast<const char*>(ends[pf_range]) && ++pf_range < last) {
          pf_line = std::max(pf_line, line_of(starts[pf_range]));
        }
      }
    }
  }
  return sum;
}

// starts, ends: [n] int64 byte addresses; thread_first: [T + 1] int64, thread t reads ranges
// [thread_first[t], thread_first[t + 1]). Returns the sum of the words read.
int64_t read_ranges(const at::Tensor& starts, const at::Tensor& ends,
                    const at::Tensor& thread_first, int64_t ahead) {
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
    for (int64_t t = t0; t < t1; ++t) sums[t] = read_in_order(s, e, tf[t], tf[t + 1], ahead);
  });
  uint64_t total = 0;
  for (uint64_t v : sums) total += v;
  return static_cast<int64_t>(total);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("read_ranges", &read_ranges); }
