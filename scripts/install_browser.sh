#!/bin/sh
# Debian's chromium + chromium-driver for tests/test_web_page.py (Selenium drives them; nothing is downloaded
# by the tests). A no-op when both are installed; otherwise scripts/apt_install.sh.
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi
exec sh "$(dirname "$0")/apt_install.sh" "the browser test" chromium chromium-driver
