"""The audit trail: hash chain and Merkle heads against RFC 9162's definitions, each kind of tampering named by
`verify` and `r1kit audit verify`, signed checkpoints, key file permissions, many writers at once, and a writer
killed with SIGKILL mid-stream."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from r1kit.__main__ import main
from r1kit.safety import audit as audit_module
from r1kit.safety.audit import AuditLog, key_id, leaf_hash, read_records, tree_head, verify


def rfc9162_mth(leaves: list[bytes]) -> bytes:
    """MTH as RFC 9162 section 2.1.1 defines it: split at the largest power of two below n."""
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return hashlib.sha256(b"\x01" + rfc9162_mth(leaves[:k]) + rfc9162_mth(leaves[k:])).digest()


def test_tree_head_matches_rfc9162():
    leaves = [hashlib.sha256(b"\x00" + bytes([i])).digest() for i in range(33)]
    for n in range(1, 34):
        assert tree_head(leaves[:n]) == rfc9162_mth(leaves[:n])


def make_log(path, n=8, **kw) -> None:
    log = AuditLog(path, content="full", checkpoint_every=kw.pop("checkpoint_every", 4), **kw)
    for i in range(n):
        log.append({"request_id": f"r{i}", "api_key_id": key_id("secret-key"), "model": "m", "prompt": f"p{i}",
                    "response": f"answer {i}", "params": {"temperature": 0.5}, "verdict": {"allowed": True}})
    log.close()


def sql(path, *statements) -> None:
    c = sqlite3.connect(path)
    for s in statements:
        c.execute(s)
    c.commit()
    c.close()


def test_intact_log_verifies_and_stores_hashes_only_by_default(tmp_path):
    make_log(tmp_path / "a.db")
    assert verify(tmp_path / "a.db") == []
    assert oct(os.stat(tmp_path / "a.db.key").st_mode & 0o777) == "0o600"
    log = AuditLog(tmp_path / "h.db")
    log.append({"request_id": "x", "prompt": "secret prompt", "response": "r", "api_key_id": key_id("k")})
    log.close()
    (row,) = read_records(tmp_path / "h.db")
    assert row["prompt"] is None and row["prompt_sha256"] == hashlib.sha256(b"secret prompt").hexdigest()
    assert row["api_key_id"].startswith("key-") and "k" != row["api_key_id"]


@pytest.mark.parametrize("tamper, first", [
    (["UPDATE records SET response = 'forged' WHERE seq = 3"], "record 3"),
    (["UPDATE records SET verdict = '{\"allowed\": false}' WHERE seq = 5"], "record 5"),
    (["DELETE FROM records WHERE seq = 4"], "record 5"),  # the gap shows at the next record
    (["UPDATE records SET seq = 100 WHERE seq = 2", "UPDATE records SET seq = 2 WHERE seq = 3",
      "UPDATE records SET seq = 3 WHERE seq = 100"], "record 2"),  # records 2 and 3 swapped
    (["UPDATE records SET seq = seq + 1000 WHERE seq >= 4", "UPDATE records SET seq = seq - 999 WHERE seq >= 1004",
      "INSERT INTO records (seq, request_id, prev_hash, hash) SELECT 4, 'evil', hash, hash FROM records WHERE seq = 3"],
     "record 4"),  # a record inserted in the middle
    (["DELETE FROM records WHERE seq >= 7"], "checkpoint at record 8"),  # the tail cut after checkpoint 8
])
def test_each_kind_of_tampering_names_the_first_bad_record(tmp_path, tamper, first, capsys):
    db = tmp_path / "a.db"
    make_log(db)
    assert main(["audit", "verify", str(db)]) == 0 and "intact (8 records)" in capsys.readouterr().out
    sql(db, *tamper)
    problems = verify(db)
    assert problems and problems[0].startswith(first + ":"), problems
    with pytest.raises(SystemExit) as exit_:
        main(["audit", "verify", str(db)])
    assert exit_.value.code == 1 and f"TAMPERED: {first}" in capsys.readouterr().err


def test_rewritten_chain_is_caught_by_the_signed_checkpoint(tmp_path):
    """An editor who recomputes every hash after a change still cannot match the signed checkpoint."""
    db = tmp_path / "a.db"
    make_log(db)
    c = sqlite3.connect(db)
    c.row_factory = sqlite3.Row
    c.execute("UPDATE records SET response = 'forged' WHERE seq = 2")
    prev = c.execute("SELECT hash FROM records WHERE seq = 1").fetchone()[0]
    for r in c.execute("SELECT * FROM records WHERE seq >= 2 ORDER BY seq").fetchall():
        row = {**dict(r), "response_sha256": hashlib.sha256(r["response"].encode()).hexdigest()}
        h = hashlib.sha256(b"\x01" + bytes.fromhex(prev) + leaf_hash(r["seq"], row)).hexdigest()
        c.execute("UPDATE records SET prev_hash = ?, hash = ?, response_sha256 = ? WHERE seq = ?",
                  (prev, h, row["response_sha256"], r["seq"]))
        prev = h
    c.commit()
    problems = verify(db)
    assert problems and all(p.startswith("checkpoint at record") for p in problems), problems
    # ... and re-signing with another key is caught when the key file is the original one
    c.execute("UPDATE checkpoints SET signature = '00' || substr(signature, 3)")
    c.commit()
    assert any("bad signature" in p for p in verify(db))


def test_copied_database_and_key_verify_elsewhere(tmp_path):
    make_log(tmp_path / "a.db")
    other = tmp_path / "elsewhere"
    other.mkdir()
    for name in ("a.db", "a.db.key"):
        (other / name).write_bytes((tmp_path / name).read_bytes())
    assert verify(other / "a.db") == []
    (other / "b.db.key").write_text("11" * 32 + "\n")  # a different key file
    assert any("another key" in p for p in verify(other / "a.db", key=other / "b.db.key"))


def test_many_threads_append_and_the_chain_holds(tmp_path):
    log = AuditLog(tmp_path / "a.db", checkpoint_every=25)

    def worker(t: int) -> None:
        for i in range(25):
            log.append({"request_id": f"t{t}-{i}", "response": "x"})

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    assert len(read_records(tmp_path / "a.db")) == 200 and verify(tmp_path / "a.db") == []


WRITER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("audit", sys.argv[2])  # audit.py alone: no torch import, fast start
audit = importlib.util.module_from_spec(spec)
spec.loader.exec_module(audit)
log = audit.AuditLog(sys.argv[1], content="full", checkpoint_every=7)
i = 0
while True:
    log.append({"request_id": f"r{i}", "prompt": "p" * 2000, "response": "r" * 5000})
    i += 1
    if i == 20:
        print("ready", flush=True)
"""


def test_kill_9_mid_write_leaves_a_log_that_verifies(tmp_path):
    db = tmp_path / "a.db"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(db), audit_module.__file__], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n = len(read_records(db))
    assert n >= 20 and verify(db) == []
    make = AuditLog(db, content="full")  # and the log goes on from where it stopped
    assert make.append({"request_id": "after"}) == n + 1
    make.close()
    assert verify(db) == []
