import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The routers trained here are tiny: with several intra-op threads (and other processes on
    the cores) torch spends more time handing work between threads than computing."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
