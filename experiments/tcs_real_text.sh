#!/usr/bin/env bash
# The TCS experiment of docs/tcs.md on real text: tiny shakespeare, byte tokenizer, windows of 128 bytes.
# Every heavy step takes the machine-wide lock (a shared 2-core CPU). Run from an empty folder:
#     bash /path/to/tinydiff/experiments/tcs_real_text.sh /path/to/tinydiff /path/to/tinyshakespeare.txt
set -euo pipefail
REPO=${1:?repository}; TEXT=${2:?tinyshakespeare.txt}
LOCK=${LOCK:-/tmp/tinydiff-cpu.lock}  # one heavy job at a time on a small machine
run() { echo "+ $*" >&2; /usr/bin/time -f "%e s wall, %U s user" flock "$LOCK" "$@"; }
once() { if [ -e "$1" ]; then echo "= $1 exists, skipped" >&2; else shift; run "$@"; fi; }  # re-runnable
C="--data $TEXT --tokenizer bytes --seq_len 128 --batch_size 32 --device cpu --compile false"

# 1. the teacher (AR, 4L/128d) and a judge for gen PPL that is not the teacher (AR, 3L/96d, another seed)
once ar/ckpt.pt python $REPO/train.py --model ar $C --max_iters 800 --lr 3e-3 --lr_schedule cosine --warmup 100 \
    --eval_interval 400 --out_dir ar --seed 1337
once judge/ckpt.pt python $REPO/train.py --model ar $C --n_layer 3 --n_head 4 --n_embd 96 --max_iters 600 --lr 3e-3 \
    --lr_schedule cosine --warmup 100 --eval_interval 600 --out_dir judge --seed 7

# 2. the targets of N fixed training windows, once (topk K = 16 from prefix candidates, suffix window W = 8)
T="--method tcs --teacher ar/ckpt.pt --seq_len 128 --batch_size 32 --device cpu --compile false \
   --tcs_windows 1024 --estimator topk --topk 16 --candidates prefix --window 8"
run python $REPO/distill.py $T --precompute_only

# 3. from scratch: plain MDLM (lambda = 0, the same code path and windows) vs TCS lambda = 0.5 and 1
S="--init scratch --max_iters 600 --lr 3e-3 --warmup 100 --eval_interval 600 --ckpt_interval 600 --tcs_snapshots 60 --seed 1337"
for lam in 0 0.5 1; do
    once scratch-lam$lam/ckpt.pt python $REPO/distill.py $T $S --tcs_lambda $lam --out_dir scratch-lam$lam
done

# 4. fine-tuning: an MDLM trained on the whole train split (train.py's recipe), then 300 more steps on the
#    fixed windows, plain (lambda = 0: the control) vs TCS (lambda = 0.5, 1)
once mdlm/ckpt.pt python $REPO/train.py $C --max_iters 800 --lr 3e-3 --warmup 100 --eval_interval 800 --out_dir mdlm \
    --seed 1337
F="--init mdlm/ckpt.pt --max_iters 300 --lr 5e-4 --warmup 20 --ema 0.99 --eval_interval 300 --ckpt_interval 300 \
   --tcs_snapshots 30 --seed 1337"
for lam in 0 0.5 1; do
    once ft-lam$lam/ckpt.pt python $REPO/distill.py $T $F --tcs_lambda $lam --out_dir ft-lam$lam
done

# 5. curves (data-only val bound, paired s.e.) and samples judged by the non-teacher AR
D=$(python -c "import torch; print(torch.load('ar/ckpt.pt', weights_only=False)['data_dir'])")
run python $REPO/experiments/tcs_curves.py --data_dir $D --seq_len 128 --draws 4 --base plain \
    --run plain=scratch-lam0 --run tcs05=scratch-lam0.5 --run tcs1=scratch-lam1 > curves-scratch.md
run python $REPO/experiments/tcs_curves.py --data_dir $D --seq_len 128 --draws 4 --base control --frac 1 \
    --run control=ft-lam0 --run tcs05=ft-lam0.5 --run tcs1=ft-lam1 > curves-ft.md
for m in scratch-lam0 scratch-lam0.5 scratch-lam1 mdlm ft-lam0 ft-lam0.5 ft-lam1; do
    run python $REPO/eval.py --ckpt $m/ckpt.pt --judge judge/ckpt.pt --steps 128 --num_samples 32 \
        --val_tokens 0 --device cpu > eval-$m.log
done
run python $REPO/eval.py --ckpt ar/ckpt.pt --judge judge/ckpt.pt --num_samples 32 --val_tokens 32768 --device cpu > eval-ar.log
