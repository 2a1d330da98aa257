"""``lrpilot ...``: argument handling only; every command is a call into the library.

The choices of ``--task`` and ``--method`` come from the registries, so a newly registered method is a
valid choice with no change here.
"""

from __future__ import annotations

import argparse
import ast
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]


def parse_option(text: str) -> tuple[str, Any]:
    """``key=value`` with ``value`` read as a Python literal when it is one (``0.1``, ``True``, ``(0.5, 0.75)``)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"method options are key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key.strip(), value


def _method_options(args: argparse.Namespace) -> dict[str, Any]:
    options = dict(args.option or [])
    if getattr(args, "lr", None) is not None:
        options["lr"] = args.lr
    return options


def _check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(
            f"lrpilot: --device {device} but torch sees no CUDA device (torch {torch.__version__}); "
            "install a CUDA build of torch (see the README) or use --device cpu"
        )


def cmd_list(args: argparse.Namespace) -> int:
    if args.what == "suites":
        from lrpilot.bench.suites import list_suites

        for suite in list_suites():
            print(f"{suite.name}\t{suite.description}")
    elif args.what == "tasks":
        from lrpilot.bench.tasks import list_tasks

        for task in list_tasks():
            print(f"{task.name}\t{task.description}")
    else:
        from lrpilot.core.registry import list_methods

        for info in list_methods():
            print(f"{info.name}\t{info.description}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from lrpilot.bench.tasks import run_task
    from lrpilot.core import distributed as dist
    from lrpilot.loop.history import save_record

    _check_device(args.device)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # processes started by --nproc inherit it
    kwargs = dict(
        epochs=args.epochs,
        seed=args.seed,
        device=args.device,
        batch_size=args.batch_size,
        train_subset=args.train_subset,
        data_dir=args.data_dir,
        progress=None if not args.quiet else False,
        method_options=_method_options(args),
        safety_net=args.safety_net or None,
        adversarial=dict(args.adv_option or []) if args.adversarial or args.adv_option else None,
    )
    under_torchrun = dist.init_from_env()
    if args.nproc > 1:
        if under_torchrun:
            raise ValueError("--nproc starts its own processes: drop it when launching with torchrun")
        backend = "nccl" if args.device.startswith("cuda") else "gloo"
        kwargs["progress"] = False
        record = dist.launch(run_task, args.nproc, args.task, args.method, backend=backend, **kwargs)[0]
    else:
        record = run_task(args.task, args.method, **kwargs)
        if not dist.is_main_process():
            return 0  # only rank 0 writes the record and reports
    if args.out:
        save_record(record, args.out)
    s = record["summary"]
    metric = record["metric"]["name"]
    print(
        f"{args.task} {args.method} seed={args.seed}: best {metric} {_fmt(s['best_val_metric'])}, "
        f"final {_fmt(s['final_val_metric'])}, {s['epochs']} epochs, {s['steps']} steps, "
        f"{s['wall_s']:.1f} s, {s['status']}"
        + (f", {sum(d['action'] == 'rollback' for d in record['decisions'])} rollbacks" if args.safety_net else "")
        + (f" -> {args.out}" if args.out else "")
    )
    adv = [e["extra"]["adv_val_metric"] for e in record["epochs"] if e["extra"].get("adv_val_metric") is not None]
    if adv:
        final_adv = record["final"].get("adv_val_metric", adv[-1])
        print(f"  adversarial (PGD) {metric}: best {_fmt(max(adv) if record['metric']['higher_is_better'] else min(adv))}, "
              f"final {_fmt(final_adv)}")
    fg = [e["extra"]["fgsm_val_metric"] for e in record["epochs"] if e["extra"].get("fgsm_val_metric") is not None]
    if fg:
        print(f"  adversarial (FGSM) {metric}: best {_fmt(max(fg) if record['metric']['higher_is_better'] else min(fg))}, "
              f"final {_fmt(record['final'].get('fgsm_val_metric', fg[-1]))}")
    return 0


def _names(text: str | None) -> list[str] | None:
    """``a,b,c`` -> ``["a", "b", "c"]`` (``None`` stays ``None``)."""
    if text is None:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ValueError(f"expected a comma-separated list, got {text!r}")
    return names


def _seeds(text: str | None) -> list[int] | None:
    names = _names(text)
    if names is None:
        return None
    try:
        return [int(s) for s in names]
    except ValueError:
        raise ValueError(f"--seeds takes comma-separated integers, got {text!r}") from None


def cmd_bench(args: argparse.Namespace) -> int:
    from lrpilot.bench.runner import bench

    _check_device(args.device)
    done = bench(
        args.suite,
        args.out,
        methods=_names(args.methods),
        tasks=_names(args.tasks),
        seeds=_seeds(args.seeds),
        workers=args.workers,
        threads=args.threads,
        executor=args.executor,
        address=args.address,
        isolate=getattr(args, "isolate", False),
        retry_failed=args.retry_failed,
        timeout=args.timeout,
        imports=args.imports or (),
        device=args.device,
        data_dir=args.data_dir,
        report=not args.no_report,
        argv=getattr(args, "argv", None),
    )
    _print_board(done.leaderboard)
    print(f"\n{done.result.summary()}")
    for spec, error in done.result.failed:
        print(f"  failed: {spec.describe()}: {error.splitlines()[0] if error else ''}")
    print(f"results: {done.result.out / 'bench.sqlite'}")
    if done.report is not None:
        print(f"report:  {done.report}")
    return 0


def _print_board(board: Any) -> None:
    """Per-task details first, then what a user reads first: the verdict and the score table, last on
    the terminal."""
    from lrpilot.bench.verdict import verdict_of

    print(board.to_text(scores=False))
    print()
    print(verdict_of(board).to_text())


def cmd_range_test(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from lrpilot.bench.range_test import range_test_task

    _check_device(args.device)
    report = range_test_task(
        args.task, method=args.method, seed=args.seed, device=args.device, batch_size=args.batch_size,
        train_subset=args.train_subset, data_dir=args.data_dir, options=dict(args.option or []),
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1, allow_nan=False))
    rt, cost = report["range_test"], report["search"]
    print(f"{'lr':>9} {'runs':>4} {'crash':>5} {'min d_s':>8} {'final ' + rt['attribute']:>14} {'d1n':>8} {'dnn':>8}")
    for row in rt["table"]:
        print(f"{row['lr']:>9.3g} {row['runs']:>4} {row['crashed']:>5} {row['min_d_s']:>8.4f} "
              f"{_fmt(row['final_' + rt['attribute']]):>14} {_fmt(row['d1n']):>8} {_fmt(row['dnn']):>8}")
    if rt["crashed"]:
        print(f"crashed: {', '.join(f'{lr:g}' for lr in rt['crashed'])}")
    print(
        f"{args.task} seed={args.seed}: lr_min {rt['lr_min']:g}, lr_max {rt['lr_max']:g}, lr_top {rt['lr_top']:g}, "
        f"epsilon {rt['epsilon']:.4g} ({cost['total_epochs']} epochs, {cost['total_steps']} steps, "
        f"{cost['total_train_s']:.1f} s)" + (f" -> {args.out}" if args.out else "")
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The quick suite (``lrpilot bench --suite quick``)."""
    args.suite, args.methods, args.tasks, args.seeds = "quick", None, None, None
    args.retry_failed, args.timeout, args.imports, args.no_report = False, None, None, False
    args.executor, args.address, args.threads = "local", None, None
    args.device, args.data_dir = "cpu", None
    return cmd_bench(args)


def cmd_report(args: argparse.Namespace) -> int:
    from lrpilot.bench.leaderboard import leaderboard_from_store, load_targets
    from lrpilot.bench.report import write_report
    from lrpilot.bench.store import Store

    targets = load_targets(args.targets) if args.targets else None
    path = write_report(args.dir, targets=targets, reference=args.reference, everything=args.all)
    with Store.open(args.dir) as store:
        info = store.invocations()[-1]["suite_info"] if store.invocations() else {}
        board = leaderboard_from_store(store, targets, reference=args.reference or info.get("reference", "sgd"),
                                       suite=info.get("name", ""), keys=None if args.all else store.plan_keys())  # fmt: skip
    _print_board(board)
    print(f"\nreport: {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lrpilot.bench.store import DB_NAME, Store

    if not (Path(args.dir) / DB_NAME).exists():
        raise FileNotFoundError(f"{args.dir}: no {DB_NAME} here")
    with Store.open(args.dir) as store:
        for path in store.export_csv(args.to or Path(args.dir) / "csv"):
            print(path)
    return 0


def cmd_score_algoperf(args: argparse.Namespace) -> int:
    from lrpilot.bench.algoperf import (
        Workloads,
        read_evaluations,
        score_evaluations,
        thin_for_scoring,
        write_compact,
    )

    workloads = Workloads.from_files(args.workloads, args.held_out) if args.workloads else Workloads.v05()
    evaluations = read_evaluations(args.path, workloads)
    result = score_evaluations(evaluations, workloads, trial_rule=args.trial_rule)
    print(result.to_text())
    if args.write_compact:
        path = write_compact(thin_for_scoring(evaluations, workloads), args.write_compact)
        print(f"compact copy: {path}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from lrpilot.bench.calibrate import calibrate, default_targets_path, describe_targets, recompute_targets

    if args.recompute:
        if args.out and not Path(args.out).exists():
            raise ValueError(f"--recompute rewrites an existing targets file; {args.out} does not exist")
        data = recompute_targets(args.out, quantile=args.quantile, tasks=_names(args.tasks))
    else:
        data = calibrate(
            tasks=_names(args.tasks),
            seeds=_seeds(args.seeds) or (0, 1, 2),
            methods=_names(args.methods),
            store_dir=args.store,
            targets_path=args.out,
            workers=args.workers,
            data_dir=args.data_dir,
            quantile=args.quantile,
        )
    print(describe_targets(data))
    print(f"targets: {args.out or default_targets_path()}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    """Reproduce a paper's tables (``lrpilot reproduce lipschitz``)."""
    if args.paper == "lipschitz":
        from lrpilot.bench.reproduce_lipschitz import format_tables, reproduce

        scalings = ("sum-to-one", "raw") if args.scaling == "both" else (args.scaling,)
        datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
        table1, table2 = reproduce(
            datasets, scalings=scalings, max_epochs=args.max_epochs, table2_epochs=args.table2_epochs, seed=args.seed
        )
        print(format_tables(table1, table2))
    return 0


def _fmt(value: float | None) -> str:
    return "nan" if value is None or not math.isfinite(value) else f"{value:.4f}"


def build_parser() -> argparse.ArgumentParser:
    from lrpilot._version import __version__
    from lrpilot.bench.tasks import task_names
    from lrpilot.core.registry import RANGE_TEST_TAG, list_methods, method_names

    parser = argparse.ArgumentParser(prog="lrpilot", description="Learning-rate autopilots for PyTorch, and their bench.")
    parser.add_argument("--version", action="version", version=f"lrpilot {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every decision")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list tasks, methods or suites, one per line: name<TAB>description")
    p.add_argument("what", choices=["tasks", "methods", "suites"])
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("train", help="train one method on one task and write its run record")
    p.add_argument("--task", required=True, choices=task_names(), metavar="TASK", help="see `lrpilot list tasks`")
    p.add_argument("--method", default="auto", choices=method_names(), metavar="METHOD",
                   help="see `lrpilot list methods` (default: auto, lrpilot's own autopilot)")
    p.add_argument("--epochs", type=int, help="budget in epochs (default: the task's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch threads (per process with --nproc; default: torch's); the bench runs with 1")
    p.add_argument("--lr", type=float, help="the method's (initial) LR")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--train-subset", type=int, help="train on the first N training samples")
    p.add_argument("--data-dir", help="Fashion-MNIST folder (default /usr/share/datasets/fashion-mnist)")
    p.add_argument("-o", "--option", type=parse_option, action="append", metavar="KEY=VALUE",
                   help="a method option, e.g. -o momentum=0.0 (repeatable)")
    p.add_argument("--safety-net", action="store_true",
                   help="checkpoint the best epoch; on a non-finite or exploding loss roll back to it and halve the LR")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train data-parallel in N local processes (torch.distributed: gloo on CPU, NCCL on GPU); "
                        "--batch-size stays the global batch. Leave it out under torchrun")
    p.add_argument("--out", help="write the run record (JSON) here")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--adversarial", action="store_true",
                   help="FGSM training, PGD-scored validation (epsilon 8/255, PGD-10 step 2/255, raw data units)")
    p.add_argument("--adv-option", type=parse_option, action="append", metavar="KEY=VALUE",
                   help="an adversarial option (implies --adversarial), e.g. --adv-option eval_samples=2000")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("range-test", help="the MI LR range test (Vasudevan 2020, Algorithm 2): LR bounds for mi-decay")
    p.add_argument("--task", required=True, choices=task_names(), metavar="TASK", help="see `lrpilot list tasks`")
    range_tested = [info.name for info in list_methods(tags=[RANGE_TEST_TAG])]
    p.add_argument("--method", default=range_tested[0], choices=range_tested)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--train-subset", type=int, help="train on the first N training samples")
    p.add_argument("--data-dir", help="Fashion-MNIST folder (default /usr/share/datasets/fashion-mnist)")
    p.add_argument("-o", "--option", type=parse_option, action="append", metavar="KEY=VALUE",
                   help="a range-test option of mi-decay, e.g. -o rrt_trials=3 -o 'rrt_lrs=(0.01,0.1)' -o c2=0.01")
    p.add_argument("--out", help="write the result (bounds, table D, every trial, cost) as JSON here")
    p.set_defaults(func=cmd_range_test)

    p = sub.add_parser("bench", help="run a suite (resumable), print the leaderboard, write DIR/report.html")
    p.add_argument("--suite", required=True, help="a shipped suite (`lrpilot list suites`) or a suite .json file")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder: bench.sqlite, report.html, figures/, logs/")
    p.add_argument("--workers", type=int, help="runs at a time (default: the cores available; on a Ray cluster: no cap)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch threads per run (default 1, whatever --workers: the count changes a run's result)")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: a process pool on this machine (default); ray: Ray tasks (pip install 'lrpilot[ray]')")
    p.add_argument("--address", metavar="ADDR",
                   help="with --executor ray: the cluster to join, `auto` or ray://HOST:10001 (default: a local Ray instance)")
    p.add_argument("--isolate", action="store_true",
                   help="a fresh worker process for every run (default: workers are reused, with the same results)")
    p.add_argument("--methods", help="comma-separated methods (labels or registry names) of the suite to run")
    p.add_argument("--tasks", help="comma-separated tasks of the suite to run")
    p.add_argument("--seeds", help="comma-separated seeds (replace the suite's)")
    p.add_argument("--retry-failed", action="store_true", help="run again the runs stored as failed")
    p.add_argument("--timeout", type=float, metavar="S", help="kill a run after S seconds and record it as failed")
    p.add_argument("--import", dest="imports", action="append", metavar="MODULE",
                   help="a module registering extra methods or tasks, imported here and in every worker (repeatable)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--data-dir", help="Fashion-MNIST folder (default /usr/share/datasets/fashion-mnist)")
    p.add_argument("--no-report", action="store_true", help="skip report.html")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="the quick suite: same as `lrpilot bench --suite quick --out DIR`")
    p.add_argument("--out", default="runs/demo", metavar="DIR")
    p.add_argument("--workers", type=int, help="runs at a time (default: the cores available)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("report", help="write DIR/report.html from a bench's results store and print the leaderboard")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--targets", help="a targets.json to score against (default: the shipped one)")
    p.add_argument("--reference", help="the method overheads are measured against (default: the suite's, sgd)")
    p.add_argument("--all", action="store_true", help="every run in the store, not only the latest bench's plan")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="export a bench's results store as CSV files (one per table)")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--to", metavar="FOLDER", help="where the CSV files go (default DIR/csv)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("score-algoperf", help="score AlgoPerf's own logs (a log folder or a compact CSV)")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--workloads", help="AlgoPerf's workload_targets_*.json (default: v0.5, shipped)")
    p.add_argument("--held-out", help="held-out workloads list (JSON), with --workloads")
    p.add_argument("--write-compact", metavar="CSV[.gz]", help="also write the evaluations scoring needs as a compact CSV")
    p.add_argument("--trial-rule", choices=["eval-index", "fastest"], default="eval-index",
                   help="which trial of a study counts when it has several (external tuning): eval-index (default, "
                        "AlgoPerf v0.5's scoring code): the trial whose first target hit has the smallest evaluation "
                        "index, at that trial's time; fastest (AlgoPerf's rules document): the smallest time to target")
    p.set_defaults(func=cmd_score_algoperf)

    p = sub.add_parser("calibrate", help="set each task's validation target from the tuned baselines (docs/bench.md#targets)")
    p.add_argument("--tasks", help="comma-separated tasks (default: every task whose data is here)")
    p.add_argument("--seeds", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--methods", help="comma-separated methods (default: those tagged `tuned`, else sgd-cosine)")
    p.add_argument("--store", default="runs/calibrate", metavar="DIR", help="results store of the calibration runs")
    p.add_argument("--out", help="targets file to write (default: the one lrpilot ships)")
    p.add_argument("--workers", type=int)
    p.add_argument("--data-dir")
    p.add_argument("--quantile", type=float, default=0.0, metavar="Q",
                   help="per tuned baseline, the Q quantile of its per-seed bests counted from the worst seed; the target "
                        "is the best of these (default 0: the worst seed's best, reached by the reference in every "
                        "calibration seed; 0.5: AlgoPerf's median)")
    p.add_argument("--recompute", action="store_true",
                   help="run nothing: apply the rule to the per-seed bests the targets file records (--tasks: only those)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("reproduce", help="reproduce a paper's experiments and print them beside its numbers")
    p.add_argument("paper", choices=["lipschitz"], help="lipschitz: Yedida & Saha, Tables 1 and 2 (classical models)")
    p.add_argument("--datasets", default="iris,digits,breast_cancer,diabetes", help="comma-separated")
    p.add_argument("--scaling", choices=["sum-to-one", "raw", "both"], default="both",
                   help="feature scaling: the paper's stated sum-to-one, none, or both (default)")
    p.add_argument("--max-epochs", type=int, default=100_000, help="Table 1: give up after this many epochs")
    p.add_argument("--table2-epochs", type=int, help="Table 2: N_E for every data set (default: the paper's)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_reproduce)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = ["lrpilot", *(sys.argv[1:] if argv is None else argv)]  # recorded with a bench invocation
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if not sys.stderr.isatty():
        # No progress bar off a terminal: the per-trial lines of long searches (range test, grid search)
        # are INFO records of the "lrpilot" logger; show them so a job log is never silent for minutes.
        logging.getLogger("lrpilot").setLevel(logging.INFO)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as err:
        # Errors a user can act on: one line, no traceback (LRPILOT_DEBUG=1 shows it).
        import os

        if os.environ.get("LRPILOT_DEBUG"):
            raise
        print(f"lrpilot: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
