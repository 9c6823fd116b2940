# The study reports (results/report/<study>/): models before training, the training table, the sweep.


rule report_models:
    input:
        [f for m in EVAL_MODELS for f in eval_files(res(f"eval/{m}"))],
    output:
        md=f"{REPORT_DIR}/models.md",
        csv=report(f"{REPORT_DIR}/models.csv", caption="../report/models.rst", category="Models"),
        png=report(f"{REPORT_DIR}/models.png", caption="../report/models.rst", category="Models"),
    log:
        f"{RESULTS}/logs/{STUDY}/report_models.log",
    conda:
        ENV_CORE
    params:
        study=STUDY,
        # <results>/eval, from the first input: eval/<model>[/evalseed~<s>]/<task>.json
        results_dir=lambda wc, input: str(Path(input[0]).parents[2 if EVAL_SEEDS[0] else 1]),
        models=" ".join(EVAL_MODELS),
        tasks=" ".join(BENCHMARKS),
        bench_args=bench_args(),
    shell:
        "python -m opd.studies.report --results-dir {params.results_dir} --models {params.models} --tasks {params.tasks} {params.bench_args}"
        " --out-md {output.md} --out-csv {output.csv} --out-png {output.png} --study {params.study} > {log} 2>&1"


rule report_training:
    input:
        trained=trained_evals(),
        base=[f for m in BASE_MODELS for f in eval_files(res(f"eval/{m}"))],
    output:
        md=f"{REPORT_DIR}/training.md",
        csv=report(f"{REPORT_DIR}/training.csv", caption="../report/training.rst", category="Training"),
        png=report(f"{REPORT_DIR}/training.png", caption="../report/training.rst", category="Training"),
        comparisons=report(
            f"{REPORT_DIR}/training_comparisons.csv",
            caption="../report/training.rst",
            category="Training",
        ),
    log:
        f"{RESULTS}/logs/{STUDY}/report_training.log",
    conda:
        ENV_CORE
    params:
        grid=grid_args(),
        bench_args=bench_args(),
        study=STUDY,
    shell:
        "python -m opd.studies.report_train {params.grid} {params.bench_args} --study {params.study}"
        " --out-md {output.md} --out-csv {output.csv} --out-png {output.png}"
        " --out-comparisons {output.comparisons} > {log} 2>&1"


rule report_sweep:
    input:
        trained=trained_evals(),
        base=[f for m in BASE_MODELS for f in eval_files(res(f"eval/{m}"))],
    output:
        md=f"{REPORT_DIR}/sweep.md",
        csv=report(f"{REPORT_DIR}/sweep.csv", caption="../report/sweep.rst", category="Sweep"),
        png=report(f"{REPORT_DIR}/sweep.png", caption="../report/sweep.rst", category="Sweep"),
        comparisons=report(
            f"{REPORT_DIR}/sweep_comparisons.csv",
            caption="../report/sweep.rst",
            category="Sweep",
        ),
    log:
        f"{RESULTS}/logs/{STUDY}/report_sweep.log",
    conda:
        ENV_CORE
    params:
        grid=grid_args(),
        bench_args=bench_args(),
        study=STUDY,
    shell:
        "python -m opd.studies.report_sweep {params.grid} {params.bench_args} --study {params.study}"
        " --out-md {output.md} --out-csv {output.csv} --out-png {output.png}"
        " --out-comparisons {output.comparisons} > {log} 2>&1"


rule report_reference:
    input:
        trained=trained_evals(),
        base=[f for m in BASE_MODELS for f in eval_files(res(f"eval/{m}"))],
        reference=lambda wc: str(Path(workflow.basedir) / config["evaluation"]["reference"]),
    output:
        md=f"{REPORT_DIR}/reference.md",
        csv=report(f"{REPORT_DIR}/reference.csv", caption="../report/reference.rst", category="Reference"),
        png=report(f"{REPORT_DIR}/reference.png", caption="../report/reference.rst", category="Reference"),
    log:
        f"{RESULTS}/logs/{STUDY}/report_reference.log",
    conda:
        ENV_CORE
    params:
        grid=grid_args(),
        bench_args=bench_args(),
        study=STUDY,
    shell:
        "python -m opd.studies.report_reference {params.grid} {params.bench_args} --study {params.study}"
        " --reference {input.reference} --out-md {output.md} --out-csv {output.csv} --out-png {output.png}"
        " > {log} 2>&1"
