import subprocess
import sys
from pathlib import Path

import pytest

from thinwire.cli import main
from thinwire.config import Config, compare_variants, from_dict, load_config, to_toml
from thinwire.errors import UsageError


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[train]\nlr = 0.5\n[federation]\nclients = 6\n')
    config = load_config(path, ["train.local_steps=3", "model.lora_targets=['q_proj']", "method.name=fedavg"])
    assert config.train.lr == 0.5 and config.train.local_steps == 3
    assert config.federation.clients == 6 and config.federation.rounds == Config().federation.rounds
    assert config.model.lora_targets == ["q_proj"] and config.method.name == "fedavg"


def test_resolved_toml_round_trips(tmp_path):
    config = load_config(None, ["train.lr=0.25", "data.tasks=['add']"])
    path = tmp_path / "resolved.toml"
    path.write_text(to_toml(config))
    assert load_config(path) == config


def test_compare_tables_apply_to_their_method_only(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[train]\nlr = 1e-4\nlocal_steps = 7\n'
                    '[compare.fedit.train]\nlr = 2e-3\n'
                    '[compare.fedpt.model]\nname = "tiny"\n[compare.fedpt.method.fedpt]\nalpha = 0.5\n')
    assert load_config(path).train.lr == 2e-3  # the default method, fedit, runs with its table
    assert load_config(path, ["method.name=fedavg"]).train.lr == 1e-4
    assert load_config(path, ["method.name=fedavg", "method.name=fedit"]).train.lr == 2e-3  # the last --set wins
    assert load_config(path, variant="fedavg").train.lr == 1e-4
    fedit = load_config(path, ["method.name=fedit"], variant="fedit")
    assert fedit.train.lr == 2e-3 and fedit.train.local_steps == 7
    assert load_config(path, ["train.lr=0.5"], variant="fedit").train.lr == 0.5  # the command line wins
    fedpt = load_config(path, ["method.name=fedpt"], variant="fedpt")
    assert fedpt.model.name == "tiny" and fedpt.method.options["fedpt"]["alpha"] == 0.5


def test_method_train_defaults_apply_where_the_config_is_silent(tmp_path):
    ferret = load_config(None, ["method.name=ferret"])
    assert ferret.train.optimizer == "sgd"  # the released code's local optimizer
    assert load_config(None, ["method.name=fedavg"]).train.optimizer == "adamw"
    assert load_config(None, ["method.name=ferret", "train.optimizer='adamw'"]).train.optimizer == "adamw"
    path = tmp_path / "c.toml"
    path.write_text('[train]\noptimizer = "adamw"\n')
    assert load_config(path, ["method.name=ferret"]).train.optimizer == "adamw"  # a key in the file wins
    recorded = tmp_path / "resolved.toml"
    recorded.write_text(to_toml(ferret))
    assert 'optimizer = "sgd"' in recorded.read_text() and load_config(recorded) == ferret
    assert load_config(None, ["method.name=ferret", "train.momentum=0.9"]).train.momentum == 0.9  # SGD by default


def test_named_variants_set_their_method(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[compare.fedit.train]\nlr = 2e-3\n'
                    '[compare.fedit-slow.method]\nname = "fedit"\n[compare.fedit-slow.train]\nlr = 1e-5\n')
    assert compare_variants(path) == ["fedit-slow"]
    slow = load_config(path, variant="fedit-slow")
    assert slow.method.name == "fedit" and slow.train.lr == 1e-5  # its own table, not [compare.fedit]


@pytest.mark.parametrize("text, words", [
    ("[compare.fedsgd.train]\nlr = 1.0\n", r"\[compare.fedsgd\] is neither a method nor a variant"),
    ("[compare.'a/b'.method]\nname = 'fedit'\n", r"variant name 'a/b' in \[compare\] must use only letters"),
    ("[compare.fedit]\nlr = 1.0\n", r"\[compare.fedit\] may only hold section tables"),
    ("[compare.fedit.trian]\nlr = 1.0\n", r"\[compare.fedit\] may only hold section tables"),
    ("compare = 3\n", r"\[compare\] must hold one table per method or variant"),
])
def test_bad_compare_tables_are_named(tmp_path, text, words):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(UsageError, match=words):
        load_config(path, variant="fedit")


@pytest.mark.parametrize("override, words", [
    ("train.lrr=1", "unknown config key train.lrr"),
    ("trian.lr=1", "unknown config section"),
    ("train.lr='fast'", "train.lr must be float"),
    ("train.local_steps=1.5", "train.local_steps must be int"),
    ("train.lr=-1", "below its minimum"),
    ("method.name=fedsgd", "method.name = 'fedsgd' is not one of"),
    ("federation.clients_per_round=99", "exceeds federation.clients"),
    ("model.lora_targets=[1]", "must be a list of str"),
    ("data.tasks=[add,uppercase]", r"""--set data.tasks=.\["a", "b"\]."""),
    ("train.lr", "must look like section.key=value"),
    ("train.momentum=0.9", "applies to SGD only"),
])
def test_bad_values_name_the_key(override, words):
    with pytest.raises(UsageError, match=words):
        load_config(None, [override])


def test_bad_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = ")
    with pytest.raises(UsageError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(UsageError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(UsageError, match="must be a table"):
        from_dict({"train": 3})


def test_cli_errors_exit_2_with_one_line(capsys, tmp_path):
    assert main(["run", "--set", "train.lrr=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("thinwire: error: unknown config key train.lrr") and "\n" not in err
    assert main(["run", "--set", "method.name=nope"]) == 2
    assert main(["run", str(tmp_path / "nothing.toml")]) == 2


def test_real_process_exit_status():
    proc = subprocess.run([sys.executable, "-m", "thinwire.cli", "run", "--set", "federation.rounds=0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "thinwire: error: config key federation.rounds = 0 is below its minimum 1")
    assert "Traceback" not in proc.stderr


def test_a_config_without_a_model_gets_a_one_line_notice(tmp_path, capsys):
    from thinwire.config import default_model_notice

    path = tmp_path / "c.toml"
    path.write_text("[federation]\nrounds = 1\n")
    assert "random-weight 'tiny'" in default_model_notice(path)
    assert default_model_notice(path, ["model.name='tiny'"]) is None
    path.write_text('[model]\nname = "tiny"\n')
    assert default_model_notice(path) is None


def test_by_task_with_fewer_clients_than_families_names_the_dropped_ones(smoke_config):
    from thinwire.data import build_federation

    with pytest.raises(UsageError, match=r"2 clients cannot hold 3 families \(uppercase would go untrained\)"):
        build_federation(smoke_config("federation.clients=2"))


def test_run_refuses_to_overwrite_an_interrupted_run(tmp_path, capsys):
    out = tmp_path / "r"
    partial = tmp_path / "r.partial"
    partial.mkdir()
    (partial / "metrics.jsonl").write_text("{}\n")
    quick = ["--set", "federation.rounds=1", "--set", "eval.generate=false", "--quiet"]
    smoke = str(Path(__file__).resolve().parents[1] / "examples" / "smoke.toml")
    assert main(["run", smoke, "--out", str(out), *quick]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--force" in err and err.count("\n") == 1
    assert (partial / "metrics.jsonl").read_text() == "{}\n"  # nothing lost
    assert main(["run", smoke, "--out", str(out), "--force", *quick]) == 0
    assert (out / "summary.json").is_file() and not partial.exists()


def test_the_readmes_commands_parse_and_the_supernode_reaches_the_superlinks_port():
    import re
    import shlex

    from thinwire.cli import _parser

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    lines = [line.split("#", 1)[0].strip() for block in blocks for line in block.splitlines()]
    commands = [shlex.split(line)[1:] for line in lines if line.startswith("thinwire ")]
    parsed = {}
    for argv in commands:
        args = _parser().parse_args([a.replace("SERVER", "127.0.0.1") for a in argv if "[" not in a])
        parsed[argv[0]] = args
    assert {"run", "compare", "report", "superlink", "supernode", "export", "generate"} <= set(parsed)
    assert parsed["supernode"].superlink.rsplit(":", 1)[1] == str(parsed["superlink"].port)


SMOKE = Path(__file__).resolve().parents[1] / "examples" / "smoke.toml"


@pytest.mark.parametrize("override, key", [
    ("federation.rounds=1000000000", "federation.rounds"),
    ("federation.clients=1000000000", "federation.clients"),
    ("data.examples_per_client=1000000000", "data.examples_per_client"),
    ("data.eval_examples=1000000000", "data.eval_examples"),
    ("eval.max_examples=1000000000", "eval.max_examples"),
    ("train.local_steps=1000000000", "train.local_steps"),
    ("train.batch_size=1000000000", "train.batch_size"),
    ("data.max_length=1000000000", "data.max_length"),
    ("method.ferret.k_max=1000000000", "method.ferret.k_max"),
    ("method.fedkseed.pool_size=2147483647", "method.fedkseed.pool_size"),
    ("method.fedpt.kd_examples=1000000000", "method.fedpt.kd_examples"),
    ("method.cgfedllm.ae_steps=1000000000", "method.cgfedllm.ae_steps"),
])
def test_huge_sizes_are_one_line_errors_that_leave_nothing_behind(tmp_path, capsys, override, key):
    out = tmp_path / "X"
    assert main(["run", str(SMOKE), "--set", override, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and key in err and "above its maximum" in err and "lower it" in err
    assert not out.exists() and not out.with_name("X.partial").exists()


def test_built_in_examples_generated_for_a_run_are_bounded(tmp_path, capsys):
    from thinwire.config import MAX_SUITE_EXAMPLES

    clients = MAX_SUITE_EXAMPLES // 24 + 1  # smoke: 24 examples per client
    assert main(["run", str(SMOKE), "--set", f"federation.clients={clients}", "--out", str(tmp_path / "X")]) == 2
    err = capsys.readouterr().err
    assert f"federation.clients = {clients}" in err and str(MAX_SUITE_EXAMPLES) in err
    assert not list(tmp_path.iterdir())
    load_config(SMOKE, [f"federation.clients={clients - 1}"])  # at the bound: accepted


def test_every_size_option_has_an_upper_bound():
    """An int option without a maximum lets a typo (10**9) hang a run or exhaust memory."""
    import dataclasses
    import typing

    from thinwire.config import SECTIONS, _section_class
    from thinwire.methods import option_classes

    classes = {name: _section_class(name) for name in SECTIONS}
    classes |= {f"method.{name}": cls for name, cls in option_classes().items()}
    unbounded = [f"{prefix}.{f.name}" for prefix, cls in classes.items()
                 for f, hint in ((f, typing.get_type_hints(cls)[f.name]) for f in dataclasses.fields(cls))
                 if int in (hint, *typing.get_args(hint)) and f.metadata.get("high") is None]
    assert unbounded == []


def test_built_in_examples_are_found_by_name_from_any_directory(tmp_path, monkeypatch):
    from thinwire.config import EXAMPLES

    monkeypatch.chdir(tmp_path)
    smoke = load_config(EXAMPLES / "smoke.toml")
    for name in ("smoke", "smoke.toml", "examples/smoke.toml"):
        assert load_config(name) == smoke
    (tmp_path / "smoke.toml").write_text("[federation]\nrounds = 7\n")  # a file of that name here wins
    assert load_config("smoke.toml").federation.rounds == 7
    with pytest.raises(UsageError, match=r"does not exist; .* built-in example \(.*quickstart, smoke"):
        load_config("elsewhere/smoke.toml")


def test_options_of_a_method_that_is_not_running_get_a_notice(tmp_path, capsys):
    from thinwire.config import ignored_options_notice

    config = load_config(SMOKE)  # fedavg; the file's [method.fedkseed] is for compare: no notice
    assert ignored_options_notice(config, []) is None
    assert ignored_options_notice(config, ["method.server_lr=0.5"]) is None
    notice = ignored_options_notice(config, ["method.ferret.k_max=50", "method.fedkseed.lr=1e-3"])
    assert notice == ("notice: --set options of [method.fedkseed], [method.ferret] do not apply: method.name is "
                      "'fedavg' (set method.name to run that method)")
    pro = load_config(SMOKE, ["method.name='fedkseed-pro'"])  # [method.fedkseed] configures fedkseed-pro
    assert ignored_options_notice(pro, ["method.fedkseed.lr=1e-3"]) is None
    assert main(["run", str(SMOKE), "--set", "method.ferret.k_max=50", "--set", "federation.rounds=1",
                 "--set", "eval.generate=false", "--out", str(tmp_path / "r"), "--quiet"]) == 0
    assert "[method.ferret] do not apply" in capsys.readouterr().err


def test_a_bad_size_fails_before_torch_loads(tmp_path):
    """`thinwire run ... --set federation.rounds=10**9` is refused before the heavy imports."""
    code = ("import sys; from thinwire.cli import main; "
            f"rc = main(['run', {str(SMOKE)!r}, '--set', 'federation.rounds=1000000000', '--out', 'X']); "
            "print(rc, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.stdout.split() == ["2", "False"], proc.stderr
    assert "federation.rounds" in proc.stderr and not list(tmp_path.iterdir())
