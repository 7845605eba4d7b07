import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_kd.synthetic import make_synthetic_prostate_dataset, synthesize_case

SHAPE = (16, 48, 40)  # deliberately non-cubic so axis-order mistakes show up
SPACING = (3.0, 0.8, 0.7)
NUM_TR, NUM_TS = 4, 1


def _read(fname):
    im = sitk.ReadImage(fname)
    return sitk.GetArrayFromImage(im), tuple(im.GetSpacing())[::-1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("raw"))
    folder = make_synthetic_prostate_dataset(root, dataset_id=991, dataset_name="SynthTest", num_training=NUM_TR,
                                             num_test=NUM_TS, shape=SHAPE, spacing=SPACING, seed=3)
    return root, folder


def test_files_and_dataset_json(dataset):
    root, folder = dataset
    assert folder == os.path.join(root, "Dataset991_SynthTest")
    cases = [f"prostate_{i:03d}" for i in range(NUM_TR)]
    assert sorted(os.listdir(os.path.join(folder, "imagesTr"))) == [f"{c}_0000.nii.gz" for c in cases]
    assert sorted(os.listdir(os.path.join(folder, "labelsTr"))) == [f"{c}.nii.gz" for c in cases]
    assert sorted(os.listdir(os.path.join(folder, "imagesTs"))) == [f"prostate_{NUM_TR:03d}_0000.nii.gz"]
    with open(os.path.join(folder, "dataset.json")) as f:
        dj = json.load(f)
    assert dj["channel_names"] == {"0": "T2"}
    assert dj["labels"] == {"background": 0, "peripheral_zone": 1, "transition_zone": 2}
    assert dj["numTraining"] == NUM_TR
    assert dj["file_ending"] == ".nii.gz"


def test_labels_images_and_spacing(dataset):
    _, folder = dataset
    for i in range(NUM_TR):
        seg, seg_sp = _read(os.path.join(folder, "labelsTr", f"prostate_{i:03d}.nii.gz"))
        img, img_sp = _read(os.path.join(folder, "imagesTr", f"prostate_{i:03d}_0000.nii.gz"))
        assert seg.shape == SHAPE and img.shape == SHAPE
        assert np.allclose(img_sp, SPACING) and np.allclose(seg_sp, SPACING)
        assert set(np.unique(seg).tolist()) == {0, 1, 2}
        assert img.dtype == np.float32 and np.isfinite(img).all() and img.std() > 0
        # peripheral zone brighter than transition zone on average (T2-like contrast)
        assert img[seg == 1].mean() > img[seg == 2].mean()
        # gland does not touch the volume border
        fg = seg > 0
        assert not (fg[0].any() or fg[-1].any() or fg[:, 0].any() or fg[:, -1].any()
                    or fg[:, :, 0].any() or fg[:, :, -1].any())


def test_default_geometry_has_both_classes():
    for s in range(5):
        img, seg = synthesize_case((24, 64, 64), (3.0, 0.8, 0.8), seed=s)
        assert img.shape == seg.shape == (24, 64, 64)
        counts = np.bincount(seg.ravel(), minlength=3)
        assert len(counts) == 3 and counts[1] > 0 and counts[2] > 0


def test_determinism(tmp_path):
    kw = dict(num_training=2, num_test=1, shape=(12, 32, 32), spacing=(2.5, 1.0, 1.0))
    a = make_synthetic_prostate_dataset(str(tmp_path / "a"), seed=7, **kw)
    b = make_synthetic_prostate_dataset(str(tmp_path / "b"), seed=7, **kw)
    c = make_synthetic_prostate_dataset(str(tmp_path / "c"), seed=8, **kw)
    for rel in ("imagesTr/prostate_000_0000.nii.gz", "labelsTr/prostate_001.nii.gz",
                "imagesTs/prostate_002_0000.nii.gz"):
        xa, xb, xc = (_read(os.path.join(f, rel))[0] for f in (a, b, c))
        assert np.array_equal(xa, xb)
        assert not np.array_equal(xa, xc)
    # cases within one dataset differ from each other
    assert not np.array_equal(_read(os.path.join(a, "labelsTr/prostate_000.nii.gz"))[0],
                              _read(os.path.join(a, "labelsTr/prostate_001.nii.gz"))[0])


def test_refuses_to_overwrite(tmp_path):
    kw = dict(num_training=1, num_test=0, shape=(12, 32, 32))
    folder = make_synthetic_prostate_dataset(str(tmp_path), **kw)
    marker = os.path.join(folder, "keep_me.txt")
    with open(marker, "w") as f:
        f.write("x")
    with pytest.raises(FileExistsError) as e:
        make_synthetic_prostate_dataset(str(tmp_path), **kw)
    assert folder in str(e.value) and "overwrite=True" in str(e.value)
    assert os.path.isfile(marker)
    # explicit overwrite regenerates (different seed -> different data) and keeps unrelated files
    before = _read(os.path.join(folder, "imagesTr", "prostate_000_0000.nii.gz"))[0]
    make_synthetic_prostate_dataset(str(tmp_path), seed=1, overwrite=True, **kw)
    after = _read(os.path.join(folder, "imagesTr", "prostate_000_0000.nii.gz"))[0]
    assert not np.array_equal(before, after)
    assert os.path.isfile(marker)


def test_nnunet_verify_dataset_integrity(dataset):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    _, folder = dataset
    verify_dataset_integrity(folder, num_processes=1)  # raises on any problem
