# On-policy distillation of every (student, method, K, ratio, seed), and lm-eval of each final student.


rule train_opd:
    input:
        student="results/models/{student}/model.safetensors",
        teacher=f"results/models/{TEACHER}/model.safetensors",
        prompts=rules.toy_data.output.prompts,
    output:
        model=f"{TRAIN_DIR}/model/model.safetensors",
        metrics=f"{TRAIN_DIR}/metrics.json",
    params:
        args=train_args,
        out_dir=lambda wc, output: os.path.dirname(output.metrics),
        student_dir=lambda wc, input: os.path.dirname(input.student),
        teacher_dir=lambda wc, input: os.path.dirname(input.teacher),
        study=STUDY,
    threads: THREADS
    resources:
        mem_mb=4000,
        runtime=120,
        gpu=0,
    log:
        f"results/logs/train/{TRAIN_ID}.log",
    benchmark:
        f"results/benchmarks/train/{TRAIN_ID}.tsv"
    shell:
        "python -m opd.train --student {params.student_dir} --teacher {params.teacher_dir}"
        " --prompts {input.prompts} --out-dir {params.out_dir} --method {wildcards.method}"
        " --top-k {wildcards.k} --ratio {wildcards.ratio} --seed {wildcards.seed} {params.args}"
        " --threads {threads} --restart-if-flags-changed --name {wildcards.student}/{wildcards.method}/K~{wildcards.k}/ratio~{wildcards.ratio}/seed~{wildcards.seed}"
        " --study {params.study} > {log} 2>&1"


rule eval_trained:
    input:
        model=rules.train_opd.output.model,
        metrics=rules.train_opd.output.metrics,
        data=expand("results/data/{task}.jsonl", task=BENCHMARKS),
    output:
        expand(f"{TRAIN_DIR}/eval/{{task}}.json", task=BENCHMARKS, allow_missing=True),
    params:
        args=eval_args,
        train_dir=lambda wc, input: os.path.dirname(input.metrics),
        tasks=" ".join(BENCHMARKS),
        tasks_dir=TASKS_DIR,
        study=STUDY,
    threads: THREADS
    resources:
        mem_mb=4000,
        runtime=30,
    log:
        f"results/logs/eval_trained/{TRAIN_ID}.log",
    benchmark:
        f"results/benchmarks/eval_trained/{TRAIN_ID}.tsv"
    shell:
        "python -m opd.evaluate --model-dir {params.train_dir}/model --model-name"
        " {wildcards.student}/{wildcards.method}/K~{wildcards.k}/ratio~{wildcards.ratio}/seed~{wildcards.seed}"
        " --tasks {params.tasks} --include-path {params.tasks_dir} --out-dir {params.train_dir}/eval"
        " --train-dir {params.train_dir} {params.args} --threads {threads} --study {params.study} > {log} 2>&1"
