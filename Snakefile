# On-policy distillation study: table of contents. Logic lives in src/opd; each rule calls one module.
from snakemake.utils import min_version

min_version("9.0")


# The default study, unless config files are named on the command line: then only those are read (in
# order, later ones overriding), so a full config such as config/paper.yaml is never mixed with the miniature one.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/diagnose.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        all_outputs(),
    default_target: True
