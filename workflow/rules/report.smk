# The study report: model x benchmark table and figure.


rule report_models:
    input:
        expand("results/eval/{model}/{task}.json", model=EVAL_MODELS, task=BENCHMARKS),
    output:
        md="results/report/models.md",
        csv="results/report/models.csv",
        png="results/report/models.png",
    params:
        study=STUDY,
        models=" ".join(EVAL_MODELS),
        tasks=" ".join(BENCHMARKS),
    log:
        "results/logs/report_models.log",
    shell:
        "python -m opd.report --results-dir results/eval --models {params.models} --tasks {params.tasks}"
        " --out-md {output.md} --out-csv {output.csv} --out-png {output.png} --study {params.study} > {log} 2>&1"


rule report_training:
    input:
        trained=trained_evals(),
        base=expand("results/eval/{model}/{task}.json", model=TRAIN_STUDENTS, task=BENCHMARKS),
    output:
        md="results/report/training.md",
        csv="results/report/training.csv",
        png="results/report/training.png",
    params:
        students=" ".join(TRAIN_STUDENTS),
        methods=" ".join(TRAIN["methods"]),
        seeds=" ".join(map(str, TRAIN["seeds"])),
        tasks=" ".join(BENCHMARKS),
        k=TRAIN["top_k"],
        ratio=TRAIN["ratio"],
        study=STUDY,
    log:
        "results/logs/report_training.log",
    shell:
        "python -m opd.report_train --students {params.students} --methods {params.methods}"
        " --seeds {params.seeds} --tasks {params.tasks} --k {params.k} --ratio {params.ratio}"
        " --out-md {output.md} --out-csv {output.csv} --out-png {output.png} --study {params.study} > {log} 2>&1"
