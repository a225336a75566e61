// y = x @ w^T for a few bf16 rows x [m, k] (m <= 4) and a large dense bf16 weight w [n, k], on CPUs with AVX512-BF16.
//
// A decode step multiplies one row (or a few) by every weight matrix, so its time is the time to read the weights.
// This kernel reads each weight row once, front to back, and the rows in order: every thread streams one
// contiguous range of the weight, which the hardware prefetchers follow at the memory's read bandwidth. Each 32
// values of a weight row meet the same 32 values of every x row in one VDPBF16PS (bf16 pairs multiplied and summed
// into float32 lanes); two accumulators per x row hide its latency. One rounding to bf16 at the end, per output.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

namespace {

constexpr int64_t kLanes = 32;  // bf16 values per 512-bit register

inline __m512bh load_bf16(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
inline __m512bh load_bf16_tail(const uint16_t* p, int64_t count) {
  return (__m512bh)_mm512_maskz_loadu_epi16(static_cast<__mmask32>((1ULL << count) - 1), p);  // zeros past the end
}

// Output rows [n0, n1) of y [M, n] from x [M, k] and w [n, k].
template <int M>
void product_rows(const uint16_t* x, const uint16_t* w, c10::BFloat16* y, int64_t n, int64_t k, int64_t n0,
                  int64_t n1) {
  for (int64_t row = n0; row < n1; ++row) {
    const uint16_t* wr = w + row * k;
    __m512 even[M], odd[M];
    for (int m = 0; m < M; ++m) even[m] = odd[m] = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 2 * kLanes <= k; c += 2 * kLanes) {
      const __m512bh w0 = load_bf16(wr + c), w1 = load_bf16(wr + c + kLanes);
      for (int m = 0; m < M; ++m) {
        even[m] = _mm512_dpbf16_ps(even[m], w0, load_bf16(x + m * k + c));
        odd[m] = _mm512_dpbf16_ps(odd[m], w1, load_bf16(x + m * k + c + kLanes));
      }
    }
    for (; c < k; c += kLanes) {  // the last (possibly partial) group of 32
      const int64_t count = k - c < kLanes ? k - c : kLanes;
      const __m512bh w0 = load_bf16_tail(wr + c, count);
      for (int m = 0; m < M; ++m) even[m] = _mm512_dpbf16_ps(even[m], w0, load_bf16_tail(x + m * k + c, count));
    }
    for (int m = 0; m < M; ++m) y[m * n + row] = c10::BFloat16(_mm512_reduce_add_ps(_mm512_add_ps(even[m], odd[m])));
  }
}

at::Tensor bf16_few_row_product(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "few_row_product: x [m, k] and w [n, k]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "few_row_product: bf16 only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && x.is_cpu() && w.is_cpu(), "few_row_product: contiguous CPU");
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  TORCH_CHECK(m >= 1 && m <= 4, "few_row_product: 1 to 4 rows, got ", m);
  at::Tensor y = at::empty({m, n}, x.options());
  const auto* xp = reinterpret_cast<const uint16_t*>(x.const_data_ptr());
  const auto* wp = reinterpret_cast<const uint16_t*>(w.const_data_ptr());
  auto* yp = y.mutable_data_ptr<c10::BFloat16>();
  const int64_t grain = 64;  // output rows per task: 64 rows of 2048 values are 256 KB of weight
  at::parallel_for(0, n, grain, [&](int64_t n0, int64_t n1) {
    switch (m) {
      case 1: product_rows<1>(xp, wp, yp, n, k, n0, n1); break;
      case 2: product_rows<2>(xp, wp, yp, n, k, n0, n1); break;
      case 3: product_rows<3>(xp, wp, yp, n, k, n0, n1); break;
      default: product_rows<4>(xp, wp, yp, n, k, n0, n1); break;
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(gemma3n_cpu, lib) { lib.def("bf16_few_row_product(Tensor x, Tensor w) -> Tensor"); }
TORCH_LIBRARY_IMPL(gemma3n_cpu, CPU, lib) { lib.impl("bf16_few_row_product", &bf16_few_row_product); }
