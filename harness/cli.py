"""The ``harness`` command line: reports, leaderboards and baseline comparison of run JSONs.

Adding a subcommand: write ``_add_<name>(subparsers)`` that registers the parser and its
arguments and sets ``func`` (a ``_cmd_<name>(args) -> int`` function), then append it to
``SUBCOMMANDS``. Commands import their heavy dependencies inside ``_cmd_*`` so ``harness --help``
stays fast.

Exit codes: 0 success; 1 a regression found (``compare``); 2 bad or unusable input, or a comparison refused
because the runs are not like for like (one-line message on stderr).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from harness.report import RunFileError, load_run

EXIT_OK, EXIT_REGRESSION, EXIT_UNUSABLE = 0, 1, 2


# --------------------------------------------------------------------------- report


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="render one run JSON as a self-contained HTML page",
                       description="Render one run JSON as a self-contained HTML page.")
    p.add_argument("run", type=Path, metavar="RUN.json", help="run JSON (e.g. reports/latest.json)")
    p.add_argument("-o", "--output", type=Path, metavar="OUT.html",
                   help="output file (default: next to the JSON, same name with .html)")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from harness.report.html import write_html

    run = load_run(args.run)
    out = write_html(run, args.output or args.run.with_suffix(".html"))
    print(f"wrote {out}")
    return EXIT_OK


# --------------------------------------------------------------------------- leaderboard


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _add_leaderboard(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("leaderboard", help="rank editors over run JSONs, one table per (model, dataset, suite)",
                       description="Rank editors like for like: one table per (model, dataset, suite), cells with "
                                   "95% bootstrap intervals; editors with a collapsed case rank below those without; "
                                   "writes leaderboard.md and index.html.")
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN.json", help="run JSONs")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="output folder")
    p.add_argument("--min-n", type=_positive_int, default=None, metavar="N",
                   help="editors with fewer cases are listed but not ranked (default 5)")
    p.set_defaults(func=_cmd_leaderboard)


def _cmd_leaderboard(args: argparse.Namespace) -> int:
    from harness.report.leaderboard import (
        DEFAULT_MIN_N,
        board_tables,
        load_runs,
        to_markdown,
        write_leaderboard,
    )

    min_n = args.min_n or DEFAULT_MIN_N
    runs = load_runs(args.runs)
    md_path, html_path = write_leaderboard(runs, args.output, min_n)
    print(to_markdown(board_tables(runs, min_n), min_n), end="")
    print(f"wrote {md_path} and {html_path}")
    return EXIT_OK


# --------------------------------------------------------------------------- export


def _add_export(sub: argparse._SubParsersAction) -> None:
    from harness.report.export import FORMATS

    p = sub.add_parser("export", help="a run's results per editor and suite, with intervals (markdown, LaTeX, CSV)",
                       description="Per (suite, editor): n and every headline metric as mean [95% bootstrap CI].")
    p.add_argument("run", type=Path, metavar="RUN.json")
    p.add_argument("--format", choices=FORMATS, default="markdown")
    p.add_argument("--all-metrics", action="store_true", help="every aggregated metric, not only the headline ones")
    p.add_argument("-o", "--output", type=Path, metavar="FILE", help="write here instead of standard output")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from harness.report.export import export_table

    text = export_table(load_run(args.run), args.format, args.all_metrics)
    if args.output is None:
        print(text, end="")
    else:
        from harness.run import atomic_write_text
        args.output.parent.mkdir(parents=True, exist_ok=True)
        print(f"wrote {atomic_write_text(args.output, text)}")
    return EXIT_OK


# --------------------------------------------------------------------------- compare


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _time_tolerance(text: str) -> float | None:
    return None if text.strip().lower() in ("none", "off") else _tolerance(text)


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="compare a run against a baseline run; exit 1 on regression",
                       description="Compare RUN against BASELINE case by case (records matched by suite, editor and "
                                   "case id): a metric regresses when its paired change is beyond tolerance and its "
                                   "95% paired-bootstrap interval excludes zero; a test that passed and now fails, a "
                                   "(suite, editor) or more than a quarter of its cases absent, a metric lost or "
                                   "with an impossible value (a negative ratio or time) are regressions too. Timings "
                                   "of runs on different machines are not compared (a note says so). Exit code 0: "
                                   "no regression; 1: regression; 2: unusable input, two records of one case, or "
                                   "runs with different model, dataset, thresholds or run settings (--seq-edits, "
                                   "--batch-size, --ppl-schedule, --wild-dataset, --hard-dataset) unless "
                                   "--allow-different.")
    p.add_argument("baseline", type=Path, metavar="BASELINE.json")
    p.add_argument("run", type=Path, metavar="RUN.json")
    p.add_argument("--tol-score", type=_tolerance, default=0.05, metavar="ABS",
                   help="allowed absolute drop of scores, probabilities and fractions (default 0.05)")
    p.add_argument("--tol-ppl", type=_tolerance, default=0.10, metavar="REL",
                   help="allowed relative worsening of perplexities, ratios, KL (default 0.10)")
    p.add_argument("--tol-time", type=_time_tolerance, default=0.5, metavar="REL|none",
                   help="allowed relative slowdown of median phase timings, or 'none' to skip (default 0.5)")
    p.add_argument("--allow-different", action="store_true",
                   help="compare even when model, dataset, thresholds or run settings differ (the differences become "
                        "notes), and compare timings across machines")
    p.add_argument("--only-changes", action="store_true", help="print only rows that are not ok")
    p.set_defaults(func=_cmd_compare)


def _cmd_compare(args: argparse.Namespace) -> int:
    from harness.report.compare import compare

    baseline, run = load_run(args.baseline), load_run(args.run)
    result = compare(baseline, run, {"score": args.tol_score, "ppl": args.tol_ppl, "time": args.tol_time},
                     allow_different=args.allow_different)
    if result.refused:
        print(f"harness compare: refused: {result.refused}", file=sys.stderr)
        return EXIT_UNUSABLE
    print(result.to_markdown(only_changes=args.only_changes), end="")
    return EXIT_OK if result.ok else EXIT_REGRESSION


# --------------------------------------------------------------------------- entry point

# --------------------------------------------------------------------------- mine-hard


def _add_mine_hard(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mine-hard", help="find edits that collapse the model (the HardEdit recipe)",
                       description="Run single edits over a pool of cases and keep those whose perplexity ratio "
                                   "reaches the threshold; save them in the HardEdit (EasyEdit-style) format.")
    p.add_argument("--editor", default="rome")
    p.add_argument("--pool", default="auto", help="cases to mine: auto (CounterFact with --data-dir), builtin-hard, "
                                                   "a file, ...")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="auto")
    p.add_argument("-n", "--cases", type=int, default=50, help="pool size (first N cases)")
    p.add_argument("--threshold", type=float, default=2.0, help="perplexity ratio that counts as collapse")
    p.add_argument("--hparam", action="append", default=[])
    p.add_argument("-o", "--output", required=True, help="HardEdit JSON to write")
    p.set_defaults(func=_cmd_mine_hard)


def _cmd_mine_hard(args: argparse.Namespace) -> int:
    from harness import protocols
    from harness.data import save_easyedit
    from harness.session import HarnessSession, Options
    from harness.timing import PhaseTimer

    h = HarnessSession(Options(editors=[args.editor], model=args.model, device=args.device, data_dir=args.data_dir,
                               dataset=args.pool, n_cases=args.cases, hparams=args.hparam))
    editor = h.editor(args.editor)
    hard = []
    for case in h.cases():
        metrics = protocols.single_edit(h, editor, case, PhaseTimer(h.lm.device)).metrics
        mark = "HARD" if metrics["ppl_ratio"] >= args.threshold else "    "
        print(f"{mark} {case.case_id:>8} ppl x{metrics['ppl_ratio']:8.3f}  {case.rewrite_prompt!r}", flush=True)
        if metrics["ppl_ratio"] >= args.threshold:
            hard.append(case)
    path = save_easyedit(hard, args.output)
    print(f"{len(hard)} of {len(h.cases())} cases reach ppl ratio >= {args.threshold}: {path}")
    return EXIT_OK


# --------------------------------------------------------------------------- merge, launch (docs/cluster.md)


def _add_merge(sub: argparse._SubParsersAction) -> None:
    from harness import merge
    p = sub.add_parser("merge", help="one run JSON from the shard runs of one sweep",
                       description="Merge the run JSONs of one sweep's shards (pytest --shard I/N, harness launch).")
    merge.add_arguments(p)
    p.set_defaults(func=merge.run)


def _add_launch(sub: argparse._SubParsersAction) -> None:
    from harness import launch
    p = sub.add_parser("launch", help="run a benchmark in N shards on SLURM, Ray or this machine, then merge",
                       description="One job per shard (submitit: slurm, local; or Ray), retries, then the merge. "
                                   "Exit 0 all passed, 1 tests failed, 2 bad input, 3 shards failed.")
    launch.add_arguments(p)
    p.set_defaults(func=launch.run)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_report,
    _add_leaderboard,
    _add_compare,
    _add_export,
    _add_mine_hard,
    _add_merge,
    _add_launch,
]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="harness", description="Reports, leaderboards and baseline comparison of harness run JSONs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (the console script passes it to sys.exit)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_UNUSABLE
    from harness.specs import register_builtin_specs
    register_builtin_specs()        # the protocol-owned metrics (WILD, sequential, ...) rank and compare here too
    try:
        return args.func(args)
    except (RunFileError, ValueError) as exc:   # DataError, ModelLoadError, HparamsError: one line
        print(f"harness {args.command}: error: {exc}", file=sys.stderr)
    except OSError as exc:
        print(f"harness {args.command}: error: cannot write {exc.filename or 'output'} "
              f"({exc.strerror or exc}); check the output path", file=sys.stderr)
    return EXIT_UNUSABLE


if __name__ == "__main__":
    sys.exit(main())
