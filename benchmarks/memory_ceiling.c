// How fast this machine delivers the bytes of a decode pass that skips runs at random: reads a
// fraction of fixed-size chunks of a 512 MiB buffer, chosen at random, in address order, split
// between OpenMP threads, with the same software prefetch as the CPU kernel (the chunks' lines in
// read order, a fixed distance ahead). No arithmetic beyond an integer sum: an upper bound for
// the dual-sparse decode kernel's useful bytes per second. HUGE_PAGES 1 advises the buffer onto
// 2 MiB transparent huge pages, as kernels/huge_pages.py does for the weights. Driven by
// memory_ceiling.py.
//
// usage: memory_ceiling CHUNK_BYTES FRACTION AHEAD_BYTES HUGE_PAGES  -> useful GB/s (best of 5)

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char** argv) {
  if (argc != 5) {
    fprintf(stderr, "usage: %s CHUNK_BYTES FRACTION AHEAD_BYTES HUGE_PAGES\n", argv[0]);
    return 2;
  }
  const size_t chunk = strtoul(argv[1], NULL, 10);
  const double fraction = atof(argv[2]);
  const long ahead = atol(argv[3]);
  const int huge = atoi(argv[4]);
  if (chunk < 64 || fraction <= 0 || fraction > 1 || ahead < 0 || (huge != 0 && huge != 1)) {
    fprintf(stderr, "need CHUNK_BYTES >= 64, 0 < FRACTION <= 1, AHEAD_BYTES >= 0, HUGE_PAGES 0|1\n");
    return 2;
  }
  const size_t total = (size_t)512 << 20;
  char* buf = aligned_alloc((size_t)2 << 20, total);
  if (huge && madvise(buf, total, MADV_HUGEPAGE) != 0) {
    perror("madvise(MADV_HUGEPAGE)");
    return 1;
  }
  memset(buf, 1, total);
  const size_t n_chunks = total / chunk;
  size_t* chosen = malloc(n_chunks * sizeof(size_t));
  size_t n = 0;
  srand(1);
  for (size_t i = 0; i < n_chunks; i++) {
    if (rand() / (double)RAND_MAX < fraction) chosen[n++] = i;
  }
  double best = 1e30;
  long checksum = 0;
  for (int rep = 0; rep < 5; rep++) {
    const double start = now();
#pragma omp parallel reduction(+ : checksum)
    {
      const size_t threads = omp_get_num_threads(), me = omp_get_thread_num();
      const size_t first = n * me / threads, last = n * (me + 1) / threads;
      __m256i sum = _mm256_setzero_si256();
      size_t pf_chunk = first, pf_offset = 0;  // the prefetch cursor
      long lead = 0;                           // bytes prefetched minus bytes read
      for (size_t c = first; c < last; c++) {
        const char* p = buf + chosen[c] * chunk;
        for (size_t off = 0; off < chunk; off += 64) {
          sum = _mm256_add_epi32(sum, _mm256_loadu_si256((const __m256i*)(p + off)));
          lead -= 64;
          while (ahead > 0 && lead < ahead && pf_chunk < last) {
            _mm_prefetch(buf + chosen[pf_chunk] * chunk + pf_offset, _MM_HINT_T0);
            lead += 64;
            pf_offset += 64;
            if (pf_offset >= chunk) pf_offset = 0, pf_chunk++;
          }
        }
      }
      checksum += _mm256_extract_epi32(sum, 0);
    }
    const double seconds = now() - start;
    if (seconds < best) best = seconds;
  }
  printf("%.2f\n", (double)n * chunk / best / 1e9);
  fprintf(stderr, "checksum %ld\n", checksum);  // keeps the reads
  free(chosen);
  free(buf);
  return 0;
}
