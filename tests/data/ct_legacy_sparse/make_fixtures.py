"""Writes the sparse compressed-tensors fixtures of tests/test_compressed.py with the library's own compressors.

compressed-tensors dropped its sparse compressors (sparse-bitmask, sparse-24-bitmask) after 0.14.0.1, and the
version we pin (0.20.0) cannot write them any more, while checkpoints in these formats (llm-compressor's
SparseGPT/Wanda output before then) are still around. So the fixtures come from the last library version that
wrote them, run once by hand, and are kept here (a few tens of KB):

    pip install --no-deps --target /tmp/ct014 compressed-tensors==0.14.0.1
    PYTHONPATH=/tmp/ct014 python tests/data/ct_legacy_sparse/make_fixtures.py

Each of bitmask/ and sparse24/ is a save_pretrained directory of a tiny pruned Llama compressed by
ModelCompressor; reference.safetensors holds the pruned dense weights that the two must decompress to.
"""
from pathlib import Path

import compressed_tensors
import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.config import BitmaskConfig, Sparse24BitMaskConfig
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

HERE = Path(__file__).resolve().parent


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def decoder_linears(model):
    return {name: m for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.startswith("model.layers.")}


@torch.no_grad()
def prune_unstructured(model, sparsity: float) -> None:
    for linear in decoder_linears(model).values():
        w = linear.weight
        k = int(w.numel() * sparsity)
        threshold = w.abs().flatten().kthvalue(k).values
        w.masked_fill_(w.abs() <= threshold, 0)


@torch.no_grad()
def prune_24(model) -> None:
    for linear in decoder_linears(model).values():
        groups = linear.weight.view(-1, 4)
        drop = groups.abs().topk(2, dim=1, largest=False).indices
        groups.scatter_(1, drop, 0.0)


def write(name: str, model, sparsity_config) -> None:
    out = HERE / name
    reference = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    compressor = ModelCompressor.from_pretrained_model(model, sparsity_config_or_format=sparsity_config)
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(str(out))
    save_file(reference, str(out / "reference.safetensors"))


def main() -> None:
    print("compressed-tensors", compressed_tensors.__version__)
    model = tiny_llama()
    prune_unstructured(model, 0.6)
    write("bitmask", model, BitmaskConfig(targets=["Linear"], ignore=["lm_head"], global_sparsity=0.6))
    model = tiny_llama()
    prune_24(model)
    write("sparse24", model, Sparse24BitMaskConfig(targets=["Linear"], ignore=["lm_head"], global_sparsity=0.5))


if __name__ == "__main__":
    main()
