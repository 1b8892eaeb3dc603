// Shared helpers of normlab's fused CPU kernels: vector loads/stores that convert bf16/fp16 to
// fp32 in registers, a rational tanh, and the geometry and parameter plumbing of the ops.
//
// Every kernel reads its input once and writes its output once; statistics are accumulated in
// fp32 vector lanes (fp64 for fp64 inputs) and combined across runs and threads in fp64.
#pragma once

// Per-operator headers instead of <ATen/ATen.h>: the build at first use takes half the time.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace normlab {

using at::vec::Vectorized;

// Accumulation type: fp32 for fp32/bf16/fp16 inputs, fp64 for fp64.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

template <typename T>
constexpr int64_t lanes() {
  return Vectorized<acc_t<T>>::size();
}

inline int64_t round_up(int64_t n, int64_t m) {
  return (n + m - 1) / m * m;
}

// ---- loads and stores of one vector of acc_t lanes ------------------------------------------

inline Vectorized<float> vload(const float* p) {
  return Vectorized<float>::loadu(p);
}
inline Vectorized<double> vload(const double* p) {
  return Vectorized<double>::loadu(p);
}
inline Vectorized<float> vload(const at::BFloat16* p) {
  Vectorized<float> out;
  at::vec::load_fp32_from_bf16(p, out);
  return out;
}
inline Vectorized<float> vload(const at::Half* p) {
  Vectorized<float> out;
  at::vec::load_fp32_from_fp16(p, out);
  return out;
}

inline void vstore(float* p, const Vectorized<float>& v) {
  v.store(p);
}
inline void vstore(double* p, const Vectorized<double>& v) {
  v.store(p);
}
#if defined(CPU_CAPABILITY_AVX2)
inline void vstore(at::BFloat16* p, const Vectorized<float>& v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), at::vec::cvtfp32_bf16(__m256(v)));
}
inline void vstore(at::Half* p, const Vectorized<float>& v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), at::vec::cvtfp32_fp16(__m256(v)));
}
#else
template <typename T>
inline void vstore(T* p, const Vectorized<float>& v) {
  __at_align__ float buf[Vectorized<float>::size()];
  v.store(buf);
  for (int64_t k = 0; k < Vectorized<float>::size(); ++k) {
    p[k] = static_cast<T>(buf[k]);
  }
}
#endif

// Non-temporal stores for outputs larger than the caches: a normal store first reads the line it
// writes (read-for-ownership), so a streaming store cuts the traffic of a write from 2 to 1
// tensor passes. Aligned addresses only (a row of an odd width falls back to a normal store);
// each thread calls stream_fence() after its last streaming store.
#if defined(CPU_CAPABILITY_AVX2)
inline bool aligned(const void* p, uintptr_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0;
}
inline void vstream(float* p, const Vectorized<float>& v) {
  if (aligned(p, 32)) {
    _mm256_stream_ps(p, __m256(v));
  } else {
    v.store(p);
  }
}
inline void vstream(double* p, const Vectorized<double>& v) {
  if (aligned(p, 32)) {
    _mm256_stream_pd(p, __m256d(v));
  } else {
    v.store(p);
  }
}
inline void vstream(at::BFloat16* p, const Vectorized<float>& v) {
  if (aligned(p, 16)) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), at::vec::cvtfp32_bf16(__m256(v)));
  } else {
    vstore(p, v);
  }
}
inline void vstream(at::Half* p, const Vectorized<float>& v) {
  if (aligned(p, 16)) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), at::vec::cvtfp32_fp16(__m256(v)));
  } else {
    vstore(p, v);
  }
}
inline void stream_fence() {
  _mm_sfence();
}
#else
template <typename T, typename A>
inline void vstream(T* p, const Vectorized<A>& v) {
  vstore(p, v);
}
inline void stream_fence() {}
#endif

// Stream when the output exceeds this many bytes (about half the L3 of the machines measured):
// smaller outputs are likely read again soon (the backward, the next layer) from cache.
inline int64_t stream_threshold() {
  static const int64_t bytes = [] {
    const char* env = std::getenv("NORMLAB_KERNELS_STREAM_BYTES");
    return env != nullptr ? std::atoll(env) : (int64_t(16) << 20);
  }();
  return bytes;
}

// Partial vectors (row tails): the missing lanes read as 0.
template <typename T>
inline Vectorized<acc_t<T>> vload_n(const T* p, int64_t n) {
  __at_align__ acc_t<T> buf[lanes<T>()];
  for (int64_t k = 0; k < lanes<T>(); ++k) {
    buf[k] = k < n ? static_cast<acc_t<T>>(p[k]) : acc_t<T>(0);
  }
  return Vectorized<acc_t<T>>::loadu(buf);
}
template <typename T>
inline void vstore_n(T* p, const Vectorized<acc_t<T>>& v, int64_t n) {
  __at_align__ acc_t<T> buf[lanes<T>()];
  v.store(buf);
  for (int64_t k = 0; k < n; ++k) {
    p[k] = static_cast<T>(buf[k]);
  }
}

template <typename T>
inline Vectorized<acc_t<T>> ld(const T* p, int64_t n) {
  return n == lanes<T>() ? vload(p) : vload_n(p, n);
}
template <typename T>
inline void st(T* p, const Vectorized<acc_t<T>>& v, int64_t n, bool stream = false) {
  if (n == lanes<T>()) {
    if (stream) {
      vstream(p, v);
    } else {
      vstore(p, v);
    }
  } else {
    vstore_n(p, v, n);
  }
}

// body(i, lanes) for each whole vector of a run of n values, then body(i, n - i) for its tail
// (the loop of every kernel whose body handles both through ld/st).
template <typename T, typename F>
inline void each_vector(int64_t n, F&& body) {
  constexpr int64_t L = lanes<T>();
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    body(i, L);
  }
  if (i < n) {
    body(i, n - i);
  }
}

// Prefetch the cache line of p + i when i starts one (i a multiple of the vector width; p may be
// null: nothing to fetch).
template <typename T>
inline void prefetch_at(const T* p, int64_t i) {
  constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(T));
  if (p != nullptr && i % kLine == 0) {
    __builtin_prefetch(p + i, 0, 3);
  }
}

// y = (x - m) * s + b over a run of n values, the normalize-and-affine write of GroupNorm and
// BatchNorm: whole vectors, then the tail. `pf`, where given, is prefetched alongside (BatchNorm
// fetches the next channel's run while it writes this one).
template <typename T>
inline void affine_run(const T* x, T* y, int64_t n, const Vectorized<acc_t<T>>& m, const Vectorized<acc_t<T>>& s,
                       const Vectorized<acc_t<T>>& b, bool stream, const T* pf = nullptr) {
  constexpr int64_t L = lanes<T>();
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    prefetch_at(pf, i);
    st(y + i, at::vec::fmadd(vload(x + i) - m, s, b), L, stream);
  }
  if (i < n) {
    vstore_n(y + i, at::vec::fmadd(vload_n(x + i, n - i) - m, s, b), n - i);
  }
}

// Keep the first n lanes of v, zero the others (masks the padded lanes of a tail in a reduction).
template <typename A>
inline Vectorized<A> first_n(const Vectorized<A>& v, int64_t n) {
  return n == Vectorized<A>::size() ? v : Vectorized<A>::set(Vectorized<A>(A(0)), v, n);
}

// Sum of the lanes, in fp64.
#if defined(CPU_CAPABILITY_AVX2)
inline double hsum(const Vectorized<float>& v) {
  const __m256d s = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(__m256(v))),
                                  _mm256_cvtps_pd(_mm256_extractf128_ps(__m256(v), 1)));
  const __m128d h = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
  return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
}
#endif
template <typename A>
inline double hsum(const Vectorized<A>& v) {
  __at_align__ A buf[Vectorized<A>::size()];
  v.store(buf);
  double s = 0.0;
  for (int64_t k = 0; k < Vectorized<A>::size(); ++k) {
    s += static_cast<double>(buf[k]);
  }
  return s;
}

// ---- tanh --------------------------------------------------------------------------------------

// tanh as the 13/6 rational approximation of Eigen/XLA on x clamped to [-10, 10], the result
// clamped to [-1, 1]: max abs error 3.9e-7 in fp32, about 3x cheaper than Sleef's tanhf8_u10,
// which made eager DyT compute-bound on CPU (about 3.3 ns per element per core, measured: eager
// DyT 5-6x slower than LayerNorm). The rational reaches 1 at |x| = 10, so the result is exactly
// +-1 beyond (as fp32 tanh rounds there, and 1 - t^2 is 0); NaN propagates.
inline Vectorized<float> tanh_fast(const Vectorized<float>& x) {
#if defined(CPU_CAPABILITY_AVX2)
  // _mm256_min_ps/_mm256_max_ps return their second operand when either is NaN: the value goes
  // second so that a NaN input gives a NaN output. 16 instructions per 8 values.
  const __m256 xc = _mm256_min_ps(_mm256_set1_ps(10.0f), _mm256_max_ps(_mm256_set1_ps(-10.0f), __m256(x)));
  const __m256 x2 = _mm256_mul_ps(xc, xc);
  __m256 p = _mm256_fmadd_ps(x2, _mm256_set1_ps(-2.76076847742355e-16f), _mm256_set1_ps(2.00018790482477e-13f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-8.60467152213735e-11f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(5.12229709037114e-08f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(1.48572235717979e-05f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(6.37261928875436e-04f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(4.89352455891786e-03f));
  p = _mm256_mul_ps(p, xc);
  __m256 q = _mm256_fmadd_ps(x2, _mm256_set1_ps(1.19825839466702e-06f), _mm256_set1_ps(1.18534705686654e-04f));
  q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(2.26843463243900e-03f));
  q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(4.89352518554385e-03f));
  const __m256 t = _mm256_div_ps(p, q);
  return _mm256_min_ps(_mm256_set1_ps(1.0f), _mm256_max_ps(_mm256_set1_ps(-1.0f), t));
#else
  using V = Vectorized<float>;
  const V xc = at::vec::minimum(at::vec::maximum(x, V(-10.0f)), V(10.0f));  // NaN-propagating
  const V x2 = xc * xc;
  V p = at::vec::fmadd(x2, V(-2.76076847742355e-16f), V(2.00018790482477e-13f));
  p = at::vec::fmadd(p, x2, V(-8.60467152213735e-11f));
  p = at::vec::fmadd(p, x2, V(5.12229709037114e-08f));
  p = at::vec::fmadd(p, x2, V(1.48572235717979e-05f));
  p = at::vec::fmadd(p, x2, V(6.37261928875436e-04f));
  p = at::vec::fmadd(p, x2, V(4.89352455891786e-03f));
  p = p * xc;
  V q = at::vec::fmadd(x2, V(1.19825839466702e-06f), V(1.18534705686654e-04f));
  q = at::vec::fmadd(q, x2, V(2.26843463243900e-03f));
  q = at::vec::fmadd(q, x2, V(4.89352518554385e-03f));
  return at::vec::minimum(at::vec::maximum(p / q, V(-1.0f)), V(1.0f));
#endif
}
inline Vectorized<double> tanh_fast(const Vectorized<double>& x) {
  return x.tanh();  // fp64: exact (Sleef u10); speed is not the point of fp64
}

// ---- erf -----------------------------------------------------------------------------------------

// erf as the 13/8 rational approximation of Eigen/TensorFlow on u clamped to [-4, 4], the result
// clamped to [-1, 1]: max abs error 4.2e-7 in fp32, exactly +-1 for |u| >= 4 (where fp32 erf
// rounds to 1), NaN propagating; about half the instructions of the Abramowitz-Stegun formula
// with an exp that torch.erf uses. With e != nullptr, also exp(-u^2) for the derivative.
#if defined(CPU_CAPABILITY_AVX2)
// exp(z) for z <= 0 (Cephes expf: z = n ln2 + r, a degree-6 polynomial in r, 2^n through the
// exponent bits; ~1 ulp), leaner than Sleef's general expf8_u10: Derf's backward needs exp(-u^2).
// Below -87 the result is exp(-87) ~ 1.6e-38 instead of a denormal or 0; NaN propagates.
inline __m256 exp_nonpositive(__m256 z) {
  z = _mm256_max_ps(_mm256_set1_ps(-87.0f), z);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(z, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), z);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(1.9875691500e-4f), r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

inline Vectorized<float> erf_exp(const Vectorized<float>& u, Vectorized<float>* e) {
  if (e != nullptr) {
#if defined(CPU_CAPABILITY_AVX2)
    *e = exp_nonpositive(_mm256_xor_ps(_mm256_set1_ps(-0.0f), _mm256_mul_ps(__m256(u), __m256(u))));
#else
    *e = (Vectorized<float>(-0.0f) ^ (u * u)).exp();
#endif
  }
#if defined(CPU_CAPABILITY_AVX2)
  const __m256 x = _mm256_min_ps(_mm256_set1_ps(4.0f), _mm256_max_ps(_mm256_set1_ps(-4.0f), __m256(u)));
  const __m256 x2 = _mm256_mul_ps(x, x);
  __m256 p = _mm256_fmadd_ps(x2, _mm256_set1_ps(-2.72614225801306e-10f), _mm256_set1_ps(2.77068142495902e-08f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-2.10102402082508e-06f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-5.69250639462346e-05f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-7.34990630326855e-04f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-2.95459980854025e-03f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-1.60960333262415e-02f));
  p = _mm256_mul_ps(p, x);
  __m256 q = _mm256_fmadd_ps(x2, _mm256_set1_ps(-1.45660718464996e-05f), _mm256_set1_ps(-2.13374055278905e-04f));
  q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(-1.68282697438203e-03f));
  q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(-7.37332916720468e-03f));
  q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(-1.42647390514189e-02f));
  const __m256 r = _mm256_div_ps(p, q);
  return _mm256_min_ps(_mm256_set1_ps(1.0f), _mm256_max_ps(_mm256_set1_ps(-1.0f), r));
#else
  using V = Vectorized<float>;
  const V x = at::vec::minimum(at::vec::maximum(u, V(-4.0f)), V(4.0f));
  const V x2 = x * x;
  V p = at::vec::fmadd(x2, V(-2.72614225801306e-10f), V(2.77068142495902e-08f));
  p = at::vec::fmadd(p, x2, V(-2.10102402082508e-06f));
  p = at::vec::fmadd(p, x2, V(-5.69250639462346e-05f));
  p = at::vec::fmadd(p, x2, V(-7.34990630326855e-04f));
  p = at::vec::fmadd(p, x2, V(-2.95459980854025e-03f));
  p = at::vec::fmadd(p, x2, V(-1.60960333262415e-02f));
  p = p * x;
  V q = at::vec::fmadd(x2, V(-1.45660718464996e-05f), V(-2.13374055278905e-04f));
  q = at::vec::fmadd(q, x2, V(-1.68282697438203e-03f));
  q = at::vec::fmadd(q, x2, V(-7.37332916720468e-03f));
  q = at::vec::fmadd(q, x2, V(-1.42647390514189e-02f));
  return at::vec::minimum(at::vec::maximum(p / q, V(-1.0f)), V(1.0f));
#endif
}
inline Vectorized<double> erf_exp(const Vectorized<double>& u, Vectorized<double>* e) {
  if (e != nullptr) {
    *e = (Vectorized<double>(-0.0) ^ (u * u)).exp();
  }
  return u.erf();
}

// ---- parameters ----------------------------------------------------------------------------------

// A per-feature parameter as an acc-dtype buffer padded to whole vectors, or `fill` where the
// parameter is absent: the kernels always apply a full affine, and w=1/b=0 leave the values
// unchanged (x*1 and x+0 are exact). A std::vector, not a tensor: no dispatcher round trips.
template <typename A>
std::vector<A> param_vec(const std::optional<at::Tensor>& p, int64_t n, A fill) {
  std::vector<A> out(static_cast<size_t>(round_up(std::max<int64_t>(n, 1), Vectorized<A>::size())), fill);
  if (p.has_value() && p->defined()) {
    TORCH_CHECK(p->numel() == n, "normlab kernels: parameter has ", p->numel(), " elements, expected ", n);
    TORCH_CHECK(p->device().is_cpu(), "normlab kernels: parameters must be on the CPU");
    const at::Tensor c = p->contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, c.scalar_type(), "normlab_param", [&] {
      const scalar_t* src = c.const_data_ptr<scalar_t>();
      for (int64_t i = 0; i < n; ++i) {
        out[i] = static_cast<A>(src[i]);
      }
    });
  }
  return out;
}

inline double scalar_of(const at::Tensor& t) {
  TORCH_CHECK(t.numel() == 1, "normlab kernels: expected a one-element scalar parameter, got ", t.numel());
  TORCH_CHECK(t.device().is_cpu(), "normlab kernels: parameters must be on the CPU");
  double v = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "normlab_scalar", [&] {
    v = static_cast<double>(*t.const_data_ptr<scalar_t>());
  });
  return v;
}

inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": expected a CPU tensor");
  TORCH_CHECK(
      x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble || x.scalar_type() == at::kBFloat16 ||
          x.scalar_type() == at::kHalf,
      op, ": unsupported dtype ", x.scalar_type());
}

// Reductions whose bits do not depend on the thread count. [0, n) is cut into fixed_chunks(n, grain)
// chunks, a number set by the sizes alone (at most kMaxChunks); one thread sums a chunk in order
// into its own slot, and the caller adds the slots in chunk order. Per-thread partials (what
// PyTorch's own CPU reductions do) make a training run's result change with
// torch.set_num_threads: after a few hundred steps, like another seed.
constexpr int64_t kMaxChunks = 64;
inline int64_t fixed_chunks(int64_t n, int64_t grain) {
  const int64_t g = std::max<int64_t>(grain, 1);
  return std::max<int64_t>(1, std::min<int64_t>(kMaxChunks, (n + g - 1) / g));
}
// f(begin, end, chunk) for each chunk of [0, n), in parallel over chunks.
template <typename F>
void for_fixed_chunks(int64_t n, int64_t chunks, const F& f) {
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      f(c * n / chunks, (c + 1) * n / chunks, c);
    }
  });
}

}  // namespace normlab
