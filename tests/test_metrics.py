"""SegMetrics against torchmetrics (an independent implementation), by hand, and under torch.distributed."""
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassJaccardIndex

from ccl_bench.metrics import SegMetrics, StudentMetrics, ensemble_probs

C, IGNORE = 7, 255


def random_batch(seed, n=3, h=9, w=11, absent=(5,)):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, C, (n, h, w), generator=g)
    logits = torch.randn(n, C, h, w, generator=g)
    for c in absent:  # a class that occurs in neither ground truth nor prediction
        target[target == c] = 0
        logits[:, c] = -1e4
    target[torch.rand(n, h, w, generator=g) < 0.2] = IGNORE
    return logits, target


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_torchmetrics(seed):
    batches = [random_batch(seed * 10 + k) for k in range(3)]
    ours = SegMetrics(C, IGNORE)
    jac = MulticlassJaccardIndex(C, average="none", ignore_index=IGNORE)
    cm = MulticlassConfusionMatrix(C, ignore_index=IGNORE)
    acc = MulticlassAccuracy(C, average="micro", ignore_index=IGNORE)
    for logits, target in batches:
        ours.update(logits, target)
        for metric in (jac, cm, acc):
            metric.update(logits, target)
    out = ours.compute()
    torch.testing.assert_close(out["confusion"], cm.compute().long())
    present = out["present"]
    assert present.tolist() == [c != 5 for c in range(C)]
    ref_iou = jac.compute()
    torch.testing.assert_close(out["iou"][present], ref_iou[present])
    assert math.isnan(out["iou"][5])
    torch.testing.assert_close(torch.tensor(out["miou"]), ref_iou[present].mean())
    torch.testing.assert_close(torch.tensor(out["pixel_acc"]), acc.compute())


def test_hand_computed_example():
    target = torch.tensor([[0, 0, 1, 1, 2, IGNORE]])
    pred = torch.tensor([[0, 1, 1, 1, 1, 3]])  # class 3 only predicted at an ignored pixel: not counted
    m = SegMetrics(4)
    m.update(pred, target)
    out = m.compute()
    # class 0: TP 1, FN 1 -> 1/2; class 1: TP 2, FP 2 -> 2/4; class 2: FN 1 -> 0; class 3 absent -> NaN
    torch.testing.assert_close(out["iou"][:3], torch.tensor([0.5, 0.5, 0.0]))
    assert math.isnan(out["iou"][3]) and out["present"].tolist() == [True, True, True, False]
    assert out["miou"] == pytest.approx(1 / 3)
    assert out["pixel_acc"] == pytest.approx(3 / 5)


def test_logits_and_labels_agree_and_reset():
    logits, target = random_batch(7)
    a, b = SegMetrics(C), SegMetrics(C)
    a.update(logits, target)
    b.update(logits.argmax(1), target)
    torch.testing.assert_close(a.compute()["confusion"], b.compute()["confusion"])
    assert a.compute()["confusion"].sum() == (target != IGNORE).sum()  # compute() is repeatable
    a.reset()
    assert a.compute()["confusion"].sum() == 0 and math.isnan(a.compute()["miou"])


def test_ensemble_is_mean_of_probabilities():
    la, target = random_batch(3, absent=())
    lb = torch.randn_like(la)
    meters = StudentMetrics(C)
    meters.update([la, lb], target)
    out = meters.compute()
    ref = SegMetrics(C)
    ref.update((la.softmax(1) + lb.softmax(1)).argmax(1), target)
    torch.testing.assert_close(out["ensemble"]["confusion"], ref.compute()["confusion"])
    single = SegMetrics(C)
    single.update(lb, target)
    torch.testing.assert_close(out["b"]["confusion"], single.compute()["confusion"])
    torch.testing.assert_close(ensemble_probs(la, lb).sum(1), torch.ones(target.shape))


def test_bad_inputs():
    m = SegMetrics(C)
    with pytest.raises(ValueError, match=r"\[9\]"):
        m.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([[[0, 9], [1, IGNORE]]]))
    with pytest.raises(ValueError, match="does not match"):
        m.update(torch.randn(1, C, 4, 4), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="ignore_index=3"):
        SegMetrics(C, ignore_index=3)


def _rank(rank, world, tmp, batches):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)
    m = SegMetrics(C)
    for logits, target in batches[rank::world]:
        m.update(logits, target)
    torch.save(m.compute()["confusion"], f"{tmp}/rank{rank}.pt")
    dist.destroy_process_group()


def test_confusion_summed_across_ranks(tmp_path):
    batches = [random_batch(k) for k in range(4)]
    mp.start_processes(_rank, args=(2, str(tmp_path), batches), nprocs=2, join=True, start_method="fork")
    whole = SegMetrics(C)
    for logits, target in batches:
        whole.update(logits, target)
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"rank{rank}.pt"), whole.compute()["confusion"])
