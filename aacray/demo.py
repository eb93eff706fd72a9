"""The demo chain: every job with its configs/*_demo.yaml, in order, each on its own local Ray.

Each stage prints its own lines (progress, its table); at the end one summary of every stage
fits a screen (`format_summary`), and every figure the stages returned is written beside
their outputs to demo_summary.json.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field

from aacray.config import load_config
from aacray.runtime import setup_logging

log = logging.getLogger("aacray")


def _stages():
    from aacray.captioning import run_caption
    from aacray.config import (
        CaptionConfig,
        DemoCorpusConfig,
        ExtractConfig,
        PerturbConfig,
        ScoreConfig,
        TrainConfig,
    )
    from aacray.corpora import run_make_demo_corpus
    from aacray.extract import run_extract
    from aacray.perturb import run_perturb
    from aacray.scoring import run_score_matrix
    from aacray.train import run_train

    # (stage, config class, job function, demo config, the job script that runs it)
    return [
        ("make_demo_corpus", DemoCorpusConfig, run_make_demo_corpus, "configs/demo_corpus.yaml", "make_demo_corpus"),
        ("extract_embeddings", ExtractConfig, run_extract, "configs/extract_demo.yaml", "extract_embeddings"),
        ("train_decoder", TrainConfig, run_train, "configs/train_demo.yaml", "train_decoder"),
        ("score_matrix", ScoreConfig, run_score_matrix, "configs/score_demo.yaml", "score_matrix"),
        ("score_shortlist", ScoreConfig, run_score_matrix, "configs/score_shortlist_demo.yaml", "score_matrix"),
        ("caption", CaptionConfig, run_caption, "configs/caption_demo.yaml", "caption"),
        ("perturb", PerturbConfig, run_perturb, "configs/perturb_demo.yaml", "perturb"),
    ]


@dataclass
class StageResult:
    name: str
    seconds: float
    result: dict = field(default_factory=dict)
    error: str | None = None


# --------------------------------------------------------------------------------------
# The summary
# --------------------------------------------------------------------------------------

CAPTION_COLUMNS = (
    ("METEOR", "meteor"), ("CIDEr-D", "cider_d"), ("SPICE", "spice"), ("SPIDEr", "spider"),
    ("SPIDEr-FL", "spider_fl"), ("FENSE", "fense"), ("Vocab", "vocab.cands"), ("BLEU-1", "bleu_1"),
    ("BLEU-4", "bleu_4"), ("ROUGE-L", "rouge_l"),
)  # fmt: skip
RETRIEVAL_ROWS = (("text-to-audio", "t2a"), ("audio-to-text", "a2t_raw"), ("A2T min-max", "a2t_minmax"))
MAX_LINE = 100


def _num(v, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def _clip(line: str) -> str:
    return line if len(line) <= MAX_LINE else line[: MAX_LINE - 3] + "..."


def stage_line(s: StageResult) -> str:
    """One line: what the stage did, in its key figures."""
    r = s.result or {}
    if s.error:
        return f"FAILED: {s.error}"
    if s.name == "make_demo_corpus":
        clips = r.get("clips") or {}
        return "clips: " + ", ".join(f"{k} {v}" for k, v in clips.items())
    if s.name == "extract_embeddings":
        return (
            f"{r.get('written', '?')} of {r.get('items_in', '?')} clips written, "
            f"{r.get('quarantined', '?')} quarantined ({_num(r.get('clips_per_s'), '.1f')} clips/s)"
        )
    if s.name == "train_decoder":
        share = r.get("matched_lower_share")
        return (
            f"{r.get('epochs', '?')} epochs; val loss {_num(r.get('val_loss_first'))} -> "
            f"{_num(r.get('val_loss_last'))}; matched beats random "
            f"{_num(None if share is None else 100 * share, '.1f')}% of {r.get('heldout_pairs', '?')}"
        )
    if s.name == "score_matrix":
        return (
            f"{r.get('n_audios', '?')} audios x {r.get('n_captions', '?')} captions = "
            f"{r.get('n_pairs', '?')} pairs, {_num(r.get('pairs_per_s'), '.0f')} pairs/s"
        )
    if s.name == "score_shortlist":
        c = r.get("candidates") or {}
        return (
            f"{c.get('method', '?')} K={c.get('k', '?')}: {r.get('n_pairs', '?')} pairs "
            f"({_num(100 * c['share_of_all_pairs'] if 'share_of_all_pairs' in c else None, '.0f')}%); "
            f"truth listed: T2A {_num(c.get('t2a_gt_in_list'), '.2f')}, A2T {_num(c.get('a2t_gt_in_list'), '.2f')}"
        )
    if s.name == "caption":
        skipped, scores = r.get("skipped") or [], r.get("metrics") or {}
        n = sum(k in scores for _, k in CAPTION_COLUMNS)
        return f"{r.get('n_audios', '?')} audios captioned, {n} metrics" + (f" ({len(skipped)} n/a)" if skipped else "")
    if s.name == "perturb":
        return f"{r.get('n_perturbed', '?')} perturbed captions scored on their audio"
    return ", ".join(f"{k}={v}" for k, v in r.items() if isinstance(v, int | float | str))


def format_summary(stages: list[StageResult], total_seconds: float, where: str | None = None) -> list[str]:
    """The demo's closing summary: a line per stage, then the retrieval table, the caption
    metrics and the perturbation accuracies of the stages that ran (under 40 lines)."""
    by = {s.name: s.result or {} for s in stages if not s.error}
    lines = ["===== demo summary =====", f"{'stage':20} {'wall s':>7}  result"]
    for s in stages:
        lines.append(_clip(f"{s.name:20} {s.seconds:7.1f}  {stage_line(s)}"))
    lines.append(f"{'total':20} {total_seconds:7.1f}")

    lines += _retrieval_lines(by.get("score_matrix"), by.get("score_shortlist"))

    cap = by.get("caption")
    if cap is not None:
        scores, skipped = cap.get("metrics") or {}, list(cap.get("skipped") or [])
        cols = [(lab, k) for lab, k in CAPTION_COLUMNS if k in scores]
        lines.append("")
        if cols:
            w = [max(len(lab), 6) for lab, _ in cols]
            lines.append(_clip("Captions  " + " ".join(f"{lab:>{n}}" for (lab, _), n in zip(cols, w, strict=True))))
            lines.append(_clip("          " + " ".join(
                f"{_num(scores[k], '.0f' if k == 'vocab.cands' else '.3f'):>{n}}" for (_, k), n in zip(cols, w, strict=True)
            )))  # fmt: skip
        else:
            lines.append("Captions: no metric computed")
        if skipped:
            lines.append(_clip(f"  n/a: {', '.join(skipped)} (why: caption/metrics.json)"))

    pert = by.get("perturb")
    if pert is not None and pert.get("accuracy"):
        acc, iv = pert["accuracy"], pert.get("accuracy_in_vocab") or {}
        lines.append("")
        lines.append(f"{'Perturbation accuracy':22} {'all':>6} {'in-vocab':>8}   (0.5 = chance)")
        for s_name, v in acc.items():
            lines.append(f"  {s_name:20} {_num(v):>6} {_num(iv.get(s_name)):>8}")
    if where:
        lines.append("")
        lines.append(_clip(f"outputs under {where}; every figure: {os.path.join(where, 'demo_summary.json')}"))
    return lines


def _retrieval_lines(score: dict | None, shortlist: dict | None) -> list[str]:
    """The retrieval table: exact score_matrix rows, and the shortlist run's beside them."""
    runs = [(tag, r) for tag, r in (("", score), (" (shortlist)", shortlist)) if r is not None]
    if not runs:
        return []
    if not any(k in r for _, r in runs for _, k in RETRIEVAL_ROWS):
        return ["", "Retrieval: no ground truth (or k < 10): rankings only"]
    lines = ["", f"{'Retrieval':27} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'mAP@10':>6}"]
    for tag, r in runs:
        for label, k in RETRIEVAL_ROWS:
            m = r.get(k)
            if m:
                cells = " ".join(f"{_num(m.get(c)):>6}" for c in ("R@1", "R@5", "R@10", "mAP@10"))
                lines.append(f"  {label + tag:25} {cells}")
    return lines


def _with_metrics_json(result: dict) -> dict:
    """The stage's returned dict, completed from its metrics.json where a key is missing."""
    out = result.get("output") if isinstance(result, dict) else None
    if not out:
        return result
    try:
        from aacray import storage

        m = storage.read_json(storage.join(out, "metrics.json"))
    except Exception:
        return result
    if isinstance(m, dict) and isinstance(m.get("summary"), dict):  # train_decoder
        m = m["summary"]
    if not isinstance(m, dict):
        return result
    return {**{k: v for k, v in m.items() if k not in ("checkpoint", "definitions")}, **result}


DEMO_ROOT = "runs/demo"


def parse_args(argv: list[str], names: list[str]) -> tuple[set[str], str, dict[str, list[str]]]:
    """[STAGE ...] [--root DIR] [STAGE.key=value ...] -> (stages to run, root, overrides)."""
    only, root, overrides = set(), DEMO_ROOT, {n: [] for n in names}
    args = list(argv)
    while args:
        a = args.pop(0)
        if a == "--root" and args:
            root = args.pop(0).rstrip("/")
        elif a.startswith("--root="):
            root = a.split("=", 1)[1].rstrip("/")
        elif "=" in a and a.split(".", 1)[0] in overrides:
            stage, kv = a.split(".", 1)
            overrides[stage].append(kv)
        elif a in overrides:
            only.add(a)
        else:
            raise ValueError(f"demo: unknown argument {a!r} (stages: {' '.join(names)}; --root DIR; STAGE.key=value)")
    return only, root, overrides


def rebase_overrides(path: str, root: str) -> list[str]:
    """key=value overrides moving every runs/demo path of a demo config under `root`."""
    if root == DEMO_ROOT:
        return []
    import yaml

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    out = []

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, str) and (v == DEMO_ROOT or v.startswith(DEMO_ROOT + "/")):
                out.append(f"{prefix}{k}={root}{v[len(DEMO_ROOT):]}")

    walk(data, "")
    return out


def run_demo(argv: list[str]) -> int:
    setup_logging()
    import ray

    plan = _stages()
    try:
        only, root, overrides = parse_args(argv, [name for name, *_ in plan])
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    stages: list[StageResult] = []
    t_all = time.time()
    try:
        for name, cls, fn, path, script in plan:
            if only and name not in only:
                continue
            args = [*rebase_overrides(path, root), *overrides[name]]
            print(f"\n===== {name}: python jobs/{script}.py {' '.join([path, *args])} =====", flush=True)
            t0 = time.time()
            try:
                result = fn(load_config(cls, [path, *args]))
            except BaseException as e:
                stages.append(StageResult(name, round(time.time() - t0, 1), {}, f"{type(e).__name__}: {e}"))
                raise
            finally:
                # each stage starts the Ray its config asks for; a finished stage's actor pools
                # must not keep CPUs that the next stage (Ray Train's workers) waits on
                ray.shutdown()
            stages.append(StageResult(name, round(time.time() - t0, 1), _with_metrics_json(result)))
            print(f"----- {name} done in {stages[-1].seconds:.1f} s -> {result.get('output')}", flush=True)
    finally:
        if stages:
            try:
                os.makedirs(root, exist_ok=True)
                with open(os.path.join(root, "demo_summary.json"), "w") as f:
                    json.dump([s.__dict__ for s in stages], f, indent=2, default=str)
            except OSError as e:
                log.warning("could not write demo_summary.json: %s", e)
            print("\n" + "\n".join(format_summary(stages, time.time() - t_all, root)), flush=True)
    return 0
