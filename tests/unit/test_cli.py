"""Every invocation the README and the help texts document parses to its command, with its
options; wrong ones fail the way argparse fails (exit 2). The commands themselves run in the
integration tier."""

from __future__ import annotations

import shlex

import pytest

from sluice.cli import parse_args
from sluice.cli.admin import cmd_bench, cmd_sink, cmd_topics
from sluice.cli.dlq import cmd_list, cmd_replay, cmd_show
from sluice.cli.query import cmd_sql, cmd_stats
from sluice.cli.requests import cmd_cancel, cmd_results, cmd_status, cmd_submit
from sluice.cli.run import cmd_demo, cmd_up

DOCUMENTED = [
    ("sluice demo", cmd_demo, {"max_tokens": 48}),
    ("sluice up --engine instant --external-kafka", cmd_up, {"engine": "instant", "external_kafka": True}),
    (
        'sluice submit "hello there" --priority high --model M --tenant T',
        cmd_submit,
        {"prompt": "hello there", "priority": "high", "model": "M", "tenant": "T"},
    ),
    ("sluice results --follow --format openai --group G", cmd_results, {"follow": True, "format": "openai"}),
    ('sluice sql "SELECT 1"', cmd_sql, {"query": "SELECT 1"}),
    ("sluice stats --tenant T --view savings", cmd_stats, {"tenant": "T", "view": "savings"}),
    ("sluice stats --view latency", cmd_stats, {"view": "latency"}),
    ("sluice cancel a b --reason late", cmd_cancel, {"request_ids": ["a", "b"], "reason": "late"}),
    ("sluice dlq list --reason unknown_model --since 2h", cmd_list, {"reason": "unknown_model", "since": "2h"}),
    ("sluice dlq show dl1", cmd_show, {"dead_letter_id": "dl1"}),
    (
        "sluice dlq replay --reason unknown_model --to-model smollm2-135m --dry-run",
        cmd_replay,
        {"to_model": "smollm2-135m", "dry_run": True},
    ),
    ("sluice status r1", cmd_status, {"request_id": "r1"}),
    ("sluice topics", cmd_topics, {}),
    ("sluice sink", cmd_sink, {}),
    ("sluice bench --quick", cmd_bench, {"bench_args": ["--quick"]}),
    (
        "sluice bench --quick --only p1,p4 --json out.json",
        cmd_bench,
        {"bench_args": ["--quick", "--only", "p1,p4", "--json", "out.json"]},
    ),
    ("sluice --log-level DEBUG bench --help", cmd_bench, {"bench_args": ["--help"], "log_level": "DEBUG"}),
]


@pytest.mark.parametrize(("line", "fn", "expected"), DOCUMENTED, ids=[d[0] for d in DOCUMENTED])
def test_documented_invocations_parse(line: str, fn: object, expected: dict[str, object]) -> None:
    args = parse_args(shlex.split(line)[1:])
    assert args.fn is fn
    for key, value in expected.items():
        assert getattr(args, key) == value, key


@pytest.mark.parametrize(
    "line",
    ["sluice submit hi --bogus", "sluice up --engine nonsense", "sluice submit hi --priority urgent", "sluice"],
)
def test_invalid_invocations_exit_2(line: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(shlex.split(line)[1:])
    assert exc.value.code == 2
    assert "usage: sluice" in capsys.readouterr().err


def test_bench_options_reach_the_benchmark_runner() -> None:
    from bench.cli import build_parser

    args = parse_args(["bench", "--quick", "--only", "p5"])
    bench = build_parser().parse_args(args.bench_args)
    assert bench.quick is True and bench.only == "p5"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["submit", ""], "sluice submit: error: messages: Value error, all messages are empty"),
        (["submit", "hi", "--max-tokens", "1000000000"], "max_tokens: Input should be less than or equal to 32768"),
        (["dlq", "list", "--since", "yesterday"], "age 'yesterday' must look like 30s, 15m, 2h or 7d"),
    ],
)
def test_invalid_input_is_one_line_on_stderr_without_a_traceback(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from sluice.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and expected in err, err
    assert "Traceback" not in err
