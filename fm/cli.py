"""`fm-train`, `fm-extract`, `fm-eval`, `fm-prepare`: one front end, domains plug in via entry points.

Every command that has a default config accepts `--config FILE`, `--set key.path=value` (repeatable)
and `--print-config` (print the resolved YAML and exit). Errors in user input print one clear line
and exit with status 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

from fm.config import ConfigError, dump, resolve_config
from fm.domains import Command, Domain, load_domains
from fm.termination import TERMINATED, sigterm_exits


class UserError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


def add_config_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("configuration")
    g.add_argument("--config", help="YAML file merged over the domain's default config")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set optim.base_lr=1e-3 (repeatable)")
    g.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    g.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or a local SQLite store)")


def resolved_config(args: argparse.Namespace, command: Command) -> dict:
    """The command's config: default YAML <- --config <- --set (flags are applied by the command)."""
    return resolve_config(command.default_config, args.config, args.overrides)


class _EvalParser(argparse.ArgumentParser):
    """`fm-eval DOMAIN name:ARG ...` is read as `fm-eval DOMAIN name ARG ...` (e.g. `csv:labels.csv`),
    the same `kind:argument` form as `--cohorts csv:PATH`."""

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        if len(args) >= 2 and ":" in args[1] and not args[1].startswith("-"):
            args[1:2] = args[1].split(":", 1)
        return super().parse_known_args(args, namespace)


def _build_parser(prog: str, verb: str, domains: dict[str, Domain]) -> argparse.ArgumentParser:
    parser_class = _EvalParser if verb == "eval" else argparse.ArgumentParser
    parser = parser_class(prog=prog, description=f"{verb} with an fm-suite domain")
    sub = parser.add_subparsers(dest="domain", metavar="DOMAIN", parser_class=argparse.ArgumentParser)
    sub.required = True
    for name, domain in sorted(domains.items()):
        if verb == "eval":
            if not domain.eval_tasks:
                continue
            dp = sub.add_parser(name, help=domain.help, description=domain.help)
            tasks = dp.add_subparsers(dest="task", metavar="TASK")
            tasks.required = True
            for task_name, cmd in sorted(domain.eval_tasks.items()):
                tp = tasks.add_parser(task_name, help=cmd.help, description=cmd.help)
                _add_command_args(tp, cmd)
        else:
            cmd = getattr(domain, verb)
            if cmd is None:
                continue
            dp = sub.add_parser(name, help=cmd.help, description=cmd.help)
            _add_command_args(dp, cmd)
    return parser


def _add_command_args(parser: argparse.ArgumentParser, cmd: Command) -> None:
    add_args = cmd.arg_builder()
    if add_args is not None:
        add_args(parser)
    if cmd.default_config is not None:
        add_config_args(parser)
    elif not any("--tracking-uri" in a.option_strings for a in parser._actions):
        parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or local SQLite)")
    parser.set_defaults(_command=cmd)


def build_parser(verb: str) -> argparse.ArgumentParser:
    """The parser of `fm-<verb>` with every installed domain (used by the pipeline tests too)."""
    return _build_parser(f"fm-{verb}", verb, load_domains())


def invoke(verb: str, argv: Sequence[str] | None = None):
    """Parse and run `fm-<verb> argv`; returns what the command returns (a results dict for most).
    Errors propagate: the console scripts turn user errors into one line and exit status 2."""
    domains = load_domains()
    parser = _build_parser(f"fm-{verb}", verb, domains)
    args = parser.parse_args(argv)
    cmd: Command = args._command
    if cmd.default_config is not None:
        args.cfg = resolved_config(args, cmd)
        if args.print_config:
            apply = cmd.flag_applier()
            cfg = apply(args, args.cfg) if apply else args.cfg
            print(dump(cfg), end="")
            return None
    if verb in TRACKED_HERE:
        return _run_tracked(verb, args, cmd)
    return cmd.runner()(args)


TRACKED_HERE = ("prepare", "extract")  # their runs are recorded here; fm-train and fm-eval record their own


def _run_tracked(verb: str, args: argparse.Namespace, cmd: Command):
    """Run `fm-<verb> <domain>` inside an MLflow run of the domain's experiment: the flags as params, the
    command's summary as metrics, its manifest (or a packed cache's meta.json) as an artifact."""
    import time

    from fm.tracking import tracked_run

    params = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "tracking_uri"}
    tags = {"fm_command": f"fm-{verb} {args.domain}"}
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:  # torchrun / srun: rank 0 records the run, and its counts are those of its own shard
        tags["scope"] = f"rank 0 of {world}: the metrics count the slides of rank 0's shard only"
    with tracked_run(f"fm-{args.domain}", run_name=f"{verb}-{time.strftime('%Y%m%d-%H%M%S')}", config=params,
                     tracking_uri=args.tracking_uri, tags=tags) as run:
        result = cmd.runner()(args)
        _log_summary(run, result)
    return result


def _log_summary(run, result) -> None:
    from pathlib import Path

    if isinstance(result, (str, Path)) and (Path(result) / "meta.json").is_file():  # a packed cache
        meta = json.loads((Path(result) / "meta.json").read_text())
        run.log_metrics({"n_samples": meta.get("n", 0), "n_skipped": len(meta.get("skipped", []))})
        run.log_artifact(Path(result) / "meta.json")
        return
    if not isinstance(result, dict):
        return
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    metrics = {k: v for k, v in result.items() if number(v)}
    for key, value in result.items():
        if isinstance(value, dict):
            metrics.update({f"{key}/{k}": v for k, v in value.items() if number(v)})
    run.log_metrics(metrics)
    if result.get("manifest") and Path(result["manifest"]).is_file():
        run.log_artifact(result["manifest"])


def run_reporting(prog: str, call: Callable[[], object]) -> int:
    """Run `call` as the command `prog`: bad input ends in one line on stderr and exit status 2, not a
    traceback; SIGTERM ends it cleanly, saying how to resume."""
    try:
        with sigterm_exits():  # a killed job still releases its locks and writes its manifest
            call()
    except (UserError, ConfigError, ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError,
            IsADirectoryError, PermissionError) as e:  # bad input; other OSErrors (I/O, network) keep their traceback
        if os.environ.get("FM_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"{prog}: error: {msg}\n(set FM_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2
    except SystemExit as e:
        if e.code == TERMINATED:
            print(f"{prog}: terminated (SIGTERM): finished outputs are kept; run the same command again to "
                  "resume", file=sys.stderr)
        raise
    return 0


def _run(verb: str, argv: Sequence[str] | None) -> int:
    return run_reporting(f"fm-{verb}", lambda: invoke(verb, argv))


def train_main(argv: Sequence[str] | None = None) -> int:
    return _run("train", argv)


def extract_main(argv: Sequence[str] | None = None) -> int:
    return _run("extract", argv)


def eval_main(argv: Sequence[str] | None = None) -> int:
    return _run("eval", argv)


def prepare_main(argv: Sequence[str] | None = None) -> int:
    return _run("prepare", argv)
