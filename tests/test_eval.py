"""eval_knn.py, eval_linear.py and eval_ood.py: the OOD metrics against hand
counts and brute force, the k-NN vote and neighbour distance against plain
loops, class selection, and each script end to end on a tiny generated
folder (3 classes, 8 train and 4 test images each, 16 px) whose classes
overlap (conftest.make_overlapping_image_folder), so that the k-NN
accuracies two runs are found to agree on lie well inside 0-100 %: on
classes of well separated colours any network scores 100 %, and an
equality of two such numbers would say nothing."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

from conftest import ROOT, make_image_folder, make_overlapping_image_folder

import data
import eval_knn
import eval_linear
import eval_ood
import losses
import model as model_lib


pytestmark = pytest.mark.usefixtures("scripts_on_one_thread")


# -----------------------------------------------------------------------------
# OOD metrics

def brute_auroc(s_id, s_ood):
    """P(OOD score > ID score) + P(tie) / 2 over all n_id * n_ood pairs."""
    wins = sum((o > i) + 0.5 * (o == i) for o in s_ood for i in s_id)
    return wins / (len(s_id) * len(s_ood))


def brute_aupr(s_id, s_ood):
    """Average precision by sweeping every distinct threshold from the top and
    counting the flagged samples (score >= t) directly."""
    ap, prev_recall = 0.0, 0.0
    for t in sorted(set(s_id) | set(s_ood), reverse=True):
        tp = sum(o >= t for o in s_ood)
        fp = sum(i >= t for i in s_id)
        recall = tp / len(s_ood)
        ap += (recall - prev_recall) * tp / (tp + fp)
        prev_recall = recall
    return ap


def brute_fpr(s_id, s_ood, tpr):
    """Smallest FPR over all thresholds (every score) whose TPR is >= tpr."""
    best = 1.0
    for t in set(s_id) | set(s_ood):
        if sum(o >= t for o in s_ood) >= tpr * len(s_ood) - 1e-9:
            best = min(best, sum(i >= t for i in s_id) / len(s_id))
    return best


def tied_scores(seed):
    """Integer scores in 0..5: most of them are tied with others."""
    rng = np.random.default_rng(seed)
    return list(rng.integers(0, 6, 37).astype(float)), list(rng.integers(1, 7, 23).astype(float))


def test_auroc_hand_computed_with_ties():
    # ID [1, 2, 3], OOD [2, 3, 4]: OOD 2 beats 1, ties 2 (1.5); OOD 3 beats 1, 2,
    # ties 3 (2.5); OOD 4 beats all (3): U = 7 of 9 pairs
    assert eval_ood.auroc([1, 2, 3], [2, 3, 4]) == pytest.approx(7 / 9, abs=1e-15)
    assert eval_ood.auroc([2, 3, 4], [1, 2, 3]) == pytest.approx(2 / 9, abs=1e-15)
    assert eval_ood.auroc([5, 5], [5, 5, 5]) == 0.5
    assert eval_ood.auroc([0, 1], [2, 3]) == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_is_the_mann_whitney_probability(seed):
    """Rank formula == the O(n^2) pair count (exact in float64 for these sizes)."""
    s_id, s_ood = tied_scores(seed)
    assert eval_ood.auroc(s_id, s_ood) == pytest.approx(brute_auroc(s_id, s_ood), abs=1e-12)


def test_aupr_hand_computed_with_ties():
    # thresholds 4, 3, 2, 1 flag (tp, fp) = (1, 0), (2, 1), (3, 2), (3, 3):
    # AP = 1/3 * 1 + 1/3 * 2/3 + 1/3 * 3/5 + 0 * 1/2 = 34/45
    assert eval_ood.aupr([1, 2, 3], [2, 3, 4]) == pytest.approx(34 / 45, abs=1e-15)
    assert eval_ood.aupr([0, 1], [2, 3]) == 1.0
    # everything tied: one threshold, precision = the OOD fraction
    assert eval_ood.aupr([7, 7, 7], [7]) == pytest.approx(1 / 4, abs=1e-15)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupr_equals_threshold_sweep(seed):
    s_id, s_ood = tied_scores(seed)
    assert eval_ood.aupr(s_id, s_ood) == pytest.approx(brute_aupr(s_id, s_ood), abs=1e-12)


def test_fpr95_hand_computed_with_ties():
    # 20 OOD scores 1..20: keeping >= 95 % means 19 of them, threshold t = 2.
    # ID >= 2: 2 (a tie, counted), 2.5 and 30 -> 3 of 6
    assert eval_ood.fpr_at_tpr([0.5, 1, 1, 2, 2.5, 30], list(range(1, 21))) == 0.5
    # OOD all tied at 5: t = 5, the ID sample at 5 is a false positive
    assert eval_ood.fpr_at_tpr([5, 4], [5, 5, 5, 5]) == 0.5
    # 10 OOD scores: 95 % needs all 10 (ceil 9.5), t = the smallest, 0
    assert eval_ood.fpr_at_tpr([-1, 0, 0.5], list(range(10))) == pytest.approx(2 / 3)
    assert eval_ood.fpr_at_tpr([0, 1], [2, 3]) == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tpr", [0.95, 0.8, 1.0])
def test_fpr_equals_brute_force(seed, tpr):
    s_id, s_ood = tied_scores(seed)
    assert eval_ood.fpr_at_tpr(s_id, s_ood, tpr) == pytest.approx(brute_fpr(s_id, s_ood, tpr), abs=1e-12)


def test_metrics_reject_non_finite_scores():
    with pytest.raises(ValueError, match="finite"):
        eval_ood.auroc([0.0, float("nan")], [1.0])


# -----------------------------------------------------------------------------
# k-NN vote and neighbour distance

def test_knn_classify_equals_brute_force_vote():
    """Chunked, vectorized vote == a loop over test images that sorts all
    cosine similarities and adds exp(sim / T) per class of the top k."""
    g = torch.Generator().manual_seed(0)
    bank, labels = torch.randn(40, 8, generator=g), torch.randint(0, 4, (40,), generator=g)
    test = torch.randn(15, 8, generator=g)
    k, t = 7, 0.07
    pred = eval_knn.knn_classify(bank, labels, test, 4, k, t, chunk=4)
    for i in range(len(test)):
        sims = [float(F.cosine_similarity(test[i], b, dim=0)) for b in bank]
        votes = [0.0] * 4
        for j in sorted(range(len(bank)), key=lambda j: -sims[j])[:k]:
            votes[int(labels[j])] += np.exp(sims[j] / t)
        assert int(pred[i]) == int(np.argmax(votes)), i


def test_kth_neighbour_distance_equals_sorted_distances():
    g = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(30, 6, generator=g) * 3, torch.randn(9, 6, generator=g)
    k = 4
    dist = torch.cdist(F.normalize(queries, dim=1).double(), F.normalize(bank, dim=1).double())
    expected = dist.sort(dim=1).values[:, k - 1]
    got = eval_knn.kth_neighbour_distance(bank, queries, k, chunk=4)
    assert torch.allclose(got.double(), expected, atol=1e-5)  # float32 cosines, sqrt near 0: 1e-5


def test_topk_accuracy_hand_computed():
    logits = torch.tensor([[3.0, 2, 1, 0, -1, -2], [0, 1, 2, 3, 4, 5], [5.0, 4, 3, 2, 1, 0]])
    labels = torch.tensor([0, 0, 4])
    top1, top5 = eval_linear.topk_accuracy(logits, labels)
    assert top1 == pytest.approx(100 / 3) and top5 == pytest.approx(200 / 3)
    # top-5 of 3 classes
    assert eval_linear.topk_accuracy(logits[:, :3], torch.tensor([2, 0, 1])) == [0.0, 100.0]


# -----------------------------------------------------------------------------
# class selection

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_overlapping_image_folder(tmp_path_factory.mktemp("data"))


def test_select_classes_reindexes_in_the_given_order(folder):
    select = data.select_classes
    full = data.build_dataset("folder", folder, "train",
                              data.eval_transform(data.dataset_info("folder", folder)))
    sub = select(full, ["class2", "class0"])
    assert len(sub) == 16 and list(sub.classes) == ["class2", "class0"]
    old = data.labels_of(full)
    expected = [{2: 0, 0: 1}[int(old[i])] for i in range(len(full)) if int(old[i]) in (0, 2)]
    assert data.labels_of(sub).tolist() == expected
    # a DataLoader fetches through __getitems__: it must see the new labels too
    batch_labels = torch.cat([y for _, y in torch.utils.data.DataLoader(sub, batch_size=5)])
    assert batch_labels.tolist() == expected
    with pytest.raises(SystemExit, match="^error: .*nope"):
        select(full, ["class0", "nope"])


def test_select_classes_rejects_repeated_names(folder):
    full = data.build_dataset("folder", folder, "test", None)
    with pytest.raises(SystemExit, match="^error: a class is named twice"):
        data.select_classes(full, "class0,class0")


# -----------------------------------------------------------------------------
# end to end on checkpoints written by train.py

def run_train(folder, out, method, *extra):
    """train.py's main() in this process, on one thread, as `python train.py ...` would run it (a
    subprocess costs seconds of imports). Returns the path of its checkpoint."""
    import train
    argv = ["--method", method, "--dataset", "folder", "--data-path", folder, "--arch", "tiny",
            "--batch-size", "8", "--epochs", "1", "--warmup-epochs", "1", "--num-workers", "0",
            "--device", "cpu", "--output-dir", out, *extra]
    if method in ("vssl", "byol"):  # a 64-wide projector keeps the test fast
        argv += ["--proj-hidden", "64"]
    with pytest.MonkeyPatch.context() as mp:
        torch.set_num_threads(1)
        mp.setattr(torch, "set_num_threads", lambda n: None)
        train.main(argv)
    return os.path.join(out, "checkpoint.pt")


@pytest.fixture(scope="module")
def vje_ckpt(folder, tmp_path_factory):
    """One VJE epoch with the k-NN monitor on, so log.jsonl holds knn_acc."""
    return run_train(folder, str(tmp_path_factory.mktemp("vje")), "vje", "--eval-every", "1")


@pytest.fixture(scope="module")
def byol_ckpt(folder, tmp_path_factory):
    return run_train(folder, str(tmp_path_factory.mktemp("byol")), "byol", "--eval-every", "0", "--max-steps",
                     "1")


CPU = ["--device", "cpu", "--num-workers", "0"]


def test_eval_knn_reproduces_the_train_monitor(vje_ckpt, tmp_path):
    """Same features (z, eval transform, eval mode), same bank and k/T defaults:
    the k = 20 accuracy equals train.py's logged knn_acc exactly, and that of
    --feature mu the logged knn_acc_mu. Both lie well inside 0-100 % on this
    fixture, so a monitor that read other features (say, with batch
    statistics) would log another number."""
    logged = [json.loads(line) for line in open(os.path.join(os.path.dirname(vje_ckpt), "log.jsonl"))][-1]
    res = eval_knn.main(["--checkpoint", vje_ckpt, *CPU])
    assert res["checkpoint_epoch"] == logged["epoch"] == 1
    assert res["top1_k20"] == logged["knn_acc"]
    mu = eval_knn.main(["--checkpoint", vje_ckpt, *CPU, "--feature", "mu", "--output",
                        str(tmp_path / "mu.json")])
    assert mu["top1_k20"] == logged["knn_acc_mu"]
    assert 15 < res["top1_k20"] < 95 and 15 < mu["top1_k20"] < 95
    assert res["num_bank"] == 24 and res["num_test"] == 12 and "top1_k200" in res
    with open(os.path.join(os.path.dirname(vje_ckpt), "knn_z.json")) as f:
        assert json.load(f)["top1_k20"] == res["top1_k20"]


def test_eval_knn_saved_features_give_the_same_result(vje_ckpt, tmp_path):
    feats = str(tmp_path / "feats.pt")
    direct = eval_knn.main(["--checkpoint", vje_ckpt, *CPU, "--feature", "mu", "--k", "3", "5",
                            "--save-features", feats, "--output", str(tmp_path / "a.json")])
    loaded = eval_knn.main(["--checkpoint", vje_ckpt, "--load-features", feats, "--k", "3", "5",
                            "--output", str(tmp_path / "b.json")])
    assert loaded["feature"] == "mu"
    assert (loaded["top1_k3"], loaded["top1_k5"]) == (direct["top1_k3"], direct["top1_k5"])
    assert 15 < direct["top1_k3"] < 95 and 15 < direct["top1_k5"] < 95  # features that decide the number


TORCHRUN_DRIVER = """
import sys
sys.path.insert(0, sys.argv[1])
import torch.distributed as dist
import eval_knn, eval_linear, eval_ood, utils
# one process group for the three scripts: a rank that finished a script must
# not tear it down while the other still works
utils.cleanup_distributed = lambda: None
ckpt, out = sys.argv[2], sys.argv[3]
cpu = ["--device", "cpu", "--num-workers", "0"]
eval_knn.main(["--checkpoint", ckpt, *cpu, "--k", "5", "--output", out + "/knn.json"])
dist.barrier()
eval_ood.main(["--checkpoint", ckpt, *cpu, "--classes", "class0,class1", "--ood-k", "3",
               "--output", out + "/ood.json"])
dist.barrier()
eval_linear.main(["--checkpoint", ckpt, *cpu, "--epochs", "2", "--batch-size", "8",
                  "--output-dir", out + "/linear",
                  "--output", out + "/linear.json"])
dist.barrier()
dist.destroy_process_group()
"""


def test_scripts_under_torchrun_equal_one_process(vje_ckpt, tmp_path):
    """Two processes (one torchrun launch runs all three scripts): k-NN and OOD
    extract interleaved shards and gather them, so their numbers equal one
    process's; the DDP linear probe runs, and rank 0 alone writes its log."""
    knn = eval_knn.main(["--checkpoint", vje_ckpt, *CPU, "--k", "5", "--output", str(tmp_path / "knn1.json")])
    ood = eval_ood.main(["--checkpoint", vje_ckpt, *CPU, "--classes", "class0,class1", "--ood-k", "3",
                         "--output", str(tmp_path / "ood1.json")])
    driver = tmp_path / "driver.py"
    driver.write_text(TORCHRUN_DRIVER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver),
           ROOT, vje_ckpt, str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(tmp_path / "knn.json") as f:
        assert json.load(f)["top1_k5"] == knn["top1_k5"]
    assert 15 < knn["top1_k5"] < 95  # an accuracy that a wrong shard or merge would move
    with open(tmp_path / "ood.json") as f:
        two = json.load(f)["scores"]
    for name, m in ood["scores"].items():
        for key in ("auroc", "aupr_in", "aupr_out", "fpr95"):
            assert two[name][key] == m[key], (name, key)
        assert two[name]["mean_id"] == pytest.approx(m["mean_id"], rel=1e-6)  # summation order differs
    log = [json.loads(line) for line in open(tmp_path / "linear" / "log.jsonl")]
    assert [e["epoch"] for e in log] == [1, 2]
    with open(tmp_path / "linear.json") as f:
        assert json.load(f)["epochs"] == 2


def test_eval_linear_end_to_end_and_exact_resume(vje_ckpt, tmp_path):
    """Two epochs straight, and one epoch (stopped by --max-steps after its 3
    steps) then --resume, give the same linear layer bit for bit. The probe
    reads a folder of 12 classes (2 train and 1 test image each, through
    --data-path), so that top-5 can miss: top-1 and top-5 equal the share of
    test images whose label is the largest, or among the 5 largest, of the
    saved layer's 12 logits on the eval-mode features computed here."""
    twelve = make_overlapping_image_folder(tmp_path / "twelve", classes=12, train_per_class=2,
                                           test_per_class=1)
    flags = ["--checkpoint", vje_ckpt, *CPU, "--data-path", twelve, "--epochs", "2", "--batch-size", "8"]
    a = eval_linear.main([*flags, "--output-dir", str(tmp_path / "a"), "--output", str(tmp_path / "a.json")])
    log = [json.loads(line) for line in open(tmp_path / "a" / "log.jsonl")]
    assert [e["epoch"] for e in log] == [1, 2] and "test_top1" in log[-1]
    assert a["epochs"] == 2 and a["num_test"] == 12
    net, train_args, _ = model_lib.load_model(vje_ckpt)
    net.eval()
    mean, std = data.NORMALIZATION[train_args["normalize"]]
    classes = sorted(os.listdir(os.path.join(twelve, "train")))  # ImageFolder's labels: class10 is 2
    test = [(path, classes.index(os.path.basename(os.path.dirname(path))))
            for path in sorted(glob.glob(os.path.join(twelve, "test", "class*", "*.png")))]
    x = torch.stack([TF.normalize(TF.to_tensor(Image.open(path).convert("RGB")), mean, std)
                     for path, _ in test])
    linear = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["linear"]
    with torch.no_grad():
        logits = net.encoder(x) @ linear["weight"].T + linear["bias"]
    ranked, top = logits.argsort(dim=1, descending=True), logits.sort(dim=1, descending=True).values
    # no near-tie at rank 1 or 5 that the script's float32 features (other batches) could break
    assert min((top[:, 0] - top[:, 1]).min(), (top[:, 4] - top[:, 5]).min()) > 1e-4 * logits.abs().max()
    y = torch.tensor([label for _, label in test])[:, None]
    top1, top5 = (100.0 * (ranked[:, :k] == y).any(1).float().mean().item() for k in (1, 5))
    assert (a["top1"], a["top5"]) == (pytest.approx(top1, abs=1e-4), pytest.approx(top5, abs=1e-4))
    assert 0 < a["top5"] < 100  # a top-5 that can fail
    with open(tmp_path / "a.json") as f:
        assert json.load(f)["top1"] == a["top1"]

    b_flags = [*flags, "--output-dir", str(tmp_path / "b"), "--output", str(tmp_path / "b.json")]
    eval_linear.main([*b_flags, "--max-steps", "3"])
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    b = eval_linear.main([*b_flags, "--resume"])
    wa = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["linear"]
    wb = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["linear"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (b["top1"], b["top5"]) == (a["top1"], a["top5"])
    with pytest.raises(SystemExit, match="^error: --resume with changed recipe flags: --lr"):
        eval_linear.main([*b_flags, "--resume", "--lr", "0.5"])


def test_eval_ood_class_split_vje(vje_ckpt):
    """class0, class1 in-distribution, class2 OOD: all three scores, and the
    vje score's mean equals Eq. 39 computed here on the same test images."""
    res = eval_ood.main(["--checkpoint", vje_ckpt, *CPU, "--classes", "class0,class1", "--ood-classes",
                         "class2", "--ood-k", "3"])
    assert list(res["scores"]) == ["vje", "vje-dir", "knn"]
    assert res["in_distribution"]["num_images"] == 8 and res["ood"]["num_images"] == 4
    for m in res["scores"].values():
        assert all(0 <= m[key] <= 100 for key in ("auroc", "aupr_in", "aupr_out", "fpr95"))
    with open(os.path.join(os.path.dirname(vje_ckpt), "ood_folder_class2.json")) as f:
        assert json.load(f)["scores"]["vje"]["auroc"] == res["scores"]["vje"]["auroc"]

    net, args, _ = model_lib.load_model(vje_ckpt)
    net.eval()
    info = data.dataset_info("folder", args["data_path"])
    test = data.select_classes(data.build_dataset("folder", args["data_path"], "test",
                                                  data.eval_transform(info)),
                               ["class0", "class1"])
    x = torch.stack([test[i][0] for i in range(len(test))])
    with torch.no_grad():
        z = net.encoder(x)
        score = losses.vje_ood_score(z, *net.head(z), nu=args["nu"], radial=True)
    assert res["scores"]["vje"]["mean_id"] == pytest.approx(score.mean().item(), rel=1e-5)


def test_vje_score_centres_the_variance_as_training_did():
    """A model trained with --center-var is scored with centred variances, as
    the authors' notebook does: eval_ood's directional score equals the
    training loss's directional term (losses.vje_directional_nll with
    center_var) at s = mu, and differs from the uncentred one by far more
    than float32 rounding."""
    torch.manual_seed(0)
    net = model_lib.build(dict(model_lib.option_defaults("vje"), method="vje", arch="tiny", image_size=16,
                               num_classes=0, joint_bn=False, center_var=True)).eval()
    x = torch.randn(5, 3, 16, 16)
    forward, layout = eval_ood.score_forward(net, "z", ["vje-dir"])
    score = forward(x)[:, layout["vje-dir"]].squeeze(1)
    with torch.no_grad():
        z = net.encoder(x)
        mu, var = net.head(z)
        trained = losses.vje_directional_nll(z, mu, var, 1.0, center_var=True)
        uncentred = losses.vje_directional_nll(z, mu, var, 1.0, center_var=False)
    assert torch.allclose(score, trained, rtol=1e-5, atol=1e-4)
    assert (score - uncentred).abs().min() > 1.0


def test_eval_ood_byol_defaults_to_knn_and_the_other_classes(byol_ckpt):
    res = eval_ood.main(["--checkpoint", byol_ckpt, *CPU, "--classes", "class0,class1", "--ood-k", "3",
                         "--feature", "ema"])
    assert list(res["scores"]) == ["knn"] and res["ood"]["classes"] == ["class2"]


def test_eval_ood_another_folder_at_another_size(vje_ckpt, tmp_path):
    """OOD from a separate folder of 24 px images: resized to the 16 px the
    checkpoint was trained on."""
    other = make_image_folder(tmp_path / "other", classes=2, train_per_class=1, test_per_class=3, size=24,
                              seed=5)
    res = eval_ood.main(["--checkpoint", vje_ckpt, *CPU, "--ood-dataset", "folder", "--ood-data-path", other,
                         "--ood-k", "3", "--scores", "knn", "vje", "--output", str(tmp_path / "o.json")])
    assert res["ood"]["num_images"] == 6 and res["in_distribution"]["num_images"] == 12
    assert list(res["scores"]) == ["knn", "vje"]


@pytest.mark.parametrize("script, extra, message", [
    (eval_knn, ["--feature", "mu"], "--feature mu is VJE's posterior mean"),
    (eval_knn, ["--feature", "ema", "VJE"], "--feature ema needs a target encoder"),
    (eval_linear, ["--feature", "ema", "VJE"], "--feature ema needs a target encoder"),
    (eval_ood, ["--scores", "vje"], "--scores vje read VJE's posterior"),
    (eval_ood, ["--scores", "vje-dir", "knn"], "--scores vje-dir read VJE's posterior"),
])
def test_misuse_stops_with_one_line(script, extra, message, vje_ckpt, byol_ckpt, tmp_path):
    ckpt = vje_ckpt if extra[-1] == "VJE" else byol_ckpt
    extra = [e for e in extra if e != "VJE"]
    with pytest.raises(SystemExit) as e:
        script.main(["--checkpoint", ckpt, *CPU, *extra, "--output", str(tmp_path / "x.json")])
    text = str(e.value)
    assert text.startswith("error: ") and message in text and "\n" not in text


def test_missing_checkpoint_is_one_line_without_traceback(tmp_path):
    for script in (eval_knn, eval_linear, eval_ood):
        with pytest.raises(SystemExit, match="^error: checkpoint .* not found"):
            script.main(["--checkpoint", str(tmp_path / "none.pt"), *CPU])
    r = subprocess.run([sys.executable, os.path.join(ROOT, "eval_ood.py"), "--checkpoint",
                        str(tmp_path / "none.pt")],
                       capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 1 and r.stderr.startswith("error: checkpoint") and "Traceback" not in r.stderr
