# lm-eval on every (model, benchmark), with the backend and settings of the evaluation block: one job per
# (model, benchmark), or per model with every benchmark (evaluation.jobs; eval_outputs, eval_job).


rule lm_eval:
    input:
        unpack(task_inputs),
        model=lambda wc: model_file(wc.model),
    output:
        eval_outputs(res("eval/{model}")),
    log:
        res(eval_job("logs/lm_eval/{model}") + ".log"),
    benchmark:
        res(eval_job("benchmarks/lm_eval/{model}") + ".tsv")
    conda:
        ENV_EVAL
    threads: THREADS
    resources:
        mem_mb=RES["eval"]["mem_mb"],
        runtime=RES["eval"]["runtime"],
        gpu=RES["eval"]["gpu"],
    params:
        args=eval_args,
        model_dir=lambda wc: model_dir(wc.model),
        out_dir=lambda wc, output: os.path.dirname(output[0]),
        tasks=eval_tasks,
    shell:
        "python -m opd.studies.evaluate --model-dir {params.model_dir} --model-name {wildcards.model}"
        " --tasks {params.tasks} --out-dir {params.out_dir}"
        " {params.args} --threads {threads} --study $OPD_STUDY > {log} 2>&1"


# The same evaluation under evaluation seed {eseed} > 0 (config evaluation.seeds), in evalseed~{eseed}/.
use rule lm_eval as lm_eval_seeded with:
    output:
        eval_outputs(res("eval/{model}/evalseed~{eseed}")),
    log:
        res(eval_job("logs/lm_eval/{model}/evalseed~{eseed}") + ".log"),
    benchmark:
        res(eval_job("benchmarks/lm_eval/{model}/evalseed~{eseed}") + ".tsv")
    params:
        args=seeded_eval_args,
        model_dir=lambda wc: model_dir(wc.model),
        out_dir=lambda wc: res(f"eval/{wc.model}"),  # opd.studies.evaluate adds evalseed~{eseed}/
        tasks=eval_tasks,
