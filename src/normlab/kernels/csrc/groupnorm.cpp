// GroupNorm (Wu & He 2018, arXiv:1803.08494) on two memory layouts of (N, C, *) feature maps:
//   channels first: x viewed as (N, C, S), contiguous: a group is one contiguous chunk of C/G * S
//     values; one task per (sample, group), statistics in two passes over the chunk (L2-resident);
//   channels last: x viewed as (N, S, C), contiguous (channels_last images, or (N, L, C) tokens
//     passed as x.transpose(1, 2)): per sample, all threads sweep the rows once for per-channel
//     shifted sums, then once more to write, so the sample stays in L3 between the two sweeps.
#include "common.h"
#include "ops.h"

namespace normlab {
namespace {

template <typename T>
using V = Vectorized<acc_t<T>>;

// ---- channels first: (N, C, S) ----------------------------------------------------------------

// Shifted sums over a contiguous run: sum(x - k), sum((x - k)^2) and, with dy, sum(dy) and
// sum(dy * (x - k)); lane sums flushed to fp64 every 512 vectors.
template <typename T, bool kGrad>
struct RunSums {
  double s1 = 0.0, s2 = 0.0, g1 = 0.0, g2 = 0.0;
};

template <typename T, bool kGrad>
inline void run_sums(const T* xr, const T* dyr, int64_t n, acc_t<T> k, RunSums<T, kGrad>& out) {
  using A = acc_t<T>;
  constexpr int64_t L = lanes<T>();
  const V<T> kv(k);
  int64_t i = 0;
  while (i < n) {
    const int64_t stop = std::min(n, i + 512 * L);
    V<T> s1a(A(0)), s1b(A(0)), s2a(A(0)), s2b(A(0)), g1(A(0)), g2(A(0));
    auto add = [&](const V<T>& d, const V<T>& g, V<T>& s1, V<T>& s2) {
      s1 = s1 + d;
      s2 = at::vec::fmadd(d, d, s2);
      if constexpr (kGrad) {
        g1 = g1 + g;
        g2 = at::vec::fmadd(g, d, g2);
      }
    };
    for (; i + 2 * L <= stop; i += 2 * L) {
      add(vload(xr + i) - kv, kGrad ? vload(dyr + i) : V<T>(A(0)), s1a, s2a);
      add(vload(xr + i + L) - kv, kGrad ? vload(dyr + i + L) : V<T>(A(0)), s1b, s2b);
    }
    for (; i + L <= stop; i += L) {
      add(vload(xr + i) - kv, kGrad ? vload(dyr + i) : V<T>(A(0)), s1a, s2a);
    }
    if (i < stop) {  // the run's tail: padded lanes masked (x) or zero (dy)
      const int64_t m = stop - i;
      add(first_n(vload_n(xr + i, m) - kv, m), kGrad ? vload_n(dyr + i, m) : V<T>(A(0)), s1b, s2b);
      i = stop;
    }
    out.s1 += hsum(s1a + s1b);
    out.s2 += hsum(s2a + s2b);
    if constexpr (kGrad) {
      out.g1 += hsum(g1);
      out.g2 += hsum(g2);
    }
  }
}

// The shift of a group: the mean of its first vector (close to the group mean, so the shifted
// variance does not cancel; exact 0 for a constant group).
template <typename T>
inline acc_t<T> group_shift(const T* xc, int64_t count) {
  const int64_t m = std::min(lanes<T>(), count);
  return static_cast<acc_t<T>>(hsum(first_n(ld(xc, m), m)) / static_cast<double>(m));
}

template <typename T>
void forward_cf(const T* x, T* y, int64_t N, int64_t C, int64_t S, int64_t G, const acc_t<T>* w,
                const acc_t<T>* b, double eps) {
  using A = acc_t<T>;
  const int64_t cg = C / G;
  const int64_t grain = std::max<int64_t>(1, 16384 / (cg * S));
  const bool stream = N * C * S * static_cast<int64_t>(sizeof(T)) >= stream_threshold();
  at::parallel_for(0, N * G, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task % G;
      const T* xc = x + task * cg * S;
      T* yc = y + task * cg * S;
      const double count = static_cast<double>(cg * S);
      const A k = group_shift(xc, cg * S);
      RunSums<T, false> sums;
      run_sums<T, false>(xc, nullptr, cg * S, k, sums);
      const double dm = sums.s1 / count;
      const double mean = static_cast<double>(k) + dm;
      const double rstd = 1.0 / std::sqrt(std::max(sums.s2 / count - dm * dm, 0.0) + eps);
      const V<T> mv(static_cast<A>(mean));
      for (int64_t c = 0; c < cg; ++c) {
        const int64_t ch = g * cg + c;
        const V<T> sv(static_cast<A>(rstd * static_cast<double>(w[ch])));
        const V<T> bv(b[ch]);
        affine_run(xc + c * S, yc + c * S, S, mv, sv, bv, stream);
      }
    }
    if (stream) {
      stream_fence();
    }
  });
}

// dx = rstd * (w_c dy - mean_group(w dy) - xn * mean_group(w dy xn)); dw_c = sum dy xn, db_c = sum dy,
// summed per (sample, channel) by the task that owns the group, then over samples. One pass for
// all the sums (shifted by the group's k), one to write.
template <typename T>
void backward_cf(const T* dy, const T* x, T* dx, int64_t N, int64_t C, int64_t S, int64_t G,
                 const acc_t<T>* w, double eps, acc_t<T>* dw, acc_t<T>* db) {
  using A = acc_t<T>;
  const int64_t cg = C / G;
  std::vector<double> sdy(static_cast<size_t>(N * C)), sdyx(static_cast<size_t>(N * C));
  const int64_t grain = std::max<int64_t>(1, 8192 / (cg * S));
  const bool stream = N * C * S * static_cast<int64_t>(sizeof(T)) >= stream_threshold();
  at::parallel_for(0, N * G, grain, [&](int64_t begin, int64_t end) {
    std::vector<RunSums<T, true>> per_channel(static_cast<size_t>(cg));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / G;
      const int64_t g = task % G;
      const int64_t off = task * cg * S;
      const double count = static_cast<double>(cg * S);
      const A k = group_shift(x + off, cg * S);
      double s1 = 0.0, s2 = 0.0;
      for (int64_t c = 0; c < cg; ++c) {
        per_channel[c] = RunSums<T, true>();
        run_sums<T, true>(x + off + c * S, dy + off + c * S, S, k, per_channel[c]);
        s1 += per_channel[c].s1;
        s2 += per_channel[c].s2;
      }
      const double dm = s1 / count;
      const double mean = static_cast<double>(k) + dm;
      const double rstd = 1.0 / std::sqrt(std::max(s2 / count - dm * dm, 0.0) + eps);
      double m1 = 0.0, m2 = 0.0;
      for (int64_t c = 0; c < cg; ++c) {
        const int64_t ch = g * cg + c;
        // sum dy xn = rstd * (sum dy (x - k) - (mean - k) sum dy)
        sdy[n * C + ch] = per_channel[c].g1;
        sdyx[n * C + ch] = rstd * (per_channel[c].g2 - dm * per_channel[c].g1);
        m1 += static_cast<double>(w[ch]) * sdy[n * C + ch];
        m2 += static_cast<double>(w[ch]) * sdyx[n * C + ch];
      }
      const V<T> mv(static_cast<A>(mean));
      const V<T> rv(static_cast<A>(rstd));
      const V<T> c1v(static_cast<A>(m1 / count));
      const V<T> c2v(static_cast<A>(m2 / count));
      for (int64_t c = 0; c < cg; ++c) {
        const int64_t ch = g * cg + c;
        const V<T> wv(w[ch]);
        const T* xr = x + off + c * S;
        const T* dyr = dy + off + c * S;
        T* dxr = dx + off + c * S;
        auto body = [&](int64_t i, int64_t m) {
          const V<T> xn = (ld(xr + i, m) - mv) * rv;
          st(dxr + i, rv * (ld(dyr + i, m) * wv - c1v - xn * c2v), m, stream);
        };
        each_vector<T>(S, body);
      }
    }
    if (stream) {
      stream_fence();
    }
  });
  for (int64_t ch = 0; ch < C; ++ch) {
    double a = 0.0, bsum = 0.0;
    for (int64_t n = 0; n < N; ++n) {
      a += sdyx[n * C + ch];
      bsum += sdy[n * C + ch];
    }
    dw[ch] = static_cast<A>(a);
    db[ch] = static_cast<A>(bsum);
  }
}

// ---- channels last: (N, S, C) -------------------------------------------------------------------

// Per-channel sums over rows [begin, end) of one sample, shifted by that channel's value in row 0
// (the shifted-data variance: exact for a constant channel, no cancellation when the shift is a
// typical value): k sums of (x - shift), (x - shift)^2 and, with dy, dy and dy * (x - shift).
// Each block of up to 64 rows is summed in acc_t lanes, then added into fp64 per-thread buffers.
template <typename T, bool kGrad>
void shifted_sums(const T* xs, const T* dys, int64_t begin, int64_t end, int64_t C, const acc_t<T>* shift,
                  acc_t<T>* blk, double* out) {
  using A = acc_t<T>;
  constexpr int64_t L = lanes<T>();
  constexpr int64_t K = kGrad ? 4 : 2;
  const int64_t Cp = round_up(C, L);
  for (int64_t r0 = begin; r0 < end; r0 += 64) {
    const int64_t r1 = std::min(end, r0 + 64);
    std::fill(blk, blk + K * Cp, A(0));
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = xs + r * C;
      const T* dyr = kGrad ? dys + r * C : nullptr;
      auto body = [&](int64_t i, int64_t m) {
        const V<T> d = ld(xr + i, m) - V<T>::loadu(shift + i);  // padded lanes: 0 - 0
        V<T> s1 = V<T>::loadu(blk + i) + d;
        V<T> s2 = at::vec::fmadd(d, d, V<T>::loadu(blk + Cp + i));
        s1.store(blk + i);
        s2.store(blk + Cp + i);
        if constexpr (kGrad) {
          const V<T> g = ld(dyr + i, m);
          (V<T>::loadu(blk + 2 * Cp + i) + g).store(blk + 2 * Cp + i);
          at::vec::fmadd(g, d, V<T>::loadu(blk + 3 * Cp + i)).store(blk + 3 * Cp + i);
        }
      };
      each_vector<T>(C, body);
    }
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t c = 0; c < C; ++c) {
        out[k * C + c] += static_cast<double>(blk[k * Cp + c]);
      }
    }
  }
}

// Per-group mean and rstd from the per-channel shifted sums, for one sample.
template <typename A>
void group_moments(const double* sums, const A* shift, int64_t C, int64_t G, int64_t S, double eps,
                   std::vector<double>& mean, std::vector<double>& rstd) {
  const int64_t cg = C / G;
  const double count = static_cast<double>(cg * S);
  for (int64_t g = 0; g < G; ++g) {
    double total = 0.0;
    for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
      total += sums[c] + static_cast<double>(S) * static_cast<double>(shift[c]);
    }
    const double m = total / count;
    double ss = 0.0;  // sum (x - m)^2 = S2 + 2 d S1 + S d^2 with d = shift - m
    for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
      const double d = static_cast<double>(shift[c]) - m;
      ss += sums[C + c] + 2.0 * d * sums[c] + static_cast<double>(S) * d * d;
    }
    mean[g] = m;
    rstd[g] = 1.0 / std::sqrt(std::max(ss, 0.0) / count + eps);
  }
}

template <typename T, bool kGrad>
void sample_sums(const T* xs, const T* dys, int64_t S, int64_t C, const acc_t<T>* shift, std::vector<double>& sums) {
  using A = acc_t<T>;
  constexpr int64_t K = kGrad ? 4 : 2;
  const int64_t Cp = round_up(C, lanes<T>());
  const int64_t grain = std::max<int64_t>(1, 16384 / C);
  const int64_t slots = fixed_chunks(S, grain);  // the same bits with any thread count
  std::vector<double> part(static_cast<size_t>(slots * K * C), 0.0);
  for_fixed_chunks(S, slots, [&](int64_t begin, int64_t end, int64_t slot) {
    std::vector<A> blk(static_cast<size_t>(K * Cp));
    shifted_sums<T, kGrad>(xs, dys, begin, end, C, shift, blk.data(), part.data() + slot * K * C);
  });
  std::fill(sums.begin(), sums.end(), 0.0);
  for (int64_t s = 0; s < slots; ++s) {
    for (int64_t j = 0; j < K * C; ++j) {
      sums[j] += part[s * K * C + j];
    }
  }
}

template <typename T>
std::vector<acc_t<T>> row0_shift(const T* xs, int64_t C) {
  const int64_t Cp = round_up(C, lanes<T>());
  std::vector<acc_t<T>> shift(static_cast<size_t>(Cp), acc_t<T>(0));
  for (int64_t c = 0; c < C; ++c) {
    shift[c] = static_cast<acc_t<T>>(xs[c]);
  }
  return shift;
}

// Writes rows [0, S) of one sample: out = a_c * x + b_c [+ c_c * dy] with per-channel vectors.
template <typename T, bool kGrad>
void sample_write(const T* xs, const T* dys, T* out, int64_t S, int64_t C, const acc_t<T>* mean_c,
                  const acc_t<T>* coef_a, const acc_t<T>* coef_b, const acc_t<T>* coef_c, bool stream) {
  const int64_t grain = std::max<int64_t>(1, 16384 / C);
  at::parallel_for(0, S, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = xs + r * C;
      T* outr = out + r * C;
      auto body = [&](int64_t i, int64_t m) {
        const V<T> xc = ld(xr + i, m) - V<T>::loadu(mean_c + i);
        V<T> v = at::vec::fmadd(xc, V<T>::loadu(coef_a + i), V<T>::loadu(coef_b + i));
        if constexpr (kGrad) {
          v = at::vec::fmadd(ld(dys + r * C + i, m), V<T>::loadu(coef_c + i), v);
        }
        st(outr + i, v, m, stream);
      };
      each_vector<T>(C, body);
    }
    if (stream) {
      stream_fence();
    }
  });
}

// Samples in parallel when there are enough of them (no barrier per sample: a descheduled thread
// on a busy machine then stalls only its own samples), else the rows of each sample in parallel.
template <typename F>
void for_each_sample(int64_t N, F process) {
  if (N >= 2 * at::get_num_threads() && !at::in_parallel_region()) {
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        process(n);  // the row loops inside run inline on this thread
      }
    });
  } else {
    for (int64_t n = 0; n < N; ++n) {
      process(n);
    }
  }
}

template <typename T>
void forward_cl(const T* x, T* y, int64_t N, int64_t S, int64_t C, int64_t G, const acc_t<T>* w,
                const acc_t<T>* b, double eps) {
  using A = acc_t<T>;
  const int64_t cg = C / G;
  const int64_t Cp = round_up(C, lanes<T>());
  const bool stream = N * S * C * static_cast<int64_t>(sizeof(T)) >= stream_threshold();
  for_each_sample(N, [&](int64_t n) {
    std::vector<double> sums(static_cast<size_t>(2 * C)), mean(G), rstd(G);
    std::vector<A> mean_c(Cp, A(0)), scale_c(Cp, A(0)), bias_c(Cp, A(0));
    const T* xs = x + n * S * C;
    const std::vector<A> shift = row0_shift(xs, C);
    sample_sums<T, false>(xs, nullptr, S, C, shift.data(), sums);
    group_moments(sums.data(), shift.data(), C, G, S, eps, mean, rstd);
    for (int64_t c = 0; c < C; ++c) {
      mean_c[c] = static_cast<A>(mean[c / cg]);
      scale_c[c] = static_cast<A>(rstd[c / cg] * static_cast<double>(w[c]));
      bias_c[c] = b[c];
    }
    sample_write<T, false>(xs, nullptr, y + n * S * C, S, C, mean_c.data(), scale_c.data(), bias_c.data(), nullptr,
                           stream);
  });
}

// dx = rstd (w_c dy - m1_g) - rstd^2 m2_g (x - mean_g), with m1_g = mean_group(w dy) and
// m2_g = mean_group(w dy xn): per channel dx = coef_c dy + coef_a (x - mean) + coef_b.
template <typename T>
void backward_cl(const T* dy, const T* x, T* dx, int64_t N, int64_t S, int64_t C, int64_t G,
                 const acc_t<T>* w, double eps, acc_t<T>* dw, acc_t<T>* db) {
  using A = acc_t<T>;
  const int64_t cg = C / G;
  const int64_t Cp = round_up(C, lanes<T>());
  const double count = static_cast<double>(cg * S);
  const bool stream = N * S * C * static_cast<int64_t>(sizeof(T)) >= stream_threshold();
  std::vector<double> dwd(static_cast<size_t>(N * C)), dbd(static_cast<size_t>(N * C));
  for_each_sample(N, [&](int64_t n) {
    std::vector<double> sums(static_cast<size_t>(4 * C)), mean(G), rstd(G);
    std::vector<A> mean_c(Cp, A(0)), ca(Cp, A(0)), cb(Cp, A(0)), cc(Cp, A(0));
    const T* xs = x + n * S * C;
    const T* dys = dy + n * S * C;
    const std::vector<A> shift = row0_shift(xs, C);
    sample_sums<T, true>(xs, dys, S, C, shift.data(), sums);
    group_moments(sums.data(), shift.data(), C, G, S, eps, mean, rstd);
    for (int64_t g = 0; g < G; ++g) {
      double m1 = 0.0, m2 = 0.0;
      for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
        // sum dy (x - mean) = sum dy (x - shift) + (shift - mean) sum dy
        const double dyx = sums[3 * C + c] + (static_cast<double>(shift[c]) - mean[g]) * sums[2 * C + c];
        dwd[n * C + c] = dyx * rstd[g];  // sum dy xn
        dbd[n * C + c] = sums[2 * C + c];
        m1 += static_cast<double>(w[c]) * sums[2 * C + c];
        m2 += static_cast<double>(w[c]) * dwd[n * C + c];
      }
      m1 /= count;
      m2 /= count;
      for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
        mean_c[c] = static_cast<A>(mean[g]);
        cc[c] = static_cast<A>(rstd[g] * static_cast<double>(w[c]));
        ca[c] = static_cast<A>(-rstd[g] * rstd[g] * m2);
        cb[c] = static_cast<A>(-rstd[g] * m1);
      }
    }
    sample_write<T, true>(xs, dys, dx + n * S * C, S, C, mean_c.data(), ca.data(), cb.data(), cc.data(), stream);
  });
  for (int64_t c = 0; c < C; ++c) {
    double sw = 0.0, sb = 0.0;
    for (int64_t n = 0; n < N; ++n) {
      sw += dwd[n * C + c];
      sb += dbd[n * C + c];
    }
    dw[c] = static_cast<A>(sw);
    db[c] = static_cast<A>(sb);
  }
}

// ---- ops ------------------------------------------------------------------------------------------

struct Dims {
  int64_t N, C, S;
};

Dims dims(const at::Tensor& x, int64_t G, bool channels_last, const char* op) {
  TORCH_CHECK(x.dim() == 3, op, ": expected a 3-D (N, C, S) or (N, S, C) view, got ", x.dim(), " dims");
  Dims d{x.size(0), channels_last ? x.size(2) : x.size(1), channels_last ? x.size(1) : x.size(2)};
  TORCH_CHECK(G > 0 && d.C % G == 0, op, ": ", d.C, " channels are not divisible into ", G, " groups");
  return d;
}

}  // namespace

at::Tensor group_norm(const at::Tensor& x_, int64_t G, const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& bias, double eps, bool channels_last) {
  check_input(x_, "normlab::group_norm");
  const Dims d = dims(x_, G, channels_last, "normlab::group_norm");
  const at::Tensor x = x_.contiguous();
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) {
    return y;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "normlab_group_norm", [&] {
    using A = acc_t<scalar_t>;
    const std::vector<A> w = param_vec<A>(weight, d.C, A(1));
    const std::vector<A> b = param_vec<A>(bias, d.C, A(0));
    if (channels_last) {
      forward_cl<scalar_t>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), d.N, d.S, d.C, G, w.data(),
                           b.data(), eps);
    } else {
      forward_cf<scalar_t>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), d.N, d.C, d.S, G, w.data(),
                           b.data(), eps);
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_backward(
    const at::Tensor& grad, const at::Tensor& x_, int64_t G, const std::optional<at::Tensor>& weight, double eps,
    bool channels_last) {
  check_input(x_, "normlab::group_norm_backward");
  TORCH_CHECK(grad.sizes() == x_.sizes(), "normlab: grad and input shapes differ");
  const Dims d = dims(x_, G, channels_last, "normlab::group_norm_backward");
  const at::Tensor x = x_.contiguous();
  const at::Tensor dy = grad.to(x.scalar_type()).contiguous();
  const auto acc = acc_dtype(x.scalar_type());
  const auto opts = at::TensorOptions().dtype(acc);
  at::Tensor dx = at::empty_like(x);
  at::Tensor dw = at::zeros({d.C}, opts);
  at::Tensor db = at::zeros({d.C}, opts);
  if (x.numel() == 0) {
    return {dx, dw, db};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "normlab_group_norm_bwd", [&] {
    using A = acc_t<scalar_t>;
    const std::vector<A> wv = param_vec<A>(weight, d.C, A(1));
    const A* w = wv.data();
    if (channels_last) {
      backward_cl<scalar_t>(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                            dx.mutable_data_ptr<scalar_t>(), d.N, d.S, d.C, G, w, eps,
                            dw.mutable_data_ptr<A>(), db.mutable_data_ptr<A>());
    } else {
      backward_cf<scalar_t>(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                            dx.mutable_data_ptr<scalar_t>(), d.N, d.C, d.S, G, w, eps,
                            dw.mutable_data_ptr<A>(), db.mutable_data_ptr<A>());
    }
  });
  return {dx, dw, db};
}

}  // namespace normlab

