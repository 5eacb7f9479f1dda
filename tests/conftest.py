import pytest
import torch

from tests.devices import need_cuda
from tests.postgres import pg_url, postgres, store  # noqa: F401 - fixtures of the fleet tests


@pytest.fixture(autouse=True)
def _seed_and_threads():
    # Deterministic random weights in every test, and no oversubscription on the 2-core CI machine.
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield


@pytest.fixture
def cuda_device() -> torch.device:
    """The CUDA device, for a test marked with ``tests.devices.cuda``: skips without one, or fails under
    ``CINEMATIC_REQUIRE_CUDA=1``."""
    need_cuda()
    return torch.device("cuda")
