import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from ppap.images import load_reference_image, to_hwc_uint8, uint8_to_unit, unit_to_uint8


def test_every_8_bit_level_survives_the_round_trip_through_unit_range():
    levels = torch.arange(256, dtype=torch.uint8)
    unit = uint8_to_unit(levels)
    assert unit.dtype == torch.float32 and unit[0] == -1 and unit[-1] == 1
    assert torch.equal(unit_to_uint8(unit), levels)


def test_conversions_match_diffusers_image_processor():
    """ppap's [-1, 1] <-> uint8 is diffusers' own: ``VaeImageProcessor``'s pil_to_numpy + normalize
    on the way in, denormalize (which clamps) + numpy_to_pil's rounding on the way out."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 16, 16, generator=g) * 3 - 1.5  # values outside [-1, 1] too: both clamp
    theirs = np.stack(
        [np.asarray(im) for im in VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(VaeImageProcessor.denormalize(x)))]
    )
    assert np.array_equal(to_hwc_uint8(x), theirs)

    pixels = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8, generator=g).numpy()
    images = [Image.fromarray(p) for p in pixels]
    theirs_in = VaeImageProcessor.normalize(VaeImageProcessor.numpy_to_pt(VaeImageProcessor.pil_to_numpy(images)))
    ours_in = uint8_to_unit(torch.from_numpy(pixels).permute(0, 3, 1, 2))
    assert torch.allclose(ours_in, theirs_in, atol=1e-6, rtol=0)


def test_a_reference_image_of_the_models_size_reads_as_diffusers_preprocess_reads_it(tmp_path):
    pixels = torch.randint(0, 256, (8, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)).numpy()
    Image.fromarray(pixels).save(tmp_path / "ref.png")
    ours = load_reference_image(tmp_path / "ref.png", (3, 8, 8))
    theirs = VaeImageProcessor(do_resize=False).preprocess(Image.open(tmp_path / "ref.png"))
    assert ours.shape == theirs.shape == (1, 3, 8, 8)
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)
