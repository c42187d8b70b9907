#!/bin/sh
# Debian's chromium + chromium-driver for tests/test_web_page.py (Selenium drives them; nothing is downloaded
# by the tests). A no-op when both are installed; otherwise apt-get (as root, or through sudo when available).
# Where neither works, it says so and exits 0: the browser test then skips with the reason.
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "install_browser.sh: chromium/chromedriver missing and no root: the browser test will be skipped" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser.sh: no apt-get here: install chromium and chromedriver yourself" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y --no-install-recommends chromium chromium-driver ||
    { $SUDO apt-get update && $SUDO apt-get install -y --no-install-recommends chromium chromium-driver; } ||
    echo "install_browser.sh: apt-get failed: the browser test will be skipped" >&2
