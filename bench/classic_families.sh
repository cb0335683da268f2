#!/usr/bin/env bash
# The "Classic families" numbers of the README: an RNN encoder-decoder with attention against a
# from-scratch GPT of about the same size and CPU budget, then MLE-only against adversarial
# training of the RNN. Every step runs on one thread under `nice`, one after another (about 45
# minutes in all on the reference machine). Usage: bench/classic_families.sh [RUN_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DG=".venv/bin/dialogen"
R="${1:-runs/classic}"
export OMP_NUM_THREADS=1  # one core each: equal wall budgets are equal CPU budgets, even on a busy machine
mkdir -p "$R"

# 1. same data, vocabulary recipe (8000-token BPE trained on the training split), windows and budget
COMMON=(--init scratch --data chitchat --train-on both --vocab-size 8000 --max-len 256 --batch-size 16
        --lr 2e-3 --warmup-steps 50 --max-steps 800 --max-minutes 8 --eval-every 200 --no-progress)
nice "$DG" train "${COMMON[@]}" --out "$R/gpt" --n-layer 3 --n-head 4 --d-model 128
nice "$DG" train "${COMMON[@]}" --out "$R/rnn" --arch rnn --rnn-cell gru --rnn-attention general \
    --rnn-emb-dim 128 --rnn-hidden 96 --context-turns 3

# 2. one fixed sample of the test split for every model: 300 replies, 3 turns of context
EVAL=(--split test --examples 300 --sample-seed 0 --context-turns 3 --max-new-tokens 32 --seed 0
      --compare greedy,top-p --batch-size 16)
nice "$DG" eval --model "$R/gpt/best" "${EVAL[@]}" --output "$R/eval-gpt.json"
nice "$DG" eval --model "$R/rnn/best" "${EVAL[@]}" --output "$R/eval-rnn.json"

# 3. adversarial training of the RNN (Li et al. 2017): pretrain D, then 150 rounds; and a control
#    run with the same 150 teacher-forced steps but no adversary
ADV=(--data chitchat --max-new-tokens 24 --batch-size 32 --turns 3)
nice "$DG" train-discriminator "${ADV[@]}" --generator "$R/rnn/best" --out "$R/d" --steps 300 --lr 1e-3
ROUNDS=(--rounds 150 --mle-steps 1 --g-lr 5e-4 --d-lr 5e-4 --valid-pairs 200)
nice "$DG" train-adversarial "${ADV[@]}" "${ROUNDS[@]}" --generator "$R/rnn/best" --discriminator "$R/d" \
    --out "$R/rnn-adv" --d-steps 1 --g-steps 1
nice "$DG" train-adversarial "${ADV[@]}" "${ROUNDS[@]}" --generator "$R/rnn/best" --discriminator "$R/d" \
    --out "$R/rnn-mle" --d-steps 0 --g-steps 0

# 4. an evaluator trained apart (another seed, another sample of conversations) on the samples of
#    all three generators; then adversarial success on the same test sample
nice "$DG" train-discriminator "${ADV[@]}" --generator "$R/rnn/best" --generator "$R/rnn-mle" \
    --generator "$R/rnn-adv" --out "$R/evaluator" --steps 450 --lr 1e-3 --seed 1
for g in rnn/best rnn-mle rnn-adv; do
    nice "$DG" eval --model "$R/$g" "${EVAL[@]}" --evaluator "$R/evaluator" --output "$R/eval-adv-${g%%/*}.json"
done
