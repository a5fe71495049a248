"""fuse_activations: a torch.fx pass that folds the activation (and residual add) after a batch norm into it."""

from __future__ import annotations

import operator
import warnings

import torch
import torch.nn.functional as F
from torch import fx, nn

from .batchnorm_act import fused_activation
from .modules import FusedBatchNorm2d

_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.leaky_relu: "leaky_relu", F.silu: "silu", F.relu6: "relu6",
                  F.hardswish: "hardswish", F.gelu: "gelu"}
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


def _activation_of(node: fx.Node, modules: dict):
    """(name, negative_slope) if node applies a fusable activation to its first argument, else None."""
    if node.op == "call_module":
        return fused_activation(modules[node.target], nn.Identity())
    if node.op == "call_function" and node.target in _ACT_FUNCTIONS:
        name = _ACT_FUNCTIONS[node.target]
        if name == "gelu" and (len(node.args) > 1 or node.kwargs.get("approximate", "none") != "none"):
            return None  # the kernels fuse the exact GELU only
        if name != "leaky_relu":
            return name, 0.01
        slope = node.kwargs.get("negative_slope", node.args[1] if len(node.args) > 1 else 0.01)
        return (name, float(slope)) if isinstance(slope, (int, float)) else None
    if node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1:
        return "relu", 0.01
    return None


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        return len(node.args) == 2 and not node.kwargs
    return node.op == "call_method" and node.target in ("add", "add_") and len(node.args) == 2 and not node.kwargs


def _is_plain_bn(module: nn.Module) -> bool:
    if isinstance(module, FusedBatchNorm2d):
        return module.activation == "identity" and type(module) is FusedBatchNorm2d
    return type(module) is nn.BatchNorm2d


class _Tracer(fx.Tracer):
    """Keeps every batch norm module (fusedbn's included) as one call in the graph."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, nn.modules.batchnorm._BatchNorm) or super().is_leaf_module(m, qualname)


def fuse_activations(model: nn.Module) -> nn.Module:
    """Rewrites BN → ReLU / LeakyReLU / SiLU and BN → add → ReLU into single fused FusedBatchNorm2d calls.

    Returns a ``torch.fx.GraphModule`` with the same numbers and the same ``state_dict`` (batch norms keep their
    names, parameters and buffers; nn.BatchNorm2d layers that get fused become FusedBatchNorm2d). A batch norm
    module called more than once, or whose output is used elsewhere too, is left alone. If the model cannot be
    traced, a warning says why and the model is returned unchanged.
    """
    try:
        graph = _Tracer().trace(model)
        gm = fx.GraphModule(model, graph, type(model).__name__)
    except Exception as e:  # noqa: BLE001  (any tracing failure: report it, change nothing)
        warnings.warn(f"fuse_activations: {type(model).__name__} cannot be traced by torch.fx "
                      f"({type(e).__name__}: {e}); the model is returned unchanged", UserWarning, stacklevel=2)
        return model
    modules = dict(gm.named_modules())
    calls = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not _is_plain_bn(modules[node.target]) or calls[node.target] != 1:
            continue
        if len(node.users) != 1 or len(node.args) != 1 or node.kwargs:
            continue
        user = next(iter(node.users))
        residual, act_node = None, user  # BN → act
        if _is_add(user) and len(user.users) == 1:  # BN → add(BN, z) → act
            others = [a for a in user.args if a is not node]
            if len(others) == 1 and isinstance(others[0], fx.Node):
                residual, act_node = others[0], next(iter(user.users))
        if not act_node.args or act_node.args[0] is not (node if residual is None else user):
            continue
        activation = _activation_of(act_node, modules)
        if activation is None:
            continue
        bn = modules[node.target]
        options = {}
        if isinstance(bn, FusedBatchNorm2d):
            options = dict(small_batch=bn.small_batch, min_count=bn.min_count, prior_count=bn.prior_count)
        fused = FusedBatchNorm2d.from_batch_norm(bn, activation=activation[0], negative_slope=activation[1], **options)
        _set_submodule(gm, node.target, fused)
        modules[node.target] = fused
        if residual is not None:
            _move_before(residual, node)  # the residual must exist before the call that now consumes it
            node.kwargs = {"residual": residual}
        act_node.replace_all_uses_with(node)
        gm.graph.erase_node(act_node)
        if residual is not None:
            gm.graph.erase_node(user)
    gm.graph.lint()
    gm.recompile()
    return gm


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, name, module)


def _move_before(node: fx.Node, anchor: fx.Node) -> None:
    """Ensures node (and what it depends on) is defined before anchor in the graph's order."""
    order = {n: i for i, n in enumerate(anchor.graph.nodes)}
    if order[node] < order[anchor]:
        return
    for dep in node.all_input_nodes:
        _move_before(dep, anchor)
    anchor.prepend(node)
