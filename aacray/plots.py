"""PNG figures written beside metrics.json (matplotlib, Agg backend, no display needed).

- loss_curves.png: like the paper's Figure 1. For a few audio queries, the losses of every
  caption sorted ascending, raw (left) and min-max scaled per caption (right); the query's
  own captions are marked with crosses, so the raw-A2T collapse and its fix are visible.
- loss_heatmap.png: a corner of the loss matrix (audios x one caption of each of them), the
  diagonal holds the matched pairs.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa

from aacray import storage
from aacray.retrieval import minmax_scale


def _save(fig, uri: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    storage.write_bytes(uri, buf.getvalue())
    return uri.rsplit("/", 1)[-1]


def plot_loss_curves(out: str, probe: pa.Table, probe_audios: list[str], caps_of: dict, stats) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cids = np.array(probe.column("caption_id").to_pylist(), dtype=object)
    lo, hi = stats.aligned(cids.astype(str))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, a in enumerate(probe_audios):
        L = np.asarray(probe.column(f"probe{i}").to_numpy(zero_copy_only=False), dtype=np.float64)
        own = np.isin(cids, caps_of.get(a, []))
        for ax, v, title in ((axes[0], L, "raw loss"), (axes[1], minmax_scale(L, lo, hi), "min-max scaled loss")):
            order = np.argsort(v, kind="stable")
            line = ax.plot(np.arange(len(v)), v[order], lw=1.2, label=f"audio {a}")[0]
            rank = np.nonzero(own[order])[0]
            ax.scatter(rank, v[order][rank], marker="x", s=60, color=line.get_color(), zorder=3)
            ax.set_title(f"A2T: {title} of every caption, sorted")
            ax.set_xlabel("caption rank")
    axes[0].set_ylabel("loss")
    axes[0].legend(fontsize=7)
    fig.suptitle("Per-query losses (x: the query's own captions)")
    return _save(fig, storage.join(out, "loss_curves.png"))


def plot_heatmap(out: str, corner: pa.Table, audios: list[str], captions: list[str], gt_of: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pos = {c: j for j, c in enumerate(corner.column("caption_id").to_pylist())}
    cols = [c for c in captions if c in pos]
    M = np.array([[corner.column(a)[pos[c]].as_py() for c in cols] for a in audios if a in corner.column_names])
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    im = ax.imshow(M, cmap="viridis_r", aspect="auto")
    fig.colorbar(im, ax=ax, label="loss (lower = better match)")
    for j, c in enumerate(cols):
        if gt_of.get(c) in audios:
            ax.scatter(j, audios.index(gt_of[c]), marker="x", color="red", s=20)
    ax.set_xlabel("caption (one per audio)")
    ax.set_ylabel("audio")
    ax.set_title(f"Loss matrix corner ({M.shape[0]} x {M.shape[1]}); x = ground truth")
    return _save(fig, storage.join(out, "loss_heatmap.png"))
