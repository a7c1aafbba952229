"""The encoder of a train.py checkpoint as a plain state dict, for code that is not this project's.

    python export.py --checkpoint runs/smoke/checkpoint.pt --output encoder.pt
    python export.py --checkpoint CKPT --output teacher.pt --encoder teacher    # the EMA target encoder

writes encoder.pt, one encoder's weights and buffers and nothing else (no heads, probe or
optimizer), and encoder.json beside it: what the weights need from the code that loads them. A
ResNet's file loads into torchvision's model of that name with `load_state_dict`: it holds every key
but `fc`, so set `net.fc = nn.Identity()` first and the output is the feature. A ResNet trained on
images of 64 px or less has the CIFAR stem (3x3 conv1 with stride 1, no max-pool), which
encoder.json says ("cifar_stem": true) and one line of the loading code sets. `tiny` is not a
torchvision model: the README shows its short definition, which loads the file. The README's section
"Use the encoder elsewhere" has the loading code for both, and tests/test_export.py runs that code
and checks that it gives the same features as this project's encoder, bit for bit on the CPU.

encoder.json: arch, torchvision_model (null for tiny), cifar_stem (null for tiny), feature_dim,
image_size, resize, mean, std and normalize (the images as the evaluations feed them: resize the
shorter side to `resize` px, centre-crop `image_size`, scale to [0, 1], normalize with mean and std),
and where the weights come from (method, encoder, checkpoint, epoch). The file is read with
torch.load(..., weights_only=True): tensors only.

An existing --output (or its .json) is not overwritten unless --replace is given. Every mistake (a
missing or foreign checkpoint, --encoder teacher of a network without one, a used --output) stops
with one `error:` line.
"""
import argparse
import os

import torch
import torch.nn as nn
import torchvision

import cli
import data
import model as model_lib
import utils


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Export the encoder of a train.py checkpoint as a plain state "
                                            "dict that torchvision's ResNet, or the README's definition of "
                                            "tiny, loads with load_state_dict; what loading it needs goes "
                                            "beside it, as .json. README.md, 'Use the encoder elsewhere', "
                                            "shows the code.")
    cli.one_line_errors(p, "export.py")
    add = cli.add_flag
    p.add_argument("--checkpoint", required=True, help="the checkpoint.pt written by train.py")
    add(p, "--output", None, "the weights file to write; its metadata goes beside it, with the extension "
        ".json",
        default_text="encoder.pt, or teacher.pt with --encoder teacher, beside the checkpoint")
    add(p, "--encoder", "student", "student: the encoder trained by gradient, the one the evaluations read "
        "(--feature z); teacher: the EMA target encoder of BYOL, VSSL, or VJE trained with --target ema "
        "(--feature ema)", choices=("student", "teacher"))
    add(p, "--replace", False, "overwrite an existing --output and its .json", action="store_true")
    args = p.parse_args(argv)
    if args.output is not None and args.output.endswith(".json"):
        p.error(f"--output is the weights file (say {args.output[:-5]}.pt); its metadata goes beside it "
                f"as .json")
    return args


def metadata_path(output):
    """The .json beside a weights file: encoder.pt -> encoder.json, encoder -> encoder.json."""
    root, ext = os.path.splitext(output)
    return (root if ext == ".pt" else output) + ".json"


def encoder_of(net, which, path):
    """The student or teacher encoder module of a loaded network; one line if it has no teacher."""
    if which == "student":
        return net.encoder
    if net.teacher is None:
        hint = " (VJE has one only when trained with --target ema)" if net.name == "vje" else ""
        utils.fail(f"--encoder teacher: the {net.name} checkpoint '{path}' has no teacher encoder{hint}; "
                   f"export --encoder student")
    return net.teacher_parts()[0]  # the teacher's copy of the encoder comes first


def describe(encoder, dim, train_args, which, path, epoch):
    """encoder.json: what loading the weights and feeding them images needs, and their source."""
    arch, size = train_args["arch"], train_args["image_size"]
    resnet = arch != "tiny"
    mean, std = data.NORMALIZATION[train_args["normalize"]]
    return dict(
        arch=arch,
        torchvision_model=arch if resnet else None,
        # read off the network, not recomputed: build_encoder decides the stem by the image size
        cifar_stem=(isinstance(encoder.maxpool, nn.Identity) and encoder.conv1.kernel_size == (3, 3))
        if resnet else None,
        feature_dim=dim,
        image_size=size,
        # as data.eval_transform: images of 96 px or less at their size, larger ones resized to 256/224 of it
        resize=size if size <= 96 else int(size * 256 / 224),
        mean=list(mean), std=list(std), normalize=train_args["normalize"],
        method=train_args["method"], encoder=which, checkpoint=os.path.abspath(path), epoch=epoch)


def torchvision_network(meta):
    """torchvision's ResNet of `meta` shaped as the export: the CIFAR stem where it says so, no fc."""
    net = getattr(torchvision.models, meta["torchvision_model"])(weights=None)
    if meta["cifar_stem"]:
        net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    net.fc = nn.Identity()
    return net


def main(argv=None):
    args = get_args(argv)
    output = args.output or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                                         "teacher.pt" if args.encoder == "teacher" else "encoder.pt")
    sidecar = metadata_path(output)
    if os.path.abspath(output) == os.path.abspath(args.checkpoint):
        utils.fail(f"--output '{output}' is the checkpoint itself; give another file")
    used = [f for f in (output, sidecar) if os.path.exists(f)]
    if used and not args.replace:
        utils.fail(f"'{used[0]}' exists; give another --output, or --replace to overwrite it")

    net, train_args, ckpt = model_lib.load_model(args.checkpoint)
    net.eval()
    encoder = encoder_of(net, args.encoder, args.checkpoint)
    state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    meta = describe(encoder, net.dim, train_args, args.encoder, args.checkpoint, ckpt.get("epoch"))
    if meta["torchvision_model"]:  # the promise of the file, checked before it is written
        try:
            torchvision_network(meta).load_state_dict(state)
        except RuntimeError as e:
            utils.fail(f"the {args.encoder} encoder of '{args.checkpoint}' does not load into torchvision's "
                       f"{meta['arch']} ({str(e).strip().splitlines()[-1].strip()[:200]}); nothing written")

    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    utils.save_checkpoint(state, output)
    utils.write_json(meta, sidecar)
    params = sum(v.numel() for k, v in state.items() if k.endswith(("weight", "bias")))
    stem = {True: ", CIFAR stem", False: ", ImageNet stem", None: ""}[meta["cifar_stem"]]
    print(f"{meta['method']} {meta['arch']}{stem}, epoch {meta['epoch']}, {args.encoder} encoder: "
          f"{len(state)} tensors, {params / 1e6:.2f} M parameters, {meta['feature_dim']}-d features of "
          f"{meta['image_size']} px images normalized with {meta['normalize']}'s mean and std")
    print(f"wrote {output} and {sidecar}; README.md, 'Use the encoder elsewhere', shows how to load them")
    return meta


if __name__ == "__main__":
    main()
