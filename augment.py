"""The two views of a batch made with tensor ops on the training device: the same augmentations
as data.py's PIL pipelines, for datasets that fit in memory as one uint8 tensor (CIFAR, STL-10,
small ImageFolder trees), every random parameter still drawn per image.

    import augment, data, model
    images, labels = augment.images_as_tensor(data.build_dataset("cifar10", "./data", "pretrain", None))
    recipes = data.view_recipes(model.VJE.views, 32, interpolation="bilinear")
    loader = augment.BatchedTwoViews(images.cuda(), labels, recipes, 32, mean, std, batch_size=256, seed=0)
    for (x1, x2), y in loader: ...

Each op says which torchvision op it replaces; tests/test_augment.py checks it against that op.
Images are float (B, 3, H, W) in [0, 1] between the ops. Every op runs on the whole batch with the
same shapes whatever was drawn: a per-image choice is a torch.where, or a factor that makes the op
the identity, never a selection of images (nonzero, boolean indexing) or a Python branch on a
tensor's value, which would make the host wait for the device every step and change the shapes.
So a step is queued without a stall and torch.compile traces it in one graph.

Deliberate differences from the PIL path, none of which changes what is drawn or applied: the
image stays float from the crop to the end, where PIL rounds to uint8 after every op (and every
pass of its resize and blur); the contrast and hue ops follow torchvision's tensor ops (mean of
the float grayscale; float HSV), not PIL's integer versions of them.
"""
import math

import numpy as np
import torch
import torchvision.transforms as T
from tqdm import tqdm

import data


def bicubic(x, a=-0.5):
    """Cubic convolution kernel with a = -0.5, the one PIL (and torch's
    antialiased bicubic) resizes with."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def triangle(x):
    """The triangle (tent) kernel max(0, 1 - |x|), support 1: PIL's bilinear
    resize filter (and torch's antialiased bilinear)."""
    return (1 - x.abs()).clamp(min=0)


RESIZE_KERNELS = {"bilinear": triangle, "bicubic": bicubic}


def resize_matrix(start, length, in_size, out_size, interpolation="bicubic"):
    """(B, out_size, in_size) matrices M with out = M @ column, resizing the
    pixels [start, start + length) of each row or column to out_size pixels
    as PIL's bilinear or bicubic resize does: output pixel o is centred at
    start + (o + 0.5) * length / out_size; input pixel p (centre p + 0.5)
    weighs kernel((p + 0.5 - centre) / s) with s = max(length / out_size, 1)
    (the kernel, `triangle` or `bicubic`, widens when shrinking, which is
    PIL's antialiasing); pixels outside the crop weigh 0 and each row is
    normalized to sum 1."""
    kernel = RESIZE_KERNELS[interpolation]
    start, length = start.float()[:, None, None], length.float()[:, None, None]
    o = torch.arange(out_size, device=start.device, dtype=torch.float32)[None, :, None]
    p = torch.arange(in_size, device=start.device, dtype=torch.float32)[None, None, :]
    s = (length / out_size).clamp(min=1.0)
    w = kernel((p + 0.5 - start - (o + 0.5) * length / out_size) / s)
    w = w * ((p >= start) & (p < start + length))
    return w / w.sum(-1, keepdim=True)


def resized_crop(x, top, left, height, width, size, flip=None, interpolation="bicubic"):
    """torchvision RandomResizedCrop(size, interpolation=BILINEAR or BICUBIC) +
    RandomHorizontalFlip on PIL images, given each sample's box (top, left,
    height, width) and flip flag: a crop and a separable resize as two batched
    matrix products, out = Mh @ x @ Mw^T, done as PIL does it: along the rows
    first, clamped to [0, 1], then along the columns, clamped again (PIL also
    rounds to 8 bits after each pass; we do not; the bilinear weights are
    non-negative, so its clamps never act). A flip reverses Mw's rows."""
    n, ch, h_in, w_in = x.shape
    mh = resize_matrix(top, height, h_in, size, interpolation)
    mw = resize_matrix(left, width, w_in, size, interpolation)
    if flip is not None:
        mw = torch.where(flip[:, None, None], mw.flip(1), mw)
    out = torch.bmm(x.reshape(n, ch * h_in, w_in), mw.transpose(1, 2)).clamp_(0, 1)  # (B, C * H, size)
    # (B, size, C * size)
    out = torch.bmm(mh, out.view(n, ch, h_in, size).transpose(1, 2).reshape(n, h_in, ch * size))
    return out.view(n, size, ch, size).transpose(1, 2).clamp(0, 1).contiguous()


def grayscale(x):
    """torchvision rgb_to_grayscale: L = 0.2989 R + 0.587 G + 0.114 B, shape (B, 1, H, W)."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def blend(x, other, f):
    """torchvision's _blend for float images: f * x + (1 - f) * other, clamped to
    [0, 1] (as one multiply-add, the arithmetic of `blend_slot`)."""
    return torch.addcmul((1 - f) * other, f, x).clamp_(0, 1)


def adjust_brightness(x, f):
    """adjust_brightness: blend with black."""
    return blend(x, torch.zeros_like(x), f.view(-1, 1, 1, 1))


def adjust_contrast(x, f):
    """adjust_contrast: blend with the mean of the image's grayscale."""
    return blend(x, grayscale(x).mean((1, 2, 3), keepdim=True), f.view(-1, 1, 1, 1))


def adjust_saturation(x, f):
    """adjust_saturation: blend with the image's grayscale."""
    return blend(x, grayscale(x), f.view(-1, 1, 1, 1))


def adjust_hue(x, f):
    """adjust_hue: to HSV, hue h -> (h + f) mod 1, back to RGB.

    HSV: v = max(r, g, b), chroma c = v - min(r, g, b) (s = c / v); the hue, in
    turns, from whichever channel is largest: r: (g - b) / c, g: 2 + (b - r) / c,
    b: 4 + (r - g) / c, all / 6 mod 1 (grey pixels, c = 0, keep h = 0). Back
    to RGB in one formula per channel: with k = (m + 6h) mod 6 and m = 5, 3, 1
    for r, g, b, the channel is v - c * clamp(min(k, 4 - k), 0, 1)."""
    r, g, b = x.unbind(1)
    v = x.amax(1)  # not x.max(1), whose indices cost more than the rest of the op on the CPU
    c = v - x.amin(1)
    safe_c = torch.where(c > 0, c, torch.ones_like(c))
    h = torch.where(v == r, (g - b) / safe_c, torch.where(v == g, (b - r) / safe_c + 2, (r - g) / safe_c + 4))
    h = torch.remainder(h / 6 + f.view(-1, 1, 1), 1.0)
    # 5, 3, 1: filled on the device
    m = torch.arange(5, 0, -2, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(m + 6 * h.unsqueeze(1), 6)
    return v.unsqueeze(1) - c.unsqueeze(1) * torch.minimum(k, 4 - k).clamp_(0, 1)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def blend_slot(x, factors, op, active):
    """One slot of ColorJitter over the whole batch, for samples whose op there
    is a blend (op (B,): 0 brightness, 1 contrast, 2 saturation): all three are
    f x + (1 - f) other, with other = 0, the mean of the grayscale, or the
    grayscale, so one blend with a per-sample `other` and factor f does each
    sample's op. Where not `active`, f = 1: 1 x + 0 returns the sample exactly
    (x is in [0, 1], so the clamp keeps it too).

    (1 - f) other is a gray + b mean with per-sample a, b each 0 or 1 - f,
    which picks `other` exactly (0 gray = 0) in two multiply-adds, where
    torch.where would pick it in two passes that are slower on the CPU."""
    op = op.view(-1, 1, 1, 1)
    f = factors.gather(1, op.view(-1, 1)).view(-1, 1, 1, 1)
    f = torch.where(active.view(-1, 1, 1, 1), f, 1.0)
    a = (1 - f) * (op == 2)  # saturation: (1 - f) times the grayscale
    b = (1 - f) * (op == 1)  # contrast: (1 - f) times its mean
    gray = grayscale(x)
    rest = torch.addcmul(b * gray.mean((1, 2, 3), keepdim=True), a, gray)  # (1 - f) other, (B, 1, H, W)
    return torch.addcmul(rest, f, x).clamp_(0, 1)  # as `blend`


def color_jitter(x, factors, order, apply):
    """torchvision RandomApply([ColorJitter(b, c, s, h)], p) on images in [0, 1]:
    for the samples with `apply`, the four ops with their own factors (B, 4:
    brightness, contrast, saturation, hue) in each sample's own random order
    (B, 4: a permutation of 0..3 per sample, as ColorJitter's randperm); the
    other samples unchanged.

    Every pass runs on the whole batch. Brightness, contrast and saturation
    are blends, so one pass of `blend_slot` per slot does whichever of them
    each sample has there. The hue is no blend and costs about three of them,
    so it runs once and splits each sample's order in two: the blends before
    it (slots 0-2, for the samples whose hue comes later), the hue, then the
    blends after it (slots 1-3, for the samples whose hue came earlier). Six
    blend passes and one hue pass in all, where a hue pass per slot would cost
    four hue passes."""
    hue_slot = order.argmax(1)  # the slot of op 3, the hue
    for slot in range(3):
        x = blend_slot(x, factors, order[:, slot], apply & (slot < hue_slot))
    # adjust_hue(x, 0) is x only up to rounding: keep the original where not applied
    x = torch.where(apply.view(-1, 1, 1, 1), adjust_hue(x, factors[:, 3]), x)
    for slot in range(1, 4):
        x = blend_slot(x, factors, order[:, slot], apply & (slot > hue_slot))
    return x


def gaussian_blur(x, sigma, kernel_size):
    """torchvision GaussianBlur(kernel_size) with each sample's sigma: the 1-d
    kernel exp(-t^2 / (2 sigma^2)) on t = -(k-1)/2 .. (k-1)/2, normalized,
    applied along rows and then columns with reflect padding (the same as
    torchvision's 2-d kernel, which is the outer product of the two). The
    blur "kernel" of `view_recipes`."""
    n, ch, hgt, wid = x.shape
    t = torch.arange(kernel_size, device=x.device, dtype=x.dtype) - (kernel_size - 1) / 2
    k = torch.exp(-0.5 * (t[None] / sigma[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(ch, 0)  # one kernel per (sample, channel)
    pad = kernel_size // 2
    y = torch.nn.functional.pad(x.reshape(1, n * ch, hgt, wid), (pad, pad, pad, pad), mode="reflect")
    y = torch.nn.functional.conv2d(y, k[:, None, None, :], groups=n * ch)
    y = torch.nn.functional.conv2d(y, k[:, None, :, None], groups=n * ch)
    return y.view(n, ch, hgt, wid)


def pil_box_radius(sigma, passes=3):
    """The box radius r with which PIL's GaussianBlur(radius=sigma) makes its
    blur out of `passes` (3) box blurs (Pillow's ImagingGaussianBlur, after
    Gwosdek et al., 2011): with s2 = sigma^2 / passes, L = sqrt(12 s2 + 1),
    l = floor((L - 1) / 2) and a = (2l + 1)(l(l + 1) - 3 s2) / (6 (s2 - (l + 1)^2)),
    r = l + a; one box of radius r (see `box_blur_matrix`) has variance s2,
    so the passes together have variance sigma^2. sigma: a float or a tensor."""
    floor, sqrt = (torch.floor, torch.sqrt) if isinstance(sigma, torch.Tensor) else (math.floor, math.sqrt)
    s2 = sigma * sigma / passes
    whole = floor((sqrt(12 * s2 + 1) - 1) / 2)  # l
    return whole + (2 * whole + 1) * (whole * (whole + 1) - 3 * s2) / (6 * (s2 - (whole + 1) ** 2))


def box_blur_matrix(radius, size, reach):
    """(B, size, size) matrices P with out = P @ line: one pass of PIL's box
    blur of each sample's radius r (B,) along a line of `size` pixels
    (Pillow's ImagingBoxBlur): the 2 floor(r) + 1 nearest taps weigh
    1 / (2r + 1) each and the next one on each side (r - floor(r)) / (2r + 1),
    that is tap t weighs clamp(r + 1 - |t|, 0, 1) / (2r + 1); a tap beyond the
    border reads the edge pixel (its weight goes to the edge column). `reach`
    (a Python int, floor(r) + 1 or more) is the number of taps on each side
    that the matrices are built from: a static size, whatever r is."""
    t = torch.arange(-reach, reach + 1, device=radius.device)
    r = radius[:, None]
    w = (r + 1 - t.abs()).clamp(0, 1) / (2 * r + 1)  # (B, taps)
    o = torch.arange(size, device=radius.device)
    source = (o[:, None] + t).clamp(0, size - 1)  # (size, taps): the pixel each tap reads
    return torch.einsum("bk,okp->bop", w, (source[:, :, None] == o).to(w.dtype))


def pil_gaussian_blur(x, sigma, max_sigma):
    """PIL's img.filter(ImageFilter.GaussianBlur(radius=sigma)) of float
    images x (B, C, H, W) in [0, 1], with each sample's sigma (B,): three box
    blurs of radius `pil_box_radius(sigma)` along the rows, then three along
    the columns, each pass replicating the edge pixels beyond the border (as
    Pillow's ImagingGaussianBlur -> ImagingBoxBlur with 3 passes). The three
    passes of one direction are one matrix, P^3 (`box_blur_matrix`), so the
    blur is two batched matrix products, as `resized_crop`. Pillow rounds to
    8 bits after each of its six passes; we stay in float.

    max_sigma (a Python float, the recipe's largest sigma) sets the matrices'
    number of taps, so that their shapes never depend on the draws; sigma is
    clamped to [0, max_sigma]. sigma 0 is the identity."""
    n, ch, hgt, wid = x.shape
    radius = pil_box_radius(sigma.to(x.dtype).clamp(0, max_sigma))
    reach = int(pil_box_radius(float(max_sigma))) + 1
    pw = box_blur_matrix(radius, wid, reach)
    pw = pw @ pw @ pw  # the three passes along a row
    if hgt == wid:
        ph = pw
    else:
        ph = box_blur_matrix(radius, hgt, reach)
        ph = ph @ ph @ ph
    y = torch.bmm(x.reshape(n, ch * hgt, wid), pw.transpose(1, 2))  # (B, C * H, W): rows
    # (B, H, C * W): columns
    y = torch.bmm(ph, y.view(n, ch, hgt, wid).transpose(1, 2).reshape(n, hgt, ch * wid))
    return y.view(n, hgt, ch, wid).transpose(1, 2).contiguous()


def view_blur(x, sigma, recipe):
    """The blur of a view's recipe: `pil_gaussian_blur` (blur "pil", sigma up
    to the recipe's largest) or `gaussian_blur` with the recipe's kernel
    (blur "kernel")."""
    if recipe["blur"] == "pil":
        return pil_gaussian_blur(x, sigma, recipe["blur_sigma"][1])
    return gaussian_blur(x, sigma, recipe["blur_kernel"])


def solarize(x, threshold=128 / 255, apply=None):
    """torchvision solarize: invert the pixels at or above the threshold (128 of
    255 for uint8 images, as RandomSolarize(threshold=128) in the PIL path),
    in the samples with `apply` (B,) if given (one pass, not two)."""
    invert = x >= threshold
    if apply is not None:
        invert = invert & apply.view(-1, 1, 1, 1)
    return torch.where(invert, 1 - x, x)


def normalize(x, mean, std):
    """torchvision Normalize: (x - mean) / std per channel. mean and std: tuples,
    or tensors (3,) already on x's device (a tuple is copied to the device on
    every call)."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    sd = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / sd


def normalize_images(images, mean, std):
    """T.ToTensor + T.Normalize(mean, std) of a uint8 batch (B, 3, H, W) on any
    device: float32 (x / 255 - mean) / std, what `eval_transform` makes of
    each image when it needs no resize (images of 64 px or less, CIFAR,
    STL-10). For the k-NN monitor's images already on the device."""
    return normalize(images.float() / 255, mean, std)


# The random draws. torch._dynamo cannot trace an op given a torch.Generator
# (it breaks the graph there), so a view draws all its uniforms in one
# torch.rand call and everything else is a function of them. Their layout is
# the order in which one torch.rand per parameter would draw them, in which
# the CPU generator gives the same numbers as one call.

UNIFORMS_PER_SAMPLE = 36  # of one view: crop 22, jitter factors 4 and order 4, six coins and sigma


def between(u, low, high):
    """Uniforms in [0, 1) scaled to [low, high)."""
    return low + (high - low) * u


def crop_box(u, in_h, in_w, scale, ratio, attempts=10):
    """torchvision RandomResizedCrop.get_params for n samples, from (2 attempts
    + 2) n uniforms u: up to `attempts` tries of (area ~ U(scale) x H W, log
    aspect ~ U(log ratio)); w = round(sqrt(area a)), h = round(sqrt(area / a)); the
    first try that fits the image wins, with a uniform position. If none fits:
    the whole image, cut to the nearest allowed aspect ratio, centred. Returns
    (top, left, height, width), long."""
    n = u.numel() // (2 * attempts + 2)
    u_area, u_aspect, u_top, u_left = u.split([attempts * n, attempts * n, n, n])
    area = between(u_area.view(n, attempts), scale[0], scale[1]) * (in_h * in_w)
    aspect = torch.exp(between(u_aspect.view(n, attempts), math.log(ratio[0]), math.log(ratio[1])))
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= in_w) & (h > 0) & (h <= in_h)
    first = fits.float().argmax(1)  # the first try that fits (0 when none does)
    w = w.gather(1, first[:, None]).squeeze(1)
    h = h.gather(1, first[:, None]).squeeze(1)
    found = fits.any(1)
    # fallback: whole image at the nearest allowed aspect ratio
    in_ratio = in_w / in_h
    if in_ratio < ratio[0]:
        fw, fh = in_w, int(round(in_w / ratio[0]))
    elif in_ratio > ratio[1]:
        fw, fh = int(round(in_h * ratio[1])), in_h
    else:
        fw, fh = in_w, in_h
    w = torch.where(found, w, torch.full_like(w, fw))
    h = torch.where(found, h, torch.full_like(h, fh))
    top = torch.floor(u_top * (in_h - h + 1))
    left = torch.floor(u_left * (in_w - w + 1))
    top = torch.where(found, top, (in_h - h) // 2)
    left = torch.where(found, left, (in_w - w) // 2)
    return top.long(), left.long(), h.long(), w.long()


def crop_params(n, in_h, in_w, scale, ratio, gen, device, attempts=10):
    """`crop_box` for n samples with uniforms drawn from `gen` on `device`."""
    u = torch.rand((2 * attempts + 2) * n, generator=gen, device=device)
    return crop_box(u, in_h, in_w, scale, ratio, attempts)


def view_params(u, recipe, in_h, in_w):
    """Every random choice of one view (`view_recipes`) for n samples, from
    UNIFORMS_PER_SAMPLE x n uniforms u in [0, 1): the crop box, flip, whether
    jitter applies and its four factors and order (ColorJitter.get_params:
    brightness, contrast and saturation ~ U(max(0, 1 - x), 1 + x), hue ~
    U(-x, x), a random permutation), grayscale, blur and its sigma, solarize."""
    n = u.numel() // UNIFORMS_PER_SAMPLE
    u_crop, u_b, u_c, u_s, u_h, u_order, u_flip, u_jitter, u_gray, u_blur, u_sigma, u_solarize = \
        u.split([22 * n, n, n, n, n, 4 * n, n, n, n, n, n, n])
    top, left, height, width = crop_box(u_crop, in_h, in_w, recipe["crop_scale"], recipe["ratio"])
    b, c, s, h = recipe["jitter"]
    factors = torch.stack([between(u_b, max(0.0, 1 - b), 1 + b), between(u_c, max(0.0, 1 - c), 1 + c),
                           between(u_s, max(0.0, 1 - s), 1 + s), between(u_h, -h, h)], 1)
    return dict(top=top, left=left, height=height, width=width, flip=u_flip < recipe["flip_p"],
                jitter=u_jitter < recipe["jitter_p"], factors=factors, order=u_order.view(n, 4).argsort(1),
                gray=u_gray < recipe["gray_p"], blur=u_blur < recipe["blur_p"],
                sigma=between(u_sigma, *recipe["blur_sigma"]), solarize=u_solarize < recipe["solarize_p"])


def draw_view_params(n, recipe, in_h, in_w, gen, device):
    """`view_params` for n samples with uniforms drawn from `gen` on `device`."""
    return view_params(torch.rand(UNIFORMS_PER_SAMPLE * n, generator=gen, device=device), recipe, in_h, in_w)


def render_view(images, params, recipe, size, mean, std):
    """One augmented view of a uint8 batch (B, 3, H, W) with the drawn
    `params`, in the PIL path's order: crop + resize (the recipe's
    interpolation) and flip, colour jitter, grayscale, blur (the recipe's,
    see `view_blur`), solarize, normalize (mean, std as in `normalize`).
    Returns float32 (B, 3, size, size)."""
    x = resized_crop(images.float() / 255, params["top"], params["left"], params["height"], params["width"],
                     size, params["flip"], recipe["interpolation"])
    x = color_jitter(x, params["factors"], params["order"], params["jitter"])
    x = torch.where(params["gray"].view(-1, 1, 1, 1), grayscale(x).expand_as(x), x)
    if recipe["blur_p"] > 0:  # the whole batch blurred, the unblurred samples taken back
        x = torch.where(params["blur"].view(-1, 1, 1, 1), view_blur(x, params["sigma"], recipe), x)
    if recipe["solarize_p"] > 0:
        x = solarize(x, apply=params["solarize"])
    return normalize(x, mean, std)


def two_views(images, uniforms, recipes, size, mean, std, keep=slice(None)):
    """Both views of a uint8 batch (B, 3, H, W): view v from uniforms[v], the
    UNIFORMS_PER_SAMPLE x n draws of a global batch of n, of which the rows
    `keep` are this process's. A function of tensors alone, with one set of
    shapes: the part of a step to give torch.compile."""
    _, _, in_h, in_w = images.shape
    views = []
    for v, recipe in enumerate(recipes):
        params = {k: p[keep] for k, p in view_params(uniforms[v], recipe, in_h, in_w).items()}
        views.append(render_view(images, params, recipe, size, mean, std))
    return tuple(views)


class MixedSizes(ValueError):
    """The images of a folder differ in size: they cannot be one tensor (the
    batched augmentation); the PIL path reads them one at a time."""


def images_as_tensor(dataset, num_workers=0, progress=True):
    """Decodes a dataset once into (uint8 images (N, 3, H, W), labels (N,)).
    CIFAR and STL-10 already hold their pixels as one array; an ImageFolder
    tree is decoded file by file, and all its images must have one size
    (else MixedSizes, naming the folder; data.image_sizes tells beforehand)."""
    if isinstance(dataset, data.ClassSubset):
        images, _ = images_as_tensor(dataset.dataset, num_workers, progress)
        return images[torch.as_tensor(dataset.indices)], torch.as_tensor(dataset.targets)
    arr = getattr(dataset, "data", None)
    if isinstance(arr, np.ndarray) and arr.ndim == 4 and arr.dtype == np.uint8:
        x = torch.from_numpy(arr)
        if x.shape[-1] == 3:  # CIFAR: (N, H, W, 3); STL-10 is (N, 3, H, W) already
            x = x.permute(0, 3, 1, 2)
        return x.contiguous(), data.labels_of(dataset)
    dataset.transform = T.PILToTensor()
    # its own generator: a DataLoader draws its workers' base seed from the global
    # RNG otherwise, and the network built next would start from other weights
    # than on the PIL path with the same --seed
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, num_workers=num_workers,
                                         generator=torch.Generator())
    chunks, labels = [], []
    try:
        for x, y in tqdm(loader, desc="decoding images", disable=not progress, leave=False):
            chunks.append(x)
            labels.append(y)
        return torch.cat(chunks), torch.cat(labels)
    except RuntimeError as e:
        if "stack expects each tensor to be equal size" in str(e) or "Sizes of tensors must match" in str(e):
            raise MixedSizes(f"the images of '{getattr(dataset, 'root', dataset)}' differ in size; the "
                             f"batched augmentation needs one size (the PIL path reads them one at a "
                             f"time)") from None
        raise


class BatchedTwoViews:
    """Iterates over ((view1, view2), labels) batches made on the device of
    `images` (a uint8 tensor (N, 3, H, W) from `images_as_tensor`).

    Order: each epoch is the permutation torch.randperm(N) seeded with
    seed + epoch, as DistributedSampler draws it (one process therefore sees
    the same batches as the PIL path); step s is the global batch
    perm[s G : (s + 1) G] (G = batch_size x world_size, the tail dropped), of
    which process r takes the r-th slice of batch_size. The augmentation of
    step s is drawn for the whole global batch from a generator seeded by
    step_seed(seed, epoch, s), and process r keeps its slice: under DDP the
    processes together make exactly the views one process would make.

    Each step is one torch.rand call (the only use of the generator) and
    `make_views(images, uniforms, recipes, size, mean, std, keep)`, by default
    `two_views`; pass torch.compile(augment.two_views) to compile it. `recipes`
    are the two views of data.view_recipes, `size` the views' size in px.
    """

    def __init__(self, images, labels, recipes, size, mean, std, batch_size, seed, rank=0, world_size=1,
                 make_views=None):
        self.images, self.labels = images, labels.to(images.device)
        self.recipes, self.size = recipes, size
        # made once on the device: a tuple would be copied from the host at every step
        self.mean = torch.tensor(mean, dtype=torch.float32, device=images.device)
        self.std = torch.tensor(std, dtype=torch.float32, device=images.device)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.steps = len(images) // (batch_size * world_size)
        self.gen = torch.Generator(device=images.device)
        self.make_views = make_views or two_views
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch, skip_steps=0):
        self.epoch, self.skip = epoch, skip_steps

    def __len__(self):
        return self.steps - self.skip

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        perm = torch.randperm(len(self.images), generator=g).to(self.images.device)
        n, device = self.batch_size * self.world_size, self.images.device
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        for s in range(self.skip, self.steps):
            idx = perm[s * n:(s + 1) * n][mine]
            self.gen.manual_seed(data.step_seed(self.seed, self.epoch, s))
            u = torch.rand(len(self.recipes), UNIFORMS_PER_SAMPLE * n, generator=self.gen, device=device)
            views = self.make_views(self.images[idx], u, self.recipes, self.size, self.mean, self.std, mine)
            yield views, self.labels[idx]
