"""The `prunedrive` command line."""
from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

from agents.registry import AGENTS, make_agent
from harness.results import RunDir
from scenarios.loader import ScenarioError, load_suite


def cmd_run(args: argparse.Namespace) -> int:
    from harness.runner import run_suite
    from harness.summary import print_tables

    _check_mlflow(args)
    suite = load_suite(args.suite)
    if args.seeds:
        suite = _with_seeds(suite, args.seeds)
    names = args.agent or ["expert"]
    if args.carla_servers and not args.workers:
        raise ValueError("--carla-servers needs --workers (one server per worker); "
                         "for one server use --carla-host/--carla-port")
    if args.workers:  # agents (and their models) are built in the workers; check the options here
        from harness.distributed import specs_from_args

        specs = specs_from_args(args)
        for spec in specs:
            spec.check()
    else:
        agents = [make_agent(name, args.model) for name in names]
    config = {"suite": suite.name, "suite_path": str(suite.path), "agents": names,
              "model": str(args.model) if args.model else None, "seeds": args.seeds, "record": args.record}
    if args.resume:
        run_dir = RunDir(_resolve_run(args.resume, args.out))
        previous = run_dir.manifest()["config"]
        if (previous["suite"], previous["agents"], previous.get("model")) != (suite.name, names, config["model"]):
            print(f"error: {run_dir.path} was run with suite={previous['suite']} agents={previous['agents']} "
                  f"model={previous.get('model')}; resume it with the same options", file=sys.stderr)
            return 2
    else:
        run_id = args.run_id or f"{suite.name}-{'-'.join(names)}-{datetime.now():%Y%m%d-%H%M%S}"
        run_dir = RunDir(Path(args.out) / run_id)
        planned = [f"{a}/{s.name}/{seed}" for a in names for s, seed in suite.episodes()]
        run_dir.create(config, planned)
    backend_options = {k: v for k, v in (("host", args.carla_host), ("port", args.carla_port)) if v is not None}
    if args.workers:  # Ray only when asked for
        from harness.distributed import run_suite_distributed

        episodes = run_suite_distributed(suite, specs, run_dir, args.workers,
                                         ray_address=args.ray_address, record=args.record, retries=args.retries,
                                         progress=not args.quiet, backend_options=backend_options,
                                         carla_servers=args.carla_servers)
    else:
        episodes = run_suite(suite, agents, run_dir, record=args.record, retries=args.retries,
                             progress=not args.quiet, backend_options=backend_options)
    print_tables(episodes)
    print(f"results: {run_dir.path}")
    if args.mlflow is not None:
        from harness.mlflow_log import log_run

        log_run(run_dir, args.mlflow)
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from harness.summary import print_tables

    episodes = RunDir(_resolve_run(args.run, args.out)).episodes()
    if episodes.empty:
        print(f"error: {args.run} has no finished episodes", file=sys.stderr)
        return 2
    print_tables(episodes)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from models.train import cmd_train as train

    train(args.preset, out_dir=args.out, data_dir=args.data, seed=args.seed, resume=not args.no_resume,
          threads=args.threads)
    return 0


def cmd_eval_open(args: argparse.Namespace) -> int:
    from models.eval_open import cmd_eval_open as evaluate

    evaluate(args.model, split_dir=args.data, max_samples=args.max_samples, with_random=not args.no_random)
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from models.compress import prune_model_dir

    record = prune_model_dir(args.model, args.method, args.sparsity, args.out, pattern=args.pattern, scope=args.scope,
                             calibration=args.calibration, n_calibration=args.calibration_samples,
                             data_dir=args.data, seed=args.seed)
    print(f"{args.method}: global sparsity {record['global']:.3f} (language model {record['lm_global']:.3f}) -> {args.out}")
    if record.get("layer_sparsities"):
        print("per-block sparsities: " + ", ".join(f"{s:.3f}" for s in record["layer_sparsities"]))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from harness.bench import run_bench

    _check_mlflow(args)
    run_bench(args.suite, args.preset, args.methods, args.sparsities, Path(args.out), args.run_id,
              progress=not args.quiet, workers=args.workers, mlflow=args.mlflow)
    return 0


def _check_mlflow(args: argparse.Namespace) -> None:
    if args.mlflow is not None:  # before any driving or training: a missing MLflow should cost nothing
        from harness.mlflow_log import require_mlflow

        require_mlflow(args.mlflow)


def _resolve_run(run: str, out: str) -> Path:
    path = Path(run)
    if not path.is_dir():
        path = Path(out) / run
    if not (path / "manifest.json").is_file():
        raise FileNotFoundError(f"{run}: no run directory with a manifest.json (looked in {run} and {path})")
    return path


def _threads(value: str) -> int | str:
    if value == "auto":
        return value
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise argparse.ArgumentTypeError(f"{value!r}: a positive integer or 'auto'")


def _with_seeds(suite, seeds: list[int]):
    from dataclasses import replace

    return replace(suite, scenarios=tuple(replace(s, seeds=tuple(seeds)) for s in suite.scenarios))


def _add_mlflow_option(parser: argparse.ArgumentParser) -> None:
    # const "" (a bare --mlflow) stands for the default store, which depends on the run's output folder.
    parser.add_argument("--mlflow", nargs="?", const="", metavar="URI",
                        help="log the finished run to MLflow, one MLflow run per agent; default store "
                             "sqlite:///<out>/mlflow.db (needs the mlflow extra)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunedrive", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="drive a scenario suite closed-loop and score it")
    run.add_argument("--suite", default="smoke", help="suite name (a YAML in scenarios/) or path; default smoke")
    run.add_argument("--agent", action="append", choices=AGENTS, help="repeat to run several; default expert")
    run.add_argument("--model", help="model directory for --agent llm")
    run.add_argument("--seeds", type=int, nargs="+", help="override every scenario's seeds")
    run.add_argument("--out", default="results", help="where run directories go; default results/")
    run.add_argument("--run-id", help="name of the run directory; default suite-agents-timestamp")
    run.add_argument("--resume", metavar="RUN", help="finish a killed run (its id or directory)")
    run.add_argument("--record", action="store_true", help="write an mp4 per episode under videos/")
    run.add_argument("--retries", type=int, default=2, help="retries of an episode whose simulator failed")
    run.add_argument("--carla-host", help="CARLA server host (carla suites)")
    run.add_argument("--carla-port", type=int, help="CARLA server RPC port (carla suites)")
    run.add_argument("--workers", type=int, help="run episodes on this many Ray actors")
    run.add_argument("--carla-servers", nargs="+", metavar="HOST:PORT",
                     help="one CARLA server per worker (with --workers); worker i always uses server i")
    run.add_argument("--ray-address", help="an existing Ray cluster (default: a local Ray for the run)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_mlflow_option(run)
    run.set_defaults(func=cmd_run)

    train = sub.add_parser("train", help="train the driving LLM on expert data (CPU)")
    train.add_argument("--preset", default="small", help="tiny | small (default) | base")
    train.add_argument("--out", help="model directory; default the model zoo (~/.cache/prunedrive or $PRUNEDRIVE_HOME)")
    train.add_argument("--data", help="dataset directory; default <out>/data (built when missing)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--no-resume", action="store_true", help="start over instead of resuming a checkpoint")
    train.add_argument("--threads", type=_threads, default=2,
                       help="torch CPU threads (default 2); the trained model depends on it. 'auto' picks the "
                            "faster of 1 and 2 as the machine's load changes: quicker when busy, not reproducible")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("eval-open", help="open-loop metrics of a model on the held-out split")
    evaluate.add_argument("--model", help="model directory; default the zoo's small model")
    evaluate.add_argument("--data", help="dataset directory with val.parquet; default the model's training data")
    evaluate.add_argument("--max-samples", type=int, default=400)
    evaluate.add_argument("--no-random", action="store_true", help="skip the random-weights contrast")
    evaluate.set_defaults(func=cmd_eval_open)

    prune = sub.add_parser("prune", help="prune a model directory into a new one (+ sparsity.json)")
    prune.add_argument("--method", required=True, choices=("owl", "wanda", "magnitude", "sparsegpt", "dg2pf"))
    prune.add_argument("--sparsity", type=float, help="target sparsity, e.g. 0.7 (implied by --pattern)")
    prune.add_argument("--pattern", help="N:M semi-structured, e.g. 2:4 or 4:8")
    prune.add_argument("--model", required=True, help="dense model directory")
    prune.add_argument("--out", required=True, help="output model directory")
    prune.add_argument("--scope", default="lm", choices=("lm", "all"), help="language model only, or the encoder too")
    prune.add_argument("--calibration", default="driving", choices=("driving", "generic"))
    prune.add_argument("--calibration-samples", type=int, default=64)
    prune.add_argument("--data", help="dataset directory; default the one the model was trained on")
    prune.add_argument("--seed", type=int, default=0)
    prune.set_defaults(func=cmd_prune)

    bench = sub.add_parser("bench", help="the main job: dense vs OWL/DG2PF/Wanda/magnitude, closed- and open-loop")
    bench.add_argument("--suite", default="smoke", help="smoke (default) or standard, or a path")
    bench.add_argument("--preset", default="small")
    bench.add_argument("--methods", nargs="+", default=["owl", "dg2pf", "wanda", "magnitude"],
                       choices=("owl", "dg2pf", "wanda", "magnitude", "sparsegpt"))
    bench.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.7])
    bench.add_argument("--out", default="results")
    bench.add_argument("--run-id", help="default bench-<suite>-<preset>; an existing one is resumed")
    bench.add_argument("--workers", type=int, help="drive the episodes on this many Ray actors")
    bench.add_argument("--quiet", action="store_true")
    _add_mlflow_option(bench)
    bench.set_defaults(func=cmd_bench)

    from harness.regress import add_regress_parser
    from harness.report import add_report_parser

    add_report_parser(sub)
    add_regress_parser(sub)

    summary = sub.add_parser("summary", help="print the tables of a finished or partial run")
    summary.add_argument("run", help="run id or directory")
    summary.add_argument("--out", default="results")
    summary.set_defaults(func=cmd_summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ScenarioError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
