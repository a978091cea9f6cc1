"""Training-free evaluation of token pruning/merging across methods and token budgets -> a report.

    python eval.py --config configs/eval/vim_small_imagenet.yaml
    python eval.py --config configs/eval/digits_micro.yaml --max_samples 500 --throughput.iters 10
    python eval.py --help

See tokenprune.evaluate.grid for what is measured and how.
"""
from tokenprune.evaluate.grid import main

if __name__ == "__main__":
    main()
