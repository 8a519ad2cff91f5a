"""The pictures of the paper: a layers × heads importance heatmap and a CV-over-training curve.

Pure functions from numbers to matplotlib figures (Agg backend, no display), shared by the training
callbacks and eval.py.
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from model.balance import coefficient_of_variation  # noqa: E402


def importance_heatmap(imp, title: str = "", shared=None, vmax: float | None = 1.0):
    """imp (L, H) -> figure: one cell per head, layers top to bottom, each layer's CV beside it, the mean CV
    after the title.

    shared (L, H) bool, if given, outlines the heads exempt from balancing (fine-tuning, Eq. 8).
    """
    imp = np.asarray(imp, dtype=np.float64)
    n_layer, n_head = imp.shape
    cv = coefficient_of_variation(torch.from_numpy(imp)).numpy()
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * n_head, 1.0 + 0.3 * n_layer), dpi=100, constrained_layout=True)
    image = ax.imshow(imp, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(n_head))
    ax.set_yticks(range(n_layer))
    ax.set_yticklabels([f"L{l:02d}  CV {c:.2f}" for l, c in enumerate(cv)], fontsize=7)
    ax.tick_params(axis="x", labelsize=7)
    if shared is not None:
        for l, h in zip(*np.nonzero(np.asarray(shared)), strict=True):
            ax.add_patch(plt.Rectangle((h - 0.5, l - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    ax.set_title(f"{title or 'head importance'}, mean CV {cv.mean():.3f}", fontsize=9)
    fig.colorbar(image, ax=ax, label="importance (mean gate)")
    return fig


def cv_curve(steps, cv_per_layer, title: str = "CV of head importance"):
    """steps (N,), cv_per_layer (N, L) -> figure with one thin line per layer and their mean in bold."""
    cv = np.asarray(cv_per_layer, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100, constrained_layout=True)
    for l in range(cv.shape[1]):
        ax.plot(steps, cv[:, l], linewidth=0.8, alpha=0.5)
    ax.plot(steps, cv.mean(axis=1), color="black", linewidth=2, label="mean over layers")
    ax.set_xlabel("step")
    ax.set_ylabel("CV")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return fig


def figure_to_array(fig) -> np.ndarray:
    """Render to an (H, W, 3) uint8 array (what wandb.Image / TensorBoard take) and close the figure."""
    fig.canvas.draw()
    array = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return array


def save_figure(fig, path) -> None:
    fig.savefig(path)
    plt.close(fig)
