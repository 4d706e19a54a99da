"""Client small models: every architecture of the paper's Fig. 4 builds and runs at the synthetic image size."""

from __future__ import annotations

import pytest
import torch

from fcl_bench.nn.small import build_small_model

FIG4_ARCHS = ["resnet18", "mobilenetv3_large_100", "densenet121", "efficientnet_b3", "vgg16"]


@pytest.mark.parametrize("arch", FIG4_ARCHS)
def test_fig4_arch_runs_at_32px_and_projects_to_common_width(arch):
    torch.manual_seed(0)
    model = build_small_model(arch, 48).train()
    x = torch.randn(2, 3, 32, 32)
    e = model(x)
    assert e.shape == (2, 48)
    e.square().mean().backward()
    assert model.proj.weight.grad is not None and torch.isfinite(model.proj.weight.grad).all()


def test_vgg_features_are_its_pooled_conv_body_without_the_classifier_mlp():
    """VGG-16's ConvMlp pre-logits (the 4096-wide classifier layers, 102.8M parameters, unnormalised) is
    dropped: the features are the globally pooled conv body, 512 wide."""
    import timm

    torch.manual_seed(0)
    model = build_small_model("vgg16", 48).eval()
    assert model.proj.in_features == 512
    assert not any("pre_logits" in n for n, _ in model.named_parameters())
    assert sum(p.numel() for p in model.backbone.parameters()) == 14_714_688     # VGG-16's 13 conv layers
    x = torch.randn(2, 3, 32, 32)
    body = model.backbone.forward_features(x).mean(dim=(2, 3))
    assert torch.allclose(model.backbone(x), body)
    full = timm.create_model("vgg16", num_classes=0)
    assert full.pre_logits.fc1.weight.numel() == 512 * 4096 * 7 * 7                 # what timm would have kept


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown small-model architecture 'resnet_nope'"):
        build_small_model("resnet_nope", 8)


# ---------------------------------------------------------------------------------------------------------
# small_pretrained: where a client CNN's backbone starts

import dataclasses  # noqa: E402
import json  # noqa: E402

import timm  # noqa: E402

from fcl_bench.data import Preprocess  # noqa: E402
from fcl_bench.nn import pretrain, small  # noqa: E402
from fcl_bench.nn.pretrain import SmallPretrainConfig, pretrain_small_model  # noqa: E402
from fcl_bench.nn.tiny_vit import TINY_VIT_CONFIG  # noqa: E402

PRE = Preprocess(**TINY_VIT_CONFIG)
TINY_SMALL_CFG = SmallPretrainConfig(batch_size=16)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from helpers import tiny_synthetic

    return tiny_synthetic(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture
def tiny_recipe(monkeypatch, tmp_path):
    """Small-CNN pretraining with the tiny recipe, into an empty cache."""
    monkeypatch.setattr(pretrain, "SmallPretrainConfig", lambda: TINY_SMALL_CFG)
    monkeypatch.setenv("FCL_BENCH_CACHE", str(tmp_path / "cache"))


def test_small_pretraining_reads_only_the_pretraining_classes_and_caches(tiny_data, tmp_path):
    from helpers import guarded as guard

    guarded = guard(tiny_data)
    backbone, report = pretrain_small_model("test_resnet", guarded, PRE, cache_dir=tmp_path, config=TINY_SMALL_CFG,
                                            progress=False)
    assert report["origin"] == "trained" and report["model"] == "test_resnet"
    assert report["train_images"] == len(tiny_data.pretrain.train)   # the 6 pretraining classes x 8 images
    assert report["probe_acc_pretrained"] is None
    again, cached = pretrain_small_model("test_resnet", guarded, PRE, cache_dir=tmp_path, config=TINY_SMALL_CFG,
                                         progress=False)
    assert cached["origin"] == "cache" and cached["weights_sha256"] == report["weights_sha256"]
    assert all(torch.equal(a, b) for a, b in zip(backbone.state_dict().values(), again.state_dict().values()))
    (weights,) = (tmp_path / "small_cnn").glob("test_resnet-*.safetensors")
    assert weights.with_suffix(".json").is_file()
    other = dataclasses.replace(PRE, mean=(0.0, 0.0, 0.0))           # another input pipeline: another key
    _, third = pretrain_small_model("test_resnet", guarded, other, cache_dir=tmp_path, config=TINY_SMALL_CFG,
                                    progress=False)
    assert third["origin"] == "trained" and third["key"] != report["key"]


def _fedavg_federation(ws, **overrides):
    from helpers import federation, smoke_config

    from fcl_bench.methods.fedavg import FedAvg, FedAvgConfig

    return federation(FedAvg, FedAvgConfig(), ws, smoke_config(small_models="test_resnet", **overrides))


def test_small_pretrained_starts_every_client_cnn_from_the_pretrained_backbone(tiny_data, tiny_recipe):
    from helpers import smoke_config, workspace

    ws = workspace(smoke_config(small_models="test_resnet"))
    ws.full_dataset = dataclasses.replace(ws.full_dataset, pretrain=tiny_data.pretrain)  # pretrain in seconds
    scratch = _fedavg_federation(ws, small_pretrained="false")
    warm = _fedavg_federation(ws, small_pretrained="true")
    expected, report = pretrain_small_model("test_resnet", ws.full_dataset, ws.preprocess, progress=False)
    assert report["origin"] == "cache"                                # the run pretrained it, once
    for c in scratch.clients:
        cold, hot = scratch.clients[c].model.backbone, warm.clients[c].model.backbone    # the SmallModels
        for name, value in expected.state_dict().items():
            assert torch.equal(hot.backbone.state_dict()[name], value), name
        assert not torch.equal(cold.backbone.conv1[0].weight, hot.backbone.conv1[0].weight)
        assert torch.equal(cold.proj.weight, hot.proj.weight)        # the projection: the same seeded init
    warm.start_task(0)                                                # the server's w_0 is pretrained too
    assert torch.equal(warm.clients[0].model.backbone.backbone.conv1[0].weight, expected.conv1[0].weight)


def test_small_pretrained_is_recorded_in_config_json_and_fetched_once_per_arch(cli, smoke_opts, tmp_path,
                                                                             monkeypatch):
    calls = []

    def fake_state(arch, dataset, pre, device="cpu", progress=True):
        calls.append((arch, dataset.pretrain is not None))
        return {k: torch.full_like(v, 0.5) if v.is_floating_point() else v
                for k, v in small.small_backbone(arch).state_dict().items()}, f"{arch}: fake weights"

    monkeypatch.setattr(small, "pretrained_backbone_state", fake_state)
    for flag in ("true", "false"):
        res = cli("run", "--methods", "fedavg", *smoke_opts, "-o", f"small_pretrained={flag}", "--out",
                  tmp_path / flag)
        assert res.exit_code == 0, res.output
        (config,) = (tmp_path / flag).rglob("config.json")
        assert json.loads(config.read_text())["run"]["small_pretrained"] is (flag == "true")
    assert calls == [("test_resnet", True)]                          # one fetch for the global model + clients
    log = next((tmp_path / "true").rglob("log.txt")).read_text()
    assert "test_resnet: fake weights" in log


def test_presets_choose_small_pretrained():
    from fcl_bench.config import PRESETS, offline_pretrained_archs, preset

    assert preset("quick").small_pretrained and not preset("smoke").small_pretrained
    assert not preset("paper-cifar100").small_pretrained and not preset("paper-imagenet-r").small_pretrained
    assert all("small_pretrained" in p for p in PRESETS.values())
    assert offline_pretrained_archs() == ["mobilenetv3_small_050"]


def test_on_a_real_dataset_small_pretrained_loads_timms_pretrained_weights(tiny_data, tmp_path, monkeypatch):
    """timm's own loader, pointed at a local file instead of the hub."""
    from safetensors.torch import save_file

    torch.manual_seed(7)
    source = timm.create_model("test_resnet")                        # with its classifier, as timm ships it
    path = tmp_path / "test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    real = timm.create_model

    def local(name, pretrained=False, **kw):
        if pretrained:
            kw["pretrained_cfg_overlay"] = {"file": str(path), "hf_hub_id": None}
        return real(name, pretrained=pretrained, **kw)

    monkeypatch.setattr(timm, "create_model", local)
    real_like = dataclasses.replace(tiny_data, name="cifar100", pretrain=None)
    rng = torch.random.get_rng_state()
    state, line = small.pretrained_backbone_state("test_resnet", real_like, PRE)
    assert torch.equal(torch.random.get_rng_state(), rng)            # the run's RNG did not move
    assert "timm's pretrained weights" in line
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    assert state.keys() == expected.keys() and all(torch.equal(state[k], v) for k, v in expected.items())
    model = small.small_model_factory(True, real_like, PRE, log=lambda line: None)("test_resnet", 16)
    assert torch.equal(model.backbone.conv1[0].weight, source.conv1[0].weight)


def test_unreachable_pretrained_weights_are_a_clear_error(tiny_data, monkeypatch):
    real = timm.create_model

    def offline(name, pretrained=False, **kw):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(name, pretrained=pretrained, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    real_like = dataclasses.replace(tiny_data, name="cifar100", pretrain=None)
    with pytest.raises(small.SmallModelError, match="small_pretrained=false"):
        small.pretrained_backbone_state("resnet18", real_like, PRE)


def test_channels_last_is_the_same_model_in_another_layout():
    """``channels_last``: conv weights and the backbone's input in channels-last layout; the forward, the
    gradients and an Adam step agree with the default layout to rounding; the state dict leaves contiguous
    (it crosses the wire and is checkpointed) and loading one keeps the layout."""
    from fcl_bench import wire

    torch.manual_seed(0)
    ref = build_small_model("mobilenetv3_small_050", 24).train()
    cl = build_small_model("mobilenetv3_small_050", 24).train()
    cl.load_state_dict(ref.state_dict())
    cl.to_channels_last()
    conv = cl.backbone.conv_stem.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    x = torch.randn(4, 3, 32, 32)
    seen = []
    cl.backbone.conv_stem.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous(
        memory_format=torch.channels_last)))
    outs = []
    for m in (ref, cl):
        e = m(x)
        outs.append(e.detach())
        e.square().mean().backward()
    assert seen == [True]
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    scale = max(p.grad.abs().max().item() for p in ref.parameters())     # rounding is relative to this
    for (n, a), b in zip(ref.named_parameters(), cl.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-3, atol=1e-5 * scale), n
    got, _ = wire.transmit(cl.state_dict())
    assert all(t.is_contiguous() for t in got.values())
    cl.load_state_dict(got)
    assert cl.backbone.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_run_option_reaches_every_client_cnn():
    from helpers import smoke_config, workspace

    ws = workspace(smoke_config(small_models="test_resnet"))
    plain = _fedavg_federation(ws)
    fed = _fedavg_federation(ws, channels_last="true")
    for c in fed.clients:
        w = next(p for p in fed.clients[c].model.backbone.parameters() if p.dim() == 4)
        v = next(p for p in plain.clients[c].model.backbone.parameters() if p.dim() == 4)
        assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
        assert v.is_contiguous()
        assert torch.equal(w, v)                       # the same seeded init, another layout
