import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunedrive.agents.llm import LLMAgent
from prunedrive.models import text
from prunedrive.models.data import synthetic_split
from prunedrive.models.driving_llm import DrivingLLM, collate
from prunedrive.models.presets import PRESETS
from prunedrive.models.pruning import prune_magnitude
from prunedrive.models.pruning.masks import find_linears, nm_mask, unstructured_mask
from prunedrive.models.sparse_linear import (PATHS, SparseLinear, accelerate, choose_path, executed_weights, is_2_4,
                                  paths_by_type, storage_bytes)
from prunedrive.app.train import untrained_model

CPU_SPARSE = ("csr", "ell")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def pruned_linear(n_in: int, n_out: int, mask: str, bias: bool = True) -> nn.Linear:
    torch.manual_seed(n_in * 7 + n_out)
    lin = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        scores = lin.weight.abs()
        pruned = nm_mask(scores, 2, 4) if mask == "2:4" else unstructured_mask(scores, float(mask), per_row=False)
        lin.weight.masked_fill_(pruned, 0.0)
    return lin


@pytest.mark.parametrize("shape", [(8, 16), (64, 32), (160, 640), (640, 160)])
@pytest.mark.parametrize("mask", ["0.5", "0.9", "2:4"])
@pytest.mark.parametrize("rows", [1, 7])
@pytest.mark.parametrize("path", CPU_SPARSE)
def test_each_path_equals_the_dense_masked_output(shape, mask, rows, path):
    lin = pruned_linear(*shape, mask, bias=shape[0] != 64)
    layer = SparseLinear(lin, path)
    for x in (torch.randn(rows, shape[0]), torch.randn(1, rows, shape[0])):  # 2-D and HF's (batch, tokens, d)
        with torch.no_grad():
            y, ref = layer(x), F.linear(x, lin.weight, lin.bias)
        assert y.shape == ref.shape
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    nnz = int(torch.count_nonzero(lin.weight))
    assert executed_weights(layer) == nnz if path == "csr" else nnz <= executed_weights(layer) < lin.weight.numel()
    assert storage_bytes(layer) > 0


def test_verification_rejects_a_path_whose_output_differs():
    # With zero tolerance, a path is kept only if it reproduces the dense output bit for bit: the different
    # summation order of csr/ell (almost surely) changes some last bits, and then it must be rejected.
    lin = pruned_linear(160, 640, "0.5")
    gen = torch.Generator().manual_seed(0)  # the inputs choose_path draws
    xs = [torch.randn(1, r, 160, generator=gen) for r in (1, 5)]
    choice = choose_path(lin, (1, 5), rounds=1, number=1, rtol=0.0, atol=0.0)
    assert "dense" in choice.times_us and choice.path in choice.times_us
    with torch.no_grad():
        for path in CPU_SPARSE:
            exact = all(torch.equal(SparseLinear(lin, path)(x), F.linear(x, lin.weight, lin.bias)) for x in xs)
            assert (path in choice.times_us) == exact and (path in choice.rejected) == (not exact)


def test_sparse_linear_keeps_the_weight_and_repacks_after_in_place_pruning():
    lin = pruned_linear(64, 48, "0.5")
    layer = SparseLinear(lin, "csr")
    assert isinstance(layer, nn.Linear) and layer.weight is lin.weight and layer.bias is lin.bias
    assert set(layer.state_dict()) == {"weight", "bias"}
    with torch.no_grad():
        lin.weight.masked_fill_(unstructured_mask(lin.weight.abs(), 0.8, per_row=False), 0.0)
        x = torch.randn(2, 64)
        torch.testing.assert_close(layer(x), F.linear(x, lin.weight, lin.bias), rtol=1e-4, atol=1e-5)
    assert executed_weights(layer) == int(torch.count_nonzero(lin.weight))


def test_2_4_detection_and_semi_structured_is_refused_cleanly_off_cuda():
    assert is_2_4(pruned_linear(16, 8, "2:4").weight) and not is_2_4(pruned_linear(16, 8, "0.5").weight)
    lin = pruned_linear(64, 64, "2:4")
    if not torch.cuda.is_available():
        with pytest.raises(NotImplementedError, match="CUDA"):
            SparseLinear(lin, "semi_structured")
    choice = choose_path(lin, (1, 4), rounds=1, number=2)
    if not torch.cuda.is_available():
        assert "semi_structured" in choice.rejected and "semi_structured" not in choice.times_us
    assert {"dense", "csr", "ell"} <= set(choice.times_us)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 semi-structured kernels need CUDA")
def test_semi_structured_matches_on_cuda():
    lin = pruned_linear(128, 128, "2:4").cuda().half()
    layer = SparseLinear(lin, "semi_structured")
    x = torch.randn(32, 128, device="cuda", dtype=torch.half)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, lin.weight, lin.bias), rtol=1e-2, atol=1e-2)


def test_unknown_paths_are_a_clear_value_error():
    lin = pruned_linear(16, 8, "0.5")
    with pytest.raises(ValueError, match="unknown execution path 'bsr'.*dense, csr, ell"):
        SparseLinear(lin, "bsr")
    model = nn.Sequential(lin)
    with pytest.raises(ValueError, match="unknown execution path"):
        accelerate(model, candidates=("dense", "fast"))
    with pytest.raises(ValueError, match="unknown execution path"):
        accelerate(model, force={"0": "CSR"})
    with pytest.raises(ValueError, match="rows"):
        accelerate(model, rows=(0,))
    assert not any(isinstance(m, SparseLinear) for m in model.modules())  # nothing half-installed


def test_choice_is_the_cheapest_measured_correct_path_weighted_by_calls():
    lin = pruned_linear(160, 640, "0.7")
    choice = choose_path(lin, {1: 20, 12: 1}, rounds=2, number=5)
    assert set(choice.times_us) >= {"dense", "csr", "ell"} and set(choice.times_us["dense"]) == {1, 12}
    for p, ts in choice.times_us.items():
        assert choice.cost_us[p] == pytest.approx(20 * ts[1] + ts[12])
    assert choice.path == min(choice.cost_us, key=choice.cost_us.get)
    assert choice.sparsity == pytest.approx(0.7, abs=1e-3)


# -- on the driving LLM ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def split():
    return synthetic_split(4, seed=1)


def tiny_model(split) -> DrivingLLM:
    return untrained_model(PRESETS["tiny"], split)


@pytest.fixture(scope="module")
def pruned_tiny(split):
    model = tiny_model(split)
    prune_magnitude(model.lm, 0.7)
    return model


def decoder_names(model):
    return {n for n in find_linears(model) if ".layers." in n}


def answer_and_logits(model, split):
    obs = collate([split.observation(0), split.observation(1)])
    ids, _ = model.generate(obs, text.prompt("action"), max_new_tokens=10)
    with torch.no_grad():
        inputs = model.lm_inputs(obs, torch.tensor([model.prompt_ids(text.prompt("action"))] * 2))
        logits = model.lm(**inputs).logits
    return ids, logits


@pytest.mark.parametrize("how", ["auto", "csr", "ell", "dense"])
def test_accelerated_model_answers_exactly_as_the_dense_masked_one(pruned_tiny, split, how):
    model = copy.deepcopy(pruned_tiny)
    ids_ref, logits_ref = answer_and_logits(model, split)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    force = None if how == "auto" else {n: how for n in decoder_names(model)}
    report = accelerate(model, {1: 9, 20: 1}, force=force, rounds=1, number=3)

    pruned = decoder_names(model)
    assert set(report) == pruned  # every pruned layer, and only those (encoder and lm_head are not pruned)
    for name, module in model.named_modules():
        assert isinstance(module, SparseLinear) == (name in pruned)
        if name in pruned:
            assert module.path == report[name].path and (how == "auto" or module.path == how)
    assert not isinstance(model.lm.lm_head, SparseLinear)
    assert model.lm.lm_head.weight is model.lm.get_input_embeddings().weight  # tying survives
    assert set(model.state_dict()) == set(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    ids, logits = answer_and_logits(model, split)
    assert ids == ids_ref
    torch.testing.assert_close(logits, logits_ref, rtol=1e-4, atol=1e-4)
    assert set(paths_by_type(report)) == {"lm.model.layers.*." + n.split("layers.0.")[1]
                                          for n in pruned if "layers.0." in n}


def test_accelerate_keeps_dense_where_told(pruned_tiny):
    model = copy.deepcopy(pruned_tiny)
    report = accelerate(model, (1,), force={"mlp.down_proj": "dense", "self_attn.q_proj": "csr"}, rounds=1, number=2)
    for name, choice in report.items():
        if name.endswith("down_proj"):
            assert choice.path == "dense" and model.get_submodule(name).path == "dense"
        if name.endswith("q_proj"):
            assert choice.path == "csr"
    only_dense = accelerate(copy.deepcopy(pruned_tiny), (1,), candidates=("dense",), rounds=1, number=2)
    assert {c.path for c in only_dense.values()} == {"dense"}
    assert all(set(c.times_us) == {"dense"} for c in only_dense.values())


def test_agent_auto_records_paths_and_executed_flops_follow_them(pruned_tiny, split):
    model = copy.deepcopy(pruned_tiny)
    with torch.no_grad():  # no zero outside the pruned layers (the tied <pad> row is one), so executed can be exact
        model.lm.get_input_embeddings().weight[model.tokenizer.pad_id] = 0.01
    assert all(bool((lin.weight != 0).all()) for n, lin in find_linears(model, ()).items() if ".layers." not in n)
    dense_agent = LLMAgent(copy.deepcopy(model), max_new_tokens=6)
    auto = LLMAgent(copy.deepcopy(model), max_new_tokens=6, sparse="auto")
    assert dense_agent.paths == {} and set(auto.paths) == decoder_names(pruned_tiny)
    assert set(auto.paths.values()) <= set(PATHS)
    obs = split.observation(2)
    assert auto.act(obs) == dense_agent.act(obs) and auto.last_text == dense_agent.last_text
    d, a = dense_agent.last_compute(), auto.last_compute()
    assert d["executed_flops"] == d["dense_flops"] > d["effective_flops"]  # dense runs every zero too
    assert a["dense_flops"] == d["dense_flops"] and a["effective_flops"] == d["effective_flops"]
    assert a["effective_flops"] <= a["executed_flops"] <= a["dense_flops"]

    # Everything pruned on csr: executed counts exactly the non-zeros; all dense: exactly the full weights.
    for path, expected in (("csr", "effective_flops"), ("dense", "dense_flops")):
        accelerate(auto.model, force={n: path for n in auto.paths}, rounds=1, number=1)
        auto.refresh_compute()
        assert auto.act(obs) == dense_agent.act(obs)
        c = auto.last_compute()
        assert c["executed_flops"] == c[expected] == d[expected]
    with pytest.raises(ValueError, match="sparse"):
        LLMAgent(pruned_tiny, sparse="fast")
