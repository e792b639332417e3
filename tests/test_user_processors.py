"""The user attention processors on SDXL's UNet and Flux's transformer (through ``PersonalizedModel``)."""

import json
import logging

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from ppd_diffusers import UserAdapter
from ppd_diffusers.backbones import backbone_of, user_layers
from ppd_diffusers.personalized_model import PersonalizedModel
from ppd_diffusers.testing_utils import tiny_flux_transformer, tiny_sdxl_unet
from ppd_diffusers.user_attention_processor import (
    FluxUserAttnProcessor,
    UserAttnProcessor,
    user_processor_layers,
)

EMBED = 24


def sdxl_inputs(batch: int = 3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(batch, 4, 16, 16, generator=g),
        timestep=torch.arange(batch) * 300 + 10,
        encoder_hidden_states=torch.randn(batch, 7, 32, generator=g),
        added_cond_kwargs={
            "text_embeds": torch.randn(batch, 32, generator=g),
            "time_ids": torch.rand(batch, 6, generator=g) * 64,
        },
    )


def flux_inputs(batch: int = 3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    tokens, text = 16, 5
    img_ids = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1).reshape(tokens, 2)
    return dict(
        hidden_states=torch.randn(batch, tokens, 16, generator=g),
        encoder_hidden_states=torch.randn(batch, text, 32, generator=g),
        pooled_projections=torch.randn(batch, 32, generator=g),
        timestep=torch.linspace(0.2, 0.9, batch),
        img_ids=torch.cat([torch.zeros(tokens, 1), img_ids.float()], dim=1),
        txt_ids=torch.zeros(text, 3),
        guidance=torch.full((batch,), 3.5),
    )


BACKBONES = {"sdxl": (tiny_sdxl_unet, sdxl_inputs), "flux": (tiny_flux_transformer, flux_inputs)}


def users(count: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, 1, EMBED, generator=torch.Generator().manual_seed(seed))


def randomize_(adapter: UserAdapter, seed: int = 2) -> UserAdapter:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return adapter


@pytest.fixture(params=sorted(BACKBONES))
def setup(request):
    build, inputs = BACKBONES[request.param]
    model = build()
    adapter = UserAdapter.from_model(model, user_embed_dim=EMBED, num_user_tokens=2, user_token_dim=8)
    return request.param, model, adapter, inputs


def run(model, inputs, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **kwargs).sample


def test_from_model_finds_each_backbones_layers(setup):
    backbone, model, adapter, _ = setup
    assert backbone_of(model) == backbone == adapter.config.backbone
    layers = user_layers(model)
    assert adapter.config.layer_names == [layer.name for layer in layers]
    if backbone == "sdxl":  # every cross-attention and nothing else
        assert all(name.endswith("attn2") for name in adapter.config.layer_names) and len(layers) == 4
        assert adapter.config.block_channels == [32] * 4 and adapter.config.block_heads == [4] * 4
    else:  # the double-stream blocks only
        assert adapter.config.layer_names == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
        assert adapter.config.block_channels == [16, 16] and adapter.config.block_heads == [2, 2]


def test_fresh_adapter_with_users_equals_base_bit_for_bit(setup):
    _, model, adapter, inputs = setup
    base = run(model, inputs())
    personalized = adapter.attach(model)
    assert torch.equal(run(personalized, inputs(), user_embeds=users(3)), base)
    assert torch.equal(run(personalized, inputs()), base)


def test_no_user_and_scale_zero_equal_base_for_a_trained_adapter(setup):
    _, model, adapter, inputs = setup
    base = run(model, inputs())
    personalized = randomize_(adapter).attach(model)
    assert torch.equal(run(personalized, inputs()), base)
    assert torch.equal(run(model, inputs()), base)  # the model itself, processors installed, no user
    assert torch.equal(run(personalized, inputs(), user_embeds=users(3), user_scale=0.0), base)
    assert not torch.allclose(run(personalized, inputs(), user_embeds=users(3)), base, atol=1e-4)


def test_per_sample_users_in_one_batch_equal_one_by_one(setup):
    _, model, adapter, inputs = setup
    personalized = randomize_(adapter).attach(model)
    u = users(3)
    together = run(personalized, inputs(), user_embeds=u)
    for i in range(3):
        alone = run(personalized, _row(inputs(), i), user_embeds=u[i : i + 1])
        torch.testing.assert_close(together[i : i + 1], alone, rtol=1e-5, atol=1e-5)


def test_user_rows_leave_the_other_rows_at_the_base_model(setup):
    _, model, adapter, inputs = setup
    personalized = randomize_(adapter).attach(model)
    base = run(model, inputs())
    u = users(2)
    everyone = run(personalized, inputs(), user_embeds=u[:1])
    last_two = run(personalized, inputs(), user_embeds=u[:1], user_rows=slice(1, None))
    assert torch.equal(last_two[:1], base[:1])
    torch.testing.assert_close(last_two[1:], everyone[1:], rtol=1e-5, atol=1e-5)
    two_users = run(personalized, inputs(), user_embeds=u, user_rows=slice(1, None))
    assert torch.equal(run(personalized, inputs(), user_kv=adapter(u).for_rows(slice(1, None))), two_users)
    assert torch.equal(two_users[:1], base[:1])
    torch.testing.assert_close(two_users[1], last_two[1], rtol=1e-5, atol=1e-5)  # the same first user
    assert not torch.allclose(two_users[2], last_two[2], atol=1e-4)


def test_other_processors_get_the_same_user_term_through_the_output_projection(setup):
    """A layer whose processor is not the default one (an IP-Adapter's, a custom one) takes the generic path."""
    backbone, model, adapter, inputs = setup
    randomize_(adapter)
    fast = run(adapter.attach(model), inputs(), user_embeds=users(3))
    other = BACKBONES[backbone][0]()
    other.load_state_dict(model.state_dict())
    custom = AttnProcessor() if backbone == "sdxl" else type("CustomFluxProcessor", (FluxAttnProcessor,), {})()
    for name in adapter.config.layer_names:
        other.get_submodule(name).set_processor(custom)
    generic = run(adapter.attach(other), inputs(), user_embeds=users(3))
    torch.testing.assert_close(generic, fast, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(generic, run(other, inputs()), atol=1e-4)


def test_install_wraps_only_the_personalized_layers_and_detach_restores_them(setup):
    backbone, model, adapter, _ = setup
    before = dict(model.attn_processors)
    personalized = adapter.attach(model)
    adapter.attach(model)  # attaching again wraps the original processors, not the wrappers
    wrapped = {name for name, _ in user_processor_layers(model)}
    assert wrapped == set(adapter.config.layer_names)
    expected_class = UserAttnProcessor if backbone == "sdxl" else FluxUserAttnProcessor
    for name, processor in model.attn_processors.items():
        layer = name.removesuffix(".processor")
        if layer in wrapped:
            assert type(processor) is expected_class and processor.base is before[name]
        else:
            assert processor is before[name]
    assert personalized.detach() is model
    assert model.attn_processors == before
    assert not user_processor_layers(model)


def test_untouched_layers_do_not_warn_about_the_user_kwarg(setup, caplog):
    from ppd_diffusers import user_attention_processor

    _, model, adapter, inputs = setup
    personalized = randomize_(adapter).attach(model)
    diffusers_logger = logging.getLogger("diffusers")  # diffusers' loggers do not propagate to the root
    diffusers_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="diffusers"):
            run(personalized, inputs(), user_embeds=users(3))
            assert not [r for r in caplog.records if "not expected" in r.getMessage()]
            # the control: without the filter the untouched layers do warn
            for name in user_attention_processor._FILTERED_LOGGERS:
                logging.getLogger(name).removeFilter(user_attention_processor._FILTER)
            try:
                run(personalized, inputs(), user_embeds=users(3))
            finally:
                user_attention_processor._quiet_user_kwarg_warnings()
            assert [r for r in caplog.records if "['ppd_user_kv'] are not expected" in r.getMessage()]
    finally:
        diffusers_logger.removeHandler(caplog.handler)


def test_a_user_is_never_dropped_when_something_replaced_the_processors(setup):
    backbone, model, adapter, inputs = setup
    first = randomize_(adapter).attach(model)
    expected = run(first, inputs(), user_embeds=users(3))
    adapter.attach(model).detach()  # another personalized model of the same model takes the processors away
    assert not user_processor_layers(model)
    assert torch.equal(run(first, inputs(), user_embeds=users(3)), expected)
    default = AttnProcessor2_0() if backbone == "sdxl" else FluxAttnProcessor()
    model.set_attn_processor(default)  # diffusers' own switch
    assert torch.equal(run(first, inputs(), user_embeds=users(3)), expected)


def test_a_lora_on_the_output_projection_acts_on_the_user_term_on_every_path(setup):
    from peft import LoraConfig

    backbone, model, adapter, inputs = setup
    model.add_adapter(LoraConfig(r=2, target_modules=["to_out.0"], init_lora_weights=False))
    randomize_(adapter)
    fast = run(adapter.attach(model), inputs(), user_embeds=users(3))
    custom = AttnProcessor() if backbone == "sdxl" else type("CustomFluxProcessor", (FluxAttnProcessor,), {})()
    for name in adapter.config.layer_names:
        model.get_submodule(name).set_processor(custom)
    generic = run(adapter.attach(model), inputs(), user_embeds=users(3))
    torch.testing.assert_close(generic, fast, rtol=1e-4, atol=1e-5)


def test_only_adapter_weights_get_gradients_and_checkpointing_gives_the_same(setup):
    _, model, adapter, inputs = setup
    personalized = randomize_(adapter).attach(model)

    def grads() -> list[torch.Tensor]:
        adapter.zero_grad(set_to_none=True)
        personalized(**inputs(2), user_embeds=users(2)).sample.square().mean().backward()
        return [p.grad.clone() for p in adapter.parameters()]

    plain = grads()
    assert all(p.grad is None for p in model.parameters())
    assert all(g.abs().sum() > 0 for g in plain)
    model.enable_gradient_checkpointing()
    model.train()  # some diffusers blocks checkpoint only in training mode
    try:
        for a, b in zip(grads(), plain, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    finally:
        model.disable_gradient_checkpointing()
        model.eval()


def test_save_load_roundtrip_gives_identical_outputs(setup, tmp_path):
    _, model, adapter, inputs = setup
    randomize_(adapter).save_pretrained(tmp_path)
    loaded = UserAdapter.from_pretrained(tmp_path)
    assert loaded.config.layer_names == adapter.config.layer_names
    assert loaded.config.backbone == adapter.config.backbone
    expected = run(adapter.attach(model), inputs(), user_embeds=users(3))
    assert torch.equal(run(loaded.attach(model), inputs(), user_embeds=users(3)), expected)


def test_an_adapter_refuses_a_model_it_does_not_fit():
    sdxl, flux = tiny_sdxl_unet(), tiny_flux_transformer()
    adapter = UserAdapter.from_model(sdxl, user_embed_dim=EMBED, user_token_dim=8)
    with pytest.raises(ValueError, match=r"built for a SDXL UNet with 4 attention layers.*Flux transformer with 2"):
        adapter.attach(flux)
    # the user keys' width is the layer's inner width, which another text width leaves as it is
    adapter.check_model(tiny_sdxl_unet(cross_attention_dim=48))
    more_heads = tiny_sdxl_unet(attention_head_dim=(2, 8))
    with pytest.raises(ValueError, match=r"SDXL UNet with 4 attention layers \[4 x \(32 channels, 4 heads\)\].*8 h"):
        adapter.check_model(more_heads)
    with pytest.raises(TypeError, match="PPD personalizes a `StableCascadeUNet`"):
        adapter.attach(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="needs `layer_names`"):
        UserAdapter(user_embed_dim=4, block_channels=[8], block_heads=[2], backbone="sdxl")
    with pytest.raises(ValueError, match="`backbone` must be one of"):
        UserAdapter(user_embed_dim=4, block_channels=[8], block_heads=[2], backbone="sd3")
    with pytest.raises(ValueError, match="`layer_names` must name each of the 1"):
        UserAdapter(user_embed_dim=4, block_channels=[8], block_heads=[2], backbone="flux", layer_names=["a", "b"])


def test_layer_names_are_checked_not_only_shapes(tmp_path):
    unet = tiny_sdxl_unet()
    adapter = UserAdapter.from_model(unet, user_embed_dim=EMBED, user_token_dim=8)
    adapter.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["layer_names"] = ["elsewhere." + name for name in config["layer_names"]]
    (tmp_path / "config.json").write_text(json.dumps(config))
    moved = UserAdapter.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"its layer 'elsewhere\.down_blocks.*is 'down_blocks"):
        moved.check_model(unet)
    as_tuple = UserAdapter(**{**adapter.config, "layer_names": tuple(adapter.config.layer_names)})
    as_tuple.check_model(unet)  # a tuple of the same names fits


def test_adapters_saved_before_backbones_existed_load_as_stage_c(tmp_path):
    from diffusers import StableCascadeUNet

    from ppd_diffusers.testing_utils import tiny_stage_c_config

    unet = StableCascadeUNet(**tiny_stage_c_config())
    UserAdapter.from_model(unet, user_embed_dim=EMBED, user_token_dim=8).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["backbone"], config["layer_names"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    old = UserAdapter.from_pretrained(tmp_path)
    assert old.config.backbone == "stable_cascade" and old.config.layer_names is None
    old.check_model(unet)
    assert isinstance(old.attach(unet), PersonalizedModel)


def test_attention_backend_settings_reach_the_wrapped_processor():
    model = tiny_flux_transformer()
    UserAdapter.from_model(model, user_embed_dim=EMBED, user_token_dim=8).attach(model)
    processor = model.get_submodule("transformer_blocks.0.attn").processor
    processor._attention_backend = "native"
    assert processor.base._attention_backend == "native" and processor._attention_backend == "native"
    assert type(AttnProcessor2_0()) is AttnProcessor2_0  # the SDXL fast path keys on this exact class


def _row(inputs: dict, i: int) -> dict:
    out = {}
    for key, value in inputs.items():
        if isinstance(value, dict):
            out[key] = {k: v[i : i + 1] for k, v in value.items()}
        elif key in ("img_ids", "txt_ids"):
            out[key] = value
        else:
            out[key] = value[i : i + 1]
    return out
