// Registers the normlab:: operators' CPU kernels and their autograd, in C++.
//
// The schemas, the fake (meta) kernels and the plain-torch gradient ops (*_grad_plain) are
// defined in Python (normlab/kernels/_ops.py) before this library is loaded. Autograd lives here
// rather than in torch.library.register_autograd because the Python wrapper costs ~60 us per
// call, more than the kernel itself on small activations. The backward calls the fused
// *_backward op; with create_graph=True (grad mode on inside the backward) it calls the
// *_grad_plain op instead, a CompositeImplicitAutograd recomputation through plain torch, so
// double backward works.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "ops.h"

namespace normlab {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor opt(const std::optional<at::Tensor>& t) {
  return t.has_value() ? *t : at::Tensor();
}
std::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// A parameter's grad in the parameter's dtype and shape; undefined where there is no parameter.
// (Autograd drops the grads of inputs that do not require one. needs_input_grad() is no help for
// the parameters: it counts edges, and an absent optional tensor has none.)
at::Tensor param_grad(const at::Tensor& g, const at::Tensor& p) {
  if (!p.defined() || !g.defined()) {
    return at::Tensor();
  }
  return g.to(p.scalar_type()).reshape(p.sizes());
}

template <typename Sig>
c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using DytSig = at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, int64_t);
using DytBwdSig = Tensor4(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, int64_t);
using DytPlainSig =
    Tensor4(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, int64_t);
using DerfSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                           const OptTensor&, int64_t);
using DerfBwdSig = Tensor5(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const OptTensor&, int64_t);
using DerfPlainSig = Tensor5(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const OptTensor&, const OptTensor&, int64_t);
using RowSig = at::Tensor(const at::Tensor&, int64_t, const OptTensor&, const OptTensor&, double, bool, bool);
using LnSig = at::Tensor(const at::Tensor&, int64_t, const OptTensor&, const OptTensor&, double, bool);
using AddRowSig =
    Tensor2(const at::Tensor&, const at::Tensor&, int64_t, const OptTensor&, const OptTensor&, double, bool);
using AddLnSig = Tensor2(const at::Tensor&, const at::Tensor&, int64_t, const OptTensor&, const OptTensor&, double);
using RowBwdSig =
    Tensor3(const at::Tensor&, const at::Tensor&, int64_t, const OptTensor&, double, bool, const OptTensor&, bool);
using LnBwdSig =
    Tensor3(const at::Tensor&, const at::Tensor&, int64_t, const OptTensor&, double, const OptTensor&, bool);
using RowPlainSig = Tensor3(const at::Tensor&, const at::Tensor&, int64_t, const OptTensor&, const OptTensor&, double,
                            bool, bool, bool);
using GnSig = at::Tensor(const at::Tensor&, int64_t, const OptTensor&, const OptTensor&, double, bool);
using GnBwdSig = Tensor3(const at::Tensor&, const at::Tensor&, int64_t, const OptTensor&, double, bool);
using GnPlainSig =
    Tensor3(const at::Tensor&, const at::Tensor&, int64_t, const OptTensor&, const OptTensor&, double, bool);
using BnSig = Tensor3(const at::Tensor&, const OptTensor&, const OptTensor&, double);
using BnBwdSig =
    Tensor3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, double);
using BnPlainSig = Tensor3(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, double);

// ---- DyT / Derf --------------------------------------------------------------------------------

struct DytFn : public torch::autograd::Function<DytFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& alpha,
                            const OptTensor& weight, const OptTensor& bias, int64_t channel_dim) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = handle<DytSig>("normlab::dyt");
    ctx->save_for_backward({x, alpha, opt(weight), opt(bias)});
    ctx->saved_data["channel_dim"] = channel_dim;
    return op.call(x, alpha, weight, bias, channel_dim);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const int64_t cd = ctx->saved_data["channel_dim"].toInt();
    at::Tensor dx, da, dw, db;
    if (at::GradMode::is_enabled()) {
      static auto op = handle<DytPlainSig>("normlab::dyt_grad_plain");
      std::tie(dx, da, dw, db) = op.call(grads[0], s[0], s[1], opt(s[2]), opt(s[3]), cd);
    } else {
      static auto op = handle<DytBwdSig>("normlab::dyt_backward");
      std::tie(dx, da, dw, db) = op.call(grads[0], s[0], s[1], opt(s[2]), cd);
    }
    return {ctx->needs_input_grad(0) ? dx : at::Tensor(), param_grad(da, s[1]),
            param_grad(dw, s[2]), param_grad(db, s[3]),
            at::Tensor()};
  }
};

struct DerfFn : public torch::autograd::Function<DerfFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& alpha,
                            const at::Tensor& shift, const OptTensor& weight, const OptTensor& bias,
                            int64_t channel_dim) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = handle<DerfSig>("normlab::derf");
    ctx->save_for_backward({x, alpha, shift, opt(weight), opt(bias)});
    ctx->saved_data["channel_dim"] = channel_dim;
    return op.call(x, alpha, shift, weight, bias, channel_dim);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const int64_t cd = ctx->saved_data["channel_dim"].toInt();
    at::Tensor dx, da, ds, dw, db;
    if (at::GradMode::is_enabled()) {
      static auto op = handle<DerfPlainSig>("normlab::derf_grad_plain");
      std::tie(dx, da, ds, dw, db) = op.call(grads[0], s[0], s[1], s[2], opt(s[3]), opt(s[4]), cd);
    } else {
      static auto op = handle<DerfBwdSig>("normlab::derf_backward");
      std::tie(dx, da, ds, dw, db) = op.call(grads[0], s[0], s[1], s[2], opt(s[3]), cd);
    }
    return {ctx->needs_input_grad(0) ? dx : at::Tensor(), param_grad(da, s[1]),
            param_grad(ds, s[2]), param_grad(dw, s[3]),
            param_grad(db, s[4]), at::Tensor()};
  }
};

// ---- row norms, with or without the residual add ----------------------------------------------

// Backward of a row norm of the saved input h (x, or x + residual), plus grad_h for the add.
Tensor3 row_backward(bool layer, const at::Tensor& grad, const at::Tensor& h, int64_t row_size, const at::Tensor& w,
                     const at::Tensor& b, double eps, bool eps_inside, const at::Tensor& grad_h, bool channels_first) {
  at::Tensor dx, dw, db;
  if (at::GradMode::is_enabled()) {
    static auto op = handle<RowPlainSig>("normlab::row_norm_grad_plain");
    std::tie(dx, dw, db) = op.call(grad, h, row_size, opt(w), opt(b), eps, eps_inside, layer, channels_first);
    if (grad_h.defined()) {
      dx = dx.add(grad_h);
    }
  } else if (layer) {
    static auto op = handle<LnBwdSig>("normlab::layer_norm_backward");
    std::tie(dx, dw, db) = op.call(grad, h, row_size, opt(w), eps, opt(grad_h), channels_first);
  } else {
    static auto op = handle<RowBwdSig>("normlab::rms_norm_backward");
    std::tie(dx, dw, db) = op.call(grad, h, row_size, opt(w), eps, eps_inside, opt(grad_h), channels_first);
  }
  return {dx, dw, db};
}

template <bool kLayer>
struct RowFn : public torch::autograd::Function<RowFn<kLayer>> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t row_size, const OptTensor& weight,
                            const OptTensor& bias, double eps, bool eps_inside, bool channels_first) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, opt(weight), opt(bias)});
    ctx->saved_data["row_size"] = row_size;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["eps_inside"] = eps_inside;
    ctx->saved_data["channels_first"] = channels_first;
    if constexpr (kLayer) {
      static auto op = handle<LnSig>("normlab::layer_norm");
      return op.call(x, row_size, weight, bias, eps, channels_first);
    } else {
      static auto op = handle<RowSig>("normlab::rms_norm");
      return op.call(x, row_size, weight, bias, eps, eps_inside, channels_first);
    }
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    auto [dx, dw, db] = row_backward(kLayer, grads[0], s[0], ctx->saved_data["row_size"].toInt(), s[1], s[2],
                                     ctx->saved_data["eps"].toDouble(), ctx->saved_data["eps_inside"].toBool(),
                                     at::Tensor(), ctx->saved_data["channels_first"].toBool());
    return {ctx->needs_input_grad(0) ? dx : at::Tensor(), at::Tensor(), param_grad(dw, s[1]),
            param_grad(db, s[2]), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

template <bool kLayer>
struct AddRowFn : public torch::autograd::Function<AddRowFn<kLayer>> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& residual,
                               int64_t row_size, const OptTensor& weight, const OptTensor& bias, double eps,
                               bool eps_inside) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor y, h;
    if constexpr (kLayer) {
      static auto op = handle<AddLnSig>("normlab::add_layer_norm");
      std::tie(y, h) = op.call(x, residual, row_size, weight, bias, eps);
    } else {
      static auto op = handle<AddRowSig>("normlab::add_rms_norm");
      std::tie(y, h) = op.call(x, residual, row_size, weight, bias, eps, eps_inside);
    }
    ctx->save_for_backward({h, opt(weight), opt(bias)});
    ctx->saved_data["row_size"] = row_size;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["eps_inside"] = eps_inside;
    return {y, h};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    auto [dh, dw, db] = row_backward(kLayer, grads[0], s[0], ctx->saved_data["row_size"].toInt(), s[1], s[2],
                                     ctx->saved_data["eps"].toDouble(), ctx->saved_data["eps_inside"].toBool(),
                                     grads[1], false);
    // d(x + residual): the same gradient reaches both summands, as torch's add returns it.
    return {ctx->needs_input_grad(0) ? dh : at::Tensor(), ctx->needs_input_grad(1) ? dh : at::Tensor(), at::Tensor(),
            param_grad(dw, s[1]), param_grad(db, s[2]),
            at::Tensor(), at::Tensor()};
  }
};

// ---- GroupNorm ----------------------------------------------------------------------------------

struct GroupFn : public torch::autograd::Function<GroupFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t groups, const OptTensor& weight,
                            const OptTensor& bias, double eps, bool channels_last) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = handle<GnSig>("normlab::group_norm");
    ctx->save_for_backward({x, opt(weight), opt(bias)});
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["channels_last"] = channels_last;
    return op.call(x, groups, weight, bias, eps, channels_last);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const int64_t groups = ctx->saved_data["groups"].toInt();
    const double eps = ctx->saved_data["eps"].toDouble();
    const bool cl = ctx->saved_data["channels_last"].toBool();
    at::Tensor dx, dw, db;
    if (at::GradMode::is_enabled()) {
      static auto op = handle<GnPlainSig>("normlab::group_norm_grad_plain");
      std::tie(dx, dw, db) = op.call(grads[0], s[0], groups, opt(s[1]), opt(s[2]), eps, cl);
    } else {
      static auto op = handle<GnBwdSig>("normlab::group_norm_backward");
      std::tie(dx, dw, db) = op.call(grads[0], s[0], groups, opt(s[1]), eps, cl);
    }
    return {ctx->needs_input_grad(0) ? dx : at::Tensor(), at::Tensor(), param_grad(dw, s[1]),
            param_grad(db, s[2]), at::Tensor(), at::Tensor()};
  }
};

// ---- BatchNorm (training) --------------------------------------------------------------------

// Outputs (y, mean, var): only y carries a gradient; the statistics feed the running update.
struct BatchFn : public torch::autograd::Function<BatchFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const OptTensor& weight,
                               const OptTensor& bias, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = handle<BnSig>("normlab::batch_norm_train");
    auto [y, mean, var] = op.call(x, weight, bias, eps);
    ctx->save_for_backward({x, opt(weight), opt(bias), mean, var});
    ctx->saved_data["eps"] = eps;
    ctx->mark_non_differentiable({mean, var});
    return {y, mean, var};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const double eps = ctx->saved_data["eps"].toDouble();
    at::Tensor dx, dw, db;
    if (at::GradMode::is_enabled()) {
      static auto op = handle<BnPlainSig>("normlab::batch_norm_train_grad_plain");
      std::tie(dx, dw, db) = op.call(grads[0], s[0], opt(s[1]), opt(s[2]), eps);
    } else {
      static auto op = handle<BnBwdSig>("normlab::batch_norm_train_backward");
      std::tie(dx, dw, db) = op.call(grads[0], s[0], s[3], s[4], opt(s[1]), eps);
    }
    return {ctx->needs_input_grad(0) ? dx : at::Tensor(), param_grad(dw, s[1]), param_grad(db, s[2]),
            at::Tensor()};
  }
};

at::Tensor dyt_autograd(const at::Tensor& x, const at::Tensor& alpha, const OptTensor& weight, const OptTensor& bias,
                        int64_t channel_dim) {
  return DytFn::apply(x, alpha, weight, bias, channel_dim);
}
at::Tensor derf_autograd(const at::Tensor& x, const at::Tensor& alpha, const at::Tensor& shift,
                         const OptTensor& weight, const OptTensor& bias, int64_t channel_dim) {
  return DerfFn::apply(x, alpha, shift, weight, bias, channel_dim);
}
at::Tensor layer_norm_autograd(const at::Tensor& x, int64_t row_size, const OptTensor& weight, const OptTensor& bias,
                               double eps, bool channels_first) {
  return RowFn<true>::apply(x, row_size, weight, bias, eps, true, channels_first);
}
at::Tensor rms_norm_autograd(const at::Tensor& x, int64_t row_size, const OptTensor& weight, const OptTensor& bias,
                             double eps, bool eps_inside, bool channels_first) {
  return RowFn<false>::apply(x, row_size, weight, bias, eps, eps_inside, channels_first);
}
Tensor2 add_layer_norm_autograd(const at::Tensor& x, const at::Tensor& residual, int64_t row_size,
                                const OptTensor& weight, const OptTensor& bias, double eps) {
  auto out = AddRowFn<true>::apply(x, residual, row_size, weight, bias, eps, true);
  return {out[0], out[1]};
}
Tensor2 add_rms_norm_autograd(const at::Tensor& x, const at::Tensor& residual, int64_t row_size,
                              const OptTensor& weight, const OptTensor& bias, double eps, bool eps_inside) {
  auto out = AddRowFn<false>::apply(x, residual, row_size, weight, bias, eps, eps_inside);
  return {out[0], out[1]};
}
at::Tensor group_norm_autograd(const at::Tensor& x, int64_t groups, const OptTensor& weight, const OptTensor& bias,
                               double eps, bool channels_last) {
  return GroupFn::apply(x, groups, weight, bias, eps, channels_last);
}
Tensor3 batch_norm_train_autograd(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias, double eps) {
  auto out = BatchFn::apply(x, weight, bias, eps);
  return {out[0], out[1], out[2]};
}

}  // namespace
}  // namespace normlab

TORCH_LIBRARY_IMPL(normlab, CPU, m) {
  m.impl("dyt", &normlab::dyt);
  m.impl("dyt_backward", &normlab::dyt_backward);
  m.impl("derf", &normlab::derf);
  m.impl("derf_backward", &normlab::derf_backward);
  m.impl("layer_norm", &normlab::layer_norm);
  m.impl("layer_norm_backward", &normlab::layer_norm_backward);
  m.impl("rms_norm", &normlab::rms_norm);
  m.impl("rms_norm_backward", &normlab::rms_norm_backward);
  m.impl("add_layer_norm", &normlab::add_layer_norm);
  m.impl("add_rms_norm", &normlab::add_rms_norm);
  m.impl("group_norm", &normlab::group_norm);
  m.impl("group_norm_backward", &normlab::group_norm_backward);
  m.impl("batch_norm_train", &normlab::batch_norm_train);
  m.impl("batch_norm_train_backward", &normlab::batch_norm_train_backward);
}

// AutogradCPU, not Autograd: CUDA tensors get their autograd from Python (normlab/kernels/_gpu.py),
// so the Triton kernels work where this library is not built.
TORCH_LIBRARY_IMPL(normlab, AutogradCPU, m) {
  m.impl("dyt", &normlab::dyt_autograd);
  m.impl("derf", &normlab::derf_autograd);
  m.impl("layer_norm", &normlab::layer_norm_autograd);
  m.impl("rms_norm", &normlab::rms_norm_autograd);
  m.impl("add_layer_norm", &normlab::add_layer_norm_autograd);
  m.impl("add_rms_norm", &normlab::add_rms_norm_autograd);
  m.impl("group_norm", &normlab::group_norm_autograd);
  m.impl("batch_norm_train", &normlab::batch_norm_train_autograd);
}
