#!/usr/bin/env bash
# One pip step of the image build: `pip_step.sh STEP PIP-INSTALL-ARGS...` runs `pip install ARGS` and, when it fails,
# ends with one line naming the build step and the package pip could not install (taken from pip's own error), e.g.
#
#   image build failed at step dependencies: pip install mlflow[auth]<3.18,>=3.17
#
# so a failed build says what to fix without reading pip's whole log. pip's output is shown as it comes.
set -uo pipefail
step=$1
shift
log=$(mktemp)
trap 'rm -f "$log"' EXIT
pip install "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
[ "$status" = 0 ] && exit 0

# The requirement pip names in its error: an unknown version, a wheel that did not build, a conflict.
package=$(sed -n \
  -e 's/^ERROR: No matching distribution found for \(.*\)$/\1/p' \
  -e 's/^ERROR: Could not find a version that satisfies the requirement \([^ ]*\).*$/\1/p' \
  -e 's/^ERROR: Failed building wheel for \(.*\)$/\1/p' \
  -e 's/^ERROR: Failed to build installable wheels for some pyproject.toml based projects (\(.*\))$/\1/p' \
  -e 's/^ERROR: Cannot install \(.*\) because these package versions have conflicting dependencies\.$/\1/p' \
  "$log" | head -n 1)
echo "image build failed at step $step: pip install ${package:-$*}" >&2
exit "$status"
