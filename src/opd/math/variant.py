"""Where TA-OPD's paper and its official code differ: one table, and the switch that picks a column.

`signals.variant: paper | official` (config) or `--signal-variant` (opd.engines.train, opd.studies.fixed_context,
opd.studies.diagnose) sets every difference at once; each one can also be set on its own (config
`signals.<key>`, flag `--signal-<key>`) for ablations. A key set next to a variant overrides that variant's value,
and `resolve` says which keys were overridden so that a run can record it. docs/signals.md has the table in words.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

VARIANTS = ("paper", "official")

# key -> allowed values; "quantiles" is a (lo, hi) pair and "norm_eps" a number, checked in `_check`.
CHOICES: dict[str, tuple[str, ...]] = {
    "compatibility": ("exact", "topk"),  # C = Σ_{S_K} p_T, or its lower bound Σ_{S_K∩T_K} p_T
    "disagreement": ("exact", "topk"),  # D on U with every probability, or top-K only with the 1e-12 floor
    "entropy_divisor": ("log_k", "log_n"),  # H / log K, or / log n, n = finite positive top-K entries
    "precision": ("float32", "float64"),  # float64 also clips C to [0, 1]
    "normalisation": ("quantile", "none"),
    "norm_positions": ("valid", "response"),  # the quantiles' positions: selectable ones, or the whole response
    "ta_opd_ent": ("dnorm_cnorm", "norm_dc"),  # H̃ ⊕ D̃·C̃, or H̃ ⊕ Norm(D·C)
    "budget": ("paper", "official"),
    "random_stream": ("torch", "official"),  # torch.Generator(seed), or random.Random(42 + rollout counter)
    "aggregation": ("token_mean", "sequence_mean"),
    "gain": ("absolute", "relative"),  # the fixed-context diagnostic's headline gain
}
NUMERIC = ("quantiles", "norm_eps")
KEYS = tuple(CHOICES) + NUMERIC


@dataclass(frozen=True)
class SignalOptions:
    """Every paper/official difference, resolved (the defaults are the paper's)."""

    compatibility: str = "exact"
    disagreement: str = "exact"
    entropy_divisor: str = "log_k"
    precision: str = "float32"
    normalisation: str = "quantile"
    quantiles: tuple[float, float] = (0.05, 0.95)
    norm_eps: float = 1e-6
    norm_positions: str = "valid"
    ta_opd_ent: str = "dnorm_cnorm"
    budget: str = "paper"
    random_stream: str = "torch"
    aggregation: str = "token_mean"
    gain: str = "absolute"

    def as_dict(self) -> dict:
        d = asdict(self)
        d["quantiles"] = list(self.quantiles)
        return d


PAPER = SignalOptions()
OFFICIAL = SignalOptions(
    compatibility="topk", disagreement="topk", entropy_divisor="log_n", precision="float64", norm_eps=0.0,
    norm_positions="response", ta_opd_ent="norm_dc", budget="official", random_stream="official",
    aggregation="sequence_mean", gain="relative",
)
_TABLE = {"paper": PAPER, "official": OFFICIAL}


def _check(key: str, value) -> object:
    """The value of one key, validated (ValueError naming the key and what is allowed)."""
    if key in CHOICES:
        if value not in CHOICES[key]:
            raise ValueError(f"signals.{key}: unknown value {value!r}; allowed: {', '.join(CHOICES[key])}")
        return value
    if key == "norm_eps":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"signals.norm_eps: must be a number >= 0, got {value!r}")
        return float(value)
    if key == "quantiles":
        try:
            lo, hi = (float(v) for v in value)
        except (TypeError, ValueError):
            raise ValueError(f"signals.quantiles: must be a pair [lo, hi], got {value!r}") from None
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"signals.quantiles: need 0 <= lo < hi <= 1, got [{lo}, {hi}]")
        return (lo, hi)
    raise ValueError(f"unknown signals key {key!r}; allowed: variant, {', '.join(KEYS)}")


def resolve(variant: str = "paper", **overrides) -> tuple[SignalOptions, list[str]]:
    """(the variant's options with the non-None `overrides` applied, the keys that changed a variant value)."""
    if variant not in _TABLE:
        raise ValueError(f"signals.variant: unknown value {variant!r}; allowed: {', '.join(VARIANTS)}")
    base = _TABLE[variant].as_dict()
    values, overridden = dict(base), []
    for key, value in overrides.items():
        if value is None:
            continue
        values[key] = _check(key, value)
        if values[key] != _check(key, base[key]):
            overridden.append(key)
    values["quantiles"] = tuple(values["quantiles"])
    return SignalOptions(**values), overridden
