"""The training configuration: one dataclass, read from YAML, overridable field by field on the command line."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from diffusers.optimization import SchedulerType

from nested_attention.config import MECHANISMS, SUBJECT_ENCODERS
from nested_attention.errors import NestedAttentionError
from nested_attention.mechanisms import mechanism
from nested_attention.sources import TRAIN_CONFIG, names, resolve

from .timesteps import BIAS_STRATEGIES

LR_SCHEDULERS = [kind.value for kind in SchedulerType]
SHELL_URL = re.compile(r"(^|::)\s*pipe:")  # webdataset runs what follows `pipe:` in a shell


@dataclass
class TrainConfig:
    """Every knob of a training run. `configs/*.yaml` hold the paper's recipes and a tiny CPU one."""

    # what to train on
    pretrained_model: str = "tiny-sd"  # pipeline folder or hub id; toy: the shipped toy model; tiny-sd / tiny-sdxl: random, for tests
    image_encoder: str = "tiny"  # CLIP vision folder or hub id; toy: the toy CLIP's; tiny: random, for tests
    data: str = ""  # folder with metadata.jsonl, a .jsonl file, or WebDataset shards (e.g. data/{000..099}.tar)
    allow_shell_commands_in_data: bool = False  # `pipe:CMD` shard URLs run CMD in a shell: only for trusted configs
    word: str = "person"  # the subject word in the prompts (default for records that name none)
    output_dir: str = "outputs/train"
    init_adapter: str | None = None  # start from an exported adapter (phase 2 from phase 1); its architecture wins

    # adapter architecture (paper: 1024 queries for faces, 256 for pets)
    num_queries: int = 16
    qformer_hidden_size: int = 768
    qformer_layers: int = 4
    qformer_heads: int = 12
    qformer_intermediate_size: int = 3072
    alpha: float | None = 2.0
    mechanism: str = "nested"  # nested | decoupled | simple | global_v | multi_token (the paper's Fig. 10 rivals)
    subject_encoder: str = "qformer"  # qformer (the paper's) | linear: a readout of every CLIP token (encoder.py)
    linear_rank: int = 32  # the linear encoder's width per CLIP token
    key_init_gain: float = 1.0  # a fresh adapter's nested key projections start at this x torch's default init

    # data
    resolution: int = 512
    crop: str = "random"  # random | center
    max_subject_images: int = 1
    drop_text_rate: float = 0.05  # prompt -> the subject word alone: trains the image-only condition
    drop_image_rate: float = 0.0  # no subject: vanilla attention, which gives the adapter no gradient here
    drop_both_rate: float = 0.0
    skip_bad_data: bool = False  # skip and count bad records and samples instead of stopping
    num_workers: int = 2
    shuffle_buffer: int = 1000  # WebDataset only

    # optimization
    train_batch_size: int = 8  # per process
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    encoder_learning_rate: float | None = None  # the Q-Former and its queries; null: learning_rate for everything
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    snr_gamma: float | None = None  # min-SNR-gamma loss weighting (e.g. 5.0); null: plain MSE (timesteps.py)
    subject_loss_weight: float | None = None  # the loss on a target's masked subject pixels x this ("target_mask")
    # lambda on the subject word's logits while training (paper 5.1 applies lambda at inference only); above 1, the
    # lambdas below it trade identity back to the prompt (docs/toyworld-design.md, "Lambda and the word grounding")
    train_lambda: float = 1.0
    timestep_bias_strategy: str = "none"  # none | later | earlier | range: sample some noise levels more often
    timestep_bias_multiplier: float = 1.0  # how much more often
    timestep_bias_portion: float = 0.25  # later / earlier: the share of the schedule biased
    timestep_bias_begin: int = 0  # range: the biased timesteps begin <= t < end
    timestep_bias_end: int = 1000
    lr_scheduler: str = "constant_with_warmup"  # any name of diffusers.optimization.get_scheduler
    lr_warmup_steps: int = 0
    num_epochs: int = 100
    max_steps: int | None = None  # optimizer steps; overrides num_epochs when set
    mixed_precision: str = "no"  # no | fp16 | bf16 (trainable weights stay fp32)
    gradient_checkpointing: bool = False
    seed: int = 0

    # checkpoints
    checkpoint_every: int = 1000  # optimizer steps
    keep_checkpoints: int = 3
    resume: str | None = None  # "latest" or a checkpoint folder

    # logging and validation
    log_every: int = 10
    validation_every: int = 0  # optimizer steps; 0 = never
    validation_images: list[str] = field(default_factory=list)  # subject images (held-out subjects)
    validation_prompts: list[str] = field(default_factory=list)
    validation_seeds: list[int] = field(default_factory=lambda: [0])
    validation_steps: int = 30
    validation_guidance: float = 5.0

    def __post_init__(self):
        problems = []
        if not self.data:
            problems.append("`data` is empty: give a folder with metadata.jsonl or WebDataset shards")
        for name in ("resolution", "train_batch_size", "gradient_accumulation_steps", "num_epochs", "num_queries",
                     "checkpoint_every", "keep_checkpoints", "log_every", "max_subject_images", "linear_rank"):
            if getattr(self, name) < 1:
                problems.append(f"`{name}` is {getattr(self, name)}; expected at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"`max_steps` is {self.max_steps}; expected at least 1 or null")
        if self.crop not in ("random", "center"):
            problems.append(f"`crop` is {self.crop!r}; expected 'random' or 'center'")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            problems.append(f"`mixed_precision` is {self.mixed_precision!r}; expected no, fp16 or bf16")
        for name in ("drop_text_rate", "drop_image_rate", "drop_both_rate"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"`{name}` is {getattr(self, name)}; expected a probability in [0, 1]")
        if self.drop_text_rate + self.drop_image_rate + self.drop_both_rate > 1:
            problems.append("the three drop rates add up to more than 1")
        if self.validation_every and not (self.validation_images and self.validation_prompts):
            problems.append("`validation_every` is set but `validation_images` or `validation_prompts` is empty")
        if self.mechanism not in MECHANISMS:
            problems.append(f"`mechanism` is {self.mechanism!r}; expected one of {', '.join(MECHANISMS)}")
        if self.subject_encoder not in SUBJECT_ENCODERS:
            problems.append(f"`subject_encoder` is {self.subject_encoder!r}; expected one of "
                            f"{', '.join(SUBJECT_ENCODERS)}")
        problems += self._optimization_problems()
        if SHELL_URL.search(self.data) and not self.allow_shell_commands_in_data:
            problems.append(
                f"`data` {self.data!r} is a pipe: URL, which runs a shell command (whoever wrote the config chooses "
                f"it); set allow_shell_commands_in_data=true only if you trust that command"
            )
        if problems:
            raise NestedAttentionError("Invalid training config: " + "; ".join(problems) + ".")

    def _optimization_problems(self) -> list[str]:
        """Optimizer, schedule and sampler settings that would fail (or train on NaN) after the models load."""
        problems = []
        checks = {
            "learning_rate": (0, math.inf, "a finite number of at least 0"),
            "weight_decay": (0, math.inf, "a finite number of at least 0"),
            "adam_epsilon": (0, math.inf, "a finite number of at least 0"),
            "validation_guidance": (0, math.inf, "a finite number of at least 0"),
            "adam_beta1": (0, 1, "a number in [0, 1), e.g. 0.9"),
            "adam_beta2": (0, 1, "a number in [0, 1), e.g. 0.999"),
        }
        for name, (low, high, expected) in checks.items():
            value = getattr(self, name)
            if not (math.isfinite(value) and low <= value < high):
                problems.append(f"`{name}` is {value}; expected {expected}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            problems.append(f"`max_grad_norm` is {self.max_grad_norm}; expected a finite number above 0")
        if not (math.isfinite(self.key_init_gain) and self.key_init_gain > 0):
            problems.append(f"`key_init_gain` is {self.key_init_gain}; expected a positive finite number, e.g. 1")
        if self.encoder_learning_rate is not None and not (
            math.isfinite(self.encoder_learning_rate) and self.encoder_learning_rate >= 0
        ):
            problems.append(
                f"`encoder_learning_rate` is {self.encoder_learning_rate}; expected a finite number of at least 0 or null"
            )
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            problems.append(f"`alpha` is {self.alpha}; expected a positive finite number or null")
        if self.subject_loss_weight is not None and not (
            math.isfinite(self.subject_loss_weight) and self.subject_loss_weight > 0
        ):
            problems.append(f"`subject_loss_weight` is {self.subject_loss_weight}; expected a positive finite number "
                            f"(e.g. 5.0: subject pixels weigh 5x the rest) or null")
        if not (math.isfinite(self.train_lambda) and self.train_lambda >= 1):
            problems.append(f"`train_lambda` is {self.train_lambda}; expected a finite number of at least 1 (1: train "
                            f"as the paper does)")
        elif self.train_lambda != 1 and self.mechanism in MECHANISMS and not mechanism(self.mechanism).uses_lam:
            problems.append(f"`train_lambda` is {self.train_lambda} but the {self.mechanism} mechanism has no lambda; "
                            f"leave it at 1")
        if self.snr_gamma is not None and not (math.isfinite(self.snr_gamma) and self.snr_gamma > 0):
            problems.append(f"`snr_gamma` is {self.snr_gamma}; expected a positive finite number (5.0 is usual) or null")
        problems += self._timestep_bias_problems()
        if self.lr_scheduler not in LR_SCHEDULERS:
            close = difflib.get_close_matches(self.lr_scheduler, LR_SCHEDULERS, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            problems.append(f"`lr_scheduler` is {self.lr_scheduler!r}; {hint}expected one of {', '.join(LR_SCHEDULERS)}")
        for name in ("lr_warmup_steps", "seed", "validation_every", "num_workers"):
            if getattr(self, name) < 0:
                problems.append(f"`{name}` is {getattr(self, name)}; expected at least 0")
        if self.validation_steps < 1:
            problems.append(f"`validation_steps` is {self.validation_steps}; expected at least 1")
        return problems

    def _timestep_bias_problems(self) -> list[str]:
        problems = []
        if self.timestep_bias_strategy not in BIAS_STRATEGIES:
            problems.append(f"`timestep_bias_strategy` is {self.timestep_bias_strategy!r}; expected one of "
                            f"{', '.join(BIAS_STRATEGIES)}")
        if not (math.isfinite(self.timestep_bias_multiplier) and self.timestep_bias_multiplier > 0):
            problems.append(f"`timestep_bias_multiplier` is {self.timestep_bias_multiplier}; expected a positive "
                            f"finite number (above 1 samples the biased timesteps more often)")
        if not 0 < self.timestep_bias_portion <= 1:
            problems.append(f"`timestep_bias_portion` is {self.timestep_bias_portion}; expected a share in (0, 1]")
        if not 0 <= self.timestep_bias_begin < self.timestep_bias_end:
            problems.append(f"`timestep_bias_begin` {self.timestep_bias_begin} and `timestep_bias_end` "
                            f"{self.timestep_bias_end}; expected 0 <= begin < end")
        return problems

    @property
    def adapter_kwargs(self) -> dict:
        keys = ("num_queries", "qformer_hidden_size", "qformer_layers", "qformer_heads", "qformer_intermediate_size",
                "alpha", "word", "mechanism", "subject_encoder", "linear_rank")
        return {key: getattr(self, key) for key in keys}


def _check_type(name: str, value, annotation, cls=None):
    """`value` (from YAML) fits the field's annotation, converting int -> float where a float is expected and a list
    to a tuple where a tuple is."""
    hint = typing.get_type_hints(cls or TrainConfig)[name]
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return None
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is float and isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option in (str, bool) and type(value) is option:
            return value
        if typing.get_origin(option) in (list, tuple) and isinstance(value, list):
            inner = typing.get_args(option)[0]
            if all(isinstance(v, inner) for v in value):
                return value if typing.get_origin(option) is list else tuple(value)
    raise NestedAttentionError(f"`{name}` must be {annotation}, got {value!r} ({type(value).__name__}).")


def _unknown(key: str, cls=None, what: str = "training config") -> NestedAttentionError:
    known = [f.name for f in dataclasses.fields(cls or TrainConfig)]
    close = difflib.get_close_matches(key, known, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else f" Known fields: {', '.join(known)}."
    return NestedAttentionError(f"Unknown {what} field `{key}`.{hint}")


def _parsed(overrides: list[str]) -> dict:
    """`field=value` items -> {field: value}, values parsed as YAML (not checked yet)."""
    values = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise NestedAttentionError(f"Override {item!r} is not of the form field=value (e.g. learning_rate=1e-4).")
        values[key.strip()] = yaml.safe_load(text) if text.strip() else None
    return values


def parse_overrides(overrides: list[str], cls, what: str) -> dict:
    """`field=value` items (values parsed as YAML) -> {field: value} for the dataclass ``cls``, each checked against
    its annotation; ``what`` names ``cls`` in the one-sentence errors."""
    return _checked(_parsed(overrides), cls, what)


def _checked(values: dict, cls, what: str) -> dict:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    checked = {}
    for key, value in values.items():
        if key not in fields:
            raise _unknown(key, cls, what)
        checked[key] = _check_type(key, value, fields[key].type, cls)
    return checked


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """A TrainConfig from a YAML file or an installed config's name (optional, e.g. ``toy-person``) and
    `field=value` overrides (values parsed as YAML)."""
    values: dict = {}
    if path is not None:
        path = Path(resolve(TRAIN_CONFIG, str(path)))
        if not path.is_file():
            named = ", ".join(names(TRAIN_CONFIG)) or "none installed"
            raise NestedAttentionError(f"The training config {path} is no such file; give a YAML file (configs/ has "
                                       f"examples) or the name of an installed one ({named}).")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise NestedAttentionError(f"Could not read the training config {path}: {error}") from None
        if not isinstance(loaded, dict):
            raise NestedAttentionError(f"The training config {path} must be a YAML mapping of fields to values.")
        values.update(loaded)
    values.update(_parsed(overrides))
    return TrainConfig(**_checked(values, TrainConfig, "training config"))


def save_config(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
