// The backward of fusedbn::forward_train and fusedbn::normalize, registered on the Autograd dispatch key: the ops
// are differentiable wherever they are called (eager, torch.compile, torch.jit.trace, TorchScript) at the cost of
// one C++ autograd node, with no Python in the step.
//
// First derivatives run the fused backward op. Where a graph of the backward is needed (create_graph=True), they
// run fusedbn::backward_composite instead: the same gradients in torch operations (fusedbn/derivatives.py), which
// autograd differentiates again.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <array>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>

namespace fusedbn {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

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

// The autograd node of forward_train and normalize, written as aten's generated nodes are: saved variables and
// options as members. A torch::autograd::Function in its place (options in a string-keyed map, generic argument
// and output handling) made a (2, 64, 4, 4) training forward 1.08x nn.BatchNorm2d's time and a BN+ReLU step 0.97x
// (bench/call_cost.py; this node: 0.68-0.89x and 0.67-0.78x). Its edges are input, weight, bias and residual, in
// that order, an empty edge for an absent one.
struct BatchNormBackward : torch::autograd::Node {
  // Saved: x, the parameters, the residual where the activation's derivative reads it, the statistics the output
  // was normalised with, and the prior statistics where the batch was blended with them; never the output.
  SavedVariable input, weight, bias, residual, mean, invstd, prior_mean, prior_var;
  bool batch_stats = false, has_residual = false;
  double prior_count = 0, eps = 0, negative_slope = 0;
  std::string activation;

  using Node::Node;

  std::string name() const override { return "FusedBatchNormBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* v : {&input, &weight, &bias, &residual, &mean, &invstd, &prior_mean, &prior_var}) {
      v->reset_data();
    }
  }

  // (grad_input, grad_weight, grad_bias, grad_residual), undefined where not needed.
  variable_list apply(variable_list&& grad_outputs) override {
    std::lock_guard<std::mutex> lock(mutex_);
    variable_list grads(4);
    const Tensor& grad_output = grad_outputs[0];
    if (!grad_output.defined()) return grads;  // the output was not used
    const Tensor x = input.unpack(), w = weight.unpack(), b = bias.unpack(), z = residual.unpack();
    const Tensor m = mean.unpack(), inv = invstd.unpack();
    Tensor grad_input, grad_weight, grad_bias, grad_residual;
    if (at::GradMode::is_enabled()) {  // create_graph=True: a backward that autograd can differentiate again
      static const auto composite_op =
          c10::Dispatcher::singleton()
              .findSchemaOrThrow("fusedbn::backward_composite", "")
              .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(
                  const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const Tensor&,
                  const Tensor&, const OptTensor&, const OptTensor&, bool, double, double, c10::string_view,
                  double)>();
      std::tie(grad_input, grad_weight, grad_bias, grad_residual) = composite_op.call(
          grad_output, x, defined_or_none(w), defined_or_none(b), defined_or_none(z), m, inv,
          defined_or_none(prior_mean.unpack()), defined_or_none(prior_var.unpack()), batch_stats, prior_count, eps,
          activation, negative_slope);
    } else {
      static const auto backward_op =
          c10::Dispatcher::singleton()
              .findSchemaOrThrow("fusedbn::backward", "")
              .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&,
                                                                const Tensor&, const Tensor&, const OptTensor&,
                                                                const OptTensor&, std::optional<double>,
                                                                c10::string_view, double)>();
      std::optional<double> count;
      if (batch_stats) count = static_cast<double>(x.size(0) * x.size(2) * x.size(3)) + prior_count;
      std::tie(grad_input, grad_residual, grad_weight, grad_bias) =
          backward_op.call(grad_output, x, defined_or_none(z), m, inv, defined_or_none(w), defined_or_none(b), count,
                           activation, negative_slope);
    }
    if (has_residual && activation == "identity") grad_residual = grad_output;  // z not saved
    const std::array<Tensor*, 4> all{&grad_input, &grad_weight, &grad_bias, &grad_residual};
    for (size_t i = 0; i < 4; ++i) {
      if (task_should_compute_output(i)) grads[i] = std::move(*all[i]);
    }
    return grads;
  }
};

// The node's pointer type: std::shared_ptr<Node> before torch 2.12, c10::intrusive_ptr<Node> since.
using NodePtr = decltype(torch::autograd::Edge::function);

template <typename T>
NodePtr make_node(torch::autograd::edge_list&& edges) {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
    // deleteNode frees a long chain of nodes without recursion; called unqualified with a dependent argument (found
    // by argument-dependent lookup at instantiation), since torch without it never instantiates this branch.
    return std::shared_ptr<T>(new T(std::move(edges)), [](T* node) { deleteNode(node); });
  } else {
    return c10::make_intrusive<T>(std::move(edges));
  }
}

// Whether the call needs an autograd node: with nothing to differentiate (inference, torch.no_grad) the kernels run
// directly. A forward-mode tangent is refused (the node has no jvp; fusedbn's Python layer sends such calls to
// FusedBatchNormFunction), so a tangent is never dropped silently.
bool needs_node(const char* op, const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                const OptTensor& residual) {
  for (const OptTensor& t : {OptTensor(input), weight, bias, residual}) {
    TORCH_CHECK(!torch::autograd::isFwGradDefined(t), "fusedbn::", op, " has no forward-mode derivative (jvp) in ",
                "C++: call it through fusedbn's Python API (FusedBatchNormFunction), which has one");
  }
  return torch::autograd::compute_requires_grad(input, weight, bias, residual);
}

// Records the node of an output normalised with (mean, invstd), given the op's arguments.
void record_backward(const Tensor& output, const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                     const OptTensor& residual, const Tensor& mean, const Tensor& invstd, const OptTensor& prior_mean,
                     const OptTensor& prior_var, bool batch_stats, double prior_count, double eps,
                     c10::string_view activation, double negative_slope) {
  const NodePtr node_ptr =
      make_node<BatchNormBackward>(torch::autograd::collect_next_edges(input, weight, bias, residual));
  auto& node = static_cast<BatchNormBackward&>(*node_ptr);
  const bool identity = activation == "identity";
  const bool blended = batch_stats && prior_count > 0;
  node.input = SavedVariable(input, false);
  node.weight = SavedVariable(weight, false);
  node.bias = SavedVariable(bias, false);
  node.residual = SavedVariable(identity ? std::nullopt : residual, false);
  node.mean = SavedVariable(mean, false);
  node.invstd = SavedVariable(invstd, false);
  node.prior_mean = SavedVariable(blended ? prior_mean : std::nullopt, false);
  node.prior_var = SavedVariable(blended ? prior_var : std::nullopt, false);
  node.batch_stats = batch_stats;
  node.has_residual = residual.has_value() && residual->defined();
  node.prior_count = prior_count;
  node.eps = eps;
  node.activation = std::string(activation);
  node.negative_slope = negative_slope;
  torch::autograd::set_history(output, node_ptr);
}

// The running statistics (updated in place by the op) are buffers: no gradient reaches them.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> forward_train(
    const Tensor& input, const OptTensor& weight, const OptTensor& bias, const OptTensor& residual,
    const OptTensor& prior_mean, const OptTensor& prior_var, double prior_count, double eps,
    c10::string_view activation, double negative_slope, const OptTensor& running_mean, const OptTensor& running_var,
    const OptTensor& num_batches_tracked, std::optional<double> momentum) {
  const bool node = needs_node("forward_train", input, weight, bias, residual);
  auto result = [&] {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return forward_train_op().call(input, weight, bias, residual, prior_mean, prior_var, prior_count, eps, activation,
                                   negative_slope, running_mean, running_var, num_batches_tracked, momentum);
  }();
  if (node) {
    record_backward(std::get<0>(result), input, weight, bias, residual, std::get<1>(result), std::get<2>(result),
                    prior_mean, prior_var, true, prior_count, eps, activation, negative_slope);
  }
  return result;
}

std::tuple<Tensor, Tensor, Tensor> normalize(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                                             const OptTensor& residual, const Tensor& mean, const Tensor& var,
                                             double eps, c10::string_view activation, double negative_slope) {
  const bool node = needs_node("normalize", input, weight, bias, residual);
  auto result = [&] {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return normalize_op().call(input, weight, bias, residual, mean, var, eps, activation, negative_slope);
  }();
  if (node) {
    record_backward(std::get<0>(result), input, weight, bias, residual, std::get<1>(result), std::get<2>(result),
                    std::nullopt, std::nullopt, false, 0.0, eps, activation, negative_slope);
  }
  return result;
}

}  // namespace
}  // namespace fusedbn

TORCH_LIBRARY_IMPL(fusedbn, Autograd, m) {
  m.impl("forward_train", &fusedbn::forward_train);
  m.impl("normalize", &fusedbn::normalize);
}
