import pytest

from cotune.data import shared_data_dir


@pytest.fixture(scope="session")
def shared_data():
    path = shared_data_dir()
    if path is None:
        pytest.skip("shared data (../shared/data) not found; set COTUNE_SHARED_DATA to run this test")
    return path
