#!/usr/bin/env bash
# docs/lab.md §e and §f (issue 24): SDTT with a learned teacher that is close to the truth, and TCS, on the
# lab preset `easy` (lab:W=8,min_len=3,max_len=3,p_end=0.03; windows of L = 64 tokens).
# One job at a time, one thread each (a shared 2-core CPU). From the repository root:
#     bash experiments/lab_sdtt_easy.sh                  # every stage in order
#     bash experiments/lab_sdtt_easy.sh teacher curves   # some stages: pilots teacher curves sdtt kl ideal tables probe tcs
# Re-runnable: a step whose output exists is skipped. Runs under runs/, logs under logs/ (both git-ignored).
# SEEDS (default "1 2 3") and N (steps per SDTT round, default 500) may be set in the environment.
set -euo pipefail
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
LOCK=${LOCK:-/tmp/tinydiff-lab.lock}  # one heavy job at a time
R=runs/labeasy; E=$R/eval; SEEDS=${SEEDS:-1 2 3}; N=${N:-500}
mkdir -p $R logs
# run LOG CMD...: one job under the lock, its output and time in logs/LOG.log (written as LOG.log.part until it succeeds)
run() { local log=logs/$1.log; shift; echo "+ $* > $log" >&2
        /usr/bin/time -a -o $log.part -f "%e s wall, %U s user (OMP_NUM_THREADS=1)" flock "$LOCK" "$@" > $log.part 2>&1
        mv $log.part $log; }
once() { if [ -e "$1" ]; then echo "= $1 exists, skipped" >&2; else shift; run "$@"; fi; }  # once OUTPUT LOG CMD...
EASY=lab:easy
EV="--num_samples 512 --batch_size 64 --seed 0"  # experiments/lab_paired.py: common random numbers across arms

pilots() {  # the pilot table of §e: 4L/128d, L = 64, batch 64, 1200 steps (~6 CPU-minutes each)
    for spec in lab:W=16 lab:W=8 lab:W=4 lab:W=8,delta=0.05 lab:W=8,min_len=3,max_len=3 \
                lab:W=8,min_len=3,max_len=3,delta=0.05 lab:W=4,min_len=3,max_len=3 lab:W=8,min_len=3,max_len=3,p_end=0.03; do
        n=$(echo $spec | tr ':=,' '___')
        once runs/pilot/$n/ckpt.pt pilot-$n-train python train.py --data $spec --seq_len 64 --batch_size 64 \
            --max_iters 1200 --eval_interval 400 --eval_tokens 16384 --lr 3e-3 --lr_schedule cosine --warmup 50 \
            --seed 1337 --out_dir runs/pilot/$n
        once logs/pilot-$n-eval.log pilot-$n-eval python eval.py --ckpt runs/pilot/$n/ckpt.pt --steps 8,32,128 \
            --num_samples 256 --batch_size 64 --val_tokens 32768 --val_draws 4 --lab_draws 4096 --seed 0
        once logs/pilot-$n-oracle.log pilot-$n-oracle python experiments/lab_instance.py $spec --L 64 --steps 8,32,128 --n 256
    done
}

teacher() {  # the teacher: 6000 steps x 4096 tokens, ~29 CPU-minutes; its bound against the truth (1024 windows x 16 t)
    once $R/teacher/ckpt.pt labeasy-teacher python train.py --data $EASY --seq_len 64 --batch_size 64 --max_iters 6000 \
        --eval_interval 1000 --eval_tokens 16384 --lr 3e-3 --lr_schedule cosine --warmup 100 --seed 1337 --out_dir $R/teacher
    once logs/labeasy-teacher-eval.log labeasy-teacher-eval python eval.py --ckpt $R/teacher/ckpt.pt --steps 8,32,128 \
        --num_samples 256 --batch_size 64 --val_tokens 65536 --val_draws 16 --lab_draws 4096 --seed 0
}

curves() {  # the step curves of the teacher and of the exact denoiser, once (reused by every seed's table)
    local a=()
    for K in 4 8 16 32 64 128; do a+=(teacher=$R/teacher/ckpt.pt@$K oracle=oracle:$R/teacher/ckpt.pt@$K); done
    run labeasy-curves python experiments/lab_paired.py --dir $E $EV "${a[@]}"
}

sdtt() {  # per seed: SDTT (learned teacher), the control (same steps on the plain loss), SDTT with the exact teacher
    local C="--rounds 4 --iters_per_round $N --teacher_steps 128 --batch_size 64 --lr 3e-4 --warmup 20 --ema 0.99 --eval_tokens 16384"
    local T="--batch_size 64 --lr 3e-4 --warmup 20 --ema 0.99 --eval_tokens 16384 --lr_schedule constant --eval_interval $N --ckpt_interval $N"
    for s in $SEEDS; do
        once $R/sdtt-s$s/round4.pt labeasy-sdtt-s$s python distill.py --method sdtt --teacher $R/teacher/ckpt.pt \
            --teacher_ema $C --seed $s --out_dir $R/sdtt-s$s
        once $R/exact-s$s/round4.pt labeasy-exact-s$s python distill.py --method sdtt --teacher lab-oracle \
            --init $R/teacher/ckpt.pt --teacher_ema $C --seed $s --out_dir $R/exact-s$s
        once $R/control-s$s/iter$N.pt labeasy-control-s$s-1 python train.py --model mdlm --init_from $R/teacher/ckpt.pt \
            --data $EASY --seq_len 64 $T --max_iters $N --seed $s --out_dir $R/control-s$s
        [ -e $R/control-s$s/iter$N.pt ] || cp $R/control-s$s/ckpt.pt $R/control-s$s/iter$N.pt
        for r in 2 3 4; do  # the same run continued exactly (--resume), a copy at every round's end
            once $R/control-s$s/iter$((N * r)).pt labeasy-control-s$s-$r python train.py --resume \
                --max_iters $((N * r)) --out_dir $R/control-s$s
            [ -e $R/control-s$s/iter$((N * r)).pt ] || cp $R/control-s$s/ckpt.pt $R/control-s$s/iter$((N * r)).pt
        done
        local a=() p=()
        for r in 1 2 3 4; do
            K=$((128 / 2 ** r))
            a+=(sdtt-s$s-r$r=$R/sdtt-s$s/round$r.pt@$K exact-s$s-r$r=$R/exact-s$s/round$r.pt@$K
                control-s$s-r$r=$R/control-s$s/iter$((N * r)).pt@$K)
            p+=(--pair control-s$s-r$r@$K:sdtt-s$s-r$r@$K --pair control-s$s-r$r@$K:exact-s$s-r$r@$K
                --pair teacher@$K:sdtt-s$s-r$r@$K --pair teacher@$K:control-s$s-r$r@$K)
        done
        run labeasy-table-s$s python experiments/lab_paired.py --dir $E $EV "${a[@]}" "${p[@]}"
    done
}

kl() {  # why: the student against its teacher's two-step target and against the exact one, per round
    for s in $SEEDS; do
        once logs/labeasy-kl-sdtt-s$s.log labeasy-kl-sdtt-s$s python experiments/lab_sdtt_kl.py --run $R/sdtt-s$s \
            --teacher $R/teacher/ckpt.pt --K0 128
        once logs/labeasy-kl-exact-s$s.log labeasy-kl-exact-s$s python experiments/lab_sdtt_kl.py --run $R/exact-s$s \
            --teacher $R/teacher/ckpt.pt --K0 128 --exact_teacher
    done
    # the floor and the distance to the optimum g with 32 target draws (the plug-in floor is biased low by ~1/M)
    once logs/labeasy-kl32-sdtt-s1.log labeasy-kl32-sdtt-s1 python experiments/lab_sdtt_kl.py --run $R/sdtt-s1 \
        --teacher $R/teacher/ckpt.pt --K0 128 --draws 32
    once logs/labeasy-kl32-exact-s1.log labeasy-kl32-exact-s1 python experiments/lab_sdtt_kl.py --run $R/exact-s1 \
        --teacher $R/teacher/ckpt.pt --K0 128 --draws 32 --exact_teacher
}

probe() {  # why: round 4 of seed 1 again (teacher = its round-3 student, 16 -> 8 steps), one thing changed per
            # variant: the learning rate, its schedule, or the round's length (the first is the run's own round 4)
    local P="--method sdtt --teacher $R/sdtt-s1/round3.pt --rounds 1 --teacher_steps 16 --batch_size 64 --warmup 20 --ema 0.99 \
             --eval_tokens 16384 --seed 1"
    local a=() p=()
    for v in "lr3e-4 500 3e-4 constant" "lr1e-3 500 1e-3 constant" "lr3e-3 500 3e-3 constant" "cos1e-3 500 1e-3 cosine" \
             "lr1e-3x4 2000 1e-3 constant"; do
        set -- $v
        once $R/probe-$1/round1.pt labeasy-probe-$1 python distill.py $P --iters_per_round $2 --lr $3 --lr_schedule $4 \
            --out_dir $R/probe-$1
        a+=(probe-$1=$R/probe-$1/round1.pt@8); p+=(--pair control-s1-r4@8:probe-$1@8)
    done
    run labeasy-probe-table python experiments/lab_paired.py --dir $E $EV "${a[@]}" "${p[@]}" --pair control-s1-r4@8:sdtt-s1-r4@8
    for v in lr3e-4 lr1e-3 lr3e-3 cos1e-3 lr1e-3x4; do
        once logs/labeasy-probe-kl-$v.log labeasy-probe-kl-$v python experiments/lab_sdtt_kl.py --run $R/probe-$v \
            --teacher $R/sdtt-s1/round3.pt --teacher_raw --K0 16 --rounds 1
    done
}

ideal() {  # why: sampling with the optimum of each round's loss for the exact teacher (no network), against the
           # exact denoiser at K and at 2K, paired (experiments/lab_paired.py IdealStudent, 16 target draws a step)
    local a=() p=()
    for K in 64 32 16 8; do
        a+=(ideal=ideal:$R/teacher/ckpt.pt@$K); p+=(--pair oracle@$K:ideal@$K)
    done
    run labeasy-ideal python experiments/lab_paired.py --dir $E $EV --ideal_draws 16 "${a[@]}" "${p[@]}"
    # the plug-in g of 16 draws is noisy: K = 8 again with 64
    run labeasy-ideal64 python experiments/lab_paired.py --dir $E $EV --ideal_draws 64 ideal64=ideal:$R/teacher/ckpt.pt@8 \
        --pair oracle@8:ideal64@8 --pair ideal@8:ideal64@8
}

tables() {  # the §e tables from the sample sets above
    run labeasy-tables python experiments/lab_sdtt_table.py --dir $E --seeds $(echo $SEEDS | tr ' ' ',')
}

tcs() {  # §f: plain (lambda 0) vs TCS with the exact full conditionals (lambda 1), from scratch, 3 seeds
    local C="--method tcs --teacher lab-oracle --data $EASY --seq_len 64 --batch_size 64 --max_iters 1000 --lr 3e-3 \
             --lr_schedule cosine --warmup 50 --ema 0.999 --eval_interval 250 --eval_tokens 16384 --tcs_snapshots 100"
    for s in $SEEDS; do
        for lam in 0 1; do
            once $R/tcs-lam$lam-s$s/ckpt.pt labeasy-tcs-lam$lam-s$s python distill.py $C --tcs_lambda $lam --seed $s \
                --out_dir $R/tcs-lam$lam-s$s
        done
        D=$(python -c "import torch; print(torch.load('$R/tcs-lam0-s$s/ckpt.pt', weights_only=False)['data_dir'])")
        once logs/labeasy-tcs-curves-s$s.log labeasy-tcs-curves-s$s python experiments/tcs_curves.py --data_dir $D \
            --seq_len 64 --eval_tokens 65536 --draws 2 --base plain --run plain=$R/tcs-lam0-s$s --run tcs1=$R/tcs-lam1-s$s --frac 0.5
    done
    # why: the entropy of the exact TCS target here and on §d's instance (the default lab at L = 128)
    once logs/labeasy-tcs-target.log labeasy-tcs-target python experiments/lab_instance.py $EASY --L 64 --steps 8 --n 64
    once logs/lab-tcs-target.log lab-tcs-target python experiments/lab_instance.py lab --L 128 --steps 8 --n 64
}

for stage in ${@:-pilots teacher curves sdtt kl ideal tables probe tcs}; do $stage; done
