"""The ``sdi`` command line (also ``python -m sdi``): from a trained model to attributions.

    sdi attribute --model MODEL [--checkpoints ...] --train FILE --query FILE --out top.json
    sdi report top.json [-o top.html]
    sdi info --model MODEL [--data FILE]

``attribute`` ranks, for every query example, the ``k`` train examples with the most and the least
TracIn influence and gives each pair's SDI per loop step (``top_influences`` of
:class:`sdi.ProjectedTracInSDI`), written as JSON (:mod:`sdi.cli_results`) and as the HTML report
beside it (:mod:`sdi.cli_report`), which ``report`` rebuilds from the JSON. ``info`` prints the
kernel backend, a model summary and the step plan of the looped core. Inputs are resolved by
:mod:`sdi.cli_inputs` (model folder or factory, checkpoints, target modules) and :mod:`sdi.data`.

Exit codes: 0 done; 2 bad input (a message naming the fix, no traceback, nothing written);
1 a failure while computing (the message; ``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import platform
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import __version__
from .auto_core import AmbiguousCoreError, NoLoopedCoreError, find_looped_core
from .backend import backend_info
from .checkpoints import (
    CheckpointSpec,
    PickledCheckpointError,
    default_load_checkpoint,
    default_load_model_state_dict,
    eta_and_source,
)
from .cli_inputs import (
    UsageError,
    hf_checkpoint_loader,
    load_batches,
    load_callable,
    load_model,
    load_tokenizer,
    resolve_checkpoints,
    resolve_targets,
)
from .cli_report import (
    add_report_command,
    add_report_options,
    attribute_report_data,
    decoding_tokenizer,
    report_command,
    report_path,
)
from .cli_results import (
    FORMAT,
    explanations_json,
    json_text,
    step_plan_json,
    top_json,
    write_files_atomic,
)
from .estimators import FullGradientTracInSDI, ProjectedTracInSDI
from .fingerprints import file_sha256, loss_fn_fingerprint, model_fingerprint
from .lm_loss import causal_lm_loss
from .report import render_html

DEFAULT_LOSS = "sdi.lm_loss:causal_lm_loss"
INPUT_ERRORS = (UsageError, ValueError, FileNotFoundError, PickledCheckpointError)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="a local Hugging Face model folder (config.json + weights) or package.module:factory",
    )
    p.add_argument(
        "--model-class",
        default="AutoModelForCausalLM",
        help="transformers class that loads the folder (default: %(default)s)",
    )
    p.add_argument(
        "--target-modules",
        default="auto",
        help="the looped core: 'auto' (default: the outermost modules with parameters that run "
        "more than once per forward pass) or comma-separated submodule names, e.g. model.L_module",
    )
    p.add_argument(
        "--allow-mixed-steps",
        action="store_true",
        help="put uses of the core before / after the loop into prelude / readout steps",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if any)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--text-field",
        default=None,
        help="field holding text, tokenised by the model folder's tokenizer (default: text, "
        "unless --ids-field is given)",
    )
    p.add_argument("--ids-field", default=None, help="field holding pre-tokenised ids (ints)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
    p.add_argument("--max-length", type=int, default=None, help="cut examples to this many tokens")
    p.add_argument("--batch-size", type=int, default=8, help="examples per batch (default: 8)")
    p.add_argument(
        "--loss",
        default=DEFAULT_LOSS,
        help="package.module:fn, fn(model, batch) -> per-example losses (B,); batch = "
        "{'input_ids': (B, T), 'attention_mask': (B, T)} (default: %(default)s, the causal-LM "
        "next-token loss over unpadded positions)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdi",
        description="Step-Decomposed Influence and TracIn for looped models, from the shell.",
    )
    parser.add_argument("--version", action="version", version=f"sdi {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    attribute = commands.add_parser(
        "attribute",
        help="top-k train examples per query, with SDI per loop step, as JSON and an HTML report",
        description="Rank the train examples by TracIn influence on each query (k most and "
        "least) and give each pair's SDI per loop step; writes JSON and, beside it, the HTML "
        "report.",
    )
    _model_args(attribute)
    attribute.add_argument(
        "--checkpoints",
        nargs="+",
        default=None,
        help="checkpoint files, globs ('run/checkpoint-*'), Trainer checkpoint folders or a "
        "Trainer output folder; eta of each from its trainer_state.json / optimizer state, else "
        "1 (default: the model folder itself)",
    )
    attribute.add_argument(
        "--train",
        required=True,
        help="train data: .jsonl .csv .parquet or a datasets.save_to_disk folder",
    )
    attribute.add_argument("--query", required=True, help="query data, as --train")
    _data_args(attribute)
    attribute.add_argument("-k", "--k", type=int, default=10, help="pairs per query and side")
    attribute.add_argument("--projection-size", type=int, default=2048, help="sketch size m")
    attribute.add_argument("--seed", type=int, default=0, help="seed of the sketch's hash tables")
    attribute.add_argument(
        "--exact",
        action="store_true",
        help="exact per-example gradients (FullGradientTracInSDI) instead of sketches: small "
        "models only",
    )
    attribute.add_argument("--train-store", default=None, help="folder for reusable train features")
    attribute.add_argument(
        "--explain",
        action="store_true",
        help="also split each returned pair's SDI by position and by parameter",
    )
    attribute.add_argument(
        "--standard-errors",
        action="store_true",
        help="also give each pair's TracIn standard error from the sketches (one more TracIn pass)",
    )
    attribute.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars (default: when stderr is a terminal)",
    )
    attribute.add_argument("--out", required=True, help="the JSON file to write")
    add_report_options(attribute)
    add_report_command(commands)

    info = commands.add_parser(
        "info",
        help="kernel backend, model summary and the step plan of the looped core",
        description="Print the kernel backend, a model summary and the looped core with its step "
        "plan, found from one batch (--data, else random token ids).",
    )
    _model_args(info)
    info.add_argument("--data", default=None, help="a data file whose first batch is used")
    _data_args(info)
    info.add_argument("--seq-len", type=int, default=16, help="length of random ids (no --data)")
    return parser


def _device(name: str | None) -> str:
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UsageError(f"--device {name!r}: {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device here; use --device cpu")
    return name


def _check_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {value}")


class _Inputs:
    """The model, loss, tokenizer and field of one command, loaded from its arguments."""

    def __init__(self, args: argparse.Namespace, *, tokenize: bool = True):
        _check_positive(args, "batch_size", "max_length", "threads")
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.text_field is not None and args.ids_field is not None:
            raise UsageError("give one of --text-field and --ids-field, not both")
        self.device = _device(args.device)
        self.loss_name = args.loss
        self.loss_fn = (
            causal_lm_loss if args.loss == DEFAULT_LOSS else load_callable(args.loss, "--loss")
        )
        self.model, self.description = load_model(args.model, args.model_class)
        self.model.to(self.device).eval()
        folder = Path(args.model) if self.description["kind"] == "huggingface" else None
        self.model_folder = folder
        self.ids_field = args.ids_field
        self.text_field = None if args.ids_field is not None else (args.text_field or "text")
        self.tokenizer = None
        if self.text_field is not None and tokenize:
            source = args.tokenizer or folder
            if source is None:
                raise UsageError(
                    "a text field needs a tokenizer: pass --tokenizer FOLDER, or pre-tokenised "
                    "ids with --ids-field"
                )
            self.tokenizer = load_tokenizer(source)
        self.targets = resolve_targets(self.model, args.target_modules)
        self.args = args

    def batches(self, path: str):
        return load_batches(
            path,
            text_field=self.text_field,
            ids_field=self.ids_field,
            tokenizer=self.tokenizer,
            max_length=self.args.max_length,
            min_length=2 if self.loss_name == DEFAULT_LOSS else 1,
            batch_size=self.args.batch_size,
            device=self.device,
        )


def _data_description(path: str, described: dict[str, Any]) -> dict[str, Any]:
    if Path(path).is_file():
        described["sha256"] = file_sha256(path)
    return described


def _attribute(args: argparse.Namespace, argv: list[str]) -> int:
    _check_positive(args, "k", "projection_size")
    if args.standard_errors and args.exact:
        raise UsageError("--standard-errors is for sketched scores: drop it, or drop --exact")
    out = Path(args.out)
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: the folder {out.parent} does not exist")
    report_at = report_path(args, out)
    inputs = _Inputs(args)
    decoder = decoding_tokenizer(inputs, args)  # the report's texts of token ids
    checkpoints = resolve_checkpoints(args.checkpoints, inputs.model_folder)
    if not args.checkpoints:
        print(f"sdi: no --checkpoints: using the weights in {args.model}", file=sys.stderr)
    train, train_info = inputs.batches(args.train)
    query, query_info = inputs.batches(args.query)
    targets, core_names = inputs.targets, args.target_modules.split(",")
    if targets == "auto":  # found here rather than in the estimator: the names go in the results
        core = find_looped_core(
            inputs.model,
            next(iter(query)),
            inputs.loss_fn,
            allow_mixed_steps=args.allow_mixed_steps,
        )
        print(f"sdi: {core}", file=sys.stderr)
        targets, core_names = core.modules, core.names
    etas: dict[str, tuple[float, str]] = {}  # checkpoint -> (eta, where it came from)
    run = dict(
        checkpoints=[CheckpointSpec(p) for p in checkpoints],
        train_loader=train,
        query_loader=query,
        loss_fn=inputs.loss_fn,
        load_checkpoint_fn=(
            hf_checkpoint_loader(args.model_class)
            if inputs.model_folder is not None
            else default_load_checkpoint
        ),
        load_model_state_dict_fn=_state_loader(inputs.description["class"]),
        eta_from_checkpoint_fn=_eta_recorder(etas),
        progress=sys.stderr.isatty() if args.progress is None else args.progress,
        train_store=args.train_store,
    )
    est = _estimator(args, inputs.model, targets)
    top = est.top_influences(k=args.k, explain=args.explain, **run)
    se = None
    if args.standard_errors:
        se = est.influence_across_checkpoints(
            mode="tracin", with_standard_errors=True, **run
        ).tracin_se
    plan = est.step_plan
    est.close()
    results = {
        "format": FORMAT,
        "sdi_version": __version__,
        "command": ["sdi", *argv],
        "settings": {k: v for k, v in sorted(vars(args).items()) if k != "debug"},
        "model": {
            **inputs.description,
            "parameters": sum(p.numel() for p in inputs.model.parameters()),
            "structure_fingerprint": model_fingerprint(inputs.model),
        },
        "checkpoints": [
            dict(zip(("path", "eta", "eta_source"), (p, *etas[str(Path(p))]), strict=True))
            for p in checkpoints
        ],
        "train": _data_description(args.train, train_info),
        "query": _data_description(args.query, query_info),
        "target_modules": args.target_modules,
        "selected_modules": core_names,
        "step_plan": step_plan_json(plan),
        "loss": {"name": args.loss, "fingerprint": loss_fn_fingerprint(inputs.loss_fn)},
        "environment": _environment(inputs.device),
        "top": top_json(top, se),
    }
    explanations = explanations_json(top)
    if explanations is not None:
        results["explanations"] = explanations
    # The report's data is kept in the JSON even without the page, so `sdi report` can make it.
    results["report"] = attribute_report_data(
        top,
        train=train,
        query=query,
        tokenizer=decoder,
        tracin_se=se,
        step_labels=plan.labels if plan is not None else None,
        title=f"sdi attribute: {Path(args.query).name} against {Path(args.train).name}, "
        f"{inputs.description['class']}",
        progress=run["progress"],
    )
    files = {out: json_text(results)}  # all built before anything is written
    if report_at is not None:
        files[report_at] = render_html(results["report"])
    write_files_atomic(files)
    _print_summary(top)
    print(
        f"sdi: top {top.most_indices.shape[1]} of {train_info['examples']} train examples for "
        f"{query_info['examples']} queries -> {out}"
        + (f", report -> {report_at}" if report_at is not None else ""),
        file=sys.stderr,
    )
    return 0


def _estimator(args: argparse.Namespace, model: nn.Module, targets: Any):
    if args.exact:
        return FullGradientTracInSDI(
            model=model, target_modules=targets, allow_mixed_steps=args.allow_mixed_steps
        )
    return ProjectedTracInSDI(
        model=model,
        target_modules=targets,
        projection_size=args.projection_size,
        seed=args.seed,
        allow_mixed_steps=args.allow_mixed_steps,
    )


def _eta_recorder(etas: dict[str, tuple[float, str]]):
    """The default ``eta`` of each checkpoint (:func:`sdi.checkpoints.eta_and_source`), noting
    where it came from in ``etas`` (keyed by the checkpoint's path) for the results."""

    def eta(checkpoint: dict[str, Any]) -> float:
        value, source = eta_and_source(checkpoint)
        etas[str(Path(getattr(checkpoint, "path", "")))] = (value, source)
        return value

    return eta


def _state_loader(model_class: str):
    """The default state-dict loading, with a checkpoint of another model as bad input."""

    def load(model: nn.Module, checkpoint: dict[str, Any]) -> None:
        try:
            default_load_model_state_dict(model, checkpoint)
        except RuntimeError as err:  # keys or shapes that do not fit
            raise UsageError(
                f"checkpoint {getattr(checkpoint, 'path', '')} does not fit the model "
                f"{model_class} ({str(err).splitlines()[0]}...): pass checkpoints of this model"
            ) from err

    return load


def _print_summary(top: Any, queries: int = 3) -> None:
    """The most influential train rows of the first ``queries`` queries, with TracIn and SDI."""
    for j in range(min(queries, top.most_indices.shape[0])):
        pairs = [
            f"{int(i)} ({float(s):+.2e})"
            for i, s in zip(top.most_indices[j], top.most_tracin[j], strict=True)
            if int(i) >= 0
        ]
        steps = " ".join(f"{v:+.1e}" for v in top.most_sdi[j, 0].tolist())
        print(
            f"query {j}: most influential train rows {', '.join(pairs)}; SDI of the first [{steps}]"
        )


def _environment(device: str) -> dict[str, Any]:
    try:
        backend = asdict(backend_info())
    except RuntimeError as err:  # SDI_BACKEND=triton where it cannot run
        backend = {"error": str(err)}
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "backend": backend,
    }


def _info(args: argparse.Namespace) -> int:
    inputs = _Inputs(args, tokenize=args.data is not None)
    model = inputs.model
    print(f"sdi {__version__}, torch {torch.__version__}, device {inputs.device}")
    try:
        backend = backend_info()
        print(f"kernel backend: {backend.name} (SDI_BACKEND={backend.requested}): {backend.reason}")
    except RuntimeError as err:
        print(f"kernel backend: unusable: {err}")
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in params})
    print(f"model: {inputs.description['class']} from {inputs.description['source']}")
    print(
        f"  parameters: {sum(p.numel() for p in params):,} ({trainable:,} trainable), "
        f"dtype {', '.join(dtypes)}, {sum(1 for _ in model.modules())} modules"
    )
    config = getattr(model, "config", None)
    if config is not None:
        keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")
        shown = {k: getattr(config, k) for k in keys if hasattr(config, k)}
        print("  config: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    _print_core(inputs, _first_batch(inputs, args))
    return 0


def _print_core(inputs: _Inputs, batch: Any) -> None:
    """The looped core found from ``batch`` (or the given one) and its step plan."""
    mixed = inputs.args.allow_mixed_steps
    if inputs.targets == "auto":
        try:
            print(find_looped_core(inputs.model, batch, inputs.loss_fn, allow_mixed_steps=mixed))
        except (AmbiguousCoreError, NoLoopedCoreError) as err:
            print(f"looped core: not found automatically\n{err}")
        return
    print(f"target modules (given): {inputs.args.target_modules}")
    est = ProjectedTracInSDI(
        model=inputs.model,
        target_modules=inputs.targets,
        projection_size=16,
        allow_mixed_steps=mixed,
    )
    try:  # one featurised batch gives the step plan of exactly what attribute would use
        est.featurize_loader(loader=[batch], loss_fn=inputs.loss_fn)
        print(est.step_plan)
    finally:
        est.close()


def _first_batch(inputs: _Inputs, args: argparse.Namespace) -> Any:
    if args.data is not None:
        batches, _ = inputs.batches(args.data)
        return next(iter(batches))
    vocab = getattr(getattr(inputs.model, "config", None), "vocab_size", None)
    if vocab is None:
        raise UsageError(
            "pass --data FILE: the model has no config.vocab_size to draw token ids from"
        )
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, args.seq_len), generator=generator)
    return {
        "input_ids": ids.to(inputs.device),
        "attention_mask": torch.ones_like(ids).to(inputs.device),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 done, 2 bad input, 1 failure)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "attribute":
            return _attribute(args, argv)
        if args.command == "report":
            return report_command(args)
        return _info(args)
    except INPUT_ERRORS as err:
        if args.debug:
            raise
        print(f"sdi {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        if args.debug:
            raise
        print(f"sdi {args.command}: failed: {err}\n(--debug shows where)", file=sys.stderr)
        return 1


def console_main() -> None:
    """The ``sdi`` console script."""
    sys.exit(main())
