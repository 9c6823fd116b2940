# lm-eval on every (model, benchmark): hf backend, offline, local task YAMLs.


rule lm_eval:
    input:
        model="results/models/{model}/model.safetensors",
        data="results/data/{task}.jsonl",
        task_yaml=str(TASKS_DIR / "{task}.yaml"),
    output:
        json="results/eval/{model}/{task}.json",
        samples="results/eval/{model}/{task}.samples.jsonl",
    params:
        args=eval_args,
        model_dir=lambda wc: model_dir(wc.model),
        tasks_dir=TASKS_DIR,
    threads: THREADS
    resources:
        mem_mb=RES["eval"]["mem_mb"],
        runtime=RES["eval"]["runtime"],
        gpu=RES["eval"]["gpu"],
    log:
        "results/logs/lm_eval/{model}/{task}.log",
    benchmark:
        "results/benchmarks/lm_eval/{model}/{task}.tsv"
    shell:
        "python -m opd.evaluate --model-dir {params.model_dir} --model-name {wildcards.model}"
        " --tasks {wildcards.task} --include-path {params.tasks_dir} --out-dir results/eval/{wildcards.model}"
        " {params.args} --threads {threads} --study $OPD_STUDY > {log} 2>&1"
