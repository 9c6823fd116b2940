# The paper world's training prompts: DAPO-Math-17k, deduplicated (opd.worlds.paper.dapo).


rule dapo_data:
    output:
        prompts=PROMPTS,
        stats=res("data/train_prompts.stats.json"),
    log:
        res("logs/dapo_data.log"),
    conda:
        ENV_CORE
    params:
        args=dapo_args,
    shell:
        "python -m opd.worlds.paper.dapo {params.args} --out {output.prompts} --stats {output.stats} > {log} 2>&1"
