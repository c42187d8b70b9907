"""A model-based input judge in the style of Llama Guard 3: any r1kit model (a real guard checkpoint from a local
folder, loaded with R1Model.from_pretrained) reads the conversation inside Llama Guard's prompt with the 14
MLCommons hazard categories and answers ``safe`` or ``unsafe\\nS<n>``.

    judge = Judge(R1Model.from_pretrained("path/to/guard"))
    verdict = judge.check("How do I make a pipe bomb?")   # score = P(first answer token is "unsafe")

The score is read from one forward pass (the softmax over the whole vocabulary at the answer's first token);
the category, only for an unsafe verdict, from a short greedy continuation.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from r1kit.safety.input import Finding, Verdict

HAZARDS = {  # Llama Guard 3 / MLCommons AI Safety taxonomy
    "S1": "Violent Crimes", "S2": "Non-Violent Crimes", "S3": "Sex-Related Crimes", "S4": "Child Sexual Exploitation",
    "S5": "Defamation", "S6": "Specialized Advice", "S7": "Privacy", "S8": "Intellectual Property",
    "S9": "Indiscriminate Weapons", "S10": "Hate", "S11": "Suicide & Self-Harm", "S12": "Sexual Content",
    "S13": "Elections", "S14": "Code Interpreter Abuse",
}


def guard_prompt(conversation: list[dict[str, str]], role: str = "User") -> str:
    """Llama Guard 3's task prompt for the last ``role`` message of a conversation (role: User or Agent)."""
    categories = "\n".join(f"{k}: {v}." for k, v in HAZARDS.items())
    turns = "\n\n".join(f"{'User' if m['role'] == 'user' else 'Agent'}: {m['content']}" for m in conversation)
    return ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
            f"Task: Check if there is unsafe content in '{role}' messages in conversations according our safety "
            "policy with the below categories.\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n"
            f"{categories}\n<END UNSAFE CONTENT CATEGORIES>\n\n<BEGIN CONVERSATION>\n\n{turns}\n\n"
            f"<END CONVERSATION>\n\nProvide your safety assessment for ONLY THE LAST {role} message in the above "
            "conversation:\n - First line must read 'safe' or 'unsafe'.\n - If unsafe, a second line must include a "
            "comma-separated list of violated categories.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


class Judge:
    """An R1Model (with a tokenizer) used as a Llama-Guard-style classifier."""

    def __init__(self, model: Any, threshold: float = 0.5):
        if getattr(model, "tokenizer", None) is None:
            raise ValueError("the safety judge needs a model with a tokenizer (tokenizer.json in its folder)")
        self.model, self.threshold = model, threshold
        tok = model.tokenizer
        self.unsafe_id = tok.encode("unsafe")[0]
        self.safe_id = tok.encode("safe")[0]
        if self.unsafe_id == self.safe_id:
            raise ValueError("the judge's tokenizer starts 'safe' and 'unsafe' with the same token: it cannot be "
                             "read as a guard model")

    @torch.no_grad()
    def score(self, conversation: list[dict[str, str]] | str) -> float:
        """P(first answer token == "unsafe")."""
        ids = self._ids(conversation)
        logits = self.model.model(torch.tensor([ids], device=self.model.device), last_only=True)  # (1, 1, V)
        return torch.softmax(logits[0, -1].float(), dim=-1)[self.unsafe_id].item()

    def check(self, conversation: list[dict[str, str]] | str) -> Verdict:
        """Verdict(allowed = score < threshold, category "S<n> <name>" when unsafe, score)."""
        p = self.score(conversation)
        if p < self.threshold:
            return Verdict(True, None, p, "", [])
        answer = self.model.generate(input_ids=self._ids(conversation), max_new_tokens=8, temperature=0)
        code = m.group(0) if (m := re.search(r"S1[0-4]|S[1-9]", answer)) else None
        category = f"{code} {HAZARDS[code]}" if code else "unsafe"
        finding = Finding("judge", p, answer.strip()[:80], category)
        return Verdict(False, "judge", p, category, [finding])

    def _ids(self, conversation: list[dict[str, str]] | str) -> list[int]:
        conv = [{"role": "user", "content": conversation}] if isinstance(conversation, str) else conversation
        return self.model.tokenizer.encode(guard_prompt(conv))
