"""The audit trail: every request and response appended to SQLite (WAL), hash-chained, with signed checkpoints.

    log = AuditLog("runs/audit.db", content="hash")      # key file runs/audit.db.key (0600) made on first use
    log.append({"request_id": "chatcmpl-1", "model": "r1kit/nano", "prompt": "...", "response": "...", ...})
    problems = verify("runs/audit.db")                   # [] when intact, else the first bad record named

Each record's leaf hash is SHA-256(0x00 || canonical JSON of its fields, its sequence number included), and the
chain hash is SHA-256(0x01 || previous chain hash || leaf hash): RFC 9162's leaf and node hashes. Every
``checkpoint_every`` records (and at close) a checkpoint stores the chain head and the RFC 9162 Merkle tree
head of all leaves so far, signed with Ed25519 when the ``cryptography`` package is installed. ``verify``
recomputes everything: a modified, deleted, reordered or inserted record breaks the chain at that record; a
rewritten tail (hashes recomputed by whoever edited it) no longer matches a signed checkpoint. Records after
the last checkpoint can be removed from the end without a trace: checkpoint often where that matters.

Prompt and response are stored as SHA-256 hashes only (``content="hash"``) or as text too (``"full"``). An API
key is stored as its id (``key-`` + 12 hex digits of its SHA-256), never itself. Appends are serialised by a
lock and an immediate SQLite transaction, so threads and processes may share one log.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

try:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
except ImportError:  # signing is optional: the hash chain works without it
    Ed25519PrivateKey = Ed25519PublicKey = None

FIELDS = ("time", "request_id", "api_key_id", "client", "model", "params", "verdict", "redactions", "finish_reason",
          "prompt", "response", "prompt_sha256", "response_sha256")
JSON_FIELDS = ("params", "verdict", "redactions")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (seq INTEGER PRIMARY KEY, time REAL, request_id TEXT, api_key_id TEXT,
  client TEXT, model TEXT, params TEXT, verdict TEXT, redactions TEXT, finish_reason TEXT, prompt TEXT,
  response TEXT, prompt_sha256 TEXT, response_sha256 TEXT, prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (seq INTEGER PRIMARY KEY, time REAL, chain_head TEXT, tree_head TEXT,
  public_key TEXT, signature TEXT);
"""
GENESIS = "00" * 32


class AuditError(ValueError):
    """An audit log cannot be opened or verified. The message names the file and the record."""


def key_id(api_key: str | None) -> str | None:
    """The id stored for an API key: never the key itself."""
    return None if not api_key else "key-" + hashlib.sha256(api_key.encode()).hexdigest()[:12]


def sha256_text(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def leaf_hash(seq: int, row: dict[str, Any]) -> bytes:
    """RFC 9162 leaf hash of one record: SHA-256(0x00 || canonical JSON of seq and the FIELDS)."""
    data = json.dumps({"seq": seq, **{f: row.get(f) for f in FIELDS}}, sort_keys=True, ensure_ascii=True,
                      separators=(",", ":"))
    return hashlib.sha256(b"\x00" + data.encode()).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 9162 interior node hash: SHA-256(0x01 || left || right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def tree_head(leaves: list[bytes]) -> bytes:
    """RFC 9162 Merkle tree hash of the leaf hashes (the empty tree: SHA-256 of nothing)."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    level = list(leaves)
    while len(level) > 1:  # pairing left to right, an odd last node promoted: the same tree as RFC 9162's split
        level = [node_hash(level[i], level[i + 1]) if i + 1 < len(level) else level[i] for i in range(0, len(level), 2)]
    return level[0]


def _checkpoint_message(seq: int, chain_head: str, tree_head_hex: str) -> bytes:
    return f"r1kit-audit-v1\n{seq}\n{chain_head}\n{tree_head_hex}\n".encode()


def _load_key(path: Path):
    """The Ed25519 private key in ``path``, created (0600) when missing; None without `cryptography`."""
    if Ed25519PrivateKey is None:
        return None
    if not path.exists():
        raw = Ed25519PrivateKey.generate().private_bytes_raw()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            return _load_key(path)
        with os.fdopen(fd, "w") as f:
            f.write(raw.hex() + "\n")
    text = path.read_text().strip()
    try:
        return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(text))
    except ValueError as e:
        raise AuditError(f"{path}: not an r1kit audit key (64 hex digits of an Ed25519 private key): {e}") from None


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")  # WAL: a committed record survives a process crash
    conn.row_factory = sqlite3.Row
    return conn


class AuditLog:
    """An append-only, hash-chained audit log in one SQLite file (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, content: str = "hash", key: str | os.PathLike | None = None,
                 checkpoint_every: int = 100):
        if content not in ("hash", "full"):
            raise AuditError(f"content = {content!r}: must be hash or full")
        self.path, self.content, self.checkpoint_every = Path(path), content, checkpoint_every
        if not self.path.parent.is_dir():
            raise AuditError(f"{self.path}: its folder does not exist")
        self.key = _load_key(Path(key) if key else Path(str(self.path) + ".key"))
        self._lock = threading.Lock()
        try:
            self._conn = _connect(self.path)
            self._conn.executescript(_SCHEMA)
        except sqlite3.DatabaseError as e:
            raise AuditError(f"{self.path}: not an audit database ({e})") from None

    def append(self, record: dict[str, Any]) -> int:
        """Append one record (keys from FIELDS; prompt/response hashed, and dropped unless content="full");
        returns its sequence number."""
        return self.append_many([record])[0]

    def append_many(self, records: list[dict[str, Any]]) -> list[int]:
        """Append records in one transaction (each still its own link of the chain); their sequence numbers."""
        rows = [self._row(r) for r in records]
        with self._lock:
            return self._append_locked(rows)

    def _row(self, record: dict[str, Any]) -> dict[str, Any]:
        unknown = set(record) - set(FIELDS)
        if unknown:
            raise AuditError(f"audit record: unknown field(s) {sorted(unknown)}; fields: {list(FIELDS)}")
        row = {f: record.get(f) for f in FIELDS}
        row["time"] = row["time"] if row["time"] is not None else time.time()
        row["prompt_sha256"] = row["prompt_sha256"] or sha256_text(row["prompt"])
        row["response_sha256"] = row["response_sha256"] or sha256_text(row["response"])
        if self.content == "hash":
            row["prompt"] = row["response"] = None
        for f in JSON_FIELDS:
            if row[f] is not None and not isinstance(row[f], str):
                row[f] = json.dumps(row[f], sort_keys=True, ensure_ascii=False)
        return row

    def _append_locked(self, rows: list[dict[str, Any]]) -> list[int]:
        c = self._conn
        c.execute("BEGIN IMMEDIATE")  # the write lock across processes: read the head and append atomically
        try:
            last = c.execute("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev = (last["seq"], last["hash"]) if last else (0, GENESIS)
            seqs = []
            for row in rows:
                seq += 1
                chain = node_hash(bytes.fromhex(prev), leaf_hash(seq, row)).hex()
                c.execute(f"INSERT INTO records (seq, {', '.join(FIELDS)}, prev_hash, hash) VALUES (?, "
                          f"{', '.join('?' * len(FIELDS))}, ?, ?)", (seq, *[row[f] for f in FIELDS], prev, chain))
                if seq % self.checkpoint_every == 0:
                    self._checkpoint_locked(seq, chain)
                seqs.append(seq)
                prev = chain
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        return seqs

    def _checkpoint_locked(self, seq: int, chain: str) -> None:
        leaves = [leaf_hash(r["seq"], dict(r)) for r in self._conn.execute("SELECT * FROM records ORDER BY seq")]
        head = tree_head(leaves).hex()
        public = signature = None
        if self.key is not None:
            public = self.key.public_key().public_bytes_raw().hex()
            signature = self.key.sign(_checkpoint_message(seq, chain, head)).hex()
        self._conn.execute("INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?, ?)",
                           (seq, time.time(), chain, head, public, signature))

    def checkpoint(self) -> None:
        """Sign the current head now (also done every checkpoint_every records and at close)."""
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            last = c.execute("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
            if last and not c.execute("SELECT 1 FROM checkpoints WHERE seq = ?", (last["seq"],)).fetchone():
                self._checkpoint_locked(last["seq"], last["hash"])
            c.execute("COMMIT")

    def close(self) -> None:
        self.checkpoint()
        with self._lock:
            self._conn.close()


def read_records(path: str | os.PathLike, since: float | None = None, request_id: str | None = None
                 ) -> list[dict[str, Any]]:
    """The records of a log (JSON fields decoded), optionally from a time on or of one request id."""
    path = Path(path)
    if not path.is_file():
        raise AuditError(f"{path}: no such audit database")
    conn = _connect(path)
    try:
        sql, args = "SELECT * FROM records WHERE 1=1", []
        if since is not None:
            sql, args = sql + " AND time >= ?", [*args, since]
        if request_id is not None:
            sql, args = sql + " AND request_id LIKE ?", [*args, request_id + "%"]
        rows = [dict(r) for r in conn.execute(sql + " ORDER BY seq", args)]
    finally:
        conn.close()
    for r in rows:
        for f in JSON_FIELDS:
            r[f] = json.loads(r[f]) if r[f] else r[f]
    return rows


def verify(path: str | os.PathLike, key: str | os.PathLike | None = None) -> list[str]:
    """Check a log: [] when intact, else the problems, the first one naming the first bad record. ``key``: the
    private key file (its public key must have signed the checkpoints; default DB + ".key" when it exists)."""
    path = Path(path)
    if not path.is_file():
        raise AuditError(f"{path}: no such audit database")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        rows = [dict(r) for r in conn.execute("SELECT * FROM records ORDER BY seq")]
        checkpoints = [dict(r) for r in conn.execute("SELECT * FROM checkpoints ORDER BY seq")]
    except sqlite3.DatabaseError as e:
        raise AuditError(f"{path}: not an audit database ({e})") from None
    finally:
        conn.close()
    problems, chain = _verify_chain(rows)
    key_file = Path(key) if key else Path(str(path) + ".key")
    key_ = _load_key(key_file) if key_file.is_file() else None  # None too without `cryptography`
    trusted = key_.public_key().public_bytes_raw().hex() if key_ is not None else None
    problems += _verify_checkpoints(rows, checkpoints, chain, trusted)
    return problems


def _verify_chain(rows: list[dict[str, Any]]) -> tuple[list[str], dict[int, tuple[str, bytes]]]:
    """Problems with the records' order, contents and links; the recomputed {seq: (chain hash, leaf hash)}."""
    problems: list[str] = []
    chain: dict[int, tuple[str, bytes]] = {}
    prev, expected_seq = GENESIS, 1
    for r in rows:
        seq = r["seq"]
        if seq != expected_seq:
            problems.append(f"record {seq}: expected record {expected_seq} here (records "
                            f"{expected_seq}..{seq - 1} deleted, or the log reordered)")
        if r["prev_hash"] != prev:
            problems.append(f"record {seq}: its prev_hash does not match the record before it "
                            "(a record inserted, deleted or moved here)")
        leaf = leaf_hash(seq, r)
        recomputed = node_hash(bytes.fromhex(prev), leaf).hex() if _is_hex(prev) else ""
        if r["hash"] != recomputed:
            problems.append(f"record {seq}: its contents do not match its hash (modified)")
        for name, text in (("prompt", r["prompt"]), ("response", r["response"])):
            if text is not None and sha256_text(text) != r[f"{name}_sha256"]:
                problems.append(f"record {seq}: its {name} does not match {name}_sha256 (modified)")
        chain[seq] = (recomputed, leaf)
        prev, expected_seq = r["hash"] if _is_hex(r["hash"]) else "", seq + 1
    return problems, chain


def _verify_checkpoints(rows: list[dict[str, Any]], checkpoints: list[dict[str, Any]],
                        chain: dict[int, tuple[str, bytes]], trusted: str | None) -> list[str]:
    problems = []
    leaves = [leaf for _, leaf in chain.values()]
    for cp in checkpoints:
        seq = cp["seq"]
        if seq not in chain:
            problems.append(f"checkpoint at record {seq}: record {seq} is missing (records deleted from the end)")
            continue
        if cp["chain_head"] != chain[seq][0] or cp["tree_head"] != tree_head(leaves[:seq]).hex():
            problems.append(f"checkpoint at record {seq}: the records up to {seq} are not the ones checkpointed "
                            "(rewritten)")
        if cp["signature"] and Ed25519PublicKey is not None:
            if trusted is not None and cp["public_key"] != trusted:
                problems.append(f"checkpoint at record {seq}: signed by another key than the key file's")
            try:
                Ed25519PublicKey.from_public_bytes(bytes.fromhex(cp["public_key"])).verify(
                    bytes.fromhex(cp["signature"]), _checkpoint_message(seq, cp["chain_head"], cp["tree_head"]))
            except Exception:  # noqa: BLE001 - InvalidSignature, or a malformed key / signature
                problems.append(f"checkpoint at record {seq}: bad signature")
    return problems


def _is_hex(s: Any) -> bool:
    try:
        return isinstance(s, str) and len(bytes.fromhex(s)) == 32
    except ValueError:
        return False
