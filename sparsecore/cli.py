"""The ``sparsecore`` command: ``train`` a Top-KAST byte-level language model,
``generate`` text from a run, ``plan`` memory without allocating, ``info``.

Every command is a function of an ``argv`` list (``main(["train", "--quick"])``)
so it can be called in-process. Bad input ends with one line on stderr and exit
code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings

import torch
from torch.nn import functional as F

from . import __version__
from . import distributed as scd
from .checkpoint import CheckpointError, load, save
from .data import DEFAULT_MAX_BYTES, CorpusError, load_corpus, train_batch, val_batches
from .memory import dense_training_bytes, fmt_bytes, parse_bytes
from .models.gpt import GPTConfig, build_model
from .plan import OPTIMIZER_STATES, format_plan, plan_training

LN2 = math.log(2.0)
CHECKPOINT = "checkpoint.safetensors"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
PLOT = "curves.png"
SUMMARY = "summary.json"


class CLIError(Exception):
    """A usage error: reported as one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors raise :class:`CLIError` (one line, no usage dump,
    no SystemExit) so ``main(argv)`` can be called in-process."""

    def error(self, message):
        raise CLIError(message)


# ------------------------------------------------------------------ flag types
def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return v


def _float_in(lo: float, hi: float | None, lo_open: bool = False, what: str = ""):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = math.nan
        ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (hi is None or v < hi)
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v
    return parse


_sparsity = _float_in(0.0, 1.0, what="a sparsity in [0, 1)")
_positive_float = _float_in(0.0, None, lo_open=True, what="a positive number")
_nonneg_float = _float_in(0.0, None, what="a number >= 0")


def _size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# ------------------------------------------------------------------ defaults
#: Defaults of ``sparsecore train``: chosen so a first run on a 2-core CPU takes
#: about five minutes and its validation bits-per-byte drops clearly.
TRAIN_DEFAULTS = dict(
    d_model=128, layers=4, heads=4, context=128,
    forward_sparsity=0.9, backward_sparsity=0.8, refresh_every=50, exploration=1e-4,
    dense=False, optimizer="adamw", lr=3e-3, min_lr=3e-4, warmup=100, weight_decay=0.0,
    grad_clip=1.0, batch=16, grad_accum=1, steps=1000, seed=0, data=None,
    max_bytes=DEFAULT_MAX_BYTES, eval_every=200, val_tokens=32768, save_every=200,
    quick=False, name="gpt", runs_dir="runs", resume=False, threads=None, device="cpu",
    stop_at=None)
#: ``--quick``: a tiny model and a few steps (CI, smoke tests); explicit flags win.
QUICK_DEFAULTS = dict(d_model=32, layers=2, heads=2, context=32, batch=8, steps=20,
                      refresh_every=5, warmup=5, eval_every=10, save_every=10,
                      val_tokens=1024, max_bytes=256 * 1024)
#: Settings fixed for the life of a run: ``--resume`` refuses to change them.
FROZEN = ("d_model", "layers", "heads", "context", "forward_sparsity", "backward_sparsity",
          "refresh_every", "exploration", "dense", "optimizer", "seed", "data", "max_bytes",
          "quick")
#: Per-invocation settings, not stored with the run.
_LOCAL = ("name", "runs_dir", "resume", "threads", "device", "stop_at")


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--d-model", type=_positive_int, help="width (default 128)")
    g.add_argument("--layers", type=_positive_int, help="transformer blocks (default 4)")
    g.add_argument("--heads", type=_positive_int, help="attention heads (default 4)")
    g.add_argument("--context", type=_positive_int, help="sequence length in bytes (default 128)")
    g = p.add_argument_group("Top-KAST")
    g.add_argument("--forward-sparsity", type=_sparsity,
                   help="fraction of each projection unused in the forward pass (default 0.9)")
    g.add_argument("--backward-sparsity", type=_sparsity,
                   help="fraction receiving no gradient; <= forward sparsity (default 0.8)")


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train the Top-KAST byte-level language model",
                       description="Train a byte-level transformer whose attention and MLP "
                       "projections are Top-KAST-sparse. Runs live in RUNS_DIR/NAME/.")
    _add_model_args(p)
    g = p.add_argument_group("Top-KAST schedule")
    g.add_argument("--refresh-every", type=_positive_int, help="steps between refreshes of A "
                   "and B (default 50)")
    g.add_argument("--exploration", type=_nonneg_float, help="exploration penalty on B minus A "
                   "(default 1e-4)")
    g.add_argument("--dense", action="store_const", const=True,
                   help="train the same model dense, for comparison")
    g = p.add_argument_group("optimization")
    g.add_argument("--optimizer", choices=sorted(OPTIMIZER_STATES), help="default adamw")
    g.add_argument("--lr", type=_positive_float, help="peak learning rate (default 3e-3)")
    g.add_argument("--min-lr", type=_nonneg_float, help="final learning rate of the cosine "
                   "decay (default 3e-4)")
    g.add_argument("--warmup", type=_nonneg_int, help="linear warm-up steps (default 100)")
    g.add_argument("--weight-decay", type=_nonneg_float, help="default 0")
    g.add_argument("--grad-clip", type=_nonneg_float, help="gradient norm clip, 0 = off "
                   "(default 1)")
    g.add_argument("--batch", type=_positive_int, help="sequences per micro-batch (default 16)")
    g.add_argument("--grad-accum", type=_positive_int, help="micro-batches per step (default 1)")
    g.add_argument("--steps", type=_positive_int, help="optimizer steps (default 1000)")
    g.add_argument("--seed", type=_nonneg_int, help="model and data-order seed (default 0)")
    g = p.add_argument_group("data and evaluation")
    g.add_argument("--data", help="text file or folder of text files (default: the Python "
                   "standard library's .py sources)")
    g.add_argument("--max-bytes", type=_size, help="read at most this much text (default 2MiB)")
    g.add_argument("--eval-every", type=_positive_int, help="steps between validations "
                   "(default 200)")
    g.add_argument("--val-tokens", type=_positive_int, help="validation bytes (default 32768)")
    g.add_argument("--save-every", type=_positive_int, help="steps between checkpoints "
                   "(default 200)")
    g = p.add_argument_group("run")
    g.add_argument("--name", help="run name (default gpt; gpt-dense with --dense)")
    g.add_argument("--runs-dir", help="parent folder of runs (default runs)")
    g.add_argument("--resume", action="store_const", const=True,
                   help="continue the run from its last checkpoint")
    g.add_argument("--stop-at", type=_positive_int, help="checkpoint and stop after this step "
                   "(the schedule still follows --steps); continue later with --resume")
    g.add_argument("--quick", action="store_const", const=True,
                   help="tiny model, 20 steps (for CI and smoke tests)")
    g.add_argument("--threads", type=_positive_int, help="CPU threads for torch and numba")
    g.add_argument("--device", choices=["cpu", "cuda"], help="default cpu")
    p.set_defaults(func=cmd_train)


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="sample text from a trained run",
                       description="Sample bytes from a run's checkpoint.")
    p.add_argument("--run", required=True, help="run folder, e.g. runs/gpt")
    p.add_argument("--prompt", default="def ", help="text to continue (default 'def ')")
    p.add_argument("--tokens", type=_positive_int, default=300, help="bytes to generate")
    p.add_argument("--temperature", type=_nonneg_float, default=0.8,
                   help="sampling temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=_nonneg_int, default=40,
                   help="sample among the k likeliest bytes, 0 = all (default 40)")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="sampling seed (default 0)")
    p.set_defaults(func=cmd_generate)


def _plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="predict training memory without allocating anything",
                       description="Predict the peak training memory of the reference model "
                       "for sparsecore, dense training and masked-dense Top-KAST.")
    _add_model_args(p)
    p.add_argument("--optimizer", choices=sorted(OPTIMIZER_STATES), default="adamw")
    p.add_argument("--batch", type=_positive_int, default=16, help="sequences per step")
    p.add_argument("--reserve", type=_nonneg_float, default=0.25,
                   help="reserve entries per layer as a fraction of K_B (default 0.25)")
    p.add_argument("--gpu-memory", type=_size, help="also check against this much GPU memory, "
                   "e.g. 80GB")
    p.add_argument("--json", action="store_true", help="print the prediction as JSON")
    p.set_defaults(func=cmd_plan)


def build_parser() -> argparse.ArgumentParser:
    """The ``sparsecore`` parser with its sub-commands."""
    p = _Parser(prog="sparsecore", description="Truly sparse Top-KAST training for PyTorch.")
    p.add_argument("--version", action="version", version=f"sparsecore {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{train,generate,plan,info}",
                           parser_class=_Parser)
    _train_parser(sub)
    _generate_parser(sub)
    _plan_parser(sub)
    info = sub.add_parser("info", help="versions, kernel backend and a tiny smoke test")
    info.set_defaults(func=cmd_info)
    return p


# ------------------------------------------------------------------ helpers
def _proc_status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """Current resident memory of this process."""
    v = _proc_status("VmRSS")
    return v if v is not None else peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far."""
    v = _proc_status("VmHWM")
    if v is None:
        import resource
        v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return v


def _model_config(c: dict) -> GPTConfig:
    try:
        return GPTConfig(d_model=c["d_model"], layers=c["layers"], heads=c["heads"],
                         context=c["context"])
    except ValueError as e:
        raise CLIError(f"bad model flags: {e}") from None


def _build(c: dict):
    cfg = _model_config(c)
    if not c["dense"] and c["backward_sparsity"] > c["forward_sparsity"]:
        raise CLIError(f"--backward-sparsity {c['backward_sparsity']} must not exceed "
                       f"--forward-sparsity {c['forward_sparsity']} (B contains A)")
    model = build_model(cfg, dense=c["dense"], forward_sparsity=c["forward_sparsity"],
                        backward_sparsity=c["backward_sparsity"],
                        refresh_every=c["refresh_every"], exploration=c["exploration"],
                        seed=c["seed"], spill_dir=os.path.join(c["run_dir"], "spill")
                        if c.get("run_dir") else None)
    return cfg, model


def _make_optimizer(name: str, params, lr: float, weight_decay: float):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)


def lr_at(step: int, c: dict) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up to ``lr`` over
    ``warmup`` steps, then cosine decay to ``min_lr`` at ``steps``."""
    if step < c["warmup"]:
        return c["lr"] * (step + 1) / c["warmup"]
    progress = min(1.0, (step - c["warmup"]) / max(1, c["steps"] - c["warmup"]))
    return c["min_lr"] + 0.5 * (c["lr"] - c["min_lr"]) * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model, data: torch.Tensor, c: dict) -> float:
    """Validation bits per byte on fixed windows of ``data``."""
    total, n = 0.0, 0
    for x, y in val_batches(data, batch=c["batch"], context=c["context"],
                            max_tokens=c["val_tokens"]):
        logits = model(x)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                 reduction="sum").item()
        n += y.numel()
    return total / n / LN2


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as fh:
            obj = json.load(fh)
    except FileNotFoundError:
        raise CLIError(f"{path}: not found ({what})") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CLIError(f"{path}: cannot read {what} ({e})") from None
    if not isinstance(obj, dict):
        raise CLIError(f"{path}: cannot read {what} (expected a JSON object)")
    return obj


def _write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1)
    os.replace(tmp, path)


def _resolve_train(ns: argparse.Namespace) -> tuple[dict, dict | None]:
    """Settings of this invocation: defaults, then ``--quick``'s, then (on resume)
    the run's stored ones, then the flags given. Returns (settings, stored run)."""
    given = {k: v for k, v in vars(ns).items() if k in TRAIN_DEFAULTS and v is not None}
    c = dict(TRAIN_DEFAULTS)
    if given.get("quick"):
        c.update(QUICK_DEFAULTS)
    if "name" not in given and given.get("dense"):
        c["name"] = "gpt-dense"
    c.update({k: given[k] for k in _LOCAL if k in given})
    run_dir = os.path.join(c["runs_dir"], c["name"])
    stored = None
    if given.get("resume"):
        stored = _read_json(os.path.join(run_dir, CONFIG), "the run's settings; nothing to "
                            "resume")
        saved = stored.get("train", {})
        if saved.get("quick"):
            c.update(QUICK_DEFAULTS)
        c.update({k: v for k, v in saved.items() if k in TRAIN_DEFAULTS and k not in _LOCAL})
        for k in FROZEN:
            if k in given and k in saved and _same_value(k, given[k]) != saved[k]:
                raise CLIError(f"--resume: {_flag(k)} {given[k]} differs from the run's "
                               f"{saved[k]}; model, sparsity, optimizer, seed and data settings "
                               f"are fixed for a run (start a new --name to change them)")
    c.update({k: v for k, v in given.items() if k not in _LOCAL})
    if c["data"] is not None:
        c["data"] = os.path.abspath(c["data"])
    c["run_dir"] = run_dir
    return c, stored


def _same_value(key: str, value):
    return os.path.abspath(value) if key == "data" and value is not None else value


# ------------------------------------------------------------------ train
def cmd_train(ns: argparse.Namespace) -> int:
    """``sparsecore train``: see the module docstring and docs/cli.md.

    Under ``torchrun`` (or inside an initialised process group) it trains data
    parallel with DistributedDataParallel: ``--batch`` stays the global batch and
    each rank takes its own ``batch / world_size`` sequences of it; rank 0 alone
    evaluates, logs and writes the run's files (docs/distributed.md)."""
    c, stored = _resolve_train(ns)
    try:
        started = scd.init_from_env(c["device"] or "cpu")
    except (ValueError, RuntimeError) as e:
        raise CLIError(f"cannot join the distributed run: {e}") from None
    try:
        with warnings.catch_warnings():
            # the run's summary reports the reserve against its nominal size instead
            warnings.filterwarnings("ignore", message=r".*the reserve holds",
                                    category=RuntimeWarning)
            return _cmd_train(c, stored)
    finally:
        if started and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _cmd_train(c: dict, stored: dict | None) -> int:
    rank, world = scd.rank(), scd.world_size()
    main_rank = rank == 0
    if c["batch"] % world:
        raise CLIError(f"--batch {c['batch']} is the global batch and must be divisible by "
                       f"the number of ranks ({world}); each rank trains on batch / ranks "
                       "sequences")
    if c["min_lr"] > c["lr"]:
        raise CLIError(f"--min-lr {c['min_lr']} exceeds --lr {c['lr']}")
    if c["device"] == "cuda":   # sparse layers then run on the Triton kernels (docs/gpu.md)
        if not torch.cuda.is_available():
            raise CLIError("--device cuda: no CUDA device is available (torch.cuda."
                           "is_available() is False); use --device cpu")
    run_dir = c["run_dir"]
    ckpt = os.path.join(run_dir, CHECKPOINT)
    if stored is None and os.path.exists(os.path.join(run_dir, CONFIG)):
        raise CLIError(f"{run_dir} already holds a run; add --resume to continue it or choose "
                       "another --name")
    if stored is not None and not os.path.exists(ckpt):
        raise CLIError(f"{ckpt}: not found; the run has no checkpoint to resume from")
    if c["threads"] or world > 1:
        # several ranks on one machine: numba follows torch's thread count (torchrun
        # sets OMP_NUM_THREADS=1) unless --threads says otherwise
        import numba
        threads = c["threads"] or torch.get_num_threads()
        torch.set_num_threads(threads)
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    if world > 1:
        scd.barrier()   # every rank checked the run folder before rank 0 writes to it

    t_start = time.perf_counter()
    try:
        corpus = load_corpus(c["data"], max_bytes=c["max_bytes"], context=c["context"])
    except CorpusError as e:
        raise CLIError(str(e)) from None
    if stored is not None and stored.get("corpus", {}).get("digest") != corpus.digest:
        raise CLIError(f"--resume: the corpus {corpus.source!r} changed since the run started "
                       f"(digest {corpus.digest}, run has {stored.get('corpus', {}).get('digest')})")
    rss_before = rss_bytes()
    cfg, model = _build(c)
    device = torch.device(c["device"])
    model.to(device)
    opt = _make_optimizer(c["optimizer"], model.parameters(), c["lr"], c["weight_decay"])
    sparse = not c["dense"]
    if sparse:
        model.attach(opt)   # distributed: checks every rank built the same sparse model
    frozen = {k: c[k] for k in FROZEN}
    metrics_path = os.path.join(run_dir, METRICS)
    step = 0
    if stored is not None:
        try:
            extra = load(ckpt, model, optimizer=opt)
        except CheckpointError as e:
            raise CLIError(f"cannot resume: {e}") from None
        if not isinstance(extra, dict) or extra.get("settings") != frozen:
            raise CLIError(f"{ckpt}: the checkpoint was written by a run with other settings "
                           f"than {os.path.join(run_dir, CONFIG)}")
        step = int(extra["step"])
        if main_rank:
            _truncate_metrics(metrics_path, step)
        if sparse:
            scd.check_topology(model, when="after loading the checkpoint",
                               extra={"step": step})
    elif main_rank:
        os.makedirs(run_dir, exist_ok=True)
        _write_json(os.path.join(run_dir, CONFIG), {
            "sparsecore": __version__, "model": cfg.to_dict(),
            "train": {k: v for k, v in c.items() if k not in _LOCAL and k != "run_dir"},
            "corpus": {"source": corpus.source, "digest": corpus.digest,
                       "bytes": corpus.n_bytes, "files": corpus.files}})
        open(metrics_path, "w").close()
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        net = DistributedDataParallel(model)
    if not main_rank:
        _train_loop(net, model, opt, corpus, c, cfg, step, metrics_path, ckpt, frozen, device)
        return 0

    print(f"sparsecore {__version__}: {'dense' if c['dense'] else 'Top-KAST'} byte-level "
          f"transformer d_model={cfg.d_model} layers={cfg.layers} heads={cfg.heads} "
          f"context={cfg.context}" + ("" if c["dense"] else
                                      f", sparsity forward {c['forward_sparsity']} / "
                                      f"backward {c['backward_sparsity']}"))
    print(f"data: {corpus.describe()}")
    print(f"run: {run_dir} ({'resumed at step ' + str(step) if stored else 'new'}), "
          f"{c['steps']} steps of {c['batch'] * c['grad_accum']} x {cfg.context} bytes"
          + (f" on {world} ranks ({c['batch'] // world} sequences per rank and micro-batch)"
             if world > 1 else ""))
    result = _train_loop(net, model, opt, corpus, c, cfg, step, metrics_path, ckpt, frozen,
                         device)
    result["peak_rss"] = peak_rss_bytes()  # before plotting loads matplotlib
    _plot_run(run_dir, title=f"{c['name']}: " + ("dense" if c["dense"] else
              f"Top-KAST {c['forward_sparsity']}/{c['backward_sparsity']}"))
    summary = _summary(model, opt, c, cfg, result, rss_before, time.perf_counter() - t_start)
    summary["world_size"] = world
    _write_json(os.path.join(run_dir, SUMMARY), summary)
    _print_summary(summary, run_dir)
    return 0


def _truncate_metrics(path: str, step: int) -> None:
    """Keep the metric records up to ``step`` (the checkpoint being resumed)."""
    if not os.path.exists(path):
        return
    with open(path) as fh:
        keep = [ln for ln in fh if ln.strip() and json.loads(ln)["step"] <= step]
    with open(path, "w") as fh:
        fh.writelines(keep)


def _train_loop(net, model, opt, corpus, c, cfg, step, metrics_path, ckpt, frozen,
                device) -> dict:
    """Train ``net`` (``model`` itself, or DistributedDataParallel around it) from
    ``step``. On ranks other than 0 nothing is evaluated, logged or saved."""
    from tqdm import tqdm

    rank, world = scd.rank(), scd.world_size()
    main_rank = rank == 0
    sparse = not c["dense"]
    stop = min(c["steps"], c["stop_at"] or c["steps"])
    tokens_per_step = c["batch"] * c["grad_accum"] * cfg.context
    train_data = corpus.train
    val_history = []
    log = open(metrics_path, "a") if main_rank else None

    def record(**kw):
        if log is not None:
            log.write(json.dumps(kw) + "\n")
            log.flush()

    def validate():
        if not main_rank:
            return None
        t = time.perf_counter()
        bpb = evaluate(model, corpus.val.to(device), c)
        val_history.append((step, bpb))
        record(type="val", step=step, bpb=bpb, seconds=time.perf_counter() - t)
        return bpb

    def checkpoint():
        if not main_rank:
            return
        save(model, ckpt, optimizer=opt, extra={"step": step, "settings": frozen,
                                                "val_bpb": val_history[-1][1]
                                                if val_history else None})

    if step == 0:
        validate()
    bar = tqdm(total=c["steps"], initial=step, unit="step",
               disable=None if main_rank else True, dynamic_ncols=True, file=sys.stderr)
    if val_history:
        bar.write(f"step {step}: validation {val_history[-1][1]:.3f} bits/byte")
    t_loop, step0, tok_s, loss_v = time.perf_counter(), step, 0.0, float("nan")
    rss_first = None
    try:
        while step < stop:
            t = time.perf_counter()
            lr = lr_at(step, c)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for micro in range(c["grad_accum"]):
                x, y = train_batch(train_data, batch=c["batch"], context=cfg.context,
                                   seed=c["seed"], step=step, micro=micro, rank=rank,
                                   world_size=world)
                x, y = x.to(device), y.to(device)
                # DDP averages the ranks' gradients: with equal shards that is the
                # gradient of the global batch's mean loss
                if world > 1 and micro < c["grad_accum"] - 1:
                    with net.no_sync():     # all-reduce once, after the last micro-batch
                        loss = _micro_step(net, x, y, c["grad_accum"])
                else:
                    loss = _micro_step(net, x, y, c["grad_accum"])
                loss_sum += loss
            if world > 1:   # log the global batch's loss (one scalar all-reduce)
                t_loss = torch.tensor([loss_sum], dtype=torch.float64, device=device)
                torch.distributed.all_reduce(t_loss)
                loss_sum = float(t_loss) / world
            loss_v = loss_sum / c["grad_accum"]
            if not math.isfinite(loss_v):
                raise CLIError(f"training diverged: loss is {loss_v} at step {step} "
                               f"(lr {lr:.3g}); lower --lr")
            if c["grad_clip"] > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), c["grad_clip"])
            opt.step()  # the attached SparseModel refreshes A and B in this call
            step += 1
            dt = time.perf_counter() - t
            tok_s = tokens_per_step / dt if tok_s == 0 else 0.9 * tok_s + 0.1 * tokens_per_step / dt
            rss = rss_bytes()
            rss_first = rss if rss_first is None else rss_first
            record(type="train", step=step, loss=loss_v, bpb=loss_v / LN2, lr=lr,
                   tokens_per_s=tokens_per_step / dt, rss=rss)
            refreshes = 0
            if sparse:
                refreshes = model.step_count // c["refresh_every"]
                if model.step_count % c["refresh_every"] == 0:
                    tot = model.stats()["total"]
                    record(type="refresh", step=step, changed_a=tot["changed_a"],
                           changed_b=tot["changed_b"], refreshes=refreshes)
            bar.set_postfix_str(f"loss {loss_v:.3f} bpb {loss_v / LN2:.3f} "
                                f"{tok_s / 1000:.1f}k tok/s refresh {refreshes} "
                                f"RSS {fmt_bytes(rss)}", refresh=False)
            bar.update(1)
            if main_rank and (step % c["eval_every"] == 0 or step == c["steps"]):
                bpb = validate()
                bar.write(f"step {step}: validation {bpb:.3f} bits/byte, train loss "
                          f"{loss_v / LN2:.3f} bits/byte, {tok_s:,.0f} tokens/s")
            if step % c["save_every"] == 0 or step == stop:
                checkpoint()
    except KeyboardInterrupt:
        bar.close()
        raise CLIError(f"interrupted at step {step}; continue from the last checkpoint with "
                       f"sparsecore train --name {c['name']} --runs-dir {c['runs_dir']} "
                       "--resume") from None
    finally:
        if log is not None:
            log.close()
    bar.close()
    if main_rank and step == step0 and step >= c["steps"]:
        print(f"the run is already complete at step {step}; raise --steps to continue it")
    return {"step": step, "stopped_early": step < c["steps"],
            "seconds": time.perf_counter() - t_loop, "steps_this_run": step - step0,
            "rss_after_first_step": rss_first, "tokens_per_s": tokens_per_step * (step - step0)
            / max(1e-9, time.perf_counter() - t_loop), "last_loss": loss_v}


def _micro_step(net, x, y, grad_accum: int) -> float:
    """Forward and backward of one micro-batch; returns its mean loss."""
    logits = net(x)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    (loss / grad_accum).backward()
    return loss.item()


def _summary(model, opt, c, cfg, result, rss_before, seconds) -> dict:
    vals = []
    with open(os.path.join(c["run_dir"], METRICS)) as fh:
        for ln in fh:
            r = json.loads(ln)
            if r["type"] == "val":
                vals.append((r["step"], r["bpb"]))
    plan = plan_training(cfg, forward_sparsity=c["forward_sparsity"],
                         backward_sparsity=c["backward_sparsity"], optimizer=c["optimizer"],
                         batch=c["batch"])
    n_dense = plan["dense_equivalent_params"]
    s = OPTIMIZER_STATES[c["optimizer"]]
    reserve = union_b = None
    if c["dense"]:
        stored = sum(p.numel() for p in model.parameters())
        state = dense_training_bytes(stored, optimizer_states=s)
    else:
        layers = model.sparse_layers()
        sparse_ids = {id(l.values) for l in layers.values()}
        stored = (sum(l.values.numel() for l in layers.values())
                  + sum(p.numel() for p in model.parameters() if id(p) not in sparse_ids))
        rep = model.memory_report(opt)
        state = int(rep["total"])
        reserve = (int(rep["reserve"]), plan["sparsecore"]["reserve"], int(rep["spilled"]))
        tot = model.stats()["total"]
        union_b = tot["ever_in_b"] / max(1, tot["nnz_b"])
    return {"run_dir": c["run_dir"], "steps": result["step"], "target_steps": c["steps"],
            "stopped_early": result["stopped_early"], "seconds": seconds,
            "train_seconds": result["seconds"], "tokens_per_s": result["tokens_per_s"],
            "val_bpb_first": vals[0] if vals else None, "val_bpb_last": vals[-1] if vals else None,
            "dense_equivalent_params": n_dense, "stored_params": stored, "dense": c["dense"],
            "peak_rss": result["peak_rss"], "rss_before_model": rss_before,
            "rss_after_first_step": result["rss_after_first_step"],
            "state_bytes": state, "reserve_bytes_and_planned": reserve,
            "union_of_b_over_k_b": union_b,
            "dense_adam_state_bytes": plan["dense"]["state"],
            "activations_estimate": plan["dense"]["activations"]}


def _print_summary(s: dict, run_dir: str) -> None:
    kind = "dense" if s["dense"] else "sparsecore"
    mins, secs = divmod(int(round(s["seconds"])), 60)
    print(f"\ndone: {s['steps']} of {s['target_steps']} steps in {mins}m{secs:02d}s "
          f"({s['tokens_per_s']:,.0f} tokens/s)")
    if s["val_bpb_first"] and s["val_bpb_last"]:
        (s0, b0), (s1, b1) = s["val_bpb_first"], s["val_bpb_last"]
        print(f"validation bits/byte: {b0:.3f} (step {s0}) -> {b1:.3f} (step {s1})")
    print(f"parameters: {s['dense_equivalent_params']:,} dense-equivalent, "
          f"{s['stored_params']:,} stored ({s['stored_params'] / s['dense_equivalent_params']:.1%})")
    first = s["rss_after_first_step"]
    print(f"memory: measured peak RSS {fmt_bytes(s['peak_rss'])} for the whole process: "
          f"{fmt_bytes(s['rss_before_model'])} at start (Python, torch, numba)"
          + (f", {fmt_bytes(first)} after the model was built and its kernels compiled "
             f"(first step)" if first else ""))
    print(f"        {kind} model + optimizer state: {fmt_bytes(s['state_bytes'])}"
          + ("" if s["dense"] else " (memory_report())"))
    if s["reserve_bytes_and_planned"]:
        have, planned, spilled = s["reserve_bytes_and_planned"]
        print(f"        of which reserve {fmt_bytes(have)} (nominal {fmt_bytes(planned)}); "
              f"on disk: {fmt_bytes(spilled)} of trained coordinates that left B (the cold "
              f"store, see docs/design.md); union of B over the run: "
              f"{s['union_of_b_over_k_b']:.2f} x K_B")
    print(f"        dense Adam model + optimizer state: {fmt_bytes(s['dense_adam_state_bytes'])}"
          f" (estimate); activations about {fmt_bytes(s['activations_estimate'])} for both")
    print(f"files: {os.path.join(run_dir, CHECKPOINT)}, {METRICS}, {PLOT}, {SUMMARY}")
    if s["stopped_early"]:
        print(f"stopped at step {s['steps']} (--stop-at); continue with --resume")


def _plot_run(run_dir: str, title: str) -> str:
    """Write RUN/curves.png: training and validation bits/byte, and the fraction of A
    changed at each refresh, from the run's metrics.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rec = {"train": [], "val": [], "refresh": []}
    with open(os.path.join(run_dir, METRICS)) as fh:
        for ln in fh:
            r = json.loads(ln)
            rec[r["type"]].append(r)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True,
                                   gridspec_kw={"height_ratios": [2, 1]})
    if rec["train"]:
        steps = [r["step"] for r in rec["train"]]
        bpb = [r["bpb"] for r in rec["train"]]
        w = max(1, len(bpb) // 50)
        smooth = [sum(bpb[max(0, i - w + 1):i + 1]) / len(bpb[max(0, i - w + 1):i + 1])
                  for i in range(len(bpb))]
        ax1.plot(steps, bpb, color="tab:blue", alpha=0.25, lw=0.8)
        ax1.plot(steps, smooth, color="tab:blue", label="train (moving average)")
    if rec["val"]:
        ax1.plot([r["step"] for r in rec["val"]], [r["bpb"] for r in rec["val"]], "o-",
                 color="tab:orange", label="validation")
    ax1.set_ylabel("bits per byte")
    ax1.set_title(title)
    ax1.grid(alpha=0.3)
    ax1.legend()
    if rec["refresh"]:
        ax2.plot([r["step"] for r in rec["refresh"]], [r["changed_a"] for r in rec["refresh"]],
                 ".-", color="tab:green")
    else:
        ax2.text(0.5, 0.5, "no refreshes (dense run)", ha="center", va="center",
                 transform=ax2.transAxes)
    ax2.set_ylabel("fraction of A\nchanged at refresh")
    ax2.set_xlabel("step")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(run_dir, PLOT)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# ------------------------------------------------------------------ generate
def cmd_generate(ns: argparse.Namespace) -> int:
    """``sparsecore generate``: continue ``--prompt`` with bytes sampled from the run."""
    run = ns.run
    if not os.path.isdir(run):
        raise CLIError(f"--run {run}: no such run folder")
    stored = _read_json(os.path.join(run, CONFIG), "the run's settings")
    try:
        c = {k: stored["train"][k] for k in ("dense", "forward_sparsity", "backward_sparsity",
                                              "refresh_every", "exploration", "seed")}
        c.update({k: stored["model"][k] for k in ("d_model", "layers", "heads", "context")})
    except (KeyError, TypeError) as e:
        raise CLIError(f"{os.path.join(run, CONFIG)}: missing setting {e}") from None
    ckpt = os.path.join(run, CHECKPOINT)
    if not os.path.exists(ckpt):
        raise CLIError(f"{ckpt}: not found; train the run first")
    cfg, model = _build(c)
    try:
        load(ckpt, model)
    except CheckpointError as e:
        raise CLIError(f"cannot load the run's checkpoint: {e}") from None
    model.eval()
    prompt = ns.prompt.encode("utf-8") or b"\n"
    ids = torch.tensor([list(prompt)], dtype=torch.long)
    gen = torch.Generator().manual_seed(ns.seed)
    with torch.no_grad():
        for _ in range(ns.tokens):
            logits = model(ids[:, -cfg.context:])[0, -1]
            if ns.temperature == 0:
                nxt = logits.argmax().view(1)
            else:
                logits = logits / ns.temperature
                if ns.top_k:
                    top, idx = logits.topk(min(ns.top_k, logits.numel()))
                    nxt = idx[torch.multinomial(F.softmax(top, -1), 1, generator=gen)]
                else:
                    nxt = torch.multinomial(F.softmax(logits, -1), 1, generator=gen)
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    sys.stdout.write(bytes(ids[0].tolist()).decode("utf-8", errors="replace") + "\n")
    sys.stdout.flush()
    return 0


# ------------------------------------------------------------------ plan
def cmd_plan(ns: argparse.Namespace) -> int:
    """``sparsecore plan``: the memory planner (allocates nothing)."""
    d = TRAIN_DEFAULTS
    c = {k: getattr(ns, k) if getattr(ns, k) is not None else d[k]
         for k in ("d_model", "layers", "heads", "context", "forward_sparsity",
                   "backward_sparsity")}
    if c["backward_sparsity"] > c["forward_sparsity"]:
        raise CLIError(f"--backward-sparsity {c['backward_sparsity']} must not exceed "
                       f"--forward-sparsity {c['forward_sparsity']} (B contains A)")
    cfg = _model_config(c)
    p = plan_training(cfg, forward_sparsity=c["forward_sparsity"],
                      backward_sparsity=c["backward_sparsity"], optimizer=ns.optimizer,
                      batch=ns.batch, reserve=ns.reserve)
    if ns.json:
        print(json.dumps(dict(p, model=cfg.to_dict(), batch=ns.batch, optimizer=ns.optimizer,
                              gpu_memory=ns.gpu_memory), indent=1))
    else:
        print(format_plan(p, cfg=cfg, forward_sparsity=c["forward_sparsity"],
                          backward_sparsity=c["backward_sparsity"], optimizer=ns.optimizer,
                          batch=ns.batch, gpu_memory=ns.gpu_memory))
    return 0


# ------------------------------------------------------------------ info
def cmd_info(ns: argparse.Namespace) -> int:
    """``sparsecore info``: versions, kernel backend and threads, then a tiny Top-KAST
    training smoke test (a few steps and one refresh)."""
    import numba

    from . import kernels
    from .layers import TopKASTLinear

    print(f"sparsecore {__version__}")
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"numba {numba.__version__} ({numba.get_num_threads()} threads, "
          f"layer {numba.config.THREADING_LAYER})")
    print(f"kernel backend (cpu): {kernels.backend_name('cpu')}; "
          f"cuda available: {torch.cuda.is_available()}")
    t0 = time.perf_counter()
    torch.manual_seed(0)
    layer = TopKASTLinear(256, 128, forward_sparsity=0.9, backward_sparsity=0.8)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    x, target = torch.randn(64, 256), torch.randn(64, 128)
    for _ in range(5):
        loss = F.mse_loss(layer(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    info = layer.refresh(opt)
    print(f"smoke: {layer}")
    print(f"smoke: loss {loss.item():.4f}, refresh changed {info['changed_a']:.1%} of A, "
          f"{time.perf_counter() - t0:.2f}s (includes first-call compilation)")
    return 0


# ------------------------------------------------------------------ entry
def main(argv: list[str] | None = None) -> int:
    """Run ``sparsecore`` with ``argv`` (default ``sys.argv[1:]``); returns the exit
    code. Without a command, prints the version and the commands."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
        if ns.command is None:
            print(f"sparsecore {__version__}: truly sparse Top-KAST training.\n"
                  "Start with:  sparsecore train      (about 5 minutes on a 2-core CPU)\n")
            parser.print_help()
            return 0
        return ns.func(ns)
    except (CLIError, CheckpointError) as e:
        cmd = f"sparsecore {argv[0]}" if argv and not argv[0].startswith("-") else "sparsecore"
        print(f"{cmd}: error: {e}", file=sys.stderr)
        return 2
