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
