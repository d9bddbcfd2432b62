"""Batched augmentation: each transform against a per-image reference."""

import pytest
import torch
import torch.nn.functional as F

from losslab.data.augment import BatchAugment, cutout, random_crop, random_horizontal_flip
from losslab.errors import ConfigError


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def images():
    return torch.randint(0, 256, (16, 3, 10, 12), generator=generator(1), dtype=torch.uint8)


def test_random_crop_is_a_shifted_window_of_the_zero_padded_image(images):
    cropped = random_crop(images, 3, generator(0))
    padded = F.pad(images, (3, 3, 3, 3))
    for original, out in zip(padded, cropped):
        windows = [
            (dy, dx) for dy in range(7) for dx in range(7) if torch.equal(original[:, dy : dy + 10, dx : dx + 12], out)
        ]
        assert windows, "each crop must be one window of the padded image"


def test_random_crop_draws_different_offsets_and_zero_padding_is_identity(images):
    assert torch.equal(random_crop(images, 0, generator()), images)
    cropped = random_crop(images, 4, generator())
    assert len({tuple(c.flatten()[:50].tolist()) for c in cropped}) > 1


def test_flip_flips_about_half_the_images_horizontally(images):
    flipped = random_horizontal_flip(images, generator())
    same = [torch.equal(a, b) for a, b in zip(flipped, images)]
    mirrored = [torch.equal(a, b.flip(-1)) for a, b in zip(flipped, images)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert 0 < sum(mirrored) < len(images)


def test_cutout_zeroes_one_square_per_image_clipped_at_borders():
    ones = torch.ones(32, 1, 9, 9)
    out = cutout(ones, 4, generator())
    for image in out:
        rows, cols = torch.nonzero(image[0] == 0, as_tuple=True)
        assert 1 <= len(rows) <= 16
        assert rows.max() - rows.min() < 4 and cols.max() - cols.min() < 4
        assert len(rows) == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)


def test_same_seed_same_augmentation(images):
    augment = BatchAugment(crop_padding=2, horizontal_flip=True, cutout_size=3)
    assert torch.equal(augment.geometric(images, generator(7)), augment.geometric(images, generator(7)))
    assert not torch.equal(augment.geometric(images, generator(7)), augment.geometric(images, generator(8)))


@pytest.mark.parametrize("field", ["crop_padding", "cutout_size"])
def test_negative_sizes_are_rejected_with_the_option_name(field):
    with pytest.raises(ConfigError, match=f"dataset.augment.{field}"):
        BatchAugment(**{field: -1})
