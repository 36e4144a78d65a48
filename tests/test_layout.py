"""QK-OV layout: tiling, functional head masking, wrappers and error messages."""

import pytest
import torch

import sketchfisher as sf
from tiny_models import ARCHS, generic_loss, make_batches, make_model

ARCH_NAMES = sorted(ARCHS)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_head_blocks_tile_each_projection_exactly_once(arch):
    model = make_model(arch)
    layout = sf.layout_for(model)
    params = dict(model.named_parameters())
    owners = {}
    for layer in range(layout.num_layers):
        counts = {}
        for block in sf.BLOCKS:
            for hb in layout.head_blocks(layer, block):
                c = counts.setdefault(hb.param_name, torch.zeros_like(params[hb.param_name], dtype=torch.int32))
                hb.select(c).add_(1)
        for name, c in counts.items():
            assert torch.equal(c, torch.ones_like(c)), f"{name}: entries covered {c.unique().tolist()} times"
            assert owners.setdefault(name, layer) == layer, f"{name} belongs to layers {owners[name]} and {layer}"
    assert set(owners) == set(layout.params)  # every projection of the layout, each in one layer


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_base_model_and_wrapper_agree(arch):
    base, wrapped = make_model(arch), make_model(arch, wrapper=True)
    lb, lw = sf.layout_for(base), sf.layout_for(wrapped)
    assert (lb.num_layers, lb.num_heads, lb.num_kv_heads, lb.head_dim) == \
           (lw.num_layers, lw.num_heads, lw.num_kv_heads, lw.head_dim)
    wnames = dict(wrapped.named_parameters())
    for layer in range(lb.num_layers):
        for block in sf.BLOCKS:
            for h in range(lb.num_heads):
                a, b = lb.head_block(layer, block, h), lw.head_block(layer, block, h)
                assert b.param_name.endswith(a.param_name)  # the wrapper's prefix (none when it is its own base)
                assert b.param_name in wnames
                assert (a.start, a.stop, a.role, a.transposed) == (b.start, b.stop, b.role, b.transposed)


def _masked_head_grads(model, layout, layer, heads):
    """Gradient of the summed loss with heads' attention outputs zeroed before the O projection."""
    o_name = layout.head_block(layer, "O", 0).param_name
    o_module = model.get_submodule(o_name.rsplit(".", 1)[0])
    dv = layout.dims.v_head_dim
    keep = torch.ones(layout.num_heads * dv)
    for h in heads:
        keep[h * dv:(h + 1) * dv] = 0

    def hook(_module, args):
        return (args[0] * keep.to(args[0]),) + tuple(args[1:])

    handle = o_module.register_forward_pre_hook(hook)
    try:
        batch = make_batches(3, 3, seed=1)[0]
        model.zero_grad()
        generic_loss(model, batch).sum().backward()
    finally:
        handle.remove()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if n in layout.params}


# OLMo-2 normalises the whole Q and K projections (all heads together) before splitting them into heads: a
# masked head's Q/K rows still receive gradient through the other heads' normalisation. Its V and O blocks
# are the head's own; its Q/K blocks are sliced correctly but not isolated from the other heads.
CROSS_HEAD_QK_NORM = {"olmo2"}


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_masking_a_head_zeroes_exactly_its_blocks(arch):
    model = make_model(arch)
    layout = sf.layout_for(model)
    gs = layout.dims.group_size
    for layer in (0, layout.num_layers - 1):
        # Mask the whole query-head group of kv head 1 so that its K/V blocks lose all gradient too.
        kv = 1 if layout.num_kv_heads > 1 else 0
        masked = list(range(kv * gs, (kv + 1) * gs))
        grads = _masked_head_grads(model, layout, layer, masked)
        for block in sf.BLOCKS:
            for h in range(layout.num_heads):
                hb = layout.head_block(layer, block, h)
                part = hb.select(grads[hb.param_name])
                if h in masked and not (arch in CROSS_HEAD_QK_NORM and block in ("Q", "K")):
                    assert torch.count_nonzero(part) == 0, f"{hb.key} should have zero gradient"
                else:
                    assert part.abs().sum() > 0, f"{hb.key} unexpectedly has zero gradient"


def test_gqa_single_masked_head_keeps_shared_kv():
    model = make_model("llama_gqa")
    layout = sf.layout_for(model)
    grads = _masked_head_grads(model, layout, 0, [1])
    for block, zero in (("Q", True), ("O", True), ("K", False), ("V", False)):
        hb = layout.head_block(0, block, 1)
        assert (torch.count_nonzero(hb.select(grads[hb.param_name])) == 0) == zero, block


def test_gqa_and_head_dim_geometry():
    llama = sf.layout_for(make_model("llama_gqa"))
    assert (llama.num_heads, llama.num_kv_heads, llama.head_dim) == (8, 2, 4)
    assert llama.head_block(0, "K", 3).start == 0 and llama.head_block(0, "K", 4).start == 4
    assert llama.head_index("V").tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    qwen = sf.layout_for(make_model("qwen2_headdim"))
    assert qwen.head_dim == 12 and qwen.head_block(1, "O", 3).start == 36
    phi = sf.layout_for(make_model("phi3_fused_gqa"))
    v = phi.head_block(0, "V", 7)  # kv head 1: after 8 Q heads and 2 K heads of width 4
    assert (v.start, v.stop) == (8 * 4 + 2 * 4 + 4, 8 * 4 + 2 * 4 + 8)


def test_gpt2_conv1d_orientation():
    layout = sf.layout_for(make_model("gpt2"))
    q, o = layout.head_block(0, "Q", 2), layout.head_block(0, "O", 2)
    assert q.storage_axis == 1 and o.storage_axis == 0  # Q columns of c_attn, O rows of c_proj
    w = torch.arange(32 * 96.0).reshape(32, 96)
    assert torch.equal(q.select(w), w[:, 16:24])
    assert torch.equal(layout.head_block(0, "V", 0).select(w), w[:, 64:72])
    assert torch.equal(o.select(torch.arange(32 * 32.0).reshape(32, 32)), torch.arange(32 * 32.0).reshape(32, 32)[16:24])


def test_select_bias():
    layout = sf.layout_for(make_model("qwen2_headdim"))
    hb = layout.head_block(0, "K", 3)  # kv head 1
    assert torch.equal(hb.select_bias(torch.arange(24.0)), torch.arange(12.0, 24.0))
    with pytest.raises(sf.LayoutError, match="O-projection bias"):
        layout.head_block(0, "O", 0).select_bias(torch.zeros(32))


def test_unknown_model_lists_supported_types_and_how_to_declare():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(sf.LayoutError, match=r"supported: .*gpt2.*llama.*AttentionSpec"):
        sf.layout_for(model)


def test_layout_mismatching_weights_raises_with_shapes():
    model = make_model("llama_gqa")
    model.config.num_key_value_heads = 4  # lie about the geometry
    with pytest.raises(sf.LayoutError, match=r"k_proj.weight' has shape \(8, 32\), expected \(16, 32\)"):
        sf.layout_for(model)


def test_select_rejects_wrong_shape():
    hb = sf.layout_for(make_model("bert")).head_block(0, "Q", 0)
    with pytest.raises(sf.LayoutError, match=r"does not end in the shape"):
        hb.select(torch.zeros(3, 5))


class ToyAttention(torch.nn.Module):
    """A hand-written multi-head attention built from nn.Linear: the user-declared layout case."""

    def __init__(self, d=16, heads=4):
        super().__init__()
        self.heads = heads
        self.wq, self.wk, self.wv, self.wo = (torch.nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        B, T, D = x.shape
        split = lambda t: t.view(B, T, self.heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.wq(x)), split(self.wk(x)), split(self.wv(x))
        a = torch.softmax(q @ k.transpose(-1, -2) / (D // self.heads) ** 0.5, -1) @ v
        return self.wo(a.transpose(1, 2).reshape(B, T, D))


class ToyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(ToyAttention() for _ in range(2))

    def forward(self, x):
        for blk in self.blocks:
            x = x + blk(x)
        return x


def test_user_declared_layout_for_custom_model():
    torch.manual_seed(0)
    model = ToyModel()
    spec = sf.AttentionSpec(layer="blocks.{layer}", q="wq", k="wk", v="wv", o="wo")
    layout = sf.layout_for(model, spec=spec, dims=sf.Dims(num_layers=2, num_heads=4, num_kv_heads=4, head_dim=4,
                                                          hidden_size=16))
    assert layout.head_block(1, "O", 2).param_name == "blocks.1.wo.weight"
    x = torch.randn(2, 5, 16)
    keep = torch.ones(16)
    keep[8:12] = 0
    handle = model.blocks[1].wo.register_forward_pre_hook(lambda m, a: (a[0] * keep,))
    model(x).pow(2).sum().backward()
    handle.remove()
    grads = dict(model.named_parameters())
    for block in sf.BLOCKS:
        for h in range(4):
            hb = layout.head_block(1, block, h)
            zero = torch.count_nonzero(hb.select(grads[hb.param_name].grad)) == 0
            assert zero == (h == 2), hb.key


def test_spec_validation_messages():
    with pytest.raises(sf.LayoutError, match="either qkv"):
        sf.AttentionSpec(layer="h.{layer}", o="o", q="q")
    with pytest.raises(sf.LayoutError, match="multiple of num_kv_heads"):
        sf.Dims(num_layers=1, num_heads=6, num_kv_heads=4, head_dim=2, hidden_size=12)
    with pytest.raises(sf.LayoutError, match=r"layer must be in \[0, 2\)"):
        sf.layout_for(make_model("bert")).head_block(5, "Q", 0)
    with pytest.raises(sf.LayoutError, match="block must be one of"):
        sf.layout_for(make_model("bert")).head_block(0, "X", 0)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_moe_models_collect_attention_and_every_linear(arch, caplog):
    """Attention is dense in MoE models: head blocks work as for Llama; with modules='all' the dense linear
    layers (shared experts, router) are collected, and fused expert tensors are named as not collected."""
    model = make_model(arch, wrapper=True)
    batches = make_batches(4, 2, seed=3)
    exact = sf.analyze(model, generic_loss, batches, batches, codec=sf.Factors(), modules="all")
    assert torch.isfinite(exact.head_means()).all()
    names = exact.context.stats_a.names()
    linear_mlp = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".mlp." in n]
    assert all(f"{n}.weight" in names for n in linear_mlp)  # shared experts and linear routers are collected
    fused = [n for n, p in model.named_parameters() if p.ndim >= 3]
    if fused:  # experts stored as one tensor per layer: said, and not collected
        assert "not collected" in caplog.text and not set(fused) & set(names)


def test_vit_on_image_inputs():
    """The same machinery on pixels: a tiny ViT, random images, a per-sample loss on the [CLS] state."""
    import transformers as hf

    torch.manual_seed(0)
    model = hf.ViTModel(hf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                     image_size=16, patch_size=8, num_channels=3)).eval()
    u = torch.randn(32)

    def cls_loss(m, batch):
        return (m(pixel_values=batch["pixel_values"]).last_hidden_state[:, 0] @ u) ** 2

    images = [{"pixel_values": torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(s))} for s in (1, 2)]
    layout = sf.layout_for(model)
    assert layout.model_type == "vit" and layout.num_heads == 4
    exact = sf.analyze(model, cls_loss, images[:1], images[1:], codec=sf.Exact())
    factors = sf.analyze(model, cls_loss, images[:1], images[1:], codec=sf.Factors())
    torch.testing.assert_close(factors.scores, exact.scores, rtol=1e-4, atol=1e-6 * float(exact.scores.abs().max()))


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_encoder_decoder_stacks(arch):
    """Encoder self-attention, decoder self-attention and cross-attention follow each other; every
    attention projection of the model is in exactly one stack."""
    model = make_model(arch, wrapper=True)
    layout = sf.layout_for(model)
    assert [s[0] for s in layout.stacks] == ["encoder", "decoder", "cross"]
    assert layout.num_layers == 2 + 1 + 1 and layout.layer_name(3) == "cross 0" and layout.layer_name(0) == "encoder 0"
    again = sf.Layout.from_dict(layout.to_dict())
    assert again.stacks == layout.stacks and again.to_dict() == layout.to_dict()
    batches = make_batches(4, 2, seed=5)
    exact = sf.analyze(model, generic_loss, batches, batches, codec=sf.Exact())
    factors = sf.analyze(model, generic_loss, batches, batches, codec=sf.Factors())
    torch.testing.assert_close(factors.scores, exact.scores, rtol=1e-4, atol=1e-6 * float(exact.scores.abs().max()))
    assert torch.isfinite(exact.head_means()[3]).all()  # cross-attention scored



@pytest.mark.parametrize("arch", ["bart", "mbart"])
def test_encoder_decoder_with_unequal_head_counts_is_refused_by_name(arch):
    """Each stack reads its own head count: a decoder with other heads than the encoder is never sliced with the
    encoder's count (the shapes fit, so it would give wrong numbers); the shared head grid refuses it clearly."""
    cfg_cls, _, wrap_cls, kw = ARCHS[arch]
    config = cfg_cls(**{**kw, "decoder_attention_heads": 2})
    model = wrap_cls(config).eval()
    with pytest.raises(sf.LayoutError, match="'decoder' has 2 heads.*'encoder' has 4"):
        sf.layout_for(model)


def test_encoder_decoder_stack_reads_its_own_head_count():
    from sketchfisher.layout.registry import _REGISTRY, supported_model_types
    supported_model_types()  # the built-in architectures registered
    stacks = _REGISTRY["bart"]
    cfg_cls, _, _, kw = ARCHS["bart"]
    config = cfg_cls(**{**kw, "encoder_attention_heads": 8, "decoder_attention_heads": 2})
    dims = {name: sf.Dims.from_config(config, spec) for name, spec in stacks.parts}
    assert (dims["encoder"].num_heads, dims["decoder"].num_heads, dims["cross"].num_heads) == (8, 2, 2)
    assert (dims["encoder"].head_dim, dims["decoder"].head_dim) == (4, 16)


def test_linear_units_name_the_matrices_they_cannot_capture(caplog):
    """Current Mixtral's router is its own module (not nn.Linear) and its experts are stacked 3-D tensors:
    units='linear' says so by name instead of skipping them without a word."""
    import transformers as hf
    config = hf.MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, num_local_experts=4, vocab_size=100)
    model = hf.MixtralModel(config)
    with pytest.raises(sf.LayoutError, match=r"no other linear layers.*not collected: .*layers\.\*\.mlp\.gate\.weight"):
        sf.units_layout(model, ("heads", "linear"))
    model.extra = torch.nn.Linear(32, 8)  # with a linear layer to collect, the others are named in a warning
    with caplog.at_level("WARNING"):
        sf.units_layout(model, ("heads", "linear"))
    assert "not collected" in caplog.text and "layers.*.mlp.experts.gate_up_proj" in caplog.text
