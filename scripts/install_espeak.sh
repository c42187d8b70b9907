#!/bin/sh
# Debian's espeak-ng for r1kit.multimodal's spoken-digit data (r1kit train-vl, tests/test_multimodal_data.py,
# benchmarks/bench_multimodal.py). A no-op when the binary is there; otherwise scripts/apt_install.sh. Without it the
# speech tests skip (CI sets R1KIT_REQUIRE_ESPEAK=1 so that they fail instead).
if command -v espeak-ng >/dev/null 2>&1; then
    exit 0
fi
exec sh "$(dirname "$0")/apt_install.sh" "the espeak-ng speech tests" espeak-ng
