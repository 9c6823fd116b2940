# On-policy distillation of every (teacher, student, method, K, ratio, seed) of the grid (opd.studies.sweep), and lm-eval of each final student.


rule train_opd:
    input:
        student=lambda wc: model_file(sweep.student_build(wc.student, int(wc.seed), PER_SEED)),
        teacher=lambda wc: model_file(wc.teacher),
        prompts=PROMPTS,
    output:
        model=f"{TRAIN_DIR}/model/model.safetensors",
        metrics=f"{TRAIN_DIR}/metrics.json",
    log:
        f"{RESULTS}/logs/train/{TRAIN_ID}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{TRAIN_ID}.tsv"
    conda:
        ENV_TRAIN
    threads: THREADS
    resources:
        mem_mb=RES["train"]["mem_mb"],
        runtime=RES["train"]["runtime"],
        gpu=train_gpus,
    params:
        args=train_args,
        out_dir=lambda wc, output: os.path.dirname(output.metrics),
        student_dir=lambda wc, input: os.path.dirname(input.student),
        teacher_dir=lambda wc, input: os.path.dirname(input.teacher),
        name=lambda wc: TRAIN_ID.format(**dict(wc.items())),
        launcher=train_launcher,
    shell:
        "{params.launcher} -m opd.engines.train --student {params.student_dir} --teacher {params.teacher_dir}"
        " --prompts {input.prompts} --out-dir {params.out_dir} --method {wildcards.method}"
        " --top-k {wildcards.k} --ratio {wildcards.ratio} --seed {wildcards.seed} {params.args}"
        " --threads {threads} --restart-if-flags-changed --name {params.name}"
        " --study $OPD_STUDY > {log} 2>&1"


rule eval_trained:
    input:
        unpack(task_inputs),
        model=rules.train_opd.output.model,
        metrics=rules.train_opd.output.metrics,
    output:
        expand(
            f"{TRAIN_DIR}/eval/{{task}}{{ext}}",
            task=BENCHMARKS,
            ext=[".json", ".samples.jsonl"],
            allow_missing=True,
        ),
    log:
        f"{RESULTS}/logs/eval_trained/{TRAIN_ID}.log",
    benchmark:
        f"{RESULTS}/benchmarks/eval_trained/{TRAIN_ID}.tsv"
    conda:
        ENV_EVAL
    threads: THREADS
    resources:
        mem_mb=RES["eval"]["mem_mb"],
        runtime=RES["eval"]["runtime"],
        gpu=RES["eval"]["gpu"],
    params:
        args=eval_args,
        train_dir=lambda wc, input: os.path.dirname(input.metrics),
        tasks=" ".join(BENCHMARKS),
        name=lambda wc: TRAIN_ID.format(**dict(wc.items())),
    shell:
        "python -m opd.studies.evaluate --model-dir {params.train_dir}/model --model-name"
        " {params.name}"
        " --tasks {params.tasks} --out-dir {params.train_dir}/eval"
        " --train-dir {params.train_dir} {params.args} --threads {threads} --study $OPD_STUDY > {log} 2>&1"


# The same evaluation of a trained student under evaluation seed {eseed} > 0 (config evaluation.seeds).
use rule eval_trained as eval_trained_seeded with:
    output:
        expand(
            f"{TRAIN_DIR}/eval/evalseed~{{eseed}}/{{task}}{{ext}}",
            task=BENCHMARKS,
            ext=[".json", ".samples.jsonl"],
            allow_missing=True,
        ),
    log:
        f"{RESULTS}/logs/eval_trained/{TRAIN_ID}/evalseed~{{eseed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/eval_trained/{TRAIN_ID}/evalseed~{{eseed}}.tsv"
    params:
        args=seeded_eval_args,
        train_dir=lambda wc, input: os.path.dirname(input.metrics),
        tasks=" ".join(BENCHMARKS),
        name=lambda wc: TRAIN_ID.format(**dict(wc.items())),
