"""``lightning-msvag reproduce <experiment>``: the paper's experiments, end to end.

=============  ====================================================================  ==========================
experiment     what                                                                  writes (in ``--out``)
=============  ====================================================================  ==========================
``sqp``        Fig. 2: SGD vs SSD with locally optimal steps on stochastic           sqp.csv, sqp.png, sqp.json
               quadratics (2 spectra × 2 bases × 3 noise levels); §2.1 quantities
``factors``    Fig. 3: erf(1/(√2η)), (1+η²)^(−1/2), (1+η²)^(−1)                      factors.png, factors.json
``wilson``     §5, Lemmas 2/3: full-batch methods on Wilson et al.'s least squares   wilson.json, wilson.png
``benchmark``  §6 protocol: step-size search, best step size over seeds, curves      curves.csv, benchmark.png,
               for M-SGD, M-SSD, M-SVAG, Adam on a problem config (one Lightning      lr_sensitivity.png,
               run per (method, lr, seed), resumable, distributable)                 summary.md, runs/
=============  ====================================================================  ==========================

Every experiment takes ``--out DIR`` and ``--seed N`` (same seed, same numbers). Run
``lightning-msvag reproduce <experiment> --help`` for the size options.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from ..errors import UserError

__all__ = ["main", "build_parser", "EXPERIMENTS"]

#: Experiment name -> (module, one-line help).
EXPERIMENTS = {
    "sqp": ("sqp", "paper Fig. 2: SGD vs SSD on 100-d stochastic quadratic problems"),
    "factors": ("adaptation_factors", "paper Fig. 3: sign / Adam / M-SVAG variance adaptation factors"),
    "wilson": ("wilson", "paper §5, Lemmas 2/3: full-batch methods on Wilson et al.'s least squares"),
    "benchmark": ("benchmark", "paper §6 protocol: step-size search + seeds on a problem config"),
}


def _module(name: str):
    import importlib

    return importlib.import_module(f"{__name__}.{EXPERIMENTS[name][0]}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-msvag reproduce",
        description="Reproduce the experiments of 'Dissecting Adam' (Balles & Hennig, ICML 2018). "
        "Each experiment writes a figure and machine-readable results into --out.",
    )
    sub = parser.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    for name, (_, help_text) in EXPERIMENTS.items():
        module = _module(name)
        # the options first: the module's first paragraph above them, its derivation after them
        summary, _, details = (module.__doc__ or help_text).strip().partition("\n\n")
        p = sub.add_parser(name, help=help_text, description=summary, epilog=details.strip() or None,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--out", required=True, help="output folder (created if missing)")
        p.add_argument("--seed", type=int, default=42, help="random seed; same seed, same numbers (default 42)")
        module.add_arguments(p)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``lightning-msvag reproduce``; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv  # for commands printed into summaries and --list-runs
    module = _module(args.experiment)
    try:
        result = module.run(args)
    except (ValueError, FileNotFoundError, UserError) as exc:
        print(f"lightning-msvag reproduce {args.experiment}: error: {exc}", file=sys.stderr)
        return 2
    if isinstance(result, dict) and "exit_code" in result:
        return int(result["exit_code"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
