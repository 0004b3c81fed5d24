"""Tests for lightning_modules.metrics (PCK metric and functional twin).

Every expected number below is computed by hand in the comments, never by the code under test.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from lightning_modules.metrics import (
    PCK,
    format_alpha,
    keypoint_correct,
    pair_correct_counts,
    pck,
    stable_pair_key,
    summarize_pck,
)

from conftest import REPO as REPO_ROOT


def _offset_points(gt: list[list[float]], errors: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions displaced from `gt` along x by exactly `errors` pixels."""
    g = torch.tensor(gt, dtype=torch.float32)
    p = g.clone()
    p[:, 0] += torch.tensor(errors, dtype=torch.float32)
    return p, g


def _assert_result_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        for avg in ("per_point", "per_image", "category_mean"):
            x, y = a[key][avg], b[key][avg]
            assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, abs=1e-9), (key, avg, x, y)
        assert a[key]["per_category"].keys() == b[key]["per_category"].keys()
        for cat in a[key]["per_category"]:
            assert a[key]["per_category"][cat] == pytest.approx(b[key]["per_category"][cat], abs=1e-9)


# --------------------------------------------------------------------------------------------------
# crafted example: 3 pairs, 2 categories, per_point != per_image != category_mean
# --------------------------------------------------------------------------------------------------
# alphas 0.05 and 0.1
# pair A (aero, thr 100 -> 5 / 10 px): errors [1, 6, 9, 12]      -> @0.05: 1/4, @0.1: 3/4
# pair B (aero, thr 100 -> 5 / 10 px): errors [10, 50]           -> @0.05: 0/2, @0.1: 0/2 (10 is NOT < 10)
# pair C (bike, thr 200 -> 10 / 20 px): errors [0, 5, 15, 19, 25] -> @0.05: 2/5 (0, 5; 10 not hit), @0.1: 4/5
CRAFTED_ERRORS = [[1, 6, 9, 12], [10, 50], [0, 5, 15, 19, 25]]
CRAFTED_THRESHOLDS = [100.0, 100.0, 200.0]
CRAFTED_CATEGORIES = ["aero", "aero", "bike"]
CRAFTED_IDS = ["A", "B", "C"]
ALPHAS = [0.05, 0.1]
EXPECTED = {
    "0.1": {
        # pooled: (3 + 0 + 4) / (4 + 2 + 5) = 7 / 11
        "per_point": 700 / 11,  # 63.6363...
        # mean over pairs: (75 + 0 + 80) / 3
        "per_image": 155 / 3,  # 51.6666...
        # aero: 3 / 6 = 50, bike: 4 / 5 = 80 -> (50 + 80) / 2
        "category_mean": 65.0,
        "per_category": {"aero": 50.0, "bike": 80.0},
    },
    "0.05": {
        # pooled: (1 + 0 + 2) / 11
        "per_point": 300 / 11,  # 27.2727...
        # (25 + 0 + 40) / 3
        "per_image": 65 / 3,  # 21.6666...
        # aero: 1 / 6 = 16.666..., bike: 2 / 5 = 40 -> (100/6 + 40) / 2 = 28.333...
        "category_mean": (100 / 6 + 40) / 2,
        "per_category": {"aero": 100 / 6, "bike": 40.0},
    },
}


def _crafted_pairs():
    preds, gts = [], []
    for errors in CRAFTED_ERRORS:
        gt = [[10.0 * i, 20.0 + i] for i in range(len(errors))]
        p, g = _offset_points(gt, errors)
        preds.append(p)
        gts.append(g)
    return preds, gts


def test_crafted_example_functional():
    preds, gts = _crafted_pairs()
    result = pck(preds, gts, CRAFTED_THRESHOLDS, CRAFTED_CATEGORIES, ALPHAS)
    _assert_result_close(result, EXPECTED)
    # the three averages really differ
    for key in EXPECTED:
        vals = {round(result[key][k], 6) for k in ("per_point", "per_image", "category_mean")}
        assert len(vals) == 3


def test_crafted_example_summarize_from_counts():
    # counts written by hand from the comment above: columns are (0.05, 0.1)
    correct = torch.tensor([[1, 3], [0, 0], [2, 4]])
    num_points = torch.tensor([4, 2, 5])
    category_index = torch.tensor([0, 0, 1])
    result = summarize_pck(correct, num_points, category_index, ["aero", "bike"], ALPHAS)
    _assert_result_close(result, EXPECTED)
    assert all(isinstance(result[k][a], float) for k in result for a in ("per_point", "per_image", "category_mean"))


def test_crafted_example_metric():
    preds, gts = _crafted_pairs()
    metric = PCK(alphas=ALPHAS, categories=["aero", "bike", "cow"])
    metric.update(
        preds=preds[:2], gts=gts[:2], thresholds=torch.tensor(CRAFTED_THRESHOLDS[:2]),
        categories=CRAFTED_CATEGORIES[:2], pair_ids=CRAFTED_IDS[:2],
    )
    metric.update(
        preds=preds[2:], gts=gts[2:], thresholds=CRAFTED_THRESHOLDS[2:], categories=CRAFTED_CATEGORIES[2:],
        pair_ids=CRAFTED_IDS[2:],
    )
    out = metric.compute()
    assert out["num_pairs"] == 3
    assert out["num_points"] == 11
    _assert_result_close(out["pck"], EXPECTED)
    # "cow" has no points: omitted
    assert "cow" not in out["pck"]["0.1"]["per_category"]


# --------------------------------------------------------------------------------------------------
# strict inequality, validity
# --------------------------------------------------------------------------------------------------
def test_boundary_is_strict():
    # 3-4-5 triangle: error exactly 5.0; alpha 0.1 * threshold 50 = 5.0 -> NOT correct
    pred = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    gt = torch.tensor([[3.0, 4.0], [2.999, 4.0], [6.0, 8.0]])  # errors 5, <5, 10
    c = keypoint_correct(pred, gt, 50.0, [0.1, 0.2])
    assert c.dtype == torch.bool
    assert c.shape == (2, 3)
    # alpha 0.1 -> bound 5: [False, True, False]; alpha 0.2 -> bound 10: [True, True, False]
    assert c.tolist() == [[False, True, False], [True, True, False]]
    # same with a tensor threshold (float32) and a float64 input
    c2 = keypoint_correct(pred.double(), gt.double(), torch.tensor(50.0), torch.tensor([0.1, 0.2]))
    assert c2.tolist() == [[False, True, False], [True, True, False]]
    counts, n = pair_correct_counts(pred, gt, 50.0, [0.1, 0.2])
    assert counts.dtype == torch.long
    assert counts.tolist() == [1, 2]
    assert n == 3


def test_boundary_in_metric():
    # error exactly 10 = 0.1 * 100 -> wrong; error 9.5 -> right => 1 / 2 = 50 %
    metric = PCK(alphas=[0.1], categories=["a"])
    pred = torch.tensor([[10.0, 0.0], [9.5, 0.0]])
    gt = torch.zeros(2, 2)
    metric.update(preds=[pred], gts=[gt], thresholds=[100.0], categories=["a"], pair_ids=["p"])
    out = metric.compute()
    assert out["pck"]["0.1"]["per_point"] == 50.0


def test_invalid_points_ignored():
    pred = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    gt = torch.tensor([[1.0, 0.0], [100.0, 0.0], [2.0, 0.0], [0.0, 0.0]])  # errors 1, 100, 2, 0
    valid = torch.tensor([True, False, True, False])
    c = keypoint_correct(pred, gt, 100.0, [0.1], valid)  # bound 10
    # valid & error<10: [T, F(invalid), T, F(invalid even though error 0)]
    assert c.tolist() == [[True, False, True, False]]
    counts, n = pair_correct_counts(pred, gt, 100.0, [0.1], valid)
    assert counts.tolist() == [2]
    assert n == 2

    # pair 1: valid points 2/2 correct (100 %); pair 2: only invalid points -> excluded from per_image
    # pair 3 (cat "b"): 1 valid wrong point (0 %), the correct point is invalid
    preds = [pred, torch.zeros(2, 2), torch.zeros(2, 2)]
    gts = [gt, torch.zeros(2, 2), torch.tensor([[50.0, 0.0], [0.0, 0.0]])]
    valids = [valid, torch.tensor([False, False]), torch.tensor([True, False])]
    result = pck(preds, gts, [100.0, 100.0, 100.0], ["a", "a", "b"], [0.1], valids)["0.1"]
    assert result["per_point"] == pytest.approx(200 / 3)  # 2 correct of 3 valid points
    assert result["per_image"] == pytest.approx(50.0)  # (100 + 0) / 2, the empty pair excluded
    assert result["per_category"] == pytest.approx({"a": 100.0, "b": 0.0})
    assert result["category_mean"] == pytest.approx(50.0)

    metric = PCK(alphas=[0.1], categories=["a", "b"])
    metric.update(
        preds=preds, gts=gts, thresholds=torch.tensor([100.0, 100.0, 100.0]), categories=["a", "a", "b"],
        pair_ids=["1", "2", "3"], valids=valids,
    )
    out = metric.compute()
    assert out["num_pairs"] == 3
    assert out["num_points"] == 3
    assert out["pck"]["0.1"]["per_point"] == pytest.approx(200 / 3)
    assert out["pck"]["0.1"]["per_image"] == pytest.approx(50.0)


# --------------------------------------------------------------------------------------------------
# metric == functional twin, de-duplication, errors, reset, empty
# --------------------------------------------------------------------------------------------------
def _random_pairs(seed: int, num_pairs: int, categories: list[str]):
    g = torch.Generator().manual_seed(seed)
    preds, gts, thresholds, cats, valids, ids = [], [], [], [], [], []
    for i in range(num_pairs):
        n = int(torch.randint(0, 12, (1,), generator=g))
        gt = torch.rand(n, 2, generator=g) * 300
        preds.append(gt + torch.randn(n, 2, generator=g) * 15)
        gts.append(gt)
        thresholds.append(float(torch.randint(50, 300, (1,), generator=g)))
        cats.append(categories[int(torch.randint(0, len(categories), (1,), generator=g))])
        valids.append(torch.rand(n, generator=g) > 0.2)
        ids.append(f"{seed}-{i}:{cats[-1]}")
    return preds, gts, thresholds, cats, valids, ids


def test_metric_matches_functional_on_random_data():
    categories = ["aeroplane", "bicycle", "bird", "boat"]
    preds, gts, thr, cats, valids, ids = _random_pairs(0, 37, categories)
    alphas = [0.01, 0.05, 0.1, 0.15]
    metric = PCK(alphas=alphas, categories=categories)
    for start, stop in [(0, 5), (5, 6), (6, 20), (20, 37)]:
        metric.update(
            preds=preds[start:stop], gts=gts[start:stop], thresholds=torch.tensor(thr[start:stop]),
            categories=cats[start:stop], pair_ids=ids[start:stop], valids=valids[start:stop],
        )
    out = metric.compute()
    expected = pck(preds, gts, thr, cats, alphas, valids)
    _assert_result_close(out["pck"], expected)
    assert out["num_pairs"] == 37
    assert out["num_points"] == sum(int(v.sum()) for v in valids)
    # forward (batch value + accumulation) keeps the same global result
    metric2 = PCK(alphas=alphas, categories=categories)
    for start, stop in [(0, 20), (20, 37)]:
        metric2(preds=preds[start:stop], gts=gts[start:stop], thresholds=thr[start:stop], categories=cats[start:stop],
                pair_ids=ids[start:stop], valids=valids[start:stop])
    _assert_result_close(metric2.compute()["pck"], expected)


def test_duplicate_pair_ids_do_not_change_result():
    categories = ["cat", "dog"]
    preds, gts, thr, cats, valids, ids = _random_pairs(1, 10, categories)
    ref = PCK(alphas=[0.1], categories=categories)
    ref.update(preds=preds, gts=gts, thresholds=thr, categories=cats, pair_ids=ids, valids=valids)
    expected = ref.compute()

    # as a padded DistributedSampler would produce: the last batch repeats the first samples
    padded = PCK(alphas=[0.1], categories=categories)
    padded.update(
        preds=preds[:6], gts=gts[:6], thresholds=thr[:6], categories=cats[:6], pair_ids=ids[:6], valids=valids[:6],
    )
    order = [6, 7, 8, 9, 0, 1]
    padded.update(
        preds=[preds[i] for i in order], gts=[gts[i] for i in order], thresholds=[thr[i] for i in order],
        categories=[cats[i] for i in order], pair_ids=[ids[i] for i in order], valids=[valids[i] for i in order],
    )
    got = padded.compute()
    assert got["num_pairs"] == 10
    assert got["num_points"] == expected["num_points"]
    _assert_result_close(got["pck"], expected["pck"])


def test_duplicates_hand_computed():
    # pair "x": 1/1 correct (cat a); pair "y": 0/1 (cat a); "x" padded 3 more times.
    # Without de-duplication per_point would be 4/5 = 80; with it: 1/2 = 50.
    metric = PCK(alphas=[0.1], categories=["a"])
    good = (torch.zeros(1, 2), torch.zeros(1, 2))
    bad = (torch.tensor([[50.0, 0.0]]), torch.zeros(1, 2))
    metric.update(
        preds=[good[0], bad[0]], gts=[good[1], bad[1]], thresholds=[100.0, 100.0], categories=["a", "a"],
        pair_ids=["x", "y"],
    )
    metric.update(
        preds=[good[0]] * 3, gts=[good[1]] * 3, thresholds=[100.0] * 3, categories=["a"] * 3, pair_ids=["x"] * 3,
    )
    out = metric.compute()
    assert out["num_pairs"] == 2
    assert out["num_points"] == 2
    assert out["pck"]["0.1"]["per_point"] == 50.0
    assert out["pck"]["0.1"]["per_image"] == 50.0
    assert out["pck"]["0.1"]["category_mean"] == 50.0


def test_unknown_category_raises():
    metric = PCK(alphas=[0.1], categories=["cat", "dog"])
    with pytest.raises(ValueError) as excinfo:
        metric.update(
            preds=[torch.zeros(1, 2)], gts=[torch.zeros(1, 2)], thresholds=[10.0], categories=["horse"],
            pair_ids=["p"],
        )
    msg = str(excinfo.value)
    assert "horse" in msg and "cat" in msg and "dog" in msg


def test_length_mismatch_raises():
    metric = PCK(alphas=[0.1], categories=["cat"])
    with pytest.raises(ValueError):
        metric.update(
            preds=[torch.zeros(1, 2)], gts=[torch.zeros(1, 2)], thresholds=[10.0, 20.0], categories=["cat"],
            pair_ids=["p"],
        )


def test_format_alpha():
    assert format_alpha(0.1) == "0.1"
    assert format_alpha(0.05) == "0.05"
    assert format_alpha(0.15) == "0.15"
    assert format_alpha(0.01) == "0.01"
    assert format_alpha(1) == "1.0"
    assert format_alpha(torch.tensor(0.1)) == "0.1"  # float32 0.10000000149...
    assert format_alpha(torch.tensor(0.15, dtype=torch.float64)) == "0.15"
    metric = PCK(alphas=[0.01, 0.05, 0.1, 0.15], categories=["a"])
    metric.update(
        preds=[torch.zeros(1, 2)], gts=[torch.zeros(1, 2)], thresholds=[10.0], categories=["a"], pair_ids=["p"],
    )
    assert list(metric.compute()["pck"].keys()) == ["0.01", "0.05", "0.1", "0.15"]


def test_stable_pair_key():
    # hard-coded once: int.from_bytes(blake2b(id, digest_size=8).digest(), "little", signed=True)
    assert stable_pair_key("1-2007_000039-2007_000040:aeroplane") == 804811026150577663
    assert stable_pair_key("a") == 3405396810240292928
    assert stable_pair_key("") == -5426141060434712860
    assert stable_pair_key("a") != stable_pair_key("b")
    keys = {stable_pair_key(f"{i}-src-trg:cat") for i in range(1000)}
    assert len(keys) == 1000
    assert all(-(2**63) <= k < 2**63 for k in keys)

    # the same value in fresh interpreters with other hash seeds: see test_ddp_gloo_two_processes


def test_reset_clears_state():
    metric = PCK(alphas=[0.1], categories=["a"])
    metric.update(
        preds=[torch.zeros(2, 2)], gts=[torch.zeros(2, 2)], thresholds=[10.0], categories=["a"], pair_ids=["p"],
    )
    assert metric.compute()["num_pairs"] == 1
    metric.reset()
    assert metric.correct == [] and metric.num_points == [] and metric.pair_key == [] and metric.category_index == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics warns about compute() before update()
        out = metric.compute()
    assert out["num_pairs"] == 0 and out["num_points"] == 0
    # after reset a new, different pair is counted alone: error 50 >= 0.1 * 10 -> 0 %
    metric.update(
        preds=[torch.tensor([[50.0, 0.0]])], gts=[torch.zeros(1, 2)], thresholds=[10.0], categories=["a"],
        pair_ids=["q"],
    )
    out = metric.compute()
    assert out["num_pairs"] == 1
    assert out["pck"]["0.1"]["per_point"] == 0.0


def test_compute_without_update_is_nan():
    metric = PCK(alphas=[0.05, 0.1], categories=["a", "b"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = metric.compute()
    assert out["num_pairs"] == 0
    assert out["num_points"] == 0
    assert list(out["pck"].keys()) == ["0.05", "0.1"]
    for v in out["pck"].values():
        assert math.isnan(v["per_point"]) and math.isnan(v["per_image"]) and math.isnan(v["category_mean"])
        assert v["per_category"] == {}


def test_state_attributes_and_flags():
    metric = PCK(alphas=[0.1], categories=["a"])
    assert PCK.full_state_update is False
    assert PCK.higher_is_better is True
    metric.update(
        preds=[torch.zeros(3, 2)], gts=[torch.zeros(3, 2)], thresholds=[10.0], categories=["a"], pair_ids=["p"],
    )
    for name in ("correct", "num_points", "category_index", "pair_key"):
        state = getattr(metric, name)
        assert isinstance(state, list) and len(state) == 1
        assert state[0].dtype == torch.long
        assert state[0].device == metric.device


# --------------------------------------------------------------------------------------------------
# real 2-process gloo run (CPU): padding duplicates and a rank without data
# --------------------------------------------------------------------------------------------------
_DDP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import torch.distributed as dist
    from lightning_modules.metrics import PCK, stable_pair_key

    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    # 5 pairs, cat a: (correct, total) = (1,1), (0,1), (2,2), (0,2), (1,2) at alpha 0.1, thr 100
    def pair(k):
        errs = [[0], [50], [1, 2], [30, 40], [3, 60]][k]
        gt = torch.zeros(len(errs), 2)
        pred = gt.clone(); pred[:, 0] = torch.tensor(errs, dtype=torch.float32)
        return pred, gt
    results = {"key": stable_pair_key("a")}
    for mode in ("padded", "empty_rank"):
        if mode == "padded":
            # DistributedSampler over 5 samples on 2 ranks: rank0 [0, 2, 4], rank1 [1, 3, 0 (padding)]
            idx = [[0, 2, 4], [1, 3, 0]][rank]
        else:
            idx = [[0, 1, 2, 3, 4], []][rank]
        metric = PCK(alphas=[0.1], categories=["a"])
        if idx:
            ps = [pair(k) for k in idx]
            metric.update(preds=[p for p, _ in ps], gts=[g for _, g in ps], thresholds=[100.0] * len(idx),
                          categories=["a"] * len(idx), pair_ids=[f"pair{k}" for k in idx])
        results[mode] = metric.compute()
    dist.destroy_process_group()
    print("RESULT " + json.dumps(results))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gloo_two_processes(tmp_path):
    """Two real processes (gloo): padding duplicates de-duplicated; a rank without data; and
    stable_pair_key identical in fresh interpreters with different PYTHONHASHSEED."""
    script = tmp_path / "ddp_pck.py"
    script.write_text(_DDP_SCRIPT)
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "PYTHONHASHSEED": str(1234 + rank),
            "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        }
        procs.append(subprocess.Popen([sys.executable, str(script)], cwd=REPO_ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr
        line = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")][-1]
        results.append(json.loads(line[len("RESULT "):]))
    for res in results:
        assert res["key"] == 3405396810240292928  # hard-coded stable_pair_key("a")
        for mode in ("padded", "empty_rank"):
            _check_ddp_result(res[mode])


def _check_ddp_result(out: dict) -> None:
    # 5 unique pairs, 8 points, 4 correct -> per point 50 %
    # per image: (100 + 0 + 100 + 0 + 50) / 5 = 50 %, category mean (one category) = 50 %
    assert out["num_pairs"] == 5
    assert out["num_points"] == 8
    r = out["pck"]["0.1"]
    assert r["per_point"] == pytest.approx(50.0)
    assert r["per_image"] == pytest.approx(50.0)
    assert r["category_mean"] == pytest.approx(50.0)
    assert r["per_category"] == pytest.approx({"a": 50.0})


# --------------------------------------------------------------------------------------------------
# protocol extras: inclusive bound, weighted average, per-variation breakdown (hand-computed)
# --------------------------------------------------------------------------------------------------
def test_inclusive_bound_counts_the_boundary() -> None:
    pred, gt = torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 0.0]])  # error exactly 5 = 0.1 * 50
    assert not keypoint_correct(pred, gt, 50.0, [0.1])[0, 0]
    assert keypoint_correct(pred, gt, 50.0, [0.1], inclusive=True)[0, 0]
    metric = PCK([0.1], ["cat"], inclusive=True)
    metric.update(preds=[pred], gts=[gt], thresholds=[50.0], categories=["cat"], pair_ids=["p"])
    assert metric.compute()["pck"]["0.1"]["per_point"] == 100.0


def test_weighted_average_and_variation_breakdown_by_hand() -> None:
    # cat: pair a 1/2 correct (vp 0), pair b 2/2 (vp 2) -> cat per-point 3/4 = 75, 2 pairs
    # dog: pair c 0/4 (vp 0) -> dog 0, 1 pair
    ok, far = torch.tensor([[0.0, 0.0]]), torch.tensor([[100.0, 0.0]])
    preds = [torch.cat([ok, far]), torch.cat([ok, ok]), torch.cat([far] * 4)]
    gts = [torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(4, 2)]
    metric = PCK([0.1], ["cat", "dog"], groups=("viewpoint_variation", "occlusion"))
    metric.update(
        preds=preds, gts=gts, thresholds=[10.0] * 3, categories=["cat", "cat", "dog"], pair_ids=["a", "b", "c"],
        groups={"viewpoint_variation": [0, 2, 0]},
    )  # occlusion not given: unknown (-1)
    out = metric.compute()["pck"]["0.1"]
    assert out["category_mean"] == pytest.approx(37.5)
    assert out["weighted"] == pytest.approx((2 * 75 + 1 * 0) / 3)  # by pair counts: 50
    assert out["per_point"] == pytest.approx(300 / 8)
    vp = out["per_variation"]["viewpoint_variation"]
    assert vp["0"] == {"per_point": pytest.approx(100 / 6), "per_image": pytest.approx(25.0), "num_pairs": 2}
    assert vp["2"] == {"per_point": 100.0, "per_image": 100.0, "num_pairs": 1}
    assert out["per_variation"]["occlusion"] == {}


def test_metric_updates_take_keywords_only() -> None:
    """Every metric's update names its arguments (no positional None): a positional call is refused."""
    from lightning_modules.metrics import DenseFlowPCK
    from lightning_modules.segmentation_metrics import JAndF

    point = [torch.zeros(1, 2)]
    with pytest.raises(TypeError, match="positional"):
        PCK(alphas=[0.1], categories=["a"]).update(point, point, [10.0], ["a"], ["p"])
    flow = DenseFlowPCK(alphas=[0.05], datasets=["d"])
    with pytest.raises(TypeError, match="positional"):
        flow.update([torch.zeros(2, 2, 2)], [torch.zeros(2, 2, 2)], [torch.ones(2, 2, dtype=torch.bool)], [4.0], ["d"],
                    ["p"])
    flow.update(flows=[torch.zeros(2, 2, 2)], flows_gt=[torch.zeros(2, 2, 2)], masks=[torch.ones(2, 2, dtype=torch.bool)],
                thresholds=[4.0], datasets=["d"], pair_ids=["p"])
    assert flow.compute()["num_pixels"] == 4 and not isinstance(flow, PCK)
    with pytest.raises(TypeError, match="positional"):
        JAndF(sequences=["s"]).update([torch.ones(2, 2)], [torch.ones(2, 2)], ["s"], ["s/1"], [1])


def test_dense_counts_go_through_update_so_compute_sees_them() -> None:
    """A run scores TSS images itself and passes their counts (``update_counts``): torchmetrics must see an update
    (no "compute before update" warning) and a second batch must not get the first compute's cached answer."""
    import warnings

    from lightning_modules.metrics import DenseFlowPCK, dense_flow_counts

    flow = DenseFlowPCK(alphas=[0.05], datasets=["d"])
    mask = torch.ones(2, 2, dtype=torch.bool)
    right, wrong = torch.zeros(2, 2, 2), torch.full((2, 2, 2), 9.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flow.update_counts(counts=[dense_flow_counts(right, right, mask, 4.0, [0.05], True)], datasets=["d"],
                           pair_ids=["a"])
        first = flow.compute()["pck"]["0.05"]["dataset_mean"]
        flow.update_counts(counts=[dense_flow_counts(wrong, right, mask, 4.0, [0.05], True)], datasets=["d"],
                           pair_ids=["b"])
        second = flow.compute()["pck"]["0.05"]["dataset_mean"]
    assert (first, second) == (100.0, 50.0)
    with pytest.raises(ValueError, match="flows, flows_gt, masks and thresholds, or counts"):
        flow.update(datasets=["d"], pair_ids=["c"], flows=[right])


def test_one_correctness_rule_for_scores_pictures_and_per_point_thresholds() -> None:
    """PCK correctness has one implementation (``components.pck.keypoint_correct``): the metric, the functional
    twin and the pictures' outcome agree point for point, on exact boundaries too, and a per-point threshold
    (several pairs at once, as ``PCK.update`` passes them) equals one call per pair."""
    from lightning_modules.components.pck import keypoint_correct as core_rule
    from lightning_modules.components.visualize import keypoints_correct as picture_rule
    from lightning_modules.metrics import keypoint_correct as metric_rule

    assert metric_rule is core_rule
    gen = torch.Generator().manual_seed(3)
    gt = torch.rand(12, 2, generator=gen, dtype=torch.float64) * 100
    pred = gt + torch.randn(12, 2, generator=gen, dtype=torch.float64) * 8
    gt[0] = torch.tensor([10.0, 20.0], dtype=torch.float64)
    pred[0] = torch.tensor([16.0, 28.0], dtype=torch.float64)  # error exactly 10 = 0.1 * 100
    pred[1, 0] = float("nan")
    thresholds = torch.tensor([100.0] * 6 + [50.0] * 6, dtype=torch.float64)
    for inclusive in (False, True):
        joint = core_rule(pred, gt, thresholds, [0.05, 0.1, 0.15], inclusive=inclusive)
        for pair in (slice(0, 6), slice(6, 12)):
            alone = core_rule(pred[pair], gt[pair], float(thresholds[pair][0]), [0.05, 0.1, 0.15], inclusive=inclusive)
            assert torch.equal(joint[:, pair], alone)
            for row, alpha in enumerate((0.05, 0.1, 0.15)):
                picture = picture_rule(pred[pair].numpy(), gt[pair].numpy(), float(thresholds[pair][0]), alpha,
                                       inclusive=inclusive)
                assert picture.tolist() == alone[row].tolist()
        assert bool(joint[1, 0]) is inclusive and not joint[:, 1].any()  # the boundary; NaN is never correct
    metric = PCK(alphas=(0.05, 0.1, 0.15), categories=["a", "b"])
    metric.update(preds=[pred[:6], pred[6:]], gts=[gt[:6], gt[6:]], thresholds=[100.0, 50.0], categories=["a", "b"],
                  pair_ids=["p0", "p1"])
    counts = core_rule(pred, gt, thresholds, [0.05, 0.1, 0.15]).sum(dim=1)
    result = metric.compute()["pck"]
    for row, key in enumerate(("0.05", "0.1", "0.15")):
        assert result[key]["per_point"] == pytest.approx(100.0 * float(counts[row]) / 12)
    with pytest.raises(ValueError, match=r"`threshold` must be a number or have shape \[12\]"):
        core_rule(pred, gt, thresholds[:5], [0.1])
