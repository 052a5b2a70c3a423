"""Tiny random-weight vision-language checkpoints (HF folders), built on the fly, for the projector
converter (`edge-llm convert` writing `mmproj-*.gguf`) and the image path of the engine.

Each builder writes what the family ships: config.json (the hub's shape: a `vision_config`, a
`text_config`, the family's image token ids), safetensors with the family's own tensor names, a
real tokenizer (trained here, see tiny_models.build_tokenizers) with the family's image markers as
special tokens and a chat template that places images, and the family's processor configuration
(preprocessor_config.json / processor_config.json: image size, mean/std, tokens per image). Sizes
are the smallest llama.cpp's mtmd runs: one or two tiny encoder layers, 28-64 pixel images, a few
image tokens each.

Layouts. transformers 5 saves some of these checkpoints under other tensor names than the hub's:
Gemma 3's and LLaVA's vision tower come out as `vision_tower.*` where the hub (and llama.cpp's
converter) have `vision_tower.vision_model.*`. Builders take `layout="hub"` (the default: the names
of the released checkpoints) or `layout="transformers"` (what `save_pretrained` writes today).
InternVL ships two ways: the original remote-code checkpoints (InternVLChatModel: `vision_model.*`,
`mlp1.*`, fused qkv; llama.cpp's converter reads only this one) and the "-hf" ones transformers
reads natively (InternVLForConditionalGeneration); `build_internvl(layout="remote")` writes the
former from the same random weights, without any remote code (this project never runs it).

`VISION_FAMILIES` (at the end) is the catalogue the tests run.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# OpenAI CLIP's normalization (LLaVA, Qwen2-VL) and SigLIP's (Gemma 3, SmolVLM); InternVL uses ImageNet's.
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
HALF = [0.5, 0.5, 0.5]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

# The language model inside every checkpoint: as tiny_models.SMALL, with a head size that llama.cpp's
# M-RoPE (Qwen2-VL: 3 sections over half the head) and the vision projectors accept.
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, rms_norm_eps=1e-6, initializer_range=0.2)


@dataclass
class TinyVision:
    path: Path
    reference: object  # the transformers model (eval mode) the checkpoint was saved from
    tokenizer: object
    image_processor: object  # the family's transformers image processor, as saved in preprocessor_config.json


# --- tokenizers with the family's image markers ----------------------------------------------------

def _tokenizer(src: Path, folder: Path, special: list[str], template: str, named: dict[str, str] | None = None,
               fast_file: bool = False):
    """`src` (a tokenizer folder from tiny_models.build_tokenizers) with `special` tokens added and the
    chat template set, saved by transformers into `folder`; `named`: attributes such as Gemma 3's
    `boi_token` that the family's processor reads from the tokenizer."""
    import transformers
    from tokenizers import AddedToken

    if fast_file:  # SmolLM2's BPE exactly as tokenizer.json has it (AutoTokenizer would rebuild GPT2Tokenizer)
        tok = transformers.PreTrainedTokenizerFast.from_pretrained(src, extra_special_tokens=named or {})
    else:
        tok = transformers.AutoTokenizer.from_pretrained(src, extra_special_tokens=named or {})
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in special], special_tokens=True)
    tok.chat_template = template
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(folder)
    if (src / "tokenizer.model").is_file():  # SentencePiece families keep the model beside tokenizer.json
        shutil.copy(src / "tokenizer.model", folder / "tokenizer.model")
    return tok


def _relayout(folder: Path, rename: Callable[[str], str]) -> None:
    """Rename the checkpoint's tensors in place (another release's names for the same weights)."""
    from safetensors.numpy import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    save_file({rename(k): v for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def _edit_config(folder: Path, edit: Callable[[dict], None]) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config, indent=2))


def _scramble(model, seed: int) -> None:
    """Norm weights start at ones, biases and a few embeddings and projections at zeros: random ones
    make a wrong mapping, offset or split show in the converted file (and in the encoder's output)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "ln_q.weight", "layernorm.weight",
                              "layer_norm.weight", "layrnorm.weight", "layernorm_before.weight",
                              "layernorm_after.weight", "norm_weight")):
                param.copy_(torch.rand(param.shape, generator=gen) + 0.5)
            elif name.endswith(("bias", "lambda_1", "lambda_2")):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
            elif name.endswith(("mm_input_projection_weight", "cls_token", "position_embeddings")):
                # initialized to zeros: Gemma 3's projection (every image embedding would be 0), InternViT's
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)


def _save(model, image_processor, folder: Path, processor_class: str, **processor_config) -> None:
    """The weights, preprocessor_config.json and processor_config.json as the hub's repos have them
    (the tokenizer and its chat template are saved already). The processor object itself is not
    built: transformers 5 wants torchvision for the video half of several of these processors."""
    model.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    (folder / "processor_config.json").write_text(json.dumps({**processor_config, "processor_class": processor_class},
                                                             indent=2))


# --- Gemma 3 (SigLIP tower, average-pooled, RMS-normed projection) ----------------------------------

GEMMA3_VISION_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] %}{{ '<start_of_turn>' + role + '\\n' }}{% if message['content'] is string %}"
    "{{ message['content'] | trim }}{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "{{ '<start_of_image>' }}{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}"
    "{% endif %}{{ '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}"
    "{% endif %}")


def build_gemma3_vision(folder: Path, tokenizers_dir: Path, layout: str = "hub") -> TinyVision:
    """Gemma3ForConditionalGeneration: a 2-layer SigLIP (28-pixel images, 14-pixel patches: 2x2
    patches, pooled to 1 token per image), the Gemma 3 text model of tiny_models."""
    import torch
    import transformers

    torch.manual_seed(100)
    markers = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tok = _tokenizer(tokenizers_dir / "gemma", folder, list(markers.values()), GEMMA3_VISION_TEMPLATE, markers)
    ids = {k.replace("_token", "_token_index"): tok.convert_tokens_to_ids(v) for k, v in markers.items()}
    text = transformers.Gemma3TextConfig(vocab_size=len(tok), **{**TEXT, "num_attention_heads": 4}, head_dim=16,
                                         query_pre_attn_scalar=16, sliding_window=64, pad_token_id=0, eos_token_id=1,
                                         bos_token_id=2)
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=28, patch_size=14,
                                             vision_use_head=False)
    config = transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=1,
                                       **ids, eos_token_id=[1, tok.convert_tokens_to_ids("<end_of_turn>")])
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    _scramble(model, 100)
    image_processor = transformers.Gemma3ImageProcessor(size={"height": 28, "width": 28}, image_mean=HALF,
                                                        image_std=HALF, do_pan_and_scan=False)
    _save(model, image_processor, folder, "Gemma3Processor", image_seq_length=1)
    if layout == "hub":  # google/gemma-3-*-it: the SigLIP tower under vision_tower.vision_model.
        _relayout(folder, lambda k: k.replace("vision_tower.", "vision_tower.vision_model.", 1)
                  if k.startswith("vision_tower.") else k)
    return TinyVision(folder, model, tok, image_processor)


# --- SmolVLM / Idefics3 (SigLIP-like tower, pixel shuffle, one linear) -------------------------------

IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}{% if message['content'] is string %}"
    "{{ ': ' + message['content'] }}{% else %}{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}"
    "{{ ': ' }}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def build_smolvlm(folder: Path, tokenizers_dir: Path, version: int = 1) -> TinyVision:
    """SmolVLM as HuggingFaceTB ships it: version 1 (SmolVLM-256M/500M-Instruct) is an
    Idefics3ForConditionalGeneration, version 2 (SmolVLM2) a SmolVLMForConditionalGeneration. The
    tower sees 32-pixel tiles of 8-pixel patches (4x4), pixel-shuffled by 2 into 4 tokens per tile;
    images up to 64 pixels are split into 2x2 tiles plus a global one. SmolLM2's tokenizer."""
    import torch
    import transformers

    torch.manual_seed(110 + version)
    grid = [f"<row_{r}_col_{c}>" for r in range(1, 5) for c in range(1, 5)]
    markers = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *grid]
    named = {"image_token": "<image>"}
    tok = _tokenizer(tokenizers_dir / "bpe", folder, markers, IDEFICS3_TEMPLATE, named, fast_file=True)
    text = transformers.LlamaConfig(vocab_size=len(tok), **TEXT, rope_theta=100000.0, tie_word_embeddings=False,
                                    pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
                                    bos_token_id=tok.bos_token_id, eos_token_id=tok.convert_tokens_to_ids("<end_of_utterance>"))
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    image_token = tok.convert_tokens_to_ids("<image>")
    if version == 1:
        config = transformers.Idefics3Config(text_config=text.to_dict(), vision_config=vision, scale_factor=2,
                                             image_token_id=image_token)
        model = transformers.Idefics3ForConditionalGeneration(config)
        processor_cls, image_processor_cls = "Idefics3Processor", transformers.Idefics3ImageProcessor
    else:
        config = transformers.SmolVLMConfig(text_config=text.to_dict(), vision_config=vision, scale_factor=2,
                                            image_token_id=image_token)
        model = transformers.SmolVLMForConditionalGeneration(config)
        processor_cls, image_processor_cls = "SmolVLMProcessor", transformers.SmolVLMImageProcessor
    model.eval()
    _scramble(model, 110 + version)
    image_processor = image_processor_cls(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                          image_mean=HALF, image_std=HALF, do_image_splitting=True)
    _save(model, image_processor, folder, processor_cls, image_seq_len=4)

    def hub_text_config(config: dict) -> None:  # the hub's text_config names its own architecture
        config["text_config"]["architectures"] = ["VLlama3ForCausalLM"]
    _edit_config(folder, hub_text_config)
    return TinyVision(folder, model, tok, image_processor)


# --- Qwen2-VL and Qwen2.5-VL (2-D RoPE ViT, 2x2 patch merger, M-RoPE language model) ---------------

QWEN2VL_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}")


def build_qwen2_vl(folder: Path, tokenizers_dir: Path, version: str = "2.5") -> TinyVision:
    """Qwen2-VL (LayerNorm blocks, GELU MLP) or Qwen2.5-VL (RMSNorm blocks, SwiGLU MLP, window
    attention in all but every 2nd block): 4 blocks (llama.cpp's tensor map numbers the merger's
    layers like blocks, so its `mlp.2` needs at least 3), 14-pixel patches in pairs of frames, merged 2x2; images
    of 56 to 112 pixels (4 to 16 tokens). The language model has M-RoPE sections [2, 3, 3] of its
    16-wide heads."""
    import torch
    import transformers

    torch.manual_seed(120 + (version == "2.5"))
    markers = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
               "<|video_pad|>"]
    named = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "vision_bos_token": "<|vision_start|>",
             "vision_eos_token": "<|vision_end|>"}
    tok = _tokenizer(tokenizers_dir / "qwen2-bpe", folder, markers, QWEN2VL_TEMPLATE, named)
    token_ids = dict(image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
                     video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
                     vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
                     vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"))
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    text = dict(vocab_size=len(tok), **TEXT, tie_word_embeddings=False, bos_token_id=None, eos_token_id=eos,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1_000_000.0})
    if version == "2.5":
        vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TEXT["hidden_size"],
                      fullatt_block_indexes=[1, 3], window_size=56, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2)
        config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **token_ids)
        model = transformers.Qwen2_5_VLForConditionalGeneration(config)
        processor_cls = "Qwen2_5_VLProcessor"
    else:
        vision = dict(depth=4, embed_dim=32, hidden_size=TEXT["hidden_size"], num_heads=2, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **token_ids)
        model = transformers.Qwen2VLForConditionalGeneration(config)
        processor_cls = "Qwen2VLProcessor"
    model.eval()
    _scramble(model, 120 + (version == "2.5"))
    image_processor = transformers.Qwen2VLImageProcessor(
        size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112}, patch_size=14, merge_size=2, temporal_patch_size=2,
        image_mean=CLIP_MEAN, image_std=CLIP_STD)
    _save(model, image_processor, folder, processor_cls)
    return TinyVision(folder, model, tok, image_processor)


# --- LLaVA-1.5 (CLIP tower without its last layer, 2-layer GELU MLP projector) ----------------------

LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + ' ' }}{% else %}"
    "{{ message['role'].upper() + ': ' }}{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\\n' }}{% elif item['type'] == "
    "'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}{{ ' ' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def build_llava(folder: Path, tokenizers_dir: Path, layout: str = "hub") -> TinyVision:
    """llava-hf/llava-1.5-*-hf's shape: a 3-layer CLIP ViT (28-pixel images, 14-pixel patches: 4
    patch tokens after the class token is dropped) read at its second-to-last layer, a GELU MLP
    projector, a Llama with a SentencePiece tokenizer and an `<image>` token."""
    import torch
    import transformers

    torch.manual_seed(130)
    tok = _tokenizer(tokenizers_dir / "spm", folder, ["<image>", "<pad>"], LLAVA_TEMPLATE, {"image_token": "<image>"})
    text = transformers.LlamaConfig(vocab_size=len(tok), **TEXT, tie_word_embeddings=False,
                                    pad_token_id=tok.convert_tokens_to_ids("<pad>"), bos_token_id=1, eos_token_id=2)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=2, image_size=28, patch_size=14, projection_dim=48)
    config = transformers.LlavaConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                      image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=4,
                                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                                      pad_token_id=text.pad_token_id)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    _scramble(model, 130)
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                                      image_mean=CLIP_MEAN, image_std=CLIP_STD)
    _save(model, image_processor, folder, "LlavaProcessor", patch_size=14, vision_feature_select_strategy="default",
          num_additional_image_tokens=1)
    if layout == "hub":  # llava-hf/llava-1.5-7b-hf: the CLIP tower under vision_tower.vision_model.
        _relayout(folder, lambda k: k.replace("vision_tower.", "vision_tower.vision_model.", 1)
                  if k.startswith("vision_tower.") else k)
    return TinyVision(folder, model, tok, image_processor)


# --- InternVL (InternViT with layer scale, pixel shuffle, LayerNorm + 2-layer MLP projector) --------

INTERNVL_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<image>\\n' }}{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def build_internvl(folder: Path, tokenizers_dir: Path, layout: str = "hf") -> TinyVision:
    """InternVL3-1B's shape: a 4-layer InternViT (the projector's `mlp1.3` is numbered like a block,
    so the tensor map needs 4) (28-pixel tiles of 14-pixel patches, class token,
    layer scale), pixel-shuffled by 2 into 1 token per tile, a Qwen2 language model. `layout="hf"`:
    OpenGVLab/InternVL3-*-hf as transformers saves it; `layout="remote"`: OpenGVLab/InternVL3-* (the
    remote-code InternVLChatModel), the same weights renamed and q/k/v fused the original way."""
    import torch
    import transformers

    torch.manual_seed(140)
    markers = ["<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>",
               "<box>", "</box>"]
    named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    tok = _tokenizer(tokenizers_dir / "qwen2-bpe", folder, [*markers, "<video>"], INTERNVL_TEMPLATE, named)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    text = transformers.Qwen2Config(vocab_size=len(tok), **TEXT, rope_theta=1_000_000.0, tie_word_embeddings=False,
                                    bos_token_id=None, eos_token_id=eos)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=[28, 28],
                  patch_size=[14, 14], attention_bias=True, hidden_act="gelu", layer_norm_eps=1e-6)
    config = transformers.InternVLConfig(text_config=text.to_dict(), vision_config=vision, downsample_ratio=0.5,
                                         image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=1,
                                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    model = transformers.InternVLForConditionalGeneration(config).eval()
    _scramble(model, 140)
    image_processor = transformers.GotOcr2ImageProcessor(size={"height": 28, "width": 28}, crop_to_patches=True,
                                                         min_patches=1, max_patches=4, image_mean=IMAGENET_MEAN,
                                                         image_std=IMAGENET_STD)
    _save(model, image_processor, folder, "InternVLProcessor", image_seq_length=1)

    def hub_text_config(config: dict) -> None:  # OpenGVLab/InternVL3-*-hf name the language model's class
        config["text_config"]["architectures"] = ["Qwen2ForCausalLM"]
    _edit_config(folder, hub_text_config)
    if layout == "remote":
        _internvl_to_remote_layout(folder, config)
    return TinyVision(folder, model, tok, image_processor)


def _internvl_to_remote_layout(folder: Path, config) -> None:
    """The -hf checkpoint in `folder` rewritten as the original InternVLChatModel release: tensor
    names and fused q/k/v of its modelling code, its config.json (`llm_config`, an InternVisionModel
    `vision_config`, the tiling limits), no processor classes transformers would need remote code for."""
    from safetensors.numpy import load_file, save_file

    hf = load_file(str(folder / "model.safetensors"))
    vc = config.vision_config
    out: dict[str, np.ndarray] = {}
    for name, value in hf.items():
        if name.startswith("language_model."):
            out[name] = value
            continue
        if name.startswith("multi_modal_projector."):
            part = {"layer_norm": "0", "linear_1": "1", "linear_2": "3"}[name.split(".")[1]]
            out[f"mlp1.{part}.{name.split('.')[-1]}"] = value
            continue
        rest = name.removeprefix("vision_tower.")
        if rest == "embeddings.cls_token":
            out["vision_model.embeddings.class_embedding"] = value
        elif rest == "embeddings.position_embeddings":
            out["vision_model.embeddings.position_embedding"] = value
        elif rest.startswith("embeddings.patch_embeddings.projection."):
            out["vision_model.embeddings.patch_embedding." + rest.split(".")[-1]] = value
        elif rest.startswith("encoder.layer."):
            _, _, bid, *tail = rest.split(".")
            prefix, tail = f"vision_model.encoder.layers.{bid}", ".".join(tail)
            if tail.startswith("attention.q_proj."):
                kind = tail.split(".")[-1]
                out[f"{prefix}.attn.qkv.{kind}"] = np.concatenate(
                    [hf[f"vision_tower.encoder.layer.{bid}.attention.{p}_proj.{kind}"] for p in "qkv"])
            elif tail.startswith(("attention.k_proj.", "attention.v_proj.")):
                continue
            else:
                renamed = {"attention.projection_layer.weight": "attn.proj.weight",
                           "attention.projection_layer.bias": "attn.proj.bias", "lambda_1": "ls1", "lambda_2": "ls2",
                           "layernorm_before.weight": "norm1.weight", "layernorm_before.bias": "norm1.bias",
                           "layernorm_after.weight": "norm2.weight", "layernorm_after.bias": "norm2.bias",
                           "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
                           "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias"}[tail]
                out[f"{prefix}.{renamed}"] = value
        else:
            raise ValueError(f"unexpected InternVL tensor {name}")
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    text = json.loads((folder / "config.json").read_text())["text_config"]
    remote = {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "_name_or_path": "OpenGVLab/InternVL3-1B",
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                     "AutoModel": "modeling_internvl_chat.InternVLChatModel"},
        "downsample_ratio": config.downsample_ratio, "dynamic_image_size": True, "force_image_size": vc.image_size[0],
        "min_dynamic_patch": 1, "max_dynamic_patch": 4, "ps_version": "v2", "select_layer": -1,
        "template": "internvl2_5", "use_thumbnail": True, "tie_word_embeddings": False,
        "llm_config": {**text, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"},
        "vision_config": {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
                          "hidden_size": vc.hidden_size, "intermediate_size": vc.intermediate_size,
                          "num_hidden_layers": vc.num_hidden_layers, "num_attention_heads": vc.num_attention_heads,
                          "image_size": vc.image_size[0], "patch_size": vc.patch_size[0], "num_channels": 3,
                          "qkv_bias": True, "qk_normalization": False, "layer_norm_eps": vc.layer_norm_eps,
                          "hidden_act": "gelu", "norm_type": "layer_norm", "initializer_factor": 0.1,
                          "drop_path_rate": 0.0, "use_flash_attn": False}}
    (folder / "config.json").write_text(json.dumps(remote, indent=2))
    # The remote release's preprocessing is code (no image processor class): only mean/std and size.
    for name in ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json"):
        (folder / name).unlink(missing_ok=True)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": vc.image_size[0], "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD, "size": vc.image_size[0]}, indent=2))


# --- the catalogue ---------------------------------------------------------------------------------

@dataclass
class VisionFamily:
    build: Callable  # (folder, tokenizers_dir) -> TinyVision
    pre: str  # the text GGUF's tokenizer.ggml.pre (llama.cpp's converter's fallback, as in tiny_models)
    projector: str  # the projector type llama.cpp's mtmd runs it with (clip.projector_type)
    # The catalogue entry with the same weights in the layout llama.cpp's converter reads, when it
    # refuses this one (`refusal`: how it says so); its projector is the reference for this one's.
    reference: str | None = None
    refusal: str = ""
    # Where edge-llm's projector GGUF differs from llama.cpp's on purpose (as tiny_models.Family).
    differences: dict = field(default_factory=dict)
    # The image tokens mtmd makes of one image tile (None: it depends on the image's size).
    tokens_per_tile: int | None = None


# llama.cpp's legacy LLaVA converter writes no quantization version; edge-llm's writer always does.
LEGACY_LLAVA = {"general.quantization_version": ("llama.cpp None, edge-llm 2", "edge-llm's GGUF writer "
                                                 "always records the quantization version; mtmd does not read it")}

VISION_FAMILIES = {
    "gemma3": VisionFamily(lambda d, t: build_gemma3_vision(d, t), "default", "gemma3", tokens_per_tile=1),
    "gemma3-transformers": VisionFamily(lambda d, t: build_gemma3_vision(d, t, layout="transformers"), "default",
                                        "gemma3", reference="gemma3", tokens_per_tile=1,
                                        refusal="Can not map tensor 'vision_tower.embeddings.patch_embedding.bias'"),
    "smolvlm": VisionFamily(lambda d, t: build_smolvlm(d, t, version=1), "smollm", "idefics3", tokens_per_tile=4),
    "smolvlm2": VisionFamily(lambda d, t: build_smolvlm(d, t, version=2), "smollm", "idefics3", tokens_per_tile=4),
    "qwen2-vl": VisionFamily(lambda d, t: build_qwen2_vl(d, t, version="2"), "qwen2", "qwen2vl_merger"),
    "qwen2.5-vl": VisionFamily(lambda d, t: build_qwen2_vl(d, t, version="2.5"), "qwen2", "qwen2.5vl_merger"),
    "llava-1.5": VisionFamily(lambda d, t: build_llava(d, t), "default", "mlp", differences=LEGACY_LLAVA,
                              tokens_per_tile=4),
    "llava-1.5-transformers": VisionFamily(lambda d, t: build_llava(d, t, layout="transformers"), "default", "mlp",
                                           reference="llava-1.5", differences=LEGACY_LLAVA, tokens_per_tile=4),
    "internvl": VisionFamily(lambda d, t: build_internvl(d, t, layout="remote"), "qwen2", "internvl",
                             tokens_per_tile=1),
    "internvl-hf": VisionFamily(lambda d, t: build_internvl(d, t), "qwen2", "internvl", reference="internvl",
                                refusal="Model InternVLForConditionalGeneration is not supported", tokens_per_tile=1),
}
