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


def test_lora_run_exports_a_peft_adapter_and_a_merged_model(runs, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    from thinwire.export import load_for_generation

    assert main(["export", str(runs["fedit"]), "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "adapter_config.json").is_file() and (tmp_path / "a" / "base").is_dir()
    # the built-in base is saved inside the export and named relative to it ("base")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["base_model_name_or_path"] == "base"
    monkeypatch.chdir(tmp_path / "a")
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


def _readme_snippet(export, moved):
    """The README's Python block, pointed at where the export now lives."""
    readme = (moved / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    written = f"export = Path({str(export.resolve())!r})"
    assert written in code
    return code.replace(written, f"export = Path({str(moved)!r})")


@pytest.mark.parametrize("method", ["fedit", "fedavg"])
def test_a_moved_export_loads_and_generates_with_its_readmes_snippet(runs, tmp_path, capsys, method):
    """Export, move the directory elsewhere, then run the README's snippet (peft / transformers,
    no thinwire) and `thinwire generate --input`: both load it and give the same greedy answer,
    so the chat template the snippet uses renders the prompt thinwire trained and generates with."""
    export, moved = tmp_path / "export", tmp_path / "elsewhere" / "moved"
    assert main(["export", str(runs[method]), "--out", str(export)]) == 0
    moved.parent.mkdir()
    export.rename(moved)
    capsys.readouterr()
    exec(compile(_readme_snippet(export, moved), "README.md", "exec"), {})
    snippet_answer = capsys.readouterr().out.strip()
    assert main(["generate", str(moved), "Reverse the word.", "--input", "parrot", "--max-new-tokens", "32"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("### Reverse the word.\n")
    assert printed.split("\n", 1)[1].strip() == snippet_answer


def test_the_exported_chat_template_renders_the_trained_prompt_token_for_token(runs, tmp_path):
    from transformers import AutoTokenizer

    from thinwire.data.template import PROMPT_NO_INPUT, PROMPT_WITH_INPUT, encode_example, use_template

    assert main(["export", str(runs["fedavg"]), "--out", str(tmp_path / "m")]) == 0
    exported = AutoTokenizer.from_pretrained(tmp_path / "m")
    trained = AutoTokenizer.from_pretrained(tmp_path / "m")
    use_template(trained, "alpaca")  # how the run encoded its examples
    for example in ({"instruction": "Reverse the word.", "input": "parrot", "output": "torrap"},
                    {"instruction": "Add 2 and 3.", "input": "", "output": "5"}):
        user = {"role": "user", "content": example["instruction"], "input": example["input"]}
        want = encode_example(trained, example, 512)
        prompt_length = want["labels"].count(-100)
        rendered = exported.apply_chat_template([user], add_generation_prompt=True, return_dict=True)
        assert rendered["input_ids"] == want["input_ids"][:prompt_length]
        conversation = [user, {"role": "assistant", "content": example["output"]}]
        assert exported.apply_chat_template(conversation, return_dict=True)["input_ids"] == want["input_ids"]
    readme = (tmp_path / "m" / "README.md").read_text()
    assert PROMPT_WITH_INPUT.rstrip("\n") in readme and PROMPT_NO_INPUT.rstrip("\n") in readme
    assert "random 2-layer model" in readme  # tiny's quality is explained


def test_exports_follow_the_umask(runs, tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        assert main(["export", str(runs["fedit"]), "--out", str(tmp_path / "a")]) == 0
        assert main(["export", str(runs["fedpt"]), "--out", str(tmp_path / "p")]) == 0
    finally:
        os.umask(old)
    for root in (tmp_path / "a", tmp_path / "p"):
        paths = [root, *root.rglob("*")]
        assert len(paths) > 3
        for path in paths:
            want = 0o755 if path.is_dir() else 0o644
            assert stat.S_IMODE(path.stat().st_mode) == want, path


def test_generate_prints_no_library_noise(runs, tmp_path):
    """transformers' and peft's progress bars and warnings stay out of `thinwire generate`."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    assert main(["export", str(runs["fedit"]), "--out", str(tmp_path / "a")]) == 0
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "thinwire.cli", "generate", str(tmp_path / "a"), "Reverse the word.",
                           "--input", "parrot", "--max-new-tokens", "4"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.startswith("### Reverse the word.\n")
