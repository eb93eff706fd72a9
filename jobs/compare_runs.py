"""Compare demo-style run roots side by side (the before/after table of docs/recipe.md).

    python jobs/compare_runs.py NAME=ROOT [NAME=ROOT ...]

Each ROOT holds the outputs of one `jobs/demo.py` chain: extract_embeddings, train_decoder,
score_matrix, caption, perturb. Every retrieval figure is recomputed with today's rules
(`aacray.retrieval.retrieval_metrics`) from the run's own top-k tables and its extract
output's ground truth, so runs written before A2T mAP@10 existed get it too; each figure the
run's metrics.json already has must equal the recomputed one (else this stops and says
which). Caption metrics (vocabulary: aac-metrics' `vocab.cands`) and perturbation accuracies are
read from metrics.json; the mean caption length from the generated captions. Prints a Markdown table.
"""

from __future__ import annotations

import sys

from aacray import storage
from aacray.retrieval import retrieval_metrics


def _metrics(root: str, job: str) -> dict:
    return storage.read_json(storage.join(root, job, "metrics.json"))


def retrieval(root: str) -> dict:
    sm = storage.join(root, "score_matrix")
    manifest = storage.read_manifest(sm)
    tables = [
        storage.read_table(sm, name, manifest=manifest)
        for name in ("topk_t2a", "topk_a2t_raw", "topk_a2t")
    ]
    scored = set(tables[0].column("caption_id").to_pylist())
    rows = storage.read_table(storage.join(root, "extract_embeddings"), "captions").to_pylist()
    gt = {r["caption_id"]: r["audio_id"] for r in rows if r["caption_id"] in scored}
    got = retrieval_metrics(*tables, gt)
    for kind, recorded in _metrics(root, "score_matrix").items():
        if kind in got:
            for key, value in recorded.items():
                if abs(got[kind][key] - value) > 1e-9:
                    raise SystemExit(
                        f"{root}: recomputed {kind} {key} = {got[kind][key]} != metrics.json {value}"
                    )
    return got


def mean_length(root: str) -> float:
    """Mean length in words of the caption job's captions."""
    captions = storage.read_table(storage.join(root, "caption"), "captions", columns=["caption"])
    words = [len(c.split()) for c in captions.column("caption").to_pylist()]
    return sum(words) / len(words)


def column(root: str) -> dict:
    caption = _metrics(root, "caption")
    train = _metrics(root, "train_decoder")["summary"]
    return {
        "retrieval": retrieval(root),
        "caption": caption["metrics"],
        "epoch": caption["checkpoint"]["epoch"],
        "perturb": _metrics(root, "perturb")["sets"],
        "mean_length": mean_length(root),
        "val_loss": (train["val_loss_first"], train["val_loss_last"]),
    }


def table(cols: dict[str, dict]) -> list[str]:
    out = ["| metric | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
    cs = list(cols.values())

    def line(label: str, values: list[str]) -> None:
        out.append(f"| {label} | " + " | ".join(values) + " |")

    for kind, label in (("t2a", "T2A"), ("a2t_raw", "A2T raw"), ("a2t_minmax", "A2T min-max")):
        for m in ("R@1", "R@5", "R@10", "mAP@10"):
            line(f"{label} {m}", [f"{c['retrieval'][kind][m]:.3f}" for c in cs])
    for key, label in (
        ("cider_d", "CIDEr-D"),
        ("meteor", "METEOR"),
        ("spider", "SPIDEr"),
        ("fense", "FENSE"),
    ):
        line(
            label,
            [
                f"{c['caption'][key]:.3f}" if c["caption"].get(key) is not None else "not computed"
                for c in cs
            ],
        )
    line("mean generated caption length (words)", [f"{c['mean_length']:.2f}" for c in cs])
    # aac-metrics' `vocab` metric of the caption job: distinct words of the generated captions
    line(
        "vocabulary of the generated captions (words)",
        [
            f"{c['caption']['vocab.cands']:.0f}"
            if "vocab.cands" in c["caption"]
            else "not computed"
            for c in cs
        ],
    )
    for s in cs[0]["perturb"]:
        line(
            f"perturbation {s} accuracy (pairs)",
            [f"{c['perturb'][s]['accuracy']:.3f} ({c['perturb'][s]['n_perturbed']})" for c in cs],
        )
    line(
        "decoder validation loss, first -> last epoch",
        ["{:.3f} -> {:.3f}".format(*c["val_loss"]) for c in cs],
    )
    line("epoch of the checkpoint the jobs used", [str(c["epoch"]) for c in cs])
    return out


def main(argv: list[str]) -> int:
    if not argv or any("=" not in a for a in argv):
        raise SystemExit(__doc__)
    cols = {name: column(root) for name, root in (a.split("=", 1) for a in argv)}
    print("\n".join(table(cols)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
