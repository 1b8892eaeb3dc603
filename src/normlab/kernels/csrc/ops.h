// The op entry points, defined in pointwise.cpp, rownorm.cpp, groupnorm.cpp and batchnorm.cpp, registered
// for the CPU dispatch key in register.cpp: only that file pays for <torch/library.h>.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace normlab {

using OptTensor = std::optional<at::Tensor>;
using Tensor2 = std::tuple<at::Tensor, at::Tensor>;
using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Tensor4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Tensor5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

at::Tensor dyt(const at::Tensor& x, const at::Tensor& alpha, const OptTensor& weight, const OptTensor& bias,
               int64_t channel_dim);
Tensor4 dyt_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& alpha, const OptTensor& weight,
                     int64_t channel_dim);
at::Tensor derf(const at::Tensor& x, const at::Tensor& alpha, const at::Tensor& shift, const OptTensor& weight,
                const OptTensor& bias, int64_t channel_dim);
Tensor5 derf_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& alpha, const at::Tensor& shift,
                      const OptTensor& weight, int64_t channel_dim);

at::Tensor layer_norm(const at::Tensor& x, int64_t row_size, const OptTensor& weight, const OptTensor& bias,
                      double eps, bool channels_first);
at::Tensor rms_norm(const at::Tensor& x, int64_t row_size, const OptTensor& weight, const OptTensor& bias, double eps,
                    bool eps_inside, bool channels_first);
Tensor2 add_layer_norm(const at::Tensor& x, const at::Tensor& residual, int64_t row_size, const OptTensor& weight,
                       const OptTensor& bias, double eps);
Tensor2 add_rms_norm(const at::Tensor& x, const at::Tensor& residual, int64_t row_size, const OptTensor& weight,
                     const OptTensor& bias, double eps, bool eps_inside);
Tensor3 layer_norm_backward(const at::Tensor& grad, const at::Tensor& x, int64_t row_size, const OptTensor& weight,
                            double eps, const OptTensor& grad_residual, bool channels_first);
Tensor3 rms_norm_backward(const at::Tensor& grad, const at::Tensor& x, int64_t row_size, const OptTensor& weight,
                          double eps, bool eps_inside, const OptTensor& grad_residual, bool channels_first);

at::Tensor group_norm(const at::Tensor& x, int64_t num_groups, const OptTensor& weight, const OptTensor& bias,
                      double eps, bool channels_last);
Tensor3 group_norm_backward(const at::Tensor& grad, const at::Tensor& x, int64_t num_groups, const OptTensor& weight,
                            double eps, bool channels_last);

// BatchNorm training on (N, C, S): returns (y, mean, biased var); batchnorm.cpp.
Tensor3 batch_norm_train(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias, double eps);
Tensor3 batch_norm_train_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,
                                  const at::Tensor& var, const OptTensor& weight, double eps);

}  // namespace normlab
