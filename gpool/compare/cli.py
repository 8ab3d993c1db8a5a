"""`python -m gpool.compare`: is one head really better? Statistics across seeds (and test
images) from MLflow.

Reads a sweep's runs (or an experiment's) through MLflow's query API, groups them by the
factors they vary (all but the seed) and reports per group the final and best accuracy with
a 95 % interval; per pair the difference with its interval over seeds and test images, the
test of a difference and of equivalence within ±margin, Holm-adjusted over the pairs,
P(A > B), and the answer: better, equivalent, or undecided with the seeds that would
decide it. The tables and figures are written to disk and put on the sweep's parent run.
Its imports are argparse's until the arguments are read: `--help` answers at once.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

from gpool import PROJECT_ROOT
from gpool.errors import GpoolError
from gpool.levels import MARGIN, POWER
from gpool.names import PLAN_TAG

if TYPE_CHECKING:  # imported once the arguments are read: --help answers at once
    from mlflow.entities import Run

    from gpool.compare.comparison import Comparison
    from gpool.sequential import Plan

#: The decide sweeper's defaults, for --plan on a sweep that kept no plan of its own.
DECIDE_DEFAULTS = PROJECT_ROOT / "conf" / "hydra" / "sweeper" / "decide.yaml"


def positive_points(text: str) -> float:
    """An argument in points of accuracy: a number > 0 and below 100."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 100:
        raise argparse.ArgumentTypeError(f"{text!r} is no number of points in (0, 100)")
    return value


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gpool.compare", description=__doc__.split("\n\n")[0]
    )
    # A sweep's jobs include runs that finished in earlier sweeps, which a filter on the
    # parent would miss; one selection at a time, never one silently ignored.
    selection = parser.add_mutually_exclusive_group()
    selection.add_argument("--parent", help="parent run id of a sweep (default: the latest sweep)")
    selection.add_argument(
        "--filter",
        dest="filter_string",
        help="MLflow filter string over the experiment's runs, e.g. "
        "\"tags.dataset = 'fashion_mnist'\" (one sweep's children: \"tags.mlflow.parentRunId "
        "= '<id>' and ...\"); not with --parent",
    )
    parser.add_argument(
        "--experiment",
        help="compare every finished run of this experiment (default: the latest sweep in "
        "the config's experiment); with --filter or --parent, where to look",
    )
    parser.add_argument("--tracking-uri", help="default: the config's mlflow.tracking_uri")
    parser.add_argument(
        "--out", type=Path, help="folder for the table and figure (default: runs/compare/<id>)"
    )
    parser.add_argument(
        "--tune",
        nargs="+",
        metavar="KEY",
        help="per group, pick the value of these swept keys (e.g. optimizer.lr) with the best "
        "mean val acc, then compare test accuracy at those values (needs dataset.holdout > 0)",
    )
    parser.add_argument(
        "--margin",
        type=positive_points,
        default=MARGIN,
        metavar="POINTS",
        help="two groups count as equivalent when their difference lies within ±POINTS points "
        f"of accuracy (default {MARGIN:g}; TOST at the family-wise level)",
    )
    parser.add_argument(
        "--detect",
        type=positive_points,
        metavar="POINTS",
        help="also state, per pair, the seeds per group needed to detect a difference of "
        f"POINTS points of accuracy at {POWER * 100:.0f}%% power",
    )
    parser.add_argument(
        "--plan",
        nargs="?",
        const=0,
        type=int,
        metavar="MAX_SEEDS",
        help="also the decide sweeper's outlook for each pair it would leave open: the seeds "
        "a head it will likely take, and P(decided by MAX_SEEDS) (default: the sweep's own "
        "plan, else hydra/sweeper=decide's)",
    )
    parser.add_argument(
        "--maps",
        action="store_true",
        help="also draw the class maps the two leading groups' networks (one seed) put into "
        "their pools, side by side, for one test image per class and images they disagree on",
    )
    parser.add_argument(
        "--shift",
        nargs="+",
        type=pixels,
        metavar="PIXELS",
        help="also score every run's saved network on the test images moved by these pixels "
        "(e.g. 2 4 8; each of four directions) and compare the groups at each shift",
    )
    return parser.parse_args(argv)


def pixels(text: str) -> int:
    """A shift in pixels: a whole number from 1 to 64."""
    if not text.isdigit() or not 1 <= int(text) <= 64:
        raise argparse.ArgumentTypeError(f"{text!r} is no shift in pixels from 1 to 64")
    return int(text)


def mlflow_target(tracking_uri: str | None, experiment: str | None) -> tuple[str, str]:
    """The tracking URI and experiment given, or else those `gpool.train` would use, from
    the same config (composed only then: it takes about a second)."""
    if tracking_uri is None or experiment is None:
        from gpool.config import compose_config

        cfg = compose_config()
        tracking_uri = tracking_uri or cfg.mlflow.tracking_uri
        experiment = experiment or cfg.mlflow.experiment_name
    return tracking_uri, experiment


def main(argv: list[str] | None = None) -> str:
    """Compare what the arguments select, write the report, put it on the sweep's run;
    returns the verdict."""
    args = arguments(argv)
    from mlflow.exceptions import MlflowException

    from gpool.compare.comparison import compare_jobs
    from gpool.compare.publish import default_out, publish
    from gpool.compare.runs import select_runs
    from gpool.store import first_line, open_store, store_failing

    tracking_uri, experiment = mlflow_target(args.tracking_uri, args.experiment)
    client = open_store(tracking_uri, create=False)
    filter_string = args.filter_string
    if args.experiment and args.parent is None and filter_string is None:
        filter_string = ""  # the whole experiment
    try:
        parent, jobs = select_runs(client, experiment, args.parent, filter_string)
        plan = sweep_plan(parent, args.margin)
        comparison = compare_jobs(client, parent, jobs, args.detect, args.tune, args.margin, plan)
    except (MlflowException, OSError) as err:  # a server that died while runs were read
        if not store_failing(err):
            raise
        raise GpoolError(
            f"the MLflow store failed while the runs were read ({first_line(err)}); nothing "
            "was written: run the comparison again once the store answers"
        ) from None
    out = args.out or default_out(parent)
    paths = written(client, comparison, args, out, argv)
    print(f"{comparison.header}\n\n{comparison.table}\nwritten to {out}", flush=True)
    if args.plan is not None:
        print(outlook(comparison, args.plan), flush=True)
    if parent is not None:
        try:
            print(publish(client, parent, comparison, paths))
        except (MlflowException, OSError) as err:  # a read-only store, a refusing server
            raise GpoolError(
                f"the comparison is written to {out} but could not be put on the sweep's run "
                f"({first_line(err)})"
            ) from None
    return comparison.line


def written(client, comparison: Comparison, args: argparse.Namespace, out: Path, argv) -> list:
    """The report's files in `out`, headed by the command that made them (so a committed
    table can be regenerated), and --maps' and --shift's figures."""
    from mlflow.exceptions import MlflowException

    from gpool.compare.publish import report_files
    from gpool.store import first_line, store_failing

    command = shlex.join(
        ["python", "-m", "gpool.compare", *(sys.argv[1:] if argv is None else argv)]
    )
    made = f"made {date.today().isoformat()} by `{command}`"
    try:
        out.mkdir(parents=True, exist_ok=True)
        extra = after_training(client, comparison, args, out)
        return report_files(out, comparison, made) + extra
    except (MlflowException, OSError) as err:
        if store_failing(err):  # while --maps or --shift read the runs' files
            raise GpoolError(
                f"the MLflow store failed while the runs' networks were read ({first_line(err)})"
                "; no report was written: run the comparison again once the store answers"
            ) from None
        if isinstance(err, MlflowException):
            raise
        raise GpoolError(f"cannot write the report to {out} ({err.strerror}); pass --out") from None


def sweep_plan(parent: Run | None, margin: float) -> Plan | None:
    """A decide sweep's plan (its run's PLAN_TAG), at this comparison's margin: its runs
    were taken until its rule answered, so they are answered by that rule (a fixed-design
    test after optional stopping would overstate its confidence); None for other runs."""
    text = parent.data.tags.get(PLAN_TAG) if parent is not None else None
    if text is None:
        return None
    from gpool.sequential import Plan

    return replace(Plan.from_text(text), margin=margin)


def after_training(client, comparison: Comparison, args: argparse.Namespace, out: Path) -> list:
    """--maps and --shift, from the runs' saved networks (gpool.compare.after): their
    figures' paths; --shift's table joins the comparison's."""
    if not (args.maps or args.shift):
        return []
    from gpool.compare.after import pair_maps, shift_report
    from gpool.config import compose_config

    data_dir = str(compose_config().data_dir)  # this machine's data, never a run's
    paths = [pair_maps(client, comparison, data_dir, out)] if args.maps else []
    if args.shift:
        shifts = [0, *sorted(set(args.shift))]
        table, figure = shift_report(client, comparison, data_dir, shifts, out)
        comparison.table += "\n" + table
        paths.append(figure)
    return paths


def outlook(comparison: Comparison, most: int) -> str:
    """Each pair's outlook under the decide sweeper's rule (gpool.sequential): the sweep's
    own plan (sweep_plan), else the decide sweeper's defaults; `most` (> 0) replaces its
    max_seeds."""
    from gpool.compare.comparison import compare_groups
    from gpool.compare.render import outlook_line
    from gpool.sequential import Plan

    plan = comparison.plan
    if plan is None:
        from omegaconf import OmegaConf

        plan = Plan.of(OmegaConf.load(DECIDE_DEFAULTS), comparison.margin)
    seeds = min(len(group.runs) for group in comparison.groups)
    if most:
        plan = replace(plan, max_seeds=max(most, plan.first_round))
    _, pairs, _, _ = compare_groups(comparison.groups, None, comparison.margin, plan)
    lines = [outlook_line(pair, seeds) for pair in pairs]
    head = f"The decide sweeper's outlook at {seeds} seeds a group ({plan.text()}):"
    return "\n".join([head, *(f"- {line}" for line in lines)])


def run() -> None:
    """The command: one line and a non-zero exit for what the user can act on."""
    try:
        main()
    except GpoolError as err:
        sys.exit(f"gpool.compare: {err}")
