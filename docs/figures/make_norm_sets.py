"""Draws docs/figures/norm_sets.png: the set S_i of each normalization method (the paper's Fig. 2).

Each cube is a feature map batch with axes N (batch), C (channels) and H, W (spatial, drawn as one
axis). The blue cells are normalized by the same mean and variance. Run:

    python docs/figures/make_norm_sets.py
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

N, C, HW, GROUPS = 4, 6, 5, 2   # two groups of three channels for GN, as in the paper's figure


def member_mask(kind):
    """Boolean (N, C, HW) array: True where cell k is in S_i for i = sample 0, channel 0."""
    n, c, _ = np.indices((N, C, HW))
    if kind == "Batch Norm":
        return c == 0
    if kind == "Layer Norm":
        return n == 0
    if kind == "Instance Norm":
        return (n == 0) & (c == 0)
    return (n == 0) & (c // (C // GROUPS) == 0)   # Group Norm


def draw(path):
    fig = plt.figure(figsize=(12, 3.4))
    for i, kind in enumerate(["Batch Norm", "Layer Norm", "Instance Norm", "Group Norm"]):
        ax = fig.add_subplot(1, 4, i + 1, projection="3d")
        inside = member_mask(kind)
        # matplotlib's voxel axes are (x, y, z): C to the right, N into the page, H,W upwards
        filled = np.ones((C, N, HW), dtype=bool)
        colors = np.where(inside.transpose(1, 0, 2)[..., None], [[[[0.2, 0.45, 0.85, 0.95]]]],
                          [[[[0.92, 0.92, 0.92, 0.25]]]])
        ax.voxels(filled, facecolors=colors, edgecolors=(0.3, 0.3, 0.3, 0.5), linewidth=0.4)
        ax.set_xlabel("C", labelpad=-12)
        ax.set_ylabel("N", labelpad=-12)
        ax.set_zlabel("H, W", labelpad=-12)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_zticks([])
        ax.set_box_aspect((C, N, HW))
        ax.view_init(elev=22, azim=-58)
        ax.set_title(kind, fontsize=12)
    fig.suptitle("The set S_i: cells normalized by the same mean and variance (blue)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    out = Path(__file__).with_name("norm_sets.png")
    draw(out)
    print(out)
