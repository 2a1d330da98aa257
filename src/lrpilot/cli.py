"""``lrpilot ...``: argument handling only; every command is a call into the library.

The choices of ``--task`` and ``--method`` come from the registries, so a newly registered method is a
valid choice with no change here.
"""

from __future__ import annotations

import argparse
import ast
import logging
import math
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]


def _parse_option(text: str) -> tuple[str, Any]:
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
    if args.what == "tasks":
        from lrpilot.bench.tasks import list_tasks

        for task in list_tasks():
            print(f"{task.name}\t{task.description}")
    else:
        from lrpilot.registry import list_methods

        for info in list_methods():
            print(f"{info.name}\t{info.description}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from lrpilot.bench.tasks import run_task
    from lrpilot.loop.history import save_record

    _check_device(args.device)
    record = run_task(
        args.task,
        args.method,
        epochs=args.epochs,
        seed=args.seed,
        device=args.device,
        batch_size=args.batch_size,
        train_subset=args.train_subset,
        data_dir=args.data_dir,
        progress=None if not args.quiet else False,
        method_options=_method_options(args),
    )
    if args.out:
        save_record(record, args.out)
    s = record["summary"]
    metric = record["metric"]["name"]
    print(
        f"{args.task} {args.method} seed={args.seed}: best {metric} {_fmt(s['best_val_metric'])}, "
        f"final {_fmt(s['final_val_metric'])}, {s['epochs']} epochs, {s['steps']} steps, "
        f"{s['wall_s']:.1f} s, {s['status']}" + (f" -> {args.out}" if args.out else "")
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Interim main job: one small task, a few methods, a comparison table."""
    from lrpilot.bench.tasks import run_task

    rows = []
    for method in args.methods.split(","):
        record = run_task(args.task, method, seed=args.seed, progress=False)
        s = record["summary"]
        rows.append((method, s["best_val_metric"], s["final_val_metric"], s["epochs"], s["wall_s"], s["status"]))
        print(f"  {method:<12} done in {s['wall_s']:.1f} s", file=sys.stderr)
    print(f"\n{args.task}, seed {args.seed} (validation accuracy)")
    print(f"{'method':<12} {'best':>7} {'final':>7} {'epochs':>6} {'wall_s':>7}  status")
    for method, best, final, epochs, wall, status in sorted(rows, key=lambda r: -_key(r[1])):
        print(f"{method:<12} {_fmt(best):>7} {_fmt(final):>7} {epochs:>6} {wall:>7.1f}  {status}")
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


def _key(value: float | None) -> float:
    return -math.inf if value is None or not math.isfinite(value) else value


def _fmt(value: float | None) -> str:
    return "nan" if value is None or not math.isfinite(value) else f"{value:.4f}"


def build_parser() -> argparse.ArgumentParser:
    from lrpilot import __version__
    from lrpilot.bench.tasks import task_names
    from lrpilot.registry import method_names

    parser = argparse.ArgumentParser(prog="lrpilot", description="Learning-rate autopilots for PyTorch, and their bench.")
    parser.add_argument("--version", action="version", version=f"lrpilot {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every decision")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list tasks or methods, one per line: name<TAB>description")
    p.add_argument("what", choices=["tasks", "methods"])
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("train", help="train one method on one task and write its run record")
    p.add_argument("--task", required=True, choices=task_names(), metavar="TASK", help="see `lrpilot list tasks`")
    p.add_argument("--method", required=True, choices=method_names(), metavar="METHOD", help="see `lrpilot list methods`")
    p.add_argument("--epochs", type=int, help="budget in epochs (default: the task's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, help="the method's (initial) LR")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--train-subset", type=int, help="train on the first N training samples")
    p.add_argument("--data-dir", help="Fashion-MNIST folder (default /usr/share/datasets/fashion-mnist)")
    p.add_argument("-o", "--option", type=_parse_option, action="append", metavar="KEY=VALUE",
                   help="a method option, e.g. -o momentum=0.0 (repeatable)")
    p.add_argument("--out", help="write the run record (JSON) here")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="the main job: train a small task with a few methods, print a table")
    p.add_argument("--task", default="mnist1d-mlp", choices=task_names(), metavar="TASK")
    p.add_argument("--methods", default="sgd,sgd-cosine,onecycle,adam,plateau")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder (unused until the bench lands)")
    p.set_defaults(func=cmd_demo)

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
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
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
