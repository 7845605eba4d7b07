"""Tests for the MSKD structured distillation losses (FFD and RGD), written from the spec in
nnunet_kd/losses/mskd.py: hand-computed values, invariances, masking, gradients and resampling."""
import math

import pytest
import torch

from nnunet_kd.losses.mskd import (
    FeatureFilteringDistillation,
    RegionGraphDistillation,
    boundary_band,
    feature_filtering_loss,
    region_graph_loss,
    resize_labels,
)

S3 = math.sqrt(3.) / 2.  # sin(60 deg)


# ----------------------------------------------------------------------------------------------------------------------
# fixtures / builders
# ----------------------------------------------------------------------------------------------------------------------
def two_region_labels(dim3: bool = False) -> torch.Tensor:
    """(1,1,4,4[,2]) label map: columns 0-1 are class 0 (region A), columns 2-3 are class 1 (region B)."""
    lab = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    lab[..., 2:] = 1
    if dim3:
        lab = lab[..., None].expand(1, 1, 4, 4, 2).contiguous()
    return lab


def piecewise(labels: torch.Tensor, vectors) -> torch.Tensor:
    """features (B, D, *sp) with the vector vectors[k] at every voxel of class k."""
    vec = torch.tensor(vectors, dtype=torch.float32)  # (K, D)
    f = vec[labels[:, 0]]  # (B, *sp, D)
    return f.movedim(-1, 1).contiguous()


def random_case(dim3: bool, num_classes: int = 3, ds: int = 6, dt: int = 6, seed: int = 0, b: int = 2):
    g = torch.Generator().manual_seed(seed)
    sp = (6, 7, 5) if dim3 else (9, 8)
    lab = torch.randint(0, num_classes, (b, 1) + sp, generator=g)
    s = torch.randn((b, ds) + sp, generator=g)
    t = torch.randn((b, dt) + sp, generator=g)
    return s, t, lab


def rgd(*args, **kwargs):
    return region_graph_loss(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------
def test_boundary_band_square_2d():
    m = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    m[..., 2:6, 2:6] = True
    exp = torch.zeros_like(m)
    exp[..., 1:7, 1:7] = True
    exp[..., 3:5, 3:5] = False  # 4x4 square eroded by a 3x3 window keeps its 2x2 centre
    assert torch.equal(boundary_band(m, 1), exp)
    assert int(boundary_band(m, 1).sum()) == 32
    assert not boundary_band(m, 0).any()

    # width 2: dilation covers [1:9]^2 of a 10x10 image; the 4x4 square erodes away entirely
    m2 = torch.zeros(1, 1, 10, 10, dtype=torch.bool)
    m2[..., 3:7, 3:7] = True
    exp2 = torch.zeros_like(m2)
    exp2[..., 1:9, 1:9] = True
    assert torch.equal(boundary_band(m2, 2), exp2)


def test_boundary_band_image_border_is_not_a_boundary():
    m = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    m[..., 0:4, 0:4] = True
    exp = torch.zeros_like(m)
    exp[..., 0:5, 0:5] = True
    exp[..., 0:3, 0:3] = False
    assert torch.equal(boundary_band(m, 1), exp)


def test_boundary_band_cube_3d_and_channels_independent():
    m = torch.zeros(1, 2, 8, 8, 8, dtype=torch.bool)
    m[0, 0, 2:6, 2:6, 2:6] = True
    exp = torch.zeros_like(m)
    exp[0, 0, 1:7, 1:7, 1:7] = True
    exp[0, 0, 3:5, 3:5, 3:5] = False
    band = boundary_band(m, 1)  # channel 1 is empty: its band is empty
    assert torch.equal(band, exp)
    assert int(band.sum()) == 6 ** 3 - 2 ** 3


def test_resize_labels_nearest_downsample_and_upsample():
    g = torch.Generator().manual_seed(1)
    low = torch.randint(0, 5, (2, 1, 4, 4), generator=g).to(torch.uint8)
    high = low.repeat_interleave(2, 2).repeat_interleave(2, 3)  # (2,1,8,8), 2x2 blocks
    down = resize_labels(high, (4, 4))
    assert down.dtype == torch.uint8 and down.shape == (2, 1, 4, 4)
    assert torch.equal(down, low)
    # (B, *sp) layout is preserved, int64 kept, upsampling replicates
    up = resize_labels(low[:, 0].long(), (8, 8))
    assert up.dtype == torch.long and up.shape == (2, 8, 8)
    assert torch.equal(up, high[:, 0].long())
    # non-integer factor, by hand: nearest-exact picks source floor((i + 0.5) * 6 / 3) = 1, 3, 5
    row = torch.arange(6).view(1, 1, 1, 6).expand(1, 1, 2, 6)
    assert resize_labels(row, (2, 3))[0, 0, 0].tolist() == [1, 3, 5]
    # 3D
    low3 = torch.randint(0, 4, (1, 1, 3, 2, 4), generator=g)
    high3 = low3.repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4)
    assert torch.equal(resize_labels(high3, (3, 2, 4)), low3)
    # same shape: unchanged
    assert torch.equal(resize_labels(low, (4, 4)), low)


# ----------------------------------------------------------------------------------------------------------------------
# Region Graph Distillation: hand-computed values
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('dim3', [False, True])
def test_rgd_hand_computed(dim3):
    lab = two_region_labels(dim3)
    t = piecewise(lab, [[1., 0.], [0., 1.]])  # teacher prototypes orthogonal: edge cosine 0
    s = piecewise(lab, [[1., 0.], [0.5, S3]])  # student prototypes at 60 degrees: edge cosine 0.5
    out = rgd(s, t, lab, num_classes=2)
    # edge: off-diagonal mean of (0.5 - 0)^2 over the two ordered pairs
    assert out['edge'].item() == pytest.approx(0.25, abs=1e-6)
    # voxel: piecewise-constant features -> every voxel has cosine 1 with its own prototype in both nets
    assert out['voxel'].item() == pytest.approx(0.0, abs=1e-6)
    # node: node A map teacher (1 on A, 0 on B), student (1 on A, 0.5 on B); unit-RMS maps ->
    # MSE = 2 - 2 cos(m_s, m_t) = 2 - 2 * 8 / sqrt(8 * 10) = 2 - 4 / sqrt(5); node B is symmetric
    node = 2. - 4. / math.sqrt(5.)
    assert out['node'].item() == pytest.approx(node, abs=1e-6)
    assert out['total'].item() == pytest.approx(node + 0.25, abs=1e-6)
    for v in out.values():
        assert v.dim() == 0 and v.dtype == torch.float32

    w = rgd(s, t, lab, num_classes=2, node_weight=2., edge_weight=3., voxel_weight=5.)
    assert w['total'].item() == pytest.approx(2. * node + 3. * 0.25, abs=1e-6)

    # background excluded: a single node -> no edge; its node map is still the class-1 map
    fg = rgd(s, t, lab, num_classes=2, include_background=False)
    assert fg['edge'].item() == 0.
    assert fg['node'].item() == pytest.approx(node, abs=1e-6)
    assert fg['voxel'].item() == pytest.approx(0.0, abs=1e-6)


def test_rgd_hand_computed_voxel_term():
    # teacher constant (1,0) in region A; student in region A alternates (1,0) / (0,1) columns
    # -> student prototype (0.5, 0.5): cosine 1/sqrt(2) at every A voxel, teacher cosine 1
    lab = two_region_labels()
    t = piecewise(lab, [[1., 0.], [0., 1.]])
    s = t.clone()
    s[:, :, :, 0] = torch.tensor([1., 0.]).view(1, 2, 1)
    s[:, :, :, 1] = torch.tensor([0., 1.]).view(1, 2, 1)
    out = rgd(s, t, lab, num_classes=2, include_background=False)
    assert out['voxel'].item() == pytest.approx(0.0, abs=1e-6)  # only region B (unchanged) counts
    out = rgd(s, t, lab, num_classes=2)
    # region A: 8 voxels with (1/sqrt2 - 1)^2, region B: 8 voxels with 0 -> mean over 16 voxels
    assert out['voxel'].item() == pytest.approx(0.5 * (1. / math.sqrt(2.) - 1.) ** 2, abs=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Feature Filtering Distillation: hand-computed values
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('dim3', [False, True])
def test_ffd_hand_computed_similarity_term(dim3):
    lab = two_region_labels(dim3)
    t = piecewise(lab, [[1., 0.], [0., 1.]])
    s = piecewise(lab, [[1., 0.], [0.5, S3]])
    # attention maps are equal (mean_ch f^2 = 0.5 everywhere in both) -> attention term 0.
    # class 1: R = columns 2-3, kept set K = columns 1-3 (band of width 1 reaches column 1).
    # cosine to the region prototype, compared on the band outside R only (inside R it is RGD's voxel term):
    # column 1, student 0.5, teacher 0 -> similarity term = 4 * 0.25 / 4 = 1/4; pair loss = (0 + 1/4) / 2 = 1/8
    loss = feature_filtering_loss(s, t, lab, num_classes=2)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(1. / 8., abs=1e-6)
    # with background: class 0 is symmetric (column 2 is its band) -> mean of two 1/8 pairs
    assert feature_filtering_loss(s, t, lab, 2, include_background=True).item() == pytest.approx(1. / 8., abs=1e-6)
    # no band: K = R, where both nets have cosine 1 -> 0
    assert feature_filtering_loss(s, t, lab, 2, boundary_width=0).item() == pytest.approx(0., abs=1e-6)
    # teacher-confidence mask removing column 1 -> K = R -> 0
    conf = torch.ones_like(lab, dtype=torch.bool)
    conf[:, :, :, 1] = False  # column 1 (all rows, all z)
    assert feature_filtering_loss(s, t, lab, 2, teacher_confident_mask=conf).item() == pytest.approx(0., abs=1e-6)


def test_ffd_hand_computed_attention_term():
    lab = two_region_labels()
    t = piecewise(lab, [[1., 0.], [0., 1.]])
    s = piecewise(lab, [[1., 0.], [0., 2.]])  # same directions (cosine term 0), region B twice as strong
    # K = columns 1-3 (12 voxels). teacher attention 0.5 everywhere; student 0.5 on column 1, 2 on columns 2-3
    # |a_s/|a_s| - a_t/|a_t||^2 = 2 - 2 * (4*0.25 + 8*1) / (sqrt(12*0.25) * sqrt(4*0.25 + 8*4)) = 2 - 6/sqrt(11)
    att = 2. - 6. / math.sqrt(11.)
    assert feature_filtering_loss(s, t, lab, 2).item() == pytest.approx(0.5 * att, abs=1e-6)
    # global rescaling of the student does not change the attention term
    assert feature_filtering_loss(3. * s, t, lab, 2).item() == pytest.approx(0.5 * att, abs=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# invariances: zero for identical / permuted / duplicated-channel students, positive otherwise
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('dim3', [False, True])
def test_zero_for_same_geometry_and_positive_otherwise(dim3):
    _, t, lab = random_case(dim3, ds=6, dt=6)
    perm = torch.randperm(t.shape[1], generator=torch.Generator().manual_seed(3))
    students = {'same': t.clone(), 'perm': t[:, perm].clone(), 'concat': torch.cat([t, t], 1)}
    for name, s in students.items():
        for bg in (False, True):
            f = feature_filtering_loss(s, t, lab, 3, include_background=bg, boundary_width=1)
            assert f.item() == pytest.approx(0., abs=1e-5), (name, bg)
            out = rgd(s, t, lab, 3, include_background=bg)
            for k, v in out.items():
                assert v.item() == pytest.approx(0., abs=1e-5), (name, bg, k)
    # teacher with more channels than the student (teacher = student concatenated with itself)
    s = t[:, :3].clone()
    tt = torch.cat([s, s], 1)
    assert feature_filtering_loss(s, tt, lab, 3).item() == pytest.approx(0., abs=1e-5)
    assert rgd(s, tt, lab, 3)['total'].item() == pytest.approx(0., abs=1e-5)

    # different features (and channel counts) -> every term positive
    s2, t2, _ = random_case(dim3, ds=5, dt=7, seed=4)
    assert feature_filtering_loss(s2, t2, lab, 3).item() > 1e-3
    out = rgd(s2, t2, lab, 3)
    for k in ('node', 'edge', 'voxel', 'total'):
        assert out[k].item() > 1e-3, k


# ----------------------------------------------------------------------------------------------------------------------
# classes missing from a patch
# ----------------------------------------------------------------------------------------------------------------------
def _missing_class_case():
    g = torch.Generator().manual_seed(7)
    lab = torch.zeros(2, 1, 8, 8, dtype=torch.long)
    lab[0, :, :, 4:] = 1  # item 0: background + class 1
    lab[1, :, :4] = 1  # item 1: classes 1 and 2 only
    lab[1, :, 4:] = 2
    s = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.randn(2, 6, 8, 8, generator=g)
    return s, t, lab


@pytest.mark.parametrize('bg', [True, False])
def test_rgd_absent_classes_excluded(bg):
    s, t, lab = _missing_class_case()
    out = rgd(s, t, lab, 3, include_background=bg)
    per = [rgd(s[i:i + 1], t[i:i + 1], lab[i:i + 1], 3, include_background=bg) for i in range(2)]
    for k in ('node', 'voxel'):
        assert torch.isfinite(out[k])
        assert out[k].item() == pytest.approx(0.5 * (per[0][k].item() + per[1][k].item()), abs=1e-6), k
    if bg:  # both items have two nodes
        assert out['edge'].item() == pytest.approx(0.5 * (per[0]['edge'].item() + per[1]['edge'].item()), abs=1e-6)
    else:  # item 0 has a single node (class 1): no edge, only item 1 counts
        assert per[0]['edge'].item() == 0.
        assert out['edge'].item() == pytest.approx(per[1]['edge'].item(), abs=1e-6)
    assert out['edge'].item() > 0


@pytest.mark.parametrize('bg', [True, False])
def test_ffd_absent_classes_excluded(bg):
    s, t, lab = _missing_class_case()
    s.requires_grad_(True)
    loss = feature_filtering_loss(s, t, lab, 3, include_background=bg)
    per = [feature_filtering_loss(s[i:i + 1], t[i:i + 1], lab[i:i + 1], 3, include_background=bg).item()
           for i in range(2)]
    # present (item, class) pairs: item 0 -> {0,1} or {1}; item 1 -> {1,2}
    n = [2, 2] if bg else [1, 2]
    assert loss.item() == pytest.approx((n[0] * per[0] + n[1] * per[1]) / sum(n), abs=1e-6)
    loss.backward()
    assert torch.isfinite(s.grad).all()


def test_nothing_present_gives_graph_keeping_zero():
    s = torch.randn(2, 4, 6, 6, requires_grad=True)
    t = torch.randn(2, 5, 6, 6)
    lab = torch.zeros(2, 1, 6, 6, dtype=torch.long)  # background only
    f = feature_filtering_loss(s, t, lab, 3)  # foreground only by default
    assert f.item() == 0. and f.requires_grad and f.dtype == torch.float32
    out = rgd(s, t, lab, 3, include_background=False)
    for v in out.values():
        assert v.item() == 0. and v.requires_grad
    (f + out['total']).backward()
    assert torch.equal(s.grad, torch.zeros_like(s))
    # everything invalid
    vm = torch.zeros(2, 1, 6, 6, dtype=torch.bool)
    assert feature_filtering_loss(s, t, lab, 3, valid_mask=vm, include_background=True).item() == 0.
    assert rgd(s, t, lab, 3, valid_mask=vm)['total'].item() == 0.


# ----------------------------------------------------------------------------------------------------------------------
# ignore label / valid mask
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('dim3', [False, True])
def test_invalid_voxels_do_not_matter(dim3):
    s, t, lab = random_case(dim3, ds=4, dt=6, seed=11)
    vm = torch.ones_like(lab, dtype=torch.bool)
    vm[:, :, 2:5, 1:4] = False
    # Garbage at the invalid voxels, from a generator of its own: the global RNG depends on which tests ran before.
    garbage = torch.Generator().manual_seed(5)
    s2, t2 = s.clone(), t.clone()
    inv = ~vm.expand_as(s)
    s2[inv] = 10. * torch.randn(int(inv.sum()), generator=garbage)
    inv_t = ~vm.expand_as(t)
    t2[inv_t] = -5. * torch.rand(int(inv_t.sum()), generator=garbage)
    for bg in (False, True):
        a = feature_filtering_loss(s, t, lab, 3, valid_mask=vm, include_background=bg, boundary_width=2)
        b = feature_filtering_loss(s2, t2, lab, 3, valid_mask=vm, include_background=bg, boundary_width=2)
        assert a.item() == pytest.approx(b.item(), rel=1e-5, abs=1e-6)
        # the control: without the mask the same garbage changes the loss clearly (measured: by 0.02 to 0.05)
        unmasked = feature_filtering_loss(s2, t2, lab, 3, include_background=bg, boundary_width=2).item()
        assert abs(a.item() - unmasked) > 0.01
        ra = rgd(s, t, lab, 3, valid_mask=vm, include_background=bg)
        rb = rgd(s2, t2, lab, 3, valid_mask=vm, include_background=bg)
        for k in ra:
            assert ra[k].item() == pytest.approx(rb[k].item(), rel=1e-5, abs=1e-6), k
    # an out-of-range (ignore) label acts like valid_mask == False
    lab_ign = lab.clone()
    lab_ign[~vm] = 3
    assert feature_filtering_loss(s2, t2, lab_ign, 3).item() == pytest.approx(
        feature_filtering_loss(s, t, lab, 3, valid_mask=vm).item(), rel=1e-5, abs=1e-6)
    assert rgd(s2, t2, lab_ign, 3)['total'].item() == pytest.approx(
        rgd(s, t, lab, 3, valid_mask=vm)['total'].item(), rel=1e-5, abs=1e-6)
    # no gradient at invalid voxels
    sg = s.clone().requires_grad_(True)
    (feature_filtering_loss(sg, t, lab, 3, valid_mask=vm) + rgd(sg, t, lab, 3, valid_mask=vm)['total']).backward()
    assert torch.all(sg.grad[inv] == 0)
    assert sg.grad[~inv].abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('dim3', [False, True])
def test_gradient_reaches_student_only(dim3):
    s, t, lab = random_case(dim3, ds=4, dt=8)
    s.requires_grad_(True)
    t.requires_grad_(True)
    f = feature_filtering_loss(s, t, lab, 3)
    r = rgd(s, t, lab, 3)
    (f + r['total']).backward()
    assert t.grad is None
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    # modules too
    s.grad = None
    m1 = FeatureFilteringDistillation(3)
    m2 = RegionGraphDistillation(3)
    (m1(s, t, lab) + m2(s, t, lab)['total']).backward()
    assert t.grad is None and s.grad.abs().sum() > 0


def test_finite_gradients_for_zero_student_features():
    s = torch.zeros(2, 4, 6, 6, requires_grad=True)
    _, t, lab = random_case(False, ds=4, dt=5)
    t = t[..., :6, :6].contiguous()
    lab = lab[..., :6, :6].contiguous()
    loss = feature_filtering_loss(s, t, lab, 3) + rgd(s, t, lab, 3)['total']
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_low_precision_input_returns_float32():
    s, t, lab = random_case(False)
    f = feature_filtering_loss(s.bfloat16(), t.half(), lab, 3)
    r = rgd(s.bfloat16(), t.half(), lab, 3)
    assert f.dtype == torch.float32 and r['total'].dtype == torch.float32
    assert f.item() == pytest.approx(feature_filtering_loss(s, t, lab, 3).item(), rel=5e-2)


# ----------------------------------------------------------------------------------------------------------------------
# modules: labels / masks given at a higher resolution are resampled
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('dim3', [False, True])
def test_modules_resize_labels(dim3):
    s, t, lab = random_case(dim3, ds=4, dt=6, seed=5)
    vm = torch.ones_like(lab, dtype=torch.bool)
    vm[:, :, :2] = False
    conf = torch.rand(lab.shape, generator=torch.Generator().manual_seed(2)) > 0.3

    def up(x):
        for ax in range(2, x.dim()):
            x = x.repeat_interleave(2, ax)
        return x

    ffd = FeatureFilteringDistillation(3, boundary_width=1, include_background=True)
    a = ffd(s, t, up(lab), valid_mask=up(vm), teacher_confident_mask=up(conf))
    b = feature_filtering_loss(s, t, lab, 3, valid_mask=vm, boundary_width=1, include_background=True,
                               teacher_confident_mask=conf)
    assert a.item() == pytest.approx(b.item(), abs=1e-6)
    # (B, *sp) labels are accepted as well
    assert ffd(s, t, up(lab)[:, 0]).item() == pytest.approx(ffd(s, t, lab).item(), abs=1e-6)

    rg = RegionGraphDistillation(3, include_background=False, node_weight=0.5, edge_weight=2., voxel_weight=3.)
    ra = rg(s, t, up(lab), valid_mask=up(vm))
    rb = rgd(s, t, lab, 3, valid_mask=vm, include_background=False, node_weight=0.5, edge_weight=2.,
             voxel_weight=3.)
    assert set(ra) == {'node', 'edge', 'voxel', 'total'}
    for k in ra:
        assert ra[k].item() == pytest.approx(rb[k].item(), abs=1e-6), k
    assert ra['total'].item() == pytest.approx(0.5 * rb['node'].item() + 2. * rb['edge'].item()
                                               + 3. * rb['voxel'].item(), abs=1e-6)


def test_mismatched_labels_raise_in_functional_form():
    s, t, lab = random_case(False)
    with pytest.raises(ValueError):
        feature_filtering_loss(s, t, lab.repeat_interleave(2, 2), 3)
    with pytest.raises(ValueError):
        rgd(s, t[..., :4], lab, 3)


def test_autocast_is_disabled_inside():
    s, t, lab = random_case(True)
    ref_f = feature_filtering_loss(s, t, lab, 3).item()
    ref_r = rgd(s, t, lab, 3)['total'].item()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        f = feature_filtering_loss(s, t, lab, 3)
        r = rgd(s, t, lab, 3)['total']
    assert f.dtype == torch.float32 and r.dtype == torch.float32
    assert f.item() == pytest.approx(ref_f, rel=1e-5) and r.item() == pytest.approx(ref_r, rel=1e-5)


@pytest.mark.parametrize("dims", [2, 3])
def test_ffd_and_rgd_take_the_teachers_inference_tensors_with_unchanged_values_and_gradients(dims):
    torch.manual_seed(dims)
    shape = (2, *([6] * dims))
    labels = torch.randint(0, 3, (shape[0], 1, *shape[1:]))
    teacher = torch.randn(shape[0], 5, *shape[1:])
    with torch.inference_mode():
        teacher_inference = teacher.clone()
    for loss in (FeatureFilteringDistillation(3), RegionGraphDistillation(3)):
        values, grads = [], []
        for t in (teacher, teacher_inference):
            student = torch.randn(shape[0], 4, *shape[1:], generator=torch.Generator().manual_seed(1)).requires_grad_()
            value = loss(student, t, labels)
            value = value["total"] if isinstance(value, dict) else value
            values.append(value.item())
            grads.append(torch.autograd.grad(value, student)[0])
        assert values[0] == values[1] and torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("dims", [2, 3])
def test_ffd_and_rgd_sharing_one_region_statistics_give_what_each_computes_alone(dims):
    from nnunet_kd.losses.mskd import region_statistics

    torch.manual_seed(10 + dims)
    shape = (2, *([6] * dims))
    labels = torch.randint(0, 3, (shape[0], 1, *shape[1:]))
    valid = torch.rand(shape[0], 1, *shape[1:]) > 0.2
    teacher = torch.randn(shape[0], 5, *shape[1:])
    student_alone = torch.randn(shape[0], 4, *shape[1:], requires_grad=True)
    ffd, rgd = FeatureFilteringDistillation(3), RegionGraphDistillation(3)
    alone = ffd(student_alone, teacher, labels, valid) + rgd(student_alone, teacher, labels, valid)["total"]
    student_shared = student_alone.detach().clone().requires_grad_()
    stats = region_statistics(student_shared, teacher, labels, 3, valid)
    shared = ffd(student_shared, teacher, labels, valid, stats=stats) + \
        rgd(student_shared, teacher, labels, valid, stats=stats)["total"]
    assert shared.item() == pytest.approx(alone.item(), rel=1e-6)
    grad_alone, = torch.autograd.grad(alone, student_alone)
    grad_shared, = torch.autograd.grad(shared, student_shared)
    assert torch.allclose(grad_shared, grad_alone, rtol=1e-5, atol=1e-8)
