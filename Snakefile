# On-policy distillation study: table of contents. Logic lives in src/opd; each rule calls one module.
from snakemake.utils import min_version

min_version("9.0")


# `snakemake --report <results>/report.html`: the tables and figures marked report() in the rules.
report: "workflow/report/workflow.rst"


# The default study, unless config files are named on the command line: then only those are read (in
# order, later ones overriding), so a full config such as config/paper.yaml is never mixed with the miniature one.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
# The world's own data rules (config world.name): miniature problems + tokenizer, or DAPO-Math prompts.
include: f"workflow/rules/worlds/{WORLD.name}.smk"
include: "workflow/rules/models.smk"


wildcard_constraints:
    model="|".join(MODELS),
    task="|".join(BENCHMARKS),
    teacher="|".join(MODELS),
    student="|".join(MODELS),
    method="|".join(re.escape(m) for m in TRAIN["methods"]),
    k=r"\d+",
    ratio=r"[0-9.e-]+",
    seed=r"\d+",
    eseed=r"[1-9]\d*",  # evaluation seeds > 0 (seed 0 is the plain evaluation's files)


include: "workflow/rules/diagnose.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        all_outputs(),
