"""Continual learning for r1kit's training loop: learn a new task without forgetting the earlier ones.

    r1kit train --config configs/continual-nano-compare.yaml --continual-from r1kit/nano

- importance.py: diagonal Fisher (empirical / sampled labels), online EWC accumulation, the EWC penalty, the file
- freezing.py:   elastic freezing or learning-rate scaling of layers, heads, experts or single weights by importance
- replay.py:     task-balanced reservoir replay buffer (bounded in rows and bytes), its file, the mixing batch source
- generative.py: generative replay (the previous model's verified answers)
- hook.py:       ContinualHook, what a `continual:` section adds to r1kit.train.loop (and LwF distillation)
"""

from r1kit.train.continual.importance import ContinualError, Importance, ewc_penalty, fisher_diagonal

__all__ = ["ContinualError", "Importance", "ewc_penalty", "fisher_diagonal"]
