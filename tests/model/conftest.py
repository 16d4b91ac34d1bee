import pytest
import torch


@pytest.fixture(autouse=True)
def _fp32_single_thread():
    torch.set_num_threads(1)
    yield
