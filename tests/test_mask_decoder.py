"""The token-side mask decoder gives what Segment Anything's own ``MaskDecoder`` gives, prompt by prompt."""

import numpy as np
import pytest
import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

from custom.data.phantoms import PhantomConfig, make_case
from custom.teachers.mask_decoder import decode_masks


def _official(decoder, prompt_encoder, embeddings, image_index, boxes=None, points=None):
    """Each prompt alone through the official forward: ``(P, 1, 4h, 4w)`` logits and fusion tokens."""
    fusion = []
    hook = decoder.transformer.register_forward_hook(lambda m, a, out: fusion.append(out[1]))
    masks = []
    for p, i in enumerate(image_index.tolist()):
        sparse, dense = prompt_encoder(
            points=None if points is None else (points[0][p : p + 1], points[1][p : p + 1]),
            boxes=None if boxes is None else boxes[p : p + 1],
            masks=None,
        )
        low_res, _ = decoder(
            image_embeddings=embeddings[i : i + 1],
            image_pe=prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        masks.append(low_res)
    hook.remove()
    return torch.cat(masks), torch.cat(fusion)


def _check(decoder, prompt_encoder, embeddings, image_index, boxes=None, points=None):
    with torch.inference_mode():
        want_masks, want_fusion = _official(decoder, prompt_encoder, embeddings, image_index, boxes, points)
        sparse, dense = prompt_encoder(points=points, boxes=boxes, masks=None)
        masks, fusion = decode_masks(decoder, embeddings, prompt_encoder.get_dense_pe(), sparse, dense, image_index)
    assert masks.shape == want_masks.shape and fusion.shape == want_fusion.shape
    scale = want_masks.abs().max()
    assert (masks - want_masks).abs().max() < 1e-5 * scale + 1e-5
    assert torch.allclose(fusion, want_fusion, atol=1e-4, rtol=1e-4)
    assert ((masks > 0) == (want_masks > 0)).float().mean() > 0.9999


def test_litemedsam_decoder_matches_the_official_forward_on_a_real_embedding(lite_teacher):
    image, _ = make_case(PhantomConfig(shape=(96, 96)).resolved(), np.random.default_rng([3, 0]))
    images = torch.from_numpy(image)[None, None].repeat(2, 1, 1, 1)
    images[1] = images[1].flip(-1)
    embeddings = lite_teacher.encode(images)["embedding"]
    boxes = torch.tensor([[40.0, 50, 200, 210], [100, 90, 150, 160], [30, 40, 220, 200]])
    _check(
        lite_teacher.model.mask_decoder, lite_teacher.model.prompt_encoder, embeddings, torch.tensor([0, 0, 1]), boxes
    )


def test_sam_vit_b_decoder_matches_with_boxes_and_points():
    """SAM ViT-B's decoder geometry (1024 input, 64x64 embedding), random weights, box + point prompts."""
    torch.manual_seed(0)
    prompt_encoder = PromptEncoder(
        embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=16
    ).eval()
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256,
    ).eval()
    embeddings = torch.randn(3, 256, 64, 64)
    boxes = torch.tensor([[100.0, 120, 600, 700], [10, 10, 1000, 900], [300, 300, 400, 420], [0, 0, 50, 60]])
    points = (torch.tensor([[[350.0, 400]], [[500, 500]], [[350, 360]], [[20, 30]]]), torch.ones(4, 1))
    _check(decoder, prompt_encoder, embeddings, torch.tensor([2, 0, 0, 1]), boxes, points)


def test_a_mask_prompt_is_refused(lite_teacher):
    model = lite_teacher.model
    sparse, _ = model.prompt_encoder(points=None, boxes=torch.tensor([[0.0, 0, 9, 9], [1, 1, 8, 8]]), masks=None)
    dense = torch.randn(2, 256, 64, 64)
    with pytest.raises(ValueError, match="same dense prompt"):
        decode_masks(
            model.mask_decoder,
            torch.randn(1, 256, 64, 64),
            model.prompt_encoder.get_dense_pe(),
            sparse,
            dense,
            torch.tensor([0, 0]),
        )


def test_component_prompts_share_one_decoder_call_and_unite_per_class(lite_teacher):
    """Every (image, class, component) prompt of a batch goes through the decoder in one call; a class's
    mask is the elementwise maximum of its components' masks and its fusion features their mean, each
    component's mask being what it gives as a prompt on its own."""
    from custom.teachers.prompts import Prompts

    image, _ = make_case(PhantomConfig(shape=(64, 64)).resolved(), np.random.default_rng([5, 0]))
    images = torch.from_numpy(image)[None, None].repeat(2, 1, 1, 1)
    images[1] = images[1].flip(-2)
    embedding = lite_teacher.encode(images)["embedding"]
    components = torch.tensor(
        [[[True, True, False], [True, False, False]], [[False, False, False], [True, True, True]]]
    )
    boxes = torch.zeros(2, 2, 3, 4)
    boxes[0, 0, 0], boxes[0, 0, 1], boxes[0, 1, 0] = torch.tensor(
        [[4.0, 4, 20, 22], [36, 30, 60, 58], [10, 40, 30, 60]]
    )
    boxes[1, 1] = torch.tensor([[2.0, 2, 12, 14], [20, 20, 40, 44], [44, 6, 60, 30]])
    prompts = Prompts(components.any(-1), boxes, components=components)
    calls = []
    hook = lite_teacher.model.mask_decoder.output_upscaling.register_forward_hook(
        lambda m, args, out: calls.append(args[0].shape[0])
    )
    try:
        masks, fusion = lite_teacher.decode(embedding, prompts, (64, 64))
    finally:
        hook.remove()
    assert calls == [6]  # six prompts, one call
    # each component alone, as a one-prompt-per-class layout
    slots = torch.nonzero(components)
    alone = Prompts(torch.ones(len(slots), 1, dtype=torch.bool), boxes[slots[:, 0], slots[:, 1], slots[:, 2]][:, None])
    single, single_fusion = lite_teacher.decode(embedding[slots[:, 0]], alone, (64, 64))
    for i in range(2):
        for k in range(2):
            mine = (slots[:, 0] == i) & (slots[:, 1] == k)
            if not mine.any():
                assert masks[i, k].max() == 0 and fusion[i, k].abs().max() == 0
                continue
            assert torch.allclose(masks[i, k], single[mine, 0].amax(0), atol=1e-5)
            assert torch.allclose(fusion[i, k], single_fusion[mine, 0].mean(0), atol=1e-4)
