#!/bin/sh
# apt_install.sh WHAT PACKAGE...: install Debian packages for the tests (as root, or through sudo when available).
# Where that is impossible it says so and exits 0: the tests needing WHAT then skip with the reason (CI sets an
# R1KIT_REQUIRE_* variable so that they fail instead). Called by install_browser.sh and install_sandbox.sh.
what=$1
shift
if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "apt_install.sh: $* missing and no root: $what will be skipped" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "apt_install.sh: no apt-get here: install $* yourself" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y --no-install-recommends "$@" ||
    { $SUDO apt-get update && $SUDO apt-get install -y --no-install-recommends "$@"; } ||
    echo "apt_install.sh: apt-get failed: $what will be skipped" >&2
