// Decode products on CPUs with AVX512-BF16 and AVX512-VNNI: a few rows x [m, k] (m <= 4) against a large weight
// [n, k] that is either bf16 or int8 with one scale per output row.
//
// A decode step multiplies one row (or a few) by every weight matrix, so its time is the time to read the weights.
// This kernel reads each weight row once, front to back, and the rows in order: every thread streams one
// contiguous range of the weight, which the hardware prefetchers follow at the memory's read bandwidth. Each 32
// values of a weight row meet the same 32 values of every x row in one VDPBF16PS (bf16 pairs multiplied and summed
// into float32 lanes); two accumulators per x row hide its latency. One rounding to bf16 at the end, per output.
// int8 weights go through VPDPBUSD (unsigned bytes times signed bytes, summed in int32 lanes); see int8_rows.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

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

// ---- int8 weights ------------------------------------------------------------------------------------------------
// Each x row is rounded to 16-bit fixed point with its own scale: q = round(x / s), s = max|x| / 32767, so the rounding
// error is at most s / 2 per value (2^-16 of the row's largest value; bf16 itself keeps 8 bits). q = 256 * hi + lo with
// hi in [-128, 127] and lo in [0, 255]. VPDPBUSD multiplies unsigned bytes by signed bytes, so hi is stored offset by
// 128 and the offset's share, 128 * sum(w), is taken off with the weight row's own sum (one more VPDPBUSD, by ones).
// Sums are exact in integers; y = s * scale * (256 * (H - 128 * W) + L) is formed in double and rounded once.
constexpr int64_t kBytes = 64;    // int8 values per 512-bit register
constexpr int64_t kBlockBytes = 16384;  // bytes of x (hi and lo of every row) per pass: they stay in the L1 cache
constexpr int64_t kTile = 16;     // weight rows that share one pass over a block of x

struct SplitRows {  // x as offset high bytes and low bytes, [m, padded k] each (zero padding)
  std::vector<uint8_t> hi, lo;
  std::vector<double> scale;
  int64_t stride;
};

SplitRows split_rows(const at::Tensor& x) {
  const int64_t m = x.size(0), k = x.size(1);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const float* xp = xf.const_data_ptr<float>();
  SplitRows out{{}, {}, std::vector<double>(m), (k + kBytes - 1) / kBytes * kBytes};
  out.hi.assign(m * out.stride, 0);
  out.lo.assign(m * out.stride, 0);
  for (int64_t i = 0; i < m; ++i) {
    const float* row = xp + i * k;
    float largest = 0.0f;
    bool finite = true;
    for (int64_t c = 0; c < k; ++c) {
      finite = finite && std::isfinite(row[c]);
      largest = std::max(largest, std::abs(row[c]));
    }
    if (!finite) {  // inf or nan in x: the products are not finite either
      out.scale[i] = std::numeric_limits<double>::quiet_NaN();
      continue;
    }
    const float inverse = largest > 0.0f ? 32767.0f / largest : 0.0f;
    out.scale[i] = largest > 0.0f ? static_cast<double>(largest) / 32767.0 : 0.0;
    for (int64_t c = 0; c < k; ++c) {
      const int32_t q = std::clamp(static_cast<int32_t>(std::nearbyint(row[c] * inverse)), -32767, 32767);
      out.hi[i * out.stride + c] = static_cast<uint8_t>((q >> 8) + 128);  // arithmetic shift: floor(q / 256)
      out.lo[i * out.stride + c] = static_cast<uint8_t>(q & 0xFF);
    }
  }
  return out;
}

// Output rows [n0, n1) of y [M, n]; w [n, k] int8, w_scale [n] float.
template <int M, typename Out>
void int8_rows(const SplitRows& x, const int8_t* w, const float* w_scale, Out* y, int64_t n, int64_t k, int64_t n0,
               int64_t n1) {
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t t0 = n0; t0 < n1; t0 += kTile) {
    const int64_t t1 = std::min(n1, t0 + kTile);
    int64_t high[kTile][M] = {}, low[kTile][M] = {}, weight_sum[kTile] = {};
    constexpr int64_t block = kBlockBytes / (2 * M);  // inputs per pass
    const bool split = block < k;
    for (int64_t b0 = 0; b0 < k; b0 += block) {
      const int64_t b1 = std::min(k, b0 + block);
      for (int64_t row = t0; row < t1; ++row) {
        const int8_t* wr = w + row * k;
        __m512i h[M], l[M], sum = _mm512_setzero_si512();
        for (int m = 0; m < M; ++m) h[m] = l[m] = _mm512_setzero_si512();
        for (int64_t c = b0; c < b1; c += kBytes) {
          const __m512i wv = b1 - c >= kBytes
                                 ? _mm512_loadu_si512(wr + c)
                                 : _mm512_maskz_loadu_epi8(static_cast<__mmask64>((1ULL << (b1 - c)) - 1), wr + c);
          // rows read block by block are strided streams the prefetcher misses: fetch the next row's block alongside
          if (split && row + 1 < t1) _mm_prefetch(reinterpret_cast<const char*>(wr + k + c), _MM_HINT_T0);
          sum = _mm512_dpbusd_epi32(sum, ones, wv);
          for (int m = 0; m < M; ++m) {
            h[m] = _mm512_dpbusd_epi32(h[m], _mm512_loadu_si512(x.hi.data() + m * x.stride + c), wv);
            l[m] = _mm512_dpbusd_epi32(l[m], _mm512_loadu_si512(x.lo.data() + m * x.stride + c), wv);
          }
        }
        weight_sum[row - t0] += _mm512_reduce_add_epi32(sum);
        for (int m = 0; m < M; ++m) {
          high[row - t0][m] += _mm512_reduce_add_epi32(h[m]);
          low[row - t0][m] += _mm512_reduce_add_epi32(l[m]);
        }
      }
    }
    for (int64_t row = t0; row < t1; ++row) {
      for (int m = 0; m < M; ++m) {
        const int64_t q = 256 * (high[row - t0][m] - 128 * weight_sum[row - t0]) + low[row - t0][m];
        y[m * n + row] = static_cast<Out>(static_cast<float>(static_cast<double>(q) * x.scale[m] * w_scale[row]));
      }
    }
  }
}

template <typename Out>
void int8_product_into(const SplitRows& x, const int8_t* w, const float* w_scale, Out* y, int64_t m, int64_t n,
                       int64_t k) {
  at::parallel_for(0, n, kTile * 4, [&](int64_t n0, int64_t n1) {
    switch (m) {
      case 1: int8_rows<1>(x, w, w_scale, y, n, k, n0, n1); break;
      case 2: int8_rows<2>(x, w, w_scale, y, n, k, n0, n1); break;
      case 3: int8_rows<3>(x, w, w_scale, y, n, k, n0, n1); break;
      default: int8_rows<4>(x, w, w_scale, y, n, k, n0, n1); break;
    }
  });
}

at::Tensor int8_few_row_product(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "int8_few_row_product: x [m, k], w [n, k]");
  TORCH_CHECK(w.scalar_type() == at::kChar && w.is_contiguous() && w.is_cpu(), "int8_few_row_product: int8 CPU w");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "int8_few_row_product: bf16 or f32 x");
  TORCH_CHECK(scales.numel() == w.size(0), "int8_few_row_product: one scale per output row");
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  TORCH_CHECK(m >= 1 && m <= 4, "int8_few_row_product: 1 to 4 rows, got ", m);
  const SplitRows split = split_rows(x);
  const at::Tensor w_scale = scales.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({m, n}, x.options());
  const auto* wp = w.const_data_ptr<int8_t>();
  if (x.scalar_type() == at::kBFloat16) {
    int8_product_into(split, wp, w_scale.const_data_ptr<float>(), y.mutable_data_ptr<c10::BFloat16>(), m, n, k);
  } else {
    int8_product_into(split, wp, w_scale.const_data_ptr<float>(), y.mutable_data_ptr<float>(), m, n, k);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(gemma3n_cpu, lib) {
  lib.def("bf16_few_row_product(Tensor x, Tensor w) -> Tensor");
  lib.def("int8_few_row_product(Tensor x, Tensor w, Tensor scales) -> Tensor");
}
TORCH_LIBRARY_IMPL(gemma3n_cpu, CPU, lib) {
  lib.impl("bf16_few_row_product", &bf16_few_row_product);
  lib.impl("int8_few_row_product", &int8_few_row_product);
}
