r"""``reproduce benchmark`` — the paper's §6 protocol on any problem config (docs/problems.md §5).

For each method: run a log-spaced step-size grid (user-set, largest first: the search goes
downwards from the largest stable step size), pick the step size with the best final test
accuracy, replicate it over seeds, and report curves (mean ± one std over seeds), the step-size
sensitivity and a summary table.

**Runs.** Every (method, lr, seed) is one ordinary Lightning run of ``lightning-msvag fit
--config CONFIG --optimizer CLASS --optimizer.lr LR --seed_everything SEED --trainer.max_steps N
...`` in its own process (a crash or divergence of one run cannot take down the sweep) with its
own TensorBoard log dir ``OUT/runs/<method>/lr=<lr>/seed=<seed>/tb``. A
:class:`~lightning_msvag.experiments.benchmark.recorder.RunRecorder` callback writes the run's record,
``OUT/runs/<method>/lr=<lr>/seed=<seed>/record.json``: status (``done`` / ``diverged`` / ``failed``),
the training and evaluation curves, the final metrics and the wall time per training step. The
runner adds the run's settings (``spec``, including the exact ``fit`` argv) and, if the process
died without a record, writes a ``failed`` one with the exit code and the log's tail
(``OUT/runs/.../log.txt``).

**Phases.** ``search``: every grid step size with the first seed. ``replicate``: the chosen step size
with the remaining seeds (needs the search records). ``--phase all`` (default) does both and then
collects. ``collect`` (``--collect-only``) builds ``curves.csv``, ``benchmark.png``,
``lr_sensitivity.png``, ``summary.md`` and ``results.json`` from whatever records exist.

**Resume.** A run whose record says ``done`` or ``diverged`` *with the same settings* is never
redone; ``failed``, unfinished (killed) and changed-settings runs are rerun from scratch (their run
folder is cleared first). So re-running the same command continues a partial sweep.

**Spreading runs over machines.** ``--list-runs`` prints the runs of a phase with their index,
status and the command that runs exactly that one (``--run-index I``); ``--shard i/n`` runs every
run whose index is ``i`` mod ``n`` (``0 <= i < n``). Any scheduler works (one process per run, e.g.
a job array over ``--run-index``); all processes must see the same ``--out`` folder (a shared file
system) or their ``runs/`` folders copied together before ``--collect-only``. Settings must be the
same for all processes. Each run may itself use several devices:
``--fit-arg=--trainer.devices=4 --fit-arg=--trainer.strategy=ddp``. Typical cluster use::

    lightning-msvag reproduce benchmark --out OUT --config C ... --phase search --list-runs
    # job array, I = 0 .. K-1:
    lightning-msvag reproduce benchmark --out OUT --config C ... --phase search --run-index $I
    # then the same for --phase replicate, then:
    lightning-msvag reproduce benchmark --out OUT --config C ... --collect-only

**Step-size grids.** ``--grid METHOD=GRID`` (repeatable): ``GRID`` is ``lo:hi:n`` (``n`` log-spaced
values from ``lo`` to ``hi``) or a comma list ``0.1,0.3,1``. ``--patience P`` (> 0) stops a method's
downward search once ``P`` consecutive stable step sizes below the best one did not beat it (the
rest are recorded as ``skipped``); it applies when the search phase runs in one invocation.

**Divergence.** A non-finite training or evaluation loss, or a training loss above
``--diverge-factor`` (default 10) × the first step's loss, stops the run and records it as ``diverged``; it is
listed as such in the summary and never chosen. ``failed`` = the process crashed or timed out.

**Claims table.** ``summary.md`` and ``results.json`` (``claims``) check the paper's §6.2
observations that apply to the problem (sign-based vs non-sign clusters, the problem's own
finding, variance adaptation vs its base) against the measured mean ± std over seeds, with this
run's budget next to the paper's and, from the mean curves, where along the run the order changed
(rules: :mod:`~lightning_msvag.experiments.benchmark.claims`).

**Code layout** (this package; each module imports only those listed before it):
``methods`` (method names, optimizer classes, default grids, sign-based groups, from the method
table), ``config`` (the frozen ``BenchmarkConfig``, step-size grids, the CLI options), ``plan``
(runs, folders, ``fit`` command lines), ``recorder`` (the ``RunRecorder`` callback of every run),
``launch`` (running them), ``claims`` (the §6.2 verdicts), ``collect`` (records -> ``curves.csv``,
``results.json``), ``report`` (figures, ``summary.md``), ``runner`` (the phases: plan, launch,
collect, report).
"""

from .config import add_arguments
from .runner import run

__all__ = ["add_arguments", "run"]  # what ``reproduce`` needs; everything else lives in its module
