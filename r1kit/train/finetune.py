"""`r1kit finetune` and `r1kit merge`: LoRA / QLoRA fine-tuning of a trained model on a chat JSONL, and merging.

    r1kit finetune BASE --data train.jsonl --out DIR [--config configs/lora-nano.yaml] [--lora-r 8] ...
    r1kit merge BASE DIR OUT

`finetune` builds a TrainConfig (init_from = BASE, data.chat_jsonl = the file, the `lora:` section) and runs the
training loop of ``r1kit train`` (r1kit.train.loop.train): the same steps, schedule, checkpoints and resume, with
adapters injected into the frozen base and only the adapters in the optimizer. The adapter lands at the top of
DIR (adapter_config.json + adapter_model.safetensors, PEFT's layout); checkpoints in DIR/checkpoints, metrics
and plots beside them. Every flag is also a YAML key (`FLAG_KEYS`); flags win over --config, which wins over
the design's defaults (`FINETUNE_DEFAULTS`, the same as configs/finetune-default.yaml).

`merge` adds an adapter into a full-precision base and writes a plain checkpoint (weights + config + tokenizer).
"""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from r1kit.train.config import TrainConfig, TrainConfigError, read_yaml_mapping

log = logging.getLogger("r1kit")

# The design's fine-tuning recipe (batch 32, learning rate 3e-5, warmup 500, gradient accumulation 8) with LoRA
# r 8 / alpha 16 / dropout 0.05 on the default targets; configs/finetune-default.yaml holds the same (tested).
FINETUNE_DEFAULTS: dict[str, Any] = {
    "lora": {"r": 8, "alpha": 16.0, "dropout": 0.05},
    "batch_size": 32, "gradient_accumulation": 8, "learning_rate": 3e-5, "warmup_steps": 500,
    "max_steps": 1000, "seq_len": 512, "schedule": "cosine", "min_lr_ratio": 0.1, "weight_decay": 0.0,
    "eval_interval": 100, "checkpoint_interval": 100, "log_interval": 10,
}

# command-line flag (argparse dest) -> its key in the recipe (section, key); section None: top level
FLAG_KEYS: dict[str, tuple[str | None, str]] = {
    "lora_r": ("lora", "r"), "lora_alpha": ("lora", "alpha"), "lora_dropout": ("lora", "dropout"),
    "target_modules": ("lora", "target_modules"), "qlora": ("lora", "qlora"), "max_steps": (None, "max_steps"),
    "learning_rate": (None, "learning_rate"), "batch_size": (None, "batch_size"), "seq_len": (None, "seq_len"),
    "gradient_accumulation": (None, "gradient_accumulation"), "warmup_steps": (None, "warmup_steps"),
    "validation_fraction": ("data", "validation_fraction"), "seed": (None, "seed"), "precision": (None, "precision"),
}


def parse_targets(text: str) -> str | list[str]:
    """--target-modules: "q_proj,v_proj" is a list of module names, anything else one regular expression."""
    parts = [p.strip() for p in text.split(",")]
    return parts if len(parts) > 1 else text


def finetune_config(base: str, data: str, out: str, config: str | None = None, **flags: Any) -> TrainConfig:
    """The TrainConfig `r1kit finetune` runs: FINETUNE_DEFAULTS, then the --config YAML, then the flags given
    (None = not given), then init_from = base, data.chat_jsonl = data, out_dir = out."""
    recipe = copy.deepcopy(FINETUNE_DEFAULTS)
    if config is not None:
        for key, value in read_yaml_mapping(config).items():
            if isinstance(value, dict) and isinstance(recipe.get(key), dict):
                recipe[key].update(value)
            else:
                recipe[key] = value
    for flag, value in flags.items():
        if flag not in FLAG_KEYS:
            raise TypeError(f"finetune_config: unknown flag {flag!r}; flags: {sorted(FLAG_KEYS)}")
        if value is None:
            continue
        section, key = FLAG_KEYS[flag]
        (recipe.setdefault(section, {}) if section else recipe)[key] = value
    recipe["init_from"], recipe["out_dir"] = str(base), str(out)
    recipe.setdefault("data", {})["chat_jsonl"] = str(data)
    if not recipe.get("lora", {}).get("r"):
        raise TrainConfigError(f"{config or 'finetune'}: lora.r must be >= 1 (r1kit finetune trains adapters; "
                               "r1kit train --config fine-tunes the whole model)")
    return TrainConfig.from_dict(recipe, where=str(config or "r1kit finetune"))


def finetune(base: str, data: str, out: str, config: str | None = None, resume: bool = False,
             device: str = "cpu", progress: bool = True, **flags: Any) -> dict[str, Any]:
    """Fine-tune `base` on the chat JSONL `data` with LoRA (QLoRA with qlora=...); the adapter lands in `out`.
    Returns the training summary plus "adapter" (the folder)."""
    from r1kit.api import resolve_model_path
    from r1kit.train.loop import train

    cfg = finetune_config(str(resolve_model_path(base)), data, out, config, **flags)
    summary = train(cfg, resume=resume, progress=progress, device=device)
    summary["adapter"] = str(out)
    return summary


def merge(base: str, adapter: str, out: str, dtype: str | None = None) -> dict[str, Any]:
    """Write BASE with ADAPTER merged in as a plain checkpoint OUT (config.json, safetensors, tokenizer files).
    dtype: "fp32" | "bf16" | None (the base's torch_dtype, fp32 when it has none)."""
    from r1kit.api import resolve_model_path
    from r1kit.checkpoint import load_model, save_model
    from r1kit.fileio import read_config_json
    from r1kit.lora import load_adapter, merge_lora, unload_lora

    path = resolve_model_path(base)
    dtypes = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    name = dtype or read_config_json(path).get("torch_dtype") or "fp32"
    if name not in dtypes:
        raise ValueError(f"merge: dtype {name!r} not supported; use fp32 or bf16")
    model = load_model(path, "cpu", torch.float32)
    modules = load_adapter(model, adapter)
    merge_lora(model, keep_original=False)
    save_model(unload_lora(model), out, dtype=dtypes[name])
    for file in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (path / file).is_file():
            shutil.copy2(path / file, Path(out) / file)
    log.info("merged %s (%d modules) into %s -> %s (%s)", adapter, len(modules), path, out, name)
    return {"out": str(out), "modules": len(modules), "dtype": name}
