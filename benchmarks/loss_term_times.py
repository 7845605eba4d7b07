"""Forward + backward time of each Adaptive-KD loss term alone, on the shapes of the demo's quarter-width student
(batch 2, 3 classes, patch 16x48x48, stages of 8/16/32/64 channels against the teacher's 32/64/128/256; three
deep-supervision outputs with nnU-Net's weights, the lowest at weight 0 and so skipped; feature hints at the last
decoder stage and at the bottleneck). It shows where the KD step's time above
(plain step + teacher forward) goes: `nnUNetv2_kd_benchmark` measures the whole step, this script its parts.

    python benchmarks/loss_term_times.py          # medians over 30 calls after 3 warm-up, milliseconds, CPU
"""
from __future__ import annotations

import statistics
import time

import torch

from nnunet_kd.losses.feature import FeatureAdapter, feature_mse
from nnunet_kd.losses.kl import LogitKLLoss
from nnunet_kd.losses.lovasz import LovaszSoftmaxLoss

BATCH, CLASSES = 2, 3
OUTPUT_SHAPES = [(16, 48, 48), (16, 24, 24), (8, 12, 12)]  # highest resolution first
# nnU-Net's deep-supervision weights: 1/2^i, the lowest resolution set to 0, normalised; nnU-Net skips weight 0.
DS_WEIGHTS = [1.0, 0.5, 0.0]
DS_WEIGHTS = [w / sum(DS_WEIGHTS) for w in DS_WEIGHTS]


def median_ms(fn, steps: int = 30, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    student = [torch.randn(BATCH, CLASSES, *s, requires_grad=True) for s in OUTPUT_SHAPES]
    teacher = [torch.randn(BATCH, CLASSES, *s) for s in OUTPUT_SHAPES]
    labels = [torch.randint(0, CLASSES, (BATCH, 1, *s)) for s in OUTPUT_SHAPES]

    def kl_on_all_outputs(reduction):
        kl = LogitKLLoss(3.0, reduction=reduction)
        return lambda: sum(w * kl(s, t, None, y) for w, s, t, y in zip(DS_WEIGHTS, student, teacher, labels)
                           if w != 0).backward()

    lovasz = LovaszSoftmaxLoss()

    def hint(student_channels, teacher_channels, shape):
        adapter = FeatureAdapter(student_channels, teacher_channels, 3)
        f_s = torch.randn(BATCH, student_channels, *shape, requires_grad=True)
        f_t = torch.randn(BATCH, teacher_channels, *shape)
        return lambda: feature_mse(adapter(f_s), f_t).backward()

    terms = {
        "KL, class-balanced, deep-supervision outputs": kl_on_all_outputs("class_balanced"),
        "KL, voxel mean, deep-supervision outputs": kl_on_all_outputs("voxel"),
        "Lovasz-softmax, full resolution": lambda: lovasz(student[0], labels[0], None).backward(),
        "feature hint, last decoder stage (8 -> 32 ch, 16x48x48)": hint(8, 32, (16, 48, 48)),
        "feature hint, bottleneck (64 -> 256 ch, 4x6x6)": hint(64, 256, (4, 6, 6)),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; forward + backward, median ms")
    for name, fn in terms.items():
        print(f"{median_ms(fn):7.2f}  {name}")


if __name__ == "__main__":
    main()
