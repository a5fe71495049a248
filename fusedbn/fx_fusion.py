"""torch.fx passes over a model: fuse_activations folds the activation (and residual add) after a batch norm into it;
fuse_conv_bn_blocks makes each conv → batch norm (→ activation, residual add) one FusedConvBatchNorm2d block."""

from __future__ import annotations

import operator
import warnings

import torch
import torch.nn.functional as F
from torch import fx, nn

from .batchnorm_act import BatchNormAct2d, fused_activation
from .conv_bn.module import FusedConvBatchNorm2d
from .conv_bn.recompute import auto_policy, check_policy, derivative_from_output
from .modules import FusedBatchNorm2d
from .timm_layers import fused_copy, timm_batchnorm_act

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
    gm = _traced(model, "fuse_activations")
    if gm is None:
        return model
    modules, calls = dict(gm.named_modules()), _call_counts(gm)
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not _is_plain_bn(modules[node.target]) or calls[node.target] != 1:
            continue
        if len(node.args) != 1 or node.kwargs:
            continue
        epilogue = _epilogue(node, modules)
        if epilogue is None or epilogue[2] == ("identity", 0.01):
            continue
        residual, tail, activation = epilogue
        bn = modules[node.target]
        fused = FusedBatchNorm2d.from_batch_norm(bn, activation=activation[0], negative_slope=activation[1],
                                                 **_small_batch_options(bn))
        _set_submodule(gm, node.target, fused)
        modules[node.target] = fused
        if residual is not None:
            _move_before(residual, node)  # the residual must exist before the call that now consumes it
            node.kwargs = {"residual": residual}
        _erase_chain(tail, node, node)
    gm.graph.lint()
    gm.recompile()
    return gm


def fuse_conv_bn_blocks(model: nn.Module, recompute: str = "auto") -> nn.Module:
    """Rewrites conv → BN [→ act] [→ add → act] into FusedConvBatchNorm2d blocks (``recompute`` for each), for
    training with about one stored activation per block.

    Returns a ``torch.fx.GraphModule`` with the same numbers and the same ``state_dict``: the convs and batch norms stay
    where they were, under their names and with their tensor objects (nn.BatchNorm2d layers become FusedBatchNorm2d
    sharing them), so optimizers and checkpoints keep working; each block refers to its conv and batch norm and holds
    no tensor of its own. A conv is fused when it is an nn.Conv2d called once whose output only feeds a batch norm
    (nn.BatchNorm2d, FusedBatchNorm2d or fusedbn/timm's BatchNormAct2d) called once. If the model cannot be traced, a
    warning says why and the model is returned unchanged.
    """
    check_policy(recompute)
    gm = _traced(model, "fuse_conv_bn_blocks")
    if gm is None:
        return model
    modules, calls = dict(gm.named_modules()), _call_counts(gm)

    def block_parts(bn_node: fx.Node):
        """(conv node, FusedBatchNorm2d) where this batch norm node and the conv node feeding it make a block, else
        None."""
        if bn_node.op != "call_module" or calls.get(bn_node.target) != 1 or len(bn_node.args) != 1:
            return None
        conv_node = bn_node.args[0]
        if not isinstance(conv_node, fx.Node) or conv_node.op != "call_module" or conv_node.kwargs \
                or type(modules[conv_node.target]) is not nn.Conv2d or calls[conv_node.target] != 1 \
                or len(conv_node.users) != 1 or len(conv_node.args) != 1:
            return None
        bn = _block_norm(modules[bn_node.target])
        if bn is None or modules[conv_node.target].out_channels != bn.num_features or set(bn_node.kwargs) - {"residual"}:
            return None
        return conv_node, bn

    def residual_is_free(residual: fx.Node, activation: tuple) -> bool:
        """Whether a block adding this residual before the activation stores nothing more than nn (recompute.py): it
        keeps its output instead where the activation's derivative can be read from it; else it keeps the residual,
        free where another layer uses it too or where it is a block's output rebuilt from a recipe."""
        if derivative_from_output(*activation) or len(residual.users) > 1:
            return True
        if recompute not in ("output", "auto") or residual.op != "call_module":
            return False
        if _block_of(residual, modules) is not None:
            return "residual" not in residual.kwargs
        return block_parts(residual) is not None and not residual.kwargs

    for bn_node in list(gm.graph.nodes):
        parts = block_parts(bn_node)
        if parts is None:
            continue
        conv_node, bn = parts
        conv = modules[conv_node.target]
        residual, tail = bn_node.kwargs.get("residual"), bn_node
        if type(bn) is FusedBatchNorm2d and bn.activation == "identity":  # what follows the batch norm may fuse
            epilogue = _epilogue(bn_node, modules, residual_is_free) if not bn_node.kwargs else None
            if epilogue is not None:
                residual, tail, (activation, slope) = epilogue
                bn = FusedBatchNorm2d.from_batch_norm(bn, activation=activation, negative_slope=slope,
                                                      **_small_batch_options(bn))
        _set_submodule(gm, bn_node.target, bn)
        modules[bn_node.target] = bn
        block_name = _free_name(gm, f"{conv_node.target}_{bn_node.target.rpartition('.')[2]}".replace(".", "_"))
        block = FusedConvBatchNorm2d.referring_to(conv, bn, recompute)
        gm.add_submodule(block_name, block)
        modules[block_name] = block
        with gm.graph.inserting_before(tail):
            block_node = gm.graph.call_module(block_name, conv_node.args,
                                              {"residual": residual} if residual is not None else {})
        _erase_chain(tail, conv_node, block_node)
        gm.graph.erase_node(conv_node)
    if recompute == "auto":
        for node in gm.graph.nodes:
            block = _block_of(node, modules)
            if block is not None:
                users = [_block_of(u, modules) for u in node.users]
                recipe_used = all(users) and any(_saves(u, user, node) for u, user in zip(node.users, users))
                block.recompute = auto_policy(block.conv.weight, "residual" in node.kwargs, recipe_used)
    gm.graph.lint()
    gm.recompile()
    return gm


def _block_of(node: fx.Node, modules: dict):
    module = modules.get(node.target) if node.op == "call_module" else None
    return module if isinstance(module, FusedConvBatchNorm2d) else None


def _saves(node: fx.Node, block: FusedConvBatchNorm2d, value: fx.Node) -> bool:
    """Whether the block called at node keeps value for its backward (as its conv input, or as a residual its
    activation's derivative needs)."""
    if node.args and node.args[0] is value:
        return True
    activation = (block.bn.activation, block.bn.negative_slope)
    return node.kwargs.get("residual") is value and activation[0] != "identity" \
        and not derivative_from_output(*activation)


def _block_norm(module: nn.Module):
    """The FusedBatchNorm2d a block runs for this batch norm module (the module itself, a converted copy sharing its
    tensors, or the plain nn.BatchNorm2d that the caller converts with the activation it finds), or None."""
    if type(module) is nn.BatchNorm2d or type(module) is FusedBatchNorm2d:
        return module if isinstance(module, FusedBatchNorm2d) else FusedBatchNorm2d.from_batch_norm(module)
    if type(module) is timm_batchnorm_act():
        module = fused_copy(module)
    if isinstance(module, BatchNormAct2d) and (module.activation != "identity" or (
            type(module.act) is nn.Identity and type(module.drop) is nn.Identity)):
        return module
    return None


def _traced(model: nn.Module, pass_name: str):
    try:
        graph = _Tracer().trace(model)
        return fx.GraphModule(model, graph, type(model).__name__)
    except Exception as e:  # noqa: BLE001  (any tracing failure: report it, change nothing)
        warnings.warn(f"{pass_name}: {type(model).__name__} cannot be traced by torch.fx "
                      f"({type(e).__name__}: {e}); the model is returned unchanged", UserWarning, stacklevel=3)
        return None


def _call_counts(gm: fx.GraphModule) -> dict:
    calls: dict = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    return calls


def _free_name(root: nn.Module, name: str) -> str:
    candidate, i = name, 1
    while hasattr(root, candidate):
        candidate, i = f"{name}_{i}", i + 1
    return candidate


def _small_batch_options(bn: nn.Module) -> dict:
    if isinstance(bn, FusedBatchNorm2d):
        return dict(small_batch=bn.small_batch, min_count=bn.min_count, prior_count=bn.prior_count)
    return {}


def _depends_on(node: fx.Node, ancestor: fx.Node) -> bool:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n is ancestor:
            return True
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return False


def _epilogue(node: fx.Node, modules: dict, residual_is_free=lambda residual, activation: len(residual.users) > 1):
    """(residual, tail, (activation, negative_slope)) for what follows a batch norm node that can run inside it:
    BN → act, BN → add(BN, z) → act, BN → add(BN, z) (identity); tail is the last node of it. None where nothing
    follows that can be fused (or the BN's output is used elsewhere too).

    An activation after the add is fused only where that stores nothing more than nn, ``residual_is_free(residual,
    (activation, negative_slope))``: FusedBatchNorm2d's backward keeps the residual (the activation's derivative needs
    the pre-activation), which costs nothing when another layer uses the residual too (a block input, saved by its
    first conv); a residual used by the add alone (a downsample branch's output) would be one more stored tensor than
    nn's, so there only the add is fused and the activation stays apart."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if _is_add(user):
        others = [a for a in user.args if a is not node]
        if len(others) != 1 or not isinstance(others[0], fx.Node) or _depends_on(others[0], node):
            return None
        residual = others[0]
        if len(user.users) == 1:
            act_node = next(iter(user.users))
            activation = _activation_of(act_node, modules) if act_node.args and act_node.args[0] is user else None
            if activation is not None and residual_is_free(residual, activation):
                return residual, act_node, activation
        return residual, user, ("identity", 0.01)
    activation = _activation_of(user, modules) if user.args and user.args[0] is node else None
    return None if activation is None else (None, user, activation)


def _erase_chain(tail: fx.Node, head: fx.Node, replacement: fx.Node) -> None:
    """Replaces the uses of tail by replacement and erases the nodes from tail back to (not including) head."""
    tail.replace_all_uses_with(replacement)
    while tail is not head:
        previous = next(a for a in tail.args if isinstance(a, fx.Node) and (a is head or _depends_on(a, head)))
        tail.graph.erase_node(tail)
        tail = previous


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
