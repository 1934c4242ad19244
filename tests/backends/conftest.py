import pytest

from ..models import make_handmade_bundle


@pytest.fixture
def bundle(tmp_path):
    return make_handmade_bundle(tmp_path / "bundle")
