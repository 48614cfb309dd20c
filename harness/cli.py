"""The ``harness`` command line: reports, leaderboards and baseline comparison of run JSONs.

Adding a subcommand: write ``_add_<name>(subparsers)`` that registers the parser and its
arguments and sets ``func`` (a ``_cmd_<name>(args) -> int`` function), then append it to
``SUBCOMMANDS``. Commands import their heavy dependencies inside ``_cmd_*`` so ``harness --help``
stays fast.

Exit codes: 0 success, 1 regression found (``compare``), 2 bad input (one-line message on stderr).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from harness.report import RunFileError, load_run


class UsageError(Exception):
    """Bad input that is not a run file problem; the message is shown as one line."""


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
    return 0


# --------------------------------------------------------------------------- leaderboard


def _add_leaderboard(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("leaderboard", help="rank editors per model over several run JSONs",
                       description="Rank editors per model; writes leaderboard.md and index.html.")
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN.json", help="run JSONs")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="output folder")
    p.set_defaults(func=_cmd_leaderboard)


def _cmd_leaderboard(args: argparse.Namespace) -> int:
    from harness.report.leaderboard import leaderboard, load_runs, to_markdown, write_leaderboard

    runs = load_runs(args.runs)
    md_path, html_path = write_leaderboard(runs, args.output)
    print(to_markdown(leaderboard(runs)), end="")
    print(f"wrote {md_path} and {html_path}")
    return 0


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
                       description="Compare per (suite, editor) metric means of RUN against BASELINE. "
                                   "Exit code 0: no regression, 1: regression, 2: bad input.")
    p.add_argument("baseline", type=Path, metavar="BASELINE.json")
    p.add_argument("run", type=Path, metavar="RUN.json")
    p.add_argument("--tol-score", type=_tolerance, default=0.05, metavar="ABS",
                   help="allowed absolute drop of success scores (default 0.05)")
    p.add_argument("--tol-ppl", type=_tolerance, default=0.10, metavar="REL",
                   help="allowed relative rise of perplexity-like metrics (default 0.10)")
    p.add_argument("--tol-time", type=_time_tolerance, default=0.5, metavar="REL|none",
                   help="allowed relative slowdown of phase timings, or 'none' to skip (default 0.5)")
    p.add_argument("--only-changes", action="store_true", help="print only rows that are not ok")
    p.set_defaults(func=_cmd_compare)


def _cmd_compare(args: argparse.Namespace) -> int:
    from harness.report.compare import compare

    baseline, run = load_run(args.baseline), load_run(args.run)
    result = compare(baseline, run, {"score": args.tol_score, "ppl": args.tol_ppl, "time": args.tol_time})
    print(result.to_markdown(only_changes=args.only_changes), end="")
    return 0 if result.ok else 1


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
    return 0


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_report,
    _add_leaderboard,
    _add_compare,
    _add_mine_hard,
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
        return 2
    try:
        return args.func(args)
    except (RunFileError, UsageError, ValueError) as exc:   # DataError, ModelLoadError, HparamsError: one line
        print(f"harness {args.command}: error: {exc}", file=sys.stderr)
    except OSError as exc:
        print(f"harness {args.command}: error: cannot write {exc.filename or 'output'} "
              f"({exc.strerror or exc}); check the output path", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
