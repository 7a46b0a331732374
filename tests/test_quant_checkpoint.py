"""fastloss.quant at the seams (issue 18): quantized checkpoints that load without re-quantizing, the
dequantized ``.weight`` view, warnings for skip patterns that match nothing, the activation-dtype hint,
and progress reports of quantize_model."""

import io
import re

import pytest
import torch

from fastloss import quant as Q


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.ModuleDict({
        "embed": torch.nn.Embedding(10, 128),
        "block": torch.nn.Sequential(torch.nn.Linear(128, 192), torch.nn.GELU(), torch.nn.Linear(192, 128, bias=False)),
        "lm_head": torch.nn.Linear(128, 64),
    })  # fmt: skip


def _run(model, x):
    return model["lm_head"](model["block"](x))


def _save(state) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_checkpoint_loads_into_a_fresh_model_without_quantizing_and_is_bit_identical(monkeypatch):
    model = _model()
    Q.quantize_model(model, group_size=64, frac_4bit=0.25, skip="block.2")
    x = torch.randn(5, 128)
    expected = _run(model, x)
    state = _save(model.state_dict())

    fresh = _model(seed=1)  # other weights: every quantized value must come from the checkpoint
    monkeypatch.setattr(Q, "quantize", lambda *a, **k: pytest.fail("loading a checkpoint must not quantize"))
    report = Q.quantize_model(fresh, from_state_dict=state)
    assert sorted(report) == ["block.0", "lm_head"]
    assert isinstance(fresh["block"][2], torch.nn.Linear)  # skipped when saved: stays dense
    fresh.load_state_dict(state)
    assert torch.equal(_run(fresh, x), expected)
    for name in ("block.0", "lm_head"):
        saved, loaded = model.get_submodule(name), fresh.get_submodule(name)
        for key, value in saved.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), (name, key)


def test_quantlinear_from_state_dict_and_its_errors():
    linear = torch.nn.Linear(128, 64)
    layer = Q.QuantLinear.from_linear(linear, group_size=64)
    state = _save({"head." + k: v for k, v in layer.state_dict().items()})
    rebuilt = Q.QuantLinear.from_state_dict(state, prefix="head.")
    x = torch.randn(3, 128)
    assert torch.equal(rebuilt(x), layer(x))
    broken = {k: v for k, v in state.items() if k != "head.main"}
    with pytest.raises(ValueError, match=r"QuantLinear\.from_state_dict: argument 'state_dict' has no 'head\.main'"):
        Q.QuantLinear.from_state_dict(broken, prefix="head.")


def test_quantize_model_from_state_dict_refuses_mismatches():
    model = _model()
    Q.quantize_model(model, group_size=64)
    state = model.state_dict()
    other = torch.nn.ModuleDict({"block": torch.nn.Sequential(torch.nn.Linear(128, 96)), "lm_head": torch.nn.Linear(128, 64)})
    with pytest.raises(ValueError, match=r"layer 'block\.0' is an nn\.Linear \(96, 128\) with bias, the checkpoint's is \(192, 128\)"):
        Q.quantize_model(other, from_state_dict=state)
    assert isinstance(other["lm_head"], torch.nn.Linear), "a failed load must leave the model as it was"
    with pytest.raises(ValueError, match=r"holds no quantized layer"):
        Q.quantize_model(_model(), from_state_dict=_model().state_dict())
    # a quantized state loaded into a QuantLinear of another shape is refused, naming the metadata
    small = Q.QuantLinear.from_linear(torch.nn.Linear(64, 64), group_size=64)
    big = Q.QuantLinear.from_linear(torch.nn.Linear(128, 64), group_size=64)
    with pytest.raises((RuntimeError, ValueError)):
        small.load_state_dict(big.state_dict())


def test_checkpoint_without_metadata_still_loads_into_a_quantlinear():
    layer = Q.QuantLinear.from_linear(torch.nn.Linear(128, 64), group_size=64)
    old_style = {k: v for k, v in layer.state_dict().items() if k != "quant_meta"}
    other = Q.QuantLinear.from_linear(torch.nn.Linear(128, 64), group_size=64)
    other.load_state_dict(old_style)
    x = torch.randn(2, 128)
    assert torch.equal(other(x), layer(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_weight_view_is_the_dequantized_weight(dtype):
    layer = Q.QuantLinear.from_linear(torch.nn.Linear(128, 64).to(dtype), group_size=64)
    w = layer.weight
    assert w.shape == (64, 128) and w.dtype == dtype and w.device == layer.main.device
    assert not isinstance(w, torch.nn.Parameter) and "weight" not in dict(layer.named_parameters())
    assert torch.equal(w, Q.dequantize(layer.qweight, dtype))
    # and it is what forward multiplies by (float32 x on the CPU)
    x = torch.randn(3, 128)
    torch.testing.assert_close(layer(x), x @ w.float().t() + layer.bias.float(), rtol=1e-3, atol=1e-3)


def test_skip_pattern_that_matches_nothing_warns_with_module_names():
    model = _model()
    with pytest.warns(UserWarning, match=r"skip pattern 'lm-head' matches no nn\.Linear.*'block\.0', 'block\.2', 'lm_head'"):
        Q.quantize_model(model, skip=["lm-head"], group_size=64)
    assert isinstance(model["lm_head"], Q.QuantLinear)


def test_skip_pattern_that_matches_does_not_warn(recwarn):
    model = _model()
    Q.quantize_model(model, skip=["lm_head", "block.*"], group_size=64)
    assert not [w for w in recwarn if "skip pattern" in str(w.message)]
    assert isinstance(model["lm_head"], torch.nn.Linear)


def test_integer_input_error_says_to_convert_x():
    layer = Q.QuantLinear.from_linear(torch.nn.Linear(128, 64), group_size=64)
    with pytest.raises(ValueError, match=re.escape("'x' is torch.int64") + r".*convert the activations: x\.to\(torch\.float16\)") as info:
        layer(torch.ones(2, 128, dtype=torch.int64))
    assert "qw.to(torch.int64)" not in str(info.value)


def test_progress_callback_is_called_once_per_layer(capsys):
    calls = []
    Q.quantize_model(_model(), group_size=64, progress=lambda done, total, name: calls.append((done, total, name)))
    assert calls == [(1, 3, "block.0"), (2, 3, "block.2"), (3, 3, "lm_head")]
    Q.quantize_model(_model(), group_size=64, progress=True)
    err = capsys.readouterr().err
    assert "quantize_model: 3/3 lm_head" in err
    with pytest.raises(TypeError, match=r"quantize_model: argument 'progress'"):
        Q.quantize_model(_model(), progress="yes")
