#!/bin/sh
# The GPU runs recorded in the README (one NVIDIA H200, no hub, no vLLM): random-init models of SmolLM2-135M's
# and Qwen2.5-0.5B's shapes, plain TRL bf16 vs grpo-math, the smoke recipe's and the Qwen recipe's GRPO settings.
#   sh bench/gpu/run.sh [TOKENIZER_DIR]
set -e
python3 bench/gpu/make_models.py ${1:+--tokenizer "$1"}
cd bench
python3 grpo_step.py --model runs/bench-models/smol --paths trl-bf16 grpo-math --steps 3 --warmup 1
python3 grpo_step.py --recipe "$PWD/gpu/qwen2.5-0.5b-shape.yaml" --paths trl-bf16 grpo-math --steps 2 --warmup 1 \
    --max_completion_length 512
