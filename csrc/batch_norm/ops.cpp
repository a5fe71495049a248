// The batch-norm ops: their schemas and device-independent implementations (argument checks before any buffer is
// touched, layout, allocation, and the sequence of backend kernels). cpu/ and cuda/ register this file's
// implementations with a Backend of their kernels; autograd/ registers the ops' backward.
#include "ops.h"

#include <ATen/ATen.h>

#include <array>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>

namespace fusedbn {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

std::array<const Backend*, static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)> g_backends{};

const Backend& backend_for(const Tensor& t) {
  const Backend* b = g_backends[static_cast<size_t>(t.device().type())];
  TORCH_CHECK(b != nullptr, "fusedbn: no kernels for device ", t.device(),
              " (was fusedbn built with CUDA support? see fusedbn.cuda_available())");
  return *b;
}

Tensor value_or_undefined(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }

// ---- argument checks ----------------------------------------------------------------------------------
// Every check of an op's arguments is here, run before any buffer is touched; the Python layer checks only its own
// options. Messages name the argument and what was expected, in Python's terms (torch.float32, (C,)).

// A dtype as Python prints it.
std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return "torch.float64";
    case at::kFloat: return "torch.float32";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// A shape as Python prints it.
std::string shape_name(at::IntArrayRef sizes) {
  std::string s = "(";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + (sizes.size() == 1 ? ",)" : ")");
}

void check_input(const Tensor& input, const char* name = "input") {
  TORCH_CHECK_VALUE(input.dim() == 4, "fusedbn: expected 4D ", name, " (got ", input.dim(), "D ", name, ")");
  const auto t = input.scalar_type();
  TORCH_CHECK_TYPE(t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16, "fusedbn: ", name,
                   " must be float64, float32, float16 or bfloat16, got ", dtype_name(t));
}

// A 1-D tensor of one value per channel, on `device` (where `owner`, what it belongs with, is).
void check_per_channel(const Tensor& t, const char* name, int64_t channels, const c10::Device& device,
                       const char* owner) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == channels, "fusedbn: ", name, " must have shape (", channels,
                    ",), one value per channel, got ", shape_name(t.sizes()));
  TORCH_CHECK_VALUE(t.device() == device, "fusedbn: ", name, " is on ", t.device(), " but ", owner, " is on ",
                    device);
}

// Per-channel tensors have C elements and the input's dtype, or float32 when the input is float16/bfloat16
// (parameters and statistics kept in float32, as nn.BatchNorm2d allows).
void check_channel_tensor(const Tensor& t, const char* name, const Tensor& input) {
  if (!t.defined()) return;
  check_per_channel(t, name, input.size(1), input.device(), "input");
  const bool low_precision = input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16;
  TORCH_CHECK_TYPE(t.scalar_type() == input.scalar_type() || (low_precision && t.scalar_type() == at::kFloat),
                   "fusedbn: ", name, " must have dtype ", dtype_name(input.scalar_type()),
                   low_precision ? " or torch.float32" : "", " to match the input, got ", dtype_name(t.scalar_type()));
}

// Statistics to normalise with or to update (the running statistics, or the mean and var given to normalize): both
// or neither, per-channel, never requiring grad (they are constants of the batch norm, or buffers updated in place).
void check_statistics_in(const Tensor& mean, const Tensor& var, const Tensor& input,
                         const char* mean_name = "running_mean", const char* var_name = "running_var") {
  TORCH_CHECK_VALUE(mean.defined() == var.defined(), "fusedbn: ", mean_name, " and ", var_name,
                    " must both be tensors or both be None");
  for (const auto& [t, name] : {std::pair<const Tensor&, const char*>{mean, mean_name}, {var, var_name}}) {
    check_channel_tensor(t, name, input);
    TORCH_CHECK_VALUE(!t.defined() || !t.requires_grad(), "fusedbn: ", name,
                      " must not require grad: batch norm takes its statistics as constants");
  }
}

void check_like_input(const Tensor& t, const char* name, const Tensor& input) {
  if (!t.defined()) return;
  TORCH_CHECK_VALUE(t.sizes() == input.sizes() && t.scalar_type() == input.scalar_type() &&
                        t.device() == input.device(),
                    "fusedbn: ", name, " must match the input's shape ", shape_name(input.sizes()), ", dtype ",
                    dtype_name(input.scalar_type()), " and device ", input.device(), ", got ",
                    shape_name(t.sizes()), ", ", dtype_name(t.scalar_type()), ", ", t.device());
}

// nn's rule and wording (torch.nn.functional.batch_norm): eps > 0 where batch statistics are computed, eps >= 0
// where given statistics are used; infinity is refused too.
void check_eps(double eps, bool batch_statistics) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && (batch_statistics ? eps > 0 : eps >= 0), "fusedbn: batch_norm eps must be ",
                    batch_statistics ? "positive during training" : "non-negative", " (and finite), but got ", eps);
}

// The operands every normalising op takes: the input, the statistics it reads or updates (where given, with their
// names), and the weight, bias and residual where given; in the order of F.batch_norm's arguments.
void check_operands(const Tensor& input, const Tensor& weight, const Tensor& bias, const Tensor& residual,
                    const Tensor& mean = {}, const Tensor& var = {}, const char* mean_name = "running_mean",
                    const char* var_name = "running_var") {
  check_input(input);
  check_statistics_in(mean, var, input, mean_name, var_name);
  check_channel_tensor(weight, "weight", input);
  check_channel_tensor(bias, "bias", input);
  check_like_input(residual, "residual", input);
}

// mean and invstd as the forward ops return them (one value per channel).
void check_saved_statistics(const Tensor& mean, const Tensor& invstd, const Tensor& input) {
  TORCH_CHECK_VALUE(mean.dim() == 1 && mean.size(0) == input.size(1) && invstd.sizes() == mean.sizes(),
                    "fusedbn: mean and invstd must be 1-D tensors of ", input.size(1), " elements");
}

void check_finite_nonnegative(double v, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(v) && v >= 0, "fusedbn: ", name, " must be a finite number >= 0, got ", v);
}

// ---- layout -------------------------------------------------------------------------------------------

// The dense format the kernels work in, and that outputs and gradients are returned in.
at::MemoryFormat layout_format(const Tensor& x) {
  if (x.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (x.is_contiguous(at::MemoryFormat::ChannelsLast)) return at::MemoryFormat::ChannelsLast;
  return x.suggest_memory_format();
}

Layout make_layout(const Tensor& x, at::MemoryFormat format) {
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  return format == at::MemoryFormat::ChannelsLast ? Layout{N * HW, C, 1} : Layout{N, C, HW};
}

at::ScalarType stats_dtype(const Tensor& input) {
  return input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// FUSEDBN_POISON_OUTPUTS=1 fills every output with NaN before the kernels write it (used by the tests to
// catch an element that a kernel forgets to write).
Tensor poisoned(Tensor t) {
  static const bool poison = std::getenv("FUSEDBN_POISON_OUTPUTS") != nullptr;
  if (poison && t.numel() > 0) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

Tensor channel_empty(const Tensor& input) {
  return poisoned(at::empty({input.size(1)}, input.options().dtype(stats_dtype(input))));
}

Tensor dense(const Tensor& t, at::MemoryFormat format) { return t.defined() ? t.contiguous(format) : t; }

// Outputs get canonical strides in `format` (what the fake kernels promise), whatever the input's strides.
Tensor empty_in_format(const Tensor& x, at::MemoryFormat format) {
  return poisoned(at::empty(x.sizes(), x.options().memory_format(format)));
}

// The running-statistics update's arguments (other than the running statistics' own checks), checked before any
// buffer changes.
void check_running_update(const Tensor& nbt, int64_t count, std::optional<double> momentum) {
  TORCH_CHECK_VALUE(count >= 2, "fusedbn: the unbiased variance needs count >= 2, got ", count);
  TORCH_CHECK_VALUE(!momentum.has_value() || std::isfinite(*momentum),
                    "fusedbn: momentum must be a finite number or None, got ", momentum.value_or(0));
  TORCH_CHECK_VALUE(momentum.has_value() || nbt.defined(),
                    "fusedbn: momentum=None (cumulative average) needs num_batches_tracked");
  if (nbt.defined()) {
    TORCH_CHECK_TYPE(nbt.scalar_type() == at::kLong && nbt.numel() == 1,
                     "fusedbn: num_batches_tracked must be a one-element int64 tensor");
  }
}

// momentum=None (cumulative average) reaches the kernels as NaN, which no valid momentum is.
double kernel_momentum(std::optional<double> momentum) {
  return momentum.value_or(std::numeric_limits<double>::quiet_NaN());
}

// ---- forward ------------------------------------------------------------------------------------------

// The checks of forward_train (batch_stats) or normalize, for callers that decide not to run either: an empty batch,
// a batch norm folded into a conv, a synchronised batch norm before its collective.
void check_batch_norm(const Tensor& input, const OptTensor& weight, const OptTensor& bias, const OptTensor& residual,
                      const OptTensor& running_mean, const OptTensor& running_var, double eps, bool batch_stats) {
  check_operands(input, value_or_undefined(weight), value_or_undefined(bias), value_or_undefined(residual),
                 value_or_undefined(running_mean), value_or_undefined(running_var));
  check_eps(eps, batch_stats);
}

std::tuple<Tensor, Tensor> batch_stats(const Tensor& input) {
  check_input(input);
  const auto format = layout_format(input);
  const Tensor x = input.contiguous(format);
  Tensor mean = channel_empty(x), m2 = channel_empty(x);
  backend_for(x).batch_moments(x, make_layout(x, format), mean, m2);
  return {mean, m2};
}

// The training forward. When running_mean and running_var are given, they (and num_batches_tracked) are updated
// in place after the output is computed, skipped where the batch statistics are not finite; `updated` says whether
// they were (false when none were given).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> forward_train(
    const Tensor& input, const OptTensor& weight_opt, const OptTensor& bias_opt, const OptTensor& residual_opt,
    const OptTensor& prior_mean_opt, const OptTensor& prior_var_opt, double prior_count, double eps,
    c10::string_view activation, double negative_slope, const OptTensor& running_mean_opt,
    const OptTensor& running_var_opt, const OptTensor& num_batches_tracked_opt, std::optional<double> momentum) {
  const Tensor weight = value_or_undefined(weight_opt), bias = value_or_undefined(bias_opt);
  const Tensor residual = value_or_undefined(residual_opt);
  const Tensor prior_mean = value_or_undefined(prior_mean_opt), prior_var = value_or_undefined(prior_var_opt);
  Tensor running_mean = value_or_undefined(running_mean_opt), running_var = value_or_undefined(running_var_opt);
  Tensor nbt = value_or_undefined(num_batches_tracked_opt);
  check_operands(input, weight, bias, residual, running_mean, running_var);
  check_statistics_in(prior_mean, prior_var, input, "prior_mean", "prior_var");
  check_eps(eps, true);
  check_finite_nonnegative(prior_count, "prior_count");
  TORCH_CHECK_VALUE(prior_count == 0 || (prior_mean.defined() && prior_var.defined()),
                    "fusedbn: prior_count > 0 needs prior_mean and prior_var");
  const Activation act = parse_activation(std::string(activation));
  const int64_t count = input.size(0) * input.size(2) * input.size(3);
  const bool update = running_mean.defined() || running_var.defined();
  if (update) {
    check_running_update(nbt, count, momentum);
  }

  const auto format = layout_format(input);
  const Tensor x = input.contiguous(format), z = dense(residual, format);
  const Layout layout = make_layout(x, format);
  const Backend& backend = backend_for(x);
  Tensor batch_mean = channel_empty(x), batch_m2 = channel_empty(x);
  Tensor mean = channel_empty(x), invstd = channel_empty(x);
  Tensor output = empty_in_format(x, format);
  const NormInputs in{x, z, mean, invstd, weight, bias, layout, act, negative_slope};
  const bool fused = backend.forward_train_fused != nullptr &&
                     backend.forward_train_fused(in, prior_mean, prior_var, prior_count, eps, batch_mean, batch_m2,
                                                 output);
  if (!fused) {
    backend.batch_moments(x, layout, batch_mean, batch_m2);
    backend.batch_norm_stats(batch_mean, batch_m2, layout.count_per_channel(), prior_mean, prior_var,
                             prior_count, eps, mean, invstd);
    backend.normalize(in, output);
  }
  Tensor updated = at::empty({}, batch_mean.options().dtype(at::kBool));
  if (update) {
    backend.update_running_stats(running_mean, running_var, nbt, batch_mean, batch_m2, count,
                                 kernel_momentum(momentum), updated);
  } else {
    updated.fill_(false);
  }
  return {output, mean, invstd, batch_mean, batch_m2, updated};
}

std::tuple<Tensor, Tensor, Tensor> normalize(const Tensor& input, const OptTensor& weight_opt,
                                             const OptTensor& bias_opt, const OptTensor& residual_opt,
                                             const Tensor& mean_in, const Tensor& var_in, double eps,
                                             c10::string_view activation, double negative_slope) {
  const Tensor weight = value_or_undefined(weight_opt), bias = value_or_undefined(bias_opt);
  const Tensor residual = value_or_undefined(residual_opt);
  check_operands(input, weight, bias, residual, mean_in, var_in, "mean", "var");
  check_eps(eps, false);
  const Activation act = parse_activation(std::string(activation));

  const auto format = layout_format(input);
  const Tensor x = input.contiguous(format), z = dense(residual, format);
  const Layout layout = make_layout(x, format);
  const Backend& backend = backend_for(x);
  Tensor mean = channel_empty(x), invstd = channel_empty(x);
  backend.fixed_norm_stats(mean_in, var_in, eps, mean, invstd);
  Tensor output = empty_in_format(x, format);
  backend.normalize({x, z, mean, invstd, weight, bias, layout, act, negative_slope}, output);
  return {output, mean, invstd};
}

// The output of forward_train or normalize computed again from the mean and invstd they returned: the same kernel
// on the same inputs, so the same bits. Lets a saved activation be dropped and rebuilt in the backward pass.
Tensor renormalize(const Tensor& input, const OptTensor& weight_opt, const OptTensor& bias_opt,
                   const OptTensor& residual_opt, const Tensor& mean, const Tensor& invstd,
                   c10::string_view activation, double negative_slope) {
  const Tensor weight = value_or_undefined(weight_opt), bias = value_or_undefined(bias_opt);
  const Tensor residual = value_or_undefined(residual_opt);
  check_operands(input, weight, bias, residual);
  check_saved_statistics(mean, invstd, input);
  TORCH_CHECK_TYPE(mean.scalar_type() == stats_dtype(input) && invstd.scalar_type() == stats_dtype(input),
                   "fusedbn: mean and invstd must have dtype ", stats_dtype(input), " (as the forward returns them)");
  const Activation act = parse_activation(std::string(activation));
  const auto format = layout_format(input);
  const Tensor x = input.contiguous(format), z = dense(residual, format);
  Tensor output = empty_in_format(x, format);
  backend_for(x).normalize({x, z, mean.contiguous(), invstd.contiguous(), weight, bias, make_layout(x, format), act,
                            negative_slope},
                           output);
  return output;
}

Tensor update_running_stats(Tensor& running_mean, Tensor& running_var, const OptTensor& num_batches_tracked_opt,
                            const Tensor& batch_mean, const Tensor& batch_m2, int64_t count,
                            std::optional<double> momentum) {
  Tensor nbt = value_or_undefined(num_batches_tracked_opt);
  TORCH_CHECK_VALUE(batch_mean.dim() == 1 && batch_m2.sizes() == batch_mean.sizes(),
                    "fusedbn: batch_mean and batch_m2 must be 1-D tensors of the same size");
  for (const auto& [t, name] : {std::pair<const Tensor&, const char*>{running_mean, "running_mean"},
                                {running_var, "running_var"}}) {
    check_per_channel(t, name, batch_mean.size(0), batch_mean.device(), "batch_mean");
    TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), "fusedbn: ", name, " must be floating point, got ",
                     dtype_name(t.scalar_type()));
  }
  check_running_update(nbt, count, momentum);
  Tensor updated = at::empty({}, batch_mean.options().dtype(at::kBool));
  backend_for(batch_mean).update_running_stats(running_mean, running_var, nbt, batch_mean, batch_m2, count,
                                                kernel_momentum(momentum), updated);
  return updated;
}

// ---- backward -----------------------------------------------------------------------------------------

struct BackwardArgs {
  at::MemoryFormat format;
  Tensor dy, x, z;
  Layout layout;
  Activation act;
};

BackwardArgs prepare_backward(const Tensor& grad_output, const Tensor& input, const Tensor& residual,
                              const Tensor& mean, const Tensor& invstd, const Tensor& weight, const Tensor& bias,
                              c10::string_view activation) {
  check_operands(input, weight, bias, residual);
  check_like_input(grad_output, "grad_output", input);
  check_saved_statistics(mean, invstd, input);
  const auto format = layout_format(input);
  const Tensor x = input.contiguous(format);
  return {format, grad_output.contiguous(format), x, dense(residual, format), make_layout(x, format),
          parse_activation(std::string(activation))};
}

// dz = g is a separate output only when the activation masks it; with the identity it equals grad_output.
Tensor grad_residual_like(const BackwardArgs& a) {
  return a.z.defined() && a.act != Activation::Identity ? empty_in_format(a.x, a.format) : Tensor();
}

Tensor or_empty(const Tensor& t, const Tensor& like) { return t.defined() ? t : at::empty({0}, like.options()); }

// A parameter's gradient in the parameter's dtype (the statistics' dtype where there is no parameter).
Tensor in_dtype_of(const Tensor& grad, const Tensor& parameter, const Tensor& invstd) {
  return grad.to(parameter.defined() ? parameter.scalar_type() : invstd.scalar_type());
}

// The reduction of the backward: Σg and Σg·(x − mean), and from them the weight gradient Σg·(x − mean)·invstd (in the
// weight's dtype). A synchronised batch norm all-reduces the two sums before backward_elemt.
std::tuple<Tensor, Tensor, Tensor> backward_reduce(const Tensor& grad_output, const Tensor& input,
                                                   const OptTensor& residual, const Tensor& mean, const Tensor& invstd,
                                                   const OptTensor& weight, const OptTensor& bias,
                                                   c10::string_view activation, double negative_slope) {
  const Tensor w = value_or_undefined(weight), b = value_or_undefined(bias);
  const auto a = prepare_backward(grad_output, input, value_or_undefined(residual), mean, invstd, w, b, activation);
  GradSums sums{channel_empty(a.x), channel_empty(a.x), channel_empty(a.x)};
  backend_for(a.x).backward_reduce({a.x, a.z, mean, invstd, w, b, a.layout, a.act, negative_slope}, a.dy, sums);
  return {sums.sum_dy, sums.sum_dy_xmu, in_dtype_of(sums.grad_weight, w, invstd)};
}

std::tuple<Tensor, Tensor> backward_elemt(const Tensor& grad_output, const Tensor& input, const OptTensor& residual,
                                          const Tensor& mean, const Tensor& invstd, const OptTensor& weight,
                                          const OptTensor& bias, const Tensor& sum_dy, const Tensor& sum_dy_xmu,
                                          double count, c10::string_view activation, double negative_slope) {
  const Tensor w = value_or_undefined(weight), b = value_or_undefined(bias);
  const auto a = prepare_backward(grad_output, input, value_or_undefined(residual), mean, invstd, w, b, activation);
  TORCH_CHECK_VALUE(sum_dy.sizes() == mean.sizes() && sum_dy_xmu.sizes() == mean.sizes(),
                    "fusedbn: sum_dy and sum_dy_xmu must have one element per channel");
  TORCH_CHECK_VALUE(count > 0, "fusedbn: count must be positive, got ", count);
  Tensor grad_input = empty_in_format(a.x, a.format), grad_residual = grad_residual_like(a);
  backend_for(a.x).backward_elemt({a.x, a.z, mean, invstd, w, b, a.layout, a.act, negative_slope}, a.dy,
                                  GradSums{sum_dy, sum_dy_xmu}, count, grad_input, grad_residual);
  return {grad_input, or_empty(grad_residual, a.x)};
}

// Fused backward of forward_train (count = the number of values the statistics came from, possibly
// including prior pseudo-samples) or of normalize (count = None: statistics are constants).
// grad_weight = Σg·(x − mean)·invstd and grad_bias = Σg are empty when neither they nor the batch
// statistics need the reduction.
std::tuple<Tensor, Tensor, Tensor, Tensor> backward(const Tensor& grad_output, const Tensor& input,
                                                    const OptTensor& residual, const Tensor& mean,
                                                    const Tensor& invstd, const OptTensor& weight,
                                                    const OptTensor& bias, std::optional<double> count,
                                                    c10::string_view activation, double negative_slope) {
  const Tensor w = value_or_undefined(weight), b = value_or_undefined(bias);
  const auto a = prepare_backward(grad_output, input, value_or_undefined(residual), mean, invstd, w, b, activation);
  TORCH_CHECK_VALUE(!count.has_value() || *count > 0, "fusedbn: count must be positive, got ", count.value_or(0));
  const Backend& backend = backend_for(a.x);
  const NormInputs in{a.x, a.z, mean, invstd, w, b, a.layout, a.act, negative_slope};
  GradSums sums;
  Tensor grad_input = empty_in_format(a.x, a.format), grad_residual = grad_residual_like(a);
  if (count.has_value() || w.defined() || b.defined()) {
    sums = {channel_empty(a.x), channel_empty(a.x), channel_empty(a.x)};
    const bool fused = backend.backward_fused != nullptr &&
                       backend.backward_fused(in, a.dy, sums, count, grad_input, grad_residual);
    if (!fused) {
      backend.backward_reduce(in, a.dy, sums);
      backend.backward_elemt(in, a.dy, count.has_value() ? sums : GradSums{}, count.value_or(1.0), grad_input,
                             grad_residual);
    }
  } else {
    backend.backward_elemt(in, a.dy, GradSums{}, 1.0, grad_input, grad_residual);
  }
  Tensor grad_weight, grad_bias;
  if (sums.sum_dy.defined()) {
    grad_weight = in_dtype_of(sums.grad_weight, w, invstd);
    grad_bias = in_dtype_of(sums.sum_dy, b, invstd);
  }
  return {grad_input, or_empty(grad_residual, a.x), or_empty(grad_weight, invstd), or_empty(grad_bias, invstd)};
}

}  // namespace

void register_backend(c10::DeviceType device, const Backend* backend) {
  g_backends[static_cast<size_t>(device)] = backend;
}

void impl_all_ops(torch::Library& m) {
  m.impl("check_batch_norm", &check_batch_norm);
  m.impl("batch_stats", &batch_stats);
  m.impl("forward_train", &forward_train);
  m.impl("normalize", &normalize);
  m.impl("renormalize", &renormalize);
  m.impl("update_running_stats", &update_running_stats);
  m.impl("backward_reduce", &backward_reduce);
  m.impl("backward_elemt", &backward_elemt);
  m.impl("backward", &backward);
}

}  // namespace fusedbn

// The batch-norm family of fusedbn's ops (the library itself is declared in csrc/library.cpp).
TORCH_LIBRARY_FRAGMENT(fusedbn, m) {
  m.def(
      "check_batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor? residual, Tensor? running_mean, "
      "Tensor? running_var, float eps, bool batch_stats) -> ()");
  m.def("batch_stats(Tensor input) -> (Tensor mean, Tensor m2)");
  m.def(
      "forward_train(Tensor input, Tensor? weight, Tensor? bias, Tensor? residual, Tensor? prior_mean, "
      "Tensor? prior_var, float prior_count, float eps, str activation, float negative_slope, "
      "Tensor(a!)? running_mean=None, Tensor(b!)? running_var=None, Tensor(c!)? num_batches_tracked=None, "
      "float? momentum=0.1) "
      "-> (Tensor output, Tensor mean, Tensor invstd, Tensor batch_mean, Tensor batch_m2, Tensor updated)");
  m.def(
      "normalize(Tensor input, Tensor? weight, Tensor? bias, Tensor? residual, Tensor mean, Tensor var, "
      "float eps, str activation, float negative_slope) -> (Tensor output, Tensor mean_out, Tensor invstd)");
  m.def(
      "renormalize(Tensor input, Tensor? weight, Tensor? bias, Tensor? residual, Tensor mean, Tensor invstd, "
      "str activation, float negative_slope) -> Tensor");
  m.def(
      "update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor(c!)? num_batches_tracked, "
      "Tensor batch_mean, Tensor batch_m2, int count, float? momentum) -> Tensor");
  m.def(
      "backward_reduce(Tensor grad_output, Tensor input, Tensor? residual, Tensor mean, Tensor invstd, "
      "Tensor? weight, Tensor? bias, str activation, float negative_slope) "
      "-> (Tensor sum_dy, Tensor sum_dy_xmu, Tensor grad_weight)");
  m.def(
      "backward_elemt(Tensor grad_output, Tensor input, Tensor? residual, Tensor mean, Tensor invstd, "
      "Tensor? weight, Tensor? bias, Tensor sum_dy, Tensor sum_dy_xmu, float count, str activation, "
      "float negative_slope) -> (Tensor grad_input, Tensor grad_residual)");
  m.def(
      "backward(Tensor grad_output, Tensor input, Tensor? residual, Tensor mean, Tensor invstd, Tensor? weight, "
      "Tensor? bias, float? count, str activation, float negative_slope) "
      "-> (Tensor grad_input, Tensor grad_residual, Tensor grad_weight, Tensor grad_bias)");
  // The gradients of forward_train (batch_stats) and normalize in torch operations, differentiable again: the
  // backward of those ops under create_graph=True. Implemented in Python (fusedbn/derivatives.py) as a
  // CompositeImplicitAutograd kernel; grad_weight and grad_bias are empty where weight and bias are None.
  m.def(
      "backward_composite(Tensor grad_output, Tensor input, Tensor? weight, Tensor? bias, Tensor? residual, "
      "Tensor mean, Tensor invstd, Tensor? prior_mean, Tensor? prior_var, bool batch_stats, float prior_count, "
      "float eps, str activation, float negative_slope) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias, Tensor grad_residual)");
}
