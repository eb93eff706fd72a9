"""Benchmark reindex against a full recompute, and measure estimated min/max (docs/reindex.md).

Timing:        python jobs/bench_reindex.py --bench /tmp/reindex_bench [--base runs/demo/score_matrix]
Estimated min/max (paper 5), min-max A2T Recall@k against exact min/max:
               python jobs/bench_reindex.py --minmax-eval runs/demo/score_matrix --sizes 2,5,10,20,40 --draws 10

--bench starts from a copy of --base (a score_matrix output with write_scores: true; never
changed), adds `fraction` of its caption count (texts of the `new_subset` captions of its
audio source, under new ids, no ground truth), scored inline and on actors, and,
separately, one `new_subset` audio with its captions. Each full recompute is score_matrix
on the same union with the base's own settings; every reindex result is compared with it
table by table (`aacray.index.compare_outputs`).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from aacray import storage
from aacray.embeddings import read_captions
from aacray.errors import BadInputError
from aacray.index import compare_outputs, load_index, load_score_matrix
from aacray.reindex import draw_minmax_sample, minmax_topk_dense
from aacray.retrieval import hit_ranks, recall_at_k, topk_a2t_raw

log = logging.getLogger("aacray.bench_reindex")


# --------------------------------------------------------------------------------------
# Estimated min/max: what it costs (paper 5)
# --------------------------------------------------------------------------------------


def minmax_estimate_eval(L: np.ndarray, audio_ids, caption_ids, gt_of: dict, sizes=(5, 10, 20, 40), draws: int = 5, seed: int = 0) -> list[dict]:
    """Min-max A2T Recall@1/5/10 with per-caption min/max over the whole index ("exact")
    and over seeded samples of `size` audios (mean and std over `draws` samples).

    L (N, M) losses of every audio x caption; gt_of caption id -> audio id (or None)."""
    a_ids, c_ids = np.asarray(audio_ids, dtype=str), np.asarray(caption_ids, dtype=str)
    rel: dict[str, set[str]] = {}
    for c, a in gt_of.items():
        if a is not None:
            rel.setdefault(a, set()).add(c)

    def recalls(mn, mx):
        ranks = hit_ranks(minmax_topk_dense(L, a_ids, c_ids, mn, mx, 10), rel)
        return [recall_at_k(ranks, k) for k in (1, 5, 10)]

    pos = {a: i for i, a in enumerate(a_ids.tolist())}
    raw = hit_ranks(topk_a2t_raw(L, a_ids, c_ids, 10), rel)
    rows = [{"sample": "raw", "n": 0, "R": [recall_at_k(raw, k) for k in (1, 5, 10)], "std": [0.0, 0.0, 0.0]},
            {"sample": "all", "n": len(a_ids), "R": recalls(L.min(0), L.max(0)), "std": [0.0, 0.0, 0.0]}]
    for size in sizes:
        if size > len(a_ids):
            continue
        got = []
        for d in range(draws):
            sub = L[[pos[a] for a in draw_minmax_sample(list(a_ids), size, seed + d)]]
            got.append(recalls(sub.min(0), sub.max(0)))
        g = np.array(got)
        rows.append({"sample": str(size), "n": size, "R": g.mean(0).tolist(), "std": g.std(0).tolist()})
    return rows


def format_minmax_eval(rows: list[dict], n_audios: int, n_captions: int, draws: int) -> str:
    lines = [
        f"Min-max A2T with estimated caption min/max ({n_audios} audios x {n_captions} captions; "
        f"samples: mean +- std over {draws} seeded draws)",
        "min/max over           R@1             R@5             R@10",
    ]
    for r in rows:
        label = {"raw": "(raw loss, no scaling)", "all": "all audios (exact)"}.get(r["sample"], f"{r['n']} audios")
        fixed = r["sample"] in ("raw", "all")
        cells = [f"{m:.3f}" + ("         " if fixed else f" +- {s:.3f}") for m, s in zip(r["R"], r["std"], strict=True)]
        lines.append(f"{label:22s} " + "  ".join(f"{c:14s}" for c in cells))
    return "\n".join(lines)


def minmax_eval(uri: str, sizes: list[int], draws: int) -> str:
    L, aids, cids = load_score_matrix(uri)
    caps = load_index(uri).captions
    gt = dict(zip(caps.column("caption_id").to_pylist(), caps.column("audio_id").to_pylist(), strict=True))
    return format_minmax_eval(minmax_estimate_eval(L, aids, cids, gt, sizes, draws), len(aids), len(cids), draws)


# --------------------------------------------------------------------------------------
# Benchmark: a 1% update against a full recompute
# --------------------------------------------------------------------------------------


def _subset_extract(src: str, dst: str, audio_ids: list[str], captions: pa.Table) -> None:
    """An extract_embeddings-shaped output holding some audios of `src` and given captions."""
    emb = storage.read_table(src, "embeddings")
    emb = emb.filter(pc.is_in(emb.column("audio_id"), pa.array(audio_ids)))
    storage.begin_output(dst, ["embeddings", "captions"])
    storage.write_table(dst, "embeddings", emb, rows_per_file=256)
    storage.write_table(dst, "captions", captions.select(["caption_id", "subset", "text", "audio_id"]))
    storage.commit_output(dst, "extract_embeddings", {"derived_from": src}, ["embeddings", "captions"])


def _copy_tree(src: str, dst: str) -> None:
    storage.remove(dst)
    if storage.is_remote(dst):
        fs, path = storage.get_fs(dst)
        fs.copy(storage.get_fs(src)[1] + "/", path + "/", recursive=True)
    else:
        import shutil

        shutil.copytree(src, dst)


def _write_parquet(uri: str, t: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(t, buf)
    storage.write_bytes(uri, buf.getvalue())


def _inputs(work: str, score_cfg, audio_ids: list[str], fraction: float, new_subset: str) -> dict:
    """The new data of each case and the union each full recompute scores."""
    src = score_cfg.audio
    caps = read_captions(score_cfg.captions, score_cfg.caption_subsets)
    extra = read_captions(src, [new_subset])
    # case captions: texts of other captions under new ids, no ground truth
    d_m = max(1, round(fraction * caps.num_rows))
    new_caps = extra.slice(0, d_m)
    new_caps = pa.table({"caption_id": [f"bench-{c}" for c in new_caps.column("caption_id").to_pylist()],
                         "subset": ["external"] * d_m, "text": new_caps.column("text"),
                         "audio_id": pa.nulls(d_m, pa.string())})
    f = {"new_caps": storage.join(work, "new_captions.parquet"), "union_caps": storage.join(work, "union_captions.parquet"),
         "new_aud": storage.join(work, "new_audio_extract"), "union_aud": storage.join(work, "union_audio_extract"),
         "n_captions": caps.num_rows}
    _write_parquet(f["new_caps"], new_caps)
    _write_parquet(f["union_caps"], pa.concat_tables([caps.select(new_caps.column_names), new_caps]))
    # case audio: one audio of new_subset and its captions
    a_new = extra.column("audio_id").to_pylist()[0]
    a_caps = extra.filter(pc.equal(extra.column("audio_id"), a_new))
    _subset_extract(src, f["new_aud"], [a_new], a_caps)
    _subset_extract(src, f["union_aud"], audio_ids + [a_new], pa.concat_tables([caps, a_caps]))
    return f


def bench(work: str, base: str = "runs/demo/score_matrix", fraction: float = 0.01, new_subset: str = "validation",
          inline_max_pairs: int = 100_000) -> dict:
    """Time reindex runs against score_matrix on the same union, and check they agree
    (module docstring). Returns the report (seconds, ratios, pairs, table equality)."""
    import yaml

    from aacray.config import ReindexConfig, ScoreConfig, from_dict, to_dict
    from aacray.reindex import run_reindex
    from aacray.scoring import run_score_matrix

    manifest = storage.read_manifest(base)
    if manifest.get("job") != "score_matrix" or "scores" not in manifest["tables"]:
        raise BadInputError(f"{base}: the benchmark needs a version-0 score_matrix output with write_scores: true")
    score_cfg = from_dict(ScoreConfig, yaml.safe_load(storage.read_bytes(storage.join(base, "config.yaml"))))
    audio_ids = load_index(base).audio_ids
    f = _inputs(work, score_cfg, audio_ids, fraction, new_subset)

    def full(out: str, **kw) -> float:
        t = time.time()
        run_score_matrix(from_dict(ScoreConfig, {**to_dict(score_cfg), "output": out, "plots": False, **kw}))
        return time.time() - t

    report: dict = {"base": base, "n_audios": len(audio_ids), "n_captions": f["n_captions"]}
    fulls = {
        "full_captions": lambda out: full(out, captions=f["union_caps"], caption_subsets=None),
        "full_audio": lambda out: full(out, audio=f["union_aud"], audio_subsets=None, captions=f["union_aud"], caption_subsets=None),
    }
    for case, new, inline, ref in (
        ("captions_inline", {"new_captions": f["new_caps"]}, inline_max_pairs, "full_captions"),
        ("captions_actors", {"new_captions": f["new_caps"]}, 0, "full_captions"),
        ("audio_inline", {"new_audio": f["new_aud"], "new_captions": f["new_aud"]}, inline_max_pairs, "full_audio"),
    ):
        ref_out = storage.join(work, ref)
        if ref not in report:
            t_full = fulls[ref](ref_out)
            m = storage.read_json(storage.join(ref_out, "metrics.json"))
            report[ref] = {"seconds": round(t_full, 2), "score_seconds": m["score_seconds"], "pairs": m["n_pairs"],
                           "timing": m["timing"]}
        out = storage.join(work, f"index_{case}")
        _copy_tree(base, out)
        t = time.time()
        res = run_reindex(from_dict(ReindexConfig, {"output": out, **new, "inline_max_pairs": inline,
                                                    "caption_block_size": score_cfg.caption_block_size,
                                                    "actors": to_dict(score_cfg.actors), "ray": to_dict(score_cfg.ray)}))
        report[case] = _case_report(res, time.time() - t, report[ref], compare_outputs(out, ref_out))
        log.info("bench %s: %s", case, report[case])
    return report


def _case_report(res: dict, seconds: float, full: dict, equal: dict) -> dict:
    return {"reindex_seconds": round(seconds, 2), "ratio": round(seconds / full["seconds"], 4),
            "score_seconds": res["score_seconds"],
            "score_ratio": round(res["score_seconds"] / max(full["score_seconds"], 1e-9), 4),
            **{key: res[key] for key in ("pairs_scored", "pairs_full", "scored_share", "inline", "minmax_recompute_seconds", "timing")},
            "equal_to_full": equal}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python jobs/bench_reindex.py", description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--bench", metavar="WORKDIR", help="time 1%% updates of --base against full recomputes")
    g.add_argument("--minmax-eval", metavar="SCORE_OUTPUT", help="estimated vs exact min/max on an output with scores")
    p.add_argument("--base", default="runs/demo/score_matrix", help="--bench: the score_matrix output to start from")
    p.add_argument("--sizes", default="5,10,20,40")
    p.add_argument("--draws", type=int, default=5)
    a = p.parse_args(argv)
    from aacray.runtime import setup_logging

    setup_logging()
    if a.bench:
        print(json.dumps(bench(a.bench, a.base), indent=2))
    else:
        print(minmax_eval(a.minmax_eval, [int(s) for s in a.sizes.split(",")], a.draws))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
