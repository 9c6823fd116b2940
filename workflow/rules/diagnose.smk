# The diagnostic study on the initial students: rollout -> teacher scoring -> signals, release rule,
# fixed-context gain -> figures and tables.


rule rollout_initial:
    input:
        model="results/models/{model}/model.safetensors",
        prompts=rules.toy_data.output.prompts,
    output:
        "results/diagnose/{model}/rollouts.safetensors",
    params:
        args=rollout_args,
        model_dir=lambda wc: model_dir(wc.model),
        study=STUDY,
    threads: THREADS
    resources:
        mem_mb=4000,
        runtime=30,
    log:
        "results/logs/rollout/{model}.log",
    benchmark:
        "results/benchmarks/rollout/{model}.tsv"
    shell:
        "python -m opd.rollout --model-dir {params.model_dir} --prompts {input.prompts} --out {output}"
        " {params.args} --threads {threads} --name {wildcards.model} --study {params.study} > {log} 2>&1"


rule score_initial:
    input:
        rollouts=rules.rollout_initial.output,
        teacher=f"results/models/{TEACHER}/model.safetensors",
        student="results/models/{model}/model.safetensors",
    output:
        "results/diagnose/{model}/scores.safetensors",
    params:
        k=config["diagnose"]["top_k"],
        teacher_dir=lambda wc, input: os.path.dirname(input.teacher),
        student_dir=lambda wc, input: os.path.dirname(input.student),
        study=STUDY,
    threads: THREADS
    resources:
        mem_mb=4000,
        runtime=30,
    log:
        "results/logs/score/{model}.log",
    benchmark:
        "results/benchmarks/score/{model}.tsv"
    shell:
        "python -m opd.score --rollouts {input.rollouts} --teacher {params.teacher_dir}"
        " --student {params.student_dir} --out {output} --top-k {params.k} --threads {threads}"
        " --name {wildcards.model} --study {params.study} > {log} 2>&1"


rule fixed_context:
    input:
        rollouts=rules.rollout_initial.output,
        scores=rules.score_initial.output,
        teacher=f"results/models/{TEACHER}/model.safetensors",
        student="results/models/{model}/model.safetensors",
    output:
        "results/diagnose/{model}/fixed_context.csv",
    params:
        args=fixed_context_args,
        teacher_dir=lambda wc, input: os.path.dirname(input.teacher),
        student_dir=lambda wc, input: os.path.dirname(input.student),
        study=STUDY,
    threads: THREADS
    resources:
        mem_mb=4000,
        runtime=30,
    log:
        "results/logs/fixed_context/{model}.log",
    benchmark:
        "results/benchmarks/fixed_context/{model}.tsv"
    shell:
        "python -m opd.fixed_context --rollouts {input.rollouts} --scores {input.scores}"
        " --student {params.student_dir} --teacher {params.teacher_dir} --out {output} {params.args}"
        " --threads {threads} --name {wildcards.model} --study {params.study} > {log} 2>&1"


rule diagnose:
    input:
        rollouts=expand("results/diagnose/{model}/rollouts.safetensors", model=STUDENTS),
        scores=expand("results/diagnose/{model}/scores.safetensors", model=STUDENTS),
        fixed=expand("results/diagnose/{model}/fixed_context.csv", model=STUDENTS),
        tokenizer=rules.tokenizer.output,
    output:
        report="results/diagnose/report.md",
        summary="results/diagnose/summary.csv",
        fixed="results/diagnose/fixed_context.csv",
        figures=expand("results/diagnose/{fig}.png", fig=DIAGNOSE_FIGURES),
    params:
        args=diagnose_args,
        students=" ".join(STUDENTS),
        study=STUDY,
    log:
        "results/logs/diagnose.log",
    shell:
        "python -m opd.diagnose --students {params.students} --rollouts {input.rollouts}"
        " --scores {input.scores} --fixed-context {input.fixed} --tokenizer results/tokenizer"
        " --out-dir results/diagnose {params.args} --study {params.study} > {log} 2>&1"
