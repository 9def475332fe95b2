"""FluxLoRANetwork / LoRAModule / parse_network_args against hand-computed expectations (spec §5)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open
from torch import nn

from fluxpipe.errors import CheckpointError
from fluxpipe.lora.files import apply_lora
from fluxpipe.lora.network import FluxLoRANetwork, LoRAModule, LoraSpec, parse_network_args
from fluxpipe.models.flux import PRESETS, Flux, tiny

WIDTH = 64  # tiny DiT hidden size = tiny text-encoder width


@pytest.fixture(scope="module")
def text_encoders() -> tuple[nn.Module, nn.Module]:
    """A 2-layer CLIP-L-shaped and a 2-block T5-shaped encoder, width 64."""
    from fluxpipe.models import text_encoders as te

    torch.manual_seed(0)
    clip = te.build_clip(
        te.clip_config_from_shapes(
            {
                "text_model.embeddings.token_embedding.weight": (100, WIDTH),
                "text_model.embeddings.position_embedding.weight": (16, WIDTH),
                "text_model.encoder.layers.0.mlp.fc1.weight": (2 * WIDTH, WIDTH),
                "text_model.encoder.layers.1.mlp.fc1.weight": (2 * WIDTH, WIDTH),
            }
        )
    )
    t5 = te.build_t5(
        te.t5_config_from_shapes(
            {
                "shared.weight": (100, WIDTH),
                "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (8, 2),
                "encoder.block.0.layer.0.SelfAttention.q.weight": (WIDTH, WIDTH),
                "encoder.block.0.layer.1.DenseReluDense.wi_0.weight": (2 * WIDTH, WIDTH),
                "encoder.block.1.layer.0.SelfAttention.q.weight": (WIDTH, WIDTH),
            }
        )
    )
    return clip.eval(), t5.eval()


def tiny_flux(seed: int = 0) -> Flux:
    torch.manual_seed(seed)
    return Flux(tiny(vec_in_dim=WIDTH, context_in_dim=WIDTH)).eval()


def flux_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "img": torch.randn(2, 4, 64, generator=g),
        "img_ids": torch.zeros(2, 4, 3),
        "txt": torch.randn(2, 3, WIDTH, generator=g),
        "txt_ids": torch.zeros(2, 3, 3),
        "timesteps": torch.tensor([0.3, 0.8]),
        "y": torch.randn(2, WIDTH, generator=g),
        "guidance": torch.tensor([3.5, 3.5]),
    }


def names(net: FluxLoRANetwork) -> set[str]:
    return {m.lora_name for m in net.loras}


def randomize_up(net: FluxLoRANetwork, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.loras:
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.1)


# ---- counts, names, shapes --------------------------------------------------------------------------------


def test_full_dev_model_counts_on_meta() -> None:
    with torch.device("meta"):
        flux = Flux(PRESETS["dev"])
    net = FluxLoRANetwork(flux, LoraSpec(network_dim=16))
    n_double = sum(m.lora_name.startswith("lora_unet_double_blocks_") for m in net.unet_loras)
    n_single = sum(m.lora_name.startswith("lora_unet_single_blocks_") for m in net.unet_loras)
    assert (n_double, n_single, len(net.unet_loras), len(net.text_encoder_loras)) == (190, 114, 304, 0)
    # spec §5.2: 4 786 176 parameters per unit of rank
    assert sum(p.numel() for p in net.parameters()) == 4_786_176 * 16 == 76_578_816
    mods = dict(net.named_children())
    shapes = {
        n: (tuple(mods[n].lora_down.weight.shape), tuple(mods[n].lora_up.weight.shape))
        for n in (
            "lora_unet_double_blocks_0_img_attn_qkv",
            "lora_unet_single_blocks_37_linear1",
            "lora_unet_single_blocks_0_linear2",
            "lora_unet_double_blocks_18_img_mod_lin",
            "lora_unet_single_blocks_0_modulation_lin",
        )
    }
    assert shapes == {
        "lora_unet_double_blocks_0_img_attn_qkv": ((16, 3072), (9216, 16)),
        "lora_unet_single_blocks_37_linear1": ((16, 3072), (21504, 16)),
        "lora_unet_single_blocks_0_linear2": ((16, 15360), (3072, 16)),
        "lora_unet_double_blocks_18_img_mod_lin": ((16, 3072), (18432, 16)),
        "lora_unet_single_blocks_0_modulation_lin": ((16, 3072), (9216, 16)),
    }
    assert mods["lora_unet_double_blocks_0_img_attn_qkv"].alpha.shape == ()
    assert not any("final_layer" in n for n in names(net))
    with_in = FluxLoRANetwork(flux, LoraSpec(network_dim=16, in_dims=(4, 4, 4, 4, 4)))
    assert sorted(names(with_in) - names(net)) == [
        "lora_unet_guidance_in_in_layer",
        "lora_unet_guidance_in_out_layer",
        "lora_unet_img_in",
        "lora_unet_time_in_in_layer",
        "lora_unet_time_in_out_layer",
        "lora_unet_txt_in",
        "lora_unet_vector_in_in_layer",
        "lora_unet_vector_in_out_layer",
    ]


def test_key_names_and_training_scope(text_encoders) -> None:  # noqa: ANN001
    clip, t5 = text_encoders
    flux = tiny_flux()
    net = FluxLoRANetwork(flux, LoraSpec(network_dim=3), clip_l=clip, t5xxl=t5)
    got = names(net)
    assert {
        "lora_unet_double_blocks_0_img_attn_qkv",
        "lora_unet_double_blocks_1_txt_mlp_2",
        "lora_unet_single_blocks_1_modulation_lin",
        "lora_unet_single_blocks_0_linear1",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te1_text_model_encoder_layers_1_mlp_fc2",
    } <= got
    assert len(net.unet_loras) == 2 * 10 + 2 * 3
    assert len(net.text_encoder_loras) == 2 * 6  # CLIP only: T5 needs train_t5xxl
    sd = net.state_dict_kohya()
    assert set(sd) == {f"{n}.{k}" for n in got for k in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert sd["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"].shape == (3, WIDTH)
    assert sd["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"].shape == (2 * WIDTH, 3)
    assert sd["lora_unet_double_blocks_0_img_attn_qkv.alpha"].shape == ()
    assert float(sd["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 1.0  # default network_alpha
    # parameters live in the network, not in the base models: keys there are unchanged
    assert not any("lora" in k for k in flux.state_dict())

    with_t5 = FluxLoRANetwork(flux, LoraSpec(train_t5xxl=True), clip_l=clip, t5xxl=t5)
    te3 = {m.lora_name for m in with_t5.text_encoder_loras if m.lora_name.startswith("lora_te3")}
    assert len(te3) == 2 * 7
    assert {
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q",
        "lora_te3_encoder_block_1_layer_0_SelfAttention_o",
        "lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_1",
        "lora_te3_encoder_block_0_layer_1_DenseReluDense_wo",
    } <= te3
    unet_only = FluxLoRANetwork(flux, LoraSpec(), clip_l=clip, t5xxl=t5, train_text_encoder=False)
    assert unet_only.text_encoder_loras == [] and len(unet_only.unet_loras) == 26
    te_only = FluxLoRANetwork(None, LoraSpec(), clip_l=clip, train_unet=False)
    assert te_only.unet_loras == [] and len(te_only.text_encoder_loras) == 12
    with pytest.raises(ValueError, match="train_t5xxl=True needs the T5-XXL model"):
        FluxLoRANetwork(flux, LoraSpec(train_t5xxl=True), clip_l=clip)


# ---- block / type / regex selection -----------------------------------------------------------------------


def test_block_selection_type_dims_and_in_dims() -> None:
    flux = tiny_flux()
    single = names(FluxLoRANetwork(flux, LoraSpec(train_blocks="single")))
    assert single == {
        f"lora_unet_single_blocks_{i}_{n}" for i in (0, 1) for n in ("linear1", "linear2", "modulation_lin")
    }
    double0 = names(FluxLoRANetwork(flux, LoraSpec(train_double_block_indices=frozenset({0}))))
    assert not any(n.startswith("lora_unet_double_blocks_1_") for n in double0)
    assert sum(n.startswith("lora_unet_double_blocks_0_") for n in double0) == 10
    assert sum(n.startswith("lora_unet_single_blocks_") for n in double0) == 6
    no_single = names(FluxLoRANetwork(flux, LoraSpec(**parse_network_args(["train_single_block_indices=none"]))))
    assert not any("single" in n for n in no_single) and len(no_single) == 20

    net = FluxLoRANetwork(flux, LoraSpec(network_dim=4, img_attn_dim=0, txt_mlp_dim=2, single_mod_dim=5))
    ranks = {m.lora_name: m.rank for m in net.loras}
    assert not any("img_attn" in n for n in ranks)
    assert ranks["lora_unet_double_blocks_0_txt_mlp_0"] == 2 and ranks["lora_unet_double_blocks_0_txt_attn_qkv"] == 4
    assert ranks["lora_unet_single_blocks_1_modulation_lin"] == 5 and ranks["lora_unet_single_blocks_1_linear1"] == 4
    assert len(ranks) == 26 - 4

    with_in = {m.lora_name: m.rank for m in FluxLoRANetwork(flux, LoraSpec(in_dims=(4, 0, 2, 0, 3))).loras}
    assert {n: r for n, r in with_in.items() if "blocks" not in n} == {
        "lora_unet_img_in": 4,
        "lora_unet_vector_in_in_layer": 2,
        "lora_unet_vector_in_out_layer": 2,
        "lora_unet_txt_in": 3,
    }
    with pytest.raises(ValueError, match=r"train_double_block_indices: index 2 out of range.*2 blocks \(0-1\)"):
        FluxLoRANetwork(flux, LoraSpec(train_double_block_indices=frozenset({0, 2})))


def test_reg_dims_first_match_wins_and_bypasses_filters() -> None:
    spec = LoraSpec(
        **parse_network_args(
            [
                "train_double_block_indices=0",
                "img_attn_dim=0",
                "network_reg_dims=double_blocks_1_img_attn_qkv=7,img_attn=6,img_attn_qkv=9,txt_mod=0,img_in=5",
            ]
        )
    )
    ranks = {m.lora_name: m.rank for m in FluxLoRANetwork(tiny_flux(), spec).loras}
    # block 1 is excluded and img_attn_dim is 0, yet the regexes re-enable those modules (code, not docs)
    assert ranks["lora_unet_double_blocks_1_img_attn_qkv"] == 7  # first match, not the later img_attn_qkv=9
    assert ranks["lora_unet_double_blocks_1_img_attn_proj"] == 6
    assert ranks["lora_unet_double_blocks_0_img_attn_qkv"] == 6
    assert "lora_unet_double_blocks_0_txt_mod_lin" not in ranks  # rank 0 from a regex skips the module
    assert "lora_unet_double_blocks_1_txt_attn_qkv" not in ranks  # no regex match: block filter applies
    assert "lora_unet_img_in" not in ranks  # conditioning layers are candidates only with in_dims
    assert ranks["lora_unet_double_blocks_0_img_mlp_0"] == 4
    assert not any(n.startswith("lora_unet_double_blocks_1_") and "img_attn" not in n for n in ranks)


# ---- module maths -----------------------------------------------------------------------------------------


def test_module_output_by_hand() -> None:
    linear = nn.Linear(3, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]]))
        linear.bias.copy_(torch.tensor([0.5, -1.0]))
    lora = LoRAModule("x", linear, rank=2, alpha=1.0, multiplier=0.5)
    with torch.no_grad():
        lora.lora_down.weight.copy_(torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
        lora.lora_up.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 4.0]]))
    lora.apply_to()
    x = torch.tensor([[1.0, 2.0, 3.0]])
    # W x + b = [7.5, 1]; down x = [3, 3]; up = [6, 12]; × multiplier 0.5 × scale 1/2 = [1.5, 3]
    torch.testing.assert_close(linear(x), torch.tensor([[9.0, 4.0]]))
    assert lora.scale == 0.5 and float(lora.alpha) == 1.0
    assert LoRAModule("y", nn.Linear(3, 2), rank=4, alpha=None).scale == 1.0
    assert LoRAModule("z", nn.Linear(3, 2), rank=4, alpha=0).scale == 1.0
    # LoRA weights in their own dtype, output in the input's dtype
    half = LoRAModule("h", nn.Linear(3, 2).bfloat16(), rank=2, alpha=2.0)
    half.apply_to()
    assert half._org[0](x.bfloat16()).dtype == torch.bfloat16 and half.lora_up.weight.dtype == torch.float32


def test_dropouts_only_in_training() -> None:
    linear = nn.Linear(4, 3)
    lora = LoRAModule("x", linear, rank=1, alpha=1.0, rank_dropout=0.5)
    with torch.no_grad():
        lora.lora_down.weight.fill_(1.0)
        lora.lora_up.weight.fill_(1.0)
    lora.apply_to()
    x = torch.ones(64, 5, 4)
    base = x @ linear.weight.T + linear.bias
    lora.eval()
    torch.testing.assert_close(linear(x) - base, torch.full((64, 5, 3), 4.0))
    lora.train()
    torch.manual_seed(0)
    delta = linear(x) - base  # per sample: the one rank channel is dropped (0) or kept and scaled by 1/(1-0.5)
    per_sample = delta[:, 0, 0]
    assert set(per_sample.round().tolist()) == {0.0, 8.0}
    assert torch.equal(delta, per_sample[:, None, None].expand_as(delta))
    lora.rank_dropout, lora.module_dropout = None, 1.0
    torch.testing.assert_close(linear(x), base)  # branch always skipped
    lora.module_dropout, lora.dropout = None, 0.5
    torch.manual_seed(0)
    assert set(torch.unique((linear(x) - base).round()).tolist()) <= {0.0, 8.0}


def test_zero_up_is_identity_and_remove_restores() -> None:
    flux, inputs = tiny_flux(), flux_inputs()
    with torch.no_grad():
        expected = flux(**inputs)
        net = FluxLoRANetwork(flux, LoraSpec(network_dim=4, in_dims=(2, 2, 2, 2, 2)))
        net.apply_to()
        assert torch.equal(flux(**inputs), expected)
        randomize_up(net)
        assert not torch.allclose(flux(**inputs), expected)
        net.remove()
        assert torch.equal(flux(**inputs), expected)
    assert not any("forward" in m.__dict__ for m in flux.modules())


def test_merged_file_matches_training_forward(text_encoders) -> None:  # noqa: ANN001
    clip, _ = text_encoders
    flux, inputs = tiny_flux(), flux_inputs()
    merged_flux, merged_clip = copy.deepcopy(flux), copy.deepcopy(clip)
    net = FluxLoRANetwork(
        flux, LoraSpec(network_dim=4, network_alpha=2.0, in_dims=(2, 2, 2, 2, 2)), clip_l=clip, multiplier=0.7
    )
    randomize_up(net)
    net.apply_to()
    assert apply_lora(merged_flux, net.state_dict_kohya(), 0.7, clip_l=merged_clip) == len(net.loras)
    ids = torch.tensor([[1, 5, 9, 99]])
    with torch.no_grad():
        torch.testing.assert_close(merged_flux(**inputs), flux(**inputs), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(merged_clip(ids).pooler_output, clip(ids).pooler_output, atol=1e-5, rtol=1e-4)
    net.remove()


# ---- loading, saving, param groups ------------------------------------------------------------------------


def test_load_kohya_round_trip_and_strict_errors(tmp_path) -> None:  # noqa: ANN001
    flux = tiny_flux()
    src = FluxLoRANetwork(flux, LoraSpec(network_dim=2, network_alpha=4.0, train_blocks="double"))
    randomize_up(src)
    src.save(tmp_path / "l.safetensors", {"ss_network_dim": "2"}, dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "l.safetensors"), "pt") as f:
        assert f.metadata() == {"ss_network_dim": "2"}
        sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert {t.dtype for t in sd.values()} == {torch.bfloat16} and len(sd) == 20 * 3

    dst = FluxLoRANetwork(flux, LoraSpec(network_dim=2, network_alpha=1.0, train_blocks="double"))
    assert dst.load_kohya(sd) == ([], [])
    m = dict(dst.named_children())["lora_unet_double_blocks_1_txt_mlp_2"]
    assert m.scale == 2.0  # alpha 4 from the file, rank 2
    torch.testing.assert_close(m.lora_up.weight, sd["lora_unet_double_blocks_1_txt_mlp_2.lora_up.weight"].float())

    full = FluxLoRANetwork(flux, LoraSpec(network_dim=2))
    with pytest.raises(CheckpointError, match=r"18 missing \(lora_unet_single_blocks_0_linear1.alpha.*0 unexpected"):
        full.load_kohya(sd)
    assert full.load_kohya(sd, strict=False)[0][0] == "lora_unet_single_blocks_0_linear1.alpha"
    wrong_rank = FluxLoRANetwork(flux, LoraSpec(network_dim=3, train_blocks="double"))
    with pytest.raises(CheckpointError, match="other shapes"):
        wrong_rank.load_kohya(sd)


def test_param_groups_lrs_and_loraplus(text_encoders) -> None:  # noqa: ANN001
    clip, t5 = text_encoders
    net = FluxLoRANetwork(tiny_flux(), LoraSpec(network_dim=2, train_t5xxl=True), clip_l=clip, t5xxl=t5)
    groups = net.param_groups(learning_rate=1e-4, unet_lr=1e-3, text_encoder_lr=[1e-5, 2e-5], loraplus_lr_ratio=16)
    summary = [(g["description"], g["lr"], len(g["params"])) for g in groups]
    assert summary == [
        ("textencoder 1", 1e-5, 12),
        ("textencoder 1 plus", 1e-5 * 16, 12),
        ("textencoder 2", 2e-5, 14),
        ("textencoder 2 plus", 2e-5 * 16, 14),
        ("unet", 1e-3, 26),
        ("unet plus", 1e-3 * 16, 26),
    ]
    ups = {id(m.lora_up.weight) for m in net.loras}
    assert all((id(p) in ups) == g["description"].endswith("plus") for g in groups for p in g["params"])

    frozen_te = net.param_groups(
        learning_rate=1e-4,
        text_encoder_lr=[0.0],
        loraplus_unet_lr_ratio=4,
        reg_lrs=[("single_blocks", 5e-4), ("double_blocks_1", 0.0), ("blocks_0", 1.0)],
    )
    # text encoders frozen (lr 0), double block 1 frozen by its regex lr 0, single blocks at their own lr
    assert [(g["description"], g["lr"], len(g["params"])) for g in frozen_te] == [
        ("unet reg_lr_0", 5e-4, 6),
        ("unet reg_lr_0 plus", pytest.approx(2e-3), 6),
        ("unet reg_lr_2", 1.0, 10),
        ("unet reg_lr_2 plus", 4.0, 10),
    ]
    unet = net.param_groups(learning_rate=1e-4, loraplus_unet_lr_ratio=4, reg_lrs=[("double_blocks_1", 0.0)])
    assert [(g["description"], g["lr"], len(g["params"])) for g in unet][-2:] == [
        ("unet", 1e-4, 16),
        ("unet plus", pytest.approx(4e-4), 16),
    ]  # block 0 (10) + singles (6)
    default = net.param_groups(learning_rate=3e-4)
    assert {g["lr"] for g in default} == {3e-4} and sum(len(g["params"]) for g in default) == 2 * 52
    opt = torch.optim.AdamW(groups)  # the groups are valid optimizer input
    assert len(opt.param_groups) == 6


# ---- network_args -----------------------------------------------------------------------------------------


def test_parse_network_args_values() -> None:
    got = parse_network_args(
        [
            "train_blocks=single",
            "train_double_block_indices=0,1,4-5,7",
            "train_single_block_indices=all",
            "in_dims=[4,0,0,0,4]",
            "img_mod_dim=0",
            "rank_dropout=0.1",
            "module_dropout=0.2",
            "train_t5xxl=True",
            "verbose=false",
            "network_reg_dims=lora_unet_single.*=8, img_attn=4",
            "network_reg_lrs=txt_in=1e-5",
            "loraplus_lr_ratio=16",
            "conv_dim=4",
            "split_qkv=False",
        ]
    )
    assert got == {
        "train_blocks": "single",
        "train_double_block_indices": frozenset({0, 1, 4, 5, 7}),
        "train_single_block_indices": None,
        "in_dims": (4, 0, 0, 0, 4),
        "img_mod_dim": 0,
        "rank_dropout": 0.1,
        "module_dropout": 0.2,
        "train_t5xxl": True,
        "verbose": False,
        "network_reg_dims": (("lora_unet_single.*", 8), ("img_attn", 4)),
        "network_reg_lrs": (("txt_in", 1e-5),),
        "loraplus_lr_ratio": 16.0,
    }
    assert parse_network_args(["in_dims=1, 2,3,4,5", "train_double_block_indices="]) == {
        "in_dims": (1, 2, 3, 4, 5),
        "train_double_block_indices": frozenset(),
    }
    spec = LoraSpec(dropout=0.1, **parse_network_args(["single_dim=8"]))
    # reference defaults: rank 4, alpha 1
    assert (spec.network_dim, spec.network_alpha, spec.dropout, spec.single_dim) == (4, 1.0, 0.1, 8)


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("img_atn_dim=4", "unknown key 'img_atn_dim'"),
        ("train_t5xxl", "expected key=value"),
        ("img_attn_dim=four", r"img_attn_dim='four'"),
        ("single_dim=-1", "single_dim=.-1.: -1 is negative"),
        ("train_double_block_indices=3-1", "'3-1' is not a block index or an increasing range"),
        ("train_single_block_indices=0,x", "'x' is not a block index"),
        ("in_dims=[4,0,0,4]", "needs 5 ranks"),
        ("network_reg_dims=img_attn(=4", "bad regex"),
        ("network_reg_dims=img_attn", "is not regex=value"),
        ("train_t5xxl=yes", "yes is not True or False"),
        ("split_qkv=True", r"split_qkv='True': true is not supported"),
        ("loraplus_lr_ratio=0", "not a positive number"),
    ],
)
def test_parse_network_args_errors(arg: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_network_args([arg])


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="train_blocks must be all, single or double"):
        LoraSpec(**parse_network_args(["train_blocks=both"]))
    with pytest.raises(ValueError, match=r"LoRA rank_dropout must be in \[0, 1\), got 1.0"):
        LoraSpec(rank_dropout=1.0)
    with pytest.raises(ValueError, match="given twice"):
        parse_network_args(["single_dim=2", "single_dim=3"])
