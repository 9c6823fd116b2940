"""The miniature world's own config checks: models it can build as asked, before any job runs.

`opd.worlds.config_problems` calls `config_problems` through the world's `config_check` field, so the generic
validator never imports this package. Each problem names the config key.
"""

from __future__ import annotations

from opd.worlds.miniature.generator import IN_DOMAIN, OUT_OF_DOMAIN


def n_params(model: dict, vocab_size: int) -> int:
    """Parameters of a miniature Qwen3 model from its config block (tied embeddings, RMS norms included)."""
    h, heads, kv = model["hidden_size"], model["heads"], model["kv_heads"]
    head_dim = model.get("head_dim") or h // heads
    attention = h * head_dim * (2 * heads + 2 * kv) + 2 * head_dim  # q, k, v, o and the q/k norms
    mlp = 3 * h * model["intermediate_size"]
    return vocab_size * h + model["layers"] * (attention + mlp + 2 * h) + h


def _size_problems(models: dict, vocab_size: int) -> list[str]:
    """A miniature student as large as (or larger than) the teacher: it would not be the weaker model."""
    built = {n: m for n, m in models.items() if not m.get("hub")}
    teachers = [n for n, m in built.items() if m.get("role") == "teacher"]
    if len(teachers) != 1:
        return []  # the generic pair checks report a missing or doubled teacher
    teacher = teachers[0]
    limit = n_params(built[teacher], vocab_size)
    return [f"models.{name}: {n_params(m, vocab_size):,} parameters, not fewer than the teacher {teacher!r} "
            f"({limit:,}); a student must be smaller than its teacher"
            for name, m in built.items() if m.get("role") == "student" and n_params(m, vocab_size) >= limit]


def config_problems(config: dict) -> list[str]:
    """Chain lengths the generator cannot produce, students larger than the teacher, no out-of-domain task."""
    models = config.get("models", {})
    problems = [f"models.{name}.max_chain: {m['max_chain']} operations; the generator's longest chain is "
                f"{len(IN_DOMAIN)} ({IN_DOMAIN[-1]})"
                for name, m in models.items() if (m.get("max_chain") or 0) > len(IN_DOMAIN)]
    problems += _size_problems(models, config.get("world", {}).get("vocab_size", 512))
    evaluation = config.get("evaluation", {})
    benchmarks = evaluation.get("benchmarks", [])
    ood = [t for t in evaluation.get("ood_benchmarks", OUT_OF_DOMAIN) if t in benchmarks]
    if not any(t in OUT_OF_DOMAIN for t in ood):
        problems.append(f"evaluation.benchmarks: no out-of-domain task ({', '.join(OUT_OF_DOMAIN)}) in "
                        f"{benchmarks}; the study measures what distillation on arithmetic does to it")
    return problems
