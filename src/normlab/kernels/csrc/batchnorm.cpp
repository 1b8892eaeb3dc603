// BatchNorm training (Ioffe & Szegedy 2015, arXiv:1502.03167) on contiguous (N, C, S) input: the
// statistics of channel c run over its N planes of S values (stride C * S apart).
//
// One task per channel, all of its passes back to back: the channel (N * S values, 128 KiB for a
// 32x192x32x32 fp32 map) is read from memory once and stays in L2 for the passes after the first,
// so the forward costs about one read of x and one write of y, the backward one read of x and dy
// and one write of dx.
//
// Numerics: sums are shifted by a value of the channel (its first vector's mean) and accumulated
// in acc_t lanes flushed to fp64 per run of 512 vectors; where that shift turns out farther than
// one standard deviation from the mean, a second pass re-centres on the mean (no cancellation for
// inputs with a large mean, e.g. 1e4 + randn). x - mean is formed as (x - mh) - ml with the mean
// split into an fp32 head mh (x - mh is exact near the mean) and tail ml, so y keeps its accuracy
// where the mean's fp32 rounding is comparable to the spread. The backward re-derives ml from
// sum(x - mh), so it needs only the fp32 mean the forward returns.
#include "common.h"
#include "ops.h"

namespace normlab {
namespace {

template <typename T>
using V = Vectorized<acc_t<T>>;

// Sums over one run of n values, shifted by k: sum(d), sum(d^2) (kGrad: sum(d), sum(dy d), sum(dy))
// with d = x - k. Added into out[0..2]. The run is at most a page or two and the next one is
// C * S values away, where the hardware prefetcher does not follow: the next run's lines
// (next_x, next_dy; nullptr for none) are prefetched while this one is summed.
template <typename T, bool kGrad>
inline void run_sums(const T* xr, const T* dyr, int64_t n, acc_t<T> k, double* out, const T* next_x,
                     const T* next_dy) {
  using A = acc_t<T>;
  constexpr int64_t L = lanes<T>();
  const V<T> kv(k);
  int64_t i = 0;
  while (i < n) {
    const int64_t stop = std::min(n, i + 512 * L);
    V<T> s1a(A(0)), s1b(A(0)), s2a(A(0)), s2b(A(0));
    auto add = [&](const V<T>& d, const V<T>& g, V<T>& s1, V<T>& s2) {
      s1 = s1 + d;
      if constexpr (kGrad) {
        s2 = at::vec::fmadd(g, d, s2);
      } else {
        s2 = at::vec::fmadd(d, d, s2);
      }
    };
    V<T> g1a(A(0)), g1b(A(0));  // kGrad: sum(dy)
    for (; i + 2 * L <= stop; i += 2 * L) {
      if (next_x != nullptr) {
        __builtin_prefetch(next_x + i, 0, 3);
        if constexpr (kGrad) {
          __builtin_prefetch(next_dy + i, 0, 3);
        }
      }
      const V<T> d0 = vload(xr + i) - kv;
      const V<T> d1 = vload(xr + i + L) - kv;
      if constexpr (kGrad) {
        const V<T> y0 = vload(dyr + i);
        const V<T> y1 = vload(dyr + i + L);
        g1a = g1a + y0;
        g1b = g1b + y1;
        add(d0, y0, s1a, s2a);
        add(d1, y1, s1b, s2b);
      } else {
        add(d0, d0, s1a, s2a);
        add(d1, d1, s1b, s2b);
      }
    }
    for (; i < stop; i += L) {
      const int64_t m = std::min(L, stop - i);
      const V<T> d = first_n(ld(xr + i, m) - kv, m);  // padded lanes masked
      if constexpr (kGrad) {
        const V<T> y = ld(dyr + i, m);  // padded lanes read as 0
        g1a = g1a + y;
        add(d, y, s1a, s2a);
      } else {
        add(d, d, s1a, s2a);
      }
    }
    out[0] += hsum(s1a + s1b);
    out[1] += hsum(s2a + s2b);
    if constexpr (kGrad) {
      out[2] += hsum(g1a + g1b);
    }
  }
}

// Channel c's N runs: x + (n * C + c) * S.
template <typename T>
inline const T* run_ptr(const T* base, int64_t n, int64_t c, int64_t C, int64_t S) {
  return base + (n * C + c) * S;
}

// Grain: channels per task so that a task covers at least ~32K values (small inputs: one thread).
inline int64_t channel_grain(int64_t N, int64_t S) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, N * S));
}

template <typename T>
void forward(const T* x, T* y, int64_t N, int64_t C, int64_t S, const acc_t<T>* w, const acc_t<T>* b, double eps,
             acc_t<T>* mean_out, acc_t<T>* var_out) {
  using A = acc_t<T>;
  constexpr int64_t L = lanes<T>();
  const double count = static_cast<double>(N * S);
  const bool stream = N * C * S * static_cast<int64_t>(sizeof(T)) >= stream_threshold();
  at::parallel_for(0, C, channel_grain(N, S), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      auto moments = [&](A k, double& dm, double& var) {
        double s[2] = {0.0, 0.0};
        for (int64_t n = 0; n < N; ++n) {
          const T* next = n + 1 < N ? run_ptr(x, n + 1, c, C, S)
                                    : (c + 1 < end ? run_ptr(x, 0, c + 1, C, S) : nullptr);
          run_sums<T, false>(run_ptr(x, n, c, C, S), nullptr, S, k, s, next, nullptr);
        }
        dm = s[0] / count;
        var = std::max(s[1] / count - dm * dm, 0.0);
      };
      const T* x0 = run_ptr(x, 0, c, C, S);
      const int64_t m0 = std::min(L, S);
      A k = static_cast<A>(hsum(first_n(ld(x0, m0), m0)) / static_cast<double>(m0));
      double dm = 0.0, var = 0.0;
      moments(k, dm, var);
      if (dm * dm > var) {  // the shift was off by more than a standard deviation: re-centre
        k = static_cast<A>(static_cast<double>(k) + dm);
        moments(k, dm, var);
      }
      const double mean = static_cast<double>(k) + dm;
      const A mh = static_cast<A>(mean);
      const double ml = mean - static_cast<double>(mh);
      const double rstd = 1.0 / std::sqrt(var + eps);
      mean_out[c] = mh;
      var_out[c] = static_cast<A>(var);
      const double scale = rstd * static_cast<double>(w[c]);
      const V<T> mv(mh);
      const V<T> sv(static_cast<A>(scale));
      const V<T> bv(static_cast<A>(static_cast<double>(b[c]) - ml * scale));
      // The writes (from L2) overlap the next channel's reads from memory: its run n is fetched
      // while run n of this channel is written, so the cache holds about one channel throughout.
      for (int64_t n = 0; n < N; ++n) {
        const T* xr = run_ptr(x, n, c, C, S);
        const T* pf = c + 1 < end ? run_ptr(x, n, c + 1, C, S) : nullptr;
        affine_run(xr, y + (n * C + c) * S, S, mv, sv, bv, stream, pf);
      }
    }
    if (stream) {
      stream_fence();
    }
  });
}

// dx = rstd w (dy - mean(dy) - xhat mean(dy xhat)) over the channel; dw = sum(dy xhat), db = sum(dy).
// With d = x - mh (exact) and xhat = (d - ml) rstd: dx = a dy + bcoef d + c0.
template <typename T>
void backward(const T* dy, const T* x, T* dx, int64_t N, int64_t C, int64_t S, const acc_t<T>* w,
              const acc_t<T>* mean, const acc_t<T>* var, double eps, acc_t<T>* dw, acc_t<T>* db) {
  using A = acc_t<T>;
  const double count = static_cast<double>(N * S);
  const bool stream = N * C * S * static_cast<int64_t>(sizeof(T)) >= stream_threshold();
  at::parallel_for(0, C, channel_grain(N, S), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const A mh = mean[c];
      double s[3] = {0.0, 0.0, 0.0};  // sum d, sum dy d, sum dy
      for (int64_t n = 0; n < N; ++n) {
        const bool last = n + 1 == N;
        const int64_t nn = last ? 0 : n + 1;
        const int64_t nc = last ? c + 1 : c;
        const bool more = !last || c + 1 < end;
        run_sums<T, true>(run_ptr(x, n, c, C, S), run_ptr(dy, n, c, C, S), S, mh, s,
                          more ? run_ptr(x, nn, nc, C, S) : nullptr, more ? run_ptr(dy, nn, nc, C, S) : nullptr);
      }
      const double ml = s[0] / count;
      const double rstd = 1.0 / std::sqrt(static_cast<double>(var[c]) + eps);
      const double wc = static_cast<double>(w[c]);
      const double sdy = s[2];
      const double sdyxhat = rstd * (s[1] - ml * sdy);
      dw[c] = static_cast<A>(sdyxhat);
      db[c] = static_cast<A>(sdy);
      const double a = rstd * wc;
      const double bcoef = -a * rstd * sdyxhat / count;
      const double c0 = -a * sdy / count - bcoef * ml;
      const V<T> mv(mh), av(static_cast<A>(a)), bv(static_cast<A>(bcoef)), cv(static_cast<A>(c0));
      for (int64_t n = 0; n < N; ++n) {
        const T* xr = run_ptr(x, n, c, C, S);
        const T* dyr = run_ptr(dy, n, c, C, S);
        const T* pfx = c + 1 < end ? run_ptr(x, n, c + 1, C, S) : nullptr;  // as in the forward
        const T* pfy = c + 1 < end ? run_ptr(dy, n, c + 1, C, S) : nullptr;
        T* dxr = dx + (n * C + c) * S;
        auto body = [&](int64_t i, int64_t m) {
          prefetch_at(pfx, i);
          prefetch_at(pfy, i);
          const V<T> d = ld(xr + i, m) - mv;
          st(dxr + i, at::vec::fmadd(ld(dyr + i, m), av, at::vec::fmadd(d, bv, cv)), m, stream);
        };
        each_vector<T>(S, body);
      }
    }
    if (stream) {
      stream_fence();
    }
  });
}

void check_3d(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 3, op, ": expected a 3-D (N, C, S) view, got ", x.dim(), " dims");
}

}  // namespace

Tensor3 batch_norm_train(const at::Tensor& x_, const OptTensor& weight, const OptTensor& bias, double eps) {
  check_input(x_, "normlab::batch_norm_train");
  check_3d(x_, "normlab::batch_norm_train");
  const at::Tensor x = x_.contiguous();
  const int64_t N = x.size(0), C = x.size(1), S = x.size(2);
  const auto opts = at::TensorOptions().dtype(acc_dtype(x.scalar_type()));
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) {  // no values: the statistics are undefined (NaN), as torch's
    return {y, at::full({C}, NAN, opts), at::full({C}, NAN, opts)};
  }
  at::Tensor mean = at::empty({C}, opts);
  at::Tensor var = at::empty({C}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "normlab_batch_norm", [&] {
    using A = acc_t<scalar_t>;
    const std::vector<A> w = param_vec<A>(weight, C, A(1));
    const std::vector<A> b = param_vec<A>(bias, C, A(0));
    forward<scalar_t>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), N, C, S, w.data(), b.data(), eps,
                      mean.mutable_data_ptr<A>(), var.mutable_data_ptr<A>());
  });
  return {y, mean, var};
}

Tensor3 batch_norm_train_backward(const at::Tensor& grad, const at::Tensor& x_, const at::Tensor& mean_,
                                  const at::Tensor& var_, const OptTensor& weight, double eps) {
  check_input(x_, "normlab::batch_norm_train_backward");
  check_3d(x_, "normlab::batch_norm_train_backward");
  TORCH_CHECK(grad.sizes() == x_.sizes(), "normlab: grad and input shapes differ");
  const at::Tensor x = x_.contiguous();
  const int64_t N = x.size(0), C = x.size(1), S = x.size(2);
  const auto acc = acc_dtype(x.scalar_type());
  TORCH_CHECK(mean_.numel() == C && var_.numel() == C, "normlab::batch_norm_train_backward: statistics of ",
              mean_.numel(), " and ", var_.numel(), " channels, expected ", C);
  const at::Tensor dy = grad.to(x.scalar_type()).contiguous();
  const at::Tensor mean = mean_.to(acc).contiguous();
  const at::Tensor var = var_.to(acc).contiguous();
  const auto opts = at::TensorOptions().dtype(acc);
  at::Tensor dx = at::empty_like(x);
  at::Tensor dw = at::zeros({C}, opts);
  at::Tensor db = at::zeros({C}, opts);
  if (x.numel() == 0) {
    return {dx, dw, db};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "normlab_batch_norm_bwd", [&] {
    using A = acc_t<scalar_t>;
    const std::vector<A> w = param_vec<A>(weight, C, A(1));
    backward<scalar_t>(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(),
                       N, C, S, w.data(), mean.const_data_ptr<A>(), var.const_data_ptr<A>(), eps,
                       dw.mutable_data_ptr<A>(), db.mutable_data_ptr<A>());
  });
  return {dx, dw, db};
}

}  // namespace normlab
