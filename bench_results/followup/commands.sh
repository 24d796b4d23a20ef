# Follow-up runs (not part of the quick profile). Run from the repository root; the full 10k test set is
# evaluated every epoch (--test-subset 10000).
set -e
# 1. Phase lengths: the quick profile's phases doubled where its 4-epoch scaling left one epoch. Same data,
#    model, seed and cosine schedule as the quick profile. prune starts from the quick profile's sl run, so
#    run `splitprune bench deprune --profile quick --out bench_results` first.
splitprune train --method deprune --model vgg11_bn_compact --dataset fashion-mnist --schedule 4:2,all:2 --dtype-up fp16 --dtype-down fp32 --lr-schedule cosine --train-subset 2500 --test-subset 10000 --threads 2 --out bench_results/followup/deprune_2_2
splitprune train --method prune --model vgg11_bn_compact --dataset fashion-mnist --schedule 32:2,4:2 --dtype-up fp16 --dtype-down fp32 --lr-schedule cosine --train-subset 2500 --test-subset 10000 --from bench_results/deprune/runs/sl/checkpoint --threads 2 --out bench_results/followup/prune_2_2
# 2. Cosine against constant lr on the previous quick profile's ca B=4 run (3,000 images, 6 epochs; the
#    constant-lr run is `git show 991a5a6:bench_results/deprune/runs/ca4/full_test.json`).
splitprune train --method ca --model vgg11_bn_compact --dataset fashion-mnist --schedule 4:6 --budget 4 --lr-schedule cosine --train-subset 3000 --test-subset 10000 --threads 1 --out bench_results/followup/cosine_ca4
