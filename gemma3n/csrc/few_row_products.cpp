// Decode products on CPUs with AVX512-BF16 and AVX512-VNNI: a few rows x [m, k] against a large weight [n, k] that
// is bf16 (1-4 rows), int8 with one scale per output row, or group-wise int4 in torch's CPU packing (the last two:
// any number of rows, in groups of up to 4 over each span of the weight, which stays in the cache between groups).
//
// A decode step multiplies one row (or a few) by every weight matrix, so its time is the time to read the weights.
// This kernel reads each weight row once, front to back, and the rows in order: every thread streams one
// contiguous range of the weight, which the hardware prefetchers follow at the memory's read bandwidth. Each 32
// values of a weight row meet the same 32 values of every x row in one VDPBF16PS (bf16 pairs multiplied and summed
// into float32 lanes); two accumulators per x row hide its latency. One rounding to bf16 at the end, per output.
// int8 weights meet x rows rounded to 16-bit fixed point in VPDPWSSD (int16 pairs summed into int32 lanes), int4
// weights meet x rounded to 8 bits per group of inputs in VPDPBUSD (byte quads summed into int32 lanes); see int8_rows
// and int4_blocks.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kLanes = 32;  // bf16 values per 512-bit register
// Each thread's weight stream is also fetched this many bytes ahead in software (PREFETCHT0). With 4 x rows the
// hardware prefetcher alone ran behind: on 42 E2B-sized weights read from memory (AMD EPYC, 2 threads, the kernels
// built with and without it, alternating; benchmarks/results/row_kernel_prefetch.md) 4 rows read at 51.5 GB/s
// against 40.8 (int8), 43.2 against 38.8 (int4), 55.3 against 49.8 (bf16); one int8 row 62.6 against 55.4. One bf16
// row kept pace without it (in an earlier pair of runs it read 51 / 72 GB/s with it against 52 / 76 without), so bf16
// fetches ahead for 2-4 rows only. A prefetch past the end of a weight is harmless (it never faults).
constexpr int64_t kPrefetchAhead = 2048;
inline void prefetch_ahead(const void* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetchAhead, _MM_HINT_T0);
}

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
      if constexpr (M > 1) {  // 128 weight bytes per pass: two cache lines (one row keeps pace without it)
        prefetch_ahead(wr + c);
        prefetch_ahead(wr + c + kLanes);
      }
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

// ---- x rows in fixed point ----------------------------------------------------------------------------------------
// x is rounded to integers q = round(x / s) with s = max|x| / limit over a row (int8 weights: limit 32767, 16 bits)
// or over one group of inputs (int4 weights: limit 127, 8 bits), so the rounding error is at most s / 2 per value.
// The products with integer weights are then exact integer sums, scaled and rounded at the end.

// 16 values as float32 from bf16 or float32 x (bf16: the top half of a float32), the first ``count`` of them (the
// rest 0). Reading x in its own dtype saves a float32 copy per product: such a copy cost about 20 us a call, and a
// decode step makes hundreds of calls.
inline __m512 load16(const c10::BFloat16* p, int64_t count) {
  const __m256i bits = _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << std::min<int64_t>(count, 16)) - 1), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
inline __m512 load16(const float* p, int64_t count) {
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << std::min<int64_t>(count, 16)) - 1), p);
}

// The scale of values [0, k) of a row, s = max|x| / limit (0 for zeros; NaN when they hold an inf or a nan, whose
// products are not finite either), and 1 / s for the rounding (0 where s is 0).
template <typename In>
double fixed_point_scale(const In* row, int64_t k, float limit, float* inverse) {
  __m512 largest16 = _mm512_setzero_ps();
  __mmask16 finite = 0xFFFF;
  for (int64_t c = 0; c < k; c += 16) {
    const __m512 v = load16(row + c, k - c);
    finite &= _mm512_cmp_ps_mask(_mm512_sub_ps(v, v), _mm512_setzero_ps(), _CMP_EQ_OQ);  // inf - inf, nan: nan
    largest16 = _mm512_max_ps(largest16, _mm512_abs_ps(v));
  }
  const float largest = _mm512_reduce_max_ps(largest16);
  const bool all_finite = finite == 0xFFFF;
  *inverse = all_finite && largest > 0.0f ? limit / largest : 0.0f;
  if (!all_finite) return std::numeric_limits<double>::quiet_NaN();
  return largest > 0.0f ? static_cast<double>(largest) / limit : 0.0;
}

// q = clamp(round(x * inverse), -limit, limit) (to nearest, ties to even) for values [0, k) of a row; returns sum q.
template <typename In, typename Q>
int32_t round_to_fixed_point(const In* row, int64_t k, float inverse, int32_t limit, Q* q) {
  const __m512i upper = _mm512_set1_epi32(limit), lower = _mm512_set1_epi32(-limit);
  __m512i sum = _mm512_setzero_si512();
  for (int64_t c = 0; c < k; c += 16) {
    const int64_t count = std::min<int64_t>(16, k - c);
    const __m512i rounded = _mm512_cvtps_epi32(_mm512_mul_ps(load16(row + c, count), _mm512_set1_ps(inverse)));
    const __m512i clamped = _mm512_min_epi32(_mm512_max_epi32(rounded, lower), upper);
    sum = _mm512_add_epi32(sum, clamped);
    const __mmask16 mask = static_cast<__mmask16>((1u << count) - 1);
    if constexpr (sizeof(Q) == 2) {
      _mm256_mask_storeu_epi16(q + c, mask, _mm512_cvtepi32_epi16(clamped));
    } else {
      _mm_mask_storeu_epi8(q + c, mask, _mm512_cvtepi32_epi8(clamped));
    }
  }
  return _mm512_reduce_add_epi32(sum);
}

struct FixedRows {  // x rounded to int16 per row: q [m, k], scale [m]
  std::vector<int16_t> q;
  std::vector<double> scale;
};

template <typename In>
FixedRows fixed_rows(const In* x, int64_t m, int64_t k) {
  FixedRows out{std::vector<int16_t>(m * k, 0), std::vector<double>(m)};
  for (int64_t i = 0; i < m; ++i) {
    float inverse;
    out.scale[i] = fixed_point_scale(x + i * k, k, 32767.0f, &inverse);
    if (!std::isnan(out.scale[i])) round_to_fixed_point(x + i * k, k, inverse, 32767, out.q.data() + i * k);
  }
  return out;
}

FixedRows fixed_rows(const at::Tensor& x) {  // x bf16 or float32 [m, k]
  const at::Tensor xc = x.contiguous();
  if (xc.scalar_type() == at::kBFloat16) return fixed_rows(xc.const_data_ptr<c10::BFloat16>(), x.size(0), x.size(1));
  return fixed_rows(xc.const_data_ptr<float>(), x.size(0), x.size(1));
}

struct ByteGroups {  // x rounded to int8 per group of inputs: q [m, k]; scale and sum of q [m, groups]
  std::vector<int8_t> q;
  std::vector<float> scale;
  std::vector<float> sum;  // exact integers (|sum| <= 256 * 127 < 2^24)
};

ByteGroups byte_groups(const at::Tensor& x, int64_t group) {  // x bf16 [m, k]
  const int64_t m = x.size(0), k = x.size(1), groups = k / group;
  const at::Tensor xc = x.contiguous();
  const c10::BFloat16* xp = xc.const_data_ptr<c10::BFloat16>();
  ByteGroups out{std::vector<int8_t>(m * k, 0), std::vector<float>(m * groups), std::vector<float>(m * groups, 0.0f)};
  for (int64_t i = 0; i < m * groups; ++i) {  // i = row * groups + group
    float inverse;
    out.scale[i] = static_cast<float>(fixed_point_scale(xp + i * group, group, 127.0f, &inverse));
    if (std::isnan(out.scale[i])) continue;
    const int32_t sum = round_to_fixed_point(xp + i * group, group, inverse, 127, out.q.data() + i * group);
    out.sum[i] = static_cast<float>(sum);
  }
  return out;
}

// ---- int8 weights ------------------------------------------------------------------------------------------------
// One scale per output row. Each 32 int8 weights are widened to int16 (VPMOVSXBW) and meet 32 values of every x row
// in one VPDPWSSD (pairs of int16 products summed into int32 lanes). A lane of an accumulator takes one pair per 64
// inputs (two more in a block's tail), so over a block of at most 4096 inputs it holds at most 66 pairs of products of
// at most 128 * 32767: 5.5e8 < 2^31. The lanes are summed in int64, and y = s * scale * sum is formed in double and
// rounded once. (Widening the weight costs one instruction per 32 weights, shared by all x rows; splitting x into two
// bytes for VPDPBUSD instead costs two instructions per x row and read 1.0-1.6x slower on E2B shapes, AMD EPYC.)
constexpr int64_t kTile = 16;  // weight rows that share one pass over a block of x

inline __m512i sum_halves(__m512i v) {  // 16 int32 lanes -> 8 int64 lanes (pairs summed), no overflow
  return _mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(v)),
                          _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(v, 1)));
}

// Output rows [n0, n1) of x rows [r0, r0 + M) of y [m, n]; w [n, k] int8, w_scale [n] float.
template <int M, typename Out>
void int8_rows(const FixedRows& x, const int8_t* w, const float* w_scale, Out* y, int64_t n, int64_t k, int64_t n0,
               int64_t n1, int64_t r0) {
  constexpr int64_t block = std::min<int64_t>(4096, 8192 / M);  // inputs per pass: 16 KB of x at most, in L1
  const bool split = block < k;
  for (int64_t t0 = n0; t0 < n1; t0 += kTile) {
    const int64_t t1 = std::min(n1, t0 + kTile);
    int64_t total[kTile][M] = {};
    for (int64_t b0 = 0; b0 < k; b0 += block) {
      const int64_t b1 = std::min(k, b0 + block);
      for (int64_t row = t0; row < t1; ++row) {
        const int8_t* wr = w + row * k;
        __m512i even[M], odd[M];
        for (int m = 0; m < M; ++m) even[m] = odd[m] = _mm512_setzero_si512();
        int64_t c = b0;
        for (; c + 64 <= b1; c += 64) {
          // rows read block by block are strided streams the prefetcher misses: fetch the next row's block alongside
          if (split && row + 1 < t1) _mm_prefetch(reinterpret_cast<const char*>(wr + k + c), _MM_HINT_T0);
          prefetch_ahead(wr + c);
          const __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + c)));
          const __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + c + 32)));
          for (int m = 0; m < M; ++m) {
            const int16_t* xr = x.q.data() + (r0 + m) * k + c;
            even[m] = _mm512_dpwssd_epi32(even[m], w0, _mm512_loadu_si512(xr));
            odd[m] = _mm512_dpwssd_epi32(odd[m], w1, _mm512_loadu_si512(xr + 32));
          }
        }
        for (; c < b1; c += 32) {  // the last (possibly partial) groups of 32 inputs
          const __mmask32 mask = static_cast<__mmask32>((1ULL << std::min<int64_t>(32, b1 - c)) - 1);
          const __m512i w0 = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, wr + c));
          for (int m = 0; m < M; ++m)
            even[m] = _mm512_dpwssd_epi32(even[m], w0, _mm512_maskz_loadu_epi16(mask, x.q.data() + (r0 + m) * k + c));
        }
        for (int m = 0; m < M; ++m) {
          const __m512i lanes = _mm512_add_epi64(sum_halves(even[m]), sum_halves(odd[m]));
          total[row - t0][m] += _mm512_reduce_add_epi64(lanes);
        }
      }
    }
    for (int64_t row = t0; row < t1; ++row) {
      for (int m = 0; m < M; ++m) {
        const double product = static_cast<double>(total[row - t0][m]) * x.scale[r0 + m] * w_scale[row];
        y[(r0 + m) * n + row] = static_cast<Out>(static_cast<float>(product));
      }
    }
  }
}

template <typename Out>
void int8_product_into(const FixedRows& x, const int8_t* w, const float* w_scale, Out* y, int64_t m, int64_t n,
                       int64_t k) {
  // more than 4 rows: groups of up to 4 over each span of 64 weight rows, which stays in the cache between them
  at::parallel_for(0, n, kTile * 4, [&](int64_t n0, int64_t n1) {
    for (int64_t t0 = n0; t0 < n1; t0 += kTile * 4) {
      const int64_t t1 = std::min(n1, t0 + kTile * 4);
      for (int64_t r0 = 0; r0 < m; r0 += 4) {
        switch (std::min<int64_t>(4, m - r0)) {
          case 1: int8_rows<1>(x, w, w_scale, y, n, k, t0, t1, r0); break;
          case 2: int8_rows<2>(x, w, w_scale, y, n, k, t0, t1, r0); break;
          case 3: int8_rows<3>(x, w, w_scale, y, n, k, t0, t1, r0); break;
          default: int8_rows<4>(x, w, w_scale, y, n, k, t0, t1, r0); break;
        }
      }
    }
  });
}

// What the int8 products share: checks, x rounded to 16-bit rows, y [m, n] in x's dtype filled by
// ``into(x16, w, w_scale, y, m, n, k)``.
template <typename Into>
at::Tensor int8_product_of(const char* name, const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                           Into into) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), name, ": x [m, k], w [n, k]");
  TORCH_CHECK(w.scalar_type() == at::kChar && w.is_contiguous() && w.is_cpu(), name, ": int8 CPU w");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, name, ": bf16 or f32 x");
  TORCH_CHECK(scales.numel() == w.size(0), name, ": one scale per output row");
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  TORCH_CHECK(m >= 1, name, ": no rows");
  const FixedRows split = fixed_rows(x);
  const at::Tensor w_scale = scales.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({m, n}, x.options());
  const auto* wp = w.const_data_ptr<int8_t>();
  if (x.scalar_type() == at::kBFloat16) {
    into(split, wp, w_scale.const_data_ptr<float>(), y.mutable_data_ptr<c10::BFloat16>(), m, n, k);
  } else {
    into(split, wp, w_scale.const_data_ptr<float>(), y.mutable_data_ptr<float>(), m, n, k);
  }
  return y;
}

at::Tensor int8_few_row_product(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
  return int8_product_of("int8_few_row_product", x, w, scales, [](const FixedRows& split, const int8_t* wp,
                                                                  const float* w_scale, auto* y, int64_t m, int64_t n,
                                                                  int64_t k) {
    int8_product_into(split, wp, w_scale, y, m, n, k);
  });
}

// ---- int8 weights in tiles of 32 output rows ------------------------------------------------------------------------
// The same product as int8_few_row_product (the same 16-bit x, exact integer sums, the same final rounding: equal
// outputs), with the weight laid out so the lanes are output rows: tiles of 32 rows, and in a tile, for each pair of
// inputs (c, c + 1), 64 bytes: row j's two weights at bytes 2j and 2j + 1 ([n / 32, k / 2, 32, 2], see
// gemma3n.quantized_kernels.int8_tiles). A pair's 32 bytes for 16 rows widen to int16 (VPMOVSXBW) and meet the pair
// (x[c], x[c + 1]) of an x row broadcast to every lane in one VPDPWSSD. So x is read as 4 bytes per pair, not as whole
// registers, and no horizontal sums are left at the end. E2B's [8192, 2048] and [2048, 8192] with 4 x rows: 0.37 and
// 0.36 ms against 0.42 and 0.49 for int8_rows; 31 rows 1.72 and 1.56 against 2.65 and 2.67 (AMD EPYC, 2 threads,
// weights read from memory, benchmarks/results/quantized_row_products_int8_tiles.md).
// A lane takes 2 products of at most 128 * 32767 per pair: 128 pairs stay below 2^31, then it goes to int64.
constexpr int64_t kTileRows = 32;
constexpr int64_t kPairsPerFlush = 128;

// Tile t of x rows [r0, r0 + M); U independent accumulator sets hide VPDPWSSD's latency for few rows.
template <int M, int U, typename Out>
void int8_tile_rows(const FixedRows& x, const int8_t* w, const float* w_scale, Out* y, int64_t n, int64_t k, int64_t t,
                    int64_t r0) {
  const int64_t pairs = k / 2;
  const int8_t* tile = w + t * kTileRows * k;
  __m512i total[2][M][2];  // [rows 0-15, 16-31][x row][lanes 0-7, 8-15] in int64
  for (int h = 0; h < 2; ++h)
    for (int m = 0; m < M; ++m) total[h][m][0] = total[h][m][1] = _mm512_setzero_si512();
  for (int64_t p0 = 0; p0 < pairs; p0 += kPairsPerFlush) {
    const int64_t p1 = std::min(pairs, p0 + kPairsPerFlush);
    __m512i acc[U][2][M];
    for (int u = 0; u < U; ++u)
      for (int h = 0; h < 2; ++h)
        for (int m = 0; m < M; ++m) acc[u][h][m] = _mm512_setzero_si512();
    auto step = [&](int u, int64_t p) {  // the pair p of 32 rows against every x row
      const int8_t* wp = tile + p * 64;
      prefetch_ahead(wp);
      const __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp)));
      const __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + 32)));
      for (int m = 0; m < M; ++m) {
        int32_t pair;
        std::memcpy(&pair, x.q.data() + (r0 + m) * k + 2 * p, sizeof(pair));
        const __m512i xb = _mm512_set1_epi32(pair);
        acc[u][0][m] = _mm512_dpwssd_epi32(acc[u][0][m], w0, xb);
        acc[u][1][m] = _mm512_dpwssd_epi32(acc[u][1][m], w1, xb);
      }
    };
    int64_t p = p0;
    for (; p + U <= p1; p += U)
      for (int u = 0; u < U; ++u) step(u, p + u);
    for (; p < p1; ++p) step(0, p);
    for (int u = 0; u < U; ++u)
      for (int h = 0; h < 2; ++h)
        for (int m = 0; m < M; ++m) {
          const __m512i a = acc[u][h][m];
          total[h][m][0] = _mm512_add_epi64(total[h][m][0], _mm512_cvtepi32_epi64(_mm512_castsi512_si256(a)));
          total[h][m][1] = _mm512_add_epi64(total[h][m][1], _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(a, 1)));
        }
  }
  for (int h = 0; h < 2; ++h)
    for (int m = 0; m < M; ++m) {
      alignas(64) int64_t lanes[16];
      _mm512_store_si512(lanes, total[h][m][0]);
      _mm512_store_si512(lanes + 8, total[h][m][1]);
      for (int j = 0; j < 16; ++j) {
        const int64_t row = t * kTileRows + h * 16 + j;
        const double product = static_cast<double>(lanes[j]) * x.scale[r0 + m] * w_scale[row];
        y[(r0 + m) * n + row] = static_cast<Out>(static_cast<float>(product));
      }
    }
}

template <typename Out>
void int8_tiles_product_into(const FixedRows& x, const int8_t* w, const float* w_scale, Out* y, int64_t m, int64_t n,
                             int64_t k) {
  // more than 4 rows: groups of up to 4 over each tile, which stays in the cache between them
  at::parallel_for(0, n / kTileRows, 2, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t r0 = 0; r0 < m; r0 += 4) {
        switch (std::min<int64_t>(4, m - r0)) {
          case 1: int8_tile_rows<1, 4>(x, w, w_scale, y, n, k, t, r0); break;
          case 2: int8_tile_rows<2, 2>(x, w, w_scale, y, n, k, t, r0); break;
          case 3: int8_tile_rows<3, 1>(x, w, w_scale, y, n, k, t, r0); break;
          default: int8_tile_rows<4, 1>(x, w, w_scale, y, n, k, t, r0); break;
        }
      }
    }
  });
}

at::Tensor int8_tiles_product(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
  TORCH_CHECK(w.dim() == 2 && w.size(0) % kTileRows == 0 && w.size(1) % 2 == 0,
              "int8_tiles_product: w [n, k] with n a multiple of 32 and k even");
  return int8_product_of("int8_tiles_product", x, w, scales, [](const FixedRows& split, const int8_t* wp,
                                                                const float* w_scale, auto* y, int64_t m, int64_t n,
                                                                int64_t k) {
    int8_tiles_product_into(split, wp, w_scale, y, m, n, k);
  });
}

// ---- int4 weights, in torch's CPU packing --------------------------------------------------------------------------
// The weight comes as ``torch._convert_weight_to_int4pack_for_cpu`` lays it out: output rows in blocks of 64, and in
// a block, for each input k, 32 bytes: byte j holds row j's value (low nibble) and row j + 32's (high nibble), values
// q in [0, 15]. Each group of ``group`` inputs of a row has a bf16 scale s and zero z, [groups, rows, (s, z)]:
// w = (q - 8) * s + z. x is rounded to 8 bits per group, x = t * p (scale t, integers p). So for one group,
// sum_k w_k x_k = t * (s * sum_k q_k p_k + (z - 8 s) * sum_k p_k).
//
// Here the lanes are output rows. Inputs k to k + 3 of a block are 128 contiguous bytes; one two-source byte
// permutation (VPERMT2B, AVX512-VBMI) gathers, for 16 rows, each row's byte of the four inputs into one dword lane,
// and masking and shifting give the unsigned bytes (q[row, k], ..., q[row, k + 3]) of the low and the high nibble's
// rows. VPDPBUSD multiplies them with the signed bytes (p[k], ..., p[k + 3]) of an x row and sums into int32 lanes: 64
// products per instruction, twice VPDPWSSD's 32, which is what bounds a 4-row product (16 instructions per 64 weight
// bytes with 16-bit x, the read bandwidth's pace only with 8-bit x). A group's sums are exact in int32 (|sum| <= 256 *
// 15 * 127 < 2^31 for groups of up to 256 inputs; longer groups are refused) and go to float32 (one rounding) per
// group, scaled, into per-row float32 totals. Rounding x to 8 bits per group adds at most t / 2 per value, 2^-8 of the
// group's largest |x|: against the int4 weight's own error (up to s / 2 per weight, 2^-5 of a group's range) it adds
// about 1% to a trained model's logit error (benchmarks/results/quant_quality_trained.md).

constexpr int64_t kBlockRows = 64;  // rows per block of torch's packing
constexpr int64_t kMaxGroup = 256;  // a group's int32 sums and its sum of x stay exact

// Blocks [b0, b1) of 64 output rows of x rows [r0, r0 + M): y [m, n_out] from x [m, k], packed [n64 / 64, k, 32] and
// scales_and_zeros [groups, n64] dwords (bf16 scale in the low half, bf16 zero in the high half).
template <int M>
__attribute__((target("avx512f,avx512bw,avx512vbmi"))) void int4_blocks(
    const ByteGroups& x, const uint8_t* packed, const uint32_t* scales_and_zeros, c10::BFloat16* y, int64_t n_out,
    int64_t n64, int64_t k, int64_t group, int64_t b0, int64_t b1, int64_t r0) {
  // Over the 128 bytes of inputs k to k + 3 (32 each), dword lane l takes byte l (first: rows l and l + 32) or byte
  // 16 + l (second: rows 16 + l and 48 + l) of each of the four inputs. Built once per process.
  struct Permutations {
    alignas(64) uint8_t first[64] = {}, second[64] = {};
    Permutations() {
      for (int l = 0; l < 16; ++l)
        for (int input = 0; input < 4; ++input) first[4 * l + input] = 32 * input + l, second[4 * l + input] = 32 * input + 16 + l;
    }
  };
  static const Permutations permutations;
  const __m512i idx_first = _mm512_load_si512(permutations.first);
  const __m512i idx_second = _mm512_load_si512(permutations.second);
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const __m512i high_half = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __m512 eight = _mm512_set1_ps(8.0f);
  const int64_t groups = k / group;
  alignas(64) float total[M][kBlockRows];
  for (int64_t block = b0; block < b1; ++block) {
    const uint8_t* wb = packed + block * k * 32;
    for (int m = 0; m < M; ++m)
      for (int64_t r = 0; r < kBlockRows; ++r) total[m][r] = 0.0f;
    for (int64_t g = 0; g < groups; ++g) {
      const uint32_t* sz = scales_and_zeros + g * n64 + block * kBlockRows;  // 64 rows' (scale, zero)
      if (g + 1 < groups)
        for (int line = 0; line < 4; ++line) _mm_prefetch(reinterpret_cast<const char*>(sz + n64 + 16 * line), _MM_HINT_T0);
      __m512i sum[M][4];  // [x row][rows 0-15, 16-31, 32-47, 48-63]
      for (int m = 0; m < M; ++m)
        for (int i = 0; i < 4; ++i) sum[m][i] = _mm512_setzero_si512();
      for (int64_t c = g * group; c < (g + 1) * group; c += 4) {
        prefetch_ahead(wb + c * 32);
        prefetch_ahead(wb + c * 32 + 64);
        const __m512i inputs01 = _mm512_loadu_si512(wb + c * 32);  // inputs c and c + 1, 32 bytes each
        const __m512i inputs23 = _mm512_loadu_si512(wb + c * 32 + 64);
        const __m512i lo = _mm512_permutex2var_epi8(inputs01, idx_first, inputs23);
        const __m512i hi = _mm512_permutex2var_epi8(inputs01, idx_second, inputs23);
        const __m512i w[4] = {_mm512_and_si512(lo, nibble), _mm512_and_si512(hi, nibble),
                              _mm512_and_si512(_mm512_srli_epi16(lo, 4), nibble),
                              _mm512_and_si512(_mm512_srli_epi16(hi, 4), nibble)};
        for (int m = 0; m < M; ++m) {
          int32_t quad;
          std::memcpy(&quad, x.q.data() + (r0 + m) * k + c, sizeof(quad));  // (p[c], ..., p[c + 3])
          const __m512i xb = _mm512_set1_epi32(quad);
          for (int i = 0; i < 4; ++i) sum[m][i] = _mm512_dpbusd_epi32(sum[m][i], w[i], xb);
        }
      }
      for (int i = 0; i < 4; ++i) {
        const __m512i both = _mm512_loadu_si512(sz + 16 * i);
        const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(both, 16));
        const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(both, high_half));
        const __m512 offset = _mm512_fnmadd_ps(eight, scale, zero);  // z - 8 s
        for (int m = 0; m < M; ++m) {
          const int64_t xg = (r0 + m) * groups + g;
          const __m512 inner = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[m][i]), scale,
                                               _mm512_mul_ps(offset, _mm512_set1_ps(x.sum[xg])));
          const __m512 t = _mm512_fmadd_ps(inner, _mm512_set1_ps(x.scale[xg]), _mm512_load_ps(total[m] + 16 * i));
          _mm512_store_ps(total[m] + 16 * i, t);
        }
      }
    }
    const int64_t rows = std::min(kBlockRows, n_out - block * kBlockRows);
    for (int m = 0; m < M; ++m)
      for (int64_t r = 0; r < rows; ++r) y[(r0 + m) * n_out + block * kBlockRows + r] = c10::BFloat16(total[m][r]);
  }
}

at::Tensor int4_few_row_product(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_and_zeros,
                                int64_t group, int64_t n_out) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_cpu(), "int4_few_row_product: bf16 x [m, k]");
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(m >= 1, "int4_few_row_product: no rows");
  TORCH_CHECK(group >= 4 && group <= kMaxGroup && group % 4 == 0 && k % group == 0,
              "int4_few_row_product: a group of at most 256 inputs, a multiple of 4, that divides k");
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.is_cpu() &&
                  packed.size(0) % kBlockRows == 0 && packed.size(1) * 2 == k,
              "int4_few_row_product: packed [64 * blocks, k / 2] uint8 in torch's CPU int4 packing");
  const int64_t n64 = packed.size(0);
  TORCH_CHECK(n_out >= 1 && n_out <= n64, "int4_few_row_product: 1 to ", n64, " output rows");
  TORCH_CHECK(scales_and_zeros.scalar_type() == at::kBFloat16 && scales_and_zeros.is_contiguous() &&
                  scales_and_zeros.dim() == 3 && scales_and_zeros.size(0) == k / group &&
                  scales_and_zeros.size(1) == n64 && scales_and_zeros.size(2) == 2,
              "int4_few_row_product: bf16 scales_and_zeros [k / group, rows, 2]");
  const ByteGroups rows = byte_groups(x, group);
  at::Tensor y = at::empty({m, n_out}, x.options());
  const auto* wp = packed.const_data_ptr<uint8_t>();
  const auto* sz = reinterpret_cast<const uint32_t*>(scales_and_zeros.const_data_ptr());
  auto* yp = y.mutable_data_ptr<c10::BFloat16>();
  // more than 4 rows: groups of up to 4 over each block of 64 weight rows, which stays in the cache between them
  at::parallel_for(0, n64 / kBlockRows, 2, [&](int64_t b0, int64_t b1) {
    for (int64_t block = b0; block < b1; ++block) {
      for (int64_t r0 = 0; r0 < m; r0 += 4) {
        switch (std::min<int64_t>(4, m - r0)) {
          case 1: int4_blocks<1>(rows, wp, sz, yp, n_out, n64, k, group, block, block + 1, r0); break;
          case 2: int4_blocks<2>(rows, wp, sz, yp, n_out, n64, k, group, block, block + 1, r0); break;
          case 3: int4_blocks<3>(rows, wp, sz, yp, n_out, n64, k, group, block, block + 1, r0); break;
          default: int4_blocks<4>(rows, wp, sz, yp, n_out, n64, k, group, block, block + 1, r0); break;
        }
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(gemma3n_cpu, lib) {
  lib.def("bf16_few_row_product(Tensor x, Tensor w) -> Tensor");
  lib.def("int8_few_row_product(Tensor x, Tensor w, Tensor scales) -> Tensor");
  lib.def("int8_tiles_product(Tensor x, Tensor w, Tensor scales) -> Tensor");
  lib.def("int4_few_row_product(Tensor x, Tensor packed, Tensor scales_and_zeros, int group, int n_out) -> Tensor");
}
TORCH_LIBRARY_IMPL(gemma3n_cpu, CPU, lib) {
  lib.impl("bf16_few_row_product", &bf16_few_row_product);
  lib.impl("int8_few_row_product", &int8_few_row_product);
  lib.impl("int8_tiles_product", &int8_tiles_product);
  lib.impl("int4_few_row_product", &int4_few_row_product);
}
