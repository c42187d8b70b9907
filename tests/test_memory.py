"""Loading reads each tensor through a memory map and assigns it: about one copy of the weights in memory."""

from __future__ import annotations

import subprocess
import sys

from r1kit.checkpoint import save_model
from r1kit.model.config import preset
from r1kit.model.transformer import Transformer

PROBE = """
import sys, torch
from r1kit.checkpoint import load_model
def anon():  # private memory, not counting the file pages the memory map shares with the page cache
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('RssAnon')) * 1024
before = anon()
model = load_model(sys.argv[1], 'cpu', torch.float32)
print(anon() - before, sum(p.numel() * p.element_size() for p in model.parameters()))
"""


def test_load_needs_about_one_copy(tmp_path):
    cfg = preset("tiny-dense", vocab_size=32000, hidden_size=512, intermediate_size=1536, num_layers=4,
                 num_heads=8, num_kv_heads=8)
    save_model(Transformer(cfg).init_weights(0), tmp_path)  # ~100 MB of fp32 weights
    out = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path)], capture_output=True, text=True, check=True)
    grown, weights = map(int, out.stdout.split())
    assert weights > 90e6
    assert grown < 1.25 * weights, f"loading grew private memory by {grown / weights:.2f}x the weights"
