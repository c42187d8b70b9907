"""Server-side sessions: the second turn's time to first token (TTFT) against a cold prompt of the same length.

    python benchmarks/bench_sessions.py [--model r1kit/nano] [--rounds 8] [--history-turns 6]
                                        [--json runs/bench_sessions.json]

Each round opens a session with a long first turn (a system prompt and ``--history-turns`` earlier exchanges sent in
one request), then sends the second turn with only its new message: the server prepends the kept history, and the
engine's prefix cache holds its KV blocks. The cold request is the same conversation with the system prompt's first
word changed, so it has (about) the same token count and no prefix in the cache. Both are streamed over HTTP with
the openai client; TTFT is the time to the first chunk that carries text (reasoning or content). Rounds interleave
session and cold requests; the medians are reported. The peer is the cold prompt: the same server without the reuse."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def first_token_seconds(client, model: str, messages: list[dict], session_id: str | None, max_tokens: int
                        ) -> tuple[float, int]:
    """(seconds to the first chunk with text, prompt tokens) of a streamed chat."""
    start, first, prompt_tokens = time.perf_counter(), None, 0
    extra = {"session_id": session_id} if session_id else {}
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                            stream=True, stream_options={"include_usage": True}, extra_body=extra)
    for chunk in stream:
        delta = chunk.choices[0].delta if chunk.choices else None
        text = delta and (delta.content or (delta.model_extra or {}).get("reasoning_content"))
        if first is None and text:
            first = time.perf_counter() - start
        if chunk.usage:
            prompt_tokens = chunk.usage.prompt_tokens
    return (first if first is not None else float("nan")), prompt_tokens


def opening(round_: int, turns: int, topic: str) -> list[dict]:
    """A system prompt and ``turns`` earlier exchanges about ``topic`` (distinct per round: no cross-round reuse)."""
    messages = [{"role": "system", "content": f"Round {round_}. You are the {topic} help desk. Answer briefly, "
                                              "check each step, and say when you are unsure. " * 3}]
    for i in range(turns):
        messages += [{"role": "user", "content": f"Question {i} of round {round_}: what is {17 + i} plus "
                                                 f"{29 * (i + 1)}?"},
                     {"role": "assistant", "content": f"{17 + i} plus {29 * (i + 1)} is {17 + i + 29 * (i + 1)}."}]
    return messages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="r1kit/nano")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--history-turns", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="runs/bench_sessions.json")
    a = ap.parse_args()

    import openai
    import torch

    from r1kit.api import R1Model
    from r1kit.serve.engine_service import EngineService
    from r1kit.serve.openai_api import running_server
    from r1kit.sessions import SessionStore

    torch.set_num_threads(a.threads)
    model = R1Model.from_pretrained(a.model, device="cpu", dtype="fp32")
    service = EngineService(model)
    service.start()
    rows, store = [], SessionStore()
    try:
        with running_server(service, sessions=store) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=600)
            first_token_seconds(client, service.model_name, opening(-1, 1, "warm-up"), None, 2)
            for r in range(a.rounds):
                sid = f"bench-{r}"
                first_token_seconds(client, service.model_name, opening(r, a.history_turns, "arithmetic"), sid, 8)
                new = [{"role": "user", "content": "And what is 123 plus 456?"}]
                warm, warm_len = first_token_seconds(client, service.model_name, new, sid, 4)
                kept = store.history(sid)[:-2]  # as the session's turn 2 saw it: the history and the new message
                cold_messages = [{"role": "system", "content": kept[0]["content"].replace("Round", "Cycle")},
                                 *kept[1:], *new]  # the same length, no prefix in the cache
                cold, cold_len = first_token_seconds(client, service.model_name, cold_messages, None, 4)
                rows.append({"round": r, "session_ttft_s": warm, "session_prompt_tokens": warm_len,
                             "cold_ttft_s": cold, "cold_prompt_tokens": cold_len})
                print(f"round {r}: session turn 2 {warm * 1e3:7.1f} ms ({warm_len} prompt tokens)   "
                      f"cold {cold * 1e3:7.1f} ms ({cold_len} prompt tokens)", flush=True)
    finally:
        service.shutdown(drain=False)
    warm_ms = statistics.median(r["session_ttft_s"] for r in rows) * 1e3
    cold_ms = statistics.median(r["cold_ttft_s"] for r in rows) * 1e3
    print(f"\n{'':28}{'TTFT median':>12}{'prompt tokens':>15}")
    print(f"{'cold prompt (peer)':28}{cold_ms:10.1f} ms"
          f"{statistics.median(r['cold_prompt_tokens'] for r in rows):15.0f}")
    print(f"{'session turn 2 (r1kit)':28}{warm_ms:10.1f} ms"
          f"{statistics.median(r['session_prompt_tokens'] for r in rows):15.0f}")
    print(f"speed-up: {cold_ms / warm_ms:.2f}x")
    out = {"model": a.model, "threads": a.threads, "history_turns": a.history_turns, "rounds": rows,
           "session_ttft_ms_median": warm_ms, "cold_ttft_ms_median": cold_ms, "speedup": cold_ms / warm_ms}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=1))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
