"""`thinwire export`: what other tools load, checked by loading it with them and generating."""

import json

import pytest
import torch
from safetensors.torch import load_file

from thinwire.cli import main
from thinwire.runtime.local import run_local

PROMPT = torch.tensor([[5, 17, 3, 42, 8]])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One finished run per kind of export: full-parameter, LoRA and FedPT (tiny models, 1 round)."""
    from thinwire.config import EXAMPLES
    from thinwire.config import load_config

    root = tmp_path_factory.mktemp("runs")
    out = {}
    for method in ("fedavg", "fedit", "fedpt"):
        config = load_config(EXAMPLES / "smoke.toml", [f"method.name='{method}'", "federation.rounds=1",
                                                       "eval.generate=false", "train.lr=5e-2"])
        run_local(config, root / method, quiet=True)
        out[method] = root / method
    return out


def _logits(model):
    with torch.no_grad():
        return model(input_ids=PROMPT).logits


def test_full_parameter_run_exports_a_model_transformers_loads(runs, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    assert main(["export", str(runs["fedavg"]), "--out", str(tmp_path / "m")]) == 0
    assert json.loads((tmp_path / "m" / "thinwire.json").read_text()) == {"template": "alpaca"}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    final = load_file(str(runs["fedavg"] / "final_state.safetensors"))
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), final[name]), name
    assert main(["generate", str(tmp_path / "m"), "Reverse the word.", "--max-new-tokens", "3"]) == 0
    assert main(["generate", str(runs["fedavg"]), "Reverse the word.", "--max-new-tokens", "3"]) == 0
    printed = capsys.readouterr().out.split("### Reverse the word.")
    assert len(printed) == 3 and printed[1].strip() == printed[2].strip()  # the run and its export agree


def test_lora_run_exports_a_peft_adapter_and_a_merged_model(runs, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    from thinwire.export import load_for_generation

    assert main(["export", str(runs["fedit"]), "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "adapter_config.json").is_file() and (tmp_path / "a" / "base").is_dir()
    adapter = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "a").eval()
    run_model, _ = load_for_generation(runs["fedit"])
    want = _logits(run_model)
    assert not torch.allclose(want, _logits(adapter.get_base_model().__class__.from_pretrained(tmp_path / "a" / "base")))
    assert torch.allclose(_logits(adapter), want, atol=1e-5)
    assert main(["export", str(runs["fedit"]), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert torch.allclose(_logits(merged), want, atol=1e-4)


def test_fedpt_exports_its_proxy_and_generates(runs, tmp_path, capsys):
    assert main(["export", str(runs["fedpt"]), "--out", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "fedpt.json").is_file()
    assert main(["generate", str(tmp_path / "p"), "Add 2 and 3.", "--max-new-tokens", "3"]) == 0
    assert "### Add 2 and 3." in capsys.readouterr().out


@pytest.mark.parametrize("args, words", [
    (["export", "/nonexistent-run", "--out", "/tmp/x"], "not a finished run directory"),
    (["generate", "/", "hi"], "neither a run directory nor an export"),
])
def test_bad_directories_are_one_line_errors(args, words, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1


def test_export_refuses_an_existing_out(runs, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    assert main(["export", str(runs["fedavg"]), "--out", str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err and not list((tmp_path / "taken").iterdir())
