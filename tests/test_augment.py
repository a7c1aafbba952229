"""augment.py's batched augmentation: each op against torchvision's functional op
applied to one image at a time, the drawn parameters against torchvision's own
get_params, and the batched loader's order, sharding and resumption."""
import math
import random

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image, ImageFile, ImageFilter
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from conftest import make_image_folder

import augment
import data
import model as model_lib
import tools

N_DRAWS = 10_000
METHODS = tuple(model_lib.METHODS)


def view_recipes(method, size, blur="pil", interpolation=None):
    """data.view_recipes of a method's views, with its recipe's interpolation unless given."""
    cls = model_lib.METHODS[method]
    return data.view_recipes(cls.views, size, blur, interpolation or cls.recipe["interpolation"])


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
    (augment.adjust_brightness, F.adjust_brightness, 0.0, 2.0),
    (augment.adjust_contrast, F.adjust_contrast, 0.0, 2.0),
    (augment.adjust_saturation, F.adjust_saturation, 0.0, 2.0),
    (augment.adjust_hue, F.adjust_hue, -0.5, 0.5),
])
def test_colour_ops_match_torchvision_per_image(ours, theirs, low, high):
    x = images()
    f = torch.linspace(low, high, len(x))
    expected = per_image(lambda img, v: theirs(img, v.item()), x, f)
    assert (ours(x, f) - expected).abs().max().item() <= 1e-4


def test_grayscale_and_solarize_match_torchvision():
    x = images()
    assert (augment.grayscale(x).expand_as(x) - F.rgb_to_grayscale(x,
                                                                   num_output_channels=3)).abs().max() <= 1e-6
    # RandomSolarize(threshold=128) on uint8 images == threshold 128/255 on float ones
    u8 = (x * 255).round().to(torch.uint8)
    expected = F.solarize(u8, 128).float() / 255
    assert (augment.solarize(u8.float() / 255) - expected).abs().max() <= 1e-6


@pytest.mark.parametrize("kernel", [3, 9, 23])
def test_gaussian_blur_matches_torchvision(kernel):
    x = images(size=32)
    sigma = torch.tensor([0.1, 0.3, 0.8, 1.2, 1.7, 2.0])
    expected = per_image(lambda img, s: F.gaussian_blur(img, [kernel, kernel], [s.item(), s.item()]), x,
                         sigma)
    assert (augment.gaussian_blur(x, sigma, kernel) - expected).abs().max() <= 1e-5


def structured_u8(h, w, seed):
    """A uint8 image (h, w, 3) with what a blur changes most: hard edges (a
    bright rectangle, a one-pixel line, a 2 px checkerboard in blue), smooth
    gradients (red along x, green along y) and noise (+-40 grey levels)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([255 * x / max(w - 1, 1), 255 * y / max(h - 1, 1), 200.0 * (((x // 2) + (y // 2)) % 2)],
                   -1)
    img[h // 4:3 * h // 4, w // 3:2 * w // 3] = 255  # a bright rectangle: edges on every side
    img[:, w // 5] = 0  # a dark one-pixel line
    img += rng.uniform(-40, 40, img.shape)
    return np.clip(img.round(), 0, 255).astype(np.uint8)


def pil_blur(img, sigma):
    return np.array(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius=sigma)))


BLUR_SIGMAS = [0.1, 0.3, 0.5, 0.8, 1.0, 1.4, 1.7, 2.0]  # [0.1, 2] (the recipes' range), both ends included
BLUR_TOL = 3 / 255 + 2e-5


@pytest.mark.parametrize("h, w", [(32, 32), (24, 40), (45, 20), (5, 7)])
def test_pil_gaussian_blur_matches_pillow_within_its_rounding(h, w):
    """pil_gaussian_blur of a batch, each image with its own sigma, against
    PIL's img.filter(ImageFilter.GaussianBlur(radius=sigma)) on the uint8
    image, for square, wide, tall and tiny (smaller than the blur's reach,
    so the edge replication reaches across the whole image) structured images.

    Pillow does six box passes (three along rows, three along columns) and
    rounds to 8 bits after each; we do the same passes in float. Each
    rounding moves a pixel by at most 0.5 grey level, and a later pass
    averages the errors with non-negative weights that sum to 1, which cannot
    make them larger: after six passes |ours - PIL| <= 6 x 0.5 = 3 levels,
    plus float slack (float32 sums, and Pillow's 24-bit fixed-point weights,
    each within 2^-24 (2r + 1) of ours): 3/255 + 2e-5. The errors mostly
    cancel, so the mean is well under a level (0.49-0.53 measured, max
    2.60-2.87): 1/255 catches a systematic shift that the max would allow.

    The "kernel" blur (torchvision's, 3 taps at 32 px) must fail that bound
    at sigma 2: the comparison tells the two blurs apart."""
    u8 = np.stack([structured_u8(h, w, seed) for seed in range(len(BLUR_SIGMAS))])
    x = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255
    sigma = torch.tensor(BLUR_SIGMAS)
    ours = augment.pil_gaussian_blur(x, sigma, 2.0)
    ref = torch.from_numpy(np.stack([pil_blur(img, s) for img, s in zip(u8, BLUR_SIGMAS)])).permute(0, 3, 1,
                                                                                                    2) / 255
    diff = (ours - ref).abs()
    assert diff.amax((1, 2, 3)).max() <= BLUR_TOL, diff.amax((1, 2, 3)) * 255
    assert diff.mean() <= 1 / 255, diff.mean() * 255
    if h == w == 32:
        kernel = augment.gaussian_blur(x[-1:], sigma[-1:], data.blur_kernel_size(32))  # sigma 2, 3 taps
        assert (kernel - ref[-1:]).abs().max() > BLUR_TOL


def test_pil_gaussian_blur_is_the_identity_at_sigma_0_and_keeps_flat_images():
    """sigma 0: box radius 0, the identity matrix (exact: x times 1 plus
    zeros); a flat image stays flat whatever sigma (each pass's weights sum to
    1 and the edges are replicated); a sigma above max_sigma is clamped to it."""
    x = torch.rand(3, 3, 12, 9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(augment.pil_gaussian_blur(x, torch.zeros(3), 2.0), x)
    flat = torch.full((2, 3, 12, 9), 0.3)
    assert (augment.pil_gaussian_blur(flat, torch.tensor([0.7, 2.0]), 2.0) - 0.3).abs().max() <= 1e-6
    assert torch.equal(augment.pil_gaussian_blur(x[:1], torch.tensor([5.0]), 2.0),
                       augment.pil_gaussian_blur(x[:1], torch.tensor([2.0]), 2.0))


def pillow_box_blur_u8(img, radius):
    """Our reading of Pillow's GaussianBlur, in its own integer arithmetic:
    three box passes along each row, then three along each column, each
    rounded to 8 bits. One pass of radius r (floor(r) = k) with 24-bit weights
    ww = int(2^24 / (2r + 1)) for the 2k + 1 nearest taps and
    fw = (2^24 - (2k + 1) ww) // 2 for the next one on each side, a tap past
    the border reading the edge pixel, and (sum + 2^23) >> 24."""
    r = np.float32(radius)
    k = int(r)
    ww = int(np.float32(1 << 24) / (r * np.float32(2) + np.float32(1)))
    fw = ((1 << 24) - (2 * k + 1) * ww) // 2

    def one_pass(a):  # along the last axis
        n = a.shape[-1]
        tap = lambda t: a[..., np.clip(np.arange(n) + t, 0, n - 1)]
        near = sum(tap(t) for t in range(-k, k + 1))
        return (near * ww + (tap(-k - 1) + tap(k + 1)) * fw + (1 << 23)) >> 24

    a = img.astype(np.int64).transpose(2, 0, 1)  # (C, H, W)
    for _ in range(3):
        a = one_pass(a)
    a = a.transpose(0, 2, 1)
    for _ in range(3):
        a = one_pass(a)
    return a.transpose(2, 1, 0).astype(np.uint8)  # (H, W, C)


def test_pillows_gaussian_blur_is_three_box_passes_of_pil_box_radius():
    """The algorithm pil_gaussian_blur follows, checked bit for bit against the
    installed Pillow: with augment.pil_box_radius (float32, as Pillow computes
    it) as the radius, `pillow_box_blur_u8` (box taps as box_blur_matrix
    weighs them, rows before columns, edge pixels replicated, three passes
    each) equals PIL's GaussianBlur exactly, on images smaller and larger than
    the blur and sigmas from 0.05 to 6. Any other radius formula, tap layout,
    order, pass count or edge rule gives other pixels."""
    for h, w, seed in ((32, 32, 0), (20, 45, 1), (7, 5, 2), (3, 40, 3)):
        img = structured_u8(h, w, seed)
        for s in np.linspace(0.05, 6, 24):
            r = augment.pil_box_radius(torch.tensor([s], dtype=torch.float32)).item()
            assert np.array_equal(pillow_box_blur_u8(img, r), pil_blur(img, float(s))), (h, w, s)


def impulse(size=33):
    img = np.zeros((size, size, 3), np.uint8)
    img[size // 2, size // 2] = 255
    return img


def spread(a):
    """Standard deviation along x, in px, of an image's mass about its centre column."""
    a = np.asarray(a, dtype=np.float64)
    x = np.arange(a.shape[1]) - a.shape[1] // 2
    return math.sqrt((a.sum(0) * x ** 2).sum() / a.sum())


@pytest.mark.parametrize("sigma", [0.5, 1.0, 1.5, 2.0])
def test_pil_gaussian_blur_spreads_an_impulse_by_sigma_as_pillow(sigma):
    """The spread (standard deviation, px) of a blurred 33 x 33 single-pixel
    impulse. Ours: three boxes of variance sigma^2 / 3 each (pil_box_radius's
    defining property), far from the border, so sigma up to float32 rounding
    (1e-4). Pillow's: the same but rounded to 8 bits at each pass, which
    cuts the faint tails (an impulse of 255 spread over ~2 pi sigma^2 pixels
    leaves a few grey levels in them): within 5 % of ours (measured: 0.494 at
    0.5, 0.971 at 1, 2.034 at 2). The 3-tap kernel blur spreads 0.80 px at
    most, whatever sigma: at sigma 2 under half of Pillow's. tools.impulse_spread
    (blur-check's) measures the same."""
    img = impulse()
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    ours = augment.pil_gaussian_blur(x, torch.tensor([sigma]), 2.0)[0, 0].numpy()
    theirs = pil_blur(img, sigma)[:, :, 0]
    assert abs(spread(ours) - sigma) <= 1e-4
    assert abs(spread(theirs) - spread(ours)) <= 0.05 * sigma
    assert abs(tools.impulse_spread(ours) - spread(ours)) <= 1e-9
    if sigma == 2.0:
        kernel = augment.gaussian_blur(x, torch.tensor([sigma]), data.blur_kernel_size(33))[0, 0].numpy()
        assert spread(kernel) < 0.5 * spread(theirs)


def test_pil_path_blur_is_pillows_with_sigma_from_torchs_generator():
    """PILGaussianBlur: img.filter(GaussianBlur(radius=s)) with s drawn as
    torchvision's GaussianBlur.get_params draws it (torch.empty(1).uniform_),
    so the same torch seed gives the same sigma, and Python's random module
    (which DataLoader workers and --resume do not restore) is never used."""
    img = Image.fromarray(structured_u8(32, 32, 0))
    blur = data.PILGaussianBlur((0.1, 2.0))
    py_state = random.getstate()
    for seed in range(3):
        torch.manual_seed(seed)
        out = blur(img)
        torch.manual_seed(seed)
        s = T.GaussianBlur.get_params(0.1, 2.0)
        assert np.array_equal(np.array(out), pil_blur(np.array(img), s))
    assert random.getstate() == py_state


def pil_path_ops(transform):
    """The ops of each view of a two_view_transform: the crop, the blur (or None)."""
    out = []
    for view in (transform.t1, transform.t2):
        blur = [t.transforms[0] for t in view.transforms if isinstance(t, T.RandomApply)
                and isinstance(t.transforms[0], (data.PILGaussianBlur, T.GaussianBlur))]
        out.append((view.transforms[0], blur[0] if blur else None))
    return out


def test_recipes_blur_and_interpolation_reach_both_paths():
    """The VJE notebook crops bilinear, solo-learn (BYOL, VSSL) and our SimSiam bicubic; both blur
    with PIL's GaussianBlur. The recipe's keys say so, the PIL path builds those ops, and
    "kernel" / an interpolation override replace them; an unknown value stops with one line."""
    for method, mode in (("vje", "bilinear"), ("vssl", "bicubic"), ("byol", "bicubic"),
                         ("simsiam", "bicubic")):
        for v in view_recipes(method, 96):
            assert v["interpolation"] == mode and v["blur"] == "pil" and v["blur_sigma"] == (0.1, 2.0)
        assert view_recipes(method, 32, "kernel", "bilinear")[0]["interpolation"] == "bilinear"
        assert view_recipes(method, 32, "kernel", "bicubic")[1]["blur"] == "kernel"
    info = dict(image_size=96, mean=data.NORMALIZATION['imagenet'][0], std=data.NORMALIZATION['imagenet'][1])
    (crop1, blur1), (crop2, blur2) = pil_path_ops(data.two_view_transform(view_recipes("vje", 96), info))
    assert crop1.interpolation == crop2.interpolation == InterpolationMode.BILINEAR
    assert isinstance(blur1, data.PILGaussianBlur) and isinstance(blur2, data.PILGaussianBlur)
    assert blur1.sigma == blur2.sigma == (0.1, 2.0)
    (crop1, blur1), _ = pil_path_ops(data.two_view_transform(view_recipes("byol", 96), info))
    assert crop1.interpolation == InterpolationMode.BICUBIC and isinstance(blur1, data.PILGaussianBlur)
    (crop1,
     blur1), _ = pil_path_ops(data.two_view_transform(view_recipes("vje", 96, "kernel", "bicubic"), info))
    assert crop1.interpolation == InterpolationMode.BICUBIC
    assert isinstance(blur1, T.GaussianBlur) and blur1.kernel_size == (9, 9)
    torch.manual_seed(0)
    v1, v2 = data.two_view_transform(view_recipes("vje", 96),
                                     info)(Image.fromarray(structured_u8(120, 100, 0)))
    assert v1.shape == v2.shape == (3, 96, 96) and v1.dtype == torch.float32
    for bad in (dict(blur="box"), dict(interpolation="nearest")):
        with pytest.raises(SystemExit, match="^error: unknown (blur|interpolation)"):
            data.view_recipes(model_lib.VJE.views, 32, **bad)


BOXES = [  # (top, left, height, width) in a 16 x 16 image, flip
    ((0, 0, 16, 16), False), ((2, 3, 9, 12), True), ((5, 0, 4, 4), False),
    ((0, 7, 16, 9), True), ((11, 11, 5, 5), False), ((1, 2, 15, 3), True),
]


MODES = dict(bilinear=InterpolationMode.BILINEAR, bicubic=InterpolationMode.BICUBIC)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("size", [16, 40, 8])
def test_resized_crop_matches_torchvision_antialiased_resize(size, interpolation):
    """Upscaling (the batched path's case: a crop of the image back to the
    image size), equal size and downscaling, on images in [0.25, 0.75], where
    no intermediate value leaves [0, 1] (so our clamp between the passes does
    nothing). torchvision's tensor resize with antialias=True computes PIL's
    weights (bilinear: the triangle; bicubic: a = -0.5; the kernel widened
    when shrinking, renormalized at the crop's edges), as our matrices do, so
    the only difference is float32 rounding in another summation order: 1e-5."""
    x = 0.25 + 0.5 * images()
    box = torch.tensor([b for b, _ in BOXES])
    flip = torch.tensor([f for _, f in BOXES])
    out = augment.resized_crop(x, *box.unbind(1), size, flip, interpolation)
    expected = []
    for img, (t, l, h, w), f in zip(x, box.tolist(), flip.tolist()):
        y = F.resized_crop(img, t, l, h, w, [size, size], MODES[interpolation], antialias=True)
        expected.append(F.horizontal_flip(y) if f else y)
    assert (out - torch.stack(expected)).abs().max() <= 1e-5


@pytest.mark.parametrize("interpolation, levels", [("bilinear", 1.0), ("bicubic", 1.125)])
@pytest.mark.parametrize("size", [16, 40])
def test_resized_crop_matches_the_pil_path_within_rounding(size, interpolation, levels):
    """Against what the PIL path does (torchvision's resized_crop on a PIL
    image, PIL's own resize), on full-range noise, for crops resized up or to
    the same size (all the batched path does: a crop of the image back to the
    image size). PIL resizes rows, clamps and rounds to 8 bits, then columns,
    clamps and rounds; we clamp but keep floats. Rounding the first pass
    (<= 0.5 grey level) passes through the second pass's weights, and the
    final rounding adds 0.5. Bilinear weights are non-negative and sum to 1,
    so the first error is not amplified: at most 1 grey level. Bicubic weights
    have absolute values summing to at most 1.25: at most 1.125 levels. Plus
    1e-6 for float32 and PIL's 22-bit fixed-point weights (measured: 1.00005
    levels bilinear)."""
    x = images()
    u8 = (x * 255).round().to(torch.uint8)
    box = torch.tensor([b for b, _ in BOXES])
    out = augment.resized_crop(u8.float() / 255, *box.unbind(1), size, None, interpolation)
    for img, (t, l, h, w), y in zip(u8, box.tolist(), out):
        pil = Image.fromarray(img.permute(1, 2, 0).numpy())
        ref = np.array(T.functional.resized_crop(pil, t, l, h, w, [size, size], MODES[interpolation]))
        ref = torch.from_numpy(ref).permute(2, 0, 1).float() / 255
        assert (y - ref).abs().max() <= levels / 255 + 1e-6


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
    out = augment.color_jitter(x, factors, order, apply)
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
                img = augment.JITTER_OPS[j](img, factors[i:i + 1, j])
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
    out = augment.color_jitter(x, factors, order, apply)
    assert (out - per_sample_jitter(x, factors, order, apply)).abs().max() <= 1e-6
    assert torch.equal(out[~apply], x[~apply])  # untouched samples are exactly themselves


@pytest.mark.parametrize("method, blur", [("vje", "pil"), ("byol", "pil"), ("vje", "kernel")])
def test_render_view_equals_a_per_sample_loop(method, blur):
    """A whole view (crop with the recipe's interpolation, jitter, grayscale,
    the recipe's blur with p 0.5, solarize) made for the batch at once against
    the same single-op functions applied to one image at a time, only where
    its draws say so: 1e-6 (see above)."""
    recipe = dict(view_recipes(method, 32, blur)[1], blur_p=0.5)
    g = torch.Generator().manual_seed(6)
    u8 = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=g)
    p = augment.draw_view_params(32, recipe, 32, 32, g, "cpu")
    assert p["blur"].any() and not p["blur"].all() and p["solarize"].any() and p["gray"].any()
    out = augment.render_view(u8, p, recipe, 32, data.CIFAR_MEAN, data.CIFAR_STD)
    for i in range(32):
        one = {k: v[i:i + 1] for k, v in p.items()}
        img = augment.resized_crop(u8[i:i + 1].float() / 255, one["top"], one["left"], one["height"],
                                   one["width"], 32, one["flip"], recipe["interpolation"])
        img = per_sample_jitter(img, one["factors"], one["order"], one["jitter"])
        if one["gray"]:
            img = augment.grayscale(img).expand_as(img)
        if one["blur"]:
            img = (augment.pil_gaussian_blur(img, one["sigma"], 2.0) if blur == "pil" else
                   augment.gaussian_blur(img, one["sigma"], recipe["blur_kernel"]))
        if one["solarize"]:
            img = augment.solarize(img)
        img = F.normalize(img, data.CIFAR_MEAN, data.CIFAR_STD)
        assert (out[i:i + 1] - img).abs().max() <= 1e-6, i


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_render_view_equals_the_ops_in_the_pil_paths_order(interpolation):
    """A whole view: crop + flip, jitter, grayscale, blur, solarize, normalize,
    recomputed image by image with torchvision's ops (pixels in 64..191, so
    that the resize never leaves [0, 1]; see the tests above). The blur is the
    recipe's "kernel" one, which torchvision has as a tensor op (PIL's blur
    is checked on its own above)."""
    recipe = dict(view_recipes("vje", 32, "kernel", interpolation)[1], blur_p=0.5)
    g = torch.Generator().manual_seed(5)
    u8 = torch.randint(64, 192, (8, 3, 32, 32), dtype=torch.uint8, generator=g)
    p = augment.draw_view_params(8, recipe, 32, 32, g, "cpu")
    out = augment.render_view(u8, p, recipe, 32, data.CIFAR_MEAN, data.CIFAR_STD)
    ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
    for i in range(8):
        img = F.resized_crop(u8[i].float() / 255, p["top"][i].item(), p["left"][i].item(),
                             p["height"][i].item(),
                             p["width"][i].item(), [32, 32], MODES[interpolation], antialias=True).clamp(0, 1)
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


@pytest.mark.parametrize("scale, in_h, in_w",
                         [((0.08, 1.0), 32, 32), ((0.2, 1.0), 32, 32), ((0.08, 1.0), 24, 40)])
def test_crop_area_and_aspect_ratio_follow_torchvision(scale, in_h, in_w):
    torch.manual_seed(0)
    ratio = (3 / 4, 4 / 3)
    img = torch.zeros(1, in_h, in_w)
    ref = np.array([T.RandomResizedCrop.get_params(img, scale, ratio) for _ in range(N_DRAWS)])
    g = torch.Generator().manual_seed(1)
    top, left, h, w = (t.numpy() for t in augment.crop_params(N_DRAWS, in_h, in_w, scale, ratio, g, "cpu"))
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
    ref = [T.ColorJitter.get_params(cj.brightness, cj.contrast, cj.saturation,
                                    cj.hue) for _ in range(N_DRAWS)]
    ref_sigma = [T.GaussianBlur.get_params(0.1, 2.0) for _ in range(N_DRAWS)]
    recipe = dict(view_recipes("vje", 32)[0], jitter=jitter)
    p = augment.draw_view_params(N_DRAWS, recipe, 32, 32, torch.Generator().manual_seed(2), "cpu")
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
        "jitter_p": lambda: not torch.equal(T.RandomApply([T.Lambda(lambda x: x + 1)], p=0.8)(marker),
                                            marker),
        "gray_p": lambda: not torch.equal(T.RandomGrayscale(p=0.2)(marker), marker),
        "blur_p": lambda: not torch.equal(T.RandomApply([T.Lambda(lambda x: x + 1)], p=0.1)(marker), marker),
        "solarize_p": lambda: not torch.equal(T.RandomSolarize(0.5, p=0.2)(marker), marker),
    }
    recipe = view_recipes("vje", 32)[1]  # flip 0.5, jitter 0.8, gray 0.2, blur 0.1, solarize 0.2
    p = augment.draw_view_params(N_DRAWS, recipe, 32, 32, torch.Generator().manual_seed(4), "cpu")
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
    x, y = augment.images_as_tensor(ds, progress=False)
    # the global RNG is untouched: the network built next starts as on the PIL path
    assert torch.equal(torch.get_rng_state(), rng)
    assert x.dtype == torch.uint8 and x.shape == (6, 3, 8, 8) and y.tolist() == [0, 0, 0, 1, 1, 1]
    path, label = ds.samples[4]
    assert torch.equal(x[4], torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1))
    sub = data.select_classes(data.build_dataset("folder", root, "pretrain", None), "class1")
    xs, ys = augment.images_as_tensor(sub, progress=False)
    assert torch.equal(xs, x[3:]) and ys.tolist() == [0, 0, 0]

    class FakeCifar:  # torchvision's CIFAR holds (N, H, W, 3) uint8 and a list of targets
        data = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
        targets = [1, 0, 1, 2, 0]
    xc, yc = augment.images_as_tensor(FakeCifar(), progress=False)
    assert torch.equal(xc,
                       torch.from_numpy(FakeCifar.data).permute(0, 3, 1,
                                                                2)) and yc.tolist() == FakeCifar.targets


def test_images_of_different_sizes_give_one_line(tmp_path):
    """MixedSizes (a ValueError), one line naming the folder, for train.py to
    fall back on the PIL path or stop."""
    root = make_image_folder(tmp_path / "d", classes=2, train_per_class=2, size=8)
    Image.new("RGB", (9, 8)).save(tmp_path / "d" / "train" / "class0" / "odd.png")
    with pytest.raises(augment.MixedSizes, match="differ in size") as e:
        augment.images_as_tensor(data.build_dataset("folder", root, "pretrain", None), progress=False)
    assert isinstance(e.value, ValueError) and str(tmp_path / "d" / "train") in str(e.value)
    assert "\n" not in str(e.value)


def test_image_sizes_reads_the_image_headers_only(tmp_path, monkeypatch):
    """data.image_sizes tells mixed sizes apart before any decoding: with PIL's
    pixel decoding made to fail it still answers, for a whole folder and for
    the classes of a ClassSubset; arrays (CIFAR) have one size (None)."""
    root = make_image_folder(tmp_path / "d", classes=3, train_per_class=2, size=8)

    def no_decoding(self):
        raise AssertionError("image_sizes decoded pixels")
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    assert data.image_sizes(data.build_dataset("folder", root, "pretrain", None)) == {(8, 8): 6}
    Image.new("RGB", (9, 8)).save(tmp_path / "d" / "train" / "class0" / "odd.png")
    ds = data.build_dataset("folder", root, "pretrain", None)
    assert data.image_sizes(ds) == {(8, 8): 6, (9, 8): 1}
    assert data.image_sizes(data.select_classes(ds, "class1,class2")) == {(8, 8): 4}
    assert len(data.image_sizes(data.select_classes(ds, "class0"))) == 2

    class FakeCifar:
        data = np.zeros((4, 8, 8, 3), dtype=np.uint8)
        targets = [0, 1, 0, 1]
    assert data.image_sizes(FakeCifar()) is None


def loader(n=40, batch=4, rank=0, world=1, seed=7, method="vje"):
    x = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return augment.BatchedTwoViews(x, torch.arange(n), view_recipes(method, 8), 8, data.CIFAR_MEAN,
                                   data.CIFAR_STD, batch, seed, rank, world)


def test_batched_order_is_distributed_samplers_for_one_process():
    """One process sees the same images in the same batches as the PIL path."""
    ld = loader()
    ld.set_epoch(3)
    ours = [y.tolist() for _, y in ld]
    sampler = data.ShardSampler(list(range(40)), num_replicas=1, rank=0, shuffle=True, seed=7, drop_last=True)
    sampler.set_epoch(3)
    theirs = [i for i, _ in sampler]  # the PIL path's sampler yields (index, seed) pairs
    assert ours == [theirs[i:i + 4] for i in range(0, 40, 4)]


class RandomItems(torch.utils.data.Dataset):
    """Item i is (two draws of torch's global generator, i), the way a
    torchvision transform draws its parameters."""

    def __len__(self):
        return 24

    def __getitem__(self, i):
        return torch.rand(2), i


@pytest.mark.parametrize("workers", [0, 2])
def test_pil_loader_views_depend_on_seed_epoch_and_index_only(workers):
    """On the PIL path a sample's random draws come from a generator seeded
    with (seed, epoch, index): the same whichever process reads it and
    whatever was drawn before, so a start 3 batches into the epoch (a resumed
    run) gets the rest of the epoch's batches exactly; the training process's
    own generator is left as it was."""
    full = data.train_loader(RandomItems(), 4, workers, seed=7)
    data.set_epoch(full, 2)
    state = torch.get_rng_state()
    batches = list(full)
    assert torch.equal(torch.get_rng_state(), state)
    for x, idx in batches:  # independently: each item's draws under its own seed
        expected = [torch.Generator().manual_seed(data.step_seed(7, 2, i)) for i in idx.tolist()]
        assert torch.equal(x, torch.stack([torch.rand(2, generator=g) for g in expected]))
    resumed = data.train_loader(RandomItems(), 4, workers, seed=7)
    data.set_epoch(resumed, 2, skip_steps=3)
    torch.rand(5)  # the resumed process has drawn other numbers before
    rest = list(resumed)
    assert len(rest) == 3 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                                  for a, b in zip(batches[3:], rest))
    data.set_epoch(full, 3)
    assert not torch.equal(next(iter(full))[0], batches[0][0])


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
        p = augment.draw_view_params(8, recipe, 8, 8, g, "cpu")
        assert torch.equal(view,
                           augment.render_view(ld.images[y], p, recipe, 8, data.CIFAR_MEAN, data.CIFAR_STD))


def loader_32px(method, blur="pil"):
    x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return augment.BatchedTwoViews(x, torch.arange(32), view_recipes(method, 32, blur), 32, data.CIFAR_MEAN,
                                   data.CIFAR_STD, 8, seed=3, rank=1, world_size=2)


@pytest.mark.parametrize("method, blur", [(m, "pil") for m in METHODS] + [("vje", "kernel")])
def test_both_views_of_a_batch_are_one_graph(method, blur):
    """torch._dynamo traces what a step does after its one torch.rand (the
    drawn parameters and the rendering of both views, for this rank's slice of
    the global batch) without a graph break: no shape that depends on the
    draws, no host sync, no Python branch on a tensor. The draw itself stays
    outside: dynamo breaks the graph at any op given a torch.Generator. VJE's
    view 1 is always blurred, so its case traces the blur too."""
    ld = loader_32px(method, blur)
    u = torch.rand(2, augment.UNIFORMS_PER_SAMPLE * 16, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(ld.make_views)(ld.images[:8], u, ld.recipes, ld.size, ld.mean, ld.std,
                                                     slice(8, 16))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("method, blur", [(m, "pil") for m in METHODS] + [("vje", "kernel")])
def test_making_views_never_waits_for_the_device(method, blur, monkeypatch):
    """While the loader makes batches, nothing reads a tensor's value on the
    host (nonzero, item, tolist, bool, int, float) or copies a constant from
    the host (torch.tensor / torch.as_tensor of Python numbers onto a device):
    on a GPU each would stall the step until the device catches up."""
    ld = loader_32px(method, blur)
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
