"""Server-side sessions: the store's policies (truncate, summarize, refuse) on hand-counted token budgets, the
turn bound, expiry and LRU, and the HTTP API: a second turn sends only its new message, the model sees the whole
conversation (prompt tokens equal the full history's), the prefix cache serves the history, bad ids are 400."""

from __future__ import annotations

import pytest

from r1kit.sessions import SessionConfig, SessionError, SessionStore, extractive_summary, split_turns


def turn(i: int) -> list[dict]:
    return [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]


SYSTEM = {"role": "system", "content": "be brief"}


def count(messages: list[dict]) -> int:
    """One 'token' per message: the budget is then a message count."""
    return len(messages)


def test_split_turns() -> None:
    system, turns = split_turns([SYSTEM, *turn(0), *turn(1), {"role": "tool", "content": "x"}])
    assert system == [SYSTEM] and len(turns) == 2 and turns[1][-1]["role"] == "tool"


def test_truncate_drops_the_oldest_turns_keeps_system() -> None:
    store = SessionStore(SessionConfig(policy="truncate"))
    messages = [SYSTEM, *turn(0), *turn(1), *turn(2), {"role": "user", "content": "new"}]
    fitted, dropped = store.fit(messages, count, budget=4)
    assert fitted == [SYSTEM, *turn(2), {"role": "user", "content": "new"}] and dropped == turn(0) + turn(1)
    assert store.fit(messages, count, budget=100) == (messages, [])


def test_summarize_replaces_them_with_one_system_message() -> None:
    store = SessionStore(SessionConfig(policy="summarize"))
    messages = [SYSTEM, *turn(0), *turn(1), {"role": "user", "content": "new"}]
    fitted, _ = store.fit(messages, count, budget=5)
    assert fitted[0] == SYSTEM and fitted[2:] == [*turn(1), {"role": "user", "content": "new"}]
    assert fitted[1] == {"role": "system", "content": "Summary of the earlier conversation: user: question 0; "
                                                      "assistant: answer 0"}
    # the summary is kept with the session and grows when more turns go
    again, _ = store.fit([*fitted, {"role": "assistant", "content": "answer new"}, *turn(3)], count, budget=5)
    assert again[1]["content"].endswith("answer 0 user: question 1; assistant: answer 1; user: new; "
                                        "assistant: answer new") and again[2:] == turn(3)
    custom = SessionStore(SessionConfig(policy="summarize"), summarizer=lambda ms: f"{len(ms)} messages")
    assert custom.fit(messages, count, budget=5)[0][1]["content"].endswith("2 messages")
    assert len(extractive_summary([{"role": "user", "content": "word " * 500}], 50)) == 50


def test_refuse_and_a_newest_turn_too_long() -> None:
    messages = [*turn(0), {"role": "user", "content": "new"}]
    with pytest.raises(SessionError, match="policy is refuse"):
        SessionStore(SessionConfig(policy="refuse")).fit(messages, count, budget=2)
    with pytest.raises(SessionError, match="newest turn does not fit") as err:
        SessionStore().fit(messages, count, budget=0)
    assert err.value.param == "messages"
    with pytest.raises(ValueError, match="policy = 'forget'"):
        SessionConfig(policy="forget")


def test_record_bounds_turns_expires_and_evicts() -> None:
    now = [0.0]
    store = SessionStore(SessionConfig(max_turns=2, max_sessions=2, ttl_s=10), clock=lambda: now[0])
    store.record("a", [SYSTEM, *turn(0), *turn(1), {"role": "user", "content": "q2"}], {"role": "assistant",
                                                                                      "content": "a2"})
    assert store.history("a") == [SYSTEM, *turn(1), {"role": "user", "content": "q2"},
                                  {"role": "assistant", "content": "a2"}]
    store.record("b", turn(5)[:1], turn(5)[1])
    store.record("c", turn(6)[:1], turn(6)[1])  # over max_sessions: the least recently used ("a") goes
    assert store.history("a") == [] and len(store) == 2
    now[0] = 11.0
    assert store.history("b") == [] and len(store) == 0
    with pytest.raises(SessionError):
        store.history("bad id!")


# ---------------------------------------------------------------------------------------------------- HTTP
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from http_helpers import serve

    from r1kit.api import R1Model, random_checkpoint
    from r1kit.tokenizer import Tokenizer

    tok = Tokenizer.from_dir("r1kit/nano")
    folder = random_checkpoint(tmp_path_factory.mktemp("m"), "tiny-dense", tokenizer=tok)
    model = R1Model.from_pretrained(folder, device="cpu", dtype="fp32")
    with serve(model, sessions=SessionStore(SessionConfig(policy="truncate"))) as (url, service):
        yield url, service, model


def _call(url: str, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    from http_helpers import request_json

    return request_json(url, path, body or None, method=method)


def test_http_session_keeps_the_conversation(server, monkeypatch) -> None:
    import openai

    url, service, model = server
    manager, cached = service.engine.block_manager, []

    def allocate(seq):  # records how many prompt tokens each admitted request found in the prefix cache
        allocated(seq)
        cached.append((seq.num_tokens, seq.num_cached_tokens))

    allocated = manager.allocate
    monkeypatch.setattr(manager, "allocate", allocate)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300)
    kw = dict(model=service.model_name, max_tokens=4, temperature=0)
    opening = [{"role": "system", "content": "You are a patient assistant of the arithmetic help desk. " * 3},
               {"role": "user", "content": "What is 2+3?"}]
    first = client.chat.completions.create(messages=opening, extra_body={"session_id": "s1"}, **kw)
    stream = client.chat.completions.create(messages=[{"role": "user", "content": "And 4+4?"}], stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"session_id": "s1"}, **kw)
    second_usage = [c.usage for c in stream if c.usage][-1]
    status, kept = _call(url, "GET", "/v1/sessions/s1")
    assert status == 200 and [m["role"] for m in kept["messages"]] == ["system", "user", "assistant", "user",
                                                                       "assistant"]
    first_reply = model.tokenizer.split_reasoning(first.choices[0].message.content or "", True)[1]
    assert kept["messages"][2]["content"] == first.choices[0].message.content or first_reply
    full = [*opening, kept["messages"][2], {"role": "user", "content": "And 4+4?"}]
    assert second_usage.prompt_tokens == len(model.tokenizer.encode_chat(full))  # the model saw the whole history
    assert first.model_extra.get("session_id") == "s1"
    first_prompt = first.usage.prompt_tokens  # the second turn's prompt starts with it, up to the generation prompt
    block = service.engine.block_manager.block_size
    assert first_prompt > 3 * block and cached[-1][1] >= (first_prompt - 8) // block * block, cached
    assert _call(url, "DELETE", "/v1/sessions/s1") == (200, {"id": "s1", "object": "session", "deleted": True})
    assert _call(url, "GET", "/v1/sessions/s1")[0] == 404
    status, err = _call(url, "POST", "/v1/chat/completions", {"model": service.model_name, "session_id": "x y",
                                                              "messages": [{"role": "user", "content": "hi"}]})
    assert status == 400 and err["error"]["param"] == "session_id"
