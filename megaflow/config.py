"""The run configuration: frozen dataclasses composed from each subsystem's own config, loaded from
YAML and `--set a.b=value` overrides, every value type-checked against its dataclass field.

Each subsystem receives only its sub-config: the model `cfg.model`, the data pipeline `cfg.data`,
the parallel layer `cfg.parallel`, the loop `cfg.train`. Field help is the comment (or docstring)
beside each field; `megaflow info --help-config` prints it.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from data_pipeline.config import DataConfig
from megaflow.model.config import ModelConfig
from parallel.topology import ParallelConfig


class ConfigError(ValueError):
    """A config file or override that does not match the dataclasses."""


MAX_LR = 1.0  # a larger train.lr is a typo (it blows the weights up in one AdamW step)


@dataclass(frozen=True)
class TrainConfig:
    """The training loop."""
    steps: int = 1000  # optimizer steps
    lr: float = 3e-4  # peak learning rate
    min_lr: float = 3e-5  # final learning rate of the cosine schedule
    warmup: int = 50  # linear warm-up steps
    weight_decay: float = 0.05  # AdamW weight decay (not applied to norms, biases and embeddings)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    seed: int = 0  # seed of initialisation, noise and condition dropout
    device: str = "auto"  # 'auto' (cuda if available, else cpu), 'cpu' or 'cuda'
    dtype: str = "auto"  # 'auto' (bf16 autocast on GPU, fp32 on CPU), 'fp32' or 'bf16'
    param_dtype: str = "auto"  # model weights: 'auto' (bf16 with fp32 main weights in the optimizer when dtype is bf16 on GPU, else fp32), 'fp32' or 'bf16'
    bf16_grads: str = "auto"  # bf16 weights with one backward per step (one process, no data parallelism): keep the gradients in one flat bf16 buffer that each linear's weight-gradient GEMM writes into, read by the norm and the flat AdamW with fp32 arithmetic, instead of copying them into fp32 ones (the same update, 3.6 GB less memory at 0.9B parameters; megaflow/optim.py MainWeights): 'auto' (on there, on CUDA; h200_1b on real data back to back: 169.1 -> 167.2 / 166.7 GPU ms a step, docs/benchmarks.md round 10), 'on' (the CPU too) or 'off'
    moments_dtype: str = "fp32"  # AdamW's two moments: 'fp32', 'bf16' or 'auto' (bf16 wherever the flat AdamW step runs: bf16 weights with fp32 main weights, no ZeRO; else fp32). bf16 halves the moments' memory and moves 20 bytes a parameter a step instead of 28 (h200_1b: 164.5 -> 161.6 ms synced, docs/benchmarks.md round 11), as Megatron's precision-aware optimizer and DeepSeek-V3 keep them; the main weights stay fp32 (megaflow/flat_adamw.py)
    compile: str = "auto"  # regional torch.compile (train.compile_scope): 'auto' (on with CUDA, but not with ZeRO-3), 'on' or 'off'
    compile_scope: str = "unit"  # one compiled region: 'block' (each transformer block, each shallow flow block's affine map, the heads + losses) or 'unit' (each Pretzel unit with its skips, each shallow flow block's coupling, the heads + losses)
    compile_mode: str = "default"  # torch.compile mode: 'default', 'tuned' (default + inductor's coordinate-descent tuning of its kernels' block sizes), 'max-autotune-no-cudagraphs' or 'reduce-overhead' (CUDA graphs)
    step_graph: str = "off"  # 'auto': graphed where 'on' would work, else not (the reason logged); 'on': the whole training step (forward, backward, AdamW) as one CUDA graph after 2 eager steps (CUDA; one process, or tensor, data and/or pipeline parallelism without ZeRO, DP with bf16 weights; batches of one shape; megaflow/step_graph.py)
    activation_checkpointing: str = "none"  # recompute activations in backward: 'none', 'selective' (keep matmul and attention outputs) or 'full' (keep block inputs)
    threads: int = 0  # torch CPU threads (0 = all cores)
    out_dir: str = "runs/default"  # checkpoints, TensorBoard logs, samples and the report go here
    log_every: int = 10  # steps between log lines and TensorBoard scalars
    eval_every: int = 200  # steps between evaluations on the held-out split (0 = only at the end)
    eval_batches: int = 4  # batches per evaluation
    save_every: int = 200  # steps between checkpoints (0 = only at the end, -1 = never)
    keep_last: int = 2  # checkpoints to keep
    async_save: bool = False  # multi-process runs: write checkpoints in a background thread while training goes on
    sample_every: int = 0  # steps between sample grids in TensorBoard (0 = only at the end)
    guidance: float = 2.0  # classifier-free guidance weight of sample grids and the report
    sample_temperature: float = 1.0  # scale of the flow's Gaussian noise when sampling grids and the report
    eval_data: str = ""  # directory of the held-out MDS split ('' = no evaluation)
    dataset: str = ""  # built-in dataset to build into data.local / eval_data when missing (fashion_mnist, digits, emoji)
    dataset_limit: int = 0  # documents to build for the training split (0 = all)
    dataset_mix: str = ""  # task mix of a built dataset, e.g. 't2i=0.6,i2t=0.3,interleaved=0.1' ('' = the writer's default)
    eval_limit: int = 0  # documents to build for the held-out split (0 = all)
    tokenizer_vocab: int = 320  # base vocabulary of a SentencePiece model trained on the dataset when missing
    report_samples: int = 10  # samples per class prompt in the quality report
    report_images: int = 200  # held-out images for the understanding accuracy in the report
    report_docs: int = 0  # interleaved documents generated for the report's caption-consistency figure (d)
    init_from: str = ""  # checkpoint directory to initialise the model from (e.g. an earlier stage)
    hf_lm: str = ""  # pretrained LM for the VLM stream: a local HF dir, a .gguf file, or 'smollm2'
    report: bool = True  # at the end, write samples grid + quality report (report.json / report.txt)
    max_minutes: float = 0.0  # stop early (and save) after this many minutes (0 = no limit)
    max_skipped_steps: int = 10  # steps skipped for NaN/Inf gradients before the run stops (0 = stop at the first)

    def __post_init__(self):
        checks = [  # (key, ok, what it must be)
            ("steps", self.steps > 0, "a positive number of optimizer steps"),
            ("lr", 0 < self.lr <= MAX_LR, f"in (0, {MAX_LR}] (AdamW learning rates are ~1e-5 .. 1e-2)"),
            ("min_lr", 0 <= self.min_lr <= self.lr, f"in [0, train.lr={self.lr}]"),
            ("warmup", self.warmup >= 0, ">= 0"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("beta1", 0 <= self.beta1 < 1, "in [0, 1)"),
            ("beta2", 0 <= self.beta2 < 1, "in [0, 1)"),
            ("grad_clip", self.grad_clip >= 0, ">= 0 (0 = off)"),
            ("save_every", self.save_every >= -1, ">= -1 (0 = only at the end, -1 = never)"),
            ("keep_last", self.keep_last >= 0, ">= 0 (0 = keep all)"),
            ("max_skipped_steps", self.max_skipped_steps >= 0, ">= 0"),
        ]
        checks.append(("bf16_grads", self.bf16_grads in ("auto", "on", "off"), "'auto', 'on' or 'off'"))
        checks.append(("moments_dtype", self.moments_dtype in ("fp32", "bf16", "auto"), "'fp32', 'bf16' or 'auto'"))
        for key, ok, what in checks:
            if not ok:
                raise ConfigError(f"train.{key}={getattr(self, key)!r} must be {what}; "
                                  f"set it with --set train.{key}=...")


@dataclass(frozen=True)
class Config:
    """A whole run."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self):
        f, d = self.model.fae, self.data
        for name in ("image_size", "channels", "patch_size"):
            if getattr(f, name) != getattr(d, name):
                raise ConfigError(f"model.fae.{name}={getattr(f, name)} and data.{name}={getattr(d, name)} "
                                  f"must agree; set both (e.g. --set data.{name}={getattr(f, name)})")
        if self.train.moments_dtype == "bf16" and self.parallel.zero_stage > 0:
            raise ConfigError(f"train.moments_dtype={self.train.moments_dtype!r} is megaflow's flat AdamW step; ZeRO "
                              f"(parallel.zero_stage={self.parallel.zero_stage}) steps with DeepSpeed's AdamW and its "
                              f"fp32 moments: set train.moments_dtype=fp32 (or auto)")


# ----- building dataclasses from plain dicts, with type checks ----------------------------------------
def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _check_value(path: str, tp, value):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _check_value(path, a, value)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping of {tp.__name__} fields, got {value!r}")
        return build_dataclass(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '3e-3' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML 1.1 reads off/no/false as False and on/yes/true as True
            return "on" if value else "off"
    elif tp is Any:
        return value
    else:
        return value
    raise ConfigError(f"{path}={value!r} has the wrong type: expected {getattr(tp, '__name__', tp)}")


def build_dataclass(cls, values: dict, path: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]!r}; valid keys of {path or 'the config'}: {', '.join(names)}")
    kwargs = {k: _check_value(f"{path}.{k}" if path else k, hints[k], v) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path or 'config'}: {e}") from e


def _parse_override(item: str):
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like a.b=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: cannot parse value {raw!r}: {e}") from e
    return key.strip().split("."), value


def _set_path(tree: dict, keys: list, value, cls, item: str):
    """Set keys in a nested dict, checking each key exists in the dataclass on the way down."""
    node, tp = tree, cls
    for i, key in enumerate(keys):
        names = {f.name for f in dataclasses.fields(tp)}
        if key not in names:
            where = ".".join(keys[:i]) or "the config"
            raise ConfigError(f"unknown config key {'.'.join(keys[:i + 1])!r} in override {item!r}; valid keys of {where}: {', '.join(sorted(names))}")
        if i == len(keys) - 1:
            node[key] = value
            return
        sub = typing.get_type_hints(tp)[key]
        if typing.get_origin(sub) in (typing.Union, types.UnionType):
            sub = next(a for a in typing.get_args(sub) if a is not type(None))
        if not _is_dataclass_type(sub):
            raise ConfigError(f"override {item!r}: {'.'.join(keys[:i + 1])} is not a section")
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node, tp = node[key], sub


def load_config(path: Optional[str] = None, overrides: Optional[list] = None, cls=Config):
    """YAML file (or defaults) + `a.b=value` overrides -> a validated, frozen config."""
    tree: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path!r} does not exist; the shipped configs are in configs/")
        try:
            with open(p) as f:  # a stream, so that YAML's error marks name the file
                tree = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path!r} is not valid YAML: {' '.join(str(e).split())}") from e
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read config file {path!r}: {e}") from e
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping at the top level")
    for item in overrides or []:
        keys, value = _parse_override(item)
        _set_path(tree, keys, value, cls, item)
    return build_dataclass(cls, tree)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(tree: dict, cls=Config):
    return build_dataclass(cls, tree)


def saved_config_from_dict(tree: dict) -> Config:
    """The config of a saved run (a checkpoint's config.json). Fields added since keep the meaning
    the run was trained with: a run saved before `model.adapter_input` existed had its VLM read the
    shallow flows' output ("flow"), whatever the default is now."""
    model = tree.get("model")
    if isinstance(model, dict) and model.get("vlm") is not None and "adapter_input" not in model:
        tree = {**tree, "model": {**model, "adapter_input": "flow"}}
    return config_from_dict(tree)


# ----- help text --------------------------------------------------------------------------------------
def field_help(cls) -> dict:
    """{field: help} from the trailing comment or the docstring beside each field."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = src.splitlines()
    body = ast.parse(src).body[0].body
    out = {}
    for i, node in enumerate(body):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            line = lines[node.lineno - 1]
            if "#" in line:
                out[node.target.id] = line.split("#", 1)[1].strip()
            nxt = body[i + 1] if i + 1 < len(body) else None
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant) and isinstance(nxt.value.value, str):
                out[node.target.id] = " ".join(nxt.value.value.split())
    return out


def describe(cls=Config, prefix: str = "") -> list:
    """Lines 'key (type, default): help' for every leaf field, recursively."""
    rows, helps = [], field_help(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            inner = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = inner[0] if len(inner) == 1 else tp
        key = f"{prefix}{f.name}"
        if _is_dataclass_type(tp):
            rows += describe(tp, key + ".")
        else:
            default = f.default if f.default is not dataclasses.MISSING else "-"
            rows.append(f"{key} ({getattr(tp, '__name__', str(tp))}, default {default!r}): {helps.get(f.name, '')}")
    return rows
