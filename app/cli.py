"""The `prunedrive` command line: every subcommand's options and dispatch, in one place.

Exit codes: 0 every planned episode scored (or the command did its work); 1 `regress` found a
regression; 2 bad input (a message names the file, field or option); 3 some episodes failed for
infrastructure reasons (simulator, worker, harness time limit; listed, and `--resume` runs them again).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import replace
from pathlib import Path

# Before torch loads OpenMP: its threads spin while they wait, which on a 2-core machine doing anything else costs
# several times their work (a `small` training step: 2.3 s spinning, 0.49 s passive, at load 5). Same arithmetic.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from prunedrive.agents.registry import AgentError, AgentSpec, agent_names, parse_agent_args
from prunedrive.app.run import EXIT_BAD_INPUT, EXIT_INFRASTRUCTURE, drive, exit_code, find_run
from prunedrive.app.server_options import add_server_options, server_options
from prunedrive.harness.backends import check_suite
from prunedrive.harness.backends.base import SimulatorError
from prunedrive.harness.results import RunError
from prunedrive.harness.limits import EPISODE_TIMEOUT_S, STEP_TIMEOUT_S
from prunedrive.models.pruning import method_names
from prunedrive.scenarios.loader import ScenarioError, Suite, load_suite


# -- run / summary ---------------------------------------------------------------------------------------

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


# -- parser ----------------------------------------------------------------------------------------------

def _check_mlflow(args: argparse.Namespace) -> None:
    if args.mlflow is not None:  # before any driving or training: a missing MLflow should cost nothing
        from prunedrive.app.mlflow_log import require_mlflow

        require_mlflow(args.mlflow)


def _threads(value: str) -> int | str:
    if value == "auto":
        return value
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise argparse.ArgumentTypeError(f"{value!r}: a positive integer or 'auto'")


def _at_least(minimum: int, maximum: int | None = None):
    """argparse type: an integer >= minimum (and <= maximum, where one is given)."""
    allowed = f"allowed: {minimum}..{maximum}" if maximum is not None else f"allowed: at least {minimum}"

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not an integer; {allowed}") from None
        if number < minimum or (maximum is not None and number > maximum):
            raise argparse.ArgumentTypeError(f"{number} is out of range; {allowed}")
        return number
    return parse


def _finite(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False):
    """argparse type: a finite float in the interval from low to high (either end open where asked): NaN
    compares False with everything, so an unchecked one silently turns every limit or gate off."""
    allowed = (f"allowed: a finite number {'>' if low_open else '>='} {low:g}" if high == math.inf else
               f"allowed: a finite number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")

    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a number; {allowed}") from None
        below = number <= low if low_open else number < low
        above = number >= high if high_open else number > high
        if not math.isfinite(number) or below or above:
            raise argparse.ArgumentTypeError(f"{value} is out of range; {allowed}")
        return number
    return parse


def _out_dir(value: str) -> str:
    """argparse type: --out is a directory, or can be made one (nothing is created here: a refused run leaves
    no trace)."""
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value}: not a directory (it is a file); give a directory for results")
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{value}: {existing} is not a directory, so {value} cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{value}: {existing} is not writable")
    return value


# Upper bounds: past them an option is a typo or an attack (memory, back-off sleeps), not a plan.
MAX_BATCH, MAX_WORKERS, MAX_RETRIES, MAX_N_BOOT = 4096, 1024, 10, 1_000_000
MAX_TIMEOUT_S = 1e6  # about 11 days
_TIMEOUT_RANGE = f"Seconds, 0 < S <= {MAX_TIMEOUT_S:g}: there is no 'no limit' (0 is refused); give a large S instead"


def _add_mlflow_option(parser: argparse.ArgumentParser) -> None:
    # const "" (a bare --mlflow) stands for the default store, which depends on the run's output folder.
    parser.add_argument("--mlflow", nargs="?", const="", metavar="URI",
                        help="log the finished run to MLflow, one MLflow run per agent; default store "
                             "sqlite:///<out>/mlflow.db (needs the mlflow extra)")


def _add_batch_option(parser: argparse.ArgumentParser, resumable: bool = False) -> None:
    parser.add_argument("--batch", type=_at_least(1, MAX_BATCH), metavar="K",
                        help="run K episodes side by side per worker, an LLM agent deciding all their steps in one "
                             f"batched decode (1..{MAX_BATCH}; default 1"
                             + ("; a resume defaults to the run's own" if resumable else "")
                             + "). Results do not depend on K except where batched float arithmetic changes an "
                             "LLM's greedy token (benchmarks/throughput.py measures how often); a given K is "
                             "deterministic")


def _add_latency_option(parser: argparse.ArgumentParser, resumable: bool = False) -> None:
    from prunedrive.harness.latency import LATENCY_FORMS

    parser.add_argument("--latency", metavar="MODEL",
                        help=f"latency in the loop (harness.latency): {LATENCY_FORMS}. Default none: the world "
                             "waits for the agent, as every closed-loop benchmark does. Part of the run's identity"
                             + ("; a resume defaults to the run's own" if resumable else ""))


def _device(value: str) -> str:
    """argparse type: the spelling of --device (models.device.parse_device); whether it exists is checked later."""
    from prunedrive.models.device import parse_device

    try:
        return parse_device(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--device ")) from None


def _add_precision_options(parser: argparse.ArgumentParser, resumable: bool = False) -> None:
    from prunedrive.models.device import DTYPES

    parser.add_argument("--device", type=_device, default=None if resumable else "cpu",
                        help="where models run: cpu, cuda or cuda:N (default cpu"
                             + ("; a resume: the run's own" if resumable else "")
                             + "); refused where that device is absent")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None if resumable else "float32",
                        help="the models' precision (default float32" + ("; a resume: the run's own" if resumable else "")
                             + "); float16 only on a GPU (refused on the CPU: its half matmuls are slow or missing)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunedrive", description=__doc__.split("\n\n")[0])
    from importlib.metadata import version

    parser.add_argument("--version", action="version", version=f"prunedrive {version('prunedrive')}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="drive a scenario suite closed-loop and score it")
    run.add_argument("--suite", help="suite name (a YAML in scenarios/) or path; default smoke")
    run.add_argument("--agent", nargs="+", action="extend", metavar="AGENT",
                     help=f"one or more of: {', '.join(agent_names())}, or package.module:factory; default expert")
    run.add_argument("--agent-arg", action="append", metavar="KEY=VALUE", help="keyword argument of the agents' factories")
    run.add_argument("--model", help="model directory for --agent llm (or a plug-in that takes one)")
    run.add_argument("--seeds", type=int, nargs="+", help="override every scenario's seeds (0 <= seed < 2**32)")
    run.add_argument("--out", type=_out_dir, default="results",
                     help="where run directories go (a directory, made when missing); default results/")
    run.add_argument("--run-id", help="name of the run directory; default suite-agents-timestamp")
    run.add_argument("--resume", metavar="RUN",
                     help="finish a killed run (its id or directory); its manifest supplies suite, seeds and agents")
    run.add_argument("--retry-failed", action="store_true",
                     help="with --resume, also re-run episodes whose agent failed (infrastructure failures always are)")
    run.add_argument("--record", action="store_true", help="write a video per episode under videos/")
    run.add_argument("--retries", type=_at_least(0, MAX_RETRIES), default=2,
                     help=f"retries of an episode whose simulator failed, with doubling back-off (0..{MAX_RETRIES}; 2)")
    run.add_argument("--workers", type=_at_least(1, MAX_WORKERS),
                     help=f"run episodes on this many Ray actors (1..{MAX_WORKERS})")
    _add_batch_option(run, resumable=True)
    _add_latency_option(run, resumable=True)
    add_server_options(run, port_type=_at_least(1, 65535))  # each server-based backend's own flags (--carla-*)
    run.add_argument("--ray-address", help="an existing Ray cluster (default: a local Ray for the run)")
    run.add_argument("--step-timeout", type=_finite(0, MAX_TIMEOUT_S, low_open=True), default=STEP_TIMEOUT_S,
                     metavar="S", help=f"wall limit of one agent reset()/act() ({STEP_TIMEOUT_S:g} s); past it the "
                                       "episode fails with 'agent timeout' and the run goes on. "
                                       f"{_TIMEOUT_RANGE}")
    run.add_argument("--episode-timeout", type=_finite(0, MAX_TIMEOUT_S, low_open=True), default=EPISODE_TIMEOUT_S,
                     metavar="S", help=f"wall limit of one episode ({EPISODE_TIMEOUT_S:g} s). {_TIMEOUT_RANGE}")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_mlflow_option(run)
    _add_precision_options(run, resumable=True)
    run.set_defaults(func=cmd_run)

    train = sub.add_parser("train", help="train the driving LLM on expert data (CPU)")
    train.add_argument("--preset", default="small", help="tiny | small (default) | base")
    train.add_argument("--format", default="vector", choices=("vector", "text"),
                       help="vector (default): vector encoder + Llama (--agent llm); text: a plain Hugging Face "
                            "LlamaForCausalLM of the preset's LM sizes on the scene text (--agent text-llm), zoo "
                            "name text-<preset>-<hash>")
    train.add_argument("--init", metavar="DIR",
                       help="with --format text: fine-tune this local causal LM checkpoint (its own tokenizer; "
                            "needs --model-out) instead of training a Llama from scratch")
    train.add_argument("--model-out", metavar="DIR",
                       help="where the model goes; default the model zoo (~/.cache/prunedrive or $PRUNEDRIVE_HOME)")
    train.add_argument("--data", help="dataset directory; default <out>/data (built when missing); --format text "
                                      "reuses the same preset's vector model data in the zoo when it is there")
    train.add_argument("--seed", type=int, default=0, help="training seed (0)")
    train.add_argument("--no-resume", action="store_true", help="start over instead of resuming a checkpoint")
    train.add_argument("--threads", type=_threads, default=2,
                       help="torch CPU threads (default 2); the trained model depends on it. 'auto' picks the "
                            "faster of 1 and 2 as the machine's load changes: quicker when busy, not reproducible")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("eval-open", help="open-loop metrics of a model on the held-out split")
    evaluate.add_argument("--model", help="model directory; default the zoo's small model")
    evaluate.add_argument("--data", help="dataset directory with val.parquet; default the model's training data")
    evaluate.add_argument("--max-samples", type=_at_least(1), default=400, help="held-out samples to score (400)")
    evaluate.add_argument("--no-random", action="store_true", help="skip the random-weights contrast")
    _add_precision_options(evaluate)
    evaluate.set_defaults(func=cmd_eval_open)

    prune = sub.add_parser("prune", help="prune a model directory into a new one (+ sparsity.json)")
    prune.add_argument("--method", required=True, choices=method_names(), help="pruning method")
    prune.add_argument("--sparsity", type=_finite(0, 1, low_open=True, high_open=True), help="target sparsity, e.g. 0.7 (implied by --pattern)")
    prune.add_argument("--pattern", help="N:M semi-structured, e.g. 2:4 or 4:8")
    prune.add_argument("--model", required=True, help="dense model directory (ours, or any local HF causal LM)")
    prune.add_argument("--model-out", required=True, metavar="DIR",
                       help="where the pruned model goes (new or empty; see --overwrite)")
    prune.add_argument("--overwrite", action="store_true", help="replace the model in a non-empty --model-out")
    prune.add_argument("--save-dense", action="store_true",
                       help="write the zeros densely in model.safetensors instead of the compressed-tensors sparse "
                            "formats unstructured and N:M pruning write by default (structured methods: always dense)")
    prune.add_argument("--scope", default="lm", choices=("lm", "encoder", "all"),
                       help="what to prune: the language model (default), the vector encoder, or both (encoder first)")
    prune.add_argument("--encoder-sparsity", type=_finite(0, 1, low_open=True, high_open=True), help="the encoder's own target with --scope encoder/all")
    prune.add_argument("--calibration", default="driving", choices=("driving", "generic", "random"),
                       help="calibration data: driving episodes (default), generic English prose (Python's pydoc "
                            "topics, token-count matched), or uniformly random token ids")
    prune.add_argument("--owl-m", type=_finite(0, low_open=True), help="OWL's outlier threshold M (x the block's mean score; default 5)")
    prune.add_argument("--owl-lambda", type=_finite(0), help="OWL's sparsity spread lambda (default 0.08; 0 = uniform)")
    prune.add_argument("--finetune", action="store_true",
                       help="one-shot methods: then fine-tune under the mask with DG2PF's budget (an equal-budget "
                            "control); structured ones (width, owl-width, depth): recovery training distilled from "
                            "the dense model, same budget")
    prune.add_argument("--finetune-epochs", type=_at_least(1), help="with --finetune: its epoch cap")
    prune.add_argument("--dg2pf-no-distill", action="store_true", help="DG2PF ablation: no self-distillation")
    prune.add_argument("--dg2pf-no-ramp", action="store_true",
                       help="DG2PF ablation: one-shot magnitude to the target, then pruned fine-tuning only")
    prune.add_argument("--trust-remote-code", action="store_true",
                       help="allow a HF model's own code (off by default: it runs the model author's Python)")
    prune.add_argument("--calibration-samples", type=_at_least(1), default=64, help="calibration samples (64)")
    prune.add_argument("--data", help="dataset directory; default the one the model was trained on")
    prune.add_argument("--seed", type=int, default=0, help="calibration sampling seed (0)")
    _add_precision_options(prune)
    prune.add_argument("--offload", default="auto", choices=("auto", "always", "never"),
                       help="a model larger than the device's free memory stays on the CPU and its decoder blocks "
                            "visit the device one at a time with the cached calibration inputs: auto (default: "
                            "only when it does not fit), always, never")
    prune.set_defaults(func=cmd_prune)

    bench = sub.add_parser("bench", help="the main job: dense vs OWL/DG2PF/Wanda/magnitude, closed- and open-loop")
    bench.add_argument("--suite", default="smoke", help="smoke (default) or standard, or a path")
    bench.add_argument("--preset", default="small", help="the zoo model to train or reuse (small)")
    bench.add_argument("--model", help="your dense model directory instead (ours, or any local HF causal LM)")
    bench.add_argument("--methods", nargs="+", choices=[*method_names(), "none"],
                       help="pruning methods (default owl dg2pf wanda magnitude); none: prune nothing, only the "
                            "dense model and your --variant models (also the default when --variant is given "
                            "without --methods)")
    bench.add_argument("--variant", action="append", metavar="NAME=DIR",
                       help="your own variant of the dense model (repeatable): a model directory (prunedrive's, or "
                            "a compressed-tensors checkpoint, e.g. llm-compressor's) driven beside the others as "
                            "agent NAME; checked before anything runs (config.json, safetensors weights, a supported "
                            "compression scheme, the dense model's architecture)")
    bench.add_argument("--sparsities", nargs="+", type=_finite(0, 1, low_open=True, high_open=True),
                       default=[0.7, 0.85],
                       help="target sparsities (default 0.7 0.85, where the methods part; add 0.5 for the sweep "
                            "`prunedrive claims` runs: a first bench stays within 10 minutes on 2 cores)")
    bench.add_argument("--out", type=_out_dir, default="results",
                       help="where run directories go (a directory, made when missing); default results/")
    bench.add_argument("--run-id", help="default bench-<suite>-<preset>; an existing one is resumed")
    bench.add_argument("--workers", type=_at_least(1, MAX_WORKERS),
                       help=f"drive the episodes on this many Ray actors (1..{MAX_WORKERS})")
    _add_batch_option(bench)
    _add_latency_option(bench)
    bench.add_argument("--budget", type=_finite(0.0, low_open=True), metavar="MS",
                       help="with --latency: mark which agents' decisions (p95, worst episode) fit MS milliseconds")
    bench.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_mlflow_option(bench)
    _add_precision_options(bench)
    bench.set_defaults(func=cmd_bench)

    claims = sub.add_parser("claims", help="the seed papers' four claims, closed loop, with paired CIs and verdicts")
    claims.add_argument("--suite", default="standard", help="suite name or path (default standard: 30 episodes)")
    claims.add_argument("--preset", default="small", help="the zoo model to train or reuse (small); see --model")
    claims.add_argument("--model", help="a dense model directory instead of the zoo's preset")
    claims.add_argument("--out", type=_out_dir, default="results",
                        help="where run directories go (a directory, made when missing); default results/")
    claims.add_argument("--run-id", help="default claims-<suite>-<model>; an existing one is resumed")
    claims.add_argument("--workers", type=_at_least(1, MAX_WORKERS),
                        help=f"drive the episodes on this many Ray actors (1..{MAX_WORKERS})")
    claims.add_argument("--quick", action="store_true",
                        help="one sparsity (0.7), one lambda, no SparseGPT: a smoke test of the experiment, not an answer")
    structured = method_names(lambda spec: spec.structured)
    claims.add_argument("--methods", nargs="+", default=[], choices=structured, metavar="METHOD",
                        help=f"structured methods ({' '.join(structured)}) to add as claim (e): each against Wanda at "
                             "matched parameter counts and against dense, at the sparsities up to 0.7")
    _add_batch_option(claims)
    _add_latency_option(claims)
    claims.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_precision_options(claims)
    claims.set_defaults(func=cmd_claims)

    report = sub.add_parser("report", help="HTML + Markdown report comparing runs (tables, plots, videos)")
    report.add_argument("runs", nargs="+", help="run ids (under --out) or directories")
    report.add_argument("--out", default="results", help="where run ids are looked up; default results/")
    report.add_argument("--report-dir", metavar="DIR", help="where the report goes; default <out>/reports/<first run>[+N]")
    report.add_argument("--title", help="page title")
    report.set_defaults(func=cmd_report)

    from prunedrive.harness import regress

    gate = sub.add_parser("regress", help="gate: is CANDIDATE significantly worse than BASELINE? (exit 1 if so)",
                          description=regress.__doc__.split("\n\n")[0])
    gate.add_argument("baseline", help="baseline run (id under --out, or directory)")
    gate.add_argument("candidate", help="candidate run (id under --out, or directory)")
    gate.add_argument("--out", default="results", help="where run ids are looked up; default results/")
    gate.add_argument("--max-drop", type=_finite(0), default=5.0,
                      help="driving-score points of drop tolerated (a finite number >= 0; 5)")
    gate.add_argument("--alpha", type=_finite(0, 1, low_open=True, high_open=True), default=0.05,
                      help="the CI is 1-alpha, two-sided (0 < alpha < 1; 0.05)")
    gate.add_argument("--n-boot", type=_at_least(100, MAX_N_BOOT), default=10000,
                      help=f"bootstrap resamples (100..{MAX_N_BOOT}; 10000)")
    gate.add_argument("--seed", type=_at_least(0), default=0, help="bootstrap seed (>= 0; 0)")
    gate.add_argument("--agent", help="the agent to compare, in both runs (needed when a run has several)")
    gate.add_argument("--baseline-agent", help="the baseline's agent, when it differs from the candidate's")
    gate.add_argument("--candidate-agent", help="the candidate's agent")
    gate.add_argument("--max-collision-increase", type=_finite(0), default=0.5,
                      help="collisions per km tolerated (a finite number >= 0; 0.5)")
    gate.add_argument("--max-slowdown", type=_finite(0, low_open=True), metavar="RATIO",
                      help="make the per-step agent time a gate: fail above this candidate/baseline ratio "
                           "(a finite ratio > 0, e.g. 1.5; default: reported only, since wall time depends on "
                           "machine and load)")
    gate.add_argument("--json", metavar="FILE", help="also write the verdict as JSON")
    gate.set_defaults(func=cmd_regress)

    imp = sub.add_parser("import", help="turn CARLA Leaderboard 2.0 results (or Bench2Drive's merged JSON) into a run")
    imp.add_argument("source", choices=("leaderboard",),
                     help="leaderboard: the evaluator's results/checkpoint JSON (Bench2Drive merged JSON is "
                          "recognised by its shape)")
    imp.add_argument("files", nargs="+", metavar="RESULTS.json", help="one or more results files")
    imp.add_argument("--run-id", required=True, help="name of the new run directory")
    imp.add_argument("--out", type=_out_dir, default="results",
                     help="where run directories go (a directory, made when missing); default results/")
    imp.add_argument("--agent", default="leaderboard", help="the agent's name in the run (default leaderboard)")
    imp.set_defaults(func=cmd_import)

    summary = sub.add_parser("summary", help="print the tables of a finished or partial run")
    summary.add_argument("run", help="run id or directory")
    summary.add_argument("--out", default="results", help="where run ids are looked up; default results/")
    summary.set_defaults(func=cmd_summary)

    profile = sub.add_parser("profile", help="fit a latency profile (--latency profile:FILE) to this machine's "
                                             "measured step times of a model")
    profile.add_argument("--model", required=True, help="the model directory to measure")
    profile.add_argument("--steps", type=_at_least(4, 10_000), default=24, help="observations measured (default 24)")
    profile.add_argument("--repeat", type=_at_least(1, 100), default=3,
                         help="timings per observation, the median kept (default 3)")
    profile.add_argument("--out", type=_out_dir, default="results",
                         help="results root; the profile goes to <out>/profiles/<model>.yaml")
    profile.set_defaults(func=cmd_profile)

    sweep = sub.add_parser("latency-sweep", help="drive agents on one suite at a range of fixed decision latencies, "
                                                 "paired across latencies: how much delay their driving tolerates")
    sweep.add_argument("--suite", default="smoke", help="suite name (a YAML in scenarios/) or path; default smoke")
    sweep.add_argument("--agent", nargs="+", action="extend", metavar="AGENT",
                       help=f"one or more of: {', '.join(agent_names())}, or package.module:factory; default expert")
    sweep.add_argument("--agent-arg", action="append", metavar="KEY=VALUE",
                       help="keyword argument of the agents' factories")
    sweep.add_argument("--model", help="model directory, for the agents that take one (llm, text-llm)")
    sweep.add_argument("--latencies", type=_finite(0.0), nargs="+", default=[0.0, 100.0, 200.0, 400.0, 800.0],
                       metavar="MS", help="fixed decision latencies in ms (--latency fixed:MS), distinct; the "
                                          "smallest is the reference of the paired ΔDS (default 0 100 200 400 800)")
    sweep.add_argument("--seeds", type=int, nargs="+", help="override every scenario's seeds (0 <= seed < 2**32)")
    sweep.add_argument("--out", type=_out_dir, default="results",
                       help="where run directories go (a directory, made when missing); default results/")
    sweep.add_argument("--run-id", help="name of the sweep directory; default latency-sweep-<suite>-<hash of the "
                                        "agents and latencies>. Running the same command again resumes it")
    sweep.add_argument("--workers", type=_at_least(1, MAX_WORKERS),
                       help=f"run episodes on this many Ray actors (1..{MAX_WORKERS})")
    _add_batch_option(sweep)
    sweep.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_precision_options(sweep)
    sweep.set_defaults(func=cmd_latency_sweep)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ScenarioError, RunError, AgentError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except SimulatorError as exc:  # the simulator is not there: infrastructure, not the user's input
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INFRASTRUCTURE
    except MemoryError as exc:  # the machine's, not the input's (options that ask for too much are refused above)
        print(f"error: out of memory{': ' + str(exc) if str(exc) else ''}", file=sys.stderr)
        return EXIT_INFRASTRUCTURE


if __name__ == "__main__":
    sys.exit(main())
