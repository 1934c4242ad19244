import pytest


@pytest.fixture(scope="module", autouse=True)
def _routers_train_on_one_thread(one_torch_thread):
    """The routers trained here are tiny: one torch thread (tests/conftest.py ``one_torch_thread``)."""
    yield
