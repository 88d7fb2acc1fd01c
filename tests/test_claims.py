"""`prunedrive claims`: the plan covers the four claims, verdicts follow the CI, the command runs end to end."""
import numpy as np
import pandas as pd
import pytest

from prunedrive.app import claims
from prunedrive.app.claims import Comparison, claims_table, judge, plan
from prunedrive.harness.results import RunDir


def test_the_full_plan_asks_all_four_claims_with_their_controls():
    variants, comparisons = plan()
    by_claim = {c: [x for x in comparisons if x.claim == c] for c in "abcd"}
    assert all(by_claim.values())
    assert {v["sparsity"] for v in variants.values() if v["method"] == "owl"} >= {0.5, 0.7, 0.85, 0.9}
    assert any(v.get("lam") == 0.0 for v in variants.values())                          # (a) the sweep includes 0
    assert {v.get("calibration") for v in variants.values()} >= {"generic", "random"}  # (b)
    assert {v.get("scope") for v in variants.values()} >= {"encoder", "all"}            # (c)
    dg2pf = [v for v in variants.values() if v["method"] == "dg2pf"]
    assert any(v["sparsity"] <= 0.01 for v in dg2pf)                                   # (d) its own training
    assert any(v.get("distill") is False for v in dg2pf) and any(v.get("gradual") is False for v in dg2pf)
    assert any(v.get("finetune") for v in variants.values() if v["method"] == "wanda")  # equal budget
    for c in comparisons:  # every comparison names agents the plan drives
        assert c.candidate in variants and (c.baseline in variants or c.baseline == "llm-dense")


def test_structured_methods_add_claim_e_at_matched_parameter_counts():
    """Claim (e) only when asked; each structured variant against Wanda at the same share removed and against dense;
    nothing above 0.7 (a model with a tenth of its width left is not a comparison), and claims a-d unchanged."""
    plain_variants, plain = plan()
    variants, comparisons = plan(structured=("width", "depth"))
    assert not [c for c in plain if c.claim == "e"] and [c for c in comparisons if c.claim != "e"] == plain
    e = [c for c in comparisons if c.claim == "e"]
    assert {(variants[c.candidate]["method"], variants[c.candidate]["sparsity"]) for c in e} == {
        ("width", 0.5), ("width", 0.7), ("depth", 0.5), ("depth", 0.7)}
    for c in e:
        if c.kind == "non-inferiority":
            assert c.baseline == "llm-dense"
        else:
            assert variants[c.baseline] == {"method": "wanda", "sparsity": variants[c.candidate]["sparsity"]}
    assert set(variants) - set(plain_variants) == {"llm-width-0.5", "llm-width-0.7", "llm-depth-0.5", "llm-depth-0.7"}
    quick_variants, _ = plan((0.7,), quick=True, structured=("owl-width",))
    assert quick_variants["llm-owl-width-0.7"] == {"method": "owl-width", "sparsity": 0.7}


def test_claims_cli_takes_structured_methods_only(monkeypatch):
    from prunedrive.app import cli

    seen = {}
    monkeypatch.setattr(claims, "run_claims", lambda *args, **kwargs: seen.update(kwargs) or 0)
    assert cli.main(["claims", "--methods", "width", "depth", "--quiet"]) == 0
    assert seen["structured"] == ("width", "depth")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["claims", "--methods", "wanda"])  # unstructured: claims a-d have them already
    assert exit_.value.code == 2


@pytest.mark.parametrize("kind, low, high, verdict", [
    ("superiority", 0.5, 9.0, "supported"), ("superiority", -9.0, -0.5, "refuted"),
    ("superiority", -2.0, 3.0, "inconclusive"), ("non-inferiority", -4.0, 2.0, "supported"),
    ("non-inferiority", -12.0, -6.0, "refuted"), ("non-inferiority", -7.0, 1.0, "inconclusive"),
])
def test_verdicts_follow_the_confidence_interval(kind, low, high, verdict):
    assert judge(Comparison("a", "x", "c", "b", kind), low, high) == verdict
    assert judge(Comparison("a", "x", "c", "b", kind), low, high, n=5) == "n too small"


def test_the_table_pairs_episodes_and_reports_the_ci_half_width():
    rng = np.random.default_rng(0)
    rows = []
    for seed in range(30):
        base = float(rng.uniform(50, 90))
        for agent, score in (("llm-wanda-0.85", base), ("llm-owl-0.85", base + 8 + float(rng.normal(0, 2)))):
            rows.append({"agent": agent, "scenario": "s", "seed": seed, "status": "finished", "failure": "",
                         "driving_score": score, "collisions": 0, "km_driven": 0.4})
    [row] = claims_table(pd.DataFrame(rows), [Comparison("a", "OWL vs Wanda", "llm-owl-0.85", "llm-wanda-0.85")],
                         n_boot=2000).to_dict("records")
    assert row["n"] == 30 and row["verdict"] == "supported" and 6 < row["ds_diff"] < 10
    assert 0 < row["ci_half_width"] < 2 and row["coll_per_km_diff"] == 0


def test_claim_rows_carry_the_candidates_measured_step_time_over_the_baselines():
    rows = []
    for seed in range(12):
        for agent, ms in (("llm-width-0.5", 30.0 + seed % 3), ("llm-wanda-0.5", 40.0)):
            rows.append({"agent": agent, "scenario": "s", "seed": seed, "status": "finished", "failure": "",
                         "driving_score": 70.0 + seed, "collisions": 0, "km_driven": 0.4,
                         "agent_wall_s_p50": ms / 1000})
    [row] = claims_table(pd.DataFrame(rows), [Comparison("e", "width vs Wanda", "llm-width-0.5", "llm-wanda-0.5")],
                         n_boot=500).to_dict("records")
    assert row["step_ratio"] == pytest.approx(31.0 / 40.0)  # medians, candidate over baseline


def scope_episodes(drops: dict[str, float], n: int = 30, noise: float = 1.0, seed: int = 0) -> pd.DataFrame:
    """Dense and one agent per `drops` entry ({agent: mean DS drop from dense}) on n paired episodes."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        dense = float(rng.uniform(60, 95))
        for agent, drop in {"llm-dense": 0.0, **drops}.items():
            score = dense - drop - (float(rng.normal(0, noise)) if drop else 0.0)
            rows.append({"agent": agent, "scenario": f"s{i % 5}", "seed": i, "status": "finished", "failure": "",
                         "driving_score": score, "collisions": 0, "km_driven": 0.4})
    return pd.DataFrame(rows)


def test_sensitivity_is_the_drop_per_share_of_the_model_removed_not_per_target():
    # Equal drops at the same target sparsity, but the encoder is a fifth of the model's weights: per weight
    # removed it is four times as sensitive. Dividing by the target (a wrong variant) would call them equal.
    episodes = scope_episodes({"llm-owl-0.5": 8.0, "llm-owl-0.5-encoder": 8.0})
    shares = {"llm-owl-0.5": 0.4, "llm-owl-0.5-encoder": 0.1}
    per_weight = Comparison("c", "encoder vs LM per weight", "llm-owl-0.5-encoder", "llm-owl-0.5", "per-weight")
    same_target = Comparison("c", "LM vs encoder", "llm-owl-0.5", "llm-owl-0.5-encoder")
    rows = claims_table(episodes, [per_weight, same_target], n_boot=2000, model_sparsity=shares).set_index("kind")
    assert rows.loc["per-weight", "ds_diff"] == pytest.approx(8.0 / 1 - 8.0 / 4, abs=0.6)  # per 10% of weights
    assert rows.loc["per-weight", "verdict"] == "supported" and np.isnan(rows.loc["per-weight", "coll_per_km_diff"])
    assert rows.loc["superiority", "verdict"] == "inconclusive"  # the same drop at the same target
    # Without the shares there is nothing to divide by: no verdict rather than a wrong one.
    [row] = claims_table(episodes, [per_weight], n_boot=200).to_dict("records")
    assert np.isnan(row["ds_diff"]) and row["verdict"] == "inconclusive"


def test_the_sensitivity_table_scales_the_drop_and_its_ci():
    episodes = scope_episodes({"llm-owl-0.7": 6.0, "llm-owl-0.7-encoder": 9.0, "llm-owl-0.7-all": 12.0}, noise=2.0)
    agents = [("llm-owl-0.7", "lm", 0.7), ("llm-owl-0.7-encoder", "encoder", 0.7), ("llm-owl-0.7-all", "all", 0.7)]
    shares = {"llm-owl-0.7": 0.56, "llm-owl-0.7-encoder": 0.13, "llm-owl-0.7-all": 0.69}
    table = claims.sensitivity_table(episodes, agents, shares, n_boot=2000).set_index("scope")
    for scope, drop in (("lm", 6.0), ("encoder", 9.0), ("all", 12.0)):
        r = table.loc[scope]
        assert r["n"] == 30 and r["ds_drop"] == pytest.approx(drop, abs=1.0) and r["ci_low"] < r["ds_drop"] < r["ci_high"]
        assert r["drop_per_part"] == pytest.approx(r["ds_drop"] * 0.1 / 0.7)
        assert r["drop_per_model"] == pytest.approx(r["ds_drop"] * 0.1 / shares[r["agent"]])
        assert r["drop_per_model_low"] == pytest.approx(r["ci_low"] * 0.1 / shares[r["agent"]])


def test_the_sensitivity_agents_are_the_plain_owl_variants_of_each_scope():
    variants, comparisons = plan()
    agents = claims.sensitivity_agents(variants)
    assert sorted((scope, s) for _, scope, s in agents) == sorted(
        (scope, s) for scope in ("lm", "encoder", "all") for s in (0.5, 0.7))
    assert all(set(variants[a]) <= {"method", "sparsity", "scope"} for a, _, _ in agents)  # no calibration, lambda
    per_weight = [c for c in comparisons if c.kind == "per-weight"]
    assert {(variants[c.candidate].get("scope"), variants[c.baseline].get("scope", "lm")) for c in per_weight} == {
        ("encoder", "lm")} and len(per_weight) == 2


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from prunedrive.app.train import train

    out = tmp_path_factory.mktemp("tiny")
    return train("tiny", out_dir=out / "model", data_dir=out / "model" / "data", progress=False, threads=1)


def test_the_command_runs_end_to_end_on_a_restricted_plan(tiny_model, tiny_suite, tmp_path, monkeypatch, capsys):
    from prunedrive.app.cli import main

    def two_variants(*args, **kwargs):
        variants = {"llm-owl-0.7": {"method": "owl", "sparsity": 0.7},
                    "llm-wanda-0.7": {"method": "wanda", "sparsity": 0.7}}
        return variants, [Comparison("a", "OWL vs Wanda at 70%", "llm-owl-0.7", "llm-wanda-0.7")]

    monkeypatch.setattr(claims, "plan", two_variants)
    assert main(["claims", "--suite", str(tiny_suite), "--model", str(tiny_model), "--out", str(tmp_path),
                 "--run-id", "c", "--quick", "--quiet"]) == 0
    attachments = RunDir(tmp_path / "c").attachments()
    table = attachments["claims"].load()
    assert list(table.comparison) == ["OWL vs Wanda at 70%"] and table.n.iloc[0] == 3
    assert table.verdict.iloc[0] == "n too small"  # 3 episodes
    assert attachments["sensitivity"].load().empty  # the restricted plan has no scopes
    assert attachments["claims"].section == "prunedrive.app.claims_report:claims_section"
    assert "The seeds' claims" in capsys.readouterr().out
