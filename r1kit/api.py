"""R1Model: the user-facing object. Load a checkpoint, generate text, chat with reasoning separated.

    model = R1Model.from_pretrained("path/to/DeepSeek-R1-Distill-Qwen-1.5B", device="auto")
    print(model.generate(prompt="Explain quantum entanglement", max_length=200, temperature=0.7))
    for piece in model.generate(prompt="...", max_new_tokens=64, stream=True): print(piece, end="")
    reply = model.chat([{"role": "user", "content": "What is 17*23?"}])   # reply.reasoning, reply.content
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from r1kit import hardware, kernels
from r1kit.chat_template import load_chat_template
from r1kit.checkpoint import CheckpointError, load_model
from r1kit.engine import LLMEngine
from r1kit.engine.config import EngineConfig
from r1kit.engine.speculative import SpeculativeStats, speculative_generate
from r1kit.generate import GenerationError, SamplingParams, TokenLogprob, default_max_new_tokens, generate_tokens
from r1kit.model.config import format_count
from r1kit.model.transformer import Transformer
from r1kit.safety.shield import Screening, Shield
from r1kit.structured import Guide, GuideFactory
from r1kit.tokenizer import TextStream, Tokenizer
from r1kit.tools import ToolCall, ToolCallParser, ToolError, check_tool_choice, check_tools

log = logging.getLogger("r1kit")
BUNDLED_DIR = Path(__file__).parent  # bundled models live in the package: r1kit/<name>


class ModelNotFoundError(FileNotFoundError):
    """A model name is neither a folder, a bundled model, nor in the local Hugging Face cache."""


def resolve_model_path(name: str | os.PathLike) -> Path:
    """Absolute folder of a model: a local folder, a bundled model ("r1kit/nano"), or a local Hugging Face cache
    entry. Absolute, so that it means the same folder to a process started elsewhere (a replica, a client).

    Never touches the network; when the files are not here the error says how to fetch them.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.is_file() and path.suffix.lower() == ".gguf":  # llama.cpp / Ollama: converted once into a cache folder
        from r1kit.gguf import gguf_folder

        return gguf_folder(path)
    text = str(name)
    if text.startswith("r1kit/"):
        bundled = BUNDLED_DIR.resolve() / text.removeprefix("r1kit/")
        if (bundled / "config.json").is_file():
            return bundled
        raise ModelNotFoundError(f"{text!r} is not bundled with this r1kit version (looked in {bundled})")
    if text.count("/") == 1:
        hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface"))
                   / "hub").expanduser().resolve()
        repo = hub / f"models--{text.replace('/', '--')}"
        ref = repo / "refs" / "main"
        snapshots = repo / "snapshots"
        if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
            return snapshots / ref.read_text().strip()
        if snapshots.is_dir():
            found = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime)
            if found:
                return found[-1]
    hint = (f"fetch the files first, e.g. `huggingface-cli download {text} --local-dir ./{Path(text).name}`, "
            f"then load ./{Path(text).name}" if text.count("/") == 1 and not text.startswith((".", "/", "~"))
            else "check the path")
    raise ModelNotFoundError(f"no model at {text!r}: not a folder, not bundled, not in the Hugging Face cache "
                             f"(r1kit never downloads); {hint}")


@dataclass
class Completion:
    """R1Model.complete's result: the text (up to a stop string), the generated token ids (a stop id included),
    their log-probabilities (TokenLogprob, when asked) and the prompt's (None for its first token)."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    prompt_logprobs: list[TokenLogprob | None] | None
    finish_reason: str | None


@dataclass
class ChatReply:
    """A chat answer: the model's reasoning (inside <think>...</think>) and the final content."""

    reasoning: str
    content: str
    text: str  # the raw generated text
    prompt_tokens: int
    completion_tokens: int
    tool_calls: list[ToolCall] = dataclasses.field(default_factory=list)  # the calls the answer made (tools=)
    modality_weights: dict[str, float] | None = None  # the modality gate's weights, with media (r1kit.multimodal)

    def __str__(self) -> str:
        return self.content


class R1Model:
    """A loaded model + tokenizer on one device, with text generation and chat.

    One generation at a time: a batch of prompts is one call, and a stream must be finished or closed before
    the next call. An R1Model is not thread-safe; concurrent requests go through `r1kit.serve.EngineService`,
    which owns an engine on its own thread.
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer | None, path: Path | None = None,
                 device_reason: str = "", engine_config: EngineConfig | None = None):
        self.model, self.tokenizer, self.path = model, tokenizer, path
        self.device_reason = device_reason
        self.engine_config = engine_config or EngineConfig()  # the engine's settings (KV pool cap, batch limits...)
        # False: the plain KV-cache decode loop (generate_tokens), the reference path
        self.use_engine = True
        self._engine: LLMEngine | None = None
        self._ids = itertools.count()  # engine request ids
        self.speculative_stats: SpeculativeStats | None = None  # of the last speculative generate()
        self._guides: GuideFactory | None = None  # structured outputs' grammar compiler (complete(structured=))
        self.shield: Shield | None = None  # r1kit.safety: input screening, output redaction, audit (opt-in)
        self.multimodal: Any = None  # r1kit.multimodal.VisionAudioLM around self.model, for a model with encoders

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, device: str | torch.device | None = "auto",
                        dtype: str | torch.dtype | None = None, quantization: str | None = None,
                        allow_pickle: bool = False, engine_config: EngineConfig | None = None,
                        chat_template: str | os.PathLike | None = None,
                        adapter: str | os.PathLike | None = None, safety: Any = None) -> R1Model:
        """Load a Hugging Face-format folder (or bundled / cached model) onto a device.

        Args:
            name_or_path: folder with config.json + *.safetensors (+ tokenizer.json), "r1kit/<name>", or
                "org/name" found in the local Hugging Face cache.
            device: "auto" (best available, reason logged), "cpu", "cuda", "cuda:N", "mps", "npu".
            dtype: torch dtype or name ("bf16", "fp32", ...); default chosen per device (bf16 on capable CPUs).
            quantization: None, or "int8" (per-channel weights), "int4" (group-wise), "fp8" (e4m3 weights):
                weight-only quantization applied after loading (see r1kit.quant; the MoE router stays fp32).
                A checkpoint written by ``r1kit quantize`` loads quantized without it; asking it for another
                method is an error.
            allow_pickle: read .bin/.pt weights with torch.load(weights_only=True); refused otherwise.
            engine_config: the inference engine's settings (`r1kit.engine.EngineConfig`; None: its defaults).
            chat_template: a Jinja chat template file that replaces the checkpoint's own (``--chat-template``).
            safety: turn the safety shield on (`r1kit.safety`): a SafetyConfig, a dict or a YAML file (e.g.
                configs/safety.yaml), or a Shield; generate() and chat() then screen their text input (InputBlocked,
                or the configured refusal), redact their output and append to the audit log when one is configured.
            adapter: a LoRA adapter folder (adapter_config.json + adapter_model.safetensors, PEFT's layout) applied
                as adapter "default"; more with ``load_adapter(DIR, name)``, switched with ``set_adapter(name)``.
        """
        from r1kit.quant import METHODS, quantize_model
        from r1kit.quant.checkpoint import stored_method

        if quantization is not None and quantization not in METHODS:
            raise ValueError(f"quantization={quantization!r}: expected None or one of {list(METHODS)}")
        path = resolve_model_path(name_or_path)
        stored = stored_method(path)
        if quantization is not None and stored is not None and quantization != stored:
            raise ValueError(f"quantization={quantization!r}, but {path} is a checkpoint quantized to {stored!r} "
                             f"(config.json quantization_config.method); load it with quantization=None or "
                             f"{stored!r}, or quantize the original checkpoint")
        choice = hardware.choose(device, dtype)
        model = load_model(path, choice.device, choice.dtype, allow_pickle=allow_pickle)
        if quantization is not None and stored is None:
            stats = quantize_model(model, quantization)
            log.info("%s: %d modules quantized to %s, weights %.1f -> %.1f MiB", path, stats["swapped"],
                     quantization, stats["weight_bytes_before"] / 2**20, stats["weight_bytes_after"] / 2**20)
        if choice.device.type == "cpu" and choice.dtype == torch.bfloat16:
            n = kernels.accelerate(model)  # batch-1..8 decode through r1kit's bf16 GEMV (see r1kit.kernels)
            log.info("%s", f"CPU decode kernels on {n} linear layers" if n else
                     f"CPU decode kernels off ({kernels.why_not()})")
        tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None
        if tokenizer is None:
            log.warning("%s has no tokenizer.json: text generation needs one (token ids still work)", path)
        elif chat_template is not None:
            tokenizer.chat_template = load_chat_template(None, None, override=chat_template)
        loaded = cls(model, tokenizer, path, choice.reason, engine_config)
        if (path / "multimodal").is_dir():
            from r1kit.multimodal.model import VisionAudioLM

            loaded.multimodal = VisionAudioLM.attach(model, path)
        if adapter is not None:
            loaded.load_adapter(adapter)
        if safety is not None:
            loaded.shield = Shield.from_spec(safety)
        return loaded

    # ------------------------------------------------------------------------------------------ adapters
    def load_adapter(self, path: str | os.PathLike, name: str = "default", activate: bool = True) -> list[str]:
        """Add a LoRA adapter folder as adapter `name` (the base is not reloaded); with `activate`, generate with
        it from now on. Returns the adapted module names."""
        from r1kit.lora import load_adapter

        modules = load_adapter(self.model, path, name, activate=False)
        if activate:
            self.set_adapter(name)
        log.info("adapter %r from %s on %d modules", name, path, len(modules))
        return modules

    def set_adapter(self, name: str | None) -> None:
        """Generate with adapter `name` (None: the base model alone). The engine's cached prefixes were computed
        with the previous adapter, so the engine is remade."""
        from r1kit.lora import set_adapter

        if self._engine is not None and self._engine.has_unfinished():
            raise GenerationError("another generation is still running on this model (an unfinished stream): "
                                  "finish or close it before switching adapters")
        set_adapter(self.model, name)
        self._engine = None

    # ------------------------------------------------------------------------------------------ info
    def info(self) -> dict[str, Any]:
        cfg = self.config
        tensors = {t.data_ptr(): t for t in self.model.state_dict().values()}  # tied weights counted once
        weight_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        return {
            "path": str(self.path) if self.path else None, "architecture": cfg.arch, "attention": cfg.attention,
            "layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
            "routed_experts": cfg.n_routed_experts, "experts_per_token": cfg.num_experts_per_tok,
            "mtp_layers": cfg.num_mtp_layers, "context": cfg.max_position_embeddings,
            "params_total": cfg.num_params(), "params_mtp": cfg.num_mtp_params(),  # as DeepSeek: 671B + 14B MTP
            "params_active": cfg.num_params(active=True),
            "params_total_h": format_count(cfg.num_params()), "params_mtp_h": format_count(cfg.num_mtp_params()),
            "params_active_h": format_count(cfg.num_params(active=True)),
            "dtype": str(self.dtype).removeprefix("torch."), "device": str(self.device),
            "weights_MiB": round(weight_bytes / 2**20, 1), "device_reason": self.device_reason,
        }

    # ------------------------------------------------------------------------------------------ generation
    def _tok(self, chat: bool = False) -> Tokenizer:
        """The tokenizer; without one, a GenerationError saying what generate() (or chat()) can do instead."""
        if self.tokenizer is None:
            where = f"{self.path} has no tokenizer.json" if self.path else "this R1Model has no tokenizer"
            load = "set model.tokenizer = r1kit.tokenizer.Tokenizer.from_dir(a folder with tokenizer.json)"
            if chat:
                raise GenerationError(f"{where}, so chat() cannot encode messages; {load}")
            raise GenerationError(f"{where}, so text prompts cannot be encoded; pass input_ids= (token ids), "
                                  f"or {load}")
        return self.tokenizer

    def stop_ids(self) -> list[int]:
        """Token ids that end a generation: the tokenizer's end-of-sequence/turn tokens and the config's eos."""
        ids = set(self._tok().stop_ids) if self.tokenizer else set()
        eos = self.config.eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        return sorted(ids)

    def generate(self, prompt: str | Sequence[str] | None = None, *, input_ids: Sequence[int] | None = None,
                 stream: bool = False, max_length: int | None = None, max_new_tokens: int | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 repetition_penalty: float | None = None, stop: str | Sequence[str] | None = None,
                 seed: int | None = None, speculative: bool = False) -> str | list[str] | Iterator[str]:
        """Continue a prompt (str -> str), a list of prompts (one batch -> list[str]), or stream the text.

        ``max_length`` counts prompt + new tokens, ``max_new_tokens`` only new ones; max_new_tokens wins when
        both are given. ``temperature=0`` is greedy. Sampling arguments left as None take `SamplingParams`'
        defaults (temperature 0.6, top_p 0.95: DeepSeek's recommendation for R1; top_k and repetition penalty
        off). Generation ends at the tokenizer's end-of-sequence / end-of-turn tokens, at a stop string (not
        included in the output), or at the length limit.

        ``speculative=True`` drafts with the model's own MTP modules and verifies the drafts in one forward, on
        the engine (`r1kit.engine.spec_decode`; ``engine_config.num_speculative_tokens`` drafts per step, the
        model's MTP depths when 0) for a batch too, or with ``use_engine = False`` on the reference loop
        (`r1kit.engine.speculative`, one prompt): the output distribution is unchanged (greedy: the same
        tokens), and ``self.speculative_stats`` holds the acceptance rate afterwards.
        """
        given = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "repetition_penalty": repetition_penalty}
        params = SamplingParams(max_new_tokens=max_new_tokens, max_length=max_length, seed=seed,
                                stop=list([stop] if isinstance(stop, str) else stop or []),
                                **{k: v for k, v in given.items() if v is not None})
        if (prompt is None) == (input_ids is None):
            raise GenerationError("pass exactly one of prompt= (text) or input_ids= (token ids)")
        if input_ids is not None:
            prompts = [list(input_ids)]
        elif isinstance(prompt, str):
            prompts = [self._encode(prompt)]
        else:
            if stream:
                raise GenerationError("stream=True takes one prompt, not a list")
            if not all(isinstance(p, str) for p in prompt):
                raise GenerationError("prompt must be a string or a list of strings")
            prompts = [self._encode(p) for p in prompt]
        if speculative and len(prompts) != 1 and not self.use_engine:
            raise GenerationError("speculative=True on the reference loop (use_engine = False) takes one prompt "
                                  "(batch 1), not a list")
        screening = self._screen([prompt] if isinstance(prompt, str) else list(prompt or []))
        if screening is not None and screening.refusal is not None:
            refused = [screening.refusal] * len(prompts)
            return iter(refused) if stream else refused if isinstance(prompt, (list, tuple)) else refused[0]
        pieces = self._stream_rows(prompts, params, speculative=speculative)
        if screening is not None:
            pieces = screening.shield_rows(pieces, len(prompts))
        if stream:
            return (piece for _, piece in pieces)
        texts = [""] * len(prompts)
        for row, piece in pieces:
            texts[row] += piece
        return texts if isinstance(prompt, (list, tuple)) else texts[0]

    def _screen(self, texts: list[str]) -> Screening | None:
        """The shield's verdict on a call's input texts (None without a shield); raises InputBlocked when it
        blocks and its on_block is "error". Token ids alone are not screened (their output still is redacted)."""
        if self.shield is None:
            return None
        model = self.path.name if self.path else None
        return self.shield.screen(texts, model=model) if texts else self.shield.unscreened(model=model)

    def _encode(self, text: str) -> list[int]:
        tok = self._tok()  # bos as tokenizer_config.json's add_bos_token says (true for the R1-Distill models)
        return tok.encode(text, add_bos=tok.add_bos_token and tok.bos_id is not None)

    def _stream_rows(self, prompts: list[list[int]], params: SamplingParams,
                     usage: dict[str, int] | None = None, speculative: bool = False,
                     tokens: list[list[int]] | None = None, after_think: bool = False) -> Iterator[tuple[int, str]]:
        """(row, new text) pieces as tokens arrive; holds back text that might start a stop string."""
        stop_ids = set(self.stop_ids())
        streams = [TextStream(self.tokenizer, params.stop, stop_ids) for _ in prompts]
        finished = [False] * len(prompts)
        if usage is not None:
            usage.update(prompt_tokens=sum(map(len, prompts)), completion_tokens=0)
        if speculative and not self.use_engine:
            steps = self._speculative_steps(prompts[0], params, sorted(stop_ids))
        elif self.use_engine:
            steps = self._engine_steps(prompts, params, sorted(stop_ids), speculative, after_think)
        elif params.structured is not None:
            raise GenerationError("structured outputs run on the engine: set use_engine = True")
        else:
            steps = generate_tokens(self.model, prompts, params, sorted(stop_ids))
        for step in steps:
            for row, token in enumerate(step):
                if token is None or finished[row]:
                    continue
                if usage is not None:
                    usage["completion_tokens"] += 1
                if tokens is not None:  # each row's token ids, for the caller (tool calls are parsed from them)
                    tokens[row].append(token)
                text, finished[row] = streams[row].push(token)
                if text:
                    yield row, text
            if all(finished):
                steps.close()
                return
        for row in range(len(prompts)):  # out of budget: release what is still held back
            if not finished[row] and (rest := streams[row].flush()):
                yield row, rest

    def engine(self, need_tokens: int = 1, speculative: bool = False) -> LLMEngine:
        """The model's inference engine (continuous batching over a paged KV cache; see r1kit.engine), made on
        first use with ``self.engine_config`` and remade larger when a call needs more KV than it holds, up to
        the config's ``kv_cache_bytes`` (beyond that the engine queues and preempts requests instead), or when a
        speculative call needs MTP drafts it has no pools for."""
        cfg = self.engine_config
        if speculative and not cfg.num_speculative_tokens:
            cfg = cfg.replace(num_speculative_tokens=max(1, len(self.model.mtp)))
        blocks = cfg.kv_blocks(self.model, need_tokens)
        if (self._engine is None or self._engine.block_manager.num_blocks < blocks
                or self._engine.config.num_speculative_tokens < cfg.num_speculative_tokens):
            if self._engine is not None and self._engine.has_unfinished():
                raise GenerationError("another generation is still running on this model (an unfinished stream): "
                                      "finish or close it first")
            self._engine = LLMEngine(self.model, cfg, stop_ids=self.stop_ids(), num_blocks=blocks)
        return self._engine

    def _engine_steps(self, prompts: list[list[int]], params: SamplingParams, stop_ids: list[int],
                      speculative: bool = False, after_think: bool = False) -> Iterator[list[int | None]]:
        """generate_tokens' contract on the engine: per step, the new token of each row (None: no token this
        step; a speculative engine step that gives a row several tokens is yielded as several steps). Closing
        the iterator early aborts the unfinished requests and frees their KV blocks."""
        bs = self.engine_config.block_size
        need = sum(-(-(len(p) + params.new_tokens_for(len(p))) // bs) * bs for p in prompts)
        engine = self.engine(need, speculative)
        if engine.has_unfinished():
            raise GenerationError("another generation is still running on this model (an unfinished stream): "
                                  "finish or close it first")
        params = dataclasses.replace(params, speculative=speculative)
        if speculative:  # this call's counters
            engine.spec_stats = self.speculative_stats = SpeculativeStats()
            engine.spec_stats.track_positions(engine.config.num_speculative_tokens)
        rows = {}
        try:
            for row, prompt in enumerate(prompts):
                rid = f"r1model-{next(self._ids)}"
                engine.add_request(rid, prompt, params, self._guide(params.structured, after_think))
                rows[rid] = row
            while engine.has_unfinished():
                new: list[list[int]] = [[] for _ in prompts]
                for out in engine.step():
                    if out.error is not None:
                        del rows[out.request_id]
                        raise GenerationError(f"generation failed: {out.error}") from out.error
                    new[rows[out.request_id]].append(out.token)
                    if out.finished:
                        del rows[out.request_id]
                for i in range(max(map(len, new))):
                    yield [tokens[i] if i < len(tokens) else None for tokens in new]
        finally:
            for rid in rows:  # closed early (stop string, consumer gone) or failed: free the KV blocks
                engine.abort(rid)

    def _speculative_steps(self, prompt: list[int], params: SamplingParams, stop_ids: list[int]
                           ) -> Iterator[list[int | None]]:
        """generate_tokens' contract (one row) on the reference MTP speculative loop; stats in
        self.speculative_stats."""
        self.speculative_stats = SpeculativeStats()
        for chunk in speculative_generate(self.model, prompt, params, stop_ids, stats=self.speculative_stats):
            for token in chunk:
                yield [token]

    def complete(self, prompt: str | None = None, *, input_ids: Sequence[int] | None = None,
                 logprobs: int | None = None, prompt_logprobs: int | None = None, **sampling: Any) -> Completion:
        """Continue one prompt on the engine and return the text with its tokens' log-probabilities.

        ``logprobs`` k: each generated token's log-probability (a log-softmax over the model's logits) and its k
        most likely alternatives; ``prompt_logprobs`` k: the same for every prompt token after the first (what
        scoring a continuation needs: ``complete(input_ids=context + continuation, max_new_tokens=1,
        prompt_logprobs=0)``). Sampling keywords as generate(), and ``structured`` (a grammar: ``{"type":
        "json_schema", "schema": {...}}``, json_object, regex, choice; see r1kit.structured).
        """
        if (prompt is None) == (input_ids is None):
            raise GenerationError("pass exactly one of prompt= (text) or input_ids= (token ids)")
        ids = self._encode(prompt) if prompt is not None else list(input_ids)
        params = SamplingParams(**sampling, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
        bs = self.engine_config.block_size
        engine = self.engine(-(-(len(ids) + params.new_tokens_for(len(ids))) // bs) * bs)
        if engine.has_unfinished():
            raise GenerationError("another generation is still running on this model (an unfinished stream): "
                                  "finish or close it first")
        rid = f"r1model-{next(self._ids)}"
        engine.add_request(rid, ids, params, self._guide(params.structured))
        outs = [out for _ in iter(engine.has_unfinished, False) for out in engine.step()]
        if outs and outs[-1].error is not None:
            raise GenerationError(f"generation failed: {outs[-1].error}") from outs[-1].error
        stream, text = TextStream(self.tokenizer, params.stop, set(self.stop_ids())), ""
        for o in outs:
            piece, ended = stream.push(o.token)
            text += piece
            if ended:
                break
        text += stream.flush()
        return Completion(text, [o.token for o in outs], [o.logprobs for o in outs if o.logprobs is not None],
                          outs[0].prompt_logprobs if outs else None, outs[-1].finish_reason.value if outs else None)

    def chat(self, messages: Sequence[dict[str, Any]], *, thinking: bool = True, stream: bool = False,
             tools: Sequence[dict[str, Any]] | None = None, tool_choice: Any = None,
             **sampling: Any) -> ChatReply | Iterator[str]:
        """Answer a conversation with the model's chat template; reasoning is split from the answer.

        messages: [{"role": "system"|"user"|"assistant", "content": str}, ...]. Sampling keywords (and
        ``speculative``) as generate().
        With stream=True, yields raw text pieces (use r1kit.tokenizer.ReasoningStreamParser to split them).
        Without a length, up to DEFAULT_MAX_NEW_TOKENS["chat"] (1024) new tokens (reasoning is long), as far as the
        context allows.

        ``tools`` (OpenAI function tools, rendered by the model's chat template) and ``tool_choice`` ("auto",
        "none", "required" or ``{"type": "function", "function": {"name": ...}}``): the calls the answer makes are
        in ``reply.tool_calls`` (`r1kit.tools.ToolCall`, not made while streaming); ToolError for a bad tool.
        "required" and a named function are enforced: the answer is decoded under the grammar of a call.
        ``structured`` (a grammar spec, see r1kit.structured) constrains the answer, after ``</think>`` when the
        prompt opened ``<think>``.

        Media (a model with encoders, e.g. r1kit/nano-vl): a user message's content may be a list of parts,
        ``{"type": "text", "text": ...}``, ``{"type": "image", "image": PATH | BYTES | ARRAY | PIL.Image}``,
        ``{"type": "audio", "audio": PATH | BYTES | ARRAY, "sample_rate": HZ}``, ``{"type": "dicom", "path": ...}``;
        ``reply.modality_weights`` then holds the modality gate's weights (see r1kit.multimodal.chat).
        """
        from r1kit.multimodal.chat import has_media

        if has_media(messages):
            reply = self._chat_media(messages, thinking, sampling)
            return iter([reply.text]) if stream else reply
        parser = self._tool_parser(tools, tool_choice)
        if parser is not None and (forced := parser.constraint()) is not None:
            if sampling.get("structured") is not None:
                raise ToolError(f"tool_choice = {tool_choice!r:.60} makes the answer a tool call: it does not "
                                "combine with structured", "tool_choice")
            sampling["structured"] = forced
        ids = self._tok(chat=True).encode_chat(list(messages), add_generation_prompt=True, thinking=thinking,
                                               tools=parser.offered if parser else None)
        if sampling.get("max_new_tokens") is None and sampling.get("max_length") is None:  # as much as fits
            sampling["max_new_tokens"] = default_max_new_tokens(len(ids), self.config.max_position_embeddings, "chat")
        screening = self._screen([m["content"] for m in messages if m.get("role") == "user"])
        if screening is not None and screening.refusal is not None:
            return iter([screening.refusal]) if stream else ChatReply("", screening.refusal, screening.refusal,
                                                                       len(ids), 0)
        if stream and screening is None and sampling.get("structured") is None:
            return self.generate(input_ids=ids, stream=True, **sampling)
        speculative = sampling.pop("speculative", False)
        params = SamplingParams(**{**sampling, "stop": [sampling["stop"]] if isinstance(sampling.get("stop"), str)
                                   else sampling.get("stop") or []})
        usage: dict[str, int] = {}
        tokens: list[list[int]] = [[]]
        after_think = params.structured is not None and self.tokenizer.starts_in_reasoning(thinking)
        pieces = self._stream_rows([ids], params, usage, speculative, tokens, after_think)
        if screening is not None:
            pieces = screening.shield_rows(pieces, 1)
        if stream:
            return (piece for _, piece in pieces)
        text = "".join(piece for _, piece in pieces)
        # R1's template opened <think>, so text without a closing tag is all reasoning; with thinking off it closed
        # the think block, yet text before a </think> is still reasoning; a template without think tags: all content
        reasoning, content = self.tokenizer.split_reasoning(text, thinking)
        found = parser.parse(tokens[0], thinking) if parser is not None else None
        content, calls = found if found is not None else (content, [])
        return ChatReply(reasoning, content, text, usage["prompt_tokens"], usage["completion_tokens"], calls)

    def _chat_media(self, messages: Sequence[dict[str, Any]], thinking: bool, sampling: dict[str, Any]) -> ChatReply:
        """chat() with image / audio / DICOM parts: the plain KV-cache loop with the media merged into the prefill.
        The safety shield (when on) screens the user messages' text parts and redacts the answer, as for text."""
        from r1kit.multimodal.chat import encode_media_chat, generate_with_media, weights_dict
        from r1kit.multimodal.model import MissingEncoderError
        from r1kit.multimodal.prompt import user_texts

        if self.multimodal is None:
            raise MissingEncoderError(f"{self.path or 'this model'} is text-only: it has no image or audio encoder")
        tokenizer = self._tok(chat=True)
        prompt = encode_media_chat(self.multimodal, tokenizer, messages, thinking)
        if sampling.get("max_new_tokens") is None and sampling.get("max_length") is None:
            sampling["max_new_tokens"] = default_max_new_tokens(len(prompt.ids), self.config.max_position_embeddings,
                                                                "chat")
        screening = self._screen(user_texts(messages))
        if screening is not None and screening.refusal is not None:
            return ChatReply("", screening.refusal, screening.refusal, len(prompt.ids), 0)
        rows, weights = generate_with_media(self.multimodal, [prompt], SamplingParams(**sampling), self.stop_ids())
        text = tokenizer.decode(rows[0], skip_special_tokens=True)
        if screening is not None:
            text = "".join(piece for _, piece in screening.shield_rows([(0, text)], 1))
        reasoning, content = tokenizer.split_reasoning(text, thinking)
        return ChatReply(reasoning, content, text, len(prompt.ids), len(rows[0]),
                         modality_weights=weights_dict(weights[0]))

    def _guide(self, spec: dict | None, after_think: bool = False) -> Guide | None:
        """A grammar guide for a structured-output spec (the factory is built on first use), applied after the
        model's </think> with ``after_think``; None without a spec."""
        if spec is None:
            return None
        if self._guides is None:
            self._guides = GuideFactory(self._tok(), self.config.vocab_size, self.stop_ids())
        return self._guides.new(spec, self._tok().token_to_id("</think>") if after_think else None)

    def _tool_parser(self, tools: Sequence[dict[str, Any]] | None, tool_choice: Any) -> ToolCallParser | None:
        """The tool-call parser of a chat with these tools (None without); ToolError for a bad tool or choice."""
        if tools is None and tool_choice in (None, "none"):
            return None
        checked = check_tools(list(tools)) if tools is not None else []
        choice = check_tool_choice(tool_choice, checked)
        return ToolCallParser(self._tok(chat=True), checked, choice, self.stop_ids()) if checked else None


def random_checkpoint(path: str | os.PathLike, preset_name: str = "tiny-moe", seed: int = 0,
                      tokenizer: Tokenizer | None = None, **overrides: Any) -> Path:
    """Write a randomly initialised checkpoint (for demos and tests): config.json, weights, tokenizer.json."""
    from r1kit.checkpoint import save_model
    from r1kit.model.config import preset

    cfg = preset(preset_name, **overrides)
    if tokenizer is not None:
        cfg = cfg.replace(vocab_size=max(cfg.vocab_size, tokenizer.vocab_size), bos_token_id=tokenizer.bos_id,
                          eos_token_id=tokenizer.eos_id)
    model = Transformer(cfg).init_weights(seed)
    path = Path(path)
    save_model(model, path)
    if tokenizer is not None:
        tokenizer.save(path)
    return path


__all__ = ["R1Model", "ChatReply", "Completion", "ModelNotFoundError", "resolve_model_path", "random_checkpoint",
           "CheckpointError"]
