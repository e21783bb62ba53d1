"""Pictures of results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_predictivity(pred: torch.Tensor, path: str | Path, title: str = "") -> None:
    """Per-layer predictivity heat map.

    Left: every neuron of every layer, sorted by predictivity within its layer (so the picture shows how many
    neurons in each layer are far above chance). Right: best and mean predictivity per layer.

    Args:
        pred: (L, D) neuron predictivity in [0.5, 1].
    """
    plt = _pyplot()
    pred = pred.detach().to(torch.float32).cpu()
    L, D = pred.shape
    ordered = pred.sort(dim=1, descending=True).values
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 0.45 * L + 2), gridspec_kw={"width_ratios": [3, 1]})
    im = ax.imshow(ordered.numpy(), aspect="auto", cmap="viridis", vmin=0.5, vmax=max(0.51, float(pred.max())),
                   interpolation="nearest")
    ax.set_xlabel(f"neurons of the layer, sorted by predictivity (width {D})")
    ax.set_ylabel("layer")
    ax.set_yticks(range(L))
    fig.colorbar(im, ax=ax, label="predictivity")
    layers = list(range(L))
    ax2.plot(pred.max(dim=1).values.numpy(), layers, "o-", label="best")
    ax2.plot(pred.mean(dim=1).numpy(), layers, "s-", label="mean")
    ax2.axvline(0.5, color="grey", lw=0.8, ls="--")
    ax2.invert_yaxis()
    ax2.set_xlabel("predictivity")
    ax2.set_yticks(range(L))
    ax2.legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curve(curve: list[dict], path: str | Path, title: str = "") -> None:
    """Training curve of a tuning run: train loss and dev accuracy against steps.

    Args:
        curve: ``[{"step", "train_loss", "dev_accuracy"}, ...]``.
    """
    plt = _pyplot()
    steps = [c["step"] for c in curve]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(steps, [c["train_loss"] for c in curve], "o-", color="tab:blue", label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(steps, [c["dev_accuracy"] for c in curve], "s-", color="tab:orange", label="dev accuracy")
    ax2.set_ylabel("dev accuracy", color="tab:orange")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_perturbation(result: dict, path: str | Path, title: str = "") -> None:
    """Accuracy against the fraction of perturbed neurons: skill neurons vs the random control.

    Args:
        result: output of :func:`skillkern.perturb.perturb_run` (``fractions``, ``skill``, ``random``).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    x = [100 * f for f in result["fractions"]]
    ax.plot(x, result["skill"], "o-", color="tab:red", label="skill neurons")
    ax.plot(x, result["random"], "s--", color="tab:grey", label="random neurons")
    ax.set_xlabel("perturbed neurons per layer (%)")
    ax.set_ylabel(f"{result.get('split', 'test')} accuracy")
    ax.legend()
    ax.grid(alpha=0.3)
    ax.set_title(title or f"{result['task']}: {result['mode']} perturbation (neurons of {result['neurons_task']})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
