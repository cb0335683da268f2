#!/usr/bin/env bash
# The "Classic families" numbers of the README: an RNN encoder-decoder with attention against a
# from-scratch GPT of about the same size and CPU budget, then MLE-only against adversarial
# training of the RNN. Each step runs alone under `nice`; the whole script takes about an hour on
# 2 cores. Usage: bench/classic_families.sh [RUN_DIR]   (default: runs/classic)
set -euo pipefail
cd "$(dirname "$0")/.."
DG=".venv/bin/dialogen"
R="${1:-runs/classic}"
MINUTES="${MINUTES:-8}"   # training budget of each model, wall-clock minutes
STEPS="${STEPS:-3000}"    # schedule length; the time budget usually ends a run first
mkdir -p "$R"

# 1. the same data, vocabulary recipe (8000-token BPE trained on the training split), turns and budget
COMMON=(--init scratch --data chitchat --train-on both --vocab-size 8000 --max-len 256 --batch-size 16
        --lr 2e-3 --warmup-steps 50 --max-steps "$STEPS" --max-minutes "$MINUTES" --eval-every 250 --no-progress)
nice "$DG" train "${COMMON[@]}" --out "$R/gpt" --n-layer 3 --n-head 4 --d-model 128
nice "$DG" train "${COMMON[@]}" --out "$R/rnn" --arch rnn --rnn-cell gru --rnn-attention general \
    --rnn-emb-dim 128 --rnn-hidden 96 --context-turns 3

# 2. the same fixed sample of the test split for both: 300 replies, context of 3 turns
EVAL=(--split test --examples 300 --sample-seed 0 --context-turns 3 --max-new-tokens 32 --seed 0
      --compare greedy,top-p --batch-size 16)
nice "$DG" eval --model "$R/gpt/best" "${EVAL[@]}" --output "$R/eval-gpt.json" | tee "$R/eval-gpt.md"
nice "$DG" eval --model "$R/rnn/best" "${EVAL[@]}" --output "$R/eval-rnn.json" | tee "$R/eval-rnn.md"

# 3. adversarial training of the RNN (Li et al. 2017): pretrain D, then the GAN rounds
ADV=(--data chitchat --max-new-tokens 24 --batch-size 32 --turns 3)
nice "$DG" train-discriminator "${ADV[@]}" --generator "$R/rnn/best" --out "$R/d" --steps 300 --lr 1e-3
nice "$DG" train-adversarial "${ADV[@]}" --generator "$R/rnn/best" --discriminator "$R/d" --out "$R/rnn-adv" \
    --rounds 150 --d-steps 1 --g-steps 1 --mle-steps 1 --g-lr 1e-4 --d-lr 1e-4 --valid-pairs 200

# 4. a separately trained evaluator (another seed, samples of both generators), then both generators
nice "$DG" train-discriminator "${ADV[@]}" --generator "$R/rnn/best" --generator "$R/rnn-adv" \
    --out "$R/evaluator" --steps 300 --lr 1e-3 --seed 1
for g in rnn/best rnn-adv; do
    nice "$DG" eval --model "$R/$g" "${EVAL[@]}" --evaluator "$R/evaluator" --no-ppl \
        --output "$R/eval-adv-${g%%/*}.json" | tee "$R/eval-adv-${g%%/*}.md"
done
