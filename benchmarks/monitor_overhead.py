"""Training-step overhead of VarianceAdaptationMonitor at its default interval, P2 and P3.

    python benchmarks/monitor_overhead.py [--problems p2,p3] [--rounds 2] [--interval 50]
        [--p2-batch 128] [--p3-batch 16] [--threads N] [--accelerator auto] [--fused auto|off]

Each problem (P2: ThreeC3D on CIFAR-10-shaped random data; P3: WideResNet404 on
CIFAR-100-shaped random data) trains with M-SVAG in one Lightning ``fit`` with a
TensorBoardLogger (``log_every_n_steps=10`` as in the configs). After a short warm-up fit
(which also pays torch.compile for the fused optimizer path), the steps are cut into
blocks of ``interval`` steps; after one settling block (not counted), blocks alternate
between monitor on and monitor off in the order ABBA ABBA ..., so that drifts in machine
load hit both alike. A block with the
monitor contains exactly one logging step (the monitor logs when
``global_step % interval == 0``), so its time per step is the amortised cost at that
interval. Printed per problem:

* ms/step without and with the monitor (wall time of whole blocks: data, forward,
  backward, optimizer step, Lightning's own logging), their ratio, and the ratio of the
  blocks' process CPU time (less sensitive to other processes on a shared machine);
* ms/step spent inside the monitor's hooks (timed directly, averaged over the 'on'
  blocks), and the in-block ratio: for each 'on' block, its time divided by its time
  minus the monitor's time, averaged over the blocks. Both parts of that ratio come from
  the same block, i.e. the same machine load, so it is the robust figure on a shared
  machine, where the load of other processes can change the step time by a factor of
  several between blocks and the A/B ratios above then measure that, not the monitor.

The models are the problems' real networks; the data are random tensors (no augmentation,
which makes a step cheaper and the relative overhead larger than in real training).
P3's default batch here is 16 rather than 128 because a WRN-40-4 step at 128 takes
about a minute on two CPU cores; a smaller batch makes the step shorter and the relative
overhead larger (conservative). On a GPU pass ``--p3-batch 128``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl  # noqa: E402
from pytorch_lightning.callbacks import Callback  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

import lightning_msvag as lm  # noqa: E402
from lightning_msvag.callbacks import VarianceAdaptationMonitor  # noqa: E402
from lightning_msvag.models import ThreeC3D, WideResNet404  # noqa: E402


class RandomBatches(Dataset):
    """``length`` batches cycling through a small pool of random (inputs, labels)."""

    def __init__(self, batch: int, num_classes: int, length: int, pool: int = 4, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.pool = [
            (torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(0, num_classes, (batch,), generator=gen))
            for _ in range(pool)
        ]
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        return self.pool[i % len(self.pool)]


class WithOptimizer:
    """Mixin: M-SVAG as the optimizer (the problems define none themselves)."""

    fused = None

    def configure_optimizers(self):
        return lm.MSVAG(self.parameters(), lr=0.01, fused=self.fused)


class P2(WithOptimizer, ThreeC3D):
    pass


class P3(WithOptimizer, WideResNet404):
    pass


class Switch(Callback):
    """Forwards to the monitor only in 'on' blocks; times the monitor's hooks and the blocks."""

    def __init__(self, monitor: VarianceAdaptationMonitor, interval: int, pattern):
        self.monitor, self.interval, self.pattern = monitor, interval, pattern
        self.block_times = {True: [], False: []}
        self.block_cpu = {True: [], False: []}  # process CPU time: less sensitive to other load
        self.hook_seconds = 0.0
        self.block_hook: list = []  # monitor seconds per 'on' block
        self._block_hook = 0.0
        self.logged = 0
        self._t0 = None

    def _on(self, trainer) -> bool:
        block = (trainer.global_step - 1) // self.interval if trainer.global_step > 0 else 0
        return self.pattern[block % len(self.pattern)]

    def on_train_start(self, trainer, pl_module):
        self.monitor.on_train_start(trainer, pl_module)
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # global_step not yet incremented: the step being taken is global_step + 1
        block = trainer.global_step // self.interval
        if self.pattern[block % len(self.pattern)] is True:
            t = time.perf_counter()
            self.monitor.on_before_optimizer_step(trainer, pl_module, optimizer)
            self._block_hook += time.perf_counter() - t

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        on = self._on(trainer)
        if on is True:
            before = self.monitor._last_logged_step
            t = time.perf_counter()
            self.monitor.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            self._block_hook += time.perf_counter() - t
            self.logged += self.monitor._last_logged_step != before
        if trainer.global_step % self.interval == 0:  # end of a block
            now, cpu = time.perf_counter(), time.process_time()
            if on is not None:  # None: the settling block at the start, not counted
                self.block_times[on].append((now - self._t0) / self.interval)
                self.block_cpu[on].append((cpu - self._c0) / self.interval)
            if on is True:
                self.block_hook.append(self._block_hook)
                self.hook_seconds += self._block_hook
            self._block_hook = 0.0
            self._t0, self._c0 = now, cpu


def _trainer(tmp: str, steps: int, callbacks, accelerator: str) -> pl.Trainer:
    return pl.Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=steps,
        logger=pl.loggers.TensorBoardLogger(tmp, name="bench"),
        log_every_n_steps=10,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )


def run(problem: str, batch: int, interval: int, rounds: int, accelerator: str, fused) -> dict:
    cls, num_classes = {"p2": (P2, 10), "p3": (P3, 100)}[problem]
    cls.fused = fused
    pattern = [None] + [True, False, False, True] * rounds  # a settling block, then ABBA ...
    steps = interval * len(pattern)
    with tempfile.TemporaryDirectory() as tmp:
        pl.seed_everything(0, verbose=False)
        warm = _trainer(tmp, 3, [], accelerator)  # compile, allocator, thread pools
        warm.fit(cls(num_classes=num_classes), DataLoader(RandomBatches(batch, num_classes, 3), batch_size=None))
        pl.seed_everything(0, verbose=False)
        switch = Switch(VarianceAdaptationMonitor(logging_interval=interval), interval, pattern)
        trainer = _trainer(tmp, steps, [switch], accelerator)
        model = cls(num_classes=num_classes)
        trainer.fit(model, DataLoader(RandomBatches(batch, num_classes, steps), batch_size=None))
    with_ms = 1e3 * statistics.mean(switch.block_times[True])
    without_ms = 1e3 * statistics.mean(switch.block_times[False])
    hook_ms = 1e3 * switch.hook_seconds / (interval * pattern.count(True))
    cpu_ratio = statistics.mean(switch.block_cpu[True]) / statistics.mean(switch.block_cpu[False])
    # within a block (same machine load): block time / (block time - monitor time)
    within = [
        t * interval / (t * interval - h) for t, h in zip(switch.block_times[True], switch.block_hook)
    ]
    return dict(
        problem=problem, params=sum(p.numel() for p in model.parameters()), batch=batch, interval=interval,
        blocks=len(pattern), logged=switch.logged, without_ms=without_ms, with_ms=with_ms,
        ratio=with_ms / without_ms, cpu_ratio=cpu_ratio, hook_ms=hook_ms, hook_fraction=hook_ms / without_ms,
        within=statistics.mean(within), within_blocks=[round(w, 4) for w in within],
        per_block_with=[round(1e3 * t, 1) for t in switch.block_times[True]],
        per_block_without=[round(1e3 * t, 1) for t in switch.block_times[False]],
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", default="p2,p3")
    parser.add_argument("--rounds", type=int, default=1, help="ABBA rounds (4 blocks of --interval steps each)")
    parser.add_argument("--interval", type=int, default=VarianceAdaptationMonitor().logging_interval)
    parser.add_argument("--p2-batch", type=int, default=128)
    parser.add_argument("--p3-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--fused", choices=["auto", "off"], default="auto", help="M-SVAG's fused CPU path")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    fused = None if args.fused == "auto" else False
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, accelerator {args.accelerator}, "
          f"interval {args.interval}, {args.rounds} ABBA round(s)", flush=True)
    header = (f"{'problem':8} {'params':>10} {'batch':>5} {'without ms/step':>16} {'with ms/step':>13} "
              f"{'ratio':>7} {'CPU-time ratio':>15} {'monitor ms/step':>16} {'in-block ratio':>15}")
    rows = []
    for problem in args.problems.split(","):
        batch = args.p2_batch if problem == "p2" else args.p3_batch
        r = run(problem, batch, args.interval, args.rounds, args.accelerator, fused)
        rows.append(r)
        print(f"{problem}: blocks with {r['per_block_with']} ms/step, without {r['per_block_without']} ms/step, "
              f"{r['logged']} logging steps; in-block ratios {r['within_blocks']}", flush=True)
    print(header)
    for r in rows:
        print(f"{r['problem']:8} {r['params']:>10,} {r['batch']:>5} {r['without_ms']:>16.1f} {r['with_ms']:>13.1f} "
              f"{r['ratio']:>7.3f} {r['cpu_ratio']:>15.3f} {r['hook_ms']:>16.2f} {r['within']:>15.4f}")


if __name__ == "__main__":
    main()
