import pytest
import torch

from pipeline.extraction.mfnet import MFNet3D, random_mfnet

REF = "../shared/reference/mfnet_state_dict_keys.tsv"


def reference_keys():
    from pathlib import Path
    p = Path(__file__).resolve().parents[1] / REF
    if not p.exists():
        pytest.skip("shared/reference not available")
    rows = [line.split("\t") for line in p.read_text().splitlines()[1:]]
    return [(k, shape) for _, k, shape in rows]


def test_state_dict_keys_and_shapes_match_the_authors_network():
    sd = MFNet3D().state_dict()
    ref = reference_keys()
    assert len(sd) == len(ref) == 421
    for (k, shape), (mine, t) in zip(ref, sd.items()):
        assert k == mine
        assert shape == ("x".join(map(str, t.shape)) or "scalar"), k


def test_parameter_count():
    assert sum(p.numel() for p in MFNet3D().parameters()) == 7_996_368


@torch.inference_mode()
def test_feature_shapes_per_input_size_and_layers():
    m = random_mfnet(0).eval()
    assert m.forward_features(torch.zeros(1, 3, 16, 112, 112)).shape == (1, 768, 8, 4, 4)
    assert m.forward_features(torch.zeros(1, 3, 16, 224, 224)).shape == (1, 768, 8, 7, 7)
    assert m(torch.zeros(2, 3, 16, 112, 112)).shape == (2, 400)
    x = torch.randn(1, 3, 8, 64, 64)
    conv5 = m.forward_features(x, "conv5")
    tail = m.forward_features(x)
    assert (tail >= 0).all() and (conv5 < 0).any()   # tail = BN + ReLU on conv5
    with pytest.raises(ValueError, match="layer"):
        m.forward_features(x, "conv4")


@torch.inference_mode()
def test_seeded_random_network_is_deterministic():
    x = torch.randn(2, 3, 8, 64, 64, generator=torch.Generator().manual_seed(0))
    a = random_mfnet(3).eval().forward_features(x)
    b = random_mfnet(3).eval().forward_features(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, random_mfnet(4).eval().forward_features(x))


def released_format(model):
    """What the authors' file holds: {'epoch', 'state_dict'} with DataParallel 'module.' keys and
    no num_batches_tracked (saved by PyTorch 0.4)."""
    sd = {f"module.{k}": v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    return {"epoch": 100, "state_dict": sd}


@torch.inference_mode()
def test_loads_the_released_checkpoint_format_and_bare_state_dicts(tmp_path):
    src = random_mfnet(7).eval()
    torch.save(released_format(src), tmp_path / "MFNet3D_Kinetics-400_72.8.pth")
    torch.save(src.state_dict(), tmp_path / "bare.pth")
    x = torch.randn(1, 3, 8, 64, 64)
    for name in ("MFNet3D_Kinetics-400_72.8.pth", "bare.pth"):
        m = MFNet3D.from_checkpoint(tmp_path / name).eval()
        assert torch.equal(m.forward_features(x), src.forward_features(x))


def test_mismatched_checkpoint_lists_missing_unexpected_and_shapes(tmp_path):
    sd = released_format(random_mfnet(0))["state_dict"]
    del sd["module.conv2.B01.conv_i1.conv.weight"]
    sd["module.extra.weight"] = torch.zeros(1)
    sd["module.conv1.conv.weight"] = torch.zeros(16, 3, 1, 5, 5)
    torch.save({"state_dict": sd}, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as e:
        MFNet3D.from_checkpoint(tmp_path / "bad.pth")
    msg = str(e.value)
    assert "bad.pth" in msg and "1 missing: conv2.B01.conv_i1.conv.weight" in msg
    assert "1 unexpected: extra.weight" in msg and "conv1.conv.weight: file (16, 3, 1, 5, 5)" in msg


def test_unreadable_weights_file(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth: cannot be read"):
        MFNet3D.from_checkpoint(tmp_path / "junk.pth")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MFNet3D.from_checkpoint(tmp_path / "none.pth")


def _authors_forward(sd: dict, x):
    """MFNET_3D.forward up to its tail's BN+ReLU, transcribed in float64 functional form from the
    authors' code (cypw/PyTorch-MFNet, network/mfnet_3d.py: BN_AC_CONV3D.forward, MF_UNIT.forward,
    MFNET_3D.forward), reading parameters by their state_dict names."""
    import torch.nn.functional as F

    def bn(p, h):                     # eval mode: running statistics, eps 1e-5
        return F.batch_norm(h, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"],
                            False, 0.0, 1e-5)

    def bn_ac_conv(p, h, stride=(1, 1, 1), groups=1):
        w = sd[p + ".conv.weight"]
        pad = tuple(k // 2 for k in w.shape[2:])
        return F.conv3d(F.relu(bn(p + ".bn", h)), w, None, stride, pad, 1, groups)

    h = F.conv3d(x, sd["conv1.conv.weight"], None, (1, 2, 2), (1, 2, 2))
    h = F.max_pool3d(F.relu(bn("conv1.bn", h)), (1, 3, 3), (1, 2, 2), (0, 1, 1))
    for stage, units, stride in (("conv2", 3, (2, 1, 1)), ("conv3", 4, (1, 2, 2)), ("conv4", 6, (1, 2, 2)),
                                 ("conv5", 3, (1, 2, 2))):
        for i in range(1, units + 1):
            p, first = f"{stage}.B{i:02d}", i == 1
            s = stride if first else (1, 1, 1)
            x_in = h + bn_ac_conv(p + ".conv_i2", bn_ac_conv(p + ".conv_i1", h))
            m = bn_ac_conv(p + ".conv_m1", x_in, s, 16)
            m = bn_ac_conv(p + ".conv_m2", m, groups=1 if first else 16)
            h = m + (bn_ac_conv(p + ".conv_w1", h, s) if first else h)
    return F.relu(bn("tail.bn", h))


def test_features_equal_the_authors_forward_in_float64():
    torch.manual_seed(0)
    model = random_mfnet(0).double().eval()
    for m in model.modules():          # non-trivial BN statistics, so that every BN's role shows
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    x = torch.randn(2, 3, 4, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ours = model.forward_features(x)
        theirs = _authors_forward(model.state_dict(), x)
    assert ours.shape == (2, 768, 2, 1, 1) and (ours > 0).float().mean() > 0.1
    assert torch.allclose(ours, theirs, rtol=1e-10, atol=1e-12)
