"""``qatflow submit`` and ``qatflow schedule``: run the compiled pipeline on a KFP cluster.

``register`` adds them (see ``qatflow_pipelines.cli``); the KFP client calls are
``qatflow.cluster``'s. Without ``--package`` the qatflow pipeline is compiled to a temp file,
and ``--help`` lists its parameters (both built only when needed, so the parser stays light).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from qatflow_pipelines.cli.parameters import add_param_option, compiled_package

from qatflow import cluster, params
from qatflow.errors import PipelineError

TOKEN_ENV = "QATFLOW_KFP_TOKEN"
HOST_ENV = "KF_PIPELINES_ENDPOINT"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``submit`` and ``schedule`` subcommands; each sets ``func(args) -> exit code``."""
    submit = subparsers.add_parser(
        "submit",
        help="run the pipeline once on a KFP cluster",
        description="Start one run of the qatflow pipeline on a Kubeflow Pipelines API server.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    _add_common(submit)
    submit.add_argument("--run-name", help="run name shown in the KFP UI")
    submit.set_defaults(func=run_submit)

    schedule = subparsers.add_parser(
        "schedule",
        help="create a recurring run on a cron schedule",
        description=(
            "Create a recurring run of the qatflow pipeline. KFP cannot edit a recurring run: "
            "to change it, delete it in the KFP UI and schedule again."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    _add_common(schedule)
    schedule.add_argument(
        "--cron",
        required=True,
        help=f"{cluster.CRON_HELP} Quote it: --cron '0 0 2 * * *'.",
    )
    schedule.add_argument(
        "--job-name",
        default=params.DEFAULT_JOB_NAME,
        help="recurring run name (default: %(default)s)",
    )
    schedule.add_argument("--description", help="recurring run description")
    schedule.add_argument(
        "--max-concurrency",
        type=int,
        default=1,
        help="runs of this schedule allowed at once (default: %(default)s)",
    )
    schedule.add_argument(
        "--catchup",
        action="store_true",
        help="backfill every missed interval after a pause (default: only the latest one)",
    )
    schedule.set_defaults(func=run_schedule)


_EPILOG = f"""\
examples:
  qatflow submit --host http://127.0.0.1:8080 --param epochs=3 --param dataset_uri=fashion-mnist
  qatflow schedule --host https://kfp.example.com --cron '0 0 2 * * *' --param epochs=3

The API token, if the server needs one, is read from ${TOKEN_ENV} (never from the command line).
"""


class _HelpWithParameters(argparse.Action):
    """``-h``: the usual help, then the pipeline's parameters (built only when asked for)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> NoReturn:
        from qatflow_pipelines.qat_int8.parameters import describe

        print(parser.format_help() + "\n" + describe(), end="", file=sys.stdout)
        parser.exit()


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-h",
        "--help",
        action=_HelpWithParameters,
        help="show this help, with the pipeline's parameters, and exit",
    )
    parser.add_argument(
        "--host",
        default=os.environ.get(HOST_ENV),
        help=f"KFP API server URL, e.g. http://127.0.0.1:8080 (default: ${HOST_ENV})",
    )
    parser.add_argument(
        "--experiment",
        default=params.DEFAULT_EXPERIMENT,
        help="KFP experiment, created if missing (default: %(default)s)",
    )
    parser.add_argument(
        "--package",
        type=Path,
        help="compiled pipeline YAML (default: compile the qatflow pipeline to a temp file)",
    )
    add_param_option(
        parser,
        help="pipeline parameter, repeatable; converted to the parameter's type "
        "(lists and dicts as JSON)",
    )
    parser.add_argument("--namespace", help="Kubernetes namespace (multi-user KFP only)")
    parser.add_argument(
        "--no-cache",
        dest="enable_caching",
        action="store_const",
        const=False,
        default=None,
        help="disable KFP step caching for this run (default: as compiled)",
    )


def _host(args: argparse.Namespace) -> str:
    """The checked ``--host``, before any compile or connection."""
    if not args.host:
        raise PipelineError(f"no KFP host: pass --host or set ${HOST_ENV}")
    return cluster.normalize_host(str(args.host))


def run_submit(args: argparse.Namespace) -> int:
    """Handle ``qatflow submit``: print the run id."""
    host = _host(args)
    with compiled_package(args.package) as package:
        run_id = cluster.submit(
            host,
            package,
            arguments=cluster.parse_arguments(package, dict(args.params)),
            experiment=args.experiment,
            run_name=args.run_name,
            namespace=args.namespace,
            existing_token=os.environ.get(TOKEN_ENV),
            enable_caching=args.enable_caching,
        )
    print(f"submitted run {run_id}")
    return 0


def run_schedule(args: argparse.Namespace) -> int:
    """Handle ``qatflow schedule``: print the recurring run id."""
    host = _host(args)
    cron = cluster.validate_cron(args.cron)
    with compiled_package(args.package) as package:
        recurring_id = cluster.schedule(
            host,
            package,
            cron=cron,
            arguments=cluster.parse_arguments(package, dict(args.params)),
            experiment=args.experiment,
            job_name=args.job_name,
            description=args.description,
            max_concurrency=args.max_concurrency,
            no_catchup=not args.catchup,
            namespace=args.namespace,
            existing_token=os.environ.get(TOKEN_ENV),
            enable_caching=args.enable_caching,
        )
    print(f"scheduled recurring run {recurring_id} ({cron}, UTC)")
    return 0
