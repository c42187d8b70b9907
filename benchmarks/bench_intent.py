"""Intent recognition (the customer-service scenario): a model fine-tuned by configs/intent-nano.yaml classifies an
utterance into one of eight intents, answered as structured output (a JSON object whose "intent" is one of them).

    python benchmarks/bench_intent.py --write-data          # benchmarks/data/intent_{train,heldout}.jsonl
    r1kit train --config configs/intent-nano.yaml           # full SFT of r1kit/nano -> runs/intent-nano
    python benchmarks/bench_intent.py --model runs/intent-nano/final --json runs/bench_intent.json

The data are synthetic: utterances from templates and slots per intent. The held-out split uses templates that the
training split never shows (other wordings of the same intents), so it measures more than memorised phrasings.
Each answer is decoded under {"type": "object", "properties": {"intent": {"enum": INTENTS}}} (r1kit.structured),
with thinking off, so it always parses; accuracy is exact intent match. The peer is the untuned r1kit/nano under
the same constraint.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

DATA = Path(__file__).parent / "data"
SYSTEM = "Classify the customer's message. Answer with JSON: {\"intent\": ...}."
# intent -> (training templates, held-out templates); {o} an order number, {p} a product
TEMPLATES = {
    "refund": (["I want my money back for the {p}", "please refund order {o}", "can I get a refund on the {p}",
                "refund me for order {o} please", "the {p} was bad, I want a refund"],
               ["how do I return the {p} and get reimbursed", "give me back what I paid for order {o}"]),
    "order_status": (["where is my order {o}", "has order {o} shipped yet", "when will the {p} arrive",
                      "track my order {o}", "what is the status of order {o}"],
                     ["is the {p} on its way", "any news on the delivery of order {o}"]),
    "cancel_order": (["cancel order {o}", "I want to cancel the {p}", "please stop order {o}",
                      "cancel my {p} order", "do not send order {o}, cancel it"],
                     ["I changed my mind about the {p}, call it off", "scrap order {o}"]),
    "change_address": (["change the delivery address of order {o}", "ship the {p} to my new address",
                        "I moved, update the address for order {o}", "send order {o} to a different address",
                        "update my shipping address"],
                       ["deliver the {p} to my office instead", "order {o} should go to another street"]),
    "product_info": (["is the {p} waterproof", "what size is the {p}", "tell me about the {p}",
                      "does the {p} come in blue", "how heavy is the {p}"],
                     ["what colours does the {p} have", "is the {p} good for kids"]),
    "complaint": (["the {p} broke after one day", "your service is terrible", "order {o} arrived damaged",
                   "I am very unhappy with the {p}", "the {p} does not work at all"],
                  ["this is the worst {p} I ever bought", "nobody answered me about order {o}, awful"]),
    "payment_issue": (["my card was charged twice for order {o}", "the payment for the {p} failed",
                       "why was I billed for order {o}", "I cannot pay for the {p}", "payment declined on order {o}"],
                      ["there is a wrong charge on my card for the {p}", "the checkout keeps rejecting my card"]),
    "talk_to_human": (["let me talk to a person", "I want a human agent", "connect me to support staff",
                       "can I speak to someone real", "get me a human please"],
                      ["is there a real person I can chat with", "put me through to an employee"]),
}
INTENTS = sorted(TEMPLATES)
PRODUCTS = ["kettle", "lamp", "jacket", "phone case", "backpack", "blender", "desk chair", "rain boots"]


def utterances(templates: list[str], rng: random.Random, n: int) -> list[str]:
    """n utterances: the templates filled with random order numbers and products, cycling through the templates."""
    return [t.format(o=rng.randint(10000, 99999), p=rng.choice(PRODUCTS))
            for t in itertools.islice(itertools.cycle(templates), n)]


def write_data(train_per_intent: int = 60, heldout_per_intent: int = 20, seed: int = 0) -> tuple[Path, Path]:
    """The chat JSONL files: training records (templates seen) and held-out ones (templates unseen)."""
    rng = random.Random(seed)
    paths = DATA / "intent_train.jsonl", DATA / "intent_heldout.jsonl"
    for path, index, n in ((paths[0], 0, train_per_intent), (paths[1], 1, heldout_per_intent)):
        records = [{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text},
                                 {"role": "assistant", "content": json.dumps({"intent": intent})}]}
                   for intent in INTENTS for text in utterances(TEMPLATES[intent][index], rng, n)]
        rng.shuffle(records)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return paths


def accuracy(model_path: str, records: list[dict]) -> float:
    """Exact intent accuracy of a model on chat records, each answer decoded under the intent schema."""
    from r1kit.api import R1Model

    model = R1Model.from_pretrained(model_path, device="cpu", dtype="fp32")
    schema = {"type": "object", "properties": {"intent": {"enum": INTENTS}}, "required": ["intent"],
              "additionalProperties": False}
    right = 0
    for r in records:
        reply = model.chat(r["messages"][:2], thinking=False, max_new_tokens=24, temperature=0,
                           structured={"type": "json_schema", "schema": schema})
        right += json.loads(reply.content)["intent"] == json.loads(r["messages"][2]["content"])["intent"]
    return right / len(records)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write-data", action="store_true")
    ap.add_argument("--model", default=None, help="the fine-tuned model folder")
    ap.add_argument("--baseline", default="r1kit/nano")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="runs/bench_intent.json")
    a = ap.parse_args()
    if a.write_data:
        print("wrote", *write_data())
    if a.model is None:
        return
    import torch

    torch.set_num_threads(a.threads)
    records = [json.loads(line) for line in (DATA / "intent_heldout.jsonl").read_text().splitlines()]
    result = {"heldout": len(records), "intents": INTENTS}
    for name, path in (("untuned (peer)", a.baseline), ("fine-tuned", a.model)):
        result[name] = accuracy(path, records)
        print(f"{name:16} {path:32} held-out accuracy {result[name]:.1%} ({len(records)} utterances)", flush=True)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(result, indent=1))
    print("wrote", a.json)


if __name__ == "__main__":
    main()
