# The diagnostic study on the initial students: rollout -> teacher scoring -> signals, release rule,
# fixed-context gain -> figures and tables (results/report/<study>/diagnose/). Rollouts are per student,
# scores and fixed-context gains per (teacher, student) pair; all are shared between studies.


rule rollout_initial:
    input:
        model=lambda wc: model_file(wc.model),
        prompts=PROMPTS,
    output:
        res("diagnose/{model}/rollouts.safetensors"),
    log:
        res("logs/rollout/{model}.log"),
    benchmark:
        res("benchmarks/rollout/{model}.tsv")
    conda:
        ENV_ROLLOUT
    threads: THREADS
    resources:
        mem_mb=RES["diagnose"]["mem_mb"],
        runtime=RES["diagnose"]["runtime"],
        gpu=RES["diagnose"]["gpu"],
    params:
        args=rollout_args,
        model_dir=lambda wc: model_dir(wc.model),
    shell:
        "python -m opd.engines.rollout --model-dir {params.model_dir} --prompts {input.prompts} --out {output}"
        " {params.args} --threads {threads} --name {wildcards.model} --study $OPD_STUDY > {log} 2>&1"


rule score_initial:
    input:
        rollouts=res("diagnose/{student}/rollouts.safetensors"),
        teacher=lambda wc: model_file(wc.teacher),
        student=lambda wc: model_file(wc.student),
    output:
        res("diagnose/{teacher}/{student}/scores.safetensors"),
    log:
        res("logs/score/{teacher}/{student}.log"),
    benchmark:
        res("benchmarks/score/{teacher}/{student}.tsv")
    conda:
        ENV_CORE
    threads: THREADS
    resources:
        mem_mb=RES["diagnose"]["mem_mb"],
        runtime=RES["diagnose"]["runtime"],
        gpu=RES["diagnose"]["gpu"],
    params:
        args=score_args,
        teacher_dir=lambda wc, input: os.path.dirname(input.teacher),
        student_dir=lambda wc, input: os.path.dirname(input.student),
    shell:
        "python -m opd.engines.score --rollouts {input.rollouts} --teacher {params.teacher_dir}"
        " --student {params.student_dir} --out {output} {params.args} --threads {threads}"
        " --name {wildcards.teacher}/{wildcards.student} --study $OPD_STUDY > {log} 2>&1"


rule fixed_context:
    input:
        rollouts=res("diagnose/{student}/rollouts.safetensors"),
        scores=rules.score_initial.output,
        teacher=lambda wc: model_file(wc.teacher),
        student=lambda wc: model_file(wc.student),
    output:
        res("diagnose/{teacher}/{student}/fixed_context.csv"),
    log:
        res("logs/fixed_context/{teacher}/{student}.log"),
    benchmark:
        res("benchmarks/fixed_context/{teacher}/{student}.tsv")
    conda:
        ENV_CORE
    threads: THREADS
    resources:
        mem_mb=RES["diagnose"]["mem_mb"],
        runtime=RES["diagnose"]["runtime"],
        gpu=RES["diagnose"]["gpu"],
    params:
        args=fixed_context_args,
        teacher_dir=lambda wc, input: os.path.dirname(input.teacher),
        student_dir=lambda wc, input: os.path.dirname(input.student),
    shell:
        "python -m opd.studies.fixed_context --rollouts {input.rollouts} --scores {input.scores}"
        " --student {params.student_dir} --teacher {params.teacher_dir} --out {output} {params.args}"
        " --threads {threads} --name {wildcards.teacher}/{wildcards.student} --study $OPD_STUDY > {log} 2>&1"


rule diagnose:
    input:
        rollouts=[f"{RESULTS}/diagnose/{s}/rollouts.safetensors" for _, s in PAIRS],
        scores=[f"{RESULTS}/diagnose/{t}/{s}/scores.safetensors" for t, s in PAIRS],
        fixed=[f"{RESULTS}/diagnose/{t}/{s}/fixed_context.csv" for t, s in PAIRS],
        tokenizer=model_file(PAIRS[0][0]),
    output:
        report=f"{REPORT_DIR}/diagnose/report.md",
        summary=report(f"{REPORT_DIR}/diagnose/summary.csv", caption="../report/diagnose.rst", category="Diagnostics"),
        fixed=report(
            f"{REPORT_DIR}/diagnose/fixed_context.csv",
            caption="../report/diagnose.rst",
            category="Diagnostics",
        ),
        figures=report(
            expand(f"{REPORT_DIR}/diagnose/{{fig}}.png", fig=DIAGNOSE_FIGURES),
            caption="../report/diagnose.rst",
            category="Diagnostics",
        ),
    log:
        f"{RESULTS}/logs/{STUDY}/diagnose.log",
    conda:
        ENV_CORE
    params:
        args=diagnose_args,
        students=" ".join(pair_label(t, s) for t, s in PAIRS),
        tokenizer_dir=lambda wc, input: os.path.dirname(input.tokenizer),
        out_dir=lambda wc, output: os.path.dirname(output.report),
        study=STUDY,
    shell:
        "python -m opd.studies.diagnose --students {params.students} --rollouts {input.rollouts}"
        " --scores {input.scores} --fixed-context {input.fixed} --tokenizer {params.tokenizer_dir}"
        " --out-dir {params.out_dir} {params.args} --study {params.study} > {log} 2>&1"
