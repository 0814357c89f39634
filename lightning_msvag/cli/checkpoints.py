"""A checkpoint that does not belong to this run, refused in one line before anything is built:
another problem (model or data class), other model settings, another optimizer or estimator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..fault_tolerance import (
    RULE_SETTINGS,
    CheckpointError,
    checkpoint_hyperparameters,
    checkpoint_optimizer_classes,
    checkpoint_optimizer_settings,
    legacy_class_path,
)
from .namespace import _class_label, _get, _import_class, _plain


def _refuse_another_model(config: Any, ckpt_path: Path) -> None:
    """The checkpoint continues its own model: LightningCLI would take the model's class and
    arguments from the checkpoint over the command line and the config, silently. Another problem's
    checkpoint, or one trained with other model arguments than this command line asks for, is
    refused in one line naming them, before anything is built (docs/long_runs.md)."""
    saved = checkpoint_hyperparameters(ckpt_path)
    model = _get(config, "model")
    wanted_class = str(_get(model, "class_path", ""))
    saved_class = str(saved.pop("_class_path", "") or "")
    if legacy_class_path(saved_class):
        raise CheckpointError(
            f"checkpoint {ckpt_path} was written by lightning-msvag 0.1.0: it names {saved_class}, now "
            f"{legacy_class_path(saved_class)}; python -c \"from lightning_msvag.fault_tolerance import "
            f"upgrade_checkpoint; print(upgrade_checkpoint('{ckpt_path}'))\" writes a copy that resumes"
        )
    same_class = saved_class == wanted_class or (
        _import_class(saved_class) is not None and _import_class(saved_class) is _import_class(wanted_class))
    if saved_class and wanted_class and not same_class:
        raise CheckpointError(
            f"checkpoint {ckpt_path} is another problem's: it holds a {saved_class.rpartition('.')[2]} ({saved_class}), "
            f"this config trains {wanted_class}; use the config it was trained with, or no --ckpt_path"
        )
    init = _get(model, "init_args")
    differing = []
    for key, value in sorted(saved.items()):
        wanted = _get(init, key)
        if wanted is not None and _plain(wanted) != _plain(value):
            differing.append(f"{key}={value!r} (this run: {wanted!r})")
    if differing:
        raise CheckpointError(
            f"checkpoint {ckpt_path} was trained with {', '.join(differing)}; a resume continues the checkpoint's "
            "model: drop those --model options, or start a new run without --ckpt_path"
        )


def _refuse_another_optimizer(config: Any, ckpt_path: Path) -> None:
    """A resumed fit must continue the checkpoint's optimizer (its state holds that method's
    buffers, docs/long_runs.md); another one is refused in one line, before anything is built."""
    requested = _import_class(str(_get(_get(config, "optimizer"), "class_path", "")))
    saved_paths = checkpoint_optimizer_classes(ckpt_path)
    if requested is None or not saved_paths:
        return
    saved = _import_class(saved_paths[0])
    if saved is requested:
        settings = checkpoint_optimizer_settings(ckpt_path)
        init_args = _get(_get(config, "optimizer"), "init_args")
        for key, saved_value in (settings[0] if settings else {}).items():
            wanted = _get(init_args, key) or RULE_SETTINGS[key]
            if saved_value != wanted:
                raise CheckpointError(
                    f"checkpoint {ckpt_path} was trained with {_class_label(saved)}({key}={saved_value!r}), this run "
                    f"asks for {key}={wanted!r}: the state's exp_avg_sq holds the other setting's numbers. Resume with "
                    f"--optimizer.init_args.{key}={saved_value}, or start a new run without --ckpt_path"
                )
        return
    if saved is None:
        return
    raise CheckpointError(
        f"checkpoint {ckpt_path} was trained with {_class_label(saved)}, this run asks for "
        f"{_class_label(requested)}: a resume continues the checkpoint's optimizer state. Resume with "
        f"--optimizer {_class_label(saved).split(' ')[0]}, or start a new run without --ckpt_path"
    )
