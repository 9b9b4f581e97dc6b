"""The demo's report: per-seed results -> one document (``build``), shown as markdown tables (``markdown``)
and a plot (``plot``) of held-out score, training-problem score and SPIN's reward margins and accuracies per
iteration, SPIN against continued SFT, each seed thin and their mean thick.

A result point (one model) is a dict with ``arm`` ("spin" or "sft"), ``iteration`` (0 = the SFT model both
arms start from), ``heldout`` and ``train`` exact match; SPIN points after iteration 0 also carry the paper's
metrics (``experiment.PAPER_METRICS``), and every trained point its compute (steps, sequences, tokens).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ARMS = ("spin", "sft")
ARM_NAMES = {"spin": "SPIN", "sft": "continued SFT"}
REWARDS = ("loss", "rewards/real", "rewards/generated", "rewards/margins", "rewards/accuracies")


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def _std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def mean_curves(results: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, float]]]:
    """Per arm and iteration, the mean (and ``*_std``) over seeds of every numeric field the points share."""
    out: dict[str, list[dict[str, float]]] = {}
    for arm in ARMS:
        curve = []
        for points in zip(*(r[arm] for r in results), strict=True):
            keys = [k for k, v in points[0].items() if isinstance(v, int | float) and k != "iteration"]
            row: dict[str, float] = {"iteration": points[0]["iteration"]}
            for k in keys:
                values = [float(p[k]) for p in points if k in p]
                row[k], row[f"{k}_std"] = _mean(values), _std(values)
            curve.append(row)
        out[arm] = curve
    return out


def conclusion(results: Sequence[dict[str, Any]]) -> str:
    """One honest sentence on the last iteration: the two arms' mean held-out scores and the per-seed wins."""
    means = mean_curves(results)
    start, spin, sft = means["spin"][0]["heldout"], means["spin"][-1]["heldout"], means["sft"][-1]["heldout"]
    wins = sum(r["spin"][-1]["heldout"] > r["sft"][-1]["heldout"] for r in results)
    ties = sum(r["spin"][-1]["heldout"] == r["sft"][-1]["heldout"] for r in results)
    n = len(results)
    last = means["spin"][-1]["iteration"]
    if abs(spin - sft) < 1e-9:
        verdict = "the two arms tie"
    else:
        ahead, behind = ("SPIN", "continued SFT") if spin > sft else ("continued SFT", "SPIN")
        verdict = f"{ahead} is ahead of {behind} by {abs(spin - sft) * 100:.1f} points"
    return (f"After {last} iteration(s), mean held-out exact match over {n} seed(s): SFT start {start:.1%}, "
            f"SPIN {spin:.1%}, continued SFT (same training compute) {sft:.1%}; {verdict}; SPIN scores higher on "
            f"{wins} of {n} seed(s){f' ({ties} tied)' if ties else ''}.")


def build(results: Sequence[dict[str, Any]], settings: dict[str, Any], seconds: float,
          machine: dict[str, Any]) -> dict[str, Any]:
    return {"settings": settings, "seconds": seconds, "machine": machine, "seeds": list(results),
            "mean": mean_curves(results), "conclusion": conclusion(results)}


def _pct(value: float, std: float | None = None) -> str:
    return f"{value:.1%}" if not std else f"{value:.1%} ± {std * 100:.1f}"


def _loads(values: Sequence[float]) -> str:
    return ", ".join(f"{x:.1f}" for x in values)


def markdown(doc: dict[str, Any]) -> str:
    """The report as markdown: the conclusion, a mean table, one table per seed, the compute and the machine."""
    mean = doc["mean"]
    n = len(doc["seeds"])
    lines = [
        "# SPIN demo: small-integer arithmetic", "", doc["conclusion"], "",
        f"## Mean over {n} seed(s) (± standard deviation)", "",
        "| iteration | SPIN held-out | continued SFT held-out | SPIN train problems | continued SFT train problems "
        "| SPIN margin | SPIN reward accuracy |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for spin, sft in zip(mean["spin"], mean["sft"], strict=True):
        margin = f"{spin['rewards/margins']:+.3f}" if "rewards/margins" in spin else "-"
        accuracy = f"{spin['rewards/accuracies']:.3f}" if "rewards/accuracies" in spin else "-"
        lines.append(f"| {int(spin['iteration'])} | {_pct(spin['heldout'], spin['heldout_std'])} "
                     f"| {_pct(sft['heldout'], sft['heldout_std'])} | {_pct(spin['train'])} | {_pct(sft['train'])} "
                     f"| {margin} | {accuracy} |")
    for r in doc["seeds"]:
        lines += ["", f"## Seed {r['seed']}", "",
                  "| iteration | SPIN held-out | SPIN train problems | continued SFT held-out "
                  "| continued SFT train problems | loss | rewards/real | rewards/generated | rewards/margins "
                  "| rewards/accuracies | opponent samples correct | steps | sequences |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for spin, sft in zip(r["spin"], r["sft"], strict=True):
            rewards = " | ".join(f"{spin[k]:.4f}" if k in spin else "-" for k in REWARDS)
            sampled = _pct(spin["opponent_correct"]) if "opponent_correct" in spin else "-"
            lines.append(f"| {spin['iteration']} | {_pct(spin['heldout'])} | {_pct(spin['train'])} "
                         f"| {_pct(sft['heldout'])} | {_pct(sft['train'])} | {rewards} | {sampled} "
                         f"| {spin.get('steps', '-')} | {spin.get('sequences', '-')} |")
        lines += ["", f"{r['seconds']:.0f} s for this seed, {r['spin_seconds']:.0f} s of them in the SPIN run. "
                  f"Lineage: `{r['manifest']}`", "", "Held-out answers of the last SPIN model:", ""]
        lines += [f"- `{prompt}` -> `{answer}` ({verdict})" for prompt, answer, verdict in r["spin"][-1]["samples"]]
    m = doc["machine"]
    lines += ["", "## Compute and machine", "",
              "SPIN metrics are the means over each iteration's last epoch of training steps (lineage train "
              "record). *Opponent samples correct*: the share of the iteration's newest synthetic answers (sampled "
              "by the model it starts from) that are right; those pairs hold the same response twice, give no "
              "gradient and count as not accurate, so they cap the reward accuracy. Continued SFT runs, per SPIN "
              "iteration, SPIN's number of optimizer steps with as many "
              "human sequences per step as SPIN's step forwarded (real + generated), so both arms train on the "
              "same number of sequences; SPIN's generation is extra compute, not charged to it.", "",
              f"Total {doc['seconds']:.0f} s on {m['cpus']} CPU(s); load average (1, 5, 15 min) before "
              f"{_loads(m['load_before'])}, after {_loads(m['load_after'])}.",
              "", f"Settings: `{json.dumps(doc['settings'], sort_keys=True)}`", ""]
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: Path) -> Path:
    """A 2x2 PNG: held-out and training-problem exact match per arm, SPIN's reward margins and accuracies."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    colors = {"spin": "tab:blue", "sft": "tab:orange"}
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), constrained_layout=True)
    panels = [(axes[0][0], "heldout", ARMS, "held-out exact match"),
              (axes[0][1], "train", ARMS, "exact match on training problems"),
              (axes[1][0], "rewards/margins", ("spin",), "SPIN reward margin (last-epoch mean)"),
              (axes[1][1], "rewards/accuracies", ("spin",), "SPIN reward accuracy (last-epoch mean)")]
    for ax, key, arms, title in panels:
        for arm in arms:
            for r in doc["seeds"]:
                pts = [p for p in r[arm] if key in p]
                ax.plot([p["iteration"] for p in pts], [p[key] for p in pts], color=colors[arm], alpha=0.3,
                        linewidth=1)
            mean = [p for p in doc["mean"][arm] if key in p]
            ax.plot([p["iteration"] for p in mean], [p[key] for p in mean], color=colors[arm], linewidth=2.5,
                    marker="o", label=f"{ARM_NAMES[arm]} (mean of {len(doc['seeds'])})")
        ax.set_title(title)
        ax.set_xlabel("iteration (0 = SFT model)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("SPIN vs continued SFT on small-integer arithmetic (thin: seeds, thick: mean)")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write(doc: dict[str, Any], out: Path) -> None:
    (out / "report.json").write_text(json.dumps(doc, indent=2))
    (out / "report.md").write_text(markdown(doc))
    plot(doc, out / "demo.png")
