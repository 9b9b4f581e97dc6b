"""The spec fields that choose between the authors' settings and ours (issue 13): promptFormat, greedy decoding,
systemPrompt, scheduleEpochs, lengthGrouping, maxResponseLength. Each travels from the SpinRun through
``spinctl start --dry-run`` (the controller's own Job builders), the kubelet's ``$(VAR)`` expansion, to the
workers' parsed settings, and into the lineage record; generation and training always get the same template."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from spin_k8s import api, lineage, local, naming, planner
from spin_k8s.cli import main
from spin_k8s.workers import data, generate, train

SPEC = {"model": "s3://models/sft", "dataset": "s3://data/sft.jsonl", "iterations": 2,
        "storage": {"uri": "s3://runs/spin"}}
# A system prompt a shell or the kubelet could misread: a leading "-", a $(VAR) reference, a "$$".
SYSTEM = "-be brief; $(HOME) costs $$5"


def dry_run(spec: dict[str, Any], tmp_path: Path) -> tuple[dict[str, Any], list[str], list[str]]:
    """The SpinRun and the generation and training workers' arguments, as ``spinctl start --dry-run`` prints
    them and the kubelet then expands them (HOME and JOB_COMPLETION_INDEX defined, as in a pod)."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "demo"},
                                    "spec": spec}))
    result = CliRunner().invoke(main, ["start", "-f", str(path), "--dry-run", "-o", "yaml"], env={"KUBECONFIG": ""},
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run, gen, _, trainer = yaml.safe_load_all(result.output)
    env = {"HOME": "/root", "JOB_COMPLETION_INDEX": "0"}

    def argv(job: dict[str, Any], module: str) -> list[str]:
        container = job["spec"]["template"]["spec"]["containers"][0]
        full = [local.expand(a, env) for a in container["command"] + container["args"]]
        return full[full.index(module) + 1:]

    return run, argv(gen, "spin_k8s.workers.generate"), argv(trainer, "spin_k8s.workers.train")


def test_unset_the_workers_get_our_defaults(tmp_path: Path) -> None:
    _, gen_args, train_args = dry_run(SPEC, tmp_path)
    g, t = generate.settings_from_args(gen_args), train.settings_from_args(train_args)
    assert "--system-prompt" not in " ".join(gen_args + train_args)
    for settings in (g, t):
        assert (settings.prompt_format, settings.system_prompt, settings.max_response_length) == (
            "chatTemplate", None, 1024 - 512)
    assert (g.temperature, g.top_p) == (1.0, 1.0)
    assert (t.epochs, t.schedule_epochs, t.length_grouping) == (2, 2, True)
    assert train.schedule_steps(t, per_epoch=10) == (20, 20)  # the schedule ends where training does


def test_the_authors_settings_reach_both_workers_intact(tmp_path: Path) -> None:
    spec = {**SPEC, "data": {"systemPrompt": SYSTEM}, "generation": {"temperature": 0},
            "training": {"epochs": 2, "scheduleEpochs": 6, "lengthGrouping": False, "maxResponseLength": 300}}
    run, gen_args, train_args = dry_run(spec, tmp_path)
    assert run["spec"]["data"]["systemPrompt"] == SYSTEM  # the SpinRun itself is not escaped
    g, t = generate.settings_from_args(gen_args), train.settings_from_args(train_args)
    for settings in (g, t):
        assert (settings.prompt_format, settings.system_prompt, settings.max_response_length) == (
            "chatTemplate", SYSTEM, 300)
    assert g.temperature == 0.0  # greedy, in both engines
    assert (t.epochs, t.schedule_epochs, t.length_grouping) == (2, 6, False)
    assert train.schedule_steps(t, per_epoch=10) == (20, 60)  # stops at a third of the schedule

    spec = {**SPEC, "generation": {"promptFormat": "paperInstruction"}, "data": {"systemPrompt": ""}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "d"},
                                    "spec": spec}))
    result = CliRunner().invoke(main, ["start", "-f", str(path), "--dry-run"], env={"KUBECONFIG": ""})
    assert result.exit_code == 1 and "spec.data.systemPrompt: the paperInstruction prompt has no system turn" in \
        result.output
    del spec["data"]
    _, gen_args, train_args = dry_run(spec, tmp_path)
    assert [generate.settings_from_args(gen_args).prompt_format, train.settings_from_args(train_args).prompt_format] \
        == ["paperInstruction"] * 2


def test_an_empty_system_prompt_is_an_argument_of_its_own(tmp_path: Path) -> None:
    """"" must reach the workers as "" (an empty system turn), not vanish into "no system turn"."""
    _, gen_args, train_args = dry_run({**SPEC, "data": {"systemPrompt": ""}}, tmp_path)
    assert "--system-prompt=" in gen_args and "--system-prompt=" in train_args
    assert generate.settings_from_args(gen_args).system_prompt == ""
    assert train.settings_from_args(train_args).system_prompt == ""


@pytest.mark.parametrize(("argv", "message"), [
    (["--epochs", "3", "--schedule-epochs", "2"], "need --schedule-epochs >= --epochs"),
    (["--prompt-format", "paperInstruction", "--system-prompt="], "has no system turn"),
    (["--max-response-length", "-1"], "need --max-response-length >= 0"),
])
def test_the_training_worker_refuses_settings_without_meaning(argv: list[str], message: str) -> None:
    with pytest.raises(Exception, match=message):
        train.settings_from_args(["--model", "m", "--output", "o", "--synthetic", "0=s", *argv])


def test_lineage_records_the_settings_and_the_samples_cut_at_the_token_limit() -> None:
    obj = {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "demo", "uid": "u-1"},
           "spec": {**SPEC, "generation": {"promptFormat": "paperInstruction", "temperature": 0},
                    "training": {"scheduleEpochs": 6, "lengthGrouping": False}}}
    run = api.parse(api.load_defaulted(obj))
    prefix = "s3://runs/spin/default/demo/u-1"
    gen = planner.JobView(naming.job_name("demo", 0, naming.GENERATE), "g", 0, naming.GENERATE, 0, "complete")
    record = planner.generate_record(run, prefix, gen, {"shards": [], "lengthStopped": 7})
    assert {k: record["config"][k] for k in ("promptFormat", "systemPrompt", "temperature", "maxResponseLength")} == {
        "promptFormat": "paperInstruction", "systemPrompt": None, "temperature": 0.0, "maxResponseLength": 512}
    assert record["lengthStopped"] == 7
    trainer = planner.JobView(naming.job_name("demo", 0, naming.TRAIN, 0), "t", 0, naming.TRAIN, 0, "complete")
    config = planner.train_record(run, prefix, trainer, {})["config"]
    assert (config["epochs"], config["scheduleEpochs"], config["lengthGrouping"]) == (2, 6, False)


def test_lineage_reads_the_cut_samples_of_every_shard(tmp_path: Path) -> None:
    obj = {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "demo", "uid": "u-1"},
           "spec": {**SPEC, "generation": {"shards": 2}}}
    run = api.parse(api.load_defaulted(obj))
    store = lineage.FileStore(tmp_path)
    for shard, cut in ((0, 3), (1, 4)):
        record = data.ShardRecord(shard=shard, num_shards=2, rows=10, sha256="0" * 64, engine="vllm",
                                  engine_version="0", sampling={}, model="m", model_digest="d", scored=True,
                                  max_prompt_length=512, max_length=1024, data="d", length_stopped=cut)
        store.put(f"i0/synthetic/{data.done_name(shard, 2)}", record.to_json().encode(), etag=None)
    gen = planner.JobView(naming.job_name("demo", 0, naming.GENERATE), "g", 0, naming.GENERATE, 0, "complete")
    output = lineage.step_outputs(store, run, "s3://runs/spin/default/demo/u-1", [gen], {})[(0, naming.GENERATE)]
    assert output is not None
    assert [s["lengthStopped"] for s in output["shards"]] == [3, 4] and output["lengthStopped"] == 7
