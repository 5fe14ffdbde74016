"""The `edgeglm` command line.

Every subcommand is real; `edgeglm COMMAND --help` says what it does and shows an
example. Errors of ours print one line and a hint and exit with the error class's
code; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from edgeglm import __version__
from edgeglm.errors import EdgeGLMError

__all__ = ["main"]

Handler = Callable[[argparse.Namespace], int]


def _cmd_train(args: argparse.Namespace) -> int:
    import os

    from edgeglm.distributed import TOPK_TRAIN_DEFAULTS, Optimizer, torchrun_world_size, train_distributed
    from edgeglm.errors import ConfigError
    from edgeglm.training import TrainConfig, train_from_source

    if args.workers < 1:
        raise ConfigError(f"--workers must be ≥ 1, got {args.workers}", hint="pass --workers 2 or more")
    if args.topk is not None and args.workers < 2:
        raise ConfigError(
            f"--topk {args.topk} sparsifies the gradients exchanged between workers, but --workers is {args.workers}",
            hint="add --workers 2 (or more), or drop --topk for single-process training",
        )
    if args.topk_warmup is not None and args.topk is None:
        raise ConfigError(
            f"--topk-warmup {args.topk_warmup} is a warm-up of the Top-k sparsity, but --topk is not given",
            hint="add --topk RATIO, or drop --topk-warmup",
        )
    distributed = args.workers > 1 or torchrun_world_size() is not None
    # Top-k trains with its tuned recipe (TOPK_TRAIN_DEFAULTS); dense keeps TrainConfig's AdamW defaults.
    topk = args.topk is not None
    optimizer = Optimizer(args.optimizer or (TOPK_TRAIN_DEFAULTS.optimizer if topk else Optimizer.ADAMW))
    if optimizer is not Optimizer.ADAMW and not distributed:
        raise ConfigError(
            f"--optimizer {optimizer.value} is for data-parallel training; single-process training uses AdamW",
            hint="add --workers 2 (or more), or drop --optimizer",
        )
    batch_size = TOPK_TRAIN_DEFAULTS.batch_size if topk else TrainConfig.batch_size
    lr = TOPK_TRAIN_DEFAULTS.lr if optimizer is Optimizer.SGD else TrainConfig.lr
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=batch_size if args.batch_size is None else args.batch_size,
        lr=lr if args.lr is None else args.lr,
        weight_decay=TOPK_TRAIN_DEFAULTS.weight_decay if topk else TrainConfig.weight_decay,
        patience=args.patience,
        seed=args.seed,
        threads=args.threads,
    )
    if distributed:
        metrics = train_distributed(
            args.data,
            args.out,
            workers=args.workers,
            topk=args.topk,
            topk_warmup_epochs=TOPK_TRAIN_DEFAULTS.warmup_epochs if args.topk_warmup is None else args.topk_warmup,
            optimizer=optimizer,
            momentum=TOPK_TRAIN_DEFAULTS.momentum,
            model=args.model,
            graph_mode=args.graph,
            window=args.window,
            train_config=cfg,
            subset=args.subset,
            progress=not args.quiet,
        )
        if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
            return 0
        ckpt_path = args.out
    else:
        _, ckpt, metrics = train_from_source(
            args.data,
            args.out,
            model=args.model,
            graph_mode=args.graph,
            window=args.window,
            train_config=cfg,
            subset=args.subset,
            progress=not args.quiet,
        )
        ckpt_path = ckpt.path if ckpt is not None else None
    summary = {k: v for k, v in metrics.items() if k not in ("history", "sparsify")}
    print(json.dumps(summary) if args.json else _format_metrics(summary))
    if ckpt_path is not None and not args.json:
        print(f"checkpoint: {ckpt_path}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from edgeglm.checkpoint import load_checkpoint, load_model
    from edgeglm.data.source import load_source
    from edgeglm.training import evaluate

    ckpt = load_checkpoint(args.checkpoint)
    source = args.data or ckpt.source
    dataset = load_source(source, subset=args.subset)
    missing = [s for s in ckpt.window_spec.sensor_names if s not in dataset.test.sensor_names]
    if missing:
        raise EdgeGLMError(
            f"data {source!r} lacks sensors {missing} that checkpoint {ckpt.path} was trained on",
            hint="evaluate on the data source recorded in the checkpoint (omit --data)",
        )
    model = load_model(ckpt)
    test = evaluate(model, ckpt.window_spec.last_windows(dataset.test))
    out = {
        "checkpoint": str(ckpt.path),
        "data": dataset.name,
        "rmse": test["rmse"],
        "score": test["score"],
        "units": test["n"],
    }
    print(json.dumps(out) if args.json else _format_metrics(out))
    return 0


def _cmd_compress(args: argparse.Namespace) -> int:
    from edgeglm.compress.pipeline import compress_checkpoint

    run = compress_checkpoint(
        args.checkpoint,
        args.out,
        recipe=args.recipe,
        data=args.data,
        seed=args.seed,
        progress=not args.quiet,
        latency_runs=args.latency_runs,
    )
    s = run.summary()
    print(
        f"test RMSE {s['rmse_fp32']:.2f} -> {s['rmse_int8']:.2f} (delta {s['delta_rmse']:+.2f}); "
        f"size {s['size_fp32'] / 1024:.1f} -> {s['size_int8'] / 1024:.1f} KiB (x{s['size_ratio']:.1f}); "
        f"latency b1 x{s['speedup_b1']:.1f}, b64 x{s['speedup_b64']:.1f}"
    )
    print(f"model: {run.model_path}\nreport: {run.out / 'report.md'}")
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from edgeglm.data.factory import simulate_line

    ds = simulate_line(seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    ds.train.to_text(args.out / "train_factory.txt")
    ds.test.to_text(args.out / "test_factory.txt")
    _, end_rul = ds.test_targets()
    (args.out / "RUL_factory.txt").write_text("".join(f"{int(r)}\n" for r in end_rul))
    (args.out / "columns.json").write_text(
        json.dumps(
            {
                "columns": ["unit", "cycle", *ds.train.setting_names, *ds.train.sensor_names],
                "graph_edges": [list(e) for e in ds.graph_edges or ()],
            },
            indent=2,
        )
    )
    print(
        f"wrote {len(ds.train)} train rows ({len(ds.train.units)} units), {len(ds.test)} test rows "
        f"({len(ds.test.units)} units), {len(ds.train.sensor_names)} sensors to {args.out}"
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from edgeglm.demo import run_demo

    return run_demo(args.out, quick=args.quick, seed=args.seed)


def _cmd_devices(args: argparse.Namespace) -> int:
    from edgeglm.devices import list_profiles, profile_dirs

    profiles = list_profiles(args.devices_dir)
    if args.json:
        print(json.dumps([{**p.to_dict(), "source": str(p.source)} for p in profiles]))
        return 0
    rows = [("NAME", "ARCH", "ACCELERATOR", "MEMORY", "BACKENDS", "PRECISIONS")]
    for p in profiles:
        accel = p.accelerator
        accel_text = "none" if accel is None else f"{accel.kind} {accel.compute_capability}"
        if accel is not None and accel.dla_cores:
            accel_text += f", {accel.dla_cores} DLA"
        memory = f"{p.memory_mb // 1024} GB" if p.memory_mb % 1024 == 0 else f"{p.memory_mb} MB"
        rows.append((p.name, p.arch, accel_text, memory, ",".join(p.backends), ",".join(p.precisions)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print(f"\nsearched (first match wins): {', '.join(str(d) for d in profile_dirs(args.devices_dir))}")
    print("one in full: edgeglm devices show NAME")
    return 0


def _cmd_devices_show(args: argparse.Namespace) -> int:
    from edgeglm.devices import load_profile

    profile = load_profile(args.name, [*args.devices_dir, *args.show_devices_dir])
    data = {**profile.to_dict(), "source": str(profile.source) if profile.source else None}
    if args.json or args.show_json:
        print(json.dumps(data))
        return 0
    items: list[tuple[str, object]] = []
    for key, value in data.items():
        if key == "accelerator" and value is not None:
            items += [(f"accelerator.{k}", v) for k, v in value.items()]
        else:
            items.append((key, value))
    width = max(len(k) for k, _ in items)
    for key, value in items:
        if isinstance(value, list):
            text = ", ".join(value)
        elif isinstance(value, float):
            text = f"{value:g}"
        else:
            text = "-" if value is None else str(value)
        print(f"{key:<{width}}  {text}")
    return 0


def _format_metrics(d: dict) -> str:
    width = max(len(k) for k in d)
    lines = []
    for k, v in d.items():
        text = f"{v:.3f}" if isinstance(v, float) else str(v)
        lines.append(f"{k:<{width}}  {text}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeglm",
        description=(
            "EdgeGLM: train graph models for predictive maintenance, compress them, and run them on "
            "Jetson and ARM gateways that sync with the cloud over MQTT."
        ),
        epilog=(
            "Start here:  edgeglm demo        (simulated factory line, end to end)\n"
            "             edgeglm train --data cmapss:/data/cmapss --subset FD001 --out runs/fd001\n"
            "Run 'edgeglm COMMAND --help' for a command's options and an example."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"edgeglm {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    data_help = "data source: 'factory' (embedded simulator, default), 'factory?seed=N', or 'cmapss:FOLDER'"
    p = sub.add_parser(
        "train",
        help="train a model on the simulator or C-MAPSS and write a checkpoint",
        description="Train a reference model with a validation split by unit and early stopping.",
        epilog=(
            "example: edgeglm train --data cmapss:../shared/datasets/cmapss --subset FD001 --out runs/fd001\n"
            "         edgeglm train --data cmapss:../shared/datasets/cmapss --workers 2 --topk 0.001 --out runs/topk"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", default="factory", help=data_help)
    p.add_argument("--subset", help="C-MAPSS subset FD001..FD004 (default: FD001)")
    p.add_argument("--out", type=Path, help="checkpoint folder to write (default: none, metrics only)")
    p.add_argument(
        "--model",
        default="stgnn",
        choices=["stgnn", "stgnn-small", "mlp"],
        help="architecture: the STGNN teacher, a small GNN student, or the graph-free MLP (default: stgnn)",
    )
    p.add_argument(
        "--graph",
        choices=["fixed", "adaptive", "both", "none"],
        help="STGNN sensor mixing: data's graph, learned, both, or none (default: fixed)",
    )
    p.add_argument("--window", type=int, default=30, help="cycles per window (default: 30)")
    p.add_argument("--epochs", type=int, default=60, help="maximum epochs (default: 60)")
    p.add_argument(
        "--batch-size",
        type=int,
        help="windows per step, split over the workers (default: 32 with --topk, else 256)",
    )
    p.add_argument("--lr", type=float, help="peak learning rate (default: 0.02 with --optimizer sgd, else 0.002)")
    p.add_argument("--patience", type=int, default=12, help="early-stopping patience in epochs (default: 12)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--threads", type=int, help="torch threads per worker (default: cores // workers)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="data-parallel worker processes (gloo, DDP); under torchrun, its world size (default: 1)",
    )
    p.add_argument(
        "--topk",
        type=float,
        metavar="RATIO",
        help="send only this fraction of gradient entries between workers, e.g. 0.01 (needs --workers ≥ 2; "
        "default: dense all-reduce). Unless told otherwise Top-k trains with the recipe it was tuned with "
        "(edgeglm.distributed.TOPK_TRAIN_DEFAULTS): sgd with momentum 0.9 carried in the hook (DGC momentum "
        "correction), lr 0.02, batch 32, 0 warm-up epochs",
    )
    p.add_argument(
        "--optimizer",
        choices=["adamw", "sgd"],
        help="optimizer of data-parallel training (default: sgd with --topk, else adamw). Top-k with error "
        "feedback needs SGD with momentum correction: each entry's update arrives late, in one lump, and an "
        "adaptive optimizer fights these delayed residual updates (FD001, top-k 0.1 %%: +0.1 %% test RMSE "
        "over dense with sgd, +39 %% with adamw at batch 256)",
    )
    p.add_argument(
        "--topk-warmup",
        type=int,
        metavar="EPOCHS",
        help="sparsity warm-up: send 25 %% of the entries at first, down to RATIO over EPOCHS epochs (DGC: 4; "
        "default: 0: a short run's warm-up sends more bytes than the rest of the run)",
    )
    p.add_argument("--json", action="store_true", help="print metrics as one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "evaluate",
        help="print test RMSE and PHM08 score of a checkpoint",
        description="Evaluate a checkpoint on the last window of every test unit (the standard protocol).",
        epilog="example: edgeglm evaluate runs/fd001",
    )
    p.add_argument("checkpoint", type=Path, help="checkpoint folder written by 'edgeglm train'")
    p.add_argument("--data", help="data source (default: the one recorded in the checkpoint)")
    p.add_argument("--subset", help="C-MAPSS subset (default: the recorded one)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_evaluate)

    # The parser must build without torch (device commands run on torch-free gateways), so the
    # shipped recipe's path is found without importing edgeglm.compress.
    import importlib.util

    spec = importlib.util.find_spec("edgeglm.compress")
    compress_dir = (
        Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
    )
    DEFAULT_RECIPE = compress_dir / "recipes" / "default.toml" if compress_dir else "compress/recipes/default.toml"

    p = sub.add_parser(
        "compress",
        help="prune, distill, fuse and INT8-quantize a checkpoint by a recipe, with a report",
        description=(
            "Run a compression recipe (TOML) on a trained checkpoint. After every pass the model is "
            "measured (accuracy, size, latency); OUT gets model.onnx, window_spec.json, graph.json and "
            "report.json/.md/.png."
        ),
        epilog=f"example: edgeglm compress runs/fd001 --out runs/fd001-int8\ndefault recipe: {DEFAULT_RECIPE}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", type=Path, help="checkpoint folder written by 'edgeglm train'")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--recipe", type=Path, help="recipe TOML (default: the shipped default recipe)")
    p.add_argument("--data", help="data source (default: the one recorded in the checkpoint)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--latency-runs", type=int, default=200, help="timed runs per latency figure (default: 200)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_compress)

    p = sub.add_parser(
        "simulate",
        help="write the factory-line simulator's data in C-MAPSS text format",
        description="Simulate a factory line to failure and write train/test/RUL files like C-MAPSS's.",
        epilog="example: edgeglm simulate --out data/factory --seed 1",
    )
    p.add_argument("--out", type=Path, required=True, help="folder to write")
    p.add_argument("--seed", type=int, default=0, help="simulator seed (default: 0)")
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser(
        "demo",
        help="run the end-to-end demo on the embedded factory simulator",
        description="Simulate a factory line, train the STGNN teacher and evaluate it (what `make demo` runs).",
        epilog="example: edgeglm demo --out runs/demo",
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="working folder (default: runs/demo)")
    p.add_argument("--quick", action="store_true", help="a short run for tests (fewer units and epochs)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=_cmd_demo)

    devices_dir_help = (
        "folder of your own profile TOML files, searched before $EDGEGLM_DEVICES and the shipped ones (repeatable)"
    )
    p = sub.add_parser(
        "devices",
        help="list the device profiles (Jetson, Raspberry Pi, generic ARM/x86) a bundle can target",
        description=(
            "List the device profiles (without ACTION), or show one. A profile is a TOML file saying what a\n"
            "device is (arch, CPU, memory, GPU, JetPack and TensorRT versions) and how EdgeGLM runs on it\n"
            "(backends in order of preference, precisions, threads, health-check latency budget).\n\n"
            "Profiles are searched in the --devices-dir folders, then in $EDGEGLM_DEVICES (folders separated\n"
            "by ':'), then among the shipped ones; the first file named NAME.toml wins, so your profile\n"
            "overrides a shipped one of the same name."
        ),
        epilog=(
            "examples: edgeglm devices\n"
            "          edgeglm devices show jetson-orin-nano-8gb\n"
            "          edgeglm devices --devices-dir ./my-devices --json\n"
            "add a device: copy a shipped profile (its path is the 'source' line of 'edgeglm devices show "
            'NAME\')\nto a folder of yours as NEWNAME.toml, set name = "NEWNAME", edit the figures, and pass '
            "the folder\nwith --devices-dir or EDGEGLM_DEVICES."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--devices-dir", type=Path, action="append", default=[], metavar="DIR", help=devices_dir_help)
    p.add_argument("--json", action="store_true", help="print one JSON array of profiles")
    p.set_defaults(func=_cmd_devices)
    devices_sub = p.add_subparsers(dest="devices_command", metavar="ACTION")
    q = devices_sub.add_parser(
        "show",
        help="print one profile in full, with the file it came from",
        description="Print every field of one device profile and the file it was loaded from.",
        epilog="example: edgeglm devices show raspberry-pi-5\n         edgeglm devices show ./my-devices/press-07.toml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument("name", metavar="NAME", help="profile name (see 'edgeglm devices') or path to a .toml file")
    q.add_argument(
        "--devices-dir",
        dest="show_devices_dir",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help=devices_dir_help,
    )
    q.add_argument("--json", dest="show_json", action="store_true", help="print one JSON object")
    q.set_defaults(func=_cmd_devices_show)

    from edgeglm import cli_cloud, cli_deploy, cli_edge

    cli_deploy.register(sub, devices_dir_help)
    cli_edge.register(sub)
    cli_cloud.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    handler: Handler = args.func
    try:
        return handler(args)
    except EdgeGLMError as exc:
        if args.debug:
            raise
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
