"""The ``mmfl`` command. The only place with logging setup and progress bars.

Exit status: 0 success, 1 run-time failure (e.g. non-finite updates), 2 invalid configuration or
input (one line on stderr naming the key or the file), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from mmfl.errors import ConfigError, ConfigFileError, DataError, MmflError, ResultsError

log = logging.getLogger("mmfl")
#: loggers of the libraries mmfl runs (Flower's database migrations, Ray, gRPC), quiet below
#: WARNING without --verbose
THIRD_PARTY_LOGGERS = ("alembic", "sqlalchemy", "ray", "grpc", "flwr", "urllib3", "matplotlib")

INPUT_ERRORS = (ConfigError, ConfigFileError, DataError, ResultsError)


class _Parser(argparse.ArgumentParser):
    """argparse with the usage errors of every other input error: one line on stderr naming
    the argument, exit status 2 (``--help`` still shows the usage)."""

    def error(self, message: str):
        self.exit(2, f"mmfl: error: {self.prog}: {message} (see {self.prog} --help)\n")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment TOML file (see configs/example.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set rounds=5 --set tasks[0].lr=0.1 "
                        "(repeatable; values are TOML, bare words are strings)")
    p.add_argument("--data-dir", default=None,
                   help="dataset folder (default: the config's data_dir, then $MMFL_DATA)")


def _add_seeds_jobs_args(p: argparse.ArgumentParser) -> None:
    """--seeds and --jobs, the same for every command that runs several runs (see _seeds)."""
    p.add_argument("--seeds", default=None,
                   help="comma-separated distinct seeds, one run each (default: the config's seed)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at a time, each in its own worker process (default 1)")


def _seeds(args, cfg) -> list[int]:
    """The seeds of a multi-run command: --seeds, else the config's seed; and --jobs checked."""
    from mmfl.experiment.sweep import parse_seeds

    if args.jobs < 1:
        raise ConfigError("--jobs", "must be >= 1", args.jobs)
    return parse_seeds(args.seeds) if args.seeds is not None else [cfg.seed]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mmfl", description="Multi-model federated learning: joint client sampling and "
                                 "model allocation across several models.")
    parser.add_argument("--version", action="version", version=f"mmfl {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="run one experiment into a run directory",
                       description="Run one experiment. Writes config.toml, metrics.csv, "
                                   "rounds.csv, summary.json and a checkpoint into --out.")
    _add_config_args(p)
    p.add_argument("--out", default=None,
                   help="run directory (default: runs/NAME-YYYYmmdd-HHMMSS)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint")
    p.add_argument("--progress", choices=("auto", "bar", "log", "none"), default="auto",
                   help="progress display: a bar on a terminal, log lines otherwise (default auto)")
    p.add_argument("--tensorboard", default=None, metavar="DIR",
                   help="also write the rounds as TensorBoard event files under DIR (the "
                        "config's [logging] tensorboard)")

    p = sub.add_parser("describe", help="print the federation of a config without training",
                       description="Build the federation (clients, processors, tasks, samples, "
                                   "classes, budget) and print it. Trains nothing.")
    _add_config_args(p)

    p = sub.add_parser("compare", help="run several samplers x seeds and print a table",
                       description="Run every sampler with every seed on one config (each an "
                                   "ordinary run directory under --out; finished runs are "
                                   "skipped, so it resumes) and print mean/min accuracy with "
                                   "std over seeds and total cost per sampler.")
    _add_config_args(p)
    p.add_argument("--samplers", default="all",
                   help="comma-separated sampler names, or 'all' (default)")
    _add_seeds_jobs_args(p)
    p.add_argument("--out", required=True, help="folder for the run directories and table.md")

    p = sub.add_parser("sweep", help="run every combination of a grid of config values x seeds",
                       description="Run every combination of the --grid values with every seed, "
                                   "each an ordinary run directory under --out (named "
                                   "key=value/.../seed=N; index.json maps names to overrides). "
                                   "Resumable: finished runs are skipped, interrupted ones "
                                   "resumed. A failed run is recorded and the others go on; the "
                                   "exit status is 1 when any failed.")
    _add_config_args(p)
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a dotted config key and its comma-separated values (TOML), e.g. "
                        "--grid sampler.name=gvr,random (repeatable: every combination runs)")
    _add_seeds_jobs_args(p)
    p.add_argument("--out", required=True, help="sweep folder (run directories and index.json)")
    p.add_argument("--progress", choices=("auto", "bar", "log", "none"), default="auto",
                   help="progress display: a bar on a terminal, log lines otherwise (default auto)")

    p = sub.add_parser("report", help="write an HTML/Markdown report with plots of run directories",
                       description="Read run directories (given directly or found below the "
                                   "folders given), group them by config minus the seed and "
                                   "write report.html, report.md and PNG plots into --out. "
                                   "Needs the plot extra (pip install 'mmfl[plot]').")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="run directories or folders holding them")
    p.add_argument("--out", required=True, help="folder for report.html, report.md and the PNGs")
    p.add_argument("--target", type=float, default=None,
                   help="accuracy target for 'rounds to target' (default: 90%% of the best "
                        "group's final mean accuracy)")
    p.add_argument("--baseline", default=None, metavar="SAMPLER",
                   help="sampler (sampler.name) the significance table compares every other "
                        "with, by a paired t-test over seeds (default: random, when run)")

    p = sub.add_parser("data", help="dataset files: fetch NAME downloads and verifies them",
                       description="Download a dataset's original files and verify their "
                                   "checksums (needs network access to the dataset's host).")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    f = data_sub.add_parser("fetch", help="download and verify NAME's files",
                            description="Download mnist, fashion_mnist, emnist or cifar10 "
                                        "into --data-dir (default $MMFL_DATA, then "
                                        "~/.cache/mmfl/data) and verify the published checksums.")
    f.add_argument("name", help="mnist | fashion_mnist | emnist | cifar10")
    f.add_argument("--data-dir", default=None, help="target folder")

    p = sub.add_parser(
        "flower-local", help="run one experiment on a real Flower deployment on this machine",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Start a Flower SuperLink and one SuperNode per client as separate "
                    "processes on loopback\n(each SuperNode loads only its own client's data "
                    "shard), submit mmfl's Flower app with\n`flwr run`, follow it round by "
                    "round and write the usual run directory into --out.\nEvery process it "
                    "started is stopped at the end, also on failure and Ctrl-C.\nProcess logs: "
                    "OUT/flower/logs/ (kept on failure). See docs/flower.md.",
        epilog="exit status: 0 completed, 1 the Flower run failed (the ServerApp traceback is "
               "printed), 2 invalid\nconfiguration or input, 130 interrupted (resume with "
               "--resume).")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="run directory (the experiment's files; Flower's "
                                                "working files and logs go to OUT/flower/)")
    p.add_argument("--tls", action="store_true",
                   help="serve the SuperLink over TLS with a CA and a certificate generated for "
                        "this run (SAN 127.0.0.1, ::1, localhost); SuperNodes and flwr verify it")
    p.add_argument("--auth", action="store_true",
                   help="SuperNode authentication (implies --tls): an ECDSA key per node, "
                        "registered with `flwr supernode register` before the node starts")
    p.add_argument("--round-timeout", type=float, default=None, metavar="S",
                   help="seconds the ServerApp waits for a round's replies; a node that has not "
                        "answered by then misses the round (finite, >= 0; 0 = no limit; "
                        "default: the config's flower.round_timeout, 600)")
    p.add_argument("--node-wait", type=float, default=None, metavar="S",
                   help="seconds the ServerApp waits for all SuperNodes to connect and answer "
                        "discovery (finite, > 0; default: the config's flower.node_wait, 120)")
    p.add_argument("--port", type=int, default=None, metavar="P",
                   help="SuperLink port (default: a free port; SuperNode runtime ports are "
                        "always picked free)")
    p.add_argument("--host", default="127.0.0.1", metavar="H",
                   help="address the SuperLink listens on and SuperNodes connect to: an IP "
                        "address or a host name (default 127.0.0.1; 0.0.0.0 = every interface, "
                        "local processes use loopback; only the Fleet API is served to other "
                        "machines); added to the TLS certificate")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint")
    p.add_argument("--keep-logs", action="store_true",
                   help="keep OUT/flower/logs after a completed run (always kept on failure)")
    p.add_argument("--prepare-only", action="store_true",
                   help="write the shards, config, app, FLWR_HOME, certificates and keys and "
                        "OUT/flower/commands.sh (the command of every process, e.g. to run them "
                        "on several machines), print it and start nothing; only what mmfl "
                        "created under OUT/flower is replaced")

    p = sub.add_parser("config", help="config helpers: 'example' prints every key with its "
                       "default and meaning", description="Config helpers.")
    config_sub = p.add_subparsers(dest="config_command", required=True)
    f = config_sub.add_parser("example", help="print configs/example.toml, generated from the "
                              "schema (every key, default, rule and component option)")
    f.add_argument("--out", default=None, help="write it to this file instead of stdout")

    p = sub.add_parser("components", help="list datasets, models, samplers, aggregators, engines",
                       description="List every registered component and its options.")
    p.add_argument("kind", nargs="?", default=None,
                   choices=("dataset", "model", "sampler", "aggregator", "engine"))
    return parser


def _version() -> str:
    from mmfl import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    if not args.verbose:  # other libraries speak at WARNING and above unless --verbose
        for name in THIRD_PARTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    commands = {"run": _cmd_run, "describe": _cmd_describe, "compare": _cmd_compare,
                "sweep": _cmd_sweep, "report": _cmd_report, "data": _cmd_data,
                "components": _cmd_components, "config": _cmd_config,
                "flower-local": _cmd_flower_local}
    try:
        if args.command in commands:
            return commands[args.command](args)
    except INPUT_ERRORS as e:
        print(f"mmfl: error: {e}", file=sys.stderr)
        return 2
    except MmflError as e:
        print(f"mmfl: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mmfl: interrupted; continue with --resume", file=sys.stderr)
        return 130
    return 2


def _load(args):
    from mmfl.experiment.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "tensorboard", None):
        overrides.append(f"logging.tensorboard={json.dumps(str(args.tensorboard))}")
    return load_config(args.config, overrides)


def _cmd_run(args) -> int:
    from mmfl.experiment.runner import run

    cfg = _load(args)
    if args.out is not None and not args.out.strip():
        raise ConfigError("--out", "must be a folder path", args.out)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.name).strip("._") or "run"
    out = Path(args.out) if args.out else Path("runs") / (
        f"{safe}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    mode = args.progress
    if mode == "auto":
        mode = "bar" if sys.stderr.isatty() else "log"
    callbacks = {"bar": [_BarProgress()], "log": [_LogProgress()], "none": []}[mode]
    summary = run(cfg, out, resume=args.resume, data_dir=args.data_dir, callbacks=callbacks)
    tasks = ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in summary.get("tasks", {}).items())
    print(f"done: {out}  mean accuracy {summary.get('mean_accuracy', float('nan')):.4f}  "
          f"min {summary.get('min_accuracy', float('nan')):.4f}  ({tasks})")
    return 0


def _accuracies(record) -> str:
    if record.accuracy is None:
        return ""
    return " ".join(f"{n}={a:.3f}" for n, a in zip(record.task_names, record.accuracy))


class _LogProgress:
    """Plain log lines (for files, pipes and CI)."""

    def on_start(self, cfg, federation, start_round):
        pop = federation.population
        log.info("%s: %d clients, %d processors, budget m=%d, tasks %s, sampler %s, engine %s%s",
                 cfg.name, pop.num_clients, pop.num_processors, federation.budget,
                 ",".join(pop.task_names), cfg.sampler.name, cfg.engine,
                 f", resuming after round {start_round}" if start_round else "")
        log.info("slots per round: drawn at random by most samplers, so they vary around m "
                 "(m is their expected number); merged slots of a client train once")
        self.t0 = time.perf_counter()
        self.start = start_round

    def on_round(self, record):
        done = record.round - self.start
        eta = (time.perf_counter() - self.t0) / max(done, 1) * (record.rounds - record.round)
        log.info("round %d/%d  slots %d (m=%g)  %.2fs  ETA %.0fs  %s", record.round,
                 record.rounds, record.slots, record.budget, record.seconds, eta,
                 _accuracies(record))

    def on_end(self, summary):
        pass


class _BarProgress:
    """A rich progress bar: round, per-task accuracy, ETA."""

    def on_start(self, cfg, federation, start_round):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        # readable at 80 columns: a short name, a bar of at least 20, the mean and worst model
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(bar_width=20),
            MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), TextColumn("{task.fields[acc]}"), transient=False,
        )
        self.progress.start()
        name = cfg.name if len(cfg.name) <= 14 else cfg.name[:13] + "~"
        self.bar = self.progress.add_task(name, total=cfg.rounds, completed=start_round, acc="")

    def on_round(self, record):
        if record.accuracy is not None:
            acc = f"acc {float(np.mean(record.accuracy)):.3f} min {float(np.min(record.accuracy)):.3f}"
            self.progress.update(self.bar, acc=acc)
        self.progress.update(self.bar, completed=record.round)

    def on_end(self, summary):
        self.progress.stop()

    def __del__(self):
        if hasattr(self, "progress"):
            self.progress.stop()


def _cmd_describe(args) -> int:
    from mmfl.experiment.describe import describe_federation
    from mmfl.experiment.config import resolve_data_dir
    from mmfl.experiment.federation import build_federation

    cfg = _load(args)
    fed = build_federation(cfg, resolve_data_dir(cfg, args.data_dir))
    if cfg.system.trace:  # every input file a run reads is checked here too
        from mmfl.experiment.profile import load_trace

        load_trace(cfg.system.trace, cfg.clients.count)
    print(describe_federation(cfg, fed))
    return 0


def _cmd_compare(args) -> int:
    from mmfl import registry
    from mmfl.experiment.compare import comparison_table, format_table, run_comparison

    cfg = _load(args)
    names = registry.names("sampler") if args.samplers == "all" else [
        x.strip() for x in args.samplers.split(",") if x.strip()]
    for n in names:
        registry.get("sampler", n, key="--samplers")
    seeds = _seeds(args, cfg)
    if args.jobs == 1:  # in this process: every run's rounds as log lines
        summaries = run_comparison(cfg, names, seeds, args.out, data_dir=args.data_dir,
                                   callbacks=[_LogProgress()])
    else:
        summaries = run_comparison(cfg, names, seeds, args.out, data_dir=args.data_dir,
                                   jobs=args.jobs, sweep_callbacks=[_SweepLog()])
    table = format_table(comparison_table(summaries))
    Path(args.out, "table.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    return 0


def _cmd_sweep(args) -> int:
    from mmfl.experiment.sweep import parse_grid, plan_sweep, run_sweep

    cfg = _load(args)
    grid = parse_grid(args.grid)
    seeds = _seeds(args, cfg)
    plan = plan_sweep(cfg, grid, seeds, args.out)  # validates every combination first
    mode = args.progress
    if mode == "auto":
        mode = "bar" if sys.stderr.isatty() else "log"
    callbacks = {"bar": [_SweepBar()], "log": [_SweepLog()], "none": []}[mode]
    log.info("sweep: %d runs (%d combinations x %d seeds) into %s, %d at a time",
             len(plan.runs), len(plan.runs) // len(seeds), len(seeds), args.out, args.jobs)
    try:
        result = run_sweep(plan, jobs=args.jobs, data_dir=args.data_dir, callbacks=callbacks)
    except KeyboardInterrupt:
        for cb in callbacks:
            if isinstance(cb, _SweepBar):
                cb.progress.stop()
        print("mmfl: sweep interrupted; run the same command again to resume it", file=sys.stderr)
        return 130
    counts = {k: sum(o.status == k for o in result.outcomes)
              for k in ("completed", "skipped", "failed")}
    print(f"sweep: {len(result.outcomes)} runs in {args.out}: {counts['completed']} completed, "
          f"{counts['skipped']} skipped (finished before), {counts['failed']} failed")
    if result.failures:
        for o in result.failures:
            print(f"  failed: {o.name}: {o.error}", file=sys.stderr)
        print(f"mmfl: error: {len(result.failures)} of {len(result.outcomes)} runs failed "
              "(listed above and in index.json); run the same command again to retry them",
              file=sys.stderr)
        return 1
    return 0


def _running(progress) -> str:
    return ", ".join(f"{n} ({r}/{t})" for n, (r, t) in progress.running.items())


def _eta(progress) -> str:
    return "?" if progress.eta is None else f"{progress.eta:.0f}s"


class _SweepLog:
    """Sweep progress as log lines: one per finished run, and the runs in progress every 30 s."""

    def __init__(self, every: float = 30.0):
        self.every, self.last = every, time.perf_counter()

    def on_start(self, progress):
        pass

    def on_update(self, progress):
        if time.perf_counter() - self.last >= self.every:
            self.last = time.perf_counter()
            log.info("sweep: %d/%d done, ETA %s, running: %s", progress.done, progress.total,
                     _eta(progress), _running(progress))

    def on_run_end(self, progress, outcome):
        if outcome.status == "skipped":
            return
        what = ("failed (see above)" if outcome.status == "failed" else
                f"completed in {outcome.seconds:.1f}s" + (
                    f" (resumed after round {outcome.start_round})" if outcome.start_round else ""))
        log.info("sweep: [%d/%d] %s %s  ETA %s", progress.done, progress.total, outcome.name,
                 what, _eta(progress))

    def on_end(self, progress):
        pass


class _SweepBar:
    """A rich display: the whole sweep (runs done / total, ETA) and a bar per run in progress."""

    def on_start(self, progress):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn)

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("{task.fields[info]}"), transient=False)
        self.progress.start()
        self.total = self.progress.add_task("sweep", total=progress.total, info="")
        self.bars: dict[str, int] = {}
        self._sync(progress)

    def _sync(self, progress):
        p = self.progress
        p.update(self.total, completed=progress.done,
                 info=f"ETA {_eta(progress)}" + (f", {progress.failed} failed"
                                                   if progress.failed else ""))
        for name in [n for n in self.bars if n not in progress.running]:
            p.remove_task(self.bars.pop(name))
        for name, (r, t) in progress.running.items():
            if name not in self.bars:
                self.bars[name] = p.add_task(f"  {name}", total=t, info="")
            p.update(self.bars[name], completed=r, total=t)

    def on_update(self, progress):
        self._sync(progress)

    def on_run_end(self, progress, outcome):
        self._sync(progress)
        if outcome.status == "failed":
            self.progress.console.print(f"[red]failed[/red] {outcome.name}: {outcome.error}")

    def on_end(self, progress):
        self._sync(progress)
        self.progress.stop()

    def __del__(self):
        if hasattr(self, "progress"):
            self.progress.stop()


def _cmd_report(args) -> int:
    from mmfl.experiment.report import write_report

    path = write_report([Path(d) for d in args.dirs], Path(args.out), target=args.target,
                        baseline=args.baseline)
    print(f"report: {path}")
    return 0


def _cmd_flower_local(args) -> int:
    """``mmfl flower-local``: a SuperLink and one SuperNode per client on loopback
    (mmfl.flower.local.LocalDeployment); the processes are stopped whatever happens."""
    from mmfl.flower.local import FlowerRunError, LocalDeployment, Terminated

    cfg = _load(args)
    if not args.out.strip():
        raise ConfigError("--out", "must be a folder path", args.out)
    try:
        with LocalDeployment(cfg, args.out, data_dir=args.data_dir, tls=args.tls, auth=args.auth,
                             round_timeout=args.round_timeout, node_wait=args.node_wait,
                             port=args.port, host=args.host, resume=args.resume,
                             keep_logs=args.keep_logs) as dep:
            if args.prepare_only:
                print(dep.commands())
                print(f"prepared: {dep.dir} (nothing started)")
                return 0
            summary = dep.run(callbacks=[_LogProgress()])  # mmfl run's lines, relayed
    except FlowerRunError as e:
        print(f"mmfl: error: {e}", file=sys.stderr)
        if e.details:
            print(e.details, file=sys.stderr)
        return 1
    except Terminated as e:
        print(f"mmfl: terminated (signal {e.signum}); every Flower process was stopped; "
              "continue with --resume", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("mmfl: interrupted; every Flower process was stopped; continue with --resume",
              file=sys.stderr)
        return 130
    tasks = ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in summary.get("tasks", {}).items())
    print(f"done: {args.out}  mean accuracy {summary.get('mean_accuracy', float('nan')):.4f}  "
          f"min {summary.get('min_accuracy', float('nan')):.4f}  ({tasks})  "
          f"Flower run {dep.run_id}")
    return 0


def _cmd_data(args) -> int:
    from mmfl.tasks.fetch import fetch_main

    print(fetch_main(args.name, args.data_dir))
    return 0


def _cmd_config(args) -> int:
    from mmfl.experiment.example import example_toml

    text = example_toml()
    if args.out:
        try:
            Path(args.out).write_text(text, encoding="utf-8")
        except OSError as e:
            raise ResultsError(f"{args.out}: cannot write ({e.strerror or e})") from None
    else:
        sys.stdout.write(text)
    return 0


def _cmd_components(args) -> int:
    from mmfl import registry

    kinds = [args.kind] if args.kind else list(registry.KINDS)
    for kind in kinds:
        print(f"{kind}s:")
        for name, doc, options in registry.describe(kind):
            print(f"  {name:14s} {doc}")
            for oname, o in options.items():
                rule = f" [{o.check}]" if o.check else ""
                theirs = f" (variant authors: {o.authors!r})" if o.authors is not None else ""
                print(f"      {oname} = {o.default!r}{rule}{theirs}  {o.doc}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
