"""LoadOptions declared once (edge_llm/load_options.py): the flags, the environment variables and the
registry keys made from it, and the one order in which they are resolved. Fast: no model is loaded."""

import argparse
import json

import pytest

from edge_llm.errors import EdgeLLMError, InvalidParameterError
from edge_llm.load_options import DEFAULTS, OPTIONS, REGISTRY_FIELDS, LoadOptions
from edge_llm.options import PROMPT_CACHE, add_load_flags, add_model_flags, load_options
from edge_llm.registry import ModelSpec, load_registry


def parser_with(*groups, defaults=None):
    parser = argparse.ArgumentParser()
    add_model_flags(parser, defaults=defaults)
    if groups:
        add_load_flags(parser, *groups)
    return parser


def options(argv, environ=None, *groups, defaults=None, **extra):
    args = parser_with(*groups, defaults=defaults).parse_args(argv)
    return load_options(args, environ=environ or {}, **extra)


def spec(**settings):
    return ModelSpec(name="m", source="local", path="m.gguf", **settings)


def test_every_option_is_a_flag_of_the_commands_that_load_models():
    from edge_llm.commands.chat import build_parser as chat
    from edge_llm.server.serve import build_parser as serve

    dests = {action.dest for parser in (serve(), chat()) for action in parser._actions}
    assert set(OPTIONS) - {"seed"} <= dests  # seed is the sampling flag -s, read by load_options
    help_text = serve().format_help() + chat().format_help()
    for name, opt in OPTIONS.items():
        if opt.env_name:
            assert opt.env_name in help_text, f"{name}: --help does not name {opt.env_name}"
    assert "EDGE_LLM_CTX_SIZE" in help_text and "default: 4" in serve().format_help()  # -np 4 for serve


def test_flags_read_into_typed_values():
    got = options(["-c", "1024", "-fa", "-ts", "3,1", "--no-mmap", "--mlock", "-kvu", "-cram", "2G",
                   "--engine-arg", "enforce_eager=true", "--engine-arg", "backend=pytorch"], None, PROMPT_CACHE)
    assert (got.n_ctx, got.flash_attn, got.tensor_split, got.use_mmap, got.use_mlock) == (1024, "on", (3.0, 1.0),
                                                                                         False, True)
    assert (got.kv_unified, got.cache_ram, got.extra) == (True, 2 * 1024**3, {"enforce_eager": True,
                                                                                "backend": "pytorch"})
    assert options(["-no-kvu", "--mmap"], None, PROMPT_CACHE).kv_unified is False
    unset = options([])
    assert all(getattr(unset, name) is None for name in OPTIONS)
    assert unset.resolve().cache_ram == 0  # no prompt-cache flags: a one-shot command keeps no cache


@pytest.mark.parametrize("argv,message", [
    (["-np", "0"], "-np/--parallel: Input should be greater than or equal to 1 (got 0)"),
    (["-ngl", "-2"], "-ngl/--n-gpu-layers: Input should be greater than or equal to -1 (got -2)"),
    (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization: Input should be less than or equal to 1"),
])
def test_an_out_of_range_flag_is_one_line_naming_the_flag(argv, message):
    with pytest.raises(InvalidParameterError) as err:
        options(argv)
    assert message in str(err.value)


def test_an_unreadable_flag_is_argparses_usage_error(capsys):
    with pytest.raises(SystemExit):
        parser_with().parse_args(["-ts", "3,x"])
    assert "expected numbers separated by commas" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser_with().parse_args(["-fa", "maybe"])
    assert "-fa/--flash-attn: expected one of on, off, auto (got 'maybe')" in capsys.readouterr().err


def test_environment_variables_are_flags_given_another_way():
    env = {"EDGE_LLM_CTX_SIZE": "1024", "EDGE_LLM_FLASH_ATTN": "off", "EDGE_LLM_MMAP": "false",
           "EDGE_LLM_TENSOR_SPLIT": "1,1", "EDGE_LLM_CACHE_RAM": "1G", "EDGE_LLM_PARALLEL": "3"}
    got = options([], env, PROMPT_CACHE)
    assert (got.n_ctx, got.flash_attn, got.use_mmap, got.tensor_split, got.cache_ram, got.n_parallel) == (
        1024, "off", False, (1.0, 1.0), 1024**3, 3)
    assert options(["-c", "512"], env).n_ctx == 512  # the command line outranks the environment
    # A variable for a flag the command does not have is not read (generate has no prompt cache).
    assert options([], {"EDGE_LLM_CACHE_RAM": "1G"}).resolve().cache_ram == 0


@pytest.mark.parametrize("env,message", [
    ({"EDGE_LLM_CTX_SIZE": "lots"}, "environment variable EDGE_LLM_CTX_SIZE: invalid literal for int()"),
    ({"EDGE_LLM_FLASH_ATTN": "maybe"}, "environment variable EDGE_LLM_FLASH_ATTN: expected one of on, off, auto"),
    ({"EDGE_LLM_MLOCK": "sometimes"}, "environment variable EDGE_LLM_MLOCK: expected true or false"),
    ({"EDGE_LLM_PARALLEL": "0"}, "environment variable EDGE_LLM_PARALLEL: Input should be greater than or equal"),
])
def test_a_bad_environment_variable_is_one_line_naming_it(env, message):
    with pytest.raises(InvalidParameterError) as err:
        options([], env)
    assert message in str(err.value)


def test_resolution_order_flag_environment_entry_command_default_builtin():
    entry = spec(n_parallel=2, n_ctx=2048, n_batch=128)
    env = {"EDGE_LLM_BATCH_SIZE": "64", "EDGE_LLM_CTX_SIZE": "1024"}
    got = options(["-c", "512"], env, defaults={"n_parallel": 1, "n_gpu_layers": 7}).resolve(entry)
    assert got.n_ctx == 512  # flag > environment > entry
    assert got.n_batch == 64  # environment > entry
    assert got.n_parallel == 2  # entry > the command's default
    assert got.n_gpu_layers == 7  # the command's default > built-in
    assert got.cache_type_k == DEFAULTS["cache_type_k"] == "f16"  # built-in
    assert got.resolve(entry) == got  # resolving again changes nothing
    # The command's defaults survive a copy (offload's minimal context) until resolved.
    assert options([], defaults={"n_parallel": 5}).replace(n_ctx=64).resolve().n_parallel == 5


def test_every_registry_key_is_a_load_option_validated_like_its_flag(tmp_path):
    from edge_llm.sampling import MODEL_DEFAULT_FIELDS

    settings = set(ModelSpec.model_fields) - {"name", "description", "source", "repo", "file", "path", "format",
                                              "quant", "engines", "architecture", "kind"}
    assert settings == set(REGISTRY_FIELDS) | set(MODEL_DEFAULT_FIELDS)
    load_keys = settings - set(MODEL_DEFAULT_FIELDS)
    assert {"n_ctx", "n_gpu_layers", "flash_attn", "chat_format", "in_prefix", "in_suffix", "cache_type_k",
            "n_batch", "n_threads", "split_mode"} <= load_keys
    assert not {"verbose", "cache_dir", "max_queue", "seed"} & load_keys  # per process, not per model
    every = spec(**{"cache_type_k": "q8_0", "n_threads": 3, "use_mmap": False, "tensor_split": [3, 1]})
    assert LoadOptions().resolve(every).model_dump(include={"cache_type_k", "n_threads", "use_mmap",
                                                              "tensor_split"}) == {
        "cache_type_k": "q8_0", "n_threads": 3, "use_mmap": False, "tensor_split": (3.0, 1.0)}
    for bad, message in (({"n_gpu_layers": -2}, "n_gpu_layers: Input should be greater than or equal to -1"),
                         ({"flash_attn": "maybe"}, "flash_attn: Input should be 'on', 'off' or 'auto'"),
                         ({"n_parallel": 0}, "n_parallel: Input should be greater than or equal to 1"),
                         ({"ctx_size": 512}, "ctx_size: Extra inputs are not permitted")):
        cfg = tmp_path / "models.toml"
        lines = ["[models.mine]", 'source = "local"', 'path = "m.gguf"']
        cfg.write_text("\n".join(lines + [f"{k} = {json.dumps(v)}" for k, v in bad.items()]) + "\n")
        with pytest.raises(EdgeLLMError) as err:
            load_registry(cfg)
        assert str(err.value) == f"{cfg}: model 'mine': {message}"


def test_the_python_api_names_a_bad_option_before_loading_anything():
    import edge_llm

    with pytest.raises(InvalidParameterError, match="n_parallel: Input should be greater than or equal to 1"):
        edge_llm.load("/nonexistent/model.gguf", n_parallel=0)
    with pytest.raises(InvalidParameterError, match="ctx_size: Extra inputs are not permitted"):
        edge_llm.load("/nonexistent/model.gguf", ctx_size=512)


def test_a_registry_entry_gives_sampling_defaults_below_what_a_caller_sets(tmp_path):
    from edge_llm.sampling import SamplingParams

    entry = spec(temperature=0.2, top_k=20, top_p=0.8)
    assert entry.sampling_defaults() == {"temperature": 0.2, "top_k": 20, "top_p": 0.8}
    given = SamplingParams.create(temperature=0.9, max_tokens=8)
    filled = given.with_defaults(entry.sampling_defaults())
    assert (filled.temperature, filled.top_k, filled.top_p, filled.min_p) == (0.9, 20, 0.8, 0.05)
    # A copy with changes keeps "not given" apart from "given": the REPL's /set, per-choice seeds.
    changed = SamplingParams.create(top_p=0.5).replace(seed=3).with_defaults(entry.sampling_defaults())
    assert (changed.temperature, changed.top_p, changed.seed) == (0.2, 0.5, 3)
    cfg = tmp_path / "models.toml"
    cfg.write_text('[models.mine]\nsource = "local"\npath = "m.gguf"\ntop_k = 0\n')
    with pytest.raises(EdgeLLMError) as err:
        load_registry(cfg)
    assert str(err.value) == f"{cfg}: model 'mine': invalid top_k: must be -1 (disabled) or >= 1 (got 0)"
