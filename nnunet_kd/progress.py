"""nnU-Net's local logger, extended with one value per epoch for every distillation loss term.

The terms are logged under ``kd_<term>`` (so they are saved in, and restored from, nnU-Net's checkpoint
'logging' entry) and drawn as a fourth panel of nnU-Net's usual progress.png.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("agg")
import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402
from batchgenerators.utilities.file_and_folder_operations import join  # noqa: E402
from nnunetv2.training.logging.nnunet_logger import LocalLogger  # noqa: E402


def term_key(term: str) -> str:
    return f"kd_{term}"


class KDLocalLogger(LocalLogger):
    """``terms``: every logged term; ``required``: those a resumed log must have (the loss terms). A logged part
    that an older checkpoint lacks (e.g. RGD's node/edge/voxel, logged since the term registry) is filled with NaN
    for the epochs before."""

    def __init__(self, terms: list[str], verbose: bool = False, required: list[str] | None = None):
        super().__init__(verbose)
        self.terms = list(terms)
        self.required = list(terms if required is None else required)
        for term in self.terms:
            self.my_fantastic_logging[term_key(term)] = []

    def load_checkpoint(self, checkpoint: dict):
        missing = [term_key(t) for t in self.required if term_key(t) not in checkpoint]
        if missing:
            raise RuntimeError(f"The checkpoint's training log has no {missing}: it was written by a different "
                               f"trainer or recipe. Resume with the trainer and plans that wrote it.")
        checkpoint = dict(checkpoint)
        epochs = len(checkpoint.get("train_losses", []))
        for term in self.terms:
            checkpoint.setdefault(term_key(term), [float("nan")] * epochs)
        super().load_checkpoint(checkpoint)

    def plot_progress_png(self, output_folder):
        log = self.my_fantastic_logging
        epoch = min(len(v) for v in log.values()) - 1
        x = list(range(epoch + 1))
        sns.set(font_scale=2.5)
        fig, (ax_loss, ax_time, ax_lr, ax_kd) = plt.subplots(4, 1, figsize=(30, 72))

        # The first three panels are nnU-Net's own progress.png.
        ax_dice = ax_loss.twinx()
        ax_loss.plot(x, log["train_losses"][:epoch + 1], color="b", ls="-", label="loss_tr", linewidth=4)
        ax_loss.plot(x, log["val_losses"][:epoch + 1], color="r", ls="-", label="loss_val", linewidth=4)
        ax_dice.plot(x, log["mean_fg_dice"][:epoch + 1], color="g", ls="dotted", label="pseudo dice", linewidth=3)
        ax_dice.plot(x, log["ema_fg_dice"][:epoch + 1], color="g", ls="-", label="pseudo dice (mov. avg.)",
                     linewidth=4)
        ax_loss.set(xlabel="epoch", ylabel="loss")
        ax_dice.set_ylabel("pseudo dice")
        ax_loss.legend(loc=(0, 1))
        ax_dice.legend(loc=(0.2, 1))

        durations = [e - s for e, s in zip(log["epoch_end_timestamps"][:epoch + 1],
                                           log["epoch_start_timestamps"][:epoch + 1])]
        ax_time.plot(x, durations, color="b", ls="-", label="epoch duration", linewidth=4)
        ax_time.set(ylim=[0, ax_time.get_ylim()[1]], xlabel="epoch", ylabel="time [s]")
        ax_time.legend(loc=(0, 1))

        ax_lr.plot(x, log["lrs"][:epoch + 1], color="b", ls="-", label="learning rate", linewidth=4)
        ax_lr.set(xlabel="epoch", ylabel="learning rate")
        ax_lr.legend(loc=(0, 1))

        # Unweighted values of each training loss term, so their relative size is visible.
        for term in self.terms:
            ax_kd.plot(x, log[term_key(term)][:epoch + 1], ls="-", label=term, linewidth=4)
        ax_kd.set(xlabel="epoch", ylabel="training loss term (unweighted)")
        ax_kd.legend(loc=(0, 1), ncol=max(1, len(self.terms)))

        plt.tight_layout()
        fig.savefig(join(output_folder, "progress.png"))
        plt.close()
