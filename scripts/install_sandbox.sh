#!/bin/sh
# Debian's bubblewrap for r1kit.eval.sandbox, which runs model-written code (r1kit eval --task humaneval) and its
# tests (tests/test_sandbox.py). A no-op when bwrap is installed; otherwise scripts/apt_install.sh. Without it the
# sandbox falls back to `unshare` (no network, but the host's files visible) and the containment tests skip.
if command -v bwrap >/dev/null 2>&1; then
    exit 0
fi
exec sh "$(dirname "$0")/apt_install.sh" "the sandbox tests" bubblewrap
