#!/usr/bin/env bash
# Issue #11 probes, as a new user would try them (manual, not run by pytest): bash tests/probes/integrity_probes.sh
# on an installed clone. Prints: probe | exit code | first message line.
set -u
REPO=$(cd "$(dirname "$0")/../.." && pwd)
W=$(mktemp -d); cd "$W"
# The line shown: argparse's "error:" line if there is one (its usage lines come first), else the first telling one.
probe() { local name="$1"; shift; local out; out=$("$@" 2>&1); local rc=$?; local line; line=$(echo "$out" | grep -m1 -E '^(prunedrive [a-z-]+: )?error:'); [ -n "$line" ] || line=$(echo "$out" | grep -m1 -iE 'error|fail|warn|refus|timeout|clamp|quarantin|regress'); case "$name" in *"time it"*) line="$(echo "$out" | grep -m1 '^real') | $line";; esac; printf '%-58s exit %s | %s\n' "$name" "$rc" "$(echo "$line" | cut -c1-150)"; }
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

echo "== round three (issue 24): prune outputs, options, hostile agents, text-model directories, imports"
mkdir -p parent && cp -r model parent/dense
probe "prune --model-out = parent of --model"  prunedrive prune --method magnitude --sparsity 0.5 --model parent/dense --model-out parent --overwrite
[ -f parent/dense/model.safetensors ] && echo "  input model still there" || echo "  INPUT MODEL DESTROYED"
probe "prune --model-out inside --model"       prunedrive prune --method magnitude --sparsity 0.5 --model parent/dense --model-out parent/dense/sub
prunedrive train --preset tiny --model-out trained >/dev/null 2>&1  # a model with its data: calibration needs it
(prunedrive prune --method sparsegpt --sparsity 0.5 --model trained --model-out same --calibration-samples 256 >race1.log 2>&1; echo $? >race1.rc) &
(prunedrive prune --method sparsegpt --sparsity 0.7 --model trained --model-out same --calibration-samples 256 >race2.log 2>&1; echo $? >race2.rc) &
wait
echo "  two prunes into one --model-out: exits $(cat race1.rc) and $(cat race2.rc) | $(grep -h -m1 -i error race1.log race2.log | cut -c1-120)"
python -c "import json; print('  the model in same/ is the one reported:', json.load(open('same/sparsity.json'))['target_sparsity'])"
probe "--step-timeout -1"                      prunedrive run --suite one.yaml --agent constant --step-timeout -1 --quiet
probe "--step-timeout nan"                     prunedrive run --suite one.yaml --agent constant --step-timeout nan --quiet
probe "--step-timeout 0"                       prunedrive run --suite one.yaml --agent constant --step-timeout 0 --quiet
probe "--episode-timeout -5"                   prunedrive run --suite one.yaml --agent constant --episode-timeout -5 --quiet
probe "--batch 99999999999"                    prunedrive run --suite one.yaml --agent constant --batch 99999999999 --quiet
probe "--carla-port 99999"                     prunedrive run --suite carla-devtest --carla-port 99999 --quiet
touch afile
probe "--out FILE"                             prunedrive run --suite one.yaml --agent constant --out afile --quiet
probe "unknown --agent-arg keyword"            prunedrive run --suite one.yaml --agent constant --agent-arg nope=1 --quiet
probe "regress --max-drop nan"                 prunedrive regress wild wild --max-drop nan
cat > agents_exit.py <<'P'
import os, sys
from prunedrive.harness.action import Control
class A:
    def __init__(self, name, act): self.name, self._act = name, act
    def reset(self, scenario): pass
    def act(self, obs): return self._act()
def exits(): sys.exit(0)
def raises(): raise RuntimeError("no GPU here")
def hard_exit(): return A("hard_exit", lambda: os._exit(0))
def none_name(): return A(None, lambda: Control(brake=1.0))
def long_name(): return A("x" * 300, lambda: Control(brake=1.0))
P
probe "factory calls sys.exit(0)"              prunedrive run --suite one.yaml --agent agents_exit:exits --seeds 1 2 3 4 --quiet
probe "factory raises"                         prunedrive run --suite one.yaml --agent agents_exit:raises --quiet
probe "os._exit(0) inside act(), in-process"   prunedrive run --suite one.yaml --agent agents_exit:hard_exit --seeds 1 2 3 4 --run-id hardexit --quiet
python -c "import pandas as pd; e=pd.read_parquet('results/hardexit/episodes.parquet'); print('  os._exit run: scored', len(e), 'of 4:', sorted(e.status))" 2>&1 | tail -1
probe "agent named None"                       prunedrive run --suite one.yaml --agent agents_exit:none_name --quiet
probe "agent name of 300 characters"           prunedrive run --suite one.yaml --agent agents_exit:long_name --quiet
printf 'name: t\nscenarios:\n  - {name: a, kind: highway_cruise, options: {foo: bar}}\n' > opts.yaml
probe "options: {foo: bar} on highway"         prunedrive run --suite opts.yaml --agent constant --quiet
prunedrive run --suite one.yaml --agent constant --seeds 1 2 3 --run-id nosteps --quiet >/dev/null 2>&1
rm -f results/nosteps/steps/*__2.parquet
probe "resume with a missing steps file"       prunedrive run --resume nosteps --quiet
python -c "import pandas as pd; s=pd.read_parquet('results/nosteps/steps.parquet'); e=pd.read_parquet('results/nosteps/episodes.parquet'); print('  step rows', len(s), '= episode steps', int(e.steps.sum()), '; episodes', len(e))"
python - "$REPO" <<'P'
import json, os, sys, pathlib
sys.path.insert(0, f"{sys.argv[1]}/tests")
from transformers import AutoModelForCausalLM, GPT2Config
from test_hf_models import _configs, _tokenizer
def save(name, config, template=None, chat=False):
    AutoModelForCausalLM.from_config(config).save_pretrained(name)
    tok = _tokenizer(chat=chat or template is not None)
    if template is not None:
        tok.chat_template = template
    tok.save_pretrained(name)
llama = _configs()["llama"]
save("tm_raises", llama, "{{ raise_exception('no') }}")
save("tm_empty", llama, "{% if false %}x{% endif %}")
save("tm_huge", llama, "{{ 'x' * 2000000000 }}")
save("tm_zero", llama)
os.symlink("/dev/zero", "tm_zero/extra.safetensors")
short = _configs()["gpt2"]; short.n_positions = 64
save("tm_short", short)
P
probe "chat template raises"                   prunedrive run --suite one.yaml --agent text-llm --model tm_raises --quiet
probe "chat template renders empty"            prunedrive run --suite one.yaml --agent text-llm --model tm_empty --quiet
probe "chat template 'x' * 2e9 (time it)"      bash -c 'time prunedrive run --suite one.yaml --agent text-llm --model tm_huge --quiet'
probe "extra *.safetensors -> /dev/zero"       timeout 120 prunedrive run --suite one.yaml --agent text-llm --model tm_zero --quiet
probe "64 positions, longer prompt"            prunedrive run --suite one.yaml --agent text-llm --model tm_short --quiet
probe "prune a 64-position GPT-2 (wanda)"      prunedrive prune --method wanda --sparsity 0.5 --model tm_short --model-out tm_short_pruned
python -c "import json; print('  calibration samples cut to the context:', json.load(open('tm_short_pruned/sparsity.json')).get('calibration_truncated'))" 2>&1 | tail -1
python - <<'P'
import json
record = {"route_id": "RouteScenario_0", "index": 0, "status": "Completed", "num_infractions": 0, "infractions": {},
          "scores": {"score_route": 100.0, "score_penalty": 1.0, "score_composed": 100.0},
          "meta": {"route_length": 100.0, "duration_game": 10.0, "duration_system": 10.0}}
def results(records): return {"entry_status": "Finished", "eligible": True, "sensors": [], "labels": [], "values": [], "_checkpoint": {"records": records, "global_record": {}, "progress": [len(records), len(records)]}}
def dump(name, records): json.dump(results(records), open(name, "w"))
dump("lb_composed.json", [{**record, "scores": {"score_route": 10.0, "score_penalty": 1.0, "score_composed": 100.0}}])
dump("lb_started.json", [{**record, "status": "Started"}, {**record, "route_id": "RouteScenario_1", "index": 1}])
dump("lb_unknown.json", [{**record, "status": "Mostly fine"}])
dump("lb_longid.json", [{**record, "route_id": "R" * 100000}])
dump("lb_rep.json", [{**record, "route_id": "RouteScenario_0_rep99999999999999999999999"}])
dump("lb_10k.json", [{**record, "route_id": f"RouteScenario_{i}", "index": i} for i in range(10000)])
open("lb_deep.json", "w").write('{"entry_status": "Finished", "_checkpoint": {"records": ' + "[" * 200000 + "]" * 200000 + "}}")
P
truncate -s 8G lb_huge.json
for f in composed started unknown longid rep deep huge; do probe "import leaderboard: $f" prunedrive import leaderboard lb_$f.json --run-id lb-$f; done
probe "import leaderboard: 10,000 routes (time it)" bash -c 'time prunedrive import leaderboard lb_10k.json --run-id lb-10k'
echo "workdir: $W"
