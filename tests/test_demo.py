"""The demo end to end in quick mode (one seed, two SPIN iterations through the local executor with the real
workers), then its report, plot and lineage; and the command line on its own."""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any

import pytest

from spin_k8s import lineage, naming, storage
from spin_k8s.demo import __main__ as cli
from spin_k8s.demo import experiment, report

ITERATIONS = 2


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], list[str]]:
    out = tmp_path_factory.mktemp("demo") / "out"
    events: list[str] = []
    doc = experiment.run_demo(out, [0], ITERATIONS, quick=True, on_event=events.append)
    return out, doc, events


def test_every_arm_has_every_iteration_with_exact_metrics(demo: tuple[Path, dict[str, Any], list[str]]) -> None:
    out, doc, events = demo
    (seed,) = doc["seeds"]
    start = seed["spin"][0]
    for arm in report.ARMS:
        assert [p["iteration"] for p in seed[arm]] == list(range(ITERATIONS + 1))
        assert seed[arm][0] == start  # every arm starts from the one SFT model
        for point in seed[arm]:
            parts = sum(point[f"invalid/{c}"] for c in report.CONSTRAINTS)
            assert parts == pytest.approx(point["invalid"], abs=1e-9)
            assert point["valid"] + point["invalid"] == pytest.approx(1.0, abs=1e-6)
            assert point["invalid"] / 2 <= point["tv"] <= 1
            assert point["nll"] == pytest.approx(seed["entropy"] + point["kl"], abs=1e-6)
            assert point["temperatures"]["1.0"]["tv"] == point["tv"]
    # equal training compute: the continued-SFT arms forwarded as many sequences in as many steps as SPIN
    for t in range(1, ITERATIONS + 1):
        spin = seed["spin"][t]
        assert spin["sequences"] == 2 * spin["steps"] * experiment.default_settings(quick=True).global_batch
        for arm in ("sft-lr", "sft-spinopt"):
            assert (seed[arm][t]["steps"], seed[arm][t]["sequences"]) == (spin["steps"], spin["sequences"])
        assert 0 <= spin["rewards/accuracies"] <= 1 and math.isfinite(spin["loss"])
        assert spin["rewards/margins"] == pytest.approx(spin["rewards/real"] - spin["rewards/generated"], abs=1e-6)
        # the scored model is the one the run's iteration t - 1 trained
        assert spin["model"] == storage.parse(naming.model_uri(seed["prefix"], t - 1)).key
    assert seed["precondition"]["rounds"] and isinstance(seed["precondition"]["met"], bool)
    markdown = (out / "report.md").read_text()
    assert doc["conclusion"] in markdown
    assert "| SPIN | 2 |" in markdown and "| continued SFT (SPIN's lr) | 2 |" in markdown
    assert any("SPIN iteration 1: TV" in e for e in events)
    assert not any("] step " in e for e in events)  # per-step lines are summarised, not forwarded


def test_plot_is_a_png(demo: tuple[Path, dict[str, Any], list[str]]) -> None:
    raw = (demo[0] / "demo.png").read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", raw[16:24])  # the IHDR chunk comes first
    assert (width, height) == (1500, 800)
    assert len(raw) > 40_000  # six panels of lines, not a blank canvas


def test_lineage_records_every_iteration(demo: tuple[Path, dict[str, Any], list[str]]) -> None:
    (seed,) = demo[1]["seeds"]
    root = Path(storage.parse(seed["prefix"]).key)
    steps = lineage.load(lineage.FileStore(root))
    assert sorted(steps) == [(t, role) for t in range(ITERATIONS) for role in (naming.GENERATE, naming.TRAIN)]
    for t in range(ITERATIONS):
        for shard in steps[(t, naming.GENERATE)]["shards"]:
            assert shard["sha256"] == storage.sha256_bytes(storage.read_bytes(shard["uri"]))
        # SPIN's sanity check: at its first step the policy is its reference, so the loss is ln 2
        assert steps[(t, naming.TRAIN)]["metrics"]["history"][0]["loss"] == pytest.approx(math.log(2), abs=1e-4)


def test_command_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_help:
        cli.main(["--help"])
    assert exit_help.value.code == 0
    assert "--seeds 0,1,2" in capsys.readouterr().out
    assert cli.seeds("0,1,2") == [0, 1, 2]
    with pytest.raises(SystemExit):
        cli.main(["--out", str(tmp_path), "--seeds", "1,1"])
    (tmp_path / "old").write_text("x")
    assert cli.main(["--out", str(tmp_path)]) == 1  # a used directory is refused, not overwritten
    assert "not empty" in capsys.readouterr().err
