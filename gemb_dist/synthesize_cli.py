"""`gemb synthesize` and `jobs/synthesize.py`: one command, two entry points."""

from __future__ import annotations

import json
from pathlib import Path

from gemb_dist.config_args import JobCommand
from gemb_dist.synthesize import REPORT_NAME, SynthesizeJobConfig, run_synthesis
from gemb_dist.train.tracking import job_tracker, log_report


def synthesize(config: SynthesizeJobConfig) -> int:
    """Generate inside one tracked run, log the report, print a summary line."""
    run_name = config.run_name or f"synthesize-{Path(config.output).name}"
    with job_tracker(config, job="synthesize", run_dir=config.output, run_name=run_name) as tracker:
        report = run_synthesis(config)
        log_report(tracker, report, Path(config.output) / REPORT_NAME)
    print(json.dumps({"samples": report["num_samples"], "output": config.output, "tasks": report["tasks"]}))
    return 0


COMMAND = JobCommand(SynthesizeJobConfig, synthesize, help="Generate synthetic training shards with an LLM endpoint.")


def register(subparsers) -> None:
    COMMAND.register(subparsers, "synthesize")
