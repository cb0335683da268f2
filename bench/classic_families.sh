#!/usr/bin/env bash
# The "Classic families" numbers of the README: an RNN encoder-decoder with attention against a
# from-scratch GPT of about the same size and CPU budget, then MLE-only against adversarial
# training of the RNN, over several seeds. Every job runs on one thread under `nice`, two at a time
# (about 50 minutes in all on 2 cores); the tables come from bench/classic_families_table.py.
# Usage: bench/classic_families.sh [RUN_DIR]        (SEEDS="0 1 2" by default; a rerun skips what is done)
set -euo pipefail
cd "$(dirname "$0")/.."
DG=".venv/bin/dialogen"
R="${1:-runs/classic}"
read -r -a SEEDS <<< "${SEEDS:-0 1 2}"
export OMP_NUM_THREADS=1  # one core each: equal wall budgets are equal CPU budgets
mkdir -p "$R"

RUNNING=0
job() {  # job OUTPUT CMD...: unless OUTPUT exists (a rerun resumes), start CMD in the background,
    local out="$1"; shift  # at most two at once; a failed job stops the script
    if [ -e "$out" ]; then echo "have $out" >&2; return 0; fi
    if (( RUNNING >= 2 )); then wait -n; RUNNING=$((RUNNING - 1)); fi
    nice "$@" &
    RUNNING=$((RUNNING + 1))
}
drain() { while (( RUNNING > 0 )); do wait -n; RUNNING=$((RUNNING - 1)); done; }

# 1. same data, vocabulary recipe (8000-token BPE trained on the training split), windows and budget
COMMON=(--init scratch --data chitchat --train-on both --vocab-size 8000 --max-len 256 --batch-size 16
        --lr 2e-3 --warmup-steps 50 --max-steps 800 --max-minutes 8 --eval-every 200 --no-progress)
job "$R/gpt/best" "$DG" train "${COMMON[@]}" --out "$R/gpt" --n-layer 3 --n-head 4 --d-model 128
job "$R/rnn/best" "$DG" train "${COMMON[@]}" --out "$R/rnn" --arch rnn --rnn-cell gru --rnn-attention general \
    --rnn-emb-dim 128 --rnn-hidden 96 --context-turns 3
drain

# 2. one fixed sample of the test split for every model: 300 replies, 3 turns of context.
#    Per seed, a discriminator pretrained on the RNN's samples (its own sample of conversations).
EVAL=(--split test --examples 300 --sample-seed 0 --context-turns 3 --max-new-tokens 32 --seed 0
      --compare greedy,top-p --batch-size 16)
ADV=(--data chitchat --max-new-tokens 24 --batch-size 32 --turns 3)
job "$R/eval-gpt.json" "$DG" eval --model "$R/gpt/best" "${EVAL[@]}" --output "$R/eval-gpt.json"
for s in "${SEEDS[@]}"; do
    job "$R/d-$s" "$DG" train-discriminator "${ADV[@]}" --generator "$R/rnn/best" --out "$R/d-$s" --steps 300 --lr 1e-3 \
        --seed "$s"
done
drain

# 3. adversarial training of the RNN (Li et al. 2017): 150 rounds of one d-step, one g-step and one
#    MLE step; and a control run with the same 150 teacher-forced steps but no adversary
ROUNDS=(--rounds 150 --mle-steps 1 --g-lr 5e-4 --d-lr 5e-4 --valid-pairs 200)
for s in "${SEEDS[@]}"; do
    job "$R/rnn-adv-$s" "$DG" train-adversarial "${ADV[@]}" "${ROUNDS[@]}" --generator "$R/rnn/best" \
        --discriminator "$R/d-$s" --out "$R/rnn-adv-$s" --d-steps 1 --g-steps 1 --seed "$s"
    job "$R/rnn-mle-$s" "$DG" train-adversarial "${ADV[@]}" "${ROUNDS[@]}" --generator "$R/rnn/best" \
        --discriminator "$R/d-$s" --out "$R/rnn-mle-$s" --d-steps 0 --g-steps 0 --seed "$s"
done
drain

# 4. an evaluator trained apart (its own seed and sample of conversations) on the samples of every
#    generator; then every generator on the same test sample, with adversarial success
GENS=(rnn/best)
for s in "${SEEDS[@]}"; do GENS+=("rnn-mle-$s" "rnn-adv-$s"); done
GEN_FLAGS=()
for g in "${GENS[@]}"; do GEN_FLAGS+=(--generator "$R/$g"); done
job "$R/evaluator" "$DG" train-discriminator "${ADV[@]}" "${GEN_FLAGS[@]}" --out "$R/evaluator" --steps 700 --lr 1e-3 --seed 100
drain
for g in "${GENS[@]}"; do
    job "$R/eval-${g%%/*}.json" "$DG" eval --model "$R/$g" "${EVAL[@]}" --evaluator "$R/evaluator" --output "$R/eval-${g%%/*}.json"
done
drain
.venv/bin/python bench/classic_families_table.py "$R"
