"""Forward + backward time of each Adaptive-KD loss term alone (and of MSKD's FFD + RGD together), on the shapes of a quarter-width student: the
demo's 3D one (batch 2, 3 classes, patch 16x48x48, stages of 8/16/32/64 channels against the teacher's
32/64/128/256), or with ``--shapes hippocampus2d`` Hippocampus ``2d`` (batch 32, patch 56x40, last decoder stage 8
against 32 channels, bottleneck 64 against 256 at 7x5); three deep-supervision outputs with nnU-Net's weights, the
lowest at weight 0 and so skipped; feature hints at the last decoder stage and at the bottleneck). It shows where
the KD step's time above (plain step + teacher forward) goes: `nnUNetv2_kd_benchmark` measures the whole step, this
script its parts.

    python benchmarks/loss_term_times.py [--shapes hippocampus2d]   # medians of 30 calls after 3 warm-up, ms, CPU
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from nnunet_kd.losses.feature import FeatureAdapter, adapted_feature_mse
from nnunet_kd.losses.kl import LogitKLLoss
from nnunet_kd.losses.lovasz import LovaszSoftmaxLoss
from nnunet_kd.losses.mskd import FeatureFilteringDistillation, RegionGraphDistillation, region_statistics

CLASSES = 3
SHAPES = {  # batch, deep-supervision output shapes (highest resolution first), bottleneck shape
    "demo3d": (2, [(16, 48, 48), (16, 24, 24), (8, 12, 12)], (4, 6, 6)),
    "hippocampus2d": (32, [(56, 40), (28, 20), (14, 10)], (7, 5)),
}
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="demo3d")
    batch, output_shapes, bottleneck = SHAPES[parser.parse_args().shapes]
    dim = len(bottleneck)
    torch.manual_seed(0)
    student = [torch.randn(batch, CLASSES, *s, requires_grad=True) for s in output_shapes]
    teacher = [torch.randn(batch, CLASSES, *s) for s in output_shapes]
    labels = [torch.randint(0, CLASSES, (batch, 1, *s)) for s in output_shapes]

    def kl_on_all_outputs(reduction):
        kl = LogitKLLoss(3.0, reduction=reduction)
        return lambda: sum(w * kl(s, t, None, y) for w, s, t, y in zip(DS_WEIGHTS, student, teacher, labels)
                           if w != 0).backward()

    lovasz = LovaszSoftmaxLoss()

    def hint(student_channels, teacher_channels, shape):
        adapter = FeatureAdapter(student_channels, teacher_channels, dim)
        f_s = torch.randn(batch, student_channels, *shape, requires_grad=True)
        with torch.inference_mode():  # as the teacher's pass leaves it
            f_t = torch.randn(batch, teacher_channels, *shape)
        # what the feature-hint term computes (nnunet_kd.distill.feature_hint)
        return lambda: adapted_feature_mse(adapter, f_s, f_t).backward()

    ffd, rgd = FeatureFilteringDistillation(CLASSES), RegionGraphDistillation(CLASSES)

    def mskd():
        # FFD + RGD at the last two decoder stages (8 and 16 student channels against 32 and 64), sharing one region
        # statistics per stage as the MSKD trainer does (nnunet_kd.distill.ffd.shared_region_statistics)
        stages = []
        for channels, shape, label in ((8, output_shapes[0], labels[0]), (16, output_shapes[1], labels[1])):
            with torch.inference_mode():
                f_t = torch.randn(batch, 4 * channels, *shape)
            stages.append((torch.randn(batch, channels, *shape, requires_grad=True), f_t, label))

        def run():
            total = 0
            for f_s, f_t, label in stages:
                stats = region_statistics(f_s, f_t, label, CLASSES)
                total = total + ffd(f_s, f_t, label, stats=stats) + rgd(f_s, f_t, label, stats=stats)["total"]
            total.backward()
        return run

    full = "x".join(map(str, output_shapes[0]))
    low = "x".join(map(str, bottleneck))
    terms = {
        "KL, class-balanced, deep-supervision outputs": kl_on_all_outputs("class_balanced"),
        "KL, voxel mean, deep-supervision outputs": kl_on_all_outputs("voxel"),
        "Lovasz-softmax, full resolution": lambda: lovasz(student[0], labels[0], None).backward(),
        f"feature hint, last decoder stage (8 -> 32 ch, {full})": hint(8, 32, output_shapes[0]),
        f"feature hint, bottleneck (64 -> 256 ch, {low})": hint(64, 256, bottleneck),
        "MSKD FFD + RGD, last two decoder stages": mskd(),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; forward + backward, median ms")
    for name, fn in terms.items():
        print(f"{median_ms(fn):7.2f}  {name}")


if __name__ == "__main__":
    main()
