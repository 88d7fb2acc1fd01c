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

    suite = load_suite(args.suite)
    if args.seeds:
        suite = _with_seeds(suite, args.seeds)
    names = args.agent or ["expert"]
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
    episodes = run_suite(suite, agents, run_dir, record=args.record, retries=args.retries,
                         progress=not args.quiet, backend_options=backend_options)
    print_tables(episodes)
    print(f"results: {run_dir.path}")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from harness.summary import print_tables

    episodes = RunDir(_resolve_run(args.run, args.out)).episodes()
    if episodes.empty:
        print(f"error: {args.run} has no finished episodes", file=sys.stderr)
        return 2
    print_tables(episodes)
    return 0


def _resolve_run(run: str, out: str) -> Path:
    path = Path(run)
    if not path.is_dir():
        path = Path(out) / run
    if not (path / "manifest.json").is_file():
        raise FileNotFoundError(f"{run}: no run directory with a manifest.json (looked in {run} and {path})")
    return path


def _with_seeds(suite, seeds: list[int]):
    from dataclasses import replace

    return replace(suite, scenarios=tuple(replace(s, seeds=tuple(seeds)) for s in suite.scenarios))


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
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.set_defaults(func=cmd_run)

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
