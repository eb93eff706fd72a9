"""Shortlist against exact retrieval on two synthetic settings (docs/shortlist.md, issue 18).

    python jobs/bench_shortlist.py --checkpoint runs/demo/train_decoder --embeddings E --out O

E: an extract_embeddings output of the demo generator with subsets development (1,000
clips), validation (920) and evaluation (80), e.g.
    python jobs/make_demo_corpus.py configs/demo_corpus.yaml output=C seed=11 n_dev=1000 n_val=920 n_eval=80
    python jobs/extract_embeddings.py configs/extract_demo.yaml input.root=C 'input.subsets=[dev,val,eval]' output=E
Settings: a2t_heavy = the 80 evaluation audios x the 5,000 validation + evaluation captions
(4,600 distractors from other clips); t2a_heavy = all 2,000 audios x the 400 evaluation
captions.

Per setting, all through the real job (`run_score_matrix`, one embedded Ray):
1. exact, with the scores table;
2. shortlist runs (--method) at each K of --run-ks: pairs scored, wall time, the job's own
   metrics; the first describes the audios (its wall time includes that), the others reuse
   its descriptions (`shortlist.descriptions`), and the describe time is reported apart;
3. for both methods and every K of --ks, the same candidates (`attach_candidates`, from the
   saved descriptions: nothing decoded again) ranked offline on the exact run's losses
   (`score_pairs_block`): recall of the ground truth in the shortlist, overlap of exact's
   top-10 lists, R@1/5/10 and mAP@10. Where a K was also run (2), the job's figures are
   printed beside these (they agree unless fp32 rounding swaps a near-tie).
Writes O/shortlist.json, O/shortlist.md (the tables) and O/shortlist.png (the plot);
`--merge A/shortlist.json B/shortlist.json --out O` joins runs of one setting each.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from aacray import machine, storage
from aacray.config import ScoreConfig, from_dict
from aacray.retrieval import retrieval_metrics, score_pairs_block
from aacray.scoring import attach_candidates, plan_score_matrix, run_score_matrix

SETTINGS = {
    "a2t_heavy": {"audio_subsets": ["evaluation"], "caption_subsets": None},  # captions: `distractor_db`
    "t2a_heavy": {"audio_subsets": ["development", "validation", "evaluation"], "caption_subsets": ["evaluation"]},
}
KINDS = {"t2a": "topk_t2a", "a2t_raw": "topk_a2t_raw", "a2t_minmax": "topk_a2t"}


def distractor_db(embeddings: str, path: str) -> str:
    """The a2t_heavy caption database: the evaluation captions with their audios, and the
    validation clips' captions as external captions (no audio_id: distractors)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from aacray.embeddings import read_captions

    t = read_captions(embeddings, ["validation", "evaluation"])
    ev = [s == "evaluation" for s in t.column("subset").to_pylist()]
    audio = [a if e else None for a, e in zip(t.column("audio_id").to_pylist(), ev, strict=True)]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table({"caption_id": t.column("caption_id"), "text": t.column("text"),
                             "audio_id": pa.array(audio, pa.string())}), path)
    return path


def job(base: dict, out: str, **kw) -> tuple[dict, dict]:
    """One run of the job -> (metrics, timing: wall_s and the load averages at its end); a
    finished output of an earlier bench (its timing saved beside it) is read back instead of
    run again."""
    wall_file = out.rstrip("/") + ".wall.json"
    if os.path.exists(wall_file) and storage.exists(storage.join(out, "_MANIFEST.json")):
        with open(wall_file) as f:
            return storage.read_json(storage.join(out, "metrics.json")), json.load(f)
    cfg = from_dict(ScoreConfig, {**base, "output": out, **kw})
    t0 = time.time()
    run_score_matrix(cfg)
    timing = {"wall_s": time.time() - t0, "load": os.getloadavg()}
    with open(wall_file, "w") as f:
        json.dump(timing, f)
    return storage.read_json(storage.join(out, "metrics.json")), timing


def _figures(m: dict) -> dict:
    """A job's (or an offline ranking's) metrics: R@1/5/10 and mAP@10 for each ranking."""
    return {kind: {x: m[kind][x] for x in ("R@1", "R@5", "R@10", "mAP@10")} for kind in KINDS}


def exact_losses(out: str, plan) -> np.ndarray:
    """The exact run's scores table -> (N, M) in the plan's order."""
    t = storage.read_table(out, "scores")
    a_of = {a: i for i, a in enumerate(plan.audio_ids)}
    c_of = {c: j for j, c in enumerate(plan.caption_ids)}
    L = np.full((plan.n_audios, plan.n_captions), np.nan, dtype=np.float32)
    rows = np.array([a_of[a] for a in t.column("audio_id").to_pylist()])
    cols = np.array([c_of[c] for c in t.column("caption_id").to_pylist()])
    L[rows, cols] = t.column("loss").to_numpy()
    assert not np.isnan(L).any()
    return L


def top10(lists) -> dict[str, list[str]]:
    return {q: v[:10] for q, v in lists.items()}


def overlap(exact: dict[str, list[str]], got: dict[str, list[str]]) -> float:
    return float(np.mean([len(set(v) & set(got.get(q, []))) / len(v) for q, v in exact.items()]))


def offline(base: dict, described: str, method: str, k: int, sample: int, L: np.ndarray, exact_lists: dict):
    """One (method, K, min/max sample): the job's candidates, ranked on the exact losses."""
    sl = {**base.get("shortlist", {}), "method": method, "k": k, "minmax_sample": sample, "descriptions": described}
    cfg = from_dict(ScoreConfig, {**base, "output": "/tmp/unused", "candidates": "shortlist", "shortlist": sl})
    plan = plan_score_matrix(cfg)
    attach_candidates(plan)
    c = plan.cands
    c_pos = np.repeat(np.arange(plan.n_captions), c.per_caption)
    res = score_pairs_block(c.audio, c_pos, L[c.audio, c_pos], plan.audio_ids, plan.caption_ids, max(cfg.k, 10))
    m = retrieval_metrics(res.t2a, res.a2t_raw, res.a2t_minmax, plan.gt_of, index_ids=(plan.audio_ids, plan.caption_ids))
    tables = {"t2a": res.t2a, "a2t_raw": res.a2t_raw, "a2t_minmax": res.a2t_minmax}
    ov = {kind: round(overlap(exact_lists[kind], top10(tables[kind].lists())), 4) for kind in KINDS}
    info = plan.cand_info
    return {"method": method, "k": k, "sample": sample, "pairs": c.n_pairs, "share": info["share_of_all_pairs"],
            "t2a_gt_in_list": info.get("t2a_gt_in_list"), "a2t_gt_in_list": info.get("a2t_gt_in_list"),
            "overlap_top10": ov, **_figures(m)}


def run_setting(name: str, args, base: dict) -> dict:
    root = os.path.join(args.out, name)
    base = {**base, **SETTINGS[name]}
    if name == "a2t_heavy":
        base["captions"] = distractor_db(args.embeddings, os.path.join(root, "captions.parquet"))
    exact_out = os.path.join(root, "exact")
    m_exact, t_exact = job(base, exact_out, write_scores=True, plots=False)
    plan = plan_score_matrix(from_dict(ScoreConfig, {**base, "output": exact_out}))
    L = exact_losses(exact_out, plan)
    exact_lists = {kind: top10(_lists(exact_out, table, kind)) for kind, table in KINDS.items()}
    runs, described = [], None
    for k in args.run_ks:
        out = os.path.join(root, f"{args.method}_k{k}")
        sl = {"method": args.method, "k": k, **({"descriptions": described} if described else {})}
        m, t = job(base, out, candidates="shortlist", shortlist=sl, plots=False)
        described = described or out
        wall = t["wall_s"]
        runs.append({"k": k, "pairs": m["n_pairs"], "wall_s": round(wall, 1), "load": t.get("load"), "score_s": m["score_seconds"],
                     "describe_s": m["candidates"]["describe_seconds"], "described": m["candidates"]["described"],
                     **_figures(m)})
        print(f"[{name}] ran {args.method} K={k}: {m['n_pairs']} pairs, {wall:.0f} s", flush=True)
    rows = [offline(base, described or args.descriptions, method, k, sample, L, exact_lists)
            for sample in args.samples for method in ("bm25", "profile") for k in args.ks]
    return {"n_audios": m_exact["n_audios"], "n_captions": m_exact["n_captions"], "exact": {
        "pairs": m_exact["n_pairs"], "wall_s": round(t_exact["wall_s"], 1), "load": t_exact.get("load"),
        "score_s": m_exact["score_seconds"],
        **_figures(m_exact)},
        "runs": runs, "offline": rows}


def _lists(out: str, table: str, kind: str) -> dict[str, list[str]]:
    t = storage.read_table(out, table).to_pandas()
    q, c = ("caption_id", "audio_id") if kind == "t2a" else ("audio_id", "caption_id")
    return {key: g.sort_values("rank")[c].tolist() for key, g in t.groupby(q)}


def _rate(run: dict) -> str:
    return f"{run['pairs'] / run['score_s']:.0f} pairs/s"


def _load(run: dict) -> str:
    """The load averages at the end of a run (the machine's other work slows it)."""
    return "/".join(f"{x:.1f}" for x in run["load"]) if run.get("load") else "not recorded"


def markdown(res: dict) -> str:
    out = [f"Machine: {res['machine']}; precision {res['precision']}; minmax_sample {res['minmax_sample']}.", ""]
    for name, s in res["settings"].items():
        e = s["exact"]
        out += [f"### {name}: {s['n_audios']} audios x {s['n_captions']} captions", "",
                f"exact: {e['pairs']} pairs, wall {e['wall_s']} s (scoring {e['score_s']} s, {_rate(e)}; load {_load(e)}); T2A R@1/5/10/mAP@10 "
                + "/".join(f"{e['t2a'][x]:.3f}" for x in ("R@1", "R@5", "R@10", "mAP@10"))
                + "; A2T min-max " + "/".join(f"{e['a2t_minmax'][x]:.3f}" for x in ("R@1", "R@5", "R@10", "mAP@10")), "",
                "| method | K | sample | pairs (share) | GT in list T2A / A2T | top-10 overlap T2A / A2T mm | T2A R@1 / R@5 / R@10 / mAP@10 | A2T mm R@1 / R@5 / R@10 / mAP@10 |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in s["offline"]:
            out.append(
                f"| {r['method']} | {r['k']} | {r['sample']} | {r['pairs']} ({r['share']:.1%}) | {r['t2a_gt_in_list']:.3f} / {r['a2t_gt_in_list']:.3f} "
                f"| {r['overlap_top10']['t2a']:.3f} / {r['overlap_top10']['a2t_minmax']:.3f} | "
                + " / ".join(f"{r['t2a'][x]:.3f}" for x in ("R@1", "R@5", "R@10", "mAP@10")) + " | "
                + " / ".join(f"{r['a2t_minmax'][x]:.3f}" for x in ("R@1", "R@5", "R@10", "mAP@10")) + " |")
        out += ["", "| job run | K | pairs | wall s (x exact) | describe s | scoring s | scoring | load 1/5/15 min | T2A R@1 / mAP@10 | A2T mm R@1 / mAP@10 |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in s["runs"]:
            out.append(f"| {res['method']} | {r['k']} | {r['pairs']} | {r['wall_s']} ({r['wall_s'] / e['wall_s']:.2f}) | "
                       f"{r['describe_s'] if r['described'] else 0} | {r['score_s']} | {_rate(r)} | {_load(r)} | "
                       f"{r['t2a']['R@1']:.3f} / {r['t2a']['mAP@10']:.3f} | "
                       f"{r['a2t_minmax']['R@1']:.3f} / {r['a2t_minmax']['mAP@10']:.3f} |")
        out.append("")
    return "\n".join(out)


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res["settings"])
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        s = res["settings"][name]
        for method, style in (("bm25", "--"), ("profile", "-")):
            rows = [r for r in s["offline"] if r["method"] == method and r["sample"] == res["minmax_sample"]]
            ks = [r["k"] for r in rows]
            ax.plot(ks, [r["t2a_gt_in_list"] for r in rows], style + "o", color="C0", label=f"{method}: T2A GT in list")
            ax.plot(ks, [r["a2t_gt_in_list"] for r in rows], style + "s", color="C1", label=f"{method}: A2T GT in list")
            ax.plot(ks, [r["t2a"]["R@1"] for r in rows], style + "^", color="C2", label=f"{method}: T2A R@1")
            ax.plot(ks, [r["a2t_minmax"]["R@1"] for r in rows], style + "v", color="C3", label=f"{method}: A2T mm R@1")
        rows = [r for r in s["offline"] if r["method"] == "profile" and r["sample"] == res["minmax_sample"]]
        ax.plot([r["k"] for r in rows], [r["share"] for r in rows], "-x", color="0.5", label="pairs scored / (N x M)")
        ax.axhline(s["exact"]["t2a"]["R@1"], color="C2", lw=0.8, ls=":", label="exact T2A R@1")
        ax.axhline(s["exact"]["a2t_minmax"]["R@1"], color="C3", lw=0.8, ls=":", label="exact A2T mm R@1")
        ax.set_xscale("log")
        ax.set_xlabel("K (candidates per query)")
        ax.set_title(f"{name}: {s['n_audios']} audios x {s['n_captions']} captions")
        ax.set_ylim(0, 1.02)
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def merge(paths: list[str], out: str) -> None:
    """Several runs' shortlist.json (one setting each) -> one table and one plot under out."""
    res = None
    for p in paths:
        with open(p) as f:
            r = json.load(f)
        res = r if res is None else {**res, "settings": {**res["settings"], **r["settings"]}}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "shortlist.md"), "w") as f:
        f.write(markdown(res))
    plot(res, os.path.join(out, "shortlist.png"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint")
    ap.add_argument("--embeddings")
    ap.add_argument("--out", required=True)
    ap.add_argument("--merge", nargs="+", help="only merge these shortlist.json files into --out")
    ap.add_argument("--settings", default="a2t_heavy,t2a_heavy")
    ap.add_argument("--ks", default="10,20,50,100,200")
    ap.add_argument("--run-ks", default="10,20,50,100,200", help="K values run through the job (per setting)")
    ap.add_argument("--method", default="profile", help="the method of the job runs")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--minmax-sample", type=int, default=64, help="the job runs' sample")
    ap.add_argument("--samples", default="", help="samples of the offline rows (default: --minmax-sample)")
    ap.add_argument("--descriptions", default=None, help="a shortlist output whose descriptions the offline rows use "
                    "when --run-ks is empty")
    ap.add_argument("--num-actors", type=int, default=2)
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge, args.out)
    if not (args.checkpoint and args.embeddings):
        ap.error("--checkpoint and --embeddings are required")
    args.ks = [int(x) for x in args.ks.split(",")]
    args.run_ks = [int(x) for x in args.run_ks.split(",") if x]
    args.samples = [int(x) for x in args.samples.split(",") if x] or [args.minmax_sample]
    base = {"checkpoint": args.checkpoint, "audio": args.embeddings, "captions": args.embeddings, "k": 10,
            "caption_block_size": 50, "scorer": {"precision": args.precision, "pairs_per_batch": 2048},
            "shortlist": {"minmax_sample": args.minmax_sample}, "dcase_export": False,
            "actors": {"num_actors": args.num_actors, "num_cpus": 1}, "ray": {"num_cpus": os.cpu_count()}}
    res = {"machine": machine.describe("cpu"), "precision": args.precision, "minmax_sample": args.minmax_sample, "method": args.method,
           "settings": {name: run_setting(name, args, base) for name in args.settings.split(",")}}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "shortlist.json"), "w") as f:
        json.dump(res, f, indent=1)
    md = markdown(res)
    with open(os.path.join(args.out, "shortlist.md"), "w") as f:
        f.write(md)
    plot(res, os.path.join(args.out, "shortlist.png"))
    print(md)


if __name__ == "__main__":
    main()
