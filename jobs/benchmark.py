"""Speed, measured side by side in one run: each subcommand prints one JSON object (targets beside figures).

    python jobs/benchmark.py train --preset demo              # samples/s, FLOPs, measured matmul peak, MFU, memory
    python jobs/benchmark.py overhead --preset demo           # bare PyTorch loop vs TorchTrainer(1 worker), A/B/A/B
    python jobs/benchmark.py loader --data data/demo/train    # shard reader vs training speed, ingest wait; RSS 1x, 10x
    python jobs/benchmark.py sampling --preset demo --model runs/<run>/model
    python jobs/benchmark.py convergence --config configs/demo.yaml --steps 1000 --seeds 3 --accuracy-every 500
    python jobs/benchmark.py convergence --against ode --steps 1000 model.shared_depth=7 model.ode_solver=midpoint
    python jobs/benchmark.py convergence --against experts --experts 2 --steps 1500 --branch-at 1000
    python jobs/benchmark.py time-to-quality --steps 1000 --seeds 3  # steps to quality thresholds per recipe
    python jobs/benchmark.py paint --model runs/<run>/model   # paint-with-words: objects landing in the region
    python jobs/benchmark.py serve --model runs/<run>/model   # Serve text-to-image, batching on vs off
    python jobs/benchmark.py overload --model runs/<run>/model  # past its bound: time to a 503, admitted p99
    python jobs/benchmark.py checkpoints --steps 200          # checkpoint stall sync vs async, validation beside
    python jobs/benchmark.py gpu                              # one CUDA GPU, under 8 minutes: coco256 bf16 MFU and
                                                              # sampling, eager and compiled; Ray Train GPU resume

Each command's options: python jobs/benchmark.py <command> --help.
Figures are logged to MLflow (experiment psunet-benchmark): --tracking-uri, else $MLFLOW_TRACKING_URI, else
the local store runs/mlflow.db. No figure here is a test: tests only check that every field is present and positive.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.bench import convergence, quality, speed, system, time_to_quality  # noqa: E402
from jobs.bench.common import NothingMeasured, log_to_mlflow, machine_figures  # noqa: E402
from jobs.tracking import tracking_uri  # noqa: E402

MODULES = (speed, convergence, quality, time_to_quality, system)  # their commands, in this order


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser (this docstring's examples as its epilog) and one sub-command parser per benchmark,
    each with its own options, by name."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    for module in MODULES:
        module.add_commands(commands)
    for command in commands.choices.values():  # main logs every command's figures
        command.add_argument("--tracking-uri", help="MLflow store; default: $MLFLOW_TRACKING_URI, else "
                             "runs/mlflow.db")
    return parser, commands.choices


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """`command [options] [section.field=value ...]`, options and overrides in any order after the command:
    parsed, completed and checked (args.check) by the command's own parser."""
    parser, commands = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in commands:
        parser.parse_args(argv)  # the top-level --help, or the error of a missing or unknown command: it exits
        parser.error("the command comes first: benchmark.py <command> [options]")
    command = commands[argv[0]]
    args = command.parse_intermixed_args(argv[1:], argparse.Namespace(command=argv[0]))
    if args.check:
        args.check(command, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        figures = {"benchmark": args.command, **args.run(args), **machine_figures()}
    except NothingMeasured as exc:  # nothing to log: say why, and that is a success
        print(json.dumps({"benchmark": args.command, **machine_figures(), "message": str(exc)}), flush=True)
        return 0
    except (ValueError, FileNotFoundError) as exc:
        print(f"benchmark: error: {exc}", file=sys.stderr)
        return 2
    figures["mlflow_run_id"] = log_to_mlflow(tracking_uri(args.tracking_uri), args.command, figures)
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
