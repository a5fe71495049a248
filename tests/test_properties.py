"""Property-based equivalence with nn.BatchNorm2d (hypothesis): random shapes, options, layouts and steps.

Deterministic in CI (derandomize=True); a failure prints the shrunk example and a reproduction blob.
"""

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fusedbn

SETTINGS = settings(max_examples=500, deadline=None, derandomize=True, print_blob=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def cases(draw):
    long_channel = draw(st.booleans()) and draw(st.integers(0, 9)) == 0
    if long_channel:  # very long single channels
        shape = (draw(st.integers(1, 2)), 1, draw(st.integers(1, 3)), draw(st.integers(2000, 6000)))
    else:
        shape = (draw(st.integers(0, 5)), draw(st.integers(1, 6)), draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    return dict(
        shape=shape,
        dtype=draw(st.sampled_from([torch.float64, torch.float32])),
        layout=draw(st.sampled_from(["nchw", "channels_last", "sliced", "transposed"])),
        momentum=draw(st.one_of(st.none(), st.sampled_from([0.0, 1.0]), st.floats(0.01, 0.99))),
        eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])),
        affine=draw(st.booleans()),
        track=draw(st.booleans()),
        steps=draw(st.integers(1, 3)),
        offset=draw(st.floats(-50, 50)),
        scale=draw(st.floats(0.01, 20)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_input(case, gen):
    n, c, h, w = case["shape"]
    if case["layout"] == "sliced":  # every other sample of a bigger batch
        full = torch.randn(2 * n, c, h, w, generator=gen, dtype=torch.float64)
        x = full[::2]
    elif case["layout"] == "transposed":
        x = torch.randn(n, c, w, h, generator=gen, dtype=torch.float64).transpose(2, 3)
    else:
        x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)
        if case["layout"] == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    return (x * case["scale"] + case["offset"]).to(case["dtype"])


@SETTINGS
@given(cases())
def test_equivalent_to_nn(case):
    # float32: the input itself carries an error of ~eps·|offset|, i.e. eps·|offset|/scale after normalising.
    conditioning = abs(case["offset"]) / case["scale"]
    tol = (dict(rtol=1e-9, atol=1e-9) if case["dtype"] == torch.float64
           else dict(rtol=1e-4 * max(1.0, conditioning / 20), atol=1e-4 + 8 * torch.finfo(torch.float32).eps * conditioning))
    n, c, h, w = case["shape"]
    kwargs = dict(eps=case["eps"], momentum=case["momentum"], affine=case["affine"],
                  track_running_stats=case["track"])
    ref = nn.BatchNorm2d(c, **kwargs).to(case["dtype"])
    fused = fusedbn.FusedBatchNorm2d(c, **kwargs, small_batch="error").to(case["dtype"])
    gen = torch.Generator().manual_seed(case["seed"])
    if case["affine"]:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5, generator=gen)
            ref.bias.normal_(generator=gen)
    fused.load_state_dict(ref.state_dict())
    for step in range(case["steps"] + 1):
        if step == case["steps"]:
            ref.eval(), fused.eval()
        x = make_input(case, gen)
        g = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(case["dtype"])
        xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        try:
            y_ref = ref(xr)
        except ValueError as e:  # nn rejects one value per channel: so must fusedbn in "error" mode
            with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
                fused(xf)
            assert "Expected more than 1 value per channel" in str(e)
            if ref.num_batches_tracked is not None:  # nn counted the rejected batch; fusedbn touches nothing
                ref.num_batches_tracked.sub_(1)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = fused(xf)
        torch.testing.assert_close(y, y_ref, **tol)
        y_ref.backward(g), y.backward(g)
        # dx carries the input's error times invstd, over the whole gradient (g·invstd and the mean terms): its
        # error scales with the gradient's largest value, not with each element's own.
        largest = xr.grad.abs().max().item() if xr.grad.numel() else 0.0
        grad_tol = dict(tol, atol=tol["atol"] * max(1.0, largest))
        torch.testing.assert_close(xf.grad, xr.grad, **grad_tol)
        for (name, a), b in zip(ref.state_dict().items(), fused.state_dict().values()):
            torch.testing.assert_close(b, a, **tol, msg=name)
        if case["affine"]:
            torch.testing.assert_close(fused.weight.grad, ref.weight.grad, **tol)
            torch.testing.assert_close(fused.bias.grad, ref.bias.grad, **tol)
