# A rule whose GPU request no node of its partition can meet (tests/test_slurm.py): SLURM refuses the job
# at submission, and snakemake must report the rule with SLURM's message.


rule needs_gpus:
    output:
        "needs_gpus.done",
    resources:
        mem_mb=200,
        runtime=5,
        gpu=4,
        slurm_partition="cpu",
    shell:
        "touch {output}"
