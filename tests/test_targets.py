"""Stage 1's teacher targets of a volume, computed one token-deep block of slices at a time."""

import torch

from custom.teachers.targets import VALID_KEY, TeacherTargetsd, distillation_targets


def test_a_volume_block_by_block_gives_the_whole_volume_targets(lite_teacher):
    volume = torch.zeros(1, 32, 48, 32)  # slices along z: two blocks of 16
    volume[0, 6:22, 8:30, 5] = torch.linspace(0.2, 1.0, 16 * 22).view(16, 22)
    volume[0, 4:28, 10:40, 20] = 0.8
    label = torch.zeros(1, 32, 48, 32, dtype=torch.long)
    label[0, 8:20, 10:28, 5] = 1
    label[0, 6:26, 12:38, 20] = 2
    depths = []
    hook = lite_teacher.register_forward_pre_hook(lambda module, args: depths.append(args[0].shape[-1]))
    try:
        blockwise = TeacherTargetsd(lite_teacher, disk_cache=False).targets(volume, label)
    finally:
        hook.remove()
    assert depths == [16, 16]  # the teacher never holds more than one block's full-resolution maps
    whole = {
        k: v[0] for k, v in distillation_targets(lite_teacher(volume[None], labels=label[None]), [2, 3, 2]).items()
    }
    assert set(blockwise) == set(whole) and torch.equal(blockwise[VALID_KEY], whole[VALID_KEY])
    assert whole[VALID_KEY].tolist() == [True, True]  # class 1 only in the first block, class 2 in the second
    for name, value in whole.items():
        if name != VALID_KEY:
            assert value.shape[-3:] == (2, 3, 2) and torch.allclose(blockwise[name], value, atol=1e-5), name
