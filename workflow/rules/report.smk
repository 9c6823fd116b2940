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
