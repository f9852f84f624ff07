// Gradient of a weight at selected entries, on CPU, for surgical's entry-sparse Linear layers.
//
//   out[e] = sum_t gy[t, row(e)] * x[t, col[e]]      for the k entries of a CSR pattern
//
// gy (T, n_out) and x (T, n_in) arrive row-major, as autograd hands them over, each in float32
// or bfloat16 (bf16 autocast; widened to float32 exactly while transposed, so a bf16 operand
// gives bit for bit what its float32 copy would, without the copy). A dot product
// per entry needs both operands contiguous along the token axis, so the tokens are processed in
// chunks of TC: each chunk of gy and x is transposed (16 x 16 register tiles) into buffers that
// stay in cache, and the entries of a row read that row's gradient once while four entries share
// one pass over it. Partial sums of four entries are reduced together, then added into out.
// Threads take whole token chunks and add their partial sums at the end.
//
// Built on first use by surgical.train.cpu_kernel with the machine's C++ compiler and
// -march=native; OpenMP threads are torch's own (the process already holds libgomp).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512DQ__)
#include <immintrin.h>
#define SG_AVX512 1
#endif

namespace {

constexpr int64_t TC = 64;  // tokens per chunk: a chunk of the widest input (n_in x TC floats) stays in L2
// Row stride of the transposed buffers: TC + 16 floats. With exactly TC (256 bytes) the 16 rows
// a tile writes, and the rows four entries read, fell into a few L1 sets: one core's time per
// layer swung between 4.5 and 6.4 ms from process to process; padded and 64-byte aligned, 4.1.
constexpr int64_t LD_PAD = 16;
inline float* align64(float* p) {
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));
}

// one element as float32: bfloat16 is the top half of a float32's bits
inline float widen(float v) { return v; }
inline float widen(uint16_t v) {
  const uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

#ifdef SG_AVX512
// 16 consecutive elements as float32
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// dst[c * dstride + r] = src[r * sstride + c] for a 16 x 16 tile
template <typename S>
inline void transpose16(const S* src, int64_t sstride, float* dst, int64_t dstride) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = load16(src + i * sstride);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    for (int j = 0; j < 2; ++j) {
      __m512d a = _mm512_castps_pd(t[4 * i + j]), b = _mm512_castps_pd(t[4 * i + 2 + j]);
      r[4 * i + j] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
      r[4 * i + 2 + j] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    }
  }
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
      t[8 * i + 4 + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
    }
  }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
  }
  // the shuffles leave columns 1<->2 (mod 4) swapped
  static const int column[16] = {0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15};
  for (int k = 0; k < 16; ++k) _mm512_storeu_ps(dst + column[k] * dstride, r[k]);
}

// the four horizontal sums of a, b, c, d
inline __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  __m512d abd = _mm512_castps_pd(ab), cdd = _mm512_castps_pd(cd);
  __m512 s = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(abd, cdd)),
                           _mm512_castpd_ps(_mm512_unpackhi_pd(abd, cdd)));
  __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
#endif

// dst[i * ld + t] = src[t * n + i] for the columns [i0, i1) of a (tl, n) chunk
template <typename S>
void transpose_cols(const S* src, int64_t n, int64_t tl, int64_t i0, int64_t i1, float* dst, int64_t ld) {
  int64_t t16 = 0;
#ifdef SG_AVX512
  t16 = tl & ~int64_t(15);
  if (i1 - i0 == 16) {
    for (int64_t t = 0; t < t16; t += 16) transpose16(src + t * n + i0, n, dst + i0 * ld + t, ld);
  } else {
    t16 = 0;
  }
#endif
  for (int64_t i = i0; i < i1; ++i)
    for (int64_t t = t16; t < tl; ++t) dst[i * ld + t] = widen(src[t * n + i]);
}

// out[e] += <g, xT[col[e]]> over tv tokens for the entries [e0, e1) of one row
void dot_row(const float* g, const float* xT, int64_t ld, int64_t tv, const int32_t* col, int64_t e0,
             int64_t e1, float* out) {
  int64_t e = e0;
#ifdef SG_AVX512
  for (; e + 4 <= e1; e += 4) {
    const float* a = xT + int64_t(col[e]) * ld;
    const float* b = xT + int64_t(col[e + 1]) * ld;
    const float* c = xT + int64_t(col[e + 2]) * ld;
    const float* d = xT + int64_t(col[e + 3]) * ld;
    __m512 sa = _mm512_setzero_ps(), sb = sa, sc = sa, sd = sa;
    for (int64_t t = 0; t < tv; t += 16) {
      __m512 gv = _mm512_loadu_ps(g + t);
      sa = _mm512_fmadd_ps(gv, _mm512_loadu_ps(a + t), sa);
      sb = _mm512_fmadd_ps(gv, _mm512_loadu_ps(b + t), sb);
      sc = _mm512_fmadd_ps(gv, _mm512_loadu_ps(c + t), sc);
      sd = _mm512_fmadd_ps(gv, _mm512_loadu_ps(d + t), sd);
    }
    _mm_storeu_ps(out + e, _mm_add_ps(_mm_loadu_ps(out + e), sum4(sa, sb, sc, sd)));
  }
#endif
  for (; e < e1; ++e) {
    const float* a = xT + int64_t(col[e]) * ld;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t t = 0; t < tv; ++t) s += g[t] * a[t];
    out[e] += s;
  }
}

// per-thread buffers, reused across calls and shared by every operand type: the partial sums of
// threads 1.. (on the calling thread), and each thread's transposed chunks
thread_local std::vector<float> partial_buf, gbuf, xbuf;

template <typename G, typename X>
void sampled_grad(const G* gy, const X* x, int64_t T, int64_t n_out, int64_t n_in, const int32_t* crow,
                  const int32_t* col, float* out, int nthreads) {
  const int64_t nnz = crow[n_out];
  std::memset(out, 0, sizeof(float) * nnz);
  if (T == 0 || nnz == 0) return;
  // Threads split the token chunks, each with its own buffers (in its own core's cache) and its
  // own partial sums, added up in thread order at the end: splitting the rows instead made every
  // thread read every transposed chunk and scaled 1.3x on two cores. Enough chunks for every
  // thread: narrower chunks when the tokens are few.
  int64_t tc = TC;
#ifdef _OPENMP
  if (nthreads > 1) {
    const int64_t per_thread = ((T + nthreads - 1) / nthreads + 15) / 16 * 16;
    tc = std::min(TC, std::max(int64_t(16), per_thread));
  }
#else
  nthreads = 1;
#endif
  const int64_t nchunks = (T + tc - 1) / tc;
  const int nt = int(std::max<int64_t>(1, std::min<int64_t>(nthreads, nchunks)));
  // partial sums of threads 1.. (thread 0 writes into out), reused across calls
  if (nt > 1 && partial_buf.size() < size_t((nt - 1) * nnz)) partial_buf.resize((nt - 1) * nnz);
  float* const partial = partial_buf.data();
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    int tid = 0;
#ifdef _OPENMP
    tid = omp_get_thread_num();
#endif
    float* const acc = tid == 0 ? out : partial + (tid - 1) * nnz;
    if (tid > 0) std::memset(acc, 0, sizeof(float) * nnz);
    // chunk buffers of this thread, reused across calls: no allocation per layer and step
    const int64_t ld = tc + LD_PAD;
    if (gbuf.size() < size_t(n_out * ld + 16)) gbuf.resize(n_out * ld + 16);
    if (xbuf.size() < size_t(n_in * ld + 16)) xbuf.resize(n_in * ld + 16);
    float* const gT = align64(gbuf.data());
    float* const xT = align64(xbuf.data());
    for (int64_t c = tid; c < nchunks; c += nt) {
      const int64_t t0 = c * tc, tl = std::min(tc, T - t0);
      const int64_t tv = (tl + 15) & ~int64_t(15);  // the dots run over whole vectors: zero the rest
      for (int64_t i0 = 0; i0 < n_out; i0 += 16)
        transpose_cols(gy + t0 * n_out, n_out, tl, i0, std::min(i0 + 16, n_out), gT, ld);
      for (int64_t i0 = 0; i0 < n_in; i0 += 16)
        transpose_cols(x + t0 * n_in, n_in, tl, i0, std::min(i0 + 16, n_in), xT, ld);
      if (tv > tl) {
        for (int64_t i = 0; i < n_out; ++i) std::memset(gT + i * ld + tl, 0, sizeof(float) * (tv - tl));
        for (int64_t i = 0; i < n_in; ++i) std::memset(xT + i * ld + tl, 0, sizeof(float) * (tv - tl));
      }
      for (int64_t i = 0; i < n_out; ++i) dot_row(gT + i * ld, xT, ld, tv, col, crow[i], crow[i + 1], acc);
    }
    if (nt > 1) {
#pragma omp barrier
#pragma omp for schedule(static)
      for (int64_t e = 0; e < nnz; ++e)
        for (int p = 0; p < nt - 1; ++p) out[e] += partial[p * nnz + e];
    }
  }
}

}  // namespace

extern "C" {

// 1 when this build uses the AVX-512 path (reported by surgical's benchmarks)
int sg_sampled_grad_avx512() {
#ifdef SG_AVX512
  return 1;
#else
  return 0;
#endif
}

// out[e] for the entries of the CSR pattern (crow, col) of an (n_out, n_in) weight, from gy (T, n_out)
// and x (T, n_in), each float32 (0) or bfloat16 (1); out is float32
void sg_sampled_grad(const void* gy, int gy_bf16, const void* x, int x_bf16, int64_t T, int64_t n_out,
                     int64_t n_in, const int32_t* crow, const int32_t* col, float* out, int nthreads) {
  const auto* gf = static_cast<const float*>(gy);
  const auto* gh = static_cast<const uint16_t*>(gy);
  const auto* xf = static_cast<const float*>(x);
  const auto* xh = static_cast<const uint16_t*>(x);
  if (gy_bf16 && x_bf16) sampled_grad(gh, xh, T, n_out, n_in, crow, col, out, nthreads);
  else if (gy_bf16) sampled_grad(gh, xf, T, n_out, n_in, crow, col, out, nthreads);
  else if (x_bf16) sampled_grad(gf, xh, T, n_out, n_in, crow, col, out, nthreads);
  else sampled_grad(gf, xf, T, n_out, n_in, crow, col, out, nthreads);
}

// w[idx[i]] = orig[i] + delta[i]: writes the trained values of an entry-sparse weight into it in
// one pass (torch needs an add, an int64 copy of the indices and an index_copy_)
void sg_write_entries_f32(float* w, const int32_t* idx, const float* orig, const float* delta, int64_t k,
                          int nthreads) {
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1 && k > 65536) schedule(static)
  for (int64_t i = 0; i < k; ++i) w[idx[i]] = orig[i] + delta[i];
}

}  // extern "C"
