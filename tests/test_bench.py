"""bench.py: the statistics helper against hand-computed values, one end-to-end
run on tiny settings whose JSON must hold every section with positive, finite,
mutually consistent numbers, the compiled feed, and --gpu-check without a GPU.
Nothing here judges speed: timings on a shared machine are the benchmark's
business, not a test's."""
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, make_image_folder

import bench


def test_summarize_matches_hand_computed_median_quartiles_and_ratio():
    # 1, 2, 3, 4, 10 ms: median 3, quartiles 2 and 4 (numpy's linear
    # interpolation lands on samples for n = 5), extremes 1 and 10
    s = bench.summarize([0.004, 0.001, 0.010, 0.003, 0.002], images=6, reference=[0.002, 0.001, 0.0015])
    assert s["median_ms"] == pytest.approx(3.0)
    assert (s["q1_ms"], s["q3_ms"]) == (pytest.approx(2.0), pytest.approx(4.0))
    assert (s["min_ms"], s["max_ms"], s["n"]) == (pytest.approx(1.0), pytest.approx(10.0), 5)
    assert s["images_per_s"] == pytest.approx(6 / 0.003)  # 2000 images/s at the median step
    assert s["ratio_to_encoder"] == pytest.approx(3.0 / 1.5)  # medians 3 ms over 1.5 ms
    # even count: median halfway between the middle two, quartiles at positions 0.75 and 2.25
    s = bench.summarize([0.001, 0.002, 0.003, 0.004])
    assert (s["q1_ms"], s["median_ms"], s["q3_ms"]) == (pytest.approx(1.75), pytest.approx(2.5),
                                                        pytest.approx(3.25))
    assert s["images_per_s"] is None and s["ratio_to_encoder"] is None


def test_fp16_on_the_cpu_is_refused_in_one_line():
    with pytest.raises(SystemExit, match="fp16 needs a CUDA GPU"):
        bench.main(["--device", "cpu", "--precision", "fp16"])


def positive_finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_end_to_end_json_has_every_section_with_consistent_numbers(tmp_path, capsys):
    """bench.main in this process, as `python bench.py ARGS` runs it (a subprocess costs seconds of
    imports); it sets the thread count (--threads, --aug-threads), which is given back after."""
    folder = make_image_folder(tmp_path / "data", classes=3, train_per_class=8, test_per_class=4, size=16)
    out = tmp_path / "bench.json"
    methods = ["vje", "vssl", "byol", "simsiam"]
    argv = ["--arch", "tiny", "--batch-size", "4", "--image-size", "16",
            "--methods", *methods, "--rounds", "1", "--warmup", "0", "--threads", "1", "--device", "cpu",
            "--data-path", folder, "--workers", "0", "1", "--data-batches", "2", "--output", str(out),
            "--aug-threads", "1", "2", "--feed-workers", "0", "1", "--feed-rounds", "2", "--feed-steps", "2",
            "--feed-warmup", "1"]
    threads = torch.get_num_threads()
    try:
        bench.main(argv)
    finally:
        torch.set_num_threads(threads)
    proc = SimpleNamespace(stdout=capsys.readouterr().out)
    r = json.loads(out.read_text())

    steps = r["train_step"]
    assert list(steps) == ["encoder"] + methods
    enc = steps["encoder"]["median_ms"]
    for name, s in steps.items():
        assert all(positive_finite(s[k]) for k in ("median_ms", "q1_ms", "q3_ms", "min_ms", "max_ms",
                                                   "images_per_s"))
        assert s["min_ms"] <= s["q1_ms"] <= s["median_ms"] <= s["q3_ms"] <= s["max_ms"]
        assert s["n"] == 1
        # every ratio is median / median of the encoder step of the same run
        assert s["ratio_to_encoder"] == pytest.approx(s["median_ms"] / enc)
        assert s["images_per_s"] == pytest.approx(4 / (s["median_ms"] / 1000))

    loss = r["loss_overhead"]
    assert set(loss) == set(methods) | {"vje_loss_fn", "encoder"}
    for name in methods + ["vje_loss_fn"]:
        assert positive_finite(loss[name]["median_ms"]) and positive_finite(loss[name]["ratio_to_encoder"])
        assert loss[name]["ratio_to_encoder"] == pytest.approx(loss[name]["median_ms"] / enc)
        assert loss[name]["includes"]

    rows = r["data_loading"]
    assert [(row["method"], row["workers"]) for row in rows] == [(m, w) for m in methods for w in (0, 1)]
    for row in rows:
        # 24 images in batches of 4: 6 batches, one for warm-up, 2 timed
        assert row["batches"] == 2 and row["pairs"] == 8
        assert positive_finite(row["pairs_per_s"]) and positive_finite(row["ms_per_batch"])

    for m in methods:
        b = r["breakdown"][m]
        assert b["encoder_ms"] + b["heads_and_loss_ms"] + b["rest_of_step_ms"] == pytest.approx(b["step_ms"])
        assert sum(b["share_percent"].values()) == pytest.approx(100.0)
        assert set(b["data_ms_per_batch"]) == {"0", "1"}

    views = r["augmentation_views"]
    assert [(v["method"], v["pipeline"], v["cores"]) for v in views] == \
        [(m, p, c) for m in methods for p in ("batched", "pil") for c in (1, 2)]
    assert all(positive_finite(v["views_per_s"]) for v in views)
    assert [v["workers"] for v in views if v["pipeline"] == "pil"] == [0, 2] * 4

    feeds = r["feeds"]
    assert list(feeds) == ["ceiling", "batched", "pil-w0", "pil-w1"]
    for f, s in feeds.items():
        assert s["n"] == 2 * 2  # rounds x timed steps
        assert s["throughput_vs_ceiling"] == pytest.approx(feeds["ceiling"]["median_ms"] / s["median_ms"])
        assert s["images_per_s"] == pytest.approx(4 / (s["median_ms"] / 1000))
    assert feeds["ceiling"]["throughput_vs_ceiling"] == 1.0

    assert positive_finite(r["memory"]["cpu_peak_rss_mb"])
    assert r["env"]["device"] == "cpu" and r["env"]["threads"] == 1 and r["env"]["precision"] == "fp32"
    assert all(title in proc.stdout for title in ("loss overhead", "data loading",
                                                  "training loop fed 4 ways"))


def test_gpu_check_without_a_gpu_says_so_in_one_line_and_exits_0(tmp_path):
    """No GPU visible (CUDA_VISIBLE_DEVICES empty, so also on a GPU machine):
    nothing is checked, one line says so, no JSON is written."""
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "bench.py", "--gpu-check", "--output", str(out)], cwd=ROOT,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0] and "nothing was checked" in lines[0], proc.stdout
    assert not out.exists()
