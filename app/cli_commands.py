"""What each `prunedrive` command does with its parsed arguments (app/cli.py builds the parser and maps errors to
exit codes): checks that need more than one option, then a call into the command's own module."""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from prunedrive.agents.registry import AgentSpec, parse_agent_args
from prunedrive.app.run import EXIT_BAD_INPUT, drive, exit_code, find_run
from prunedrive.app.server_options import server_options
from prunedrive.harness.backends import check_suite
from prunedrive.harness.results import RunError
from prunedrive.scenarios.loader import Suite, load_suite


def _check_seeds(seeds: list[int] | None) -> None:
    if seeds is None:
        return
    bad = [s for s in seeds if not 0 <= s < 2**32]
    if bad:
        raise ValueError(f"--seeds: {bad[0]} is outside [0, 2**32)")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds repeats a seed: {' '.join(map(str, seeds))}")


def _with_seeds(suite: Suite, seeds: list[int] | None) -> Suite:
    if not seeds:
        return suite
    return replace(suite, scenarios=tuple(replace(s, seeds=tuple(seeds)) for s in suite.scenarios))


def cmd_run(args: argparse.Namespace) -> int:
    from prunedrive.harness.summary import print_tables

    _check_mlflow(args)
    _check_seeds(args.seeds)
    _check_model(args.model)
    _check_precision(args)
    # A resume takes what is not given from the run's manifest; what is given must match it (drive checks).
    recorded = find_run(args.resume, args.out).manifest()["config"] if args.resume else {}
    seeds = args.seeds or recorded.get("seeds")
    suite = check_suite(_with_seeds(load_suite(args.suite or recorded.get("suite_path") or "smoke"), seeds))
    backend_options, servers = server_options(args, suite)
    if args.agent or not recorded.get("specs"):
        agent_args = tuple(sorted(parse_agent_args(args.agent_arg).items()))
        specs = [AgentSpec(name, str(args.model) if args.model else None, None, agent_args)
                 for name in (args.agent or ["expert"])]
    else:
        specs = [AgentSpec(**{**s, "args": tuple(tuple(kv) for kv in s.get("args", ()))}) for s in recorded["specs"]]
    run_dir, episodes = drive(
        suite, specs, args.out, run_id=args.run_id, resume=args.resume, workers=args.workers, record=args.record,
        retries=args.retries, backend_options=backend_options, servers=servers,
        ray_address=args.ray_address, progress=not args.quiet, retry_failed=args.retry_failed,
        step_timeout_s=args.step_timeout, episode_timeout_s=args.episode_timeout,
        batch=args.batch or recorded.get("batch") or 1, latency=args.latency or recorded.get("latency"),
        device=args.device, dtype=args.dtype, config={"model": specs[0].model if specs else None, "seeds": seeds})
    print_tables(episodes, latency_label=run_dir.manifest()["config"].get("latency_label"))
    print(f"results: {run_dir.path.resolve()}")
    if args.mlflow is not None:
        from prunedrive.app.mlflow_log import log_run

        log_run(run_dir, args.mlflow)
    return exit_code(episodes, run_dir)


def cmd_profile(args: argparse.Namespace) -> int:
    from prunedrive.app.profile import profile_model

    path = Path(args.out) / "profiles" / f"{Path(args.model).resolve().name}.yaml"
    fitted = profile_model(args.model, path, steps=args.steps, repeat=args.repeat)
    print(f"{fitted['source']}\noverhead {fitted['overhead_ms']:.2f} ms + {fitted['prefill_ms_per_token']:.4f} ms per "
          f"prompt token + {fitted['decode_ms_per_token']:.3f} ms per generated token\nprofile: {path.resolve()} "
          f"(use: --latency profile:{path})")
    return 0


def cmd_latency_sweep(args: argparse.Namespace) -> int:
    from prunedrive.app.latency_sweep import agent_specs, format_sweep, report_command, run_latency_sweep

    _check_seeds(args.seeds)
    _check_model(args.model)
    _check_precision(args)
    suite = check_suite(_with_seeds(load_suite(args.suite), args.seeds))
    specs = agent_specs(args.agent or ["expert"], str(args.model) if args.model else None,
                        tuple(sorted(parse_agent_args(args.agent_arg).items())))
    sweep, table, code = run_latency_sweep(suite, specs, args.latencies, args.out, run_id=args.run_id,
                                           workers=args.workers, batch=args.batch or 1, progress=not args.quiet,
                                           device=args.device, dtype=args.dtype)
    print("\n".join(format_sweep(table)))
    print(f"results: {sweep.path.resolve()} (one run per latency under latency/)\nnext: {report_command(sweep)}")
    return code


def cmd_summary(args: argparse.Namespace) -> int:
    from prunedrive.harness.summary import print_tables

    run_dir = find_run(args.run, args.out)
    episodes = run_dir.episodes()
    if episodes.empty:
        print(f"error: {args.run} has no finished episodes", file=sys.stderr)
        return EXIT_BAD_INPUT
    print_tables(episodes, latency_label=(run_dir.manifest().get("config") or {}).get("latency_label"))
    return 0


# -- models ----------------------------------------------------------------------------------------------

def cmd_train(args: argparse.Namespace) -> int:
    if args.format == "text":
        from prunedrive.app.train_text import cmd_train_text as train

        train(args.preset, out_dir=args.model_out, data_dir=args.data, seed=args.seed, resume=not args.no_resume,
              threads=args.threads, init=args.init)
        return 0
    if args.init is not None:
        raise ValueError("--init fine-tunes a Hugging Face causal LM on the scene text: it needs --format text")
    from prunedrive.app.train import cmd_train as train

    train(args.preset, out_dir=args.model_out, data_dir=args.data, seed=args.seed, resume=not args.no_resume,
          threads=args.threads)
    return 0


def cmd_eval_open(args: argparse.Namespace) -> int:
    from prunedrive.app.eval_open import cmd_eval_open as evaluate

    _check_model(args.model)
    _check_precision(args)
    evaluate(args.model, split_dir=args.data, max_samples=args.max_samples, with_random=not args.no_random,
             device=args.device, dtype=args.dtype)
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from prunedrive.app.prune import prune_model_dir

    _check_model(args.model)
    _check_precision(args)
    # Only what the user gave, so the recipe (and the bench's cache key) of a default prune stays the same.
    given = {"encoder_sparsity": args.encoder_sparsity, "M": args.owl_m, "lam": args.owl_lambda,
             "finetune": {"finetune_max_epochs": args.finetune_epochs} if args.finetune_epochs else args.finetune or None,
             "distill": False if args.dg2pf_no_distill else None, "gradual": False if args.dg2pf_no_ramp else None,
             "save_dense": True if args.save_dense else None}
    options = {k: v for k, v in given.items() if v is not None}
    record = prune_model_dir(args.model, args.method, args.sparsity, args.model_out, pattern=args.pattern,
                             scope=args.scope, calibration=args.calibration, n_calibration=args.calibration_samples,
                             data_dir=args.data, seed=args.seed, overwrite=args.overwrite,
                             trust_remote_code=args.trust_remote_code, device=args.device, dtype=args.dtype,
                             offload=args.offload, **options)
    print(f"{args.method}: global sparsity {record['global']:.3f} (language model {record['lm_global']:.3f}) "
          f"-> {args.model_out}")
    saved = record.get("checkpoint") or {}
    if saved:
        print(f"weights: {saved['bytes_on_disk']:,} bytes on disk, {saved['ratio_to_dense']:.3f}x the dense layout "
              f"({saved['layout']}: {saved['compressed_format']})")
    if record.get("layer_sparsities"):
        print("per-block sparsities: " + ", ".join(f"{s:.3f}" for s in record["layer_sparsities"]))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from prunedrive.app.bench import run_bench

    _check_mlflow(args)
    _check_model(args.model)
    _check_precision(args)
    return run_bench(args.suite, args.preset, _bench_methods(args.methods, args.variant), args.sparsities,
                     Path(args.out), args.run_id, progress=not args.quiet, workers=args.workers, mlflow=args.mlflow,
                     batch=args.batch or 1, model=args.model, variants=_bench_variants(args.variant),
                     latency=args.latency, budget_ms=args.budget, device=args.device, dtype=args.dtype)


BENCH_METHODS = ["owl", "dg2pf", "wanda", "magnitude"]


def _bench_methods(methods: list[str] | None, variants: list[str] | None) -> list[str]:
    """--methods as given; "none", or no --methods beside --variant: only the dense model and the user's variants."""
    if methods is None:
        return [] if variants else list(BENCH_METHODS)
    if "none" in methods:
        if len(methods) > 1:
            raise ValueError(f"--methods none cannot be combined with methods ({' '.join(methods)})")
        return []
    return methods


def _bench_variants(variants: list[str] | None) -> dict[str, str]:
    """--variant NAME=DIR ...: {name: directory}, each name once (app.bench_variants.parse_variant)."""
    from prunedrive.app.bench_variants import parse_variant

    out: dict[str, str] = {}
    for text in variants or []:
        name, directory = parse_variant(text)
        if name.lower() in {n.lower() for n in out}:
            raise ValueError(f"--variant {text}: the name {name!r} is given twice (names ignore case)")
        out[name] = directory
    return out


def cmd_claims(args: argparse.Namespace) -> int:
    from prunedrive.app.claims import run_claims

    _check_model(args.model)
    _check_precision(args)
    return run_claims(args.suite, args.preset, Path(args.out), args.run_id, workers=args.workers, quick=args.quick,
                      progress=not args.quiet, model=args.model, batch=args.batch or 1, latency=args.latency,
                      device=args.device, dtype=args.dtype, structured=tuple(args.methods))


def _check_precision(args: argparse.Namespace) -> None:
    """--device/--dtype before anything runs (models.device): a CUDA device this machine lacks, or float16 on the
    CPU, is a message and exit 2. A `run` without them takes its resumed run's own (app.run.run_precision)."""
    from prunedrive.models.device import DEFAULT_DEVICE, DEFAULT_DTYPE, check_precision

    check_precision(args.device or DEFAULT_DEVICE, args.dtype or DEFAULT_DTYPE)


def _check_model(model: str | None) -> None:
    """A --model that is not a directory: say so, and list what the model zoo has."""
    if model is None or Path(model).is_dir():
        return
    from prunedrive.app.zoo import home

    zoo = home() / "models"
    known = sorted(p.name for p in zoo.iterdir() if p.is_dir()) if zoo.is_dir() else []
    hub = "/" in model and not model.startswith((".", "/", "~")) and len(Path(model).parts) == 2
    raise FileNotFoundError(f"--model {model}: no such model directory"
                            + ("; it looks like a model hub name, but prunedrive only loads local directories "
                               "(nothing is downloaded)" if hub else "")
                            + f"; the model zoo ({zoo}) has: "
                            + (", ".join(known) if known else "nothing yet (`prunedrive train` fills it)"))


# -- results ---------------------------------------------------------------------------------------------

def cmd_report(args: argparse.Namespace) -> int:
    from prunedrive.report.write import write_report

    paths = [find_run(run, args.out).path for run in args.runs]
    # Beside the runs, not in the working tree: reports are outputs, like the runs they are made from.
    out_dir = Path(args.report_dir) if args.report_dir else Path(args.out) / "reports" / (
        paths[0].name + (f"+{len(paths) - 1}" if len(paths) > 1 else ""))
    html_path, md_path = write_report(paths, out_dir, title=args.title)
    print(f"report: {html_path}\n        {md_path}")
    return 0


def cmd_same_episodes(args: argparse.Namespace) -> int:
    from prunedrive.app.same_episodes import same_episodes

    return same_episodes(find_run(args.a, args.out).path, find_run(args.b, args.out).path, args.agent_a, args.agent_b)


def cmd_regress(args: argparse.Namespace) -> int:
    import json

    from prunedrive.harness.regress import RegressInputError, regress

    try:
        verdict = regress(find_run(args.baseline, args.out).path, find_run(args.candidate, args.out).path,
                          max_drop=args.max_drop, alpha=args.alpha, n_boot=args.n_boot, seed=args.seed,
                          agent=args.agent, baseline_agent=args.baseline_agent, candidate_agent=args.candidate_agent,
                          max_collision_increase=args.max_collision_increase, max_slowdown=args.max_slowdown)
    except (RegressInputError, RunError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    verdict.print()
    if args.json:
        Path(args.json).write_text(json.dumps(verdict.to_dict(), indent=2, default=float))
    return verdict.exit_code


def cmd_import(args: argparse.Namespace) -> int:
    from prunedrive.app.import_leaderboard import import_exit_code, import_leaderboard
    from prunedrive.harness.results import RunDir
    from prunedrive.harness.summary import print_tables

    run_dir = RunDir.under(args.out, args.run_id)
    episodes = import_leaderboard(args.files, run_dir, args.agent)
    print_tables(episodes)
    print(f"imported {len(episodes)} route(s) from {len(args.files)} file(s): {run_dir.path.resolve()}")
    return import_exit_code(run_dir)


def _check_mlflow(args: argparse.Namespace) -> None:
    if args.mlflow is not None:  # before any driving or training: a missing MLflow should cost nothing
        from prunedrive.app.mlflow_log import require_mlflow

        require_mlflow(args.mlflow)
