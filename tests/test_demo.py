"""The demo end to end in quick mode (one seed, two SPIN iterations through the local executor, the real
workers), then its report, plot and lineage; and the report's pure parts and the command line on their own."""

from __future__ import annotations

import math
import shutil
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


def test_report_has_every_iteration_with_metrics_and_scores(demo: tuple[Path, dict[str, Any], list[str]]) -> None:
    out, doc, events = demo
    (seed,) = doc["seeds"]
    assert [p["iteration"] for p in seed["spin"]] == [p["iteration"] for p in seed["sft"]] == [0, 1, 2]
    assert seed["spin"][0] == seed["sft"][0]  # both arms start from the one SFT model
    for point in seed["spin"] + seed["sft"]:
        assert 0 <= point["heldout"] <= 1 and 0 <= point["train"] <= 1
    for t, point in enumerate(seed["spin"][1:]):
        assert all(math.isfinite(point[k]) for k in experiment.PAPER_METRICS)
        assert point["rewards/margins"] == pytest.approx(point["rewards/real"] - point["rewards/generated"])
        assert 0 <= point["rewards/accuracies"] <= 1
        assert 0 <= point["opponent_correct"] <= 1
        # the scored model is the one the run's iteration t trained
        assert point["model"] == storage.parse(naming.model_uri(seed["prefix"], t)).key
        # equal training compute: continued SFT forwarded as many sequences in as many steps
        baseline = seed["sft"][t + 1]
        assert (baseline["steps"], baseline["sequences"]) == (point["steps"], point["sequences"]) != (0, 0)
    markdown = (out / "report.md").read_text()
    for t in range(ITERATIONS + 1):
        assert f"\n| {t} |" in markdown
    assert doc["conclusion"] in markdown
    assert any("SPIN iteration 1: held-out" in e for e in events)
    assert not any("] step " in e for e in events)  # per-step lines are summarised, not forwarded


def test_plot_is_a_png(demo: tuple[Path, dict[str, Any], list[str]]) -> None:
    raw = (demo[0] / "demo.png").read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", raw[16:24])  # the IHDR chunk comes first
    assert (width, height) == (1100, 800)
    assert len(raw) > 20_000  # four panels of lines, not a blank canvas


def checkpoint_digest(model: Path, scratch: Path) -> str:
    """``storage.digest_dir`` of the checkpoint as the trainer hashed it: before it added metrics.json."""
    shutil.copytree(model, scratch, ignore=shutil.ignore_patterns("metrics.json"))
    return storage.digest_dir(scratch)


def test_lineage_records_every_iteration(demo: tuple[Path, dict[str, Any], list[str]], tmp_path: Path) -> None:
    (seed,) = demo[1]["seeds"]
    root = Path(storage.parse(seed["prefix"]).key)
    steps = lineage.load(lineage.FileStore(root))
    assert sorted(steps) == [(t, role) for t in range(ITERATIONS) for role in (naming.GENERATE, naming.TRAIN)]
    for t in range(ITERATIONS):
        shards = steps[(t, naming.GENERATE)]["shards"]
        assert shards
        for shard in shards:
            assert shard["sha256"] == storage.sha256_bytes(storage.read_bytes(shard["uri"]))
        train = steps[(t, naming.TRAIN)]
        model = Path(storage.parse(naming.model_uri(seed["prefix"], t)).key)
        assert train["checkpointDigest"] == checkpoint_digest(model, tmp_path / f"i{t}")
        # SPIN's sanity check: at its first step the policy is its reference, so the loss is ln 2
        assert train["metrics"]["history"][0]["loss"] == pytest.approx(math.log(2), abs=1e-4)


def test_conclusion_names_the_arm_ahead() -> None:
    def seed(spin: float, sft: float) -> dict[str, Any]:
        start = {"iteration": 0, "heldout": 0.1, "train": 0.2}
        return {"spin": [start, {"iteration": 1, "heldout": spin, "train": 0.5, "rewards/margins": 0.2}],
                "sft": [start, {"iteration": 1, "heldout": sft, "train": 0.6}]}

    text = report.conclusion([seed(0.30, 0.20), seed(0.10, 0.40)])
    assert "SPIN 20.0%" in text and "continued SFT (same training compute) 30.0%" in text
    assert "continued SFT is ahead of SPIN by 10.0 points" in text
    assert "SPIN scores higher on 1 of 2 seed(s)" in text
    mean = report.mean_curves([seed(0.30, 0.20), seed(0.10, 0.40)])
    assert mean["spin"][1]["heldout_std"] == pytest.approx(0.1414, abs=1e-4)


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
