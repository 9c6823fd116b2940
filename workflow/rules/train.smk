# On-policy distillation of every (teacher, student, method, K, ratio, seed) of the grid (opd.studies.sweep), and lm-eval of each final student.


# Under evaluation.trained with_training the training job also writes eval_trained's files, in the same process
# (opd.studies.chain: ~9 s of imports saved per run on a CPU), and wins them by the ruleorder below.
rule train_opd:
    input:
        unpack(lambda wc: task_inputs(wc) if EVAL_WITH_TRAINING else {}),
        student=lambda wc: model_file(sweep.student_build(wc.student, int(wc.seed), PER_SEED)),
        teacher=lambda wc: model_file(wc.teacher),
        prompts=PROMPTS,
    output:
        *(trained_eval_outputs() if EVAL_WITH_TRAINING else []),
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
        entry="opd.studies.chain opd.engines.train" if EVAL_WITH_TRAINING else "opd.engines.train",
        then_eval=train_then_eval,
    shell:
        "{params.launcher} -m {params.entry} --student {params.student_dir} --teacher {params.teacher_dir}"
        " --prompts {input.prompts} --out-dir {params.out_dir} --method {wildcards.method}"
        " --top-k {wildcards.k} --ratio {wildcards.ratio} --seed {wildcards.seed} {params.args}"
        " --threads {threads} --restart-if-flags-changed --name {params.name}"
        " --study $OPD_STUDY{params.then_eval} > {log} 2>&1"


if EVAL_WITH_TRAINING:

    ruleorder: train_opd > eval_trained


rule eval_trained:
    input:
        unpack(task_inputs),
        model=rules.train_opd.output.model,
        metrics=rules.train_opd.output.metrics,
    output:
        trained_eval_outputs(),
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
        flags=trained_eval_flags,
    shell:
        "python -m opd.studies.evaluate {params.flags} > {log} 2>&1"


# The same evaluation of a trained student under evaluation seed {eseed} > 0 (config evaluation.seeds).
use rule eval_trained as eval_trained_seeded with:
    output:
        trained_eval_outputs("evalseed~{eseed}"),
    log:
        f"{RESULTS}/logs/eval_trained/{TRAIN_ID}/evalseed~{{eseed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/eval_trained/{TRAIN_ID}/evalseed~{{eseed}}.tsv"
    params:
        flags=lambda wc, threads: trained_eval_flags(wc, threads, seeded_eval_args),
