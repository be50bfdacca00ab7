"""Run a function on real processes joined in a gloo process group on 127.0.0.1, and collect what each returns.

Each rank saves its result to a file; the launcher trusts those files rather than exit codes, because a
finished gloo process occasionally aborts during interpreter teardown. A rank that raised reports its
traceback; a rank that wrote nothing fails the call.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(fn: Callable, rank: int, world_size: int, port: int, out_dir: str, args: tuple) -> None:
    torch.set_num_threads(1)
    out = Path(out_dir)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=120),
        )
        result = fn(rank, world_size, *args)
        tmp = out / f".rank{rank}.pt.tmp"
        torch.save(result, tmp)
        os.replace(tmp, out / f"rank{rank}.pt")
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_workers(fn: Callable, world_size: int, *args: Any, timeout: float = 300.0) -> list[Any]:
    """`fn(rank, world_size, *args)` on `world_size` spawned processes; returns the results in rank order.

    `fn` must be importable (a module-level function) and return what `torch.load(weights_only=True)` reads back
    (tensors, numbers, strings, containers of them).
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="gemb-mp-") as out_dir:
        procs = [
            ctx.Process(target=_worker, args=(fn, rank, world_size, port, out_dir, args), daemon=True)
            for rank in range(world_size)
        ]
        for proc in procs:
            proc.start()
        out = Path(out_dir)
        deadline = time.monotonic() + timeout
        # A rank that raised leaves the others blocked in a collective: stop waiting soon after it reports.
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            if any(out.glob("rank*.err")):
                deadline = min(deadline, time.monotonic() + 5.0)
            time.sleep(0.2)
        hung = [rank for rank, proc in enumerate(procs) if proc.is_alive()]
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(10)
        errors = [(out / f"rank{r}.err").read_text() for r in range(world_size) if (out / f"rank{r}.err").exists()]
        if errors:
            raise RuntimeError("a rank raised:\n" + "\n".join(errors))
        missing = [r for r in range(world_size) if not (out / f"rank{r}.pt").exists()]
        if missing:
            codes = [proc.exitcode for proc in procs]
            raise RuntimeError(
                f"ranks {missing} wrote no result (exit codes {codes}, still running after {timeout:.0f}s: {hung})"
            )
        return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
