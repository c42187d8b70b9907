"""The sandbox that runs model-written code (r1kit.eval.sandbox) contains hostile completions.

Each hostile completion is an attack followed by HumanEval/0's canonical solution: the sample passes only if the
attack did not raise or get the program killed, so a sandbox that lets the attack through fails the test. Each
test also checks that nothing outside the sandbox changed. They need bubblewrap (scripts/install_sandbox.sh
installs it; `make test` runs it) and skip without it, or fail when R1KIT_REQUIRE_SANDBOX=1 (CI).
"""

from __future__ import annotations

import os
import socket
import tempfile
import textwrap
from pathlib import Path

import pytest

from r1kit.eval.humaneval import check_samples, load_problems
from r1kit.eval.sandbox import SANDBOX_UID, SandboxError, SandboxLimits, isolation, run_python

LIMITS = SandboxLimits(timeout_s=4, cpu_s=2, memory_mb=512, file_mb=1, processes=8)
TASK = "HumanEval/0"


@pytest.fixture(scope="module", autouse=True)
def bubblewrap() -> None:
    try:
        kind = isolation()
    except SandboxError as e:
        kind = str(e)
    if kind != "bwrap":
        why = f"needs the bubblewrap sandbox, have: {kind} (scripts/install_sandbox.sh installs bubblewrap)"
        if os.environ.get("R1KIT_REQUIRE_SANDBOX") == "1":  # CI installs it: a skip would hide a gap
            pytest.fail(why)
        pytest.skip(why)


@pytest.fixture(scope="module")
def problems() -> dict:
    return load_problems()


def hostile(problems: dict, attack: str) -> dict:
    """Run attack + the canonical solution as HumanEval/0's completion; its result row."""
    completion = textwrap.indent(textwrap.dedent(attack).strip() + "\n", "    ") + problems[TASK]["canonical_solution"]
    return check_samples([{"task_id": TASK, "completion": completion}], problems, workers=1, limits=LIMITS)[0]


def sandbox_processes() -> list[int]:
    """pids of processes running as a sandbox uid (root drops to SANDBOX_UID + slot)."""
    pids = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            uid = int(status.read_text().split("\nUid:")[1].split()[0])
        except (OSError, IndexError):
            continue
        if SANDBOX_UID <= uid < SANDBOX_UID + 1000:
            pids.append(int(status.parent.name))
    return pids


def sandbox_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("r1kit-sandbox-*")}


def test_the_canonical_solution_passes_unharmed(problems):  # the control: attack-free, the sample passes
    assert hostile(problems, "pass")["result"] == "passed"


def test_ending_the_program_early_does_not_pass(problems):
    """os._exit(0) before the tests exits with status 0 but never reaches the runner's end mark; exit() and
    sys.exit(0) raise SystemExit, which the runner reports."""
    res = hostile(problems, "import os; os._exit(0)")
    assert not res["passed"] and res["result"] == "exited before the end (os._exit)"
    res = hostile(problems, "import sys; sys.exit(0)")
    assert not res["passed"] and res["result"].startswith("SystemExit")


def test_infinite_loop_is_stopped(problems):
    res = hostile(problems, "while True: pass")
    assert not res["passed"] and res["result"] in ("killed: CPU time limit (2 s)", "timed out after 4 s")


def test_fork_bomb_is_contained_and_reaped(problems):
    dirs = sandbox_dirs()
    res = hostile(problems, """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """)
    assert not res["passed"] and res["result"].startswith(("timed out", "killed")), res
    assert sandbox_processes() == []  # the whole namespace went with its first process
    assert sandbox_dirs() == dirs  # the temporary folder is gone


def test_allocating_10_gb_is_a_memory_error(problems):
    res = hostile(problems, "x = bytearray(10 * 2**30)")
    assert not res["passed"] and res["result"] == "MemoryError"


def test_writing_outside_the_temporary_directory_fails(problems, tmp_path):
    target = tmp_path / "escaped.txt"
    res = hostile(problems, f"open({str(target)!r}, 'w').write('escaped')")
    assert not res["passed"] and res["result"].startswith("FileNotFoundError"), res
    assert not target.exists()
    res = hostile(problems, "open('/usr/r1kit-escaped', 'w').write('escaped')")
    assert not res["passed"] and res["result"].startswith(("OSError", "PermissionError")), res
    assert not Path("/usr/r1kit-escaped").exists()


def test_reading_the_home_directory_fails(problems):
    secret = Path.home() / f".r1kit-sandbox-test-{os.getpid()}"
    secret.write_text("secret")
    try:
        res = hostile(problems, f"open({str(secret)!r}).read()")
        assert not res["passed"] and res["result"].startswith("FileNotFoundError"), res
        res = hostile(problems, f"assert {secret.name!r} in __import__('os').listdir({str(Path.home())!r})")
        assert not res["passed"] and res["result"].startswith(("AssertionError", "FileNotFoundError")), res
    finally:
        secret.unlink()


def test_deleting_files_fails(problems, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    res = hostile(problems, f"import os; os.remove({str(victim)!r})")
    assert not res["passed"] and res["result"].startswith("FileNotFoundError"), res
    assert victim.read_text() == "keep me"


def test_no_socket_reaches_the_host(problems):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        res = hostile(problems, f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)")
        assert not res["passed"] and res["result"].startswith(("ConnectionRefusedError", "OSError")), res
        with pytest.raises(BlockingIOError):  # nobody connected
            listener.accept()


def test_killing_the_parent_fails(problems):
    res = hostile(problems, f"import os, signal; os.kill({os.getpid()}, signal.SIGKILL)")
    assert not res["passed"] and res["result"].startswith("ProcessLookupError"), res
    res = hostile(problems, "import os, signal; os.kill(os.getppid(), signal.SIGKILL); os.kill(-1, signal.SIGKILL)")
    assert not res["passed"], res  # the sandbox's own first process refuses it; -1 reaches only the sandbox
    # (still here: this test process survived)


def test_changing_the_parents_working_directory_fails(problems):
    cwd = os.getcwd()
    res = hostile(problems, f"import os; os.chdir('/proc/{os.getpid()}/cwd'); os.chdir('/')")
    assert not res["passed"] and res["result"].startswith("FileNotFoundError"), res
    assert os.getcwd() == cwd


def test_printing_megabytes_hits_the_output_limit(problems):
    res = hostile(problems, "print('x' * 5_000_000)")
    assert not res["passed"] and res["result"] == "output over the file size limit (1 MB)"


def test_the_environment_is_scrubbed(monkeypatch, problems):
    monkeypatch.setenv("R1KIT_TEST_SECRET", "token")
    res = hostile(problems, "import os; os.environ['R1KIT_TEST_SECRET']")
    assert not res["passed"] and res["result"] == "KeyError: 'R1KIT_TEST_SECRET'"


def test_the_child_sees_only_its_sandbox():
    res = run_python("import os; print(sorted(os.listdir('/')), os.getcwd(), os.environ['HOME'])", LIMITS)
    assert res.passed, res
    shown = res.output.split("] ")[0] + "]"
    assert "work" not in shown and "home" not in shown and "etc" not in shown, shown
    assert res.output.split("] ")[1].split() == ["/sandbox", "/sandbox"]
