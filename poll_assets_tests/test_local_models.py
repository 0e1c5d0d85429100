"""The in-process backend's model resolution: bundled weights by model name, Gemma's chat turns."""

from __future__ import annotations

import pytest

from poll_assets.llm.providers.local import LocalLlamaBackend, bundled_model_path, chat_format, gemma_turns


def test_bundled_names_resolve_to_the_weights_their_packages_ship():
    smol = bundled_model_path("SmolLM2-135M-Instruct")
    assert smol.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and smol.is_file()
    assert bundled_model_path("smollm2-135m") == smol == bundled_model_path()
    gemma = bundled_model_path("gemma-3-270m")
    assert gemma.name == "gemma-3-270m-q4_k_m.gguf" and gemma.stat().st_size > 200_000_000
    assert bundled_model_path("Gemma3-270M") == gemma  # joined once, then found


def test_an_unknown_local_model_needs_a_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"local model 'llama-7b': no installed package ships its weights.*model_path"):
        LocalLlamaBackend("llama-7b", None, 4096)
    weights = tmp_path / "w.gguf"
    weights.write_bytes(b"GGUF")
    assert LocalLlamaBackend("llama-7b", str(weights), 4096).path == weights  # a path is taken as given


def test_gemma_gets_its_own_turns_with_the_system_text_kept():
    assert chat_format("gemma-3-270m") == "gemma" and chat_format("SmolLM2-135M-Instruct") is None
    messages = [{"role": "system", "content": "Rubric."}, {"role": "user", "content": "Texts."}]
    assert gemma_turns(messages) == [{"role": "user", "content": "Rubric.\n\nTexts."}]
    assert messages[1]["content"] == "Texts."  # the request's messages are not changed
    assert gemma_turns([{"role": "user", "content": "Hi"}]) == [{"role": "user", "content": "Hi"}]
    assert gemma_turns([{"role": "system", "content": "S"}]) == [{"role": "user", "content": "S"}]
