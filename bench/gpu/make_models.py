"""Random-init models for timing GRPO steps on a machine with no hub access (bench/gpu/run.sh).

SmolLM2-135M's architecture (``runs/bench-models/smol``) and Qwen2.5-0.5B's (``runs/bench-models/qwen-shape``:
24 layers, 896 wide, 14/2 heads, vocabulary cut to SmolLM2's 49,152 tokens), both with SmolLM2's tokenizer.
Random weights never write ``</answer>`` or EOS, so every completion runs to the token limit: a worst case, the
same for every path.

    python bench/gpu/make_models.py [--tokenizer DIR]   # default: the embedded model's converted folder
"""

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config

ROOT = Path(__file__).resolve().parents[2]  # the project (bench/grpo_step.py runs there too)
FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", help="folder with SmolLM2's tokenizer and config.json")
    parser.add_argument("--output", default="runs/bench-models", help="relative to the project root")
    args = parser.parse_args()
    if args.tokenizer is None:
        from grpo_math.models import resolve_model

        args.tokenizer = resolve_model("embedded")
    source = Path(args.tokenizer)
    qwen = Qwen2Config(
        vocab_size=49152,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    for name, config in (("smol", AutoConfig.from_pretrained(source)), ("qwen-shape", qwen)):
        target = ROOT / args.output / name
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(target)
        for f in FILES:
            shutil.copy(source / f, target / f)
        print(f"{target}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters")


if __name__ == "__main__":
    main()
