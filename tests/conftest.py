import os
import zlib

# Every fusedbn output is filled with NaN before the kernels write it: an element a kernel forgets to write
# shows up as a NaN mismatch instead of passing by luck. Set before fusedbn is imported.
os.environ.setdefault("FUSEDBN_POISON_OUTPUTS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA GPU on this machine")


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different but reproducible stream per test (the test's name is the seed).
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
