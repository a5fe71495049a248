// The backward of fusedbn::forward_train and fusedbn::normalize, registered on the Autograd dispatch key: the ops
// are differentiable wherever they are called (eager, torch.compile, torch.jit.trace, TorchScript) at the cost of
// one C++ autograd node, with no Python in the step.
//
// First derivatives run the fused backward op. Where a graph of the backward is needed (create_graph=True), they
// run fusedbn::backward_composite instead: the same gradients in torch operations (fusedbn/derivatives.py), which
// autograd differentiates again.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>

namespace fusedbn {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

Tensor value_or_undefined(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }
OptTensor defined_or_none(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

using ForwardTrainOp = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, double,
    double, c10::string_view, double, const OptTensor&, const OptTensor&, const OptTensor&, std::optional<double>);
using NormalizeOp = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&, const OptTensor&,
                                                       const OptTensor&, const Tensor&, const Tensor&, double,
                                                       c10::string_view, double);

const c10::TypedOperatorHandle<ForwardTrainOp>& forward_train_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fusedbn::forward_train", "").typed<ForwardTrainOp>();
  return op;
}

const c10::TypedOperatorHandle<NormalizeOp>& normalize_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fusedbn::normalize", "").typed<NormalizeOp>();
  return op;
}

// Saved for the backward: x, the parameters, the residual where the activation's derivative reads it, the statistics
// the output was normalised with, and the prior statistics where the batch was blended with them; never the output.
void save(AutogradContext* ctx, const Tensor& input, const OptTensor& weight, const OptTensor& bias,
          const OptTensor& residual, const Tensor& mean, const Tensor& invstd, const OptTensor& prior_mean,
          const OptTensor& prior_var, bool batch_stats, double prior_count, double eps, c10::string_view activation,
          double negative_slope) {
  ctx->set_materialize_grads(false);  // the statistics outputs get no gradient: no zeros to allocate
  const bool identity = activation == "identity";
  const bool blended = batch_stats && prior_count > 0;
  ctx->save_for_backward({input, value_or_undefined(weight), value_or_undefined(bias),
                          identity ? Tensor() : value_or_undefined(residual), mean, invstd,
                          blended ? value_or_undefined(prior_mean) : Tensor(),
                          blended ? value_or_undefined(prior_var) : Tensor()});
  ctx->saved_data["batch_stats"] = batch_stats;
  ctx->saved_data["prior_count"] = prior_count;
  ctx->saved_data["eps"] = eps;
  ctx->saved_data["activation"] = std::string(activation);
  ctx->saved_data["negative_slope"] = negative_slope;
  ctx->saved_data["has_residual"] = residual.has_value() && residual->defined();
}

// (grad_input, grad_weight, grad_bias, grad_residual), undefined where not needed.
variable_list input_gradients(AutogradContext* ctx, const Tensor& grad_output) {
  variable_list grads(4);
  if (!grad_output.defined()) return grads;  // the output was not used
  static const auto backward_op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fusedbn::backward", "")
          .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&,
                                                            const Tensor&, const Tensor&, const OptTensor&,
                                                            const OptTensor&, std::optional<double>,
                                                            c10::string_view, double)>();
  const variable_list saved = ctx->get_saved_variables();
  const Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &residual = saved[3];
  const Tensor &mean = saved[4], &invstd = saved[5];
  const auto& data = ctx->saved_data;
  const bool batch_stats = data.at("batch_stats").toBool();
  const double prior_count = data.at("prior_count").toDouble();
  const std::string& activation = data.at("activation").toStringRef();
  const double negative_slope = data.at("negative_slope").toDouble();
  Tensor grad_input, grad_weight, grad_bias, grad_residual;
  if (at::GradMode::is_enabled()) {
    static const auto composite_op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("fusedbn::backward_composite", "")
            .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(
                const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const Tensor&,
                const Tensor&, const OptTensor&, const OptTensor&, bool, double, double, c10::string_view, double)>();
    std::tie(grad_input, grad_weight, grad_bias, grad_residual) = composite_op.call(
        grad_output, x, defined_or_none(weight), defined_or_none(bias), defined_or_none(residual), mean, invstd,
        defined_or_none(saved[6]), defined_or_none(saved[7]), batch_stats, prior_count, data.at("eps").toDouble(),
        activation, negative_slope);
  } else {
    std::optional<double> count;
    if (batch_stats) count = static_cast<double>(x.size(0) * x.size(2) * x.size(3)) + prior_count;
    std::tie(grad_input, grad_residual, grad_weight, grad_bias) =
        backward_op.call(grad_output, x, defined_or_none(residual), mean, invstd, defined_or_none(weight),
                         defined_or_none(bias), count, activation, negative_slope);
  }
  if (data.at("has_residual").toBool() && activation == "identity") grad_residual = grad_output;  // z not saved
  const std::array<Tensor*, 4> all{&grad_input, &grad_weight, &grad_bias, &grad_residual};
  const std::array<bool, 4> exists{true, weight.defined(), bias.defined(), data.at("has_residual").toBool()};
  // The node's edges are the tensor arguments that were given (an absent optional has none), in order.
  size_t edge = 0;
  for (size_t i = 0; i < 4; ++i) {
    if (!exists[i]) continue;
    if (ctx->needs_input_grad(edge++)) grads[i] = *all[i];
  }
  return grads;
}

// The running statistics (updated in place by the op) are buffers: no gradient reaches them.
class ForwardTrain : public torch::autograd::Function<ForwardTrain> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& residual, const OptTensor& prior_mean,
                               const OptTensor& prior_var, double prior_count, double eps,
                               c10::string_view activation, double negative_slope, const OptTensor& running_mean,
                               const OptTensor& running_var, const OptTensor& num_batches_tracked,
                               std::optional<double> momentum) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, mean, invstd, batch_mean, batch_m2, updated] = forward_train_op().call(
        input, weight, bias, residual, prior_mean, prior_var, prior_count, eps, activation, negative_slope,
        running_mean, running_var, num_batches_tracked, momentum);
    save(ctx, input, weight, bias, residual, mean, invstd, prior_mean, prior_var, true, prior_count, eps, activation,
         negative_slope);
    ctx->mark_non_differentiable({mean, invstd, batch_mean, batch_m2, updated});
    return {output, mean, invstd, batch_mean, batch_m2, updated};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads = input_gradients(ctx, grad_outputs[0]);
    grads.resize(14);  // the prior and running statistics and the options get none
    return grads;
  }
};

class Normalize : public torch::autograd::Function<Normalize> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& residual, const Tensor& mean_in,
                               const Tensor& var_in, double eps, c10::string_view activation, double negative_slope) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, mean, invstd] =
        normalize_op().call(input, weight, bias, residual, mean_in, var_in, eps, activation, negative_slope);
    save(ctx, input, weight, bias, residual, mean, invstd, std::nullopt, std::nullopt, false, 0.0, eps, activation,
         negative_slope);
    ctx->mark_non_differentiable({mean, invstd});
    return {output, mean, invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads = input_gradients(ctx, grad_outputs[0]);
    grads.resize(9);  // the statistics (constants, as in eval mode) and the options get none
    return grads;
  }
};

// Whether the call needs an autograd node: with nothing to differentiate (inference, torch.no_grad) the kernels run
// directly, without the node's bookkeeping (a few µs, a fifth of a small call). A forward-mode tangent takes the node,
// which refuses it (the C++ node has no jvp; fusedbn's Python layer sends such calls to FusedBatchNormFunction), so a
// tangent is never dropped silently.
bool needs_node(const Tensor& input, const OptTensor& weight, const OptTensor& bias, const OptTensor& residual) {
  const std::array<Tensor, 4> tensors{input, value_or_undefined(weight), value_or_undefined(bias),
                                      value_or_undefined(residual)};
  const bool grad_mode = at::GradMode::is_enabled();
  for (const Tensor& t : tensors) {
    if (t.defined() && ((grad_mode && t.requires_grad()) || t._fw_grad(/*level=*/0).defined())) return true;
  }
  return false;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> forward_train(
    const Tensor& input, const OptTensor& weight, const OptTensor& bias, const OptTensor& residual,
    const OptTensor& prior_mean, const OptTensor& prior_var, double prior_count, double eps,
    c10::string_view activation, double negative_slope, const OptTensor& running_mean, const OptTensor& running_var,
    const OptTensor& num_batches_tracked, std::optional<double> momentum) {
  if (!needs_node(input, weight, bias, residual)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return forward_train_op().call(input, weight, bias, residual, prior_mean, prior_var, prior_count, eps, activation,
                                   negative_slope, running_mean, running_var, num_batches_tracked, momentum);
  }
  const variable_list r =
      ForwardTrain::apply(input, weight, bias, residual, prior_mean, prior_var, prior_count, eps, activation,
                          negative_slope, running_mean, running_var, num_batches_tracked, momentum);
  return {r[0], r[1], r[2], r[3], r[4], r[5]};
}

std::tuple<Tensor, Tensor, Tensor> normalize(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                                             const OptTensor& residual, const Tensor& mean, const Tensor& var,
                                             double eps, c10::string_view activation, double negative_slope) {
  if (!needs_node(input, weight, bias, residual)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return normalize_op().call(input, weight, bias, residual, mean, var, eps, activation, negative_slope);
  }
  const variable_list r = Normalize::apply(input, weight, bias, residual, mean, var, eps, activation, negative_slope);
  return {r[0], r[1], r[2]};
}

}  // namespace
}  // namespace fusedbn

TORCH_LIBRARY_IMPL(fusedbn, Autograd, m) {
  m.impl("forward_train", &fusedbn::forward_train);
  m.impl("normalize", &fusedbn::normalize);
}
