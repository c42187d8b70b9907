#!/bin/sh
# Debian's bubblewrap for r1kit.eval.sandbox, which runs model-written code (r1kit eval --task humaneval) and its
# tests (tests/test_sandbox.py). A no-op when bwrap is installed; otherwise apt-get (as root, or through sudo when
# available). Where neither works, it says so and exits 0: the sandbox then falls back to `unshare` (no network,
# but the host's files visible) and the containment tests skip with the reason.
if command -v bwrap >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "install_sandbox.sh: bubblewrap missing and no root: the sandbox tests will be skipped" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_sandbox.sh: no apt-get here: install bubblewrap yourself" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y --no-install-recommends bubblewrap ||
    { $SUDO apt-get update && $SUDO apt-get install -y --no-install-recommends bubblewrap; } ||
    echo "install_sandbox.sh: apt-get failed: the sandbox tests will be skipped" >&2
