"""Wait until a Ray head can run jobs: its dashboard answers some seconds before the job agent registers."""

from __future__ import annotations

import time


def wait_for_job_api(address: str, headers: dict[str, str] | None = None, timeout_s: float = 180.0) -> None:
    """Submit a no-op job until the head accepts one ("No available agent to submit job" until then)."""
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            client = JobSubmissionClient(address, headers=headers)
            client.submit_job(entrypoint="true", metadata={"purpose": "readiness probe"})
            return
        except Exception as err:  # noqa: BLE001 - any refusal means "not yet"; the last one is reported
            last_error = err
            time.sleep(1.0)
    raise TimeoutError(f"the Ray job API at {address} accepted no job within {timeout_s:.0f} s: {last_error}")
