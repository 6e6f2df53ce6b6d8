"""sdxl_jax.convert.text: name maps equal the reference key sets at full size; tiny SDXL text encoders
built in PyTorch with random weights load through both formats (diffusers folder, sgm single file) and
match the references; exact round trips."""

import collections
import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from test_clip_text import hf_config, randomize, rel_err

from sdxl_jax import conditioning, tokenizer
from sdxl_jax.convert import common
from sdxl_jax.convert import text as text_convert
from sdxl_jax.models import clip_text

PROMPTS = ["a cat", "Hello, world! an over-long prompt " + "very " * 90]


class OpenCLIPBlock(torch.nn.Module):
    """open_clip's ResidualAttentionBlock (torch MultiheadAttention, fused in_proj), as sgm's bigG runs it."""

    def __init__(self, width, heads, mlp):
        super().__init__()
        self.ln_1, self.ln_2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = torch.nn.Sequential(collections.OrderedDict(
            c_fc=torch.nn.Linear(width, mlp), gelu=torch.nn.GELU(), c_proj=torch.nn.Linear(mlp, width)))

    def forward(self, x, mask):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class OpenCLIPText(torch.nn.Module):
    """The text half of open_clip's CLIP (the state dict under sgm's conditioner.embedders.N.model.) and
    sgm FrozenOpenCLIPEmbedder2's forward: penultimate hidden state, pooled = ln_final(last)[argmax] @ P."""

    def __init__(self, c: clip_text.CLIPTextConfig):
        super().__init__()
        self.token_embedding = torch.nn.Embedding(c.vocab_size, c.width)
        self.positional_embedding = torch.nn.Parameter(torch.zeros(c.max_length, c.width))
        self.transformer = torch.nn.Module()
        self.transformer.resblocks = torch.nn.ModuleList(
            [OpenCLIPBlock(c.width, c.heads, c.mlp_dim) for _ in range(c.layers)])
        self.ln_final = torch.nn.LayerNorm(c.width)
        self.text_projection = torch.nn.Parameter(torch.zeros(c.width, c.projection_dim))
        self.logit_scale = torch.nn.Parameter(torch.ones([]))
        mask = torch.full((c.max_length, c.max_length), float("-inf")).triu(1)
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, ids):
        x = self.token_embedding(ids) + self.positional_embedding
        for i, block in enumerate(self.transformer.resblocks):
            if i == len(self.transformer.resblocks) - 1:
                penultimate = x
            x = block(x, self.attn_mask)
        pooled = self.ln_final(x)[torch.arange(x.shape[0]), ids.argmax(-1)] @ self.text_projection
        return penultimate, pooled


def table_keys(table):
    return {key for _, key, _ in table}


def test_full_size_name_maps_equal_reference_key_sets():
    cfg_l, cfg_g = clip_text.PRESETS["clip_l"], clip_text.PRESETS["bigg"]
    with torch.device("meta"):
        hf_l = transformers.CLIPTextModel(hf_config(cfg_l))
        hf_g = transformers.CLIPTextModelWithProjection(hf_config(cfg_g))
        oc_g = OpenCLIPText(cfg_g)
    assert set(hf_l.state_dict()) == table_keys(text_convert.hf_table(cfg_l, prefix=""))
    assert set(hf_g.state_dict()) == table_keys(text_convert.hf_table(cfg_g))
    assert set(oc_g.state_dict()) == table_keys(text_convert.open_clip_table(cfg_g)) | {"logit_scale"}
    # The open_clip layout, counted independently: everything but the CLIP logit scale is the text model.
    assert sum(p.numel() for n, p in oc_g.named_parameters() if n != "logit_scale") == 694_659_840
    for config in (cfg_l, cfg_g):  # every Flax parameter has exactly one row in each table
        ours = set(common.flatten(clip_text.abstract_params(config)))
        for table in (text_convert.hf_table(config), text_convert.open_clip_table(config)):
            paths = [p for p, _, _ in table]
            assert set(paths) == ours and len(paths) == len(ours)


@pytest.fixture(scope="module")
def references():
    cfg = conditioning.PRESETS["tiny_base"]
    ref_l = transformers.CLIPTextModel(hf_config(cfg.text_l)).eval()
    ref_g = transformers.CLIPTextModelWithProjection(hf_config(cfg.text_g)).eval()
    oc_g = OpenCLIPText(cfg.text_g).eval()
    for i, m in enumerate((ref_l, ref_g, oc_g)):
        randomize(m, seed=10 + i)
    ids = tokenizer.load_pair()(PROMPTS)
    with torch.no_grad():
        out_l = ref_l(torch.from_numpy(ids["ids_l"]).long(), output_hidden_states=True)
        out_g = ref_g(torch.from_numpy(ids["ids_g"]).long(), output_hidden_states=True)
        oc_hidden, oc_pooled = oc_g(torch.from_numpy(ids["ids_g"]).long())
    return dict(cfg=cfg, ids=ids, ref_l=ref_l, ref_g=ref_g, oc_g=oc_g,
                hf_crossattn=np.concatenate([out_l.hidden_states[-2], out_g.hidden_states[-2]], -1),
                hf_pooled=out_g.text_embeds.numpy(),
                oc_crossattn=np.concatenate([out_l.hidden_states[-2], oc_hidden], -1),
                oc_pooled=oc_pooled.numpy())


def encode(conditioner, params, ids):
    batch = conditioning.dummy_batch(conditioner.config, ids["ids_g"].shape[0])
    batch.update(ids)
    return jax.jit(conditioner.apply)({"params": params}, batch)


def write_diffusers(folder, ref_l, ref_g):
    ref_l.save_pretrained(os.path.join(folder, "text_encoder"))
    ref_g.save_pretrained(os.path.join(folder, "text_encoder_2"))


def test_diffusers_folder_parity_and_round_trip(tmp_path, references):
    r = references
    write_diffusers(str(tmp_path / "src"), r["ref_l"], r["ref_g"])
    conditioner, params = text_convert.load_text_encoders(str(tmp_path / "src"))
    assert conditioner.config.text_l == r["cfg"].text_l and conditioner.config.text_g == r["cfg"].text_g
    out = encode(conditioner, params, r["ids"])
    assert rel_err(out["crossattn"], r["hf_crossattn"]) <= 1e-4
    assert rel_err(out["vector"][:, :32], r["hf_pooled"]) <= 1e-4

    # Our writer: transformers loads it back unchanged; our loader gives the identical params.
    text_convert.save_text_encoders(str(tmp_path / "out"), conditioner, params, format="diffusers")
    for sub, ref in (("text_encoder", r["ref_l"]), ("text_encoder_2", r["ref_g"])):
        theirs = {k: v.numpy() for k, v in ref.state_dict().items()}
        ours = common.read_safetensors(str(tmp_path / "out" / sub / "model.safetensors"))
        prefix = "text_model." if sub == "text_encoder" else ""  # transformers 5 writes CLIPTextModel bare
        assert set(ours) == {prefix + k for k in theirs}
        for k, v in theirs.items():
            np.testing.assert_array_equal(ours[prefix + k], v)
        reloaded = type(ref).from_pretrained(str(tmp_path / "out" / sub))
        for (k, a), b in zip(ref.state_dict().items(), reloaded.state_dict().values(), strict=True):
            assert torch.equal(a, b), k
    _, again = text_convert.load_text_encoders(str(tmp_path / "out"))
    jax.tree.map(np.testing.assert_array_equal, again, params)
    pair = tokenizer.load_pair(str(tmp_path / "out"))  # tokenizer folders written alongside
    np.testing.assert_array_equal(pair(PROMPTS)["ids_g"], r["ids"]["ids_g"])


def write_sgm(path, ref_l, oc_g, refiner=False):
    tensors = {}
    if not refiner:
        prefix_l = f"{text_convert.SGM_L}text_model."
        tensors.update({prefix_l + k: v.numpy() for k, v in ref_l.state_dict().items()})
        tensors[f"{text_convert.SGM_L}text_model.embeddings.position_ids"] = np.arange(77)[None]
    prefix = text_convert.SGM_G_REFINER if refiner else text_convert.SGM_G_BASE
    tensors.update({prefix + k: v.detach().numpy() for k, v in oc_g.state_dict().items()})
    tensors["model.diffusion_model.label_emb.0.0.weight"] = np.zeros((16, 72 if refiner else 80), np.float32)
    common.write_safetensors(path, tensors)
    return tensors


def test_sgm_single_file_parity_and_round_trip(tmp_path, references):
    r = references
    src = str(tmp_path / "sdxl.safetensors")
    original = write_sgm(src, r["ref_l"], r["oc_g"])
    # Without metadata the head count is inferred as width / 64 (exact for SDXL's encoders, not for tiny);
    # files our writer stores carry the exact config in their metadata.
    conditioner, params = text_convert.load_text_encoders(src)
    inferred = conditioner.config
    assert inferred.size_embed_dim == 8 and inferred.text_g.width == 32 and inferred.text_l.layers == 3
    meta = text_convert._config_to_json(r["cfg"])
    common.write_safetensors(src, original, metadata={text_convert.METADATA_KEY: meta})
    conditioner, params = text_convert.load_text_encoders(src)
    assert conditioner.config == r["cfg"]
    out = encode(conditioner, params, r["ids"])
    assert rel_err(out["crossattn"], r["oc_crossattn"]) <= 1e-4
    assert rel_err(out["vector"][:, :32], r["oc_pooled"]) <= 1e-4

    dst = str(tmp_path / "out.safetensors")
    common.write_safetensors(dst, {"model.diffusion_model.out.2.bias": np.ones(4, np.float32)})
    text_convert.save_text_encoders(dst, conditioner, params, format="sgm")
    written = common.read_safetensors(dst)
    assert "model.diffusion_model.out.2.bias" in written  # other parts of the single file are kept
    expected = {k for k in original if k.startswith("conditioner.") and not k.endswith("position_ids")}
    assert {k for k in written if k.startswith("conditioner.")} == expected
    for k in expected - {text_convert.SGM_G_BASE + "logit_scale"}:
        np.testing.assert_array_equal(written[k], original[k], err_msg=k)
    conditioner2, again = text_convert.load_text_encoders(dst)
    assert conditioner2.config == conditioner.config
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_refiner_layouts(tmp_path, references):
    r = references
    src = str(tmp_path / "refiner.safetensors")
    write_sgm(src, None, r["oc_g"], refiner=True)
    conditioner, params = text_convert.load_text_encoders(src)
    c = conditioner.config
    assert c.text_l is None and c.is_refiner and not c.zero_text_uncond and c.size_embed_dim == 8
    assert set(params) == {"text_g"}
    text_convert.save_text_encoders(str(tmp_path / "diffusers"), conditioner, params)
    assert not os.path.exists(tmp_path / "diffusers" / "text_encoder")
    with open(tmp_path / "diffusers" / "text_encoder_2" / "config.json") as f:
        assert json.load(f)["architectures"] == ["CLIPTextModelWithProjection"]
    conditioner2, again = text_convert.load_text_encoders(str(tmp_path / "diffusers"))
    assert conditioner2.config.is_refiner and conditioner2.config.text_l is None
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_errors_say_what_is_wrong(tmp_path, references):
    with pytest.raises(common.CheckpointError, match="no such file"):
        text_convert.load_text_encoders(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.CheckpointError, match="text_encoder_2"):
        text_convert.load_text_encoders(str(tmp_path / "empty"))
    src = str(tmp_path / "unet_only.safetensors")
    common.write_safetensors(src, {"model.diffusion_model.out.2.bias": np.ones(4, np.float32)})
    with pytest.raises(common.CheckpointError, match="bigG"):
        text_convert.load_text_encoders(src)
    folder = str(tmp_path / "broken")
    write_diffusers(folder, references["ref_l"], references["ref_g"])
    cfg_path = os.path.join(folder, "text_encoder", "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["num_hidden_layers"] = 2
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(common.CheckpointError, match="unexpected text-encoder tensors"):
        text_convert.load_text_encoders(folder)
