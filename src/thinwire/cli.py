"""The `thinwire` command: run, compare, report, export, generate, models, tasks, superlink, supernode."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from thinwire.errors import UsageError

class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (exit status 2), like every other bad input."""

    def error(self, message: str) -> None:
        self.exit(2, f"thinwire: error: {message}; see `{self.prog} --help`\n")


def _parser() -> argparse.ArgumentParser:
    from thinwire import __version__

    parser = _Parser(prog="thinwire", description=__doc__)
    parser.add_argument("--version", action="version", version=f"thinwire {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run one federated experiment")
    run.add_argument("config", nargs="?", help="TOML config (default: examples/quickstart.toml)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override a config value (repeatable)")
    run.add_argument("--out", type=Path, help="run directory (default: runs/<method>-<time>)")
    run.add_argument("--runtime", choices=["local", "flower-sim"], default="local",
                     help="in-process simulation, or Flower's simulation engine")
    run.add_argument("--quiet", action="store_true",
                     help="no progress, per-round lines or summary table; only the run directory at the end")
    run.add_argument("--force", action="store_true",
                     help="delete an interrupted run in <out>.partial and start over")
    run.add_argument("--resume", type=Path, metavar="DIR",
                     help="continue an interrupted run from its last checkpoint (DIR: its --out or .partial "
                          "directory; config and output come from there)")
    compare = sub.add_parser("compare", help="run one experiment per method and report them side by side")
    compare.add_argument("config", nargs="?", help="TOML config (default: examples/quickstart.toml)")
    compare.add_argument("--methods", default="",
                         help="comma-separated methods or the config's [compare.<name>] variants, or `all` "
                              "(every method; required: a comparison costs one run per method)")
    compare.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    compare.add_argument("--seeds", default="", metavar="N,N,...",
                         help="run every method once per seed (DIR/<method>-seed<N>); the report adds mean ± std")
    compare.add_argument("--out", type=Path, required=True, help="directory for the runs and the report")
    compare.add_argument("--quiet", action="store_true")
    report = sub.add_parser("report", help="tables, plots and report.html from run directories")
    report.add_argument("dirs", nargs="+", type=Path, help="run directories, or directories of runs")
    report.add_argument("--out", type=Path, help="where to write the report (default: the only DIR)")
    link = sub.add_parser("superlink", help="start a Flower SuperLink (the server side of a deployment)")
    link.add_argument("--host", default="0.0.0.0")
    link.add_argument("--port", type=int, default=8000)
    link.add_argument("--ssl-ca-certfile", type=Path)
    link.add_argument("--ssl-certfile", type=Path)
    link.add_argument("--ssl-keyfile", type=Path)
    link.add_argument("--insecure", action="store_true", help="no TLS (testing on a trusted network only)")
    link.add_argument("--node-auth", action="store_true", help="admit only registered SuperNode keys")
    link.add_argument("--database", type=Path)
    link.add_argument("--flwr-home", type=Path)
    node = sub.add_parser("supernode", help="start a Flower SuperNode for one data owner")
    node.add_argument("--superlink", required=True, metavar="HOST:PORT")
    node.add_argument("--partition-id", type=int, required=True, help="which client of the federation this is")
    node.add_argument("--num-partitions", type=int, required=True, help="federation.clients")
    node.add_argument("--data-path", type=Path, help="this owner's local data file (default: the config's)")
    node.add_argument("--root-certificates", type=Path)
    node.add_argument("--insecure", action="store_true")
    node.add_argument("--auth-key", type=Path, help="private key registered with the SuperLink")
    node.add_argument("--port", type=int, default=9094, help="ClientAppIO port of this SuperNode")
    node.add_argument("--flwr-home", type=Path)
    export = sub.add_parser("export", help="write a finished run's model as a PEFT adapter or a Hugging Face "
                                           "model directory (FedPT: its proxy)")
    export.add_argument("run_dir", type=Path, help="a finished run directory")
    export.add_argument("--out", type=Path, required=True, help="directory to create")
    export.add_argument("--merge", action="store_true", help="LoRA methods: merge the adapter into a full model")
    gen = sub.add_parser("generate", help="generate from a run directory or an export")
    gen.add_argument("dir", type=Path, help="a run directory, a `thinwire export` directory or a FedPT proxy")
    gen.add_argument("prompts", nargs="+", help="instructions (rendered in the prompt template the model was "
                                                "trained with, Alpaca by default)")
    gen.add_argument("--input", default="", help="the task's input, shown to the model under `### Input:` "
                                                  "(as in training); applies to every instruction")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    models = sub.add_parser("models", help="list built-in models (and build one with --prepare)")
    models.add_argument("--prepare", choices=PREPARABLE, metavar="NAME",
                        help=f"prepare a built-in model now: {', '.join(PREPARABLE)}")
    sub.add_parser("tasks", help="list the built-in task families")
    return parser


PREPARABLE = ("smollm2-135m", "smollm2-small")


def cmd_run(args: argparse.Namespace) -> int:
    from thinwire.config import default_config, default_model_notice, ignored_options_notice, load_config
    from thinwire.runtime.rundir import ensure_not_written

    if args.resume is not None:
        if args.config or args.overrides or args.out:
            raise UsageError("--resume takes the config and output directory from the interrupted run; "
                             "drop CONFIG, --set and --out")
        from thinwire.runtime.checkpoint import resume_paths

        out, partial = resume_paths(args.resume)
        return _run(load_config(partial / "config.toml"), out, args, resume=True)
    config = load_config(args.config or default_config(), args.overrides)
    for notice in (default_model_notice(args.config or default_config(), args.overrides),
                   ignored_options_notice(config, args.overrides)):
        if notice:
            print(notice, file=sys.stderr)
    if args.out is None:
        earlier = _offer_resume(config, args.runtime)
        if earlier is not None:
            return _run(config, earlier, args, resume=True)
    out = args.out or _auto_out(config.method.name)
    partial = out.with_name(out.name + ".partial")
    if args.force and partial.is_dir():
        ensure_not_written(partial)
        shutil.rmtree(partial)
    return _run(config, out, args, resume=False)


def _run(config, out: Path, args: argparse.Namespace, resume: bool) -> int:
    """Run (or resume) into `out`; on Ctrl-C say how far it got, where it is and how to continue."""
    from thinwire.runtime.checkpoint import committed_round
    from thinwire.runtime.display import console, next_steps
    from thinwire.runtime.rundir import resume_command, rounds_logged

    try:
        if args.runtime == "flower-sim":
            from thinwire.runtime.flower import run_flower_sim

            run_flower_sim(config, out, quiet=args.quiet, resume=resume)
        else:
            from thinwire.runtime.local import run_local

            run_local(config, out, quiet=args.quiet, resume=resume)
    except KeyboardInterrupt:
        partial = out.with_name(out.name + ".partial")
        if not partial.is_dir():
            raise
        done, total, kept = rounds_logged(partial), config.federation.rounds, committed_round(partial)
        print(f"thinwire: interrupted in round {min(done + 1, total)} of {total}; the run so far is in {partial}\n"
              f"thinwire: continue it (from round {kept + 1}) with: {resume_command(out, args.runtime)}",
              file=sys.stderr)
        return 130
    console.print(f"run directory: {out}", highlight=False, markup=False, soft_wrap=True)
    if not args.quiet:
        console.print("\n".join(next_steps(out, config)), highlight=False, markup=False, soft_wrap=True)
    return 0


def _auto_out(method: str) -> Path:
    """runs/<method>-<time>, with -2, -3, ... when a run started in the same second holds the name."""
    base = Path("runs") / f"{method}-{time.strftime('%Y%m%d-%H%M%S')}"
    out, n = base, 1
    while out.exists() or out.with_name(out.name + ".partial").exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def _offer_resume(config, runtime: str) -> Path | None:
    """An auto-named run whose config matches an interrupted one: on a terminal, ask whether to
    resume the newest such run (its --out, when yes); otherwise say how to, and start afresh (None)."""
    from thinwire.runtime.rundir import interrupted_runs, resume_command, rounds_logged

    found = interrupted_runs(Path("runs"), config.method.name, config)
    if not found:
        return None
    partial = found[0]
    out = partial.with_name(partial.name[: -len(".partial")])
    print(f"thinwire: an interrupted run of this config is in {partial} ({rounds_logged(partial)} of "
          f"{config.federation.rounds} rounds done)", file=sys.stderr)
    if sys.stdin.isatty() and sys.stderr.isatty():
        try:
            answer = input("resume it instead of starting a new run? [Y/n] ").strip().lower()
        except EOFError:
            answer = "n"
        if answer in ("", "y", "yes"):
            return out
    print(f"thinwire: starting a new run; to continue that one instead: {resume_command(out, runtime)}",
          file=sys.stderr)
    return None


def cmd_superlink(args: argparse.Namespace) -> int:
    from thinwire.runtime.deploy import serve_superlink

    return serve_superlink(host=args.host, port=args.port, ssl_ca_certfile=args.ssl_ca_certfile,
                           ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile, insecure=args.insecure,
                           node_auth=args.node_auth, database=args.database, flwr_home=args.flwr_home)


def cmd_supernode(args: argparse.Namespace) -> int:
    from thinwire.runtime.deploy import serve_supernode

    return serve_supernode(args.superlink, args.partition_id, args.num_partitions, data_path=args.data_path,
                           root_certificates=args.root_certificates, insecure=args.insecure,
                           auth_key=args.auth_key, port=args.port, flwr_home=args.flwr_home)


def cmd_compare(args: argparse.Namespace) -> int:
    from thinwire.compare import parse_seeds, run_compare
    from thinwire.config import default_config

    methods = args.methods.split(",") if args.methods else []
    seeds = parse_seeds(args.seeds) if args.seeds else []
    rows = run_compare(args.config or default_config(), methods, args.overrides, args.out, quiet=args.quiet,
                       seeds=seeds)
    return 0 if all(row["status"] == "ok" for row in rows) else 1


def cmd_report(args: argparse.Namespace) -> int:
    from thinwire.report import render_report
    from thinwire.runtime.display import console

    if args.out is None and len(args.dirs) > 1:
        raise UsageError("several directories given; pass --out for the report")
    result = render_report(args.dirs, args.out or args.dirs[0])
    for path, reason in result.skipped:
        console.print(f"skipped {path}: {reason}")
    console.print(f"report: {result.html}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from thinwire.export import describe, export_run, quiet_libraries

    with quiet_libraries():
        export_run(args.run_dir, args.out, merge=args.merge)
    print(f"{args.out}: {describe(args.out)}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from thinwire.export import load_for_generation, quiet_libraries
    from thinwire.proxy import generate_text

    if not args.dir.is_dir():
        raise UsageError(f"{args.dir} is not a directory; pass a run directory or a `thinwire export` directory")
    with quiet_libraries():
        model, tokenizer = load_for_generation(args.dir)
        texts = generate_text(model, tokenizer, args.prompts, args.max_new_tokens, input_text=args.input)
    for prompt, text in zip(args.prompts, texts):
        print(f"### {prompt}\n{text}\n")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from rich.table import Table

    from thinwire.models import small, smollm2
    from thinwire.runtime.display import console

    if args.prepare:
        (smollm2 if args.prepare == smollm2.NAME else small).prepare()
    table = Table(title="built-in models")
    for column in ("name", "parameters", "size on disk", "ready", "source"):
        table.add_column(column)
    table.add_row("tiny", "~91 K", "-", "yes (built in a second)", "random 2-layer Llama, byte tokenizer")
    large = smollm2.describe()
    table.add_row(large["name"], f"{large['parameters'] / 1e6:.1f} M", _megabytes(large["size_bytes"]),
                  "yes" if large["ready"] else "no (prepared on first use)", large["hub_id"])
    table.add_row("tiny-small", "~50 K", "-", "yes (built in a second)", "first layer of tiny (FedPT tests)")
    proxy = small.describe()
    compute = f", {proxy['compute_ratio']:.3f}x the compute per token" if proxy["compute_ratio"] else ""
    head = f" with a rank-{proxy['head_rank']} LM head" if proxy["head_rank"] else ""
    mlp = f", MLPs pruned to {proxy['mlp_width']} neurons" if proxy["mlp_width"] else ""
    table.add_row(proxy["name"], f"{proxy['parameters'] / 1e6:.1f} M" if proxy["parameters"] else "-",
                  _megabytes(proxy["size_bytes"]),
                  "yes" if proxy["ready"] else "no (built on first use, or --prepare smollm2-small)",
                  f"{proxy['layers']} layers of smollm2-135m{mlp}{head}, healed by distillation{compute}")
    console.print(table)
    return 0


def _megabytes(size: int | None) -> str:
    return f"{size / 1e6:.0f} MB" if size else "-"


def cmd_tasks(args: argparse.Namespace) -> int:
    from rich.table import Table

    from thinwire.data.tasks import FAMILIES, generate
    from thinwire.runtime.display import console

    table = Table(title=f"{len(FAMILIES)} built-in task families")
    for column in ("family", "category", "instruction", "example input", "example output"):
        table.add_column(column)
    for name, family in FAMILIES.items():
        example = generate(name, 1, 0)[0]
        table.add_row(name, family.category, family.instruction, example["input"], example["output"])
    console.print(table)
    return 0


COMMANDS = {"run": cmd_run, "compare": cmd_compare, "report": cmd_report, "superlink": cmd_superlink,
            "supernode": cmd_supernode, "export": cmd_export, "generate": cmd_generate, "models": cmd_models, "tasks": cmd_tasks}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"thinwire: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("thinwire: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
