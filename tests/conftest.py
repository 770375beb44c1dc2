import pytest

from cotune.data import shared_data_dir


@pytest.fixture(scope="session")
def shared_data():
    path = shared_data_dir()
    if path is None:
        pytest.skip("shared data (../shared/data) not found; set COTUNE_SHARED_DATA to run this test")
    return path


def pytest_addoption(parser):
    parser.addoption("--full-kill-matrix", action="store_true", default=False,
                     help="tests/integration/test_kill_matrix.py: kill every service at every step kind (else a "
                          "representative slice; env COTUNE_FULL_KILL_MATRIX=1 does the same)")
