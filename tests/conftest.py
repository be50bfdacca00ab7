"""Suite-wide environment: no model hub, and Ray heads started by tests without token auth.

Ray 2.60 writes `~/.ray/auth_token` the first time a local `ray.init()` runs; every later head on the
machine would then demand it, so tests that start their own head opt out explicitly (tests of the
token-authenticated local cluster set RAY_AUTH_MODE=token themselves).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
