import pytest
import torch

from ppap import PPAPError, TimestepRouter


def test_uniform_split_matches_official_ranges():
    r = TimestepRouter.uniform(5, 1000)
    assert r.boundaries == (0, 200, 400, 600, 800, 1000)
    assert [r.interval(i) for i in range(5)] == [(0, 200), (200, 400), (400, 600), (600, 800), (800, 1000)]


def test_routing_is_half_open_and_covers_every_timestep():
    r = TimestepRouter.uniform(5, 1000)
    t = torch.arange(1000)
    ids = r(t)
    assert torch.equal(ids, t // 200)
    # the boundary timestep belongs to the expert that trained on it (unlike the official code)
    assert r(torch.tensor([199, 200, 399, 400, 999])).tolist() == [0, 1, 1, 2, 4]


def test_custom_ranges_and_parse():
    r = TimestepRouter.parse("0-100,100-500,500-1000", 1000)
    assert r.boundaries == (0, 100, 500, 1000)
    assert r(torch.tensor([0, 99, 100, 499, 500, 999])).tolist() == [0, 0, 1, 1, 2, 2]
    assert TimestepRouter.parse("3", 10).boundaries == (0, 3, 6, 10)


@pytest.mark.parametrize(
    "spec,message",
    [
        ("0-200,300-1000", "gap between timestep ranges \\[0, 200\\) and \\[300, 1000\\): timesteps 200..299"),
        ("0-500,400-1000", "overlap"),
        ("0-500,500-1200", "\\[500, 1200\\) is empty or outside"),
        ("100-1000", "timesteps 0..99 have no expert"),
        ("0-500", "timesteps 500..999 have no expert"),
        ("0-300,300-300,300-1000", "\\[300, 300\\) is empty"),
        ("a-b", "bad expert ranges"),
        ("0", "number of experts 0"),
    ],
)
def test_bad_ranges_are_clear_errors(spec, message):
    with pytest.raises(PPAPError, match=message):
        TimestepRouter.parse(spec, 1000)


def test_bad_boundaries_and_timesteps():
    with pytest.raises(PPAPError, match="start at timestep 0"):
        TimestepRouter((10, 1000))
    with pytest.raises(PPAPError, match="increase strictly"):
        TimestepRouter((0, 500, 500, 1000))
    r = TimestepRouter.uniform(2, 100)
    with pytest.raises(PPAPError, match="timestep 100 is outside"):
        r(torch.tensor([5, 100]))
    with pytest.raises(PPAPError, match="expert 2 does not exist"):
        r.interval(2)


def test_one_range_check_for_routers_and_guidance_intervals():
    """``check_timestep_range`` is the check behind a router's ranges and a guidance term's
    interval: a non-empty half-open range of integer timesteps, within [0, T) when T is known."""
    from ppap.router import check_timestep_range

    assert check_timestep_range(0, 1000, 1000) == (0, 1000) and check_timestep_range(3, 7) == (3, 7)
    for args, message in [
        ((5, 5, 1000), r"timestep range \[5, 5\) is empty or outside \[0, 1000\)"),
        ((900, 1001, 1000), r"\[900, 1001\) is empty or outside"),
        ((-1, 5), r"\[-1, 5\) is empty or starts below 0"),
        ((0.5, 5), r"\(0.5, 5\) must be two integer timesteps"),
        ((True, 5), "must be two integer timesteps"),
    ]:
        with pytest.raises(PPAPError, match=message):
            check_timestep_range(*args)
