import pytest

from edge_llm.errors import InvalidParameterError
from edge_llm.sampling import SamplingParams


def test_defaults_are_valid():
    p = SamplingParams()
    assert p.n == 1 and p.max_tokens == 256 and not p.greedy


@pytest.mark.parametrize("field,value,fragment", [
    ("temperature", -0.1, "greater than or equal to 0"),
    ("top_p", 0.0, "greater than 0"),
    ("top_p", 1.5, "less than or equal to 1"),
    ("top_k", 0, "-1 (disabled) or >= 1"),
    ("top_k", -5, "-1 (disabled) or >= 1"),
    ("min_p", 2.0, "less than or equal to 1"),
    ("presence_penalty", 3.0, "less than or equal to 2"),
    ("frequency_penalty", -2.5, "greater than or equal to -2"),
    ("repetition_penalty", 0.0, "greater than 0"),
    ("max_tokens", 0, "greater than or equal to 1"),
    ("n", 0, "greater than or equal to 1"),
    ("logprobs", 21, "less than or equal to 20"),
    ("seed", -1, "greater than or equal to 0"),
    ("temperature", float("nan"), "finite"),
    ("stop", ["ok", ""], "must not be empty"),
    ("stop_token_ids", [-3], ">= 0"),
])
def test_out_of_range_names_parameter_and_value(field, value, fragment):
    with pytest.raises(InvalidParameterError) as info:
        SamplingParams.create(**{field: value})
    message = str(info.value)
    assert message.startswith(f"invalid {field}")
    assert fragment in message
    assert "\n" not in message
    assert info.value.param == field


def test_unknown_parameter_is_refused():
    with pytest.raises(InvalidParameterError, match="temprature: is not a sampling parameter"):
        SamplingParams.create(temprature=0.5)


def test_stop_accepts_a_single_string_and_none_is_default():
    assert SamplingParams.create(stop="\n").stop == ("\n",)
    assert SamplingParams.create(stop=None, top_k=None).top_k == 40


def test_greedy_and_replace():
    p = SamplingParams.create(temperature=0)
    assert p.greedy
    assert p.replace(temperature=0.7).temperature == 0.7
    with pytest.raises(InvalidParameterError):
        p.replace(top_p=2)


def test_ignore_eos_cannot_be_combined_with_a_grammar():
    # A complete grammar allows only end-of-generation; masking it made llama.cpp abort the process.
    with pytest.raises(InvalidParameterError) as caught:
        SamplingParams.create(grammar='root ::= "a"', ignore_eos=True)
    assert caught.value.param == "ignore_eos"
    assert SamplingParams.create(grammar='root ::= "a"').grammar


@pytest.mark.parametrize("field", ["n", "max_tokens", "seed", "top_k", "temperature", "logprobs"])
def test_booleans_are_not_numbers(field):
    with pytest.raises(InvalidParameterError) as caught:
        SamplingParams.create(**{field: True})
    assert caught.value.param == field
    with pytest.raises(InvalidParameterError):
        SamplingParams.create(stop_token_ids=[True])


def test_logit_bias_takes_token_ids_within_range():
    params = SamplingParams.create(logit_bias={"15": -100, 7: 2.5})
    assert params.logit_bias == {15: -100.0, 7: 2.5}
    assert SamplingParams.create(logit_bias={}).logit_bias is None
    for bad, fragment in [({"15": 101}, "less than or equal"), ({"x": 1}, "token ids"), ({"1": True}, "numbers"),
                          ({"-1": 1}, "token ids"), ({str(i): 1 for i in range(1025)}, "at most 1024")]:
        with pytest.raises(InvalidParameterError, match=fragment) as caught:
            SamplingParams.create(logit_bias=bad)
        assert caught.value.param.startswith("logit_bias")
