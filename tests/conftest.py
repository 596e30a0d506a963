import pytest
import torch

from factorlm.ops import _extension


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture
def fresh_extension_state():
    """Forget whether the C++ extension loaded, before and after the test (for tests that disable it
    or make its build fail)."""
    _extension.reset()
    yield
    _extension.reset()
