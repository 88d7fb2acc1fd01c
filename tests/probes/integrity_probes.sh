#!/usr/bin/env bash
# Issue #11 probes, as a new user would try them (manual, not run by pytest): bash tests/probes/integrity_probes.sh
# on an installed clone. Prints: probe | exit code | first message line.
set -u
W=$(mktemp -d); cd "$W"
probe() { local name="$1"; shift; local out; out=$("$@" 2>&1); local rc=$?; printf '%-58s exit %s | %s\n' "$name" "$rc" "$(echo "$out" | grep -m1 -iE 'error|fail|warn|refus|timeout|clamp|quarantin|regress' | cut -c1-150)"; }
cat > one.yaml <<'Y'
name: one
scenarios:
  - {name: short, kind: highway_cruise, seeds: [1], lanes: 2, vehicles: 4, speed_limit_mps: 20, route_length_m: 60, duration_s: 12}
Y
probe "negative seed"                      prunedrive run --suite one.yaml --agent constant --seeds 1 5 -1 --quiet
probe "duplicate seeds"                    prunedrive run --suite one.yaml --agent constant --seeds 1 1 --quiet
probe "--retries -1"                       prunedrive run --suite one.yaml --agent constant --retries -1 --quiet
probe "--workers 0"                        prunedrive run --suite one.yaml --agent constant --workers 0 --quiet
probe "run id outside --out"               prunedrive run --suite one.yaml --agent constant --run-id ../../x --quiet
printf 'name: ../../x\nscenarios:\n  - {name: a, kind: highway_cruise}\n' > bad1.yaml
probe "suite name outside --out"           prunedrive run --suite bad1.yaml --quiet
printf 'name: t\nscenarios:\n  - {name: "a b", kind: highway_cruise}\n  - {name: a_b, kind: highway_cruise}\n' > bad2.yaml
probe "scenario names 'a b' and 'a_b'"     prunedrive run --suite bad2.yaml --quiet
printf 'name: t\nscenarios:\n  - {name: a, kind: [highway_cruise]}\n' > bad3.yaml
probe "kind: [list]"                       prunedrive run --suite bad3.yaml --quiet
python - <<'P'
lines = ["name: t", "a0: &a0 [x, x, x, x, x, x, x, x, x]"] + [f"a{i}: &a{i} [" + ", ".join([f"*a{i-1}"] * 6) + "]" for i in range(1, 12)]
open("bomb.yaml", "w").write("\n".join(lines + ["description: *a11", "scenarios:", "  - {name: a, kind: highway_cruise}"]))
P
probe "YAML alias bomb (time it)"          bash -c 'time prunedrive run --suite bomb.yaml --quiet'
cat > agents_bad.py <<'P'
import sys, time
from prunedrive.harness.action import Control
class A:
    def __init__(self, name, action): self.name, self.action = name, action
    def reset(self, scenario): pass
    def act(self, obs): return self.action()
def wild(): return A("wild", lambda: Control(throttle=5.0, brake=-3.0))
def nan(): return A("nan", lambda: Control(throttle=float("nan")))
def none(): return A("none", lambda: None)
def text(): return A("text", lambda: "full throttle")
def quitter(): return A("quitter", lambda: sys.exit(3))
def hung(): return A("hung", lambda: time.sleep(600))
class ResetFails(A):
    calls = 0
    def reset(self, scenario):
        ResetFails.calls += 1
        if ResetFails.calls == 2: raise RuntimeError("reset exploded")
def resetfail(): return ResetFails("resetfail", lambda: Control(throttle=0.5))
P
export PYTHONPATH=$W
probe "Control(throttle=5, brake=-3)"      prunedrive run --suite one.yaml --agent agents_bad:wild --run-id wild --quiet
python -c "import pandas as pd; e=pd.read_parquet('results/wild/episodes.parquet'); print('  wild: clamped_actions', int(e.clamped_actions.iloc[0]), 'of', int(e.steps.iloc[0]), 'steps; DS', e.driving_score.iloc[0])"
for a in nan none text quitter; do probe "agent returns/does: $a" prunedrive run --suite one.yaml --agent agents_bad:$a agents_bad:wild --run-id $a --quiet; done
python -c "import pandas as pd; e=pd.read_parquet('results/quitter/episodes.parquet'); print('  quitter run:', dict(zip(e.agent, e.status)))"
probe "hung agent, --step-timeout 2"        prunedrive run --suite one.yaml --agent agents_bad:hung --step-timeout 2 --run-id hung --quiet
probe "reset fails in 2nd episode"          prunedrive run --suite one.yaml --agent agents_bad:resetfail --seeds 1 2 3 --run-id rf --quiet
python -c "import pandas as pd; e=pd.read_parquet('results/rf/episodes.parquet').sort_values('seed'); print('  reset-failed row (seed 2):', e[['seed','status','steps','km_driven','collisions','failed_phase']].to_dict('records')[1])"
python -c "import pandas as pd; s=pd.read_parquet('results/rf/steps.parquet'); print('  steps.parquet columns start:', list(s.columns[:5]))"
prunedrive run --suite one.yaml --agent constant --seeds 1 2 3 --run-id torn --quiet >/dev/null 2>&1
f=$(ls results/torn/episodes/*__2.parquet); head -c 40 "$f" > t && mv t "$f"
probe "resume with a torn episode file"     prunedrive run --resume torn --quiet
python -c "import pandas as pd; print('  torn run after resume: seeds', sorted(pd.read_parquet('results/torn/episodes.parquet').seed))"
probe "resume with other --seeds"           prunedrive run --resume torn --seeds 1 2 --quiet
(prunedrive run --suite one.yaml --agent agents_bad:hung --step-timeout 20 --run-id lock --quiet >/dev/null 2>&1 &) ; sleep 8
probe "second writer on one run dir"        prunedrive run --resume lock --quiet
probe "CARLA server absent (time it)"       bash -c 'time prunedrive run --suite carla-devtest --carla-port 1 --quiet'
probe "regress: both sides all failed"      prunedrive regress hung hung
probe "regress: torn episode file"          bash -c "head -c 30 results/wild/episodes.parquet > x; cp -r results/wild results/w2; cp x results/w2/episodes.parquet; rm -f results/w2/episodes/*; prunedrive regress wild w2"
python - <<'P'
import json, shutil, pathlib
src = pathlib.Path("results/wild"); dst = pathlib.Path("results/wild-other-suite"); shutil.copytree(src, dst)
m = json.loads((dst / "manifest.json").read_text()); m["identity"]["suite_hash"] = "0" * 16; (dst / "manifest.json").write_text(json.dumps(m))
P
probe "regress: same suite name, other content" prunedrive regress wild wild-other-suite
python - <<'P'
import shutil, pathlib
from prunedrive.app.train import untrained_model
from prunedrive.models.data import synthetic_split
from prunedrive.models.presets import PRESETS
untrained_model(PRESETS["tiny"], synthetic_split(8, seed=1)).save_pretrained("model")
shutil.copytree("model", "torn_model"); p = pathlib.Path("torn_model/model.safetensors"); p.write_bytes(p.read_bytes()[:200])
shutil.copytree("model", "huge_model"); import json; c = pathlib.Path("huge_model/config.json"); d = json.loads(c.read_text()); d["hidden_size"] = 30000; c.write_text(json.dumps(d))
P
probe "prune --model-out = --model"         prunedrive prune --method magnitude --sparsity 0.5 --model model --model-out model
probe "truncated model.safetensors"         prunedrive run --suite one.yaml --agent llm --model torn_model --quiet
probe "config hidden_size 30000 (time it)"  bash -c 'time prunedrive run --suite one.yaml --agent llm --model huge_model --quiet'
probe "hub name as --model"                 prunedrive run --suite one.yaml --agent text-llm --model Qwen/Qwen2-0.5B --quiet
probe "unknown agent"                       prunedrive run --suite one.yaml --agent nope --quiet
echo "workdir: $W"
