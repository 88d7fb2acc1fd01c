"""Parameter counts and CPU cost of one closed-loop step for each driving-LLM preset (random weights).

    python benchmarks/llm_presets.py [--threads 1] [--repeats 20]

The tokenizer is trained on a synthetic corpus of the answer templates at each preset's vocabulary size,
so the counts equal those of a trained model. The step is LLMAgent.act (encoder + prefill + greedy decode
of a full-length action answer, forced by teacher tokens to avoid early stops of a random model).
"""
from __future__ import annotations

import argparse
import time

import torch

from prunedrive.models import text
from prunedrive.models.data import synthetic_split
from prunedrive.models.driving_llm import collate
from prunedrive.models.presets import PRESETS
from prunedrive.app.train import untrained_model


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    split = synthetic_split(64)
    rows = []
    for name, preset in PRESETS.items():
        model = untrained_model(preset, split)
        answer = model.tokenizer.encode(split.frame["a_action"][0])
        prompt = model.prompt_ids(text.prompt("action"))
        obs = collate([split.observation(0)])
        with torch.no_grad():
            def step():
                inputs = model.lm_inputs(obs, torch.tensor([prompt]))
                out = model.lm(**inputs, use_cache=True, logits_to_keep=1)
                mask = inputs["attention_mask"]
                for tok in answer:  # fixed-length decode, as a trained model's answer
                    mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
                    out = model.lm(inputs_embeds=model.lm.get_input_embeddings()(torch.tensor([[tok]])),
                                   attention_mask=mask, cache=out.cache, use_cache=True)
            step()
            t = time.perf_counter()
            for _ in range(args.repeats):
                step()
            ms = 1000 * (time.perf_counter() - t) / args.repeats
        n = model.num_parameters()
        rows.append({"preset": name, **n, "tokens_in": model.prefix_tokens + len(prompt), "tokens_out": len(answer),
                     "ms_per_step": ms})
        print(f"{name:6s} params {n['total']:>10,} (encoder {n['encoder']:,}, LM {n['lm']:,})  "
              f"tokens in/out {model.prefix_tokens + len(prompt)}/{len(answer)}  {ms:6.1f} ms/step "
              f"({args.threads} thread{'s' if args.threads > 1 else ''})")
    return rows


if __name__ == "__main__":
    main()
