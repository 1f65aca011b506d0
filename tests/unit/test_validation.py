"""validate_request: a decoded request checked against the model's config.pbtxt before it is queued.

Every rejection is an InvalidInput (HTTP 400) that names the input or output
and says what the model expects, so a client can fix its request from the
message alone.
"""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.http as httpclient

from serving.datatypes import V2_TO_NUMPY
from serving.errors import InvalidInput
from serving.model_config import ModelSpec, TensorSpec, make_config, spec_from_config
from serving.protocol import InferRequest, InputTensor, RequestedOutput, decode_request
from serving.validation import ValidatedRequest, validate_request


def _spec(max_batch_size: int = 8, inputs=None, outputs=None) -> ModelSpec:
    inputs = inputs or [TensorSpec("features", "FP32", (4,)), TensorSpec("tokens", "INT64", (-1,))]
    outputs = outputs or [TensorSpec("probs", "FP32", (2,)), TensorSpec("label", "BYTES", (1,))]
    return spec_from_config(make_config("fraud", inputs, outputs, max_batch_size=max_batch_size))


def _tensor(name: str, datatype: str, shape: tuple[int, ...]) -> InputTensor:
    dtype = V2_TO_NUMPY[datatype]
    data = np.zeros(shape, dtype=dtype) if datatype != "BYTES" else np.full(shape, b"", dtype=object)
    return InputTensor(name, datatype, tuple(shape), data)


def _request(*tensors: InputTensor, outputs=None, binary_output: bool = False) -> InferRequest:
    return InferRequest(list(tensors), outputs=outputs, binary_output=binary_output)


def _good(rows: int = 3, tokens: int = 5) -> list[InputTensor]:
    return [_tensor("features", "FP32", (rows, 4)), _tensor("tokens", "INT64", (rows, tokens))]


def _rejects(request: InferRequest, spec: ModelSpec, *phrases: str, **kwargs) -> str:
    with pytest.raises(InvalidInput) as info:
        validate_request(request, spec, **kwargs)
    message = str(info.value)
    for phrase in phrases:
        assert phrase in message
    assert info.value.status == 400
    return message


# -- accepted requests ---------------------------------------------------------


def test_a_matching_request_passes_its_arrays_and_rows_through():
    tensors = _good(rows=3)
    checked = validate_request(_request(*tensors), _spec())

    assert isinstance(checked, ValidatedRequest)
    assert checked.rows == 3
    assert set(checked.inputs) == {"features", "tokens"}
    # The decoded arrays go to the batcher as they are: no copy per request.
    assert checked.inputs["features"] is tensors[0].data
    assert checked.inputs["tokens"] is tensors[1].data


def test_a_request_from_tritonclient_validates():
    features = np.arange(8, dtype=np.float32).reshape(2, 4)
    tokens = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int64)
    inputs = []
    for name, datatype, arr in (("features", "FP32", features), ("tokens", "INT64", tokens)):
        tensor = httpclient.InferInput(name, list(arr.shape), datatype)
        tensor.set_data_from_numpy(arr, binary_data=name == "tokens")
        inputs.append(tensor)
    outputs = [httpclient.InferRequestedOutput("label", binary_data=False)]
    body, header_length = httpclient.InferenceServerClient.generate_request_body(inputs, outputs=outputs)

    checked = validate_request(decode_request(body, header_length), _spec())

    assert checked.rows == 2
    np.testing.assert_array_equal(checked.inputs["features"], features)
    np.testing.assert_array_equal(checked.inputs["tokens"], tokens)
    assert [(o.name, binary) for o, binary in checked.outputs] == [("label", False)]


def test_input_order_in_the_request_does_not_matter():
    features, tokens = _good()
    assert validate_request(_request(tokens, features), _spec()).rows == 3


@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_variable_dims_accept_any_length(tokens):
    assert validate_request(_request(*_good(rows=2, tokens=tokens)), _spec()).rows == 2


@pytest.mark.parametrize("rows", [1, 8])
def test_batch_sizes_from_one_to_max_batch_size_are_accepted(rows):
    assert validate_request(_request(*_good(rows=rows)), _spec(max_batch_size=8)).rows == rows


def test_a_model_without_a_batch_dimension_takes_its_dims_exactly_as_one_row():
    spec = _spec(max_batch_size=0, inputs=[TensorSpec("image", "UINT8", (-1, -1, 3))])

    checked = validate_request(_request(_tensor("image", "UINT8", (20, 30, 3))), spec)

    assert checked.rows == 1
    assert checked.inputs["image"].shape == (20, 30, 3)


def test_an_optional_input_may_be_left_out():
    spec = _spec(inputs=[TensorSpec("features", "FP32", (4,)), TensorSpec("mask", "BOOL", (4,), optional=True)])

    checked = validate_request(_request(_tensor("features", "FP32", (2, 4))), spec)

    assert set(checked.inputs) == {"features"} and checked.rows == 2
    with_mask = validate_request(_request(_tensor("features", "FP32", (2, 4)), _tensor("mask", "BOOL", (2, 4))), spec)
    assert set(with_mask.inputs) == {"features", "mask"}


def test_the_element_limit_is_inclusive():
    request = _request(_tensor("features", "FP32", (2, 4)), _tensor("tokens", "INT64", (2, 5)))
    assert validate_request(request, _spec(), max_elements=10).rows == 2


# -- rejected inputs: the message names the input and what the model expects ---


def test_a_missing_input_is_named():
    _rejects(
        _request(_tensor("features", "FP32", (1, 4))),
        _spec(),
        "model 'fraud' needs input 'tokens'",
    )


def test_an_unknown_input_is_named_with_the_models_inputs():
    _rejects(
        _request(*_good(), _tensor("feature", "FP32", (3, 4))),
        _spec(),
        "model 'fraud' has no input 'feature'",
        "['features', 'tokens']",
    )


@pytest.mark.parametrize("datatype", ["FP64", "FP16", "INT32", "BYTES"])
def test_a_wrong_datatype_says_which_the_model_takes(datatype):
    _rejects(
        _request(_tensor("features", datatype, (3, 4)), _good()[1]),
        _spec(),
        f"input 'features': datatype {datatype} does not match the model's FP32",
    )


@pytest.mark.parametrize("shape", [(3, 5), (3, 4, 1), (3,), (12,), (1, 2, 2)])
def test_wrong_dims_after_the_batch_dim_show_the_models_shape(shape):
    _rejects(
        _request(_tensor("features", "FP32", shape), _good()[1]),
        _spec(),
        f"input 'features': shape {list(shape)} does not match the model's [-1, 4]",
        "first dimension is the batch",
    )


def test_a_scalar_has_no_batch_dimension():
    _rejects(_request(_tensor("features", "FP32", ()), _good()[1]), _spec(), "input 'features': shape []")


def test_variable_dims_still_fix_the_rank():
    _rejects(
        _request(_good()[0], _tensor("tokens", "INT64", (3, 5, 1))),
        _spec(),
        "input 'tokens': shape [3, 5, 1] does not match the model's [-1, -1]",
    )


def test_batch_size_zero_is_rejected():
    _rejects(_request(*_good(rows=0)), _spec(max_batch_size=8), "input 'features': batch size 0 is outside 1..8")


def test_batch_size_over_max_batch_size_is_rejected():
    _rejects(
        _request(*_good(rows=9)),
        _spec(max_batch_size=8),
        "input 'features': batch size 9 is outside 1..8 (max_batch_size)",
    )


def test_inputs_that_disagree_on_the_batch_size_are_rejected():
    _rejects(
        _request(_tensor("features", "FP32", (3, 4)), _tensor("tokens", "INT64", (2, 5))),
        _spec(),
        "inputs disagree on the batch size: 3 and 2",
        "'tokens'",
    )


def test_a_model_without_a_batch_dimension_rejects_a_leading_batch_dim():
    spec = _spec(max_batch_size=0, inputs=[TensorSpec("features", "FP32", (4,))])

    message = _rejects(
        _request(_tensor("features", "FP32", (1, 4))),
        spec,
        "input 'features': shape [1, 4] does not match the model's [4]",
    )
    assert "batch" not in message


def test_a_model_without_a_batch_dimension_still_checks_fixed_dims():
    spec = _spec(max_batch_size=0, inputs=[TensorSpec("image", "UINT8", (-1, -1, 3))])
    _rejects(_request(_tensor("image", "UINT8", (20, 30, 4))), spec, "input 'image': shape [20, 30, 4]", "[-1, -1, 3]")


def test_an_input_over_the_element_limit_is_rejected():
    _rejects(
        _request(_tensor("features", "FP32", (3, 4)), _tensor("tokens", "INT64", (3, 5))),
        _spec(),
        "input 'tokens': 15 elements is over the limit of 12",
        max_elements=12,
    )


def test_an_empty_tensor_is_not_a_way_around_the_batch_check():
    _rejects(_request(*_good(rows=0, tokens=0)), _spec(), "batch size 0")


# -- outputs: which ones, in which order, binary or JSON ---------------------------


def _outputs(checked: ValidatedRequest) -> list[tuple[str, bool]]:
    return [(spec.name, binary) for spec, binary in checked.outputs]


@pytest.mark.parametrize("binary_output", [False, True])
def test_no_requested_outputs_means_every_output_in_model_order_with_the_request_default(binary_output):
    checked = validate_request(_request(*_good(), binary_output=binary_output), _spec())

    assert _outputs(checked) == [("probs", binary_output), ("label", binary_output)]
    assert [spec.datatype for spec, _ in checked.outputs] == ["FP32", "BYTES"]


def test_requested_outputs_come_back_in_request_order():
    outputs = [RequestedOutput("label"), RequestedOutput("probs")]
    checked = validate_request(_request(*_good(), outputs=outputs), _spec())
    assert _outputs(checked) == [("label", False), ("probs", False)]


def test_a_subset_of_outputs_can_be_requested():
    checked = validate_request(_request(*_good(), outputs=[RequestedOutput("probs", True)]), _spec())
    assert _outputs(checked) == [("probs", True)]


def test_a_per_output_binary_flag_overrides_the_request_default():
    outputs = [RequestedOutput("probs", False), RequestedOutput("label", None)]

    checked = validate_request(_request(*_good(), outputs=outputs, binary_output=True), _spec())

    assert _outputs(checked) == [("probs", False), ("label", True)]
    outputs = [RequestedOutput("probs", True), RequestedOutput("label", None)]
    checked = validate_request(_request(*_good(), outputs=outputs, binary_output=False), _spec())
    assert _outputs(checked) == [("probs", True), ("label", False)]


def test_binary_flags_from_a_json_body_reach_the_outputs():
    body = (
        b'{"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]},'
        b' {"name": "tokens", "datatype": "INT64", "shape": [1, 2], "data": [[7, 8]]}],'
        b' "outputs": [{"name": "label"}, {"name": "probs", "parameters": {"binary_data": false}}],'
        b' "parameters": {"binary_data_output": true}}'
    )
    checked = validate_request(decode_request(body, None), _spec())
    assert _outputs(checked) == [("label", True), ("probs", False)]
    assert checked.rows == 1


def test_an_unknown_requested_output_is_named_with_the_models_outputs():
    _rejects(
        _request(*_good(), outputs=[RequestedOutput("probs"), RequestedOutput("score")]),
        _spec(),
        "model 'fraud' has no output 'score'",
        "['probs', 'label']",
    )
