"""The report's pictures (matplotlib, Agg, small PNGs): one figure per question, transcoder sets overlaid."""

from __future__ import annotations

from pathlib import Path

DPI = 72
MAX_POINTS = 1500  # scatter points per panel


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, pil_kwargs={"optimize": True})
    _plt().close(fig)
    return path


def _finish(axes, xlabel: str) -> None:
    for ax in axes:
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)


def plot_scores(runs: dict[str, tuple[dict, list[dict]]], path: Path) -> Path:
    """Per-prompt replacement and completeness scores, unpruned and pruned, and path lengths (box plots)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), gridspec_kw={"width_ratios": [3, 1]})
    keys = ("replacement", "replacement_pruned", "completeness", "completeness_pruned")
    data, labels = [], []
    for k in keys:
        for name, (_, res) in runs.items():
            data.append([r[k] for r in res if r.get(k) is not None])
            labels.append(f"{k.replace('_pruned', ' pr.')}\n{name}")
    axes[0].boxplot(data, showmeans=True)
    axes[0].set_xticks(range(1, len(labels) + 1), labels, fontsize=7)
    axes[0].set_ylim(0, 1)
    axes[0].set_title("graph scores per prompt (pr. = pruned)")
    axes[1].boxplot([[r["path_length"] for r in res if r.get("path_length") is not None]
                     for _, res in runs.values()], showmeans=True)
    axes[1].set_xticks(range(1, len(runs) + 1), list(runs), fontsize=8)
    axes[1].set_title("path length tokens→logits")
    for ax in axes:
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_pruning(runs: dict[str, tuple[dict, list[dict]]], path: Path) -> Path:
    """Node threshold -> mean feature nodes kept (log) and mean scores of the pruned graph."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for name, (summary, _) in runs.items():
        rows = summary["pruning_curve"]
        t = [r["node_threshold"] for r in rows]
        axes[0].plot(t, [r["n_features"] for r in rows], "o-", label=name)
        axes[1].plot(t, [r["completeness"] for r in rows], "o-", label=f"{name} completeness")
        axes[1].plot(t, [r["replacement"] for r in rows], "s--", label=f"{name} replacement")
    axes[0].set_yscale("log")
    axes[0].set_title("feature nodes kept (mean)")
    axes[1].set_title("scores of the pruned graph (mean)")
    axes[1].set_ylim(0, 1)
    _finish(axes, "node threshold")
    return _save(fig, path)


def plot_faithfulness(runs: dict[str, tuple[dict, list[dict]]], path: Path) -> Path:
    """Predicted total effect against the effect measured in (a) frozen, (b) live, (c) the real model."""
    plt = _plt()
    panels = (("frozen", "(a) frozen attention"), ("live", "(b) attention recomputed"), ("real", "(c) real model"))
    fig, axes = plt.subplots(len(runs), 3, figsize=(9, 2.9 * len(runs)), squeeze=False)
    for i, (name, (summary, res)) in enumerate(runs.items()):
        pred = [x for r in res for p in r["perturbations"] for x in p["pred_total"]]
        step = max(1, -(-len(pred) // MAX_POINTS))  # every step-th pair: the file stays small
        for j, (m, title) in enumerate(panels):
            ax = axes[i, j]
            meas = [x for r in res for p in r["perturbations"] for x in p[m]]
            ax.scatter(pred[::step], meas[::step], s=3, alpha=0.4, linewidths=0)
            lim = max([abs(v) for v in pred + meas] + [1e-9])
            ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8)
            ax.set_xscale("symlog", linthresh=lim * 1e-3)
            ax.set_yscale("symlog", linthresh=lim * 1e-3)
            rho = summary["faithfulness"]["spearman"]["total"][m]
            shown = f" ({len(pred[::step])} of {len(pred)} shown)" if step > 1 else ""
            ax.set_title(f"{name}: {title}\nSpearman {rho:.2f}{shown}", fontsize=7)
            ax.set_xlabel("graph total effect", fontsize=7)
            ax.set_ylabel("measured Δ pre-activation", fontsize=7)
            ax.tick_params(labelsize=6)
    return _save(fig, path)


def plot_drift(runs: dict[str, tuple[dict, list[dict]]], path: Path) -> Path:
    """Cosine and NMSE between the replacement's and the real model's perturbation effects, by layers after."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for name, (summary, _) in runs.items():
        for which, style in (("frozen", "o-"), ("live", "s--")):
            rows = summary["drift"][which]
            k = [r["layers_after"] for r in rows]
            axes[0].plot(k, [r["cosine_mean"] for r in rows], style, label=f"{name} {which}")
            axes[1].plot(k, [r["nmse_median"] for r in rows], style, label=f"{name} {which}")
    axes[0].set_title("cosine of effects (mean)")
    axes[1].set_title("NMSE of effects (median)")
    axes[1].set_yscale("log")
    _finish(axes, "later layers whose MLPs responded")
    return _save(fig, path)


def plot_all(runs: dict[str, tuple[dict, list[dict]]], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [plot_scores(runs, folder / "scores.png"), plot_pruning(runs, folder / "pruning.png"),
            plot_faithfulness(runs, folder / "faithfulness.png"), plot_drift(runs, folder / "drift.png")]
