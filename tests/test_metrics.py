import copy

import pytest
import torch

from ppap.metrics import fid, kid, precision_recall


def test_fid_of_gaussians_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 4, generator=g, dtype=torch.float64)
    b = torch.randn(20000, 4, generator=g, dtype=torch.float64) * 2 + 1  # mu = 1, sigma = 2 per dim
    # |mu|^2 + Tr(I + 4I - 2 * 2I) = 4 + 4 * (1 + 4 - 4) = 8
    assert fid(a, b) == pytest.approx(8.0, abs=0.3)
    assert fid(a, a) == pytest.approx(0.0, abs=1e-6)


def test_kid_and_precision_recall_separate_same_from_different():
    g = torch.Generator().manual_seed(1)
    a, a2 = torch.randn(600, 8, generator=g, dtype=torch.float64), torch.randn(600, 8, generator=g, dtype=torch.float64)
    far = a2 + 5
    assert abs(kid(a, a2, subsets=5, subset_size=300)) < 0.05 < kid(a, far, subsets=5, subset_size=300)
    p, r = precision_recall(a, a2)
    assert p > 0.8 and r > 0.8
    assert precision_recall(a, far) == (0.0, 0.0)


def test_accuracy_under_noise_routes_t_and_degrades_with_noise():
    from diffusers import DDPMScheduler

    from ppap import NoiseSchedule
    from ppap.metrics import accuracy_under_noise

    schedule = NoiseSchedule.from_diffusers(DDPMScheduler(num_train_timesteps=1000))
    x = torch.linspace(-1, 1, 200).view(200, 1, 1, 1).expand(200, 1, 4, 4).contiguous()
    y = (x[:, 0, 0, 0] > 0).long()
    seen = []

    def model(v, t):  # an oracle on the mean intensity, which records the timesteps it is given
        seen.append(int(t[0]))
        m = v.mean((1, 2, 3))
        return torch.stack([-m, m], 1)

    acc = accuracy_under_noise(model, schedule, x, y, [0, 999])
    assert acc[0] == 1.0 and acc[999] < 0.8
    assert seen == [0, 999]


def test_predict_and_features_run_in_eval_mode_and_hand_the_net_back_in_its_mode():
    from torch import nn

    from ppap.metrics import features, predict

    class Net(nn.Sequential):
        def features(self, x):
            return self(x)

    torch.manual_seed(0)
    net = Net(nn.Flatten(), nn.Linear(4, 8), nn.Dropout(0.5), nn.BatchNorm1d(8))
    net.train()
    net[1].eval()  # a mixed mode: each submodule must come back as it was
    x = torch.randn(6, 1, 2, 2)
    with torch.no_grad():
        expected = copy.deepcopy(net).eval()(x)
    assert torch.equal(predict(net, x), expected)  # dropout off, running statistics used
    assert torch.equal(features(net, x), expected.double())
    assert [m.training for m in net.modules()] == [True, True, False, True, True]
    assert int(net[3].num_batches_tracked) == 0  # eval mode: the running statistics were not updated
