"""Q/DQ placement: defaults, pattern cases, spec overrides and the summary."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from tests.model_zoo import images, nested_model, small_cnn

import qatflow
from qatflow.errors import ModelError, QuantizationError
from qatflow.quantization import (
    DEFAULT_REGISTRY,
    LayerQuantizeConfig,
    LayerRegistry,
    QDQCase,
    QuantizationSpec,
    QuantizeWrapper,
    register_layer_config,
    summarize,
)


def wrapper(model: keras.Model, name: str) -> QuantizeWrapper | None:
    for sub in [model, *[x for x in model.layers if isinstance(x, keras.Model)]]:
        for layer in sub.layers:
            if isinstance(layer, QuantizeWrapper) and layer.layer.name == name:
                return layer
    return None


@pytest.fixture(scope="module")
def resnet50() -> tuple[keras.Model, keras.Model]:
    model = keras.applications.ResNet50(weights=None, classifier_activation=None)
    return model, qatflow.quantize_model(model)


def test_resnet50_convs_and_dense_quantized_on_input_and_weight(resnet50):
    model, qmodel = resnet50
    weighted = [x for x in model.layers if isinstance(x, keras.layers.Conv2D | keras.layers.Dense)]
    assert len(weighted) == 54
    for layer in weighted:
        w = wrapper(qmodel, layer.name)
        assert w is not None, layer.name
        assert w.input_indices == (0,)
        assert list(w.weight_axes.values()) == [-1]


def test_resnet50_residual_adds(resnet50):
    model, qmodel = resnet50
    adds = [x for x in model.layers if isinstance(x, keras.layers.Add)]
    assert len(adds) == 16
    projection = {f"conv{s}_block1_add" for s in range(2, 6)}
    for add in adds:
        w = wrapper(qmodel, add.name)
        assert w is not None, add.name
        assert len(w.input_indices) == 1, add.name
        if add.name in projection:
            # Both branches are convs: exactly one quantized, the main path left to fuse.
            assert w.input_indices == (0,)
        else:
            # keras.applications builds Add([shortcut, residual]): shortcut is input 0.
            assert w.input_indices == (0,), "identity shortcut quantized, conv branch not"
    assert len(projection) + 12 == len(adds)


def test_resnet50_batchnorm_and_pools_not_quantized(resnet50):
    model, qmodel = resnet50
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization | keras.layers.MaxPooling2D):
            assert wrapper(qmodel, layer.name) is None, layer.name
    assert wrapper(qmodel, "avg_pool").input_indices == (0,)


def test_original_model_untouched_and_outputs_close(resnet50):
    model, qmodel = resnet50
    assert not any(isinstance(x, QuantizeWrapper) for x in model.layers)
    x = images(2, (224, 224, 3))
    qatflow.calibrate(qmodel, x, num_batches=1, batch_size=2)
    before = model.get_layer("conv1_conv").get_weights()[0].copy()
    np.testing.assert_allclose(model(x), model(x))
    qmodel.get_layer("quant_conv1_conv").layer.kernel.assign(np.zeros_like(before))
    np.testing.assert_array_equal(model.get_layer("conv1_conv").get_weights()[0], before)


def test_summary_table(resnet50):
    _, qmodel = resnet50
    summary = summarize(qmodel)
    row = summary.row("conv2_block1_add")
    assert row.input_quantized == "1 of 2: [0]"
    assert row.why == "case:resnet_v1 for tensorrt"
    assert summary.row("conv1_bn").why.startswith("left in float")
    text = summary.to_text()
    assert "conv1_conv" in text and "71 of" in text
    assert "| conv1_conv | Conv2D | yes |" in summary.to_markdown()


def test_small_model_residual_rule():
    qmodel = qatflow.quantize_model(small_cnn())
    # Identity block: input 0 is the shortcut (not a conv branch), input 1 the conv branch.
    assert wrapper(qmodel, "id_add").input_indices == (0,)
    # Projection: both conv branches; the later-created main path (input 1) stays float.
    assert wrapper(qmodel, "proj_add").input_indices == (0,)


def test_onnxruntime_placement_quantizes_every_residual_input():
    qmodel = qatflow.quantize_model(small_cnn(), runtime="onnxruntime")
    for name in ("id_add", "proj_add"):
        assert wrapper(qmodel, name).input_indices == (0, 1)
    assert summarize(qmodel).row("proj_add").why == "case:residual for onnxruntime"
    # A spec still overrides the runtime's rule.
    spec = QuantizationSpec()
    spec.add("id_add", quantization_index=[1])
    overridden = qatflow.quantize_model(small_cnn(), spec=spec, runtime="onnxruntime")
    assert wrapper(overridden, "id_add").input_indices == (1,)


def test_an_unknown_runtime_is_refused():
    with pytest.raises(QuantizationError, match=r"runtime must be one of .*'openvino'"):
        qatflow.quantize_model(small_cnn(), runtime="openvino")


def test_partial_mode_by_name_and_class():
    spec = QuantizationSpec()
    spec.add("stem_conv")
    spec.add("Dense", is_keras_class=True, quantize_weight=False)
    qmodel = qatflow.quantize_model(small_cnn(), mode="partial", spec=spec)
    quantized = sorted(x.layer.name for x in qmodel.layers if isinstance(x, QuantizeWrapper))
    assert quantized == ["logits", "stem_conv"]
    assert wrapper(qmodel, "logits").weight_axes == {}
    assert wrapper(qmodel, "stem_conv").weight_axes == {"kernel": -1}
    assert (
        "partial" in summarize(qmodel).row("id_conv1").why
        or "not selected" in summarize(qmodel).row("id_conv1").why
    )


def test_full_mode_spec_overrides_defaults():
    spec = QuantizationSpec().add("id_conv1", quantize_input=False, quantize_weight=False)
    spec.add("id_add", quantization_index="all")
    qmodel = qatflow.quantize_model(small_cnn(), spec=spec)
    assert wrapper(qmodel, "id_conv1") is None
    assert wrapper(qmodel, "id_add").input_indices == (0, 1)
    assert summarize(qmodel).row("id_add").why == "spec"


def test_quantization_index_list_and_any():
    spec = QuantizationSpec().add(["id_add", "proj_add"], quantization_index=[[1], "any"])
    qmodel = qatflow.quantize_model(small_cnn(), mode="partial", spec=spec)
    assert wrapper(qmodel, "id_add").input_indices == (1,)
    assert wrapper(qmodel, "proj_add").input_indices == (0,)
    with pytest.raises(QuantizationError, match="'id_add'.*2 input"):
        qatflow.quantize_model(
            small_cnn(),
            mode="partial",
            spec=QuantizationSpec().add("id_add", quantization_index=[2]),
        )


def test_user_written_case():
    class QuantizeMaxPoolAndBN(QDQCase):
        """Quantize every BatchNormalization input."""

        name = "bn_inputs"

        def case(self, model, spec):
            out = QuantizationSpec()
            for layer in model.layers:
                if isinstance(layer, keras.layers.BatchNormalization):
                    out.add(layer.name, quantize_weight=False, source=f"case:{self.name}")
            return out

    qmodel = qatflow.quantize_model(small_cnn(), cases=[QuantizeMaxPoolAndBN()])
    assert wrapper(qmodel, "stem_bn").input_indices == (0,)
    assert wrapper(qmodel, "stem_bn").weight_axes == {}
    assert summarize(qmodel).row("stem_bn").why == "case:bn_inputs"


def test_spec_from_yaml(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("layers:\n  - name: stem_conv\n  - class: Add\n    quantization_index: all\n")
    spec = QuantizationSpec.from_yaml(path)
    qmodel = qatflow.quantize_model(small_cnn(), mode="partial", spec=spec)
    assert wrapper(qmodel, "proj_add").input_indices == (0, 1)
    bad = tmp_path / "bad.yaml"
    bad.write_text("layers:\n  - name: x\n    quantise_input: true\n")
    with pytest.raises(QuantizationError, match=r"bad.yaml.*unknown keys"):
        QuantizationSpec.from_yaml(bad)


def test_spec_naming_a_missing_layer_suggests_close_names():
    spec = QuantizationSpec().add("stem_cnv")
    with pytest.raises(QuantizationError, match="'stem_cnv'.*did you mean 'stem_conv'"):
        qatflow.quantize_model(small_cnn(), spec=spec)


def test_nested_submodel_is_quantized():
    qmodel = qatflow.quantize_model(nested_model())
    assert wrapper(qmodel, "stem_conv") is not None
    assert wrapper(qmodel, "head") is not None
    names = [r.layer for r in summarize(qmodel).quantized]
    assert "stem_conv" in names and "head" in names


def test_sequential_model():
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3),
            keras.layers.Flatten(),
            keras.layers.Dense(2),
        ]
    )
    qmodel = qatflow.quantize_model(model)
    assert sum(isinstance(x, QuantizeWrapper) for x in qmodel.layers) == 2
    x = images(2, (8, 8, 1))
    qatflow.calibrate(qmodel, x, num_batches=1)
    np.testing.assert_allclose(qmodel(x), model(x), atol=0.05)


class _Custom(keras.layers.Layer):
    def call(self, x):
        return x * 2.0


def test_unknown_layer_float_or_strict_error():
    inputs = keras.Input((8, 8, 1))
    x = _Custom(name="doubler")(inputs)
    outputs = keras.layers.Conv2D(2, 3, name="conv")(x)
    model = keras.Model(inputs, outputs)
    qmodel = qatflow.quantize_model(model)
    assert "unknown layer class _Custom" in summarize(qmodel).row("doubler").why
    with pytest.raises(QuantizationError, match="'doubler'.*_Custom.*strict"):
        qatflow.quantize_model(model, strict=True)


class _Scaled(_Custom):
    def compute_output_shape(self, input_shape):
        return input_shape


def _custom_model() -> keras.Model:
    inputs = keras.Input((8, 8, 1))
    x = _Scaled(name="doubler")(inputs)
    return keras.Model(inputs, keras.layers.Conv2D(2, 3, name="conv")(x))


def test_a_layer_registry_applies_to_the_calls_given_it():
    registry = LayerRegistry()
    registry.register(_Scaled, LayerQuantizeConfig(quantize_input=True, note="custom"))
    model = _custom_model()
    scoped = qatflow.quantize_model(model, registry=registry, strict=True)
    assert wrapper(scoped, "doubler").input_indices == (0,)
    assert wrapper(scoped, "conv").weight_axes == {"kernel": -1}  # the defaults are kept
    assert wrapper(qatflow.quantize_model(model), "doubler") is None  # the default is untouched
    assert DEFAULT_REGISTRY.config_for(model.get_layer("doubler")) is None
    assert registry.copy().config_for(model.get_layer("doubler")).note == "custom"
    with pytest.raises(TypeError, match="is not a Keras layer class"):
        registry.register(int, LayerQuantizeConfig())


def test_register_layer_config_extends_the_default_registry():
    class Tripler(_Scaled):
        pass

    inputs = keras.Input((4,))
    model = keras.Model(inputs, Tripler(name="tripler")(inputs))
    register_layer_config(Tripler, LayerQuantizeConfig(quantize_input=True))
    assert wrapper(qatflow.quantize_model(model, strict=True), "tripler").input_indices == (0,)


def test_subclassed_model_is_rejected():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    net = Net()
    net(np.zeros((1, 4), np.float32))
    with pytest.raises(ModelError, match="subclassed"):
        qatflow.quantize_model(net)


def test_model_without_fixed_input_rank_is_rejected():
    model = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ModelError, match="no defined inputs"):
        qatflow.quantize_model(model)
