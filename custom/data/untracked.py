"""A training CacheDataset whose random transforms run without MONAI's metadata tracking.

Training patches need no metadata once the cached, deterministic part (loading, orientation, spacing,
normalisation, teacher targets) has run: nothing downstream of the random crops, flips and intensity
changes reads an affine or a transform history. Tracking them is most of those transforms' cost on a CPU
(every flip of the image, the label and each teacher target appends to its history and deep-copies
metadata). Switched off, the same transforms draw the same random numbers and give the same values, as
plain tensors.
"""

from __future__ import annotations

from monai.data import CacheDataset, get_track_meta, set_track_meta


class UntrackedCacheDataset(CacheDataset):
    """``CacheDataset`` whose items go through the random transforms with ``set_track_meta(False)``.

    Only when every item was cached up front (``cache_rate=1``, no runtime cache): an item transformed
    from scratch needs its metadata for the deterministic transforms, so it is tracked as usual.
    """

    def _transform(self, index: int):
        if self.runtime_cache or self.cache_num < len(self.data):
            return super()._transform(index)
        tracking = get_track_meta()
        set_track_meta(False)
        try:
            return super()._transform(index)
        finally:
            set_track_meta(tracking)
