"""The benchmark page's plots (matplotlib, imported when drawn): accuracy against cumulative bytes per task,
FedTT+ against FedTT at the stronger skew, and the zero-order methods' accuracy against client compute."""

from __future__ import annotations

import statistics

from bench.plan import NAMES, Settings, key, seed_names, task_name


def plot_compute(runs: dict, names: list[str], task: str, path: str) -> None:
    """Accuracy against cumulative client compute (seconds, and model calls of any kind) of the compute runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in names:
        run = runs.get(name)
        if not run:
            continue
        style = {"marker": "o", "markersize": 3, "label": NAMES[run["run"].method]}
        acc = [100 * p["accuracy"] for p in run["curve"]]
        axes[0].plot([p["compute"] for p in run["curve"]], acc, **style)
        axes[1].plot([p["calls"] for p in run["curve"]], acc, **style)
    for ax, label in zip(
        axes, ("cumulative client training seconds per client", "cumulative model calls per client"), strict=True
    ):
        ax.set_xlabel(label)
        ax.set_ylabel(f"{task_name(task)} dev accuracy (%)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_task(s: Settings, runs: dict, task: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for i, m in enumerate(s.main_methods):
        curves = [runs[n]["curve"] for n in seed_names(s, task, m).values() if n in runs]
        if not curves:
            continue
        for one in curves if len(curves) > 1 else []:  # each seed thin, their mean marked
            axes[0].plot([p["round"] for p in one], [100 * p["accuracy"] for p in one], color=f"C{i}", alpha=0.3, lw=1)
        style = {"marker": "o", "markersize": 3, "color": f"C{i}", "label": f"{NAMES[m]} ({len(curves)} seed(s))"}
        curve = mean_curve(curves)
        axes[0].plot([p["round"] for p in curve], [100 * p["accuracy"] for p in curve], **style)
        sent = [p for p in curve if p["bytes"] > 0]  # round 0 has sent nothing: no place on a log axis
        axes[1].plot([p["bytes"] / 2**20 for p in sent], [100 * p["accuracy"] for p in sent], **style)
        axes[2].plot([p["compute"] for p in curve], [100 * p["accuracy"] for p in curve], **style)
    labels = ("round", "cumulative MB per client (down + up)", "cumulative client training seconds per client")
    for ax, label in zip(axes, labels, strict=True):
        ax.set_xlabel(label)
        ax.set_ylabel(f"{task_name(task)} dev accuracy (%)")
        ax.grid(alpha=0.3, which="both")
    axes[1].set_xscale("log")
    axes[2].set_xscale("symlog", linthresh=1.0)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8)
    fig.suptitle(f"{task_name(task)}, Dirichlet alpha {s.alpha:g}, {s.clients} clients; the mean over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mean_curve(curves: list[list[dict]]) -> list[dict]:
    """The point by point mean of runs' curves (accuracy, cumulative bytes and compute), as long as the shortest."""
    n = min(len(c) for c in curves)
    return [
        {k: statistics.mean(c[i][k] for c in curves) for k in ("round", "accuracy", "bytes", "compute")}
        for i in range(n)
    ]


def plot_skew(s: Settings, runs: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, m in enumerate(s.skew_methods):
        color = f"C{i}"
        curves = [
            runs[k]["curve"] for seed in s.skew_seeds if (k := key(s, s.skew_task, m, s.skew_alpha, seed)) in runs
        ]
        for curve in curves:
            ax.plot([p["round"] for p in curve], [100 * p["accuracy"] for p in curve], color=color, alpha=0.3, lw=1)
        if curves:
            n = min(len(c) for c in curves)
            mean = [statistics.mean(100 * c[i]["accuracy"] for c in curves) for i in range(n)]
            ax.plot([p["round"] for p in curves[0][:n]], mean, color=color, marker="o", label=f"{NAMES[m]} (mean)")
    ax.set_xlabel("round")
    ax.set_ylabel(f"{task_name(s.skew_task)} dev accuracy (%)")
    ax.set_title(f"alpha {s.skew_alpha:g}: {len(s.skew_seeds)} seeds (thin) and their mean", fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no records of these runs yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
