"""nnU-Net checkpoints written atomically and read back safely, for any trainer of this project.

nnU-Net's own ``save_checkpoint`` writes with a plain ``torch.save`` (a kill or a full disk leaves a truncated file in
place of the previous good one) and its ``load_checkpoint`` unpickles fully. These two functions keep nnU-Net's
checkpoint layout (its predictor, ``--c`` and ``--val`` read it unchanged) and fix both.
"""
from __future__ import annotations

import os
from os.path import dirname, isfile, join
from typing import Callable

from torch._dynamo import OptimizedModule

from nnunet_kd.atomic_files import atomic_torch_save
from nnunet_kd.teacher import CorruptCheckpointError, TeacherError, load_nnunet_checkpoint, strip_wrapper_prefixes

# The checkpoints nnU-Net's --c chooses from (run_training: final, else latest, else best), in that order.
RESUMABLE_CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")


def unwrapped_network(trainer):
    """The trainer's network without its DDP and torch.compile wrappers (whose state-dict keys nnU-Net strips)."""
    module = trainer.network.module if trainer.is_ddp else trainer.network
    return module._orig_mod if isinstance(module, OptimizedModule) else module


def save_nnunet_checkpoint(trainer, filename: str, trainer_name: str, extra: dict | None = None) -> None:
    """nnU-Net's checkpoint of ``trainer`` (rank 0 only, unless checkpointing is disabled), with ``trainer_name`` as
    the class nnU-Net's predictor will build and ``extra`` keys beside nnU-Net's, written atomically."""
    if trainer.local_rank != 0:
        return
    if trainer.disable_checkpointing:
        trainer.print_to_log_file("No checkpoint written, checkpointing is disabled")
        return
    atomic_torch_save({
        "network_weights": unwrapped_network(trainer).state_dict(),
        "optimizer_state": trainer.optimizer.state_dict(),
        "grad_scaler_state": trainer.grad_scaler.state_dict() if trainer.grad_scaler is not None else None,
        "logging": trainer.logger.get_checkpoint(),
        "_best_ema": trainer._best_ema,
        "current_epoch": trainer.current_epoch + 1,
        "init_args": trainer.my_init_kwargs,
        "trainer_name": trainer_name,
        "inference_allowed_mirroring_axes": trainer.inference_allowed_mirroring_axes,
        **(extra or {}),
    }, filename)


def load_intact_checkpoint(filename: str, map_location, accepts: Callable[[dict], bool],
                           log: Callable[[str], None]) -> tuple[str, dict]:
    """Load ``filename`` with the weights-only loader; if it is truncated or corrupt (a kill or a full disk while a
    non-atomic writer saved it), fall back to the newest intact sibling nnU-Net's --c would also accept
    (checkpoint_final/latest/best, highest epoch first, only those ``accepts``), with a warning through ``log``.
    Returns (the file read, the checkpoint)."""
    try:
        return filename, load_nnunet_checkpoint(filename, map_location=map_location)
    except CorruptCheckpointError as error:
        corrupt_error = error
    intact = []
    for rank, name in enumerate(RESUMABLE_CHECKPOINTS):
        candidate = join(dirname(os.path.abspath(filename)), name)
        if not isfile(candidate) or os.path.abspath(candidate) == os.path.abspath(filename):
            continue
        try:
            checkpoint = load_nnunet_checkpoint(candidate, map_location=map_location)
        except TeacherError:
            continue
        if accepts(checkpoint):
            intact.append((-int(checkpoint.get("current_epoch", 0)), rank, candidate, checkpoint))
    if not intact:
        raise CorruptCheckpointError(
            f"Cannot resume: {filename} is truncated or corrupt and no intact "
            f"{'/'.join(RESUMABLE_CHECKPOINTS)} is beside it ({corrupt_error}). Delete {filename} and start this "
            f"fold again without --c, or restore the file from a backup.") from corrupt_error
    _, _, chosen, checkpoint = min(intact, key=lambda item: item[:2])
    log(f"WARNING: {filename} is truncated or corrupt ({str(corrupt_error).splitlines()[0]}); resuming from the "
        f"newest intact checkpoint {chosen} (epoch {checkpoint.get('current_epoch')}) instead. Delete {filename} "
        f"to silence this warning.")
    return chosen, checkpoint


def restore_nnunet_checkpoint(trainer, checkpoint: dict, where: str) -> None:
    """What nnU-Net's load_checkpoint restores (its own version cannot take a dictionary: it unpickles the file
    itself), from a checkpoint already read with the weights-only loader. ``where`` names it in errors."""
    if not trainer.was_initialized:
        trainer.initialize()
    trainer.my_init_kwargs = checkpoint["init_args"]
    trainer.current_epoch = checkpoint["current_epoch"]
    trainer.logger.load_checkpoint(checkpoint["logging"])
    trainer._best_ema = checkpoint["_best_ema"]
    trainer.inference_allowed_mirroring_axes = checkpoint.get("inference_allowed_mirroring_axes",
                                                              trainer.inference_allowed_mirroring_axes)
    try:
        unwrapped_network(trainer).load_state_dict(strip_wrapper_prefixes(checkpoint["network_weights"]))
    except RuntimeError as e:
        raise RuntimeError(f"{where} does not fit this run's network ({str(e).splitlines()[0]}): it was written "
                           f"with other plans. Resume with the plans that wrote it, or start a new run.") from e
    trainer.optimizer.load_state_dict(checkpoint["optimizer_state"])
    if trainer.grad_scaler is not None and checkpoint["grad_scaler_state"] is not None:
        trainer.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])
