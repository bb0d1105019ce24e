"""Self-contained OpenVLA parts: timm-compatible ViTs, checkpoint IO, the packaged tiny tokenizer."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F

from vlacache.backbones.common.checkpoint import (
    CheckpointError,
    load_safetensors_dir,
    load_state_dict_strict,
    load_torch_file,
    read_config,
    save_safetensors_dir,
    save_torch_checkpoint,
    strip_prefix,
)
from vlacache.backbones.common.tokenizer import copy_tokenizer_files, load_tokenizer, tiny_tokenizer_dir
from vlacache.backbones.common.vision import (
    VIT_SPECS,
    FusedMLPProjector,
    FusedVisionBackbone,
    VisionTransformer,
    get_vit_spec,
    normalize_for_towers,
)

DINO = "vit_large_patch14_reg4_dinov2.lvd142m"
SIGLIP = "vit_so400m_patch14_siglip_224"
TINY_DINO = "vlacache-tiny-dinov2-reg4"
TINY_SIGLIP = "vlacache-tiny-siglip"
PROMPT = "In: What action should the robot take to open the drawer?\nOut:"


def expected_vit_shapes(d: int, depth: int, mlp: int, *, cls: bool, regs: int, ls: bool, pool: bool):
    shapes = {"pos_embed": (1, 256, d), "patch_embed.proj.weight": (d, 3, 14, 14), "patch_embed.proj.bias": (d,)}
    if cls:
        shapes["cls_token"] = (1, 1, d)
    if regs:
        shapes["reg_token"] = (1, regs, d)
    for i in range(depth):
        p = f"blocks.{i}."
        shapes |= {
            p + "norm1.weight": (d,), p + "norm1.bias": (d,),
            p + "attn.qkv.weight": (3 * d, d), p + "attn.qkv.bias": (3 * d,),
            p + "attn.proj.weight": (d, d), p + "attn.proj.bias": (d,),
            p + "norm2.weight": (d,), p + "norm2.bias": (d,),
            p + "mlp.fc1.weight": (mlp, d), p + "mlp.fc1.bias": (mlp,),
            p + "mlp.fc2.weight": (d, mlp), p + "mlp.fc2.bias": (d,),
        }
        if ls:
            shapes |= {p + "ls1.scale_factor": (d,), p + "ls2.scale_factor": (d,)}
    shapes |= {"norm.weight": (d,), "norm.bias": (d,)}
    if pool:
        shapes |= {
            "attn_pool.latent": (1, 1, d),
            "attn_pool.q.weight": (d, d), "attn_pool.q.bias": (d,),
            "attn_pool.kv.weight": (2 * d, d), "attn_pool.kv.bias": (2 * d,),
            "attn_pool.proj.weight": (d, d), "attn_pool.proj.bias": (d,),
            "attn_pool.norm.weight": (d,), "attn_pool.norm.bias": (d,),
            "attn_pool.mlp.fc1.weight": (mlp, d), "attn_pool.mlp.fc1.bias": (mlp,),
            "attn_pool.mlp.fc2.weight": (d, mlp), "attn_pool.mlp.fc2.bias": (d,),
        }
    return shapes


def state_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_real_dinov2_keys_match_released_checkpoint():
    with torch.device("meta"):
        vit = VisionTransformer(get_vit_spec(DINO))
    assert state_shapes(vit) == expected_vit_shapes(1024, 24, 4096, cls=True, regs=4, ls=True, pool=False)


def test_real_siglip_keys_match_released_checkpoint():
    with torch.device("meta"):
        vit = VisionTransformer(get_vit_spec(SIGLIP))
    shapes = state_shapes(vit)
    assert shapes == expected_vit_shapes(1152, 27, 4304, cls=False, regs=0, ls=False, pool=True)
    assert "blocks.26.mlp.fc2.weight" in shapes and shapes["attn_pool.kv.weight"] == (2304, 1152)


def test_real_fused_backbone_and_projector_dims():
    with torch.device("meta"):
        backbone = FusedVisionBackbone(get_vit_spec(DINO), get_vit_spec(SIGLIP))
        projector = FusedMLPProjector(backbone.embed_dim, 4096)
    assert (backbone.embed_dim, backbone.num_patches, backbone.grid, backbone.patch_size) == (2176, 256, (16, 16), 14)
    assert state_shapes(projector) == {
        "fc1.weight": (8704, 2176), "fc1.bias": (8704,),
        "fc2.weight": (4096, 8704), "fc2.bias": (4096,),
        "fc3.weight": (4096, 4096), "fc3.bias": (4096,),
    }
    keys = backbone.state_dict().keys()
    assert "featurizer.reg_token" in keys and "fused_featurizer.attn_pool.latent" in keys


def test_tiny_specs_mirror_real_structure():
    for tiny, real in ((TINY_DINO, DINO), (TINY_SIGLIP, SIGLIP)):
        t, r = VIT_SPECS[tiny], VIT_SPECS[real]
        assert (t.class_token, t.reg_tokens, t.layer_scale, t.global_pool, t.mean, t.std, t.grid) == (
            r.class_token, r.reg_tokens, r.layer_scale, r.global_pool, r.mean, r.std, r.grid
        )


def test_unknown_vit_id_lists_known_ids():
    with pytest.raises(KeyError, match="vit_so400m_patch14_siglip_224"):
        get_vit_spec("vit_base_patch16_224")


def tiny_backbone(seed: int = 0) -> FusedVisionBackbone:
    torch.manual_seed(seed)
    return FusedVisionBackbone(get_vit_spec(TINY_DINO), get_vit_spec(TINY_SIGLIP)).eval()


def test_tiny_fused_backbone_output_shape():
    backbone = tiny_backbone()
    pixels = torch.randn(2, 6, 224, 224)
    with torch.no_grad():
        out = backbone(pixels)
    assert out.shape == (2, 256, 80) and backbone.embed_dim == 80
    assert torch.isfinite(out).all() and out.std() > 0.1
    assert not torch.allclose(out[0], out[1])
    with torch.no_grad():
        projected = FusedMLPProjector(80, 24)(out)
    assert projected.shape == (2, 256, 24)


def test_fused_backbone_rejects_different_grids():
    other = VIT_SPECS[TINY_SIGLIP].__class__(**{**VIT_SPECS[TINY_SIGLIP].__dict__, "patch_size": 16})
    with pytest.raises(ValueError, match="patch grids differ"):
        FusedVisionBackbone(get_vit_spec(TINY_DINO), other)


def test_tower_rejects_wrong_image_size():
    with pytest.raises(ValueError, match="resize the images to 224x224"):
        tiny_backbone().featurizer(torch.zeros(1, 3, 112, 112))


@pytest.mark.parametrize("tower", ["featurizer", "fused_featurizer"])
def test_forward_reads_second_to_last_block(tower):
    backbone = tiny_backbone()
    pixels = torch.randn(1, 6, 224, 224)
    vit = getattr(backbone, tower)
    with torch.no_grad():
        before = backbone(pixels)
        for p in vit.blocks[-1].parameters():
            p.add_(1.0)
        vit.norm.weight.mul_(3.0)
        assert torch.equal(backbone(pixels), before)
        vit.blocks[-2].mlp.fc2.bias.add_(1.0)
        assert not torch.allclose(backbone(pixels), before)


def reference_tower(vit: VisionTransformer, pixels: torch.Tensor) -> torch.Tensor:
    """Independent timm-semantics forward: pos_embed on patches only, then [cls, reg..., patches]."""
    spec = vit.spec
    x = F.conv2d(pixels, vit.patch_embed.proj.weight, vit.patch_embed.proj.bias, stride=spec.patch_size)
    x = x.flatten(2).transpose(1, 2) + vit.pos_embed
    prefix = []
    if spec.class_token:
        prefix.append(vit.cls_token.expand(len(x), -1, -1))
    if spec.reg_tokens:
        prefix.append(vit.reg_token.expand(len(x), -1, -1))
    x = torch.cat([*prefix, x], 1)
    heads, hd = spec.num_heads, spec.embed_dim // spec.num_heads
    for blk in vit.blocks[: spec.depth - 1]:
        h = F.layer_norm(x, (spec.embed_dim,), blk.norm1.weight, blk.norm1.bias, spec.norm_eps)
        q, k, v = (h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (heads, hd)).transpose(1, 2) for t in (q, k, v))
        a = torch.softmax(q @ k.transpose(-1, -2) / hd**0.5, dim=-1) @ v
        a = a.transpose(1, 2).flatten(2) @ blk.attn.proj.weight.T + blk.attn.proj.bias
        x = x + (a * blk.ls1.scale_factor if spec.layer_scale else a)
        h = F.layer_norm(x, (spec.embed_dim,), blk.norm2.weight, blk.norm2.bias, spec.norm_eps)
        m = F.gelu(h @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias) @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias
        x = x + (m * blk.ls2.scale_factor if spec.layer_scale else m)
    return x[:, spec.num_prefix_tokens :]


@pytest.mark.parametrize("tower", ["featurizer", "fused_featurizer"])
def test_tower_matches_reference_math(tower):
    vit = getattr(tiny_backbone(1), tower)
    with torch.no_grad():
        for param in vit.parameters():
            param.normal_(0.0, 0.3)
        pixels = torch.randn(2, 3, 224, 224)
        torch.testing.assert_close(vit(pixels), reference_tower(vit, pixels), rtol=1e-4, atol=1e-5)


def test_normalize_for_towers_constant_image():
    dino, siglip = get_vit_spec(DINO), get_vit_spec(SIGLIP)
    images = torch.full((2, 8, 6, 3), 200, dtype=torch.uint8)
    out = normalize_for_towers(images, dino, siglip)
    assert out.shape == (2, 6, 8, 6) and out.dtype == torch.float32
    want = [(200 / 255 - m) / s for m, s in zip(dino.mean + siglip.mean, dino.std + siglip.std)]
    torch.testing.assert_close(out.mean(dim=(0, 2, 3)), torch.tensor(want))
    assert out.std(dim=(0, 2, 3)).max() < 1e-6
    with pytest.raises(ValueError, match="uint8"):
        normalize_for_towers(images.float(), dino, siglip)


def sample_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    shared = torch.randn(16, 8)
    return {
        "embed.weight": shared,
        "head.weight": shared,
        "a.bias": torch.randn(8).to(torch.bfloat16),
        "b.weight": torch.randn(8, 16).T,
        "c.weight": torch.randn(32, 8),
        "d.ids": torch.arange(10),
    }


def test_sharded_safetensors_round_trip(tmp_path):
    state = sample_state()
    written = save_safetensors_dir(tmp_path, state, max_shard_bytes=600)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert len(written) == len(shards) + 1 and not (tmp_path / "model.safetensors").exists()
    loaded = load_safetensors_dir(tmp_path)
    assert loaded.keys() == state.keys()
    for key, tensor in state.items():
        assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), key


def test_single_file_safetensors_round_trip(tmp_path):
    state = sample_state()
    save_safetensors_dir(tmp_path, state)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    assert all(torch.equal(load_safetensors_dir(tmp_path)[k], v) for k, v in state.items())


def test_missing_shard_is_named(tmp_path):
    save_safetensors_dir(tmp_path, sample_state(), max_shard_bytes=600)
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load_safetensors_dir(tmp_path)


def test_missing_weights_and_config_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        load_safetensors_dir(tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "config.json"))):
        read_config(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_config(tmp_path / "nope")
    (tmp_path / "config.json").write_text('{"model_type": "openvla"}')
    assert read_config(tmp_path) == {"model_type": "openvla"}


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 3)
        self.norm = torch.nn.LayerNorm(3)
        self.register_buffer("scratch", torch.zeros(2), persistent=False)


def test_strict_load_copies_and_casts():
    src, dst = Tiny(), Tiny()
    state = {k: v.to(torch.bfloat16) for k, v in src.state_dict().items()}
    load_state_dict_strict(dst, state)
    assert dst.proj.weight.dtype == torch.float32
    torch.testing.assert_close(dst.proj.weight, src.proj.weight.bfloat16().float())


@pytest.mark.parametrize(
    ("edit", "category", "named"),
    [
        (lambda s: s.pop("norm.bias"), "missing keys", "norm.bias"),
        (lambda s: s.update({"proj.extra": torch.zeros(1)}), "unexpected keys", "proj.extra"),
        (lambda s: s.update({"proj.weight": torch.zeros(3, 5)}), "shape mismatches",
         r"proj.weight: checkpoint \(3, 5\) vs model \(3, 4\)"),
    ],
)
def test_strict_load_names_each_problem(edit, category, named):
    state = dict(Tiny().state_dict())
    edit(state)
    with pytest.raises(CheckpointError, match=category) as err:
        load_state_dict_strict(Tiny(), state)
    assert err.match(named)


def test_strict_load_truncates_long_lists_and_honours_ignore_prefixes():
    module = torch.nn.Sequential(*[torch.nn.Linear(1, 1) for _ in range(30)])
    with pytest.raises(CheckpointError, match=r"missing keys \(60\).*\.\.\. and 40 more"):
        load_state_dict_strict(module, {})
    state = {k: v for k, v in module.state_dict().items() if not k.startswith("2")}
    state["2.extra"] = torch.zeros(1)
    load_state_dict_strict(module, state, ignore_prefixes=("2",))


def test_torch_file_helpers(tmp_path):
    path = tmp_path / "heads" / "action_head--100_checkpoint.pt"
    save_torch_checkpoint(path, {"module.fc1.weight": torch.ones(2, 2), "fc2.bias": torch.zeros(2)})
    state = strip_prefix(load_torch_file(path), "module.")
    assert sorted(state) == ["fc1.weight", "fc2.bias"] and torch.equal(state["fc1.weight"], torch.ones(2, 2))
    with pytest.raises(CheckpointError, match="missing file .*proprio_projector--1_checkpoint.pt"):
        load_torch_file(tmp_path / "proprio_projector--1_checkpoint.pt")


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return load_tokenizer(tiny_tokenizer_dir())


def test_tiny_tokenizer_has_llama_format(tiny_tokenizer):
    folder = tiny_tokenizer_dir()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LlamaTokenizer"
    assert json.loads((folder / "added_tokens.json").read_text()) == {"<PAD>": 512}
    tok = tiny_tokenizer
    assert len(tok) == 513 and tok.pad_token == "<PAD>" and tok.pad_token_id == 512
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)


def test_tiny_tokenizer_encodes_openvla_prompt(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = tok(PROMPT).input_ids
    assert ids[0] == 1 and tok.eos_token_id not in ids and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == PROMPT
    space = tok.convert_tokens_to_ids("\u2581")
    assert isinstance(space, int) and 2 < space < 512
    assert tok.convert_ids_to_tokens(space) == "\u2581"


SPACES = [
    "In: What action should the robot take to pick  up the bowl?\nOut:", " pick up ", "  a", "a  ", "   ",
    "x\n y", "put the bowl\ton the  plate   ", " ", "Out:  ", "  In: two  spaces  ",
]


@pytest.mark.parametrize("files", ["tokenizer.json", "tokenizer.model"])
def test_tokenizer_gives_llama2_pieces_for_repeated_leading_and_trailing_spaces(tmp_path, files):
    """Both paths (the checkpoint's tokenizer.json as written; SentencePiece itself when only tokenizer.model
    ships) give SentencePiece's ids; transformers' LlamaTokenizer does not for leading spaces."""
    import sentencepiece

    copy_tokenizer_files(tiny_tokenizer_dir(), tmp_path)
    if files == "tokenizer.model":
        (tmp_path / "tokenizer.json").unlink()
    tok = load_tokenizer(tmp_path)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tiny_tokenizer_dir() / "tokenizer.model"))
    for text in SPACES:
        assert tok(text).input_ids == [sp.bos_id(), *sp.encode(text)], text
    assert len(tok) == 513 and tok.convert_tokens_to_ids("<PAD>") == 512 and tok.pad_token_id == 512
    assert tok.decode(tok(SPACES[0]).input_ids, skip_special_tokens=True) == SPACES[0]


def test_load_tokenizer_names_missing_file(tmp_path):
    copied = copy_tokenizer_files(tiny_tokenizer_dir(), tmp_path)
    assert {p.name for p in copied} == {
        "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"
    }
    assert len(load_tokenizer(tmp_path)) == 513
    (tmp_path / "tokenizer.model").unlink()
    assert len(load_tokenizer(tmp_path)) == 513  # tokenizer.json alone is enough
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json.*tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path)
