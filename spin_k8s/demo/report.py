"""The demo's report: per-seed results -> one document (``build``), shown as markdown (``markdown``) and a plot
(``plot``) of every exact metric per iteration for every arm, each seed thin, their mean thick, the spread
shaded.

A result point (one model) is a dict with ``arm``, ``iteration`` (0 = the converged SFT model every arm starts
from) and the exact metrics of ``evaluate.exact`` at T = 1 (``tv``, ``invalid``, ``invalid/<constraint>``,
``kl``, ``nll``, ``copy``, ``copy_data``, ``valid``), ``validation_nll``, and ``temperatures`` (the same metrics
per sampling temperature); SPIN points after iteration 0 also carry the paper's quantities on held-out pairs
(``PAPER``) and their training-time means (``train/...``), trained points their compute.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ARMS = ("spin", "sft-lr", "sft-spinopt")
ARM_NAMES = {"spin": "SPIN", "sft-lr": "continued SFT (SFT lr)", "sft-spinopt": "continued SFT (SPIN's lr)",
             "sft": "SFT"}
CONSTRAINTS = ("format", "category", "exclusion", "repeat", "count")
# The paper's quantities, named as the authors log them.
PAPER = ("loss", "rewards/real", "rewards/generated", "rewards/margins", "rewards/accuracies")


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


def best_temperature(point: dict[str, Any]) -> tuple[float, dict[str, float]]:
    """The sampling temperature with the lowest TV distance, and its metrics (an oracle's pick: the baseline
    gets the temperature that suits it best)."""
    t, metrics = min(point["temperatures"].items(), key=lambda kv: kv[1]["tv"])
    return float(t), metrics


def comparison(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """SPIN's last model against each baseline on TV distance: per-seed paired differences (baseline - SPIN,
    positive: SPIN is closer to p_data), their mean and spread, and on how many seeds SPIN is closer."""
    baselines: dict[str, list[float]] = {"sft": [], "sft-temperature": [], "sft-lr": [], "sft-spinopt": []}
    spin, temperatures = [], []
    for r in results:
        last = r["spin"][-1]["tv"]
        spin.append(last)
        t, best = best_temperature(r["spin"][0])
        temperatures.append(t)
        for name, tv in (("sft", r["spin"][0]["tv"]), ("sft-temperature", best["tv"]),
                         ("sft-lr", r["sft-lr"][-1]["tv"]), ("sft-spinopt", r["sft-spinopt"][-1]["tv"])):
            baselines[name].append(tv - last)
    return {"spin_tv": _mean(spin), "spin_tv_std": _std(spin), "best_temperatures": temperatures,
            "seeds": len(results),
            "against": {name: {"tv": _mean([d + s for d, s in zip(diffs, spin, strict=True)]),
                               "gain": _mean(diffs), "gain_std": _std(diffs),
                               "spin_closer": sum(d > 0 for d in diffs)} for name, diffs in baselines.items()}}


BASELINE_NAMES = {"sft": "the converged SFT model", "sft-temperature": "the SFT model at its best temperature",
                  "sft-lr": "continued SFT at the SFT learning rate",
                  "sft-spinopt": "continued SFT with SPIN's optimizer and learning rate"}


def conclusion(results: Sequence[dict[str, Any]]) -> str:
    """Plain sentences: the precondition, then SPIN against every baseline on TV distance, with the spread."""
    c = comparison(results)
    n = c["seeds"]
    met = sum(r["precondition"]["met"] for r in results)
    head = (f"Precondition (continued SFT does not improve the SFT model) met on {met} of {n} seed(s)"
            + ("." if met == n else ": where it is not, the comparison does not test the paper's claim."))
    last = int(results[0]["spin"][-1]["iteration"])
    parts = []
    for name, a in c["against"].items():
        verb = "closer to" if a["gain"] > 0 else "farther from"
        parts.append(f"{BASELINE_NAMES[name]} {a['tv']:.4f} (SPIN {verb} p_data by {abs(a['gain']):.4f} "
                     f"± {a['gain_std']:.4f}, on {a['spin_closer']} of {n} seed(s))")
    temps = ", ".join(f"{t:g}" for t in c["best_temperatures"])
    return (f"{head} TV distance to p_data after {last} SPIN iteration(s), mean over {n} seed(s): SPIN "
            f"{c['spin_tv']:.4f} ± {c['spin_tv_std']:.4f}; " + "; ".join(parts)
            + f". Best SFT temperature per seed: {temps}.")


def build(results: Sequence[dict[str, Any]], settings: dict[str, Any], seconds: float,
          machine: dict[str, Any]) -> dict[str, Any]:
    return {"settings": settings, "seconds": seconds, "machine": machine, "seeds": list(results),
            "mean": mean_curves(results), "comparison": comparison(results), "conclusion": conclusion(results)}


def _pm(row: dict[str, float], key: str, digits: int = 4, percent: bool = False) -> str:
    value, std = row[key], row.get(f"{key}_std", 0.0)
    if percent:
        return f"{value:.1%} ± {std * 100:.1f}" if std else f"{value:.1%}"
    return f"{value:.{digits}f} ± {std:.{digits}f}" if std else f"{value:.{digits}f}"


def _loads(values: Sequence[float]) -> str:
    return ", ".join(f"{x:.1f}" for x in values)


def markdown(doc: dict[str, Any]) -> str:
    """The report as markdown: the conclusion, the mean tables, the temperature arm, per-seed detail, the
    precondition and the machine."""
    mean, seeds = doc["mean"], doc["seeds"]
    n = len(seeds)
    lines = ["# SPIN demo: a converged SFT model on a task with a known distribution", "", doc["conclusion"], "",
             f"## Exact metrics at T = 1, mean ± standard deviation over {n} seed(s)", "",
             "TV: total-variation distance to p_data (the referee); invalid: the model's mass on invalid answers; "
             "KL: KL(p_data || model); NLL: expected NLL of a fresh human answer (entropy of p_data "
             f"{_mean([r['entropy'] for r in seeds]):.4f}); copy: mass on answers in the training set "
             "(p_data's own: *copy data*).", "",
             "| arm | iteration | TV | invalid | KL | NLL | validation NLL | copy | copy data |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for arm in ARMS:
        for row in mean[arm]:
            if arm != "spin" and row["iteration"] == 0:
                continue  # the same SFT model in every arm: shown once
            name = ARM_NAMES["sft" if row["iteration"] == 0 else arm]
            lines.append(f"| {name} | {int(row['iteration'])} | {_pm(row, 'tv')} | {_pm(row, 'invalid', percent=True)} "
                         f"| {_pm(row, 'kl')} | {_pm(row, 'nll')} | {_pm(row, 'validation_nll')} "
                         f"| {_pm(row, 'copy', percent=True)} | {_pm(row, 'copy_data', percent=True)} |")
    lines += ["", "## The SFT model sampled at lower temperatures (no training)", "",
              "| T | TV | invalid | KL | copy |", "| --- | --- | --- | --- | --- |"]
    for t in seeds[0]["spin"][0]["temperatures"]:
        rows = [r["spin"][0]["temperatures"][t] for r in seeds]
        row = {k: _mean([x[k] for x in rows]) for k in rows[0]} | {
            f"{k}_std": _std([x[k] for x in rows]) for k in rows[0]}
        lines.append(f"| {t} | {_pm(row, 'tv')} | {_pm(row, 'invalid', percent=True)} | {_pm(row, 'kl')} "
                     f"| {_pm(row, 'copy', percent=True)} |")
    lines += ["", "## Invalid mass by the constraint broken first (T = 1, mean)", "",
              "| arm | iteration | " + " | ".join(CONSTRAINTS) + " |", "| --- | --- |" + " --- |" * len(CONSTRAINTS)]
    for arm in ARMS:
        for row in mean[arm]:
            if arm != "spin" and row["iteration"] == 0:
                continue
            cells = " | ".join(f"{row[f'invalid/{c}']:.1%}" for c in CONSTRAINTS)
            name = ARM_NAMES["sft" if row["iteration"] == 0 else arm]
            lines.append(f"| {name} | {int(row['iteration'])} | {cells} |")
    lines += ["", "## SPIN: the paper's quantities", "",
              "On fresh held-out pairs (a human answer against a sample of the iteration's opponent, scored by the "
              "new model against the opponent), and as the training steps logged them (means over the iteration's "
              "last epoch). *identical*: held-out pairs whose sample equals the human answer.", "",
              "| iteration | " + " | ".join(PAPER) + " | identical | train loss | train accuracy |",
              "| --- |" + " --- |" * (len(PAPER) + 3)]
    for row in mean["spin"][1:]:
        cells = " | ".join(_pm(row, k) for k in PAPER)
        lines.append(f"| {int(row['iteration'])} | {cells} | {_pm(row, 'identical', percent=True)} "
                     f"| {_pm(row, 'train/loss')} | {_pm(row, 'train/rewards/accuracies')} |")
    lines += ["", "## Per seed: TV after each iteration", "", "| seed | " + " | ".join(ARM_NAMES[a] for a in ARMS)
              + " | SFT at best T | precondition |", "| --- |" + " --- |" * (len(ARMS) + 2)]
    for r in seeds:
        cells = " | ".join(" -> ".join(f"{p['tv']:.4f}" for p in r[arm]) for arm in ARMS)
        t, best = best_temperature(r["spin"][0])
        pre = r["precondition"]
        rounds = len(pre["rounds"])
        verdict = ("met" if pre["met"] else "NOT met") + (f" after {rounds} rounds" if rounds > 1 else "")
        lines.append(f"| {r['seed']} | {cells} | {best['tv']:.4f} (T {t:g}) | {verdict} |")
    lines += ["", "## The precondition, per seed", ""]
    for r in seeds:
        start = r["spin"][0]
        runs = ", ".join(f"{x['best_step']} of {x['steps']}" for x in start["sft_runs"])
        lines.append(f"- seed {r['seed']}: SFT runs kept the step with the lowest validation NLL ({runs}); "
                     + "; ".join(f"round {k}: " + (", ".join(f"{name}: {'; '.join(ways)}"
                                                             for name, ways in rd["improved_by"].items())
                                                   or "no continued-SFT model improves beyond the tolerances")
                                 for k, rd in enumerate(r["precondition"]["rounds"])))
    m = doc["machine"]
    settings = doc["settings"]
    per_seed = ", ".join(f"seed {r['seed']}: {r['seconds']:.0f} s" for r in seeds)
    lines += ["", "## Compute and machine", "",
              "Per SPIN iteration, continued SFT runs SPIN's optimizer steps with twice SPIN's global batch of human "
              "sequences (SPIN forwards a real and a generated sequence per pair): sequences per iteration "
              + ", ".join(str(p.get("sequences", "-")) for p in seeds[0]["spin"][1:])
              + ". SPIN's generation is extra, not charged to it.", "",
              f"Total {doc['seconds']:.0f} s on {m['cpus']} CPU(s) "
              f"({per_seed}); load average (1, 5, 15 min) "
              f"before {_loads(m['load_before'])}, after {_loads(m['load_after'])}.", "",
              f"Settings: `{json.dumps(settings, sort_keys=True)}`", ""]
    return "\n".join(lines)


PANELS = (("tv", "TV distance to p_data"), ("invalid", "invalid mass"), ("kl", "KL(p_data || model), nats"),
          ("validation_nll", "validation NLL per answer, nats"), ("copy", "mass on training answers"),
          ("rewards/accuracies", "SPIN held-out reward accuracy"))
COLORS = {"spin": "tab:blue", "sft-lr": "tab:orange", "sft-spinopt": "tab:green"}


def plot(doc: dict[str, Any], path: Path) -> Path:
    """A 2x3 PNG: each metric of ``PANELS`` per iteration and arm (thin: seeds, thick: mean, shade: ± std),
    with the SFT model at its best temperature as a dashed line on the TV and invalid panels."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    seeds, mean = doc["seeds"], doc["mean"]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    for ax, (key, title) in zip(axes.flat, PANELS, strict=True):
        for arm in ARMS:
            rows = [row for row in mean[arm] if key in row]
            if not rows:
                continue
            for r in seeds:
                pts = [p for p in r[arm] if key in p]
                ax.plot([p["iteration"] for p in pts], [p[key] for p in pts], color=COLORS[arm], alpha=0.3, lw=1)
            x = [row["iteration"] for row in rows]
            y = [row[key] for row in rows]
            sd = [row[f"{key}_std"] for row in rows]
            ax.fill_between(x, [a - b for a, b in zip(y, sd, strict=True)], [a + b for a, b in zip(y, sd, strict=True)],
                            color=COLORS[arm], alpha=0.12)
            ax.plot(x, y, color=COLORS[arm], lw=2.5, marker="o", label=ARM_NAMES[arm])
        if key in ("tv", "invalid"):
            best = _mean([best_temperature(r["spin"][0])[1][key] for r in seeds])
            ax.axhline(best, color="gray", ls="--", label="SFT at its best temperature")
        ax.set_title(title)
        ax.set_xlabel("iteration (0 = converged SFT model)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"SPIN vs continued SFT vs temperature, exact metrics ({len(seeds)} seed(s): thin lines; "
                 "mean thick, ± std shaded)")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write(doc: dict[str, Any], out: Path) -> None:
    (out / "report.json").write_text(json.dumps(doc, indent=2))
    (out / "report.md").write_text(markdown(doc))
    plot(doc, out / "demo.png")
