"""TorchScript: torch.jit.trace of models with fusedbn layers, eval and training, saved and loaded; torch.jit.script
refuses with a clear error (README, "PyTorch integration")."""

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import fusedbn
from helpers import TOL, module_pair, random_input


def model_pair():
    """The same small network with nn and with fusedbn layers (fused activation and residual included)."""

    class Net(nn.Module):
        def __init__(self, bn):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
            self.bn1, self.bn2 = bn(4), bn(4)

        def forward(self, x):
            y = self.conv1(x)
            z = torch.relu(self.bn1(y))
            return torch.relu(self.bn2(self.conv2(z)) + y)

    torch.manual_seed(0)
    reference = Net(nn.BatchNorm2d).double()
    fused = fusedbn.fuse_activations(fusedbn.convert_model(copy.deepcopy(reference)))
    assert sum(isinstance(m, fusedbn.FusedBatchNorm2d) and m.activation == "relu" for m in fused.modules()) == 2
    return reference, fused


def traced(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks become constants, as for nn
        module = torch.jit.trace(model, (x,))
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_traced_model_saves_loads_and_trains_as_nn_traced(training):
    reference, fused = model_pair()
    reference.train(training), fused.train(training)
    x = random_input((2, 3, 6, 6), requires_grad=False)
    # Tracing runs the model (and checks it by running it again): nn and fusedbn update their buffers alike.
    ref_traced, fused_traced = traced(reference, x), traced(fused, x)
    assert "fusedbn::" in str(fused_traced.graph) or "fusedbn::" in str(fused_traced.inlined_graph)
    for _ in range(2):
        inputs = [x.clone().requires_grad_() for _ in range(2)]
        outputs = [m(i) for m, i in zip((ref_traced, fused_traced), inputs)]
        torch.testing.assert_close(outputs[1], outputs[0], **TOL[torch.float64])
        for y in outputs:
            y.pow(2).sum().backward()
        torch.testing.assert_close(inputs[1].grad, inputs[0].grad, **TOL[torch.float64])
        fused_parameters, fused_state = dict(fused_traced.named_parameters()), fused_traced.state_dict()
        for name, a in ref_traced.named_parameters():
            torch.testing.assert_close(fused_parameters[name].grad, a.grad, **TOL[torch.float64], msg=name)
        assert fused_state.keys() == ref_traced.state_dict().keys()
        for name, a in ref_traced.state_dict().items():
            torch.testing.assert_close(fused_state[name], a, **TOL[torch.float64], msg=name)


def test_script_refuses_with_a_clear_error():
    _, fused = module_pair(3)
    with pytest.raises(RuntimeError, match="torch.jit.script is not supported .* torch.jit.trace"):
        torch.jit.script(fused)
