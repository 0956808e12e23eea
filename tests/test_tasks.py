import pytest
import torch
from torch import nn

from ppap import Classification, NoisyInputGuidance, PPAPError
from ppap.tasks import DenseRegression, Segmentation, make_task


def test_classification_kd_is_kl_to_the_sharpened_teacher():
    task = Classification(4, tau=0.5)
    teacher, student = torch.randn(3, 4), torch.randn(3, 4)
    p = (teacher / 0.5).softmax(-1)
    expected = (p * (p.log() - student.log_softmax(-1))).sum(-1)
    assert torch.allclose(task.distill_loss(student, teacher), expected, atol=1e-6)
    assert torch.allclose(task.distill_loss(teacher / 0.5, teacher), torch.zeros(3), atol=1e-6)  # zero at the target
    assert torch.allclose(task.log_likelihood(student, torch.tensor([0, 1, 3])), student.log_softmax(-1)[[0, 1, 2], [0, 1, 3]])


def test_segmentation_losses():
    task = Segmentation(3, tau=1.0)
    logits = torch.randn(2, 3, 4, 4)
    target = logits.argmax(1)
    ll = task.log_likelihood(logits, target)
    assert ll.shape == (2,) and torch.allclose(ll, logits.log_softmax(1).gather(1, target[:, None]).squeeze(1).mean((1, 2)))
    assert torch.allclose(task.distill_loss(logits, logits), torch.zeros(2), atol=1e-6)
    assert (task.distill_loss(torch.randn(2, 3, 4, 4), logits) > 0).all()


def test_dense_losses():
    out, target = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    assert torch.allclose(DenseRegression("l1").log_likelihood(out, target), -(out - target).abs().mean((1, 2, 3)))
    assert torch.allclose(DenseRegression("l2").distill_loss(out, target), (out - target).square().mean((1, 2, 3)))
    with pytest.raises(PPAPError, match="unknown distance 'l3'"):
        DenseRegression("l3")


@pytest.mark.parametrize(
    "task,target,shape,message",
    [
        (Classification(10), torch.tensor([3, 10]), (2, 10), "class index 10 is out of range"),
        (Classification(10), torch.tensor([0.5]), (1, 10), "one integer per sample"),
        (Classification(5), torch.tensor([1]), (1, 10), "needs model output \\[B, 5\\]"),
        (Segmentation(3), torch.zeros(2, 8, 8, dtype=torch.long), (2, 3, 4, 4), "label map \\[B, 4, 4\\]"),
        (Segmentation(3), torch.full((1, 4, 4), 3), (1, 3, 4, 4), "label 3 in the target map is out of range"),
        (Segmentation(3), torch.zeros(1, 4, 4, dtype=torch.long), (1, 5, 4, 4), "needs model output \\[B, 3, H, W\\]"),
        (DenseRegression(), torch.zeros(1, 2, 4, 4), (1, 1, 4, 4), "float \\[B, 1, 4, 4\\]"),
        (DenseRegression(), torch.zeros(1, 1, 4, 4), (1, 10), "needs model output \\[B, C, H, W\\]"),
    ],
)
def test_target_mismatches_are_one_line_errors(task, target, shape, message):
    with pytest.raises(PPAPError, match=message):
        task.check_target(target, shape)


def test_unknown_task():
    with pytest.raises(PPAPError, match="unknown task 'depth'; valid: classification, dense, segmentation"):
        make_task("depth")


def test_normalized_guide_has_unit_rms_times_scale():
    from ppap.guidance import NormalizedGuidance

    torch.manual_seed(0)
    clf = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    inner = NoisyInputGuidance(lambda v, t: clf(v), Classification(10), torch.tensor([1, 2, 3]), scale=123.0)
    x = torch.randn(3, 1, 8, 8)
    g = NormalizedGuidance(inner, scale=0.5)(x, torch.zeros(3, dtype=torch.long), None)
    assert torch.allclose(g.flatten(1).square().mean(1).sqrt(), torch.full((3,), 0.5), atol=1e-5)
    raw = inner(x, torch.zeros(3, dtype=torch.long), None)
    assert torch.allclose(torch.nn.functional.cosine_similarity(g.flatten(1), raw.flatten(1)), torch.ones(3), atol=1e-5)
