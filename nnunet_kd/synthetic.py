"""Synthetic prostate-MRI-like dataset in nnU-Net v2 raw format.

No real data can be downloaded in the environments this project is tested in, so the demo and the end-to-end tests
run on a small synthetic stand-in for a T2-weighted prostate MRI data set (in the spirit of MSD Task05 Prostate):

* label 1 ``peripheral_zone``: a thin, crescent-shaped shell wrapping the gland posteriorly and laterally (thicker
  posteriorly). It is the harder, thin structure.
* label 2 ``transition_zone``: a compact inner ellipsoid shifted anteriorly (plus the anterior part of the gland).

Images are float32 T2-like intensities: smoothly textured background tissue with a bright fluid-filled bladder
cranial-anterior to the gland and a dark rectum posterior to it, a bright peripheral zone, a darker heterogeneous
transition zone, partial-volume blur, a multiplicative smooth bias field, Rician noise and a random global
contrast (gamma) and scale. Everything is deterministic given the seed.

Array conventions: ``shape`` and ``spacing`` are given in numpy order (z, y, x). SimpleITK uses (x, y, z), so the
spacing is reversed when writing. With SimpleITK's default identity direction (LPS), the y index grows towards
posterior and the z index towards superior.
"""
from __future__ import annotations

import os
import shutil
from typing import Sequence, Tuple

import numpy as np
from scipy.ndimage import gaussian_filter

__all__ = ["make_synthetic_prostate_dataset", "synthesize_case", "LABELS", "CHANNEL_NAMES"]

LABELS = {"background": 0, "peripheral_zone": 1, "transition_zone": 2}
CHANNEL_NAMES = {0: "T2"}
FILE_ENDING = ".nii.gz"

# minimum number of voxels each foreground class must have; a case that misses it is redrawn (deterministically)
_MIN_CLASS_VOXELS = 20


def _smooth_noise(rng: np.random.Generator, shape, spacing, sigma_mm: float) -> np.ndarray:
    """Zero-mean, unit-std random field that is smooth on the scale of ``sigma_mm`` (physically isotropic)."""
    field = rng.standard_normal(shape).astype(np.float32)
    sigma_vox = [sigma_mm / s for s in spacing]
    field = gaussian_filter(field, sigma=sigma_vox, mode="reflect", truncate=3.0)
    field -= field.mean()
    std = field.std()
    return field / std if std > 0 else field


def _rotation_matrix(rng: np.random.Generator) -> np.ndarray:
    """Random small rotation in physical (z, y, x) coordinates: mostly in-plane (axial), a little tilt."""
    az = np.deg2rad(rng.uniform(-25, 25))  # rotation about z (in the axial y-x plane)
    ax = np.deg2rad(rng.uniform(-15, 15))  # rotation about x (sagittal tilt, z-y plane)
    ay = np.deg2rad(rng.uniform(-8, 8))  # rotation about y (coronal tilt, z-x plane)
    c, s = np.cos(az), np.sin(az)
    rz = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    c, s = np.cos(ax), np.sin(ax)
    rx = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    c, s = np.cos(ay), np.sin(ay)
    ry = np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]])
    return rz @ rx @ ry


def _ellipsoid_radius(coords: np.ndarray, center, radii) -> np.ndarray:
    """Normalised ellipsoid radius (<= 1 inside) of physical coords (3, ...) in the ellipsoid's frame."""
    r2 = np.zeros(coords.shape[1:], dtype=np.float32)
    for d in range(3):
        r2 += ((coords[d] - center[d]) / radii[d]) ** 2
    return np.sqrt(r2)


def _draw_case(rng: np.random.Generator, shape, spacing) -> Tuple[np.ndarray, np.ndarray]:
    shape = tuple(int(i) for i in shape)
    spacing = np.asarray(spacing, dtype=np.float64)
    extent = np.asarray(shape) * spacing  # physical size (mm), z y x

    # physical coordinates (mm) of the voxel centres, relative to the volume centre
    axes = [(np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * sp for n, sp in zip(shape, spacing)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"))  # (3, z, y, x)

    # ---------------- gland geometry ----------------
    # semi-axes (mm): craniocaudal, antero-posterior (smallest), left-right (largest); bounded by the field of view
    radii = np.array([
        rng.uniform(0.20, 0.28) * extent[0],
        rng.uniform(0.15, 0.21) * extent[1],
        rng.uniform(0.21, 0.29) * extent[2],
    ])
    # centre: random, but keep the (deformed, rotated) gland inside the volume; slightly caudal to leave room for
    # the bladder
    free = np.maximum(extent / 2.0 - 1.2 * radii, 0.0)
    center = rng.uniform(-1, 1, size=3) * np.minimum(free, 0.12 * extent)
    center[0] -= min(0.05 * extent[0], free[0])

    rot = _rotation_matrix(rng).astype(np.float32)
    local = np.tensordot(rot.T, grid - center.reshape(3, 1, 1, 1).astype(np.float32), axes=1)  # gland frame

    # smooth random deformation (mm) of the gland frame -> irregular, non-ellipsoidal outlines
    deform_amp = 0.12 * radii.min()
    for d in range(3):
        local[d] += deform_amp * _smooth_noise(rng, shape, spacing, sigma_mm=0.6 * radii.min())

    r_gland = _ellipsoid_radius(local, (0, 0, 0), radii)
    gland = r_gland <= 1.0

    # transition zone: inner ellipsoid shifted anteriorly (negative y = anterior in LPS)
    # (shifted cranially too: the apex is mostly peripheral zone, the base mostly central gland)
    tz_scale = np.array([rng.uniform(0.65, 0.80), rng.uniform(0.66, 0.76), rng.uniform(0.62, 0.76)])
    tz_radii = radii * tz_scale
    tz_shift = np.array([rng.uniform(0.08, 0.2) * radii[0], -rng.uniform(0.14, 0.24) * radii[1],
                         rng.uniform(-0.06, 0.06) * radii[2]])
    r_tz = _ellipsoid_radius(local, tz_shift, tz_radii)
    # the anterior part of the gland (anterior fibromuscular stroma) belongs to the central gland label, which makes
    # the peripheral zone a posterior-lateral crescent
    anterior_cut = local[1] < (tz_shift[1] - rng.uniform(0.1, 0.3) * tz_radii[1])
    tz = gland & ((r_tz <= 1.0) | anterior_cut)
    pz = gland & ~tz

    seg = np.zeros(shape, dtype=np.uint8)
    seg[pz] = 1
    seg[tz] = 2

    # ---------------- surrounding anatomy ----------------
    gland_center_mm = center
    # bladder: bright fluid, cranial and anterior to the gland
    bl_radii = radii * np.array([rng.uniform(0.8, 1.2), rng.uniform(1.1, 1.6), rng.uniform(0.9, 1.3)])
    bl_center = gland_center_mm + np.array([radii[0] + 0.8 * bl_radii[0], -0.4 * radii[1], 0.0])
    bladder = (_ellipsoid_radius(grid, bl_center, bl_radii) <= 1.0) & ~gland
    # rectum: posterior to the gland, dark lumen with an intermediate wall
    rc_radii = np.array([1.6 * radii[0], rng.uniform(0.45, 0.65) * radii[1] + 2.0, rng.uniform(0.45, 0.6) * radii[2]])
    rc_center = gland_center_mm + np.array([0.0, radii[1] + 0.9 * rc_radii[1] + 1.0, rng.uniform(-2, 2)])
    r_rc = _ellipsoid_radius(grid, rc_center, rc_radii)
    rectum_wall = (r_rc <= 1.0) & ~gland
    rectum_lumen = (r_rc <= 0.6) & ~gland

    # ---------------- intensities (T2-like, roughly in [0, 1] before scaling) ----------------
    tissue = 0.33 + 0.06 * _smooth_noise(rng, shape, spacing, sigma_mm=6.0) \
        + 0.03 * _smooth_noise(rng, shape, spacing, sigma_mm=2.0)
    img = tissue
    img = np.where(bladder, rng.uniform(0.85, 0.95) + 0.02 * _smooth_noise(rng, shape, spacing, 4.0), img)
    img = np.where(rectum_wall, rng.uniform(0.22, 0.3), img)
    img = np.where(rectum_lumen, rng.uniform(0.05, 0.12), img)
    pz_level = rng.uniform(0.68, 0.82)
    tz_level = rng.uniform(0.40, 0.50)
    pz_tex = pz_level + 0.05 * _smooth_noise(rng, shape, spacing, sigma_mm=2.5)
    # TZ: heterogeneous, BPH-nodule-like texture (stronger, finer variation)
    tz_tex = tz_level + 0.09 * _smooth_noise(rng, shape, spacing, sigma_mm=1.6) \
        + 0.04 * _smooth_noise(rng, shape, spacing, sigma_mm=5.0)
    img = np.where(seg == 1, pz_tex, img)
    img = np.where(seg == 2, tz_tex, img)
    # thin dark capsule around the gland
    capsule = (r_gland > 1.0) & (r_gland <= 1.0 + 1.2 / radii.min() * spacing[1:].mean())
    img = np.where(capsule & ~bladder, 0.5 * img, img)
    img = np.clip(img, 0.0, None).astype(np.float32)

    # partial volume: blur mostly in-plane, slightly through-plane
    img = gaussian_filter(img, sigma=[0.35, 0.6, 0.6], mode="nearest")

    # multiplicative smooth bias field (coil sensitivity), roughly +-25 %
    bias = np.exp(rng.uniform(0.1, 0.25) * _smooth_noise(rng, shape, spacing, sigma_mm=0.35 * extent.max()))
    # plus a linear antero-posterior gradient (endorectal / surface coil)
    ap = grid[1] / max(extent[1], 1e-6)
    bias = bias * np.exp(rng.uniform(-0.3, 0.3) * ap)
    img = img * bias

    # Rician noise: magnitude of a complex signal with Gaussian noise in both channels
    sigma_n = rng.uniform(0.02, 0.05)
    n1 = rng.standard_normal(shape).astype(np.float32) * sigma_n
    n2 = rng.standard_normal(shape).astype(np.float32) * sigma_n
    img = np.sqrt((img + n1) ** 2 + n2 ** 2)

    # random global contrast (gamma) and scanner scale
    gamma = rng.uniform(0.8, 1.25)
    img = np.power(img, gamma) * rng.uniform(200.0, 1500.0)
    return img.astype(np.float32), seg


def synthesize_case(shape: Sequence[int] = (24, 64, 64), spacing: Sequence[float] = (3.0, 0.8, 0.8),
                    seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """One synthetic case as (image float32, segmentation uint8), both of ``shape`` (numpy order z, y, x).

    Deterministic in ``seed``. Both foreground classes are guaranteed to be present (a draw that misses one is
    redrawn from the same random stream).
    """
    if len(shape) != 3 or len(spacing) != 3:
        raise ValueError(f"shape and spacing must have 3 entries (z, y, x); got shape={shape}, spacing={spacing}")
    if min(shape) < 8:
        raise ValueError(f"shape must be at least 8 voxels along every axis, got {tuple(shape)}")
    if min(spacing) <= 0:
        raise ValueError(f"spacing must be positive, got {tuple(spacing)}")
    rng = np.random.default_rng(seed)
    for _ in range(20):
        img, seg = _draw_case(rng, shape, spacing)
        counts = np.bincount(seg.ravel(), minlength=3)
        if counts[1] >= _MIN_CLASS_VOXELS and counts[2] >= _MIN_CLASS_VOXELS:
            return img, seg
    raise RuntimeError(f"Could not draw a case with both foreground classes for shape={tuple(shape)}, "
                       f"spacing={tuple(spacing)}; the volume is probably too small.")


def _write(arr: np.ndarray, spacing_zyx, filename: str) -> None:
    import SimpleITK as sitk
    im = sitk.GetImageFromArray(arr)
    im.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))  # SimpleITK: x, y, z
    sitk.WriteImage(im, filename, useCompression=True)


def make_synthetic_prostate_dataset(raw_root: str, dataset_id: int = 990, dataset_name: str = "KDDemoProstate",
                                    num_training: int = 20, num_test: int = 2,
                                    shape: Sequence[int] = (24, 64, 64),
                                    spacing: Sequence[float] = (3.0, 0.8, 0.8),
                                    seed: int = 0, overwrite: bool = False) -> str:
    """Write a synthetic prostate-like dataset in nnU-Net v2 raw format and return its folder.

    The folder is ``raw_root/Dataset{dataset_id:03d}_{dataset_name}`` with ``imagesTr/{case}_0000.nii.gz``,
    ``labelsTr/{case}.nii.gz``, ``imagesTs/{case}_0000.nii.gz`` and ``dataset.json``. ``shape`` and ``spacing`` are
    numpy order (z, y, x). Does not need ``nnUNet_raw`` to be set.

    If the folder exists, ``FileExistsError`` is raised unless ``overwrite=True``; with ``overwrite=True`` only what
    this function writes (imagesTr, labelsTr, imagesTs, dataset.json) is removed and regenerated, other files in the
    folder are left alone.
    """
    if not (isinstance(dataset_id, (int, np.integer)) and 1 <= int(dataset_id) <= 999):
        raise ValueError(f"dataset_id must be an integer in 1..999, got {dataset_id!r}")
    if not dataset_name or any(c in dataset_name for c in " /\\") or dataset_name.startswith("Dataset"):
        raise ValueError(f"invalid dataset_name {dataset_name!r} (no spaces or slashes, without 'Dataset' prefix)")
    if num_training < 1 or num_test < 0:
        raise ValueError(f"need num_training >= 1 and num_test >= 0, got {num_training}, {num_test}")
    shape = tuple(int(i) for i in shape)
    spacing = tuple(float(s) for s in spacing)

    folder = os.path.join(raw_root, f"Dataset{int(dataset_id):03d}_{dataset_name}")
    if os.path.exists(folder):
        if not overwrite:
            raise FileExistsError(f"Dataset folder {folder} already exists. Pass overwrite=True to regenerate it, "
                                  f"or delete it yourself.")
        for sub in ("imagesTr", "labelsTr", "imagesTs"):
            p = os.path.join(folder, sub)
            if os.path.isdir(p):
                shutil.rmtree(p)
        if os.path.isfile(os.path.join(folder, "dataset.json")):
            os.remove(os.path.join(folder, "dataset.json"))

    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    dirs = {k: os.path.join(folder, k) for k in ("imagesTr", "labelsTr", "imagesTs")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)

    # one independent, reproducible random stream per case
    case_seeds = np.random.SeedSequence([int(seed), 0x5EED]).spawn(num_training + num_test)
    for i in range(num_training + num_test):
        case = f"prostate_{i:03d}"
        img, seg = synthesize_case(shape, spacing, seed=np.random.default_rng(case_seeds[i]).integers(2 ** 63))
        if i < num_training:
            _write(img, spacing, os.path.join(dirs["imagesTr"], f"{case}_0000{FILE_ENDING}"))
            _write(seg, spacing, os.path.join(dirs["labelsTr"], f"{case}{FILE_ENDING}"))
        else:
            _write(img, spacing, os.path.join(dirs["imagesTs"], f"{case}_0000{FILE_ENDING}"))

    generate_dataset_json(
        folder,
        channel_names=dict(CHANNEL_NAMES),
        labels=dict(LABELS),
        num_training_cases=num_training,
        file_ending=FILE_ENDING,
        dataset_name=f"Dataset{int(dataset_id):03d}_{dataset_name}",
        description="Synthetic prostate-MRI-like data (T2-like) generated by nnunet_kd.synthetic; not real data.",
        reference="nnunet_kd.synthetic.make_synthetic_prostate_dataset",
        license="CC0 (synthetic)",
        converted_by="nnunet_kd",
        synthetic={"seed": int(seed), "shape": list(shape), "spacing": list(spacing), "num_test": int(num_test)},
    )
    return folder
