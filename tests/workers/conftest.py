"""Fixtures of the worker tests: one tiny model and dataset, and one scored synthetic set made from them by
the real generation worker (transformers engine), each built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from spin_k8s.workers import generate, tiny

from .helpers import generate_args


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> tiny.TinyAssets:
    return tiny.create(tmp_path_factory.mktemp("tiny"), rows=24, seed=0)


@pytest.fixture(scope="session")
def synthetic(tiny_assets: tiny.TinyAssets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two shards of synthetic responses with reference log-probs, as iteration 0's generation Job writes."""
    out = tmp_path_factory.mktemp("synthetic")
    for shard in (0, 1):
        code = generate.main(generate_args(tiny_assets, out, "--num-shards", "2", "--shard-index", str(shard),
                                           "--score-reference"))
        assert code == 0
    return out
