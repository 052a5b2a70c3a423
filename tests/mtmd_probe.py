"""Run a text GGUF with a projector GGUF on images through llama.cpp's mtmd (the Python bindings of
the pinned llama-cpp-python) and print what came out as one JSON line; run as a subprocess by the
tests, so that a projector llama.cpp cannot run fails the test instead of crashing pytest.

    python tests/mtmd_probe.py TEXT.gguf MMPROJ.gguf IMAGE [IMAGE...]

For each image: the prompt "<media marker> Describe." tokenized by mtmd (text and image chunks),
evaluated in a fresh sequence; reported: the chunks' kinds and token counts, and the last logits'
top tokens and a checksum (different images must give different logits: the projector is used).
"""

from __future__ import annotations

import ctypes
import json
import sys

import numpy as np


def probe(text_path: str, mmproj_path: str, images: list[str]) -> dict:
    import llama_cpp
    import llama_cpp.mtmd_cpp as mtmd
    from reference_llama import reference_llama  # this script's folder is on sys.path

    llm = reference_llama(text_path, n_ctx=1024, n_batch=512, n_threads=2, verbose=False)
    params = mtmd.mtmd_context_params_default()
    params.use_gpu = False
    params.n_threads = 2
    params.warmup = False
    ctx = mtmd.mtmd_init_from_file(mmproj_path.encode(), llm._model.model, params)
    if not ctx:
        raise SystemExit("mtmd_init_from_file failed: llama.cpp cannot load the projector")
    results = []
    try:
        for image in images:
            bitmap = mtmd.mtmd_helper_bitmap_init_from_file(ctx, image.encode(), False)
            if not bitmap:
                raise SystemExit(f"cannot read image {image}")
            prompt = mtmd.mtmd_default_marker() + b" Describe."
            text = mtmd.mtmd_input_text(prompt, len(prompt), True, True)
            chunks = mtmd.mtmd_input_chunks_init()
            try:
                bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
                if (rc := mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text), bitmaps, 1)) != 0:
                    raise SystemExit(f"mtmd_tokenize failed ({rc})")
                kinds = []
                for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                    chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                    kind = {mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT: "text", mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE: "image"}.get(
                        mtmd.mtmd_input_chunk_get_type(chunk), "other")
                    kinds.append([kind, mtmd.mtmd_input_chunk_get_n_tokens(chunk)])
                llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm._ctx.ctx), True)
                n_past = llama_cpp.llama_pos(0)
                rc = mtmd.mtmd_helper_eval_chunks(ctx, llm._ctx.ctx, chunks, 0, 0, 512, True, ctypes.byref(n_past))
                if rc != 0:
                    raise SystemExit(f"mtmd_helper_eval_chunks failed ({rc})")
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1),
                                               shape=(llm.n_vocab(),)).copy()
            finally:
                mtmd.mtmd_input_chunks_free(chunks)
                mtmd.mtmd_bitmap_free(bitmap)
            results.append({"chunks": kinds, "n_past": n_past.value, "finite": bool(np.isfinite(logits).all()),
                            "top": [int(t) for t in np.argsort(-logits)[:5]], "checksum": float(np.abs(logits).sum())})
    finally:
        mtmd.mtmd_free(ctx)
        llm.close()
    return {"images": results}


if __name__ == "__main__":
    print(json.dumps(probe(sys.argv[1], sys.argv[2], sys.argv[3:])))
