"""Learning rate x seed on the quickstart (4 runs).

    python sweep.py --config=configs/quickstart.py --sweep=configs/sweeps/quickstart_lr.py \
        --workdir=workdirs/sweep_quickstart_lr
"""


def get_sweep(h):
    return h.product([h.sweep("optim.lr", [1e-3, 3e-3]), h.sweep("seed", [0, 1])])
