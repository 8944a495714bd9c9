import pytest
import torch

from histoclip.module import HistoclipModule, ImageEncoder, ResNet, SmallCNN, clip_loss, pml_clip_loss


def _pair(b=16, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=-1)
    z2 = torch.nn.functional.normalize(z1 + 0.5 * torch.randn(b, d, generator=g), dim=-1)
    return z1, z2


def test_clip_loss_matches_pytorch_metric_learning():
    z1, z2 = _pair()
    for t in (0.07, 0.1, 0.5):
        a, b = clip_loss(z1, z2, t), pml_clip_loss(z1, z2, t)
        assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-5)
        assert a.image_to_expression.item() == pytest.approx(b.image_to_expression.item(), rel=1e-5)


def test_clip_loss_rewards_alignment():
    z1, z2 = _pair()
    assert clip_loss(z1, z1, 0.1).loss < clip_loss(z1, z2, 0.1).loss < clip_loss(z1, z2.roll(1, 0), 0.1).loss


def test_small_cnn_and_resnet_shapes():
    x = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    assert ImageEncoder("cnn")(x).shape == (2, SmallCNN().out_dim)
    assert ImageEncoder("resnet18")(x).shape == (2, 512)


def test_resnet_loads_torchvision_style_weights(tmp_path):
    src = ResNet("resnet18")
    state = dict(src.state_dict())
    state["fc.weight"] = torch.zeros(1000, 512)  # torchvision checkpoints carry a classifier
    torch.save(state, tmp_path / "resnet18.pth")
    enc = ImageEncoder("resnet18", weights=tmp_path / "resnet18.pth")
    for k, v in src.state_dict().items():
        torch.testing.assert_close(enc.backbone.state_dict()[k], v)
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="does not match"):
        ImageEncoder("resnet18", weights=tmp_path / "bad.pth")


def test_frozen_backbone_gets_no_gradient():
    enc = ImageEncoder("cnn", freeze=True)
    assert not any(p.requires_grad for p in enc.backbone.parameters())


def test_module_forward_and_bad_args():
    m = HistoclipModule(10, latent_dim=8, hidden_dim=32)
    out = m(torch.randint(0, 255, (4, 3, 16, 16), dtype=torch.uint8), m.project(torch.randn(4, 10)))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="temperature"):
        HistoclipModule(10, temperature=0)
    with pytest.raises(ValueError, match="backbone"):
        HistoclipModule(10, image_backbone="vit")
