// Row norms over the last `row_size` elements: LayerNorm (arXiv:1607.06450) and RMSNorm
// (arXiv:1910.07467, eps inside or outside the square root), and their fused residual-add
// variants h = x + residual, y = norm(h).
//
// One pass over memory each way: a row (a few KiB) is read from DRAM once and its statistics
// passes then hit L1. The backward recomputes the row statistics instead of saving them.
#include "common.h"
#include "ops.h"

namespace normlab {
namespace {

template <typename T>
using V = Vectorized<acc_t<T>>;

// Sum of f(x) over a row, 4 accumulators for the FMA latency; the tail's padded lanes are masked.
template <typename T, typename F>
inline double row_reduce(const T* p, int64_t n, F f) {
  using A = acc_t<T>;
  constexpr int64_t L = lanes<T>();
  V<T> s0(A(0)), s1(A(0)), s2(A(0)), s3(A(0));
  int64_t i = 0;
  for (; i + 4 * L <= n; i += 4 * L) {
    s0 = s0 + f(vload(p + i));
    s1 = s1 + f(vload(p + i + L));
    s2 = s2 + f(vload(p + i + 2 * L));
    s3 = s3 + f(vload(p + i + 3 * L));
  }
  for (; i + L <= n; i += L) {
    s0 = s0 + f(vload(p + i));
  }
  if (i < n) {
    s1 = s1 + first_n(f(vload_n(p + i, n - i)), n - i);
  }
  return hsum((s0 + s1) + (s2 + s3));
}

struct Stats {
  double mean;  // LayerNorm only
  double rstd;  // 1/sqrt(var + eps), 1/sqrt(ms + eps) or 1/(sqrt(ms) + eps)
  double rms;   // sqrt(ms) (RMSNorm, eps outside)
  double shift;  // LayerNorm: the k of the shifted sums below
};

// Sums of one pass over a row, of d = x - k with k the mean of the row's first vector (the
// shifted-data algorithm: no cancellation in var = mean(d^2) - mean(d)^2 when k is close to the
// mean, exact 0 for a constant row); with dy, also sum(g) and sum(g * d) for g = dy * w.
template <typename T, bool kGrad>
struct RowSums {
  double d1 = 0.0, d2 = 0.0, g1 = 0.0, g2 = 0.0;
  acc_t<T> k = 0;
};

template <typename T, bool kGrad>
inline RowSums<T, kGrad> shifted_row_sums(const T* xr, const T* dyr, const acc_t<T>* w, int64_t n) {
  using A = acc_t<T>;
  constexpr int64_t L = lanes<T>();
  RowSums<T, kGrad> out;
  const int64_t m0 = std::min(L, n);
  out.k = static_cast<A>(hsum(first_n(ld(xr, m0), m0)) / static_cast<double>(m0));
  const V<T> kv(out.k);
  V<T> s1a(A(0)), s1b(A(0)), s2a(A(0)), s2b(A(0)), g1a(A(0)), g1b(A(0)), g2a(A(0)), g2b(A(0));
  auto add = [&](const V<T>& d, int64_t i, int64_t m, V<T>& s1, V<T>& s2, V<T>& ga, V<T>& gb) {
    s1 = s1 + d;
    s2 = at::vec::fmadd(d, d, s2);
    if constexpr (kGrad) {
      const V<T> g = ld(dyr + i, m) * V<T>::loadu(w + i);  // padded lanes: dy = 0
      ga = ga + g;
      gb = at::vec::fmadd(g, d, gb);
    }
  };
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    add(vload(xr + i) - kv, i, L, s1a, s2a, g1a, g2a);
    add(vload(xr + i + L) - kv, i + L, L, s1b, s2b, g1b, g2b);
  }
  for (; i + L <= n; i += L) {
    add(vload(xr + i) - kv, i, L, s1a, s2a, g1a, g2a);
  }
  if (i < n) {
    add(first_n(vload_n(xr + i, n - i) - kv, n - i), i, n - i, s1b, s2b, g1b, g2b);
  }
  out.d1 = hsum(s1a + s1b);
  out.d2 = hsum(s2a + s2b);
  if constexpr (kGrad) {
    out.g1 = hsum(g1a + g1b);
    out.g2 = hsum(g2a + g2b);
  }
  return out;
}

template <typename T, bool kLayer>
inline Stats row_stats(const T* xr, int64_t n, double eps, bool eps_inside) {
  Stats s{0.0, 0.0, 0.0, 0.0};
  if constexpr (kLayer) {
    const auto sums = shifted_row_sums<T, false>(xr, nullptr, nullptr, n);
    const double dm = sums.d1 / static_cast<double>(n);
    const double var = std::max(sums.d2 / static_cast<double>(n) - dm * dm, 0.0);
    s.shift = static_cast<double>(sums.k);
    s.mean = s.shift + dm;
    s.rstd = 1.0 / std::sqrt(var + eps);
  } else {
    const double ms = row_reduce(xr, n, [](const V<T>& v) { return v * v; }) / static_cast<double>(n);
    s.rms = std::sqrt(ms);
    s.rstd = eps_inside ? 1.0 / std::sqrt(ms + eps) : 1.0 / (s.rms + eps);
  }
  return s;
}

// Forward over rows [begin, end); with a residual, h = x + residual is written first (rounded to
// T, so that the backward's recomputation from h sees the same values) and normalized.
template <typename T, bool kLayer>
void forward_rows(
    const T* x, const T* res, T* h, T* y, int64_t rows, int64_t n, const acc_t<T>* w, const acc_t<T>* b,
    double eps, bool eps_inside) {
  using A = acc_t<T>;
  constexpr int64_t L = lanes<T>();
  const int64_t grain = std::max<int64_t>(1, 16384 / n);
  const bool stream = rows * n * static_cast<int64_t>(sizeof(T)) >= stream_threshold();
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * n;
      if (res != nullptr) {
        const T* rr = res + r * n;
        T* hr = h + r * n;
        int64_t i = 0;
        for (; i + L <= n; i += L) {
          vstore(hr + i, vload(xr + i) + vload(rr + i));
        }
        if (i < n) {
          vstore_n(hr + i, vload_n(xr + i, n - i) + vload_n(rr + i, n - i), n - i);
        }
        xr = hr;
      }
      const Stats s = row_stats<T, kLayer>(xr, n, eps, eps_inside);
      const V<T> mv(static_cast<A>(s.mean));
      const V<T> rv(static_cast<A>(s.rstd));
      T* yr = y + r * n;
      auto body = [&](int64_t i, int64_t m) {
        const V<T> xv = ld(xr + i, m);
        const V<T> xn = kLayer ? (xv - mv) * rv : xv * rv;
        st(yr + i, at::vec::fmadd(xn, V<T>::loadu(w + i), V<T>::loadu(b + i)), m, stream);
      };
      each_vector<T>(n, body);
    }
    if (stream) {
      stream_fence();
    }
  });
}

// Backward. With g = dy * w and xn the normalized row:
//   LayerNorm: dx = rstd * (g - mean(g) - xn * mean(g * xn))
//   RMSNorm:   dx = rstd * (g - xn * c), c = mean(g * x) * rstd (eps inside: d rstd/dx = -x rstd^3 / n)
//              or mean(g * x) / rms (eps outside: d rstd/dx = -x rstd^2 / (n rms); 0 for a zero row)
//   dw += dy * xn, db += dy; dx += grad_residual where given (the residual branch of add + norm).
// Written with xn = O(1) factors so that nothing under- or overflows where x does not.
template <typename T, bool kLayer>
void backward_rows(
    const T* dy, const T* x, const T* dres, T* dx, int64_t rows, int64_t n, const acc_t<T>* w, double eps,
    bool eps_inside, acc_t<T>* dw, acc_t<T>* db) {
  using A = acc_t<T>;
  constexpr int64_t L = lanes<T>();
  const int64_t np = round_up(n, L);
  const int64_t grain = std::max<int64_t>(1, 8192 / n);
  const int64_t slots = fixed_chunks(rows, grain);  // dw, db: the same bits with any thread count
  std::vector<A> part(static_cast<size_t>(slots * 2 * np), A(0));
  const bool stream = rows * n * static_cast<int64_t>(sizeof(T)) >= stream_threshold();
  for_fixed_chunks(rows, slots, [&](int64_t begin, int64_t end, int64_t slot) {
    A* pw = part.data() + slot * 2 * np;
    A* pb = pw + np;
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * n;
      const T* dyr = dy + r * n;
      const double inv_n = 1.0 / static_cast<double>(n);
      double mean = 0.0, rstd = 0.0;
      double c1 = 0.0, c2 = 0.0;  // dx = rstd * (g - c1 - xn * c2)
      if constexpr (kLayer) {
        // One pass: the statistics and the two row sums, all shifted by k:
        // sum(g * xn) = rstd * (sum(g * (x - k)) - (mean - k) * sum(g)).
        const auto sums = shifted_row_sums<T, true>(xr, dyr, w, n);
        const double dm = sums.d1 * inv_n;
        const double var = std::max(sums.d2 * inv_n - dm * dm, 0.0);
        mean = static_cast<double>(sums.k) + dm;
        rstd = 1.0 / std::sqrt(var + eps);
        c1 = sums.g1 * inv_n;
        c2 = rstd * (sums.g2 - dm * sums.g1) * inv_n;
      } else {
        // sum(x^2) and sum(g * x) in one pass.
        V<T> ss(A(0)), sgx(A(0));
        auto sums = [&](int64_t i, int64_t m) {
          const V<T> xv = ld(xr + i, m);
          ss = at::vec::fmadd(xv, xv, ss);
          sgx = at::vec::fmadd(ld(dyr + i, m) * V<T>::loadu(w + i), xv, sgx);  // padded lanes: x = 0
        };
        each_vector<T>(n, sums);
        const double ms = hsum(ss) * inv_n;
        const double rms = std::sqrt(ms);
        rstd = eps_inside ? 1.0 / std::sqrt(ms + eps) : 1.0 / (rms + eps);
        if (eps_inside) {
          c2 = hsum(sgx) * inv_n * rstd;
        } else {
          c2 = rms > 0.0 ? hsum(sgx) * inv_n / rms : 0.0;
        }
      }
      const V<T> mv(static_cast<A>(mean));
      const V<T> rv(static_cast<A>(rstd));
      const V<T> c1v(static_cast<A>(c1));
      const V<T> c2v(static_cast<A>(c2));
      const T* dresr = dres == nullptr ? nullptr : dres + r * n;
      T* dxr = dx + r * n;
      auto body = [&](int64_t j, int64_t m) {
        const V<T> xv = ld(xr + j, m);
        const V<T> dyv = ld(dyr + j, m);
        const V<T> xn = kLayer ? (xv - mv) * rv : xv * rv;
        const V<T> g = dyv * V<T>::loadu(w + j);
        V<T> d = rv * (g - c1v - xn * c2v);
        if (dresr != nullptr) {
          d = d + ld(dresr + j, m);
        }
        st(dxr + j, d, m, stream);
        at::vec::fmadd(dyv, xn, V<T>::loadu(pw + j)).store(pw + j);
        (V<T>::loadu(pb + j) + dyv).store(pb + j);
      };
      each_vector<T>(n, body);
    }
    if (stream) {
      stream_fence();
    }
  });
  for (int64_t c = 0; c < n; ++c) {
    double sw = 0.0, sb = 0.0;
    for (int64_t s = 0; s < slots; ++s) {
      sw += part[s * 2 * np + c];
      sb += part[s * 2 * np + np + c];
    }
    dw[c] = static_cast<A>(sw);
    db[c] = static_cast<A>(sb);
  }
}

// ---- channels first: normalize over dimension 1 of a contiguous (N, C, S) ------------------------
//
// ConvNeXt's LayerNorm2d and channels-first RMSNorm without the permute copies: a task is one
// sample and a block of positions; the per-position sums are accumulated a few channels at a time
// in block-long arrays (so memory is read in long contiguous runs, which the prefetchers follow),
// then the block is swept again to write. Blocks are as long as the parallelism allows (a whole
// sample when there are 2 samples per thread), up to 4096 positions.
// The backward sizes its blocks for kCfFixedThreads threads whatever the machine has, so that its
// weight gradient does not depend on the thread count.
constexpr int64_t kCfFixedThreads = 16;
inline int64_t cf_block(int64_t N, int64_t S, int64_t lanes_, int64_t threads = at::get_num_threads()) {
  const int64_t split = std::max<int64_t>(1, (2 * threads + N - 1) / N);
  return std::min<int64_t>(round_up(std::max<int64_t>((S + split - 1) / split, 1), lanes_), 4096);
}

// Channels per sweep of the per-position sums: 4 forward, 2 backward (4 spill registers there on
// AVX2, with dy's sums as well).
constexpr int64_t kCfGroup = 4;
constexpr int64_t kCfGradGroup = 2;

// The per-position sums of channels [c, c + G) of a block: d = x - k, s1 += sum d, s2 += sum d^2
// over the G channels. Taking G channel runs per sweep of the block-long sums makes their loads
// and stores cost 1/G per element (one channel per sweep spent more time on them than on x).
template <int64_t G, typename T>
inline void cf_sums(const T* xr, int64_t S, int64_t B, const acc_t<T>* k, acc_t<T>* s1, acc_t<T>* s2) {
  using Vec = V<T>;
  constexpr int64_t L = lanes<T>();
  for (int64_t i = 0; i < B; i += L) {
    const int64_t m = std::min(L, B - i);
    const Vec kv = Vec::loadu(k + i);
    Vec d[G];
    for (int64_t j = 0; j < G; ++j) {
      d[j] = ld(xr + j * S + i, m) - kv;
    }
    Vec a = Vec::loadu(s1 + i);
    Vec q = Vec::loadu(s2 + i);
    for (int64_t j = 0; j < G; ++j) {
      a = a + d[j];
      q = at::vec::fmadd(d[j], d[j], q);
    }
    a.store(s1 + i);
    q.store(s2 + i);
  }
}

// The backward's sums of channels [c, c + G): with d = x - k and g = dy * w, s1 += d, s2 += d^2,
// g1 += g, g2 += g * d, G channel runs per sweep as in cf_sums.
template <int64_t G, typename T>
inline void cf_grad_sums(const T* xr, const T* dyr, const acc_t<T>* w, int64_t S, int64_t B, const acc_t<T>* k,
                         acc_t<T>* s1, acc_t<T>* s2, acc_t<T>* g1, acc_t<T>* g2) {
  using Vec = V<T>;
  constexpr int64_t L = lanes<T>();
  Vec wv[G];
  for (int64_t j = 0; j < G; ++j) {
    wv[j] = Vec(w[j]);
  }
  for (int64_t i = 0; i < B; i += L) {
    const int64_t m = std::min(L, B - i);
    const Vec kv = Vec::loadu(k + i);
    Vec a = Vec::loadu(s1 + i);
    Vec q = Vec::loadu(s2 + i);
    Vec ga = Vec::loadu(g1 + i);
    Vec gq = Vec::loadu(g2 + i);
    for (int64_t j = 0; j < G; ++j) {
      const Vec d = ld(xr + j * S + i, m) - kv;
      const Vec g = ld(dyr + j * S + i, m) * wv[j];
      a = a + d;
      q = at::vec::fmadd(d, d, q);
      ga = ga + g;
      gq = at::vec::fmadd(g, d, gq);
    }
    a.store(s1 + i);
    q.store(s2 + i);
    ga.store(g1 + i);
    gq.store(g2 + i);
  }
}

template <typename T, bool kLayer>
void forward_cf_rows(const T* x, T* y, int64_t N, int64_t C, int64_t S, const acc_t<T>* w, const acc_t<T>* b,
                     double eps, bool eps_inside) {
  using A = acc_t<T>;
  using Vec = V<T>;
  constexpr int64_t L = lanes<T>();
  const int64_t block = cf_block(N, S, L);
  const int64_t blocks = (S + block - 1) / block;
  const bool stream = N * C * S * static_cast<int64_t>(sizeof(T)) >= stream_threshold();
  const Vec inv_c(static_cast<A>(1.0 / static_cast<double>(C)));
  const Vec eps_v(static_cast<A>(eps));
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> buf(static_cast<size_t>(5 * block));
    A* k = buf.data();
    A* s1 = k + block;
    A* s2 = s1 + block;
    A* mean = s2 + block;
    A* rstd = mean + block;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks;
      const int64_t s0 = (task % blocks) * block;
      const int64_t B = std::min(block, S - s0);
      const T* xb = x + n * C * S + s0;
      T* yb = y + n * C * S + s0;
      for (int64_t i = 0; i < B; i += L) {
        (kLayer ? ld(xb + i, std::min(L, B - i)) : Vec(A(0))).store(k + i);  // shift: channel 0
        Vec(A(0)).store(s1 + i);
        Vec(A(0)).store(s2 + i);
      }
      int64_t c = 0;
      for (; c + kCfGroup <= C; c += kCfGroup) {
        cf_sums<kCfGroup>(xb + c * S, S, B, k, s1, s2);
      }
      for (; c < C; ++c) {
        cf_sums<1>(xb + c * S, S, B, k, s1, s2);
      }
      for (int64_t i = 0; i < B; i += L) {
        const Vec dm = Vec::loadu(s1 + i) * inv_c;
        Vec r;
        if constexpr (kLayer) {
          const Vec var = at::vec::maximum(Vec::loadu(s2 + i) * inv_c - dm * dm, Vec(A(0)));
          r = (var + eps_v).sqrt().reciprocal();
        } else {
          const Vec ms = Vec::loadu(s2 + i) * inv_c;
          r = eps_inside ? (ms + eps_v).sqrt().reciprocal() : (ms.sqrt() + eps_v).reciprocal();
        }
        (Vec::loadu(k + i) + dm).store(mean + i);
        r.store(rstd + i);
      }
      for (int64_t c = 0; c < C; ++c) {
        const Vec wv(w[c]);
        const Vec bv(b[c]);
        const T* xr = xb + c * S;
        T* yr = yb + c * S;
        for (int64_t i = 0; i < B; i += L) {
          const int64_t m = std::min(L, B - i);
          const Vec xn = kLayer ? (ld(xr + i, m) - Vec::loadu(mean + i)) * Vec::loadu(rstd + i)
                                : ld(xr + i, m) * Vec::loadu(rstd + i);
          st(yr + i, at::vec::fmadd(xn, wv, bv), m, stream);
        }
      }
    }
    if (stream) {
      stream_fence();
    }
  });
}

template <typename T, bool kLayer>
void backward_cf_rows(const T* dy, const T* x, T* dx, int64_t N, int64_t C, int64_t S, const acc_t<T>* w,
                      double eps, bool eps_inside, acc_t<T>* dw, acc_t<T>* db) {
  using A = acc_t<T>;
  using Vec = V<T>;
  constexpr int64_t L = lanes<T>();
  // blocks and chunks set by the sizes alone: dw, db are the same bits with any thread count
  const int64_t block = cf_block(N, S, L, kCfFixedThreads);
  const int64_t blocks = (S + block - 1) / block;
  const bool stream = N * C * S * static_cast<int64_t>(sizeof(T)) >= stream_threshold();
  const int64_t slots = fixed_chunks(N * blocks, 1);
  std::vector<double> part(static_cast<size_t>(slots * 2 * C), 0.0);
  const Vec inv_c(static_cast<A>(1.0 / static_cast<double>(C)));
  const Vec eps_v(static_cast<A>(eps));
  const Vec zero(A(0));
  for_fixed_chunks(N * blocks, slots, [&](int64_t begin, int64_t end, int64_t slot) {
    double* pw = part.data() + slot * 2 * C;
    double* pb = pw + C;
    std::vector<A> buf(static_cast<size_t>(9 * block));
    A* k = buf.data();
    A* s1 = k + block;
    A* s2 = s1 + block;
    A* g1 = s2 + block;
    A* g2 = g1 + block;
    A* mean = g2 + block;
    A* rstd = mean + block;
    A* c1 = rstd + block;
    A* c2 = c1 + block;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks;
      const int64_t s0 = (task % blocks) * block;
      const int64_t B = std::min(block, S - s0);
      const int64_t off = n * C * S + s0;
      for (int64_t i = 0; i < B; i += L) {
        (kLayer ? ld(x + off + i, std::min(L, B - i)) : zero).store(k + i);
        for (A* a : {s1, s2, g1, g2}) {
          zero.store(a + i);
        }
      }
      int64_t c = 0;
      for (; c + kCfGradGroup <= C; c += kCfGradGroup) {
        cf_grad_sums<kCfGradGroup>(x + off + c * S, dy + off + c * S, w + c, S, B, k, s1, s2, g1, g2);
      }
      for (; c < C; ++c) {
        cf_grad_sums<1>(x + off + c * S, dy + off + c * S, w + c, S, B, k, s1, s2, g1, g2);
      }
      // Per position: dx = rstd * (g - c1 - xn * c2), as for rows (see backward_rows).
      for (int64_t i = 0; i < B; i += L) {
        const Vec dm = Vec::loadu(s1 + i) * inv_c;
        Vec r, a1(A(0)), a2;
        if constexpr (kLayer) {
          const Vec var = at::vec::maximum(Vec::loadu(s2 + i) * inv_c - dm * dm, zero);
          r = (var + eps_v).sqrt().reciprocal();
          a1 = Vec::loadu(g1 + i) * inv_c;
          a2 = r * (Vec::loadu(g2 + i) - dm * Vec::loadu(g1 + i)) * inv_c;
        } else {
          const Vec ms = Vec::loadu(s2 + i) * inv_c;
          const Vec rms = ms.sqrt();
          const Vec gx = Vec::loadu(g2 + i) * inv_c;
          if (eps_inside) {
            r = (ms + eps_v).sqrt().reciprocal();
            a2 = gx * r;
          } else {
            r = (rms + eps_v).reciprocal();
            a2 = Vec::blendv(zero, gx / rms, rms > zero);  // a zero row: no projection term
          }
        }
        (Vec::loadu(k + i) + dm).store(mean + i);
        r.store(rstd + i);
        a1.store(c1 + i);
        a2.store(c2 + i);
      }
      for (int64_t c = 0; c < C; ++c) {
        const Vec wv(w[c]);
        const T* xr = x + off + c * S;
        const T* dyr = dy + off + c * S;
        T* dxr = dx + off + c * S;
        Vec aw(A(0)), ab(A(0));
        for (int64_t i = 0; i < B; i += L) {
          const int64_t m = std::min(L, B - i);
          const Vec rv = Vec::loadu(rstd + i);
          const Vec xn = kLayer ? (ld(xr + i, m) - Vec::loadu(mean + i)) * rv : ld(xr + i, m) * rv;
          const Vec dyv = ld(dyr + i, m);  // padded lanes: dy = 0
          st(dxr + i, rv * (dyv * wv - Vec::loadu(c1 + i) - xn * Vec::loadu(c2 + i)), m, stream);
          aw = at::vec::fmadd(dyv, xn, aw);
          ab = ab + dyv;
        }
        pw[c] += hsum(aw);
        pb[c] += hsum(ab);
      }
    }
    if (stream) {
      stream_fence();
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    double sw = 0.0, sb = 0.0;
    for (int64_t t = 0; t < slots; ++t) {
      sw += part[t * 2 * C + c];
      sb += part[t * 2 * C + C + c];
    }
    dw[c] = static_cast<A>(sw);
    db[c] = static_cast<A>(sb);
  }
}

void check_rows(const at::Tensor& x, int64_t row_size, const char* op) {
  check_input(x, op);
  TORCH_CHECK(row_size > 0 && x.numel() % row_size == 0, op, ": row_size ", row_size,
              " does not divide the input's ", x.numel(), " elements");
}

// (N, C, *) with C = row_size, for channels_first: sample count and positions per sample.
std::pair<int64_t, int64_t> cf_dims(const at::Tensor& x, int64_t row_size, const char* op) {
  TORCH_CHECK(x.dim() >= 2 && x.size(1) == row_size, op, ": channels_first needs (N, C, *) input with C = ",
              row_size, ", got shape ", x.sizes());
  return {x.size(0), x.numel() / std::max<int64_t>(x.size(0) * row_size, 1)};
}

template <bool kLayer>
std::tuple<at::Tensor, at::Tensor> forward_op(
    const at::Tensor& x_, const std::optional<at::Tensor>& residual, int64_t row_size,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
    bool eps_inside, bool channels_first = false) {
  check_rows(x_, row_size, kLayer ? "normlab::layer_norm" : "normlab::rms_norm");
  int64_t cf_n = 0, cf_s = 0;
  if (channels_first) {
    std::tie(cf_n, cf_s) = cf_dims(x_, row_size, "normlab::layer_norm");
  }
  const at::Tensor x = x_.contiguous();
  at::Tensor res, h;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes(), "normlab: residual and input shapes differ");
    res = residual->to(x.scalar_type()).contiguous();
    h = at::empty_like(x);
  }
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) {
    return {y, h};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "normlab_rownorm_fwd", [&] {
    using A = acc_t<scalar_t>;
    const std::vector<A> w = param_vec<A>(weight, row_size, A(1));
    const std::vector<A> b = param_vec<A>(bias, row_size, A(0));
    if (channels_first) {
      forward_cf_rows<scalar_t, kLayer>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), cf_n,
                                        row_size, cf_s, w.data(), b.data(), eps, eps_inside);
      return;
    }
    forward_rows<scalar_t, kLayer>(
        x.const_data_ptr<scalar_t>(), res.defined() ? res.const_data_ptr<scalar_t>() : nullptr,
        h.defined() ? h.mutable_data_ptr<scalar_t>() : nullptr, y.mutable_data_ptr<scalar_t>(),
        x.numel() / row_size, row_size, w.data(), b.data(), eps, eps_inside);
  });
  return {y, h};
}

template <bool kLayer>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_op(
    const at::Tensor& grad, const at::Tensor& x_, int64_t row_size, const std::optional<at::Tensor>& weight,
    double eps, bool eps_inside, const std::optional<at::Tensor>& grad_residual, bool channels_first = false) {
  check_rows(x_, row_size, kLayer ? "normlab::layer_norm_backward" : "normlab::rms_norm_backward");
  int64_t cf_n = 0, cf_s = 0;
  if (channels_first) {
    std::tie(cf_n, cf_s) = cf_dims(x_, row_size, "normlab::layer_norm_backward");
  }
  TORCH_CHECK(!(channels_first && grad_residual.has_value() && grad_residual->defined()),
              "normlab: grad_residual is for rows only");
  TORCH_CHECK(grad.sizes() == x_.sizes(), "normlab: grad and input shapes differ");
  const at::Tensor x = x_.contiguous();
  const at::Tensor dy = grad.to(x.scalar_type()).contiguous();
  at::Tensor dres;
  if (grad_residual.has_value() && grad_residual->defined()) {
    TORCH_CHECK(grad_residual->sizes() == x.sizes(), "normlab: grad_residual and input shapes differ");
    dres = grad_residual->to(x.scalar_type()).contiguous();
  }
  const auto acc = acc_dtype(x.scalar_type());
  const auto opts = at::TensorOptions().dtype(acc);
  at::Tensor dx = at::empty_like(x);
  if (x.numel() == 0) {
    return {dx, at::zeros({row_size}, opts), at::zeros({row_size}, opts)};
  }
  at::Tensor dw = at::empty({row_size}, opts);
  at::Tensor db = at::empty({row_size}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "normlab_rownorm_bwd", [&] {
    using A = acc_t<scalar_t>;
    const std::vector<A> w = param_vec<A>(weight, row_size, A(1));
    if (channels_first) {
      backward_cf_rows<scalar_t, kLayer>(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                         dx.mutable_data_ptr<scalar_t>(), cf_n, row_size, cf_s, w.data(), eps,
                                         eps_inside, dw.mutable_data_ptr<A>(), db.mutable_data_ptr<A>());
      return;
    }
    backward_rows<scalar_t, kLayer>(
        dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
        dres.defined() ? dres.const_data_ptr<scalar_t>() : nullptr, dx.mutable_data_ptr<scalar_t>(),
        x.numel() / row_size, row_size, w.data(), eps, eps_inside, dw.mutable_data_ptr<A>(),
        db.mutable_data_ptr<A>());
  });
  return {dx, dw, db};
}

}  // namespace

at::Tensor layer_norm(const at::Tensor& x, int64_t row_size, const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& bias, double eps, bool channels_first) {
  return std::get<0>(forward_op<true>(x, std::nullopt, row_size, weight, bias, eps, true, channels_first));
}

at::Tensor rms_norm(const at::Tensor& x, int64_t row_size, const std::optional<at::Tensor>& weight,
                    const std::optional<at::Tensor>& bias, double eps, bool eps_inside, bool channels_first) {
  return std::get<0>(forward_op<false>(x, std::nullopt, row_size, weight, bias, eps, eps_inside, channels_first));
}

std::tuple<at::Tensor, at::Tensor> add_layer_norm(
    const at::Tensor& x, const at::Tensor& residual, int64_t row_size, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  return forward_op<true>(x, residual, row_size, weight, bias, eps, true);
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(
    const at::Tensor& x, const at::Tensor& residual, int64_t row_size, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool eps_inside) {
  return forward_op<false>(x, residual, row_size, weight, bias, eps, eps_inside);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(
    const at::Tensor& grad, const at::Tensor& x, int64_t row_size, const std::optional<at::Tensor>& weight,
    double eps, const std::optional<at::Tensor>& grad_residual, bool channels_first) {
  return backward_op<true>(grad, x, row_size, weight, eps, true, grad_residual, channels_first);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_backward(
    const at::Tensor& grad, const at::Tensor& x, int64_t row_size, const std::optional<at::Tensor>& weight,
    double eps, bool eps_inside, const std::optional<at::Tensor>& grad_residual, bool channels_first) {
  return backward_op<false>(grad, x, row_size, weight, eps, eps_inside, grad_residual, channels_first);
}

}  // namespace normlab

