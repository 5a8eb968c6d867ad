"""The training dataset that runs its random transforms without metadata tracking."""

import torch
from monai.data import CacheDataset, DataLoader, MetaTensor, get_track_meta
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandSpatialCropd,
)

from custom.data.untracked import UntrackedCacheDataset


def items(n: int = 4) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [
        {"image": torch.rand(12, 10, generator=generator), "label": torch.randint(0, 3, (12, 10), generator=generator)}
        for _ in range(n)
    ]


def transform() -> Compose:
    keys = ["image", "label"]
    return Compose(
        [
            EnsureChannelFirstd(keys, channel_dim="no_channel"),
            RandSpatialCropd(keys, roi_size=(8, 8), random_size=False),
            RandFlipd(keys, prob=0.5, spatial_axis=0),
            RandRotate90d(keys, prob=0.5),
            RandScaleIntensityd("image", factors=0.2, prob=0.5),
        ]
    )


def batches(dataset_type, **kwargs) -> list[dict]:
    dataset = dataset_type(items(), transform().set_random_state(seed=3), cache_rate=1.0, progress=False, **kwargs)
    loader = DataLoader(dataset, batch_size=2, shuffle=False, num_workers=0, generator=torch.Generator().manual_seed(5))
    return [batch for _ in range(3) for batch in loader]  # three epochs: the random state moves on


def test_the_same_random_draws_give_the_same_values_as_plain_tensors():
    tracked, untracked = batches(CacheDataset), batches(UntrackedCacheDataset)
    assert isinstance(tracked[0]["image"], MetaTensor)
    for a, b in zip(tracked, untracked, strict=True):
        for key in ("image", "label"):
            assert type(b[key]) is torch.Tensor  # no metadata: nothing downstream of training crops reads it
            assert torch.equal(a[key].as_tensor(), b[key])
    assert get_track_meta()  # switched back on for everything else (validation, inference)


def test_items_transformed_from_scratch_keep_their_metadata():
    # with a runtime cache the deterministic transforms run inside __getitem__: they need the metadata
    (batch, *_) = batches(UntrackedCacheDataset, runtime_cache=True)
    assert isinstance(batch["image"], MetaTensor)
