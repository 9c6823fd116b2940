# lm-eval on every (model, benchmark), with the backend and settings of the evaluation block.


rule lm_eval:
    input:
        unpack(task_inputs),
        model=lambda wc: model_file(wc.model),
    output:
        json="results/eval/{model}/{task}.json",
        samples="results/eval/{model}/{task}.samples.jsonl",
    params:
        args=eval_args,
        model_dir=lambda wc: model_dir(wc.model),
    threads: THREADS
    resources:
        mem_mb=RES["eval"]["mem_mb"],
        runtime=RES["eval"]["runtime"],
        gpu=RES["eval"]["gpu"],
    conda:
        ENV_EVAL
    log:
        "results/logs/lm_eval/{model}/{task}.log",
    benchmark:
        "results/benchmarks/lm_eval/{model}/{task}.tsv"
    shell:
        "python -m opd.evaluate --model-dir {params.model_dir} --model-name {wildcards.model}"
        " --tasks {wildcards.task} --out-dir results/eval/{wildcards.model}"
        " {params.args} --threads {threads} --study $OPD_STUDY > {log} 2>&1"
