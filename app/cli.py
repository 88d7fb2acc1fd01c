"""The `prunedrive` command line: every subcommand's options and dispatch, in one place.

What each command then does with its arguments: app/cli_commands.py; the option types: app/cli_options.py.

Exit codes: 0 every planned episode scored (or the command did its work); 1 `regress` found a
regression; 2 bad input (a message names the file, field or option); 3 some episodes failed for
infrastructure reasons (simulator, worker, harness time limit; listed, and `--resume` runs them again).
"""
from __future__ import annotations

import argparse
import os
import sys

# Before torch loads OpenMP: its threads spin while they wait, which on a 2-core machine doing anything else costs
# several times their work (a `small` training step: 2.3 s spinning, 0.49 s passive, at load 5). Same arithmetic.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from prunedrive.agents.registry import AgentError, agent_names
from prunedrive.app.cli_commands import (cmd_bench, cmd_claims, cmd_eval_open, cmd_import, cmd_latency_sweep,
                                         cmd_profile, cmd_prune, cmd_regress, cmd_report, cmd_run, cmd_same_episodes,
                                         cmd_summary, cmd_train)
from prunedrive.app.cli_options import (MAX_N_BOOT, MAX_RETRIES, MAX_TIMEOUT_S, MAX_WORKERS, TIMEOUT_RANGE,
                                        add_batch_option, add_latency_option, add_mlflow_option, add_precision_options,
                                        at_least, finite, out_dir, threads)
from prunedrive.app.run import EXIT_BAD_INPUT, EXIT_INFRASTRUCTURE
from prunedrive.app.server_options import add_server_options
from prunedrive.harness.backends.base import SimulatorError
from prunedrive.harness.results import RunError
from prunedrive.harness.limits import EPISODE_TIMEOUT_S, STEP_TIMEOUT_S
from prunedrive.models.pruning import method_names
from prunedrive.scenarios.loader import ScenarioError


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
    run.add_argument("--out", type=out_dir, default="results",
                     help="where run directories go (a directory, made when missing); default results/")
    run.add_argument("--run-id", help="name of the run directory; default suite-agents-timestamp")
    run.add_argument("--resume", metavar="RUN",
                     help="finish a killed run (its id or directory); its manifest supplies suite, seeds and agents")
    run.add_argument("--retry-failed", action="store_true",
                     help="with --resume, also re-run episodes whose agent failed (infrastructure failures always are)")
    run.add_argument("--record", action="store_true", help="write a video per episode under videos/")
    run.add_argument("--retries", type=at_least(0, MAX_RETRIES), default=2,
                     help=f"retries of an episode whose simulator failed, with doubling back-off (0..{MAX_RETRIES}; 2)")
    run.add_argument("--workers", type=at_least(1, MAX_WORKERS),
                     help=f"run episodes on this many Ray actors (1..{MAX_WORKERS})")
    add_batch_option(run, resumable=True)
    add_latency_option(run, resumable=True)
    add_server_options(run, port_type=at_least(1, 65535))  # each server-based backend's own flags (--carla-*)
    run.add_argument("--ray-address", help="an existing Ray cluster (default: a local Ray for the run)")
    run.add_argument("--step-timeout", type=finite(0, MAX_TIMEOUT_S, low_open=True), default=STEP_TIMEOUT_S,
                     metavar="S", help=f"wall limit of one agent reset()/act() ({STEP_TIMEOUT_S:g} s); past it the "
                                       "episode fails with 'agent timeout' and the run goes on. "
                                       f"{TIMEOUT_RANGE}")
    run.add_argument("--episode-timeout", type=finite(0, MAX_TIMEOUT_S, low_open=True), default=EPISODE_TIMEOUT_S,
                     metavar="S", help=f"wall limit of one episode ({EPISODE_TIMEOUT_S:g} s). {TIMEOUT_RANGE}")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    add_mlflow_option(run)
    add_precision_options(run, resumable=True)
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
    train.add_argument("--threads", type=threads, default=2,
                       help="torch CPU threads (default 2); the trained model depends on it. 'auto' picks the "
                            "faster of 1 and 2 as the machine's load changes: quicker when busy, not reproducible")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("eval-open", help="open-loop metrics of a model on the held-out split")
    evaluate.add_argument("--model", help="model directory; default the zoo's small model")
    evaluate.add_argument("--data", help="dataset directory with val.parquet; default the model's training data")
    evaluate.add_argument("--max-samples", type=at_least(1), default=400, help="held-out samples to score (400)")
    evaluate.add_argument("--no-random", action="store_true", help="skip the random-weights contrast")
    add_precision_options(evaluate)
    evaluate.set_defaults(func=cmd_eval_open)

    prune = sub.add_parser("prune", help="prune a model directory into a new one (+ sparsity.json)")
    prune.add_argument("--method", required=True, choices=method_names(), help="pruning method")
    prune.add_argument("--sparsity", type=finite(0, 1, low_open=True, high_open=True), help="target sparsity, e.g. 0.7 (implied by --pattern)")
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
    prune.add_argument("--encoder-sparsity", type=finite(0, 1, low_open=True, high_open=True), help="the encoder's own target with --scope encoder/all")
    prune.add_argument("--calibration", default="driving", choices=("driving", "generic", "random"),
                       help="calibration data: driving episodes (default), generic English prose (Python's pydoc "
                            "topics, token-count matched), or uniformly random token ids")
    prune.add_argument("--owl-m", type=finite(0, low_open=True), help="OWL's outlier threshold M (x the block's mean score; default 5)")
    prune.add_argument("--owl-lambda", type=finite(0), help="OWL's sparsity spread lambda (default 0.08; 0 = uniform)")
    prune.add_argument("--finetune", action="store_true",
                       help="one-shot methods: then fine-tune under the mask with DG2PF's budget (an equal-budget "
                            "control); structured ones (width, owl-width, depth): recovery training distilled from "
                            "the dense model, same budget")
    prune.add_argument("--finetune-epochs", type=at_least(1), help="with --finetune: its epoch cap")
    prune.add_argument("--dg2pf-no-distill", action="store_true", help="DG2PF ablation: no self-distillation")
    prune.add_argument("--dg2pf-no-ramp", action="store_true",
                       help="DG2PF ablation: one-shot magnitude to the target, then pruned fine-tuning only")
    prune.add_argument("--trust-remote-code", action="store_true",
                       help="allow a HF model's own code (off by default: it runs the model author's Python)")
    prune.add_argument("--calibration-samples", type=at_least(1), default=64, help="calibration samples (64)")
    prune.add_argument("--data", help="dataset directory; default the one the model was trained on")
    prune.add_argument("--seed", type=int, default=0, help="calibration sampling seed (0)")
    add_precision_options(prune)
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
    bench.add_argument("--sparsities", nargs="+", type=finite(0, 1, low_open=True, high_open=True),
                       default=[0.7, 0.85],
                       help="target sparsities (default 0.7 0.85, where the methods part; add 0.5 for the sweep "
                            "`prunedrive claims` runs: a first bench stays within 10 minutes on 2 cores)")
    bench.add_argument("--out", type=out_dir, default="results",
                       help="where run directories go (a directory, made when missing); default results/")
    bench.add_argument("--run-id", help="default bench-<suite>-<preset>; an existing one is resumed")
    bench.add_argument("--workers", type=at_least(1, MAX_WORKERS),
                       help=f"drive the episodes on this many Ray actors (1..{MAX_WORKERS})")
    add_batch_option(bench)
    add_latency_option(bench)
    bench.add_argument("--budget", type=finite(0.0, low_open=True), metavar="MS",
                       help="with --latency: mark which agents' decisions (p95, worst episode) fit MS milliseconds")
    bench.add_argument("--quiet", action="store_true", help="no progress bars")
    add_mlflow_option(bench)
    add_precision_options(bench)
    bench.set_defaults(func=cmd_bench)

    claims = sub.add_parser("claims", help="the seed papers' four claims, closed loop, with paired CIs and verdicts")
    claims.add_argument("--suite", default="standard", help="suite name or path (default standard: 30 episodes)")
    claims.add_argument("--preset", default="small", help="the zoo model to train or reuse (small); see --model")
    claims.add_argument("--model", help="a dense model directory instead of the zoo's preset")
    claims.add_argument("--out", type=out_dir, default="results",
                        help="where run directories go (a directory, made when missing); default results/")
    claims.add_argument("--run-id", help="default claims-<suite>-<model>; an existing one is resumed")
    claims.add_argument("--workers", type=at_least(1, MAX_WORKERS),
                        help=f"drive the episodes on this many Ray actors (1..{MAX_WORKERS})")
    claims.add_argument("--quick", action="store_true",
                        help="one sparsity (0.7), one lambda, no SparseGPT: a smoke test of the experiment, not an answer")
    structured = method_names(lambda spec: spec.structured)
    claims.add_argument("--methods", nargs="+", default=[], choices=structured, metavar="METHOD",
                        help=f"structured methods ({' '.join(structured)}) to add as claim (e): each against Wanda at "
                             "matched parameter counts and against dense, at the sparsities up to 0.7")
    add_batch_option(claims)
    add_latency_option(claims)
    claims.add_argument("--quiet", action="store_true", help="no progress bars")
    add_precision_options(claims)
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
    gate.add_argument("--max-drop", type=finite(0), default=5.0,
                      help="driving-score points of drop tolerated (a finite number >= 0; 5)")
    gate.add_argument("--alpha", type=finite(0, 1, low_open=True, high_open=True), default=0.05,
                      help="the CI is 1-alpha, two-sided (0 < alpha < 1; 0.05)")
    gate.add_argument("--n-boot", type=at_least(100, MAX_N_BOOT), default=10000,
                      help=f"bootstrap resamples (100..{MAX_N_BOOT}; 10000)")
    gate.add_argument("--seed", type=at_least(0), default=0, help="bootstrap seed (>= 0; 0)")
    gate.add_argument("--agent", help="the agent to compare, in both runs (needed when a run has several)")
    gate.add_argument("--baseline-agent", help="the baseline's agent, when it differs from the candidate's")
    gate.add_argument("--candidate-agent", help="the candidate's agent")
    gate.add_argument("--max-collision-increase", type=finite(0), default=0.5,
                      help="collisions per km tolerated (a finite number >= 0; 0.5)")
    gate.add_argument("--max-slowdown", type=finite(0, low_open=True), metavar="RATIO",
                      help="make the per-step agent time a gate: fail above this candidate/baseline ratio "
                           "(a finite ratio > 0, e.g. 1.5; default: reported only, since wall time depends on "
                           "machine and load)")
    gate.add_argument("--json", metavar="FILE", help="also write the verdict as JSON")
    gate.set_defaults(func=cmd_regress)

    same = sub.add_parser("same-episodes", help="did two runs drive the same episodes? every column but the machine's "
                          "timings (exit 1 if not)")
    same.add_argument("a", help="a run (id under --out, or directory)")
    same.add_argument("b", help="the other run")
    same.add_argument("--out", default="results", help="where run ids are looked up; default results/")
    same.add_argument("--agent-a", help="compare only this agent of A ...")
    same.add_argument("--agent-b", help="... with this agent of B (the same model under another name)")
    same.set_defaults(func=cmd_same_episodes)

    imp = sub.add_parser("import", help="turn CARLA Leaderboard 2.0 results (or Bench2Drive's merged JSON) into a run")
    imp.add_argument("source", choices=("leaderboard",),
                     help="leaderboard: the evaluator's results/checkpoint JSON (Bench2Drive merged JSON is "
                          "recognised by its shape)")
    imp.add_argument("files", nargs="+", metavar="RESULTS.json", help="one or more results files")
    imp.add_argument("--run-id", required=True, help="name of the new run directory")
    imp.add_argument("--out", type=out_dir, default="results",
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
    profile.add_argument("--steps", type=at_least(4, 10_000), default=24, help="observations measured (default 24)")
    profile.add_argument("--repeat", type=at_least(1, 100), default=3,
                         help="timings per observation, the median kept (default 3)")
    profile.add_argument("--out", type=out_dir, default="results",
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
    sweep.add_argument("--latencies", type=finite(0.0), nargs="+", default=[0.0, 100.0, 200.0, 400.0, 800.0],
                       metavar="MS", help="fixed decision latencies in ms (--latency fixed:MS), distinct; the "
                                          "smallest is the reference of the paired ΔDS (default 0 100 200 400 800)")
    sweep.add_argument("--seeds", type=int, nargs="+", help="override every scenario's seeds (0 <= seed < 2**32)")
    sweep.add_argument("--out", type=out_dir, default="results",
                       help="where run directories go (a directory, made when missing); default results/")
    sweep.add_argument("--run-id", help="name of the sweep directory; default latency-sweep-<suite>-<hash of the "
                                        "agents and latencies>. Running the same command again resumes it")
    sweep.add_argument("--workers", type=at_least(1, MAX_WORKERS),
                       help=f"run episodes on this many Ray actors (1..{MAX_WORKERS})")
    add_batch_option(sweep)
    sweep.add_argument("--quiet", action="store_true", help="no progress bar")
    add_precision_options(sweep)
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
