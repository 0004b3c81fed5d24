"""DINO ablation settings: facets, block ensembles (Ensemble-ViT), bilateral filter (Filter-ViT), ViT/iBOT."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.components import DinoFeaturizer
from lightning_modules.components.dino_featurizer import (
    attention_projection,
    bilateral_filter,
    ibot_to_transformers,
    vit_blocks,
)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(2, 3, 224, 224)


def _unit(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm(dim=1, keepdim=True)


def test_key_facet_is_the_attention_key_projection_of_the_block(tiny_dino, images) -> None:
    seen = {}
    proj = attention_projection(vit_blocks(tiny_dino.model)[3], "key")
    handle = proj.register_forward_hook(lambda m, i, o: seen.__setitem__("key", o))
    try:
        keys = tiny_dino.variant(facet="key")(images)
    finally:
        handle.remove()
    expected = seen["key"][:, 1:].transpose(1, 2).reshape(2, -1, 16, 16)
    assert torch.equal(keys, expected.float())
    assert not torch.allclose(keys, tiny_dino(images))


def test_ensemble_concatenates_normalised_blocks(tiny_dino, images) -> None:
    ensemble = tiny_dino.variant(ensemble_layers=[1])(images)
    last, early = tiny_dino(images), tiny_dino.variant(layer=1)(images)
    assert ensemble.shape == (2, 64, 16, 16)
    assert torch.allclose(ensemble[:, :32], _unit(last), atol=1e-6)
    assert torch.allclose(ensemble[:, 32:], _unit(early), atol=1e-6)


def test_bilateral_filter_limits() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 4, 6, 6)
    assert torch.allclose(bilateral_filter(x, window=1), x)  # only the token itself
    box = bilateral_filter(x, window=3, sigma_space=1e6, sigma_range=1e6)  # flat weights: a 3x3 mean
    assert torch.allclose(box[0, :, 2, 3], x[0, :, 1:4, 2:5].mean(dim=(1, 2)), atol=1e-5)
    edge = torch.zeros(1, 2, 4, 6)
    edge[:, 0, :, :3], edge[:, 1, :, 3:] = 1.0, 1.0  # two regions of orthogonal features
    kept = bilateral_filter(edge, window=3, sigma_space=1e6, sigma_range=0.05)
    assert torch.allclose(kept, edge, atol=1e-6)  # the range term keeps the two sides apart
    with pytest.raises(ValueError, match="odd"):
        bilateral_filter(x, window=4)


def test_filter_vit_smooths_the_token_map(tiny_dino, images) -> None:
    raw, smooth = tiny_dino(images), tiny_dino.variant(bilateral_window=5)(images)
    roughness = lambda t: (t[..., 1:, :] - t[..., :-1, :]).abs().mean()  # noqa: E731
    assert smooth.shape == raw.shape and roughness(smooth) < roughness(raw)


def test_variant_errors(tiny_dino) -> None:
    with pytest.raises(ValueError, match="facet"):
        tiny_dino.variant(facet="attention")
    with pytest.raises(ValueError, match="out of range"):
        tiny_dino.variant(ensemble_layers=[7])
    with pytest.raises(ValueError, match="cannot vary"):
        tiny_dino.variant(model_id="x")


def test_dinov1_style_vit_loads_through_automodel(tmp_path, images) -> None:
    vit = DinoFeaturizer(model_id=None, random_init={"seed": 1, "model_type": "vit"}, layer=3, image_size=224)
    assert vit.patch_size == 16 and vit(images).shape == (2, 32, 14, 14)
    vit.save_pretrained(str(tmp_path / "vit"))
    loaded = DinoFeaturizer(model_id=str(tmp_path / "vit"), layer=3, image_size=224)
    assert type(loaded.model).__name__ == "ViTModel"
    assert torch.allclose(loaded(images), vit(images), atol=1e-6)


def _to_timm(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The iBOT release's key layout, written independently of the code under test."""
    sd = model.state_dict()
    v5 = any(k.startswith("layers.") for k in sd)
    out = {"backbone.cls_token": sd["embeddings.cls_token"], "backbone.pos_embed": sd["embeddings.position_embeddings"],
           "backbone.patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
           "backbone.patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
           "backbone.norm.weight": sd["layernorm.weight"], "backbone.norm.bias": sd["layernorm.bias"],
           "head.mlp.0.weight": torch.zeros(3, 3)}
    for i in range(len(vit_blocks(model))):
        p = f"layers.{i}." if v5 else f"encoder.layer.{i}."
        att = p + ("attention." if v5 else "attention.attention.")
        q, k, v = ("q_proj", "k_proj", "v_proj") if v5 else ("query", "key", "value")
        names = {"norm1": p + "layernorm_before", "norm2": p + "layernorm_after",
                 "attn.proj": p + ("attention.o_proj" if v5 else "attention.output.dense"),
                 "mlp.fc1": p + ("mlp.fc1" if v5 else "intermediate.dense"),
                 "mlp.fc2": p + ("mlp.fc2" if v5 else "output.dense")}
        for kind in ("weight", "bias"):
            out[f"backbone.blocks.{i}.attn.qkv.{kind}"] = torch.cat([sd[f"{att}{n}.{kind}"] for n in (q, k, v)])
            for timm_name, hf_name in names.items():
                out[f"backbone.blocks.{i}.{timm_name}.{kind}"] = sd[f"{hf_name}.{kind}"]
    return {"teacher": out}


def test_ibot_checkpoint_maps_onto_a_transformers_vit(images) -> None:
    from lightning_modules.components.tiny_models import build_dinov2

    source = build_dinov2({"seed": 2, "model_type": "vit"})
    target = build_dinov2({"seed": 3, "model_type": "vit"})
    mapped = ibot_to_transformers(_to_timm(source), target)
    missing, unexpected = target.load_state_dict(mapped, strict=True), None
    assert unexpected is None and not missing.missing_keys
    pixels = images[:1]
    assert torch.allclose(target(pixel_values=pixels).last_hidden_state, source(pixel_values=pixels).last_hidden_state)
    with pytest.raises(ValueError, match="unexpected key"):
        ibot_to_transformers({"blocks.0.ls1.gamma": torch.zeros(1)}, target)


def test_ibot_checkpoint_file_replaces_the_weights(tmp_path, images) -> None:
    from lightning_modules.components.tiny_models import build_dinov2

    source = DinoFeaturizer(model_id=None, random_init={"seed": 2, "model_type": "vit"}, layer=3, image_size=224)
    arch = DinoFeaturizer(model_id=None, random_init={"seed": 3, "model_type": "vit"}, layer=3, image_size=224)
    arch.save_pretrained(str(tmp_path / "arch"))
    torch.save(_to_timm(source.model), tmp_path / "checkpoint_teacher.pth")
    loaded = DinoFeaturizer(model_id=str(tmp_path / "arch"), layer=3, image_size=224,
                            checkpoint=str(tmp_path / "checkpoint_teacher.pth"))
    assert torch.allclose(loaded(images), source(images), atol=1e-6)
    assert not torch.allclose(loaded(images), arch(images))
    other = build_dinov2({"seed": 0, "model_type": "vit", "hidden_size": 48})
    torch.save(_to_timm(other), tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="wrong.pth does not fit"):
        DinoFeaturizer(model_id=str(tmp_path / "arch"), layer=3, image_size=224, checkpoint=str(tmp_path / "wrong.pth"))


def test_dinov2_with_registers_drops_the_register_tokens(tmp_path) -> None:
    featurizer = DinoFeaturizer(model_id=None, random_init={"seed": 0, "model_type": "dinov2_with_registers",
                                                            "num_hidden_layers": 4}, layer=3, image_size=224)
    assert featurizer.num_prefix_tokens == 1 + 4  # CLS and 4 registers
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    features = featurizer(images)
    pixels = (images - featurizer.mean) / featurizer.std
    hidden = featurizer.model(pixel_values=pixels, output_hidden_states=True).hidden_states[4]  # block 3's output
    expected = hidden[:, 5:].transpose(1, 2).reshape(2, -1, 16, 16)
    torch.testing.assert_close(features, expected)
    featurizer.save_pretrained(str(tmp_path / "reg"))  # the production loading path: AutoModel.from_pretrained
    loaded = DinoFeaturizer(model_id=str(tmp_path / "reg"), layer=3, image_size=224)
    assert type(loaded.model).__name__ == "Dinov2WithRegistersModel"
    torch.testing.assert_close(loaded(images), features)


def test_dinov3_drops_cls_and_registers_and_round_trips(tmp_path) -> None:
    """DINOv3 (rotary positions, 4 registers, blocks under ``model.layer``) through the same featurizer."""
    featurizer = DinoFeaturizer(model_id=None, random_init={"seed": 0, "model_type": "dinov3_vit"}, layer=2,
                                image_size=128)
    assert featurizer.num_prefix_tokens == 1 + 4 and featurizer.grid_size == 8
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    features = featurizer(images)
    pixels = (images - featurizer.mean) / featurizer.std
    out = featurizer.model(pixel_values=pixels, output_hidden_states=True).hidden_states[3]  # block 2's output
    assert out.shape[1] == 5 + 64
    torch.testing.assert_close(features, out[:, 5:].transpose(1, 2).reshape(2, -1, 8, 8))
    featurizer.save_pretrained(str(tmp_path / "v3"))  # the production loading path: AutoModel.from_pretrained
    loaded = DinoFeaturizer(model_id=str(tmp_path / "v3"), layer=2, image_size=128)
    assert type(loaded.model).__name__ == "DINOv3ViTModel"
    torch.testing.assert_close(loaded(images), features)
    key = DinoFeaturizer(model_id=str(tmp_path / "v3"), layer=2, image_size=128, facet="key")(images)
    assert key.shape == (2, 32, 8, 8) and not torch.allclose(key, features)  # the key facet hooks k_proj
