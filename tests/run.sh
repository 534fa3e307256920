#!/usr/bin/env bash
# The README's second command (and what .ci/run calls): set up on a fresh machine, then run the tests.
# Extra arguments go to pytest (e.g. -k optim, -m "not launcher").
source "$(dirname "${BASH_SOURCE[0]}")/../train/setup.sh"
exec python -m pytest "$@"
