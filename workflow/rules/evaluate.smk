# lm-eval on every (model, benchmark), with the backend and settings of the evaluation block.


rule lm_eval:
    input:
        unpack(task_inputs),
        model=lambda wc: model_file(wc.model),
    output:
        json=res("eval/{model}/{task}.json"),
        samples=res("eval/{model}/{task}.samples.jsonl"),
    log:
        res("logs/lm_eval/{model}/{task}.log"),
    benchmark:
        res("benchmarks/lm_eval/{model}/{task}.tsv")
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
        out_dir=lambda wc, output: os.path.dirname(output.json),
    shell:
        "python -m opd.studies.evaluate --model-dir {params.model_dir} --model-name {wildcards.model}"
        " --tasks {wildcards.task} --out-dir {params.out_dir}"
        " {params.args} --threads {threads} --study $OPD_STUDY > {log} 2>&1"


# The same evaluation under evaluation seed {eseed} > 0 (config evaluation.seeds), in evalseed~{eseed}/.
use rule lm_eval as lm_eval_seeded with:
    output:
        json=res("eval/{model}/evalseed~{eseed}/{task}.json"),
        samples=res("eval/{model}/evalseed~{eseed}/{task}.samples.jsonl"),
    log:
        res("logs/lm_eval/{model}/evalseed~{eseed}/{task}.log"),
    benchmark:
        res("benchmarks/lm_eval/{model}/evalseed~{eseed}/{task}.tsv")
    params:
        args=seeded_eval_args,
        model_dir=lambda wc: model_dir(wc.model),
        out_dir=lambda wc: res(f"eval/{wc.model}"),  # opd.studies.evaluate adds evalseed~{eseed}/
