"""data.py's batched augmentation: each op against torchvision's functional op
applied to one image at a time, the drawn parameters against torchvision's own
get_params, and the batched loader's order, sharding and resumption."""
import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image, ImageFile
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from conftest import make_image_folder

import data

N_DRAWS = 10_000


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def images(n=6, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    x[0, :, :3] = 0.5  # grey pixels (no hue)
    x[1, 1, :2] = x[1, 0, :2]  # ties between the largest channels
    x[2] = x[2].round()  # pure black, white and primaries
    return x


def per_image(fn, x, *params):
    return torch.stack([fn(x[i], *[p[i] for p in params]) for i in range(len(x))])


# -----------------------------------------------------------------------------
# each op against torchvision, given fixed per-sample parameters

@pytest.mark.parametrize("ours, theirs, low, high", [
    (data.adjust_brightness, F.adjust_brightness, 0.0, 2.0),
    (data.adjust_contrast, F.adjust_contrast, 0.0, 2.0),
    (data.adjust_saturation, F.adjust_saturation, 0.0, 2.0),
    (data.adjust_hue, F.adjust_hue, -0.5, 0.5),
])
def test_colour_ops_match_torchvision_per_image(ours, theirs, low, high):
    x = images()
    f = torch.linspace(low, high, len(x))
    expected = per_image(lambda img, v: theirs(img, v.item()), x, f)
    assert (ours(x, f) - expected).abs().max().item() <= 1e-4


def test_grayscale_and_solarize_match_torchvision():
    x = images()
    assert (data.grayscale(x).expand_as(x) - F.rgb_to_grayscale(x, num_output_channels=3)).abs().max() <= 1e-6
    # RandomSolarize(threshold=128) on uint8 images == threshold 128/255 on float ones
    u8 = (x * 255).round().to(torch.uint8)
    expected = F.solarize(u8, 128).float() / 255
    assert (data.solarize(u8.float() / 255) - expected).abs().max() <= 1e-6


@pytest.mark.parametrize("kernel", [3, 9, 23])
def test_gaussian_blur_matches_torchvision(kernel):
    x = images(size=32)
    sigma = torch.tensor([0.1, 0.3, 0.8, 1.2, 1.7, 2.0])
    expected = per_image(lambda img, s: F.gaussian_blur(img, [kernel, kernel], [s.item(), s.item()]), x, sigma)
    assert (data.gaussian_blur(x, sigma, kernel) - expected).abs().max() <= 1e-5


BOXES = [  # (top, left, height, width) in a 16 x 16 image, flip
    ((0, 0, 16, 16), False), ((2, 3, 9, 12), True), ((5, 0, 4, 4), False),
    ((0, 7, 16, 9), True), ((11, 11, 5, 5), False), ((1, 2, 15, 3), True),
]


@pytest.mark.parametrize("size", [16, 40, 8])
def test_resized_crop_matches_torchvision_antialiased_bicubic(size):
    """Upscaling (the batched path's case: a crop of the image back to the
    image size), equal size and downscaling, on images in [0.25, 0.75], where
    no intermediate value leaves [0, 1] (so our clamp between the passes does
    nothing). torchvision's tensor resize with antialias=True computes PIL's
    bicubic weights (a = -0.5, kernel widened when shrinking, renormalized at
    the crop's edges), as our matrices do, so the only difference is float32
    rounding in another summation order: 1e-5."""
    x = 0.25 + 0.5 * images()
    box = torch.tensor([b for b, _ in BOXES])
    flip = torch.tensor([f for _, f in BOXES])
    out = data.resized_crop(x, *box.unbind(1), size, flip)
    expected = []
    for img, (t, l, h, w), f in zip(x, box.tolist(), flip.tolist()):
        y = F.resized_crop(img, t, l, h, w, [size, size], InterpolationMode.BICUBIC, antialias=True)
        expected.append(F.horizontal_flip(y) if f else y)
    assert (out - torch.stack(expected)).abs().max() <= 1e-5


@pytest.mark.parametrize("size", [16, 40])
def test_resized_crop_matches_the_pil_path_within_rounding(size):
    """Against what the PIL path does (torchvision's resized_crop on a PIL
    image), on full-range noise, for crops resized up or to the same size (all
    the batched path does: a crop of the image back to the image size). PIL
    resizes rows, clamps and rounds to 8 bits, then columns, clamps and rounds;
    we clamp but keep floats. Rounding the first pass (<= 0.5 grey level) passes
    through the second pass's weights, whose absolute values sum to at most 1.25
    for this kernel, and the final rounding adds 0.5: at most 1.125 grey levels."""
    x = images()
    u8 = (x * 255).round().to(torch.uint8)
    box = torch.tensor([b for b, _ in BOXES])
    out = data.resized_crop(u8.float() / 255, *box.unbind(1), size, None)
    for img, (t, l, h, w), y in zip(u8, box.tolist(), out):
        pil = Image.fromarray(img.permute(1, 2, 0).numpy())
        ref = np.array(T.functional.resized_crop(pil, t, l, h, w, [size, size], InterpolationMode.BICUBIC))
        ref = torch.from_numpy(ref).permute(2, 0, 1).float() / 255
        assert (y - ref).abs().max() <= 1.125 / 255 + 1e-6


def test_colour_jitter_applies_each_samples_ops_in_its_order():
    """Sample i: if applied, the four torchvision ops in the order order[i]
    with its factors; else unchanged."""
    x = images()
    g = torch.Generator().manual_seed(3)
    factors = torch.stack([torch.rand(6, generator=g) + 0.5, torch.rand(6, generator=g) + 0.5,
                           torch.rand(6, generator=g) + 0.5, torch.rand(6, generator=g) * 0.4 - 0.2], 1)
    order = torch.stack([torch.randperm(4, generator=g) for _ in range(6)])
    apply = torch.tensor([True, True, False, True, True, True])
    ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
    expected = []
    for img, fs, o, a in zip(x, factors, order, apply):
        if a:
            for j in o.tolist():
                img = ops[j](img, fs[j].item())
        expected.append(img)
    out = data.color_jitter(x, factors, order, apply)
    assert (out - torch.stack(expected)).abs().max() <= 1e-4
    assert torch.equal(out[2], x[2])


def per_sample_jitter(x, factors, order, apply):
    """The colour jitter one image at a time: its ops in its order, with the
    single-op functions."""
    out = []
    for i in range(len(x)):
        img = x[i:i + 1]
        if apply[i]:
            for j in order[i].tolist():
                img = data.JITTER_OPS[j](img, factors[i:i + 1, j])
        out.append(img)
    return torch.cat(out)


def test_batched_colour_jitter_equals_a_per_sample_loop():
    """The whole-batch passes (blends slot by slot around one hue pass) against
    each image's ops applied in its own order by the single-op functions, on
    64 samples (every op in every slot, brightness and contrast up to 2 so that
    the clamps act). The blends differ from the single ops only in rounding (a
    fused multiply-add), the rest is the same arithmetic: 1e-6."""
    g = torch.Generator().manual_seed(11)
    x = images(n=64, seed=1)
    factors = torch.stack([torch.rand(64, generator=g) * 2, torch.rand(64, generator=g) * 2,
                           torch.rand(64, generator=g) * 2, torch.rand(64, generator=g) - 0.5], 1)
    order = torch.rand(64, 4, generator=g).argsort(1)
    apply = torch.rand(64, generator=g) < 0.8
    out = data.color_jitter(x, factors, order, apply)
    assert (out - per_sample_jitter(x, factors, order, apply)).abs().max() <= 1e-6
    assert torch.equal(out[~apply], x[~apply])  # untouched samples are exactly themselves


@pytest.mark.parametrize("method", ["vje", "byol"])
def test_render_view_equals_a_per_sample_loop(method):
    """A whole view (crop, jitter, grayscale, blur with p 0.5, solarize) made for
    the batch at once against the same single-op functions applied to one
    image at a time, only where its draws say so: 1e-6 (see above)."""
    recipe = dict(data.view_recipes(method, 32)[1], blur_p=0.5)
    g = torch.Generator().manual_seed(6)
    u8 = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=g)
    p = data.draw_view_params(32, recipe, 32, 32, g, "cpu")
    assert p["blur"].any() and not p["blur"].all() and p["solarize"].any() and p["gray"].any()
    out = data.render_view(u8, p, recipe, 32, data.CIFAR_MEAN, data.CIFAR_STD)
    for i in range(32):
        one = {k: v[i:i + 1] for k, v in p.items()}
        img = data.resized_crop(u8[i:i + 1].float() / 255, one["top"], one["left"], one["height"], one["width"],
                                32, one["flip"])
        img = per_sample_jitter(img, one["factors"], one["order"], one["jitter"])
        if one["gray"]:
            img = data.grayscale(img).expand_as(img)
        if one["blur"]:
            img = data.gaussian_blur(img, one["sigma"], recipe["blur_kernel"])
        if one["solarize"]:
            img = data.solarize(img)
        img = F.normalize(img, data.CIFAR_MEAN, data.CIFAR_STD)
        assert (out[i:i + 1] - img).abs().max() <= 1e-6, i


def test_render_view_equals_the_ops_in_the_pil_paths_order():
    """A whole view: crop + flip, jitter, grayscale, blur, solarize, normalize,
    recomputed image by image with torchvision's ops (pixels in 64..191, so
    that the resize never leaves [0, 1]; see the tests above)."""
    recipe = dict(data.view_recipes("vje", 32)[1], blur_p=0.5)
    g = torch.Generator().manual_seed(5)
    u8 = torch.randint(64, 192, (8, 3, 32, 32), dtype=torch.uint8, generator=g)
    p = data.draw_view_params(8, recipe, 32, 32, g, "cpu")
    out = data.render_view(u8, p, recipe, 32, data.CIFAR_MEAN, data.CIFAR_STD)
    ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
    for i in range(8):
        img = F.resized_crop(u8[i].float() / 255, p["top"][i].item(), p["left"][i].item(), p["height"][i].item(),
                             p["width"][i].item(), [32, 32], InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)
        if p["flip"][i]:
            img = F.horizontal_flip(img)
        if p["jitter"][i]:
            for j in p["order"][i].tolist():
                img = ops[j](img, p["factors"][i, j].item())
        if p["gray"][i]:
            img = F.rgb_to_grayscale(img, num_output_channels=3)
        if p["blur"][i]:
            s = p["sigma"][i].item()
            img = F.gaussian_blur(img, [recipe["blur_kernel"]] * 2, [s, s])
        if p["solarize"][i]:
            img = F.solarize(img, 128 / 255)
        img = F.normalize(img, data.CIFAR_MEAN, data.CIFAR_STD)
        assert (out[i] - img).abs().max() <= 1e-4, i


# -----------------------------------------------------------------------------
# the drawn parameters against torchvision's own get_params (10,000 draws)

def ks_statistic(a, b):
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the
    empirical CDFs, evaluated at every observed value (ties included)."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    grid = np.concatenate([a, b])
    return np.abs(np.searchsorted(a, grid, side="right") / len(a) -
                  np.searchsorted(b, grid, side="right") / len(b)).max()


KS_LIMIT = 1.95 * np.sqrt(2 / N_DRAWS)  # the 0.1 % critical value for two samples of 10,000


def rate_limit(p):
    """4.5 standard errors of the difference of two rates from 10,000 draws each."""
    return 4.5 * np.sqrt(2 * p * (1 - p) / N_DRAWS) + 1e-9


@pytest.mark.parametrize("scale, in_h, in_w", [((0.08, 1.0), 32, 32), ((0.2, 1.0), 32, 32), ((0.08, 1.0), 24, 40)])
def test_crop_area_and_aspect_ratio_follow_torchvision(scale, in_h, in_w):
    torch.manual_seed(0)
    ratio = (3 / 4, 4 / 3)
    img = torch.zeros(1, in_h, in_w)
    ref = np.array([T.RandomResizedCrop.get_params(img, scale, ratio) for _ in range(N_DRAWS)])
    g = torch.Generator().manual_seed(1)
    top, left, h, w = (t.numpy() for t in data.crop_params(N_DRAWS, in_h, in_w, scale, ratio, g, "cpu"))
    assert ((top >= 0) & (left >= 0) & (top + h <= in_h) & (left + w <= in_w) & (h > 0) & (w > 0)).all()
    area, ref_area = h * w / (in_h * in_w), ref[:, 2] * ref[:, 3] / (in_h * in_w)
    assert ks_statistic(area, ref_area) < KS_LIMIT
    assert ks_statistic(w / h, ref[:, 3] / ref[:, 2]) < KS_LIMIT
    # positions: uniform over the places the box fits
    assert ks_statistic(top / np.maximum(in_h - h, 1), ref[:, 0] / np.maximum(in_h - ref[:, 2], 1)) < KS_LIMIT


def test_jitter_factors_order_and_blur_sigma_follow_torchvision():
    torch.manual_seed(0)
    jitter = (0.4, 0.4, 0.2, 0.1)
    cj = T.ColorJitter(*jitter)
    ref = [T.ColorJitter.get_params(cj.brightness, cj.contrast, cj.saturation, cj.hue) for _ in range(N_DRAWS)]
    ref_sigma = [T.GaussianBlur.get_params(0.1, 2.0) for _ in range(N_DRAWS)]
    recipe = dict(data.view_recipes("vje", 32)[0], jitter=jitter)
    p = data.draw_view_params(N_DRAWS, recipe, 32, 32, torch.Generator().manual_seed(2), "cpu")
    for j in range(4):
        assert ks_statistic(p["factors"][:, j].numpy(), [r[j + 1] for r in ref]) < KS_LIMIT, j
    assert ks_statistic(p["sigma"].numpy(), ref_sigma) < KS_LIMIT
    # each op is first (and last) in the order as often as in ColorJitter's randperm
    for slot in (0, 3):
        for j in range(4):
            ours = (p["order"][:, slot] == j).float().mean().item()
            theirs = np.mean([r[0][slot].item() == j for r in ref])
            assert abs(ours - theirs) < rate_limit(0.25), (slot, j)


def test_flip_and_apply_rates_follow_torchvision_transforms():
    """The rate at which torchvision's own random transforms fire, counted by
    running them 10,000 times on a marker image, against our Bernoulli draws."""
    torch.manual_seed(0)
    marker = torch.tensor([[[0.0, 1.0]], [[0.2, 0.6]], [[0.9, 0.3]]])  # 3 x 1 x 2, coloured, not symmetric
    fired = {
        "flip_p": lambda: not torch.equal(T.RandomHorizontalFlip(0.5)(marker), marker),
        "jitter_p": lambda: not torch.equal(T.RandomApply([T.Lambda(lambda x: x + 1)], p=0.8)(marker), marker),
        "gray_p": lambda: not torch.equal(T.RandomGrayscale(p=0.2)(marker), marker),
        "blur_p": lambda: not torch.equal(T.RandomApply([T.Lambda(lambda x: x + 1)], p=0.1)(marker), marker),
        "solarize_p": lambda: not torch.equal(T.RandomSolarize(0.5, p=0.2)(marker), marker),
    }
    recipe = data.view_recipes("vje", 32)[1]  # flip 0.5, jitter 0.8, gray 0.2, blur 0.1, solarize 0.2
    p = data.draw_view_params(N_DRAWS, recipe, 32, 32, torch.Generator().manual_seed(4), "cpu")
    names = dict(flip_p="flip", jitter_p="jitter", gray_p="gray", blur_p="blur", solarize_p="solarize")
    for key, fires in fired.items():
        theirs = np.mean([fires() for _ in range(N_DRAWS)])
        ours = p[names[key]].float().mean().item()
        assert abs(ours - theirs) < rate_limit(recipe[key]), (key, ours, theirs)


# -----------------------------------------------------------------------------
# loading and iterating

def test_images_as_tensor_decodes_a_folder_and_reads_cifar_arrays(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=2, train_per_class=3, size=8)
    ds = data.build_dataset("folder", root, "pretrain", None)
    rng = torch.get_rng_state()
    x, y = data.images_as_tensor(ds, progress=False)
    # the global RNG is untouched: the network built next starts as on the PIL path
    assert torch.equal(torch.get_rng_state(), rng)
    assert x.dtype == torch.uint8 and x.shape == (6, 3, 8, 8) and y.tolist() == [0, 0, 0, 1, 1, 1]
    path, label = ds.samples[4]
    assert torch.equal(x[4], torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1))
    sub = data.select_classes(data.build_dataset("folder", root, "pretrain", None), "class1")
    xs, ys = data.images_as_tensor(sub, progress=False)
    assert torch.equal(xs, x[3:]) and ys.tolist() == [0, 0, 0]

    class FakeCifar:  # torchvision's CIFAR holds (N, H, W, 3) uint8 and a list of targets
        data = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
        targets = [1, 0, 1, 2, 0]
    xc, yc = data.images_as_tensor(FakeCifar(), progress=False)
    assert torch.equal(xc, torch.from_numpy(FakeCifar.data).permute(0, 3, 1, 2)) and yc.tolist() == FakeCifar.targets


def test_images_of_different_sizes_give_one_line(tmp_path):
    """MixedSizes (a ValueError), one line naming the folder, for train.py to
    fall back on the PIL path or stop."""
    root = make_image_folder(tmp_path / "d", classes=2, train_per_class=2, size=8)
    Image.new("RGB", (9, 8)).save(tmp_path / "d" / "train" / "class0" / "odd.png")
    with pytest.raises(data.MixedSizes, match="differ in size") as e:
        data.images_as_tensor(data.build_dataset("folder", root, "pretrain", None), progress=False)
    assert isinstance(e.value, ValueError) and str(tmp_path / "d" / "train") in str(e.value)
    assert "\n" not in str(e.value)


def test_uniform_size_reads_the_image_headers_only(tmp_path, monkeypatch):
    """uniform_size tells mixed sizes apart before any decoding: with PIL's
    pixel decoding made to fail it still answers, for a whole folder and for
    the classes of a ClassSubset; arrays (CIFAR) have one size."""
    root = make_image_folder(tmp_path / "d", classes=3, train_per_class=2, size=8)

    def no_decoding(self):
        raise AssertionError("uniform_size decoded pixels")
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    assert data.uniform_size(data.build_dataset("folder", root, "pretrain", None))
    Image.new("RGB", (9, 8)).save(tmp_path / "d" / "train" / "class0" / "odd.png")
    ds = data.build_dataset("folder", root, "pretrain", None)
    assert not data.uniform_size(ds)
    assert data.uniform_size(data.select_classes(ds, "class1,class2"))
    assert not data.uniform_size(data.select_classes(ds, "class0"))

    class FakeCifar:
        data = np.zeros((4, 8, 8, 3), dtype=np.uint8)
        targets = [0, 1, 0, 1]
    assert data.uniform_size(FakeCifar())


def loader(n=40, batch=4, rank=0, world=1, seed=7, method="vje"):
    x = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    info = dict(image_size=8, mean=data.CIFAR_MEAN, std=data.CIFAR_STD)
    return data.BatchedTwoViews(x, torch.arange(n), method, info, batch, seed, rank, world)


def test_batched_order_is_distributed_samplers_for_one_process():
    """One process sees the same images in the same batches as the PIL path."""
    ld = loader()
    ld.set_epoch(3)
    ours = [y.tolist() for _, y in ld]
    sampler = data.ShardSampler(list(range(40)), num_replicas=1, rank=0, shuffle=True, seed=7, drop_last=True)
    sampler.set_epoch(3)
    theirs = list(sampler)
    assert ours == [theirs[i:i + 4] for i in range(0, 40, 4)]


def test_two_processes_together_make_one_processs_views():
    """Under DDP the ranks' slices of each step are the single process's global
    batch, views included, so a DDP step sees exactly what one process would."""
    single = loader(batch=8)
    ranks = [loader(batch=4, rank=r, world=2) for r in range(2)]
    for ld in (single, *ranks):
        ld.set_epoch(1)
    for ((a1, a2), ya), ((b1, b2), yb), ((c1, c2), yc) in zip(single, *ranks):
        assert torch.equal(ya, torch.cat([yb, yc]))
        assert torch.equal(a1, torch.cat([b1, c1])) and torch.equal(a2, torch.cat([b2, c2]))
    assert len(single) == len(ranks[0]) == 5


def test_skipping_steps_resumes_the_same_epoch_and_epochs_differ():
    full = loader()
    full.set_epoch(2)
    batches = list(full)
    resumed = loader()
    resumed.set_epoch(2, skip_steps=6)
    assert len(resumed) == 4
    for ((a1, a2), ya), ((b1, b2), yb) in zip(batches[6:], resumed):
        assert torch.equal(ya, yb) and torch.equal(a1, b1) and torch.equal(a2, b2)
    other = loader()
    other.set_epoch(3)
    assert [y.tolist() for _, y in other] != [y.tolist() for _, y in batches]
    (v1, v2), _ = batches[0]
    assert v1.shape == (4, 3, 8, 8) and v1.dtype == torch.float32 and not torch.equal(v1, v2)


def test_a_step_draws_view_1_then_view_2_from_one_seeded_generator():
    """The loader's one torch.rand per step gives the views that
    draw_view_params + render_view give for view 1 and then view 2 from a
    generator seeded with step_seed (the CPU generator's stream is the same
    drawn in one call or several)."""
    ld = loader(n=16, batch=8)
    ld.set_epoch(4)
    (v1, v2), y = next(iter(ld))
    g = torch.Generator().manual_seed(data.step_seed(7, 4, 0))
    for view, recipe in zip((v1, v2), ld.recipes):
        p = data.draw_view_params(8, recipe, 8, 8, g, "cpu")
        assert torch.equal(view, data.render_view(ld.images[y], p, recipe, 8, data.CIFAR_MEAN, data.CIFAR_STD))


METHODS = ["vje", "vssl", "byol", "simsiam"]


def loader_32px(method):
    x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    info = dict(image_size=32, mean=data.CIFAR_MEAN, std=data.CIFAR_STD)
    return data.BatchedTwoViews(x, torch.arange(32), method, info, 8, seed=3, rank=1, world_size=2)


@pytest.mark.parametrize("method", METHODS)
def test_both_views_of_a_batch_are_one_graph(method):
    """torch._dynamo traces what a step does after its one torch.rand (the
    drawn parameters and the rendering of both views, for this rank's slice of
    the global batch) without a graph break: no shape that depends on the
    draws, no host sync, no Python branch on a tensor. The draw itself stays
    outside: dynamo breaks the graph at any op given a torch.Generator."""
    ld = loader_32px(method)
    u = torch.rand(2, data.UNIFORMS_PER_SAMPLE * 16, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(ld.make_views)(ld.images[:8], u, ld.recipes, ld.size, ld.mean, ld.std,
                                                     slice(8, 16))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("method", METHODS)
def test_making_views_never_waits_for_the_device(method, monkeypatch):
    """While the loader makes batches, nothing reads a tensor's value on the
    host (nonzero, item, tolist, bool, int, float) or copies a constant from
    the host (torch.tensor / torch.as_tensor of Python numbers onto a device):
    on a GPU each would stall the step until the device catches up."""
    ld = loader_32px(method)
    ld.set_epoch(2)
    calls = []

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return wrapper

    def counted_if_copied(name, fn):
        def wrapper(data, *args, **kwargs):
            if "device" in kwargs and not isinstance(data, torch.Tensor):
                calls.append(name)
            return fn(data, *args, **kwargs)
        return wrapper

    for name in ("nonzero", "item", "tolist", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "nonzero", counted("torch.nonzero", torch.nonzero))
    monkeypatch.setattr(torch, "tensor", counted_if_copied("torch.tensor", torch.tensor))
    monkeypatch.setattr(torch, "as_tensor", counted_if_copied("torch.as_tensor", torch.as_tensor))
    batches = list(ld)
    monkeypatch.undo()
    assert calls == []
    assert len(batches) == 2 and batches[0][0][0].shape == (8, 3, 32, 32)
