#!/usr/bin/env python
"""Fine-tune or evaluate a pruned backbone with LightningCLI (fit / validate / test).

    python train.py fit      -c configs/data/imagenet.yaml -c configs/trainer/gpu_1.yaml \
                             -c configs/experiment/finetune_vim_s_papr_ss_kd.yaml --run_dir runs/ft
    python train.py fit      -c <same configs> --run_dir runs/ft --ckpt_path last     # resume exactly
    python train.py validate -c configs/data/imagenet.yaml -c configs/trainer/gpu_1.yaml \
                             -c configs/model/vim_small.yaml -c configs/pruning/papr_ss.yaml

`python train.py fit --help` lists every option; see tokenprune/lit/cli.py and slurm/README.md.
"""
from tokenprune.lit.cli import main

if __name__ == "__main__":
    main()
