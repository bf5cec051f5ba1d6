import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
SHARED = ROOT.parent / "shared"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Tiny models gain nothing from a second thread, and on a busy 2-core machine two OpenMP threads
# per process can make them 10x slower: one thread here and in the scripts the tests start.
os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture
def data_dir():
    """The reference vectors copied from ../shared/reference."""
    return DATA


@pytest.fixture
def cifar_mini():
    """../shared/data/cifar10-mini when present; tests using it skip cleanly otherwise."""
    path = SHARED / "data" / "cifar10-mini"
    if not path.is_dir():
        pytest.skip("../shared/data/cifar10-mini is not available")
    return path


torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--reverse", action="store_true",
                     help="run the tests in reverse order (each test must own its state: this shows it)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--reverse"):
        items.reverse()
