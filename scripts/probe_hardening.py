"""Repeat the hardening review (issue #10): every item it found, run as the test that reproduces it.

    python scripts/probe_hardening.py            # all items (a few minutes: real servers and CLI subprocesses)
    python scripts/probe_hardening.py -k nan     # only the items whose name contains "nan"

Each item maps to the tests that failed before its fix and pass now; the script runs them in one pytest
session and prints one line per item (PASS / FAIL, with the failing tests).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ITEMS: dict[str, list[str]] = {  # issue item -> test node ids (file::test prefix; parametrized cases included)
    "NaN sampling values refused everywhere": [
        "test_hardening_engine.py::test_sampling_params_refuse_non_finite_values",
        "test_hardening_engine.py::test_python_api_refuses_nan_with_the_same_message",
        "test_hardening_engine.py::test_cli_refuses_nan_in_one_line"],
    "one bad request cannot fail its neighbours": [
        "test_hardening_engine.py::test_a_request_whose_sampling_fails_does_not_fail_its_neighbours",
        "test_hardening_engine.py::test_engine_generate_reports_the_failed_request_and_frees_the_rest",
        "test_hardening_engine.py::test_service_isolates_a_failing_request"],
    "r1kit chat survives a full context": [
        "test_hardening_chat.py::test_fit_messages_drops_the_oldest_whole_turns",
        "test_hardening_chat.py::test_fit_messages_refuses_a_message_too_long_alone",
        "test_hardening_chat.py::test_cli_chat_survives_a_full_context"],
    "no-think works (CLI, Python, gRPC)": [
        "test_hardening_chat.py::test_no_think_prompt_ends_with_an_empty_think_block",
        "test_hardening_chat.py::test_no_think_chat_never_puts_reasoning_in_the_content",
        "test_hardening_chat.py::test_no_think_over_grpc", "test_hardening_chat.py::test_cli_no_think",
        "test_hardening_chat.py::test_parser_adversarial_outputs"],
    "chat-template injection": ["test_hardening_chat.py::test_no_control_token_from_message_text",
                                "test_hardening_chat.py::test_earlier_assistant_turns_render_as_r1"],
    "OpenAI parameters refused or honoured": [
        "test_hardening_http.py::test_every_unsupported_parameter_has_a_case",
        "test_hardening_http.py::test_unsupported_parameters_are_refused_by_name",
        "test_hardening_http.py::test_off_values_and_harmless_fields_are_accepted",
        "test_hardening_http.py::test_content_parts_developer_role_and_null_assistant_content"],
    "serve port errors (range, in use, replicas)": [
        "test_hardening_serve_cli.py::test_out_of_range_ports_are_one_line_errors",
        "test_hardening_serve_cli.py::test_busy_http_and_grpc_ports_are_one_line_errors",
        "test_hardening_serve_cli.py::test_replicas_refuse_a_busy_port_before_starting",
        "test_hardening_serve_cli.py::test_replicas_that_cannot_start_are_reported_not_restarted"],
    "eval --n 0 / -3": ["test_hardening_train_eval.py::test_bad_eval_arguments_are_one_line_errors",
                        "test_hardening_train_eval.py::test_eval_functions_refuse_bad_arguments"],
    "config.json wrong type / layer count": [
        "test_hardening_checkpoint.py::test_config_field_of_the_wrong_type_names_file_field_and_type",
        "test_hardening_checkpoint.py::test_layer_count_disagreeing_with_the_weights_is_named",
        "test_hardening_checkpoint.py::test_generate_names_the_layer_count_mismatch"],
    "empty YAML recipe": ["test_hardening_train_eval.py::test_bad_recipes_are_one_line_errors_naming_the_file_and_key"],
    "missing tokenizer message": ["test_hardening_chat.py::test_python_api_without_tokenizer_says_what_to_do",
                                  "test_hardening_chat.py::test_cli_without_tokenizer_says_what_to_do"],
    "malformed gRPC messages: one rate-limited line": [
        "test_grpc.py::test_malformed_messages_are_invalid_argument_and_one_log_line",
        "test_grpc.py::test_bad_request_log_is_rate_limited"],
    "shutdown timeout mid-stream ends with an error event": [
        "test_hardening_http.py::test_shutdown_timeout_mid_stream_ends_with_an_error_event"],
    "chunked body over the limit is 413": ["test_hardening_http.py::test_chunked_body_over_the_limit_is_413"],
    "slow clients timed out, connections limited": [
        "test_hardening_http.py::test_slow_loris_connections_are_closed",
        "test_hardening_http.py::test_over_the_connection_limit_is_503_not_a_hang"],
    "HEAD, OPTIONS and CORS": ["test_hardening_http.py::test_head_and_options_without_cors",
                               "test_hardening_http.py::test_cors_origins"],
    "/docs offline (no CDN)": ["test_hardening_http.py::test_no_page_needs_the_internet"],
    "chat page renders Markdown, escapes HTML, has help": [
        "test_web_page.py::test_help_line_and_markdown_with_all_html_escaped"],
    "info prints 671B + 14B MTP": ["test_hardening_checkpoint.py::test_info_prints_deepseeks_published_counts",
                                   "test_hardening_checkpoint.py::test_main_and_mtp_counts_match_what_a_checkpoint_stores"],
    "bundled model paths are absolute": [
        "test_hardening_serve_cli.py::test_model_paths_are_absolute_from_any_working_directory"],
    "checkpoint permissions and quantize log": [
        "test_hardening_checkpoint.py::test_quantize_writes_files_with_normal_permissions",
        "test_hardening_checkpoint.py::test_quantize_reports_modules_bytes_and_unchanged_parameters"],
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-k", default="", help="only items whose name contains this (case-insensitive)")
    a = p.parse_args()
    items = {name: tests for name, tests in ITEMS.items() if a.k.lower() in name.lower()}
    if not items:
        print(f"no item matches {a.k!r}; items: {', '.join(ITEMS)}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        nodes = sorted({f"tests/{t.split('::')[0]}" for tests in items.values() for t in tests})
        names = " or ".join(sorted({t.split("::")[1] for tests in items.values() for t in tests}))
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                        "-k", names, *nodes], cwd=ROOT)
        outcome = _outcomes(report)
    failed_items = 0
    print("\nissue #10 items:")
    for name, tests in items.items():
        runs = {case: ok for case, ok in outcome.items() if any(case.startswith(t) for t in tests)}
        missing = [t for t in tests if not any(case.startswith(t) for case in runs)]
        bad = [case for case, ok in runs.items() if not ok] + [f"{t} (not run)" for t in missing]
        failed_items += bool(bad)
        print(f"  {'PASS' if not bad else 'FAIL'}  {name}" + (f": {', '.join(bad)}" if bad else ""))
    print(f"{len(items) - failed_items}/{len(items)} items pass")
    return 1 if failed_items else 0


def _outcomes(report: Path) -> dict[str, bool]:
    """'file.py::test[case]' -> passed, from pytest's JUnit XML (skips count as not passing)."""
    out = {}
    for case in ET.parse(report).iter("testcase"):
        file = case.get("classname", "").split(".")[-1] + ".py"
        out[f"{file}::{case.get('name')}"] = not any(c.tag in ("failure", "error", "skipped") for c in case)
    return out


if __name__ == "__main__":
    sys.exit(main())
