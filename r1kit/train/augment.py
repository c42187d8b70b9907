"""Data augmentation of chat training examples: EDA (Wei & Zou, 2019) and back-translation.

EDA's four operations, each making one augmented copy of a text, with the paper's rate alpha = 0.1:

- ``synonym`` (SR): replace n = max(1, int(alpha * words)) random non-stop-words by a random WordNet synonym;
- ``insert`` (RI): n times, insert a random synonym of a random non-stop-word at a random position;
- ``swap`` (RS): n times, swap two random words;
- ``delete`` (RD): delete each word with probability alpha (one word always stays).

``n_aug`` copies per example (the paper's choice by training-set size when not given: 16 up to 500 examples, 8
up to 2,000, else 4), the operations taking turns as in the paper's code. Only the user's side changes
(``user`` messages, ``prompt``, ``text``): the assistant's answers are the targets and stay exact. Numbers,
code spans (inline backticks and fenced blocks), special tokens (``<｜User｜>``, ``<think>``, ``<|im_end|>``, ...)
and words glued to them (``x`` in ``x+1``, ``th`` in ``47th``) are never changed, moved or removed; only
words between spaces or punctuation are.

Synonyms come from WordNet 3.0 read offline by nltk's ``WordNetCorpusReader`` from Debian's ``wordnet-base``
(``/usr/share/wordnet``; ``scripts/install_wordnet.sh`` installs it). Everything is seeded: the same seed gives
the same copies.

Back-translation sends each text through another language and back (``text -> French -> English`` and the same
through German by default, one copy per pivot language) with a translator: an r1kit model folder (chat, greedy)
or an OpenAI-compatible server URL. A copy whose numbers, code spans or special tokens did not survive the
round trip unchanged is dropped.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import random
import re
import urllib.request
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("r1kit")

EDA_OPS = ("synonym", "insert", "swap", "delete")
ALPHA = 0.1  # Wei & Zou's rate for every operation (their Table 3 lowers it to 0.05 below 2,000 examples)
WORDNET_DIR = Path("/usr/share/wordnet")  # Debian's wordnet-base
INSTALL_HINT = "run scripts/install_wordnet.sh (Debian's wordnet-base) or point augment.wordnet / --wordnet at a " \
               "WordNet 3.0 dict folder"

# The stop words of the EDA authors' code (github.com/jasonwei20/eda_nlp): never replaced, nor a source of insertion.
STOP_WORDS = frozenset("""
i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her hers herself
it its itself they them their theirs themselves what which who whom this that these those am is are was were be
been being have has had having do does did doing a an the and but if or because as until while of at by for with
about against between into through during before after above below to from up down in out on off over under again
further then once here there when where why how all any both each few more most other some such no nor not only
own same so than too very s t can will just don should now
""".split())

# A protected span: fenced code, inline code, a special token (<｜...｜>, <|...|>, <think>, </think>), a number.
_PROTECTED = re.compile(r"```.*?(?:```|\Z)|`[^`\n]*`|<｜[^｜]*｜>|<\|[^|]*\|>|</?think>|\d+(?:[.,]\d+)*", re.DOTALL)
_WORD = re.compile(r"[A-Za-z]+(?:['’-][A-Za-z]+)*")
_GLUE = re.compile(r"[\w+\-*/=^<>%$#@&|\\~]")  # a word touching one of these is part of an expression

# WordNet 3.0's lexicographer files (man 5 lexnames), which Debian's wordnet-base does not ship as a file.
_LEXNAMES = ("adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
             "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
             "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
             "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
             "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
             "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather "
             "adj.ppl").split()
_LEX_POS = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}


class AugmentError(ValueError):
    """Augmentation cannot run: no WordNet database, an unknown operation, a translator that fails."""


# ---------------------------------------------------------------------------------------------------- WordNet


@functools.lru_cache(maxsize=4)
def load_wordnet(folder: str | Path | None = None) -> Any:
    """nltk's WordNetCorpusReader over a WordNet 3.0 dict folder (default: Debian's /usr/share/wordnet)."""
    folder = Path(folder) if folder is not None else WORDNET_DIR
    if not (folder / "data.noun").is_file() or not (folder / "index.noun").is_file():
        raise AugmentError(f"no WordNet database in {folder} (data.noun / index.noun missing): {INSTALL_HINT}")
    try:
        import nltk
        from nltk.corpus.reader.wordnet import WordNetCorpusReader
    except ImportError:
        raise AugmentError("EDA's synonyms need nltk: pip install 'r1kit[augment]'") from None
    if str(folder.resolve()) not in map(str, nltk.data.path):
        nltk.data.path.append(str(folder.resolve()))  # nltk reads only below its data paths

    class _Reader(WordNetCorpusReader):
        def open(self, fileid: str) -> Any:  # Debian ships no lexnames file: its fixed content, from memory
            if fileid == "lexnames" and not (folder / "lexnames").is_file():
                import io

                return io.StringIO("".join(f"{i:02d}\t{name}\t{_LEX_POS[name.split('.')[0]]}\n"
                                           for i, name in enumerate(_LEXNAMES)))
            return super().open(fileid)

        def map_wn(self, version: str = "wordnet") -> None:  # a map to another WordNet serves only OMW's languages
            return None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available": no OMW, none needed
        return _Reader(str(folder.resolve()), None)


class Synonyms:
    """``synonyms(word)``: WordNet synonyms of a word as EDA takes them (lemma names, lower case, letters and
    spaces only, the word itself excluded), sorted so that a seed fixes the choice."""

    def __init__(self, folder: str | Path | None = None) -> None:
        self.wordnet = load_wordnet(folder)
        self._cache: dict[str, list[str]] = {}

    def __call__(self, word: str) -> list[str]:
        word = word.lower()
        if word not in self._cache:
            names = {lemma.name().replace("_", " ").replace("-", " ").lower()
                     for synset in self.wordnet.synsets(word) for lemma in synset.lemmas()}
            self._cache[word] = sorted(n for n in names if n != word and re.fullmatch(r"[a-z ]+", n))
        return self._cache[word]


# ---------------------------------------------------------------------------------------------------- EDA


@dataclass
class _Piece:
    text: str
    word: bool  # a free word EDA may change; everything else stays as it is


def split_pieces(text: str) -> list[_Piece]:
    """``text`` as pieces whose concatenation is ``text``; free words are those outside protected spans and not
    glued to an expression (see the module docstring)."""
    pieces: list[_Piece] = []
    start = 0
    for match in [*_PROTECTED.finditer(text), None]:
        end = match.start() if match else len(text)
        free = text[start:end]
        position = 0
        for word in _WORD.finditer(free):
            before = text[start + word.start() - 1] if start + word.start() > 0 else " "
            after = text[start + word.end()] if start + word.end() < len(text) else " "
            glued = bool(_GLUE.match(before) or _GLUE.match(after))
            pieces += [_Piece(free[position:word.start()], False), _Piece(word.group(), not glued)]
            position = word.end()
        pieces.append(_Piece(free[position:], False))
        if match:
            pieces.append(_Piece(match.group(), False))
            start = match.end()
    return [p for p in pieces if p.text]


def _words(pieces: list[_Piece]) -> list[int]:
    return [i for i, p in enumerate(pieces) if p.word]


def _match_case(new: str, old: str) -> str:
    return new[:1].upper() + new[1:] if old[:1].isupper() else new


def synonym_replacement(pieces: list[_Piece], rng: random.Random, alpha: float, synonyms: Synonyms) -> None:
    """SR: replace n = max(1, int(alpha * words)) distinct non-stop-words that have synonyms."""
    words = _words(pieces)
    n = max(1, int(alpha * len(words)))
    candidates = [i for i in words if pieces[i].text.lower() not in STOP_WORDS and synonyms(pieces[i].text)]
    for i in rng.sample(candidates, min(n, len(candidates))):
        pieces[i] = _Piece(_match_case(rng.choice(synonyms(pieces[i].text)), pieces[i].text), True)


def random_insertion(pieces: list[_Piece], rng: random.Random, alpha: float, synonyms: Synonyms) -> None:
    """RI: n times, a synonym of a random non-stop-word inserted before a random word (or after the last)."""
    n = max(1, int(alpha * len(_words(pieces))))
    for _ in range(n):
        words = _words(pieces)
        sources = [i for i in words if pieces[i].text.lower() not in STOP_WORDS and synonyms(pieces[i].text)]
        if not sources:
            return
        new = rng.choice(synonyms(pieces[rng.choice(sources)].text))
        slot = rng.randrange(len(words) + 1)
        if slot < len(words):
            pieces[words[slot]:words[slot]] = [_Piece(new, True), _Piece(" ", False)]
        else:
            pieces[words[-1] + 1:words[-1] + 1] = [_Piece(" ", False), _Piece(new, True)]


def random_swap(pieces: list[_Piece], rng: random.Random, alpha: float, synonyms: Synonyms | None = None) -> None:
    """RS: n times, two random words trade places (the punctuation and spaces around them stay)."""
    words = _words(pieces)
    if len(words) < 2:
        return
    for _ in range(max(1, int(alpha * len(words)))):
        a, b = rng.sample(words, 2)
        pieces[a], pieces[b] = pieces[b], pieces[a]


def random_deletion(pieces: list[_Piece], rng: random.Random, alpha: float, synonyms: Synonyms | None = None) -> None:
    """RD: each word deleted with probability alpha, with the space after it (before it at the end); when that
    would delete every word, one random word stays."""
    words = _words(pieces)
    doomed = [i for i in words if rng.random() < alpha]
    if len(doomed) == len(words) and words:
        doomed.remove(rng.choice(words))
    for i in sorted(doomed, reverse=True):
        if i + 1 < len(pieces) and pieces[i + 1].text.isspace():
            del pieces[i:i + 2]
        elif i > 0 and pieces[i - 1].text.isspace():
            del pieces[i - 1:i + 1]
        else:
            del pieces[i]


_OPERATIONS: dict[str, Callable[..., None]] = {"synonym": synonym_replacement, "insert": random_insertion,
                                               "swap": random_swap, "delete": random_deletion}


def eda(text: str, op: str, rng: random.Random, alpha: float = ALPHA, synonyms: Synonyms | None = None) -> str:
    """One EDA operation applied to ``text`` (numbers, code and special tokens untouched)."""
    if op not in _OPERATIONS:
        raise AugmentError(f"unknown EDA operation {op!r}; operations: {', '.join(EDA_OPS)}")
    if op in ("synonym", "insert") and synonyms is None:
        raise AugmentError(f"EDA operation {op!r} needs WordNet synonyms")
    pieces = split_pieces(text)
    _OPERATIONS[op](pieces, rng, alpha, synonyms)
    return "".join(p.text for p in pieces)


def wei_zou_n_aug(n_examples: int) -> int:
    """Augmented copies per example that Wei & Zou recommend (Table 3): 16 up to 500 examples, 8 up to 2,000,
    else 4."""
    return 16 if n_examples <= 500 else 8 if n_examples <= 2000 else 4


# ---------------------------------------------------------------------------------------------------- back-translation


TRANSLATE_PROMPT = "Translate the following text from {source} to {target}. Reply with the translation only.\n\n{text}"


def protected_spans(text: str) -> Counter:
    """The numbers, code spans and special tokens of ``text``, counted: what augmentation must keep."""
    return Counter(m.group() for m in _PROTECTED.finditer(text))


class BackTranslator:
    """Round trips ``text -> pivot language -> source language`` through ``complete(prompt) -> reply``."""

    def __init__(self, complete: Callable[[str], str], source: str = "English") -> None:
        self.complete, self.source = complete, source

    def translate(self, text: str, source: str, target: str) -> str:
        """One translation (the reply, stripped)."""
        return self.complete(TRANSLATE_PROMPT.format(source=source, target=target, text=text)).strip()

    def __call__(self, text: str, pivot: str) -> str | None:
        """The back-translation of ``text`` through ``pivot``, or None when it is empty or lost a number, a code
        span or a special token."""
        back = self.translate(self.translate(text, self.source, pivot), pivot, self.source)
        return back if back and protected_spans(back) == protected_spans(text) else None


def model_completer(translator: str, model_name: str | None = None, max_new_tokens: int = 256
                    ) -> Callable[[str], str]:
    """``complete(prompt) -> reply`` through an OpenAI-compatible server (``translator`` starts with http:// or
    https://; its base URL, e.g. http://host:8000/v1) or an r1kit model folder / name (greedy chat, thinking
    off)."""
    if translator.startswith(("http://", "https://")):
        return functools.partial(_openai_chat, translator.rstrip("/"), model_name or "default", max_new_tokens)
    from r1kit.api import R1Model

    model = R1Model.from_pretrained(translator)

    def complete(prompt: str) -> str:
        reply = model.chat([{"role": "user", "content": prompt}], thinking=False, temperature=0.0,
                           max_new_tokens=max_new_tokens)
        return reply.content

    return complete


def _openai_chat(base_url: str, model: str, max_tokens: int, prompt: str) -> str:
    """One greedy chat completion from an OpenAI-compatible server (POST {base_url}/chat/completions)."""
    url = base_url if base_url.endswith("/chat/completions") else f"{base_url}/chat/completions"
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": max_tokens}
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            reply = json.loads(response.read())
        return reply["choices"][0]["message"]["content"] or ""
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise AugmentError(f"translator {url}: {type(e).__name__}: {e}") from None


# ---------------------------------------------------------------------------------------------------- records


@dataclass
class Augmenter:
    """What to do to each training record: EDA operations with their rates, ``n_aug`` EDA copies per record
    (None: :func:`wei_zou_n_aug`), and back-translation through each pivot language when a translator is set."""

    ops: dict[str, float]
    n_aug: int | None = None
    seed: int = 0
    synonyms: Synonyms | None = None
    back_translator: BackTranslator | None = None
    languages: Sequence[str] = ("French", "German")

    @classmethod
    def from_section(cls, section: Any) -> Augmenter:
        """An Augmenter for an ``augment:`` section (loading WordNet and the translator it names)."""
        check_augment(section)
        needs_wordnet = any(op in section.ops for op in ("synonym", "insert"))
        translator = None
        if section.translator:
            translator = BackTranslator(model_completer(section.translator, section.translator_model))
        return cls(dict(section.ops), section.n_aug, section.seed, Synonyms(section.wordnet) if needs_wordnet else None,
                   translator, tuple(section.languages))

    def copies(self, record: dict[str, Any], index: int, n_records: int) -> list[dict[str, Any]]:
        """New records made from ``record`` (the ``index``-th of ``n_records``): distinct, none equal to it."""
        out: list[dict[str, Any]] = []
        ops = [op for op in EDA_OPS if op in self.ops]
        n_aug = self.n_aug if self.n_aug is not None else wei_zou_n_aug(n_records)
        for k in range(n_aug if ops else 0):
            op, rng = ops[k % len(ops)], random.Random(f"{self.seed}:{index}:{k}")
            out.append(map_user_texts(record, lambda text, op=op, rng=rng: eda(text, op, rng, self.ops[op],
                                                                                 self.synonyms)))
        for pivot in self.languages if self.back_translator else ():
            out.append(map_user_texts(record, lambda text, pivot=pivot: self.back_translator(text, pivot)))
        unique: list[dict[str, Any]] = []
        for new in out:
            if new is not None and new != record and new not in unique:
                unique.append(new)
        return unique


def check_augment(section: Any) -> None:
    """Refuse an ``augment:`` section (r1kit.train.config.AugmentSection) with an unknown operation, a rate
    outside [0, 1], n_aug < 1 or an empty pivot language; the message starts with the field's name."""
    unknown = sorted(set(section.ops) - set(EDA_OPS))
    if unknown:
        raise AugmentError(f"ops: unknown operation(s) {unknown}; operations: {', '.join(EDA_OPS)}")
    bad = {op: r for op, r in section.ops.items() if isinstance(r, bool) or not isinstance(r, (int, float))
           or not 0 <= r <= 1}
    if bad:
        raise AugmentError(f"ops: rates must be numbers in [0, 1], got {bad}")
    if section.n_aug is not None and section.n_aug < 1:
        raise AugmentError(f"n_aug = {section.n_aug!r}: must be >= 1, or None for Wei & Zou's choice")
    if section.translator and not all(isinstance(x, str) and x.strip() for x in section.languages):
        raise AugmentError(f"languages = {section.languages!r}: two language names")


def map_user_texts(record: dict[str, Any], change: Callable[[str], str | None]) -> dict[str, Any] | None:
    """A copy of a chat record with ``change`` applied to the user's side: ``user`` messages, a string
    ``prompt`` or the user messages of a list one, ``text``. None when ``change`` gives None for any."""
    new = copy.deepcopy(record)
    texts: list[tuple[Any, Any]] = []  # (container, key) of each user text
    if isinstance(new.get("messages"), list):
        texts += [(m, "content") for m in new["messages"] if m.get("role") == "user"]
    if isinstance(new.get("prompt"), str):
        texts.append((new, "prompt"))
    elif isinstance(new.get("prompt"), list):
        texts += [(m, "content") for m in new["prompt"] if m.get("role") == "user"]
    if "text" in new and "messages" not in new and "prompt" not in new:
        texts.append((new, "text"))
    for container, key in texts:
        changed = change(container[key])
        if changed is None:
            return None
        container[key] = changed
    return new


def augment_records(records: Sequence[Any], section: Any) -> list[Any]:
    """Augmented copies of chat_data ChatRecords for a TrainConfig ``augment:`` section (new ChatRecords, each
    named after its original's line, ``file:line (augmented)``)."""
    from r1kit.train.chat_data import ChatRecord

    augmenter = Augmenter.from_section(section)
    out = []
    for index, r in enumerate(records):
        out += [ChatRecord(f"{r.where} (augmented)", new) for new in augmenter.copies(r.record, index, len(records))]
    return out


def augment_file(src: str | Path, dst: str | Path, section: Any, skip_invalid: bool = False) -> dict[str, int]:
    """``r1kit augment``: every record of chat JSONL ``src`` followed by its augmented copies, written to ``dst``
    (atomically). Lines are checked as training reads them (errors name file and line). Returns counts."""
    from r1kit.fileio import atomic_write
    from r1kit.train.chat_data import read_chat_records

    records, data = read_chat_records(src, skip_invalid)
    augmenter = Augmenter.from_section(section)
    lines, copies = [], 0
    for index, r in enumerate(_progress(records, "augment")):
        new = augmenter.copies(r.record, index, len(records))
        copies += len(new)
        lines += [json.dumps(x, ensure_ascii=False) + "\n" for x in [r.record, *new]]
    atomic_write(Path(dst), lambda tmp: Path(tmp).write_text("".join(lines), encoding="utf-8"))
    return {"records": len(records), "copies": copies, "written": len(lines), "skipped": data.skipped}


def _progress(items: Sequence[Any], desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="record", dynamic_ncols=True, disable=len(items) < 200)
