"""pytest setup: import tinydiff from the repository root and the harness from tests/, without an
install; shared fixtures for the known-distribution harness (tests/harness.py, docs/design.md "Tests")."""
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
for path in (os.path.dirname(HERE), HERE):  # repo root (tinydiff) and tests/ (harness)
    if path not in sys.path:
        sys.path.insert(0, path)

from harness import OracleAR, OracleDenoiser, Toy  # noqa: E402


def gpt2_or_skip():
    """The GPT-2 tokenizer if this environment can load it (tiktoken installed and its vocabulary cached,
    e.g. TIKTOKEN_CACHE_DIR set, or downloaded once online), else skip the test. Tests never point at a
    cache outside the repository themselves: a fresh clone offline skips these and passes."""
    from tinydiff.data import get_tokenizer
    try:
        return get_tokenizer("gpt2")
    except Exception as e:  # DataError: tiktoken missing or no cached vocabulary offline
        pytest.skip(f"GPT-2 vocabulary not available here ({type(e).__name__}; offline: set TIKTOKEN_CACHE_DIR)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: slower end-to-end or statistical test (still run in CI)")


@pytest.fixture(scope="session")
def toy():
    """V = 3 tokens, L = 4 positions: 81 sequences, 256 partial states (enumerations stay tiny)."""
    return Toy(V=3, L=4, seed=0)


@pytest.fixture(scope="session")
def oracle(toy):
    return OracleDenoiser(toy)


@pytest.fixture(scope="session")
def oracle_ar(toy):
    return OracleAR(toy)


@pytest.fixture(scope="module")
def single_thread():
    """Run a module with one intra-op thread, then restore. The harness tests run thousands of
    small tensor ops, for which a second thread only adds synchronisation; when the other core is
    busy (2-core CI, parallel jobs) the spin-waiting makes them ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
