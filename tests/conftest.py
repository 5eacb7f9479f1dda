import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    # Deterministic random weights in every test, and no oversubscription on the 2-core CI machine.
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield
