"""ONNX export (torch.onnx.export, the dynamo exporter) and the small ONNX Runtime greedy loop that verifies it.

    r1kit export r1kit/nano nano-onnx --format onnx          # nano-onnx/model.onnx (+ tokenizer files)
    from r1kit.export import OrtGreedy
    OrtGreedy("nano-onnx/model.onnx").generate([[0, 5, 7]], max_new_tokens=16)

The graph: ``input_ids`` int64 [batch, sequence] -> ``logits`` float [batch, sequence, vocab] (the whole causal
forward, no KV cache: each decode step runs the prefix again). With ``with_cache`` (``--with-cache``) it also takes
each layer's cache ``past.{i}.latent`` (MLA: the compressed latent and rotary key) or ``past.{i}.key`` /
``past.{i}.value`` (GQA), of any past length (0 for the prompt), and returns ``present.{i}.*`` with the new
tokens' entries appended, so that decoding is incremental; OrtGreedy drives either kind. Before tracing, the
model is made exportable without changing what it computes: MLA runs its naive path (the absorbed one is picked
by sequence length, a branch on a dynamic shape), and each MoE ``Experts`` becomes ``ExportableExperts``, whose
dispatch has no data-dependent shapes: every expert runs on every token and a dense (tokens, experts) matrix of
router weights (zero off the top-k) combines them; tested equal to the grouped dispatch. Quantized, low-rank
and clustered layers trace through their reference paths. An exporter failure is reported as one error naming
the module being traced, not the exporter's trace.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from r1kit.model.moe import Experts
from r1kit.model.transformer import Transformer

log = logging.getLogger("r1kit.export")
INPUT, OUTPUT = "input_ids", "logits"


class ExportError(ValueError):
    """The model could not be exported (the message names the module), or the exporter is not installed."""


class ExportableExperts(Experts):
    """``Experts`` with a dispatch ONNX can express: all experts on all tokens, combined by a dense weight matrix.

    E times the multiply-adds of the grouped dispatch (fine for the exported graph of a small model; the result
    is the same sum of weight x expert output per token).
    """

    @classmethod
    def from_experts(cls, ex: Experts) -> ExportableExperts:
        new = cls.__new__(cls)
        new.__dict__ = ex.__dict__.copy()  # the same parameters (no copy), another forward
        return new

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x (N, C), weights/idx (N, k) -> (N, C)."""
        dense = torch.zeros(x.shape[0], self.n_experts, dtype=x.dtype, device=x.device)
        dense = dense.scatter_add(1, idx, weights.to(x.dtype))  # (N, E): router weight, 0 where not chosen
        h = torch.einsum("nc,eic->eni", x, self.gate_up_proj.to(x.dtype))  # (E, N, 2I)
        gate, up = h.split(self.hidden, dim=-1)
        y = torch.einsum("eni,eci->enc", F.silu(gate) * up, self.down_proj.to(x.dtype))  # (E, N, C)
        return torch.einsum("ne,enc->nc", dense, y)


class ExportGraph(nn.Module):
    """The exported function: input_ids (B, T) -> logits (B, T, V)."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Transformer.forward without a cache, with an explicit causal mask (SDPA's is_causal would be a
        symbolic bool of the dynamic sequence length)."""
        m = self.model
        T = input_ids.shape[1]
        positions = torch.arange(T, device=input_ids.device)[None]  # (1, T)
        mask = (positions[0, None, :] <= positions[0, :, None])[None, None]  # (1, 1, T, T)
        x = m.embed_tokens(input_ids)  # (B, T, C)
        rope = m.rotary(positions, x.dtype)
        for layer in m.layers:
            x = layer(x, rope, mask)
        return m.lm_head(m.norm(x))  # (B, T, V)


def cache_layout(model: Transformer) -> list[list[tuple[str, int]]]:
    """Per decoder layer, its KV cache tensors as (name, sequence dim): MLA [("latent", 1)] (the compressed latent
    and the rotary key, (B, S, kv_lora_rank + rope)), GQA [("key", 2), ("value", 2)] ((B, Hkv, S, D) each)."""
    out = []
    for layer in model.layers:
        a, b = (layer.self_attn.new_cache(1, n, torch.float32, torch.device("meta")) for n in (2, 3))
        dims = [next(d for d, (x, y) in enumerate(zip(t2.shape, t3.shape, strict=True)) if x != y)
                for t2, t3 in zip(a, b, strict=True)]
        names = ["latent"] if len(dims) == 1 else ["key", "value"]
        out.append(list(zip(names, dims, strict=True)))
    return out


class CachedExportGraph(nn.Module):
    """The exported function with a KV cache: input_ids (B, T) and every layer's past cache (B, P, ...) ->
    logits (B, T, V) and every layer's present cache (P + T along its sequence dim). The T new tokens take
    positions P .. P + T - 1; each layer's own cached attention writes them into [past, room for T] exactly as in
    r1kit's KVCache decoding (the same modules), so ORT decoding is incremental."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model, self.layout = model, cache_layout(model)

    def forward(self, input_ids: torch.Tensor, past: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        m, T = self.model, input_ids.shape[1]
        P = past[0].shape[self.layout[0][0][1]]  # cached tokens
        positions = torch.arange(T, device=input_ids.device)[None] + P  # (1, T)
        keys = torch.arange(P + T, device=input_ids.device)  # (S,)
        mask = (keys[None, :] <= positions[0, :, None])[None, None]  # (1, 1, T, P + T)
        x = m.embed_tokens(input_ids)  # (B, T, C)
        rope = m.rotary(positions, x.dtype)
        presents: list[torch.Tensor] = []
        it = iter(past)
        for layer, tensors in zip(m.layers, self.layout, strict=True):
            bufs = []
            for _, d in tensors:
                p = next(it)
                room = list(p.shape)
                room[d] = T
                bufs.append(torch.cat((p, p.new_zeros(room)), dim=d))  # [past, T empty slots]
            x = layer(x, rope, mask, tuple(bufs), P)  # writes the new entries at P .. P + T - 1
            presents += bufs
        return (m.lm_head(m.norm(x)), *presents)


def make_exportable(model: Transformer) -> Transformer:
    """In place: MLA's naive path, ExportableExperts for every Experts (quantized experts are refused by name)."""
    model.set_mla_impl("naive")
    for name, m in list(model.named_modules()):
        for child_name, child in list(m.named_children()):
            if type(child) is Experts:
                setattr(m, child_name, ExportableExperts.from_experts(child))
            elif type(child).__name__ == "QuantizedExperts":
                raise ExportError(f"cannot export {name}.{child_name} (QuantizedExperts): export the unquantized "
                                  "model and quantize the ONNX graph (--int8)")
    for m in model.modules():  # quantized linears trace through their reference (dequantize + F.linear) path
        if hasattr(m, "reference") and hasattr(m, "dequantize"):  # not MoE.reference: its loop is not exportable
            m.reference = True
    return model


def _failing_module(error: Exception) -> str:
    """The r1kit module a failed trace was in, from the exporter's message (or its last r1kit frame)."""
    text = str(error)
    names = re.findall(r"(?:L\['self'\]|self)\.((?:model\.)?(?:layers|mtp|lm_head|embed_tokens|norm)[\w.\[\]']*)",
                       text)
    if names:
        return names[-1].replace("['", ".").replace("']", "").replace("[", ".").replace("]", "")
    tb = error.__traceback__
    where = "the model"
    while tb is not None:
        file = tb.tb_frame.f_code.co_filename
        if "/r1kit/" in file and "/export/" not in file:
            where = f"{Path(file).name}:{tb.tb_lineno} ({tb.tb_frame.f_code.co_name})"
        tb = tb.tb_next
    return where


def export_onnx(model: Transformer, out: str | Path, opset: int = 18, example_len: int = 8,
                with_cache: bool = False) -> Path:
    """Write `out`/model.onnx: input_ids [batch, sequence] -> logits [batch, sequence, vocab], dynamic in both.

    with_cache: the graph also takes ``past.{i}.latent`` (MLA: [batch, past, kv_lora_rank + rope]) or
    ``past.{i}.key`` / ``past.{i}.value`` (GQA: [batch, kv_heads, past, head_dim]) for each layer i and returns
    ``present.{i}.*`` (past + sequence long); a first call passes past length 0. The model is exported in its
    current dtype (fp32 for a logits match within 1e-4). Raises ExportError when onnx/onnxscript are missing or
    the model cannot be traced (naming the module).
    """
    try:
        import onnx  # noqa: F401 - the exporter needs both
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ExportError(f"ONNX export needs the 'export' extra (pip install 'r1kit[export]'): {e}") from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if with_cache and model.config.sparse_attention is not None:
        raise ExportError("--with-cache: sparse-attention models are not supported (their cache is not a KV list)")
    make_exportable(model.eval())
    ids = torch.randint(0, model.config.vocab_size, (2, example_len))
    ctx = model.config.max_position_embeddings
    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("sequence", min=1 if with_cache else 2, max=ctx)
    graph, args, names, outputs = ExportGraph(model), (ids,), [INPUT], [OUTPUT]
    shapes: dict[str, Any] = {"input_ids": {0: batch, 1: seq}}
    if with_cache:
        graph, past_len = CachedExportGraph(model), torch.export.Dim("past", min=0, max=ctx)
        cache = model.new_cache(2, example_len)
        args = (ids[:, :2], [t[(slice(None),) * d + (slice(0, example_len - 2),)].contiguous()
                             for lay, tensors in zip(cache.layers, graph.layout, strict=True)
                             for t, (_, d) in zip(lay, tensors, strict=True)])
        flat = [(i, n, d) for i, tensors in enumerate(graph.layout) for n, d in tensors]
        shapes["past"] = [{0: batch, d: past_len} for _, _, d in flat]
        names += [f"past.{i}.{n}" for i, n, _ in flat]
        outputs += [f"present.{i}.{n}" for i, n, _ in flat]
    file = out / "model.onnx"
    try:
        with torch.no_grad():
            program = torch.onnx.export(graph.eval(), args, dynamo=True, input_names=names, output_names=outputs,
                                        dynamic_shapes=shapes, opset_version=opset, external_data=False,
                                        verbose=False)
    except Exception as e:  # noqa: BLE001 - any exporter failure becomes one line naming the module
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"cannot export: tracing failed in {_failing_module(e)}: {first[:300]}") from None
    program.save(str(file))
    return file


def quantize_onnx_int8(file: str | Path, out: str | Path) -> Path:
    """ONNX Runtime's dynamic int8 quantization of the MatMul weights (per channel): `file` -> `out`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(file), str(out), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul"])
    return Path(out)


class OrtGreedy:
    """Greedy decoding with ONNX Runtime on an exported model.onnx. A graph exported with_cache is driven
    incrementally (the prompt once, then one token per step with the returned cache); a plain one runs the whole
    prefix every step."""

    def __init__(self, file: str | Path, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(file), opts, providers=["CPUExecutionProvider"])
        self.past = [i for i in self.session.get_inputs() if i.name.startswith("past.")]
        self.outputs = [o.name for o in self.session.get_outputs()]

    @property
    def cached(self) -> bool:
        return bool(self.past)

    def empty_cache(self, batch: int) -> list[Any]:
        """Past tensors of length 0 for `batch` rows (each input's fixed dims from the graph)."""
        import numpy as np

        def dims(shape: list) -> list[int]:  # [batch, (heads,) past, width]: symbolic names -> batch / 0
            return [batch if i == 0 else (d if isinstance(d, int) else 0) for i, d in enumerate(shape)]

        return [np.zeros(dims(i.shape), dtype=np.float32) for i in self.past]

    def step(self, ids: Any, cache: list[Any]) -> tuple[Any, list[Any]]:
        """ids (B, T) after the cached tokens -> (logits (B, T, V), the new cache). Cached graphs only."""
        import numpy as np

        feed = {INPUT: np.asarray(ids, dtype=np.int64), **{i.name: c for i, c in zip(self.past, cache, strict=True)}}
        logits, *present = self.session.run(self.outputs, feed)
        return logits, present

    def logits(self, ids: Any) -> Any:
        """ids int64 (B, T) (numpy or nested lists) -> logits numpy (B, T, V)."""
        import numpy as np

        ids = np.asarray(ids, dtype=np.int64)
        if self.cached:
            return self.step(ids, self.empty_cache(ids.shape[0]))[0]
        return self.session.run([OUTPUT], {INPUT: ids})[0]

    def generate(self, ids: Any, max_new_tokens: int, eos_id: int | None = None) -> list[list[int]]:
        """Continue each row of ids (B, T) greedily by max_new_tokens tokens (a row stops at eos_id)."""
        import numpy as np

        ids = np.asarray(ids, dtype=np.int64)
        done = np.zeros(ids.shape[0], dtype=bool)
        cache = self.empty_cache(ids.shape[0]) if self.cached else None
        new = ids
        for _ in range(max_new_tokens):
            if cache is not None:
                logits, cache = self.step(new, cache)  # only the tokens not yet cached
            else:
                logits = self.logits(ids)
            nxt = logits[:, -1].argmax(-1)  # (B,)
            if eos_id is not None:
                nxt = np.where(done, eos_id, nxt)
                done |= nxt == eos_id
            ids, new = np.concatenate([ids, nxt[:, None]], axis=1), nxt[:, None]
            if done.all():
                break
        return ids.tolist()


def export_checkpoint(src: str | Path, out: str | Path, fmt: str = "onnx", int8: bool = False,
                      with_cache: bool = False) -> dict[str, Any]:
    """`r1kit export`: load checkpoint `src` in fp32 and write `out` in `fmt` (plus its tokenizer files)."""
    from r1kit.api import resolve_model_path
    from r1kit.checkpoint import load_model

    if fmt == "tflite":
        from r1kit.export.tflite import export_tflite

        return export_tflite(src, out)
    if fmt != "onnx":
        raise ExportError(f"unknown format {fmt!r}; formats: onnx, tflite")
    src = resolve_model_path(src)
    model = load_model(src, "cpu", torch.float32)
    file = export_onnx(model, out, with_cache=with_cache)
    result: dict[str, Any] = {"onnx": str(file), "bytes": file.stat().st_size, "with_cache": with_cache}
    if int8:
        q = quantize_onnx_int8(file, Path(out) / "model.int8.onnx")
        result.update(int8=str(q), int8_bytes=q.stat().st_size)
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        if (src / name).is_file():
            shutil.copy2(src / name, Path(out) / name)
    return result
