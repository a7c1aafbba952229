"""The command line. train.py's flags: the general defaults, each method's recipe and options
(model.py) filled in for the flags left unset, every range in one table, and --resume's argument
set. And what every script's flags share: numbers checked where they are parsed, each default said
once in the help, one `error:` line for a mistake."""
import argparse
import json
import math
import os
import sys

import data
import model
import utils


def number(kind=float, low=None, high=None, low_open=False, allow_inf=False):
    """An argparse `type` for a number in [low, high] ((low, high] with
    low_open); NaN is refused, and infinity unless `allow_inf`. A bad value
    becomes argparse's one-line error naming the flag and the allowed range."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, "
                                             f"got '{text}'") from None
        if kind is float and (math.isnan(value) or (math.isinf(value) and not (allow_inf and value > 0))):
            raise argparse.ArgumentTypeError(f"'{text}' is not allowed: {describe()}")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and value > high and not (allow_inf and math.isinf(value))
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"{text} is out of range: {describe()}")
        return value

    def describe():
        def show(v):
            return str(int(v)) if float(v).is_integer() else f"{v:g}"
        lo = "" if low is None else f"{'>' if low_open else '>='} {show(low)}"
        hi = "" if high is None else f"<= {show(high)}"
        rng = " and ".join(s for s in (lo, hi) if s)
        return f"{'a whole number' if kind is int else 'a number'} {rng}" + (" or inf" if allow_inf else "")
    parse.__name__ = "int" if kind is int else "float"
    return parse


def show_default(name, value):
    """A default as a user types it: --x / --no-x for a switch, inf, words for lists."""
    if isinstance(value, bool):
        return name if value else "--no-" + name[2:]
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return "none" if value is None else str(value)


def add_flag(group, name, default, help, default_text=None, **kw):
    """Adds a flag whose help ends with its default, said once in the form a user types it (or
    `default_text`); a boolean default makes a --x / --no-x switch, unless it is a store_true."""
    if isinstance(default, bool):
        kw.setdefault("action", argparse.BooleanOptionalAction)
    action = group.add_argument(name, default=default, **kw)
    shown = default_text or ("off" if kw.get("action") == "store_true" else show_default(name, default))
    action.help = f"{help} (default: {shown})".replace("%", "%%")  # argparse formats help with %
    return action


def one_line_errors(parser, script):
    """Argument mistakes give one `error:` line (exit 2) instead of the usage dump."""
    def error(message):
        if int(os.environ.get("RANK", 0)) == 0:  # under torchrun the first process says it
            sys.stderr.write(f"error: {message} (see python {script} --help)\n")
        sys.exit(2)
    parser.error = error
    return parser


# -----------------------------------------------------------------------------
# train.py's flags

# every range a train.py flag is checked against (by `number`, as it is parsed), the methods'
# options included
RANGES = dict(
    epochs=number(int, 1, 100_000), warmup_epochs=number(int, 0, 100_000),
    batch_size=number(int, 2, 1 << 20), lr=number(float, 0, 100, low_open=True),
    weight_decay=number(float, 0, 1), ema_momentum=number(float, 0, 1),
    probe_lr=number(float, 0, 100, low_open=True), seed=number(int, 0, 2 ** 31 - 1),
    image_size=number(int, 8, 1024), num_workers=number(int, 0, 256), eval_every=number(int, 0, 100_000),
    knn_k=number(int, 1, 100_000), knn_temperature=number(float, 0, 100, low_open=True),
    max_steps=number(int, 1, 1 << 40), log_every=number(int, 1, 1 << 20),
    nu=number(float, 0, 1e6, low_open=True, allow_inf=True), beta=number(float, 0, 1e6),
    mc_samples=number(int, 1, 1024), vssl_kl_beta=number(float, 0, 1e3, low_open=True),
    vssl_nll_beta=number(float, 0, 1e3, low_open=True), proj_hidden=number(int, 1, 1 << 16),
    proj_dim=number(int, 1, 1 << 16))
# what --resume may change: how the run is carried out, not what it trains
MAY_CHANGE_ON_RESUME = ("resume", "replace", "output_dir", "max_steps", "data_path", "num_workers", "device",
                        "precision", "compile", "log_every", "eval_every", "knn_k", "knn_temperature")
ONE_INVOCATION = ("resume", "replace", "output_dir", "max_steps")  # never taken from the run on --resume
# the flags whose default is the method's recipe (model.py); None until get_args fills them
RECIPE_FLAGS = ("epochs", "warmup_epochs", "lr", "weight_decay", "lr_schedule", "ema_momentum", "lars_clip",
                "interpolation")


# -----------------------------------------------------------------------------
# flags: the general defaults below, each method's recipe and options (model.py)

def recipe_default(key):
    """How --help shows a recipe flag's default: each method's value, or one for all."""
    name, methods = "--" + key.replace("_", "-"), model.METHODS
    values = {m: show_default(name, cls.recipe[key]) for m, cls in methods.items()
              if cls.recipe.get(key) is not None}
    if len(set(values.values())) == 1 and len(values) == len(methods):
        return f"{values['vje']}, every method's recipe"
    return ", ".join(f"{m} {v}" for m, v in values.items())


def build_parser():
    """train.py's parser. A recipe flag or a method's option defaults to None, which get_args fills
    from the method: so a value that is not None was given. Numbers are checked against RANGES."""
    methods = model.METHODS
    p = argparse.ArgumentParser(description="Self-supervised pre-training (VJE, VSSL, BYOL, SimSiam). Every "
                                "default is the method's recipe (see the README) or the one shown.")
    one_line_errors(p, "train.py")

    def flag(group, name, default, help, **kw):
        key = name[2:].replace("-", "_")
        if key in RECIPE_FLAGS:
            kw["default_text"] = recipe_default(key)
        if key in RANGES:
            kw["type"] = RANGES[key]
        add_flag(group, name, default, help, **kw)

    g = p.add_argument_group("training")
    flag(g, "--method", "vje", "the method", choices=tuple(methods))
    flag(g, "--arch", "resnet18", "tiny is the 0.4 M-parameter CPU network", choices=model.ARCHS)
    flag(g, "--epochs", None, "passes over the data")
    flag(g, "--warmup-epochs", None, "linear warm-up before the cosine decay")
    flag(g, "--batch-size", 256, "global batch size, split over the processes")
    flag(g, "--lr", None, "rate for a batch of 256, scaled with --batch-size (SGD: vje, simsiam; LARS: "
         "vssl, byol)")
    flag(g, "--weight-decay", None, "on weights only, not on norm layers and biases")
    flag(g, "--lr-schedule", None, "warm-up and cosine set once an epoch (the VJE notebook) or every step "
         "(solo-learn)", choices=("epoch", "step"))
    flag(g, "--ema-momentum", None, "teacher momentum at the start, raised to 1")
    flag(g, "--ema-schedule", "cosine", "raised on a per-step cosine (the authors' codes), or constant",
         choices=("cosine", "constant"))
    flag(g, "--lars-clip", None, "solo-learn's clip_lr: each layer's step is min(lr, trust ratio)",
         action=argparse.BooleanOptionalAction)
    flag(g, "--probe-lr", 0.1, "the online probe's SGD rate (batch 256)")
    flag(g, "--joint-bn", False, "both views in one pass through the networks (one set of batch-norm "
         "statistics), not one pass per view as the authors' code")
    flag(g, "--seed", 0, "seeds the weights, the views and the order")

    g = p.add_argument_group("data (--data-path and --num-workers may change on --resume)")
    flag(g, "--dataset", "cifar10", "the dataset", choices=data.DATASETS)
    flag(g, "--data-path", "./data", "download folder of cifar10/cifar100/stl10; for imagenet/folder a tree "
         "of train/ and test/ (or val/)")
    flag(g, "--image-size", None, "image size in px", default_text="the dataset's")
    flag(g, "--classes", None, "train (and evaluate) on these classes only, e.g. CIFAR-10's animals for an "
         "OOD study: bird,cat,deer,dog,frog,horse", default_text="all")
    flag(g, "--aug", "auto", "the views made batched on the training device (the dataset held as one uint8 "
         "tensor) or per image with PIL in --num-workers processes; auto: batched for cifar10/cifar100/stl10 "
         "and folders of images up to 96 px", choices=("auto", "batched", "pil"))
    flag(g, "--blur", "pil", "PIL's GaussianBlur(radius=sigma), as the authors' code, or a torchvision "
         "kernel of 2*int(0.05*size)+1 px (3 px at 32 px, 2.5x weaker at sigma 2)", choices=data.BLURS)
    flag(g, "--interpolation", None, "the random resized crop's resampling", choices=data.INTERPOLATIONS)
    flag(g, "--normalize", "auto", "mean/std: auto, the dataset's in the code of the recipe (ImageNet's for "
         "imagenet and folder); a dataset's name for a folder of its images (cifar10 for a CIFAR-10 subset)",
         choices=data.NORMALIZE_CHOICES)
    flag(g, "--num-workers", min(4, os.cpu_count() or 1), "data-loading processes per training process")

    g = p.add_argument_group("the k-NN monitor (may change on --resume)")
    flag(g, "--eval-every", 5, "every N epochs and at 0; 0 turns it off")
    flag(g, "--knn-k", 20, "neighbours")
    flag(g, "--knn-temperature", 0.07, "T of the votes exp(similarity / T)")

    g = p.add_argument_group("the run (may change on --resume)")
    flag(g, "--output-dir", None, "args.json, log.jsonl, checkpoint.pt",
         default_text="runs/<method>-<dataset>-<arch>")
    flag(g, "--resume", False, "continue the run in --output-dir with its own arguments; flags given with it "
         "must agree, but those of the groups that may change", action="store_true")
    flag(g, "--replace", False, "start a new run in an --output-dir that holds one, removing its files",
         action="store_true")
    flag(g, "--max-steps", None, "stop after this many steps in all, with a checkpoint --resume continues")
    flag(g, "--device", "auto", "auto takes a GPU when one is visible", choices=("auto", "cuda", "cpu"))
    flag(g, "--precision", None, "autocast precision (fp16 with a GradScaler); the losses are float32 always",
         default_text="bf16 on GPUs that support it, else fp32", choices=("fp32", "bf16", "fp16"))
    flag(g, "--compile", None, "torch.compile the forward + loss and the batched augmentation (the first "
         "step compiles, a minute or so)", action=argparse.BooleanOptionalAction,
         default_text="--compile on CUDA, --no-compile on the CPU")
    flag(g, "--log-every", 50, "steps between the only host syncs of an epoch: the finite-loss check, the "
         "stop flag, the progress bar")

    added = set()
    for name, cls in methods.items():  # each method's own options; a shared one is added once
        g = p.add_argument_group(f"{name} options")
        for key, option in cls.options.items():
            if key in added:
                continue
            added.add(key)
            owners = [m for m, c in methods.items() if key in c.options]
            kw = {k: v for k, v in option.items() if k not in ("default", "help")}
            if isinstance(option["default"], bool):
                kw["action"] = argparse.BooleanOptionalAction
            shared = f" ({' and '.join(owners)})" if len(owners) > 1 else ""
            flag(g, "--" + key.replace("_", "-"), None, option["help"] + shared,
                 default_text=show_default("--" + key.replace("_", "-"), option["default"]), **kw)
    return p


def get_args(argv=None):
    """The resolved arguments: the flags given, then the method's options and recipe for those
    left unset, then the general defaults; with --resume, the run's own arguments
    (resumed_arguments) under the flags given, which must agree with them."""
    p = build_parser()
    args = vars(p.parse_args(argv))
    if args["resume"] and args["replace"]:
        p.error("--resume continues the run in --output-dir and --replace removes it: give one of them")
    flags = set(args)  # the names of the flags (args gains others below)
    saved = resumed_arguments(p, args) if args["resume"] else {}
    if saved:  # the run's own arguments, with this invocation's flags over them
        args = vars(p.parse_args(argv))
    cls = model.METHODS[args["method"]]
    for c in model.METHODS.values():  # another method's options: not given, and not kept
        for key in set(c.options) - set(cls.options):
            value = args.pop(key, None)
            if value is not None and value != saved.get(key):  # (the run's own: --method changed)
                p.error(f"--{key.replace('_', '-')} is not an option of --method {cls.name}")
    for key, option in cls.options.items():
        args[key] = option["default"] if args[key] is None else args[key]
    for key in RECIPE_FLAGS:  # the method's recipe, for the flags left unset
        if args[key] is None:
            args[key] = cls.recipe.get(key)
        elif cls.recipe.get(key) is None:
            p.error(f"--{key.replace('_', '-')} does not apply to --method {cls.name}, whose recipe has none")
    args.update(optimizer=cls.recipe["optimizer"], nesterov=cls.recipe["nesterov"])
    reason = cls.check(args) if hasattr(cls, "check") else None
    if reason:
        p.error(reason)
    args["normalize"] = data.normalization(args["normalize"], args["dataset"], cls.recipe["constants"])
    args["output_dir"] = os.path.abspath(args["output_dir"] or default_output_dir(args))
    args["data_path"] = os.path.abspath(args["data_path"])  # so that a run is found from any folder
    if os.path.exists(args["output_dir"]) and not os.path.isdir(args["output_dir"]):
        p.error(f"--output-dir '{args['output_dir']}' is a file; name a folder")
    if saved:
        hint = "; --epochs is the length of the run's schedule, which --resume continues" * \
            (args["epochs"] != saved.get("epochs"))
        utils.refuse_changes(saved, args, [k for k in args if k in flags and k not in MAY_CHANGE_ON_RESUME],
                             hint)
    return argparse.Namespace(**args)


def default_output_dir(args):
    return os.path.join("runs", f"{args['method']}-{args['dataset']}-{args['arch']}")


def resumed_arguments(p, first):
    """The arguments of the run --resume continues (its args.json, or its checkpoint's if that is
    damaged), made the parser's defaults but for ONE_INVOCATION: parsed again, the flags given
    stand over them. get_args then refuses a flag that defines the run (not MAY_CHANGE_ON_RESUME)
    with another value."""
    out = first["output_dir"] or default_output_dir(first)
    ckpt = os.path.join(out, "checkpoint.pt")
    if not os.path.isfile(ckpt):
        started = os.path.isfile(os.path.join(out, "args.json"))
        stopped = "; the run there stopped before its first checkpoint" * started
        utils.fail(f"--resume but '{ckpt}' does not exist{stopped}: check --output-dir, or leave out "
                   f"--resume to start it")
    saved = utils.load_checkpoint(ckpt).get("args", {})  # as of its last checkpoint
    path = os.path.join(out, "args.json")  # as the latest command gave them (other MAY_CHANGE_ON_RESUME)
    try:
        with open(path) as f:
            written = json.load(f)
        problem = "is not a JSON object" if not isinstance(written, dict) else args_problem(written, saved)
    except (OSError, ValueError) as e:
        problem = f"is unreadable ({getattr(e, 'strerror', None) or type(e).__name__})"
    if problem:
        utils.note(f"'{path}' {problem}; the run's arguments are read from its checkpoint instead (args.json "
                   f"is written again as the run goes on)")
    else:
        saved = written
    p.set_defaults(**{k: v for k, v in saved.items() if k not in ONE_INVOCATION})
    return saved


def args_problem(written, saved):
    """What is wrong with an args.json, judged by the arguments its checkpoint saved: keys missing,
    or values of another type; None if nothing."""
    missing = [k for k in saved if k not in written]
    if missing:
        return f"lacks {', '.join(missing[:3])}" + f" and {len(missing) - 3} more" * (len(missing) > 3)
    wrong = [f"{k} {written[k]!r}" for k, v in saved.items()
             if None not in (v, written[k]) and type(written[k]) is not type(v)]
    return f"has values of the wrong type ({', '.join(wrong[:3])})" if wrong else None
