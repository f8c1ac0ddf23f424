import pytest
import torch


@pytest.fixture(autouse=True)
def nan_filled_empty():
    """Deterministic mode for every op test: uninitialised memory is filled with NaN
    (``torch.utils.deterministic.fill_uninitialized_memory``), and ops that would be
    non-deterministic warn."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    assert torch.utils.deterministic.fill_uninitialized_memory
    yield
    torch.use_deterministic_algorithms(previous, warn_only=previous_warn)
