import torch

from robustcl.data.frequency import high_frequency, low_frequency_mask


def _centred_spectrum(x):
    return torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1))


def test_high_frequency_view_has_no_energy_inside_the_radius():
    torch.manual_seed(0)
    images = torch.rand(4, 3, 32, 32)
    out = high_frequency(images, radius=8)
    inside = low_frequency_mask(32, 32, 8)
    before = _centred_spectrum(images).abs().square()
    after = _centred_spectrum(out).abs().square()
    assert after[..., inside].sum() < 1e-6 * before[..., inside].sum()
    # Everything outside the radius is kept as it was.
    torch.testing.assert_close(after[..., ~inside], before[..., ~inside], rtol=1e-3, atol=1e-3)


def test_high_frequency_view_removes_smooth_content_and_keeps_fine_detail():
    rows = torch.arange(32, dtype=torch.float32)
    smooth = (0.5 + 0.4 * torch.sin(2 * torch.pi * rows / 32))[None, None, :, None].expand(1, 3, 32, 32)
    checker = ((rows[:, None] + rows[None, :]) % 2)[None, None].expand(1, 3, 32, 32)  # the highest frequency
    assert high_frequency(smooth, 8).abs().max() < 1e-5
    torch.testing.assert_close(high_frequency(checker, 8), checker - checker.mean(), atol=1e-5, rtol=0)


def test_mask_is_the_authors_disc_around_the_shifted_centre():
    mask = low_frequency_mask(32, 32, 8)
    assert mask[16, 16] and mask[16, 23] and not mask[16, 24] and not mask[16, 8] and mask[16, 9]
    assert int(mask.sum()) == sum(1 for i in range(32) for j in range(32) if (i - 16) ** 2 + (j - 16) ** 2 < 64)
