import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from prunedrive.models.pruning.dg2pf import (CHECKPOINT, DG2PFConfig, causal_lm_forward, dg2pf_prune, distillation_loss,
                                  finetune_step, gradual_step, magnitude_masks)
from prunedrive.models.pruning.masks import find_linears



pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_lm(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 100, (2, 12), generator=g)
        labels = ids.clone()
        labels[:, :8] = -100  # loss on the "answer" tokens only
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def weights(model):
    return {n: lin.weight for n, lin in find_linears(model).items()}


def test_magnitude_masks_global_and_layer():
    params = {"a": torch.tensor([[0.1, -5.0], [3.0, 0.2]]), "b": torch.tensor([[-0.3, 4.0, 0.05, 6.0]])}
    g = magnitude_masks(params, 0.5, "global")
    assert g["a"].tolist() == [[True, False], [False, True]] and g["b"].tolist() == [[True, False, True, False]]
    layer = magnitude_masks(params, 0.5, "layer")
    assert layer["a"].sum() == 2 and layer["b"].tolist() == [[True, False, True, False]]
    with pytest.raises(ValueError):
        magnitude_masks(params, 0.5, "row")


def test_distillation_loss_uses_selected_positions_only():
    s, t = torch.randn(1, 3, 5), torch.randn(1, 3, 5)
    labels = torch.tensor([[-100, 2, -100]])
    loss = distillation_loss(s, t, labels, T=4.0, alpha=0.75)
    kl = (F.softmax(t[0, 1] / 4, -1) * (F.log_softmax(t[0, 1] / 4, -1) - F.log_softmax(s[0, 1] / 4, -1))).sum()
    ce = F.cross_entropy(s[0, 1:2], labels[0, 1:2])
    assert loss.item() == pytest.approx(((0.75 * kl + 0.25 * ce) * 16).item(), rel=1e-5)
    s2 = s.clone()
    s2[0, 0] += 100  # an ignored position cannot change the loss
    assert distillation_loss(s2, t, labels, 4.0, 0.75).item() == pytest.approx(loss.item())


def test_simulated_pruning_lets_a_pruned_weight_come_back():
    # Only input 0 carries signal, so only column 0 gets gradient. W[0, 0] starts as the smallest weight and is
    # pruned at step 1; its gradient (taken with it at zero) must still reach it, so it grows and is kept at
    # step 2. Freezing pruned weights, or restoring them after the optimizer step, would keep it pruned.
    model = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.001, 0.5, -0.5, 0.4], [0.3, -0.3, 0.6, 0.25]]))
    teacher = copy.deepcopy(model)
    x = torch.zeros(8, 4)
    x[:, 0] = torch.tensor([1.0, -1.0] * 4)
    batch = {"x": x, "y": (x[:, 0] < 0).long()}
    forward = lambda m, b: (m(b["x"]), b["y"])
    config = DG2PFConfig(sparsity=0.25, alpha=0.0, lr=0.5, weight_decay=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    params = {"w": model.weight}

    masks1 = magnitude_masks(params, 0.25)
    assert masks1["w"][0, 0]
    loss = gradual_step(model, teacher, batch, forward, opt, params, masks1, config)
    with torch.no_grad():  # the step's loss was computed with the masked weights
        masked = model.weight.new_tensor([[0.0, 0.5, -0.5, 0.4], [0.3, -0.3, 0.6, 0.0]])
        assert loss == pytest.approx(F.cross_entropy(x @ masked.T, batch["y"]).item() * 16, rel=1e-5)
    assert model.weight[0, 1] == 0.5 and model.weight[1, 3] == 0.25  # masked/unused values restored, untouched
    masks2 = magnitude_masks(params, 0.25)
    assert not masks2["w"][0, 0] and model.weight[0, 0] > 0.25


def test_finetune_keeps_pruned_weights_at_zero():
    model = tiny_lm()
    params = weights(model)
    masks = magnitude_masks(params, 0.5)
    with torch.no_grad():
        for n, m in masks.items():
            params[n][m] = 0
    before = {n: p.detach().clone() for n, p in params.items()}
    config = DG2PFConfig(lr=1e-2)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr)
    for batch in batches(3, seed=0):
        finetune_step(model, batch, causal_lm_forward, opt, params, masks, config)
    for n, m in masks.items():
        assert (params[n][m] == 0).all(), n
    assert any(not torch.equal(params[n][~masks[n]], before[n][~masks[n]]) for n in params)  # it did train


def run(student, checkpoint_dir=None, forward=causal_lm_forward, **overrides):
    config = DG2PFConfig(**{"sparsity": 0.5, "sparsity_epochs": 2, "max_epochs": 3, "finetune_max_epochs": 2,
                            "lr": 1e-3, **overrides})
    return dg2pf_prune(student, tiny_lm(), batches(2, seed=1), batches(1, seed=2), forward, config,
                       checkpoint_dir=checkpoint_dir, progress=False)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_dg2pf_reaches_target_and_applies_mask(scope):
    student = tiny_lm()
    report = run(student, scope=scope)
    assert report["global"] == 0.5 and report["n_params"] == sum(p.numel() for p in weights(student).values())
    if scope == "layer":
        assert all(f == 0.5 for f in report["per_layer"].values())
    assert (student.lm_head.weight != 0).all()
    gradual = [h for h in report["history"] if h["phase"] == "gradual"]
    assert [h["sparsity"] for h in gradual[:2]] == [0.25, 0.5] and gradual[0]["val_loss"] is None
    assert any(h["phase"] == "finetune" for h in report["history"])
    assert torch.isfinite(student(**{k: v for k, v in batches(1, 3)[0].items() if k != "labels"}).logits).all()


def counting(counter):
    def forward(model, batch):
        counter["n"] += 1
        return causal_lm_forward(model, batch)
    return forward


def test_dg2pf_resumes_from_checkpoint(tmp_path):
    fresh, full_calls = tiny_lm(), {"n": 0}
    run(fresh, forward=counting(full_calls))

    def crashing_forward(model, batch):
        crash_calls["n"] += 1
        if crash_calls["n"] == 6:  # epoch 1 is 2 batches x (teacher + student) = 4 calls: crash inside epoch 2
            raise RuntimeError("simulated crash")
        return causal_lm_forward(model, batch)

    crash_calls = {"n": 0}
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tiny_lm(), tmp_path, crashing_forward)
    state = torch.load(os.path.join(tmp_path, CHECKPOINT), weights_only=True)
    assert state["phase"] == "gradual" and state["epoch"] == 1

    resumed, calls = tiny_lm(), {"n": 0}  # a new process would rebuild the model from scratch
    report = run(resumed, tmp_path, counting(calls))
    assert calls["n"] == full_calls["n"] - 4  # epoch 1 was not redone
    assert [h["epoch"] for h in report["history"] if h["phase"] == "gradual"][:3] == [1, 2, 3]
    for a, b in zip(weights(fresh).values(), weights(resumed).values()):
        assert torch.allclose(a, b, atol=1e-6)  # same result as the uninterrupted run

    def must_not_run(model, batch):
        raise AssertionError("a finished run should not train again")

    assert run(tiny_lm(), tmp_path, must_not_run)["global"] == 0.5


def test_defaults_follow_the_fixes():
    config = DG2PFConfig()
    assert config.patience == 2 and config.mask_interval == 1 and config.distill and config.gradual
    with pytest.raises(ValueError):
        run(tiny_lm(), patience=0)


def test_each_part_gets_its_own_target_and_threshold():
    targets = {"model.layers.0": 0.3, "model.layers.1": 0.6}
    student = tiny_lm()
    with torch.no_grad():  # block 1's weights 10x larger: one global threshold would prune block 0 far more
        for lin in find_linears(student.model.layers[1]).values():
            lin.weight *= 10
    report = run(student, targets=targets)
    assert report["parts"] == pytest.approx(targets, abs=1e-3)
    assert report["config"]["targets"] == targets


def test_without_distillation_the_teacher_is_not_needed():
    config = DG2PFConfig(sparsity=0.5, sparsity_epochs=1, max_epochs=1, finetune_max_epochs=1, lr=1e-3, distill=False)
    report = dg2pf_prune(tiny_lm(), None, batches(2, seed=1), batches(1, seed=2), causal_lm_forward, config,
                         progress=False)
    assert report["global"] == 0.5 and {h["phase"] for h in report["history"]} == {"gradual", "finetune"}


def test_without_the_ramp_it_prunes_once_then_fine_tunes():
    student = tiny_lm()
    one_shot = magnitude_masks(weights(student), 0.5)
    config = DG2PFConfig(sparsity=0.5, finetune_max_epochs=2, lr=1e-3, gradual=False)
    report = dg2pf_prune(student, None, batches(2, seed=1), batches(1, seed=2), causal_lm_forward, config,
                         progress=False)
    assert {h["phase"] for h in report["history"]} == {"finetune"} and report["best_val_gradual"] is None
    for n, w in weights(student).items():
        assert torch.equal(w == 0, one_shot[n]), n
    assert report["val_before_finetune"] is not None and report["best_val_finetune"] <= report["val_before_finetune"]


def test_fixed_mask_fine_tuning_keeps_that_mask():
    student = tiny_lm()
    g = torch.Generator().manual_seed(0)
    mask = {n: torch.rand(w.shape, generator=g) < 0.4 for n, w in weights(student).items()}
    with torch.no_grad():
        for n, w in weights(student).items():
            w[mask[n]] = 0
    config = DG2PFConfig(finetune_max_epochs=2, lr=1e-2)
    report = dg2pf_prune(student, None, batches(2, seed=1), batches(1, seed=2), causal_lm_forward, config,
                         progress=False, fixed_mask=mask)
    for n, w in weights(student).items():
        assert torch.equal(w == 0, mask[n]), n
    assert report["epochs"]["gradual"] == 0 and report["train_steps"] == 2 * report["epochs"]["finetune"]


def test_fresh_data_every_epoch():
    asked = []

    def train(epoch):
        asked.append(epoch)
        return batches(2, seed=100 + epoch)

    config = DG2PFConfig(sparsity=0.5, sparsity_epochs=2, max_epochs=3, finetune_max_epochs=2, lr=1e-3)
    report = dg2pf_prune(tiny_lm(), tiny_lm(), train, batches(1, seed=2), causal_lm_forward, config, progress=False)
    assert asked == list(range(len(asked))) and len(asked) == len(report["history"])
