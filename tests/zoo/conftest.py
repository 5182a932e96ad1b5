"""The zoo conformance suite: the ``slow`` marker (runs of the zoo bundles in fresh processes) and one prepared copy
of each bundle per test session, shared by the tests that only read it."""

from __future__ import annotations

import pytest

import pathlib

from .running import run_bundle_eval
from .zoo_bundles import BUNDLES, PreparedBundle, prepare_bundle


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: runs a zoo bundle in a fresh process (deselect with -m 'not slow')")


@pytest.fixture(scope="session")
def prepared_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PreparedBundle]:
    """Name -> the bundle prepared (copy, seeded weights, fake data) on first use, then reused."""

    class _Lazy(dict):
        def __missing__(self, name: str) -> PreparedBundle:
            self[name] = prepare_bundle(BUNDLES[name], tmp_path_factory.mktemp(name))
            return self[name]

    return _Lazy()


@pytest.fixture(scope="session")
def plain_runs(prepared_bundles: dict[str, PreparedBundle], tmp_path_factory: pytest.TempPathFactory
               ) -> dict[str, pathlib.Path]:
    """Name -> the output folder of the bundle's plain evaluation (inference), run on first use, then reused."""

    class _Lazy(dict):
        def __missing__(self, name: str) -> pathlib.Path:
            self[name] = run_bundle_eval(prepared_bundles[name], tmp_path_factory.mktemp(f"plain_{name}"))
            return self[name]

    return _Lazy()
