"""What one score_matrix actor holds (`scorer.scorer_memory`) and the guard that refuses a
job no actor can hold, before any actor starts.

- the estimate's index and key/value parts are exactly the tensors a `PairScorer` /
  `BlockScorer` allocates (an invariant over precisions, frame counts and model sizes);
- the forward part bounds, within 2x, every allocation torch makes during real forwards
  (measured with the profiler), in the CPU layout and in the GPU's (all pairs_per_batch
  pairs in one forward, the classifier over all its rows), fp32 and bf16;
- the docs' worked example: the key/value cache of 100k audios of 31 frames is ~38 GB fp32;
- `actors.memory_gb=0.001` refuses the job with a BadInputError naming the need and the
  ways out, before Ray starts, and leaves an existing output as it was;
- on a GPU pool (a faked device) the guard checks the model, index, key/value cache and
  forward against the GPU's memory and the frames and block against host memory: a job
  whose total exceeds the GPU but whose GPU parts fit runs; each side refuses on its own;
  a node's host memory is shared by the actors its CPUs and GPUs host (worked example); a
  driver without a GPU asks a worker with the pool's GPUs, and says so when none answers.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch
from faults import CAPTIONS, write_extract_output, write_random_checkpoint

from aacray.config import ScoreConfig, from_dict
from aacray.decoder import CaptionDecoder, DecoderConfig
from aacray.errors import BadInputError
from aacray.scorer import (
    HOST_PARTS,
    BlockScorer,
    PairScorer,
    forward_memory,
    memory_places,
    scorer_memory,
)

PAD, BOS, EOS = 0, 1, 2


def _held(block: BlockScorer) -> tuple[int, int]:
    """(index bytes, key/value bytes) of the tensors a BlockScorer's scorers hold."""
    scorers = [block.scorer] + ([block.exact] if block.exact is not None else [])
    index = sum(s.memory.nbytes + s.mask.nbytes for s in scorers)
    kv = sum(k.nbytes + v.nbytes for s in scorers for k, v in s.kv)
    return index, kv


@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-refined"])
@pytest.mark.parametrize("cfg_kw", [dict(d_model=32, n_layers=2, n_heads=4, d_ff=64), dict(d_model=48, n_layers=3, n_heads=4, d_ff=32)])
def test_scorer_memory_is_what_the_scorer_allocates(precision, cfg_kw):
    torch.manual_seed(0)
    cfg = DecoderConfig(**cfg_kw)
    model = CaptionDecoder(cfg, 30, PAD).eval()
    rng = np.random.default_rng(0)
    frames = [rng.standard_normal((int(n), 768), dtype=np.float32) for n in rng.integers(2, 14, 9)]
    tokens = [[BOS, *rng.integers(4, 30, int(n)).tolist(), EOS] for n in rng.integers(1, 8, 5)]
    N, S = len(frames), max(f.shape[0] for f in frames)
    block = BlockScorer(model, PAD, frames, "cpu", precision, pairs_per_batch=4)
    L, _ = block.losses(tokens, 3)
    n_params = sum(p.numel() for p in model.parameters())
    need = scorer_memory(N, S, cfg, n_params, precision, len(tokens), vocab_size=30,
                         max_tokens=max(map(len, tokens)), pairs_per_batch=4, gpu=False)
    index, kv = _held(block)
    assert need["index"] == index and need["kv_cache"] == kv, (need, index, kv)
    assert need["embeddings"] == N * S * 768 * 4 >= sum(f.nbytes for f in frames)
    assert need["model"] >= sum(p.nbytes for p in model.parameters())
    assert need["block"] >= L.nbytes
    assert need["total"] == sum(v for k, v in need.items() if k != "total")


def test_kv_cache_of_100k_audios_is_38_gb_fp32():
    """README / DESIGN.md: 2 x n_layers x N x S x D floats, ~38 GB fp32 at the paper's size;
    bf16 halves it, bf16-refined holds both (1.5x fp32) and the index twice; docs/operations.md's
    block of 8192 captions (23 GB, 62 GB bf16-refined) and GPU forward (6.4 GB fp32 at 4096
    pairs, 2.4 GB at Clotho's 1045 audios)."""
    cfg = DecoderConfig()  # 6 layers, D 256
    kw = dict(vocab_size=5000, max_tokens=22, pairs_per_batch=4096, gpu=True)
    fp32 = scorer_memory(100_000, 31, cfg, 12_000_000, "fp32", 256, **kw)
    assert round(fp32["kv_cache"] / 1e9) == 38
    assert round(fp32["index"] / 1e9, 1) == 3.2
    bf16 = scorer_memory(100_000, 31, cfg, 12_000_000, "bf16", 256, **kw)
    both = scorer_memory(100_000, 31, cfg, 12_000_000, "bf16-refined", 256, **kw)
    assert 2 * bf16["kv_cache"] == fp32["kv_cache"] and both["kv_cache"] == fp32["kv_cache"] + bf16["kv_cache"]
    assert both["index"] == 2 * fp32["index"]
    # docs/operations.md: a block of 8192 captions with its working copies; one GPU forward,
    # 4096 pairs of 21 input tokens, V 5000
    blocks = {p: scorer_memory(100_000, 31, cfg, 12_000_000, p, 8192, **kw)["block"] for p in ("fp32", "bf16-refined")}
    assert round(blocks["fp32"] / 1e9) == 23 and round(blocks["bf16-refined"] / 1e9) == 62
    assert round(fp32["forward"] / 1e9, 1) == 6.4 and both["forward"] == fp32["forward"] > bf16["forward"]
    clotho = scorer_memory(1045, 94, cfg, 12_000_000, "fp32", 654, **kw)  # 1045 audios: 1045 pairs a forward
    assert round(clotho["forward"] / 1e9, 1) == 2.4 and clotho["forward"] < fp32["forward"]
    # blocks: one caption x at most N audios a forward; listed pairs (block 0): pairs_per_batch
    assert clotho["forward"] == forward_memory(cfg, 5000, 22, 94, "fp32", 1045, gpu=True)
    listed = scorer_memory(1045, 94, cfg, 12_000_000, "fp32", 0, **kw)
    assert listed["forward"] == forward_memory(cfg, 5000, 22, 94, "fp32", 4096, gpu=True) > clotho["forward"]
    # docs/operations.md: on a GPU, 100k audios of 31 frames hold 48 GB fp32 on the GPU (28 GB
    # bf16, 70 GB bf16-refined) and, in host memory, 9.5 GB of frames plus the block
    on_gpu = {p: memory_places(scorer_memory(100_000, 31, cfg, 12_000_000, p, 8192, **kw), gpu=True)
              for p in ("fp32", "bf16", "bf16-refined")}
    assert [round(on_gpu[p]["gpu"]["total"] / 1e9) for p in ("fp32", "bf16", "bf16-refined")] == [48, 28, 70]
    assert round(on_gpu["fp32"]["host"]["embeddings"] / 1e9, 1) == 9.5
    assert round(on_gpu["bf16-refined"]["host"]["total"] / 1e9) == 72


def _peak_allocated(fn) -> int:
    """The most bytes torch's CPU allocator held at once while fn ran, above its level when
    fn started: every allocation and free, kernels' temporaries included, from the
    profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"aacray-mem-{os.getpid()}.json")
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.remove(path)
    sizes = [e["args"]["Bytes"] for e in sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
             if e["args"].get("Device Type") == 0]
    assert sizes, "the profiler recorded no CPU allocation"
    return int(np.cumsum(sizes).max())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["cpu", "gpu", "gpu-unfused"])
@pytest.mark.parametrize("size", [dict(d_model=64, n_layers=2, n_heads=4, d_ff=256, V=500), dict(d_model=32, n_layers=2, n_heads=2, d_ff=1024, V=3000)])
def test_forward_memory_bounds_what_a_forward_allocates(precision, layout, size):
    """One caption against 64 audios of 20-30 frames: `loss_matrix` (one forward per chunk)
    and `loss_pairs` (the listed pairs' batches) allocate at most `forward_memory`, and at
    least half of it. "gpu": the GPU's layout on CPU (no row cap, classifier over every row,
    fused or written-out attention, plain F.linear)."""
    torch.manual_seed(0)
    size = dict(size)
    V = size.pop("V")
    cfg = DecoderConfig(**size)
    model = CaptionDecoder(cfg, V, PAD).eval()
    rng = np.random.default_rng(0)
    frames = [rng.standard_normal((int(n), 768), dtype=np.float32) for n in rng.integers(20, 31, 64)]
    tokens = [[BOS, *rng.integers(4, V, 20).tolist(), EOS]]
    gpu = layout != "cpu"
    kw = dict(cpu_rows=None, classifier_rows=None, pack_weights=False, fused_attention=layout == "gpu") if gpu else {}
    scorer = PairScorer(model, PAD, frames, "cpu", precision, pairs_per_batch=64, **kw)
    bound = forward_memory(cfg, V, max(map(len, tokens)), max(f.shape[0] for f in frames), precision, 64, gpu)
    a = np.arange(len(frames))
    peaks = [_peak_allocated(lambda: scorer.loss_matrix(tokens)), _peak_allocated(lambda: scorer.loss_pairs(a, tokens * len(a)))]
    assert max(peaks) <= bound <= 2 * max(peaks), (layout, precision, peaks, bound)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (jobs/gpu_check.sh runs it)")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_forward_memory_bounds_a_cuda_forward(precision):
    """On a GPU, at the paper's model size and V 5000: what the caching allocator held above
    its starting level while 512 audios of up to 31 frames meet one 22-token caption (one
    forward of 512 pairs) stays within `forward_memory`."""
    torch.manual_seed(0)
    cfg, V = DecoderConfig(), 5000
    model = CaptionDecoder(cfg, V, PAD).eval()
    rng = np.random.default_rng(0)
    frames = [rng.standard_normal((int(n), 768), dtype=np.float32) for n in rng.integers(20, 32, 512)]
    tokens = [[BOS, *rng.integers(4, V, 20).tolist(), EOS]]
    scorer = PairScorer(model, PAD, frames, "cuda", precision, pairs_per_batch=4096)
    bound = forward_memory(cfg, V, 22, 31, precision, 4096, gpu=True)
    a = np.arange(len(frames))
    for run in (lambda: scorer.loss_matrix(tokens), lambda: scorer.loss_pairs(a, tokens * len(a))):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        print(f"{precision}: forward peak {peak / 2**20:.0f} MiB, forward_memory {bound / 2**20:.0f} MiB ({bound / peak:.2f}x)")
        assert peak <= bound, (precision, peak, bound)


def test_score_matrix_refuses_an_index_no_actor_can_hold(tmp_path, monkeypatch, caplog):
    import aacray.scoring as scoring

    rng = np.random.default_rng(2)
    ids = [f"clip{i}" for i in range(6)]
    frames = [rng.standard_normal((60, 768)).astype(np.float32) for _ in ids]  # 1.1 MB of frames
    caps = [(f"{a}#0", "evaluation", CAPTIONS[i % 4], a) for i, a in enumerate(ids)]
    ext = write_extract_output(str(tmp_path / "ext"), ids, ["evaluation"] * 6, frames, caps)
    ckpt = str(tmp_path / "ckpt")
    write_random_checkpoint(ckpt, CAPTIONS)
    out = str(tmp_path / "score")
    os.makedirs(out)
    old = '{"job": "score_matrix", "tables": {}}'  # an earlier, complete output's manifest
    with open(os.path.join(out, "_MANIFEST.json"), "w") as f:
        f.write(old)

    def no_ray(*a, **k):
        raise AssertionError("Ray was started for a job the memory guard should refuse")

    monkeypatch.setattr(scoring, "start_ray", no_ray)
    monkeypatch.setattr(scoring, "map_actors", no_ray)
    cfg = from_dict(ScoreConfig, {"checkpoint": ckpt, "audio": ext, "captions": ext, "output": out,
                                  "actors": {"memory_gb": 0.001}})
    with caplog.at_level(logging.INFO, logger="aacray.stage"), pytest.raises(BadInputError) as e:
        scoring.run_score_matrix(cfg)
    msg = str(e.value)
    assert "score_matrix: one actor needs" in msg and "kv_cache" in msg and "embeddings" in msg
    assert "actors.memory_gb" in msg and "audio_subsets" in msg and "scorer.precision bf16" in msg
    assert "caption_block_size" in msg and "scorer.pairs_per_batch" in msg and "forward" in msg
    assert any("each actor holds" in r.getMessage() for r in caplog.records)  # logged before refusing
    with open(os.path.join(out, "_MANIFEST.json")) as f:
        assert f.read() == old  # the old output is untouched
    assert not os.path.exists(os.path.join(out, "_blocks")) and not os.path.exists(os.path.join(out, "config.yaml"))


def _fake_gpu(monkeypatch, total_bytes: int, count: int = 8) -> None:
    """torch.cuda as a driver on a node of `count` GPUs of total_bytes each would see it."""
    props = type("Props", (), {"total_memory": total_bytes})()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_a_gpu_pool_checks_each_part_against_the_memory_that_holds_it(monkeypatch, caplog):
    """100k audios of 31 frames, fp32, blocks of 8192 captions: the total (80 GB) exceeds a
    GPU that holds the GPU's parts (48 GB), so a guard comparing the total with the GPU
    refused a job that fits; the frames and the block (32 GB) are host memory's."""
    import ray

    from aacray.config import ActorConfig
    from aacray.stage import check_actor_memory

    need = scorer_memory(100_000, 31, DecoderConfig(), 12_000_000, "fp32", 8192, vocab_size=5000, max_tokens=22,
                         pairs_per_batch=4096, gpu=True)
    places = memory_places(need, gpu=True)
    gpu, host = places["gpu"]["total"], places["host"]["total"]
    # the places split the parts: every part once, totals adding up to the need's
    assert set(places["host"]) - {"total"} == set(HOST_PARTS)
    assert sorted(k for p in places.values() for k in p if k != "total") == sorted(k for k in need if k != "total")
    assert gpu + host == need["total"] and memory_places(need, gpu=False) == {"host": need}
    host_gb = (host + 2**30) / 2**30
    fits = ActorConfig(num_actors=8, num_gpus=1, num_cpus=4, memory_gb=host_gb)
    _fake_gpu(monkeypatch, gpu + 2**30)
    assert need["total"] > gpu + 2**30  # the old rule (total against the GPU) refused this
    with caplog.at_level(logging.INFO, logger="aacray.stage"):
        check_actor_memory("score_matrix", need, fits, "WAYS")
    line = next(r.getMessage() for r in caplog.records if "each actor holds" in r.getMessage())
    assert f"{gpu / 2**30:.2f} GiB on its GPU (model" in line and "(Fake GPU memory x 1)" in line
    assert f"{host / 2**30:.2f} GiB in host memory (embeddings" in line and "(actors.memory_gb)" in line

    # the GPU's parts one byte over the GPU: refused, naming the GPU side only
    _fake_gpu(monkeypatch, gpu - 1)
    with pytest.raises(BadInputError) as e:
        check_actor_memory("score_matrix", need, fits, "WAYS")
    msg = str(e.value)
    assert msg.startswith(f"score_matrix: one actor needs {gpu / 2**30:.2f} GiB on its GPU (model") and "kv_cache" in msg
    assert "(Fake GPU memory x 1). Ways out: WAYS" in msg and "in host memory" not in msg
    # a half GPU holds half its memory
    _fake_gpu(monkeypatch, 2 * gpu - 2**20)
    with pytest.raises(BadInputError, match=r"x 0\.5\)"):
        check_actor_memory("score_matrix", need, ActorConfig(num_actors=8, num_gpus=0.5, memory_gb=host_gb), "WAYS")

    # host memory one GiB short: refused, naming host memory and actors.memory_gb
    _fake_gpu(monkeypatch, gpu + 2**30)
    short = ActorConfig(num_actors=8, num_gpus=1, num_cpus=4, memory_gb=(host - 2**30) / 2**30)
    with pytest.raises(BadInputError) as e:
        check_actor_memory("score_matrix", need, short, "WAYS")
    msg = str(e.value)
    assert f"{host / 2**30:.2f} GiB in host memory (embeddings" in msg and "block" in msg and "(actors.memory_gb)" in msg
    assert "on its GPU" not in msg

    # a GPU the driver cannot see, and no Ray to ask a worker: its side unknown and unchecked,
    # host memory still checked
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="aacray.stage"):
        check_actor_memory("score_matrix", need, fits, "WAYS")
    assert any("available: unknown (the GPU of a worker (not visible from this driver))" in r.getMessage() for r in caplog.records)
    with pytest.raises(BadInputError, match="in host memory"):
        check_actor_memory("score_matrix", need, short, "WAYS")


def test_a_nodes_host_memory_is_shared_by_the_actors_it_hosts(monkeypatch):
    """Worked example: a node of 32 CPUs, 8 GPUs and 256 GiB hosts 8 actors of 1 GPU and 2
    CPUs (its GPUs bound them: 32 GiB each) or 16 CPU actors of 2 CPUs (16 GiB each); a
    pool of 4 actors gets 64 GiB each; a node without the pool's GPUs hosts none."""
    import ray

    from aacray.config import ActorConfig
    from aacray.stage import actor_memory

    nodes = [{"Alive": True, "Resources": {"CPU": 32.0, "GPU": 8.0, "memory": 256.0 * 2**30}},
             {"Alive": True, "Resources": {"CPU": 64.0, "memory": 1024.0 * 2**30}},  # no GPU
             {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0, "memory": 4096.0 * 2**30}}]
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    per_actor = lambda **kw: actor_memory(ActorConfig(**kw))[0] / 2**30  # noqa: E731
    assert per_actor(num_actors=16, num_gpus=1, num_cpus=2) == 32
    assert per_actor(num_actors=4, num_gpus=1, num_cpus=2) == 64
    assert per_actor(num_actors=16, num_gpus=0.5, num_cpus=2) == 16  # 16 half-GPU actors
    # CPU pools may use the GPU-less node: 1024 GiB / 32 actors of 2 CPUs
    assert per_actor(num_actors=64, num_gpus=0, num_cpus=2) == 32
    assert actor_memory(ActorConfig(num_gpus=1, memory_gb=3.0)) == (3 * 2**30, "actors.memory_gb")


def test_a_driver_without_a_gpu_asks_a_worker(ray_local, monkeypatch):
    """The question runs as a Ray task on a worker holding the pool's GPUs. On this GPU-less
    Ray a 1-GPU worker never frees up: after GPU_PROBE_SECONDS the GPU side is unknown, and
    the source says why; a worker that can run it (0 GPUs) answers that its torch sees none."""
    from aacray import runtime, stage
    from aacray.config import ActorConfig

    monkeypatch.setattr(runtime, "ray_is_embedded", lambda: False)  # as a cluster's CPU head node
    monkeypatch.setattr(stage, "GPU_PROBE_SECONDS", 1)
    assert stage.actor_memory(ActorConfig(num_gpus=1), "gpu") == (
        None, "the GPU of a worker (no worker with 1 GPU free to ask within 1 s)")
    monkeypatch.setattr(stage, "GPU_PROBE_SECONDS", 120)  # a worker to start, torch to import
    assert stage._gpu_memory_of_a_worker(0) == (None, "the GPU of a worker (its torch sees no GPU)")
