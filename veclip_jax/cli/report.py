"""Prints the final evaluations of training runs side by side (veclip_jax.eval.report.eval_table):

    python launch/report.py workdir/demo_alttext workdir/demo_mixed workdir/demo_vecap

A Markdown table, a row per metric and a column per workdir (its eval.jsonl lines of the last step,
headed with its config's `data.vecap_prob`): `make demo-table` prints the README's demo table so.
"""

from __future__ import annotations

import argparse

from veclip_jax.eval.report import eval_table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="python launch/report.py", description="Print runs' final evaluations side by side."
    )
    p.add_argument("workdirs", nargs="+", metavar="WORKDIR", help="training workdirs (their eval.jsonl)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Prints the table."""
    print(eval_table(parse_args(argv).workdirs))


def run() -> None:
    """The console script `veclip-report` (and `python launch/report.py`)."""
    main()
