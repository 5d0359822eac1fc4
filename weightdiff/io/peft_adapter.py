r"""PEFT LoRA and IA3 adapters: ``adapter_config.json`` and the A/B factor pairs (LoRA) or the scaling
vector (IA3, ``IA3Vector``: PEFT merges it as W x l) of each module (LoHa and LoKr: ``io.peft_lycoris``;
VeRA: ``io.peft_vera``; each read as a LoRA factor pair).

PEFT saves a LoRA update of module ``m`` as ``base_model.model.<m>.lora_A.weight`` [r, in]
and ``...lora_B.weight`` [out, r] (embeddings: ``lora_embedding_A`` [r, vocab] and
``lora_embedding_B`` [dim, r], whose product is the transposed delta), plus
``lora_magnitude_vector`` for DoRA. The delta of ``<m>.weight`` is scale x B @ A with
scale = alpha / r (alpha / sqrt(r) under rsLoRA), where ``rank_pattern`` and
``alpha_pattern`` override r and alpha per module. GPT-2 style ``Conv1D`` layers store
their weight as [in, out] (``fan_in_fan_out``): the delta is then (B @ A) transposed.

The config is read strictly, as PEFT's own dataclass would type it: ``r`` a positive
integer, ``lora_alpha`` a finite number, booleans real JSON booleans (``"false"`` is not
false), ``peft_type`` present and LORA (PEFT refuses a config without it), patterns objects of module keys. Pattern keys are regular
expressions for PEFT (``re.match(rf"(.*\.)?({key})$", module)``); a key whose matching
could backtrack without bound (nested or alternated repetition, look-arounds, back
references) is refused instead of run. Factor shapes are checked against the base weight
before anything is computed, and factor values before they reach LAPACK.

>>> AdapterConfig(8, 16.0, ["q_proj"], False, False, None, {}).scale
2.0
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, escape_name
from .files import load_json, read_small
from .safetensors_read import TensorInfo

__all__ = ["AdapterConfig", "LoraFactor", "IA3Vector", "read_adapter_config", "parse_adapter_config", "lora_factors",
           "adalora_scale", "KIND_LABELS", "factor_pair", "factor_note",
           "ia3_vectors", "check_ia3", "ia3_layout", "check_against_base", "layout_evidence", "check_factor_values",
           "JSON_CAP"]

#: largest adapter config / index accepted
JSON_CAP = 100_000_000
_PEFT_PREFIX = "base_model.model."
#: (a module name may hold any character, a newline too, as PEFT's keys may: ``.`` matches it and ``\Z`` ends the name)
_LORA_RE = re.compile(r"^(?P<mod>.+)\.(?:lora_(?P<ab>A|B)\.weight|lora_embedding_(?P<eab>A|B)"
                      r"|lora_magnitude_vector(?:\.weight)?)\Z", re.S)


#: a pattern key is matched only when (module name length) ** (its repetitions + 1) stays under this
_MATCH_BUDGET = 10_000_000
_KEY_CAP = 1_000
_R_CAP = 1 << 31
#: |scale| x |A| x |B| above this: the delta's squared norms would overflow float64
_DELTA_CAP = 1e150
_BOOLS = ("use_rslora", "use_dora", "fan_in_fan_out")


def _show(value: object) -> str:
    """A config value for a message: short, escaped (a 400-digit integer is cut)."""
    text = escape_name(repr(value) if not isinstance(value, str) else f'"{value}"')
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass
class AdapterConfig:
    """The parts of a PEFT ``adapter_config.json`` that shape the delta."""

    r: int
    lora_alpha: float
    target_modules: list[str]
    use_rslora: bool
    use_dora: bool
    base_model: str | None
    raw: dict = field(repr=False)
    fan_in_fan_out: bool = False
    path: Path | None = None
    #: repetitions in each pattern key (checked safe to match when read)
    repeats: dict = field(default_factory=dict, repr=False)
    #: "LORA" or "IA3" (an (IA)³ config has no rank or scale: r and lora_alpha are 0 there)
    peft_type: str = "LORA"
    #: IA3: the modules whose vector scales the layer's inputs (a list of name suffixes, or a pattern PEFT
    #: full-matches); None when the config leaves it out
    feedforward_modules: object = None
    #: "peft" (adapter_config.json), or "llama.cpp" (a GGUF LoRA adapter, weightdiff.io.gguf_adapter: each
    #: module's scale is alpha / its own rank, or 1 when alpha is 0, as llama.cpp computes it)
    source: str = "peft"
    #: PEFT's trainable tokens (a LoRA's ``trainable_token_indices``, a TRAINABLE_TOKENS adapter's
    #: ``token_indices``): module name -> its token ids, ``""`` naming the model's input embedding; None when unset
    tokens: dict | None = None
    #: LoRA's ``target_parameters``: parameters adapted by PEFT's ParamWrapper (``peft_params``)
    target_parameters: tuple = ()

    def is_feedforward(self, module: str) -> bool | None:
        """Whether PEFT builds IA3 module ``module`` (its name in the model) as a feedforward one (its vector
        scaling the inputs), as ``IA3Model._check_target_module_feedforward`` decides; None when the config does
        not say."""
        ff = self.feedforward_modules
        if ff is None:
            return None
        if isinstance(ff, str):
            if max(len(module), 2) ** (self.repeats.get(ff, 0) + 1) > _MATCH_BUDGET:
                raise CheckpointError(self.path, f"feedforward_modules `{escape_name(ff[:60])}` is a regular "
                                                 f"expression too costly to match against a module name of "
                                                 f"{len(module):,} characters", "give a list of module names")
            return re.fullmatch(ff, module) is not None
        return any(module.endswith(k) for k in ff)

    @property
    def scale(self) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.scale_for(self.lora_alpha, self.r)

    def scale_for(self, alpha: float, r: int) -> float:
        if self.source == "llama.cpp":
            return alpha / r if alpha else 1.0
        if self.source == "mlx-lm":        # lora_parameters.scale multiplies the factors as it is
            return alpha
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def pattern(self, key: str, module: str, default):
        """Per-module override from ``rank_pattern``/``alpha_pattern``, matched as PEFT's
        ``get_pattern_key`` does (first key whose regex matches a dotted suffix of the name)."""
        for pat, value in (self.raw.get(key) or {}).items():
            reps = self.repeats.get(pat)
            if reps is None:
                reps = _pattern_repeats(self.path, key, pat)
            if max(len(module), 2) ** (reps + 1) > _MATCH_BUDGET:
                raise CheckpointError(self.path, f"{key} key `{escape_name(pat[:60])}` is a regular expression too "
                                                 f"costly to match against a module name of {len(module):,} "
                                                 "characters", "use literal module names as keys")
            if re.match(rf"(.*\.)?({pat})$", module):
                return value
        return default


def _pattern_repeats(path: Path | None, key: str, pat: str, what: str | None = None,
                     hint: str = "use literal module names as keys", lookarounds: bool = False) -> int:
    """Repetitions in pattern key ``pat``; CheckpointError for a key whose matching could blow up
    (``what``: how the message names the pattern, ``{key} key `pat``` unless given; ``hint``: its hint).

    Backtracking stays polynomial when no repetition holds another repetition or an
    alternation, and there are no back references or look-arounds; the match cost is then
    at most about n ** (repetitions + 1) for a module name of n characters. With ``lookarounds``, a
    look-ahead or look-behind is walked as a group (Python never backtracks into one, so each try costs at
    most its contents' polynomial, and its repetitions count): compressed-tensors configs use them
    (``re:(?!.*experts).*Linear``).

    >>> _pattern_repeats(None, "alpha_pattern", "layers.0.q_proj"), _pattern_repeats(None, "alpha_pattern", r"layers\\.\\d+\\.q")
    (0, 1)
    """
    try:                                   # the stdlib's own regex parser (it matches nothing)
        from re import _constants as C, _parser as P
    except ImportError:                    # Python 3.10
        import sre_constants as C
        import sre_parse as P

    def refuse(why: str) -> CheckpointError:
        return CheckpointError(path, f"{what or f'{key} key `{escape_name(pat[:60])}`'} {why}", hint)

    if len(pat) > _KEY_CAP:
        raise refuse(f"is {len(pat):,} characters long (at most {_KEY_CAP:,})")
    try:
        tree = P.parse(pat)
    except (re.error, RecursionError, OverflowError, ValueError) as exc:
        raise refuse(f"is not a regular expression ({escape_name(str(exc))})") from None
    repeats = (C.MAX_REPEAT, C.MIN_REPEAT, getattr(C, "POSSESSIVE_REPEAT", C.MAX_REPEAT))
    plain = (C.LITERAL, C.NOT_LITERAL, C.ANY, C.IN, C.AT)
    count = 0

    def walk(items, inside: bool) -> None:
        nonlocal count
        for op, arg in items:
            if op in plain:
                continue
            if op == C.SUBPATTERN:
                walk(arg[-1], inside)
            elif op == C.BRANCH:
                if inside:
                    raise refuse("repeats an alternation (catastrophic backtracking)")
                for alt in arg[1]:
                    walk(alt, inside)
            elif op in repeats:
                lo, hi, sub = arg
                many = hi is C.MAXREPEAT or hi > 1
                if many and inside:
                    raise refuse("nests one repetition inside another (catastrophic backtracking)")
                count += many
                walk(sub, inside or many)
            elif lookarounds and op in (C.ASSERT, C.ASSERT_NOT):
                walk(arg[1], inside)
            else:
                raise refuse(f"uses {str(op).lower()}, which weightdiff does not match (no back references"
                             f"{'' if lookarounds else ' or look-arounds'})")

    try:
        walk(tree, False)
    except RecursionError:
        raise refuse("is nested too deeply") from None
    return count


@dataclass
class LoraFactor:
    """One LoRA pair: delta of ``target`` = scale x B @ A (transposed when ``embedding``:
    PEFT stores embedding factors as A [r, vocab], B [dim, r]; and when ``transposed``:
    a GPT-2 ``Conv1D`` base weight is stored [in, out])."""

    target: str
    a_name: str
    b_name: str
    magnitude_name: str | None
    r: int
    scale: float
    embedding: bool = False
    transposed: bool = False
    #: ``<m>.base_layer.weight`` saved in the adapter (PEFT's ``save_embedding_layers``, a resized
    #: vocabulary): PEFT loads it over the base's weight, so the factors apply to it
    base_layer_name: str | None = None
    #: a ``lora_magnitude_vector`` under ``use_dora: false``: PEFT loads a plain LoRA and ignores it
    ignored_magnitude: str | None = None
    #: ``<m>.lora_B.bias`` (``lora_bias: true``): PEFT merges scale x it into the layer's bias, so it is
    #: measured as a change of ``<m>.bias``, not as a tensor of its own
    bias_name: str | None = None
    #: AdaLoRA's singular values ``<m>.lora_E`` [r, 1]: the delta is scale x B @ (A * E)
    e_name: str | None = None
    #: "LORA" (AdaLoRA's too), or "LOHA" / "LOKR" / "VERA": then ``parts`` holds the module's tensors (role ->
    #: name) and the factors are built from them (``factor_pair``)
    kind: str = "LORA"
    parts: dict = field(default_factory=dict)
    #: VeRA: the columns of the shared vera_A the layer reads (its inputs), set when the factors meet the base
    cols: int | None = None
    #: VeRA saved without its projections: (largest out, largest in, projection_prng_key) they are drawn again at
    #: (``peft_vera.projections``; the sizes set by ``check_projections``)
    shared: tuple | None = None
    #: trainable tokens (kind "TOKENS"): the ids of the table's rows ``parts["rows"]`` replaces
    tokens: tuple | None = None
    #: trainable tokens on the embedding of a base that ties its LM head: the head's copy of the rows the adapter
    #: saves too (``pairing.heads``), which must hold the same values
    tied_copy: str | None = None
    #: HRA under ``apply_GS``: the reflections' vectors orthonormalized (``peft_hra``)
    apply_gs: bool = False
    #: VBLoRA: how many of the bank's vectors each piece mixes (``topk``)
    r_topk: int = 0
    #: LoRA on a parameter (``target_parameters``, PEFT's ParamWrapper; ``peft_params``): the parameter's name in the
    #: model, ``expert`` the expert's index in a fused [experts, m, n] one (of ``experts``), whose factors are rows
    #: e r .. e r + r - 1 of A and columns e, e + experts, ... of B; ``in_out``: the parameter is read [experts, in,
    #: out], so the expert's change is (B_e A_e)^T (set when checked against the base)
    param: str | None = None
    expert: int | None = None
    experts: int = 1
    in_out: bool | None = None
    #: an expert the base keeps apart (``peft_params.experts_apart``): the rows (start, stop) of the expert's
    #: [m, n] change this tensor holds (gate_proj and up_proj of a fused gate_up_proj), and that [m, n]
    rows: tuple | None = None
    virtual: tuple | None = None
    #: an mlx-lm adapter's layer (``mlx_adapter``): "linear" (lora_a [in, r], lora_b [r, out]) or "embedding"
    #: (lora_a [vocab, r], lora_b [r, dims]), the saved factors turned into A and B by ``mlx_adapter.mlx_pair``
    mlx: str | None = None

    @property
    def label(self) -> str:
        """What messages and notes call the method: LoRA (AdaLoRA's factors too), LoHa, LoKr, VeRA."""
        return KIND_LABELS.get(self.kind, "LoRA")

    @property
    def bias_target(self) -> str:
        """The base bias ``bias_name`` changes: ``<m>.bias`` of the target ``<m>.weight``."""
        return self.target.removesuffix(".weight") + ".bias"


def _bool(path: Path, raw: dict, key: str) -> bool:
    value = raw.get(key)
    if value is None:
        return False
    if type(value) is not bool:
        raise CheckpointError(path, f"adapter config has {key} = {_show(value)}, expected true or false")
    return value


def _number(path: Path, what: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointError(path, f"adapter config has {what} = {_show(value)}, expected a number")
    try:
        out = float(value)
    except OverflowError:
        out = math.inf
    if not math.isfinite(out):
        raise CheckpointError(path, f"adapter config has {what} = {_show(value)}, expected a finite number")
    return out


#: peft.LoraConfig's defaults, used where adapter_config.json leaves the key out (as PEFT reads it)
PEFT_DEFAULT_R, PEFT_DEFAULT_ALPHA = 8, 8


def _rank(path: Path, what: str, value: object) -> int:
    if type(value) is not int or not 1 <= value < _R_CAP:
        raise CheckpointError(path, f"adapter config has {what} = {_show(value)}, expected a positive integer")
    return value


#: initialisations that leave the base weights alone (B = 0, or A and B random, or B from W's SVD with A = 0)
_INIT_KEEPS_BASE = ("gaussian", "eva", "orthogonal", "mica")
#: initialisations that rewrite the base weights PEFT trains on: W - scale B A (PiSSA, OLoRA, CorDA,
#: LoRA-GA), or W quantized (LoftQ)
_INIT_MOVES_BASE = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _check_init(path: Path, init: object) -> None:
    """CheckpointError for an ``init_lora_weights`` under which the factors are not the change of the base.

    PiSSA, OLoRA, CorDA, LoRA-GA move part of W into the initial factors and train on W - scale B0 A0
    (LoftQ on a quantized W): saved as is, the factors apply to that modified copy, so scale B A is not
    the fine-tune's delta against the base (an untrained PiSSA adapter read as a 45% change). Saved with
    ``path_initial_model_for_weight_conversion``, PEFT rewrites the factors against the original base and
    the config says ``true``. An initialisation weightdiff does not know is refused the same way."""
    if init is None or type(init) is bool:
        return
    if not isinstance(init, str):
        raise CheckpointError(path, f"adapter config has init_lora_weights = {_show(init)}, expected true, false "
                                    "or the name of an initialisation")
    name = init.lower()
    if name in _INIT_KEEPS_BASE:
        return
    how = ("rewrites the base weights" if name.startswith(_INIT_MOVES_BASE)
           else "is an initialisation weightdiff does not know")
    raise CheckpointError(path, f"adapter config has init_lora_weights {_show(init)}, which {how}: the factors "
                                "alone are not the change of the base",
                          "save it with path_initial_model_for_weight_conversion, or compare the merged model")


#: peft_types that train virtual tokens fed beside the input, not weights
_VIRTUAL_TOKENS = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "CPT")
_MERGE_HINT = "merge the adapter (merge_and_unload) and compare the merged model"
#: LoRA variants (peft_type LORA) whose factors are not ``scale * B @ A`` of the base weight: the key, why,
#: and the way out. Read as a plain LoRA, each gave a confident wrong delta (KaSA: an untrained adapter read as
#: 4 added tensors while PEFT runs 4 truncated matrices) or a refusal that blamed the file.
_VARIANTS = (
    ("kasa_config", "KaSA truncates the base weight (its smallest singular values) and scales B A by "
                    "lora_diag: the factors alone are not the change of the base", _MERGE_HINT),
    ("use_bdlora", "block-diagonal LoRA (BD-LoRA) splits its factors into blocks, which weightdiff does not "
                   "read", _MERGE_HINT),
    ("layer_replication", "PEFT builds the layers it lists from copies of base layers, which weightdiff does not "
                          "reproduce", "compare a full checkpoint of the model PEFT builds; merge_and_unload "
                                       "refuses layer_replication"),
)


def _truthy_flag(v: object) -> bool:
    """Whether a config flag is set as PEFT would read it (anything but false, 0, null, empty)."""
    return v not in (None, False, 0, "", [], {}) and not (isinstance(v, str) and v.strip().lower() == "false")


def read_adapter_config(path: Path) -> AdapterConfig:
    return parse_adapter_config(load_json(read_small(path, JSON_CAP), path, "adapter config"), path)


#: peft_type -> (the module of weightdiff.io that reads that method, its config parser), imported when such an
#: adapter is read
_PARSERS = {"VERA": ("peft_vera", "parse_vera_config"), "OFT": ("peft_oft", "parse_oft_config"),
            "BOFT": ("peft_boft", "parse_boft_config"), "TRAINABLE_TOKENS": ("peft_tokens", "parse_tokens_config"),
            "VBLORA": ("peft_vblora", "parse_vblora_config"), "HRA": ("peft_hra", "parse_hra_config"),
            "LN_TUNING": ("peft_ln", "parse_ln_config"), "FOURIERFT": ("peft_fourierft", "parse_fourierft_config"),
            "DELORA": ("peft_delora", "parse_delora_config")}


def parse_adapter_config(raw: object, path: Path) -> AdapterConfig:
    """The AdapterConfig of parsed ``adapter_config.json`` JSON ``raw`` (``path`` names it in errors)."""
    if not isinstance(raw, dict):
        raise CheckpointError(path, "adapter config is not a JSON object")
    kind = raw.get("peft_type")
    from .mlx_adapter import is_mlx_config

    if is_mlx_config(raw):              # mlx-lm's training arguments (mlx_lm.lora), beside adapters.safetensors
        from .mlx_adapter import parse_mlx_config

        return parse_mlx_config(raw, path)
    if kind is None:
        raise CheckpointError(path, "adapter config has no peft_type (PEFT refuses to load it; a LoRA adapter "
                                    "says \"peft_type\": \"LORA\")")
    if isinstance(kind, str) and kind.upper() in _VIRTUAL_TOKENS:
        raise CheckpointError(path, f"adapter config has peft_type {_show(kind)}: prompt and prefix tuning add "
                                    "virtual-token embeddings and change no model weight, so there is no weight "
                                    "delta to measure")
    if isinstance(kind, str) and kind.upper() == "IA3":
        return _parse_ia3(raw, path)
    if isinstance(kind, str) and kind.upper() == "ADALORA":
        return _parse_adalora(raw, path)
    if isinstance(kind, str) and kind.upper() in ("LOHA", "LOKR"):
        from .peft_lycoris import parse_lycoris_config

        return parse_lycoris_config(raw, path, kind.upper())
    if isinstance(kind, str) and kind.upper() in _PARSERS:
        module, func = _PARSERS[kind.upper()]
        return getattr(import_module(f"{__package__}.{module}"), func)(raw, path)
    if not isinstance(kind, str) or kind.upper() != "LORA":
        raise CheckpointError(path, f"adapter config has peft_type {_show(kind)}: only LoRA, AdaLoRA, LoHa, LoKr, "
                                    "VeRA, VBLoRA, FourierFT, DeLoRA, OFT, BOFT, HRA, IA3, trainable-tokens and LN "
                                    "tuning adapters are supported (others store different factors)",
                              "merge the adapter (merge_and_unload) and compare the merged model")
    for key, why, hint in _VARIANTS:
        if raw.get(key) not in (None, False, [], {}):
            raise CheckpointError(path, f"adapter config has {key} {_show(raw[key])}: {why}", hint)
    group = raw.get("qalora_group_size", 16)
    if _truthy_flag(raw.get("use_qalora")) and not (type(group) is int and group == 1):
        # QA-LoRA's A takes the input averaged over groups of qalora_group_size columns: A is [r, in / group],
        # which read as plain LoRA "did not fit the base" (blaming the base); a group of 1 is plain LoRA
        raise CheckpointError(path, f"adapter config has use_qalora with qalora_group_size {_show(group)}: QA-LoRA "
                                    "applies its factors to the input pooled in groups of columns, which weightdiff "
                                    "does not read, and PEFT cannot merge it",
                              "compare a full checkpoint of the fine-tuned model")
    params = _target_parameters(raw, path)
    tokens = None
    if raw.get("trainable_token_indices") is not None:
        from .peft_tokens import token_indices

        tokens = token_indices(raw, path, "trainable_token_indices")
    _check_init(path, raw.get("init_lora_weights"))
    # a key left out takes PEFT's own default (LoraConfig: r = 8, lora_alpha = 8), as LoraConfig.from_pretrained
    # does: alpha = r (scale 1) made an r = 2 adapter without lora_alpha read 4x too small
    r = _rank(path, "r", raw.get("r", PEFT_DEFAULT_R))
    alpha = _number(path, "lora_alpha", raw.get("lora_alpha", PEFT_DEFAULT_ALPHA))
    flags = {k: _bool(path, raw, k) for k in _BOOLS}
    repeats = _patterns(raw, path)
    targets = _targets(path, raw)
    base = raw.get("base_model_name_or_path")
    return AdapterConfig(r, alpha, list(targets), flags["use_rslora"], flags["use_dora"],
                         base if isinstance(base, str) else None, raw, fan_in_fan_out=flags["fan_in_fan_out"],
                         path=Path(path), repeats=repeats, tokens=tokens, target_parameters=params)


def _target_parameters(raw: dict, path: Path) -> tuple[str, ...]:
    """A LoRA config's ``target_parameters`` (PEFT's ParamWrapper: LoRA on ``nn.Parameter`` s, as on gpt-oss's
    fused experts), checked: a list of non-empty names, and none of the options PEFT's ParamWrapper refuses
    (an adapter saved with them cannot have been built by PEFT)."""
    targets = raw.get("target_parameters")
    if targets in (None, []):
        return ()
    if not isinstance(targets, list) or not all(isinstance(t, str) and t and not t.endswith(".") for t in targets):
        raise CheckpointError(path, f"adapter config has target_parameters = {_show(targets)}, expected a list of "
                                    "parameter names")
    for key in ("use_dora", "lora_bias", "fan_in_fan_out"):
        if _truthy_flag(raw.get(key)):
            raise CheckpointError(path, f"adapter config has target_parameters with {key}, which PEFT's ParamWrapper "
                                        "refuses: PEFT did not build this adapter as its config says",
                                  "config and tensors from different adapters?")
    return tuple(targets)


def _patterns(raw: dict, path: Path) -> dict[str, int]:
    """``alpha_pattern`` and ``rank_pattern`` checked (objects of module key -> a number / a positive integer, each
    key safe to match): the repetitions of each key."""
    repeats: dict[str, int] = {}
    for key, check in (("alpha_pattern", _number), ("rank_pattern", _rank)):
        pats = raw.get(key)
        if pats is None:
            continue
        if not isinstance(pats, dict):
            raise CheckpointError(path, f"adapter config has {key} = {_show(pats)}, expected an object "
                                        "of module name -> value")
        for pat, value in pats.items():
            check(path, f"{key}[{_show(pat)}]", value)
            repeats[pat] = _pattern_repeats(path, key, pat)
    return repeats


def _targets(path: Path, raw: dict) -> list[str]:
    """``target_modules`` of adapter config ``raw``: a list of names, or a string PEFT reads as a pattern."""
    targets = raw.get("target_modules")
    if isinstance(targets, str):
        # PEFT full-matches a string against the module names (weightdiff reads the targets from the factors, and
        # names them): one that is no regular expression is a config PEFT refuses, and it was taken as a name
        try:
            if len(targets) > _KEY_CAP:
                raise re.error(f"{len(targets):,} characters long (at most {_KEY_CAP:,})")
            re.compile(targets)
        except (re.error, RecursionError, OverflowError) as e:
            raise CheckpointError(path, f"adapter config has target_modules = {_show(targets)}, not a regular "
                                        f"expression ({e})", "PEFT reads a string target_modules as a pattern "
                                        "the module names must match; give a list of module names") from None
        targets = [targets]
    elif targets is None:
        targets = []
    elif not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise CheckpointError(path, f"adapter config has target_modules = {_show(targets)}, expected a "
                                    "list of module names")
    return list(targets)


#: peft.AdaLoraConfig's defaults (init_r; lora_alpha is LoraConfig's)
ADALORA_DEFAULT_INIT_R = 12


def _parse_adalora(raw: dict, path: Path) -> AdapterConfig:
    """The AdapterConfig of an AdaLoRA adapter (``peft_type`` ADALORA): ``r`` is ``init_r`` (AdaLoRA ignores
    ``r``), ``lora_alpha`` as for LoRA, ``rank_pattern`` the ranks each module kept (a list of ``init_r``
    booleans per ``<module>.lora_E`` key, as PEFT writes it after its rank allocation), checked when the
    factors are read. PEFT refuses DoRA under AdaLoRA, and so does this."""
    if raw.get("use_dora") not in (None, False):
        raise CheckpointError(path, f"adapter config has peft_type ADALORA with use_dora {_show(raw['use_dora'])}: "
                                    "PEFT does not build DoRA under AdaLoRA")
    init_r = _rank(path, "init_r", raw.get("init_r", ADALORA_DEFAULT_INIT_R))
    alpha = _number(path, "lora_alpha", raw.get("lora_alpha", PEFT_DEFAULT_ALPHA))
    fan = _bool(path, raw, "fan_in_fan_out")
    pattern = raw.get("rank_pattern")
    if pattern is not None:
        if not isinstance(pattern, dict):
            raise CheckpointError(path, f"adapter config has rank_pattern = {_show(pattern)}, expected an object of "
                                        "module name -> the ranks it kept")
        for key, kept in pattern.items():
            if not (isinstance(kept, list) and len(kept) == init_r and all(type(k) is bool for k in kept)):
                raise CheckpointError(path, f"adapter config has rank_pattern[{_show(key)}] = {_show(kept)}, "
                                            f"expected {init_r} true/false values (init_r), one per initial rank")
    base = raw.get("base_model_name_or_path")
    tokens = None
    if raw.get("trainable_token_indices") is not None:         # AdaLoraConfig is a LoraConfig: PEFT trains them too
        from .peft_tokens import token_indices

        tokens = token_indices(raw, path, "trainable_token_indices")
    return AdapterConfig(init_r, alpha, _targets(path, raw), False, False, base if isinstance(base, str) else None,
                         raw, fan_in_fan_out=fan, path=Path(path), peft_type="ADALORA", tokens=tokens)


def adalora_scale(config: AdapterConfig, kept: int) -> float:
    """The factor PEFT's AdaLoRA merges ``B @ (A * E)`` with: ``scaling / (ranknum + 1e-5)``, where ``scaling``
    is ``lora_alpha`` (the kept rank when ``lora_alpha`` is not positive) and ``ranknum`` stays ``init_r``, a
    float32 parameter (``resize_modules_by_rank_pattern`` keeps it: "the scaling is exactly as the previous").

    >>> round(adalora_scale(AdapterConfig(4, 8.0, [], False, False, None, {}, peft_type="ADALORA"), 2), 6)
    1.999995
    """
    scaling = config.lora_alpha if config.lora_alpha > 0 else float(kept)
    return scaling / float(np.float32(config.r) + np.float32(1e-5))


def _parse_ia3(raw: dict, path: Path) -> AdapterConfig:
    """The AdapterConfig of an (IA)³ adapter (``peft_type`` IA3): no rank and no scale (``r`` and ``lora_alpha``
    are 0, never shown), the module names PEFT treats as feedforward (``feedforward_modules``: a list PEFT matches
    as name suffixes, or a pattern it full-matches; None when the config leaves it out) and ``fan_in_fan_out``."""
    flags = {k: _bool(path, raw, k) for k in ("fan_in_fan_out", "init_ia3_weights")}
    targets = _targets(path, raw)
    ff = raw.get("feedforward_modules")
    repeats: dict[str, int] = {}
    if isinstance(ff, str):
        repeats[ff] = _pattern_repeats(path, "feedforward_modules", ff, what="feedforward_modules",
                                       hint="give a list of module names")
    elif ff is not None and not (isinstance(ff, list) and all(isinstance(k, str) for k in ff)):
        raise CheckpointError(path, f"adapter config has feedforward_modules = {_show(ff)}, expected a list of "
                                    "module names")
    base = raw.get("base_model_name_or_path")
    return AdapterConfig(0, 0.0, targets, False, False, base if isinstance(base, str) else None, raw,
                         fan_in_fan_out=flags["fan_in_fan_out"], path=Path(path), repeats=repeats, peft_type="IA3",
                         feedforward_modules=ff)


def _is_float(info: TensorInfo) -> bool:
    from ..kernels.dtypes import DTYPES

    return DTYPES[info.dtype].kind == "float" and DTYPES[info.dtype].bits >= 8


_ADALORA_RE = re.compile(r"^(?P<mod>.+)\.lora_(?P<k>A|B|E)\Z", re.S)


def _adalora_factors(tensors: dict[str, TensorInfo], where: Path, config: AdapterConfig) -> list[LoraFactor]:
    """AdaLoRA's ``<m>.lora_A`` [r, in], ``lora_B`` [out, r] and ``lora_E`` [r, 1] of each module, r the ranks it
    kept (``rank_pattern``; ``init_r`` without one). A module that kept none is a factor of rank 0: PEFT builds
    it and it changes nothing."""
    parts: dict[str, dict[str, str]] = {}
    for name in tensors:
        m = _ADALORA_RE.match(name)
        if m:
            parts.setdefault(m["mod"], {})[m["k"]] = name
        elif (".ia3_l" in name and _IA3_RE.match(name)) or _LORA_RE.match(name) or \
                (_foreign_part(name) and not name.endswith(".trainable_tokens_delta")):
            raise CheckpointError(where, f"adapter holds `{escape_name(name)}`, which is not AdaLoRA's (lora_A, "
                                         "lora_B, lora_E), but adapter_config.json says peft_type ADALORA",
                                  "tensors and config from different adapters?")
    pattern = config.raw.get("rank_pattern") or {}
    out = []
    for mod, got in parts.items():
        if set(got) != {"A", "B", "E"}:
            raise CheckpointError(where, f"AdaLoRA module `{escape_name(mod)}` has "
                                         f"{', '.join('lora_' + k for k in sorted(got))} but not all of lora_A, "
                                         "lora_B and lora_E")
        a, b, e = (tensors[got[k]] for k in "ABE")
        for n in (got["A"], got["B"], got["E"]):
            if not _is_float(tensors[n]):
                raise CheckpointError(where, f"AdaLoRA tensor `{escape_name(n)}` is {tensors[n].dtype}; expected a "
                                             "float dtype")
        sa, sb, se = (tuple(int(d) for d in t.shape) for t in (a, b, e))
        if len(sa) != 2 or len(sb) != 2 or sb[1] != sa[0] or se != (sa[0], 1):
            raise CheckpointError(where, f"AdaLoRA factors of `{escape_name(mod)}` do not chain: A is {list(sa)}, "
                                         f"E {list(se)}, B {list(sb)} (expected A [r, in], E [r, 1], B [out, r])")
        module = mod.removeprefix(_PEFT_PREFIX)
        kept = next((v for k, v in pattern.items() if k == module + ".lora_E" or k.startswith(module + ".lora_E.")),
                    None)
        want = sum(kept) if kept is not None else config.r
        if sa[0] != want:
            said = (f"rank_pattern keeps {want} of its {config.r} ranks" if kept is not None
                    else f"init_r is {config.r} and rank_pattern does not name it")
            raise CheckpointError(where, f"AdaLoRA factors of `{escape_name(mod)}` have rank {sa[0]} but "
                                         f"adapter_config.json's {said}", "factors and config from different adapters?")
        out.append(LoraFactor(module + ".weight", got["A"], got["B"], None, sa[0], adalora_scale(config, sa[0]),
                              e_name=got["E"]))
    from .peft_tokens import token_factors

    return out + token_factors(tensors, where, config, set(parts))


def _foreign_part(name: str) -> str | None:
    """What ``name`` is when it is a LoHa, LoKr, VeRA, OFT, BOFT, trainable-tokens or LN tuning tensor (refused under
    another method's config): "LyCORIS (LoHa/LoKr)" for ``<m>.hada_w1_a``, ``<m>.lokr_w2``..., "VeRA" for
    ``<m>.vera_lambda_b`` and the shared ``vera_A``, "OFT" for ``<m>.oft_R.weight``, "LN tuning" for
    ``<m>.ln_tuning_layers.weight``; else None."""
    if "hada_" in name or "lokr_" in name:
        from .peft_lycoris import _PART_RE

        return "LyCORIS (LoHa/LoKr)" if _PART_RE.match(name) else None
    if "vera_" in name:
        from .peft_vera import _LAMBDA_RE, _SHARED_RE

        return "VeRA" if _LAMBDA_RE.match(name) or _SHARED_RE.match(name) else None
    if ".oft_" in name:
        from .peft_oft import _OFT_RE

        return "OFT" if _OFT_RE.match(name) else None
    if ".boft_" in name:
        from .peft_boft import _BOFT_RE

        return "BOFT" if _BOFT_RE.match(name) else None
    if name.endswith(".trainable_tokens_delta"):
        from .peft_tokens import is_token_delta

        return "trainable tokens" if is_token_delta(name) else None
    if "vblora_" in name:
        from .peft_vblora import is_vblora

        return "VBLoRA" if is_vblora(name) else None
    if name.endswith(".hra_u"):
        from .peft_hra import is_hra

        return "HRA" if is_hra(name) else None
    if ".ln_tuning_layers." in name:
        from .peft_ln import ln_target

        return "LN tuning" if ln_target(name) else None
    if name.endswith(".fourierft_spectrum"):
        from .peft_fourierft import is_fourierft

        return "FourierFT" if is_fourierft(name) else None
    if ".delora_" in name:
        from .peft_delora import is_delora

        return "DeLoRA" if is_delora(name) else None
    return None


def own_tensors(tensors: dict[str, TensorInfo], where: Path, pattern: re.Pattern, suffix: str, label: str,
                own: str, peft_type: str):
    """(name, info, match) of each tensor of a one-tensor-per-module method (HRA's ``hra_u``, FourierFT's
    ``fourierft_spectrum``: names ending ``suffix`` that ``pattern`` matches); the others go through
    ``refuse_other_method``."""
    for name, info in tensors.items():
        m = pattern.match(name) if name.endswith(suffix) else None
        if m is None:
            refuse_other_method(name, where, label, own, peft_type)
            continue
        yield name, info, m


def module_parts(tensors: dict[str, TensorInfo], where: Path, pattern: re.Pattern, marker: str, part: str, label: str,
                 own: str, peft_type: str) -> dict[str, dict[str, str]]:
    """module -> {part: tensor name} of a method of several tensors per module (BOFT's boft_R and boft_s, DeLoRA's
    four): the names holding ``marker`` that ``pattern`` matches (groups ``mod`` and ``part``); the others go through
    ``refuse_other_method``."""
    parts: dict[str, dict[str, str]] = {}
    for name in tensors:
        m = pattern.match(name) if marker in name else None
        if m is None:
            refuse_other_method(name, where, label, own, peft_type)
            continue
        parts.setdefault(m["mod"], {})[m[part]] = name
    return parts


def float_base_shape(label: str, layers: str, factor, base: TensorInfo, where: Path) -> tuple:
    """The shape of a base weight a method builds only on float layers (HRA, FourierFT: ``layers`` names them);
    a quantized or non-float one refused."""
    if getattr(base, "quant", None) is not None or getattr(base, "scheme", None) is not None or not _is_float(base):
        raise CheckpointError(where, f"{label} module `{escape_name(factor.target)}`: the base weight is quantized or "
                                     f"not float ({base.dtype}); PEFT's {label} builds on float {layers} layers",
                              "compare against the base's float weights")
    return tuple(int(d) for d in base.shape)


def refuse_other_method(name: str, where: Path, label: str, own: str, peft_type: str) -> None:
    """Refuse ``name`` when it is another PEFT method's tensor (LoRA's, IA3's, ``_foreign_part``'s) in an adapter
    whose config says ``peft_type`` (``label``'s tensors are called ``own``): PEFT would not load it."""
    if (".ia3_l" in name and _IA3_RE.match(name)) or _LORA_RE.match(name) or _foreign_part(name):
        raise CheckpointError(where, f"adapter holds `{escape_name(name)}`, which is not {label}'s ({own}), but "
                                     f"adapter_config.json says peft_type {peft_type}",
                              "tensors and config from different adapters?")


#: peft_type -> (the module of weightdiff.io that reads that method's tensors, its reader), imported when such an
#: adapter is read
_FACTOR_READERS = {"LOHA": ("peft_lycoris", "lycoris_factors"), "LOKR": ("peft_lycoris", "lycoris_factors"),
                   "VERA": ("peft_vera", "vera_factors"), "OFT": ("peft_oft", "oft_factors"),
                   "BOFT": ("peft_boft", "boft_factors"), "HRA": ("peft_hra", "hra_factors"),
                   "VBLORA": ("peft_vblora", "vblora_factors"), "FOURIERFT": ("peft_fourierft", "fourierft_factors"),
                   "DELORA": ("peft_delora", "delora_factors")}


def lora_factors(tensors: dict[str, TensorInfo], where: Path, config: AdapterConfig) -> list[LoraFactor]:
    """The A/B (and DoRA magnitude) tensors of each adapted module, paired and checked (AdaLoRA's with E)."""
    if config.source == "mlx-lm":
        from .mlx_adapter import mlx_factors

        return mlx_factors(tensors, where, config)
    if config.peft_type == "ADALORA":
        return _adalora_factors(tensors, where, config)
    if config.peft_type in _FACTOR_READERS:
        module, func = _FACTOR_READERS[config.peft_type]
        return getattr(import_module(f"{__package__}.{module}"), func)(tensors, where, config)
    from .peft_tokens import is_token_delta, token_factors

    if config.peft_type == "TRAINABLE_TOKENS":
        for name in tensors:
            if _LORA_RE.match(name) or (_foreign_part(name) and not is_token_delta(name)) or \
                    (".ia3_l" in name and _IA3_RE.match(name)):
                raise CheckpointError(where, f"adapter holds `{escape_name(name)}`, which is not a trainable tokens "
                                             "tensor, but adapter_config.json says peft_type TRAINABLE_TOKENS",
                                      "tensors and config from different adapters?")
        return token_factors(tensors, where, config)
    parts: dict[str, dict[str, str]] = {}
    for name in tensors:
        m = _LORA_RE.match(name)
        if m:
            key = m["ab"] or (f"E{m['eab']}" if m["eab"] else "M")
            parts.setdefault(m["mod"], {})[key] = name
        elif ".ia3_l" in name and _IA3_RE.match(name):
            raise CheckpointError(where, f"adapter holds IA3 vectors (`{escape_name(name)}`) but adapter_config.json "
                                         "says peft_type LORA", "vectors and config from different adapters?")
        elif _foreign_part(name) and not is_token_delta(name):
            # PEFT would load none of them into a LoRA model: read as tensors added, they made a LoHa adapter
            # under a LoRA config a confident "derived"
            raise CheckpointError(where, f"adapter holds {_foreign_part(name)} factors (`{escape_name(name)}`) but "
                                         "adapter_config.json says peft_type LORA",
                                  "factors and config from different adapters?")
    out = []
    if config.target_parameters:
        from .peft_params import param_factors

        out, parts = param_factors(parts, tensors, where, config)
    for mod, got in parts.items():
        emb = "EA" in got or "EB" in got
        a, b = (got.get("EA"), got.get("EB")) if emb else (got.get("A"), got.get("B"))
        if a is None or b is None:
            raise CheckpointError(where, f"LoRA module `{escape_name(mod)}` has only one of its A/B factors")
        sa, sb = tensors[a].shape, tensors[b].shape
        conv = len(sa) == 4 and len(sb) == 4 and not emb and tuple(sb[2:]) == (1, 1)
        if not ((len(sa) == 2 and len(sb) == 2) or conv) or sb[1] != sa[0]:
            raise CheckpointError(where, f"LoRA factors of `{escape_name(mod)}` do not chain: "
                                         f"A is {list(sa)}, B is {list(sb)} (expected A [r, in], B [out, r])")
        mag, ignored = got.get("M"), None
        if mag is not None and not config.use_dora:
            mag, ignored = None, mag            # PEFT builds a plain LoRA layer and drops the magnitude
        if mag is not None and emb:
            # PEFT's DoRA on an nn.Embedding keeps one magnitude per embedding dimension and normalises the other
            # way: read as a linear layer's, it was refused as a magnitude of the wrong size (a corrupt file?)
            raise CheckpointError(where, f"LoRA module `{escape_name(mod)}` is DoRA on an embedding (use_dora with "
                                         "lora_embedding_A/B), which weightdiff does not read", _MERGE_HINT)
        for n in (a, b, mag):
            if n is not None and not _is_float(tensors[n]):
                raise CheckpointError(where, f"LoRA tensor `{escape_name(n)}` is {tensors[n].dtype}; expected a "
                                             "float dtype")
        module = mod.removeprefix(_PEFT_PREFIX)
        r = int(sa[0])
        if r == 0:
            raise CheckpointError(where, f"LoRA factors of `{escape_name(mod)}` have rank 0")
        want = config.pattern("rank_pattern", module, config.r)
        if r != want and config.source == "peft":     # a llama.cpp adapter's rank is each module's own
            raise CheckpointError(where, f"LoRA factors of `{escape_name(mod)}` have rank {r} but "
                                         f"adapter_config.json gives r = {want} for this module",
                                  "factors and config from different adapters?")
        alpha = float(config.pattern("alpha_pattern", module, config.lora_alpha))
        saved = f"{mod}.base_layer.weight"
        if saved in tensors and not _is_float(tensors[saved]):
            raise CheckpointError(where, f"base layer `{escape_name(saved)}` saved in the adapter is "
                                         f"{tensors[saved].dtype}; expected a float dtype")
        bias = f"{mod}.lora_B.bias"
        if bias not in tensors:
            bias = None
        elif config.raw.get("lora_bias") is not True:
            raise CheckpointError(where, f"LoRA tensor `{escape_name(bias)}` is in the adapter but adapter_config.json "
                                         "does not set lora_bias: true, so PEFT would not load it",
                                  "factors and config from different adapters?")
        elif emb or not _is_float(tensors[bias]) or tuple(tensors[bias].shape) != (int(sb[0]),):
            raise CheckpointError(where, f"LoRA bias `{escape_name(bias)}` is {tensors[bias].dtype} "
                                         f"{list(tensors[bias].shape)}; expected {int(sb[0])} floats, one per output "
                                         f"feature of `{escape_name(module)}`" + (" (PEFT has no lora_bias for "
                                                                                  "embeddings)" if emb else ""))
        out.append(LoraFactor(module + ".weight", a, b, mag, r, config.scale_for(alpha, r), emb,
                              base_layer_name=saved if saved in tensors else None, ignored_magnitude=ignored,
                              bias_name=bias))
    # a LoRA's trainable_token_indices: the rows it trains of the tables it names
    return out + token_factors(tensors, where, config, {f.a_name.rsplit(".lora_", 1)[0] for f in out})


#: what messages, notes and inspect call each peft_type weightdiff reads
KIND_LABELS = {"LORA": "LoRA", "ADALORA": "AdaLoRA", "LOHA": "LoHa", "LOKR": "LoKr", "VERA": "VeRA", "OFT": "OFT", "BOFT": "BOFT",
               "IA3": "IA3", "TOKENS": "trainable tokens", "TRAINABLE_TOKENS": "trainable tokens",
               "LN_TUNING": "LN tuning", "HRA": "HRA", "VBLORA": "VBLoRA", "FOURIERFT": "FourierFT",
               "DELORA": "DeLoRA"}

#: the dtypes an IA3 merge is reproduced in (torch's own promotion and casts among them)
_MERGE_DTYPES = ("F16", "BF16", "F32", "F64")
_IA3_RE = re.compile(r"^(?P<mod>.+)\.ia3_l(?:\.(?P<adapter>[^.]+))?\Z", re.S)


@dataclass
class IA3Vector:
    """One (IA)³ vector ``name`` of module ``<m>``: PEFT merges it as W x l into ``target`` (``<m>.weight``),
    l scaling the layer's inputs (``feedforward``: stored [1, in], or [1, in, 1, 1] for a convolution) or its
    outputs (stored [out, 1]; [1, out, 1, 1]); the bias of a layer whose outputs it scales becomes b x l.
    ``transposed``: a GPT-2 ``Conv1D`` weight stored [in, out]; ``groups``: a grouped convolution's (its input
    vector repeated for each group's outputs). Both set from the base's shapes (``check_ia3``)."""

    target: str
    name: str
    feedforward: bool
    size: int
    #: a convolution's vector: the dimensions of its weight (4: Conv2d, 5: Conv3d); 0 for a linear layer
    conv: int = 0
    transposed: bool = False
    groups: int = 1
    #: ``<m>.base_layer.weight`` saved in the adapter (PEFT's ``save_embedding_layers``, as for an IA3 on
    #: ``lm_head``): PEFT loads it over the base's weight, so the vector scales that copy
    base_layer_name: str | None = None

    @property
    def bias_target(self) -> str:
        return self.target.removesuffix(".weight") + ".bias"

    @property
    def scales(self) -> str:
        return "inputs" if self.feedforward else "outputs"


def ia3_vectors(tensors: dict[str, TensorInfo], where: Path, config: AdapterConfig) -> list[IA3Vector]:
    """The (IA)³ vectors of an IA3 adapter's tensors, each with the side of its layer it scales: from its
    shape ([1, n] scales inputs, [n, 1] outputs) where that tells, from ``feedforward_modules`` for a
    convolution's [1, n, 1, 1]; a shape the config contradicts is refused (PEFT would not load it)."""
    out = []
    for name, info in tensors.items():
        m = _IA3_RE.match(name)
        if m is None:
            if _LORA_RE.match(name) or _foreign_part(name):
                # PEFT would load none of them into an IA3 model (unexpected keys), nor its vectors from them
                what = "LoRA" if _LORA_RE.match(name) else _foreign_part(name)
                raise CheckpointError(where, f"adapter holds {what} factors (`{escape_name(name)}`) but "
                                             "adapter_config.json says peft_type IA3",
                                      "factors and config from different adapters?")
            continue
        mod = m["mod"]
        module = mod.removeprefix(_PEFT_PREFIX)
        shape = tuple(int(d) for d in info.shape)
        t = f"IA3 vector `{escape_name(name)}`"
        if info.dtype not in _MERGE_DTYPES:
            raise CheckpointError(where, f"{t} is {info.dtype}; expected float16, bfloat16, float32 or float64")
        said = config.is_feedforward(module)
        conv = len(shape) in (4, 5) and shape[0] == 1 and all(d == 1 for d in shape[2:])
        if conv:
            if said is None:
                raise CheckpointError(where, f"{t} is {list(shape)}, a convolution's, and adapter_config.json has "
                                             "no feedforward_modules to say whether it scales the layer's inputs or "
                                             "outputs")
            ff, size = said, shape[1]
        elif len(shape) == 2 and 1 in shape:
            by_shape = None if shape == (1, 1) else shape[0] == 1
            if said is not None and by_shape is not None and said != by_shape:
                listed = "lists" if said else "does not list"
                raise CheckpointError(where, f"{t} is {list(shape)}, as PEFT stores a module that scales its "
                                             f"{'inputs' if by_shape else 'outputs'}, but feedforward_modules "
                                             f"{listed} `{escape_name(module)}`",
                                      "vectors and config from different adapters?")
            ff, size = (said if by_shape is None else by_shape) or False, shape[0] * shape[1]
        else:
            raise CheckpointError(where, f"{t} is {list(shape)}; PEFT stores [1, in] or [out, 1] for a linear "
                                         "layer, [1, channels, 1, 1] for a convolution")
        if size == 0:
            raise CheckpointError(where, f"{t} is {list(shape)}: it has no values")
        saved = f"{mod}.base_layer.weight"
        if saved in tensors and tensors[saved].dtype not in _MERGE_DTYPES:
            raise CheckpointError(where, f"base layer `{escape_name(saved)}` saved in the adapter is "
                                         f"{tensors[saved].dtype}; expected float16, bfloat16, float32 or float64")
        out.append(IA3Vector(module + ".weight", name, bool(ff), size, conv=len(shape) if conv else 0,
                             base_layer_name=saved if saved in tensors else None))
    if not out:
        # loaded by PEFT, every vector would keep its initial ones: the base, whatever else the file holds
        raise CheckpointError(where, f"IA3 adapter holds no IA3 vectors (`<module>.ia3_l`) among its "
                                     f"{len(tensors):,} tensors: there is no change of the base to measure",
                              "is adapter_config.json this adapter's?")
    return out


def check_ia3(vector: IA3Vector, base: TensorInfo, where: Path, layout: str | None,
              saved: TensorInfo | None = None) -> None:
    """Check that ``vector`` fits the base weight ``base`` (headers only) and set its orientation: a linear
    layer [out, in] (GPT-2's ``Conv1D``: [in, out], ``layout`` "conv1d" or, with no evidence, a square weight
    under ``fan_in_fan_out``), a convolution [out, in / groups, k...]. ``saved``: the base layer the adapter
    saves (``vector.base_layer_name``), which must be the base weight's shape."""
    shape = tuple(int(d) for d in base.shape)
    t, v = f"`{escape_name(vector.target)}`", vector.size
    if saved is not None and tuple(int(d) for d in saved.shape) != shape:
        # a resized table (LoRA's copies of another shape are merged and compared as resized; not IA3's yet)
        raise CheckpointError(where, f"base layer `{escape_name(vector.base_layer_name)}` saved in the adapter is "
                                     f"{list(saved.shape)} but the base weight {t} is {list(shape)}",
                              "merge the adapter (merge_and_unload) and compare the merged model")
    ok = False
    if vector.conv:
        if len(shape) == vector.conv:
            if not vector.feedforward:
                ok = shape[0] == v
            elif shape[1] and v % shape[1] == 0:
                groups = v // shape[1]
                ok = groups >= 1 and shape[0] % groups == 0
                vector.groups = groups
    elif len(shape) == 2:
        normal, flipped = _ia3_fits(vector, shape)
        vector.transposed = flipped and (layout == "conv1d" or not normal)
        ok = normal or flipped
    if not ok:
        raise CheckpointError(where, f"IA3 vector `{escape_name(vector.name)}` ({v} values scaling the layer's "
                                     f"{vector.scales}) does not fit the base weight {t}, which is {list(shape)}",
                              "is this adapter for another base model?")


def ia3_layout(vector: IA3Vector, base: TensorInfo) -> str | None:
    """What a 2-D vector and its base weight's shape say of the module: ``linear``, ``conv1d`` (GPT-2's Conv1D,
    [in, out]), None (square, or not a linear layer)."""
    shape = tuple(int(d) for d in base.shape)
    if vector.conv or len(shape) != 2:
        return None
    normal, flipped = _ia3_fits(vector, shape)
    return "linear" if normal and not flipped else "conv1d" if flipped and not normal else None


def _ia3_fits(vector: IA3Vector, shape: tuple) -> tuple[bool, bool]:
    """Whether a 2-D weight of ``shape`` fits the vector as a linear layer's [out, in] and as a Conv1D's [in, out]."""
    axis = 1 if vector.feedforward else 0
    return shape[axis] == vector.size, shape[1 - axis] == vector.size


def layout_evidence(factor: LoraFactor, tensors: dict[str, TensorInfo], base: TensorInfo) -> str | None:
    """What a plain 2-D factor pair's shapes say of its module: ``linear`` (B @ A is [out, in] as the base weight
    and only so), ``conv1d`` (only transposed: GPT-2's Conv1D), None (square, or not a plain pair)."""
    if factor.kind == "VERA":
        from .peft_vera import vera_layout

        return vera_layout(factor, tensors, base)
    if factor.embedding or factor.base_layer_name is not None or factor.parts or factor.param is not None or factor.mlx:
        return None
    sa, sb, shape = tuple(tensors[factor.a_name].shape), tuple(tensors[factor.b_name].shape), tuple(base.shape)
    if len(sa) != 2 or len(sb) != 2 or len(shape) != 2:
        return None
    normal, flipped = shape == (sb[0], sa[1]), shape == (sa[1], sb[0])
    return "linear" if normal and not flipped else "conv1d" if flipped and not normal else None


#: LoraFactor.kind -> (the module of weightdiff.io that checks such a module against its base weight, the check), called
#: (factor, tensors, base, config, where)
_BASE_CHECKS = {"OFT": ("peft_oft", "check_oft"), "BOFT": ("peft_boft", "check_boft"), "HRA": ("peft_hra", "check_hra"),
                "VBLORA": ("peft_vblora", "check_vblora"), "FOURIERFT": ("peft_fourierft", "check_fourierft"),
                "DELORA": ("peft_delora", "check_delora")}


def check_against_base(factor: LoraFactor, tensors: dict[str, TensorInfo], base: TensorInfo,
                       config: AdapterConfig | None, where: Path, layout: str | None = None) -> None:
    """Check that ``factor`` fits the base weight ``base`` (headers only) and set its orientation.

    Linear: B @ A is [out, in] as the base weight; GPT-2 ``Conv1D`` (``fan_in_fan_out``)
    stores [in, out], so the delta is transposed; embeddings store A [r, vocab],
    B [dim, r] and the delta is (B @ A).T. A DoRA magnitude has one value per output
    feature. Anything else is a CheckpointError naming the adapter file.
    """
    if factor.mlx is not None:
        from .mlx_adapter import check_mlx

        return check_mlx(factor, tensors, base, where)
    if factor.param is not None:
        from .peft_params import check_param

        return check_param(factor, tensors, base, where)
    if factor.kind == "VERA":
        from .peft_vera import check_vera

        return check_vera(factor, tensors, base, config, where, layout)
    if factor.kind in _BASE_CHECKS:
        module, func = _BASE_CHECKS[factor.kind]
        return getattr(import_module(f"{__package__}.{module}"), func)(factor, tensors, base, config, where)
    if factor.kind == "TOKENS":
        from .peft_tokens import check_tokens

        return check_tokens(factor, tensors, base, getattr(base, "quant", None) is not None or getattr(base, "scheme", None) is not None
                            or not _is_float(base),
                            where)
    if factor.parts:
        from .peft_lycoris import check_lycoris

        return check_lycoris(factor, tensors, base, config, where)
    sa, sb, shape = tuple(tensors[factor.a_name].shape), tuple(tensors[factor.b_name].shape), tuple(base.shape)
    t = f"`{escape_name(factor.target)}`"
    if factor.base_layer_name is not None:
        # PEFT loads the base layer saved in the adapter over the base's weight: the factors apply to it
        shape = saved_layer_shape(factor, tensors, shape, where)
        base = tensors[factor.base_layer_name]
    if factor.embedding:
        ok, rows = shape == (sa[1], sb[0]), sa[1]
    elif len(sa) == 4:
        ok, rows = shape == (sb[0], *sa[1:]), sb[0]
    else:
        normal, flipped = shape == (sb[0], sa[1]), shape == (sa[1], sb[0])
        # PEFT applies fan_in_fan_out by the module's type, not by the flag (it warns and resets the flag for an
        # nn.Linear, and sets it for a Conv1D): the other factors' shapes say which the model has; the flag
        # decides only when none does (every target square)
        prefer = layout == "conv1d" if layout is not None else bool(config and config.fan_in_fan_out)
        factor.transposed = flipped and (prefer or not normal)
        ok, rows = normal or flipped, sb[0]
        if factor.transposed and _bits(base) < 8:       # packed F4/F6 cannot be transposed by rows
            ok = False
    if not ok:
        what = ("the base layer saved in the adapter" if factor.base_layer_name is not None else "the base weight")
        raise CheckpointError(where, f"LoRA factors of {t} (A {list(sa)}, B {list(sb)}) do not fit {what}, "
                                     f"which is {list(shape)}", "is this adapter for another base model?")
    if factor.magnitude_name is not None:
        m = tensors[factor.magnitude_name]
        if m.numel != rows or len([d for d in m.shape if d != 1]) > 1:
            raise CheckpointError(where, f"DoRA magnitude `{escape_name(factor.magnitude_name)}` is "
                                         f"{list(m.shape)}; expected {rows} values, one per output feature of {t}")


def saved_layer_shape(factor: LoraFactor, tensors: dict[str, TensorInfo], shape: tuple, where: Path) -> tuple:
    """The shape of the weight the adapter's module applies to: the base layer it saves, which PEFT loads over the
    base's weight and which must be the base's shape or its table with rows added or cut (a resize), else ``shape``."""
    if factor.base_layer_name is None:
        return tuple(shape)
    saved = tuple(int(d) for d in tensors[factor.base_layer_name].shape)
    if saved != tuple(shape) and not (len(saved) == len(shape) == 2 and saved[1:] == tuple(shape)[1:]):
        raise CheckpointError(where, f"base layer `{escape_name(factor.base_layer_name)}` saved in the adapter "
                              f"is {list(saved)} but the base weight `{escape_name(factor.target)}` is {list(shape)}",
                              "is this adapter for another base model?")
    return saved


def _bits(info: TensorInfo) -> int:
    from ..kernels.dtypes import DTYPES

    return DTYPES[info.dtype].bits


def factor_pair(factor: LoraFactor, values: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(A [k, in], B [out, k]) in float64 of a LoHa, LoKr or VeRA module from its tensors' values (role ->
    values in their saved shapes): its delta is ``factor.scale`` x B @ A."""
    if factor.kind == "VERA":
        from .peft_vera import vera_product

        return vera_product(factor, values)
    if factor.kind == "VBLORA":
        from .peft_vblora import vblora_product

        return vblora_product(factor, values, factor.r_topk)
    if factor.kind == "FOURIERFT":
        from .peft_fourierft import fourierft_pair

        return fourierft_pair(factor, values)
    if factor.kind == "DELORA":
        from .peft_delora import delora_product

        return delora_product(factor, values)
    from .peft_lycoris import lycoris_product

    return lycoris_product(factor.kind, values)


def factor_note(factor: LoraFactor, a: np.ndarray, b: np.ndarray) -> str:
    """The record note of a LoHa, LoKr or VeRA module measured from its factor pair (A [k, in], B [out, k])."""
    if factor.kind == "VERA":
        shared = (f"the shared projections `{factor.parts['vera_B']}` and `{factor.parts['vera_A']}`"
                  if "vera_A" in factor.parts else
                  f"the shared projections drawn again from projection_prng_key {factor.shared[2]} with torch's "
                  "generator, as PEFT draws them when it loads an adapter saved without them")
        return (f"VeRA adapter (r={factor.r}) analysed exactly from its factors: (vera_lambda_b x vera_B) @ "
                f"(vera_lambda_d x vera_A), {shared}, cut to the layer's {b.shape[0]} outputs and {a.shape[1]} "
                "inputs (its rank is at most r)")
    if factor.kind == "VBLORA":
        from .peft_vblora import vblora_note

        return vblora_note(factor, a.shape[0])
    if factor.kind == "FOURIERFT":
        from .peft_fourierft import fourierft_note

        return fourierft_note(factor)
    if factor.kind == "DELORA":
        from .peft_delora import delora_note

        return delora_note(factor)
    from .peft_lycoris import lycoris_note

    return lycoris_note(factor, a.shape[0])


def check_factor_values(factor: LoraFactor, arrays: dict[str, np.ndarray], where: Path,
                        pair: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """Refuse factors LAPACK cannot take: NaN/Inf values, or a delta whose norms overflow.

    ``arrays`` maps tensor names to their decoded float64 values (a LoHa/LoKr/VeRA module's in their saved
    shapes); ``pair``: a LoHa/LoKr/VeRA module's factor pair (A, B) when the caller has built it already.
    """
    with np.errstate(all="ignore"):
        for name, x in arrays.items():
            if not np.isfinite(x).all():
                raise CheckpointError(where, f"{factor.label} tensor `{escape_name(name)}` holds "
                                             f"NaN or Inf values, so the delta of `{escape_name(factor.target)}` "
                                             "cannot be measured")
        if factor.kind in ("OFT", "BOFT", "TOKENS"):    # rotations (check_oft_values, check_boft_values), rows
            return
        if factor.kind == "FOURIERFT":  # a spectrum: the change's norm bounded by Parseval, no factors formed
            from .peft_fourierft import check_fourierft_values

            return check_fourierft_values(factor, arrays[factor.parts["spectrum"]], where, _DELTA_CAP)
        if factor.kind == "HRA":        # reflections: unit vectors, W (H - I) at most 2 |W|
            from .peft_hra import check_hra_values

            return check_hra_values(factor, arrays[factor.parts["hra_u"]], where, factor.apply_gs)
        if factor.kind == "VBLORA":     # a top-k that PEFT picks one way, indices of the bank
            from .peft_vblora import check_vblora_values

            check_vblora_values(factor, {role: arrays[n] for role, n in factor.parts.items()}, where, factor.r_topk)
        if factor.parts:                # LoHa / LoKr / VeRA / VBLoRA: the factor pair their tensors make
            a, b = pair if pair is not None else \
                factor_pair(factor, {role: arrays[n] for role, n in factor.parts.items()})
        else:
            a, b = arrays[factor.a_name], arrays[factor.b_name]
        if factor.e_name is not None and factor.e_name in arrays:      # AdaLoRA's A * E
            a = np.asarray(a, np.float64).reshape(arrays[factor.e_name].size, -1) * \
                np.asarray(arrays[factor.e_name], np.float64).reshape(-1, 1)
        bound = abs(factor.scale) * float(np.linalg.norm(a)) * float(np.linalg.norm(b))
    if not math.isfinite(bound) or bound > _DELTA_CAP:
        alpha = "lora_parameters.scale" if factor.mlx else {"VERA": "the vectors", "LORA": "lora_alpha"}.get(factor.kind,
                                                                                                           "alpha")
        raise CheckpointError(where, f"{factor.label} delta of `{escape_name(factor.target)}` is "
                                     f"too large to measure: |scale| x |A| x |B| = {bound:.3g} with scale "
                                     f"{factor.scale:.3g}", f"check {alpha} in adapter_config.json" if alpha != "the vectors" else "check the vectors")
