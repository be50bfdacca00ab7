"""`gemb plan`: will a config fit a cluster, what will it send, how long will a step take (gemb_dist.plan)."""

from __future__ import annotations

import argparse
import dataclasses
import json

from gemb_dist.config import ConfigError, GembConfig, build_config, load_config
from gemb_dist.plan import GIB, Cluster, Plan, fixes, knobs_from_config, make_plan, model_shape

MODES = ("step", "chunk")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="Per-rank memory, communication and step time of a config on a cluster; refuses one that cannot fit.",
    )
    parser.add_argument("--config", help="YAML config file (defaults when omitted).")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--gpus", type=int, required=True, help="Data-parallel ranks, one per GPU.")
    parser.add_argument("--gpu-memory", type=float, required=True, help="Memory of one GPU, GiB.")
    parser.add_argument("--bandwidth", type=float, default=50.0, help="Collective bus bandwidth per GPU, GB/s.")
    parser.add_argument("--tflops", type=float, default=989.0, help="Peak dense TFLOP/s of one GPU (compute dtype).")
    parser.add_argument("--mfu", type=float, default=0.4, help="Fraction of peak the matmuls reach.")
    parser.add_argument("--reserve", type=float, default=4.0, help="GiB per GPU kept for CUDA, NCCL, fragmentation.")
    parser.add_argument("--json", action="store_true", help="Print the plan as JSON instead of a table.")
    parser.set_defaults(func=_plan)


def _plan(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    cluster = Cluster(args.gpus, args.gpu_memory, args.bandwidth, args.tflops, args.mfu, args.reserve)
    shape = model_shape(config.model)
    knobs = knobs_from_config(config, cluster.num_gpus)
    plans = {mode: make_plan(shape, dataclasses.replace(knobs, reduction=mode), cluster) for mode in MODES}
    refused = {mode: _refusal(config, mode) for mode in MODES}
    if args.json:
        print(json.dumps(_as_json(shape.num_params, plans, refused, knobs.reduction), indent=1))
    else:
        print(_table(config, shape.num_params, cluster, plans, refused, knobs.reduction))
    chosen = plans[knobs.reduction]
    if not chosen.fits:
        raise ValueError(_refuse_message(chosen, cluster, fixes(shape, chosen.knobs, cluster)))
    return 0


def _refusal(config: GembConfig, mode: str) -> str | None:
    """Why the config validator refuses `gradcache.reduction=mode` for this config (None: it accepts it)."""
    try:
        build_config(config.model_dump(mode="json"), [f"gradcache.reduction={mode}"])
    except ConfigError as err:
        # "invalid configuration:\n  <root>: Value error, WHY (got {the whole config})": keep WHY.
        message = str(err).removeprefix("invalid configuration:\n  ").removeprefix("<root>: Value error, ")
        return message.split(" (got {")[0]
    return None


def _size(num_bytes: float) -> str:
    return f"{num_bytes / GIB:.1f} GiB" if num_bytes >= GIB else f"{num_bytes / 2**20:.1f} MiB"


def _refuse_message(plan: Plan, cluster: Cluster, found: list[tuple[str, Plan]]) -> str:
    memory = plan.memory
    terms = {k: getattr(memory, k) for k in ("params", "gathered", "grads", "optimizer", "activations", "logits")}
    biggest = max(terms, key=terms.__getitem__)
    head = (
        f"does not fit: peak {_size(memory.peak)} per rank in {memory.peak_phase} > "
        f"{_size(cluster.usable_bytes)} usable (largest term: {biggest} {_size(terms[biggest])})"
    )
    if not found:
        return head + "; no single setting makes it fit: more GPUs with more memory, or a smaller model"
    options = ", or ".join(f"{name} (peak {_size(p.memory.peak)})" for name, p in found)
    return f"{head}; set {options}"


def _as_json(num_params: int, plans: dict[str, Plan], refused: dict[str, str | None], configured: str) -> dict:
    out = {"num_params": num_params, "configured_reduction": configured, "modes": {}}
    for mode, plan in plans.items():
        out["modes"][mode] = {
            "memory_bytes": dataclasses.asdict(plan.memory),
            "traffic_bytes": {**dataclasses.asdict(plan.traffic), "total": plan.traffic.total},
            "step_s": {"compute": plan.time.compute_s, "comm": plan.time.comm_s,
                       "overlapped": plan.time.overlapped_s, "serial": plan.time.serial_s},
            "fits": plan.fits,
            "refused_by_config": refused[mode],
        }  # fmt: skip
    return out


def _table(config: GembConfig, num_params: int, cluster: Cluster, plans: dict, refused: dict, configured: str) -> str:
    k = plans[configured].knobs
    precision = config.deepspeed.precision
    lines = [
        f"model: {num_params / 1e9:.3f} B parameters (backbone + projection to {k.embedding_dim})",
        f"cluster: {cluster.num_gpus} GPUs x {cluster.gpu_memory_gib:g} GiB ({cluster.usable_bytes / GIB:.0f} usable), "
        f"{cluster.bandwidth_gbs:g} GB/s, {cluster.peak_tflops:g} TFLOP/s at {cluster.mfu:.0%} MFU",
        f"step: global batch {k.global_batch} ({k.local_batch} queries a rank, {k.num_negatives} hard negatives), "
        f"{k.num_chunks} chunks of {k.texts_per_chunk} x {k.max_length} tokens, loss block {k.loss_block}, "
        f"ZeRO-{k.zero_stage}, {precision}, pass 1 {k.zero3_pass1}",
        "",
        f"{'':34}" + "".join(f"{'reduction=' + m + ('*' if m == configured else ''):>18}" for m in MODES),
    ]

    def row(label: str, values) -> None:
        lines.append(f"{label:34}" + "".join(f"{v:>18}" for v in values))

    ps = [plans[m] for m in MODES]
    lines.append("memory per rank, GiB")
    for label, field in (("params (resident)", "params"), ("params gathered (ZeRO-3)", "gathered"),
                         ("gradients", "grads"), ("optimizer states", "optimizer"),
                         ("activations (one chunk)", "activations"), ("logits block x B_global + reps", "logits"),
                         ("reduction buckets", "buffers"), ("grad in flight (largest param)", "grad_in_flight"),
                         ("optimizer step scratch", "step_scratch")):  # fmt: skip
        row("  " + label, [f"{getattr(p.memory, field) / GIB:.2f}" for p in ps])
    row("  peak", [f"{p.memory.peak / GIB:.2f} ({p.memory.peak_phase})" for p in ps])
    lines.append("communication per step, GB received per rank")
    row(
        "  ZeRO-3 parameter gathers",
        [f"{p.traffic.param_gathers / 1e9:.1f} ({p.traffic.num_param_gathers}x)" for p in ps],
    )
    name = "reduce-scatter" if k.zero_stage >= 2 else "all-reduce"
    row(f"  gradient {name}", [f"{p.traffic.grad_reduction / 1e9:.1f} ({p.traffic.num_grad_reductions}x)" for p in ps])
    row("  parameter all-gather (ZeRO-1/2)", [f"{p.traffic.param_allgather / 1e9:.2f}" for p in ps])
    row("  rep all-gather (+ backward)", [f"{p.traffic.reps / 1e9:.3f}" for p in ps])
    row("  total", [f"{p.traffic.total / 1e9:.1f}" for p in ps])
    lines.append("step time, s")
    row("  compute", [f"{p.time.compute_s:.2f}" for p in ps])
    row("  communication", [f"{p.time.comm_s:.2f}" for p in ps])
    row("  step (overlapped..serial)", [f"{p.time.overlapped_s:.1f}..{p.time.serial_s:.1f}" for p in ps])
    row("fits", ["yes" if p.fits else "NO" for p in ps])
    for mode in MODES:
        if refused[mode]:
            lines.append(f"reduction={mode} is refused by the config: {refused[mode]}")
    lines.append("* = the config's gradcache.reduction")
    return "\n".join(lines)
