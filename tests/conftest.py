import pytest
import torch

import ccl_ops
from ccl_ops import ops

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


@pytest.fixture(params=DEVICES, scope="session")
def device(request):
    # Without a compiled kernel for the device, ccl_ops serves the reference, and every device-parametrised
    # comparison would check the reference against itself: fail loudly instead.
    device = torch.device(request.param)
    if ccl_ops.backend(device) == "reference":
        pytest.fail(f"ccl_ops has no compiled kernel for device {device.type!r} (extension error: "
                    f"{ops._EXTENSION_ERROR}); the kernel tests would compare the reference with itself")
    return device


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module's tests: two OpenMP threads on a loaded 2-core machine spin against each
    other; one thread is steady (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
