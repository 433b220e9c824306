"""A training run for the fault-injection tests: kill it at any moment, run it again, it finishes the same.

Shuffled data, dropout, AdamW with warmup-cosine, gradient accumulation, fp16 loss scaling, and a
checkpoint every 2 updates. Usage: ``python tests/fault_worker.py RUN_DIR`` — checkpoints go to
RUN_DIR/checkpoints and the final parameters to RUN_DIR/final.ckpt.
"""

import sys
import time
from pathlib import Path

import torch
from torch import nn

import fnlight as fl
from fnlight.optim import adamw, warmup_cosine


def main(run_dir: Path) -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(192, 16, generator=g), torch.randint(0, 4, (192,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 4))
    step = fl.make_train_step(model, fl.losses.cross_entropy, adamw(warmup_cosine(1e-2, 4, 40)))
    step = fl.with_amp(step, dtype="fp16", init_scale=2.0**10, growth_interval=3)
    step = fl.with_grad_accum(step, every=2)
    step = fl.with_checkpointing(step, directory=run_dir / "checkpoints", every=2, keep_last=2)
    loader = fl.Loader((x, y), batch_size=16, shuffle=True, seed=3)

    @fl.every(1)
    def report(state, metrics):  # the test kills the run soon after an update it picks
        print("update", int(state.step), flush=True)
        time.sleep(0.01)

    state = step.init(seed=5)
    print("start", int(state.step), flush=True)
    state = fl.fold(step, state, loader, epochs=4, observers=[report], progress=False)
    fl.checkpoint.save(run_dir / "final.ckpt", {"params": state.params, "opt": state.opt_state, "step": int(state.step)})
    print("done", int(state.step))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
