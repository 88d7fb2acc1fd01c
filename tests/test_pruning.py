import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from prunedrive.models.pruning import (capture_block_inputs, driving_calibration, find_linears, generic_text_calibration,
                            nm_mask, parse_pattern, prune, prune_linears_with_inputs, prune_magnitude, prune_wanda,
                            run_block, sparsity_report, unstructured_mask)
from prunedrive.models.pruning.calibration import feed_linears, sequential_blocks
from prunedrive.models.pruning.masks import decoder_layers
from prunedrive.models.pruning.owl import owl_outlier_ratios, owl_sparsities_from_ratios, prune_owl
from prunedrive.models.pruning.sparsegpt import Hessian, sparsegpt_prune_linear
from prunedrive.models.pruning.wanda import ColumnNorms, wanda_prune_linear

VOCAB = 100



pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_lm(layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def lm():
    return tiny_lm()


@pytest.fixture
def calib():
    return generic_text_calibration(VOCAB, n_samples=4, length=16, seed=0)


def test_parse_pattern():
    assert parse_pattern("2:4") == (2, 4) and parse_pattern(" 4 : 8 ") == (4, 8) and parse_pattern(None) is None
    for bad in ["2-4", "4:2", "0:4", "a:b", "2:4:8", "4:4"]:
        with pytest.raises(ValueError):
            parse_pattern(bad)


def test_dispatcher_errors(lm, calib):
    with pytest.raises(ValueError, match="unknown"):
        prune(lm, "random", 0.5)
    with pytest.raises(ValueError, match="calibration"):
        prune(lm, "wanda", 0.5)
    with pytest.raises(ValueError, match="disagrees"):
        prune(lm, "magnitude", 0.7, pattern="2:4")
    with pytest.raises(ValueError):
        prune(lm, "magnitude", 1.0)
    with pytest.raises(ValueError, match="base"):
        prune(lm, "owl", 0.5, calibration=calib, base="nope")


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_exact_sparsity_and_model_still_runs(lm, calib, method):
    head, emb = lm.lm_head.weight.clone(), lm.model.embed_tokens.weight.clone()
    report = prune(lm, method, 0.5, calibration=calib)
    assert set(report["per_layer"]) == set(find_linears(lm)) and "lm_head" not in report["per_layer"]
    assert len(report["per_layer"]) == 2 * 7
    for name, frac in report["per_layer"].items():
        assert frac == 0.5, name
    assert report["global"] == 0.5 and report["per_block"] == [0.5, 0.5]
    assert torch.equal(lm.lm_head.weight, head) and torch.equal(lm.model.embed_tokens.weight, emb)
    # the pruned model still runs (layers got position_embeddings etc. during sequential calibration)
    assert torch.isfinite(lm(**calib[0]).logits).all()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "owl"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_groups_hold_exactly_n_zeros(lm, calib, method, pattern):
    n, m = parse_pattern(pattern)
    report = prune(lm, method, pattern=pattern, calibration=calib)
    assert report["global"] == n / m
    # OWL on N:M moves N per block (round(s_l * m)); the other methods use N everywhere
    per_block = [round(s * m) for s in report["layer_sparsities"]] if method == "owl" else [n, n]
    if method == "owl" and pattern == "4:8":
        assert sorted(per_block) == [3, 5]  # the outlier-based shift is visible at this group size
    for i, block in enumerate(decoder_layers(lm)):
        for name, lin in find_linears(block).items():
            zeros = (lin.weight == 0).reshape(lin.out_features, -1, m).sum(-1)
            assert (zeros == per_block[i]).all(), name


def test_mask_helpers():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 8.0, 5.0, 7.0, 6.0]])
    assert nm_mask(scores, 2, 4).tolist() == [[False, True, False, True, False, True, False, True]]
    assert unstructured_mask(scores, 0.25).tolist() == [[False, True, False, True] + [False] * 4]
    rows = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert unstructured_mask(rows, 0.5, per_row=True).tolist() == [[True, False], [True, False]]
    assert unstructured_mask(rows, 0.5, per_row=False).tolist() == [[True, True], [False, False]]
    ties = torch.ones(3, 10)  # all tied: a threshold compare would prune everything, topk prunes exactly k
    assert unstructured_mask(ties, 0.3).sum() == 9 and unstructured_mask(ties, 0.3, per_row=False).sum() == 9
    with pytest.raises(ValueError, match="divisible"):
        nm_mask(torch.ones(2, 6), 2, 4)


def test_wanda_prefers_larger_activation_on_tied_magnitudes():
    # Same |W| in both setups; only which column carries the large activations changes.
    # Any rule blind to activations prunes the same column in both, so one of the two asserts fails.
    for big_col in (0, 1):
        lin = nn.Linear(4, 3, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.tensor([[1.0, -1.0, 5.0, 5.0], [-1.0, 1.0, 5.0, -5.0], [1.0, 1.0, -5.0, 5.0]]))
        x = torch.randn(256, 4)
        x[:, big_col] *= 10.0
        x[:, 1 - big_col] *= 0.1
        prune_linears_with_inputs(lin, lambda m: m(x), "wanda", 0.25)
        assert (lin.weight[:, big_col] != 0).all() and (lin.weight[:, 1 - big_col] == 0).all()
        assert (lin.weight[:, 2:] != 0).all()


def test_sparsegpt_reconstructs_better_than_wanda(lm, calib):
    hidden, kwargs = capture_block_inputs(lm, calib + generic_text_calibration(VOCAB, 8, 32, seed=1))
    block = decoder_layers(lm)[0]
    for name in ["self_attn.q_proj", "mlp.down_proj"]:
        layer = find_linears(block)[name]
        xs = []
        feed_linears(lambda: run_block(block, hidden, kwargs), {name: layer}, lambda _, x: xs.append(x))
        X = torch.cat(xs)
        wanda_lin, sgpt_lin = copy.deepcopy(layer), copy.deepcopy(layer)
        norms, hess = ColumnNorms(layer), Hessian(layer)
        norms.add(X), hess.add(X)
        wanda_prune_linear(wanda_lin, norms, 0.5)
        sparsegpt_prune_linear(sgpt_lin, hess, 0.5)
        assert (sgpt_lin.weight == 0).float().mean() == 0.5
        with torch.no_grad():
            err_wanda = (layer(X) - wanda_lin(X)).norm()
            err_sgpt = (layer(X) - sgpt_lin(X)).norm()
        assert err_sgpt < err_wanda, (name, err_sgpt, err_wanda)


def test_capture_stores_every_layer_kwarg(lm, calib):
    hidden, kwargs = capture_block_inputs(lm, calib)
    assert len(hidden) == len(kwargs) == len(calib) and hidden[0].shape == (1, 16, 64)
    assert {"position_embeddings", "attention_mask", "position_ids"} <= set(kwargs[0])
    # replaying all blocks then the final norm from the stored inputs reproduces the full forward
    for block in decoder_layers(lm):
        hidden = run_block(block, hidden, kwargs)
    with torch.no_grad():
        logits = lm.lm_head(lm.model.norm(hidden[0]))
        assert torch.allclose(logits, lm(**calib[0]).logits, atol=1e-5)


def test_calibration_via_inputs_embeds_matches_input_ids(lm, calib):
    with torch.no_grad():
        embeds = [{"inputs_embeds": lm.model.embed_tokens(s["input_ids"]), "attention_mask": s["attention_mask"]}
                  for s in calib]
    h_ids, _ = capture_block_inputs(lm, calib)
    h_emb, kw = capture_block_inputs(lm, driving_calibration(embeds))
    assert all(torch.equal(a, b) for a, b in zip(h_ids, h_emb)) and "position_embeddings" in kw[0]
    lm2 = copy.deepcopy(lm)
    prune_wanda(lm, calib, 0.5)
    prune_wanda(lm2, embeds, 0.5)
    for (name, a), b in zip(find_linears(lm).items(), find_linears(lm2).values()):
        assert torch.equal(a.weight == 0, b.weight == 0), name


def test_wanda_is_sequential(lm, calib):
    pruned = copy.deepcopy(lm)
    prune_wanda(pruned, calib, 0.5)
    masks = lambda model, i: {n: l.weight == 0 for n, l in find_linears(decoder_layers(model)[i]).items()}

    def block1_masks(model):  # Wanda masks block 1 would get from the inputs it currently sees
        for i, linears, stats in sequential_blocks(model, calib, ColumnNorms):
            if i == 1:
                probe = copy.deepcopy(linears)
                for n, lin in probe.items():
                    wanda_prune_linear(lin, stats[n], 0.5)
                return {n: lin.weight == 0 for n, lin in probe.items()}

    dense_inputs = block1_masks(lm)  # nothing pruned: block 1 sees dense block-0 outputs
    half = copy.deepcopy(lm)
    decoder_layers(half)[0].load_state_dict(decoder_layers(pruned)[0].state_dict())
    pruned_inputs = block1_masks(half)  # block 0 pruned as in `pruned`, block 1 still dense
    got = masks(pruned, 1)
    assert all(torch.equal(got[n], pruned_inputs[n]) for n in got)
    assert any(not torch.equal(got[n], dense_inputs[n]) for n in got)


def test_owl_sparsities_from_ratios():
    ratios = [0.010, 0.050, 0.030, 0.020]
    s = owl_sparsities_from_ratios(ratios, 0.6, lam=0.08)
    assert sum(s) / 4 == pytest.approx(0.6)
    assert max(s) - min(s) == pytest.approx(0.16)  # normalised span is 2 * lam
    assert sorted(range(4), key=lambda i: s[i]) == sorted(range(4), key=lambda i: -ratios[i])
    assert owl_sparsities_from_ratios([0.02] * 3, 0.5) == [0.5] * 3  # no spread: uniform, no 0/0


def test_owl_on_model(calib):
    lm = tiny_lm(layers=4)
    with torch.no_grad():  # give each block a different number of outlier input channels
        for i, block in enumerate(decoder_layers(lm)):
            for lin in find_linears(block).values():
                lin.weight[:, : 2 * i + 1] *= 30.0
    ratios = owl_outlier_ratios(lm, calib, M=5.0)
    assert len(set(ratios)) == 4
    used = prune_owl(lm, calib, 0.5, base="wanda", M=5.0, lam=0.08)
    assert sum(used) / 4 == pytest.approx(0.5)
    assert sorted(range(4), key=lambda i: used[i]) == sorted(range(4), key=lambda i: -ratios[i])
    for frac, target in zip(sparsity_report(lm)["per_block"], used):
        assert abs(frac - target) <= 1 / 64  # per-row rounding of int(cols * s)
    assert torch.isfinite(lm(**calib[0]).logits).all()


@pytest.mark.parametrize("base", ["magnitude", "sparsegpt"])
def test_owl_other_bases(lm, calib, base):
    report = prune(lm, "owl", 0.6, calibration=calib, base=base)
    assert len(report["layer_sparsities"]) == 2 and report["base"] == base
    assert sum(report["layer_sparsities"]) / 2 == pytest.approx(0.6)
    assert abs(report["global"] - 0.6) < 0.02


def test_magnitude_on_module_without_decoder_blocks():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    prune_magnitude(encoder, 0.25)
    report = sparsity_report(encoder)
    assert report["per_layer"] == {"0": 0.25, "2": 0.25} and "per_block" not in report


def test_calibration_builders():
    a = generic_text_calibration(VOCAB, 3, 10, seed=5)
    b = generic_text_calibration(VOCAB, 3, 10, seed=5)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert a[0]["input_ids"].shape == (1, 10) and int(a[0]["input_ids"].max()) < VOCAB
    pool = generic_text_calibration(VOCAB, 2, 8, seed=0, token_pool=torch.tensor([7, 9]), bos_token_id=1)
    assert pool[0]["input_ids"][0, 0] == 1 and set(pool[0]["input_ids"][0, 1:].tolist()) <= {7, 9}
    samples = [{"inputs_embeds": torch.randn(1, 5, 64), "labels": torch.zeros(1, 5)} for _ in range(6)]
    out = driving_calibration(samples, n_samples=4)
    assert len(out) == 4 and set(out[0]) == {"inputs_embeds", "attention_mask"}
    with pytest.raises(ValueError):
        driving_calibration([{"attention_mask": torch.ones(1, 3)}])


def test_generic_prose_calibration_matches_the_lengths_it_is_given():
    from prunedrive.models.pruning import generic_corpus, prose_calibration, random_token_calibration

    text, description = generic_corpus()
    assert len(text) > 400_000 and "pydoc_data.topics" in description
    assert "traffic light" not in text.lower()  # not driving text
    ids = list(range(1000))
    samples = prose_calibration(ids, [5, 9, 3], seed=1)
    assert [s["input_ids"].shape[1] for s in samples] == [5, 9, 3]
    for s in samples:  # contiguous windows: word order kept
        window = s["input_ids"][0].tolist()
        assert window == list(range(window[0], window[0] + len(window)))
    assert torch.equal(prose_calibration(ids, [5], seed=1)[0]["input_ids"], samples[0]["input_ids"])
    assert prose_calibration(ids, [4], seed=0, bos_token_id=7)[0]["input_ids"][0, 0] == 7
    rand = random_token_calibration(VOCAB, [4, 6], seed=0)
    assert [s["input_ids"].shape for s in rand] == [(1, 4), (1, 6)] and int(rand[1]["input_ids"].max()) < VOCAB
    with pytest.raises(ValueError):
        prose_calibration(ids[:3], [5])


def test_owl_report_carries_raw_ratios_and_settings(lm, calib):
    report = prune(lm, "owl", 0.5, calibration=calib, M=3.0, lam=0.05)
    assert len(report["outlier_ratios"]) == 2 and all(0 <= r <= 1 for r in report["outlier_ratios"])
    assert report["owl"] == {"M": 3.0, "lam": 0.05, "base": "wanda"}
    if report["outlier_ratios"][0] != report["outlier_ratios"][1]:
        assert max(report["layer_sparsities"]) - min(report["layer_sparsities"]) == pytest.approx(0.1)


def test_weighted_owl_keeps_the_parameter_weighted_mean():
    s = owl_sparsities_from_ratios([0.01, 0.05, 0.03], 0.5, lam=0.08, weights=[10, 1, 100])
    assert (s[0] * 10 + s[1] * 1 + s[2] * 100) / 111 == pytest.approx(0.5)
    assert max(s) - min(s) == pytest.approx(0.16)


def test_nm_leaves_layers_it_cannot_divide_dense():
    lin = nn.Linear(6, 4)
    before = lin.weight.detach().clone()
    prune_linears_with_inputs(lin, lambda m: m(torch.randn(8, 6)), "wanda", None, pattern="2:4")
    assert torch.equal(lin.weight, before)
    prune_linears_with_inputs(lin, lambda m: m(torch.randn(8, 6)), "sparsegpt", None, pattern="2:4")
    assert torch.equal(lin.weight, before)
    prune_magnitude(lin, None, pattern="2:4")
    assert torch.equal(lin.weight, before)
