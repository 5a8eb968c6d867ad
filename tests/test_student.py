import pytest
import torch

from custom.networks.student import FEATURE_NAMES, UnCoLStudent, sincos_position_embedding

TINY = {"hidden_size": 48, "mlp_dim": 96, "num_heads": 2, "feature_size": 8}


@pytest.mark.parametrize(
    "spatial_dims, shape",
    [(2, (32, 32)), (2, (48, 80)), (3, (32, 32, 16)), (3, (16, 48, 32))],
)
def test_forward_shape_for_any_multiple_of_the_patch_size(spatial_dims, shape):
    net = UnCoLStudent(spatial_dims=spatial_dims, out_channels=3, **TINY)
    out = net(torch.randn(2, 1, *shape))
    assert out.shape == (2, 3, *shape)


def test_intermediate_features_by_name():
    net = UnCoLStudent(spatial_dims=2, **TINY)
    feats = net.forward_features(torch.randn(1, 1, 64, 32))
    assert tuple(feats) == FEATURE_NAMES
    assert feats["stem"].shape == (1, 8, 64, 32)
    for name in FEATURE_NAMES[1:]:
        assert feats[name].shape == (1, 48, 4, 2)
    # the decoder reads exactly these features: decoding them reproduces forward()
    x = torch.randn(1, 1, 32, 32)
    net.eval()
    assert torch.allclose(net.decode(net.forward_features(x)), net(x))


def test_decoder_style_follows_dimensionality():
    from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetResBlock

    assert isinstance(UnCoLStudent(spatial_dims=2, **TINY).up1.conv_block, UnetBasicBlock)  # U-Net
    assert isinstance(UnCoLStudent(spatial_dims=3, **TINY).up1.conv_block, UnetResBlock)  # V-Net style


@pytest.mark.parametrize("spatial_dims, shape, share", [(2, (48, 32), 0.9), (3, (32, 16, 48), 0.8)])
def test_single_convolution_full_resolution_keeps_the_interface_and_does_less(spatial_dims, shape, share):
    from torch.utils.flop_counter import FlopCounterMode

    def flops(net):
        with FlopCounterMode(display=False) as counter:
            out = net(torch.randn(1, 1, *shape))
        assert out.shape == (1, 3, *shape)
        return counter.get_total_flops()

    blocks = UnCoLStudent(spatial_dims=spatial_dims, out_channels=3, **TINY)
    single = UnCoLStudent(spatial_dims=spatial_dims, out_channels=3, full_resolution="single", **TINY)
    assert single.forward_features(torch.randn(1, 1, *shape))["stem"].shape == (1, 8, *shape)
    # the full-resolution level alone differs: the levels below keep their weights' shapes
    below = {k: v.shape for k, v in blocks.state_dict().items() if not k.startswith(("stem.", "up1.conv_block."))}
    assert below == {k: v.shape for k, v in single.state_dict().items() if k in below}
    assert flops(single) < share * flops(blocks)  # the full-resolution level weighs most in 3D
    torch.jit.script(single.eval())  # exports like the default student
    with pytest.raises(ValueError, match="full_resolution"):
        UnCoLStudent(spatial_dims=spatial_dims, full_resolution="none", **TINY)


def test_input_not_multiple_of_patch_size_is_rejected():
    net = UnCoLStudent(spatial_dims=2, **TINY)
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        net(torch.randn(1, 1, 40, 32))


def test_position_embedding_distinguishes_tokens_and_depends_on_grid():
    pos = sincos_position_embedding([4, 6], 48)
    assert pos.shape == (1, 24, 48)
    assert torch.unique(pos[0], dim=0).shape[0] == 24
    assert torch.allclose(sincos_position_embedding([4, 6], 48)[0, 7], pos[0, 7])


def test_torchscript_export_matches_eager():
    net = UnCoLStudent(spatial_dims=2, **TINY).eval()
    scripted = torch.jit.script(net)
    x = torch.randn(1, 1, 32, 48)
    assert torch.allclose(scripted(x), net(x), atol=1e-5)


def test_gradients_reach_every_trainable_parameter():
    net = UnCoLStudent(spatial_dims=2, **TINY)
    net(torch.randn(2, 1, 32, 32)).logsumexp(1).mean().backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    frozen = [n for n, p in net.named_parameters() if not p.requires_grad]
    assert frozen and all("norm_cross_attn" in n for n in frozen)  # MONAI's unused cross-attention norms
